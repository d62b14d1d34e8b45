"""What the tests that boot systemd share: booting a version, unit files, clients, clean-stop checks.

The machine itself is `systemd_machine.SystemdMachine`; the versions other
than Debian's own come from `systemd_versions`.  Ports here are fixed
(7000, 7100, ...): each machine has a network namespace of its own, so they
cannot clash with anything on the host or in another test, and a systemd
``.socket`` unit needs its port before anything binds it.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import TRIO_ACTIVATE, write_manifest
from helpers.systemd_machine import SystemdMachine
from helpers.systemd_versions import machine_for, why_cannot_boot_version

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "config"
# What no clean stop may show in the journal.
UNCLEAN = ("SIGKILL", "not our child", "left-over process", "reception only permitted")


def booted(version: int, workdir: Path) -> Iterator[SystemdMachine]:
    reason = why_cannot_boot_version(version)
    if reason is not None:
        if os.environ.get("REQUIRE_INTEROP_PEERS"):
            pytest.fail(f"systemd {version} cannot boot here ({reason}), and REQUIRE_INTEROP_PEERS is set")
        pytest.skip(reason)
    with machine_for(version, workdir) as machine:
        yield machine


def units_for(manifest: Path, out: Path, *, version: int = 252) -> dict[str, str]:
    """The unit files `trio-activate systemd` writes for `manifest`, by name."""
    out.mkdir(exist_ok=True)
    subprocess.run(
        [*TRIO_ACTIVATE, "systemd", str(manifest), "--systemd-version", str(version), "--output", str(out)],
        check=True,
        capture_output=True,
    )
    return {path.name: path.read_text() for path in out.iterdir()}


def round_trip(machine: SystemdMachine, address: tuple[str, int] | str, line: bytes = b"ping\n") -> bytes:
    """One round trip on a new connection: send `line`, read until it comes back whole."""
    with machine.connect(address) as client:
        client.sendall(line)
        return read_line(client)


def read_line(client: socket.socket) -> bytes:
    received = b""
    while not received.endswith(b"\n"):
        chunk = client.recv(4096)
        if not chunk:
            break
        received += chunk
    return received


def assert_clean(machine: SystemdMachine, unit: str, *, errors_expected: bool = False) -> None:
    """No kill and no stray process; unless `errors_expected`, no warning either, systemd's
    (by priority) or ours (by level)."""
    journal = machine.journal(unit)
    unwanted = UNCLEAN if errors_expected else (*UNCLEAN, ": warning: ", ": error: ")
    for word in unwanted:
        assert word not in journal, f"{word!r} in the journal of {unit}:\n{journal}"
    if not errors_expected:
        warnings = machine.run("journalctl", "--no-pager", "-q", "-p", "warning", "-u", unit).stdout
        assert warnings == "", f"systemd warned about {unit}:\n{warnings}"


def service_processes(machine: SystemdMachine) -> str:
    """``pgrep -a`` of every trio-activate process in the machine (the console script and workers)."""
    return machine.run("pgrep", "-a", "-f", "bin/trio-activate |-m trio_activate ", check=False).stdout


def one_socket_manifest(
    folder: Path,
    name: str,
    port: int,
    call: str,
    *,
    socket: str = "web",
    service_keys: str = "",
    socket_keys: str = "",
) -> Path:
    """A manifest: service `name`, one stream socket on 127.0.0.1:`port`, served by `call`."""
    return write_manifest(
        folder,
        f'[service]\nname = "{name}"\n{service_keys}\n'
        f'[sockets.{socket}]\nlisten = "127.0.0.1:{port}"\n{socket_keys}\n'
        f'[handlers.{socket}]\nsocket = "{socket}"\ncall = "{call}"\n',
    )


def echo_service_manifest(
    folder: Path, name: str, port: int, *, workers: int = 1, service_keys: str = ""
) -> Path:
    """A manifest: service `name`, socket ``echo`` on 127.0.0.1:`port`, the example echo handler."""
    return one_socket_manifest(
        folder,
        name,
        port,
        "trio_activate.examples:echo",
        socket="echo",
        service_keys=f"grace-period = 5.0\nworkers = {workers}\n{service_keys}",
    )


def start_by_first_connection(
    machine: SystemdMachine, manifest: Path, units_dir: Path, port: int, answer: bytes = b"ping\n"
) -> str:
    """Install `manifest`'s units, start its sockets, connect once to start the service; its MainPID.

    The service's name is the manifest's ``[service] name``; the first
    connection to 127.0.0.1:`port` must get `answer` back for ``ping``.
    """
    units = units_for(manifest, units_dir, version=machine.version)
    machine.install(units)
    machine.systemctl("start", *(name for name in units if name.endswith(".socket")))
    assert round_trip(machine, ("127.0.0.1", port)) == answer
    service = next(name for name in units if name.endswith(".service") and "@" not in name)
    machine.wait_for(service, ActiveState="active")
    return machine.show(service, "MainPID")["MainPID"]
