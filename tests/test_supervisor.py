"""The supervisor: zero-downtime reloads, restarts, start failures, notify, shutdown; and `reload`.

Every test runs the real command line (`serve` with workers or ``--supervise``)
in its own session, with handler modules written into ``tmp_path``, and
talks to it over real sockets.  The session's process group is killed when a
test ends, so no worker outlives it.  Each service binds port 0 and the test
reads the port back from its log (`helpers.Process.port`).

A handler (`helpers.HANDLER`) answers one request line ``TOKEN`` with
``TOKEN PID VERSION`` after 10 ms: the token shows the answer belongs to the
request, the PID which worker served it, the version which code it runs; the
delay keeps a connection in flight most of the time, so a generation that
stopped without draining would fail one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from functools import partial
from pathlib import Path

import pytest
from helpers import (
    HANDLER,
    RELOADS,
    TEXT_LINE,
    TIMEOUT,
    TRIO_ACTIVATE,
    Answer,
    ClientLoop,
    Process,
    app_manifest,
    ask,
    blocks,
    children_of,
    fake_service,
    ignores,
    is_gone,
    loopback,
    notify_socket,
    private_interpreter,
    receive_until,
    run_cli,
    running,
    wait_until,
    write_handler,
)

# Runs at start-up in every interpreter given this folder on PYTHONPATH.  The
# audit hook sees ``os.unsetenv("LISTEN_PID")``, which `take_listen_env` does
# right after reading the variables, and records what the process read then.
SITECUSTOMIZE = """\
import json
import os
import sys

_RECORD = os.environ.get("TEST_LISTEN_RECORD")


def _hook(event, args):
    if event == "os.unsetenv" and args and args[0] in (b"LISTEN_PID", "LISTEN_PID"):
        names = ("LISTEN_PID", "LISTEN_PIDFDID", "LISTEN_FDS", "LISTEN_FDNAMES")
        seen = {name: os.environ.get(name) for name in names}
        seen["pid"] = os.getpid()
        with open(_RECORD, "a") as file:
            file.write(json.dumps(seen) + "\\n")


if _RECORD:
    sys.addaudithook(_hook)
"""


# --- zero downtime -----------------------------------------------------------


@pytest.mark.slow
def test_twenty_sighup_reloads_fail_no_connection(tmp_path: Path) -> None:
    """Each reload's new generation answers, and not one connection of the steady stream fails."""
    write_handler(tmp_path, "v1")
    manifest = app_manifest(tmp_path)
    with running("--log-level", "debug", "serve", "--supervise", manifest, cwd=tmp_path) as service:
        port = service.port()
        service.wait_for(r"ready: generation 1, 1 worker")
        with ClientLoop(loopback(port)) as loop:
            loop.wait_for()
            for generation in range(2, 2 + RELOADS):
                since = service.mark()
                service.send_signal(signal.SIGHUP)
                service.wait_for(rf"reloaded: generation {generation} serving", since=since)
                new = service.workers_of(generation, since=since)
                assert len(new) == 1
                loop.wait_for(pids=new)
        assert loop.failures == []
        assert len({answer.pid for answer in loop.answers}) == 1 + RELOADS
        assert {answer.version for answer in loop.answers} == {"v1"}
        service.send_signal(signal.SIGTERM)
        assert service.wait() == 0


def test_restarting_a_plain_serve_fails_connections(tmp_path: Path) -> None:
    """The control experiment: the same client loop does see failures without a supervisor."""
    write_handler(tmp_path, "v1")
    manifest = app_manifest(tmp_path)
    with running("serve", manifest, cwd=tmp_path) as first:
        port = first.port()
        first.wait_for(r"ready: app serving web")
        with ClientLoop(loopback(port)) as loop:
            loop.wait_for(pids={first.pid})
            first.send_signal(signal.SIGTERM)
            assert first.wait() == 0
            # The same port (the clients keep connecting to it), free again: the first has exited.
            app_manifest(tmp_path, f"127.0.0.1:{port}")
            with running("serve", manifest, cwd=tmp_path) as second:
                second.wait_for(r"ready: app serving web")
                loop.wait_for(pids={second.pid})
                loop.stop()
                second.send_signal(signal.SIGTERM)
                assert second.wait() == 0
    # Between the two processes nothing listens: the kernel refuses.
    assert any("ConnectionRefusedError" in failure for failure in loop.failures), loop.failures[:5]


# --- failed reloads and starts -----------------------------------------------


def test_a_reload_with_a_syntax_error_keeps_the_old_generation_serving(tmp_path: Path) -> None:
    app = write_handler(tmp_path, "v1")
    manifest = app_manifest(tmp_path)
    with running("serve", "--supervise", manifest, cwd=tmp_path) as service:
        port = service.port()
        service.wait_for(r"ready: generation 1, 1 worker")
        with ClientLoop(loopback(port)) as loop:
            old = loop.wait_for()
            app.write_text(app.read_text() + "\ndef broken(:\n")
            since = service.mark()
            service.send_signal(signal.SIGHUP)
            failed = service.wait_for(r"error: reload failed: (.*)", since=since)
            assert "generation 2: worker" in failed[1]
            assert failed[0].endswith("generation 1 keeps serving")
            # The error itself is shown, naming the file and line.
            service.wait_for(r"cannot import 'app': .*app\.py, line \d+\)", since=since)
            after = loop.wait_for()
        assert loop.failures == []
        assert after == old
        assert {answer.pid for answer in loop.answers} == {old.pid}


