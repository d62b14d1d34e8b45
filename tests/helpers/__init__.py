"""What the test modules share: the one subprocess harness, clients, waits, /proc views, files.

Fixtures live in ``conftest.py``; everything else that more than one test
module uses lives here, and no test module imports another.

The subprocess harness is `started` (a `Process`): every command a test runs
in the background (``trio-activate serve``, ``dev``, ``systemd-socket-activate``,
``unshare``) runs in a session of its own, its stdout and stderr read line by
line as they come, and its whole process group is killed when the test
leaves the ``with`` block, so no worker, successor or ``--accept`` child
outlives the test.  Commands that simply run to their end use
`subprocess.run` (or `run_cli`).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, TypeVar

import pytest

TRIO_ACTIVATE = [sys.executable, "-m", "trio_activate"]
TIMEOUT = 15.0
# How many reloads the zero-downtime tests run in a row.
RELOADS = 20

T = TypeVar("T")


# --- environment and peers ---------------------------------------------------


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without anything a service manager would set (so `serve` creates its
    sockets itself, with the fast start), plus `extra`."""
    prefixes = ("LISTEN_", "NOTIFY_", "WATCHDOG_", "TRIO_ACTIVATE_")
    return {**{k: v for k, v in os.environ.items() if not k.startswith(prefixes)}, **extra}


def require_peer(binary: str) -> str:
    """Path of a real interop peer, e.g. systemd-socket-activate.

    Skipped with a reason when it is missing, except where the environment
    promises the peers (CI sets REQUIRE_INTEROP_PEERS=1 after
    installing them): there a missing peer is a failure, never a skip.
    """
    path = shutil.which(binary)
    if path is None:
        if os.environ.get("REQUIRE_INTEROP_PEERS"):
            pytest.fail(f"{binary} is required (REQUIRE_INTEROP_PEERS is set) but not on PATH")
        pytest.skip(f"{binary} not installed (Debian package: systemd)")
    return path


def private_interpreter(folder: Path) -> Path:
    """A virtualenv of its own over the one running the tests: its ``bin/python`` can be removed."""
    if sys.prefix == sys.base_prefix:
        pytest.skip("needs to run in a virtualenv, whose pyvenv.cfg and lib/ a private one can share")
    venv = folder / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text((Path(sys.prefix) / "pyvenv.cfg").read_text())
    (venv / "lib").symlink_to(Path(sys.prefix) / "lib")
    python = venv / "bin" / "python"
    python.symlink_to(sys.executable)
    return python


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``trio-activate ARGS`` run to its end, as a user runs it.

    In a session of its own: a bug that signalled "process group 0" could only hit itself.
    """
    return subprocess.run(
        [*TRIO_ACTIVATE, *args], capture_output=True, text=True, cwd=cwd, timeout=30, start_new_session=True
    )


def one_line_error(err: str) -> str:
    """`err` is exactly one ``trio-activate: ...`` line; return it."""
    assert err.count("\n") == 1, err
    assert err.startswith("trio-activate: "), err
    assert "Traceback" not in err
    return err.rstrip("\n")


# --- waiting -----------------------------------------------------------------


def open_fds(pid: int | str) -> set[str]:
    """Each open fd of process `pid` (or ``"self"``) and what it is, ``"3 socket:[4711]"``; for
    ``"self"`` without the listing's own fd."""
    found = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(FileNotFoundError):
            found.add(f"{fd.name} {os.readlink(fd)}")
    return found


def _python_for_nobody() -> str:
    """An interpreter another user can run (not one under a folder only root reaches)."""
    for candidate in ("/usr/bin/python3", shutil.which("python3"), os.path.realpath(sys.executable)):
        if candidate and os.access(candidate, os.X_OK) and os.stat(candidate).st_mode & 0o001:
            return candidate
    pytest.skip("no interpreter that nobody may run")


