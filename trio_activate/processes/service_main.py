"""``trio-activate serve`` after the sockets are in hand: import handlers, run the service under trio.

Layer 4 (one service process, on trio: it may hand over to a successor),
called by the CLI once ``acquire_sockets`` returned, which is after any
self-activation re-exec: trio is imported here, not before.

Resource handling: ``owned`` stays the caller's; it is closed by the CLI
after ``run_service`` returns or raises.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import trio

from .. import __version__
from ..errors import HandlerError
from ..model.address import address_from_sockname
from ..model.control import STATUS_VERSION
from ..model.manifest import HandlerKind, Manifest
from ..model.private_env import FRESH_CODE_VARIABLE, SUPERVISOR_VARIABLE
from ..model.records import record
from ..model.text import is_decimal
from ..runtime.control import Takeover
from ..runtime.handlers import LoadedHandler, load_handlers
from ..runtime.service import HandlerSockets, Service, serve_connection_once
from ..runtime.serving import Listening
from ..system.acquire import ServiceSockets
from ..system.notifier import Notifier
from ..system.start_signals import interruptible_start
from ..system.takeover import TakenOver
from .control import ControlOptions, Operated, handler_entries, socket_entries
from .handoff import hand_over, stop_successor, take_handoff, wait_for_exit
from .spawn import WorkerCommand
from .takeover import confirm, giving_away

__all__ = ["run_service"]

log = logging.getLogger("trio_activate")

ORIGINS = {
    "passed": "passed in LISTEN_FDS",
    "self-activated": "created by the internal activator",
    "created": "created in-process",
    "taken over": "taken over from a running service",
}


def run_service(
    manifest: Manifest,
    owned: ServiceSockets,
    *,
    reload_command: WorkerCommand | None = None,
    control: ControlOptions | None = None,
    takeover: TakenOver | None = None,
) -> int:
    """Serve until stopped; return the exit status.

    ``reload_command``: how to start a successor on SIGHUP (zero-downtime
    hand-over); None leaves reloads to a supervisor.  ``control``: the control
    socket and pid file of a process that answers for the service (not a
    supervised worker); a hand-over successor inherits its predecessor's, and
    a process that took the sockets over (``takeover``) the old process's.
    """
    handoff = take_handoff(os.environ)
    supervisor = os.environ.pop(SUPERVISOR_VARIABLE, None)
    operated = Operated.for_successor("single", os.environ)
    if takeover is not None:
        inherited = takeover.inherited_state()
        operated = Operated.for_takeover(control or ControlOptions(), mode="single", inherited=inherited)
    elif operated is None and control is not None and owned.connection is None:
        operated = Operated(control, mode="single")
    try:
        return _run_service(manifest, owned, reload_command, handoff, supervisor, operated, takeover)
    finally:
        if operated is not None:
            operated.close()


def _run_service(
    manifest: Manifest,
    owned: ServiceSockets,
    reload_command: WorkerCommand | None,
    handoff: tuple[int, Notifier] | None,
    supervisor: str | None,
    operated: Operated | None,
    takeover: TakenOver | None = None,
) -> int:
    _log_banner(manifest, owned)
    # A reload's process, or a takeover's (a new release): the code on disk, not a cached .pyc
    # that a file rewritten within the same second, at the same size, would leave looking current.
    fresh_code = os.environ.pop(FRESH_CODE_VARIABLE, None) is not None or takeover is not None
    # The user's code runs here: a stop asked for meanwhile stops the start (StartInterrupted).
    with interruptible_start():
        handlers = load_handlers(manifest, fresh_bytecode=fresh_code)
    if owned.connection is not None:
        handler = _accept_handler(manifest, handlers)
        log.info(
            "Accept=yes: serving one connection with handlers.%s",
            handler.spec.name,
            extra={"handler": handler.spec.name},
        )
        serve_once = partial(
            serve_connection_once,
            grace_period=manifest.service.grace_period,
            handle_signals=True,
            manifest=manifest,
        )
        return trio.run(serve_once, handler, owned.connection)
    plan = [
        HandlerSockets(
            handler,
            [Listening(name, sock) for name in handler.spec.sockets for sock in owned.sockets.get(name, [])],
        )
        for handler in handlers
    ]
    with Notifier.from_environ(unset=True) as notifier:
        if manifest.service.fd_store and supervisor is None and handoff is None:
            # The process the manager started: a worker's notifier is its supervisor's
            # inbox, and a hand-over successor was passed its predecessor's sockets.
            notifier.store_when_ready(owned.fd_store_plan())
        reloader = None
        if reload_command is not None:
            command = reload_command

            async def reloader() -> int | None:
                fds: list[int] = []
                env: dict[str, str] = {}
                if operated is not None:
                    fds, env = operated.successor_state(f"took over from process {os.getpid()}")
                successor = await hand_over(
                    command,
                    manager=service.notifier,
                    start_timeout=manifest.service.start_timeout,
                    socket_files=owned.files,
                    extra_env=env,
                    extra_fds=fds,
                )
                if successor is None:
                    return None
                if service.stop_requested:
                    # Ready just as the stop came: the stop is for the whole service.
                    await stop_successor(successor)
                    return None
                if operated is not None:
                    operated.handed_over_to(successor.pid)
                return successor.pid

        service = Service(manifest, plan, notifier=notifier, reloader=reloader)
        # A supervised worker: its connections in flight for the supervisor's status.
        service.report_connections = supervisor is not None
        if operated is not None:
            service.on_reload_outcome = operated.history.record
        watch = _watch_supervisor(supervisor)
        try:
            answering = _answering(service, owned, operated, takeover)
            status: int = trio.run(_serve_with_signals, service, handoff, watch, answering)
        finally:
            if watch is not None and watch[1] is not None:
                os.close(watch[1])
    if service.handed_over:
        # The successor serves on these socket files and removes them when it stops.
        owned.files = []
    return status


def _watch_supervisor(text: str | None) -> tuple[int, int | None] | None:
    """In a supervised worker: the supervisor's PID and a pidfd for it (None: it is gone already).

    Not ``prctl(PR_SET_PDEATHSIG)``: it must be set between fork and exec,
    where running Python in the supervisor's threaded process is unsafe, and
    it fires when the *thread* that forked exits, and the supervisor forks
    from trio's worker threads, which end when idle.  A pidfd is watched from
    the worker's own loop.  Opened first, then checked against our parent:
    if that is no longer the supervisor, it died before, and its PID may name
    another process by now.
    """
    if text is None or not is_decimal(text):
        return None
    pid = int(text)
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return pid, None
    if os.getppid() != pid:
        os.close(pidfd)
        return pid, None
    return pid, pidfd


def _answering(
    service: Service, owned: ServiceSockets, operated: Operated | None, takeover: TakenOver | None
) -> _Answering | None:
    if operated is None:
        return None
    manifest = service.manifest

    def busy() -> str | None:
        if service.stop_requested:
            return "the service is stopping"
        if service.reloading:
            return "a reload is under way"
        if service.is_main is not None and not service.is_main.is_set():
            return "this process is taking over from its predecessor"
        return None

    def status() -> dict[str, Any]:
        return {
            "version": STATUS_VERSION,
            "service": manifest.service.name,
            "mode": operated.mode,
            **operated.fields(),
            "workers": [],
            "sockets": socket_entries(owned),
            "handlers": handler_entries(manifest, service.in_flight()),
        }

    async def reload() -> tuple[bool, str]:
        if service.reloader is None:
            return False, "this process does not reload: its supervisor does"
        if service.stop_requested:
            return False, "the service is stopping"
        return await operated.history.next_outcome(service.start_reload)

    give = giving_away(manifest, owned, operated, busy=busy, stop=service.shutdown)
    return _Answering(operated, status, reload, give, takeover)


@record
class _Answering:
    operated: Operated
    status: Callable[[], dict[str, Any]]
    reload: Callable[[], Awaitable[tuple[bool, str]]]
    give: Takeover
    takeover: TakenOver | None
    """The old process to confirm to once serving (``serve --takeover``)."""


async def _serve_with_signals(
    service: Service,
    handoff: tuple[int, Notifier] | None,
    supervisor: tuple[int, int | None] | None = None,
    answering: _Answering | None = None,
) -> int:
    # A hand-over successor: READY=1 goes to the predecessor (our NOTIFY_SOCKET
    # is its private inbox); after that we speak to the service manager, which
    # hears MAINPID=<us> from the predecessor right then.  We reload only once
    # the predecessor has exited, so two reloads never overlap.
    statuses: list[int] = []
    takeover_failed = False
    with contextlib.ExitStack() as stack:
        if handoff is not None:
            service.is_main = trio.Event()
            stack.enter_context(handoff[1])
        async with trio.open_nursery() as nursery:
            if handoff is None and supervisor is not None:
                nursery.start_soon(_stop_with_supervisor, service, *supervisor)

            async def serve(*, task_status: trio.TaskStatus[None]) -> None:
                statuses.append(await service.serve(handle_signals=True, task_status=task_status))
                nursery.cancel_scope.cancel()

            await nursery.start(serve)
            if (
                answering is not None
                and answering.takeover is not None
                and not await confirm(answering.takeover, answering.operated)
            ):
                # The old process serves on (or stopped): this one must not answer for it.
                takeover_failed = True
                service.shutdown()
                answering = None
            if answering is not None:
                stop_accepting = trio.Event()

                async def stop_control() -> None:
                    await service.wait_stop_requested()
                    stop_accepting.set()

                nursery.start_soon(stop_control)
                await nursery.start(
                    partial(
                        answering.operated.serve,
                        status=answering.status,
                        reload=answering.reload,
                        stop_accepting=stop_accepting,
                        takeover=answering.give,
                    )
                )
            if handoff is not None:
                predecessor, manager = handoff
                service.switch_notifier(manager)
                await wait_for_exit(predecessor)
                log.info("predecessor %d exited; this process is the service now", predecessor)
                service.is_main.set()
                if answering is not None:
                    answering.operated.owns_files = True
    return 1 if takeover_failed else statuses[0]


async def _stop_with_supervisor(service: Service, pid: int, pidfd: int | None) -> None:
    """A worker whose supervisor died (``kill -9``) stops gracefully, releasing the sockets."""
    if pidfd is not None:
        try:
            await trio.lowlevel.wait_readable(pidfd)
        finally:
            trio.lowlevel.notify_closing(pidfd)
    log.warning("the supervisor (PID %d) exited; stopping gracefully", pid)
    service.shutdown()


def _accept_handler(manifest: Manifest, handlers: list[LoadedHandler]) -> LoadedHandler:
    # The handlers that can serve one passed connection: stream handlers, and asgi ones (hypercorn's).
    streams = [h for h in handlers if h.spec.kind in (HandlerKind.STREAM, HandlerKind.ASGI)]
    wanted = manifest.service.accept_handler
    if wanted is not None:
        return next(h for h in streams if h.spec.name == wanted)
    if len(streams) == 1:
        return streams[0]
    # The handler of the manifest's accept = true sockets (the manifest allows only one).
    accepting = {spec.name for spec in manifest.sockets if spec.accept}
    serving = [h for h in streams if accepting.intersection(h.spec.sockets)]
    if len(serving) == 1:
        return serving[0]
    names = ", ".join(h.spec.name for h in streams) or "none"
    raise HandlerError(
        f"{manifest.source}: service.accept-handler: an Accept=yes connection was passed and the "
        f"manifest has {len(streams)} stream or asgi handlers ({names}); set accept-handler to one of them"
    )


def _log_banner(manifest: Manifest, owned: ServiceSockets) -> None:
    count = sum(len(group) for group in owned.sockets.values()) + (owned.connection is not None)
    log.info(
        "trio-activate %s: service %s, pid %d, %d %s %s",
        __version__,
        manifest.service.name,
        os.getpid(),
        count,
        "socket" if count == 1 else "sockets",
        ORIGINS.get(owned.origin, owned.origin),
    )
    for name, group in owned.sockets.items():
        for sock in group:
            log.info("sockets.%s: %s (fd %d)", name, _describe(sock), sock.fileno(), extra={"socket": name})


def _describe(sock: socket.socket) -> str:
    address = address_from_sockname(sock.family, sock.getsockname())
    kind = {socket.SOCK_STREAM: "stream", socket.SOCK_DGRAM: "datagram", socket.SOCK_SEQPACKET: "seqpacket"}
    return f"{address if address is not None else '(unnamed)'} {kind.get(sock.type, str(sock.type))}"
