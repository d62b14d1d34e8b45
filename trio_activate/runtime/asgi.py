"""Serving an ASGI application: hypercorn's Trio worker on the sockets the runtime adopted.

Layer 3 (trio).  Hypercorn is optional (``pip install 'trio-activate[asgi]'``):
it is imported in the functions that use it, never at module level, so a
service without an asgi handler never imports it.

How it is served: ``hypercorn.trio.run.worker_serve`` with
``sockets=Sockets(...)``, the entry that takes sockets already listening.
It never calls ``listen()`` on them (only its own ``trio_worker`` and the
sockets it binds itself get ``listen(config.backlog)``), so the manifest's
``backlog`` stays what the kernel was told.  ``fd://`` binds are not used:
hypercorn would own those fds and ``listen(100)`` again.

Lifecycle:

- Ready once hypercorn serves *and* the application sent
  ``lifespan.startup.complete`` (hypercorn reports started even when the
  startup then fails).  An application that raises on the lifespan scope
  without sending ``lifespan.startup.failed`` is served without lifespan,
  as hypercorn does.  ``lifespan.startup.failed`` (or a startup timeout)
  is a failed start: one error line, the service exits 1 without
  ``READY=1``, and under a reload the old generation keeps serving.
- Stop (``stop()``, from the service's stop): hypercorn stops accepting
  at once (its shutdown trigger) and its configuration, which it reads
  live, makes every later response carry ``Connection: close``
  (``keep_alive_max_requests = 0``), so a keep-alive client moves to a new
  connection, which the next generation accepts.  A connection idle at
  that moment is closed only ``IDLE_CLOSE_DELAY`` later: its client may be
  sending the next request right then, and that request gets an answer
  (with ``Connection: close``) instead of a closed connection.  Requests in
  flight get what is left of ``grace-period``; then the lifespan shutdown
  runs, once, bounded by ``LIFESPAN_SHUTDOWN_TIMEOUT``.

The delay needs one hook into hypercorn: its graceful stop sets
``WorkerContext.terminated`` at once, which closes every idle connection.
`_install_hook` makes ``hypercorn.trio.run`` build a ``WorkerContext``
whose ``terminated`` is set after the delay, for a worker this module
started (a context variable says which); any other use of hypercorn in the
process is unchanged.  Hypercorn is pinned (``trio-activate[asgi]``), and
``tests/test_asgi.py`` fails if the hook stops taking effect.

``Accept=yes`` (`AsgiConnection`): the one passed connection is served by
hypercorn's per-connection server (``hypercorn.trio.tcp_server.TCPServer``,
what its accept loop runs for each connection), with the lifespan around it
and the same stop: ``Connection: close`` from then on, the idle connection
closed after ``IDLE_CLOSE_DELAY``.

Resource handling: hypercorn closes the sockets it is given when it stops,
so it gets duplicates (`_duplicate`: a new fd, close-on-exec) of the
listening sockets; the runtime's own fds keep their one owner (the caller's
``ServiceSockets``).  The duplicates belong to `AsgiServer.run`: hypercorn
closes them through the same socket objects when its accept loops end, and
``run`` closes whatever it did not (a start that failed before), so no fd
number is ever closed twice.  Connections are hypercorn's, each closed by
the task that serves it.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import ssl
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from contextvars import ContextVar
from functools import partial
from typing import TYPE_CHECKING, Any

import trio

from ..model.manifest import HttpSpec, Manifest
from .handlers import LoadedHandler
from .serving import Listening

if TYPE_CHECKING:
    from hypercorn.config import Config

__all__ = ["IDLE_CLOSE_DELAY", "LIFESPAN_SHUTDOWN_TIMEOUT", "AsgiConnection", "AsgiServer"]

log = logging.getLogger("trio_activate")

# Seconds an idle keep-alive connection stays open once the stop began.
IDLE_CLOSE_DELAY = 0.5
# Seconds the application's lifespan shutdown may take (the supervisor's
# SIGKILL comes 5 s after the grace period).
LIFESPAN_SHUTDOWN_TIMEOUT = 3.0

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class _Lifespan:
    """The application, wrapped to see what it tells hypercorn on the lifespan scope."""

    def __init__(self, app: Callable[..., Awaitable[Any]]) -> None:
        self.inner = app
        self.complete = False
        self.failure: str | None = None
        self.ended = False
        self.shutdowns = 0

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.inner(scope, receive, send)
            return

        async def watched_send(message: Message) -> None:
            kind = message.get("type")
            if kind == "lifespan.startup.complete":
                self.complete = True
            elif kind == "lifespan.startup.failed":
                self.failure = _last_line(str(message.get("message") or "")) or "(no message)"
            elif kind == "lifespan.shutdown.complete":
                self.shutdowns += 1
            await send(message)

        try:
            await self.inner(scope, receive, watched_send)
        finally:
            self.ended = True

    @property
    def started(self) -> bool:
        """Served and ready: startup complete, or an application without lifespan."""
        return self.failure is None and (self.complete or self.ended)


def _last_line(text: str) -> str:
    """The last non-empty line: a framework sends a whole traceback as the failure message."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


