"""What the runtime guarantees under faults, measured: fds, reloads, killed workers, EMFILE.

    python benchmarks/faults.py [--only fds,reloads,kills,stops,emfile,takeovers] [--quick] [--workdir DIR]

Six parts, each against ``trio_activate.examples:hello_http`` on 127.0.0.1:

fds      ``serve`` (one process) takes 50,000 mixed connections twice: normal
         requests, keep-alive requests, resets (``SO_LINGER`` 0) before and
         after the answer, half-closes with and without a request, a partial
         request, and connect-and-close without a byte.  The server's fd
         count (``/proc/PID/fd``) and ``VmRSS`` after a warm-up, after the
         first 50,000 and after the second: the growth between the last two
         is the leak.
reloads  ``serve --supervise`` with ``workers = 2`` and a handler module in a
         temp folder (``python-path``), rewritten before each of 20 SIGHUPs,
         alternately broken (a syntax error) and valid, under wrk load
         (Connection: close, then keep-alive).  Failed requests as wrk counts
         them; each reload's outcome from the supervisor's log, and the code
         serving after it from a second socket that answers the module's
         version.
kills    ``serve`` with ``workers = 4`` under wrk load; one ready worker is
         killed with SIGKILL every 0.5 s, 30 in all, for each load.  Failed
         requests, and how many established connections each killed worker
         held (its socket fds against ``ss``): those die with it, and no
         other request may fail.
stops    the same, with SIGTERM instead of SIGKILL: each stopped worker
         drains within the grace period and is replaced; 0 failed requests.
emfile   ``serve`` under ``prlimit --nofile``: idle keep-alive connections
         until ``accept()`` fails with EMFILE, then the server's CPU while it
         is out of fds, and the time from closing one client to the answer
         of a connection queued in the backlog.
takeovers ``serve`` (one process, a control socket) under wrk load; 20 times
         a new process, started here and not by the old one, takes the
         sockets over (``serve --takeover``) while the load runs.  Failed
         requests, each new process confirmed and the old one exited 0.

Bounded: every load has a count or a time limit, every socket a timeout;
every process started here runs in its own session and is stopped with its
group (SIGTERM, then SIGKILL) on the way out, by ``harness.Servers``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from harness import (
    HOST,
    REQUEST_CLOSE,
    REQUEST_KEEP_ALIVE,
    BenchError,
    Contender,
    Server,
    Servers,
    WrkResult,
    child_pids,
    cpu_seconds,
    expected_responses,
    free_port,
    http_get,
    rss_mib,
    trio_activate_argv,
    write_manifest,
    wrk_in_background,
)

PARTS = ("fds", "reloads", "kills", "stops", "emfile", "takeovers")
TIMEOUT = 5.0  # every client socket
LOG_TIMEOUT = 15.0  # a reload's outcome, a worker's readiness
GRACE_PERIOD = 0.5


@dataclass
class Figure:
    part: str
    what: str
    target: str
    measured: str
    met: bool | None
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Sizes:
    connections: int  # fds: per batch
    warmup: int
    reloads: int
    kills: int
    kill_every: float
    emfile_trials: int
    idle_cpu_seconds: float
    loads: tuple[bool, ...]  # close?
    takeovers: int = 20


FULL = Sizes(50_000, 2_000, 20, 30, 0.5, 5, 3.0, (True, False))
QUICK = Sizes(400, 100, 2, 2, 0.5, 1, 0.5, (True,), takeovers=2)


def progress(message: str) -> None:
    print(f"[faults] {message}", file=sys.stderr, flush=True)


def load_name(close: bool) -> str:
    return "Connection: close" if close else "keep-alive"


def start(servers: Servers, workdir: Path, label: str, argv: Callable[[int, Path], list[str]]) -> Server:
    (server,) = servers.start([Contender(label.replace(" ", "-"), label, argv)], workdir, None)
    return server


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def wait_log(server: Server, pattern: re.Pattern[str], count: int, timeout: float = LOG_TIMEOUT) -> list[str]:
    """Wait until ``pattern`` has matched ``count`` times in the server's log; the matches."""
    deadline = time.monotonic() + timeout
    while True:
        found = [m.group(0) for m in pattern.finditer(server.log_path.read_text(errors="replace"))]
        if len(found) >= count:
            return found
        if not server.alive():
            raise BenchError(f"{server.contender.label} exited: {server.log_tail()}")
        if time.monotonic() > deadline:
            raise BenchError(f"no {pattern.pattern!r} (#{count}) within {timeout:g}s: {server.log_tail()}")
        time.sleep(0.005)


