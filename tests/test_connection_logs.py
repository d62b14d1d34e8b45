"""End to end: what ``trio-activate serve`` logs of its clients.

A client that resets its connection is one debug line, never an error with a
traceback; a handler's own exception still is one.  Real
processes (``python -m trio_activate serve``, self-activating), real TCP
clients on 127.0.0.1, resets made with ``SO_LINGER`` 0.
"""

from __future__ import annotations

import signal
import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from helpers import Process, clean_env, running, write_manifest

APP = """\
import trio


async def answer(stream):
    # Reads a request, then answers in pieces until the client is gone.
    request = await stream.receive_some(100)
    if request.startswith(b"bug"):
        raise ValueError("a handler bug")
    while True:
        await stream.send_all(b"x" * 100)
        await trio.sleep(0.001)


async def echo(stream):
    async for data in stream:
        await stream.send_all(data)
"""

MANIFEST = """\
[service]
python-path = ["."]

[sockets.web]
listen = "127.0.0.1:0"

[handlers.web]
socket = "web"
call = "app:{call}"
{extra}
"""

LINE = r"^trio-activate\[\d+\]: "


@contextmanager
def serving(folder: Path, *, call: str, extra: str = "", log_level: str = "info") -> Iterator[Process]:
    (folder / "app.py").write_text(APP)
    manifest = write_manifest(folder, MANIFEST.format(call=call, extra=extra))
    with running("--log-level", log_level, "serve", manifest, cwd=folder, env=clean_env()) as proc:
        proc.wait_for(r"ready: ")
        yield proc


def connect(port: int) -> socket.socket:
    client = socket.create_connection(("127.0.0.1", port), timeout=10)
    return client


def reset(client: socket.socket) -> None:
    """Close with a reset (RST), not a FIN: SO_LINGER on, 0 seconds."""
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()


def request_then_reset(port: int, request: bytes = b"GET / HTTP/1.1\r\n\r\n") -> int:
    """Send a request, see the answer begin, reset; the client's port."""
    client = connect(port)
    try:
        client.sendall(request)
        assert client.recv(100)
        return int(client.getsockname()[1])
    finally:
        reset(client)


def read_to_end(client: socket.socket) -> bytes:
    received = b""
    while chunk := client.recv(65536):
        received += chunk
    return received


@pytest.mark.parametrize("log_level", ["debug", "info"])
def test_50_resets_are_50_debug_lines_and_no_traceback_while_a_bug_keeps_its_own(
    tmp_path: Path, log_level: str
) -> None:
    with serving(tmp_path, call="answer", log_level=log_level) as proc:
        port = proc.port("web")
        ports = [request_then_reset(port) for _ in range(50)]
        with connect(port) as client:
            client.sendall(b"bug\n")
            assert read_to_end(client) == b""
        proc.wait_for("a connection on sockets.web raised")
        assert proc.stop(signal.SIGTERM) == 0
    resets = [line for line in proc.lines if "reset the connection" in line]
    if log_level == "debug":
        assert sorted(resets) == sorted(
            f"trio-activate[{proc.pid}]: debug: handlers.web: client 127.0.0.1:{p} on sockets.web "
            "reset the connection"
            for p in ports
        )
    else:
        assert resets == []
    # One traceback, the handler's bug's, under its one error line.
    assert proc.log.count("Traceback") == 1
    assert proc.count(rf"{LINE}error: handlers\.web: a connection on sockets\.web raised$") == 1
    assert "ValueError: a handler bug" in proc.log
    assert "stopped: every connection finished (51 served)" in proc.log
