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

from trio_activate.model.notify_message import credentials_space, sender_pid

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


# --- faults during a hand-over -------------------------------------------------


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group `pgid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) == pgid and fields[0] != "Z":
                    found.append(int(entry.name))
    return found


def test_sigterm_during_a_reload_stops_the_successor_too(tmp_path: Path) -> None:
    """The stop is for the service: a successor still starting is stopped, never left serving."""
    manifest = write_service(tmp_path)
    process = start_serve(manifest)
    try:
        wait_for(tmp_path / "web.sock")
        # The new code takes a second to import: SIGTERM comes while the successor starts.
        handler = tmp_path / "reloadable.py"
        handler.write_text("import time\ntime.sleep(1)\n" + handler.read_text())
        os.kill(process.pid, signal.SIGHUP)
        time.sleep(0.25)
        assert len(group_members(process.pid)) == 2, "the successor started"
        os.kill(process.pid, signal.SIGTERM)
        assert process.wait(timeout=15) == 0
        assert group_members(process.pid) == [], "no successor outlives the stop"
        with pytest.raises((ConnectionRefusedError, FileNotFoundError)):
            ask(tmp_path / "web.sock", "anyone?", timeout=1)
        assert process.stderr is not None
        assert "reload abandoned: the service is stopping" in process.stderr.read().decode()
    finally:
        stop_group(process)


def test_remove_on_stop_files_belong_to_whoever_serves_on_them(
    tmp_path: Path, notify_socket: socket.socket
) -> None:
    def write(version: str) -> Path:
        manifest = write_service(tmp_path, version)
        manifest.write_text(manifest.read_text().replace('listen = "', 'remove-on-stop = true\nlisten = "'))
        return manifest

    process = start_serve(write("v1"), tmp_path / "notify.sock")
    path = tmp_path / "web.sock"
    try:
        messages_until(notify_socket, b"READY=1")
        # A successor that fails to start leaves its predecessor's file alone.
        (tmp_path / "reloadable.py").write_text("def broken(:\n")
        os.kill(process.pid, signal.SIGHUP)
        assert any(b"Reload failed" in m for m in messages_until(notify_socket, b"READY=1"))
        assert ask(path, "still") == f"{process.pid} v1 still"

        write("v2")
        os.kill(process.pid, signal.SIGHUP)
        successor = main_pid_after_reload(notify_socket)
        assert process.wait(timeout=15) == 0, "handed over and drained"
        assert path.is_socket(), "the predecessor left the file its successor serves on"
        assert ask(path, "next") == f"{successor} v2 next"
        os.kill(successor, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while group_members(process.pid):
            assert time.monotonic() < deadline, "the successor did not stop"
            time.sleep(0.05)
        assert not path.exists(), "the last one to serve on it removed it"
    finally:
        stop_group(process)


def test_a_reload_whose_interpreter_is_gone_is_one_line_and_keeps_serving(tmp_path: Path) -> None:
    """The interpreter the service runs was removed (an upgrade moved it): the successor's exec fails.

    The service runs a symlink to this interpreter, in a copy of this virtual
    environment's ``pyvenv.cfg`` (so it finds the same packages); the symlink
    is removed before SIGHUP.  The reload fails with one line, and the running
    process serves on, then stops cleanly."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    interpreter = venv / "bin" / "python"
    interpreter.symlink_to(Path(sys.executable).resolve())
    config = Path(sys.prefix) / "pyvenv.cfg"
    if config.exists():
        (venv / "pyvenv.cfg").write_bytes(config.read_bytes())
    service = tmp_path / "service"
    service.mkdir()
    manifest = write_service(service)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_", "TRIO_ACTIVATE_"))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p and Path(p).is_dir())
    process = subprocess.Popen(
        [str(interpreter), "-m", "trio_activate", "serve", str(manifest)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        wait_for(service / "web.sock")
        assert ask(service / "web.sock", "before") == f"{process.pid} v1 before"
        interpreter.unlink()
        write_service(service, "v2")
        os.kill(process.pid, signal.SIGHUP)
        time.sleep(1.0)
        assert process.poll() is None, "the reload's failure ended the service"
        assert ask(service / "web.sock", "after") == f"{process.pid} v1 after"
        os.kill(process.pid, signal.SIGTERM)
        assert process.wait(timeout=15) == 0
        err = process.stderr.read() if process.stderr else ""
        assert "Traceback" not in err, err
        failed = [line for line in err.splitlines() if "reload failed" in line]
        assert len(failed) == 1, err
        assert "No such file or directory" in failed[0], failed[0]
    finally:
        stop_group(process)


def test_a_reload_that_cannot_start_its_successor_is_one_line_and_keeps_serving(tmp_path: Path) -> None:
    """Out of fds (prlimit --nofile): no inbox, no successor; the running process serves on."""
    manifest = write_service(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_", "TRIO_ACTIVATE_"))}
    log = tmp_path / "stderr"
    with log.open("wb") as stderr:  # a file, not a pipe: 60 dropped clients log a lot
        process = subprocess.Popen(
            ["prlimit", "--nofile=40:40", sys.executable, "-m", "trio_activate", "serve", str(manifest)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )
    clients: list[socket.socket] = []
    try:
        wait_for(tmp_path / "web.sock")
        # Idle clients take every fd the service has left (the rest wait in the backlog).
        for _ in range(60):
            client = socket.socket(socket.AF_UNIX)
            client.connect(str(tmp_path / "web.sock"))
            clients.append(client)
        time.sleep(0.5)
        os.kill(process.pid, signal.SIGHUP)
        time.sleep(1.0)
        assert process.poll() is None, "the reload's failure did not end the service"
        for client in clients:
            client.close()
        clients.clear()
        # Served again as soon as fds are free: the first clients' requests, then a new one.
        deadline = time.monotonic() + 10
        while True:
            try:
                answer = ask(tmp_path / "web.sock", "after", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "the service did not serve again"
        assert answer == f"{process.pid} v1 after"
        os.kill(process.pid, signal.SIGTERM)
        assert process.wait(timeout=15) == 0
        err = log.read_text()
        # (The 60 clients dropped meanwhile log tracebacks of their own: not the reload's.)
        assert "in hand_over" not in err
        assert "in _reload" not in err
        failed = [line for line in err.splitlines() if "reload failed" in line]
        assert len(failed) == 1, err
        assert "Too many open files" in failed[0]
    finally:
        for client in clients:
            client.close()
        stop_group(process)


@pytest.mark.parametrize(
    "address",
    ["/run/systemd/notify", b"\0trio/notify", b"\0caf\xc3\xa9", b"\0n\xff"],
    ids=["path", "abstract", "abstract-utf8", "abstract-undecodable"],
)
def test_the_successor_sends_to_the_managers_address_its_predecessor_sent_to(address: str | bytes) -> None:
    """The manager's NOTIFY_SOCKET goes to the successor in a variable and comes back byte for byte,
    an abstract name that is not UTF-8 included (the predecessor's environment may hold any bytes)."""
    from trio_activate.processes.handoff import _successor_environment, take_handoff
    from trio_activate.system.notifier import Notifier

    manager = Notifier(address, watchdog_interval=1.5)
    environ = _successor_environment(manager, ())
    taken = take_handoff(environ)
    assert taken is not None
    predecessor, successor_manager = taken
    assert predecessor == os.getpid()
    assert (successor_manager.address, successor_manager.watchdog_interval) == (address, 1.5)
    assert environ == {}  # taken: no child inherits the private variables
