"""Serving one stream handler: accept loops over its listening sockets, one task per connection.

Layer 3 (trio).

Why not ``trio.serve_listeners``: it accepts one connection per scheduler
pass (every ``accept()`` is a checkpoint) and closes each stream with
``aclose()`` after the handler, a second, forced close of a stream the
handler usually closed already.  On connection-per-request load those two
cost about a third of the CPU.  Here each wake-up of a listening socket
drains its backlog with non-blocking ``accept()`` calls, up to
``ACCEPT_BATCH`` (so one busy socket cannot starve the others sharing the
thread), and the runtime closes each connection once, synchronously.

Protections, from the handler's manifest table: ``max-connections`` stops
accepting while that many are open (``on-full = "wait"``: new clients wait in
the backlog) or accepts and closes each new connection at once (``"close"``).
``max-lifetime`` and ``idle-timeout`` put each connection under a cancel
scope of its own, only when set, so a handler without them pays nothing.
``idle-timeout`` hands the handler an `IdleTimedStream` instead of the
``trio.SocketStream``, whose ``receive_some`` pushes the deadline out at most
once per ``IDLE_SLACK`` of the timeout (a clock read per receive, no deadline
change per receive).  A connection cancelled by either is closed like any
other, counted in ``timed_out``, logged at debug level.

Resource handling: the ``StreamServer`` does not own its listening sockets
(the service does, and closes them after the server stopped).  Each accepted
connection is owned by exactly one party at every moment: the accept loop
until ``start_soon`` has taken the task, then the connection task, whose
``finally`` closes it, whether the handler returned, raised, or was
cancelled.  The handler may close the stream itself; closing is idempotent.

Error handling: an exception from one connection's handler is logged with
its traceback and the socket name and the server keeps serving
(``on-error = "log"``), or asks the service to stop with exit status 1
(``"exit"``).  An exception that only says the client went away (a reset,
a broken pipe, from the connection's own socket: `access.went_away` has the
rule) is no error of the handler: one debug line naming the client, and
``on-error`` does not apply.  With ``access-log``, each connection's end is
one info line (`access.log_access`); the handler then gets a
`CountingStream`, and the others the plain ``trio.SocketStream``.

``accept()`` failing for lack of resources (``EMFILE``, ``ENFILE``,
``ENOBUFS``, ``ENOMEM``) is logged once per burst and retried as
soon as a connection of this server closes (which frees an fd), or after
``CAPACITY_BACKOFF`` seconds when none does.  Trio's fixed 100 ms sleep would
leave a draining server idle under fd pressure while handlers free fds.
Only an ``accept()`` error that says the listening socket itself is broken
(``ACCEPT_FATAL_ERRNOS``: ``EBADF``, ``EINVAL``, ...) ends the server; any
other is an error of one incoming connection (``ACCEPT_SKIP_ERRNOS`` lists the
known ones), which is skipped and logged at debug level.
"""

from __future__ import annotations

import errno
import logging
import math
import socket
from collections.abc import Callable, Sequence
from typing import Any

import trio

from ..model.manifest import OnError, OnFull
from ..model.records import record
from .access import Outcome, Traffic, log_access, log_went_away, peer_text, went_away
from .handlers import LoadedHandler

__all__ = [
    "ACCEPT_BATCH",
    "ACCEPT_CAPACITY_ERRNOS",
    "ACCEPT_FATAL_ERRNOS",
    "ACCEPT_SKIP_ERRNOS",
    "IDLE_SLACK",
    "ConnectionSlots",
    "CountingStream",
    "IdleTimedStream",
    "Listening",
    "StreamServer",
    "serve_with_timeouts",
]

log = logging.getLogger("trio_activate")

# At most this many connections are accepted per wake-up of one socket.
ACCEPT_BATCH = 64

# accept() errors that mean "out of a resource"; the listening socket is fine
# and a retry will succeed once something is freed.  (Trio's survey of
# accept() errnos, above its own ACCEPT_CAPACITY_ERRNOS, reached the same set.)
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})

