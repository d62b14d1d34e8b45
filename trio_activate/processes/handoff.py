"""Zero-downtime reload without a supervisor: hand the sockets over to a successor.

Layer 4 (processes, on trio).

A single-process ``serve`` (one worker, no supervisor) reloads on SIGHUP by
starting a successor, ``trio-activate serve`` itself, with the same
listening sockets (``spawn.spawn_worker``).  The successor reports
``READY=1`` to a private inbox; only then does this process tell the service
manager ``MAINPID=<successor>`` and ``READY=1`` (ending the reload that
``RELOADING=1`` began), stop accepting, drain within the grace period and
exit.  Connections that arrive meanwhile wait in the backlog, so none is
refused; a successor that fails to start is stopped and this process keeps
serving.

The successor learns from two private variables that it is one:
``TRIO_ACTIVATE_HANDOFF_FROM`` (its predecessor's PID) and, when there is a
service manager, ``TRIO_ACTIVATE_MANAGER_NOTIFY`` (the manager's
``NOTIFY_SOCKET``, and the watchdog interval).  It keeps quiet towards the
manager until its predecessor has exited (it is not the main PID before
then), then takes over notifications and the watchdog, and handles the next
SIGHUP the same way.

Outside a service manager, the successor outlives the process the shell
started: the shell's job ends while the service goes on.  Run
``serve --supervise`` in a terminal to reload under one stable process.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import trio

from ..model.notify_message import format_notify_socket, parse_notify_socket
from ..model.private_env import HANDOFF_FROM_VARIABLE, SOCKET_FILES_VARIABLE
from ..model.text import is_decimal
from ..system.notifier import Notifier
from .spawn import NotifyInbox, WorkerCommand, spawn_worker, stop_then_kill

if TYPE_CHECKING:
    from ..system.acquire import SocketFile

__all__ = [
    "HANDOFF_FROM_VARIABLE",
    "MANAGER_NOTIFY_VARIABLE",
    "hand_over",
    "stop_successor",
    "take_handoff",
    "wait_for_exit",
]

log = logging.getLogger("trio_activate")

MANAGER_NOTIFY_VARIABLE = "TRIO_ACTIVATE_MANAGER_NOTIFY"
STOP_TIMEOUT = 10.0


async def hand_over(
    command: WorkerCommand,
    *,
    manager: Notifier,
    start_timeout: float,
    socket_files: Sequence[SocketFile] = (),
    environ: Mapping[str, str] | None = None,
    extra_env: Mapping[str, str] | None = None,
    extra_fds: Sequence[int] = (),
) -> trio.Process | None:
    """Start a successor over ``command``'s sockets; the successor once it is ready, or None.

    On failure (it could not be started: no fd for its inbox, ``fork``
    refused, the interpreter gone; it exited; it was not ready within
    ``start_timeout``) there is one error line, and a successor that was
    started is stopped and reaped before this returns.  So is one whose
    wait is cancelled (the service began to stop), and then the
    cancellation goes on.  On success it is left running: it outlives this
    process.

    ``socket_files``: the unix socket files this process made; the successor
    serves on them and removes them when it stops (``remove-on-stop``).
    ``extra_env``, ``extra_fds``: more for the successor (the control socket, `control`).
    """
    try:
        with NotifyInbox() as inbox:
            try:
                process = await spawn_worker(
                    command,
                    notify_socket=inbox.address,
                    environ=os.environ if environ is None else environ,
                    extra_env={**_successor_environment(manager, socket_files), **(extra_env or {})},
                    fresh_code=True,  # a reload: the code on disk now, not a cached .pyc
                    extra_fds=extra_fds,
                )
            except OSError as exc:
                log.error("reload failed: cannot start a successor: %s", _describe(exc))
                return None
            about = {"worker_pid": process.pid}
            log.debug("reload: started the successor %d; waiting for its READY=1", process.pid, extra=about)
            try:
                ready = await _wait_until_ready(process, inbox, start_timeout)
            except BaseException:
                await stop_successor(process)
                raise
    except OSError as exc:
        # Out of fds, even the inbox (or a module imported here for the first time) fails.
        log.error("reload failed: cannot open the successor's notify socket: %s", _describe(exc))
        return None
    if ready:
        log.debug("reload: the successor %d is ready", process.pid, extra=about)
        return process
    if process.returncode is not None:
        log.error(
            "reload failed: the successor %d exited with status %d before it was ready",
            process.pid,
            process.returncode,
            extra=about,
        )
    else:
        log.error(
            "reload failed: the successor %d was not ready within %gs; stopping it",
            process.pid,
            start_timeout,
            extra=about,
        )
    await stop_successor(process)
    return None


def _successor_environment(manager: Notifier, socket_files: Sequence[SocketFile]) -> dict[str, str]:
    """The private variables that tell a successor it is one (see the module docstring)."""
    import json  # here, not at the top: start-up time (benchmarks/, scenario 3)

    extra = {HANDOFF_FROM_VARIABLE: str(os.getpid())}
    if manager.enabled and manager.address is not None:
        # As NOTIFY_SOCKET spells it, read back by take_handoff with the same codec.
        text = format_notify_socket(manager.address)
        extra[MANAGER_NOTIFY_VARIABLE] = json.dumps({"address": text, "watchdog": manager.watchdog_interval})
    if socket_files:
        extra[SOCKET_FILES_VARIABLE] = json.dumps([[f.socket_name, f.path, *f.file_id] for f in socket_files])
    return extra


async def _wait_until_ready(process: trio.Process, inbox: NotifyInbox, start_timeout: float) -> bool:
    """True once ``process`` reported ``READY=1``; False when it exited or ``start_timeout`` passed."""
    with trio.move_on_after(start_timeout):
        async with trio.open_nursery() as nursery:

            async def watch_exit() -> None:
                await process.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch_exit)
            while True:
                pid, fields = await inbox.receive()
                if pid == process.pid and fields.get("READY") == "1":
                    nursery.cancel_scope.cancel()
                    return True
    return False


async def stop_successor(process: trio.Process) -> None:
    """Stop a successor that failed, or was ready just as the service began to stop; reaped.

    SIGTERM (it drains what little it took), SIGKILL after ``STOP_TIMEOUT``.
    Shielded: it happens even when cancelled."""
    await stop_then_kill([process], STOP_TIMEOUT)


def _describe(exc: OSError) -> str:
    where = f" ({exc.filename})" if exc.filename else ""
    return f"{exc.strerror or exc}{where}"


def take_handoff(environ: dict[str, str] | os._Environ[str]) -> tuple[int, Notifier] | None:
    """In a successor: the predecessor's PID and a notifier for the manager, or None if not one.

    Removes the private variables, so no child inherits them.
    """
    predecessor = environ.pop(HANDOFF_FROM_VARIABLE, None)
    manager_text = environ.pop(MANAGER_NOTIFY_VARIABLE, None)
    if predecessor is None or not is_decimal(predecessor):
        return None
    manager = Notifier(None)
    if manager_text:
        import json  # here, not at the top: start-up time (benchmarks/, scenario 3)

        try:
            settings = json.loads(manager_text)
            address: str = settings["address"]
            watchdog = settings.get("watchdog")
            manager = Notifier(
                parse_notify_socket(address), watchdog_interval=float(watchdog) if watchdog else None
            )
        except (ValueError, KeyError, TypeError):
            log.warning(
                "ignoring malformed %s: no notifications to the service manager", MANAGER_NOTIFY_VARIABLE
            )
    return int(predecessor), manager


async def wait_for_exit(pid: int) -> None:
    """Wait until process ``pid`` has exited (a pidfd becomes readable then)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        await trio.lowlevel.wait_readable(pidfd)
    finally:
        trio.lowlevel.notify_closing(pidfd)
        os.close(pidfd)
