"""Matching passed fds to the manifest's ``[sockets.NAME]`` tables.

Layer 1: pure.  Nothing here makes a syscall or imports trio.  The adoption
layer (`trio_activate.system.passed`) looks at each passed fd with a syscall
(`trio_activate.system.fds.inspect_fd`) and describes it as a `PassedSocket`; this
module decides, from those descriptions and the manifest alone, which
manifest socket gets which fd, and which fds nobody claims.

Resource handling: no fd is opened, inspected or closed here; `Match` only
names fd numbers.  The caller owns every fd before and after the call, and
closes the unclaimed ones itself.

Error handling: every problem is one `AdoptionError`, raised for the first
offending fd in passed order.  Messages start with the manifest's file name,
then name the socket (``sockets.NAME``) or the fd, say what was passed and
what the manifest expects.  Address differences are warnings, not errors.

Theory of operation
-------------------
systemd's socket unit is authoritative for *where* a socket listens, the
manifest for *what kind* of socket a handler can serve.  So, for each passed
fd, in order:

1. Who claims it.  With ``names_given`` False (``LISTEN_FDNAMES`` was
   absent) every fd is taken to be named ``"unknown"``, whatever its `name`.
   Then:

   - A name the manifest declares goes to that socket.  The manifest's names
     come first, even over the special names below: a ``[sockets.stored]``
     table receives the fds named ``stored``.  (The issue is silent here; a
     name the user wrote down is the more specific statement.)
   - ``connection`` (systemd names each ``Accept=yes`` connection so) must be
     a connected stream socket, that is, a ``SOCK_STREAM`` socket that is not
     listening.  It becomes `Match.connection`.  A ``connection`` fd of any
     other kind is an error: trio-activate serves ``Accept=yes`` connections
     of stream sockets only, and closing a client's connection unannounced
     would be worse than refusing to start.
   - Without names, the single passed fd, when it is a non-listening
     ``SOCK_STREAM`` socket, is the connection too: ``systemd-socket-activate
     --accept`` passes the connection without ``LISTEN_FDNAMES``.
   - ``unknown`` (no names, or an explicit ``unknown``): claimed by the
     manifest's only socket when it declares exactly one; otherwise an error
     telling the user to set ``FileDescriptorName=`` (``--fdname=`` for
     ``systemd-socket-activate``).  Several unknown fds all go to that one
     socket (one unit may have several ``Listen*=`` lines).
   - ``stored`` (an fd-store fd saved without ``FDNAME=``) and any name the
     manifest does not declare: unclaimed.  Each gets a warning naming the
     fd, its name and why it will be closed.

2. Checking a claimed fd, as ``sd_is_socket_inet()``/``sd_is_socket_unix()``
   do: its family must be one the socket's addresses have (the bare-port form
   ``"7000"`` accepts IPv6 and IPv4, since systemd falls back to IPv4 on
   hosts without IPv6), its type must equal the manifest's, and a stream or
   seqpacket socket must be listening.  Any mismatch is an error.

3. Comparing the address: when the fd's address matches none of the
   socket's addresses, a warning names both.  Port 0 in the manifest matches
   any port; the bare-port form matches any host with that port; relative
   unix paths are resolved against ``manifest.folder`` and both paths are
   normalized lexically (no symlinks resolved: this module makes no
   syscalls).  An fd with no address (an unbound unix socket) differs from
   every address.

The connection is checked too: some stream socket of the manifest must
accept its family.  Which handler serves it is the caller's business (by
its local address, or the manifest's only socket): a `Match` only says
which fd it is.  More than one connection is an error.

After every fd: a manifest socket that received no fd is an error naming it
and the names that were passed, except in ``Accept=yes`` mode (a connection
was passed), where listening sockets are not expected.
"""

from __future__ import annotations

import ipaddress
import posixpath
import socket
import stat
from collections.abc import Mapping, Sequence
from pathlib import PurePosixPath
from types import MappingProxyType

from ..errors import AdoptionError
from .address import AbstractAddress, Address, InetAddress, UnixAddress
from .listen_env import CONNECTION_NAME, STORED_NAME, UNKNOWN_NAME
from .manifest import Manifest, SocketSpec, SocketType
from .records import record

__all__ = ["Match", "PassedSocket", "describe_family", "describe_file_kind", "describe_type", "match_passed"]