def rewrite_keeping_size_and_mtime(path: Path, text: str) -> None:
    """Write `text` (as long as what is there) with the old file's mtime: what a .pyc checks."""
    before = path.stat()
    assert len(text.encode()) == before.st_size
    path.write_text(text)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_a_reload_runs_the_code_on_disk_even_when_a_cached_pyc_passes_for_it(tmp_path: Path) -> None:
    """Rule: the workers a reload starts compile handler modules from source.  A .pyc
    records its source's mtime in whole seconds and its size; new code of the same size
    written within the second passes that check (here: the same mtime, set on purpose)."""
    app = write_handler(tmp_path, "v1")
    manifest = app_manifest(tmp_path)
    # As in production: generation 1 caches app.py as a .pyc.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    with running("serve", "--supervise", manifest, cwd=tmp_path, env=env) as service:
        port = service.port()
        service.wait_for(r"ready: generation 1, 1 worker")
        first = ask(loopback(port), "first")
        assert first.version == "v1"
        assert list((tmp_path / "__pycache__").glob("app.*.pyc")), "generation 1 cached app.py"
        rewrite_keeping_size_and_mtime(app, HANDLER.format(version="v2"))
        since = service.mark()
        service.send_signal(signal.SIGHUP)
        service.wait_for(r"reloaded: generation 2 serving", since=since)
        # Generation 1 may still take a connection or two while it learns to stop.
        answers: list[Answer] = []

        def from_generation_2() -> bool:
            answers.append(ask(loopback(port), "again"))
            return answers[-1].pid != first.pid

        wait_until(from_generation_2, what="an answer from generation 2")
        assert answers[-1].version == "v2"


def test_workers_that_cannot_import_the_handler_stop_the_service_at_once_with_2_and_one_line(
    tmp_path: Path,
) -> None:
    """Status 2, a worker's configuration error: no second attempt (it would print the same line), and
    of the two workers, which both fail at once (they wait for each other), one tells why."""
    arrived = tmp_path / "arrived"
    arrived.mkdir()
    both_then_fail = textwrap.dedent(f"""\
        import os, pathlib, time
        folder = pathlib.Path({str(arrived)!r})
        (folder / str(os.getpid())).write_text("")
        deadline = time.monotonic() + 10
        while len(list(folder.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        raise RuntimeError("no database")
        """)
    write_handler(tmp_path, "v1", preamble=both_then_fail)
    manifest = app_manifest(tmp_path, workers=2)
    with running("--log-level", "debug", "serve", manifest, cwd=tmp_path) as service:
        # 2, the workers' own status for a handler that cannot be imported: the
        # units tell systemd not to restart on it (RestartPreventExitStatus=2).
        assert service.wait() == 2
        log = service.log
        workers = service.workers_of(1)
        assert len(workers) == 2
        assert all(is_gone(pid) for pid in workers)
    assert {int(path.name) for path in arrived.iterdir()} == workers
    assert service.workers_of(2) == set()
    # One error line in all: the worker's own, naming it.
    failed = re.findall(TEXT_LINE + r".*importing 'app' raised RuntimeError", log, re.M)
    failed = [pid for pid, level in failed if level == "error"]
    assert len(failed) == 1
    assert int(failed[0]) in workers
    assert service.count(r": error: ") == 1
    stopped = (
        r"generation 1: worker \d+ exited with status 2 before it was ready: a configuration error; stopping$"
    )
    assert service.count(stopped) == 1
    assert "retrying" not in log
    assert "ready: generation" not in log


@pytest.mark.slow
def test_a_worker_not_ready_within_start_timeout_counts_as_failed(tmp_path: Path) -> None:
    """The first attempt hangs at import; it fails by start-timeout, is killed, and the retry serves."""
    marker = tmp_path / "hung-once"
    hang_once = textwrap.dedent(f"""\
        import pathlib, time
        if not pathlib.Path({str(marker)!r}).exists():
            pathlib.Path({str(marker)!r}).write_text("")
            time.sleep(60)
        """)
    write_handler(tmp_path, "v1", preamble=hang_once)
    # A grace period longer than the test's every wait: the hung worker, which
    # served nothing, is killed without one (its SIGTERM would wait for its import).
    # A start-timeout the retry meets however loaded the machine.
    manifest = app_manifest(tmp_path, start_timeout=5.0, grace_period=60.0)
    started = time.monotonic()
    with running("--log-level", "debug", "serve", "--supervise", manifest, cwd=tmp_path) as service:
        port = service.port()
        service.wait_for(r"ready: generation 2, 1 worker")
        service.wait_for(r"generation 1: not ready within start-timeout \(5s\); retrying")
        (hung,) = service.workers_of(1)
        assert is_gone(hung)
        assert "did not stop in time" not in service.log
        (serving,) = service.workers_of(2)
        assert ask(loopback(port), "x") == Answer(serving, "v1")
        service.send_signal(signal.SIGTERM)
        assert service.wait() == 0
    assert time.monotonic() - started >= 5.0


def test_sighup_during_the_first_start_reloads_after_it(tmp_path: Path) -> None:
    """A SIGHUP that arrives while the first generation starts is a reload once it is ready.

    The first worker to import the handler is slow, so a reload started at
    the same time would be ready first: the reload must wait until generation
    1 is ready, then replace it, and one generation serves in the end, the
    last one.
    """
    marker = tmp_path / "slow-once"
    slow_once = textwrap.dedent(f"""\
        import pathlib, time
        if not pathlib.Path({str(marker)!r}).exists():
            pathlib.Path({str(marker)!r}).write_text("")
            time.sleep(1.5)
        """)
    write_handler(tmp_path, "v1", preamble=slow_once)
    manifest = app_manifest(tmp_path)
    with running("--log-level", "debug", "serve", "--supervise", manifest, cwd=tmp_path) as service:
        port = service.port()
        wait_until(lambda: blocks(service.pid, signal.SIGHUP), what="SIGHUP held until handled")
        service.send_signal(signal.SIGHUP)
        service.wait_for(r"reloaded: generation 2 serving")
        (first,) = service.workers_of(1)
        (serving,) = service.workers_of(2)
        lines = service.lines
        order = [
            next(n for n, line in enumerate(lines) if re.search(pattern, line))
            for pattern in (
                rf"worker {first} ready$",
                r"ready: generation 1, 1 worker",
                r"reload \(SIGHUP\): starting generation 2",
                rf"generation 2: started worker {serving}$",
            )
        ]
        assert order == sorted(order), "generation 1 was ready before the reload began"
        wait_until(lambda: children_of(service.pid) == {serving}, what=f"only {serving} runs")
        time.sleep(0.5)
        assert children_of(service.pid) == {serving}
        assert ask(loopback(port), "x").pid == serving
        service.send_signal(signal.SIGTERM)
        assert service.wait() == 0


