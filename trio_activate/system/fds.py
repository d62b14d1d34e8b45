"""Syscalls on passed fds: close-on-exec, inspection, the pidfd id, listing open fds.

Layer 2: syscalls, no trio.

Resource handling: nothing here takes ownership of a passed fd or closes
one.  `set_cloexec` and `inspect_fd` work on the number the caller owns and
leave it open whatever happens; the only fds this module opens (a pidfd, an
eventfd, the ``/proc/self/fd`` listing) are its own and closed before it
returns.  The owner of passed fds is `trio_activate.system.passed.PassedFds`.

Error handling: a passed fd that cannot be used is an `AdoptionError` naming
the fd (and its ``LISTEN_FDNAMES`` name, when known) and what was found there.
An fd that is not open at all is the subclass `FdNotOpenError`, because the
owner must then forget the number rather than close it: closing a number it
does not hold could close an unrelated fd that another thread opened there.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import sys
from collections.abc import Callable, Iterable

from ..errors import AdoptionError
from ..model.address import address_from_sockname
from ..model.match import PassedSocket, describe_file_kind

__all__ = [
    "FdNotOpenError",
    "bound_address",
    "close_all",
    "inspect_fd",
    "open_fds",
    "own_pidfd_id",
    "pidfd_id",
    "set_cloexec",
]


def close_all(closes: Iterable[Callable[[], object]]) -> None:
    """Call every one of `closes`, even after one fails; then raise the first error.

    The one way the package closes several fds or sockets it owns: a close
    that fails must not leave the ones after it open (each would leak for
    the life of the process), and the first error is the one to report (a
    later EBADF is most often a consequence of it).  The later errors are
    dropped.  `BaseException` included: a KeyboardInterrupt in the middle
    still closes the rest before it propagates.
    """
    first_error: BaseException | None = None
    for close in closes:
        try:
            close()
        except BaseException as exc:
            if first_error is None:
                first_error = exc
    if first_error is not None:
        raise first_error


class FdNotOpenError(AdoptionError):
    """A passed fd number is not open (EBADF).  The owner must not close it."""

    def __init__(self, message: str, fd: int) -> None:
        super().__init__(message)
        self.fd = fd


def own_pidfd_id() -> int | None:
    """This process's pidfd id (its inode number on pidfs), or None when it cannot be had (`pidfd_id`)."""
    return pidfd_id(os.getpid())


def pidfd_id(pid: int) -> int | None:
    """The pidfd id of process ``pid`` (its inode number on pidfs), or None when it cannot be had.

    The id is what ``LISTEN_PIDFDID`` carries (systemd v259 and later).  None
    on a 32-bit build (pidfs inode numbers are only unique as 64-bit values,
    and libsystemd skips the check there too), where ``pidfd_open`` is missing
    or fails, and on kernels before pidfs (Linux 6.9): there a pidfd is an
    anonymous inode that every pidfd, eventfd and epoll fd shares, so its
    number is the same for every process and identifies nothing.
    """
    if sys.maxsize < 2**32:
        return None
    try:
        pidfd = os.pidfd_open(pid)
    except (OSError, AttributeError):
        return None
    try:
        identity = os.fstat(pidfd)
        # Before pidfs, pidfds live on the anon_inode filesystem with one shared
        # inode.  An eventfd still does on every kernel, so the same (device,
        # inode) as an eventfd means "no pidfs".  (libsystemd asks fstatfs()
        # for PID_FS_MAGIC instead; Python has no fstatfs without ctypes,
        # whose import would cost the activator's fast path a few ms.)
        anonymous = os.eventfd(0, os.EFD_CLOEXEC)
        try:
            shared = os.fstat(anonymous)
        finally:
            os.close(anonymous)
    except (OSError, AttributeError):
        return None
    finally:
        os.close(pidfd)
    if (identity.st_dev, identity.st_ino) == (shared.st_dev, shared.st_ino):
        return None
    return identity.st_ino


def _what(fd: int, name: str | None) -> str:
    return f"fd {fd}" if name is None else f"fd {fd} ({name!r})"


