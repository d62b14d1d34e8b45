"""Answering the control socket as a Trio task: `serve_control`, and the reloads' history.

Layer 3 (trio).  The protocol is `trio_activate.model.control`'s; the
listening fds are a `trio_activate.system.control.ControlSocket`'s.

Each connection is served in a task of its own, at most `CONCURRENT` at a
time (more wait in the kernel's backlog): the peer is checked first
(``SO_PEERCRED``: this process's uid or root; anyone else is refused with
one warning), then one request line is read within ``REQUEST_TIMEOUT``
seconds and at most ``REQUEST_MAX`` bytes, answered, and the connection
closed.  A malformed, oversized, silent or early-closed request is one
warning line and an error answer when the peer still reads.  Nothing a
client does blocks the service: every wait is bounded and in its own task.

Who closes what: every accepted connection is closed by the task that serves
it, cancellation included.  The listening sockets are borrowed: their owner
closes them after `serve_control` returned.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from ..model.control import REQUEST_MAX, REQUEST_TIMEOUT, ControlRequestError, encode, parse_request
from ..model.records import record
from ..system.control import peer_credentials

__all__ = ["CONCURRENT", "ReloadHistory", "Takeover", "send_answer", "serve_control"]

log = logging.getLogger("trio_activate")

CONCURRENT = 16

# A takeover's part of the exchange, given the connection, the peer's PID and who it is (for logs).
Takeover = Callable[[trio.socket.SocketType, int, str], Awaitable[None]]


class ReloadHistory:
    """A service's reloads: how many took over, the last outcome, and who waits for the next one."""

    def __init__(
        self,
        *,
        generation: int = 1,
        reloads: int = 0,
        started: float | None = None,
        last: dict[str, Any] | None = None,
    ) -> None:
        self.generation = generation
        self.reloads = reloads
        self.started = time.time() if started is None else started
        self.last = last
        self._waiters: list[tuple[trio.Event, list[tuple[bool, str]]]] = []

    def record(self, taken_over: bool, message: str) -> None:
        """A reload ended: count it, remember it, answer whoever waits for it."""
        if taken_over:
            self.reloads += 1
            self.generation += 1
        self.last = {"ok": taken_over, "message": message, "at": time.time()}
        waiters, self._waiters = self._waiters, []
        for event, box in waiters:
            box.append((taken_over, message))
            event.set()

    async def next_outcome(self, start: Callable[[], Awaitable[object] | None]) -> tuple[bool, str]:
        """Wait for the outcome of the next reload to end, after calling ``start`` (and awaiting what
        it returns) to ask for one."""
        event = trio.Event()
        box: list[tuple[bool, str]] = []
        entry = (event, box)
        self._waiters.append(entry)
        try:
            started = start()
            if started is not None:
                await started
            await event.wait()
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)
        return box[0]

    def fields(self) -> dict[str, Any]:
        """The status document's reload fields."""
        return {
            "generation": self.generation,
            "started": self.started,
            "uptime": round(max(time.time() - self.started, 0.0), 3),
            "reloads": self.reloads,
            "last_reload": self.last,
        }