_CONTROL_CLIENT = """
import socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.settimeout(10)
sock.connect(sys.argv[1].encode().replace(b"@", b"\\0", 1))
try:
    sock.sendall(('{"op": "%s"}\\n' % sys.argv[2]).encode())
except BrokenPipeError:
    pass  # refused before the request went out: the answer is there to read
data, ancillary, _, _ = sock.recvmsg(4096, 4096)
assert not ancillary, "no fd comes with a refusal"
print(data.decode().strip())
"""


def control_as_nobody(address: str, op: str) -> subprocess.CompletedProcess[str]:
    """Ask the control socket at `address` (``@name`` for an abstract one) for `op` as uid 65534;
    its answer line on stdout.  Skips unless root with ``setpriv``."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv")
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", _python_for_nobody(), "-I"]
    return subprocess.run(
        [*nobody, "-c", _CONTROL_CLIENT, address, op], capture_output=True, text=True, timeout=20
    )


def wait_until(condition: Callable[[], bool], *, timeout: float = TIMEOUT, what: str = "") -> None:
    """Poll `condition` until it holds; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout}s: {what}")
        time.sleep(0.02)


def retry(action: Callable[[], T], timeout: float = TIMEOUT) -> T:
    """`action`'s result, retried while it raises OSError (nothing listens yet); re-raised after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return action()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# --- /proc -------------------------------------------------------------------


def _stat_fields(pid: int | str) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first), or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rpartition(")")[2].split()


def processes_with_parent(pid: int) -> list[int]:
    """Every process whose parent is `pid`, zombies included (an unreaped child is one)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat_fields(entry.name)) and int(fields[1]) == pid:
            found.append(int(entry.name))
    return sorted(found)


