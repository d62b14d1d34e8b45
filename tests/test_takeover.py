"""Takeover between unrelated processes: ``serve --takeover PATH`` takes a running service's
sockets over its control socket (``SCM_RIGHTS``).

Every new process is started by the test, never by the old one.  Services run `helpers.HANDLER`
(``app.py``: ``TOKEN`` -> ``TOKEN PID VERSION``) on 127.0.0.1 and on a unix socket, their control
socket and pid file in a short folder (a unix socket path holds 107 bytes).  The faults are real
ones: a successor that cannot start, a peer that closes halfway, lies or sends garbage, a receiver
out of fds (``RLIMIT_NOFILE``).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    TRIO_ACTIVATE,
    ClientLoop,
    Process,
    Reaper,
    ask,
    control_as_nobody,
    is_gone,
    loopback,
    one_line_error,
    open_fds,
    run_cli,
    started,
    wait_until,
    write_handler,
    write_manifest,
)

from trio_activate.errors import ActivationError
from trio_activate.model.control import encode
from trio_activate.model.manifest import load_manifest
from trio_activate.model.takeover import SCM_MAX_FD, Offer, format_offer
from trio_activate.system.fd_passing import FdPassingError, receive_with_fds, rights
from trio_activate.system.takeover import take_over

TAKEOVERS = 10

MANIFEST = """
[service]
python-path = ["."]
workers = {workers}
grace-period = 5.0
start-timeout = 20.0
control = "ctl.sock"
pid-file = "app.pid"

[sockets.web]
listen = "127.0.0.1:{port}"

[sockets.local]
listen = "./app.sock"
remove-on-stop = true

[handlers.web]
socket = "web"
call = "app:handle"