def test_sigterm_while_the_first_generation_hangs_at_start_stops_it_at_once_and_never_retries(
    tmp_path: Path,
) -> None:
    write_handler(tmp_path, "v1", preamble="import time\ntime.sleep(60)\n")
    manifest = app_manifest(tmp_path, start_timeout=60.0, grace_period=60.0)
    with running("--log-level", "debug", "serve", "--supervise", manifest, cwd=tmp_path) as service:
        service.wait_for(r"generation 1: started worker")
        (hung,) = service.workers_of(1)
        service.send_signal(signal.SIGTERM)
        assert service.wait() == 0
        assert is_gone(hung)
    assert "retrying" not in service.log


# --- workers -----------------------------------------------------------------


@pytest.mark.slow
def test_a_killed_worker_is_restarted_and_the_supervisor_leaks_no_fd(tmp_path: Path) -> None:
    """50 restarts after ``kill -9`` (5 rounds of 10); the supervisor's fd count stays the same.

    A kill from outside is no crash of the worker's code: each restart comes after
    0.1 s, however soon after its start the worker was killed (a growing back-off
    would leave the socket with fewer workers, at times none, while kills go on)."""
    write_handler(tmp_path, "v1")
    manifest = app_manifest(tmp_path, workers=10)
    with running("--log-level", "debug", "serve", manifest, cwd=tmp_path) as service:
        port = service.port()
        service.wait_for(r"ready: generation 1, 10 worker")
        before = _open_fds(service.pid)
        workers = service.workers_of(1)
        restarts = 0
        counts = []
        while restarts < 50:
            since = service.mark()
            for pid in workers:
                os.kill(pid, signal.SIGKILL)
            replaced = set()
            for pid in workers:
                found = service.wait_for(rf"worker (\d+) replaced worker {pid}$", since=since)
                replaced.add(int(found[1]))
            assert replaced.isdisjoint(workers)
            assert all(is_gone(pid) for pid in workers)
            workers = replaced
            restarts += len(replaced)
            counts.append(len(_open_fds(service.pid)))
        wait_until(lambda: children_of(service.pid) == workers, what="only the replacements run")
        after = _open_fds(service.pid)
        assert counts == [len(before)] * len(counts), (before, after)
        assert sorted(after.values()) == sorted(before.values())
        answered = {ask(loopback(port), f"q{n}").pid for n in range(50)}
        assert answered <= workers
        service.send_signal(signal.SIGTERM)
        assert service.wait() == 0
    assert service.count(r"died with status SIGKILL after [\d.]+s serving; restarting in 0\.1s$") == 50


def test_a_worker_stopped_from_outside_is_restarted_at_once_every_time(tmp_path: Path) -> None:
    """``kill -TERM`` to a serving worker, 5 times in a row: each replacement comes after 0.1 s.

    The worker drains and exits 0 after its own ``STOPPING=1``: an operator's stop,
    no crash of its code, so its slot must not back off (with the back-off, the
    fifth restart would wait 1.6 s and the socket would have one worker fewer)."""
    write_handler(tmp_path, "v1")
    manifest = app_manifest(tmp_path, workers=2)
    with running("--log-level", "debug", "serve", manifest, cwd=tmp_path) as service:
        port = service.port()
        service.wait_for(r"ready: generation 1, 2 worker")
        workers = service.workers_of(1)
        for _ in range(5):
            victim = min(workers)
            since = service.mark()
            os.kill(victim, signal.SIGTERM)
            found = service.wait_for(rf"worker (\d+) replaced worker {victim}$", since=since)
            assert is_gone(victim)
            workers = (workers - {victim}) | {int(found[1])}
        wait_until(lambda: children_of(service.pid) == workers, what="only the replacements run")
        assert {ask(loopback(port), f"q{n}").pid for n in range(20)} <= workers
        service.send_signal(signal.SIGTERM)
        assert service.wait() == 0
    restarted = r"stopped after [\d.]+s serving, not asked by the supervisor; restarting in 0\.1s$"
    assert service.count(restarted) == 5
    assert service.count(r"died with status") == 0


def _open_fds(pid: int) -> dict[int, str]:
    """Each open fd of `pid` and what it is, e.g. ``socket``, ``anon_inode:[pidfd]``, ``/dev/null``."""
    fds = {}
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with suppress(FileNotFoundError):
            fds[int(fd.name)] = re.sub(r":\[\d+\]$", "", os.readlink(fd))
    return fds


def test_two_workers_both_serve_each_with_listen_pid_its_own(tmp_path: Path) -> None:
    """Both workers accept; each read LISTEN_PID (and LISTEN_PIDFDID where there are any) naming itself."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    record = tmp_path / "listen.jsonl"
    env = {**os.environ, "PYTHONPATH": str(hooks), "TEST_LISTEN_RECORD": str(record)}
    write_handler(tmp_path, "v1")
    manifest = app_manifest(tmp_path, workers=2)
    with running("--log-level", "debug", "serve", manifest, cwd=tmp_path, env=env) as service:
        port = service.port()
        service.wait_for(r"ready: generation 1, 2 worker")
        workers = service.workers_of(1)
        assert len(workers) == 2
        answered: set[int] = set()
        deadline = time.monotonic() + 10
        for number in range(2000):
            answered.add(ask(loopback(port), f"q{number}").pid)
            if answered == workers or time.monotonic() > deadline:
                break
        assert answered == workers
        pidfd_ids = {pid: _pidfd_id(pid) for pid in workers}
        service.send_signal(signal.SIGTERM)
        assert service.wait() == 0
    seen = {entry["pid"]: entry for entry in map(json.loads, record.read_text().splitlines())}
    for pid in workers:
        assert seen[pid]["LISTEN_PID"] == str(pid)
        assert seen[pid]["LISTEN_FDS"] == "1"
        assert seen[pid]["LISTEN_FDNAMES"] == "web"
        if pidfd_ids[pid] is not None:
            assert seen[pid]["LISTEN_PIDFDID"] == str(pidfd_ids[pid])


def _pidfd_id(pid: int) -> int | None:
    """The pidfd id of another process (its pidfs inode, Linux 6.9+), or None where there is none."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None
    try:
        return os.fstat(pidfd).st_ino if _has_pidfs() else None
    finally:
        os.close(pidfd)


