"""Owning passed fds, and adopting them into the manifest's sockets.

Layer 2: syscalls, no trio.

What this module owns
---------------------
Every fd this process was passed (``LISTEN_FDS``), from the moment a
`PassedFds` is built until each fd is taken or closed.  At any moment each fd
has exactly one owner:

- `PassedFds` owns the numbers it was built with.  `PassedFds.take` and
  `PassedFds.take_fd` move ownership of an fd to the caller, as a
  ``socket.socket`` wrapping that very number (no duplicate is made).
  `PassedFds.close` closes what is still owned, each fd once; the number is
  forgotten before ``close()`` is called, so nothing is ever closed twice (a
  second close of a number can close an unrelated fd that reused it).  An fd
  found not open (EBADF) is forgotten, never closed.  It also means
  ``LISTEN_FDS`` counted more fds than were passed: from then on only the fds
  already found open (those that got ``FD_CLOEXEC``) are owned, and the other
  numbers are forgotten unclosed.  They were never shown to be passed, and
  may be this process's own fds (a log file, an embedding program's event
  loop); libsystemd, too, leaves every fd alone when one is missing.  So a
  bad ``LISTEN_FDS=1048573`` costs one failed ``fcntl()`` per fd up to the
  missing one, not a million ``close()`` calls on numbers nobody passed.
- `adopt` builds (or is given) a `PassedFds` and moves every fd it keeps into
  an `Adopted`, which the caller then owns and closes.  Unclaimed fds are
  logged and closed.  All or nothing: if any step raises (an `AdoptionError`,
  a bug, ``KeyboardInterrupt``, anything), every fd is closed, the ones already
  wrapped included, before the exception propagates.

Trio cancellation cannot interrupt `adopt`: it is synchronous and has no
checkpoint.  The trio layer calls it, then wraps the sockets it returns.

Fault tests need every step to be able to fail: the syscalls `PassedFds` and
`adopt` make go through `AdoptSteps`, a small seam whose defaults are the real
calls, and `adopt` logs through the `log` it is given.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from types import TracebackType
from typing import Protocol

from ..errors import AdoptionError
from ..model.listen_env import ListenFds
from ..model.manifest import Manifest
from ..model.match import Match, PassedSocket, describe_family, describe_type, match_passed
from ..model.records import field, record
from . import fds

__all__ = ["DEFAULT_STEPS", "AdoptSteps", "Adopted", "PassedFds", "adopt"]

logger = logging.getLogger("trio_activate")


def _set_cloexec(fd: int, name: str) -> None:
    fds.set_cloexec(fd, name=name)


def _match(manifest: Manifest, passed: Sequence[PassedSocket], names_given: bool, missing_ok: bool) -> Match:
    return match_passed(manifest, passed, names_given=names_given, missing_ok=missing_ok)


def _wrap(fd: int) -> socket.socket:
    # socket.socket(fileno=fd) takes the number itself; socket.fromfd() would
    # dup it and leave the original open.
    return socket.socket(fileno=fd)


@record
class AdoptSteps:
    """The calls `PassedFds` and `adopt` make, each replaceable for fault tests.

    A replacement must behave like the real call when it fails: ``close_fd``
    releases the number even when it raises (Linux's ``close()`` always
    does), and ``wrap`` takes the number only when it returns.
    """

    set_cloexec: Callable[[int, str], None] = _set_cloexec
    inspect_fd: Callable[[int, str], PassedSocket] = fds.inspect_fd
    match_passed: Callable[[Manifest, Sequence[PassedSocket], bool, bool], Match] = _match
    wrap: Callable[[int], socket.socket] = _wrap
    close_fd: Callable[[int], None] = os.close


DEFAULT_STEPS = AdoptSteps()


class PassedFds:
    """The owner of every passed fd that nobody has taken yet.

    Resource handling: built from a `ListenFds`, it owns each of its fds
    (the constructor makes no syscall and checks nothing about them).  `take`
    and `take_fd` move ownership to the caller; `close` (or leaving the
    ``with`` block) closes every fd still owned, once.  Each taken fd gets
    ``FD_CLOEXEC`` before it is handed out.

    Error handling: the constructor raises `ValueError` when `listen` names
    an fd twice or has a different number of names and fds (a caller's bug;
    then nothing is owned).  `take`/`take_fd` raise `AdoptionError` when an fd
    cannot be wrapped, and then move nothing.
    """

    def __init__(self, listen: ListenFds, *, steps: AdoptSteps = DEFAULT_STEPS) -> None:
        if len(listen.names) != len(listen.fds):
            raise ValueError(f"{len(listen.fds)} fds but {len(listen.names)} names: {listen}")
        if len(set(listen.fds)) != len(listen.fds):
            # Owning one number twice would mean closing it twice.
            raise ValueError(f"an fd number appears twice: {listen.fds}")
        self.steps = steps
        self.names_given = listen.names_given
        # Insertion order is passed order.
        self._owned: dict[int, str] = dict(zip(listen.fds, listen.names, strict=True))
        self._cloexec_set: set[int] = set()
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"owning {self.remaining()}"
        return f"<PassedFds {state}>"

    def remaining(self) -> tuple[tuple[int, str], ...]:
        """The fds still owned, as ``(fd, name)`` pairs in passed order."""
        return tuple(self._owned.items())

    def take(self, name: str) -> list[socket.socket]:
        """Move ownership of every remaining fd named `name` to the caller, in passed order.

        Returns an empty list when no remaining fd has that name.  All or
        nothing: if one fd cannot be wrapped, none is taken.
        """
        self._check_not_closed()
        return self._take([fd for fd, fd_name in self._owned.items() if fd_name == name])

    def take_fd(self, fd: int) -> socket.socket:
        """Move ownership of `fd` to the caller; `ValueError` if it is not owned here."""
        self._check_not_closed()
        if fd not in self._owned:
            raise ValueError(f"fd {fd} is not owned by this PassedFds (taken already, or never passed)")
        return self._take([fd])[0]

    def close(self) -> None:
        """Close every fd still owned, each once.  Calling it again closes nothing more.

        Every fd is closed even when closing one fails; then the first error is
        raised.  An EBADF here means something else closed an fd this object
        owned, which is a bug worth hearing about.
        """
        self._closed = True
        # Forget every number first: close() frees the number even when it
        # reports an error, so a retry could close whatever reused it.  (One
        # swap, not a `del` per fd: taking the first key of a dict whose
        # front was deleted walks over every deleted slot, quadratic in the
        # number of fds.)
        owned, self._owned = self._owned, {}
        fds.close_all(partial(self.steps.close_fd, fd) for fd in owned)

    def __enter__(self) -> PassedFds:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # Used by adopt() in this module.

    def _check_not_closed(self) -> None:
        if self._closed:
            raise ValueError("this PassedFds is closed")

    def _forget_not_open(self, exc: BaseException) -> None:
        """After `FdNotOpenError`, stop owning the number and every number not yet found open.

        Closing the missing number could hit an unrelated fd; the numbers not
        checked yet were never shown to be passed (see the module docstring).
        """
        if isinstance(exc, fds.FdNotOpenError):
            self._owned = {fd: name for fd, name in self._owned.items() if fd in self._cloexec_set}

    def _set_cloexec(self, fd: int) -> None:
        if fd in self._cloexec_set:
            return
        try:
            self.steps.set_cloexec(fd, self._owned[fd])
        except BaseException as exc:
            self._forget_not_open(exc)
            raise
        self._cloexec_set.add(fd)

    def _inspect(self, fd: int) -> PassedSocket:
        try:
            return self.steps.inspect_fd(fd, self._owned[fd])
        except BaseException as exc:
            self._forget_not_open(exc)
            raise

    def _take(self, fd_list: list[int]) -> list[socket.socket]:
        wrapped: list[socket.socket] = []
        try:
            for fd in fd_list:
                self._set_cloexec(fd)
                wrapped.append(self._wrap(fd))
        except BaseException:
            # Ownership has not moved yet: give the numbers back unclosed.
            for sock in wrapped:
                sock.detach()
            raise
        for fd in fd_list:
            del self._owned[fd]
        return wrapped

    def _wrap(self, fd: int) -> socket.socket:
        try:
            return self.steps.wrap(fd)
        except OSError as exc:
            name = self._owned[fd]
            if exc.errno == errno.EBADF:
                del self._owned[fd]
                raise fds.FdNotOpenError(f"fd {fd} ({name!r}) is not open (EBADF)", fd) from None
            raise AdoptionError(
                f"fd {fd} ({name!r}): cannot use it as a socket: {exc.strerror or exc}"
            ) from None


@record(frozen=False, eq=False)
class Adopted:
    """The adopted sockets: ``sockets[NAME]`` for each ``[sockets.NAME]``, in passed order.

    Resource handling: the caller owns every socket here.  To take one over,
    remove it (``adopted.sockets.pop(name)``, ``adopted.connection = None``);
    `close` (or leaving the ``with`` block) closes whatever is still here and
    empties the object.  Closing twice is harmless.
    """

    sockets: dict[str, list[socket.socket]] = field(default_factory=dict)
    connection: socket.socket | None = None
    """The ``Accept=yes`` connection, if one was passed."""
    warnings: tuple[str, ...] = ()
    """What `adopt` logged: address mismatches and unclaimed fds."""
    missing: tuple[str, ...] = ()
    """Manifest sockets no fd was passed for (only with ``missing_ok``): the caller creates them."""

    def _all(self) -> Iterator[socket.socket]:
        if self.connection is not None:
            yield self.connection
        for sockets in self.sockets.values():
            yield from sockets

    def close(self) -> None:
        """Close every socket still here; raise the first error after trying all."""
        held = list(self._all())
        self.sockets = {}
        self.connection = None
        fds.close_all(sock.close for sock in held)

    def __enter__(self) -> Adopted:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class _Log(Protocol):
    def warning(self, msg: str, /, *args: object) -> object: ...


def adopt(
    manifest: Manifest,
    listen: ListenFds | PassedFds,
    *,
    log: _Log = logger,
    steps: AdoptSteps | None = None,
    missing_ok: bool = False,
) -> Adopted:
    """Check the passed fds against `manifest` and wrap the ones it claims.

    In order: set ``FD_CLOEXEC`` on every fd, inspect each (`fds.inspect_fd`),
    match them to the manifest (`match_passed`), log its warnings on `log`
    (the ``trio_activate`` logger by default), wrap every claimed fd as a
    ``socket.socket``, close the unclaimed ones; then, at debug level, one
    line per adopted fd on the ``trio_activate`` logger.

    `listen` is either the `ListenFds` read from the environment, or a
    `PassedFds` from which the caller already took the fds it wants for
    itself (an embedding program taking extra names); then only its remaining
    fds are adopted, and `steps` must be left out (the `PassedFds` has its
    own).

    Resource handling: `adopt` owns every fd (every remaining one of a given
    `PassedFds`) from the call on.  On return the caller owns the `Adopted`
    and must close it; nothing else is left open.  If any step raises, every
    one of those fds is closed, once, before the exception propagates;
    errors while closing are attached to it as notes.

    Error handling: `AdoptionError` for an fd that is not open, not a socket,
    or does not fit the manifest, or for a manifest socket no fd was passed
    for, unless `missing_ok` (then it is in `Adopted.missing`).
    """
    if isinstance(listen, PassedFds):
        if steps is not None:
            raise ValueError("adopt(): give the steps to PassedFds(), not with a PassedFds")
        listen._check_not_closed()
        passed = listen
    else:
        passed = PassedFds(listen, steps=steps if steps is not None else DEFAULT_STEPS)
    adopted = Adopted()
    try:
        # Close-on-exec first, before anything else can fail, so that a fork
        # and exec in another thread cannot take the fds along.
        for fd, _ in passed.remaining():
            passed._set_cloexec(fd)
        found = [passed._inspect(fd) for fd, _ in passed.remaining()]
        match = passed.steps.match_passed(manifest, found, passed.names_given, missing_ok)
        for warning in match.warnings:
            log.warning("%s", warning)
        if match.connection is not None:
            adopted.connection = passed.take_fd(match.connection)
        for name, socket_fds in match.by_socket.items():
            taken: list[socket.socket] = []
            adopted.sockets[name] = taken
            for fd in socket_fds:
                taken.append(passed.take_fd(fd))
        # What is left is what nobody claimed.
        passed.close()
    except BaseException as exc:
        _close_after_failure(adopted, passed, exc)
        raise
    adopted.warnings = match.warnings
    adopted.missing = match.missing
    _log_adopted(found, match)
    return adopted


def _log_adopted(found: Sequence[PassedSocket], match: Match) -> None:
    """At debug level, one line per adopted fd: what it is, its passed name, the manifest socket."""
    if not logger.isEnabledFor(logging.DEBUG):
        return
    by_fd = {item.fd: item for item in found}

    def what(fd: int) -> str:
        item = by_fd[fd]
        address = f" {item.address}" if item.address is not None else ""
        return (
            f"fd {fd} ({describe_family(item.family)} {describe_type(item.type)}{address}, "
            f"passed as {item.name!r})"
        )

    if match.connection is not None:
        logger.debug("adopted %s as the Accept=yes connection", what(match.connection))
    for name, socket_fds in match.by_socket.items():
        for fd in socket_fds:
            logger.debug("sockets.%s: adopted %s", name, what(fd), extra={"socket": name})


def _close_after_failure(adopted: Adopted, passed: PassedFds, exc: BaseException) -> None:
    """Close everything `adopt` held, keeping `exc` the error that propagates."""
    held = list(adopted._all())
    adopted.sockets = {}
    adopted.connection = None
    for sock in held:
        # Through the same close step as the numbers PassedFds still holds, so
        # every close of an adoption is one call to steps.close_fd.
        fd = sock.detach()
        if fd < 0:  # already closed by someone: nothing to close
            continue
        try:
            passed.steps.close_fd(fd)
        except BaseException as close_error:
            exc.add_note(f"while closing fd {fd} after this error: {close_error!r}")
    try:
        passed.close()
    except BaseException as close_error:
        exc.add_note(f"while closing the remaining passed fds after this error: {close_error!r}")