# accept() errors that say the listening socket itself is broken: a retry
# would fail the same way, forever, so they end the server.  EBADF, ENOTSOCK:
# not a socket (any more); EINVAL: not listening; EOPNOTSUPP: a socket type
# without accept(); EFAULT: a bug in the interpreter.  EACCES and ENOSYS come
# from a security module or a seccomp filter denying accept() itself, which
# no later call will get past either.  (Trio counts EOPNOTSUPP among the
# per-connection errors, but the Linux man page documents it only as "not a
# SOCK_STREAM socket", a fault of the listener.)
ACCEPT_FATAL_ERRNOS = frozenset(
    {errno.EBADF, errno.ENOTSOCK, errno.EINVAL, errno.EOPNOTSUPP, errno.EFAULT, errno.EACCES, errno.ENOSYS}
)

# accept() errors about one connection that died in the backlog.  Linux
# reports through accept() whatever error is pending on the new connection
# (a reset, a timeout, an ICMP unreachable while the handshake completed...),
# and takes that connection off the backlog while doing so: skipping it loses
# nothing and the next accept() gets the next client.  This is Trio's list of
# errnos its SocketListener skips (its survey above ACCEPT_CAPACITY_ERRNOS),
# without EOPNOTSUPP (see above), plus errors a connection can carry that the
# survey does not name.  It is documentation and the test's list: any errno
# outside ACCEPT_FATAL_ERRNOS and ACCEPT_CAPACITY_ERRNOS is skipped too, since
# an error the kernel found on one connection must not end the service.
ACCEPT_SKIP_ERRNOS = frozenset(
    {
        errno.ECONNABORTED,  # the BSDs: closed or reset before accept()
        errno.EPROTO,
        errno.EPERM,  # Linux: a firewall rule refused the connection
        errno.ECONNRESET,
        errno.ETIMEDOUT,
        errno.ENETDOWN,
        errno.ENETUNREACH,
        errno.ENETRESET,
        errno.EHOSTDOWN,
        errno.EHOSTUNREACH,
        errno.ENONET,
        errno.ENOPROTOOPT,
        errno.ENOSR,
        errno.ESOCKTNOSUPPORT,
        errno.EPROTONOSUPPORT,
        errno.ECONNREFUSED,
        errno.EPIPE,
    }
)

CAPACITY_BACKOFF = 0.1

# An idle connection is cancelled between idle-timeout and (1 + IDLE_SLACK) *
# idle-timeout after its last received byte.  The slack lets a receive push
# the deadline out only once per IDLE_SLACK * idle-timeout, instead of on
# every call: moving a Trio deadline costs more than the receive's own
# bookkeeping, while reading the clock and comparing costs next to nothing.
IDLE_SLACK = 0.125


class _WrappedStream(trio.abc.HalfCloseableStream):
    """What a stream wrapping a connection's ``trio.SocketStream`` passes through unchanged.

    ``socket``, ``setsockopt`` and ``getsockopt`` are the wrapped stream's, as
    on a ``trio.SocketStream`` (which is final, so a wrapper cannot be one);
    subclasses add what they do to ``receive_some`` and ``send_all``.
    """

    __slots__ = ("_stream", "socket")

    _stream: trio.SocketStream | IdleTimedStream
    socket: trio.socket.SocketType

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()

    def setsockopt(self, level: int, option: int, value: Any, length: int | None = None) -> None:
        if length is None:
            self._stream.setsockopt(level, option, value)
        else:
            self._stream.setsockopt(level, option, None, length)

    def getsockopt(self, level: int, option: int, buffersize: int = 0) -> int | bytes:
        if buffersize == 0:
            return self._stream.getsockopt(level, option)
        return self._stream.getsockopt(level, option, buffersize)


