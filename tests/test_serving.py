"""`trio_activate.runtime.serving`: a stream handler's accept loops and one task per connection.

Real listening sockets (127.0.0.1, unix paths in the test's folder), real
clients in the same Trio run.  Timing tests run on pytest-trio's
``autojump_clock`` (``MockClock(autojump_threshold=0)``) over unix sockets,
whose ``connect()`` completes at once, so virtual time is exact.  Accept
faults the kernel will not produce on demand (``ENFILE``, ``ECONNABORTED``,
...) come from a listening socket that plays a script of errors before
accepting for real; ``EMFILE`` is also produced for real, by lowering
``RLIMIT_NOFILE``.  Every test checks through /proc/self/fd that it leaves
no fd open.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import resource
import socket
import struct
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from trio_activate import examples
from trio_activate.model.manifest import HandlerKind, HandlerSpec, OnError, OnFull
from trio_activate.runtime import serving
from trio_activate.runtime.handlers import LoadedHandler
from trio_activate.runtime.serving import ConnectionSlots, IdleTimedStream, Listening, StreamServer
from trio_activate.system.fds import open_fds

Handler = Callable[[Any], Awaitable[None]]


pytestmark = pytest.mark.usefixtures("no_fd_leaks", "records")


class Sockets:
    """Listening sockets made for one test, all closed at its end."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.made: list[socket.socket] = []

    def keep(self, sock: socket.socket) -> socket.socket:
        self.made.append(sock)
        return sock

    def tcp(self) -> socket.socket:
        sock = self.keep(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        return sock

    def unix(self, name: str = "s.sock", kind: int = socket.SOCK_STREAM) -> socket.socket:
        sock = self.keep(socket.socket(socket.AF_UNIX, kind))
        sock.bind(str(self.folder / name))
        sock.listen()
        return sock

    def close(self) -> None:
        for sock in self.made:
            sock.close()


@pytest.fixture
def sockets(tmp_path: Path) -> Iterator[Sockets]:
    made = Sockets(tmp_path)
    try:
        yield made
    finally:
        made.close()


def stream_spec(
    *,
    max_connections: int | None = None,
    on_error: OnError = OnError.LOG,
    idle_timeout: float | None = None,
    max_lifetime: float | None = None,
    on_full: OnFull = OnFull.WAIT,
    access_log: bool = False,
) -> HandlerSpec:
    return HandlerSpec(
        "web",
        ("web",),
        "app:handle",
        HandlerKind.STREAM,
        max_connections,
        on_error,
        idle_timeout=idle_timeout,
        max_lifetime=max_lifetime,
        on_full=on_full,
        access_log=access_log,
    )


def server_for(
    handler: Handler,
    *socks: socket.socket,
    spec: HandlerSpec | None = None,
    on_failure: Callable[[], None] | None = None,
) -> StreamServer:
    def no_failure() -> None:
        raise AssertionError("on_failure called")

    return StreamServer(
        LoadedHandler(spec if spec is not None else stream_spec(), handler),
        [Listening("web", sock) for sock in socks],
        on_failure=on_failure if on_failure is not None else no_failure,
    )


async def connect(listener: socket.socket) -> trio.socket.SocketType:
    client = trio.socket.socket(listener.family, listener.type)
    try:
        await client.connect(listener.getsockname())
    except BaseException:
        client.close()
        raise
    return client


async def exchange(listener: socket.socket, data: bytes) -> bytes:
    """Connect, send ``data``, half-close, read everything back."""
    with await connect(listener) as client:
        await client.send(data)
        client.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := await client.recv(65536):
            received += chunk
        return received


async def echo(stream: trio.SocketStream) -> None:
    async for data in stream:
        await stream.send_all(data)


# --- what a handler gets ----------------------------------------------------


async def test_a_stream_handler_gets_a_socket_stream_per_connection(sockets: Sockets) -> None:
    got: list[object] = []

    async def handler(stream: trio.SocketStream) -> None:
        got.append(stream)
        await echo(stream)

    listener = sockets.tcp()
    server = server_for(handler, listener)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        for index in range(3):
            assert await exchange(listener, b"hello %d" % index) == b"hello %d" % index
        server.stop_accepting()
    assert len(got) == 3
    assert all(isinstance(stream, trio.SocketStream) for stream in got)
    assert len({id(stream) for stream in got}) == 3
    assert (server.accepted, server.cancelled, server.slots.active) == (3, 0, 0)


async def test_seqpacket_gets_the_connected_trio_socket_and_keeps_message_boundaries(
    sockets: Sockets,
) -> None:
    got: list[trio.socket.SocketType] = []

    async def handler(sock: trio.socket.SocketType) -> None:
        got.append(sock)
        while message := await sock.recv(65536):
            await sock.send(b"%d:" % len(message) + message)

    listener = sockets.unix("packets.sock", socket.SOCK_SEQPACKET)
    server = server_for(handler, listener)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        with await connect(listener) as client:
            # Both messages are queued before the handler reads either: a
            # stream would hand them over as one chunk.
            await client.send(b"one")
            await client.send(b"three")
            assert await client.recv(65536) == b"3:one"
            assert await client.recv(65536) == b"5:three"
        server.stop_accepting()
    [sock] = got
    assert isinstance(sock, trio.socket.SocketType)
    assert not isinstance(sock, trio.SocketStream)
    assert sock.type == socket.SOCK_SEQPACKET


async def test_one_handler_serves_every_socket_it_is_given(sockets: Sockets) -> None:
    async def where(stream: trio.SocketStream) -> None:
        await stream.send_all(repr(stream.socket.getsockname()).encode())

    tcp, unix = sockets.tcp(), sockets.unix()
    abstract = sockets.keep(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
    abstract.bind(f"\0trio-activate-test-{os.getpid()}")
    abstract.listen()
    server = server_for(where, tcp, unix, abstract)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        for listener in (tcp, unix, abstract, unix, tcp):
            assert await exchange(listener, b"") == repr(listener.getsockname()).encode()
        server.stop_accepting()
    assert server.accepted == 5


async def test_the_handler_may_close_the_stream_itself(sockets: Sockets) -> None:
    async def closes(stream: trio.SocketStream) -> None:
        await stream.send_all(b"bye")
        await stream.aclose()

    listener = sockets.tcp()
    server = server_for(closes, listener)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        assert await exchange(listener, b"") == b"bye"
        assert await exchange(listener, b"") == b"bye"
        server.stop_accepting()
    assert (server.accepted, server.slots.active) == (2, 0)


async def test_stop_accepting_lets_connections_in_flight_finish(sockets: Sockets) -> None:
    finish = trio.Event()

    async def waits(stream: trio.SocketStream) -> None:
        await stream.send_all(b"started")
        await finish.wait()
        await stream.send_all(b" finished")

    listener = sockets.unix()
    server = server_for(waits, listener)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        with await connect(listener) as client:
            assert await client.recv(100) == b"started"
            server.stop_accepting()
            await trio.testing.wait_all_tasks_blocked()
            # Not accepting any more: a new client stays in the backlog, unserved.
            with await connect(listener):
                await trio.testing.wait_all_tasks_blocked()
                assert server.accepted == 1
                finish.set()
                assert await client.recv(100) == b" finished"
                assert await client.recv(100) == b""
                assert server.accepted == 1
    assert (server.accepted, server.cancelled) == (1, 0)


# --- handler errors ---------------------------------------------------------


async def test_a_raising_handler_is_logged_and_the_others_keep_being_served(
    sockets: Sockets, records: pytest.LogCaptureFixture
) -> None:
    async def fragile(stream: trio.SocketStream) -> None:
        data = await stream.receive_some(100)
        if data == b"boom":
            raise RuntimeError("handler bug")
        await stream.send_all(data)

    listener = sockets.tcp()
    server = server_for(fragile, listener)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        with await connect(listener) as in_flight:
            # The connection that raises is closed; the service goes on.
            assert await exchange(listener, b"boom") == b""
            assert await exchange(listener, b"after") == b"after"
            await in_flight.send(b"in flight")
            assert await in_flight.recv(100) == b"in flight"
        assert await exchange(listener, b"boom") == b""
        assert await exchange(listener, b"still") == b"still"
        server.stop_accepting()
    errors = [r for r in records.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == ["handlers.web: a connection on sockets.web raised"] * 2
    for record in errors:
        assert record.exc_info is not None
        assert isinstance(record.exc_info[1], RuntimeError)
    assert (server.accepted, server.cancelled, server.slots.active) == (5, 0, 0)


async def test_on_error_exit_asks_the_service_to_stop_once_per_failure(sockets: Sockets) -> None:
    failures: list[int] = []

    async def fragile(stream: trio.SocketStream) -> None:
        if await stream.receive_some(100) == b"boom":
            raise RuntimeError("handler bug")
        await stream.send_all(b"ok")

    listener = sockets.tcp()
    server = server_for(
        fragile,
        listener,
        spec=stream_spec(on_error=OnError.EXIT),
        on_failure=lambda: failures.append(server.accepted),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        assert await exchange(listener, b"fine") == b"ok"
        assert failures == []
        assert await exchange(listener, b"boom") == b""
        assert failures == [2]
        server.stop_accepting()


# --- clients that go away ------------------------------------------------------


def reset(client: trio.socket.SocketType) -> None:
    """Close ``client`` with a reset (RST) instead of a FIN: SO_LINGER on, 0 seconds."""
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()


async def reads_then_writes(stream: trio.SocketStream) -> None:
    """Reads a request, then answers in pieces until the client is gone."""
    await stream.receive_some(100)
    while True:
        await stream.send_all(b"x" * 100)
        await trio.sleep(0.001)


async def request_then_reset(listener: socket.socket) -> int:
    """A client that sends a request, sees the answer begin, and resets; returns its port."""
    client = await connect(listener)
    port: int = client.getsockname()[1]
    try:
        await client.send(b"GET / HTTP/1.1\r\n\r\n")
        assert await client.recv(100)
    finally:
        reset(client)
    return port


async def until_idle(server: StreamServer) -> None:
    with trio.fail_after(5):
        while server.slots.active:
            await server.slots.wait_freed()


async def test_clients_that_reset_are_one_debug_line_each_and_no_error(
    sockets: Sockets, records: pytest.LogCaptureFixture
) -> None:
    """50 clients reset while the handler answers: 50 debug lines naming each, no traceback;
    and with on-error = "exit" the service is not stopped (on_failure would fail the test)."""
    records.set_level(logging.DEBUG, logger="trio_activate")
    listener = sockets.tcp()
    server = server_for(reads_then_writes, listener, spec=stream_spec(on_error=OnError.EXIT))
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        ports = [await request_then_reset(listener) for _ in range(50)]
        await until_idle(server)
        server.stop_accepting()
    assert [r.levelno for r in records.records] == [logging.DEBUG] * 50
    # In the order the handlers saw the resets, which need not be the clients' order.
    assert sorted(r.getMessage() for r in records.records) == sorted(
        f"handlers.web: client 127.0.0.1:{port} on sockets.web reset the connection" for port in ports
    )
    assert all(r.exc_info is None for r in records.records)
    assert (server.accepted, server.cancelled, server.slots.active) == (50, 0, 0)


async def test_a_reset_inside_a_handlers_own_nursery_is_the_clients_too(
    sockets: Sockets, records: pytest.LogCaptureFixture
) -> None:
    records.set_level(logging.DEBUG, logger="trio_activate")

    async def with_nursery(stream: trio.SocketStream) -> None:
        async with trio.open_nursery() as inner:
            inner.start_soon(reads_then_writes, stream)

    listener = sockets.tcp()
    server = server_for(with_nursery, listener)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        port = await request_then_reset(listener)
        await until_idle(server)
        server.stop_accepting()
    assert [(r.levelno, r.getMessage()) for r in records.records] == [
        (logging.DEBUG, f"handlers.web: client 127.0.0.1:{port} on sockets.web reset the connection")
    ]


async def test_a_reset_of_a_connection_the_handler_opened_itself_stays_an_error(
    sockets: Sockets, records: pytest.LogCaptureFixture
) -> None:
    """Only the served connection's own socket says its client went away: an upstream
    server that resets is the handler's error to handle, logged with its traceback."""
    upstream = sockets.tcp()

    async def proxy(stream: trio.SocketStream) -> None:
        with trio.socket.socket() as backend:
            await backend.connect(upstream.getsockname())
            await stream.send_all(b"connected")
            await backend.recv(100)

    listener = sockets.tcp()
    server = server_for(proxy, listener)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        with await connect(listener) as client:
            assert await client.recv(100) == b"connected"
            accepted, _ = upstream.accept()
            accepted.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            accepted.close()
            assert await client.recv(100) == b""
        server.stop_accepting()
    [record] = records.records
    assert (record.levelno, record.getMessage()) == (
        logging.ERROR,
        "handlers.web: a connection on sockets.web raised",
    )
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], ConnectionResetError)


async def test_a_broken_pipe_after_the_handlers_own_shutdown_stays_an_error(
    sockets: Sockets, records: pytest.LogCaptureFixture
) -> None:
    """EPIPE on the connection's socket, but the handler shut its sending side itself."""

    async def sends_after_eof(sock: trio.socket.SocketType) -> None:
        await sock.recv(100)
        sock.shutdown(socket.SHUT_WR)
        await sock.send(b"late")

    listener = sockets.unix("packets.sock", socket.SOCK_SEQPACKET)
    server = server_for(sends_after_eof, listener)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        with await connect(listener) as client:
            await client.send(b"hi")
            assert await client.recv(100) == b""
        server.stop_accepting()
    [record] = records.records
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], BrokenPipeError)


