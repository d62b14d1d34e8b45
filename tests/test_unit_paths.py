"""What the service reads and whether its user can: the file system as the unit's user sees it."""

from __future__ import annotations

import os
import pwd
import sys
from pathlib import Path

import pytest

from trio_activate.errors import ManifestError
from trio_activate.model.manifest import load_manifest
from trio_activate.system.unit_paths import ServiceUser, check_reachable, needed_paths, service_user

ECHO = '[sockets.echo]\nlisten = "127.0.0.1:7000"\n'
COMMAND = [sys.executable, "-m", "trio_activate"]
DYNAMIC = ServiceUser("the service's DynamicUser")
NOBODY = pwd.getpwnam("nobody")


def manifest_in(folder: Path, text: str = ECHO, mode: int = 0o755) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(mode)
    path = folder / "service.toml"
    path.write_text(text)
    path.chmod(0o644)
    return path


def refusal(path: Path, user: ServiceUser = DYNAMIC) -> str:
    with pytest.raises(ManifestError) as info:
        check_reachable(load_manifest(path), path, COMMAND, user)
    message = str(info.value)
    assert "\n" not in message, "one line"
    return message


def test_needed_paths_are_the_installation_the_manifest_folder_and_python_path(tmp_path: Path) -> None:
    path = manifest_in(tmp_path / "svc", '[service]\npython-path = [".", "lib"]\n' + ECHO)
    needed = {n.path: n.why for n in needed_paths(load_manifest(path), path, COMMAND)}
    assert needed[str(Path(sys.base_prefix).resolve())] == "The interpreter's installation"
    assert needed[str(tmp_path / "svc")] == "The manifest's folder"
    assert needed[str(tmp_path / "svc" / "lib")] == "The python-path folder 'lib'"
    import trio_activate

    assert str(Path(trio_activate.__file__).resolve().parent.parent) in needed
    assert not any(why == "The manifest" for why in needed.values()), "files are reached through folders"


def test_a_folder_the_sandbox_binds_back_counts_its_own_mode_not_its_parents(tmp_path: Path) -> None:
    """tmp_path is 0700, but under PrivateTmp= the unit binds svc onto a fresh /tmp: its parents are 0755."""
    assert tmp_path.stat().st_mode & 0o777 == 0o700
    path = manifest_in(tmp_path / "svc")
    check_reachable(load_manifest(path), path, COMMAND, DYNAMIC)


def test_a_dynamic_user_gets_the_other_bits_only(tmp_path: Path) -> None:
    path = manifest_in(tmp_path / "svc", mode=0o750)
    assert refusal(path) == (
        f"service.toml: The manifest's folder {tmp_path / 'svc'}: the service's DynamicUser cannot read "
        f"{tmp_path / 'svc'} (mode 0750, owner root:root); "
        "set [service] user to a user who can, or move it where that user can read it"
    )


def test_an_unreadable_manifest_is_refused(tmp_path: Path) -> None:
    path = manifest_in(tmp_path / "svc")
    path.chmod(0o600)
    assert "The manifest " in refusal(path)
    assert "cannot read" in refusal(path)


def test_a_python_path_folder_the_user_cannot_read_is_refused(tmp_path: Path) -> None:
    path = manifest_in(tmp_path / "svc", '[service]\npython-path = ["lib"]\n' + ECHO)
    (tmp_path / "svc" / "lib").mkdir(mode=0o711)
    (tmp_path / "svc" / "lib").chmod(0o711)
    assert "The python-path folder 'lib'" in refusal(path)


def test_a_named_user_passes_by_the_owner_bits(tmp_path: Path) -> None:
    path = manifest_in(tmp_path / "svc", f'[service]\nuser = "nobody"\n{ECHO}', mode=0o700)
    os.chown(tmp_path / "svc", NOBODY.pw_uid, 0)
    manifest = load_manifest(path)
    check_reachable(manifest, path, COMMAND, service_user(manifest))
    assert "the service's DynamicUser cannot read" in refusal(path)


def test_a_named_user_passes_by_the_group_bits(tmp_path: Path) -> None:
    path = manifest_in(tmp_path / "svc", f'[service]\nuser = "nobody"\n{ECHO}', mode=0o750)
    os.chown(tmp_path / "svc", 0, NOBODY.pw_gid)
    manifest = load_manifest(path)
    check_reachable(manifest, path, COMMAND, service_user(manifest))


def test_root_passes_by_the_bits_too_having_no_capabilities(tmp_path: Path) -> None:
    path = manifest_in(tmp_path / "svc", f'[service]\nuser = "root"\n{ECHO}', mode=0o750)
    os.chown(tmp_path / "svc", NOBODY.pw_uid, NOBODY.pw_gid)
    manifest = load_manifest(path)
    assert "user 'root' cannot read" in refusal(path, service_user(manifest))


