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

Each socket option becomes the systemd.socket(5) directive its line of
``manifest.SOCKET_OPTIONS`` names (``backlog`` -> ``Backlog=``, ``ipv6-only``
-> ``BindIPv6Only=ipv6-only`` or ``both``, ...), where the option applies;
``accept`` decides between ``Accept=yes`` and ``Service=``.

With ``[service] fd-store = true`` there is no ``.socket`` unit: the service
binds its sockets itself and keeps them in systemd's fd store
(``FileDescriptorStoreMax=``, and ``FileDescriptorStorePreserve=yes`` from
254), so the sandbox leaves out ``IPAddressDeny=`` (it filters the sockets
the service opens, so its clients would time out: seen under 252), makes
the unix sockets' folders writable, and refuses privileged ports.

What systemd cannot express is an error naming the key: a relative unix
path (a unit has no "manifest folder") and port 0 (a unit must name its
port).

The service runs ``serve --supervise``: a supervisor whose PID never
changes, with the manifest's workers (one by default) under it.  A
single-process reload hands the main PID over to a successor
(``MAINPID=``), and systemd 252 cannot follow a main process it did not
fork: it SIGKILLs that process at the next stop, mid-drain (seen under the
real manager, see tests/test_systemd.py).  So units never rely on it.

The service runs with least privilege (see ``_sandbox``): ``User=``/``Group=``
from ``[service] user``/``group``, else ``DynamicUser=yes``; no capabilities;
a read-only file system with private ``/tmp`` and hidden home folders; a
system call and address-family allow list.  systemd creates the sockets, so
the service never needs a privilege to bind.  The paths it must read (the
interpreter's installation, the manifest's folder, ``python-path``, asgi
handlers' TLS files) come in as `NeededPath` facts; one the sandbox would hide is bound back read-only,
with a comment in the unit saying why.  ``[service] unit-extra`` lines come
last, so a service that needs more can say so in its manifest.

Every ``.service`` has a runtime directory (see `runtime_directory`):
systemd makes it at each start, writable under the read-only sandbox and
owned by the service's user, and names it in ``RUNTIME_DIRECTORY``, where
the service makes its control socket (``control.sock``) unless the manifest
names another; ``status`` and ``reload --wait`` need no manifest key.

``systemctl reload`` reports the outcome through ``ExecReload=trio-activate
reload --wait $MAINPID``, which asks the supervisor over its control socket
(at the abstract name of its PID: every process of a unit shares one network
namespace, ``PrivateNetwork=`` too, seen under 252), returns once the new
generation serves and fails when it could not start.  Where systemd has it
(253+) the type is ``Type=notify-reload`` (the supervisor sends
``RELOADING=1`` then ``READY=1``), but that alone cannot fail a reload:
systemd 254 ends a notify-reload with ``READY=1`` as a success whatever
``STATUS=`` or ``ERRNO=`` say (its service.c; seen under 254).  It does run
``ExecReload=`` beside ``ReloadSignal=`` and takes the command's exit status
as the reload's result, so the signal is made a no-op (``SIGCONT``) and the
command does the rest, as on 252 with ``Type=notify``.  ``NotifyAccess=main`` (workers report to the
supervisor's private socket, never to systemd); ``KillMode=mixed`` (SIGTERM
to the supervisor only, which drains its workers; SIGKILL to everything
left at the end); ``TimeoutStopSec=`` above ``grace-period`` so systemd does
not kill a drain in progress.
"""

from __future__ import annotations

import math
import posixpath
import re
import socket
from collections.abc import Sequence

from ..errors import ManifestError
from .address import InetAddress, UnixAddress
from .manifest import SOCKET_OPTIONS, Manifest, SocketSpec, SocketType
from .records import record

__all__ = [
    "FD_STORE_PRESERVE_VERSION",
    "NOTIFY_RELOAD_VERSION",
    "NeededPath",
    "Unit",
    "hidden_by",
    "render_units",
    "runtime_directory",
]

# systemd 253 added Type=notify-reload.
NOTIFY_RELOAD_VERSION = 253
# systemd 254 added FileDescriptorStorePreserve=.
FD_STORE_PRESERVE_VERSION = 254
# Binding a lower port needs CAP_NET_BIND_SERVICE (net.ipv4.ip_unprivileged_port_start).
UNPRIVILEGED_PORT_START = 1024
# Seconds added to grace-period for TimeoutStopSec=: the drain's own margin.
STOP_TIMEOUT_MARGIN = 10
# systemd's DefaultTimeoutStartSec=.
DEFAULT_TIMEOUT_START = 90
# Where RuntimeDirectory= puts its folders: a system manager's /run (and its old name,
# /var/run, a symlink), a user manager's $XDG_RUNTIME_DIR.
SYSTEM_RUNTIME_ROOTS = ("/run", "/var/run")
USER_RUNTIME_ROOT = re.compile(r"/run/user/[0-9]+")
# The runtime directory's own folder when the manifest's socket files share the service's name.
CONTROL_SUBFOLDER = "control"

_LISTEN_DIRECTIVE = {
    SocketType.STREAM: "ListenStream",
    SocketType.DATAGRAM: "ListenDatagram",
    SocketType.SEQPACKET: "ListenSequentialPacket",
}


# Where the sandbox hides the host's files: ProtectHome= empties these...
HOME_FOLDERS = ("/home", "/root", "/run/user")
# ...and PrivateTmp= gives the service its own, empty, copies of these.
TMP_FOLDERS = ("/tmp", "/var/tmp")


@record
class Unit:
    name: str
    text: str


@record
class NeededPath:
    """A path the service reads at run time, and why (said in the unit when it needs a relaxation)."""

    path: str
    why: str


def hidden_by(path: str) -> str | None:
    """The sandbox setting that hides ``path`` (absolute) from the service, or None if it stays visible.

    ``ProtectSystem=strict`` leaves everything else readable (read-only).
    """
    for setting, folders in (("ProtectHome=", HOME_FOLDERS), ("PrivateTmp=", TMP_FOLDERS)):
        if any(path == folder or path.startswith(folder + "/") for folder in folders):
            return setting
    return None


def render_units(
    manifest: Manifest,
    *,
    command: Sequence[str],
    manifest_path: str,
    systemd_version: int | None,
    user: bool = False,
    name: str | None = None,
    needed_paths: Sequence[NeededPath] = (),
) -> list[Unit]:
    """The units for ``manifest``: every ``.socket`` in manifest order, then the ``.service``,
    then a template ``SERVICE-NAME@.service`` per ``accept = true`` socket.

    The ``.service`` serves the sockets that listen; there is none when
    every socket accepts.  ``command`` is how to run trio-activate
    (absolute paths), e.g. ``["/usr/bin/trio-activate"]`` or
    ``["/usr/bin/python3", "-m", "trio_activate"]``.  ``needed_paths``: what
    the service reads (``unit_paths.needed_paths``); those the sandbox would
    hide are bound back read-only.
    """
    service_name = name or manifest.service.name
    sockets = [(spec, _socket_unit(manifest, spec, service_name)) for spec in manifest.sockets]
    units = [unit for _, unit in sockets]
    listening = [unit.name for spec, unit in sockets if not spec.accept]
    if manifest.service.fd_store:
        # The service makes its sockets and keeps them in systemd's fd store: no .socket
        # unit (the manifest has no accept = true socket then).  The units were built
        # above all the same, for their checks (absolute paths, named ports).
        _check_fd_store_sockets(manifest)
        units, listening = [], []
    if listening or manifest.service.fd_store:
        units.append(
            _service_unit(
                manifest,
                service_name,
                listening,
                command=command,
                manifest_path=manifest_path,
                systemd_version=systemd_version,
                user=user,
                needed_paths=needed_paths,
            )
        )
    for spec, unit in sockets:
        if spec.accept:
            units.append(
                _connection_unit(
                    manifest,
                    spec,
                    unit,
                    command=command,
                    manifest_path=manifest_path,
                    user=user,
                    needed_paths=needed_paths,
                )
            )
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
        handler = manifest.handler_for(spec.name)
        if handler is not None and handler.max_connections is not None:
            lines.append(f"MaxConnections={handler.max_connections}")
    else:
        lines.append(f"Service={service_name}.service")
    for option in SOCKET_OPTIONS:
        value = option.value_in(spec)
        if option.directive is not None and value is not None:
            # Values are numbers, booleans and modes, and user and group names, which may hold
            # a '%' that systemd would read as a specifier (SocketUser= expands them).
            lines.append(f"{option.directive}={_escape_specifiers(option.type.unit(value))}")
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
    needed_paths: Sequence[NeededPath],
) -> Unit:
    notify_reload = systemd_version is not None and systemd_version >= NOTIFY_RELOAD_VERSION
    stop_timeout = math.ceil(manifest.service.grace_period) + STOP_TIMEOUT_MARGIN
    # A reload's worst case: the new generation's start-timeout, then stopping it.
    reload_wait = (
        math.ceil(manifest.service.start_timeout + manifest.service.grace_period) + STOP_TIMEOUT_MARGIN
    )
    program = " ".join(_quote(word) for word in command)
    lines = ["[Unit]", f"Description={service_name} (trio-activate)"]
    if socket_units:
        lines += [f"Requires={' '.join(socket_units)}", f"After={' '.join(socket_units)}"]
    lines += [
        "",
        "[Service]",
        f"Type={'notify-reload' if notify_reload else 'notify'}",
        "# A supervisor keeps one main PID across reloads: systemd before the pidfd",
        "# hand-over cannot follow a main process it did not fork.",
        f"ExecStart={program} serve --supervise {_quote(manifest_path)}",
    ]
    if notify_reload:
        lines += [
            "# notify-reload alone counts every READY=1 as a successful reload (systemd 254),",
            "# so it would hide a new generation that failed: systemd's own signal is a no-op",
            "# here, and ExecReload= sends SIGHUP and fails the reload when the new code fails.",
            "ReloadSignal=SIGCONT",
        ]
    lines += [
        "# Returns once the new code serves; fails, leaving the old code serving, if it cannot start.",
        f"ExecReload={program} reload --wait --timeout {reload_wait} $MAINPID",
    ]
    if reload_wait + STOP_TIMEOUT_MARGIN > DEFAULT_TIMEOUT_START:
        # systemd bounds ExecReload= by the start timeout.
        lines.append(f"TimeoutStartSec={reload_wait + STOP_TIMEOUT_MARGIN}")
    lines += _runtime_directory_lines(manifest, service_name, user=user)
    if manifest.service.watchdog is not None:
        # The workers ping the supervisor from their event loops; it pings systemd
        # only while all of them do, so a blocked loop gets the service restarted.
        lines.append(f"WatchdogSec={_seconds(manifest.service.watchdog)}")
    if socket_units:
        lines.append(f"Sockets={' '.join(socket_units)}")
    if manifest.service.fd_store:
        lines += _fd_store_lines(manifest, systemd_version)
    lines += [
        "NotifyAccess=main",
        "KillMode=mixed",
        f"TimeoutStopSec={stop_timeout}",
        "Restart=on-failure",
        "# Exit status 2 is a configuration error (one line in the journal): restarting cannot help.",
        "RestartPreventExitStatus=2",
        *_sandbox(manifest, user=user, needed_paths=needed_paths),
        *_unit_extra(manifest),
        "",
        "[Install]",
        f"WantedBy={'default.target' if user else 'multi-user.target'}",
        "",
    ]
    return Unit(f"{service_name}.service", "\n".join(lines))


def runtime_directory(manifest: Manifest, service_name: str, *, user: bool = False) -> str:
    """The ``RuntimeDirectory=`` of the service ``service_name``: its name, relative to ``/run``
    (a user manager's ``$XDG_RUNTIME_DIR``).

    The service's name, with a ``:`` (which ``--name`` allows) as ``_``:
    from 254 on systemd reads ``RuntimeDirectory=a:b`` as folder ``a`` and a
    symlink ``b``.  When the manifest's unix socket files lie in that folder
    (``/run/echo/echo.sock`` for service ``echo``), the folder is theirs,
    made by the ``.socket`` units (or the ``fd-store`` service) and used by
    their clients, so the runtime directory is a folder inside it,
    ``NAME/control``: systemd would otherwise make theirs ``0700``, the
    service's user's, and remove it, socket files and all, at every stop.
    """
    name = service_name.replace(":", "_")
    for spec in manifest.sockets:
        for address in spec.listen:
            if isinstance(address, UnixAddress) and _in_runtime_folder(address.path, name, user=user):
                return f"{name}/{CONTROL_SUBFOLDER}"
    return name


def _in_runtime_folder(path: str, name: str, *, user: bool) -> bool:
    folder = posixpath.dirname(posixpath.normpath(path))
    while folder not in ("/", ""):
        parent, last = posixpath.split(folder)
        if last == name and (USER_RUNTIME_ROOT.fullmatch(parent) if user else parent in SYSTEM_RUNTIME_ROOTS):
            return True
        folder = parent
    return False


def _runtime_directory_lines(manifest: Manifest, service_name: str, *, user: bool) -> list[str]:
    """``RuntimeDirectory=`` and its mode and lifetime, with the reasons (see `runtime_directory`)."""
    return [
        "# The service's control socket for `trio-activate status` and `reload` is",
        "# $RUNTIME_DIRECTORY/control.sock (0600) unless the manifest names one: systemd makes",
        "# the folder at each start, writable, the service user's and closed to others (0700).",
        f"RuntimeDirectory={_escape_specifiers(runtime_directory(manifest, service_name, user=user))}",
        "RuntimeDirectoryMode=0700",
        "# Removed at each stop and restart (a SIGKILL included): every main process makes its",
        "# control socket anew (the fd store keeps only the listening sockets), so nothing in the",
        "# folder can outlive the process that answered there, and no stale file is found at start.",
        "RuntimeDirectoryPreserve=no",
    ]


def _fd_store_lines(manifest: Manifest, systemd_version: int | None) -> list[str]:
    """``FileDescriptorStoreMax=`` and, where systemd has it, ``FileDescriptorStorePreserve=``.

    The maximum is the number of fds the manifest makes (one per address),
    with no margin: the service removes the names its manifest dropped
    before it stores, and systemd skips an fd it holds already, so the store
    never needs more; a larger one would only let a stale store grow unseen.
    A unit older than its manifest's new sockets gets a warning from systemd
    ("hit fd store limit") and those sockets are made anew at each start.
    """
    count = sum(len(spec.listen) for spec in manifest.sockets)
    lines = [
        "# The service creates its sockets and stores them here once ready: a restart gets",
        "# them back in LISTEN_FDS, and clients queue in the kernel's backlog meanwhile.",
        f"FileDescriptorStoreMax={count}",
    ]
    if systemd_version is not None and systemd_version >= FD_STORE_PRESERVE_VERSION:
        lines += [
            "# Kept across a stop and start too (a package upgrade); `systemctl clean",
            "# --what=fdstore` on the stopped unit closes them.",
            "FileDescriptorStorePreserve=yes",
        ]
    return lines


def _check_fd_store_sockets(manifest: Manifest) -> None:
    """With ``fd-store``, the service binds as its unprivileged user: no port below 1024."""
    for spec in manifest.sockets:
        for index, address in enumerate(spec.listen):
            if isinstance(address, InetAddress) and 0 < address.port < UNPRIVILEGED_PORT_START:
                key = f"sockets.{spec.name}.listen" + ("" if len(spec.listen) == 1 else f"[{index}]")
                raise ManifestError(
                    f"{manifest.source}: {key}: port {address.port} needs a privilege to bind, and with "
                    "service.fd-store = true the unprivileged service binds it itself; use a port from "
                    f"{UNPRIVILEGED_PORT_START}, or fd-store = false (systemd binds it in a .socket unit)"
                )


def _unix_folders(manifest: Manifest) -> list[str]:
    """The folders of the manifest's unix socket files (absolute: units refuse relative paths)."""
    folders = {
        posixpath.dirname(address.path)
        for spec in manifest.sockets
        for address in spec.listen
        if isinstance(address, UnixAddress)
    }
    return sorted(folders)


def _connection_unit(
    manifest: Manifest,
    spec: SocketSpec,
    socket_unit: Unit,
    *,
    command: Sequence[str],
    manifest_path: str,
    user: bool,
    needed_paths: Sequence[NeededPath],
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
        # The same sandbox as the service's: the same code serves the connection.
        *_sandbox(manifest, user=user, needed_paths=needed_paths),
        *_unit_extra(manifest),
        "",
    ]
    return Unit(socket_unit.name.removesuffix(".socket") + "@.service", "\n".join(lines))


def _unit_extra(manifest: Manifest) -> list[str]:
    """The manifest's own ``[service] unit-extra`` lines, last, so they override."""
    if not manifest.service.unit_extra:
        return []
    return [
        f"# From {manifest.source}'s [service] unit-extra (later lines override the ones above):",
        *manifest.service.unit_extra,
    ]


def _seconds(value: float) -> str:
    """A duration for systemd: whole seconds as ``5``, else milliseconds (``1500ms``)."""
    if value == int(value):
        return str(int(value))
    return f"{round(value * 1000)}ms"


def _sandbox(manifest: Manifest, *, user: bool, needed_paths: Sequence[NeededPath]) -> list[str]:
    """The least-privilege settings of the ``[Service]`` section (``systemd-analyze security`` rates them).

    Every process of the unit runs under them: the supervisor, its workers
    (the same interpreter, handed the sockets at fds 3..) and ``ExecReload=``
    (pidfd_open, kill, an abstract unix datagram socket); checked under the
    real systemd 252 (tests/test_systemd_privilege.py).
    """
    service = manifest.service
    if user:
        if service.user is not None:
            raise ManifestError(
                f"{manifest.source}: service.user: a --user unit runs as its manager's user; "
                "leave user unset for --user"
            )
        # A user manager runs the service as its own user and cannot set up the
        # mount namespace of the system-only settings below (no privileges):
        # these are the ones that work unprivileged (seccomp, prctl, umask).
        return ["# Least privilege (what a user manager can apply):", *_UNPRIVILEGED]
    if service.fd_store:
        lines = ["# Least privilege: the service binds its sockets itself (fd-store), as its own user."]
    else:
        lines = ["# Least privilege: systemd creates the sockets, so the service needs no privilege to bind."]
    if service.user is None:
        lines.append("DynamicUser=yes")
    else:
        lines.append(f"User={service.user}")
        if service.group is not None:
            lines.append(f"Group={service.group}")
    relaxations: list[str] = []
    bound: list[str] = []
    for needed in sorted(needed_paths, key=lambda n: n.path):
        setting = hidden_by(needed.path)
        if setting is None or any(needed.path == b or needed.path.startswith(b + "/") for b in bound):
            continue
        bound.append(needed.path)
        relaxations += [
            f"# {needed.why} ({needed.path}) is hidden by {setting}: bound back, read-only.",
            f"BindReadOnlyPaths={_quote(needed.path)}",
        ]
    under_home = any(hidden_by(path) == "ProtectHome=" for path in bound)
    lines += [
        "ProtectSystem=strict",
        # tmpfs: an empty, read-only home hierarchy (mode 0755), on which the bound
        # folders appear: their own modes count, not their parents' (/root is 0700).
        f"ProtectHome={'tmpfs' if under_home else 'yes'}",
        "PrivateTmp=yes",
        *relaxations,
        "PrivateDevices=yes",
        "PrivateUsers=yes",
        "PrivateMounts=yes",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectControlGroups=yes",
        "ProtectClock=yes",
        "ProtectHostname=yes",
        # The supervisor and reload --wait see their own processes only.
        "ProtectProc=invisible",
        "ProcSubset=pid",
        "RemoveIPC=yes",
        *_UNPRIVILEGED,
        f"RestrictAddressFamilies={' '.join(_address_families(manifest))}",
    ]
    if service.fd_store:
        lines += [
            "# No IPAddressDeny=: it filters the sockets the service opens itself, and with",
            "# fd-store those are its listening sockets (their clients would time out).",
        ]
        for folder in _unix_folders(manifest):
            lines += [
                "# The service makes its unix socket files itself (fd-store).",
                f"ReadWritePaths={_quote(folder)}",
            ]
    else:
        lines += [
            "# Passed sockets and their connections are not filtered (checked under",
            "# systemd 252); this stops sockets the service would open itself.",
            "IPAddressDeny=any",
        ]
    return lines


_UNPRIVILEGED = [
    "NoNewPrivileges=yes",
    "CapabilityBoundingSet=",
    "SystemCallFilter=@system-service",
    "SystemCallFilter=~@privileged @resources",
    "SystemCallArchitectures=native",
    "# A call outside the filter raises PermissionError in Python, rather than killing the process.",
    "SystemCallErrorNumber=EPERM",
    "RestrictNamespaces=yes",
    "RestrictRealtime=yes",
    "RestrictSUIDSGID=yes",
    "LockPersonality=yes",
    # CPython 3.11 has no JIT and the stack needs no libffi closures (ctypes
    # callbacks): nothing maps memory writable and executable.  A handler
    # library that does (cffi callbacks, a JIT) needs unit-extra
    # MemoryDenyWriteExecute=no.
    "MemoryDenyWriteExecute=yes",
    "UMask=0077",
]


def _address_families(manifest: Manifest) -> list[str]:
    """AF_UNIX (sd_notify, the supervisor's inbox, reload --wait, trio's wakeup socketpair), the manifest's.

    Passed sockets, and the connections accepted on them, are not made by
    socket(2), so the filter never applies to them; the manifest's families
    are there for handlers that open sockets of the kinds they serve.
    """
    families = {socket.AF_UNIX}
    for spec in manifest.sockets:
        for address in spec.listen:
            if isinstance(address, InetAddress):
                # The bare port binds IPv6's any-address, or IPv4's where there is no IPv6.
                families |= (
                    {address.family} if address.host is not None else {socket.AF_INET, socket.AF_INET6}
                )
    return [family.name for family in sorted(families)]


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


def _quote(path: str) -> str:
    """Quote a path for ExecStart= when it needs it (systemd splits on spaces, and expands % and $)."""
    escaped = path.replace("%", "%%").replace("$", "$$")
    if any(c in escaped for c in " \t\"'\\"):
        return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return escaped