class AsgiServer:
    """One asgi handler: its application served by hypercorn on its sockets.

    ``await nursery.start(server.run)`` returns once it serves (lifespan
    startup complete), or once its start failed (``on_failure`` was called
    first, so the service reports no readiness).  ``stop(deadline)`` begins
    the graceful stop; ``run`` returns when it is over.
    """

    def __init__(
        self,
        manifest: Manifest,
        handler: LoadedHandler,
        listening: Sequence[Listening],
        *,
        on_failure: Callable[[], None],
    ) -> None:
        self.handler = handler
        self.listening = list(listening)
        self.on_failure = on_failure
        self.config = make_config(manifest, handler.spec.http or HttpSpec(), handler.spec.name)
        self.lifespan = _Lifespan(handler.function)
        self.stopping = False
        # Set once hypercorn's accept loops have ended (or it never served): from then on
        # this process takes no new connection, and may say STOPPING=1.
        self.accepting_stopped = trio.Event()
        self._stop = trio.Event()
        self._deadline = math.inf

    @property
    def name(self) -> str:
        return self.handler.spec.name

    def stop(self, deadline: float) -> None:
        """Stop accepting now; every later response says ``Connection: close``; drain until ``deadline``."""
        if self.stopping:
            return
        self.stopping = True
        self._deadline = deadline
        # Read by hypercorn on every response: a keep-alive connection ends after its next one.
        self.config.keep_alive_max_requests = 0
        self._stop.set()

    async def before_terminated(self) -> None:
        """Hypercorn stopped accepting; wait out the idle delay, then give the rest of the grace period."""
        self.accepting_stopped.set()
        if not self.stopping:
            return
        now = trio.current_time()
        await trio.sleep(max(0.0, min(IDLE_CLOSE_DELAY, self._deadline - now)))
        self.config.graceful_timeout = max(0.0, self._deadline - trio.current_time())

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        from hypercorn.app_wrappers import ASGIWrapper
        from hypercorn.config import Sockets
        from hypercorn.trio.run import worker_serve

        _install_hook()
        reported = False
        duplicates: list[socket.socket] = []
        token = _current_server.set(self)
        try:
            for item in self.listening:
                duplicates.append(_duplicate(item.sock))
            if self.handler.spec.http is not None and self.handler.spec.http.tls:
                sockets = Sockets(secure_sockets=duplicates, insecure_sockets=[], quic_sockets=[])
            else:
                sockets = Sockets(secure_sockets=[], insecure_sockets=duplicates, quic_sockets=[])
            serve = partial(
                worker_serve,
                ASGIWrapper(self.lifespan.app),  # type: ignore[arg-type]
                self.config,
                sockets=sockets,
                shutdown_trigger=self._stop.wait,
            )
            async with trio.open_nursery() as nursery:
                await nursery.start(serve)
                if self.lifespan.started:
                    reported = True
                    task_status.started()
                # Otherwise the startup failed after hypercorn said started: its
                # worker_serve raises next, and that is reported below.
        except (Exception, BaseExceptionGroup) as exc:
            cancelled: BaseException | None = None
            failed: BaseException | None = exc
            if isinstance(exc, BaseExceptionGroup):
                cancelled, failed = exc.split(trio.Cancelled)
            if failed is None:
                raise
            self._failed(failed, started=reported)
            if not reported:
                task_status.started()
            if cancelled is not None:
                raise cancelled from None
            return
        finally:
            self.accepting_stopped.set()
            _current_server.reset(token)
            for sock in duplicates:
                sock.close()
        if not reported:
            if not self.stopping:
                log.error("handlers.%s: hypercorn stopped before the application started", self.name)
                self.on_failure()
            task_status.started()
        elif not self.stopping:
            log.warning("handlers.%s: hypercorn returned; it serves no more", self.name)

    def _failed(self, exc: BaseException, *, started: bool) -> None:
        if not started:
            if self.lifespan.failure is not None:
                reason = f"lifespan startup failed: {self.lifespan.failure}"
            else:
                reason = f"the application did not start: {_describe(exc)}"
            log.error("handlers.%s: %s", self.name, reason)
        else:
            log.error("handlers.%s: hypercorn failed; stopping the service", self.name, exc_info=exc)
        self.on_failure()