[handlers.local]
socket = "local"
call = "app:handle"
{more}"""


def _manifest(folder: Path, *, port: int = 0, workers: int = 1, more: str = "") -> Path:
    return write_manifest(folder, MANIFEST.format(port=port, workers=workers, more=more), name="app.toml")


def _sockets_of(pid: int) -> int:
    return sum("socket:" in fd for fd in open_fds(pid))


def _status(control: Path) -> dict[str, Any]:
    result = run_cli("status", "--json", "--control", str(control))
    assert result.returncode == 0, result.stderr
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def _release_calling(folder: Path, manifest: Path, call: str, name: str) -> Path:
    """A copy of `manifest`, as `name`, whose first handler calls `call` instead of ``app:handle``."""
    text = manifest.read_text().replace('call = "app:handle"', f'call = "{call}"', 1)
    return write_manifest(folder, text, name=name)


def _take_over_once(folder: Path, manifest: Path, *prefix: str) -> subprocess.CompletedProcess[str]:
    """``serve --takeover`` run to its end (one that fails or is refused), after `prefix` (prlimit)."""
    return subprocess.run(
        [*prefix, *TRIO_ACTIVATE, "serve", str(manifest), "--takeover", str(folder / "ctl.sock")],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _new_release(folder: Path, version: str) -> None:
    """``app.py`` of `version`, rewritten in place with the old one's size and mtime: a cached
    .pyc still looks current, so a new process that trusted it would run the old code."""
    old = (folder / "app.py").stat()
    path = write_handler(folder, version)
    assert path.stat().st_size == old.st_size
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))


def _try_status(control: Path) -> dict[str, Any] | None:
    result = run_cli("status", "--json", "--control", str(control))
    return json.loads(result.stdout) if result.returncode == 0 else None


def _serve(folder: Path, manifest: Path, *args: str) -> contextlib.AbstractContextManager[Process]:
    # Bytecode written, as by default: a new release must not run a cached .pyc (`_new_release`).
    env = {name: value for name, value in os.environ.items() if name != "PYTHONDONTWRITEBYTECODE"}
    return started([*TRIO_ACTIVATE, "serve", str(manifest), *args], cwd=folder, env=env)


def _take_over(
    folder: Path, manifest: Path, option: str = "--takeover"
) -> contextlib.AbstractContextManager[Process]:
    return _serve(folder, manifest, option, str(folder / "ctl.sock"))


def test_ten_takeovers_between_unrelated_processes_lose_no_connection_and_leave_nothing(
    short_dir: Path, reaper: Reaper
) -> None:
    """Each new release is started beside the old one, by the test; the old one exits 0 once the
    new one serves.  Clients on 127.0.0.1 and on the unix socket see every connection answered."""
    write_handler(short_dir, "v00")
    manifest = _manifest(short_dir)
    control, pid_file, unix = short_dir / "ctl.sock", short_dir / "app.pid", short_dir / "app.sock"
    with contextlib.ExitStack() as processes:
        old = processes.enter_context(_serve(short_dir, manifest))
        port = old.port()
        old.wait_for(r"ready: ")
        sockets_at_start = _sockets_of(old.pid)
        with ClientLoop(loopback(port), max_seconds=120) as tcp, ClientLoop(unix, max_seconds=120) as local:
            for number in range(1, TAKEOVERS + 1):
                _new_release(short_dir, f"v{number:02d}")
                # The parser's abbreviation of --takeover must skip the fast start too.
                new = processes.enter_context(
                    _take_over(short_dir, manifest, "--takeover" if number % 2 else "--takeo")
                )
                new.wait_for(rf"takeover: process {old.pid} confirmed")
                assert old.wait() == 0, old.log
                old.wait_for(rf"process {new.pid} took the sockets over; stopping")
                assert tcp.wait_for(pids={new.pid}, version=f"v{number:02d}")
                assert local.wait_for(pids={new.pid}, version=f"v{number:02d}")
                assert pid_file.read_text() == f"{new.pid}\n"
                status = _status(control)
                assert (status["pid"], status["generation"], status["reloads"]) == (
                    new.pid,
                    number + 1,
                    number,
                )
                assert status["last_reload"]["message"] == f"took the sockets over from process {old.pid}"
                assert [(s["name"], s["type"]) for s in status["sockets"]] == [
                    ("web", "stream"),
                    ("local", "stream"),
                ]
                old = new
        # The connection to the old one is closed: the sockets of the first process, no more.
        wait_until(lambda: _sockets_of(old.pid) == sockets_at_start, what="the first process's sockets")
        assert tcp.failures == []
        assert local.failures == []
        assert len(tcp.answers) > TAKEOVERS
        assert len(local.answers) > TAKEOVERS
        assert old.stop() == 0
    for path in (control, pid_file, unix):
        assert not path.exists(), f"{path} left behind"
    assert reaper.orphans() == []


def test_a_supervisor_hands_its_sockets_to_a_new_supervisor_and_its_workers_drain(short_dir: Path) -> None:
    write_handler(short_dir, "v1")
    manifest = _manifest(short_dir, workers=2)
    control = short_dir / "ctl.sock"
    with _serve(short_dir, manifest) as old:
        port = old.port()
        wait_until(lambda: len((_try_status(control) or {}).get("workers", [])) == 2, what="two workers")
        old_workers = {w["pid"] for w in _status(control)["workers"]}
        _new_release(short_dir, "v2")
        with _take_over(short_dir, manifest) as new:
            new.wait_for(rf"takeover: process {old.pid} confirmed")
            assert old.wait() == 0, old.log
            assert all(is_gone(pid) for pid in old_workers)
            status = _status(control)
            # A supervisor numbers its own workers' generations; the takeover counts as a reload.
            assert (status["pid"], status["mode"], status["reloads"]) == (new.pid, "supervisor", 1)
            assert status["last_reload"]["message"] == f"took the sockets over from process {old.pid}"
            assert len(status["workers"]) == 2
            assert not {w["pid"] for w in status["workers"]} & old_workers
            answer = ask(loopback(port), "after")
            assert answer.version == "v2"
            assert answer.pid in {w["pid"] for w in status["workers"]}
            assert new.stop() == 0
    assert not (short_dir / "app.sock").exists()
    assert not control.exists()


def test_a_new_release_that_adds_and_drops_sockets_creates_and_closes_them(short_dir: Path) -> None:
    write_handler(short_dir, "v1")
    manifest = _manifest(short_dir)
    with _serve(short_dir, manifest) as old:
        port = old.port()
        old.wait_for(r"ready: ")
        # The new release serves web and a new socket, and no longer the unix one.
        text = manifest.read_text().replace(
            '[sockets.local]\nlisten = "./app.sock"\nremove-on-stop = true',
            '[sockets.admin]\nlisten = "127.0.0.1:0"',
        )
        text = text.replace('socket = "local"', 'socket = "admin"').replace(
            "[handlers.local]", "[handlers.admin]"
        )
        new_manifest = write_manifest(short_dir, text, name="new.toml")
        with _take_over(short_dir, new_manifest) as new:
            found = new.wait_for(
                r"sockets\.admin: no fd was passed for it \(new in the manifest\): "
                r"created on 127\.0\.0\.1:(\d+)"
            )
            new.wait_for(r"warning: .*local")
            new.wait_for(rf"takeover: process {old.pid} confirmed")
            assert old.wait() == 0
            assert ask(loopback(port), "web").pid == new.pid
            assert ask(loopback(int(found[1])), "admin").pid == new.pid
            assert [s["name"] for s in _status(short_dir / "ctl.sock")["sockets"]] == ["web", "admin"]
            # Its file was the old process's, remove-on-stop: the new one owns it and removes it.
            assert new.stop() == 0
    assert not (short_dir / "app.sock").exists()


def test_a_new_release_that_cannot_start_leaves_the_old_one_serving_with_the_sameopen_fds(
    short_dir: Path,
) -> None:
    write_handler(short_dir, "v1")
    manifest = _manifest(short_dir)
    broken = _release_calling(short_dir, manifest, "missing_module:handle", "broken.toml")
    with _serve(short_dir, manifest) as old:
        port = old.port()
        old.wait_for(r"ready: ")
        before = open_fds(old.pid)
        since = old.mark()
        failed = _take_over_once(short_dir, broken)
        assert failed.returncode != 0
        assert "Traceback" not in failed.stderr
        assert "cannot import 'missing_module'" in failed.stderr.splitlines()[-1], failed.stderr
        asked = old.wait_for(r"control: PID (\d+) \(uid \d+\) takes the sockets over", since=since)[1]
        old.wait_for(
            rf"warning: takeover by PID {asked} \(uid \d+\) failed: it failed: .*missing_module.*; "
            "serving on",
            since=since,
        )
        assert ask(loopback(port), "after").pid == old.pid
        assert ask(short_dir / "app.sock", "local").pid == old.pid
        wait_until(lambda: open_fds(old.pid) == before, what="the old process's fds as before")
        assert _status(short_dir / "ctl.sock")["reloads"] == 0
        # And the next takeover, by a release that starts, goes through.
        with _take_over(short_dir, manifest) as new:
            new.wait_for(rf"takeover: process {old.pid} confirmed")
            assert old.wait() == 0
            assert new.stop() == 0


def test_a_dev_run_and_a_busy_service_refuse_and_serve_on(short_dir: Path) -> None:
    write_handler(short_dir, "v1")
    manifest = _manifest(short_dir)
    with started([*TRIO_ACTIVATE, "dev", str(manifest)], cwd=short_dir) as dev:
        port = dev.port()
        dev.wait_for(r"ready: ")
        refused = _take_over_once(short_dir, manifest)
        assert refused.returncode != 0
        assert one_line_error(refused.stderr).endswith("refused: a dev run does not give its sockets away")
        assert ask(loopback(port), "after").version == "v1"
        assert dev.stop() == 0


def test_a_peer_of_another_uid_is_refused_and_gets_no_fd(short_dir: Path) -> None:
    write_handler(short_dir, "v1")
    with _serve(short_dir, _manifest(short_dir)) as old:
        port = old.port()
        old.wait_for(r"ready: ")
        before = open_fds(old.pid)
        since = old.mark()
        refused = control_as_nobody(f"@trio-activate/control/{old.pid}", "takeover")
        assert refused.returncode == 0, refused.stderr
        assert json.loads(refused.stdout) == {
            "ok": False,
            "error": "permission denied: only the service's user and root",
        }
        old.wait_for(r"warning: control: refused PID \d+ \(uid 65534\)", since=since)
        assert ask(loopback(port), "after").pid == old.pid
        wait_until(lambda: open_fds(old.pid) == before, what="the refused connection's fd closed")


# --- the old side against a new side that misbehaves -------------------------------------------


def _ask_for_sockets(control: Path) -> tuple[socket.socket, bytes, list[int]]:
    """Act as a new process: ask, and read the offer line and every fd message it announces."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(10)
    conn.connect(str(control))
    conn.sendall(b'{"op": "takeover"}\n')
    data, fds = b"", []
    while True:
        chunk, got = receive_with_fds(conn, 65536)
        fds += got
        assert chunk, "the old process closed early"
        data += chunk
        line, newline, rest = data.partition(b"\n")
        if newline and len(rest) == json.loads(line)["takeover"]["messages"]:
            return conn, line, fds


