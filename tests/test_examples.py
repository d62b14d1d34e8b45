"""Every example in config/ serves a real client, run as a new user runs it: `trio-activate serve`."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio
from conftest import require_peer

import trio_activate

CONFIG = Path(__file__).parent.parent / "config"


def retry(action: Callable[[], bytes], timeout: float = 15.0) -> bytes:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return action()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def tcp_exchange(host: str, port: int, data: bytes) -> bytes:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as client:
        client.settimeout(5)
        client.connect((host, port))
        client.sendall(data)
        client.shutdown(socket.SHUT_WR)
        return b"".join(iter(lambda: client.recv(4096), b""))


def unix_exchange(address: str, data: bytes, kind: int = socket.SOCK_STREAM) -> bytes:
    with socket.socket(socket.AF_UNIX, kind) as client:
        client.settimeout(5)
        client.connect(address)
        client.sendall(data)
        return client.recv(4096)


def udp_exchange(port: int, data: bytes) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(1)
        client.sendto(data, ("127.0.0.1", port))
        return client.recv(4096)


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
}


def test_every_example_has_a_client_here() -> None:
    assert sorted(EXAMPLES) == sorted(p.name for p in CONFIG.glob("*.toml"))


@contextlib.contextmanager
def running(argv: list[str]) -> Iterator[subprocess.Popen[bytes]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_", "TRIO_ACTIVATE_"))}
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        if process.stderr is not None:
            process.stderr.close()


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_serves_self_activated_and_stops_cleanly(name: str) -> None:
    with running([sys.executable, "-m", "trio_activate", "serve", str(CONFIG / name)]) as process:
        for exchange, expected in EXAMPLES[name]:
            answer = retry(exchange)
            assert expected(answer), answer
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    assert not Path("/tmp/trio-activate-echo.sock").exists(), "remove-on-stop removes the file we made"


def test_echo_example_serves_under_systemd_socket_activate() -> None:
    activate = require_peer("systemd-socket-activate")
    argv = [activate, "-l", "127.0.0.1:7000", "--fdname=echo", sys.executable, "-m", "trio_activate"]
    with running([*argv, "serve", str(CONFIG / "echo.toml")]) as process:
        (exchange, expected), *_ = EXAMPLES["echo.toml"]
        assert expected(retry(exchange))
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0


async def test_echo_example_serves_embedded() -> None:
    async with trio_activate.activated(CONFIG / "echo.toml") as act, trio.open_nursery() as nursery:
        assert act.origin == "created"
        await nursery.start(act.serve)
        stream = await trio.open_tcp_stream("127.0.0.1", 7000)
        async with stream:
            await stream.send_all(b"embedded\n")
            assert await stream.receive_some(100) == b"embedded\n"
        act.shutdown()