class AsgiConnection:
    """``Accept=yes``: the one connection systemd accepted, served by hypercorn's per-connection server.

    The lifespan runs around it, as in a listening worker: startup before
    the first byte is read (a failed startup is one error line and exit
    status 1, the connection closed unanswered), shutdown after the
    connection closed.  The connection is a keep-alive one for as long as
    its client wants (within ``keep-alive-timeout`` between requests).
    ``stop(deadline)`` (SIGTERM) makes the next response say ``Connection:
    close`` and closes the connection, if idle, ``IDLE_CLOSE_DELAY`` later;
    the caller's cancel scope ends a request still running at the deadline.

    Resource handling: the passed socket is the caller's; `serve` closes it
    (through the Trio socket wrapping the same object) before it returns.
    """

    def __init__(self, manifest: Manifest, handler: LoadedHandler, conn: socket.socket) -> None:
        self.handler = handler
        self.conn = conn
        self.config = make_config(manifest, handler.spec.http or HttpSpec(), handler.spec.name)
        self.lifespan = _Lifespan(handler.function)
        self._stop = trio.Event()
        self._deadline = math.inf

    @property
    def name(self) -> str:
        return self.handler.spec.name

    def stop(self, deadline: float) -> None:
        if self._stop.is_set():
            return
        self._deadline = deadline
        self.config.keep_alive_max_requests = 0
        self._stop.set()

    async def serve(self, scope: trio.CancelScope) -> int:
        """Serve the connection until it closes (or ``scope`` is cancelled); the exit status."""
        from hypercorn.app_wrappers import ASGIWrapper
        from hypercorn.trio.lifespan import Lifespan
        from hypercorn.trio.tcp_server import TCPServer
        from hypercorn.trio.worker_context import WorkerContext
        from hypercorn.typing import ConnectionState, LifespanState

        app = ASGIWrapper(self.lifespan.app)  # type: ignore[arg-type]
        state: LifespanState = {}
        lifespan = Lifespan(app, self.config, state)
        context = WorkerContext(None)
        trio_sock = trio.socket.from_stdlib_socket(self.conn)
        started = False
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(lifespan.handle_lifespan)
                await lifespan.wait_for_startup()
                if not self.lifespan.started:
                    # The failure is raised by the lifespan task, out of this nursery.
                    await trio.sleep_forever()
                started = True
                nursery.start_soon(self._close_when_idle, context)
                stream: Any = trio.SocketStream(trio_sock)
                if self.handler.spec.http is not None and self.handler.spec.http.tls:
                    ssl_context = self.config.create_ssl_context()
                    assert ssl_context is not None, "certfile and keyfile are set"
                    stream = trio.SSLStream(stream, ssl_context, server_side=True, https_compatible=True)
                with scope:
                    await TCPServer(app, self.config, context, ConnectionState(state.copy()), stream)
                if scope.cancelled_caught:
                    log.warning("handlers.%s: the Accept=yes connection was cancelled", self.name)
                await lifespan.wait_for_shutdown()
                nursery.cancel_scope.cancel()
        except (Exception, BaseExceptionGroup) as exc:
            failed = exc.split(trio.Cancelled)[1] if isinstance(exc, BaseExceptionGroup) else exc
            if failed is None:
                raise
            if started:
                log.error("handlers.%s: hypercorn failed", self.name, exc_info=failed)
            elif self.lifespan.failure is not None:
                log.error("handlers.%s: lifespan startup failed: %s", self.name, self.lifespan.failure)
            else:
                log.error("handlers.%s: the application did not start: %s", self.name, _describe(failed))
            return 1
        finally:
            trio_sock.close()
        return 0

    async def _close_when_idle(self, context: Any) -> None:
        """On stop: after the idle delay, hypercorn closes the connection if it is between requests."""
        await self._stop.wait()
        await trio.sleep(max(0.0, min(IDLE_CLOSE_DELAY, self._deadline - trio.current_time())))
        await context.terminated.set()


