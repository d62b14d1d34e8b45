"""Sending sd_notify messages: the `Notifier` and its one datagram socket.

What this module owns
---------------------
Delivering the messages of `~trio_activate.model.notify_message` to the service
manager's ``NOTIFY_SOCKET``, and the policy for when that fails: a failure to
notify is logged as a warning on the ``"trio_activate"`` logger and reported
by a ``False`` return, never raised.  A service must not die because its
manager went away or its notify socket is odd; systemd has its own ways to
notice a service that never says ``READY=1`` (start timeout) or stops pinging
(watchdog).

Layer 2: syscalls, no trio.  Every send is one non-blocking ``sendto``, so the
methods are plain functions that are safe to call from a Trio task:
a datagram to a unix socket is queued or refused at once (``MSG_DONTWAIT``;
without it a full receive queue would block the whole event loop).

The fd store
------------
`store_fds` sends ``FDSTORE=1`` and ``FDNAME=`` with the fds attached
(``SCM_RIGHTS``, by ``sendmsg`` as `socket.send_fds` does it), `remove_stored_fds` sends
``FDSTOREREMOVE=1``.  `store_when_ready` arranges for both to go once, right
before the first ``READY=1`` (so the service's own readiness, and not a
start that later fails, puts its sockets in the store, and the manager has
them by the time ``systemctl start`` returns).

Resource handling
-----------------
A `Notifier` owns one ``AF_UNIX``/``SOCK_DGRAM`` socket, opened with
``SOCK_CLOEXEC`` (no child inherits it) on the first send, unconnected (each
send names the address, so a manager that re-creates its socket is found
again).  `Notifier.close` closes it, and so does leaving a ``with`` block;
after that every send returns False with a warning.  A disabled notifier
(``NOTIFY_SOCKET`` unset or malformed) never opens a socket, and every method
is a cheap no-op returning False.

Error handling
--------------
- ``NOTIFY_SOCKET`` malformed: one warning naming the variable and the value
  when the notifier is built; notifications are disabled.
- ``WATCHDOG_USEC``/``WATCHDOG_PID`` malformed: one warning; no watchdog.
- A send fails (``ENOENT``: no such socket; ``ECONNREFUSED``: a socket file
  nobody listens on; ``EAGAIN``: the receiver's queue is full; ``EMSGSIZE``,
  ``EMFILE`` when opening, ...): a warning per failed send naming the address,
  the error and the message, and False.
- Bad arguments (a negative timeout, a message `format_message` rejects) are
  the caller's bug and raise `ValueError`, as in `~trio_activate.model.notify_message`.
"""

from __future__ import annotations

import array
import logging
import math
import os
import socket
import time
from collections.abc import Mapping, MutableMapping, Sequence
from types import TracebackType

from ..model import notify_message
from ..model.records import record

__all__ = ["FdStorePlan", "Notifier"]

logger = logging.getLogger("trio_activate")

_SHOWN_MESSAGE_BYTES = 80


@record(eq=False)
class FdStorePlan:
    """What a service puts in, and takes out of, its manager's fd store.

    `store`: the sockets the service made itself, by manifest name (borrowed:
    the service owns them).  `remove`: names the manager passed back that the
    manifest no longer declares.
    """

    store: Mapping[str, Sequence[socket.socket]]
    remove: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.store) or bool(self.remove)


def _show_message(message: bytes) -> str:
    if len(message) <= _SHOWN_MESSAGE_BYTES:
        return repr(message)
    return f"{message[:_SHOWN_MESSAGE_BYTES]!r}... ({len(message)} bytes)"