def _has_pidfs() -> bool:
    from trio_activate.system.fds import own_pidfd_id

    return own_pidfd_id() is not None


# --- notify ------------------------------------------------------------------


def test_notify_reloading_then_ready_on_a_real_notify_socket(short_dir: Path, tmp_path: Path) -> None:
    write_handler(tmp_path, "v1")
    manifest = app_manifest(tmp_path)
    with notify_socket(short_dir / "notify") as manager:
        env = {**os.environ, "NOTIFY_SOCKET": str(short_dir / "notify")}
        with running("serve", "--supervise", manifest, cwd=tmp_path, env=env) as service:
            ((sender, ready),) = receive_until(manager, "READY")
            assert sender == service.pid
            assert ready["READY"] == "1"
            assert ready["STATUS"].startswith("Generation 1: 1 worker(s)")

            before = time.monotonic_ns() // 1000
            service.send_signal(signal.SIGHUP)
            reloading = receive_until(manager, "RELOADING")
            after = time.monotonic_ns() // 1000
            assert before <= int(reloading[-1][1]["MONOTONIC_USEC"]) <= after
            ready_again = receive_until(manager, "READY")
            assert ready_again[-1][1]["READY"] == "1"
            assert ready_again[-1][1]["STATUS"].startswith("Generation 2:")

            service.send_signal(signal.SIGTERM)
            stopping = receive_until(manager, "STOPPING")
            assert service.wait() == 0
        messages = [*reloading, *ready_again, *stopping]
        # Only the supervisor speaks to the manager: workers have their own NOTIFY_SOCKET.
        assert {pid for pid, _ in messages} == {service.pid}


def test_notify_a_failed_reload_ends_with_ready_and_the_reason(short_dir: Path, tmp_path: Path) -> None:
    """systemd waits for READY=1 after RELOADING=1 even when the reload failed."""
    app = write_handler(tmp_path, "v1")
    manifest = app_manifest(tmp_path)
    with notify_socket(short_dir / "notify") as manager:
        env = {**os.environ, "NOTIFY_SOCKET": str(short_dir / "notify")}
        with running("serve", "--supervise", manifest, cwd=tmp_path, env=env) as service:
            receive_until(manager, "READY")
            app.write_text("def broken(:\n")
            service.send_signal(signal.SIGHUP)
            receive_until(manager, "RELOADING")
            ((_, ready),) = receive_until(manager, "READY")
            assert ready["STATUS"].startswith("Reload failed: generation 2: worker")
            assert ready["STATUS"].endswith("still serving generation 1")


def test_the_supervisor_pings_the_watchdog(short_dir: Path, tmp_path: Path) -> None:
    """With WatchdogSec= the service manager kills a service that stops pinging: the supervisor pings."""
    write_handler(tmp_path, "v1")
    manifest = app_manifest(tmp_path)
    with notify_socket(short_dir / "notify") as manager:
        env = {**os.environ, "NOTIFY_SOCKET": str(short_dir / "notify"), "WATCHDOG_USEC": "400000"}
        with running("serve", "--supervise", manifest, cwd=tmp_path, env=env) as service:
            receive_until(manager, "READY")
            pings = [receive_until(manager, "WATCHDOG")[-1] for _ in range(3)]
            assert {pid for pid, _ in pings} == {service.pid}


# --- shutdown and `reload` ---------------------------------------------------


def test_sigterm_drains_every_generation_and_exits_0(tmp_path: Path) -> None:
    """A connection in flight in the old, draining generation and one in the new both finish."""
    write_handler(tmp_path, "v1")
    manifest = app_manifest(tmp_path, workers=2, grace_period=20.0)
    with (
        running("--log-level", "debug", "serve", manifest, cwd=tmp_path) as service,
        ExitStack() as connections,
    ):
        port = service.port()
        service.wait_for(r"ready: generation 1, 2 worker")
        first = service.workers_of(1)
        old = connections.enter_context(_connect_and_wait_for_accept(port, first))
        since = service.mark()
        service.send_signal(signal.SIGHUP)
        service.wait_for(r"reloaded: generation 2 serving", since=since)
        second = service.workers_of(2)
        # Generation 1 stops accepting (one of its workers drains the connection), then:
        wait_until(
            lambda: service.count(r"info: stopping: no longer accepting", since=since) == 2,
            what="generation 1 stopped accepting",
        )
        new = connections.enter_context(_connect_and_wait_for_accept(port, second))
        since = service.mark()
        service.send_signal(signal.SIGTERM)
        service.wait_for(r"stopping: \d worker\(s\) drain within 20s", since=since)
        time.sleep(0.3)
        assert service.process.poll() is None  # both connections hold their generation open
        replies = []
        for sock, token in ((old, "old"), (new, "new")):
            sock.sendall(token.encode() + b"\n")
            replies.append(sock.recv(1024).split())
        assert [reply[0] for reply in replies] == [b"old", b"new"]
        assert int(replies[0][1]) in first
        assert int(replies[1][1]) in second
        assert service.wait() == 0
    assert all(is_gone(pid) for pid in first | second)
    assert "killing" not in service.log


def _sockets_of(pid: int) -> int:
    fds = Path(f"/proc/{pid}/fd")
    return sum(1 for fd in fds.iterdir() if os.readlink(fd).startswith("socket:"))


@contextmanager
def _connect_and_wait_for_accept(port: int, workers: set[int]) -> Iterator[socket.socket]:
    """A connection that one of `workers` has accepted (it holds one more socket than before)."""
    before = {pid: _sockets_of(pid) for pid in workers}
    with socket.create_connection(loopback(port), timeout=TIMEOUT) as sock:
        wait_until(
            lambda: any(_sockets_of(pid) > count for pid, count in before.items()),
            what=f"one of {workers} accepted",
        )
        yield sock


