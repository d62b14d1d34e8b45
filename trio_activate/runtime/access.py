"""The end of one connection: who the client was, whether it went away, and the access line.

Layer 3 (trio).

A client that resets its connection is not a bug of the handler: the
handler's next receive or send on it fails (``ECONNRESET``, ``EPIPE``, or
trio's ``BrokenResourceError`` wrapping one), and that exception is the
client's doing.  `went_away` tells such an exception from a genuine error,
so the runtime logs it as one debug line instead of an error with a
traceback (and, with ``on-error = "exit"``, does not stop the service).

The access log (``access-log = true`` in a stream handler's table) is one
info line per connection at its end, on the ``trio_activate.access`` logger
(so a program embedding the runtime, or a logging configuration, can route
it apart)::

    handler=web socket=web peer=127.0.0.1:5555 duration_ms=12.3 bytes_in=78 bytes_out=1024 outcome=closed

Its bytes come from a `Traffic` the counting stream adds to, and only
connections of a handler with the log on are counted: the others get the
plain ``trio.SocketStream`` and pay nothing.

Resource handling: nothing here opens or closes a socket; `peer_text` reads
the peer's credentials of a socket still open.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
from typing import Any

import trio

__all__ = [
    "ACCESS_LOGGER",
    "CLIENT_GONE_ERRNOS",
    "Outcome",
    "Traffic",
    "log_access",
    "log_went_away",
    "peer_text",
    "went_away",
]

log = logging.getLogger("trio_activate")
ACCESS_LOGGER = "trio_activate.access"
access_log = logging.getLogger(ACCESS_LOGGER)

# What the kernel reports on a connection whose client went away, and how the
# debug line says it.  ECONNRESET: the client reset it (SO_LINGER 0, a
# crashed or killed client, a proxy giving up).  EPIPE: the connection is
# closed for writing because the client closed or reset it.  ECONNABORTED:
# aborted (the BSDs say so for a reset, Linux for some local aborts).
# ETIMEDOUT: TCP gave up on a client that stopped answering (keepalive,
# TCP_USER_TIMEOUT, retransmissions).  ENOTCONN: an accepted connection is
# connected from the start, so only the client's going makes it unconnected
# (trio's send_eof after a reset).
CLIENT_GONE_ERRNOS: dict[int, str] = {
    errno.ECONNRESET: "reset the connection",
    errno.EPIPE: "went away before the handler finished writing (broken pipe)",
    errno.ECONNABORTED: "aborted the connection",
    errno.ETIMEDOUT: "stopped answering (the connection timed out)",
    errno.ENOTCONN: "is no longer connected",
}

_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class Outcome:
    """How a connection ended, as the access line says it."""

    CLOSED = "closed"  # the handler returned
    RESET = "reset"  # the client went away (see went_away)
    CANCELLED = "cancelled"  # cancelled at the end of the drain (grace-period) or by a second SIGINT
    ERROR = "error"  # the handler raised
    # A limit of the manifest closed it: its key, "idle-timeout" or "max-lifetime".


def went_away(exc: BaseException, sock: trio.socket.SocketType) -> OSError | None:
    """The error saying that the client of ``sock``, the connection, went away; None when ``exc`` is a bug.

    The rule, all three must hold:

    1. the error is an ``OSError`` whose errno is in `CLIENT_GONE_ERRNOS`,
       raised as it is or as the cause of a ``trio.BrokenResourceError``
       (how ``trio.SocketStream`` reports it; a stream layered on it, such as
       ``trio.SSLStream``, chains one more);
    2. it was raised by an operation on this connection's own socket: its
       traceback passes through a method of ``sock``.  A reset of a
       connection the handler opened itself (a database, an upstream
       server) is the handler's error to handle, and stays an error;
    3. it is not an ``EPIPE`` the handler caused by shutting down its own
       sending side first (on the raw socket a seqpacket handler gets).

    A group of exceptions (a handler that runs a nursery of its own) went
    away when every one of its exceptions did.  Anything else, including a
    ``trio.ClosedResourceError`` (the handler used a stream it closed), is
    an error of the handler.
    """
    if isinstance(exc, BaseExceptionGroup):
        gone = [went_away(inner, sock) for inner in exc.exceptions]
        return gone[0] if all(gone) else None
    cause: BaseException | None = exc
    while isinstance(cause, trio.BrokenResourceError):
        cause = cause.__cause__
    if not isinstance(cause, OSError) or cause.errno not in CLIENT_GONE_ERRNOS:
        return None
    if cause.errno == errno.EPIPE and sock.did_shutdown_SHUT_WR:
        return None
    tb = cause.__traceback__
    while tb is not None:
        if tb.tb_frame.f_locals.get("self") is sock:
            return cause
        tb = tb.tb_next
    return None


def peer_text(address: Any, sock: trio.socket.SocketType | socket.socket) -> str:
    """The client's address as ``accept()`` returned it, as text: ``127.0.0.1:5555``, ``[::1]:5555``.

    A unix client is its socket's path or ``@`` abstract name when it bound
    one, else ``pid:N``, the process that connected (``SO_PEERCRED``, which
    needs ``sock`` still open).  None: unknown, ``-``.
    """
    if isinstance(address, tuple):
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if isinstance(address, bytes) and address:
        return "@" + address[1:].decode(errors="backslashreplace")
    if isinstance(address, str) and address:
        return address
    if address is None or sock.family != socket.AF_UNIX:
        return "-"  # unknown: an Accept=yes connection whose client had gone before it started
    try:
        pid, _, _ = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    except OSError:
        return "unix"
    return f"pid:{pid}"


def log_went_away(
    handler: str, where: str, address: Any, sock: trio.socket.SocketType | socket.socket, error: OSError
) -> None:
    """The one debug line of a client that went away (``where``: " on sockets.NAME", or empty)."""
    if log.isEnabledFor(logging.DEBUG):
        what = CLIENT_GONE_ERRNOS[error.errno or errno.ECONNRESET]
        log.debug("handlers.%s: client %s%s %s", handler, peer_text(address, sock), where, what)


class Traffic:
    """One connection's start and the bytes its handler received and sent, for the access line.

    ``counted`` is false where the runtime cannot see the bytes: a seqpacket
    connection is handed over as the Trio socket itself; its line says ``-``.
    """

    __slots__ = ("counted", "received", "sent", "started")

    def __init__(self, *, counted: bool = True) -> None:
        self.started = trio.current_time()
        self.counted = counted
        self.received = 0
        self.sent = 0


def log_access(handler: str, socket_name: str, peer: str, traffic: Traffic, outcome: str) -> None:
    """The access line of one connection, at its end."""
    duration = (trio.current_time() - traffic.started) * 1000
    bytes_in: int | str = traffic.received if traffic.counted else "-"
    bytes_out: int | str = traffic.sent if traffic.counted else "-"
    access_log.info(
        "handler=%s socket=%s peer=%s duration_ms=%.1f bytes_in=%s bytes_out=%s outcome=%s",
        handler,
        socket_name,
        peer,
        duration,
        bytes_in,
        bytes_out,
        outcome,
        # The same, as fields, for a formatter that writes structured lines.
        extra={
            "handler": handler,
            "socket": socket_name,
            "peer": peer,
            "duration_ms": round(duration, 1),
            "bytes_in": traffic.received if traffic.counted else None,
            "bytes_out": traffic.sent if traffic.counted else None,
            "outcome": outcome,
        },
    )