def test_a_user_this_machine_does_not_know_is_refused(tmp_path: Path) -> None:
    manifest = load_manifest(manifest_in(tmp_path / "svc", f'[service]\nuser = "no-such-user"\n{ECHO}'))
    with pytest.raises(ManifestError) as info:
        service_user(manifest)
    assert str(info.value) == (
        "service.toml: service.user: no user 'no-such-user' on this machine (systemd would fail to start "
        "the unit); create it, or leave user unset for DynamicUser="
    )


def test_a_numeric_user_needs_no_entry_and_gets_the_group_given(tmp_path: Path) -> None:
    manifest = load_manifest(manifest_in(tmp_path / "svc", f"[service]\nuser = 4242\ngroup = 4343\n{ECHO}"))
    assert service_user(manifest) == ServiceUser("user '4242'", 4242, frozenset({4343}))


def test_an_interpreter_the_user_cannot_read_is_refused_naming_what_to_do(tmp_path: Path) -> None:
    """Checked for the interpreter running trio-activate systemd: a venv in a folder only root may read."""
    import subprocess

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    venv.chmod(0o700)
    path = manifest_in(tmp_path / "svc")
    roots = {Path(__import__(name).__file__).resolve().parent.parent for name in ("trio_activate", "trio")}
    result = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-m",
            "trio_activate",
            "systemd",
            str(path),
            "--systemd-version",
            "252",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(map(str, roots))},
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"trio-activate: service.toml: The interpreter's environment {venv}: the service's DynamicUser "
        f"cannot read {venv} (mode 0700, owner root:root); install trio-activate where that user can read "
        "it (a venv outside home folders, e.g. made from /usr/bin/python3), or set [service] user"
    ]


def tls_manifest(tmp_path: Path, key_mode: int = 0o644) -> Path:
    """An asgi handler: its certificate outside the manifest's folder, its key absolute, its CAs inside."""
    (tmp_path / "tls").mkdir()
    (tmp_path / "tls").chmod(0o755)
    for name in ("cert.pem", "key.pem"):
        (tmp_path / "tls" / name).write_text("PEM")
        (tmp_path / "tls" / name).chmod(0o644)
    (tmp_path / "tls" / "key.pem").chmod(key_mode)
    path = manifest_in(
        tmp_path / "svc",
        '[sockets.web]\nlisten = "127.0.0.1:8443"\n[handlers.web]\nsocket = "web"\nkind = "asgi"\n'
        'call = "app:app"\n[handlers.web.http]\ncertfile = "../tls/cert.pem"\n'
        f'keyfile = "{tmp_path / "tls" / "key.pem"}"\nca-certs = "ca.pem"\n',
    )
    (tmp_path / "svc" / "ca.pem").write_text("PEM")
    (tmp_path / "svc" / "ca.pem").chmod(0o644)
    return path


def test_tls_files_are_needed_paths_each_kept_reachable(tmp_path: Path) -> None:
    path = tls_manifest(tmp_path)
    needed = {n.path: n.why for n in needed_paths(load_manifest(path), path, COMMAND)}
    assert needed[str(tmp_path / "tls" / "cert.pem")] == "The TLS file handlers.web.http.certfile"
    assert needed[str(tmp_path / "tls" / "key.pem")] == "The TLS file handlers.web.http.keyfile"
    assert needed[str(tmp_path / "svc" / "ca.pem")] == "The TLS file handlers.web.http.ca-certs"
    check_reachable(load_manifest(path), path, COMMAND, DYNAMIC)


def test_a_tls_key_the_user_cannot_read_is_refused(tmp_path: Path) -> None:
    path = tls_manifest(tmp_path, key_mode=0o600)
    key = tmp_path / "tls" / "key.pem"
    assert refusal(path) == (
        f"service.toml: The TLS file handlers.web.http.keyfile {key}: the service's DynamicUser cannot read "
        f"{key} (mode 0600, owner root:root); set [service] user or group to one that may read it "
        "(a DynamicUser reads only what every user may)"
    )
    os.chown(key, NOBODY.pw_uid, 0)
    path.write_text(f'[service]\nuser = "nobody"\n{path.read_text()}')
    manifest = load_manifest(path)
    check_reachable(manifest, path, COMMAND, service_user(manifest))


def test_a_missing_tls_file_is_refused(tmp_path: Path) -> None:
    path = tls_manifest(tmp_path)
    (tmp_path / "tls" / "cert.pem").unlink()
    assert refusal(path).endswith(
        f"cannot reach {tmp_path / 'tls' / 'cert.pem'} (No such file or directory); "
        "each worker reads it as it starts"
    )
