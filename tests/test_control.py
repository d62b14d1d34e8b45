"""The control socket (`status`, `reload --wait` over it), the pid file, and `reload` that signals
only a trio-activate service: real services, real sockets.

Each service runs `helpers.HANDLER` (``app.py``: ``TOKEN`` -> ``TOKEN PID VERSION``) on
127.0.0.1, its control socket and pid file in a short folder (a unix socket path holds 107
bytes).  ``status PID`` finds the control socket under the PID (its abstract name), ``--control``
by its path.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    Answer,
    Reaper,
    app_manifest,
    ask,
    control_as_nobody,
    loopback,
    open_fds,
    run_cli,
    running,
    wait_until,
    write_handler,
)

from trio_activate.model.control import abstract_name


def _manifest(folder: Path, *, workers: int = 1, keys: str = "") -> Path:
    """``app.toml`` with `keys` added to its [service] table."""
    write_handler(folder, "v1")
    path = app_manifest(folder, workers=workers)
    path.write_text(path.read_text().replace("[service]\n", f"[service]\n{keys}", 1))
    return path


def _status(*target: str) -> dict[str, Any]:
    result = run_cli("status", "--json", *target)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def test_single_process_status_reload_wait_and_pid_file_across_a_hand_over(
    short_dir: Path, reaper: Reaper
) -> None:
    manifest = _manifest(short_dir, keys='control = "ctl.sock"\npid-file = "app.pid"\n')
    control, pid_file = short_dir / "ctl.sock", short_dir / "app.pid"
    with running("serve", manifest, cwd=short_dir) as service:
        port = service.port()
        service.wait_for(r"ready: ")
        wait_until(pid_file.exists, what="the pid file")
        assert pid_file.read_text() == f"{service.pid}\n"
        assert stat.S_IMODE(control.stat().st_mode) == 0o600
        inode = control.stat().st_ino
        assert not list(short_dir.glob("*.tmp")), "written by rename"

        status = _status(str(service.pid))
        assert status["version"] == 1
        assert (status["mode"], status["pid"], status["generation"], status["reloads"]) == (
            "single",
            service.pid,
            1,
            0,
        )
        assert status["last_reload"] is None
        assert status["workers"] == []
        assert status["sockets"] == [
            {"name": "web", "address": f"127.0.0.1:{port}", "type": "stream", "fd": 3}
        ]
        assert status["handlers"] == [{"name": "web", "kind": "stream", "sockets": ["web"], "in_flight": 0}]
        assert (status["control"], status["pid_file"]) == (str(control), str(pid_file))
        assert 0 <= status["uptime"] < 60

        # The human form: short, aligned; by pid file this time.
        text = run_cli("status", str(pid_file))
        assert text.returncode == 0, text.stderr
        head = text.stdout.splitlines()[:6]
        assert [line.split(":")[0] for line in head] == [
            "service",
            "pid",
            "generation",
            "uptime",
            "reloads",
            "last reload",
        ]
        assert len({len(line) - len(line.split(":", 1)[1].lstrip()) for line in head}) == 1, "aligned"
        assert re.search(rf"^  web +3 +stream +127\.0\.0\.1:{port}$", text.stdout, re.M), text.stdout

        # A reload that fails: the reason, and the old code serves on.
        app = short_dir / "app.py"
        app.write_text(app.read_text() + "\ndef broken(:\n")
        failed = run_cli("reload", "--wait", str(pid_file))
        assert failed.returncode == 1
        assert failed.stderr == (
            f"trio-activate: reload of PID {service.pid} failed: "
            "Reload failed; the previous code keeps serving\n"
        )
        assert ask(loopback(port), "still") == Answer(service.pid, "v1")
        assert pid_file.read_text() == f"{service.pid}\n"

        write_handler(short_dir, "v2")
        result = run_cli("reload", "--wait", str(service.pid))
        assert result.returncode == 0, result.stderr
        found = re.fullmatch(rf"reloaded PID {service.pid}: handed over to process (\d+)\n", result.stderr)
        assert found, result.stderr
        successor = int(found[1])
        assert pid_file.read_text() == f"{successor}\n", "the pid file names the process to signal"
        assert ask(loopback(port), "next") == Answer(successor, "v2")
        assert control.stat().st_ino == inode, "the successor serves the same socket file"
        assert service.process.wait(timeout=15) == 0

        status = _status("--control", str(control))
        assert (status["pid"], status["generation"], status["reloads"]) == (successor, 2, 1)
        assert status["last_reload"]["ok"] is True
        assert status["last_reload"]["message"] == f"took over from process {service.pid}"

        # The successor outlived the process the test started; it stops on its own SIGTERM.
        os.kill(successor, signal.SIGTERM)
        assert reaper.wait_exit(successor) == 0
    assert not control.exists(), "removed on stop by the process that owned it then"
    assert not pid_file.exists()


def test_supervisor_status_counts_connections_and_reload_over_the_control_socket(short_dir: Path) -> None:
    manifest = _manifest(short_dir, workers=2)
    control, pid_file = short_dir / "ctl.sock", short_dir / "app.pid"
    with running("serve", manifest, "--control", control, "--pid-file", pid_file, cwd=short_dir) as service:
        port = service.port()
        service.wait_for(r"ready: generation 1, 2 worker")
        wait_until(pid_file.exists, what="the pid file")
        assert pid_file.read_text() == f"{service.pid}\n"
        status = _status(str(service.pid))
        assert (status["mode"], status["pid"], status["generation"]) == ("supervisor", service.pid, 1)
        assert len(status["workers"]) == 2
        assert all(w["generation"] == 1 and w["ready"] for w in status["workers"])
        assert service.pid not in {w["pid"] for w in status["workers"]}

        # A connection in flight shows, per handler and on the worker that holds it.
        with socket.create_connection(loopback(port)) as held:
            wait_until(
                lambda: _status("--control", str(control))["handlers"][0]["in_flight"] == 1,
                what="one connection in flight",
            )
            held.sendall(b"held\n")
            assert held.recv(100).split()[0] == b"held"
        wait_until(lambda: _status(str(service.pid))["handlers"][0]["in_flight"] == 0, what="none in flight")

        write_handler(short_dir, "v2")
        result = run_cli("reload", "--wait", str(pid_file))
        assert result.returncode == 0, result.stderr
        assert re.fullmatch(
            rf"reloaded PID {service.pid}: Generation 2: 2 worker\(s\) \(\d+, \d+\)\n", result.stderr
        )
        assert [ask(loopback(port), f"n{n}").version for n in range(4)] == ["v2"] * 4

        app = short_dir / "app.py"
        app.write_text(app.read_text() + "\ndef broken(:\n")
        failed = run_cli("reload", "--control", str(control))
        assert failed.returncode == 1
        assert failed.stderr.startswith(
            f"trio-activate: reload of {control} failed: Reload failed: generation 3"
        )
        assert failed.stderr.endswith("still serving generation 2\n")
        assert failed.stderr.count("\n") == 1
        assert ask(loopback(port), "still").version == "v2"
        status = _status(str(service.pid))
        assert (status["generation"], status["reloads"]) == (2, 1)
        assert status["last_reload"]["ok"] is False
        assert status["last_reload"]["message"].startswith("Reload failed: generation 3")
        assert service.stop() == 0
    assert not control.exists()
    assert not pid_file.exists()


def test_dev_status_and_reload_wait(short_dir: Path) -> None:
    manifest = _manifest(short_dir)
    control = short_dir / "ctl.sock"
    with running("dev", manifest, "--control", control, cwd=short_dir) as service:
        port = service.port()
        service.wait_for(r"ready: generation 1, 1 worker")
        status = _status(str(service.pid))
        assert (status["mode"], status["generation"], status["pid_file"]) == ("dev", 1, None)
        result = run_cli("reload", "--wait", "--control", str(control))
        assert result.returncode == 0, result.stderr
        assert re.fullmatch(rf"reloaded {control}: Generation 2: 1 worker\(s\) \(\d+\)\n", result.stderr)
        assert _status("--control", str(control))["generation"] == 2
        assert ask(loopback(port), "x").pid in {w["pid"] for w in _status(str(service.pid))["workers"]}
        assert service.stop() == 0
    assert not control.exists()


def test_a_peer_of_another_uid_is_refused_and_the_service_serves_on(short_dir: Path) -> None:
    """The abstract name has no file mode to keep anyone out: the SO_PEERCRED check does."""
    manifest = _manifest(short_dir, keys='control = "ctl.sock"\n')
    with running("serve", manifest, cwd=short_dir) as service:
        port = service.port()
        service.wait_for(r"ready: ")
        address = "@" + abstract_name(service.pid)[1:].decode()
        before = open_fds(service.pid)
        since = service.mark()
        refused = control_as_nobody(address, "reload")
        assert refused.returncode == 0, refused.stderr
        answer = json.loads(refused.stdout)
        assert answer == {"ok": False, "error": "permission denied: only the service's user and root"}
        line = service.wait_for(
            r"warning: control: refused PID (\d+) \(uid 65534\): only uid 0 and root", since=since
        )
        assert int(line[1]) != service.pid
        assert service.count(r"control: ", since=since) == 1
        assert ask(loopback(port), "after") == Answer(service.pid, "v1"), "no reload happened, it serves on"
        wait_until(lambda: open_fds(service.pid) == before, what="the refused connection's fd closed")
        assert _status(str(service.pid))["reloads"] == 0


def test_malformed_oversized_early_closed_and_silent_requests_are_one_line_each_and_leak_nothing(
    short_dir: Path,
) -> None:
    manifest = _manifest(short_dir, keys='control = "ctl.sock"\n')
    control = str(short_dir / "ctl.sock")
    with running("serve", manifest, cwd=short_dir) as service:
        port = service.port()
        service.wait_for(r"ready: ")
        before = open_fds(service.pid)
        since = service.mark()
        with socket.socket(socket.AF_UNIX) as silent:
            silent.settimeout(15)
            silent.connect(control)
            answers = {}
            for name, request in (
                ("not json", b"hello\n"),
                ("unknown op", b'{"op": "explode"}\n'),
                ("not an object", b'["status"]\n'),
                ("oversized", b"x" * 10_000),
                ("closed early", b""),
            ):
                with socket.socket(socket.AF_UNIX) as client:
                    client.settimeout(10)
                    client.connect(control)
                    if request:
                        with contextlib.suppress(BrokenPipeError):
                            client.sendall(request)
                    else:
                        client.shutdown(socket.SHUT_WR)
                    try:
                        answers[name] = client.recv(4096)
                    except ConnectionResetError:
                        answers[name] = b""
            # A silent client holds no one up: the service and its control socket answer meanwhile.
            assert ask(loopback(port), "busy") == Answer(service.pid, "v1")
            assert _status("--control", control)["pid"] == service.pid
            # All of that was answered while the silent client still waited for its 5 s to pass
            # (ordered by events, not by a clock on a shared machine).
            silent.setblocking(False)
            with pytest.raises(BlockingIOError):
                silent.recv(1)
            silent.settimeout(15)
            assert silent.recv(4096).startswith(b'{"ok": false, "error": "sent no full request within 5s"')
            assert silent.recv(4096) == b"", "closed after its answer"
        assert json.loads(answers["not json"])["error"].startswith("malformed request: not JSON")
        assert json.loads(answers["unknown op"]) == {
            "ok": False,
            "error": 'malformed request: op "explode": expected one of status, reload, takeover',
        }
        assert "expected a JSON object" in json.loads(answers["not an object"])["error"]
        if answers["oversized"]:
            assert json.loads(answers["oversized"])["error"] == "request longer than 4096 bytes"
        # The silent client's line is logged as its answer is sent: read up to it before counting.
        service.wait_for(r"warning: control: .*sent no full request within 5s", since=since)
        warnings = [line for line in service.lines[since:] if "warning: control: " in line]
        assert len(warnings) == 6, warnings
        for what in (
            "not JSON",
            'op "explode"',
            "expected a JSON object",
            "longer than 4096 bytes",
            "without a request",
            "sent no full request within 5s",
        ):
            assert sum(what in line for line in warnings) == 1, (what, warnings)
        wait_until(lambda: open_fds(service.pid) == before, what="every control connection's fd closed")
        assert ask(loopback(port), "after") == Answer(service.pid, "v1")
        assert service.stop() == 0


@pytest.mark.parametrize("command", [["reload"], ["reload", "--wait"], ["status"]])
def test_reload_or_status_of_a_pid_that_is_not_a_service_changes_nothing(command: list[str]) -> None:
    with subprocess.Popen(["sleep", "30"], start_new_session=True) as sleeper:
        try:
            wait_until(lambda: "sleep" in Path(f"/proc/{sleeper.pid}/cmdline").read_text(), what="sleep runs")
            result = run_cli(*command, str(sleeper.pid))
            time.sleep(0.2)
            assert sleeper.poll() is None, "not signalled"
        finally:
            os.killpg(sleeper.pid, signal.SIGKILL)
    assert result.returncode == 2
    assert result.stderr == (
        f"trio-activate: PID {sleeper.pid} is not a trio-activate service ('sleep 30'); nothing done\n"
    )


def test_status_of_a_service_without_a_control_socket_says_so(short_dir: Path) -> None:
    manifest = _manifest(short_dir)
    with running("serve", manifest, cwd=short_dir) as service:
        service.wait_for(r"ready: ")
        result = run_cli("status", str(service.pid))
        assert result.returncode == 2
        assert result.stderr == (
            f"trio-activate: status: PID {service.pid} has no control socket "
            "(serve --control PATH, or [service] control, gives it one), "
            "or it listens in another network namespace (give --control PATH)\n"
        )
        # A path where nobody listens: the same, one line.
        missing = run_cli("status", "--control", str(short_dir / "none.sock"))
        assert missing.returncode == 2
        assert (
            missing.stderr == f"trio-activate: status: {short_dir / 'none.sock'}: No such file or directory\n"
        )
        # reload --wait without one: by signal, as before.
        reloaded = run_cli("reload", "--wait", str(service.pid))
        assert reloaded.returncode == 0, reloaded.stderr
        assert reloaded.stderr.startswith(
            f"sent SIGHUP to {service.pid}\nreloaded PID {service.pid}: handed over"
        )


def test_a_control_path_in_use_or_not_a_socket_is_one_line_and_exit_2(short_dir: Path) -> None:
    manifest = _manifest(short_dir)
    taken = short_dir / "taken.sock"
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(str(taken))
        live.listen()
        result = run_cli("serve", str(manifest), "--control", str(taken))
    assert result.returncode == 2
    # After the line about the port the kernel chose: the sockets are made first.
    assert result.stderr.splitlines()[-1] == (
        f"trio-activate: --control: {taken}: another process listens there (a running service?)"
    )
    assert result.stderr.count("trio-activate: ") == 1
    plain = short_dir / "plain"
    plain.write_text("mine")
    manifest.write_text(manifest.read_text().replace("[service]\n", '[service]\ncontrol = "plain"\n', 1))
    result = run_cli("serve", str(manifest))
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        f"trio-activate: {manifest.name}: service.control: {plain}: "
        "exists and is not a socket; not replacing it"
    )
    assert plain.read_text() == "mine"
    # A socket file nobody listens on (a service killed with -9) is replaced.
    assert taken.exists()
    with running("serve", manifest, "--control", taken, cwd=short_dir) as service:
        service.wait_for(r"ready: ")
        assert _status("--control", str(taken))["pid"] == service.pid
        assert service.stop() == 0
    assert not taken.exists()


def test_manifest_control_and_pid_file_keys(short_dir: Path) -> None:
    manifest = _manifest(short_dir, keys='control = "ctl.sock"\npid-file = "run/app.pid"\n')
    result = run_cli("check", "--no-import", str(manifest))
    assert result.returncode == 0, result.stderr
    assert 'control = "ctl.sock"\npid-file = "run/app.pid"\n' in result.stdout
    manifest.write_text(manifest.read_text().replace('control = "ctl.sock"', "control = 5"))
    result = run_cli("check", "--no-import", str(manifest))
    assert (result.returncode, result.stderr) == (
        2,
        f"trio-activate: {manifest}: service.control: expected a string, got an integer\n",
    )


def test_a_pid_file_that_cannot_be_written_is_one_line_at_start_and_nothing_served(short_dir: Path) -> None:
    manifest = _manifest(short_dir)
    missing = short_dir / "no" / "app.pid"
    with running("serve", manifest, "--pid-file", missing, cwd=short_dir) as service:
        line = service.wait_for(r"error: --pid-file: .*")
        assert line[0].endswith(
            f"--pid-file: {missing}: cannot write the pid file: No such file or directory"
        )
        assert service.stop() == 0
