"""`trio-activate dev`: a change starts a new worker, which takes over once ready.

Runs the real command line against handler modules written into
``tmp_path`` (the manifest's ``python-path``), with the process and client
helpers of `helpers`: every test's process group is killed when it ends,
and each service binds port 0 and tells its port in its log.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import (
    RELOADS,
    ClientLoop,
    app_manifest,
    ask,
    free_port,
    is_gone,
    loopback,
    running,
    write_handler,
)


@pytest.mark.slow
def test_twenty_reloads_on_file_changes_fail_no_connection(tmp_path: Path) -> None:
    """Each change is served by its new code, and not one connection of the steady stream fails."""
    write_handler(tmp_path, "v1")
    manifest = app_manifest(tmp_path)
    with running("dev", manifest, cwd=tmp_path) as dev:
        port = dev.port()
        dev.wait_for(r"ready: generation 1, 1 worker")
        with ClientLoop(loopback(port)) as loop:
            loop.wait_for(version="v1")
            for number in range(2, 2 + RELOADS):
                version = f"v{number}"
                write_handler(tmp_path, version)
                loop.wait_for(version=version)
        assert loop.failures == []
        versions = {answer.version for answer in loop.answers}
        assert versions == {f"v{number}" for number in range(1, 2 + RELOADS)}
        assert dev.count(r"info: reloaded: generation \d+ serving") == RELOADS
        assert dev.count(r"app\.py changed") == RELOADS


def test_a_syntax_error_keeps_the_old_worker_serving_and_shows_the_error(tmp_path: Path) -> None:
    app = write_handler(tmp_path, "v1")
    manifest = app_manifest(tmp_path)
    with running("dev", manifest, cwd=tmp_path) as dev:
        port = dev.port()
        dev.wait_for(r"ready: generation 1, 1 worker")
        with ClientLoop(loopback(port)) as loop:
            first = loop.wait_for()
            since = dev.mark()
            app.write_text(app.read_text() + "\ndef broken(:\n")
            dev.wait_for(r"error: reload failed: .*; generation 1 keeps serving$", since=since)
            # dev shows the error in full: the traceback, the line, the caret.
            dev.wait_for(r"SyntaxError: ", since=since)
            dev.wait_for(r"^\s+def broken\(:$", since=since)
            dev.wait_for(rf"cannot import 'app': .*\({app}, line \d+\)$", since=since)
            assert loop.wait_for() == first

            write_handler(tmp_path, "v2")
            fixed = loop.wait_for(version="v2")
        assert loop.failures == []
        assert {answer.pid for answer in loop.answers} == {first.pid, fixed.pid}


def test_a_rewrite_within_the_same_second_at_the_same_size_is_served(tmp_path: Path) -> None:
    """dev never runs stale bytecode, even where a cached .pyc still looks valid for the new source."""
    app = write_handler(tmp_path, "v1")
    manifest = app_manifest(tmp_path)
    # The trap: a .pyc of v1, which records the source's mtime (whole seconds) and size.
    pyc = Path(importlib.util.cache_from_source(str(app)))
    subprocess.run(
        [sys.executable, "-c", f"import py_compile; py_compile.compile({str(app)!r}, doraise=True)"],
        check=True,
        timeout=30,
    )
    assert pyc.exists()
    before = app.stat()
    with running("--log-level", "debug", "dev", manifest, cwd=tmp_path) as dev:
        port = dev.port()
        dev.wait_for(r"ready: generation 1, 1 worker")
        assert ask(loopback(port), "a").version == "v1"
        since = dev.mark()
        app.write_text(app.read_text().replace("'v1'", "'v2'"))
        os.utime(app, ns=(before.st_atime_ns, before.st_mtime_ns))
        after = app.stat()
        assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
        # The trap is armed: a plain import runs the stale v1 from the .pyc.
        stale = subprocess.run(
            [sys.executable, "-c", "import app; print(app.VERSION)"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert stale.stdout == "v1\n"
        dev.wait_for(r"reloaded: generation 2 serving", since=since)
        dev.wait_for(r"generation 1 stopped$", since=since)
        assert ask(loopback(port), "b").version == "v2"


def test_dev_reloads_on_the_manifest_and_watch_paths_but_not_on_other_files(tmp_path: Path) -> None:
    write_handler(tmp_path, "v1")
    manifest = app_manifest(tmp_path)
    extra = tmp_path / "settings.json"
    extra.write_text("{}")
    with running("--log-level", "debug", "dev", manifest, "--watch", extra, cwd=tmp_path) as dev:
        port = dev.port()
        dev.wait_for(r"ready: generation 1, 1 worker")
        since = dev.mark()
        manifest.write_text(manifest.read_text().replace("grace-period = 5.0", "grace-period = 4.0"))
        dev.wait_for(r"reloaded: generation 2 serving", since=since)
        assert dev.count(rf"changed: {manifest}$", since=since) == 1

        since = dev.mark()
        extra.write_text('{"a": 1}')
        dev.wait_for(r"reloaded: generation 3 serving", since=since)
        assert dev.count(rf"changed: {extra}$", since=since) == 1

        # Neither a log nor a bytecode cache in a watched folder reloads; the next .py change does.
        since = dev.mark()
        (tmp_path / "service.log").write_text("a line\n")
        (tmp_path / "__pycache__").mkdir(exist_ok=True)
        (tmp_path / "__pycache__" / "app.cpython-311.pyc").write_bytes(b"junk")
        write_handler(tmp_path, "v2")
        dev.wait_for(r"reloaded: generation 4 serving", since=since)
        changes = [line.split("]", 1)[1] for line in dev.lines[since:] if "info: changed:" in line]
        assert changes == [f": info: changed: {tmp_path / 'app.py'}"]
        dev.wait_for(r"generation 3 stopped$", since=since)
        assert ask(loopback(port), "x").version == "v2"


def test_dev_ignores_editor_lock_files_and_node_modules_but_reloads_on_code_and_the_manifest(
    tmp_path: Path,
) -> None:
    """watchfiles' PythonFilter decides: an Emacs lock file (.#app.py) and a package under node_modules/
    end in .py but are not the project's code; app.py and the manifest are."""
    write_handler(tmp_path, "v1")
    manifest = app_manifest(tmp_path)
    lock = tmp_path / ".#app.py"
    vendored = tmp_path / "node_modules" / "x.py"
    vendored.parent.mkdir()
    with running("--log-level", "debug", "dev", manifest, cwd=tmp_path) as dev:
        port = dev.port()
        dev.wait_for(r"ready: generation 1, 1 worker")

        def reloaded_by(generation: int, since: int) -> list[str]:
            dev.wait_for(rf"reloaded: generation {generation} serving", since=since)
            return [line.split("]", 1)[1] for line in dev.lines[since:] if "info: changed:" in line]

        # The ignored files change first: the reload that app.py causes comes after the watcher saw them.
        since = dev.mark()
        lock.write_text("user@host.1234:1700000000")
        vendored.write_text("X = 1\n")
        write_handler(tmp_path, "v2")
        assert reloaded_by(2, since) == [f": info: changed: {tmp_path / 'app.py'}"]
        assert ask(loopback(port), "x").version == "v2"

        since = dev.mark()
        lock.write_text("user@host.1234:1700000001")
        vendored.write_text("X = 2\n")
        manifest.write_text(manifest.read_text().replace("grace-period = 5.0", "grace-period = 4.0"))
        assert reloaded_by(3, since) == [f": info: changed: {manifest}"]
        dev.wait_for(r"generation 2 stopped$", since=since)
        assert dev.count(r"reloaded: generation \d+ serving") == 2


