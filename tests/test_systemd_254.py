"""The units generated for systemd 253 and later, under the real systemd 254 (bookworm-backports).

tests/test_systemd.py runs the reload tests under both Debian 12's stock
252 and 254 (its ``each_machine`` fixture), each with the units rendered for
it: for 254, ``Type=notify-reload``, with ``ReloadSignal=SIGCONT`` (a no-op)
and the same ``ExecReload=trio-activate reload --wait $MAINPID`` as for 252.
This file checks that the 254 machine is 254 through and through.

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

from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.systemd import booted
from helpers.systemd_machine import SystemdMachine

pytestmark = pytest.mark.systemd

VERSION = 254


@pytest.fixture
def machine(tmp_path: Path) -> Iterator[SystemdMachine]:
    yield from booted(VERSION, tmp_path / "machine")


def test_the_manager_journald_systemctl_and_journalctl_are_all_254(machine: SystemdMachine) -> None:
    assert machine.systemctl("--version").stdout.startswith(f"systemd {VERSION} ")
    assert machine.run("journalctl", "--version").stdout.startswith(f"systemd {VERSION} ")
    # The manager's own version, over its bus, and the journal's writer, by the libraries it mapped.
    assert machine.systemctl("show", "-p", "Version").stdout.startswith(f"Version={VERSION}.")
    journald = machine.show("systemd-journald.service", "MainPID")["MainPID"]
    maps = machine.run("cat", f"/proc/{journald}/maps").stdout
    assert f"libsystemd-shared-{VERSION}.so" in maps
    assert "libsystemd-shared-252.so" not in maps
