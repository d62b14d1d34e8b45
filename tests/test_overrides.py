"""``--set KEY=VALUE``: overrides of the manifest on the command line, for every process that reads it.

The forms and the errors are checked on `load_manifest` and through ``check``;
the rest runs the real command line: the forked activator binds an overridden
address, a supervisor's workers, a hand-over successor and ``dev``'s workers
after a reload all read the manifest with the overrides.  A second handler
module (``other.py``, version ``override``) tells an override's code from the
file's (``app.py``).
"""

from __future__ import annotations

import signal
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import (
    HANDLER,
    Answer,
    app_manifest,
    ask,
    clean_env,
    free_port,
    loopback,
    one_line_error,
    run_cli,
    running,
    wait_until,
    write_handler,
)

from trio_activate.model.address import parse_address
from trio_activate.model.manifest import Manifest, apply_overrides, load_manifest, read_manifest_document

OTHER = "handlers.web.call=other:handle"


def write_other(folder: Path, version: str = "override") -> None:
    (folder / "other.py").write_text(HANDLER.format(version=version))


# --- the forms ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "read"),
    [
        (
            "sockets.web.listen=127.0.0.1:9000",
            lambda m: m.sockets[0].listen == (parse_address("127.0.0.1:9000"),),
        ),
        (
            'sockets.web.listen=["127.0.0.1:1","[::1]:1"]',
            lambda m: m.sockets[0].listen == (parse_address("127.0.0.1:1"), parse_address("[::1]:1")),
        ),
        ("service.workers=4", lambda m: m.service.workers == 4),
        ("service.grace-period=2.5", lambda m: m.service.grace_period == 2.5),
        ("sockets.web.reuse-port=true", lambda m: m.sockets[0].reuse_port is True),
        # A string TOML would not read is taken as it is; a quoted one is TOML's.
        ("handlers.web.call=other:handle", lambda m: m.handlers[0].call == "other:handle"),
        ('service.name="true"', lambda m: m.service.name == "true"),
        ('service.python-path=["lib", "."]', lambda m: m.service.python_path == ("lib", ".")),
        # The [service] table the file does not have.
        ("service.start-timeout=7", lambda m: m.service.start_timeout == 7.0),
    ],
)
def test_each_form_of_value_is_read_as_toml_or_as_the_string_it_is(
    tmp_path: Path, override: str, read: Callable[[Manifest], bool]
) -> None:
    path = tmp_path / "svc.toml"
    path.write_text(
        '[sockets.web]\nlisten = "127.0.0.1:0"\n[handlers.web]\nsocket = "web"\ncall = "app:handle"\n'
    )
    manifest = load_manifest(path, overrides=[override])
    assert read(manifest), manifest


def test_a_quoted_key_part_and_the_last_of_two_sets_win(tmp_path: Path) -> None:
    path = tmp_path / "svc.toml"
    path.write_text('[sockets."a.b"]\nlisten = "127.0.0.1:0"\n[sockets.c]\nlisten = "127.0.0.1:0"\n')
    overrides = ['sockets."a.b".backlog=10', "sockets.c.backlog=5", "sockets.c.backlog=6"]
    manifest = load_manifest(path, overrides=overrides)
    assert [spec.backlog for spec in manifest.sockets] == [10, 6]


def test_the_document_given_is_left_as_it_was(tmp_path: Path) -> None:
    """The activator passes the file's document on; the service applies the same overrides to it."""
    path = app_manifest(tmp_path)
    document = read_manifest_document(path)
    before = repr(document)
    changed, _ = apply_overrides(
        document, ["sockets.web.listen=127.0.0.1:1", "service.workers=3"], source="x"
    )
    assert repr(document) == before
    assert changed["sockets"]["web"]["listen"] == "127.0.0.1:1"
    assert changed["service"]["workers"] == 3


def test_check_prints_the_manifest_with_the_overrides(tmp_path: Path) -> None:
    path = app_manifest(tmp_path)
    result = run_cli(
        "check",
        str(path),
        "--no-import",
        "--set",
        "service.workers=4",
        "--set=sockets.web.listen=127.0.0.1:9000",
    )
    assert result.returncode == 0, result.stderr
    document = tomllib.loads(result.stdout)
    assert document["service"]["workers"] == 4
    assert document["sockets"]["web"]["listen"] == "127.0.0.1:9000"