def failure_rate(result: WrkResult) -> float:
    return 100 * result.failed / max(1, result.requests + result.failed)


def errors_text(result: WrkResult) -> str:
    return ", ".join(f"{kind} {n}" for kind, n in result.errors.items() if n) or "none"


# --- fds: 50,000 mixed connections, twice ---------------------------------------------------------


def _read(conn: socket.socket, want: int | None = None) -> bytes:
    """Read to EOF, or until ``want`` bytes."""
    data = b""
    while want is None or len(data) < want:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def _reset(conn: socket.socket) -> None:
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    conn.close()


def one_connection(port: int, kind: int, answers: dict[bool, bytes]) -> bool:
    """One connection of the mix; False when a connection that should be answered was not."""
    with socket.create_connection((HOST, port), timeout=TIMEOUT) as conn:
        if kind == 0:  # a normal request, Connection: close
            conn.sendall(REQUEST_CLOSE)
            return _read(conn) == answers[True]
        if kind == 1:  # two keep-alive requests, then the client closes
            for _ in range(2):
                conn.sendall(REQUEST_KEEP_ALIVE)
                if _read(conn, len(answers[False])) != answers[False]:
                    return False
            return True
        if kind == 2:  # a request, then a reset before the answer is read
            conn.sendall(REQUEST_CLOSE)
            _reset(conn)
            return True
        if kind == 3:  # a keep-alive answer, then a reset while the handler waits for more
            conn.sendall(REQUEST_KEEP_ALIVE)
            ok = _read(conn, len(answers[False])) == answers[False]
            _reset(conn)
            return ok
        if kind == 4:  # a request, then a half-close; the answer still comes
            conn.sendall(REQUEST_KEEP_ALIVE)
            conn.shutdown(socket.SHUT_WR)
            return _read(conn) == answers[False]
        if kind == 5:  # a half-close without a byte: the server closes
            conn.shutdown(socket.SHUT_WR)
            return _read(conn) == b""
        if kind == 6:  # half a request, then close
            conn.sendall(REQUEST_CLOSE[:10])
            return True
        return True  # kind 7: connect and close without a byte


KINDS = 8