class IdleTimedStream(_WrappedStream):
    """The ``trio.SocketStream`` of one connection, for a handler with an ``idle-timeout``.

    Every stream method passes through to the wrapped stream; a
    ``receive_some`` that returns bytes also pushes the connection's cancel
    scope deadline to at least ``idle_timeout`` seconds from now (never past
    ``cap``, the ``max-lifetime`` deadline).  ``socket``, ``setsockopt`` and
    ``getsockopt`` are the wrapped stream's, as on a ``trio.SocketStream``
    (which is final, so this cannot be one).

    Resource handling: closing it closes the wrapped stream; the runtime
    closes the socket after the handler in any case.
    """

    __slots__ = ("_cap", "_expires", "_idle", "_scope")

    def __init__(
        self, stream: trio.SocketStream, scope: trio.CancelScope, idle_timeout: float, cap: float
    ) -> None:
        self._stream = stream
        self.socket = stream.socket
        self._scope = scope
        self._idle = idle_timeout
        self._cap = cap
        self._expires = scope.deadline

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        data = await self._stream.receive_some(max_bytes)
        if data:
            now = trio.current_time()
            # Move the deadline only when it would fall short of a full
            # idle-timeout, and then past it by the slack (see IDLE_SLACK).
            if now + self._idle > self._expires and self._expires < self._cap:
                self._expires = min(now + self._idle * (1 + IDLE_SLACK), self._cap)
                self._scope.deadline = self._expires
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)


class CountingStream(_WrappedStream):
    """A connection's stream that counts the bytes received and sent into a `Traffic`, for the access log.

    Wraps the ``trio.SocketStream`` (or the `IdleTimedStream`) and passes
    every method through, as `IdleTimedStream` does; only handlers with
    ``access-log`` get one.  Bytes sent count once ``send_all`` returned.

    Resource handling: closing it closes the wrapped stream; the runtime
    closes the socket after the handler in any case.
    """

    __slots__ = ("_traffic",)

    def __init__(self, stream: trio.SocketStream | IdleTimedStream, traffic: Traffic) -> None:
        self._stream = stream
        self.socket = stream.socket
        self._traffic = traffic

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        data = await self._stream.receive_some(max_bytes)
        self._traffic.received += len(data)
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)
        self._traffic.sent += data.nbytes if isinstance(data, memoryview) else len(data)


@record
class Listening:
    """One listening socket a stream server accepts on, and the manifest name it came under."""

    name: str
    sock: socket.socket


class ConnectionSlots:
    """Counts open connections for ``max-connections``, and wakes waiters when one closes.

    One instance per handler: the limit counts across all of its sockets.
    The "freed" event also serves accept loops waiting out fd exhaustion: a
    closed connection is a freed fd.
    """

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.active = 0
        self._freed = trio.Event()
        self._waiting = 0

    def available(self) -> bool:
        return self.limit is None or self.active < self.limit

    def take(self) -> None:
        self.active += 1

    def give_back(self) -> None:
        self.active -= 1
        # A fresh Event per closed connection costs ~1% of a short request's
        # CPU; only make one when somebody is waiting.
        if self._waiting:
            self._freed.set()
            self._freed = trio.Event()

    async def wait_freed(self) -> None:
        self._waiting += 1
        try:
            await self._freed.wait()
        finally:
            self._waiting -= 1

    async def wait_available(self) -> None:
        while not self.available():
            await self.wait_freed()