# --- errors ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("service.workers=0", "--set service.workers: 0 is out of range: expected at least 1"),
        ("service.workers=four", "--set service.workers: expected an integer, got a string"),
        ("service.wrkers=4", "--set service.wrkers: unknown key; did you mean 'workers'?"),
        (
            "sockets.web.listen=127.0.0.1:70000",
            "--set sockets.web.listen: '127.0.0.1:70000': port 70000 is out",
        ),
        (
            'sockets.web.listen=["127.0.0.1:1", 3]',
            "--set sockets.web.listen[1]: expected a string, got an integer",
        ),
        (
            "handlers.web.kind=datagram",
            "--set handlers.web.kind: a datagram handler cannot serve sockets.web",
        ),
        ("servce.workers=1", "--set servce.workers: unknown key 'servce'; did you mean 'service'?"),
        (
            "sockets=1",
            "--set sockets: names a table; --set sets one key in it (e.g. --set sockets.NAME.listen=",
        ),
        ("sockets.web=1", "--set sockets.web: names a table"),
        ("service={workers = 2}", "--set service: names a table"),
        (
            "sockets.wbe.listen=127.0.0.1:1",
            "--set sockets.wbe.listen: {path} declares no socket named 'wbe' (did you mean 'web'?)",
        ),
        ("service.workers.max=1", "--set service.workers.max: service.workers is not a table"),
        ("service.workers", "--set 'service.workers': expected KEY=VALUE"),
    ],
)
def test_a_bad_override_is_one_line_naming_set_and_the_key(
    tmp_path: Path, override: str, expected: str
) -> None:
    path = app_manifest(tmp_path)
    result = run_cli("check", "--no-import", str(path), "--set", override, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    line = one_line_error(result.stderr)
    assert line.startswith(f"trio-activate: {expected.format(path=path)}"), line


def test_serve_with_a_bad_override_is_the_same_one_line_from_the_self_activated_start(tmp_path: Path) -> None:
    """The forked activator reads the manifest with the overrides and fails first: its error is told once."""
    path = app_manifest(tmp_path)
    write_handler(tmp_path, "v1")
    result = run_cli("serve", str(path), "--set", "service.wrkers=4", cwd=tmp_path)
    assert result.returncode == 2
    assert (
        one_line_error(result.stderr)
        == "trio-activate: --set service.wrkers: unknown key; did you mean 'workers'?"
    )


# --- every process reads the manifest with them ------------------------------


def test_an_overridden_listen_address_is_what_the_self_activated_serve_binds(tmp_path: Path) -> None:
    """The forked activator creates the sockets: it must bind the override, not the file's port 0."""
    write_handler(tmp_path, "v1")
    path = app_manifest(tmp_path)
    port = free_port()
    with running(
        "serve", path, "--set", f"sockets.web.listen=127.0.0.1:{port}", cwd=tmp_path, env=clean_env()
    ) as service:
        service.wait_for(r"ready: ")
        assert ask(loopback(port), "x") == Answer(service.pid, "v1")
        assert service.stop() == 0
    assert "1 socket created by the internal activator" in service.log
    assert f"sockets.web: 127.0.0.1:{port} stream (fd 3)" in service.log
    assert "warning" not in service.log  # the service read the same address as the activator bound
    assert "port 0" not in service.log


def test_the_workers_of_a_supervisor_read_the_manifest_with_the_overrides(tmp_path: Path) -> None:
    """``service.workers=2`` makes the supervisor; each worker serves the overridden handler."""
    write_handler(tmp_path, "v1")
    write_other(tmp_path)
    path = app_manifest(tmp_path)
    with running(
        "--log-level", "debug", "serve", path, "--set", OTHER, "--set", "service.workers=2", cwd=tmp_path
    ) as service:
        port = service.port()
        service.wait_for(r"ready: generation 1, 2 worker")
        workers = service.workers_of(1)
        assert len(workers) == 2
        answers = {ask(loopback(port), f"q{n}") for n in range(20)}
        assert {answer.version for answer in answers} == {"override"}
        assert {answer.pid for answer in answers} <= workers
        assert service.stop() == 0


def test_a_hand_over_successor_reads_the_manifest_with_the_overrides(tmp_path: Path) -> None:
    write_handler(tmp_path, "v1")
    write_other(tmp_path)
    path = app_manifest(tmp_path)
    with running("serve", path, "--set", OTHER, cwd=tmp_path) as service:
        port = service.port()
        service.wait_for(r"ready: ")
        assert ask(loopback(port), "a") == Answer(service.pid, "override")
        service.send_signal(signal.SIGHUP)
        service.wait_for(r"handed over to")
        wait_until(lambda: ask(loopback(port), "b").pid != service.pid, what="the successor answers")
        assert ask(loopback(port), "c").version == "override"


def test_dev_keeps_the_overrides_across_reloads(tmp_path: Path) -> None:
    """Its workers read the manifest with them after a reload, and so does dev when it follows the
    manifest's sockets: an overridden address is no change (no new socket, the same port)."""
    write_handler(tmp_path, "v1")
    write_other(tmp_path)
    path = app_manifest(tmp_path)
    port = free_port()
    listen = f"sockets.web.listen=127.0.0.1:{port}"
    with running("dev", path, "--set", OTHER, "--set", listen, cwd=tmp_path, env=clean_env()) as dev:
        dev.wait_for(r"ready: generation 1, 1 worker")
        assert ask(loopback(port), "a").version == "override"
        write_other(tmp_path, "override-2")
        dev.wait_for(r"reloaded: generation 2 serving")
        assert ask(loopback(port), "b").version == "override-2"
        # The manifest itself changes: dev reads it again, with the overrides.
        path.write_text(path.read_text().replace("grace-period = 5.0", "grace-period = 4.0"))
        dev.wait_for(r"reloaded: generation 3 serving")
        assert ask(loopback(port), "c").version == "override-2"
        assert dev.stop() == 0
    assert "new socket" not in dev.log
    assert "port 0" not in dev.log
