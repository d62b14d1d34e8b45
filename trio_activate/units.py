"""systemd units from a manifest: one ``.socket`` per socket name, one ``.service``.

Layer 1: pure.  The caller passes every fact the units depend on (the
``trio-activate`` executable's path, the manifest's absolute path, the
target systemd version); nothing here looks at the machine.

The manifest is the single source of truth: in development the internal
activator reads it, in production systemd must pass the same sockets under
the same names.  So each ``[sockets.NAME]`` becomes ``SERVICE-NAME.socket``
with ``FileDescriptorName=NAME`` (a name applies to a whole socket unit,
hence one unit per name) and one ``Listen*=`` line per address, and the
service lists them all in ``Sockets=``.

Mapping (manifest -> systemd.socket(5)): ``backlog`` -> ``Backlog=``,
``reuse-port`` -> ``ReusePort=``, ``ipv6-only`` -> ``BindIPv6Only=ipv6-only``
(else ``both``), ``free-bind`` -> ``FreeBind=``, ``mode`` -> ``SocketMode=``,
``owner``/``group`` -> ``SocketUser=``/``SocketGroup=``, ``remove-on-stop`` ->
``RemoveOnStop=``.

What systemd cannot express is an error naming the key: a relative unix
path (a unit has no "manifest folder") and port 0 (a unit must name its
port).

The service runs ``serve --supervise``: a supervisor whose PID never
changes, with the manifest's workers (one by default) under it.  A
single-process reload hands the main PID over to a successor
(``MAINPID=``), and systemd 252 cannot follow a main process it did not
fork: it SIGKILLs that process at the next stop, mid-drain (seen under the
real manager, see tests/test_systemd.py).  So units never rely on it.

``systemctl reload`` reports the outcome: ``Type=notify-reload`` where
systemd supports it (253+; the supervisor sends ``RELOADING=1`` then
``READY=1``), else ``Type=notify`` with ``ExecReload=trio-activate reload
--wait $MAINPID``, which returns once the new generation serves and fails
when it could not start.  ``NotifyAccess=main`` (workers report to the
supervisor's private socket, never to systemd); ``KillMode=mixed`` (SIGTERM
to the supervisor only, which drains its workers; SIGKILL to everything
left at the end); ``TimeoutStopSec=`` above ``grace-period`` so systemd does
not kill a drain in progress.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .address import InetAddress, UnixAddress
from .errors import ManifestError
from .manifest import Manifest, SocketSpec, SocketType
from .records import record

__all__ = ["NOTIFY_RELOAD_VERSION", "Unit", "render_units"]

# systemd 253 added Type=notify-reload.
NOTIFY_RELOAD_VERSION = 253
# Seconds added to grace-period for TimeoutStopSec=: the drain's own margin.
STOP_TIMEOUT_MARGIN = 10
# systemd's DefaultTimeoutStartSec=.
DEFAULT_TIMEOUT_START = 90

_LISTEN_DIRECTIVE = {
    SocketType.STREAM: "ListenStream",
    SocketType.DATAGRAM: "ListenDatagram",
    SocketType.SEQPACKET: "ListenSequentialPacket",
}


@record
class Unit:
    name: str
    text: str


def render_units(
    manifest: Manifest,
    *,
    command: Sequence[str],
    manifest_path: str,
    systemd_version: int | None,
    user: bool = False,
    name: str | None = None,
) -> list[Unit]:
    """The units for ``manifest``: every ``.socket`` in manifest order, then the ``.service``,
    then a template ``SERVICE-NAME@.service`` per ``accept = true`` socket.

    The ``.service`` serves the sockets that listen; there is none when
    every socket accepts.  ``command`` is how to run trio-activate
    (absolute paths), e.g. ``["/usr/bin/trio-activate"]`` or
    ``["/usr/bin/python3", "-m", "trio_activate"]``.
    """
    service_name = name or manifest.service.name
    sockets = [(spec, _socket_unit(manifest, spec, service_name)) for spec in manifest.sockets]
    units = [unit for _, unit in sockets]
    listening = [unit.name for spec, unit in sockets if not spec.accept]
    if listening:
        units.append(
            _service_unit(
                manifest,
                service_name,
                listening,
                command=command,
                manifest_path=manifest_path,
                systemd_version=systemd_version,
                user=user,
            )
        )
    for spec, unit in sockets:
        if spec.accept:
            units.append(_connection_unit(manifest, spec, unit, command=command, manifest_path=manifest_path))
    return units


def _socket_unit(manifest: Manifest, spec: SocketSpec, service_name: str) -> Unit:
    lines = [
        "[Unit]",
        f"Description={service_name}: socket {spec.name}",
        "",
        "[Socket]",
    ]
    directive = _LISTEN_DIRECTIVE[spec.type]
    for index, address in enumerate(spec.listen):
        key = f"sockets.{spec.name}.listen" + ("" if len(spec.listen) == 1 else f"[{index}]")
        if isinstance(address, UnixAddress) and address.is_relative:
            raise ManifestError(
                f"{manifest.source}: {key}: {address} is relative; systemd units need an absolute path"
            )
        if isinstance(address, InetAddress) and address.port == 0:
            raise ManifestError(
                f"{manifest.source}: {key}: {address} asks the kernel for a port; "
                "a systemd unit must name one"
            )
        lines.append(f"{directive}={_escape_specifiers(str(address))}")
    lines.append(f"FileDescriptorName={_escape_specifiers(spec.name)}")
    if spec.accept:
        # systemd accepts; each connection starts an instance of SOCKET-UNIT@.service.
        lines.append("Accept=yes")
        handler = next((h for h in manifest.handlers if spec.name in h.sockets), None)
        if handler is not None and handler.max_connections is not None:
            lines.append(f"MaxConnections={handler.max_connections}")
    else:
        lines.append(f"Service={service_name}.service")
    if spec.type is not SocketType.DATAGRAM:
        lines.append(f"Backlog={spec.backlog}")
    inet = [a for a in spec.listen if isinstance(a, InetAddress)]
    if inet:
        lines.append(f"ReusePort={_yes(spec.reuse_port)}")
        lines.append(f"FreeBind={_yes(spec.free_bind)}")
        if any(a.family.name == "AF_INET6" for a in inet):
            lines.append(f"BindIPv6Only={'ipv6-only' if spec.ipv6_only else 'both'}")
    if any(isinstance(a, UnixAddress) for a in spec.listen):
        lines.append(f"SocketMode={spec.mode:04o}")
        if spec.owner is not None:
            lines.append(f"SocketUser={spec.owner}")
        if spec.group is not None:
            lines.append(f"SocketGroup={spec.group}")
        lines.append(f"RemoveOnStop={_yes(spec.remove_on_stop)}")
    lines += ["", "[Install]", "WantedBy=sockets.target", ""]
    return Unit(f"{service_name}-{unit_name_part(spec.name)}.socket", "\n".join(lines))


def _service_unit(
    manifest: Manifest,
    service_name: str,
    socket_units: list[str],
    *,
    command: Sequence[str],
    manifest_path: str,
    systemd_version: int | None,
    user: bool,
) -> Unit:
    notify_reload = systemd_version is not None and systemd_version >= NOTIFY_RELOAD_VERSION
    stop_timeout = math.ceil(manifest.service.grace_period) + STOP_TIMEOUT_MARGIN
    # A reload's worst case: the new generation's start-timeout, then stopping it.
    reload_wait = (
        math.ceil(manifest.service.start_timeout + manifest.service.grace_period) + STOP_TIMEOUT_MARGIN
    )
    program = " ".join(_quote(word) for word in command)
    lines = [
        "[Unit]",
        f"Description={service_name} (trio-activate)",
        f"Requires={' '.join(socket_units)}",
        f"After={' '.join(socket_units)}",
        "",
        "[Service]",
        f"Type={'notify-reload' if notify_reload else 'notify'}",
        "# A supervisor keeps one main PID across reloads: systemd before the pidfd",
        "# hand-over cannot follow a main process it did not fork.",
        f"ExecStart={program} serve --supervise {_quote(manifest_path)}",
    ]
    if notify_reload:
        lines.append("ReloadSignal=SIGHUP")
    else:
        lines += [
            "# Returns once the new code serves; fails, leaving the old code serving, if it cannot start.",
            f"ExecReload={program} reload --wait --timeout {reload_wait} $MAINPID",
        ]
        if reload_wait + STOP_TIMEOUT_MARGIN > DEFAULT_TIMEOUT_START:
            # systemd bounds ExecReload= by the start timeout.
            lines.append(f"TimeoutStartSec={reload_wait + STOP_TIMEOUT_MARGIN}")
    if manifest.service.watchdog is not None:
        # The workers ping the supervisor from their event loops; it pings systemd
        # only while all of them do, so a blocked loop gets the service restarted.
        lines.append(f"WatchdogSec={_seconds(manifest.service.watchdog)}")
    lines += [
        f"Sockets={' '.join(socket_units)}",
        "NotifyAccess=main",
        "KillMode=mixed",
        f"TimeoutStopSec={stop_timeout}",
        "Restart=on-failure",
        "# Exit status 2 is a configuration error (one line in the journal): restarting cannot help.",
        "RestartPreventExitStatus=2",
        "",
        "[Install]",
        f"WantedBy={'default.target' if user else 'multi-user.target'}",
        "",
    ]
    return Unit(f"{service_name}.service", "\n".join(lines))


def _connection_unit(
    manifest: Manifest, spec: SocketSpec, socket_unit: Unit, *, command: Sequence[str], manifest_path: str
) -> Unit:
    """The template an ``Accept=yes`` socket starts once per connection (``NAME@.service``)."""
    program = " ".join(_quote(word) for word in command)
    stop_timeout = math.ceil(manifest.service.grace_period) + STOP_TIMEOUT_MARGIN
    lines = [
        "[Unit]",
        f"Description={manifest.service.name}: a connection of socket {_escape_specifiers(spec.name)}",
        "",
        "[Service]",
        "# One process per connection: it serves the connection systemd accepted, then exits.",
        f"ExecStart={program} serve {_quote(manifest_path)}",
        f"TimeoutStopSec={stop_timeout}",
        "",
    ]
    return Unit(socket_unit.name.removesuffix(".socket") + "@.service", "\n".join(lines))


def _seconds(value: float) -> str:
    """A duration for systemd: whole seconds as ``5``, else milliseconds (``1500ms``)."""
    if value == int(value):
        return str(int(value))
    return f"{round(value * 1000)}ms"


def _escape_specifiers(value: str) -> str:
    """systemd expands ``%x`` specifiers in these settings; a literal ``%`` is ``%%``."""
    return value.replace("%", "%%")


def unit_name_part(name: str) -> str:
    """``name`` as part of a unit name, escaped as ``systemd-escape`` does.

    Unit names allow ASCII letters, digits, ``:``, ``_``, ``.`` and ``-``
    (``\\`` only as part of an escape); every other byte becomes ``\\xNN``,
    and so does a leading ``.``.
    """
    out = []
    for index, char in enumerate(name):
        if (char.isascii() and char.isalnum()) or char in ":_-" or (char == "." and index > 0):
            out.append(char)
        else:
            out.extend(f"\\x{byte:02x}" for byte in char.encode())
    return "".join(out)


def _yes(value: bool) -> str:
    return "yes" if value else "no"


def _quote(path: str) -> str:
    """Quote a path for ExecStart= when it needs it (systemd splits on spaces, and expands % and $)."""
    escaped = path.replace("%", "%%").replace("$", "$$")
    if any(c in escaped for c in " \t\"'\\"):
        return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return escaped
