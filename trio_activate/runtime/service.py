"""Running a service: every handler in one nursery, readiness, graceful shutdown.

Layer 3 (trio).

Shape of the task tree::

    service nursery          signal watcher, watchdog
    └── handlers nursery
        ├── StreamServer.run  (one per stream handler: accept loops + a task per connection)
        ├── AsgiServer.run    (one per asgi handler: hypercorn's Trio worker; see `asgi`)
        └── lifelong scope    datagram and listener handlers: one call each, for the whole service

Lifecycle: ``serve()`` starts every handler and waits until each stream
server's accept loops run, then reports ``READY=1`` and logs "ready".  On
``shutdown()`` (SIGTERM/SIGINT for ``trio-activate serve``): ``STOPPING=1``,
accepting stops at once, datagram and listener handlers are cancelled at
once (they have no "in flight": each is one long call), and connections in
flight get ``grace-period`` seconds, after which they are cancelled.  A
second SIGINT cancels at once.  What was drained and what was cancelled is
logged.

Exit status: 0 after a requested shutdown; 1 when a handler failed the
service (a datagram or listener handler raised, or a stream handler with
``on-error = "exit"``).

Resource handling: the ``Service`` does not own its sockets; whoever built
it (``activated()``, the CLI) closes them after ``serve()`` returns.
"""

from __future__ import annotations

import logging
import math
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from ..model import notify_message
from ..model.manifest import HandlerKind, Manifest
from ..model.records import record
from ..system.notifier import Notifier
from ..system.reload_outcome import announce_reload_outcome
from .access import Outcome, Traffic, log_access, log_went_away, peer_text, went_away
from .asgi import AsgiConnection, AsgiServer
from .handlers import LoadedHandler
from .serving import Listening, StreamServer, serve_with_timeouts
from .signals import watch_signals
from .stopping import StopSignal, current_stop_signal
from .watchdog import serve_watchdog

__all__ = ["EXIT_FAILED", "EXIT_OK", "Service", "serve_connection_once"]

log = logging.getLogger("trio_activate")

EXIT_OK = 0
EXIT_FAILED = 1

# At most this long between the stop and STOPPING=1 while hypercorn's accept loops end
# (a few scheduler steps; bounded so that a stuck one cannot hold up a reload's announcement).
STOPPING_WAIT = 1.0


@record
class HandlerSockets:
    """One handler and the sockets it serves, each with its manifest name."""

    handler: LoadedHandler
    sockets: Sequence[Listening]