def test_the_code_change_filter_is_pythons_plus_the_watched_files(tmp_path: Path) -> None:
    """Every path dev can see, without waiting for a watcher: what reloads and what does not."""
    from watchfiles import Change

    from trio_activate.processes.supervise_main import CodeChangeFilter

    settings = tmp_path / "settings.json"
    settings.write_text("{}")
    manifest = tmp_path / "service.toml"
    manifest.write_text("")
    reloads = CodeChangeFilter([tmp_path, settings, manifest])
    for name in ["app.py", "pkg/mod.py", "types.pyi", "pyproject.toml", "service.toml", "settings.json"]:
        assert reloads(Change.modified, str(tmp_path / name)), name
    for name in [
        ".#app.py",
        "app.py~",
        ".app.py.swp",
        "node_modules/x.py",
        "__pycache__/app.cpython-311.pyc",
        ".venv/lib/x.py",
        ".git/x.py",
        ".mypy_cache/x.toml",
        "service.log",
        "other.json",
    ]:
        assert not reloads(Change.modified, str(tmp_path / name)), name


def test_a_first_worker_that_fails_waits_for_a_change(tmp_path: Path) -> None:
    """dev never gives up: a broken start waits for the fix instead of exiting."""
    write_handler(tmp_path, "v1", preamble='raise RuntimeError("half-written")\n')
    manifest = app_manifest(tmp_path)
    with running("dev", manifest, cwd=tmp_path) as dev:
        port = dev.port()
        dev.wait_for(r"before it was ready; waiting for a change to try again")
        assert dev.process.poll() is None
        write_handler(tmp_path, "v1")
        dev.wait_for(r"reloaded: generation 2 serving")
        assert ask(loopback(port), "x").version == "v1"
        # The first generation that serves came by a reload: a stop still stops dev.
        dev.send_signal(signal.SIGTERM)
        assert dev.wait() == 0