async def serve_control(
    listeners: Sequence[socket.socket],
    *,
    status: Callable[[], dict[str, Any]],
    reload: Callable[[], Awaitable[tuple[bool, str]]],
    stop_accepting: trio.Event,
    takeover: Takeover | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer the control socket until cancelled; stop accepting once ``stop_accepting`` is set
    (the requests in flight are still answered).  ``takeover``: gives the sockets to a new process
    (None: this process refuses, a ``dev`` run)."""
    limiter = trio.Semaphore(CONCURRENT)
    async with trio.open_nursery() as connections, trio.open_nursery() as accept_loops:
        for sock in listeners:
            sock.setblocking(False)
            listener = trio.socket.from_stdlib_socket(sock)
            accept_loops.start_soon(
                _accept_loop, listener, connections, limiter, _Ops(status, reload, takeover)
            )

        async def stop() -> None:
            await stop_accepting.wait()
            accept_loops.cancel_scope.cancel()

        accept_loops.start_soon(stop)
        task_status.started()


async def _accept_loop(
    listener: trio.socket.SocketType,
    connections: trio.Nursery,
    limiter: trio.Semaphore,
    ops: _Ops,
) -> None:
    while True:
        await limiter.acquire()
        try:
            conn, _ = await listener.accept()
        except OSError as exc:
            limiter.release()
            # A connection that went away before it was accepted, or no fd to spare: try again soon.
            log.warning("control: accept failed: %s", exc.strerror or exc)
            await trio.sleep(0.1)
            continue
        except BaseException:
            limiter.release()
            raise
        # From here the task owns the connection; if it cannot be started, close it now.
        try:
            connections.start_soon(_answer, conn, limiter, ops)
        except BaseException:
            conn.close()
            limiter.release()
            raise


@record
class _Ops:
    """What the control socket's requests call."""

    status: Callable[[], dict[str, Any]]
    reload: Callable[[], Awaitable[tuple[bool, str]]]
    takeover: Takeover | None


async def _answer(conn: trio.socket.SocketType, limiter: trio.Semaphore, ops: _Ops) -> None:
    try:
        with conn:
            await _answer_one(conn, ops)
    except Exception:
        # The control socket must never take the service down with it.
        log.exception("control: answering a request failed")
    finally:
        limiter.release()


async def _answer_one(conn: trio.socket.SocketType, ops: _Ops) -> None:
    try:
        pid, uid, _gid = peer_credentials(conn)
    except OSError as exc:
        log.warning("control: cannot tell who connected (%s); closed", exc.strerror or exc)
        return
    who = f"PID {pid} (uid {uid})"
    if uid not in (os.geteuid(), 0):
        log.warning("control: refused %s: only uid %d and root may use the control socket", who, os.geteuid())
        denied = "permission denied: only the service's user and root"
        await send_answer(conn, {"ok": False, "error": denied})
        return
    request, problem = await _read_request(conn)
    if problem is not None:
        log.warning("control: %s: %s; closed", who, problem)
        await send_answer(conn, {"ok": False, "error": problem})
        return
    try:
        op = parse_request(request)
    except ControlRequestError as exc:
        log.warning("control: %s: malformed request: %s; closed", who, exc)
        await send_answer(conn, {"ok": False, "error": f"malformed request: {exc}"})
        return
    if op == "status":
        await send_answer(conn, {"ok": True, "status": ops.status()})
        return
    if op == "takeover":
        if ops.takeover is None:
            log.warning("control: %s asks for the sockets; a dev run does not give them away", who)
            await send_answer(conn, {"ok": False, "error": "a dev run does not give its sockets away"})
            return
        await ops.takeover(conn, pid, who)
        return
    log.info("control: %s asks for a reload", who)
    taken_over, message = await ops.reload()
    if taken_over:
        await send_answer(conn, {"ok": True, "message": message})
    else:
        await send_answer(conn, {"ok": False, "error": message})


async def _read_request(conn: trio.socket.SocketType) -> tuple[bytes, str | None]:
    """One request line without its newline, or what is wrong with it."""
    data = b""
    with trio.move_on_after(REQUEST_TIMEOUT):
        while b"\n" not in data:
            if len(data) >= REQUEST_MAX:
                return b"", f"request longer than {REQUEST_MAX} bytes"
            try:
                chunk = await conn.recv(REQUEST_MAX - len(data))
            except OSError as exc:
                return b"", f"receive failed: {exc.strerror or exc}"
            if not chunk:
                if not data:
                    return b"", "closed the connection without a request"
                return b"", f"closed the connection after {len(data)} bytes, before a full request line"
            data += chunk
        line, _, rest = data.partition(b"\n")
        if rest:
            return b"", "more than one request line (one request per connection)"
        return line, None
    return b"", f"sent no full request within {REQUEST_TIMEOUT:g}s"


async def send_answer(conn: trio.socket.SocketType, answer: dict[str, Any]) -> None:
    """Send one answer line, within ``REQUEST_TIMEOUT``; a peer gone or not reading only ends it."""
    data = encode(answer)
    with trio.move_on_after(REQUEST_TIMEOUT):
        try:
            while data:
                sent = await conn.send(data)
                data = data[sent:]
        except OSError:
            return