def children_of(pid: int) -> set[int]:
    """Live (not zombie) processes whose parent is `pid`."""
    found = set()
    for entry in Path("/proc").iterdir():
        fields = _stat_fields(entry.name) if entry.name.isdigit() else None
        if fields and int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(entry.name))
    return found


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group `pgid`."""
    found = []
    for entry in Path("/proc").iterdir():
        fields = _stat_fields(entry.name) if entry.name.isdigit() else None
        if fields and int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def is_gone(pid: int) -> bool:
    """True when `pid` no longer runs (absent, or a zombie nobody reaped yet)."""
    fields = _stat_fields(pid)
    return fields is None or fields[0] == "Z"


def _signal_mask(pid: int, field: str) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    (mask,) = (line.split()[1] for line in status.splitlines() if line.startswith(f"{field}:"))
    return int(mask, 16)


def blocks(pid: int, signum: int) -> bool:
    """Whether `pid` holds `signum` blocked (pending until it handles it)."""
    return bool(_signal_mask(pid, "SigBlk") & (1 << (signum - 1)))


def ignores(pid: int, signum: int) -> bool:
    """Whether `pid` ignores `signum` (a shell's ``trap '' HUP`` is in effect)."""
    return bool(_signal_mask(pid, "SigIgn") & (1 << (signum - 1)))


PR_SET_CHILD_SUBREAPER = 36


class Reaper:
    """The test process as a child subreaper: what a service leaves behind becomes its child."""

    def __init__(self) -> None:
        self.before = set(processes_with_parent(os.getpid()))
        self.reaped: set[int] = set()

    def orphans(self) -> list[int]:
        """Processes that became this process's children (live or zombie) since the test began."""
        return [pid for pid in processes_with_parent(os.getpid()) if pid not in self.before | self.reaped]

    def wait_exit(self, pid: int, timeout: float = TIMEOUT) -> int:
        """Reap the orphan `pid`; its exit code (negative: the signal that killed it)."""
        deadline = time.monotonic() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                self.reaped.add(pid)
                return os.waitstatus_to_exitcode(status)
            if time.monotonic() > deadline:
                pytest.fail(f"orphan {pid} still runs after {timeout}s")
            time.sleep(0.02)


@contextlib.contextmanager
def subreaper() -> Iterator[Reaper]:
    """This process a child subreaper for the block; orphans left at the end are killed and reaped."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        pytest.fail(f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(ctypes.get_errno())}")
    watcher = Reaper()
    try:
        yield watcher
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
        for pid in watcher.orphans():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


# --- the subprocess harness --------------------------------------------------


class Process:
    """A command running in a session of its own, its stdout and stderr collected line by line.

    ``log`` is its stderr so far and ``out`` its stdout, exactly as written;
    `wait_for` waits for a stderr line matching a pattern (or fails, with the
    log, once stderr closed or time ran out).  The `subprocess.Popen` is
    ``process``, for what this class does not wrap.  With ``stderr_file``
    its stderr goes to that file, read as it grows until the process exited.
    """

    def __init__(self, process: subprocess.Popen[bytes], stderr_file: Path | None = None) -> None:
        self.process = process
        self._changed = threading.Condition()
        self._err: list[str] = []
        self._out: list[str] = []
        self._err_closed = False
        assert process.stdout is not None
        if stderr_file is None:
            assert process.stderr is not None
            err_reader = threading.Thread(target=self._read, args=(process.stderr, self._err), daemon=True)
        else:
            err_reader = threading.Thread(target=self._tail, args=(stderr_file,), daemon=True)
        self._readers = [
            err_reader,
            threading.Thread(target=self._read, args=(process.stdout, self._out), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, stream: IO[bytes], into: list[str]) -> None:
        for raw in stream:
            with self._changed:
                into.append(raw.decode(errors="replace"))
                self._changed.notify_all()
        with self._changed:
            if into is self._err:
                self._err_closed = True
            self._changed.notify_all()

    def _tail(self, path: Path) -> None:
        with path.open("rb") as file:
            pending = b""
            while True:
                exited = self.process.poll() is not None
                pending += file.read()
                lines = pending.splitlines(keepends=True)
                pending = lines.pop() if lines and not lines[-1].endswith(b"\n") else b""
                with self._changed:
                    self._err.extend(line.decode(errors="replace") for line in lines)
                    if exited:
                        self._err_closed = True
                    self._changed.notify_all()
                if exited:
                    return
                time.sleep(0.02)

    # the process

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    def poll(self) -> int | None:
        return self.process.poll()

    def send_signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float = TIMEOUT) -> int:
        """Its exit status, once it exited and what it wrote was read (a successor that
        inherited its stderr may hold that open: then the output read so far)."""
        try:
            status = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"pid {self.pid} still runs after {timeout}s:\n{self.log}")
        for reader in self._readers:
            reader.join(min(timeout, 1.0))
        return status

    def stop(self, signum: int = signal.SIGTERM, timeout: float = TIMEOUT) -> int:
        """`signum` (SIGTERM), then its exit status."""
        self.send_signal(signum)
        return self.wait(timeout)

    # its output

    @property
    def log(self) -> str:
        """Its stderr so far."""
        with self._changed:
            return "".join(self._err)

    @property
    def out(self) -> str:
        """Its stdout so far."""
        with self._changed:
            return "".join(self._out)

    @property
    def lines(self) -> list[str]:
        """Its stderr lines so far, without their newlines."""
        with self._changed:
            return [line.rstrip("\n") for line in self._err]

    def mark(self) -> int:
        """Where the log is now, for `wait_for(..., since=)`."""
        with self._changed:
            return len(self._err)

    def wait_for(self, pattern: str, *, since: int = 0, timeout: float = TIMEOUT) -> re.Match[str]:
        """The first stderr line from `since` on that matches the regular expression `pattern`."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        index = since
        with self._changed:
            while True:
                while index < len(self._err):
                    found = regex.search(self._err[index].rstrip("\n"))
                    index += 1
                    if found:
                        return found
                if self._err_closed:
                    pytest.fail(f"stderr closed before a line matched {pattern!r}:\n{''.join(self._err)}")
                left = deadline - time.monotonic()
                if left <= 0:
                    pytest.fail(f"no {pattern!r} within {timeout}s:\n{''.join(self._err)}")
                self._changed.wait(left)

    def wait_for_text(self, text: str, *, timeout: float = TIMEOUT) -> str:
        """The log once a line contains `text` (plain text, not a pattern)."""
        self.wait_for(re.escape(text), timeout=timeout)
        return self.log

    def count(self, pattern: str, *, since: int = 0) -> int:
        regex = re.compile(pattern)
        with self._changed:
            return sum(1 for line in self._err[since:] if regex.search(line.rstrip("\n")))

    def workers_of(self, generation: int, *, since: int = 0) -> set[int]:
        """PIDs of the workers a generation started (needs ``--log-level debug``)."""
        regex = re.compile(rf"generation {generation}: started worker (\d+)$")
        with self._changed:
            return {int(m[1]) for line in self._err[since:] if (m := regex.search(line.rstrip("\n")))}

    def port(self, socket_name: str = "web", *, timeout: float = TIMEOUT) -> int:
        """The port the kernel chose for ``sockets.NAME`` (``listen = "HOST:0"``), from the line
        the process that created the socket logs: ``sockets.web: listening on 127.0.0.1:PORT``."""
        found = self.wait_for(
            rf"sockets\.{re.escape(socket_name)}: (?:listening on|bound to) \S+:(\d+) \(port 0",
            timeout=timeout,
        )
        return int(found[1])


@contextlib.contextmanager
def started(
    argv: Sequence[str | Path],
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    stderr_file: Path | None = None,
) -> Iterator[Process]:
    """Run `argv` in a session of its own; on the way out kill its whole process group and reap it.

    ``stderr_file``: its stderr goes to that file (appended), not to a pipe."""
    with contextlib.ExitStack() as files:
        stderr: IO[bytes] | int = subprocess.PIPE
        if stderr_file is not None:
            stderr = files.enter_context(stderr_file.open("ab"))
        popen = subprocess.Popen(
            [str(arg) for arg in argv],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            start_new_session=True,
        )
    process = Process(popen, stderr_file)
    try:
        yield process
    finally:
        # The group outlives its leader while a member (a successor, a worker) lives.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(popen.pid, signal.SIGKILL)
        popen.wait(timeout=TIMEOUT)
        for reader in process._readers:
            reader.join(TIMEOUT)
        assert popen.stdout is not None
        popen.stdout.close()
        if popen.stderr is not None:
            popen.stderr.close()


def running(
    *args: str | Path,
    cwd: Path,
    env: dict[str, str] | None = None,
    command: Sequence[str] = TRIO_ACTIVATE,
    stderr_file: Path | None = None,
) -> contextlib.AbstractContextManager[Process]:
    """``trio-activate ARGS`` (or `command` ARGS), `started` in `cwd`."""
    return started([*command, *args], cwd=cwd, env=env, stderr_file=stderr_file)


# A log line in the text format: the local time with milliseconds, then whose it is and its level.
TEXT_LINE = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} trio-activate\[(\d+)\]: (debug|info|warning|error): "


