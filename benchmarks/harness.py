"""Building blocks of the benchmark harness: server processes, wrk, HTTP probes, memory.

Every server binds 127.0.0.1 only, and every wait here is bounded: a server
that is not answering within ``READY_TIMEOUT`` seconds, a wrk run that
outlives its duration by ``WRK_MARGIN`` seconds, a probe that gets no answer
in ``PROBE_TIMEOUT`` seconds are errors, never hangs.

Resource handling: a ``Server`` owns its process group (it is started with
``start_new_session``, so nginx's worker and a supervisor's workers go with
it); ``stop()`` sends SIGTERM to that group, then SIGKILL after
``STOP_TIMEOUT``, and reaps it.  ``Servers`` is the context manager that
stops every server it started, on success, error or Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
HOST = "127.0.0.1"
READY_TIMEOUT = 15.0
PROBE_TIMEOUT = 5.0
STOP_TIMEOUT = 5.0
WRK_MARGIN = 15.0

REQUEST_KEEP_ALIVE = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
REQUEST_CLOSE = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
HELLO_BODY = b"Hello, world!\n"

WRK_INSTALL_HINT = (
    "wrk not found: install it with `apt-get install wrk` (Debian, Ubuntu), `brew install wrk` (macOS), "
    "or build it from https://github.com/wg/wrk; then run the harness again"
)


class BenchError(Exception):
    """A benchmark step failed: a server that would not start, a load generator that failed."""


# --- tools and the machine ----------------------------------------------------------------


def trio_activate_argv() -> list[str]:
    """How to run ``trio-activate``: the console script beside this interpreter, else ``-m``."""
    script = Path(sys.executable).with_name("trio-activate")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "trio_activate"]


def pin_prefix(cpus: set[int] | None) -> list[str]:
    """``taskset -c CPUS`` to pin a command (and everything it forks), or nothing."""
    if cpus is None:
        return []
    taskset = shutil.which("taskset")
    if taskset is None:
        return []
    return [taskset, "-c", ",".join(str(c) for c in sorted(cpus))]


def cpu_split() -> tuple[set[int] | None, set[int] | None]:
    """(server CPUs, load generator CPUs): one core each when there are two or more, else no pinning."""
    try:
        available = sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return None, None
    if len(available) < 2 or shutil.which("taskset") is None:
        return None, None
    return {available[0]}, {available[1]}


def _first_line(argv: Sequence[str]) -> str:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    lines = (done.stdout + done.stderr).strip().splitlines()
    return lines[0].strip() if lines else "unknown"


def machine_info(wrk: str | None, nginx: str | None) -> dict[str, str | int | None]:
    """What the figures were measured on: they mean little without it."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    wrk_version = None
    if wrk is not None:
        match = re.search(r"wrk\s+(\S+)", _first_line([wrk, "-v"]))
        wrk_version = match.group(1) if match else "unknown"
    nginx_version = None
    if nginx is not None:
        nginx_version = _first_line([nginx, "-v"]).removeprefix("nginx version: ")
    commit = _first_line(["git", "-C", str(BENCH_DIR.parent), "describe", "--always", "--dirty"])
    return {
        "commit": commit if re.fullmatch(r"[\w.-]+", commit) else "unknown",
        "cores": os.cpu_count() or 0,
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "trio": metadata.version("trio"),
        "trio_activate": metadata.version("trio-activate"),
        "install": install_kind(),
        "wrk": wrk_version,
        "nginx": nginx_version,
        "loadavg": load_average(),
    }


def install_kind() -> str:
    """ "editable" or "regular": how trio-activate is installed (PEP 610's direct_url.json).

    It matters to scenario 3: an editable install's import hook costs every
    interpreter start (about 15 ms here), and a self-activated serve starts two.
    """
    try:
        text = metadata.distribution("trio-activate").read_text("direct_url.json")
        editable = text is not None and json.loads(text).get("dir_info", {}).get("editable", False)
    except (metadata.PackageNotFoundError, ValueError, AttributeError):
        return "unknown"
    return "editable" if editable else "regular"


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


# --- sockets and HTTP -----------------------------------------------------------------------