def test_as_pid_1_a_reload_keeps_pid_1_and_the_service(tmp_path: Path) -> None:
    """A container's init: handing over would exit PID 1 and end the namespace, so it supervises."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs unshare and root for a PID namespace")
    write_handler(tmp_path, "v1")
    manifest = app_manifest(tmp_path)
    command = ["unshare", "--pid", "--fork", "--mount-proc", *TRIO_ACTIVATE]
    with running("serve", manifest, cwd=tmp_path, command=command) as service:
        port = service.port()
        service.wait_for(r"ready: generation 1, 1 worker")
        (pid_1,) = children_of(service.pid)
        first = ask(loopback(port), "first")
        write_handler(tmp_path, "v2")
        os.kill(pid_1, signal.SIGHUP)
        service.wait_for(r"reloaded: generation 2 serving")
        assert children_of(service.pid) == {pid_1}, "PID 1 is still the same process"
        assert first.version == "v1"
        # Generation 1 may still take a connection or two while it learns to stop.
        wait_until(lambda: ask(loopback(port), "again").version == "v2", what="an answer from v2")
        os.kill(pid_1, signal.SIGTERM)
        assert service.wait() == 0


def test_reload_pid_and_reload_pidfile_send_sighup(tmp_path: Path) -> None:
    write_handler(tmp_path, "v1")
    manifest = app_manifest(tmp_path)
    with running("serve", "--supervise", manifest, cwd=tmp_path) as service:
        service.wait_for(r"ready: generation 1, 1 worker")
        pidfile = tmp_path / "app.pid"
        pidfile.write_text(f"{service.pid}\n")
        for target, generation in ((str(service.pid), 2), (str(pidfile), 3)):
            since = service.mark()
            result = run_cli("reload", target)
            assert result.returncode == 0, result.stderr
            assert result.stderr == f"sent SIGHUP to {service.pid}\n"
            service.wait_for(rf"reload \(SIGHUP\): starting generation {generation}", since=since)
            service.wait_for(rf"reloaded: generation {generation} serving", since=since)
        service.send_signal(signal.SIGTERM)
        assert service.wait() == 0


def test_reload_wait_returns_once_the_new_code_serves_and_fails_when_it_cannot_start(tmp_path: Path) -> None:
    """systemd 252's ExecReload=: `reload --wait` tells the outcome by its exit status."""
    app = write_handler(tmp_path, "v1")
    manifest = app_manifest(tmp_path)
    with running("serve", "--supervise", manifest, cwd=tmp_path) as service:
        port = service.port()
        service.wait_for(r"ready: generation 1, 1 worker")
        app = write_handler(tmp_path, "v2")
        result = run_cli("reload", "--wait", str(service.pid))
        assert result.returncode == 0, result.stderr
        reloaded = rf"reloaded PID {service.pid}: Generation 2: 1 worker\(s\) \(\d+\)"
        assert re.fullmatch(rf"sent SIGHUP to {service.pid}\n{reloaded}\n", result.stderr)
        # Returned once generation 2 serves and generation 1 takes no new connection:
        # every connection from now on reaches the new code.
        assert [ask(loopback(port), f"n{n}").version for n in range(5)] == ["v2"] * 5

        app.write_text(app.read_text() + "\ndef broken(:\n")
        result = run_cli("reload", "--wait", str(service.pid))
        assert result.returncode == 1
        last = result.stderr.splitlines()[-1]
        assert last.startswith(
            f"trio-activate: reload of PID {service.pid} failed: Reload failed: generation 3"
        )
        assert last.endswith("still serving generation 2")
        assert ask(loopback(port), "still").version == "v2"
        service.send_signal(signal.SIGTERM)
        assert service.wait() == 0


def test_reload_wait_on_a_single_process_serve_tells_the_hand_over(tmp_path: Path) -> None:
    write_handler(tmp_path, "v1")
    manifest = app_manifest(tmp_path)
    with running("serve", manifest, cwd=tmp_path) as service:
        port = service.port()
        service.wait_for(r"ready: ")
        result = run_cli("reload", "--wait", str(service.pid))
        assert result.returncode == 0, result.stderr
        successor = int(
            re.fullmatch(
                rf"sent SIGHUP to {service.pid}\nreloaded PID {service.pid}: "
                r"handed over to process (\d+)\n",
                result.stderr,
            )[1]
        )  # type: ignore[index]
        assert ask(loopback(port), "next").pid == successor
        # The process, not the log: the successor holds the same stderr open.
        assert service.process.wait(timeout=TIMEOUT) == 0, "the predecessor drains and exits"
        os.kill(successor, signal.SIGTERM)


def test_reload_wait_for_a_process_that_exits_or_never_answers_is_one_line_exit_1(tmp_path: Path) -> None:
    # Stand-ins for a service (their command line says trio-activate serve): one dies of
    # SIGHUP, the other ignores it and never answers.
    for on_hup, timeout, message in (
        ("die", "30", "exited before its reload ended"),
        ("ignore", "0.5", "did not tell how its reload ended within 0.5s"),
    ):
        with subprocess.Popen(fake_service(tmp_path, on_hup=on_hup), start_new_session=True) as target:
            try:
                pid, ignoring = target.pid, on_hup == "ignore"

                def runs() -> bool:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_text()  # noqa: B023
                    return "fake.toml" in cmdline and ignores(pid, signal.SIGHUP) == ignoring  # noqa: B023

                wait_until(runs, what="the stand-in runs")
                result = run_cli("reload", "--wait", "--timeout", timeout, str(target.pid))
            finally:
                os.killpg(target.pid, signal.SIGKILL)
        assert result.returncode == 1
        assert result.stderr.splitlines()[-1] == f"trio-activate: reload: PID {target.pid} {message}"


@pytest.mark.parametrize("wait", [[], ["--wait"]])
def test_reload_of_a_pid_that_names_no_process_is_one_line_and_exit_2(wait: list[str]) -> None:
    # Above the kernel's largest pid_max (2**22): never a process.
    result = run_cli("reload", *wait, "4194305")
    assert (result.returncode, result.stderr) == (
        2,
        "trio-activate: PID 4194305: no such process; nothing done\n",
    )