def serve_cmd(manifest: Path) -> list[str]:
    return [*TRIO_ACTIVATE, "serve", str(manifest)]


# --- files -------------------------------------------------------------------


def write_manifest(folder: Path, text: str, *, name: str = "service.toml") -> Path:
    """`text` (dedented) as the manifest `name` in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def echo_manifest(folder: Path, listen: str, name: str = "echo") -> Path:
    """One socket `name` on `listen`, served by the example echo handler."""
    return write_manifest(
        folder,
        f"""
        [sockets.{name}]
        listen = "{listen}"

        [handlers.{name}]
        socket = "{name}"
        call = "trio_activate.examples:echo"
        """,
    )


# The versioned handler (app.py) of the reload tests.  It answers one request
# line ``TOKEN`` with ``TOKEN PID VERSION`` after 10 ms: the token shows the
# answer belongs to the request, the PID which process served it, the version
# which code it runs; the delay keeps a connection in flight most of the time,
# so a process stopped without draining would fail one.
HANDLER = """\
import os

import trio

VERSION = {version!r}


async def handle(stream):
    request = b""
    while not request.endswith(b"\\n"):
        data = await stream.receive_some(1024)
        if not data:
            return
        request += data
    await trio.sleep(0.01)  # in flight for a while: a worker stopped abruptly would cut it
    await stream.send_all(f"{{request.decode().strip()}} {{os.getpid()}} {{VERSION}}\\n".encode())