def free_port() -> int:
    """A port that is free on 127.0.0.1 right now (the kernel's pick for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


def http_get(port: int, *, close: bool = True, timeout: float = PROBE_TIMEOUT) -> bytes:
    """One request on a new connection; the raw response (read to EOF with ``close``)."""
    with socket.create_connection((HOST, port), timeout=timeout) as conn:
        conn.sendall(REQUEST_CLOSE if close else REQUEST_KEEP_ALIVE)
        return _read_response(conn, to_eof=close)


def _read_response(conn: socket.socket, *, to_eof: bool) -> bytes:
    data = b""
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            return data
        data += chunk
        if not to_eof and data.endswith(HELLO_BODY):
            return data


def expected_responses() -> dict[bool, bytes]:
    """What ``hello_http`` answers, by ``close``: every contender but nginx must send exactly this."""
    from trio_activate.examples import _response

    return {True: _response(True), False: _response(False)}


def check_responses(port: int, expected: dict[bool, bytes] | None) -> None:
    """Fail unless the server answers 200 (and, given ``expected``, exactly those bytes)."""
    for close in (False, True):
        answer = http_get(port, close=close)
        if expected is not None and answer != expected[close]:
            raise BenchError(f"port {port}: expected {expected[close]!r}, got {answer!r}")
        if not answer.startswith(b"HTTP/1.1 200 "):
            raise BenchError(f"port {port}: not a 200 answer: {answer[:80]!r}")


def open_idle_connections(port: int, count: int) -> list[socket.socket]:
    """``count`` keep-alive connections, each having had one answer, then left idle.

    One request per connection proves the server accepted it and runs a
    handler for it; the connection then stays open with nothing to read.
    """
    held: list[socket.socket] = []
    try:
        for _ in range(count):
            held.append(socket.create_connection((HOST, port), timeout=PROBE_TIMEOUT))
        for conn in held:
            conn.sendall(REQUEST_KEEP_ALIVE)
        for conn in held:
            if not _read_response(conn, to_eof=False).startswith(b"HTTP/1.1 200 "):
                raise BenchError(f"port {port}: an idle connection's request was not answered")
    except BaseException:
        close_all(held)
        raise
    return held


def close_all(connections: Sequence[socket.socket]) -> None:
    for conn in connections:
        conn.close()


# --- processes ------------------------------------------------------------------------------


def rss_mib(pid: int) -> float:
    """Resident set size of one process (``VmRSS``), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise BenchError(f"pid {pid}: no VmRSS in /proc/{pid}/status")


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) used so far by ``pid`` and every process below it, in seconds.

    From ``/proc/PID/stat`` (fields 14 and 15, in clock ticks), which count
    every thread of a process, exited ones included.  A process that exits
    between two readings takes its time with it, so measure around runs in
    which the serving processes live throughout.
    """
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            stat = Path(f"/proc/{current}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "(comm)", which may hold spaces
        total += (int(fields[11]) + int(fields[12])) / ticks
        pending.extend(child_pids(current))
    return total


def child_pids(pid: int) -> list[int]:
    """The children of every thread of ``pid`` (trio's ``open_process`` forks from a worker thread)."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(word) for word in (task / "children").read_text().split()]
        except OSError:
            continue
    return children


@dataclass
class Contender:
    """One way of serving ``hello_http``: how to start it on a port, and which process serves."""

    id: str
    label: str
    argv: Callable[[int, Path], list[str]]
    """(port, work folder) -> command line."""
    exact_bytes: bool = True
    """Answers byte for byte as ``hello_http`` (nginx does not: it adds Server and Date)."""
    serving_pid: Callable[[int], int] = lambda pid: pid
    """Main PID -> the PID of the process that serves (nginx: its worker)."""


@dataclass(eq=False)
class Server:
    """One running contender on its own port, in its own process group."""

    contender: Contender
    port: int
    workdir: Path
    cpus: set[int] | None = None
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.workdir / f"{self.contender.id}-{self.port}.log"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        argv = [*pin_prefix(self.cpus), *self.contender.argv(self.port, self.workdir)]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )

    def alive(self) -> bool:
        return self.process is not None and not has_exited(self.process)

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Poll until the server answers a request; fail if it exits or takes longer than ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive():
                raise BenchError(f"{self.contender.label} exited at start: {self.log_tail()}")
            try:
                http_get(self.port, timeout=max(0.1, deadline - time.monotonic()))
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise BenchError(
                        f"{self.contender.label} not answering on port {self.port} within {timeout:g}s: "
                        f"{exc}; {self.log_tail()}"
                    ) from None
                time.sleep(0.01)
            else:
                return

    def ensure_running(self) -> None:
        """Restart the server if it died (counted in ``restarts``)."""
        if self.alive():
            return
        self.stop()
        self.restarts += 1
        self.start()
        self.wait_ready()

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            stop_process(process)

    def log_tail(self, limit: int = 600) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip()
        except OSError:
            return "(no log)"
        return text[-limit:] or "(empty log)"


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the process, SIGKILL after ``STOP_TIMEOUT``; then SIGKILL to what is left of its group.

    The process was started with ``start_new_session``, so its PID is its
    group's id.  It is waited for without being reaped (``WNOWAIT``) until
    its group has been signalled: a zombie's PID cannot be reused, so the
    group signalled is ours (nginx's worker, a supervisor's workers).
    """
    pid = process.pid
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if not _wait_no_reap(pid, STOP_TIMEOUT):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _wait_no_reap(pid, STOP_TIMEOUT)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
    process.wait(STOP_TIMEOUT)


def has_exited(process: subprocess.Popen[bytes]) -> bool:
    """Whether the process has exited, without reaping it (``Popen.poll`` would)."""
    return process.returncode is not None or _wait_no_reap(process.pid, 0)


def _wait_no_reap(pid: int, timeout: float) -> bool:
    """True once ``pid`` has exited (left a zombie, not reaped), False after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:
            return True  # already reaped
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)