class StreamServer:
    """Accepts on every socket of one stream handler and runs the handler per connection.

    ``await nursery.start(server.run)`` returns once every accept loop runs.
    ``stop_accepting()`` ends the accept loops at once; connections in flight
    go on until they finish, or until ``drain_deadline`` (set by the
    service) cancels them.
    """

    def __init__(
        self,
        handler: LoadedHandler,
        listening: Sequence[Listening],
        *,
        on_failure: Callable[[], None],
    ) -> None:
        self.handler = handler
        self.listening = list(listening)
        self.slots = ConnectionSlots(handler.spec.max_connections)
        self.on_failure = on_failure
        self.accepted = 0
        self.cancelled = 0
        self.timed_out = 0
        self.refused = 0
        spec = handler.spec
        self._timed = spec.idle_timeout is not None or spec.max_lifetime is not None
        self._access_log = spec.access_log
        self._accepting = trio.CancelScope()
        self._connections: trio.Nursery | None = None
        self._capacity_logged = False

    @property
    def name(self) -> str:
        return self.handler.spec.name

    def stop_accepting(self) -> None:
        self._accepting.cancel()

    def set_drain_deadline(self, deadline: float) -> None:
        if self._connections is not None:
            self._connections.cancel_scope.deadline = deadline

    def cancel_connections(self) -> None:
        if self._connections is not None:
            self._connections.cancel_scope.cancel()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        for item in self.listening:
            item.sock.setblocking(False)
        async with trio.open_nursery() as connections:
            self._connections = connections
            with self._accepting:
                async with trio.open_nursery() as accept_loops:
                    for item in self.listening:
                        accept_loops.start_soon(self._accept_loop, item)
                    task_status.started()
            # Accepting stopped: what is left in this nursery are connections in flight.

    async def _accept_loop(self, item: Listening) -> None:
        connections = self._connections
        assert connections is not None
        sock = item.sock
        # Read once: socket.type builds an IntEnum on every access.
        is_stream = sock.type == socket.SOCK_STREAM
        close_when_full = self.handler.spec.on_full is OnFull.CLOSE
        while True:
            if not close_when_full:
                await self.slots.wait_available()
            await trio.lowlevel.wait_readable(sock)
            if self._accepting.cancel_called:
                # Woken in the same pass as stop_accepting(), before its
                # cancellation could reach this task: accept nothing more.  The
                # service has said STOPPING=1; a reload has told its waiter that
                # new connections go to the new code.
                return
            for _ in range(ACCEPT_BATCH):
                if not self.slots.available() and not close_when_full:
                    break
                try:
                    conn, address = sock.accept()
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno in ACCEPT_CAPACITY_ERRNOS:
                        await self._wait_out_capacity(item, exc)
                        break
                    if exc.errno in ACCEPT_FATAL_ERRNOS:
                        raise
                    # One connection failed before it was accepted; it has
                    # left the backlog.  Counts against ACCEPT_BATCH, so even
                    # an error that kept coming would yield at wait_readable.
                    log.debug(
                        "sockets.%s: skipped a connection that failed before accept: %s",
                        item.name,
                        exc,
                        extra={"socket": item.name, "handler": self.name},
                    )
                    continue
                self._capacity_logged = False
                if not self.slots.available():
                    # on-full = "close": the client learns at once (EOF)
                    # instead of waiting in the backlog.
                    conn.close()
                    self.refused += 1
                    continue
                self.slots.take()
                self.accepted += 1
                try:
                    trio_sock = trio.socket.from_stdlib_socket(conn)
                    connections.start_soon(self._serve_connection, trio_sock, address, item.name, is_stream)
                except BaseException:
                    conn.close()
                    self.slots.give_back()
                    raise

    async def _wait_out_capacity(self, item: Listening, exc: OSError) -> None:
        if not self._capacity_logged:
            self._capacity_logged = True
            log.warning(
                "sockets.%s: accept failed: %s; waiting for a connection to close before retrying",
                item.name,
                exc.strerror or exc,
                extra={"socket": item.name, "handler": self.name},
            )
        with trio.move_on_after(CAPACITY_BACKOFF):
            await self.slots.wait_freed()

    async def _serve_connection(
        self, sock: trio.socket.SocketType, address: Any, name: str, is_stream: bool
    ) -> None:
        traffic = Traffic(counted=is_stream) if self._access_log else None
        outcome = Outcome.ERROR
        try:
            # trio.SocketStream takes SOCK_STREAM only: a seqpacket
            # connection is handed over as its connected Trio socket, so
            # message boundaries survive.
            if self._timed:
                outcome = await self._serve_timed(sock, name, is_stream, traffic)
            elif is_stream:
                stream = trio.SocketStream(sock)
                await self.handler.function(stream if traffic is None else CountingStream(stream, traffic))
                outcome = Outcome.CLOSED
            else:
                await self.handler.function(sock)
                outcome = Outcome.CLOSED
        except trio.Cancelled:
            self.cancelled += 1
            outcome = Outcome.CANCELLED
            raise
        except Exception as exc:
            outcome = self._connection_failed(sock, address, name, exc)
        except BaseExceptionGroup as group:
            # A handler that runs a nursery of its own is cancelled with a
            # group of Cancelled, maybe with errors of its own alongside.
            cancelled, failed = group.split(trio.Cancelled)
            if cancelled is None or not (failed is None or isinstance(failed, Exception)):
                raise
            self.cancelled += 1
            outcome = Outcome.CANCELLED
            if failed is not None:
                self._connection_failed(sock, address, name, failed)
            raise cancelled from None
        finally:
            if traffic is not None:
                log_access(self.name, name, peer_text(address, sock), traffic, outcome)
            # Sync and idempotent: no second, forced aclose of a stream the
            # handler closed already.  (After the lines above: a unix
            # client's pid is read from the open socket.)
            sock.close()
            self.slots.give_back()

    async def _serve_timed(
        self, sock: trio.socket.SocketType, name: str, is_stream: bool, traffic: Traffic | None
    ) -> str:
        """Run the handler under the connection's own deadline: ``max-lifetime``, ``idle-timeout``."""
        reached = await serve_with_timeouts(self.handler, sock, is_stream=is_stream, traffic=traffic)
        if reached is None:
            return Outcome.CLOSED
        self.timed_out += 1
        log.debug(
            "handlers.%s: a connection on sockets.%s reached its %s; closing it",
            self.name,
            name,
            reached,
            extra={"socket": name, "handler": self.name},
        )
        return reached

    def _connection_failed(
        self, sock: trio.socket.SocketType, address: Any, name: str, exc: Exception
    ) -> str:
        """Log the exception of one connection's handler: the client went away, or the handler failed."""
        gone = went_away(exc, sock)
        if gone is not None:
            log_went_away(self.name, f" on sockets.{name}", address, sock, gone)
            return Outcome.RESET
        self._handler_failed(name, exc)
        return Outcome.ERROR

    def _handler_failed(self, name: str, exc: Exception) -> None:
        log.error(
            "handlers.%s: a connection on sockets.%s raised",
            self.name,
            name,
            exc_info=exc,
            extra={"socket": name, "handler": self.name},
        )
        if self.handler.spec.on_error is OnError.EXIT:
            self.on_failure()