@record
class PassedSocket:
    """What was found at one passed fd.

    `family` is ``socket.AF_*``, `type` is ``socket.SOCK_*`` (without the
    ``SOCK_NONBLOCK``/``SOCK_CLOEXEC`` flags), `listening` is ``SO_ACCEPTCONN``,
    `address` is the socket's own address (``getsockname``), or None when it
    has none or its family is not one trio-activate serves.
    """

    fd: int
    name: str
    family: int
    type: int
    listening: bool
    address: Address | None
    connected: bool = False
    """A peer address was found (``getpeername``): a connection, not a listening socket."""


@record
class Match:
    """Which fds go where.  Every passed fd is in exactly one of the three places."""

    by_socket: Mapping[str, tuple[int, ...]]
    """Manifest socket name -> its fds, in passed order; keys in manifest order."""
    connection: int | None
    """The connected stream socket of an ``Accept=yes`` activation, if one was passed."""
    unclaimed: tuple[int, ...]
    """Fds no manifest socket claims; the caller closes them."""
    warnings: tuple[str, ...]
    """One line each, for the log."""
    missing: tuple[str, ...] = ()
    """Manifest sockets no fd was passed for, in manifest order (only with ``missing_ok``)."""


_FAMILY_WORDS: dict[int, str] = {socket.AF_INET: "IPv4", socket.AF_INET6: "IPv6", socket.AF_UNIX: "unix"}
_TYPE_WORDS: dict[int, str] = {
    socket.SOCK_STREAM: "stream",
    socket.SOCK_DGRAM: "datagram",
    socket.SOCK_SEQPACKET: "seqpacket",
    socket.SOCK_RAW: "raw",
}
# Types whose sockets accept connections, so must be listening to be served.
_CONNECTION_TYPES = (socket.SOCK_STREAM, socket.SOCK_SEQPACKET)


def describe_family(family: int) -> str:
    """``"IPv4"``, ``"IPv6"``, ``"unix"``, or the ``AF_*`` name of another family."""
    if family in _FAMILY_WORDS:
        return _FAMILY_WORDS[family]
    try:
        return socket.AddressFamily(family).name
    except ValueError:
        return f"family {family}"


def describe_type(kind: int) -> str:
    """``"stream"``, ``"datagram"``, ``"seqpacket"``, ``"raw"`` or ``"type N"``."""
    return _TYPE_WORDS.get(kind, f"type {kind}")


def describe_file_kind(mode: int) -> str:
    """What a file that is not a socket is, from its ``st_mode``: ``"a regular file"``, ``"a folder"``...

    For messages about a path where a socket file was to go and about a
    passed fd that is no socket: one wording for both.  Pure: the `stat`
    tests only look at the bits of `mode`.
    """
    kinds = (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a pipe (FIFO)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISLNK, "a symbolic link"),
    )
    for test, kind in kinds:
        if test(mode):
            return kind
    # eventfd, epoll, timerfd, pidfd...: anonymous inodes carry no file type.
    return "not a file of any kind (an anonymous inode)"


def _a(word: str) -> str:
    # "an IPv4", "an AF_NETLINK", but "a unix", "a family 42".
    return f"an {word}" if word.startswith(("IPv", "AF_", "a", "e", "i", "o")) else f"a {word}"


def _describe_passed(item: PassedSocket) -> str:
    """E.g. ``fd 3 is a unix datagram socket bound to /run/x.sock``."""
    text = f"fd {item.fd} is {_a(describe_family(item.family))} {describe_type(item.type)} socket"
    if item.address is not None:
        text += f" bound to {item.address}"
    if item.type in _CONNECTION_TYPES and not item.listening:
        text += ", not listening"
    return text


def _describe_spec(spec: SocketSpec) -> str:
    """E.g. ``a listening stream socket on 127.0.0.1:8080, [::1]:8080``."""
    listening = "listening " if spec.type.kernel_type in _CONNECTION_TYPES else ""
    addresses = ", ".join(str(address) for address in spec.listen)
    return f"a {listening}{spec.type.value} socket on {addresses}"


def _families(spec: SocketSpec) -> set[int]:
    families: set[int] = set()
    for address in spec.listen:
        if isinstance(address, InetAddress) and address.host is None:
            # systemd binds [::]:PORT, or 0.0.0.0:PORT where the host has no IPv6.
            families.update((socket.AF_INET6, socket.AF_INET))
        else:
            families.add(address.family)
    return families


