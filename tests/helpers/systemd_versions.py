"""systemd versions other than the machine's own, booted by `systemd_machine.SystemdMachine`.

Debian 12's own systemd is 252; bookworm-backports carries 254, the first
with ``Type=notify-reload`` that Debian ships.  ``.ci/fetch-systemd-254``
unpacks its ``systemd`` and ``libsystemd-shared`` packages (``dpkg -x``, no
installation) into a folder and ``.ci/run`` names that folder in
``SYSTEMD_254_DIR``.

`machine_254` boots that 254 as PID 1 and, inside the machine's private
mount namespace only, bind-mounts the unpacked files over the stock ones:

- ``lib/systemd`` over ``/lib/systemd`` (``/usr/lib/systemd``): journald,
  ``systemd-shutdown`` and every helper PID 1 runs by its compiled-in path
  are 254's;
- ``usr/lib/x86_64-linux-gnu/systemd`` (the binaries' RUNPATH) over the
  stock one: ``libsystemd-shared-254.so`` and ``libsystemd-core-254.so``;
- ``bin/systemctl`` and ``bin/journalctl`` over ``/usr/bin``'s, so what
  `SystemdMachine.run` runs through ``nsenter -a`` speaks 254's bus API.

PID 1 is started from the unpacked folder itself (so `SystemdMachine` finds
it by its executable) and copies its special units from 254's own
``lib/systemd/system``.  The host's files are never touched: the mounts go
away with the machine's mount namespace.
"""

from __future__ import annotations

import os
from pathlib import Path

from helpers.systemd_machine import SystemdMachine, why_cannot_boot

SYSTEMD_254_VARIABLE = "SYSTEMD_254_DIR"
# The unpacked folder's files and where the machine sees them.
_OVER_STOCK = (
    ("lib/systemd", "/usr/lib/systemd"),
    ("usr/lib/x86_64-linux-gnu/systemd", "/usr/lib/x86_64-linux-gnu/systemd"),
    ("bin/systemctl", "/usr/bin/systemctl"),
    ("bin/journalctl", "/usr/bin/journalctl"),
)


def systemd_254_root() -> Path | None:
    """The unpacked 254 named by ``SYSTEMD_254_DIR``, or None when unset or empty."""
    value = os.environ.get(SYSTEMD_254_VARIABLE, "")
    return Path(value) if value else None


def why_cannot_boot_254() -> str | None:
    """None when `machine_254` can boot here, else the reason (for a skip)."""
    reason = why_cannot_boot()
    if reason is not None:
        return reason
    root = systemd_254_root()
    if root is None:
        return f"{SYSTEMD_254_VARIABLE} is not set (.ci/fetch-systemd-254 unpacks 254 and prints where)"
    for part, _ in _OVER_STOCK:
        if not (root / part).exists():
            return f"{SYSTEMD_254_VARIABLE}={root}: {part} is missing (run .ci/fetch-systemd-254 {root})"
    return None


def machine_254(workdir: Path, root: Path) -> SystemdMachine:
    """A `SystemdMachine` (not booted yet) that runs the systemd 254 unpacked at `root`."""
    return SystemdMachine(
        workdir,
        systemd=root / "lib/systemd/systemd",
        bind_mounts=[(root / part, Path(stock)) for part, stock in _OVER_STOCK],
        special_units_from=root / "lib/systemd/system",
        version=254,
    )


def why_cannot_boot_version(version: int) -> str | None:
    """None when `machine_for` can boot `version` (252: the machine's own; 254) here, else why not."""
    return why_cannot_boot() if version == 252 else why_cannot_boot_254()


def machine_for(version: int, workdir: Path) -> SystemdMachine:
    """A `SystemdMachine` (not booted yet) for systemd `version`: 252 (the machine's own) or 254."""
    if version == 252:
        return SystemdMachine(workdir)
    root = systemd_254_root()
    assert version == 254, version
    assert root is not None, "why_cannot_boot_version(254) first"
    return machine_254(workdir, root)