class Notifier:
    """Sends sd_notify messages to one address; see the module docstring.

    `address` is a sockaddr as `~trio_activate.model.notify_message.parse_notify_socket`
    returns it: a path (`str`) or an abstract name (`bytes` starting with a
    NUL), or None for a disabled notifier.  `watchdog_interval` is the number
    of seconds between watchdog pings, or None for no watchdog.  Most callers
    want `from_environ` instead.

    Resource handling: the notifier owns its socket; call `close` or use it as
    a context manager.
    """

    def __init__(self, address: str | bytes | None, *, watchdog_interval: float | None = None) -> None:
        if address is not None and len(address) == 0:
            raise ValueError("address must not be empty (None disables the notifier)")
        if watchdog_interval is not None and not (math.isfinite(watchdog_interval) and watchdog_interval > 0):
            raise ValueError(
                f"watchdog_interval must be a positive number of seconds, not {watchdog_interval}"
            )
        self._address = address
        self._watchdog_interval = watchdog_interval
        self._sock: socket.socket | None = None
        self._closed = False
        self._at_ready: FdStorePlan | None = None

    @classmethod
    def from_environ(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        pid: int | None = None,
        unset: bool = False,
    ) -> Notifier:
        """A notifier for ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``.

        `environ` defaults to `os.environ`, `pid` (the process the watchdog
        variables must be meant for) to `os.getpid`.  With `unset`, the three
        variables are removed from `environ` on every path (as
        ``sd_notify(unset_environment=1)`` does), so that children do not
        inherit them; `environ` must then be mutable.

        Error handling: never raises for the variables' values; malformed
        values are logged once as warnings and disable notifications (a bad
        ``NOTIFY_SOCKET``) or the watchdog (bad ``WATCHDOG_*``).  Raises
        `TypeError` when `unset` is asked of an immutable mapping.
        """
        if environ is None:
            environ = os.environ
        if unset and not isinstance(environ, MutableMapping):
            raise TypeError(f"unset=True needs a mutable mapping, not {type(environ).__name__}")
        if pid is None:
            pid = os.getpid()
        try:
            return cls._read_environ(environ, pid)
        finally:
            if unset:
                assert isinstance(environ, MutableMapping)
                for variable in notify_message.NOTIFY_VARIABLES:
                    environ.pop(variable, None)

    @classmethod
    def _read_environ(cls, environ: Mapping[str, str], pid: int) -> Notifier:
        value = environ.get("NOTIFY_SOCKET")
        if value is None:
            return cls(None)
        try:
            address = notify_message.parse_notify_socket(value)
        except ValueError as error:
            logger.warning("%s; notifications to the service manager are disabled", error)
            return cls(None)
        try:
            interval = notify_message.watchdog_interval(environ, pid=pid)
        except ValueError as error:
            logger.warning("%s; the watchdog is disabled", error)
            interval = None
        return cls(address, watchdog_interval=interval)

    # --- state ----------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        """True when there is an address to send to (even after `close`)."""
        return self._address is not None

    @property
    def address(self) -> str | bytes | None:
        """The sockaddr messages go to, or None when disabled."""
        return self._address

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between ``WATCHDOG=1`` pings (half of ``WATCHDOG_USEC``), or
        None: no watchdog was asked for this process, or the notifier is
        disabled."""
        return self._watchdog_interval if self._address is not None else None

    # --- sending --------------------------------------------------------------

    def send(self, message: bytes, fds: Sequence[int] = ()) -> bool:
        """Send `message` as one datagram; True when the kernel queued it.

        `fds` ride along as ``SCM_RIGHTS`` (at most
        `~trio_activate.model.notify_message.FD_STORE_MAX_PER_MESSAGE`): the
        receiver gets copies, the caller keeps its own and still owns them.

        False when disabled (silently), and when closed or the send failed
        (with a warning).  Never raises `OSError`.
        """
        if self._address is None:
            return False
        where = f"NOTIFY_SOCKET={notify_message.format_notify_socket(self._address)!r}"
        if self._closed:
            logger.warning("cannot send %s to %s: the notifier is closed", _show_message(message), where)
            return False
        if len(fds) > notify_message.FD_STORE_MAX_PER_MESSAGE:
            raise ValueError(
                f"{len(fds)} fds in one message; the kernel passes at most "
                f"{notify_message.FD_STORE_MAX_PER_MESSAGE}"
            )
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            # MSG_NOSIGNAL as libsystemd: no SIGPIPE even where an embedding
            # program restored its default action.
            flags = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL
            if fds:
                # sendmsg with SCM_RIGHTS as socket.send_fds builds it: send_fds itself
                # drops its flags and address (CPython 3.11), and this socket is unconnected.
                rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                self._sock.sendmsg([message], rights, flags, self._address)
            else:
                self._sock.sendto(message, flags, self._address)
        except OSError as error:
            logger.warning("could not send %s to %s: %s", _show_message(message), where, error)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Send ``READY=1``, with a ``STATUS=`` line when `status` is given.

        The first time, what `store_when_ready` arranged goes first.
        """
        plan, self._at_ready = self._at_ready, None
        if plan is not None:
            self.send_fd_store_plan(plan)
        return self.send(notify_message.ready(status))

    # --- the fd store ---------------------------------------------------------

    def store_fds(self, name: str, fds: Sequence[int]) -> bool:
        """Send ``FDSTORE=1`` and ``FDNAME=`` `name` with copies of `fds` attached.

        More fds than one datagram carries go in several, each named `name`.
        The caller keeps its fds.  False (with a warning) when any send failed.
        """
        limit = notify_message.FD_STORE_MAX_PER_MESSAGE
        message = notify_message.fd_store(name)
        sent = [self.send(message, fds[start : start + limit]) for start in range(0, len(fds), limit)]
        return all(sent)

    def remove_stored_fds(self, name: str) -> bool:
        """Send ``FDSTOREREMOVE=1`` and ``FDNAME=`` `name`: the manager closes its fds of that name."""
        return self.send(notify_message.fd_store_remove(name))

    def store_when_ready(self, plan: FdStorePlan) -> None:
        """Send `plan` (`send_fd_store_plan`) once, right before the next ``READY=1``.

        Resource handling: the plan's sockets are borrowed until then; their
        owner must keep them open until `ready` was called (or this notifier closed).
        """
        self._at_ready = plan if self._address is not None else None

    def send_fd_store_plan(self, plan: FdStorePlan) -> None:
        """Remove the plan's names from the fd store, then store its sockets under their names."""
        for name in plan.remove:
            if self.remove_stored_fds(name):
                logger.info(
                    "fd store: removed %r, which the manifest no longer declares",
                    name,
                    extra={"socket": name},
                )
        for name, group in plan.store.items():
            fds = [sock.fileno() for sock in group]
            if self.store_fds(name, fds):
                logger.info(
                    "fd store: sockets.%s (fd %s) stored in the service manager's fd store",
                    name,
                    ", ".join(str(fd) for fd in fds),
                    extra={"socket": name},
                )

    def reloading(self) -> bool:
        """Send ``RELOADING=1`` with ``MONOTONIC_USEC`` of now (``CLOCK_MONOTONIC``,
        the clock systemd compares it with); send `ready` when done."""
        return self.send(notify_message.reloading(time.monotonic_ns() // 1000))

    def stopping(self) -> bool:
        """Send ``STOPPING=1``."""
        return self.send(notify_message.stopping())

    def status(self, text: str) -> bool:
        """Send ``STATUS=`` `text`, made safe (never raises for the text)."""
        return self.send(notify_message.status(text))

    def watchdog(self) -> bool:
        """Send ``WATCHDOG=1``."""
        return self.send(notify_message.watchdog())

    def extend_timeout(self, seconds: float) -> bool:
        """Send ``EXTEND_TIMEOUT_USEC``: the current timeout ends `seconds` from now.

        Error handling: `ValueError` when `seconds` is negative, NaN or infinite.
        """
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"extend_timeout needs a finite number of seconds >= 0, not {seconds}")
        return self.send(notify_message.extend_timeout(round(seconds * 1_000_000)))

    # --- closing --------------------------------------------------------------

    def close(self) -> None:
        """Close the socket, if one was opened.  Idempotent."""
        self._closed = True
        self._at_ready = None
        if self._sock is not None:
            sock, self._sock = self._sock, None
            sock.close()

    def __enter__(self) -> Notifier:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._address is None:
            return "<Notifier disabled>"
        state = "closed" if self._closed else "open" if self._sock is not None else "not yet opened"
        return (
            f"<Notifier NOTIFY_SOCKET={notify_message.format_notify_socket(self._address)!r} "
            f"watchdog_interval={self._watchdog_interval} {state}>"
        )