@pytest.mark.parametrize(
    ("ending", "logged"),
    [
        (b"", "it closed the connection before it served"),
        (b"garbage\n", "it failed|the line is not a JSON line"),
        (b'{"op": "failed", "error": "no luck"}\n', "it failed: no luck"),
        (b'{"op": "sure"}\n', 'unexpected line {"op": "sure"}'),
    ],
    ids=["closed", "garbage", "failed", "unexpected"],
)
def test_a_new_side_that_closes_fails_or_lies_changes_nothing_in_the_old(
    short_dir: Path, ending: bytes, logged: str
) -> None:
    write_handler(short_dir, "v1")
    with _serve(short_dir, _manifest(short_dir)) as old:
        port = old.port()
        old.wait_for(r"ready: ")
        before = open_fds(old.pid)
        since = old.mark()
        conn, line, fds = _ask_for_sockets(short_dir / "ctl.sock")
        offer = json.loads(line)["takeover"]
        assert offer["names"] == ["web", "local"]
        assert offer["pid"] == old.pid
        assert offer["control"]["path"] == str(short_dir / "ctl.sock")
        assert len(fds) == 3
        for fd in fds:
            os.close(fd)
        with conn:
            conn.sendall(ending)
            if ending == b"":
                conn.shutdown(socket.SHUT_WR)
            assert conn.recv(100) == b"", "no confirmation: closed"
        found = old.wait_for(
            r"warning: takeover by PID \d+ \(uid \d+\) failed: (.*); serving on", since=since
        )
        assert any(part in found[1] for part in logged.split("|")), found[0]
        assert old.count(r"warning: ", since=since) == 1
        assert ask(loopback(port), "after").pid == old.pid
        wait_until(lambda: open_fds(old.pid) == before, what="the old process's fds as before")
        assert old.poll() is None
        assert old.stop() == 0
    assert not (short_dir / "ctl.sock").exists()


