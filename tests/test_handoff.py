"""Zero-downtime reload of a single-process serve: SIGHUP hands the sockets over to a successor.

The service serves `helpers.HANDLER` (``app.py``: ``TOKEN`` -> ``TOKEN PID
VERSION``) on a unix socket file, in a session of its own (`helpers.started`),
so the successors it starts are stopped with it.  While a test runs, the test
process is a child subreaper (the `reaper` fixture): a successor orphaned by
its predecessor's exit becomes the test's child, whose exit status it reads.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
from helpers import (
    TRIO_ACTIVATE,
    Answer,
    ClientLoop,
    Process,
    Reaper,
    ask,
    clean_env,
    group_members,
    notify_socket,
    receive,
    receive_until,
    retry,
    started,
    wait_until,
    write_handler,
)

MANIFEST = """
[service]
grace-period = {grace}
start-timeout = 10

[sockets.web]
listen = "{path}"

[handlers.web]
socket = "web"
call = "app:handle"
"""


def write_service(folder: Path, version: str = "v1", *, grace: float = 5) -> Path:
    write_handler(folder, version)
    manifest = folder / "service.toml"
    manifest.write_text(MANIFEST.format(path=folder / "web.sock", grace=grace))
    return manifest


def serving(
    manifest: Path, notify: Path | None = None, *, extra_env: dict[str, str] | None = None
) -> contextlib.AbstractContextManager[Process]:
    """``trio-activate serve MANIFEST`` (its successors in its session, stopped with it)."""
    env = clean_env(**(extra_env or {}))
    # As in production: handler modules cached as .pyc (a reload must not run a stale one).
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if notify is not None:
        env["NOTIFY_SOCKET"] = str(notify)
    return started([*TRIO_ACTIVATE, "serve", str(manifest)], env=env)


def wait_serving(path: Path) -> None:
    """Until the service at `path` answers."""
    retry(lambda: ask(path, "ping", timeout=1))


def main_pid_after_reload(manager: socket.socket) -> int:
    seen = receive_until(manager, "MAINPID")
    assert any("RELOADING" in fields and "MONOTONIC_USEC" in fields for _, fields in seen), seen
    handover = seen[-1][1]
    assert handover["READY"] == "1", "READY=1 ends the reload (Type=notify-reload)"
    return int(handover["MAINPID"])


def test_sighup_hands_over_to_new_code_and_tells_the_manager(tmp_path: Path, reaper: Reaper) -> None:
    manifest = write_service(tmp_path)
    path = tmp_path / "web.sock"
    with (
        notify_socket(tmp_path / "notify.sock") as manager,
        serving(manifest, tmp_path / "notify.sock") as process,
    ):
        receive_until(manager, "READY")
        assert ask(path, "hello") == Answer(process.pid, "v1")
        # New code of the same size and, set on purpose, the same mtime: a cached .pyc
        # passes for it, so only a successor that compiles from source runs v2.
        handler = tmp_path / "app.py"
        before = handler.stat()
        write_service(tmp_path, "v2")
        assert handler.stat().st_size == before.st_size
        os.utime(handler, ns=(before.st_atime_ns, before.st_mtime_ns))
        process.send_signal(signal.SIGHUP)
        successor = main_pid_after_reload(manager)
        assert successor != process.pid
        assert ask(path, "again") == Answer(successor, "v2")
        assert process.wait() == 0, "the predecessor drains and exits 0"
        # The successor is the service now: it handles the next SIGHUP, and SIGTERM.
        os.kill(successor, signal.SIGHUP)
        third = main_pid_after_reload(manager)
        assert ask(path, "third") == Answer(third, "v2")
        assert reaper.wait_exit(successor) == 0, "the successor, handed over in turn, drains and exits 0"
        os.kill(third, signal.SIGTERM)
        (sender, stopping) = receive_until(manager, "STOPPING")[-1]
        assert (sender, stopping["STOPPING"]) == (third, "1"), "the third process says it stops"
        assert reaper.wait_exit(third) == 0, "and exits 0"


def test_only_the_main_process_pings_the_watchdog_after_a_hand_over(tmp_path: Path) -> None:
    """NotifyAccess=main: the predecessor stops pinging the moment it hands over, drain or not."""
    # A grace period longer than the test: the predecessor drains the connection in flight throughout.
    manifest = write_service(tmp_path, grace=60)
    env_watchdog = {"WATCHDOG_USEC": "200000"}  # a ping every 0.1 s
    with (
        notify_socket(tmp_path / "notify.sock") as manager,
        serving(manifest, tmp_path / "notify.sock", extra_env=env_watchdog) as process,
        socket.socket(socket.AF_UNIX) as in_flight,
    ):
        receive_until(manager, "READY")
        # A connection the old process must drain: it waits for a request.
        in_flight.connect(str(tmp_path / "web.sock"))
        process.send_signal(signal.SIGHUP)
        successor = int(receive_until(manager, "MAINPID")[-1][1]["MAINPID"])
        pings: list[int] = []
        while pings.count(successor) < 5:
            pid, fields = receive(manager)
            if "WATCHDOG" in fields:
                pings.append(pid)
        assert process.poll() is None, "the predecessor is still draining"
        assert process.pid not in pings
        assert pings.count(successor) >= 5, "the new main process pings"
        in_flight.settimeout(10)
        in_flight.sendall(b"done\n")
        assert in_flight.recv(100).split() == [b"done", str(process.pid).encode(), b"v1"]
        assert process.wait() == 0
        os.kill(successor, signal.SIGTERM)


def test_a_successor_that_fails_leaves_the_old_code_serving(tmp_path: Path) -> None:
    manifest = write_service(tmp_path)
    with (
        notify_socket(tmp_path / "notify.sock") as manager,
        serving(manifest, tmp_path / "notify.sock") as process,
    ):
        receive_until(manager, "READY")
        (tmp_path / "app.py").write_text("def broken(:\n")
        process.send_signal(signal.SIGHUP)
        seen = receive_until(manager, "READY")
        assert not any("MAINPID" in fields for _, fields in seen)
        assert any("Reload failed" in fields.get("STATUS", "") for _, fields in seen)
        assert ask(tmp_path / "web.sock", "still") == Answer(process.pid, "v1")
        assert process.stop(signal.SIGTERM) == 0
        err = process.log
        assert "invalid syntax" in err
        assert "reload failed: the successor" in err


@pytest.mark.slow
def test_twenty_sighup_reloads_under_load_fail_no_connection(tmp_path: Path) -> None:
    manifest = write_service(tmp_path)
    with (
        notify_socket(tmp_path / "notify.sock") as manager,
        serving(manifest, tmp_path / "notify.sock") as process,
    ):
        receive_until(manager, "READY")
        main = process.pid
        with ClientLoop(tmp_path / "web.sock", max_seconds=300) as loop:
            loop.wait_for(pids={main})
            for _ in range(20):
                os.kill(main, signal.SIGHUP)
                main = main_pid_after_reload(manager)
                loop.wait_for(pids={main})  # the new main process serves the stream
        assert loop.failures == []
        assert len(loop.answers) > 100
        os.kill(main, signal.SIGTERM)


def test_kill_and_restart_without_hand_over_does_fail_connections(tmp_path: Path) -> None:
    """The control: the same loop sees failures when the service is simply restarted."""
    manifest = write_service(tmp_path)
    path = tmp_path / "web.sock"
    with ExitStack() as processes:
        process = processes.enter_context(serving(manifest))
        wait_serving(path)
        with ClientLoop(path) as loop:
            for _ in range(3):
                process.send_signal(signal.SIGKILL)
                process.wait()
                process = processes.enter_context(serving(manifest))
                wait_serving(path)
    assert loop.failures, "a plain restart refuses connections; otherwise the reload test proves nothing"


# --- faults during a hand-over -------------------------------------------------


def test_sigterm_during_a_reload_stops_the_successor_too(tmp_path: Path) -> None:
    """The stop is for the service: a successor still starting is stopped, never left serving."""
    manifest = write_service(tmp_path)
    importing, hold = tmp_path / "importing", tmp_path / "hold"
    with serving(manifest) as process:
        wait_serving(tmp_path / "web.sock")
        # The new code's import waits (at most 20 s) while `hold` exists: SIGTERM comes
        # while the successor starts.
        handler = tmp_path / "app.py"
        hold.write_text("")
        handler.write_text(
            f"import os, pathlib, time\npathlib.Path({str(importing)!r}).touch()\n"
            f"_deadline = time.monotonic() + 20\n"
            f"while os.path.exists({str(hold)!r}) and time.monotonic() < _deadline:\n"
            f"    time.sleep(0.02)\n" + handler.read_text()
        )
        process.send_signal(signal.SIGHUP)
        wait_until(importing.exists, what="the successor imports the new code")
        assert len(group_members(process.pid)) == 2, "the successor started"
        assert process.stop(signal.SIGTERM) == 0
        assert group_members(process.pid) == [], "no successor outlives the stop"
        with pytest.raises((ConnectionRefusedError, FileNotFoundError)):
            ask(tmp_path / "web.sock", "anyone?", timeout=1)
        assert "reload abandoned: the service is stopping" in process.log


def test_remove_on_stop_files_belong_to_whoever_serves_on_them(tmp_path: Path) -> None:
    def write(version: str) -> Path:
        manifest = write_service(tmp_path, version)
        manifest.write_text(manifest.read_text().replace('listen = "', 'remove-on-stop = true\nlisten = "'))
        return manifest

    path = tmp_path / "web.sock"
    with (
        notify_socket(tmp_path / "notify.sock") as manager,
        serving(write("v1"), tmp_path / "notify.sock") as process,
    ):
        receive_until(manager, "READY")
        # A successor that fails to start leaves its predecessor's file alone.
        (tmp_path / "app.py").write_text("def broken(:\n")
        process.send_signal(signal.SIGHUP)
        assert any(
            "Reload failed" in fields.get("STATUS", "") for _, fields in receive_until(manager, "READY")
        )
        assert ask(path, "still") == Answer(process.pid, "v1")

        write("v2")
        process.send_signal(signal.SIGHUP)
        successor = main_pid_after_reload(manager)
        assert process.wait() == 0, "handed over and drained"
        assert path.is_socket(), "the predecessor left the file its successor serves on"
        assert ask(path, "next") == Answer(successor, "v2")
        os.kill(successor, signal.SIGTERM)
        wait_until(lambda: not group_members(process.pid), what="the successor stopped")
        assert not path.exists(), "the last one to serve on it removed it"


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
    env = clean_env(PYTHONPATH=os.pathsep.join(p for p in sys.path if p and Path(p).is_dir()))
    with started([interpreter, "-m", "trio_activate", "serve", manifest], env=env) as process:
        wait_serving(service / "web.sock")
        assert ask(service / "web.sock", "before") == Answer(process.pid, "v1")
        interpreter.unlink()
        write_service(service, "v2")
        process.send_signal(signal.SIGHUP)
        process.wait_for(r"reload failed")
        assert process.poll() is None, "the reload's failure ended the service"
        assert ask(service / "web.sock", "after") == Answer(process.pid, "v1")
        assert process.stop(signal.SIGTERM) == 0
        err = process.log
        assert "Traceback" not in err, err
        failed = [line for line in err.splitlines() if "reload failed" in line]
        assert len(failed) == 1, err
        assert "No such file or directory" in failed[0], failed[0]


def test_a_reload_that_cannot_start_its_successor_is_one_line_and_keeps_serving(tmp_path: Path) -> None:
    """Out of fds (prlimit --nofile): no inbox, no successor; the running process serves on."""
    manifest = write_service(tmp_path)
    command = ["prlimit", "--nofile=40:40", *TRIO_ACTIVATE, "serve", str(manifest)]
    with ExitStack() as clients, started(command, env=clean_env()) as process:
        wait_serving(tmp_path / "web.sock")
        # Idle clients take every fd the service has left (the rest wait in the backlog).
        for _ in range(60):
            client = clients.enter_context(socket.socket(socket.AF_UNIX))
            client.connect(str(tmp_path / "web.sock"))
        process.wait_for(r"sockets\.web: accept failed: Too many open files")
        since = process.mark()
        process.send_signal(signal.SIGHUP)
        process.wait_for(r"reload failed", since=since)
        assert process.poll() is None, "the reload's failure did not end the service"
        clients.close()
        # Served again as soon as fds are free: the first clients' requests, then a new one.
        deadline = time.monotonic() + 10
        while True:
            try:
                answer = ask(tmp_path / "web.sock", "after", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "the service did not serve again"
        assert answer == Answer(process.pid, "v1")
        assert process.stop(signal.SIGTERM) == 0
        err = process.log
        # (The 60 clients dropped meanwhile log tracebacks of their own: not the reload's.)
        assert "in hand_over" not in err
        assert "in _reload" not in err
        failed = [line for line in err.splitlines() if "reload failed" in line]
        assert len(failed) == 1, err
        assert "Too many open files" in failed[0]


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
