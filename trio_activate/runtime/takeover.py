"""Takeover on trio: the old process gives its sockets, the new one confirms that it serves.

Layer 3 (trio).  The exchange is `trio_activate.model.takeover`'s; the new
process's first half (connecting, receiving, adopting) is
`trio_activate.system.takeover`'s, before trio runs.

Who closes what: both functions borrow their connection and the fds they
send; the caller closes them.  The fds sent are the kernel's copies in
flight, then the new process's: the old one's own stay open, and serve,
until it has confirmed.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Callable, Sequence

import trio

from ..model.control import REQUEST_TIMEOUT, encode
from ..model.takeover import FD_MESSAGE_BYTE, READY, Offer, batches, format_offer, parse_new_side
from ..system.fd_passing import rights

__all__ = ["CONFIRM_TIMEOUT", "confirm_takeover", "give_sockets"]

log = logging.getLogger("trio_activate")

# How long the new process waits for the old one's confirmation once it said it serves.
CONFIRM_TIMEOUT = REQUEST_TIMEOUT
_LINE_MAX = 4096


async def give_sockets(
    conn: trio.socket.SocketType,
    offer: Offer,
    fds: Sequence[int],
    *,
    who: str,
    ready_timeout: float,
    busy: Callable[[], str | None] = lambda: None,
) -> bool:
    """Send ``offer`` and ``fds`` (in its order), wait up to ``ready_timeout`` for the new process to
    serve, then confirm, unless ``busy()`` says why not by then (a reload or a stop began meanwhile:
    this process may no longer be the service).  True once confirmed: the caller stops accepting
    and drains.

    False, with one warning line, for every other ending (the new process
    failed and said why, closed, sent something else, or said nothing in
    time): the caller serves on as before.
    """
    try:
        await _send(conn, encode(format_offer(offer)))
        for batch in batches(fds):
            await conn.sendmsg([FD_MESSAGE_BYTE], rights(batch))
    except OSError as exc:
        log.warning("takeover by %s failed: sending the sockets: %s; serving on", who, exc.strerror or exc)
        return False
    problem: str | None
    with trio.move_on_after(ready_timeout) as waited:
        try:
            line = await _read_line(conn)
        except OSError as exc:
            line, problem = None, f"receiving from it: {exc.strerror or exc}"
        else:
            problem = "it closed the connection before it served" if line is None else parse_new_side(line)
    if waited.cancelled_caught:
        problem = f"it did not say it serves within {ready_timeout:g}s (start-timeout)"
    if problem is None and (busy_now := busy()) is not None:
        problem = f"it serves, but {busy_now} here since it asked"
    if problem is None:
        try:
            await _send(conn, encode({"ok": True}))
        except OSError as exc:
            problem = f"it went away before it heard the confirmation ({exc.strerror or exc})"
    if problem is not None:
        log.warning("takeover by %s failed: %s; serving on", who, problem)
        return False
    return True


async def confirm_takeover(link: socket.socket) -> str | None:
    """The new process serves: say so to the old one and wait for its confirmation.

    None once confirmed; otherwise what went wrong, in one line (the caller
    stops: the old process serves on, or has stopped without confirming).
    """
    timeout = CONFIRM_TIMEOUT
    link.setblocking(False)
    conn = trio.socket.from_stdlib_socket(link)
    with trio.move_on_after(timeout):
        try:
            await _send(conn, encode(READY))
            line = await _read_line(conn)
        except OSError as exc:
            return f"the old process went away before it confirmed ({exc.strerror or exc})"
        if line is None:
            return "the old process closed the connection without confirming (it may be stopping)"
        try:
            answer = json.loads(line)
        except ValueError:
            answer = None
        if answer != {"ok": True}:
            return f"the old process answered {line[:80]!r}, not a confirmation"
        return None
    return f"the old process did not confirm within {timeout:g}s"


async def _send(conn: trio.socket.SocketType, data: bytes) -> None:
    while data:
        sent = await conn.send(data)
        data = data[sent:]


async def _read_line(conn: trio.socket.SocketType) -> bytes | None:
    """One line without its newline; None when the peer closed first (or sent too much)."""
    data = b""
    while b"\n" not in data:
        if len(data) > _LINE_MAX:
            return None
        chunk = await conn.recv(_LINE_MAX)
        if not chunk:
            return None
        data += chunk
    return data.partition(b"\n")[0]