def _same_host(declared: str, found: str) -> bool:
    try:
        return ipaddress.ip_address(declared) == ipaddress.ip_address(found)
    except ValueError:
        return declared == found


def _address_matches(declared: Address, found: Address, folder: PurePosixPath) -> bool:
    if isinstance(declared, InetAddress):
        if not isinstance(found, InetAddress):
            return False
        if declared.port != 0 and declared.port != found.port:
            return False
        return declared.host is None or (found.host is not None and _same_host(declared.host, found.host))
    if isinstance(declared, UnixAddress):
        if not isinstance(found, UnixAddress):
            return False
        wanted = posixpath.normpath(declared.resolved(folder).path)
        return wanted == posixpath.normpath(found.path)
    if isinstance(declared, AbstractAddress):
        return isinstance(found, AbstractAddress) and declared.name == found.name
    return False  # pragma: no cover - Address has three forms


def _show_declared(address: Address, folder: PurePosixPath) -> str:
    if isinstance(address, UnixAddress) and address.is_relative:
        return f"{address} ({address.resolved(folder)})"
    return str(address)


def _check_claimed(manifest: Manifest, spec: SocketSpec, item: PassedSocket) -> str | None:
    """Raise if `item` cannot serve `spec`; return a warning when only the address differs."""
    where = f"{manifest.source}: sockets.{spec.name}"
    if (
        item.family not in _families(spec)
        or item.type != spec.type.kernel_type
        or (item.type in _CONNECTION_TYPES and not item.listening)
    ):
        hint = ""
        if spec.type is SocketType.STREAM and item.type == socket.SOCK_STREAM and not item.listening:
            hint = (
                "; an Accept=yes connection must be named 'connection', or passed alone without a name "
                "(for systemd-socket-activate --accept, leave out --fdname=)"
            )
        raise AdoptionError(
            f"{where}: {_describe_passed(item)}, but the manifest declares {_describe_spec(spec)}{hint}"
        )
    folder = PurePosixPath(manifest.folder)
    if item.address is not None and any(
        _address_matches(declared, item.address, folder) for declared in spec.listen
    ):
        return None
    found = "has no address" if item.address is None else f"is bound to {item.address}"
    declared_text = ", ".join(_show_declared(address, folder) for address in spec.listen)
    return (
        f"{where}: fd {item.fd} {found}, but the manifest declares {declared_text}; "
        "using the passed socket (the systemd unit is authoritative)"
    )


def _is_connection_shape(item: PassedSocket) -> bool:
    return item.type == socket.SOCK_STREAM and not item.listening


def _check_connection(manifest: Manifest, item: PassedSocket, how: str) -> None:
    where = f"{manifest.source}: fd {item.fd}"
    if not _is_connection_shape(item):
        raise AdoptionError(
            f"{where} is {how}, which systemd gives to an Accept=yes connection, but it "
            f"{_describe_passed(item).removeprefix(f'fd {item.fd} ')}; trio-activate serves "
            "Accept=yes connections of stream sockets only"
        )
    streams = [spec for spec in manifest.sockets if spec.type is SocketType.STREAM]
    if any(item.family in _families(spec) for spec in streams):
        return
    declared = "; ".join(f"sockets.{spec.name}: {_describe_spec(spec)}" for spec in manifest.sockets)
    raise AdoptionError(
        f"{where} is an Accept=yes connection ({how}) on {_a(describe_family(item.family))} stream "
        f"socket, but the manifest declares no {describe_family(item.family)} stream socket ({declared})"
    )


def _unnamed_error(manifest: Manifest, unknown: list[PassedSocket], names_given: bool) -> AdoptionError:
    fds = ", ".join(str(item.fd) for item in unknown)
    if names_given:
        what = f"fd {fds} is named 'unknown'" if len(unknown) == 1 else f"fds {fds} are named 'unknown'"
        what += " (no FileDescriptorName= was set)"
    else:
        what = f"fd {fds} was" if len(unknown) == 1 else f"fds {fds} were"
        what += " passed without a name (LISTEN_FDNAMES is not set)"
    names = ", ".join(manifest.socket_names())
    count = len(manifest.sockets)
    declared = f"{count} sockets ({names})" if count != 1 else f"the socket {names}"
    return AdoptionError(
        f"{manifest.source}: {what}, and the manifest declares {declared}: unnamed fds are "
        "accepted only when the manifest declares exactly one socket; set FileDescriptorName= in "
        f"each socket unit (or --fdname= for systemd-socket-activate) to one of: {names}"
    )