class Servers:
    """Starts servers and stops every one of them on exit, however the block ends."""

    def __init__(self) -> None:
        self._started: list[Server] = []

    def __enter__(self) -> Servers:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for server in reversed(self._started):
            server.stop()
        self._started.clear()

    def start(self, contenders: Sequence[Contender], workdir: Path, cpus: set[int] | None) -> list[Server]:
        """Start each contender on a free port, all at once, then wait until each answers correctly."""
        servers = [Server(c, free_port(), workdir, cpus) for c in contenders]
        for server in servers:
            self._started.append(server)
            server.start()
        expected = expected_responses()
        for server in servers:
            server.wait_ready()
            check_responses(server.port, expected if server.contender.exact_bytes else None)
        return servers

    def stop(self, server: Server) -> None:
        server.stop()
        with contextlib.suppress(ValueError):
            self._started.remove(server)


# --- wrk --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    errors: dict[str, int]
    latency_p50_ms: float
    latency_p99_ms: float

    @property
    def requests_per_second(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @property
    def failed(self) -> int:
        return sum(self.errors.values())


WRK_ERROR_KINDS = ("connect", "read", "write", "timeout", "status")


def parse_wrk(output: str) -> WrkResult:
    """Read the line ``wrk_report.lua`` prints (``WRK_JSON {...}``)."""
    for line in output.splitlines():
        if line.startswith("WRK_JSON "):
            data = json.loads(line.removeprefix("WRK_JSON "))
            return WrkResult(
                requests=int(data["requests"]),
                seconds=int(data["duration_us"]) / 1e6,
                errors={kind: int(data[kind]) for kind in WRK_ERROR_KINDS},
                latency_p50_ms=int(data["latency_p50_us"]) / 1000,
                latency_p99_ms=int(data["latency_p99_us"]) / 1000,
            )
    raise BenchError(f"no WRK_JSON line in wrk's output: {output[-400:]!r}")


def wrk_argv(
    wrk: str, port: int, *, seconds: int, connections: int, close: bool, cpus: set[int] | None
) -> list[str]:
    argv = [*pin_prefix(cpus), wrk, "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "2s"]
    argv += ["-s", str(BENCH_DIR / "wrk_report.lua")]
    if close:
        argv += ["-H", "Connection: close"]
    return [*argv, f"http://{HOST}:{port}/"]


def run_wrk(
    wrk: str, port: int, *, seconds: int, connections: int, close: bool, cpus: set[int] | None
) -> WrkResult:
    argv = wrk_argv(wrk, port, seconds=seconds, connections=connections, close=close, cpus=cpus)
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + WRK_MARGIN)
    except subprocess.TimeoutExpired:
        raise BenchError(f"wrk did not finish within {seconds + WRK_MARGIN:g}s") from None
    if done.returncode != 0:
        raise BenchError(f"wrk failed ({done.returncode}): {(done.stderr or done.stdout)[-400:]}")
    return parse_wrk(done.stdout)


@contextlib.contextmanager
def wrk_in_background(
    wrk: str, port: int, *, limit: int, connections: int, close: bool, cpus: set[int] | None
) -> Iterator[Callable[[], WrkResult]]:
    """Run wrk for at most ``limit`` seconds; the yielded function stops it (SIGINT) and reads its report."""
    argv = wrk_argv(wrk, port, seconds=limit, connections=connections, close=close, cpus=cpus)
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def finish() -> WrkResult:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)  # wrk stops and prints its report
        out, err = process.communicate(timeout=WRK_MARGIN)
        if process.returncode != 0:
            raise BenchError(f"wrk failed ({process.returncode}): {(err or out)[-400:]}")
        return parse_wrk(out)

    try:
        yield finish
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=WRK_MARGIN)