# --- cancellation -----------------------------------------------------------


async def test_a_cancelled_connection_is_counted_and_closed(sockets: Sockets) -> None:
    async def forever(stream: trio.SocketStream) -> None:
        await stream.send_all(b"hi")
        await trio.sleep_forever()

    listener = sockets.unix()
    server = server_for(forever, listener)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        with await connect(listener) as client:
            assert await client.recv(100) == b"hi"
            server.stop_accepting()
            server.cancel_connections()
            assert await client.recv(100) == b""
    assert (server.accepted, server.cancelled, server.slots.active) == (1, 1, 0)


async def test_a_handler_running_its_own_nursery_counts_as_cancelled(
    sockets: Sockets, records: pytest.LogCaptureFixture, autojump_clock: trio.testing.MockClock
) -> None:
    """Cancelled through a nursery, a handler raises a group of Cancelled, not a bare one."""

    async def with_nursery(stream: trio.SocketStream) -> None:
        async with trio.open_nursery() as inner:
            inner.start_soon(trio.sleep_forever)
            await stream.send_all(b"hi")
            await trio.sleep_forever()

    listener = sockets.unix()
    server = server_for(with_nursery, listener)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        with await connect(listener) as client:
            assert await client.recv(100) == b"hi"
            server.stop_accepting()
            server.set_drain_deadline(trio.current_time() + 2)
            assert await client.recv(100) == b""
            assert trio.current_time() == 2
    assert (server.accepted, server.cancelled) == (1, 1)
    assert not [r for r in records.records if r.levelno >= logging.WARNING]


