"""The command line: exit codes, one-line errors on stderr, and `init` output that `check` accepts."""

from __future__ import annotations

import tomllib
from pathlib import Path

import httpx
import pytest
from helpers import TRIO_ACTIVATE, clean_env, one_line_error, run_cli, started

from trio_activate import __version__
from trio_activate.cli.commands import main
from trio_activate.model.manifest import load_manifest, parse_manifest

CONFIG = Path(__file__).parent.parent / "config"


def test_version_prints_the_package_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"trio-activate {__version__}"


@pytest.mark.parametrize("command", ["check", "init", "serve", "fds"])
def test_every_subcommand_has_help(command: str) -> None:
    result = run_cli(command, "--help")
    assert result.returncode == 0
    assert f"usage: trio-activate {command}" in result.stdout


def test_usage_errors_exit_2() -> None:
    assert run_cli().returncode == 2
    assert run_cli("check").returncode == 2
    assert run_cli("nonsense").returncode == 2


def test_check_prints_the_normalized_manifest_as_toml(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(CONFIG / "echo.toml")]) == 0
    out = capsys.readouterr().out
    assert parse_manifest(out) == load_manifest(CONFIG / "echo.toml")
    document = tomllib.loads(out)
    assert document["sockets"]["echo"]["backlog"] == 4096  # defaults are explicit


def test_check_accepts_every_example_at_once() -> None:
    paths = sorted(str(p) for p in CONFIG.glob("*.toml"))
    result = run_cli("check", *paths)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    for path in paths:
        assert f"# {path}" in result.stdout


def test_check_error_is_one_line_on_stderr_and_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[sockets.echo]\nlisten = "127.0.0.1:70000"\n')
    result = run_cli("check", str(bad))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == (
        f"trio-activate: {bad}: sockets.echo.listen: '127.0.0.1:70000': port 70000 is out of range 0-65535\n"
    )


def test_check_missing_file_is_one_line(tmp_path: Path) -> None:
    result = run_cli("check", str(tmp_path / "nope.toml"))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "nope.toml: cannot read: No such file or directory" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_prints_warnings_on_stderr_and_still_succeeds(tmp_path: Path) -> None:
    path = tmp_path / "lonely.toml"
    path.write_text('[sockets.lonely]\nlisten = "127.0.0.1:0"\n')
    result = run_cli("check", str(path))
    assert result.returncode == 0
    assert "warning:" in result.stderr
    assert "sockets.lonely: no handler serves this socket" in result.stderr