def _unclaimed_warning(manifest: Manifest, item: PassedSocket) -> str:
    if item.name == STORED_NAME:
        why = "an fd-store fd saved without FDNAME=, which no manifest socket claims"
    else:
        names = ", ".join(manifest.socket_names())
        why = f"the manifest declares no socket of that name (declared: {names})"
    return f"{manifest.source}: fd {item.fd} is named {item.name!r}: {why}; closing it"


def _passed_names(passed: Sequence[PassedSocket], names_given: bool) -> str:
    if not passed:
        return "no fd was passed at all"
    if not names_given:
        return "the fds were passed without names (LISTEN_FDNAMES is not set)"
    shown = ", ".join(f"{item.name!r} (fd {item.fd})" for item in passed)
    return f"the fds passed are named {shown}"


def match_passed(
    manifest: Manifest, passed: Sequence[PassedSocket], *, names_given: bool, missing_ok: bool = False
) -> Match:
    """Assign each passed fd to a manifest socket, the connection, or nobody.

    `names_given` is `ListenFds.names_given`: False means ``LISTEN_FDNAMES``
    was absent, and every fd counts as ``"unknown"``.  `missing_ok`: a
    manifest socket no fd was passed for is listed in `Match.missing` (the
    caller creates it) instead of being an error: for fds that come from a
    store or a predecessor filled under an older manifest (the fd store, a
    takeover), not from socket units that must match the manifest.

    Error handling: raises `AdoptionError` (see the module docstring for the
    rules).  Resource handling: none; only fd numbers are handled.
    """
    declared = {spec.name: spec for spec in manifest.sockets}
    names = [item.name if names_given else UNKNOWN_NAME for item in passed]
    by_socket: dict[str, list[int]] = {}
    connections: list[PassedSocket] = []
    unclaimed: list[int] = []
    warnings: list[str] = []

    for item, name in zip(passed, names, strict=True):
        if name in declared and len(passed) == 1 and _is_connection_shape(item) and item.connected:
            # `systemd-socket-activate --accept --fdname=NAME` names the one
            # connection it passes NAME: an Accept=yes connection all the same.
            _check_connection(manifest, item, f"named {name!r}, connected and not listening")
            connections.append(item)
            continue
        if name in declared:
            spec = declared[name]
        elif name == CONNECTION_NAME:
            _check_connection(manifest, item, "named 'connection'")
            connections.append(item)
            continue
        elif not names_given and len(passed) == 1 and _is_connection_shape(item):
            _check_connection(manifest, item, "the only fd, unnamed and not listening")
            connections.append(item)
            continue
        elif name == UNKNOWN_NAME:
            if len(manifest.sockets) != 1:
                unknown = [
                    other for other, other_name in zip(passed, names, strict=True) if other_name == name
                ]
                raise _unnamed_error(manifest, unknown, names_given)
            spec = manifest.sockets[0]
        else:
            unclaimed.append(item.fd)
            warnings.append(_unclaimed_warning(manifest, item))
            continue
        warning = _check_claimed(manifest, spec, item)
        if warning is not None:
            warnings.append(warning)
        by_socket.setdefault(spec.name, []).append(item.fd)

    if len(connections) > 1:
        fds = ", ".join(str(item.fd) for item in connections)
        raise AdoptionError(
            f"{manifest.source}: fds {fds} are all Accept=yes connections, but an Accept=yes "
            "service is passed exactly one"
        )
    connection = connections[0].fd if connections else None

    missing = [spec.name for spec in manifest.sockets if spec.name not in by_socket]
    if missing and connection is None and not missing_ok:
        sockets = ", ".join(f"sockets.{name}" for name in missing)
        raise AdoptionError(
            f"{manifest.source}: no fd was passed for {sockets}; {_passed_names(passed, names_given)}; "
            "set FileDescriptorName= in the socket unit to the manifest socket's name"
        )

    ordered = {spec.name: tuple(by_socket[spec.name]) for spec in manifest.sockets if spec.name in by_socket}
    return Match(
        by_socket=MappingProxyType(ordered),
        connection=connection,
        unclaimed=tuple(unclaimed),
        warnings=tuple(warnings),
        missing=tuple(missing) if connection is None else (),
    )