async def test_a_handler_failing_while_cancelled_is_logged_and_still_counted(
    sockets: Sockets, records: pytest.LogCaptureFixture, autojump_clock: trio.testing.MockClock
) -> None:
    """A group of Cancelled and a handler's own error: the error is logged, the server goes on."""

    async def cleanup_fails() -> None:
        try:
            await trio.sleep_forever()
        finally:
            raise ValueError("cleanup failed")

    async def with_nursery(stream: trio.SocketStream) -> None:
        async with trio.open_nursery() as inner:
            inner.start_soon(cleanup_fails)
            await stream.send_all(b"hi")
            await trio.sleep_forever()

    listener = sockets.unix()
    server = server_for(with_nursery, listener)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        with await connect(listener) as client:
            assert await client.recv(100) == b"hi"
            server.stop_accepting()
            server.cancel_connections()
            assert await client.recv(100) == b""
    assert (server.accepted, server.cancelled) == (1, 1)
    [record] = [r for r in records.records if r.levelno >= logging.ERROR]
    assert record.getMessage() == "handlers.web: a connection on sockets.web raised"
    assert record.exc_info is not None
    error = record.exc_info[1]
    assert isinstance(error, ExceptionGroup)
    assert [str(e) for e in error.exceptions] == ["cleanup failed"]