def test_ctrl_c_stops_everything_and_removes_the_socket_files(tmp_path: Path, short_dir: Path) -> None:
    """SIGINT to the terminal's process group (supervisor and worker): both stop, the socket file goes."""
    path = short_dir / "app.sock"
    write_handler(tmp_path, "v1")
    manifest = app_manifest(tmp_path, str(path))
    with running("--log-level", "debug", "dev", manifest, cwd=tmp_path) as dev:
        dev.wait_for(r"ready: generation 1, 1 worker")
        (worker,) = dev.workers_of(1)
        assert ask(str(path), "x").pid == worker
        assert path.exists()
        interrupted = time.monotonic()
        os.killpg(dev.pid, signal.SIGINT)
        assert dev.wait() == 0
        # Promptly: the file watcher's thread must not hold the exit for its 5 s timeout.  A
        # held exit takes 5 s or more; a prompt one well under that, however loaded the machine.
        assert time.monotonic() - interrupted < 4.5
        assert is_gone(worker)
        assert not path.exists()
        assert list(short_dir.iterdir()) == []
        assert "Traceback" not in dev.log


# --- dev follows its manifest: sockets changed, added, removed ------------------------------------


def two_socket_manifest(folder: Path, web: str, api: str) -> Path:
    """``folder/app.toml``: sockets ``web`` and ``api``, both served by ``app:handle`` (`write_handler`)."""
    path = folder / "app.toml"
    path.write_text(
        '[service]\npython-path = ["."]\n\n'
        f'[sockets.web]\nlisten = "{web}"\n\n[handlers.web]\nsocket = "web"\ncall = "app:handle"\n\n'
        f'[sockets.api]\nlisten = "{api}"\n\n[handlers.api]\nsocket = "api"\ncall = "app:handle"\n'
    )
    return path


def refused(address: tuple[str, int] | str | Path) -> bool:
    """Whether connecting to `address` is refused (or its socket file is gone): nothing listens there."""
    try:
        ask(address, "anyone")
    except (ConnectionRefusedError, FileNotFoundError):
        return True
    return False


def open_fds(pid: int) -> list[str]:
    """What each open fd of `pid` is (``socket:[inode]``, a path), sorted."""
    return sorted(os.readlink(entry) for entry in Path(f"/proc/{pid}/fd").iterdir())


def test_a_changed_port_is_served_by_the_new_generation_and_the_old_port_closes(tmp_path: Path) -> None:
    write_handler(tmp_path, "v1")
    manifest = app_manifest(tmp_path)
    new_port = free_port()
    with running("--log-level", "debug", "dev", manifest, cwd=tmp_path) as dev:
        old_port = dev.port()
        dev.wait_for(r"ready: generation 1, 1 worker")
        (first,) = dev.workers_of(1)
        assert ask(loopback(old_port), "a").pid == first
        since = dev.mark()
        manifest.write_text(manifest.read_text().replace('"127.0.0.1:0"', f'"127.0.0.1:{new_port}"'))
        dev.wait_for(rf"sockets\.web: new socket on 127\.0\.0\.1:{new_port} for generation 2", since=since)
        dev.wait_for(r"reloaded: generation 2 serving", since=since)
        (second,) = dev.workers_of(2, since=since)
        assert ask(loopback(new_port), "b").pid == second
        # Closed once the old generation stopped, not before.
        stopped = dev.wait_for(r"generation 1 stopped$", since=since)
        closed = dev.wait_for(rf"sockets\.web: closed 127\.0\.0\.1:{old_port} \(", since=since)
        assert dev.lines.index(closed.string) > dev.lines.index(stopped.string)
        assert refused(loopback(old_port))
        # The worker saw the manifest's address: no warning about where the socket listens.
        assert "authoritative" not in dev.log
        assert dev.stop() == 0
        assert refused(loopback(new_port))


