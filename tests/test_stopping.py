"""Handlers see the service stopping: `is_stopping()`, and `move_on_stop()` closing idle connections."""

from __future__ import annotations

import socket

import trio
import trio.lowlevel

from trio_activate.examples import hello_http
from trio_activate.model.manifest import manifest_from_dict
from trio_activate.runtime.handlers import LoadedHandler
from trio_activate.runtime.service import HandlerSockets, Service
from trio_activate.runtime.serving import Listening
from trio_activate.runtime.stopping import is_stopping, move_on_stop

GET = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


def listening_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def http_service(sock: socket.socket, grace: float) -> Service:
    manifest = manifest_from_dict(
        {
            "service": {"grace-period": grace},
            "sockets": {"http": {"listen": "127.0.0.1:0"}},
            "handlers": {"http": {"socket": "http", "call": "trio_activate.examples:hello_http"}},
        }
    )
    handler = LoadedHandler(manifest.handlers[0], hello_http)
    return Service(manifest, [HandlerSockets(handler, [Listening("http", sock)])])


async def read_response(stream: trio.SocketStream) -> bytes:
    data = b""
    while not data.endswith(b"Hello, world!\n"):
        chunk = await stream.receive_some(4096)
        assert chunk, f"closed after {data!r}"
        data += chunk
    return data


async def test_outside_a_service_nothing_is_stopping() -> None:
    assert not is_stopping()
    with move_on_stop() as scope:
        await trio.lowlevel.checkpoint()
    assert not scope.cancelled_caught


async def test_after_the_stop_begins_the_next_request_is_answered_with_connection_close(
    autojump_clock: object,
) -> None:
    sock = listening_socket()
    port = sock.getsockname()[1]
    service = http_service(sock, grace=60)
    with sock:
        async with trio.open_nursery() as nursery:
            await nursery.start(service.serve)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(GET)
                assert b"Connection: keep-alive" in await read_response(stream)
                service.shutdown()
                await trio.sleep(1)
                await stream.send_all(GET)
                assert b"Connection: close" in await read_response(stream)
                assert await stream.receive_some(4096) == b""
    assert sum(server.cancelled for server in service._servers) == 0, "nothing waited for the grace period"


async def test_move_on_stop_ends_an_idle_wait_when_the_stop_begins(autojump_clock: object) -> None:
    """Without move_on_stop the idle connection would hold the service for the whole grace period."""
    outcome: list[bool] = []

    async def idle_handler(stream: trio.SocketStream) -> None:
        with move_on_stop() as idle:
            await stream.receive_some(100)
        outcome.append(idle.cancelled_caught)

    sock = listening_socket()
    port = sock.getsockname()[1]
    service = http_service(sock, grace=60)
    spec = service.handlers[0].handler.spec
    service.handlers[0] = HandlerSockets(LoadedHandler(spec, idle_handler), [Listening("http", sock)])
    with sock:
        async with trio.open_nursery() as nursery:
            await nursery.start(service.serve)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await trio.sleep(1)
                started = trio.current_time()
                service.shutdown()
                assert await stream.receive_some(4096) == b""
                assert trio.current_time() - started < 1
    assert outcome == [True]


async def test_a_request_in_flight_is_answered_with_connection_close(autojump_clock: object) -> None:
    sock = listening_socket()
    port = sock.getsockname()[1]
    service = http_service(sock, grace=60)
    with sock:
        async with trio.open_nursery() as nursery:
            await nursery.start(service.serve)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                # Half a request: the handler is inside a request, not between two.
                await stream.send_all(GET[:10])
                await trio.sleep(0.1)
                service.shutdown()
                await trio.sleep(0.1)
                await stream.send_all(GET[10:])
                response = await read_response(stream)
                assert b"Connection: close" in response
                assert await stream.receive_some(4096) == b""


async def test_move_on_stop_entered_after_the_stop_is_already_cancelled(autojump_clock: object) -> None:
    seen: list[bool] = []

    async def handler(stream: trio.SocketStream) -> None:
        await trio.sleep(5)  # the stop begins meanwhile
        with move_on_stop() as scope:
            await trio.sleep(100)
        seen.extend([is_stopping(), scope.cancelled_caught])

    sock = listening_socket()
    port = sock.getsockname()[1]
    service = http_service(sock, grace=60)
    service.handlers[0] = HandlerSockets(
        LoadedHandler(service.handlers[0].handler.spec, handler), [Listening("http", sock)]
    )
    with sock:
        async with trio.open_nursery() as nursery:
            await nursery.start(service.serve)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await trio.sleep(1)
                service.shutdown()
                await stream.receive_some(10)
    assert seen == [True, True]