# --- max-connections --------------------------------------------------------


async def test_max_connections_is_honoured_across_every_socket(sockets: Sockets) -> None:
    running: list[trio.Event] = []
    peak = 0

    async def held(stream: trio.SocketStream) -> None:
        nonlocal peak
        release = trio.Event()
        running.append(release)
        peak = max(peak, sum(not event.is_set() for event in running))
        await stream.send_all(b"in")
        await release.wait()

    first, second = sockets.tcp(), sockets.unix()
    server = server_for(held, first, second, spec=stream_spec(max_connections=2))
    clients = []
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        try:
            for listener in (first, second, first, second, first):
                clients.append(await connect(listener))
            await trio.testing.wait_all_tasks_blocked()
            assert (server.accepted, server.slots.active) == (2, 2)
            for served in range(3, 6):
                running[served - 3].set()  # one closes: exactly one more gets in
                await trio.testing.wait_all_tasks_blocked()
                assert (server.accepted, server.slots.active) == (served, 2)
            for event in running:
                event.set()
            for client in clients:
                assert await client.recv(100) == b"in"
                assert await client.recv(100) == b""
        finally:
            for client in clients:
                client.close()
        server.stop_accepting()
    assert peak == 2
    assert (server.accepted, server.slots.active) == (5, 0)


async def test_connection_slots_count_and_wake_waiters() -> None:
    slots = ConnectionSlots(1)
    assert slots.available()
    slots.take()
    assert not slots.available()
    woken: list[str] = []

    async def waiter() -> None:
        await slots.wait_available()
        woken.append("available")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert woken == []
        slots.give_back()
    assert woken == ["available"]
    assert ConnectionSlots(None).available()


# --- on-full -----------------------------------------------------------------


async def test_on_full_close_accepts_and_closes_new_connections_at_once(
    sockets: Sockets, autojump_clock: trio.testing.MockClock
) -> None:
    release = trio.Event()

    async def held(stream: trio.SocketStream) -> None:
        await stream.send_all(b"in")
        await release.wait()

    listener = sockets.unix()
    server = server_for(held, listener, spec=stream_spec(max_connections=1, on_full=OnFull.CLOSE))
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        with await connect(listener) as first:
            assert await first.recv(100) == b"in"
            for _ in range(3):
                with await connect(listener) as turned_away:
                    # Closed by the server at once, not left waiting in the backlog.
                    assert await turned_away.recv(100) == b""
            assert trio.current_time() == 0
            assert (server.accepted, server.refused, server.slots.active) == (1, 3, 1)
            release.set()
            assert await first.recv(100) == b""
        # A slot is free again: the next client is served.
        release = trio.Event()
        with await connect(listener) as later:
            assert await later.recv(100) == b"in"
            release.set()
        server.stop_accepting()
    assert (server.accepted, server.refused) == (2, 3)