# --- the new side against an old side that misbehaves -------------------------------------------


@contextlib.contextmanager
def fake_old(path: Path, send: Callable[[socket.socket], None]) -> Iterator[None]:
    """A unix listener at `path` whose one connection gets `send` after the request line."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(1)

        def serve() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(10)
                request = b""
                while not request.endswith(b"\n"):
                    chunk = conn.recv(100)
                    if not chunk:
                        return
                    request += chunk
                assert request == b'{"op": "takeover"}\n'
                with contextlib.suppress(OSError):
                    send(conn)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            yield
        finally:
            thread.join(15)


def _offer(names: list[str], *, control: bool = False, messages: int | None = None) -> bytes:
    offer = Offer(
        pid=os.getpid(),
        service="app",
        names=tuple(names),
        control={"path": "/nowhere", "dev": 1, "ino": 2} if control else None,
        files=(),
        state={"generation": 1},
    )
    line = format_offer(offer)
    if messages is not None:
        line["takeover"]["messages"] = messages
    return encode(line)


def _listener() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def _send_sockets(names: list[str], count: int | None = None) -> Callable[[socket.socket], None]:
    """An honest offer of `names`, then only the first `count` of their fds, then close."""

    def send(conn: socket.socket) -> None:
        listeners = [_listener() for _ in names]
        try:
            conn.sendall(_offer(names))
            fds = [s.fileno() for s in listeners][:count]
            for start in range(0, len(fds), SCM_MAX_FD):
                conn.sendmsg([b"\0"], rights(fds[start : start + SCM_MAX_FD]))
        finally:
            for s in listeners:
                s.close()

    return send


def _a_pipe_as_web(conn: socket.socket) -> None:
    read, write = os.pipe()
    try:
        conn.sendall(_offer(["web"]))
        conn.sendmsg([b"\0"], rights([read]))
        conn.recv(100)  # the new side's last line
    finally:
        os.close(read)
        os.close(write)


WEB_ONLY = """
[service]
[sockets.web]
listen = "127.0.0.1:0"
[handlers.web]
socket = "web"
call = "trio_activate.examples:echo"
"""


@pytest.mark.parametrize(
    ("send", "expected"),
    [
        (lambda conn: conn.sendall(b"hello\n"), "the answer is not a JSON line"),
        (lambda conn: conn.sendall(encode({"ok": False, "error": "busy"})), "refused: busy"),
        (lambda conn: conn.sendall(b"x" * ((1 << 20) + 2)), "the answer is longer than"),
        (lambda conn: None, "closed the connection without an answer"),
        (lambda conn: conn.sendall(_offer(["web"], messages=5)), "fd(s) come in 1 message(s), but it says 5"),
        (_send_sockets(["web", "web"], count=1), "1 fd(s) arrived, the offer named 2"),
        (
            _send_sockets(["web"] * (SCM_MAX_FD + 3), count=SCM_MAX_FD),
            f"after {SCM_MAX_FD} of {SCM_MAX_FD + 3} fd(s)",
        ),
        (_a_pipe_as_web, "not a socket"),
    ],
    ids=[
        "not-json",
        "refused",
        "oversized",
        "closed",
        "messages-lie",
        "fds-missing",
        "second-batch-missing",
        "pipe",
    ],
)
def test_a_takeover_from_a_bad_old_side_is_one_line_and_leaks_no_fd(
    short_dir: Path, send: Callable[[socket.socket], None], expected: str
) -> None:
    """In this very process, so its own fd table shows that nothing received stays open."""
    manifest = load_manifest(write_manifest(short_dir, WEB_ONLY))
    path = short_dir / "old.sock"
    before = open_fds("self")
    with fake_old(path, send), pytest.raises(ActivationError) as caught:
        take_over(str(path), manifest, timeout=10)
    message = str(caught.value)
    assert "\n" not in message, message
    assert expected in message, message
    wait_until(lambda: open_fds("self") == before, what="every fd received closed")


def test_batches_of_scm_max_fd_arrive_whole_and_in_order(short_dir: Path) -> None:
    """More fds than one message carries: three messages, every fd where its name says."""
    count = SCM_MAX_FD + 7
    names = [f"s{i}" for i in range(count)]
    sockets = "".join(f'[sockets.s{i}]\nlisten = "127.0.0.1:0"\n' for i in range(count))
    handler = f'[handlers.h]\nsocket = {json.dumps(names)}\ncall = "trio_activate.examples:echo"\n'
    manifest = load_manifest(write_manifest(short_dir, f"[service]\n{sockets}{handler}"))
    path = short_dir / "old.sock"
    listeners: list[socket.socket] = []

    def send(conn: socket.socket) -> None:
        listeners.extend(_listener() for _ in names)
        conn.sendall(_offer(names))
        fds = [s.fileno() for s in listeners]
        for start in range(0, count, SCM_MAX_FD):
            conn.sendmsg([b"\0"], rights(fds[start : start + SCM_MAX_FD]))
        conn.recv(100)

    try:
        with fake_old(path, send):
            taken = take_over(str(path), manifest, timeout=10)
            try:
                got = {name: group[0].getsockname() for name, group in taken.sockets.sockets.items()}
                assert got == {name: s.getsockname() for name, s in zip(names, listeners, strict=True)}
                assert all(
                    not os.get_inheritable(group[0].fileno()) for group in taken.sockets.sockets.values()
                )
            finally:
                taken.close()
                taken.sockets.close()
    finally:
        for s in listeners:
            s.close()


def test_a_receiver_out_of_fds_closes_what_arrived_and_fails() -> None:
    """RLIMIT_NOFILE lets the kernel install only some of a message's fds: it flags MSG_CTRUNC, and
    the partial batch is closed, never matched to names."""
    sender, receiver = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    listeners = [_listener() for _ in range(10)]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        sender.sendmsg([b"\0"], rights([s.fileno() for s in listeners]))
        before = open_fds("self")
        used = {int(entry.split()[0]) for entry in before}
        # The lowest limit under which three fd numbers are free (holes included): room for three, not ten.
        limit = next(n for n in range(1, soft) if n - len({fd for fd in used if fd < n}) == 3)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
        try:
            with pytest.raises(FdPassingError, match="MSG_CTRUNC"):
                receive_with_fds(receiver, 100)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert open_fds("self") == before
    finally:
        for s in [sender, receiver, *listeners]:
            s.close()


def test_takeover_and_passed_sockets_together_is_one_line() -> None:
    result = subprocess.run(
        [*TRIO_ACTIVATE, "serve", "x.toml", "--takeover", "/nowhere.sock"],
        env={**os.environ, "LISTEN_FDS": "1", "LISTEN_PID": "1"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "sockets were passed to this process already" in one_line_error(result.stderr)


def test_takeover_of_nobody_is_one_line(short_dir: Path) -> None:
    manifest = write_manifest(short_dir, WEB_ONLY)
    result = subprocess.run(
        [*TRIO_ACTIVATE, "serve", str(manifest), "--takeover", str(short_dir / "none.sock")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert one_line_error(result.stderr) == (
        f"trio-activate: --takeover {short_dir / 'none.sock'}: "
        "No such file or directory: no service listens there"
    )
    # It made no socket of its own: port 0 would have been bound by a fast start.
    assert "listening on" not in result.stderr


@pytest.mark.parametrize("fault", ["SIGKILL", "SIGSTOP"])
def test_a_new_release_killed_or_stopped_while_starting_leaves_the_old_one_serving(
    short_dir: Path, fault: str
) -> None:
    """The new process holds the fds and hangs in its handler's import: killed, the old process
    sees the connection close; stopped, its start-timeout runs out.  Either way it serves on."""
    write_handler(short_dir, "v1")
    manifest = _manifest(short_dir)
    manifest.write_text(manifest.read_text().replace("start-timeout = 20.0", "start-timeout = 2.0"))
    (short_dir / "slow_app.py").write_text("import time\n\ntime.sleep(60)\n")
    slow = _release_calling(short_dir, manifest, "slow_app:handle", "slow.toml")
    with _serve(short_dir, manifest) as old:
        port = old.port()
        old.wait_for(r"ready: ")
        before = open_fds(old.pid)
        since = old.mark()
        with _take_over(short_dir, slow) as new:
            new.wait_for(r"took 2 socket\(s\) over from process")
            if fault == "SIGKILL":
                new.send_signal(signal.SIGKILL)
                expected = "it closed the connection before it served"
            else:
                new.send_signal(signal.SIGSTOP)
                expected = r"it did not say it serves within 2s \(start-timeout\)"
            old.wait_for(
                rf"warning: takeover by PID {new.pid} \(uid \d+\) failed: {expected}; serving on", since=since
            )
            assert ask(loopback(port), "after").pid == old.pid
            assert ask(short_dir / "app.sock", "local").pid == old.pid
            wait_until(lambda: open_fds(old.pid) == before, what="the old process's fds as before")
        assert old.poll() is None
        assert _status(short_dir / "ctl.sock")["pid"] == old.pid
        assert old.stop() == 0
    assert not (short_dir / "app.sock").exists()


def test_a_new_release_out_of_fds_at_any_step_is_one_line_and_the_old_one_serves_on(short_dir: Path) -> None:
    """``prlimit --nofile=N`` for N from too few to receive the fds (MSG_CTRUNC) to too few for
    trio's own: each new process fails with one line, never a traceback; the old one serves on."""
    prlimit = shutil.which("prlimit")
    if prlimit is None:
        pytest.skip("needs prlimit (util-linux)")
    write_handler(short_dir, "v1")
    manifest = _manifest(short_dir)
    with _serve(short_dir, manifest) as old:
        port = old.port()
        old.wait_for(r"ready: ")
        before = open_fds(old.pid)
        messages = []
        for limit in range(5, 12):
            result = _take_over_once(short_dir, manifest, prlimit, f"--nofile={limit}:{limit}")
            assert result.returncode != 0, f"--nofile={limit}: {result.stderr}"
            assert "Traceback" not in result.stderr, f"--nofile={limit}: {result.stderr}"
            last = result.stderr.splitlines()[-1]
            assert last.startswith("trio-activate: "), f"--nofile={limit}: {result.stderr}"
            messages.append(last)
            assert ask(loopback(port), f"after{limit}").pid == old.pid
        # The range reaches the receive itself, and steps past it.
        assert any("MSG_CTRUNC" in message for message in messages), messages
        assert any("out of file descriptors" in message for message in messages), messages
        wait_until(lambda: open_fds(old.pid) == before, what="the old process's fds as before")
        assert _status(short_dir / "ctl.sock")["reloads"] == 0
        assert old.stop() == 0