def test_init_writes_a_starter_that_check_accepts(tmp_path: Path) -> None:
    result = run_cli("init", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    written = tmp_path / "service.toml"
    assert written.read_text().startswith("# trio-activate manifest")
    manifest = load_manifest(written)
    assert manifest.warnings == ()
    assert run_cli("check", str(written)).returncode == 0


def test_init_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text("precious")
    result = run_cli("init", str(path))
    assert result.returncode == 2
    assert result.stderr == f"trio-activate: {path}: already exists; not overwriting it\n"
    assert path.read_text() == "precious"


def test_init_into_a_missing_folder_is_one_line(tmp_path: Path) -> None:
    result = run_cli("init", str(tmp_path / "no" / "such" / "x.toml"))
    assert result.returncode == 2
    assert "cannot write: No such file or directory" in result.stderr
    assert result.stderr.count("\n") == 1


def test_init_asgi_writes_a_manifest_and_an_app_that_check_accepts_and_that_serve(tmp_path: Path) -> None:
    result = run_cli("init", "--asgi", "web.toml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "wrote web.toml and app.py; check it with: trio-activate check web.toml\n"
    manifest = load_manifest(tmp_path / "web.toml")
    assert manifest.warnings == ()
    (handler,) = manifest.handlers
    assert (handler.kind.value, handler.call) == ("asgi", "app:app")
    checked = run_cli("check", str(tmp_path / "web.toml"))
    assert (checked.returncode, checked.stderr) == (0, "")
    argv = [*TRIO_ACTIVATE, "serve", "web.toml", "--set", "sockets.web.listen=127.0.0.1:0"]
    with started(argv, cwd=tmp_path, env=clean_env()) as process:
        port = process.port("web")
        process.wait_for("info: ready: ")
        answer = httpx.get(f"http://127.0.0.1:{port}/hi", timeout=5)
        assert (answer.status_code, answer.text) == (200, "Hello, world! (/hi)\n")
        assert process.stop() == 0


def test_init_asgi_writes_nothing_when_the_app_exists(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text("precious")
    result = run_cli("init", "--asgi", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == "trio-activate: app.py: already exists; not overwriting it\n"
    assert (tmp_path / "app.py").read_text() == "precious"
    assert not (tmp_path / "service.toml").exists(), "all or nothing"


# --- check imports the handlers -------------------------------------------------

SERVICE = '[sockets.web]\nlisten = "127.0.0.1:0"\n[handlers.web]\nsocket = "web"\ncall = "app:handle"\n'
UDP = (
    '[sockets.dns]\nlisten = "127.0.0.1:0"\ntype = "datagram"\n'
    '[handlers.dns]\nsocket = "dns"\ncall = "app:handle"\n'
)
LISTENER = SERVICE + 'kind = "listener"\n'


@pytest.mark.parametrize(
    ("manifest", "module", "problem"),
    [
        (
            SERVICE,
            "async def handle():\n    pass\n",
            "app:handle takes no argument; a stream handler is called with the stream",
        ),
        (
            SERVICE,
            "async def handle(stream, peer):\n    pass\n",
            "app:handle cannot be called with one argument (missing a required argument: 'peer'); "
            "a stream handler is called with the stream",
        ),
        (
            UDP,
            "async def handle(*, sock):\n    pass\n",
            "app:handle takes no argument; a datagram handler is called with the Trio socket",
        ),
        (
            LISTENER,
            "class Server:\n    async def run(self):\n        pass\nhandle = Server().run\n",
            "app:handle takes no argument; "
            "a listener handler is called with the list of its trio.SocketListener",
        ),
    ],
    ids=["stream-none", "stream-two", "datagram-keyword-only", "listener-bound-method"],
)
def test_check_imports_each_handler_and_checks_it_takes_what_its_kind_passes(
    tmp_path: Path, manifest: str, module: str, problem: str
) -> None:
    (tmp_path / "svc.toml").write_text(manifest)
    (tmp_path / "app.py").write_text(module)
    result = run_cli("check", str(tmp_path / "svc.toml"))
    assert result.returncode == 2
    assert result.stdout == ""
    name = "dns" if manifest is UDP else "web"
    assert one_line_error(result.stderr) == f"trio-activate: svc.toml: handlers.{name}.call: {problem}"
    # --no-import checks the file alone, which is fine.
    skipped = run_cli("check", "--no-import", str(tmp_path / "svc.toml"))
    assert skipped.returncode == 0, skipped.stderr
    assert tomllib.loads(skipped.stdout)["handlers"][name]["call"] == "app:handle"


@pytest.mark.parametrize(
    "module",
    [
        "async def handle(stream):\n    pass\n",
        "async def handle(stream, *args, timeout=1, **kwargs):\n    pass\n",
        "class Handler:\n    async def __call__(self, stream):\n        pass\nhandle = Handler()\n",
    ],
    ids=["plain", "extras", "callable-instance"],
)
def test_check_accepts_a_handler_that_takes_one_argument(tmp_path: Path, module: str) -> None:
    (tmp_path / "svc.toml").write_text(SERVICE)
    (tmp_path / "app.py").write_text("print('imported')\n" + module)
    result = run_cli("check", str(tmp_path / "svc.toml"))
    assert result.returncode == 0, result.stderr
    # What the handler's module prints goes to stderr: stdout stays the manifest.
    assert tomllib.loads(result.stdout)["handlers"]["web"]["call"] == "app:handle"
    assert result.stderr == "imported\n"


def test_check_imports_each_manifests_handlers_in_a_clean_interpreter(tmp_path: Path) -> None:
    """Two manifests whose handlers are both ``app:handle``, from different folders: the second
    is imported from its own folder, not taken from the first's ``app`` left imported."""
    for folder, signature in (("good", "stream"), ("bad", "")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "svc.toml").write_text(SERVICE)
        (tmp_path / folder / "app.py").write_text(f"async def handle({signature}):\n    pass\n")
    result = run_cli("check", str(tmp_path / "good" / "svc.toml"), str(tmp_path / "bad" / "svc.toml"))
    assert result.returncode == 2
    assert one_line_error(result.stderr) == (
        "trio-activate: svc.toml: handlers.web.call: app:handle takes no argument; "
        "a stream handler is called with the stream"
    )
    assert f"# {tmp_path / 'good' / 'svc.toml'}" in result.stdout


def test_check_says_when_a_python_path_folder_does_not_exist(tmp_path: Path) -> None:
    (tmp_path / "svc.toml").write_text('[service]\npython-path = ["lib"]\n' + SERVICE)
    result = run_cli("check", str(tmp_path / "svc.toml"))
    assert result.returncode == 2
    assert one_line_error(result.stderr) == (
        "trio-activate: svc.toml: handlers.web.call: cannot import 'app': No module named 'app'; "
        f"python-path folder 'lib' does not exist ({tmp_path / 'lib'})"
    )
    assert run_cli("check", "--no-import", str(tmp_path / "svc.toml")).returncode == 0


def test_check_says_when_the_import_ends_the_process(tmp_path: Path) -> None:
    (tmp_path / "svc.toml").write_text(SERVICE)
    (tmp_path / "app.py").write_text("import os\nos._exit(7)\n")
    result = run_cli("check", str(tmp_path / "svc.toml"))
    assert result.returncode == 2
    assert one_line_error(result.stderr) == (
        "trio-activate: svc.toml: importing the handlers ended the process with status 7 "
        "before they were checked"
    )


def test_a_start_out_of_fds_is_one_line_and_leaves_no_socket_file(short_dir: Path) -> None:
    """``prlimit --nofile=N`` from too few to start up to enough to serve: every start that fails
    in this package says so in one line, exit 1, and removes the socket file it made (remove-on-stop
    or not).  Below some N the interpreter itself cannot start; that is not ours to word."""
    import shutil
    import time

    prlimit = shutil.which("prlimit")
    if prlimit is None:
        pytest.skip("needs prlimit (util-linux)")
    manifest = short_dir / "em.toml"
    manifest.write_text(
        '[service]\nname = "em"\n[sockets.u]\nlisten = "./u.sock"\n'
        '[handlers.u]\nsocket = "u"\ncall = "trio_activate.examples:echo"\n'
    )
    ours = 0
    for limit in range(3, 40):
        argv = [prlimit, f"--nofile={limit}:{limit}", *TRIO_ACTIVATE, "serve", str(manifest)]
        with started(argv, cwd=short_dir) as run:
            deadline = time.monotonic() + 20
            while "ready: " not in run.log and run.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            if "ready: " in run.log:
                assert run.stop() == 0
                break
            assert run.wait() != 0, run.log
            assert not (short_dir / "u.sock").exists(), f"--nofile={limit}: the socket file is left"
            if "Fatal Python error: init_" in run.log or "error while loading shared libraries" in run.log:
                continue  # the interpreter's own start-up (the loader, site), before this package's code
            assert run.returncode == 1, run.log
            assert "Traceback" not in run.log, run.log
            assert run.log.splitlines()[-1].startswith("trio-activate: out of file descriptors"), run.log
            ours += 1
    else:
        pytest.fail("no limit up to 40 fds let it serve")
    assert ours >= 2, "starts that failed in this package's code, past the interpreter's"
