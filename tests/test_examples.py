"""Every example in config/ serves a real client, run as a new user runs it: `trio-activate serve`."""

from __future__ import annotations

import signal
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio_websocket
from helpers import TRIO_ACTIVATE, clean_env, require_peer, retry, started, tcp_exchange, unix_exchange

import trio_activate

CONFIG = Path(__file__).parent.parent / "config"


def udp_exchange(port: int, data: bytes) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(1)
        client.sendto(data, ("127.0.0.1", port))
        return client.recv(4096)


def websocket_echo(port: int, text: str) -> bytes:
    async def exchange() -> str:
        async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{port}/ws") as connection:
            await connection.send_message(text)
            return str(await connection.get_message())

    return trio.run(exchange).encode()


HTTP_GET = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"

# manifest -> [(client, expected answer)]
EXAMPLES: dict[str, list[tuple[Callable[[], bytes], Callable[[bytes], bool]]]] = {
    "echo.toml": [(lambda: tcp_exchange("127.0.0.1", 7000, b"hello\n"), lambda r: r == b"hello\n")],
    "http.toml": [
        (lambda: tcp_exchange("127.0.0.1", 8080, HTTP_GET), lambda r: r.endswith(b"\r\n\r\nHello, world!\n")),
        (lambda: tcp_exchange("::1", 8080, HTTP_GET), lambda r: r.startswith(b"HTTP/1.1 200 OK\r\n")),
    ],
    "udp-echo.toml": [(lambda: udp_exchange(7001, b"ping"), lambda r: r == b"ping")],
    "unix.toml": [
        (lambda: unix_exchange("/tmp/trio-activate-echo.sock", b"file"), lambda r: r == b"file"),
        (lambda: unix_exchange("\0trio-activate-echo", b"abstract"), lambda r: r == b"abstract"),
        (
            lambda: unix_exchange("\0trio-activate-packets", b"packet", socket.SOCK_SEQPACKET),
            lambda r: r == b"packet",
        ),
    ],
    "listener.toml": [(lambda: tcp_exchange("127.0.0.1", 7002, b"shout\n"), lambda r: r == b"SHOUT\n")],
    "asgi.toml": [
        (lambda: tcp_exchange("127.0.0.1", 8000, HTTP_GET), lambda r: r.endswith(b"\r\n\r\nHello, world!\n")),
        (lambda: websocket_echo(8000, "ping"), lambda r: r == b"ping"),
    ],
}


def test_every_example_has_a_client_here() -> None:
    assert sorted(EXAMPLES) == sorted(p.name for p in CONFIG.glob("*.toml"))


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_serves_self_activated_and_stops_cleanly(name: str) -> None:
    with started([*TRIO_ACTIVATE, "serve", str(CONFIG / name)], env=clean_env()) as process:
        for exchange, expected in EXAMPLES[name]:
            answer = retry(exchange)
            assert expected(answer), answer
        process.send_signal(signal.SIGTERM)
        assert process.wait() == 0
    assert not Path("/tmp/trio-activate-echo.sock").exists(), "remove-on-stop removes the file we made"


def test_echo_example_serves_under_systemd_socket_activate() -> None:
    activate = require_peer("systemd-socket-activate")
    argv = [activate, "-l", "127.0.0.1:7000", "--fdname=echo", *TRIO_ACTIVATE]
    with started([*argv, "serve", str(CONFIG / "echo.toml")], env=clean_env()) as process:
        (exchange, expected), *_ = EXAMPLES["echo.toml"]
        assert expected(retry(exchange))
        process.send_signal(signal.SIGTERM)
        assert process.wait() == 0


async def test_echo_example_serves_embedded() -> None:
    async with trio_activate.activated(CONFIG / "echo.toml") as act, trio.open_nursery() as nursery:
        assert act.origin == "created"
        await nursery.start(act.serve)
        stream = await trio.open_tcp_stream("127.0.0.1", 7000)
        async with stream:
            await stream.send_all(b"embedded\n")
            assert await stream.receive_some(100) == b"embedded\n"
        act.shutdown()
