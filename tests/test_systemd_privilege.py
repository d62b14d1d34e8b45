"""The least-privilege units under the real systemd 252: the sandbox the generator writes serves.

Each test boots its own manager (`systemd_machine.SystemdMachine`) and runs
the units `trio-activate systemd` writes, as they are: with ``DynamicUser=``
or a named user, no capabilities, ``ProtectHome=``, ``PrivateTmp=``, the
system call filter and the rest (see trio_activate/model/units.py).  The service
runs from this test run's own interpreter: a venv whose Python lives under
``/root`` (``0700``) here and in CI, which the unit binds back read-only on
an empty home hierarchy; the manifests live under pytest's ``tmp_path``
(``0700`` too), bound back onto the service's private ``/tmp``.
"""

from __future__ import annotations

import pwd
import subprocess
from pathlib import Path

import pytest
from helpers import TRIO_ACTIVATE
from helpers.systemd import (
    assert_clean,
    echo_service_manifest,
    one_socket_manifest,
    round_trip,
    units_for,
)
from helpers.systemd_machine import SystemdMachine


def manifest_for(folder: Path, name: str, port: int, service_lines: str = "") -> Path:
    return echo_service_manifest(folder, name, port, workers=2, service_keys=service_lines)


def status(machine: SystemdMachine, pid: str) -> dict[str, str]:
    """/proc/PID/status inside the machine, as key -> value."""
    text = machine.run("cat", f"/proc/{pid}/status").stdout
    return {key: value.strip() for key, _, value in (line.partition(":") for line in text.splitlines())}


def serve_reload_stop(machine: SystemdMachine, units: dict[str, str], name: str, port: int) -> set[int]:
    """Serve, reload, serve, stop cleanly; the uids the main process and its workers ran as."""
    machine.install(units)
    machine.systemctl("start", f"{name}-echo.socket")
    assert round_trip(machine, ("127.0.0.1", port)) == b"ping\n"
    machine.wait_for(f"{name}.service", ActiveState="active", SubState="running")
    main_pid = machine.show(f"{name}.service", "MainPID")["MainPID"]
    # Any of the supervisor's threads may have started a worker: ask for every child.
    workers = machine.run("pgrep", "-P", main_pid).stdout.split()
    assert len(workers) == 2, workers
    uids = set()
    for pid in [main_pid, *workers]:
        shown = status(machine, pid)
        real, effective, saved, filesystem = map(int, shown["Uid"].split())
        assert real == effective == saved == filesystem, shown["Uid"]
        assert shown["CapEff"] == shown["CapBnd"] == "0000000000000000", "no capabilities at all"
        assert shown["NoNewPrivs"] == "1"
        assert shown["Seccomp"] == "2", "the system call filter is on"
        uids.add(real)

    result = machine.systemctl("reload", f"{name}.service", check=False)
    assert result.returncode == 0, result.stderr + machine.journal(f"{name}.service")
    shown = machine.show(f"{name}.service", "MainPID", "StatusText")
    assert shown["StatusText"].startswith("Generation 2: 2 worker(s)"), shown
    assert shown["MainPID"] == main_pid
    assert round_trip(machine, ("127.0.0.1", port), b"after the reload\n") == b"after the reload\n"

    machine.systemctl("stop", f"{name}.service")
    assert machine.show(f"{name}.service", "Result")["Result"] == "success"
    assert_clean(machine, f"{name}.service")
    return uids


@pytest.mark.systemd
def test_a_dynamic_user_serves_reloads_and_stops_cleanly(machine: SystemdMachine, tmp_path: Path) -> None:
    manifest = manifest_for(tmp_path / "svc", "dynamic", 7500)
    units = units_for(manifest, tmp_path / "units")
    assert "DynamicUser=yes" in units["dynamic.service"].splitlines()
    uids = serve_reload_stop(machine, units, "dynamic", 7500)
    (uid,) = uids
    assert uid != 0
    assert 61184 <= uid <= 65519, "systemd's range for dynamic users"


@pytest.mark.systemd
def test_a_named_user_serves_reloads_and_stops_cleanly(machine: SystemdMachine, tmp_path: Path) -> None:
    manifest = manifest_for(tmp_path / "svc", "named", 7501, 'user = "nobody"')
    units = units_for(manifest, tmp_path / "units")
    assert "User=nobody" in units["named.service"].splitlines()
    assert serve_reload_stop(machine, units, "named", 7501) == {pwd.getpwnam("nobody").pw_uid}


def test_a_manifest_the_user_cannot_reach_is_refused_in_one_line(tmp_path: Path) -> None:
    """pytest's tmp_path is 0700 and owned by root: a DynamicUser could not read a manifest there."""
    manifest = tmp_path / "service.toml"
    manifest.write_text('[sockets.echo]\nlisten = "127.0.0.1:7502"\n')
    result = subprocess.run(
        [*TRIO_ACTIVATE, "systemd", str(manifest), "--systemd-version", "252"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"trio-activate: service.toml: The manifest's folder {tmp_path}: the service's DynamicUser cannot "
        f"read {tmp_path} (mode 0700, owner root:root); set [service] user to a user who can, or move it "
        "where that user can read it"
    ]


@pytest.mark.systemd
@pytest.mark.parametrize("user", ["", 'user = "nobody"'], ids=["dynamic", "nobody"])
def test_a_handler_imported_from_the_manifest_folder_serves(
    machine: SystemdMachine, tmp_path: Path, user: str
) -> None:
    """The manifest's folder (python-path ".") is readable under the sandbox: handlers import from it."""
    folder = tmp_path / "svc"
    manifest = one_socket_manifest(folder, "local", 7503, "local_app:handle", service_keys=user)
    (folder / "local_app.py").write_text(
        "import os\n\nasync def handle(stream):\n    await stream.send_all(b'uid %d\\n' % os.getuid())\n"
    )
    machine.install(units_for(manifest, tmp_path / "units"))
    machine.systemctl("start", "local-web.socket")
    answer = round_trip(machine, ("127.0.0.1", 7503))
    assert answer.startswith(b"uid "), answer
    assert answer != b"uid 0\n", "the handler runs as the unit's user"
    machine.systemctl("stop", "local.service")
    assert_clean(machine, "local.service")
