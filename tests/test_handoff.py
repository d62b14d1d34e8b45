"""Zero-downtime reload of a single-process serve: SIGHUP hands the sockets over to a successor."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from trio_activate.notify_message import credentials_space, sender_pid

HANDLER = """
import os
import trio

VERSION = {version!r}

async def handle(stream: trio.SocketStream) -> None:
    request = await stream.receive_some(100)
    await stream.send_all(f"{{os.getpid()}} {{VERSION}} {{request.decode()}}".encode())
"""

MANIFEST = """
[service]
grace-period = 5
start-timeout = 10

[sockets.web]
listen = "{path}"

[handlers.web]
socket = "web"
call = "reloadable:handle"
"""


def write_service(folder: Path, version: str = "v1") -> Path:
    (folder / "reloadable.py").write_text(HANDLER.format(version=version))
    manifest = folder / "service.toml"
    manifest.write_text(MANIFEST.format(path=folder / "web.sock"))
    return manifest


def ask(path: Path, text: str, timeout: float = 10.0) -> str:
    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(timeout)
        client.connect(str(path))
        client.sendall(text.encode())
        return client.recv(200).decode()


def wait_for(path: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            ask(path, "ping", timeout=1)
            return
        except OSError:
            assert time.monotonic() < deadline, f"nothing answered on {path}"
            time.sleep(0.05)


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(10)
    with sock:
        yield sock


def start_serve(
    manifest: Path, notify: Path | None = None, *, extra_env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_", "TRIO_ACTIVATE_"))}
    env.update(extra_env or {})
    # As in production: handler modules cached as .pyc (a reload must not run a stale one).
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if notify is not None:
        env["NOTIFY_SOCKET"] = str(notify)
    return subprocess.Popen(
        [sys.executable, "-m", "trio_activate", "serve", str(manifest)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        # Its own process group: the successors it starts are cleaned up with it.
        start_new_session=True,
    )


def stop_group(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=10)
    if process.stderr is not None:
        process.stderr.close()


def messages_until(sock: socket.socket, wanted: bytes) -> list[bytes]:
    seen = []
    while True:
        message = sock.recv(4096)
        seen.append(message)
        if wanted in message:
            return seen


def main_pid_after_reload(sock: socket.socket) -> int:
    seen = messages_until(sock, b"MAINPID=")
    assert any(m.startswith(b"RELOADING=1\nMONOTONIC_USEC=") for m in seen), seen
    (handover,) = [m for m in seen if b"MAINPID=" in m]
    fields = dict(line.split("=", 1) for line in handover.decode().splitlines())
    assert fields["READY"] == "1", "READY=1 ends the reload (Type=notify-reload)"
    return int(fields["MAINPID"])


def test_sighup_hands_over_to_new_code_and_tells_the_manager(
    tmp_path: Path, notify_socket: socket.socket
) -> None:
    manifest = write_service(tmp_path)
    process = start_serve(manifest, tmp_path / "notify.sock")
    try:
        messages_until(notify_socket, b"READY=1")
        first = ask(tmp_path / "web.sock", "hello")
        assert first == f"{process.pid} v1 hello"
        # New code of the same size and, set on purpose, the same mtime: a cached .pyc
        # passes for it, so only a successor that compiles from source runs v2.
        handler = tmp_path / "reloadable.py"
        before = handler.stat()
        write_service(tmp_path, "v2")
        assert handler.stat().st_size == before.st_size
        os.utime(handler, ns=(before.st_atime_ns, before.st_mtime_ns))
        os.kill(process.pid, signal.SIGHUP)
        successor = main_pid_after_reload(notify_socket)
        assert successor != process.pid
        assert ask(tmp_path / "web.sock", "again") == f"{successor} v2 again"
        assert process.wait(timeout=15) == 0, "the predecessor drains and exits 0"
        # The successor is the service now: it handles the next SIGHUP, and SIGTERM.
        os.kill(successor, signal.SIGHUP)
        third = main_pid_after_reload(notify_socket)
        assert ask(tmp_path / "web.sock", "third") == f"{third} v2 third"
        os.kill(third, signal.SIGTERM)
        assert b"STOPPING=1" in b"".join(messages_until(notify_socket, b"STOPPING=1"))
    finally:
        stop_group(process)


def test_only_the_main_process_pings_the_watchdog_after_a_hand_over(tmp_path: Path) -> None:
    """NotifyAccess=main: the predecessor stops pinging the moment it hands over, drain or not."""
    manifest = write_service(tmp_path)
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    manager.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    manager.bind(str(tmp_path / "notify.sock"))
    manager.settimeout(10)
    env_watchdog = {"WATCHDOG_USEC": "200000"}  # a ping every 0.1 s
    process = start_serve(manifest, tmp_path / "notify.sock", extra_env=env_watchdog)
    try:
        with manager, socket.socket(socket.AF_UNIX) as in_flight:

            def receive() -> tuple[int | None, bytes]:
                data, ancillary, _, _ = manager.recvmsg(4096, credentials_space())
                return sender_pid(ancillary), data

            while b"READY=1" not in receive()[1]:
                pass
            # A connection the old process must drain: it waits for a request.
            in_flight.connect(str(tmp_path / "web.sock"))
            os.kill(process.pid, signal.SIGHUP)
            while b"MAINPID=" not in (message := receive())[1]:
                pass
            successor = int(dict(line.split("=", 1) for line in message[1].decode().splitlines())["MAINPID"])
            pings: list[int | None] = []
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                pid, data = receive()
                if b"WATCHDOG=1" in data:
                    pings.append(pid)
            assert process.poll() is None, "the predecessor is still draining"
            assert process.pid not in pings
            assert pings.count(successor) >= 5, "the new main process pings"
            in_flight.sendall(b"done")
            assert in_flight.recv(100).startswith(f"{process.pid} v1".encode())
        assert process.wait(timeout=15) == 0
        os.kill(successor, signal.SIGTERM)
    finally:
        stop_group(process)


def test_a_successor_that_fails_leaves_the_old_code_serving(
    tmp_path: Path, notify_socket: socket.socket
) -> None:
    manifest = write_service(tmp_path)
    process = start_serve(manifest, tmp_path / "notify.sock")
    try:
        messages_until(notify_socket, b"READY=1")
        (tmp_path / "reloadable.py").write_text("def broken(:\n")
        os.kill(process.pid, signal.SIGHUP)
        seen = messages_until(notify_socket, b"READY=1")
        assert not any(b"MAINPID=" in m for m in seen)
        assert any(b"Reload failed" in m for m in seen)
        assert ask(tmp_path / "web.sock", "still") == f"{process.pid} v1 still"
        os.kill(process.pid, signal.SIGTERM)
        assert process.wait(timeout=15) == 0
        assert process.stderr is not None
        err = process.stderr.read().decode()
        assert "invalid syntax" in err
        assert "reload failed: the successor" in err
    finally:
        stop_group(process)


class ClientLoop:
    """Connects, asks and checks the answer in a loop, bounded in count and time, counting failures."""

    def __init__(self, path: Path, *, limit: int = 500_000, seconds: float = 90.0) -> None:
        self.path = path
        self.limit = limit
        self.seconds = seconds
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ClientLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        deadline = time.monotonic() + self.seconds
        for number in range(self.limit):
            if self._stop.is_set() or time.monotonic() > deadline:
                return
            try:
                answer = ask(self.path, f"n{number}")
            except OSError as exc:
                self.failures.append(f"n{number}: {exc!r}")
                continue
            if answer.endswith(f" n{number}"):
                self.ok += 1
            else:
                self.failures.append(f"n{number}: wrong answer {answer!r}")


def test_twenty_sighup_reloads_under_load_fail_no_connection(
    tmp_path: Path, notify_socket: socket.socket
) -> None:
    manifest = write_service(tmp_path)
    process = start_serve(manifest, tmp_path / "notify.sock")
    try:
        messages_until(notify_socket, b"READY=1")
        main = process.pid
        with ClientLoop(tmp_path / "web.sock") as loop:
            for _ in range(20):
                os.kill(main, signal.SIGHUP)
                main = main_pid_after_reload(notify_socket)
                served_before = loop.ok
                deadline = time.monotonic() + 10
                while loop.ok < served_before + 5:
                    assert time.monotonic() < deadline, "the loop stalled after a reload"
                    time.sleep(0.01)
        assert loop.failures == []
        assert loop.ok > 100
        os.kill(main, signal.SIGTERM)
    finally:
        stop_group(process)


def test_kill_and_restart_without_hand_over_does_fail_connections(tmp_path: Path) -> None:
    """The control: the same loop sees failures when the service is simply restarted."""
    manifest = write_service(tmp_path)
    process = start_serve(manifest)
    try:
        wait_for(tmp_path / "web.sock")
        with ClientLoop(tmp_path / "web.sock") as loop:
            for _ in range(3):
                process.send_signal(signal.SIGKILL)
                process.wait(timeout=10)
                stop_group(process)
                process = start_serve(manifest)
                wait_for(tmp_path / "web.sock")
        assert loop.failures, "a plain restart refuses connections; otherwise the reload test proves nothing"
    finally:
        stop_group(process)