class Service:
    def __init__(
        self,
        manifest: Manifest,
        handlers: Sequence[HandlerSockets],
        *,
        notifier: Notifier | None = None,
        reloader: Callable[[], Awaitable[int | None]] | None = None,
    ) -> None:
        """``reloader``: what SIGHUP does when ``serve(handle_signals=True)``: start a
        successor and return its PID once it serves, or None if it failed.
        Cancelled when the service begins to stop, it must stop what it
        started; one that returns a PID while `stop_requested` is true must
        have stopped that successor and return None instead.
        Without one, SIGHUP stays blocked (a supervised worker leaves reloads
        to its supervisor)."""
        self.manifest = manifest
        self.reloader = reloader
        # Set once this process is the one the service manager knows: at once,
        # except in a hand-over successor until its predecessor has exited.
        self.is_main = trio.Event()
        self.is_main.set()
        # Set once every handler started (READY=1 sent): a reload asked for before
        # (a SIGHUP held since start-up) waits for it.
        self._started = trio.Event()
        self._reloading = False
        self._service_nursery: trio.Nursery | None = None
        self.handlers = list(handlers)
        self.notifier = notifier if notifier is not None else Notifier(None)
        self.exit_status = EXIT_OK
        self._stop_requested = trio.Event()
        self.stop_signal = StopSignal()
        self._stopping = False
        self._servers: list[StreamServer] = []
        self._asgi_servers: list[AsgiServer] = []
        self._lifelong_scope = trio.CancelScope()
        self._handlers_scope: trio.CancelScope | None = None
        self._watchdog_scope = trio.CancelScope()
        # A reload in progress; shutdown() cancels it (its successor is stopped).
        self._reload_scope: trio.CancelScope | None = None
        # True once a successor took over: the sockets and their files are its now.
        self.handed_over = False
        self._in_flight_at_stop = 0
        # Called with each reload's outcome, besides a waiting `reload --wait` (the control socket).
        self.on_reload_outcome: Callable[[bool, str], object] | None = None
        # A supervised worker tells its supervisor its connections in flight (the supervisor's status).
        self.report_connections = False

    @property
    def stop_requested(self) -> bool:
        """True once a stop was asked for (``shutdown``, a signal, a failed handler)."""
        return self._stop_requested.is_set()

    @property
    def name(self) -> str:
        return self.manifest.service.name

    async def wait_stop_requested(self) -> None:
        """Return once a stop was asked for."""
        await self._stop_requested.wait()

    def shutdown(self) -> None:
        """Ask for a graceful stop: stop accepting, drain for grace-period, then cancel.

        A reload in progress is abandoned: the successor it started is
        stopped, so the stop stops the whole service."""
        self._stop_requested.set()
        if self._reload_scope is not None and not self._reload_scope.cancel_called:
            log.info("reload abandoned: the service is stopping; its successor is stopped")
            self._tell_outcome(False, "the service is stopping")
            self._reload_scope.cancel()

    def _tell_outcome(self, taken_over: bool, status: str) -> None:
        announce_reload_outcome(taken_over, status)
        if self.on_reload_outcome is not None:
            self.on_reload_outcome(taken_over, status)

    @property
    def reloading(self) -> bool:
        """Whether a reload is under way (one asked for now is answered by its outcome)."""
        return self._reloading

    def start_reload(self) -> None:
        """What SIGHUP does: start a reload in the service's nursery (once serving)."""
        self._start_reload()

    def in_flight(self) -> dict[str, int | None]:
        """Each handler's connections in flight; None where they are not counted (not a stream handler)."""
        counts: dict[str, int | None] = {}
        for item in self.handlers:
            name = item.handler.spec.name
            counts[name] = None if item.handler.spec.kind is not HandlerKind.STREAM else 0
        for server in self._servers:
            counts[server.name] = (counts.get(server.name) or 0) + server.slots.active
        return counts

    async def _report_connections(self) -> None:
        """Tell the supervisor the connections in flight, when they changed, at most 4 times a second."""
        from ..model.control import CONNECTIONS_FIELD, format_connections

        last: dict[str, int] | None = None
        while True:
            counts = {name: count for name, count in self.in_flight().items() if count is not None}
            if counts != last:
                last = counts
                try:
                    message = notify_message.format_message({CONNECTIONS_FIELD: format_connections(counts)})
                except ValueError:  # too many handlers for one datagram: not counted
                    message = notify_message.format_message({CONNECTIONS_FIELD: "{}"})
                self.notifier.send(message)
            await trio.sleep(0.25)

    def cancel(self) -> None:
        """Stop now: cancel every handler without waiting for the grace period."""
        self._stop_requested.set()
        if self._handlers_scope is not None:
            self._handlers_scope.cancel()

    def fail(self) -> None:
        """A handler failed the service: stop gracefully, then exit non-zero."""
        self.exit_status = EXIT_FAILED
        self.shutdown()

    async def serve(
        self, *, handle_signals: bool = False, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> int:
        """Serve until ``shutdown()`` (or SIGTERM/SIGINT with ``handle_signals``); return the exit status."""
        # Every task below sees this service's stop signal (stopping.is_stopping, move_on_stop).
        token = current_stop_signal.set(self.stop_signal)
        try:
            async with trio.open_nursery() as service_nursery:
                self._service_nursery = service_nursery
                if handle_signals:
                    await service_nursery.start(self._watch_signals)
                await service_nursery.start(self._serve_watchdog, self.notifier)
                if self.report_connections:
                    service_nursery.start_soon(self._report_connections)
                async with trio.open_nursery() as handlers_nursery:
                    self._handlers_scope = handlers_nursery.cancel_scope
                    await self._start_handlers(handlers_nursery)
                    # Datagram and listener handlers were only scheduled: let each run to
                    # its first checkpoint (two passes: a batch runs in either order), so
                    # one that fails at once is not announced as ready first.
                    await trio.lowlevel.checkpoint()
                    await trio.lowlevel.checkpoint()
                    if not self._stop_requested.is_set():
                        self._report_ready()
                        self._started.set()
                    task_status.started()
                    await self._stop_requested.wait()
                    self._begin_shutdown()
                self._report_drained()
                service_nursery.cancel_scope.cancel()
        finally:
            current_stop_signal.reset(token)
        return self.exit_status

    async def _start_handlers(self, nursery: trio.Nursery) -> None:
        # Datagram and listener handlers are each one call that lasts as long as
        # the service: they have no connections to drain, so they share one scope
        # that shutdown cancels at once.
        lifelong: list[HandlerSockets] = []
        for item in self.handlers:
            if item.handler.spec.kind is HandlerKind.STREAM:
                server = StreamServer(item.handler, item.sockets, on_failure=self.fail)
                self._servers.append(server)
                await nursery.start(server.run)
            elif item.handler.spec.kind is HandlerKind.ASGI:
                asgi = AsgiServer(self.manifest, item.handler, item.sockets, on_failure=self.fail)
                self._asgi_servers.append(asgi)
                await nursery.start(asgi.run)
            else:
                lifelong.append(item)
        if lifelong:
            await nursery.start(self._run_lifelong_handlers, lifelong)

    async def _run_lifelong_handlers(
        self, handlers: Sequence[HandlerSockets], *, task_status: trio.TaskStatus[None]
    ) -> None:
        with self._lifelong_scope:
            async with trio.open_nursery() as nursery:
                for item in handlers:
                    if item.handler.spec.kind is HandlerKind.DATAGRAM:
                        for listening in item.sockets:
                            sock = trio.socket.from_stdlib_socket(listening.sock)
                            nursery.start_soon(self._run_lifelong, item.handler, sock, listening.name)
                    else:
                        listeners = [
                            trio.SocketListener(trio.socket.from_stdlib_socket(listening.sock))
                            for listening in item.sockets
                        ]
                        names = ",".join(sorted({listening.name for listening in item.sockets}))
                        nursery.start_soon(self._run_lifelong, item.handler, listeners, names)
                task_status.started()

    async def _run_lifelong(self, handler: LoadedHandler, argument: object, names: str) -> None:
        try:
            await handler.function(argument)
        except Exception:
            log.exception(
                "handlers.%s (sockets.%s) raised; stopping the service",
                handler.spec.name,
                names,
                extra={"handler": handler.spec.name, "socket": names},
            )
            self.fail()
        else:
            if not self._stopping:
                log.warning(
                    "handlers.%s (sockets.%s) returned; it serves no more",
                    handler.spec.name,
                    names,
                    extra={"handler": handler.spec.name, "socket": names},
                )

    def _report_ready(self) -> None:
        served = ", ".join(f"{item.handler.spec.name} ({len(item.sockets)} fd)" for item in self.handlers)
        log.info("ready: %s serving %s", self.name, served or "no handler")
        # One datagram: whoever waits for READY=1 may stop listening right after it.
        self.notifier.ready(f"Serving {served}" if served else "Ready; no handler")

    def _begin_shutdown(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        grace = self.manifest.service.grace_period
        in_flight = self._in_flight_at_stop = sum(server.slots.active for server in self._servers)
        log.info("stopping: no longer accepting; %d connection(s) in flight get %gs", in_flight, grace)
        stopping = notify_message.format_message(
            {"STOPPING": "1", "STATUS": f"Stopping: draining {in_flight} connection(s)"}
        )
        self._lifelong_scope.cancel()
        deadline = trio.current_time() + grace
        for server in self._servers:
            server.stop_accepting()
            server.set_drain_deadline(deadline)
        for asgi in self._asgi_servers:
            asgi.stop(deadline)
        if self._asgi_servers and self._service_nursery is not None:
            # STOPPING=1 tells a supervisor this process accepts nothing more (a reload is
            # announced after it): a stream server stops accepting right here, but hypercorn's
            # accept loops end a few steps after its shutdown trigger, and could take a
            # connection meanwhile.  So it is said once they have ended.
            self._service_nursery.start_soon(self._say_stopping_once_asgi_stopped_accepting, stopping)
        else:
            self.notifier.send(stopping)
        # Handlers waiting between requests (move_on_stop) close now.
        self.stop_signal.stop()

    async def _say_stopping_once_asgi_stopped_accepting(self, message: bytes) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(STOPPING_WAIT):
            for asgi in self._asgi_servers:
                await asgi.accepting_stopped.wait()
        self.notifier.send(message)

    def _report_drained(self) -> None:
        cancelled = sum(server.cancelled for server in self._servers)
        accepted = sum(server.accepted for server in self._servers)
        if cancelled:
            log.warning(
                "stopped: %d connection(s) in flight finished within the grace period, %d were cancelled",
                max(self._in_flight_at_stop - cancelled, 0),
                cancelled,
            )
        else:
            log.info("stopped: every connection finished (%d served)", accepted)

    def switch_notifier(self, notifier: Notifier) -> None:
        """Report to ``notifier`` from now on, watchdog included (a successor that became the main PID)."""
        self.notifier = notifier
        self._watchdog_scope.cancel()
        self._watchdog_scope = trio.CancelScope()
        if self._service_nursery is not None:
            self._service_nursery.start_soon(self._serve_watchdog, notifier)

    async def _serve_watchdog(
        self, notifier: Notifier, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        # In a scope of its own: only the main process pings (NotifyAccess=main),
        # so a process that handed over stops pinging at once, drain or not.
        with self._watchdog_scope:
            await serve_watchdog(notifier, task_status=task_status)

    async def _reload(self) -> None:
        if self.reloader is None or self._reloading:
            return
        if self._stop_requested.is_set():
            if self.on_reload_outcome is not None:
                self.on_reload_outcome(False, "the service is stopping")
            return
        self._reloading = True
        self._reload_scope = trio.CancelScope()
        try:
            with self._reload_scope:
                # Not before this service said READY=1: RELOADING=1 first would confuse
                # the manager.  And a successor still sharing the stage with its
                # predecessor is not the main process yet: its RELOADING=1 would go nowhere.
                await self._started.wait()
                await self.is_main.wait()
                log.info("SIGHUP: starting a successor; this process serves until it is ready")
                self.notifier.reloading()
                successor = await self.reloader()
            if self._stop_requested.is_set():
                # The stop came first (shutdown() said so): no hand-over.  The reloader
                # stopped the successor it started (cancelled, or ready just as the stop came).
                return
            if successor is None:
                status = "Reload failed; the previous code keeps serving"
                self.notifier.ready(status)
                self._tell_outcome(False, status)
                return
            # The successor is the main process from now on: nothing more from
            # us to the manager (a STOPPING=1 would stop the whole service, a
            # watchdog ping would be refused).
            manager, self.notifier = self.notifier, Notifier(None)
            self._watchdog_scope.cancel()
            # Stop accepting before the manager hears of the successor: from here
            # on every new connection is the successor's.
            self._begin_shutdown()
            log.info("handed over to process %d", successor, extra={"worker_pid": successor})
            manager.send(notify_message.mainpid(successor, ready=True))
            self._tell_outcome(True, f"handed over to process {successor}")
            self.handed_over = True
            self._reload_scope = None  # done: the stop that follows abandons nothing
            self.shutdown()
        finally:
            self._reloading = False
            self._reload_scope = None

    async def _watch_signals(self, *, task_status: trio.TaskStatus[None]) -> None:
        await watch_signals(
            stop=self.shutdown,
            stopping="shutting down gracefully",
            stop_asked=lambda: self._stopping or self._stop_requested.is_set(),
            cancel=self.cancel,
            cancelling="cancelling every handler now",
            reload=self._start_reload if self.reloader is not None else None,
            task_status=task_status,
        )

    def _start_reload(self) -> None:
        assert self._service_nursery is not None
        self._service_nursery.start_soon(self._reload)


async def serve_connection_once(
    handler: LoadedHandler,
    conn: socket.socket,
    *,
    grace_period: float = math.inf,
    handle_signals: bool = False,
    manifest: Manifest | None = None,
) -> int:
    """``Accept=yes``: run the handler on the one passed connection; exit status 0 on success.

    A stream handler is called with the connection; an asgi handler's
    application is served on it by hypercorn (`AsgiConnection`: it needs
    ``manifest``, for its configuration).  With ``handle_signals``
    (``trio-activate serve``), SIGTERM/SIGINT give the connection
    ``grace_period`` seconds, then cancel it, as ``serve`` does for
    connections in flight; a second SIGINT cancels at once.  Exit status 0.
    """
    scope = trio.CancelScope()
    asgi: AsgiConnection | None = None
    if handler.spec.kind is HandlerKind.ASGI:
        assert manifest is not None, "an asgi handler is configured by its manifest"
        asgi = AsgiConnection(manifest, handler, conn)
    async with trio.open_nursery() as nursery:
        if handle_signals:
            await nursery.start(_limit_on_signals, scope, grace_period, asgi.stop if asgi else None)
        status = await (asgi.serve(scope) if asgi is not None else _serve_one(handler, conn, scope))
        nursery.cancel_scope.cancel()
    return status


async def _serve_one(handler: LoadedHandler, conn: socket.socket, scope: trio.CancelScope) -> int:
    trio_sock = trio.socket.from_stdlib_socket(conn)
    about = {"handler": handler.spec.name}
    is_stream = conn.type == socket.SOCK_STREAM
    spec = handler.spec
    try:
        address: Any = conn.getpeername()
    except OSError:  # ENOTCONN: the client went away before this process started
        address = None
    traffic = Traffic(counted=is_stream) if spec.access_log else None
    outcome = Outcome.ERROR
    status = EXIT_OK
    try:
        with scope:
            # The handler's idle-timeout and max-lifetime apply here as in `serve`.
            reached = await serve_with_timeouts(handler, trio_sock, is_stream=is_stream, traffic=traffic)
        if scope.cancelled_caught:
            outcome = Outcome.CANCELLED
            log.warning("handlers.%s: the Accept=yes connection was cancelled", spec.name, extra=about)
        elif reached is not None:
            outcome = reached
            log.info("handlers.%s: the Accept=yes connection reached its %s", spec.name, reached, extra=about)
        else:
            outcome = Outcome.CLOSED
    except Exception as exc:
        gone = went_away(exc, trio_sock)
        if gone is not None:
            # The client's doing, not a failure of the service: exit status 0.
            outcome = Outcome.RESET
            log_went_away(spec.name, "", address, trio_sock, gone)
        else:
            log.exception("handlers.%s: the Accept=yes connection raised", spec.name, extra=about)
            status = EXIT_FAILED
    finally:
        if traffic is not None:
            # An Accept=yes connection does not say which socket it came from.
            log_access(spec.name, "-", peer_text(address, trio_sock), traffic, outcome)
        trio_sock.close()
    return status


async def _limit_on_signals(
    scope: trio.CancelScope,
    grace_period: float,
    on_stop: Callable[[float], None] | None,
    *,
    task_status: trio.TaskStatus[None],
) -> None:
    limited = trio.Event()

    def limit() -> None:
        limited.set()
        scope.deadline = min(scope.deadline, trio.current_time() + grace_period)
        if on_stop is not None:
            on_stop(scope.deadline)

    await watch_signals(
        stop=limit,
        stopping=f"the Accept=yes connection gets {grace_period:g}s to finish",
        stop_asked=limited.is_set,
        cancel=scope.cancel,
        cancelling="cancelling the connection now",
        task_status=task_status,
    )