async def test_on_full_wait_leaves_new_connections_in_the_backlog(
    sockets: Sockets, autojump_clock: trio.testing.MockClock
) -> None:
    release = trio.Event()

    async def held(stream: trio.SocketStream) -> None:
        await stream.send_all(b"in")
        await release.wait()

    listener = sockets.unix()
    server = server_for(held, listener, spec=stream_spec(max_connections=1, on_full=OnFull.WAIT))
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        with await connect(listener) as first, await connect(listener) as waiting:
            assert await first.recv(100) == b"in"
            with trio.move_on_after(60) as waited:
                await waiting.recv(100)
            assert waited.cancelled_caught  # nothing for a minute: still in the backlog
            assert (server.accepted, server.refused) == (1, 0)
            release.set()
            assert await waiting.recv(100) == b"in"
        server.stop_accepting()
    assert (server.accepted, server.refused) == (2, 0)


# --- idle-timeout and max-lifetime --------------------------------------------


async def test_silent_connections_are_closed_after_idle_timeout_and_free_their_slots(
    sockets: Sockets, autojump_clock: trio.testing.MockClock
) -> None:
    """100 clients that connect and send nothing hold max-connections = 100
    only for idle-timeout; then the next client is served."""
    listener = sockets.unix()
    spec = stream_spec(max_connections=100, idle_timeout=30)
    server = server_for(echo, listener, spec=spec)
    silent: list[trio.socket.SocketType] = []
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            for _ in range(100):
                silent.append(await connect(listener))
            await trio.testing.wait_all_tasks_blocked()
            assert server.slots.active == 100
            with await connect(listener) as late:
                await late.send(b"hello")
                late.shutdown(socket.SHUT_WR)
                assert await late.recv(100) == b"hello"
                # Served once the silent ones timed out, not before.
                assert trio.current_time() == pytest.approx(30)
            for client in silent:
                assert await client.recv(100) == b""  # closed by the server
            server.stop_accepting()
    finally:
        for client in silent:
            client.close()
    assert (server.timed_out, server.slots.active) == (100, 0)


async def test_idle_timeout_counts_from_the_last_byte_received(
    sockets: Sockets, autojump_clock: trio.testing.MockClock
) -> None:
    """A byte every 20 s keeps a connection with idle-timeout = 30 open; once
    the bytes stop it is closed between 30 s and 30 s plus the slack."""
    listener = sockets.unix()
    server = server_for(echo, listener, spec=stream_spec(idle_timeout=30))
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        with await connect(listener) as client:
            for _ in range(10):
                await client.send(b"x")
                assert await client.recv(100) == b"x"
                await trio.sleep(20)
            last_byte = trio.current_time() - 20
            assert await client.recv(100) == b""
            idle = trio.current_time() - last_byte
            assert 30 <= idle <= 30 * (1 + serving.IDLE_SLACK)
        server.stop_accepting()
    assert server.timed_out == 1


async def test_max_lifetime_closes_a_trickling_client(
    sockets: Sockets, autojump_clock: trio.testing.MockClock
) -> None:
    """A client sending 1 byte every 10 s never goes idle (idle-timeout = 15),
    and is still closed at max-lifetime = 55."""
    ended: list[float] = []

    async def timed_echo(stream: trio.SocketStream) -> None:
        try:
            await echo(stream)
        finally:
            ended.append(trio.current_time())

    listener = sockets.unix()
    server = server_for(timed_echo, listener, spec=stream_spec(idle_timeout=15, max_lifetime=55))
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        echoed = 0
        with await connect(listener) as client:
            while True:
                try:
                    await client.send(b"x")
                except (BrokenPipeError, ConnectionResetError):
                    break
                if await client.recv(100) != b"x":
                    break
                echoed += 1
                await trio.sleep(10)
        server.stop_accepting()
    assert echoed == 6  # at 0, 10, ..., 50
    assert ended == [pytest.approx(55)]
    assert server.timed_out == 1


async def test_max_lifetime_applies_to_seqpacket_connections(
    sockets: Sockets, autojump_clock: trio.testing.MockClock
) -> None:
    async def talk(sock: trio.socket.SocketType) -> None:
        while message := await sock.recv(100):
            await sock.send(message)

    listener = sockets.unix("packets.sock", socket.SOCK_SEQPACKET)
    server = server_for(talk, listener, spec=stream_spec(max_lifetime=5))
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        with await connect(listener) as client:
            await client.send(b"ping")
            assert await client.recv(100) == b"ping"
            assert await client.recv(100) == b""
            assert trio.current_time() == pytest.approx(5)
        server.stop_accepting()
    assert server.timed_out == 1