def _duplicate(sock: socket.socket) -> socket.socket:
    """A socket object of its own on a new fd (close-on-exec) for ``sock``'s listening socket.

    Not ``sock.dup()``: it copies the timeout with ``settimeout``, and an
    adopted socket's is None, so it clears ``O_NONBLOCK``.  That flag belongs
    to the open file description, which the supervisor and every worker
    share (the fds were passed, not opened anew): a worker starting would
    make the socket blocking under its serving siblings until hypercorn sets
    it non-blocking again, after the lifespan startup.  A sibling calling
    ``accept()`` then (Trio tries the call before waiting for readiness)
    blocks its whole event loop in the kernel until some client connects:
    no ``READY=1`` from a worker just starting, no answer to the connection
    an old one just accepted.  ``socket.socket(fileno=...)`` changes no flag.
    """
    fd = os.dup(sock.fileno())
    try:
        return socket.socket(sock.family, sock.type, sock.proto, fileno=fd)
    except BaseException:
        os.close(fd)
        raise


def _describe(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"


def make_config(manifest: Manifest, http: HttpSpec, name: str) -> Config:
    """Hypercorn's configuration for one handler, from its ``[handlers.NAME.http]`` table."""
    from hypercorn.config import Config

    config = Config()
    config.startup_timeout = manifest.service.start_timeout
    config.shutdown_timeout = LIFESPAN_SHUTDOWN_TIMEOUT
    config.graceful_timeout = manifest.service.grace_period
    config.keep_alive_timeout = http.keep_alive_timeout
    config.root_path = http.root_path
    config.include_server_header = http.server_header
    # Hypercorn's errors (an application's exception, with its traceback) go to
    # the service's log; its "Running on ..." lines are left out: readiness is
    # the runtime's "ready" line, after lifespan startup.
    errors = logging.getLogger("trio_activate.hypercorn")
    if not any(isinstance(f, _NoBanner) for f in errors.filters):
        errors.addFilter(_NoBanner())
    config.errorlog = errors
    config.accesslog = logging.getLogger("trio_activate.access") if http.access_log else None
    if http.tls:
        assert http.certfile is not None
        assert http.keyfile is not None
        config.certfile = str(manifest.folder / http.certfile)
        config.keyfile = str(manifest.folder / http.keyfile)
        if http.ca_certs is not None:
            config.ca_certs = str(manifest.folder / http.ca_certs)
            config.verify_mode = ssl.CERT_REQUIRED
        config.alpn_protocols = ["h2", "http/1.1"] if http.http2 else ["http/1.1"]
    return config


class _NoBanner(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Running on ")


# Which AsgiServer the hypercorn worker started in this task tree belongs to.
_current_server: ContextVar[AsgiServer | None] = ContextVar("trio_activate_asgi_server", default=None)


def _install_hook() -> None:
    """Make hypercorn's Trio worker set ``terminated`` through `AsgiServer.before_terminated`."""
    import hypercorn.trio.run as run_module
    from hypercorn.trio.worker_context import EventWrapper, WorkerContext

    if getattr(run_module.WorkerContext, "trio_activate_hook", False):  # type: ignore[attr-defined]
        return

    class Terminated(EventWrapper):
        def __init__(self, server: AsgiServer) -> None:
            super().__init__()
            self.server = server

        async def set(self) -> None:
            await self.server.before_terminated()
            await super().set()

    class HookedWorkerContext(WorkerContext):
        trio_activate_hook = True

        def __init__(self, max_requests: int | None) -> None:
            super().__init__(max_requests)
            server = _current_server.get()
            if server is not None:
                self.terminated = Terminated(server)

    run_module.WorkerContext = HookedWorkerContext  # type: ignore[attr-defined]
