"""The units generated for systemd 253 and later, under the real systemd 254 (bookworm-backports).

tests/test_systemd.py runs the units for 252 (``Type=notify``) under
Debian's stock 252.  Here the units are rendered with ``--systemd-version
254``: ``Type=notify-reload``, with ``ReloadSignal=SIGCONT`` (a no-op) and
the same ``ExecReload=trio-activate reload --wait $MAINPID`` as for 252.

Why not the signal alone (read in 254.26's src/core/service.c, and seen
here): the ``READY=1`` that ends a notify-reload always ends it well
(``service_enter_running(s, SERVICE_SUCCESS)``); ``STATUS=`` and ``ERRNO=``
are only shown.  Only two things fail a reload job: the timeout
(``TimeoutStartSec=``; but a service that never sends ``READY=1`` stays
``reloading`` for good, the timer re-arming every period), and an
``ExecReload=`` command that fails: under ``Type=notify-reload`` systemd
sends ``ReloadSignal=`` *and* runs ``ExecReload=``, and the command's exit
status is the reload's result.  With ``ReloadSignal=SIGHUP`` a reload whose
new code failed returned 0.

The manager is systemd 254 unpacked by ``.ci/fetch-systemd-254`` and booted
with `systemd_versions.machine_254`.  Skipped with the reason where the
machine cannot boot systemd or ``SYSTEMD_254_DIR`` is unset; CI sets
``REQUIRE_INTEROP_PEERS=1``, which turns the skip into a failure.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from systemd_machine import SystemdMachine
from systemd_versions import machine_254, systemd_254_root, why_cannot_boot_254
from test_systemd import ClientLoop, ask, assert_clean, read_line, units_for, write_manifest

VERSION = 254


@pytest.fixture
def machine(tmp_path: Path) -> Iterator[SystemdMachine]:
    reason = why_cannot_boot_254()
    if reason is not None:
        if os.environ.get("REQUIRE_INTEROP_PEERS"):
            pytest.fail(f"systemd 254 cannot boot here ({reason}), and REQUIRE_INTEROP_PEERS is set")
        pytest.skip(reason)
    root = systemd_254_root()
    assert root is not None
    with machine_254(tmp_path / "machine", root) as booted:
        yield booted


def directives(unit: str) -> list[str]:
    return [line for line in unit.splitlines() if line and not line.startswith("#")]


def test_the_manager_journald_systemctl_and_journalctl_are_all_254(machine: SystemdMachine) -> None:
    assert machine.systemctl("--version").stdout.startswith(f"systemd {VERSION} ")
    assert machine.run("journalctl", "--version").stdout.startswith(f"systemd {VERSION} ")
    # The manager's own version, over its bus, and the journal's writer, by the libraries it mapped.
    assert machine.systemctl("show", "-p", "Version").stdout.startswith(f"Version={VERSION}.")
    journald = machine.show("systemd-journald.service", "MainPID")["MainPID"]
    maps = machine.run("cat", f"/proc/{journald}/maps").stdout
    assert f"libsystemd-shared-{VERSION}.so" in maps
    assert "libsystemd-shared-252.so" not in maps


@pytest.mark.parametrize("workers", [1, 2])
def test_notify_reloads_lose_no_connection_and_restart_and_stop_drain_in_flight_work(
    machine: SystemdMachine, tmp_path: Path, workers: int
) -> None:
    manifest = write_manifest(
        tmp_path / "svc",
        f"""\
        [service]
        name = "reloading"
        grace-period = 5.0
        workers = {workers}

        [sockets.echo]
        listen = "127.0.0.1:7100"

        [handlers.echo]
        socket = "echo"
        call = "trio_activate.examples:echo"
        """,
    )
    units = units_for(manifest, tmp_path / "units", version=VERSION)
    service = directives(units["reloading.service"])
    assert "Type=notify-reload" in service
    assert "ReloadSignal=SIGCONT" in service, "ExecReload= sends the SIGHUP (see units.py)"
    machine.install(units)
    machine.systemctl("start", "reloading-echo.socket")
    assert ask(machine, ("127.0.0.1", 7100)) == b"ping\n"
    machine.wait_for("reloading.service", ActiveState="active")
    main_pid = machine.show("reloading.service", "MainPID")["MainPID"]

    with ClientLoop(machine, 7100, seconds=20) as clients:
        for number in range(2, 12):
            machine.systemctl("reload", "reloading.service")
            shown = machine.show("reloading.service", "ActiveState", "MainPID", "StatusText", "ReloadResult")
            assert shown["ActiveState"] == "active", "systemctl reload returns once READY=1 came"
            assert shown["StatusText"].startswith(f"Generation {number}: {workers} worker(s)"), shown
            assert shown["MainPID"] == main_pid
            assert shown["ReloadResult"] == "success"
    assert clients.done > 10
    assert clients.failures == []
    journal = machine.journal("reloading.service")
    assert journal.count("systemd[1]: Reloaded reloading.service") == 10, journal
    assert journal.count("reload (SIGHUP): starting generation") == 10, "one reload per systemctl reload"

    for action in ("restart", "stop"):
        with machine.connect(("127.0.0.1", 7100)) as in_flight:
            in_flight.sendall(b"before\n")
            assert read_line(in_flight) == b"before\n"
            machine.systemctl(action, "--no-block", "reloading.service")
            machine.wait_for("reloading.service", ActiveState="deactivating")
            time.sleep(0.5)
            in_flight.sendall(b"during the stop\n")
            assert read_line(in_flight) == b"during the stop\n", f"{action}: the connection drains"
        if action == "restart":
            machine.wait_for("reloading.service", ActiveState="active")
    machine.wait_for("reloading.service", ActiveState="inactive")
    assert machine.show("reloading.service", "Result", "NRestarts") == {"Result": "success", "NRestarts": "0"}
    assert_clean(machine, "reloading.service")


def test_a_reload_whose_new_code_fails_fails_and_the_old_code_keeps_serving(
    machine: SystemdMachine, tmp_path: Path
) -> None:
    folder = tmp_path / "svc"
    manifest = write_manifest(
        folder,
        """\
        [service]
        name = "versioned"
        [sockets.web]
        listen = "127.0.0.1:7200"
        [handlers.web]
        socket = "web"
        call = "versioned_app:handle"
        """,
    )
    (folder / "versioned_app.py").write_text(
        "async def handle(stream):\n    await stream.send_all(b'v1\\n')\n"
    )
    generated = units_for(manifest, tmp_path / "units", version=VERSION)
    assert "Type=notify-reload" in directives(generated["versioned.service"])
    machine.install(generated)
    machine.systemctl("start", "versioned-web.socket")
    assert ask(machine, ("127.0.0.1", 7200)) == b"v1\n"
    machine.wait_for("versioned.service", ActiveState="active")
    main_pid = machine.show("versioned.service", "MainPID")["MainPID"]

    (folder / "versioned_app.py").write_text("async def handle(stream) this is not Python\n")
    result = machine.systemctl("reload", "versioned.service", check=False)
    # What the service itself says holds either way: the old code serves on.
    shown = machine.show("versioned.service", "ActiveState", "MainPID", "StatusText")
    assert shown["StatusText"].startswith("Reload failed: generation 2: worker "), shown
    assert shown["StatusText"].endswith("still serving generation 1"), shown
    assert shown["ActiveState"] == "active"
    assert shown["MainPID"] == main_pid
    assert ask(machine, ("127.0.0.1", 7200)) == b"v1\n", "the old code keeps serving"
    journal = machine.journal("versioned.service")
    assert "handlers.web.call: cannot import 'versioned_app'" in journal, "the reason, in the journal"
    # What systemd makes of it.
    assert result.returncode != 0, f"systemctl reload fails when the new code cannot start:\n{journal}"
    assert "Reload failed for versioned.service" in journal
    assert machine.show("versioned.service", "ReloadResult")["ReloadResult"] == "exit-code"

    (folder / "versioned_app.py").write_text(
        "async def handle(stream):\n    await stream.send_all(b'v2\\n')\n"
    )
    machine.systemctl("reload", "versioned.service")
    assert machine.show("versioned.service", "StatusText")["StatusText"].startswith("Generation 3: ")
    assert ask(machine, ("127.0.0.1", 7200)) == b"v2\n"
    machine.systemctl("stop", "versioned.service")
    assert machine.show("versioned.service", "Result")["Result"] == "success"
    assert_clean(machine, "versioned.service", errors_expected=True)