async def serve_with_timeouts(
    handler: LoadedHandler,
    trio_sock: trio.socket.SocketType,
    *,
    is_stream: bool,
    traffic: Traffic | None = None,
) -> str | None:
    """Run ``handler`` on one connection under its ``max-lifetime`` and ``idle-timeout``.

    Returns the key whose limit ended the connection, or None when the
    handler returned.  The limits live in a cancel scope of their own, so a
    grace period the caller puts on an outer scope still applies unchanged.
    With ``traffic`` (``access-log``), a stream's bytes are counted into it.
    """
    spec = handler.spec
    now = trio.current_time()
    cap = math.inf if spec.max_lifetime is None else now + spec.max_lifetime
    with trio.CancelScope(deadline=cap) as scope:
        if not is_stream:
            # Seqpacket: the manifest allows max-lifetime only.
            await handler.function(trio_sock)
        elif spec.idle_timeout is None:
            stream = trio.SocketStream(trio_sock)
            await handler.function(stream if traffic is None else CountingStream(stream, traffic))
        else:
            scope.deadline = min(now + spec.idle_timeout, cap)
            idle = IdleTimedStream(trio.SocketStream(trio_sock), scope, spec.idle_timeout, cap)
            await handler.function(idle if traffic is None else CountingStream(idle, traffic))
    if not scope.cancelled_caught:
        return None
    return "max-lifetime" if trio.current_time() >= cap else "idle-timeout"