def test_an_added_socket_and_handler_are_served_after_the_reload(tmp_path: Path) -> None:
    write_handler(tmp_path, "v1")
    manifest = app_manifest(tmp_path)
    with running("--log-level", "debug", "dev", manifest, cwd=tmp_path) as dev:
        web = dev.port()
        dev.wait_for(r"ready: generation 1, 1 worker")
        since = dev.mark()
        with manifest.open("a") as file:
            file.write('\n[sockets.api]\nlisten = "127.0.0.1:0"\n')
            file.write('\n[handlers.api]\nsocket = "api"\ncall = "app:handle"\n')
        api = int(dev.wait_for(r"sockets\.api: listening on 127\.0\.0\.1:(\d+) \(port 0", since=since)[1])
        dev.wait_for(r"sockets\.api: new socket on .* for generation 2 \(added\)$", since=since)
        dev.wait_for(r"reloaded: generation 2 serving", since=since)
        (second,) = dev.workers_of(2, since=since)
        assert ask(loopback(api), "a").pid == second
        assert ask(loopback(web), "b").pid == second
        assert dev.count(r"error|warning", since=since) == 0


def test_a_removed_socket_is_closed_and_its_socket_file_removed(tmp_path: Path, short_dir: Path) -> None:
    path = short_dir / "api.sock"
    write_handler(tmp_path, "v1")
    manifest = two_socket_manifest(tmp_path, "127.0.0.1:0", str(path))
    with running("--log-level", "debug", "dev", manifest, cwd=tmp_path) as dev:
        web = dev.port()
        dev.wait_for(r"ready: generation 1, 1 worker")
        assert ask(str(path), "a").version == "v1"
        since = dev.mark()
        text = manifest.read_text()
        manifest.write_text(text[: text.index("[sockets.api]")])
        dev.wait_for(r"sockets\.api: removed; closed once the generation serving it stops", since=since)
        dev.wait_for(r"reloaded: generation 2 serving", since=since)
        (second,) = dev.workers_of(2, since=since)
        stopped = dev.wait_for(r"generation 1 stopped$", since=since)
        closed = dev.wait_for(rf"sockets\.api: closed {path} \(", since=since)
        assert dev.lines.index(closed.string) > dev.lines.index(stopped.string)
        assert not path.exists()
        assert refused(str(path))
        assert ask(loopback(web), "b").pid == second
        assert dev.stop() == 0
    assert list(short_dir.iterdir()) == []


def test_a_changed_port_that_is_busy_fails_the_reload_in_one_line_and_the_old_port_serves(
    tmp_path: Path,
) -> None:
    write_handler(tmp_path, "v1")
    manifest = app_manifest(tmp_path)
    with socket.socket() as squatter, running("--log-level", "debug", "dev", manifest, cwd=tmp_path) as dev:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        busy = squatter.getsockname()[1]
        old_port = dev.port()
        dev.wait_for(r"ready: generation 1, 1 worker")
        (first,) = dev.workers_of(1)
        fds = open_fds(dev.pid)
        since = dev.mark()
        manifest.write_text(manifest.read_text().replace('"127.0.0.1:0"', f'"127.0.0.1:{busy}"'))
        failed = dev.wait_for(r"error: reload failed: ", since=since)
        assert failed.string.endswith(
            f"error: reload failed: generation 2: app.toml: sockets.web.listen: 127.0.0.1:{busy}: "
            "address already in use (another process listens there); generation 1 keeps serving"
        )
        assert ask(loopback(old_port), "a").pid == first
        # One line; no worker started, nothing half-changed, no fd left behind.
        assert dev.count(r"error|warning|Traceback", since=since) == 1
        assert dev.workers_of(2, since=since) == set()
        assert open_fds(dev.pid) == fds

        # Free, and the manifest touched again: now it moves.
        squatter.close()
        since = dev.mark()
        manifest.write_text(manifest.read_text() + "\n")
        dev.wait_for(r"reloaded: generation 3 serving", since=since)
        (third,) = dev.workers_of(3, since=since)
        assert ask(loopback(busy), "b").pid == third
        dev.wait_for(rf"sockets\.web: closed 127\.0\.0\.1:{old_port} \(", since=since)
        assert refused(loopback(old_port))


