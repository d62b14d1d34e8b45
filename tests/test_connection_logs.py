"""End to end: what ``trio-activate serve`` logs of its clients.

A client that resets its connection is one debug line, never an error with a
traceback; a handler's own exception still is one.  With ``access-log = true``
each connection ends with one info line on ``trio_activate.access``.  Real
processes (``python -m trio_activate serve``, self-activating), real TCP
clients on 127.0.0.1, resets made with ``SO_LINGER`` 0.
"""

from __future__ import annotations

import re
import signal
import socket
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from helpers import Process, clean_env, one_line_error, run_cli, running, write_manifest

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

# A text log line up to its level: its local timestamp, then whose it is.
LINE = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} trio-activate\[\d+\]: "


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
    # Without the timestamp, which comes first in a text line.
    resets = [line.partition(" trio-activate[")[2] for line in proc.lines if "reset the connection" in line]
    if log_level == "debug":
        assert sorted(resets) == sorted(
            f"{proc.pid}]: debug: handlers.web: client 127.0.0.1:{p} on sockets.web reset the connection"
            for p in ports
        )
    else:
        assert resets == []
    # One traceback, the handler's bug's, under its one error line.
    assert proc.log.count("Traceback") == 1
    assert proc.count(rf"{LINE}error: handlers\.web: a connection on sockets\.web raised$") == 1
    assert "ValueError: a handler bug" in proc.log
    assert "stopped: every connection finished (51 served)" in proc.log
    # No access log unless asked for.
    assert "handler=web" not in proc.log


ACCESS = (
    rf"{LINE}info: handler=web socket=web peer=127\.0\.0\.1:(?P<port>\d+) duration_ms=(?P<ms>\d+\.\d) "
    r"bytes_in=(?P<bytes_in>\d+) bytes_out=(?P<bytes_out>\d+) outcome=(?P<outcome>\S+)$"
)


def test_the_access_log_has_a_line_per_connection_closed_reset_or_timed_out(tmp_path: Path) -> None:
    with serving(tmp_path, call="echo", extra="idle-timeout = 0.5\naccess-log = true") as proc:
        port = proc.port("web")

        # Closed: the client half-closes, the handler returns.
        with connect(port) as client:
            client.sendall(b"hello")
            client.shutdown(socket.SHUT_WR)
            assert read_to_end(client) == b"hello"
            closed_port = client.getsockname()[1]
        closed = proc.wait_for(ACCESS)

        # Reset: the handler's next receive fails.
        mark = proc.mark()
        reset_port = request_then_reset(port, b"hi")
        was_reset = proc.wait_for(ACCESS, since=mark)

        # Idle: nothing more after a first exchange, closed after idle-timeout.
        mark = proc.mark()
        with connect(port) as client:
            client.sendall(b"zz")
            assert client.recv(100) == b"zz"
            started = time.monotonic()
            assert client.recv(100) == b""
            waited = time.monotonic() - started
            idle_port = client.getsockname()[1]
        idle = proc.wait_for(ACCESS, since=mark)
        assert proc.stop(signal.SIGTERM) == 0

    assert (int(closed["port"]), closed["bytes_in"], closed["bytes_out"], closed["outcome"]) == (
        closed_port,
        "5",
        "5",
        "closed",
    )
    assert float(closed["ms"]) < 5000
    assert (int(was_reset["port"]), was_reset["bytes_in"], was_reset["bytes_out"], was_reset["outcome"]) == (
        reset_port,
        "2",
        "2",
        "reset",
    )
    assert (int(idle["port"]), idle["bytes_in"], idle["bytes_out"], idle["outcome"]) == (
        idle_port,
        "2",
        "2",
        "idle-timeout",
    )
    assert 500 <= float(idle["ms"]) < 5000
    assert waited >= 0.4
    assert proc.count(ACCESS) == 3
    assert "Traceback" not in proc.log


def test_access_log_on_a_datagram_handler_is_one_line_naming_file_and_key(tmp_path: Path) -> None:
    manifest = write_manifest(
        tmp_path,
        """
        [sockets.dns]
        listen = "127.0.0.1:0"
        type = "datagram"

        [handlers.dns]
        socket = "dns"
        call = "trio_activate.examples:echo"
        access-log = true
        """,
    )
    for command in ("check", "serve"):
        result = run_cli(command, str(manifest))
        assert result.returncode == 2
        assert one_line_error(result.stderr) == (
            f"trio-activate: {manifest}: handlers.dns.access-log: "
            "applies to stream handlers only, and this one is datagram"
        )


def test_check_writes_the_access_log_back(tmp_path: Path) -> None:
    manifest = write_manifest(
        tmp_path,
        """
        [sockets.web]
        listen = "127.0.0.1:0"

        [handlers.web]
        socket = "web"
        call = "trio_activate.examples:echo"
        access-log = true
        """,
    )
    result = run_cli("check", str(manifest))
    assert result.returncode == 0, result.stderr
    assert re.search(r"^access-log = true$", result.stdout, re.MULTILINE)
    again = write_manifest(tmp_path, result.stdout, name="again.toml")
    assert run_cli("check", str(again)).stdout.replace(str(again), str(manifest)) == result.stdout