def test_reload_wait_stopped_by_sigterm_exits_0_as_systemd_stops_a_reload_for_a_stop_job(
    tmp_path: Path,
) -> None:
    """systemd counts a control process killed by SIGTERM as the unit's failure (Result=signal)."""
    with subprocess.Popen(fake_service(tmp_path, on_hup="ignore"), start_new_session=True) as target:
        try:
            wait_until(lambda: ignores(target.pid, signal.SIGHUP), what="the stand-in ignores SIGHUP")
            waiter = subprocess.Popen(
                [*TRIO_ACTIVATE, "reload", "--wait", str(target.pid)],
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
            with waiter:
                assert waiter.stderr is not None
                assert waiter.stderr.readline() == f"sent SIGHUP to {target.pid}\n"
                waiter.send_signal(signal.SIGTERM)
                assert waiter.wait(timeout=TIMEOUT) == 0
                rest = waiter.stderr.read()
            assert rest == f"trio-activate: reload of PID {target.pid}: no longer waiting (SIGTERM)\n"
        finally:
            os.killpg(target.pid, signal.SIGKILL)


SILENT_CONTROL = """\
import os, socket, sys, time
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(b"\\0trio-activate/control/%d" % os.getpid())
server.listen()
print("listening", flush=True)
connection, _ = server.accept()
print(connection.recv(4096).decode().strip(), flush=True)
time.sleep(30)
"""


def test_reload_wait_over_the_control_socket_stopped_by_sigterm_exits_0_too(tmp_path: Path) -> None:
    """Under systemd every unit's service has a control socket: ExecReload= waits on it, and a stop
    job's SIGTERM must end the wait as it ends the wait for SIGHUP's outcome (not as Result=signal)."""
    script = tmp_path / "bin" / "trio-activate"
    script.parent.mkdir()
    script.write_text(f"#!{sys.executable}\n{SILENT_CONTROL}")
    script.chmod(0o755)
    command = [str(script), "serve", "fake.toml"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, start_new_session=True) as target:
        try:
            assert target.stdout is not None
            assert target.stdout.readline() == "listening\n"
            waiter = subprocess.Popen(
                [*TRIO_ACTIVATE, "reload", "--wait", str(target.pid)],
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
            with waiter:
                assert target.stdout.readline() == '{"op": "reload"}\n', "it asks the control socket"
                waiter.send_signal(signal.SIGTERM)
                assert waiter.wait(timeout=TIMEOUT) == 0
                assert waiter.stderr is not None
                rest = waiter.stderr.read()
            assert rest == f"trio-activate: reload of PID {target.pid}: no longer waiting (SIGTERM)\n"
        finally:
            os.killpg(target.pid, signal.SIGKILL)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, r"app\.pid: cannot read: No such file or directory"),
        ("", r"app\.pid: '' is not a PID"),
        ("12ab\n", r"app\.pid: '12ab' is not a PID"),
        ("-5\n", r"app\.pid: '-5' is not a PID"),
        ("0\n", r"app\.pid: '0' is not a PID"),
        ("99999999999999999999999\n", r"app\.pid: '99999999999999999999999' is not a PID"),
        ("9" * 5000, rf"app\.pid: '{'9' * 40}' is not a PID"),
        ("4194305\n", r"PID 4194305: no such process; nothing done"),
    ],
)
def test_reload_with_a_bad_pidfile_is_one_line_and_exit_2(
    tmp_path: Path, content: str | None, message: str
) -> None:
    pidfile = tmp_path / "app.pid"
    if content is not None:
        pidfile.write_text(content)
    result = run_cli("reload", str(pidfile))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert re.fullmatch(rf"trio-activate: .*{message}\n", result.stderr)


@pytest.mark.parametrize("target", ["0", "99999999999999999999999"])
def test_reload_with_an_impossible_pid_is_one_line_and_exit_2(target: str) -> None:
    result = run_cli("reload", target)
    assert result.returncode == 2
    assert result.stderr == f"trio-activate: {target!r} is not a PID\n"


# --- production hardening: spawn failures, crash loops, stuck workers, parent death ---


def test_a_spawn_that_fails_is_one_error_line_the_service_serves_on_and_retries(tmp_path: Path) -> None:
    """The interpreter removed: a reload fails in one line and generation 1 serves on; a killed
    worker's restart backs off and retries until it can spawn; signals keep working."""
    python = private_interpreter(tmp_path)
    write_handler(tmp_path, "v1")
    manifest = app_manifest(tmp_path, workers=2)
    command = [str(python), "-m", "trio_activate"]
    with running("--log-level", "debug", "serve", manifest, cwd=tmp_path, command=command) as service:
        port = service.port()
        service.wait_for(r"ready: generation 1, 2 worker")
        first = service.workers_of(1)
        python.unlink()
        since = service.mark()
        service.send_signal(signal.SIGHUP)
        service.wait_for(
            r"error: reload failed: generation 2: cannot start a worker: .*No such file or directory.*; "
            r"generation 1 keeps serving",
            since=since,
        )
        assert service.count(r"error: ", since=since) == 1
        assert ask(loopback(port), "still").pid in first

        killed = min(first)
        since = service.mark()
        os.kill(killed, signal.SIGKILL)
        retry = rf"cannot start a worker: .* \(to replace worker {killed}\); retrying in"
        service.wait_for(rf"{retry} 0\.2s", since=since)
        service.wait_for(rf"{retry} 0\.4s", since=since)
        python.symlink_to(sys.executable)
        replacement = int(service.wait_for(rf"worker (\d+) replaced worker {killed}$", since=since)[1])

        since = service.mark()
        service.send_signal(signal.SIGHUP)
        service.wait_for(r"reloaded: generation 3 serving", since=since)
        third = service.workers_of(3)
        service.send_signal(signal.SIGTERM)
        assert service.wait() == 0
    assert all(is_gone(pid) for pid in first | third | {replacement})