def test_an_unchanged_socket_keeps_its_fd_and_refuses_nobody_while_another_changes(tmp_path: Path) -> None:
    write_handler(tmp_path, "v1")
    manifest = two_socket_manifest(tmp_path, "127.0.0.1:0", "127.0.0.1:0")
    with running("--log-level", "debug", "dev", manifest, cwd=tmp_path) as dev:
        web = dev.port("web")
        dev.port("api")
        dev.wait_for(r"ready: generation 1, 1 worker")
        (first,) = dev.workers_of(1)
        with ClientLoop(loopback(web), max_seconds=40.0) as loop:
            loop.wait_for(pids=[first])
            since = dev.mark()
            # api moves (a new socket); web stays exactly as it was.
            manifest.write_text(
                manifest.read_text().replace(
                    '"127.0.0.1:0"\n\n[handlers.api]', '"127.0.0.1:0"\nbacklog = 64\n\n[handlers.api]'
                )
            )
            dev.wait_for(r"sockets\.api: new socket on .* for generation 2", since=since)
            dev.wait_for(r"reloaded: generation 2 serving", since=since)
            (second,) = dev.workers_of(2, since=since)
            dev.wait_for(r"sockets\.api: closed ", since=since)
            loop.wait_for(pids=[second])
        assert loop.failures == []
        assert {answer.pid for answer in loop.answers} == {first, second}
        assert dev.count(r"sockets\.web: (new socket|closed)") == 0


# --- what dev tells ----------------------------------------------------------------------------------


def test_dev_says_in_one_line_what_it_watches(tmp_path: Path) -> None:
    """The folders (for code) and the files watched by name, once, at start; a path that does not
    exist is a warning of its own."""
    write_handler(tmp_path, "v1")
    lib = tmp_path / "lib"
    lib.mkdir()
    manifest = app_manifest(tmp_path)
    manifest.write_text(manifest.read_text().replace('python-path = ["."]', 'python-path = [".", "lib"]'))
    extra = tmp_path / "settings.json"
    extra.write_text("{}")
    missing = tmp_path / "missing.json"
    with running("dev", manifest, "--watch", extra, "--watch", missing, cwd=tmp_path) as dev:
        dev.wait_for(r"ready: generation 1, 1 worker")
        assert dev.count(r"info: watching ") == 1
        line = dev.wait_for(r"info: watching ").string
        assert line.endswith(
            f"info: watching .py, .pyx, .pyd, .pyi, .toml files in {tmp_path}, {lib} "
            f"and the files {manifest}, {extra}"
        )
        assert dev.count(rf"warning: not watching {missing}: it does not exist$") == 1


def test_an_import_error_is_one_line_after_the_traceback_of_the_users_code_only(tmp_path: Path) -> None:
    """Nothing of trio-activate's frames or importlib's machinery: the path through the user's files
    to the line that raised, the exception, and the one error line."""
    (tmp_path / "settings.py").write_text(
        'def connect():\n    raise ValueError("no database")\n\n\nconnect()\n'
    )
    write_handler(tmp_path, "v1", preamble="import settings\n")
    manifest = app_manifest(tmp_path)
    with running("dev", manifest, cwd=tmp_path) as dev:
        failed = dev.wait_for(r"error: app\.toml: handlers\.web\.call: importing 'app' raised ValueError: ")
        dev.wait_for(r"before it was ready; waiting for a change to try again")
        lines = dev.lines
        end = lines.index(failed.string)
        start = max(i for i in range(end) if lines[i] == "Traceback (most recent call last):")
        shown = [line for line in lines[start:end] if line.strip().strip("^~") != ""]
        assert shown == [
            "Traceback (most recent call last):",
            f'  File "{tmp_path / "app.py"}", line 1, in <module>',
            "    import settings",
            f'  File "{tmp_path / "settings.py"}", line 5, in <module>',
            "    connect()",
            f'  File "{tmp_path / "settings.py"}", line 2, in connect',
            '    raise ValueError("no database")',
            "ValueError: no database",
        ]
        assert failed.string.endswith(f"ValueError: no database (at {tmp_path / 'settings.py'}:2)")
        assert dev.count("Traceback") == 1
        assert "importlib" not in dev.log
        assert "trio_activate/" not in dev.log