def test_a_reload_during_a_takeover_wins_and_the_new_release_stops(short_dir: Path, reaper: Reaper) -> None:
    """SIGHUP while a new release is starting: the reload hands over to its own successor, the old
    process no longer confirms, and the new release stops (exit 1): one service, not two."""
    write_handler(short_dir, "v1")
    manifest = _manifest(short_dir)
    (short_dir / "slow_app.py").write_text("import time\n\ntime.sleep(3)\n\nfrom app import handle  # noqa\n")
    slow = _release_calling(short_dir, manifest, "slow_app:handle", "slow.toml")
    with _serve(short_dir, manifest) as old:
        port = old.port()
        old.wait_for(r"ready: ")
        since = old.mark()
        with _take_over(short_dir, slow) as new, socket.create_connection(loopback(port)) as held:
            # A connection in flight keeps the old process draining (grace-period 5 s) past the
            # moment the new release serves (3 s): it is alive to confirm, and must not.
            held.sendall(b"held")
            old.wait_for(r"takes the sockets over", since=since)
            old.send_signal(signal.SIGHUP)
            successor = int(old.wait_for(r"handed over to process (\d+)", since=since)[1])
            assert new.wait() == 1, new.log
            assert "takeover: " in new.log
            assert "; stopping" in new.log
            wait_until(
                lambda: ask(loopback(port), "after").pid == successor, what="the reload's successor serves"
            )
            assert _status(short_dir / "ctl.sock")["pid"] == successor
            assert (short_dir / "app.pid").read_text() == f"{successor}\n"
        assert old.wait() == 0, "the held connection closed: the old process drained and exited"
        os.kill(successor, signal.SIGTERM)
        assert reaper.wait_exit(successor) == 0
    assert not (short_dir / "app.sock").exists()