def test_a_restart_under_way_when_a_reload_takes_over_adds_no_worker_to_the_old_generation(
    tmp_path: Path,
) -> None:
    """A worker's replacement, spawned while a reload took over, would join the old generation
    after its workers were collected for stopping, and serve the old code beside the new.
    Deterministic: the replacement's spawn is held until the reload has taken over."""
    import trio
    import trio.testing

    from trio_activate.processes import supervisor as supervisor_module
    from trio_activate.processes.spawn import ProcessSpawner, WorkerCommand, worker_argv

    write_handler(tmp_path, "v1")
    manifest = app_manifest(tmp_path)
    held: list[int] = []

    async def main(listener: socket.socket) -> None:
        holding, release = trio.Event(), trio.Event()
        hold_next = [False]

        class SlowSpawner(ProcessSpawner):
            async def spawn(self, *args: object, **kwargs: object) -> trio.Process:
                process = await super().spawn(*args, **kwargs)  # type: ignore[arg-type]
                if hold_next[0]:
                    hold_next[0] = False
                    held.append(process.pid)
                    holding.set()
                    await release.wait()
                return process

        command = WorkerCommand(worker_argv(str(manifest), "info"), [(listener.fileno(), "web")])
        supervisor = supervisor_module.Supervisor(
            command,
            workers=1,
            grace_period=5.0,
            start_timeout=TIMEOUT,
            spawner=SlowSpawner(command, os.environ),
        )
        async with trio.open_nursery() as nursery:
            try:
                with trio.fail_after(TIMEOUT):
                    await nursery.start(partial(supervisor.run, handle_signals=False))
                    assert supervisor.current is not None
                    (old,) = supervisor.current.workers
                    hold_next[0] = True
                    os.kill(old.pid, signal.SIGKILL)
                    await holding.wait()
                    assert await supervisor.reload("test")
                    new = {w.pid for w in supervisor.current.workers}
                    # The old generation's stop has collected its workers (none live) and ended.
                    await trio.testing.wait_all_tasks_blocked()
                    release.set()
                    for _ in range(round(TIMEOUT / 0.02)):
                        if is_gone(held[0]):
                            break
                        await trio.sleep(0.02)
                    assert children_of(os.getpid()) == new
                    supervisor.stop()
            except BaseException:
                # The supervisor reaps every worker before it returns: end them first.
                for pid in children_of(os.getpid()):
                    os.kill(pid, signal.SIGKILL)
                raise

    with socket.create_server(loopback(0)) as listener:
        trio.run(main, listener)


def test_sighups_during_a_reload_fold_into_one_reload_after_it(tmp_path: Path) -> None:
    """100 SIGHUPs while generation 2 starts: one more reload follows (generation 3), not 100;
    ``reload --wait`` afterwards is answered by the reload it asked for (generation 4)."""
    hold = tmp_path / "hold"
    wait_for_release = textwrap.dedent(f"""\
        import os, time
        _deadline = time.monotonic() + 20
        while os.path.exists({str(hold)!r}) and time.monotonic() < _deadline:
            time.sleep(0.02)
        """)
    write_handler(tmp_path, "v1", preamble=wait_for_release)
    manifest = app_manifest(tmp_path)
    with running("--log-level", "debug", "serve", "--supervise", manifest, cwd=tmp_path) as service:
        service.wait_for(r"ready: generation 1, 1 worker")
        hold.write_text("")
        service.send_signal(signal.SIGHUP)
        service.wait_for(r"reload \(SIGHUP\): starting generation 2")
        asked = r"reload \(SIGHUP\): (follows the one under way|folded into the reload that follows)"
        for number in range(1, 101):
            service.send_signal(signal.SIGHUP)
            wait_until(partial(_counts, service, asked, number), what=f"SIGHUP {number} handled")
        hold.unlink()
        service.wait_for(r"reloaded: generation 3 serving")
        result = run_cli("reload", "--wait", str(service.pid))
        assert result.returncode == 0, result.stderr
        assert result.stderr.splitlines()[-1].startswith(f"reloaded PID {service.pid}: Generation 4:")
        assert service.count(r"starting generation") == 3
        service.send_signal(signal.SIGTERM)
        assert service.wait() == 0


def _counts(service: Process, pattern: str, number: int) -> bool:
    return service.count(pattern) == number


CRASHING_HANDLER = """\
import os


async def handle(stream):
    request = await stream.receive_some(1024)
    if request == b"die\\n":
        os._exit(3)
    await stream.send_all(request)
"""


def test_a_crash_loop_backs_off_and_each_failed_start_is_logged(tmp_path: Path) -> None:
    """A worker that dies soon after it was ready doubles its slot's back-off, a failed start too."""
    app = tmp_path / "app.py"
    app.write_text(CRASHING_HANDLER)
    manifest = app_manifest(tmp_path)

    def die() -> None:
        with socket.create_connection(loopback(port), timeout=TIMEOUT) as sock:
            sock.sendall(b"die\n")
            assert sock.recv(100) == b""

    with running("--log-level", "debug", "serve", "--supervise", manifest, cwd=tmp_path) as service:
        port = service.port()
        service.wait_for(r"ready: generation 1, 1 worker")
        (worker,) = service.workers_of(1)
        since = service.mark()
        die()
        service.wait_for(
            rf"worker {worker} \(generation 1\) died with status 3 after .*; restarting in 0\.1s"
        )
        worker = int(service.wait_for(rf"worker (\d+) replaced worker {worker}$", since=since)[1])

        app.write_text(CRASHING_HANDLER + "\ndef broken(:\n")
        since = service.mark()
        die()
        service.wait_for(
            rf"worker {worker} \(generation 1\) died with status 3 after .*; restarting in 0\.2s"
        )
        failed = r"worker \d+ \(generation 1\) exited with status 2 before it was ready; retrying in"
        service.wait_for(rf"error: {failed} 0\.4s", since=since)
        service.wait_for(rf"error: {failed} 0\.8s", since=since)
        app.write_text(CRASHING_HANDLER)
        service.wait_for(r"worker (\d+) replaced worker \d+$", since=since)
        assert ask_echo(port, b"alive\n") == b"alive\n"
        service.send_signal(signal.SIGTERM)
        assert service.wait() == 0


def ask_echo(port: int, data: bytes) -> bytes:
    with socket.create_connection(loopback(port), timeout=TIMEOUT) as sock:
        sock.sendall(data)
        return sock.recv(100)


