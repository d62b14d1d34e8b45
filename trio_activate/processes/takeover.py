"""Takeover between unrelated processes, as the process answering for a service does it.

Layer 4.  The exchange is `trio_activate.model.takeover`'s.

- The old side (`giving_away`): the control socket's ``takeover`` request
  offers the listening sockets, the control socket and the socket files;
  once the new process serves, this one names it in the pid file, forgets
  its socket files (the new process removes them at its stop) and stops:
  no longer accepting, draining within its grace period.  A one-process
  ``serve`` and a supervisor both give their sockets away; ``dev`` does not.
- The new side (`confirm`): once it serves, it tells the old one; only
  then does it answer for the service (control socket, pid file, socket
  files).  If the old one does not confirm, the new one stops (exit 1): it
  never serves beside an old process that still believes it is the service.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import trio

from ..model.manifest import Manifest
from ..model.takeover import Offer
from ..runtime.control import Takeover, send_answer
from ..runtime.takeover import confirm_takeover, give_sockets
from ..system.acquire import ServiceSockets
from ..system.takeover import TakenOver
from .control import Operated

__all__ = ["confirm", "giving_away"]

log = logging.getLogger("trio_activate")


def giving_away(
    manifest: Manifest,
    owned: ServiceSockets,
    operated: Operated,
    *,
    busy: Callable[[], str | None],
    stop: Callable[[], None],
) -> Takeover:
    """The control socket's ``takeover``: give ``owned``'s sockets away, then ``stop()``.

    ``busy``: why no takeover can start now (a reload under way, a stop), or None.
    """
    giving = False

    async def takeover(conn: trio.socket.SocketType, pid: int, who: str) -> None:
        nonlocal giving
        problem = _cannot_give(giving) or busy()
        if problem is not None:
            log.warning("control: %s asks for the sockets: refused: %s", who, problem)
            await send_answer(conn, {"ok": False, "error": problem})
            return
        giving = True
        try:
            names = [name for name, group in owned.sockets.items() for _ in group]
            fds = [sock.fileno() for group in owned.sockets.values() for sock in group]
            control_fd, state = operated.inheritance(f"took the sockets over from process {os.getpid()}")
            control = state.pop("control")
            if control_fd is not None:
                fds.append(control_fd)
                control = {key: control[key] for key in ("path", "dev", "ino")}
            offer = Offer(
                pid=os.getpid(),
                service=manifest.service.name,
                names=tuple(names),
                control=control,
                files=tuple((item.socket_name, item.path, item.file_id) for item in owned.files),
                state=state,
            )
            log.info(
                "control: %s takes the sockets over: %d fd(s) sent; serving until it serves", who, len(fds)
            )
            taken = await give_sockets(
                conn, offer, fds, who=who, ready_timeout=manifest.service.start_timeout, busy=busy
            )
        finally:
            giving = False
        if not taken:
            return
        log.info(
            "process %d took the sockets over; stopping (connections in flight get %gs)",
            pid,
            manifest.service.grace_period,
        )
        operated.handed_over_to(pid)
        # Its socket files now: the new process removes them when it stops.
        owned.files = []
        stop()

    return takeover


def _cannot_give(giving: bool) -> str | None:
    if os.getpid() == 1:
        # A container's init: its exit would end the PID namespace, and the new process with it.
        return "this process is PID 1 of its namespace; its exit would end the new process too"
    if giving:
        return "another takeover is under way"
    return None


async def confirm(taken: TakenOver, operated: Operated) -> bool:
    """The new process serves: have the old one confirm, then answer for the service.  False, with
    one error line, if it did not confirm (the caller stops)."""
    problem = await confirm_takeover(taken.link)
    if problem is not None:
        log.error("takeover: %s; stopping", problem)
        return False
    taken.confirmed()
    operated.owns_files = True
    log.info(
        "takeover: process %d confirmed, stops accepting and drains; this process is the service",
        taken.offer.pid,
    )
    return True