def mixed_connections(port: int, count: int, threads: int = 4) -> int:
    """``count`` connections of the mix over ``threads`` clients; how many went wrong."""
    answers = expected_responses()
    failed = [0] * threads

    def client(index: int) -> None:
        for n in range(index, count, threads):
            try:
                ok = one_connection(port, n % KINDS, answers)
            except OSError:
                ok = False
            if not ok:
                failed[index] += 1

    workers = [threading.Thread(target=client, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(failed)


def settled(pid: int, timeout: float = 5.0) -> tuple[int, float]:
    """(fds, RSS MiB) once the fd count has held still for half a second (at most ``timeout``)."""
    deadline = time.monotonic() + timeout
    last, since = fd_count(pid), time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - since < 0.5:
        time.sleep(0.05)
        now = fd_count(pid)
        if now != last:
            last, since = now, time.monotonic()
    return last, rss_mib(pid)


def run_fds(sizes: Sizes, workdir: Path) -> list[Figure]:
    command = trio_activate_argv()
    with Servers() as servers:
        server = start(
            servers, workdir, "serve", lambda port, wd: [*command, "serve", str(write_manifest(wd, port))]
        )
        if child_pids(server.pid):
            raise BenchError(f"serve has children {child_pids(server.pid)}: expected one process")
        failed = mixed_connections(server.port, sizes.warmup)
        readings = [settled(server.pid)]
        elapsed = []
        for batch in (1, 2):
            began = time.monotonic()
            failed += mixed_connections(server.port, sizes.connections)
            elapsed.append(time.monotonic() - began)
            readings.append(settled(server.pid))
            progress(f"fds: batch {batch}: {readings[-1][0]} fds, {readings[-1][1]:.1f} MiB")
        alive = server.alive()
    (fd0, rss0), (fd1, rss1), (fd2, rss2) = readings
    n = f"{sizes.connections:,}"
    notes = [
        f"after {sizes.warmup:,} warm-up: {fd0} fds, {rss0:.1f} MiB; after {n}: {fd1} fds, {rss1:.1f} MiB; "
        f"after {n} more: {fd2} fds, {rss2:.1f} MiB",
        f"{KINDS} kinds in turn, 4 client threads; {n} in {elapsed[0]:.1f}s and {elapsed[1]:.1f}s; "
        f"{failed} connections that should have been answered were not"
        + ("" if alive else "; THE SERVER EXITED"),
    ]
    return [
        Figure(
            "fds", f"fds leaked over the second {n} connections", "0", f"{fd2 - fd1:+d}", fd2 == fd1, notes
        ),
        Figure(
            "fds",
            f"RSS growth over the second {n} connections",
            "none",
            f"{rss2 - rss1:+.2f} MiB",
            rss2 - rss1 < 0.5,
            [f"first {n}: {rss1 - rss0:+.2f} MiB (allocator warm-up)"],
        ),
    ]


# --- reloads: every other one broken, under load ----------------------------------------------------


VALID = """\
from trio_activate.examples import hello_http

VERSION = {version}


async def handle(stream):
    await hello_http(stream)


async def version(stream):
    await stream.send_all(b"%d" % VERSION)
"""
BROKEN = "VERSION = {version}\n\ndef handle(stream:\n    pass\n"
OUTCOME = re.compile(r"reloaded: generation \d+ serving|reload failed: [^\n]*")


def reload_manifest(folder: Path, port: int, version_port: int) -> Path:
    path = folder / "reloads.toml"
    path.write_text(
        f'[service]\nname = "reloads"\nworkers = 2\ngrace-period = {GRACE_PERIOD}\npython-path = ["."]\n\n'
        f'[sockets.http]\nlisten = "{HOST}:{port}"\n\n[sockets.version]\nlisten = "{HOST}:{version_port}"\n\n'
        '[handlers.http]\nsocket = "http"\ncall = "app:handle"\n\n'
        '[handlers.version]\nsocket = "version"\ncall = "app:version"\n'
    )
    return path


def serving_version(port: int) -> int:
    with socket.create_connection((HOST, port), timeout=TIMEOUT) as conn:
        return int(_read(conn))


def reloads_under_load(sizes: Sizes, workdir: Path, wrk: str, close: bool) -> Figure:
    folder = Path(tempfile.mkdtemp(prefix="reloads-", dir=workdir))
    module = folder / "app.py"
    module.write_text(VALID.format(version=1))
    version_port = free_port()
    command = trio_activate_argv()
    wrong: list[str] = []
    overlaps: list[float] = []
    with Servers() as servers:
        server = start(
            servers,
            folder,
            "serve --supervise",
            lambda port, wd: [*command, "serve", "--supervise", str(reload_manifest(wd, port, version_port))],
        )
        limit = int(sizes.reloads * (LOG_TIMEOUT + 1) + 10)
        with wrk_in_background(
            wrk, server.port, limit=limit, connections=50, close=close, cpus=None
        ) as finish:
            time.sleep(0.5)
            current = 1
            for number in range(1, sizes.reloads + 1):
                broken = number % 2 == 1
                version = number // 2 + 1
                module.write_text((BROKEN if broken else VALID).format(version=version))
                os.kill(server.pid, signal.SIGHUP)
                outcome = wait_log(server, OUTCOME, number)[-1]
                if broken != outcome.startswith("reload failed"):
                    wrong.append(f"reload {number} ({'broken' if broken else 'valid'}): {outcome}")
                if not broken:
                    current = version
                # Does the old code still answer new connections once the line is out?
                # Counted by answers, not by time: a probe itself takes ms under load.
                logged = time.monotonic()
                old_answers = 0
                while (serving := serving_version(version_port)) != current:
                    old_answers += 1
                    if broken or time.monotonic() - logged > 2.0:
                        wrong.append(f"after reload {number}: version {serving} serving, expected {current}")
                        break
                    time.sleep(0.002)
                else:
                    if old_answers:
                        overlaps.append(1000 * (time.monotonic() - logged))
                time.sleep(GRACE_PERIOD + 0.3)
            result = finish()
    shutil.rmtree(folder, ignore_errors=True)
    progress(f"reloads, {load_name(close)}: {result.failed} failed of {result.requests:,}")
    notes = [
        f"{result.requests:,} requests in {result.seconds:.1f}s; errors: {errors_text(result)}",
        f"{sizes.reloads} reloads: every broken one logged 'reload failed' and left the previous version "
        "serving, every valid one served its new version"
        if not wrong
        else "UNEXPECTED: " + "; ".join(wrong),
        f"after {len(overlaps)} of {sizes.reloads // 2} valid reloads a new connection got the old "
        f"code after the 'reloaded' line, for up to {max(overlaps, default=0):.0f} ms",
    ]
    return Figure(
        "reloads",
        f"failed requests, {load_name(close)} load",
        "0",
        str(result.failed),
        result.failed == 0 and not wrong,
        notes,
    )


# --- takeovers: a new process takes the sockets over, 20 times --------------------------------------


CONFIRMED = "takeover: process {pid} confirmed"


def takeovers_under_load(sizes: Sizes, workdir: Path, wrk: str, close: bool) -> Figure:
    folder = Path(tempfile.mkdtemp(prefix="takeovers-", dir=workdir))
    command = trio_activate_argv()
    manifest = folder / "takeovers.toml"
    control = folder / "ctl.sock"

    def argv(port: int, wd: Path) -> list[str]:
        manifest.write_text(
            f'[service]\nname = "takeovers"\ngrace-period = {GRACE_PERIOD}\ncontrol = "ctl.sock"\n\n'
            f'[sockets.http]\nlisten = "{HOST}:{port}"\n\n'
            '[handlers.http]\nsocket = "http"\ncall = "trio_activate.examples:hello_http"\n'
        )
        return [*command, "serve", str(manifest)]

    wrong: list[str] = []
    started: list[subprocess.Popen[bytes]] = []
    with Servers() as servers:
        server = start(servers, folder, "serve", argv)
        limit = int(sizes.takeovers * (LOG_TIMEOUT + 1) + 10)
        try:
            with wrk_in_background(
                wrk, server.port, limit=limit, connections=50, close=close, cpus=None
            ) as finish:
                time.sleep(0.5)
                old = server.pid
                for number in range(1, sizes.takeovers + 1):
                    log_path = folder / f"new-{number}.log"
                    with log_path.open("wb") as log_file:
                        process = subprocess.Popen(
                            [*command, "serve", str(manifest), "--takeover", str(control)],
                            stdin=subprocess.DEVNULL,
                            stdout=log_file,
                            stderr=subprocess.STDOUT,
                            start_new_session=True,
                        )
                    started.append(process)
                    deadline = time.monotonic() + LOG_TIMEOUT
                    while CONFIRMED.format(pid=old) not in log_path.read_text(errors="replace"):
                        if process.poll() is not None or time.monotonic() > deadline:
                            wrong.append(f"takeover {number}: not confirmed ({process.poll()})")
                            break
                        time.sleep(0.01)
                    else:
                        if not _exited(old, LOG_TIMEOUT):
                            wrong.append(f"takeover {number}: process {old} did not exit")
                        old = process.pid
                    time.sleep(0.3)
                result = finish()
            try:
                if b" 200 " not in http_get(server.port).split(b"\r\n", 1)[0] + b" ":
                    wrong.append("the last process does not answer 200")
            except OSError as exc:
                wrong.append(f"nothing serves after the last takeover: {exc}")
        finally:
            for process in started:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=TIMEOUT)
    shutil.rmtree(folder, ignore_errors=True)
    progress(f"takeovers, {load_name(close)}: {result.failed} failed of {result.requests:,}")
    notes = [
        f"{result.requests:,} requests in {result.seconds:.1f}s; errors: {errors_text(result)}",
        f"{sizes.takeovers} takeovers: each new process confirmed and each old one exited"
        if not wrong
        else "UNEXPECTED: " + "; ".join(wrong),
    ]
    return Figure(
        "takeovers",
        f"failed requests, {load_name(close)} load",
        "0",
        str(result.failed),
        result.failed == 0 and not wrong,
        notes,
    )


def _exited(pid: int, timeout: float) -> bool:
    """Whether ``pid`` is gone (or a zombie: the old process is the harness's child) within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().rpartition(")")[2].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.01)
    return False


# --- kills and stops: SIGKILL or SIGTERM to one worker every 0.5 s ------------------------------------


STARTED = re.compile(r"generation \d+: started worker (\d+)")
READY = re.compile(r"worker (\d+) ready")


def ready_workers(server: Server) -> list[int]:
    text = server.log_path.read_text(errors="replace")
    ready = {int(pid) for pid in READY.findall(text)}
    return sorted(ready & set(child_pids(server.pid)))


def established(port: int) -> set[int]:
    """Socket inodes of the server side of every established connection to ``port``."""
    done = subprocess.run(
        ["ss", "-Htne", "state", "established", f"( sport = :{port} )"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=True,
    )
    return {int(ino) for ino in re.findall(r"\bino:(\d+)", done.stdout)}


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    return inodes


def kills_under_load(sizes: Sizes, workdir: Path, wrk: str, close: bool) -> Figure:
    return workers_stopped_under_load(sizes, workdir, wrk, close, signal.SIGKILL)


def stops_under_load(sizes: Sizes, workdir: Path, wrk: str, close: bool) -> Figure:
    return workers_stopped_under_load(sizes, workdir, wrk, close, signal.SIGTERM)


def workers_stopped_under_load(
    sizes: Sizes, workdir: Path, wrk: str, close: bool, how: signal.Signals
) -> Figure:
    """One ready worker gets ``how`` every ``kill_every`` seconds while wrk runs.

    A SIGKILLed worker's accepted connections die with it (in flight, or idle
    keep-alive connections whose next request is on its way): no runtime can
    answer them, so the target is that nothing else fails: no more failed
    requests than the connections the killed workers held, counted under
    SIGSTOP just before each kill.  A SIGTERMed worker drains, so the target
    there is 0.
    """
    part = "kills" if how == signal.SIGKILL else "stops"
    command = trio_activate_argv()
    held: list[int] = []
    fewest_ready = 4
    with Servers() as servers:
        server = start(
            servers,
            workdir,
            "serve workers 4",
            lambda port, wd: [
                *command,
                "--log-level",
                "debug",
                "serve",
                str(write_manifest(wd, port, workers=4, grace_period=GRACE_PERIOD)),
            ],
        )
        wait_log(server, READY, 4)
        limit = int(sizes.kills * sizes.kill_every + 30)
        with wrk_in_background(
            wrk, server.port, limit=limit, connections=50, close=close, cpus=None
        ) as finish:
            time.sleep(1.0)
            rng = random.Random(12)
            for _ in range(sizes.kills):
                time.sleep(sizes.kill_every)
                deadline = time.monotonic() + LOG_TIMEOUT
                while not (candidates := ready_workers(server)):
                    if time.monotonic() > deadline:
                        raise BenchError(f"no ready worker within {LOG_TIMEOUT:g}s: {server.log_tail()}")
                    time.sleep(0.01)
                fewest_ready = min(fewest_ready, len(candidates))
                victim = rng.choice(candidates)
                with contextlib.suppress(OSError):
                    # Stopped first, so that it accepts nothing between the count and the signal.
                    os.kill(victim, signal.SIGSTOP)
                    held.append(len(socket_inodes(victim) & established(server.port)))
                    os.kill(victim, how)
                    os.kill(victim, signal.SIGCONT)
            time.sleep(1.0)
            result = finish()
        back = len(ready_workers(server))
        http_get(server.port)
    rate = failure_rate(result)
    progress(f"{part}, {load_name(close)}: {result.failed} failed of {result.requests:,} ({rate:.3f}%)")
    notes = [
        f"{result.requests:,} requests in {result.seconds:.1f}s, {len(held)} workers sent {how.name}; "
        f"errors: {errors_text(result)}",
        f"connections each worker held (established, from its fds and ss, counted under SIGSTOP "
        f"just before the {how.name}): {sum(held)} in all, "
        f"median {statistics.median(held) if held else 0:g}, max {max(held, default=0)}; "
        f"fewest ready workers at a signal: {fewest_ready}; {back} ready at the end, still answering",
    ]
    if how == signal.SIGKILL:
        target, met = "<= connections the killed workers held", result.failed <= sum(held)
        measured = f"{result.failed:,} failed ({rate:.3f}%), {sum(held):,} held"
    else:
        target, met = "0", result.failed == 0
        measured = f"{result.failed:,} of {result.requests:,}"
    return Figure(part, f"failed requests, {load_name(close)} load", target, measured, met, notes)


# --- emfile: out of fds, then one freed ---------------------------------------------------------------


NOFILE = 64
ANSWER_WAIT = 0.5  # a connection not answered this long is taken as queued in the backlog


def ask(port: int) -> socket.socket:
    conn = socket.create_connection((HOST, port), timeout=TIMEOUT)
    conn.sendall(REQUEST_KEEP_ALIVE)
    return conn


def answered(conn: socket.socket, size: int, timeout: float) -> bool:
    conn.settimeout(timeout)
    try:
        return len(_read(conn, size)) == size
    except TimeoutError:
        return False
    finally:
        conn.settimeout(TIMEOUT)


def run_emfile(sizes: Sizes, workdir: Path) -> list[Figure]:
    command = trio_activate_argv()
    size = len(expected_responses()[False])
    served: list[socket.socket] = []
    recoveries: list[float] = []
    try:
        with Servers() as servers:
            server = start(
                servers,
                workdir,
                "serve nofile",
                lambda port, wd: [
                    "prlimit",
                    f"--nofile={NOFILE}:{NOFILE}",
                    *command,
                    "serve",
                    str(write_manifest(wd, port)),
                ],
            )
            queued = None
            for _ in range(NOFILE + 5):
                conn = ask(server.port)
                if not answered(conn, size, ANSWER_WAIT):
                    queued = conn
                    break
                served.append(conn)
            if queued is None:
                raise BenchError(f"{len(served)} connections served under nofile={NOFILE}: never out of fds")
            logged = "accept failed: Too many open files" in server.log_path.read_text(errors="replace")
            fds = fd_count(server.pid)
            before, started = cpu_seconds(server.pid), time.monotonic()
            time.sleep(sizes.idle_cpu_seconds)
            cpu = 100 * (cpu_seconds(server.pid) - before) / (time.monotonic() - started)
            for trial in range(sizes.emfile_trials):
                if trial:  # out of fds again: one more client waits in the backlog
                    queued = ask(server.port)
                    if answered(queued, size, ANSWER_WAIT):
                        raise BenchError("a connection was answered while the server had no fd left")
                freed = served.pop(0)
                began = time.monotonic()
                freed.close()
                if not answered(queued, size, TIMEOUT):
                    raise BenchError(f"the queued connection was not answered within {TIMEOUT:g}s")
                recoveries.append(1000 * (time.monotonic() - began))
                served.append(queued)
    finally:
        for conn in served:
            conn.close()
    slowest = max(recoveries)
    progress(f"emfile: recovery median {statistics.median(recoveries):.1f} ms, max {slowest:.1f} ms")
    held = f"{len(served)} connections held at nofile={NOFILE} ({fds} fds open)"
    return [
        Figure(
            "emfile",
            "freed fd to the queued connection's answer",
            "<= 100 ms",
            f"{slowest:.1f} ms (max of {len(recoveries)})",
            slowest <= 100,
            [
                f"median {statistics.median(recoveries):.1f} ms; {held}; "
                + ("the server logged 'accept failed: Too many open files'" if logged else "NO EMFILE LINE")
            ],
        ),
        Figure(
            "emfile",
            "server CPU while out of fds",
            "no busy loop",
            f"{cpu:.1f}% of a core",
            cpu < 5,
            [f"over {sizes.idle_cpu_seconds:g}s from /proc/PID/stat, a connection waiting in the backlog"],
        ),
    ]


# --- the run --------------------------------------------------------------------------------------


def render(figures: Sequence[Figure]) -> str:
    lines = ["| part | figure | target | measured | met? |", "| --- | --- | --- | --- | --- |"]
    for f in figures:
        met = "-" if f.met is None else ("yes" if f.met else "no")
        lines.append(f"| {f.part} | {f.what} | {f.target} | {f.measured} | {met} |")
    for f in figures:
        lines += [f"- {f.part}, {f.what}: {note}" for note in f.notes]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--quick", action="store_true", help="tiny loads, to check that the script works")
    parser.add_argument("--workdir", type=Path, help="keep the manifests and server logs here")
    parser.add_argument("--wrk", default=shutil.which("wrk"), help="the wrk binary (reloads, kills, stops)")
    args = parser.parse_args(argv)
    parts = [p for p in args.only.split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"--only: unknown part(s) {', '.join(sorted(unknown))}; expected {', '.join(PARTS)}")
    sizes = QUICK if args.quick else FULL
    if args.wrk is None and {"reloads", "kills", "stops", "takeovers"} & set(parts):
        parser.error("reloads, kills, stops and takeovers need wrk: apt-get install wrk")
    figures: list[Figure] = []
    failed = False
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="faults-")))
        workdir.mkdir(parents=True, exist_ok=True)
        for part in parts:
            progress(f"{part} ...")
            try:
                if part == "fds":
                    figures += run_fds(sizes, workdir)
                elif part == "emfile":
                    figures += run_emfile(sizes, workdir)
                else:
                    run = {
                        "reloads": reloads_under_load,
                        "kills": kills_under_load,
                        "takeovers": takeovers_under_load,
                    }.get(part, stops_under_load)
                    figures += [run(sizes, workdir, args.wrk, close) for close in sizes.loads]
            except BenchError as exc:
                failed = True
                figures.append(Figure(part, "FAILED", "-", str(exc).replace("\n", " ")[:300], False))
    print(render(figures))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
