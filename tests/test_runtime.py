"""`trio_activate.runtime.service`: a service's life, in-process and end to end.

In-process: a `Service` built from sockets made here (127.0.0.1, unix paths
in the test's folder) and handler functions defined here, with clients in
the same Trio run.  Grace periods run on pytest-trio's ``autojump_clock``
(``MockClock(autojump_threshold=0)``): a 60-second handler costs nothing and
times are exact.

End to end: ``python -m trio_activate serve`` as a subprocess, self-activating
(it creates its sockets and re-execs itself through the internal activator),
with a handler module written into the test's folder, real clients, real
signals, and a real datagram socket as ``NOTIFY_SOCKET``.  The service logs
to a file; tests wait for lines to appear there, each wait bounded.  Every
subprocess is killed in a ``finally``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from helpers import TRIO_ACTIVATE, Process, clean_env, require_peer, started, wait_until

from trio_activate.model.manifest import HandlerSpec, manifest_from_dict
from trio_activate.model.notify_message import parse_notify_message
from trio_activate.runtime.handlers import LoadedHandler
from trio_activate.runtime.service import EXIT_FAILED, EXIT_OK, HandlerSockets, Service, serve_connection_once
from trio_activate.runtime.serving import Listening
from trio_activate.system.notifier import Notifier

Handler = Callable[[Any], Awaitable[None]]


pytestmark = pytest.mark.usefixtures("no_fd_leaks", "records")


def messages(records: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in records.records if r.name == "trio_activate"]


# --- in-process: building a Service -------------------------------------------------


class Plan:
    """Sockets and handler functions for one in-process `Service`; closes the sockets."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.made: list[socket.socket] = []
        self.sockets: dict[str, list[socket.socket]] = {}

    def add(self, name: str, sock: socket.socket) -> socket.socket:
        self.made.append(sock)
        self.sockets.setdefault(name, []).append(sock)
        return sock

    def tcp(self, name: str) -> socket.socket:
        sock = self.add(name, socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        return sock

    def unix(self, name: str) -> socket.socket:
        sock = self.add(name, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        sock.bind(str(self.folder / f"{name}-{len(self.made)}.sock"))
        sock.listen()
        return sock

    def udp(self, name: str) -> socket.socket:
        sock = self.add(name, socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        sock.bind(("127.0.0.1", 0))
        return sock

    def service(
        self,
        handlers: dict[str, tuple[dict[str, Any], Handler]],
        *,
        grace: float = 5.0,
        notifier: Notifier | None = None,
    ) -> Service:
        """``handlers``: name -> (its manifest table without ``call``, the function)."""
        socket_tables: dict[str, Any] = {}
        for name, group in self.sockets.items():
            kind = "datagram" if group[0].type == socket.SOCK_DGRAM else "stream"
            socket_tables[name] = {"listen": ["127.0.0.1:0"] * len(group), "type": kind}
        manifest = manifest_from_dict(
            {
                "service": {"name": "svc", "grace-period": grace},
                "sockets": socket_tables,
                "handlers": {
                    name: {**table, "call": f"tests.app:{name}"} for name, (table, _) in handlers.items()
                },
            }
        )
        plan = []
        for spec in manifest.handlers:
            function = handlers[spec.name][1]
            listening = [Listening(name, sock) for name in spec.sockets for sock in self.sockets[name]]
            plan.append(HandlerSockets(LoadedHandler(spec, function), listening))
        return Service(manifest, plan, notifier=notifier)

    def close(self) -> None:
        for sock in self.made:
            sock.close()


@pytest.fixture
def plan(tmp_path: Path) -> Iterator[Plan]:
    made = Plan(tmp_path)
    try:
        yield made
    finally:
        made.close()


async def connect(listener: socket.socket) -> trio.socket.SocketType:
    client = trio.socket.socket(listener.family, listener.type)
    try:
        await client.connect(listener.getsockname())
    except BaseException:
        client.close()
        raise
    return client


async def read_all(client: trio.socket.SocketType) -> bytes:
    received = b""
    while chunk := await client.recv(65536):
        received += chunk
    return received


def sleeper(seconds: float, started: list[float]) -> Handler:
    """A stream handler that says "started", sleeps, then says "done"."""

    async def handler(stream: trio.SocketStream) -> None:
        started.append(trio.current_time())
        await stream.send_all(b"started;")
        await trio.sleep(seconds)
        await stream.send_all(b"done")

    return handler


async def echo(stream: trio.SocketStream) -> None:
    async for data in stream:
        await stream.send_all(data)


def queued(receiver: socket.socket) -> list[bytes]:
    """Every datagram waiting on ``receiver``, without blocking."""
    timeout = receiver.gettimeout()
    receiver.setblocking(False)
    datagrams = []
    try:
        while True:
            datagrams.append(receiver.recv(4096))
    except BlockingIOError:
        return datagrams
    finally:
        receiver.settimeout(timeout)


def fields_of(datagrams: list[bytes]) -> list[tuple[str, str]]:
    """The sd_notify fields, in the order sent, however they were grouped into datagrams."""
    return [item for data in datagrams for item in parse_notify_message(data).items()]


# --- readiness ---------------------------------------------------------------


async def test_ready_then_stopping_are_sent_to_the_notify_socket(
    plan: Plan, tmp_path: Path, records: pytest.LogCaptureFixture
) -> None:
    plan.tcp("web")
    plan.unix("web")
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver, Notifier(path) as notifier:
        receiver.bind(path)
        service = plan.service({"web": ({"socket": "web"}, echo)}, notifier=notifier)
        async with trio.open_nursery() as nursery:
            await nursery.start(service.serve)
            # task_status.started() comes after READY=1: it is already queued.
            assert fields_of(queued(receiver)) == [("READY", "1"), ("STATUS", "Serving web (2 fd)")]
            service.shutdown()
        assert fields_of(queued(receiver)) == [
            ("STOPPING", "1"),
            ("STATUS", "Stopping: draining 0 connection(s)"),
        ]
    assert "ready: svc serving web (2 fd)" in messages(records)


# --- grace period ------------------------------------------------------------


@pytest.mark.parametrize(
    ("runs_for", "reply", "ends_after", "last_line"),
    [
        pytest.param(3, b"done", 3, "stopped: every connection finished (1 served)", id="finishes-inside"),
        pytest.param(
            60,
            b"",
            5,
            "stopped: 0 connection(s) in flight finished within the grace period, 1 were cancelled",
            id="outlives-it-and-is-cancelled",
        ),
    ],
)
async def test_a_connection_in_flight_gets_the_grace_period_then_is_cancelled(
    plan: Plan,
    records: pytest.LogCaptureFixture,
    autojump_clock: trio.testing.MockClock,
    runs_for: float,
    reply: bytes,
    ends_after: float,
    last_line: str,
) -> None:
    """Rule: on shutdown a connection in flight completes if it finishes within the
    grace period (5 s); one that would run longer is cancelled when it ends."""
    listener = plan.unix("web")
    started: list[float] = []
    service = plan.service({"web": ({"socket": "web"}, sleeper(runs_for, started))}, grace=5)
    async with trio.open_nursery() as nursery:
        await nursery.start(service.serve)
        with await connect(listener) as client:
            assert await client.recv(100) == b"started;"
            stop_at = trio.current_time()
            service.shutdown()
            assert await read_all(client) == reply
            assert trio.current_time() - stop_at == pytest.approx(ends_after)
    assert service.exit_status == EXIT_OK
    assert messages(records)[-2:] == [
        "stopping: no longer accepting; 1 connection(s) in flight get 5s",
        last_line,
    ]


async def test_shutdown_logs_what_was_drained_and_what_was_cancelled(
    plan: Plan, records: pytest.LogCaptureFixture, autojump_clock: trio.testing.MockClock
) -> None:
    fast, slow = plan.unix("fast"), plan.tcp("slow")
    started: list[float] = []
    service = plan.service(
        {
            "fast": ({"socket": "fast"}, sleeper(3, started)),
            "slow": ({"socket": "slow"}, sleeper(60, started)),
        },
        grace=5,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(service.serve)
        with await connect(fast) as one, await connect(fast) as two, await connect(slow) as three:
            for client in (one, two, three):
                assert await client.recv(100) == b"started;"
            service.shutdown()
            assert [await read_all(c) for c in (one, two, three)] == [b"done", b"done", b""]
    assert service.exit_status == EXIT_OK
    assert messages(records)[-2:] == [
        "stopping: no longer accepting; 3 connection(s) in flight get 5s",
        "stopped: 2 connection(s) in flight finished within the grace period, 1 were cancelled",
    ]


async def test_a_grace_period_of_zero_cancels_at_once(
    plan: Plan, autojump_clock: trio.testing.MockClock
) -> None:
    listener = plan.unix("web")
    started: list[float] = []
    service = plan.service({"web": ({"socket": "web"}, sleeper(1, started))}, grace=0)
    async with trio.open_nursery() as nursery:
        await nursery.start(service.serve)
        with await connect(listener) as client:
            assert await client.recv(100) == b"started;"
            stop_at = trio.current_time()
            service.shutdown()
            assert await read_all(client) == b""
    assert trio.current_time() == stop_at


async def test_cancel_stops_at_once_without_the_grace_period(
    plan: Plan, autojump_clock: trio.testing.MockClock
) -> None:
    listener = plan.unix("web")
    started: list[float] = []
    service = plan.service({"web": ({"socket": "web"}, sleeper(60, started))}, grace=30)
    async with trio.open_nursery() as nursery:
        await nursery.start(service.serve)
        with await connect(listener) as client:
            assert await client.recv(100) == b"started;"
            stop_at = trio.current_time()
            service.shutdown()
            await trio.sleep(1)
            service.cancel()
            assert await read_all(client) == b""
    assert trio.current_time() - stop_at == pytest.approx(1)
    assert service.exit_status == EXIT_OK


# --- handler kinds -------------------------------------------------------------


async def test_a_datagram_handler_is_called_once_per_fd_with_the_trio_socket(
    plan: Plan, records: pytest.LogCaptureFixture, autojump_clock: trio.testing.MockClock
) -> None:
    calls: list[trio.socket.SocketType] = []

    async def udp_echo(sock: trio.socket.SocketType) -> None:
        calls.append(sock)
        while True:
            data, peer = await sock.recvfrom(100)
            await sock.sendto(data, peer)

    first, second = plan.udp("dns"), plan.udp("dns")
    service = plan.service({"dns": ({"socket": "dns"}, udp_echo)}, grace=5)
    async with trio.open_nursery() as nursery:
        await nursery.start(service.serve)
        for target in (first, second):
            with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
                await client.sendto(b"ping", target.getsockname())
                assert await client.recv(100) == b"ping"
        stop_at = trio.current_time()
        service.shutdown()
    assert trio.current_time() == stop_at  # nothing in flight to wait for
    assert sorted(sock.fileno() for sock in calls) == sorted([first.fileno(), second.fileno()])
    assert all(isinstance(sock, trio.socket.SocketType) for sock in calls)
    assert service.exit_status == EXIT_OK
    assert not [r for r in records.records if r.levelno >= logging.WARNING]


async def test_a_listener_handler_gets_every_listener_once(
    plan: Plan, autojump_clock: trio.testing.MockClock
) -> None:
    calls: list[list[trio.SocketListener]] = []

    async def run(listeners: list[trio.SocketListener]) -> None:
        calls.append(listeners)
        await trio.serve_listeners(echo, listeners)

    tcp, unix = plan.tcp("api"), plan.unix("api")
    service = plan.service({"api": ({"socket": "api", "kind": "listener"}, run)})
    async with trio.open_nursery() as nursery:
        await nursery.start(service.serve)
        for listener in (tcp, unix):
            with await connect(listener) as client:
                await client.send(b"hi")
                assert await client.recv(100) == b"hi"
        stop_at = trio.current_time()
        service.shutdown()
    assert trio.current_time() == stop_at
    [listeners] = calls
    assert all(isinstance(item, trio.SocketListener) for item in listeners)
    assert sorted(item.socket.fileno() for item in listeners) == sorted([tcp.fileno(), unix.fileno()])
    assert service.exit_status == EXIT_OK


@pytest.mark.parametrize("kind", ["datagram", "listener"])
async def test_a_raising_datagram_or_listener_handler_stops_the_service_with_1(
    plan: Plan, records: pytest.LogCaptureFixture, autojump_clock: trio.testing.MockClock, kind: str
) -> None:
    async def broken(argument: object) -> None:
        await trio.sleep(1)
        raise RuntimeError("handler bug")

    if kind == "datagram":
        plan.udp("dgram")
    else:
        plan.tcp("dgram")
    web = plan.unix("web")
    started: list[float] = []
    table = {"socket": "dgram", "kind": kind}
    service = plan.service({"broken": (table, broken), "web": ({"socket": "web"}, sleeper(3, started))})
    async with trio.open_nursery() as nursery:
        await nursery.start(service.serve)
        with await connect(web) as client:
            assert await client.recv(100) == b"started;"
            # The failure stops the service gracefully: the connection in flight finishes.
            assert await read_all(client) == b"done"
    assert service.exit_status == EXIT_FAILED
    assert trio.current_time() == pytest.approx(3)
    [error] = [r for r in records.records if r.levelno >= logging.ERROR]
    assert error.getMessage() == "handlers.broken (sockets.dgram) raised; stopping the service"
    assert error.exc_info is not None
    assert isinstance(error.exc_info[1], RuntimeError)


async def test_a_datagram_handler_that_fails_at_once_is_never_reported_ready(
    plan: Plan, records: pytest.LogCaptureFixture, autojump_clock: trio.testing.MockClock
) -> None:
    async def broken(sock: trio.socket.SocketType) -> None:
        raise RuntimeError("no configuration")

    plan.udp("dgram")
    service = plan.service({"broken": ({"socket": "dgram"}, broken)})
    async with trio.open_nursery() as nursery:
        await nursery.start(service.serve)
    assert service.exit_status == EXIT_FAILED
    assert not any(r.getMessage().startswith("ready: ") for r in records.records)
    assert [r.getMessage() for r in records.records if r.levelno >= logging.ERROR] == [
        "handlers.broken (sockets.dgram) raised; stopping the service"
    ]


async def test_a_datagram_handler_that_returns_is_logged_and_the_service_goes_on(
    plan: Plan, records: pytest.LogCaptureFixture, autojump_clock: trio.testing.MockClock
) -> None:
    async def quits(sock: trio.socket.SocketType) -> None:
        await trio.lowlevel.checkpoint()

    plan.udp("dns")
    web = plan.tcp("web")
    service = plan.service({"dns": ({"socket": "dns"}, quits), "web": ({"socket": "web"}, echo)})
    async with trio.open_nursery() as nursery:
        await nursery.start(service.serve)
        await trio.sleep(10)
        with await connect(web) as client:
            await client.send(b"still up")
            assert await client.recv(100) == b"still up"
        service.shutdown()
    assert service.exit_status == EXIT_OK
    assert "handlers.dns (sockets.dns) returned; it serves no more" in messages(records)


async def test_on_error_exit_stops_the_service_with_1_after_draining(
    plan: Plan, records: pytest.LogCaptureFixture, autojump_clock: trio.testing.MockClock
) -> None:
    async def fragile(stream: trio.SocketStream) -> None:
        if await stream.receive_some(100) == b"boom":
            raise RuntimeError("handler bug")
        await trio.sleep(2)
        await stream.send_all(b"done")

    listener = plan.unix("web")
    service = plan.service({"web": ({"socket": "web", "on-error": "exit"}, fragile)})
    async with trio.open_nursery() as nursery:
        await nursery.start(service.serve)
        with await connect(listener) as slow, await connect(listener) as bad:
            await slow.send(b"slow")
            await trio.testing.wait_all_tasks_blocked()
            await bad.send(b"boom")
            assert await read_all(bad) == b""
            assert await read_all(slow) == b"done"
    assert service.exit_status == EXIT_FAILED
    assert "stopped: every connection finished (2 served)" in messages(records)


async def test_on_error_log_keeps_serving(
    plan: Plan, records: pytest.LogCaptureFixture, autojump_clock: trio.testing.MockClock
) -> None:
    async def fragile(stream: trio.SocketStream) -> None:
        data = await stream.receive_some(100)
        if data == b"boom":
            raise RuntimeError("handler bug")
        await stream.send_all(data)

    listener = plan.unix("web")
    service = plan.service({"web": ({"socket": "web"}, fragile)})
    async with trio.open_nursery() as nursery:
        await nursery.start(service.serve)
        for request in (b"one", b"boom", b"two", b"boom", b"three"):
            with await connect(listener) as client:
                await client.send(request)
                assert await read_all(client) == (b"" if request == b"boom" else request)
        service.shutdown()
    assert service.exit_status == EXIT_OK
    assert messages(records).count("handlers.web: a connection on sockets.web raised") == 2


async def test_max_connections_from_the_manifest_is_honoured(
    plan: Plan, autojump_clock: trio.testing.MockClock
) -> None:
    active = peak = 0

    async def counted(stream: trio.SocketStream) -> None:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        try:
            await trio.sleep(1)
            await stream.send_all(b"ok")
        finally:
            active -= 1

    listener = plan.unix("web")
    service = plan.service({"web": ({"socket": "web", "max-connections": 3}, counted)})
    async with trio.open_nursery() as nursery:
        await nursery.start(service.serve)
        clients = [await connect(listener) for _ in range(10)]
        try:
            for client in clients:
                assert await read_all(client) == b"ok"
        finally:
            for client in clients:
                client.close()
        # 10 connections, 3 at a time, 1 s each: four rounds.
        assert trio.current_time() == pytest.approx(4)
        service.shutdown()
    assert peak == 3


# --- Accept=yes ----------------------------------------------------------------


def handler_for(function: Handler, name: str = "web") -> LoadedHandler:
    return LoadedHandler(HandlerSpec(name, ("web",), "tests.app:web"), function)


async def test_serve_connection_once_serves_a_stream_connection_and_closes_it() -> None:
    got: list[object] = []

    async def greet(stream: trio.SocketStream) -> None:
        got.append(stream)
        await stream.send_all(b"hello " + await stream.receive_some(100))

    ours, peer = socket.socketpair()
    with peer:
        peer.sendall(b"you")
        assert await serve_connection_once(handler_for(greet), ours) == EXIT_OK
        assert peer.recv(100) == b"hello you"
        assert peer.recv(100) == b""  # closed by the runtime
    assert ours.fileno() == -1
    [stream] = got
    assert isinstance(stream, trio.SocketStream)


async def test_serve_connection_once_hands_seqpacket_over_as_the_trio_socket() -> None:
    got: list[object] = []

    async def packets(sock: trio.socket.SocketType) -> None:
        got.append(sock)
        first, second = await sock.recv(100), await sock.recv(100)
        await sock.send(first + b"|" + second)

    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with peer:
        peer.send(b"one")
        peer.send(b"two")
        assert await serve_connection_once(handler_for(packets), ours) == EXIT_OK
        assert peer.recv(100) == b"one|two"
    [sock] = got
    assert isinstance(sock, trio.socket.SocketType)
    assert sock.type == socket.SOCK_SEQPACKET


async def test_serve_connection_once_exits_1_when_the_handler_raises(
    records: pytest.LogCaptureFixture,
) -> None:
    async def broken(stream: trio.SocketStream) -> None:
        raise RuntimeError("handler bug")

    ours, peer = socket.socketpair()
    with peer:
        assert await serve_connection_once(handler_for(broken, "acc"), ours) == EXIT_FAILED
        assert peer.recv(100) == b""
    assert messages(records) == ["handlers.acc: the Accept=yes connection raised"]


@contextmanager
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """An accepted TCP connection (ours) and its client (peer)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        peer = socket.create_connection(listener.getsockname())
        with peer:
            ours, _ = listener.accept()
            yield ours, peer


async def test_serve_connection_once_takes_a_client_that_resets_as_no_failure(
    records: pytest.LogCaptureFixture,
) -> None:
    """Accept=yes: a client that resets is one debug line, exit status 0 (systemd would
    otherwise count the instance as failed), and the access line says reset."""
    records.set_level(logging.DEBUG, logger="trio_activate")

    async def reads_then_writes(stream: trio.SocketStream) -> None:
        await stream.receive_some(100)
        while True:
            await stream.send_all(b"x" * 100)
            await trio.sleep(0.001)

    spec = HandlerSpec("acc", ("web",), "tests.app:web", access_log=True)
    with tcp_pair() as (ours, peer):
        port = peer.getsockname()[1]
        peer.sendall(b"request")

        async def client_resets() -> None:
            await trio.to_thread.run_sync(peer.recv, 100)
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            peer.close()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(client_resets)
            assert await serve_connection_once(LoadedHandler(spec, reads_then_writes), ours) == EXIT_OK
    debug, access = records.records
    assert (debug.levelno, debug.getMessage()) == (
        logging.DEBUG,
        f"handlers.acc: client 127.0.0.1:{port} reset the connection",
    )
    assert (access.name, access.levelno) == ("trio_activate.access", logging.INFO)
    assert re.fullmatch(
        rf"handler=acc socket=- peer=127\.0\.0\.1:{port} duration_ms=\d+\.\d "
        r"bytes_in=7 bytes_out=\d+00 outcome=reset",
        access.getMessage(),
    ), access.getMessage()


async def test_serve_connection_once_keeps_the_handlers_idle_timeout_and_max_lifetime(
    records: pytest.LogCaptureFixture, autojump_clock: trio.testing.MockClock
) -> None:
    """Accept=yes: the handler's timeouts hold for the one connection, as they do under `serve`."""

    async def waits_forever(stream: trio.abc.HalfCloseableStream) -> None:
        async for _ in stream:
            pass

    for limits, reached, after in (
        ({"idle_timeout": 30.0}, "idle-timeout", 30),
        ({"max_lifetime": 55.0}, "max-lifetime", 55),
    ):
        handler = LoadedHandler(HandlerSpec("acc", ("web",), "tests.app:web", **limits), waits_forever)
        ours, peer = socket.socketpair()
        with peer:
            started = trio.current_time()
            assert await serve_connection_once(handler, ours) == EXIT_OK
            assert trio.current_time() - started == pytest.approx(after, abs=30 / 8 + 0.01)
            assert peer.recv(100) == b""
        assert messages(records)[-1] == f"handlers.acc: the Accept=yes connection reached its {reached}"


# --- end to end: trio-activate serve as a subprocess ----------------------------

APP = '''\
"""Handlers for the end-to-end tests: one line in, an answer out."""

import json
import os

import trio


async def read_line(stream):
    data = b""
    while not data.endswith(b"\\n"):
        chunk = await stream.receive_some(1024)
        if not chunk:
            break
        data += chunk
    return data.strip()


async def handle(stream):
    request = await read_line(stream)
    if request == b"fds":
        fds = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
        await stream.send_all(json.dumps(fds).encode())
    elif request == b"boom":
        raise RuntimeError("boom on request")
    elif request == b"hold":
        await stream.send_all(b"holding %d\\n" % os.getpid())
        rest = await read_line(stream)
        await stream.send_all(b"finished " + rest)
    elif request == b"pid":
        await stream.send_all(str(os.getpid()).encode())
    else:
        await stream.send_all(request.upper())


async def datagrams(sock):
    while True:
        data, peer = await sock.recvfrom(1024)
        if data == b"boom":
            raise RuntimeError("datagram boom")
        await sock.sendto(data.upper(), peer)
'''

STREAM_SERVICE = """\
[service]
name = "e2e"
grace-period = {grace}

[sockets.web]
listen = ["127.0.0.1:0", "./web.sock"]

[handlers.web]
socket = "web"
call = "app:handle"
{handler_extra}
"""


class Served:
    """A running ``trio-activate serve`` (`helpers.Process`, as ``proc``) in the folder of its files."""

    def __init__(self, proc: Process, folder: Path) -> None:
        self.proc = proc
        self.folder = folder

    def log(self) -> str:
        return self.proc.log

    def wait_for(self, text: str, *, timeout: float = 15) -> str:
        """Wait until ``text`` is in the log, and return the log; fail with the log if it never is."""
        return self.proc.wait_for_text(text, timeout=timeout)

    def wait_ready(self) -> None:
        self.wait_for("ready: ")

    def stop(self, signum: signal.Signals = signal.SIGTERM, *, timeout: float = 15) -> int:
        return self.proc.stop(signum, timeout)

    def wait(self, *, timeout: float = 15) -> int:
        return self.proc.wait(timeout)

    @property
    def tcp(self) -> tuple[str, int]:
        return ("127.0.0.1", self.proc.port())

    @property
    def unix(self) -> str:
        return str(self.folder / "web.sock")


@contextmanager
def serve(
    folder: Path,
    manifest: str,
    *,
    env: dict[str, str] | None = None,
    argv: Sequence[str] = (),
    app_preamble: str = "",
) -> Iterator[Served]:
    (folder / "svc.toml").write_text(manifest)
    (folder / "app.py").write_text(app_preamble + APP)
    command = [*TRIO_ACTIVATE, "serve", str(folder / "svc.toml")]
    with started([*argv, *command], env=env if env is not None else clean_env(), cwd=folder) as proc:
        yield Served(proc, folder)


def client(address: str | tuple[str, int]) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX if isinstance(address, str) else socket.AF_INET)
    sock.settimeout(10)
    try:
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


def read_until_eof(sock: socket.socket) -> bytes:
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def holding_pid(sock: socket.socket) -> int:
    """Read the handler's "holding PID" line."""
    line = sock.recv(100)
    assert re.fullmatch(rb"holding \d+\n", line), line
    return int(line.split()[1])


def ask(address: str | tuple[str, int], request: bytes) -> bytes:
    with client(address) as sock:
        sock.sendall(request + b"\n")
        return read_until_eof(sock)


def test_serve_self_activates_and_answers_clients(tmp_path: Path) -> None:
    with serve(tmp_path, STREAM_SERVICE.format(grace=5, handler_extra="")) as served:
        served.wait_ready()
        log = served.log()
        assert "2 sockets created by the internal activator" in log
        assert "ready: e2e serving web (2 fd)" in log
        assert ask(served.tcp, b"hello tcp") == b"HELLO TCP"
        assert ask(served.unix, b"hello unix") == b"HELLO UNIX"
        assert served.stop() == 0
    log = served.log()
    assert "SIGTERM: shutting down gracefully" in log
    assert "stopped: every connection finished (2 served)" in log
    assert "Traceback" not in log


def test_ready_and_stopping_arrive_on_a_real_notify_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(path)
        notify.settimeout(15)
        env = clean_env(NOTIFY_SOCKET=path)
        with serve(tmp_path, STREAM_SERVICE.format(grace=5, handler_extra=""), env=env) as served:
            first = notify.recv(4096)
            # READY=1 comes when the service really serves.  Once a connection was
            # served, whatever the service sent with READY=1 has been sent too.
            assert ask(served.unix, b"ready") == b"READY"
            assert fields_of([first, *queued(notify)]) == [
                ("READY", "1"),
                ("STATUS", "Serving web (2 fd)"),
            ]
            assert served.stop() == 0
            assert fields_of(queued(notify)) == [
                ("STOPPING", "1"),
                ("STATUS", "Stopping: draining 0 connection(s)"),
            ]


@pytest.mark.slow
def test_sigterm_drains_a_connection_that_finishes_and_cancels_one_that_outlives_grace(
    tmp_path: Path,
) -> None:
    # A grace period the finishing connection's round trip meets however loaded the machine.
    with serve(tmp_path, STREAM_SERVICE.format(grace=5, handler_extra="")) as served:
        served.wait_ready()
        with client(served.unix) as finishing, client(served.tcp) as outliving:
            for sock in (finishing, outliving):
                sock.sendall(b"hold\n")
                holding_pid(sock)
            served.proc.send_signal(signal.SIGTERM)
            served.wait_for("connection(s) in flight get 5s")
            # Not accepting any more, but the connection in flight is still served.
            finishing.sendall(b"now\n")
            assert read_until_eof(finishing) == b"finished now"
            # The other one never finishes: cancelled when the grace period ends.
            assert read_until_eof(outliving) == b""
            assert served.wait() == 0
    log = served.log()
    assert "stopping: no longer accepting; 2 connection(s) in flight get 5s" in log
    assert "stopped: 1 connection(s) in flight finished within the grace period, 1 were cancelled" in log


def test_a_second_sigint_cancels_at_once(tmp_path: Path) -> None:
    with serve(tmp_path, STREAM_SERVICE.format(grace=600, handler_extra="")) as served:
        served.wait_ready()
        with client(served.unix) as held:
            held.sendall(b"hold\n")
            holding_pid(held)
            served.proc.send_signal(signal.SIGINT)
            served.wait_for("SIGINT: shutting down gracefully")
            served.wait_for("in flight get 600s")
            assert served.proc.poll() is None  # waiting for the connection
            started = time.monotonic()
            assert served.stop(signal.SIGINT) == 0
            assert time.monotonic() - started < 10
            assert read_until_eof(held) == b""
    log = served.log()
    assert "second SIGINT: cancelling every handler now" in log
    assert "0 connection(s) in flight finished within the grace period, 1 were cancelled" in log


def test_a_sigterm_during_start_up_ends_in_an_orderly_exit_0(tmp_path: Path) -> None:
    """The signal arrives while the service is starting (before its self-activation
    re-exec, or while the new image imports trio): held pending, then handled."""
    with serve(tmp_path, STREAM_SERVICE.format(grace=5, handler_extra="")) as served:
        # Logged by the activator, before it re-execs: signals are blocked by then.
        served.wait_for("sockets.web: listening on 127.0.0.1:")
        served.proc.send_signal(signal.SIGTERM)
        assert served.wait() == 0
    log = served.log()
    # Held pending, it stops the start when the handlers' import begins (the usual case
    # here), or, were the service past that already, the service.
    if "ready: " in log:
        assert "SIGTERM: shutting down gracefully" in log
        assert "stopped: every connection finished (0 served)" in log
    else:
        assert "SIGTERM while starting: stopped before serving" in log


def test_a_stop_during_a_slow_handler_import_stops_the_start(tmp_path: Path) -> None:
    """A handler module that takes 20 s to import does not hold SIGTERM for 20 s."""
    preamble = "import pathlib, time\npathlib.Path('importing').touch()\ntime.sleep(20)\n"
    with serve(tmp_path, STREAM_SERVICE.format(grace=5, handler_extra=""), app_preamble=preamble) as served:
        deadline = time.monotonic() + 15
        while not (tmp_path / "importing").exists():
            assert time.monotonic() < deadline, served.log()
            assert served.proc.poll() is None, served.log()
            time.sleep(0.01)
        served.proc.send_signal(signal.SIGTERM)
        assert served.wait(timeout=5) == 0, "stopped long before the import would end"
    log = served.log()
    assert "SIGTERM while starting: stopped before serving" in log
    assert "ready: " not in log
    assert "Traceback" not in log
    assert not (tmp_path / "web.sock").exists(), "a start that was stopped leaves no socket file"


@pytest.mark.slow
def test_a_sighup_during_the_handlers_import_reloads_once_the_service_serves(tmp_path: Path) -> None:
    """Remembered while the handlers import (start_signals), then redelivered: not lost."""
    preamble = "import pathlib, time\npathlib.Path('importing').touch()\ntime.sleep(1)\n"
    with serve(tmp_path, STREAM_SERVICE.format(grace=5, handler_extra=""), app_preamble=preamble) as served:
        deadline = time.monotonic() + 15
        while not (tmp_path / "importing").exists():
            assert time.monotonic() < deadline, served.log()
            time.sleep(0.01)
        served.proc.send_signal(signal.SIGHUP)
        log = served.wait_for("handed over to process ")
        successor = int(re.search(r"handed over to process (\d+)", log)[1])  # type: ignore[index]
        try:
            assert served.wait() == 0
            assert log.index("ready: ") < log.index("SIGHUP: starting a successor")
        finally:
            os.kill(successor, signal.SIGTERM)


def test_threads_a_handler_module_starts_at_import_can_take_shutdown_signals(tmp_path: Path) -> None:
    preamble = (
        "import os, signal, threading\n"
        "def report():\n"
        "    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])\n"
        "    open('thread-mask.new', 'w').write(' '.join(sorted(s.name for s in blocked)))\n"
        "    os.replace('thread-mask.new', 'thread-mask')\n"
        "threading.Thread(target=report).start()\n"
    )
    with serve(tmp_path, STREAM_SERVICE.format(grace=5, handler_extra=""), app_preamble=preamble) as served:
        served.wait_ready()
        # The thread runs on its own time: its report is there once whole.
        wait_until((tmp_path / "thread-mask").exists, what="the thread's report")
        mask = (tmp_path / "thread-mask").read_text().split()
        assert not {"SIGTERM", "SIGINT", "SIGHUP"}.intersection(mask), mask
        # And the service still handles them as before.
        assert served.stop(signal.SIGTERM) == 0
    assert "SIGTERM: shutting down gracefully" in served.log()


def test_on_error_exit_stops_serve_with_status_1(tmp_path: Path) -> None:
    with serve(tmp_path, STREAM_SERVICE.format(grace=5, handler_extra='on-error = "exit"')) as served:
        served.wait_ready()
        assert ask(served.unix, b"fine") == b"FINE"
        assert ask(served.unix, b"boom") == b""
        assert served.wait() == 1
    log = served.log()
    assert "handlers.web: a connection on sockets.web raised" in log
    assert "RuntimeError: boom on request" in log


def test_a_raising_datagram_handler_stops_serve_with_status_1(tmp_path: Path) -> None:
    manifest = """\
[sockets.udp]
listen = "127.0.0.1:0"
type = "datagram"

[handlers.udp]
socket = "udp"
call = "app:datagrams"
"""
    with serve(tmp_path, manifest) as served:
        log = served.wait_for("ready: ")
        match = re.search(r"sockets\.udp: 127\.0\.0\.1:(\d+) datagram", log)
        assert match is not None, log
        address = ("127.0.0.1", int(match.group(1)))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(10)
            sock.sendto(b"ping", address)
            assert sock.recv(100) == b"PING"
            sock.sendto(b"boom", address)
        assert served.wait() == 1
    assert "handlers.udp (sockets.udp) raised; stopping the service" in served.log()


def test_fds_are_the_same_before_and_after_1000_connections(tmp_path: Path) -> None:
    """Connections served, raising, abandoned by their client: none leaves an fd behind."""
    with serve(tmp_path, STREAM_SERVICE.format(grace=5, handler_extra="")) as served:
        served.wait_ready()
        before = json.loads(ask(served.unix, b"fds"))
        for index in range(1000):
            address = served.tcp if index % 2 else served.unix
            if index % 100 == 7:
                assert ask(address, b"boom") == b""
            elif index % 10 == 3:
                with client(address):
                    pass  # gone before sending anything
            else:
                assert ask(address, b"n%d" % index) == b"N%d" % index
        after = json.loads(ask(served.unix, b"fds"))
        assert after == before
        assert served.stop() == 0
    assert served.log().count("RuntimeError: boom on request") == 10


# --- end to end: Accept=yes under systemd-socket-activate --accept -------------


def test_accept_yes_serves_the_one_connection_and_honours_sigterm(tmp_path: Path) -> None:
    activate = require_peer("systemd-socket-activate")
    listen = str(tmp_path / "accept.sock")
    manifest = STREAM_SERVICE.format(grace=1, handler_extra="").replace(
        '["127.0.0.1:0", "./web.sock"]', '"./accept.sock"'
    )
    with serve(tmp_path, manifest, argv=[activate, "--accept", "-l", listen]) as served:
        served.wait_for(f"Listening on {listen}")
        assert ask(listen, b"first") == b"FIRST"
        assert ask(listen, b"second") == b"SECOND"
        assert ask(listen, b"pid") != ask(listen, b"pid")  # a process per connection
        # A connection that never finishes: SIGTERM gives it the grace period, then cancels it.
        with client(listen) as held:
            held.sendall(b"hold\n")
            child = holding_pid(held)
            os.kill(child, signal.SIGTERM)
            started = time.monotonic()
            assert read_until_eof(held) == b""
            assert time.monotonic() - started < 10
    log = served.log()
    assert log.count("Accept=yes: serving one connection with handlers.web") == 5
    assert "SIGTERM: the Accept=yes connection gets 1s to finish" in log
    assert "handlers.web: the Accept=yes connection was cancelled" in log