# --- start-up ---------------------------------------------------------------------------------


def time_to_first_answer(
    argv: Sequence[str], port: int, log_path: Path, timeout: float = READY_TIMEOUT
) -> float:
    """Seconds from starting ``argv`` to the first complete answer on ``port``.

    The probe connects every millisecond until the connection is accepted (a
    bare script binds late; a socket-activated one has its socket before the
    service is up, and the request waits in the backlog), then sends a
    request and reads the answer to EOF.
    """
    with log_path.open("ab") as log:
        started = time.perf_counter()
        process = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
        )
    try:
        while True:
            remaining = timeout - (time.perf_counter() - started)
            if remaining <= 0:
                raise BenchError(f"{argv[0]}: no answer on port {port} within {timeout:g}s")
            try:
                answer = http_get(port, close=True, timeout=remaining)
            except ConnectionRefusedError:
                if has_exited(process):
                    raise BenchError(f"{' '.join(argv)} exited at start") from None
                time.sleep(0.001)
                continue
            elapsed = time.perf_counter() - started
            if not answer.startswith(b"HTTP/1.1 200 "):
                raise BenchError(f"{argv[0]}: not a 200 answer: {answer[:80]!r}")
            return elapsed
    finally:
        stop_process(process)


# --- manifests and configs ----------------------------------------------------------------------


def write_manifest(workdir: Path, port: int, *, workers: int = 1, grace_period: float = 2.0) -> Path:
    """A trio-activate manifest serving ``hello_http`` on 127.0.0.1:PORT (socket name ``http``)."""
    path = workdir / f"bench-{port}-w{workers}.toml"
    path.write_text(
        "[service]\n"
        'name = "bench"\n'
        f"grace-period = {grace_period}\n"
        f"workers = {workers}\n"
        "\n"
        "[sockets.http]\n"
        f'listen = "{HOST}:{port}"\n'
        "\n"
        "[handlers.http]\n"
        'socket = "http"\n'
        'call = "trio_activate.examples:hello_http"\n'
    )
    return path


NGINX_CONF = """\
worker_processes 1;
daemon off;
master_process on;
pid {prefix}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    keepalive_requests 1000000000;
    server {{
        listen {host}:{port} backlog=4096;
        location / {{
            default_type text/plain;
            return 200 "Hello, world!\\n";
        }}
    }}
}}
"""


def write_nginx_conf(workdir: Path, port: int) -> Path:
    """nginx with one worker answering the same body: the reference for what this machine can do."""
    prefix = workdir / f"nginx-{port}"
    prefix.mkdir(exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONF.format(prefix=prefix, host=HOST, port=port))
    return conf
