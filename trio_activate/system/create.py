"""Creating the manifest's sockets when nobody passed them to us.

Layer 2: syscalls, no trio.  The CLI's path up to the re-exec runs this before
trio is imported, so nothing here may import it.

What this module owns
---------------------
``create_socket`` makes one socket for one ``listen`` address of one
``[sockets.NAME]`` table, as systemd's ``socket_address_listen()`` would:
``socket()`` with ``SOCK_CLOEXEC``, options, ``bind()``, for unix socket files
ownership and mode, then ``listen()`` for stream and seqpacket sockets.
``create_sockets`` does that for every address of every socket, in manifest
order (the order the activator passes fds in), all or nothing.

Resource handling
-----------------
Every ``CreatedSocket`` returned owns its ``sock``: whoever holds it closes it
(the activator, once the fd sits where it belongs, or the runtime at the end).
Its ``created_path`` is the unix socket file this process created; removing it
is the holder's business too (``remove-on-stop``), and ``remove_socket_file``
is the tool: it removes the file only if it is still the very file we bound
(same ``st_dev``/``st_ino``), never one somebody else put there since.  Remove
the file before closing the socket: the open socket is what keeps that
identity unique (see ``remove_socket_file``).

Sockets are created close-on-exec.  Which fds cross an exec is the
activator's decision (it ``dup2``s them into place, which clears the flag on
the copy), so nothing leaks into a process by accident.

Sockets are left in blocking mode: adopting them into trio sets non-blocking,
and ``O_NONBLOCK`` is shared by every copy of the fd, so setting it here would
only change what a passed-to process finds.

Error handling
--------------
Every failure is one ``CreationError`` line naming the manifest key and the
address, e.g. ``service.toml: sockets.web.listen: 127.0.0.1:8080: address
already in use (another process listens there)``.  ``create_socket`` leaves no
half-made socket behind: a socket that fails mid-setup is closed, and its file
removed if it got one.  ``create_sockets`` goes further: on any error (also
``KeyboardInterrupt``) every socket it created so far is closed and every
unix socket file it created is removed.

Choices, and why
----------------
- Bare port (``"8080"``): ``[::]:8080`` dual-stack, falling back to
  ``0.0.0.0:8080`` when ``socket(AF_INET6)`` says the host has no IPv6, as
  systemd does.  With ``ipv6-only`` there is nothing to fall back to: error.
- ``IPV6_V6ONLY`` is always set, to 1 with ``ipv6-only`` and 0 otherwise, so
  the ``net.ipv6.bindv6only`` sysctl never decides what a manifest means.
  (The kernel forces it to 1 anyway when binding a specific IPv6 address.)
- ``SO_REUSEADDR`` on TCP sockets, as systemd sets it: a restarted service
  can bind while connections of the old one sit in TIME_WAIT.  systemd sets
  it on every socket; we do not set it on UDP, where on Linux it lets a second
  socket bind the same port silently and steal datagrams, hiding exactly the
  "address already in use" error a user needs to see.
- A unix socket file already there: a *stale* socket (connecting says
  ``ECONNREFUSED``: nobody is bound to it) is unlinked and replaced.  A live
  socket, or anything that is not a socket, is never removed: that is an
  error.  systemd instead unlinks whatever is there on ``EADDRINUSE``; we are
  stricter because in development a second copy of a service is a mistake to
  report, not to silently break.  (A socket bound but not yet listening
  answers ``ECONNREFUSED`` too and would be taken for stale; that window is a
  few syscalls long.  And the probe is a real connection: a live stream
  server sees one client that connects and closes at once.)
- The parent folder of a unix socket must exist: systemd creates missing
  parents, but a typo in a path should not grow directories; the error names
  the folder.
- Mode and ownership of a unix socket file are final before it can be used:
  ``bind()`` under ``umask(0o777)`` (the file is born with mode 0), then
  ``chown``, then ``chmod`` to the manifest's mode, then ``listen()``.
  ``fchmod`` does not work on a socket's fd, so the path is used.  Ownership
  goes before mode so the mode's permissions never apply to the old owner.
  ``umask`` is process-wide: changing it while another thread creates files
  would give that thread's files mode 0.  The CLI runs this before any thread
  exists; when Python threads are running (an embedding program), the umask
  is left alone, and the file has the default umask's mode until the
  ``chmod`` a few syscalls later -- harmless for stream and seqpacket sockets,
  which refuse connections until ``listen()``, and for datagram sockets a
  window of a few syscalls in which a datagram may arrive.
- ``owner`` without ``group`` also sets the group to the owner's primary
  group, as systemd's ``SocketUser=`` does.  All-digit names are numeric ids.
- Port 0 asks the kernel for a free port; the chosen port is logged (logger
  ``trio_activate``, INFO) because nobody could find the service otherwise.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import logging
import os
import pwd
import socket
import stat
import threading
from collections.abc import Collection, Iterator
from functools import partial
from pathlib import Path

from ..errors import CreationError
from ..model.address import (
    UNIX_PATH_MAX,
    AbstractAddress,
    Address,
    InetAddress,
    UnixAddress,
    address_from_sockname,
)
from ..model.manifest import Manifest, SocketSpec
from ..model.match import describe_file_kind
from ..model.records import field, record
from ..model.text import is_decimal
from .fds import close_all

__all__ = [
    "CreatedSocket",
    "create_socket",
    "create_sockets",
    "remove_socket_file",
    "remove_socket_file_if_same",
]

logger = logging.getLogger("trio_activate")

# Linux's values; the socket module of Python 3.11 lacks both constants.
IP_FREEBIND: int = getattr(socket, "IP_FREEBIND", 15)
IPV6_FREEBIND: int = getattr(socket, "IPV6_FREEBIND", 78)

# What socket(AF_INET6, ...) says on a host without IPv6.
_NO_IPV6 = frozenset({errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL})

# Largest uid/gid chown(2) accepts; (uid_t)-1 means "leave unchanged".
_MAX_ID = 2**32 - 2


@record(frozen=False)
class CreatedSocket:
    """One socket made for one ``listen`` address.  Whoever holds it owns ``sock``."""

    spec_name: str
    """The manifest socket name, which is the fd name passed in ``LISTEN_FDNAMES``."""
    address: Address
    """As declared, with a relative unix path resolved against the manifest's folder.

    For port 0 this still says 0; ``sock.getsockname()`` has the kernel's port.
    """
    sock: socket.socket
    created_path: str | None = None
    """The unix socket file this process created, or ``None`` (inet, abstract)."""
    created_file_id: tuple[int, int] | None = field(default=None, repr=False)
    """``(st_dev, st_ino)`` of ``created_path`` right after ``bind()``."""


def create_socket(
    spec: SocketSpec, address: Address, *, folder: Path, source: str | None = None, label: str | None = None
) -> CreatedSocket:
    """Create, bind and (for stream and seqpacket) listen one socket of ``spec``.

    ``address`` is one of ``spec.listen``; a relative unix path is resolved
    against ``folder``.

    Resource handling: the caller owns the returned socket and the file it
    created.  On error nothing is left behind.

    Error handling: ``CreationError``, one line naming ``sockets.NAME.KEY``
    and the address, after ``source`` (the manifest's file name) when given;
    or, for a socket no manifest declares, after ``label`` instead (``activate``'s
    ``-l ADDRESS``).
    """
    listen_key = "listen" if len(spec.listen) == 1 else f"listen[{spec.listen.index(address)}]"
    if isinstance(address, InetAddress):
        shown = str(address) if address.host is not None else f"{address} ([::]:{address.port})"
        return _create_inet(spec, address, _Where(source, spec, listen_key, shown, label))
    if isinstance(address, UnixAddress):
        resolved = address.resolved(str(folder))
        shown = str(address) if resolved == address else f"{address} ({resolved.path})"
        return _create_unix_path(spec, resolved, _Where(source, spec, listen_key, shown, label))
    return _create_abstract(spec, address, _Where(source, spec, listen_key, str(address), label))


def create_sockets(manifest: Manifest, names: Collection[str] | None = None) -> list[CreatedSocket]:
    """Create every address of every socket of ``manifest`` (or of those in ``names``), in manifest order.

    All or nothing: if one fails, every socket created so far is closed and
    every unix socket file created so far is removed, then the
    ``CreationError`` (prefixed with the manifest's file name when known)
    propagates.
    """
    source = manifest.source if manifest.path is not None else None
    created: list[CreatedSocket] = []
    try:
        for spec in manifest.sockets:
            if names is not None and spec.name not in names:
                continue
            for address in spec.listen:
                created.append(create_socket(spec, address, folder=manifest.folder, source=source))
    except BaseException:
        _discard(created)
        raise
    return created


def remove_socket_file(created: CreatedSocket) -> None:
    """Remove the unix socket file ``created`` made, if it is still that file.

    A file that is gone, or that somebody replaced (another inode, e.g. a new
    instance of the service bound the path since), is left alone.  A failure
    to unlink is logged, not raised: this runs on cleanup paths, where an
    exception would hide the error that led there.

    Call it *before* closing ``created.sock`` (or while another copy of the
    fd is open).  A bound socket pins its file's inode, so while it is open no
    other file can get the same ``(st_dev, st_ino)``; once the last copy is
    closed the inode is freed, and filesystems hand the number to the next
    file created at once (seen on every try here), so a file somebody made
    since could pass for ours.
    """
    if created.created_path is None or created.created_file_id is None:
        return
    remove_socket_file_if_same(created.created_path, created.created_file_id)


# --- the work ----------------------------------------------------------------


@record
class _Where:
    """Builds the one-line errors for one address of one socket."""

    source: str | None
    spec: SocketSpec
    listen_key: str
    shown: str
    # Names the address where no manifest does ("-l 127.0.0.1:80"); then it replaces the rest.
    label: str | None = None

    def error(self, problem: str, *, key: str | None = None) -> CreationError:
        if self.label is not None:
            return CreationError(f"{self.label}: {problem}")
        prefix = f"{self.source}: " if self.source is not None else ""
        if key is None:
            return CreationError(
                f"{prefix}sockets.{self.spec.name}.{self.listen_key}: {self.shown}: {problem}"
            )
        return CreationError(f"{prefix}sockets.{self.spec.name}.{key}: {problem}")


def _new_socket(family: int, kind: int) -> socket.socket:
    """The one place sockets are made (tests replace it to script faults)."""
    return socket.socket(family, kind | socket.SOCK_CLOEXEC)


def _problem(exc: OSError) -> str:
    text = exc.strerror or str(exc)
    return text[:1].lower() + text[1:]


def _in_use(spec: SocketSpec) -> str:
    if spec.type.kernel_type == socket.SOCK_DGRAM:
        return "address already in use (another socket is bound there)"
    return "address already in use (another process listens there)"


def _setsockopt(sock: socket.socket, level: int, option: int, value: int, name: str, where: _Where) -> None:
    try:
        sock.setsockopt(level, option, value)
    except OSError as exc:
        raise where.error(f"cannot set {name}: {_problem(exc)}") from None


def _listen(sock: socket.socket, spec: SocketSpec, where: _Where) -> None:
    if spec.type.kernel_type == socket.SOCK_DGRAM:
        return
    try:
        sock.listen(spec.backlog)
    except OSError as exc:
        raise where.error(f"cannot listen: {_problem(exc)}") from None


def _create_inet(spec: SocketSpec, address: InetAddress, where: _Where) -> CreatedSocket:
    kind = spec.type.kernel_type
    family = address.family
    host = address.bind_host
    try:
        sock = _new_socket(family, kind)
    except OSError as exc:
        if family != socket.AF_INET6 or exc.errno not in _NO_IPV6:
            raise where.error(f"cannot create the socket: {_problem(exc)}") from None
        if address.host is not None:
            raise where.error(f"IPv6 is not available on this host ({_problem(exc)})") from None
        if spec.ipv6_only:
            raise where.error("ipv6-only is set, but IPv6 is not available on this host") from None
        # systemd's fallback for a bare port on a host without IPv6.
        family, host = socket.AF_INET, "0.0.0.0"
        try:
            sock = _new_socket(family, kind)
        except OSError as exc2:
            raise where.error(f"cannot create the socket: {_problem(exc2)}") from None
    try:
        if family == socket.AF_INET6:
            _setsockopt(
                sock, socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(spec.ipv6_only), "IPV6_V6ONLY", where
            )
        if kind == socket.SOCK_STREAM:
            _setsockopt(sock, socket.SOL_SOCKET, socket.SO_REUSEADDR, 1, "SO_REUSEADDR", where)
        if spec.reuse_port:
            _setsockopt(sock, socket.SOL_SOCKET, socket.SO_REUSEPORT, 1, "SO_REUSEPORT (reuse-port)", where)
        if spec.free_bind:
            _set_free_bind(sock, family, where)
        try:
            sock.bind((host, address.port))
        except OSError as exc:
            raise where.error(_inet_bind_problem(exc, spec, address)) from None
        _listen(sock, spec, where)
        if address.port == 0 and where.label is None:  # with a label, the caller says where it listens
            bound = address_from_sockname(family, sock.getsockname())
            verb = "bound to" if kind == socket.SOCK_DGRAM else "listening on"
            logger.info(
                "sockets.%s: %s %s (port 0: chosen by the kernel)",
                spec.name,
                verb,
                bound,
                extra={"socket": spec.name},
            )
    except BaseException:
        sock.close()
        raise
    return CreatedSocket(spec.name, address, sock)


def _set_free_bind(sock: socket.socket, family: int, where: _Where) -> None:
    if family == socket.AF_INET6:
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
            return
        except OSError as exc:
            # Kernels before 4.15 lack IPV6_FREEBIND; IP_FREEBIND sets the
            # same flag on an IPv6 socket (systemd falls back the same way).
            if exc.errno != errno.ENOPROTOOPT:
                raise where.error(f"cannot set IPV6_FREEBIND (free-bind): {_problem(exc)}") from None
    _setsockopt(sock, socket.IPPROTO_IP, IP_FREEBIND, 1, "IP_FREEBIND (free-bind)", where)


def _inet_bind_problem(exc: OSError, spec: SocketSpec, address: InetAddress) -> str:
    if exc.errno == errno.EADDRINUSE:
        return _in_use(spec)
    if exc.errno == errno.EACCES:
        if 0 < address.port < 1024:
            return "permission denied (ports below 1024 need CAP_NET_BIND_SERVICE)"
        return "permission denied"
    if exc.errno == errno.EADDRNOTAVAIL and not spec.free_bind:
        return (
            "address not available (it is not an address of this host; "
            "set free-bind = true to bind it before it is configured)"
        )
    return f"cannot bind: {_problem(exc)}"


def _create_abstract(spec: SocketSpec, address: AbstractAddress, where: _Where) -> CreatedSocket:
    try:
        sock = _new_socket(socket.AF_UNIX, spec.type.kernel_type)
    except OSError as exc:
        raise where.error(f"cannot create the socket: {_problem(exc)}") from None
    try:
        try:
            sock.bind(address.sockaddr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise where.error(_in_use(spec)) from None
            raise where.error(f"cannot bind: {_problem(exc)}") from None
        _listen(sock, spec, where)
    except BaseException:
        sock.close()
        raise
    return CreatedSocket(spec.name, address, sock)


def _create_unix_path(spec: SocketSpec, address: UnixAddress, where: _Where) -> CreatedSocket:
    path = address.path
    size = len(os.fsencode(path))
    if size > UNIX_PATH_MAX:
        raise where.error(
            f"the path is {size} bytes long; a unix socket address holds at most {UNIX_PATH_MAX}"
        )
    uid, gid = _resolve_ids(spec, where)
    kind = spec.type.kernel_type
    _clear_stale_socket(path, kind, spec, where)
    try:
        sock = _new_socket(socket.AF_UNIX, kind)
    except OSError as exc:
        raise where.error(f"cannot create the socket: {_problem(exc)}") from None
    file_id: tuple[int, int] | None = None
    try:
        with _umask_for_bind():
            try:
                sock.bind(path)
            except OSError as exc:
                raise where.error(_unix_bind_problem(exc, path)) from None
        try:
            st = os.lstat(path)
        except OSError as exc:
            raise where.error(f"the socket file vanished right after bind: {_problem(exc)}") from None
        file_id = (st.st_dev, st.st_ino)
        if uid != -1 or gid != -1:
            try:
                os.chown(path, uid, gid, follow_symlinks=False)
            except OSError as exc:
                key = "owner" if spec.owner is not None else "group"
                hint = " (changing the owner needs root or CAP_CHOWN)" if exc.errno == errno.EPERM else ""
                raise where.error(f"cannot chown {path}: {_problem(exc)}{hint}", key=key) from None
        try:
            os.chmod(path, spec.mode)
        except OSError as exc:
            raise where.error(
                f"cannot chmod {path} to {spec.mode:04o}: {_problem(exc)}", key="mode"
            ) from None
        _listen(sock, spec, where)
    except BaseException:
        if file_id is not None:
            remove_socket_file_if_same(path, file_id)  # before close(): see remove_socket_file
        sock.close()
        raise
    return CreatedSocket(spec.name, address, sock, created_path=path, created_file_id=file_id)


def _resolve_ids(spec: SocketSpec, where: _Where) -> tuple[int, int]:
    """``(uid, gid)`` for chown, ``-1`` meaning unchanged.  Resolved before any file is made."""
    uid = gid = -1
    if spec.owner is not None:
        if is_decimal(spec.owner):
            uid = _numeric_id(spec.owner, "owner", where)
            # A uid without a passwd entry: only the owner changes.
            with contextlib.suppress(KeyError):
                gid = pwd.getpwuid(uid).pw_gid
        else:
            try:
                entry = pwd.getpwnam(spec.owner)
            except KeyError:
                raise where.error(f"{spec.owner!r}: no such user", key="owner") from None
            uid, gid = entry.pw_uid, entry.pw_gid
    if spec.group is not None:
        if is_decimal(spec.group):
            gid = _numeric_id(spec.group, "group", where)
        else:
            try:
                gid = grp.getgrnam(spec.group).gr_gid
            except KeyError:
                raise where.error(f"{spec.group!r}: no such group", key="group") from None
    return uid, gid


def _numeric_id(text: str, key: str, where: _Where) -> int:
    number = int(text)
    if number > _MAX_ID:
        raise where.error(f"{number} is out of range 0-{_MAX_ID}", key=key)
    return number


def _clear_stale_socket(path: str, kind: int, spec: SocketSpec, where: _Where) -> None:
    """Unlink a stale socket file at ``path``; raise if anything else is there."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return  # nothing there; bind() reports a missing folder
    except OSError as exc:
        raise where.error(f"cannot inspect the path: {_problem(exc)}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise where.error(
            f"{describe_file_kind(st.st_mode)} is already there, not a socket "
            "(only a stale socket file is replaced; remove it yourself if it is not needed)"
        )
    live = _probe(path, kind, where)
    if live is None:
        return  # gone since lstat
    if live:
        raise where.error(f"a live socket is already listening there ({_in_use(spec)})")
    # Unlink only the file we probed: if it was replaced meanwhile, bind()
    # reports it as in use rather than us removing somebody's new socket.
    try:
        now = os.lstat(path)
        if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
            os.unlink(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise where.error(f"cannot remove the stale socket file: {_problem(exc)}") from None
    logger.info(
        "sockets.%s: replaced the stale socket file %s (nobody listened on it)",
        spec.name,
        path,
        extra={"socket": spec.name},
    )


def _probe(path: str, kind: int, where: _Where) -> bool | None:
    """Connect to the socket file: ``True`` if live, ``False`` if stale, ``None`` if gone."""
    try:
        probe = _new_socket(socket.AF_UNIX, kind)
    except OSError as exc:
        raise where.error(f"cannot check the socket file already there: {_problem(exc)}") from None
    try:
        # Non-blocking: a live listener with a full backlog would block a
        # blocking connect(); EAGAIN says it is live just as well.
        probe.setblocking(False)
        probe.connect(path)
    except ConnectionRefusedError:
        return False  # no socket bound to the file: stale
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINPROGRESS):
            return True
        if exc.errno == errno.EPROTOTYPE:
            raise where.error(
                "a live socket of another type is already bound there (connecting says wrong type)"
            ) from None
        raise where.error(
            f"cannot tell whether the socket file already there is live: {_problem(exc)} (it is left alone)"
        ) from None
    finally:
        probe.close()
    return True


def _unix_bind_problem(exc: OSError, path: str) -> str:
    parent = os.path.dirname(path) or "."
    if exc.errno == errno.ENOENT:
        return f"folder {parent} does not exist"
    if exc.errno == errno.ENOTDIR:
        return f"folder {parent} is not a folder (a part of the path is a file)"
    if exc.errno == errno.EACCES:
        return f"permission denied (cannot create a file in folder {parent})"
    if exc.errno == errno.EADDRINUSE:
        return "address already in use (a file appeared there while the socket was being created)"
    return f"cannot bind: {_problem(exc)}"


@contextlib.contextmanager
def _umask_for_bind() -> Iterator[None]:
    """Make the socket file mode 0 at birth, when that is safe (see the module docstring).

    ``threading.active_count()`` sees Python threads only; a C extension's own
    threads are not counted, and are not expected before the service starts.
    """
    if threading.active_count() > 1:
        yield
        return
    old = os.umask(0o777)
    try:
        yield
    finally:
        os.umask(old)


def remove_socket_file_if_same(path: str, file_id: tuple[int, int]) -> None:
    """Unlink ``path`` if it is still the file ``file_id`` (``(st_dev, st_ino)``) names.

    The same rules as `remove_socket_file`: call it while the socket that
    pinned that inode is still open; failures are logged, not raised.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        logger.warning("cannot check the socket file %s before removing it: %s", path, _problem(exc))
        return
    if (st.st_dev, st.st_ino) != file_id:
        return  # not ours any more
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        logger.warning("cannot remove the socket file %s: %s", path, _problem(exc))


def _discard(created: list[CreatedSocket]) -> None:
    """Close every socket and remove every file in ``created`` (cleanup after a failure)."""

    def discard(item: CreatedSocket) -> None:
        remove_socket_file(item)  # before close(): see remove_socket_file
        item.sock.close()

    close_all(partial(discard, item) for item in reversed(created))