"""


def write_handler(folder: Path, version: str, *, preamble: str = "") -> Path:
    """`HANDLER` of `version` as ``folder/app.py``."""
    path = folder / "app.py"
    path.write_text(preamble + HANDLER.format(version=version))
    return path


def app_manifest(
    folder: Path,
    listen: str = "127.0.0.1:0",
    *,
    workers: int = 1,
    grace_period: float = 5.0,
    start_timeout: float | None = None,
    worker_timeout: float | None = None,
) -> Path:
    """``folder/app.toml``: socket ``web`` on `listen` served by ``app:handle`` (`write_handler`)."""
    service = f'python-path = ["."]\nworkers = {workers}\ngrace-period = {grace_period}\n'
    if start_timeout is not None:
        service += f"start-timeout = {start_timeout}\n"
    if worker_timeout is not None:
        service += f"worker-timeout = {worker_timeout}\n"
    path = folder / "app.toml"
    path.write_text(
        f"[service]\n{service}\n"
        f'[sockets.web]\nlisten = "{listen}"\n\n'
        f'[handlers.web]\nsocket = "web"\ncall = "app:handle"\n'
    )
    return path


# --- clients -----------------------------------------------------------------


def loopback(port: int) -> tuple[str, int]:
    return ("127.0.0.1", port)


def has_ipv6() -> bool:
    """Whether this host can bind ::1."""
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def free_port(family: socket.AddressFamily = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> int:
    """A port the kernel just had free on loopback (bound, then released): only where the
    port must be known before anything binds it and nothing can tell it afterwards."""
    host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    with socket.socket(family, kind) as probe:
        try:
            probe.bind((host, 0))
        except OSError as exc:
            pytest.skip(f"cannot bind {host}: {exc}")
        port: int = probe.getsockname()[1]
    return port


@dataclass(frozen=True)
class Answer:
    pid: int
    version: str


class WrongAnswer(Exception):
    pass


def ask(address: tuple[str, int] | str | Path, token: str, *, timeout: float = 5.0) -> Answer:
    """One connection to `HANDLER`: send ``TOKEN``, read ``TOKEN PID VERSION``; raise on anything else."""
    family = socket.AF_INET if isinstance(address, tuple) else socket.AF_UNIX
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(address if isinstance(address, tuple) else str(address))
        sock.sendall(token.encode() + b"\n")
        reply = b""
        while not reply.endswith(b"\n"):
            data = sock.recv(1024)
            if not data:
                break
            reply += data
    fields = reply.decode(errors="replace").split()
    if len(fields) != 3 or fields[0] != token or not fields[1].isdigit():
        raise WrongAnswer(f"asked {token!r}, got {reply!r}")
    return Answer(int(fields[1]), fields[2])


class ClientLoop:
    """A steady stream of connections to `HANDLER`, one after another, bounded in count and time.

    Every failure (refused, reset, timed out, a wrong answer) is recorded,
    never retried.
    """

    def __init__(
        self,
        address: tuple[str, int] | str | Path,
        *,
        max_connections: int = 50_000,
        max_seconds: float = 60.0,
        pause: float = 0.002,
    ) -> None:
        self.address = address
        self.max_connections = max_connections
        self.max_seconds = max_seconds
        self.pause = pause
        self.answers: list[Answer] = []
        self.failures: list[str] = []
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ClientLoop:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(TIMEOUT)
        assert not self._thread.is_alive()

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        for number in range(self.max_connections):
            if self._stop.is_set() or time.monotonic() > deadline:
                break
            token = f"t{number}"
            try:
                answer = ask(self.address, token)
            except (OSError, WrongAnswer) as exc:
                with self._changed:
                    self.failures.append(f"{token}: {exc!r}")
                    self._changed.notify_all()
            else:
                with self._changed:
                    self.answers.append(answer)
                    self._changed.notify_all()
            time.sleep(self.pause)
        with self._changed:
            self._stop.set()
            self._changed.notify_all()

    def wait_for(
        self, *, pids: Collection[int] | None = None, version: str | None = None, timeout: float = TIMEOUT
    ) -> Answer:
        """The first answer from now on from one of `pids` with `version` (when given)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            index = len(self.answers)
            while True:
                while index < len(self.answers):
                    answer = self.answers[index]
                    index += 1
                    if (pids is None or answer.pid in pids) and version in (None, answer.version):
                        return answer
                left = deadline - time.monotonic()
                if self._stop.is_set() or left <= 0:
                    pytest.fail(
                        f"no such answer within {timeout}s; last: {self.answers[-3:]}, "
                        f"failures: {self.failures[-3:]}"
                    )
                self._changed.wait(left)