def _not_open(fd: int, name: str | None) -> FdNotOpenError:
    return FdNotOpenError(
        f"{_what(fd, name)} is not open (EBADF): LISTEN_FDS says it was passed, but nothing is there",
        fd,
    )


def set_cloexec(fd: int, *, name: str | None = None) -> None:
    """Set ``FD_CLOEXEC`` on `fd`, so no program this process executes inherits it.

    `name` is the fd's ``LISTEN_FDNAMES`` name, for messages.

    Error handling: `FdNotOpenError` when `fd` is not open, `AdoptionError`
    for any other failure.
    """
    try:
        os.set_inheritable(fd, False)
    except OSError as exc:
        if exc.errno == errno.EBADF:
            raise _not_open(fd, name) from None
        raise AdoptionError(f"{_what(fd, name)}: cannot set FD_CLOEXEC: {exc.strerror or exc}") from None


def _fd_target(fd: int) -> str:
    """What ``/proc/self/fd/N`` points at, for messages; empty when unknown."""
    try:
        return f" ({os.readlink(f'/proc/self/fd/{fd}')})"
    except OSError:
        return ""


def inspect_fd(fd: int, name: str) -> PassedSocket:
    """Describe the socket at `fd` (named `name` by ``LISTEN_FDNAMES``), like ``sd_is_socket()``.

    Resource handling: `fd` stays open and owned by the caller; no extra fd
    is created.  The socket object used for ``getsockopt`` takes the number
    only for the duration of the call and gives it back with ``detach()``
    (``socket.fromfd`` or ``socket.socket(fileno=os.dup(fd))`` would create a
    duplicate to close).

    Error handling: `FdNotOpenError` when `fd` is not open; `AdoptionError`
    when it is not a socket (saying what it is) or cannot be inspected.
    """
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        if exc.errno == errno.EBADF:
            raise _not_open(fd, name) from None
        raise AdoptionError(f"{_what(fd, name)}: cannot fstat: {exc.strerror or exc}") from None
    if not stat.S_ISSOCK(mode):
        raise AdoptionError(
            f"{_what(fd, name)} is {describe_file_kind(mode)}{_fd_target(fd)}, not a socket: "
            "only sockets can be passed"
        )
    try:
        # If the constructor fails, CPython has not stored the number yet and
        # closes nothing; once it succeeds, the finally hands the number back.
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise AdoptionError(f"{_what(fd, name)}: cannot inspect the socket: {exc.strerror or exc}") from None
    try:
        kind = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        family = sock.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN)
        listening = bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
        sockname = sock.getsockname()
        connected = False
        if not listening:
            # A peer address means a connection (Accept=yes), not a socket that forgot to listen.
            with contextlib.suppress(OSError):
                sock.getpeername()
                connected = True
    except OSError as exc:
        raise AdoptionError(f"{_what(fd, name)}: cannot inspect the socket: {exc.strerror or exc}") from None
    finally:
        sock.detach()
    return PassedSocket(
        fd=fd,
        name=name,
        family=family,
        type=kind,
        listening=listening,
        address=address_from_sockname(family, sockname),
        connected=connected,
    )


def _is_open(fd: int) -> bool:
    try:
        os.get_inheritable(fd)  # fcntl(F_GETFD): EBADF when not open
    except OSError:
        return False
    return True


def open_fds() -> set[int]:
    """The fd numbers open in this process, for leak checks.

    Listing ``/proc/self/fd`` opens one fd of its own, which shows in the
    listing and is closed by the time ``listdir`` returns: numbers no longer
    open afterwards are left out.
    """
    return {fd for fd in map(int, os.listdir("/proc/self/fd")) if _is_open(fd)}


def bound_address(sock: socket.socket) -> str:
    """Where ``sock`` is bound, as a manifest writes it (``127.0.0.1:7000``, a path, ``@name``), for
    log lines; ``?`` when it has no such address or cannot tell."""
    try:
        shown = address_from_sockname(sock.family, sock.getsockname())
    except OSError:
        return "?"
    return str(shown) if shown is not None else "?"
