"""Tests for trio_activate.runtime.watchdog: the WATCHDOG=1 schedule, in virtual time.

Time is pytest-trio's ``autojump_clock`` (``MockClock(autojump_threshold=0)``):
whenever every task is blocked, the clock jumps to the next deadline, so an
hour of pings runs in milliseconds.  The pings are real datagrams on a real
unix socket, read by a Trio socket in a task of the same run, so each one is
recorded with the virtual time it arrived at.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing

from trio_activate.runtime.watchdog import serve_watchdog
from trio_activate.system.notifier import Notifier

INTERVAL = 1.5
WATCHDOG_USEC = str(int(INTERVAL * 2 * 1_000_000))  # WatchdogSec=3: ping every 1.5 s
OTHER_PID = 1  # init: never the test process


class Pings:
    """Records every datagram arriving on a bound Trio socket, with the time
    (since `start`) it arrived."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.start = trio.current_time()
        self.received: list[tuple[float, bytes]] = []

    async def collect(self) -> None:
        while True:
            data = await self.sock.recv(65536)
            self.received.append((trio.current_time() - self.start, data))

    @property
    def times(self) -> list[float]:
        assert all(data == b"WATCHDOG=1" for _, data in self.received), self.received
        return [when for when, _ in self.received]


@pytest.fixture
def path(tmp_path: Path) -> str:
    return str(tmp_path / "notify")


def bound_trio_socket(path: str) -> trio.socket.SocketType:
    """A Trio datagram socket bound at `path`.  Bound with the stdlib socket:
    trio's ``bind`` of a unix path runs in a thread, and while a thread runs
    every task is blocked, so the autojump clock would skip time."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    return trio.socket.from_stdlib_socket(sock)


@pytest.fixture
async def pings(path: str) -> AsyncIterator[Pings]:
    """A receiver bound at `path`, collecting in the background."""
    with bound_trio_socket(path) as sock:
        recorder = Pings(sock)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(recorder.collect)
            yield recorder
            nursery.cancel_scope.cancel()


def watchdog_notifier(path: str, **extra: str) -> Notifier:
    return Notifier.from_environ({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": WATCHDOG_USEC, **extra})


@pytest.mark.parametrize("intervals", [1, 4, 100])
async def test_pings_at_once_then_every_interval(
    autojump_clock: trio.testing.MockClock, path: str, pings: Pings, intervals: int
) -> None:
    """Over N intervals: N+1 pings, at 0, i, 2i, ..., Ni, half of
    WATCHDOG_USEC apart, and none after cancellation."""
    with watchdog_notifier(path) as notifier:
        assert notifier.watchdog_interval == INTERVAL
        with trio.move_on_after(intervals * INTERVAL + INTERVAL / 2):
            await serve_watchdog(notifier)
        await trio.sleep(10 * INTERVAL)
    assert pings.times == [n * INTERVAL for n in range(intervals + 1)]


async def test_started_after_the_first_ping(autojump_clock: trio.testing.MockClock, path: str) -> None:
    """nursery.start returns at time 0 with the first ping already sent (a
    plain non-blocking recv finds it without yielding to any task)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock, watchdog_notifier(path) as notifier:
        sock.bind(path)
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_watchdog, notifier)
            assert sock.recv(65536, socket.MSG_DONTWAIT) == b"WATCHDOG=1"
            assert trio.current_time() == start
            nursery.cancel_scope.cancel()


async def test_watchdog_pid_of_another_process_sends_no_pings(
    autojump_clock: trio.testing.MockClock, path: str, pings: Pings
) -> None:
    """WATCHDOG_PID of another process: serve_watchdog reports started and
    returns at once; no ping is ever sent."""
    with watchdog_notifier(path, WATCHDOG_PID=str(OTHER_PID)) as notifier:
        assert notifier.watchdog_interval is None
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_watchdog, notifier)
        assert trio.current_time() == pings.start
        await trio.sleep(100 * INTERVAL)
    assert pings.received == []


async def test_without_notify_socket_returns_at_once(autojump_clock: trio.testing.MockClock) -> None:
    """No NOTIFY_SOCKET (WATCHDOG_USEC alone): nothing to ping, return at once."""
    with Notifier.from_environ({"WATCHDOG_USEC": WATCHDOG_USEC}) as notifier:
        start = trio.current_time()
        await serve_watchdog(notifier)
        assert trio.current_time() == start


async def test_a_stalled_loop_gets_one_ping_not_a_burst(
    autojump_clock: trio.testing.MockClock, path: str, pings: Pings
) -> None:
    """When the task wakes up many intervals late, it pings once and keeps
    time from there; the missed pings are not sent in a burst."""
    with watchdog_notifier(path) as notifier:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_watchdog, notifier)
            await trio.testing.wait_all_tasks_blocked()  # the first ping is read
            # As if the loop were blocked: time passes, no task runs.
            autojump_clock.jump(10.25 * INTERVAL)
            await trio.sleep(1.5 * INTERVAL)
            nursery.cancel_scope.cancel()
    assert pings.times == [0, 10.25 * INTERVAL, 11.25 * INTERVAL]


async def test_failed_pings_are_logged_and_the_task_carries_on(
    autojump_clock: trio.testing.MockClock, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """No receiver yet: every ping fails with a warning, the task does not
    raise; once a receiver binds the path, pings arrive on the same grid."""
    with watchdog_notifier(path) as notifier:
        async with trio.open_nursery() as nursery:
            start = trio.current_time()
            await nursery.start(serve_watchdog, notifier)
            await trio.sleep(2.5 * INTERVAL)
            assert len(caplog.records) == 3  # at 0, i, 2i
            assert all(r.levelno == logging.WARNING for r in caplog.records)
            assert all("No such file or directory" in r.getMessage() for r in caplog.records)
            with bound_trio_socket(path) as sock:
                for n in (3, 4):
                    assert await sock.recv(65536) == b"WATCHDOG=1"
                    assert trio.current_time() - start == n * INTERVAL
            nursery.cancel_scope.cancel()
    assert len(caplog.records) == 3