async def test_with_idle_timeout_the_handler_gets_a_half_closeable_stream_that_works_as_before(
    sockets: Sockets,
) -> None:
    """receive_some, iteration, send_all, send_eof, socket and sockopts all work."""
    got: list[object] = []

    async def handler(stream: IdleTimedStream) -> None:
        got.append(stream)
        assert stream.socket.family == socket.AF_INET
        assert stream.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        first = await stream.receive_some(3)
        rest = b"".join([chunk async for chunk in stream])
        await stream.wait_send_all_might_not_block()
        await stream.send_all(first + rest)
        await stream.send_eof()
        await stream.aclose()

    listener = sockets.tcp()
    server = server_for(handler, listener, spec=stream_spec(idle_timeout=30, max_lifetime=60))
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        assert await exchange(listener, b"hello, world") == b"hello, world"
        server.stop_accepting()
    [stream] = got
    assert isinstance(stream, trio.abc.HalfCloseableStream)
    assert (server.accepted, server.timed_out, server.slots.active) == (1, 0, 0)


async def test_the_echo_example_serves_under_idle_timeout(sockets: Sockets) -> None:
    listener = sockets.unix()
    server = server_for(examples.echo, listener, spec=stream_spec(idle_timeout=30))
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        assert await exchange(listener, b"hello") == b"hello"
        server.stop_accepting()
    assert (server.accepted, server.timed_out, server.slots.active) == (1, 0, 0)


# --- access-log ----------------------------------------------------------------

ACCESS_LINE = re.compile(
    r"handler=web socket=web peer=(?P<peer>\S+) duration_ms=(?P<ms>\d+\.\d) "
    r"bytes_in=(?P<bytes_in>\S+) bytes_out=(?P<bytes_out>\S+) outcome=(?P<outcome>\S+)"
)


def access_lines(records: pytest.LogCaptureFixture) -> list[dict[str, str]]:
    """Each access line's fields, checked against the line's shape and level."""
    lines = []
    for record in records.records:
        if record.name == "trio_activate.access":
            assert record.levelno == logging.INFO
            found = ACCESS_LINE.fullmatch(record.getMessage())
            assert found, record.getMessage()
            lines.append(found.groupdict())
    return lines


async def test_the_access_log_is_off_by_default(sockets: Sockets, records: pytest.LogCaptureFixture) -> None:
    got: list[object] = []

    async def handler(stream: trio.SocketStream) -> None:
        got.append(stream)
        await echo(stream)

    listener = sockets.tcp()
    server = server_for(handler, listener)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        assert await exchange(listener, b"hello") == b"hello"
        server.stop_accepting()
    assert records.records == []
    # Nothing counts its bytes: the handler has the plain stream.
    assert [type(stream) for stream in got] == [trio.SocketStream]


async def test_an_access_line_per_connection_names_peer_duration_bytes_and_outcome(
    sockets: Sockets, records: pytest.LogCaptureFixture
) -> None:
    async def fragile(stream: trio.abc.HalfCloseableStream) -> None:
        data = await stream.receive_some(100)
        if data == b"boom":
            raise ValueError("handler bug")
        await stream.send_all(data.upper())
        await stream.send_all(memoryview(b"!!"))

    listener = sockets.tcp()
    server = server_for(fragile, listener, spec=stream_spec(access_log=True))
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        with await connect(listener) as client:
            port = client.getsockname()[1]
            await client.send(b"hello")
            received = b""
            while chunk := await client.recv(100):
                received += chunk
            assert received == b"HELLO!!"
        assert await exchange(listener, b"boom") == b""
        server.stop_accepting()
    closed, failed = access_lines(records)
    assert closed == {
        "peer": f"127.0.0.1:{port}",
        "ms": closed["ms"],
        "bytes_in": "5",
        "bytes_out": "7",
        "outcome": "closed",
    }
    assert 0 <= float(closed["ms"]) < 5000
    assert (failed["bytes_in"], failed["bytes_out"], failed["outcome"]) == ("4", "0", "error")
    # The handler's error is still its one error line, with its traceback.
    [error] = [r for r in records.records if r.levelno == logging.ERROR]
    assert error.exc_info is not None
    # The fields, for a structured formatter.
    [first, _] = [r for r in records.records if r.name == "trio_activate.access"]
    assert (first.handler, first.socket, first.bytes_in, first.outcome) == ("web", "web", 5, "closed")  # type: ignore[attr-defined]


async def test_the_access_line_of_a_reset_says_reset(
    sockets: Sockets, records: pytest.LogCaptureFixture
) -> None:
    listener = sockets.tcp()
    server = server_for(reads_then_writes, listener, spec=stream_spec(access_log=True))
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        port = await request_then_reset(listener)
        await until_idle(server)
        server.stop_accepting()
    [line] = access_lines(records)
    assert (line["peer"], line["bytes_in"], line["outcome"]) == (f"127.0.0.1:{port}", "18", "reset")
    assert int(line["bytes_out"]) >= 100