def test_pid_1_of_a_namespace_refuses_to_give_its_sockets_away(short_dir: Path) -> None:
    """A container's init that gave its sockets away and exited would end the PID namespace, and
    the new process in it: it refuses, and serves on."""
    unshare = shutil.which("unshare")
    if os.geteuid() != 0 or unshare is None:
        pytest.skip("needs root and unshare")
    write_handler(short_dir, "v1")
    manifest = _manifest(short_dir)
    env = {name: value for name, value in os.environ.items() if name != "PYTHONDONTWRITEBYTECODE"}
    argv = [unshare, "--pid", "--fork", "--mount-proc", *TRIO_ACTIVATE, "serve", str(manifest)]
    with started(argv, cwd=short_dir, env=env) as old:
        port = old.port()
        old.wait_for(r"trio-activate\[1\]: info: ready: ")
        refused = _take_over_once(short_dir, manifest)
        assert refused.returncode == 2, refused.stderr
        assert one_line_error(refused.stderr).endswith(
            "refused: this process is PID 1 of its namespace; its exit would end the new process too"
        )
        old.wait_for(
            r"trio-activate\[1\]: warning: control: .* asks for the sockets: refused: this process is PID 1"
        )
        assert ask(loopback(port), "after").version == "v1"
        assert old.poll() is None