def test_a_stuck_worker_is_killed_after_worker_timeout_and_replaced(short_dir: Path, tmp_path: Path) -> None:
    """SIGSTOP stops a worker's loop: it is killed (one error line) and its slot restarts.  The
    other worker serves meanwhile, so the service manager's watchdog keeps being pinged."""
    write_handler(tmp_path, "v1")
    manifest = app_manifest(tmp_path, workers=2, worker_timeout=1.0)
    with notify_socket(short_dir / "notify") as manager:
        env = {**os.environ, "NOTIFY_SOCKET": str(short_dir / "notify"), "WATCHDOG_USEC": "400000"}
        with running("--log-level", "debug", "serve", manifest, cwd=tmp_path, env=env) as service:
            port = service.port()
            service.wait_for(r"ready: generation 1, 2 worker")
            stuck, other = sorted(service.workers_of(1))
            since = service.mark()
            os.kill(stuck, signal.SIGSTOP)
            service.wait_for(
                rf"error: worker {stuck} \(generation 1\) has not pinged for [\d.]+s, over worker-timeout "
                r"\(1s\): its event loop is stuck; killing it",
                since=since,
            )
            replacement = int(service.wait_for(rf"worker (\d+) replaced worker {stuck}$", since=since)[1])
            assert is_gone(stuck)
            assert service.count(r"error: ", since=since) == 1
            assert "no more watchdog pings" not in service.log
            assert {ask(loopback(port), f"q{n}").pid for n in range(20)} <= {other, replacement}
            manager.settimeout(0)
            with suppress(BlockingIOError):
                while True:
                    manager.recv(4096)
            manager.settimeout(TIMEOUT)
            assert receive_until(manager, "WATCHDOG")[-1][0] == service.pid
            service.send_signal(signal.SIGTERM)
            assert service.wait() == 0


def test_workers_stop_when_their_supervisor_is_killed_and_release_the_port(tmp_path: Path) -> None:
    write_handler(tmp_path, "v1")
    manifest = app_manifest(tmp_path, workers=2)
    with running("--log-level", "debug", "serve", manifest, cwd=tmp_path) as service:
        port = service.port()
        service.wait_for(r"ready: generation 1, 2 worker")
        workers = service.workers_of(1)
        os.kill(service.pid, signal.SIGKILL)
        wait_until(lambda: all(is_gone(pid) for pid in workers), what="the workers stopped")
        assert service.count(rf"the supervisor \(PID {service.pid}\) exited; stopping gracefully") == 2
    app_manifest(tmp_path, f"127.0.0.1:{port}", workers=2)  # the port the workers released
    with running("--log-level", "debug", "serve", manifest, cwd=tmp_path) as again:
        again.wait_for(r"ready: generation 1, 2 worker")
        assert ask(loopback(port), "again").pid in again.workers_of(1)
        again.send_signal(signal.SIGTERM)
        assert again.wait() == 0


NOBODY = 65534


def as_nobody_with_nproc(stage: Path, limit: int, needed: Sequence[Path]) -> list[str]:
    """A command prefix that runs as ``nobody`` with ``RLIMIT_NPROC`` at `limit` (root ignores it).

    Where a folder above one of the `needed` paths is closed to others (a Python
    under ``/root/.pyenv``, ``/root`` being 0700), it runs in a mount namespace of
    its own with that folder covered by an open tmpfs and the needed paths bound
    back onto it, so ``nobody`` reaches exactly those, as root does.
    """
    if os.geteuid() != 0 or not all(shutil.which(tool) for tool in ("setpriv", "prlimit", "unshare")):
        pytest.skip("needs root and util-linux's setpriv, prlimit and unshare")
    binds, covers = [], {}
    for number, path in enumerate(p.resolve() for p in needed):
        closed = [a for a in reversed(path.parents) if a != Path("/") and not a.stat().st_mode & 0o001]
        if closed:
            covers[closed[0]] = None
            binds.append((path, stage / f"bind{number}"))
    script = ["set -e"]
    script += [f"mkdir -p '{staged}'; mount --bind '{path}' '{staged}'" for path, staged in binds]
    script += [f"mount -t tmpfs -o mode=0755 tmpfs '{cover}'" for cover in covers]
    script += [f"mkdir -p '{path}'; mount --move '{staged}' '{path}'" for path, staged in binds]
    script.append('exec "$@"')
    setpriv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    limited = [*setpriv, "prlimit", f"--nproc={limit}:{limit}", sys.executable, "-m", "trio_activate"]
    if not binds:
        return limited
    return ["unshare", "--mount", "--", "sh", "-c", "\n".join(script), "sh", *limited]


def test_under_rlimit_nproc_a_reload_fails_in_one_line_a_restart_waits_for_a_process_and_sigterm_stops_all(
    short_dir: Path,
) -> None:
    """``prlimit --nproc=4:4`` as nobody: the supervisor, the thread it forks from and two workers
    use the 4 processes.  A reload cannot fork: one error line, generation 1 serves on.  A killed
    worker's restart waits, retrying, while another process of nobody's holds the slot."""
    short_dir.chmod(0o755)
    write_handler(short_dir, "v1")
    manifest = app_manifest(short_dir, workers=2)
    import trio as trio_module

    import trio_activate

    needed = [Path(sys.base_prefix), Path(sys.prefix), Path(trio_activate.__file__).parents[1]]
    needed.append(Path(trio_module.__file__).parents[1])
    command = as_nobody_with_nproc(short_dir, 4, needed)
    with running("--log-level", "debug", "serve", manifest, cwd=short_dir, command=command) as service:
        port = service.port()
        service.wait_for(r"ready: generation 1, 2 worker")
        first = service.workers_of(1)
        since = service.mark()
        service.send_signal(signal.SIGHUP)
        service.wait_for(
            r"error: reload failed: generation 2: cannot start a worker: \[Errno 11\] .*; "
            r"generation 1 keeps serving",
            since=since,
        )
        assert service.count(r"error: ", since=since) == 1
        assert ask(loopback(port), "still").pid in first

        hog = subprocess.Popen(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "sleep", "60"],
            start_new_session=True,
        )
        try:
            killed = min(first)
            since = service.mark()
            os.kill(killed, signal.SIGKILL)
            service.wait_for(rf"cannot start a worker: .* \(to replace worker {killed}\); retrying in 0\.2s")
        finally:
            hog.kill()
            hog.wait(TIMEOUT)
        replacement = int(service.wait_for(rf"worker (\d+) replaced worker {killed}$", since=since)[1])
        service.send_signal(signal.SIGTERM)
        assert service.wait() == 0
    assert all(is_gone(pid) for pid in first | {replacement})