async def test_the_access_line_of_a_timeout_and_of_a_drain_say_which(
    sockets: Sockets, records: pytest.LogCaptureFixture, autojump_clock: trio.testing.MockClock
) -> None:
    """A unix client (it bound no name): its pid.  Idle for 30 s, or held past max-lifetime,
    or cancelled at the end of the drain."""
    listener = sockets.unix()
    server = server_for(echo, listener, spec=stream_spec(idle_timeout=30, max_lifetime=100, access_log=True))
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        with await connect(listener) as client:
            await client.send(b"hi")
            assert await client.recv(100) == b"hi"
            assert await client.recv(100) == b""  # idle for 30 s
        with await connect(listener) as client:
            for _ in range(5):
                await client.send(b"tick")
                assert await client.recv(100) == b"tick"
                await trio.sleep(20)
            assert await client.recv(100) == b""  # 100 s in all
        with await connect(listener) as client:
            await client.send(b"drained")
            assert await client.recv(100) == b"drained"
            server.stop_accepting()
            server.set_drain_deadline(trio.current_time() + 5)
            assert await client.recv(100) == b""
    idle, lifetime, drained = access_lines(records)
    peer = f"pid:{os.getpid()}"
    assert idle == {
        "peer": peer,
        "ms": idle["ms"],
        "bytes_in": "2",
        "bytes_out": "2",
        "outcome": "idle-timeout",
    }
    assert 30_000 <= float(idle["ms"]) <= 30_000 * (1 + serving.IDLE_SLACK)
    assert (lifetime["ms"], lifetime["bytes_in"], lifetime["outcome"]) == ("100000.0", "20", "max-lifetime")
    assert (drained["ms"], drained["bytes_out"], drained["outcome"]) == ("5000.0", "7", "cancelled")


async def test_a_seqpacket_access_line_has_no_byte_counts(
    sockets: Sockets, records: pytest.LogCaptureFixture
) -> None:
    async def handler(sock: trio.socket.SocketType) -> None:
        await sock.send(await sock.recv(100))

    listener = sockets.unix("packets.sock", socket.SOCK_SEQPACKET)
    server = server_for(handler, listener, spec=stream_spec(access_log=True))
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        with await connect(listener) as client:
            await client.send(b"one")
            assert await client.recv(100) == b"one"
        server.stop_accepting()
    [line] = access_lines(records)
    assert (line["bytes_in"], line["bytes_out"], line["outcome"]) == ("-", "-", "closed")


# --- accept() faults ---------------------------------------------------------


class ScriptedListener(socket.socket):
    """A real listening unix socket whose ``accept()`` first plays a script.

    Each entry is an ``OSError`` to raise, or None to accept for real.  Once
    the script is used up, every call accepts for real.
    """

    def __init__(self, path: Path, script: list[OSError | None]) -> None:
        super().__init__(socket.AF_UNIX, socket.SOCK_STREAM)
        self.bind(str(path))
        self.listen()
        self.script = list(script)
        self.calls = 0

    def accept(self) -> tuple[socket.socket, Any]:
        self.calls += 1
        if self.script:
            entry = self.script.pop(0)
            if entry is not None:
                raise entry
        return super().accept()