def tcp_exchange(host: str, port: int, data: bytes) -> bytes:
    """Send `data`, half-close, read to EOF."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as client:
        client.settimeout(5)
        client.connect((host, port))
        client.sendall(data)
        client.shutdown(socket.SHUT_WR)
        return b"".join(iter(lambda: client.recv(4096), b""))


def unix_exchange(address: str, data: bytes, kind: int = socket.SOCK_STREAM) -> bytes:
    """Send `data`, read one reply."""
    with socket.socket(socket.AF_UNIX, kind) as client:
        client.settimeout(5)
        client.connect(address)
        client.sendall(data)
        return client.recv(4096)


# --- the notify socket -------------------------------------------------------


@contextlib.contextmanager
def notify_socket(path: Path) -> Iterator[socket.socket]:
    """A real datagram socket bound at `path`, acting as the service manager's NOTIFY_SOCKET,
    with the sender's credentials on every message (see `receive`)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        sock.bind(str(path))
        sock.settimeout(TIMEOUT)
        yield sock


def receive(sock: socket.socket) -> tuple[int, dict[str, str]]:
    """The next message: (sender PID, its fields)."""
    space = socket.CMSG_SPACE(struct.calcsize("3i"))
    data, ancillary, _flags, _address = sock.recvmsg(4096, space)
    pid = next(
        struct.unpack("3i", cdata[: struct.calcsize("3i")])[0]
        for level, kind, cdata in ancillary
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
    )
    fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
    return pid, fields


def receive_until(sock: socket.socket, key: str) -> list[tuple[int, dict[str, str]]]:
    """Messages up to and including the first that carries `key`."""
    messages = []
    while True:
        messages.append(receive(sock))
        if key in messages[-1][1]:
            return messages


# --- a stand-in for a service -------------------------------------------------


def fake_service(folder: Path, *, on_hup: str) -> list[str]:
    """The command line of a process that passes for ``trio-activate serve`` (its command line says
    so) and, on SIGHUP, dies (``on_hup="die"``) or ignores it (``"ignore"``): a service that exits
    mid-reload, or one that never answers.  ``reload`` checks the first, then signals it."""
    script = folder / "bin" / "trio-activate"
    script.parent.mkdir(parents=True, exist_ok=True)
    action = "signal.SIG_DFL" if on_hup == "die" else "signal.SIG_IGN"
    script.write_text(
        f"#!{sys.executable}\nimport signal, time\nsignal.signal(signal.SIGHUP, {action})\ntime.sleep(30)\n"
    )
    script.chmod(0o755)
    return [str(script), "serve", "fake.toml"]


VERSIONED_ASGI_APP = """
VERSION = "{version}"


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({{"type": "lifespan.startup.complete"}})
            elif message["type"] == "lifespan.shutdown":
                await send({{"type": "lifespan.shutdown.complete"}})
                return
    await send({{"type": "http.response.start", "status": 200, "headers": []}})
    await send({{"type": "http.response.body", "body": VERSION.encode()}})
"""


def write_asgi_app(path: Path, version: str) -> None:
    """A plain ASGI app at `path` (lifespan answered) whose every answer is `version`."""
    path.write_text(VERSIONED_ASGI_APP.format(version=version))