def fault(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def capacity_warnings(records: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in records.records if "accept failed" in r.getMessage()]


@pytest.mark.parametrize("code", sorted(serving.ACCEPT_CAPACITY_ERRNOS), ids=errno.errorcode.get)
async def test_out_of_resources_waits_capacity_backoff_and_logs_once(
    tmp_path: Path, records: pytest.LogCaptureFixture, autojump_clock: trio.testing.MockClock, code: int
) -> None:
    started: list[float] = []

    async def note(stream: trio.SocketStream) -> None:
        started.append(trio.current_time())
        await stream.send_all(b"ok")

    with ScriptedListener(tmp_path / "s.sock", [fault(code)] * 3) as listener:
        server = server_for(note, listener)
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            assert await exchange(listener, b"") == b"ok"
            server.stop_accepting()
    # No connection of this server closes meanwhile: a retry every CAPACITY_BACKOFF.
    assert started == [pytest.approx(3 * serving.CAPACITY_BACKOFF)]
    # Three failures, the accept, and the one that found the backlog empty.
    assert listener.calls == 5
    assert capacity_warnings(records) == [
        f"sockets.web: accept failed: {os.strerror(code)}; waiting for a connection to close before retrying"
    ]


async def test_out_of_fds_retries_as_soon_as_a_connection_closes(
    tmp_path: Path, records: pytest.LogCaptureFixture, autojump_clock: trio.testing.MockClock
) -> None:
    started: list[float] = []

    async def note(stream: trio.SocketStream) -> None:
        started.append(trio.current_time())
        if len(started) == 1:
            await trio.sleep(0.03)
        await stream.send_all(b"ok")

    with ScriptedListener(tmp_path / "s.sock", [None, fault(errno.EMFILE)]) as listener:
        server = server_for(note, listener)
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            with await connect(listener) as first, await connect(listener) as second:
                assert await second.recv(100) == b"ok"
                assert await first.recv(100) == b"ok"
            server.stop_accepting()
    # The first connection closed at 0.03, before the 0.1 s backoff ran out.
    assert started == [0, pytest.approx(0.03)]
    assert len(capacity_warnings(records)) == 1


async def test_each_burst_of_accept_failures_is_logged_once(
    tmp_path: Path, records: pytest.LogCaptureFixture, autojump_clock: trio.testing.MockClock
) -> None:
    emfile, empty = fault(errno.EMFILE), BlockingIOError(errno.EAGAIN, "empty backlog")
    script = [emfile, emfile, emfile, None, empty, emfile, emfile, None]
    with ScriptedListener(tmp_path / "s.sock", script) as listener:
        server = server_for(echo, listener)
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            assert await exchange(listener, b"one") == b"one"
            assert await exchange(listener, b"two") == b"two"
            server.stop_accepting()
    assert listener.calls == 9
    assert len(capacity_warnings(records)) == 2


# Linux reports an error pending on an incoming connection through accept();
# EREMOTEIO stands for an errno nobody listed: it must not end the service either.
SKIPPED_ERRNOS = [*sorted(serving.ACCEPT_SKIP_ERRNOS), errno.EREMOTEIO]


@pytest.mark.parametrize("code", SKIPPED_ERRNOS, ids=errno.errorcode.get)
async def test_a_connection_that_failed_in_the_backlog_is_skipped_at_once_and_logged_at_debug(
    tmp_path: Path, records: pytest.LogCaptureFixture, autojump_clock: trio.testing.MockClock, code: int
) -> None:
    records.set_level(logging.DEBUG, logger="trio_activate")
    with ScriptedListener(tmp_path / "s.sock", [fault(code), fault(code)]) as listener:
        server = server_for(echo, listener)
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            assert await exchange(listener, b"hi") == b"hi"
            assert await exchange(listener, b"again") == b"again"
            server.stop_accepting()
    assert trio.current_time() == 0
    # Two skipped, two accepted, each accepted one followed by a call that found the backlog empty.
    assert listener.calls == 6
    assert (server.accepted, server.slots.active) == (2, 0)
    message = (
        f"sockets.web: skipped a connection that failed before accept: [Errno {code}] {os.strerror(code)}"
    )
    assert [(r.levelno, r.getMessage()) for r in records.records] == [(logging.DEBUG, message)] * 2


def test_no_errno_is_both_skipped_and_fatal_or_capacity() -> None:
    assert not serving.ACCEPT_SKIP_ERRNOS & serving.ACCEPT_FATAL_ERRNOS
    assert not serving.ACCEPT_SKIP_ERRNOS & serving.ACCEPT_CAPACITY_ERRNOS
    assert not serving.ACCEPT_FATAL_ERRNOS & serving.ACCEPT_CAPACITY_ERRNOS


@pytest.mark.parametrize("code", sorted(serving.ACCEPT_FATAL_ERRNOS), ids=errno.errorcode.get)
async def test_an_accept_error_of_the_listening_socket_itself_ends_the_server(
    tmp_path: Path, code: int
) -> None:
    with ScriptedListener(tmp_path / "s.sock", [fault(code)]) as listener:
        server = server_for(echo, listener)
        with pytest.RaisesGroup(
            pytest.RaisesExc(OSError, check=lambda e: e.errno == code), flatten_subgroups=True
        ):
            async with trio.open_nursery() as nursery:
                await nursery.start(server.run)
                with await connect(listener):
                    await trio.sleep_forever()


async def test_running_out_of_fds_for_real_logs_once_and_recovers(
    sockets: Sockets, records: pytest.LogCaptureFixture
) -> None:
    """EMFILE from the kernel: RLIMIT_NOFILE lowered so that two more fds fit."""
    release = trio.Event()
    served = 0

    async def held(stream: trio.SocketStream) -> None:
        nonlocal served
        served += 1
        await stream.send_all(b"in")
        await release.wait()

    listener = sockets.unix()
    server = server_for(held, listener)
    clients = [trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(6)]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            used = open_fds()
            free = [fd for fd in range(max(used) + 3) if fd not in used]
            resource.setrlimit(resource.RLIMIT_NOFILE, (free[1] + 1, hard))
            try:
                for client in clients:
                    await client.connect(listener.getsockname())
                for client in clients[:2]:
                    assert await client.recv(100) == b"in"
                # Several CAPACITY_BACKOFF periods of failing accept() calls.
                await trio.sleep(5 * serving.CAPACITY_BACKOFF)
                assert (served, server.slots.active) == (2, 2)
                assert len(capacity_warnings(records)) == 1
                # Connections close, fds free up: everyone is served in turn.
                release.set()
                with trio.fail_after(5):
                    for client in clients[:2]:
                        assert await client.recv(100) == b""
                    for client in clients[2:]:
                        assert await client.recv(100) == b"in"
                        assert await client.recv(100) == b""
                assert served == 6
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            server.stop_accepting()
    finally:
        for client in clients:
            client.close()
    assert (server.accepted, server.slots.active) == (6, 0)
