"""The supervisor: generations of worker processes over the same listening sockets.

Layer 4 (processes, on trio).

The sockets outlive the processes that serve them.  The supervisor holds
the listening sockets and never accepts on them; each worker is
``trio-activate serve`` itself, spawned with the sockets (``pass_fds``) and
a private variable naming them, from which it sets its own ``LISTEN_*``
first thing (``activator.settle_worker_environment``), then adopts them as
it would under systemd.  While no worker accepts (between generations, or
while one restarts), clients wait in the kernel's backlog: nothing is
refused, nothing is reset.

Spawning is ``subprocess.Popen`` (through ``trio.lowlevel.open_process``):
its fork and exec happen in C (``_posixsubprocess``), so no Python code runs
between fork and exec in this multi-threaded process.

Readiness: every worker gets the supervisor's private ``NOTIFY_SOCKET`` (an
abstract unix datagram socket with ``SO_PASSCRED``, so the kernel tells
which PID sent each message).  A worker counts as serving once it sends
``READY=1``; one that exits before, or is not ready within ``start-timeout``
seconds, failed to start.

A generation is N workers (``workers = N``).  A reload (SIGHUP, or a file
change under ``dev``) starts the next generation; once all its workers are
ready, the old generation gets SIGTERM and drains within its grace period.
If the new generation fails, it is stopped and the old one keeps serving.

A worker that dies while serving is restarted with exponential back-off
(``RESTART_BACKOFF_START`` doubling up to ``RESTART_BACKOFF_MAX``).  Before
any generation was ever ready, a failed start is retried
``START_ATTEMPTS`` times, then the supervisor gives up with exit status 1;
a worker that keeps dying at start after ``START_ATTEMPTS`` restarts also
stops the service (``dev`` never gives up: it waits for the next change).

Towards systemd (``NOTIFY_SOCKET`` set for the supervisor): ``READY=1`` when
the first generation is ready, ``RELOADING=1`` with ``MONOTONIC_USEC=`` when
a reload starts and ``READY=1`` when it ends (``Type=notify-reload``),
``STOPPING=1``, and ``WATCHDOG=1`` pings when ``WATCHDOG_USEC`` asks for
them.  The supervisor's PID never changes, so ``MAINPID`` stays right, and a
manager that cannot follow a main process it did not fork (systemd before
the pidfd hand-over) never has to: this is the mode generated units run.

The watchdog watches the workers' loops, not only the supervisor's: each
worker gets the same ``WATCHDOG_USEC`` and pings the supervisor's inbox,
and the supervisor pings the manager only while every serving worker of
the current generation has pinged within that period.  A worker whose loop
is stuck (a handler calling ``time.sleep``) so makes the manager act on
the service (``WatchdogSec=``: abort and restart), as it would for a
single process.

A reload's outcome also goes to whoever waits for it
(`~trio_activate.reload_outcome`: ``trio-activate reload --wait``, systemd
252's ``ExecReload=``).

Resource handling: the supervisor owns nothing but its notify socket and
its worker processes; the listening sockets belong to the caller (the CLI),
which closes them after ``run()`` returns.  Every worker is reaped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Mapping, Sequence
from functools import partial

import trio

from .notifier import Notifier
from .private_env import SUPERVISOR_VARIABLE
from .records import field, record
from .reload_outcome import announce_reload_outcome
from .spawn import NotifyInbox, WorkerCommand, spawn_worker
from .watchdog import serve_watchdog

__all__ = ["Supervisor"]

log = logging.getLogger("trio_activate")

START_ATTEMPTS = 5
# A worker's exit status for a usage, manifest, handler or activation error (cli.EXIT_ERROR).
EXIT_CONFIGURATION_ERROR = 2
RESTART_BACKOFF_START = 0.1
RESTART_BACKOFF_MAX = 10.0
# After SIGTERM a worker has its grace period to drain, and this much more to exit.
STOP_MARGIN = 5.0


@record(frozen=False, eq=False)
class Worker:
    process: trio.Process
    generation: int
    slot: int
    ready: bool = False
    stopping: bool = False
    exited: bool = False
    # trio.current_time() of its last READY=1 or WATCHDOG=1.
    last_ping: float = 0.0
    reported_stuck: bool = False

    @property
    def pid(self) -> int:
        return self.process.pid


@record(frozen=False, eq=False)
class Generation:
    number: int
    workers: list[Worker] = field(default_factory=list)

    def live(self) -> list[Worker]:
        return [w for w in self.workers if not w.exited]


class StartFailed(Exception):
    """A generation did not become ready; the message says why."""

    def __init__(self, message: str, *, worker_status: int | None = None) -> None:
        super().__init__(message)
        # The exit status of the worker that failed it; None for a timeout.
        self.worker_status = worker_status


class Supervisor:
    def __init__(
        self,
        command: WorkerCommand,
        *,
        workers: int,
        grace_period: float,
        start_timeout: float,
        notifier: Notifier | None = None,
        dev: bool = False,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.command = command
        self.worker_count = workers
        self.grace_period = grace_period
        self.start_timeout = start_timeout
        self.notifier = notifier if notifier is not None else Notifier(None)
        self.dev = dev
        self.environ = dict(os.environ if environ is None else environ)
        self.current: Generation | None = None
        self.generations_started = 0
        self.restarts = 0
        self.exit_status = 0
        self._workers_by_pid: dict[int, Worker] = {}
        self._changed = trio.Event()
        self._stop = trio.Event()
        self._stopping = False
        self._reload_lock = trio.Lock()
        self._nursery: trio.Nursery | None = None
        self._inbox: NotifyInbox | None = None

    # --- public --------------------------------------------------------------

    async def run(
        self, *, handle_signals: bool = True, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> int:
        """Start the first generation and supervise until stopped; return the exit status."""
        with NotifyInbox() as inbox:
            self._inbox = inbox
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._receive_notifications)
                # The service manager watches the supervisor (its MAINPID); the
                # supervisor vouches for its workers' loops.
                await nursery.start(partial(serve_watchdog, self.notifier, healthy=self._workers_healthy))
                if handle_signals:
                    await nursery.start(self._watch_signals)
                if not await self._start_first_generation():
                    nursery.cancel_scope.cancel()
                    return self.exit_status
                task_status.started()
                await self._stop.wait()
                await self._stop_everything()
                nursery.cancel_scope.cancel()
        return self.exit_status

    def stop(self) -> None:
        self._stop.set()

    async def reload(self, reason: str) -> bool:
        """Start the next generation; once it is ready, stop the current one.  True if it took over.

        How it ended also goes to a waiting ``trio-activate reload --wait``.
        """
        if self._stopping:
            announce_reload_outcome(False, "the service is stopping")
            return False
        async with self._reload_lock:
            started = time.monotonic()
            log.info("reload (%s): starting generation %d", reason, self.generations_started + 1)
            self.notifier.reloading()
            try:
                new = await self._start_generation()
            except StartFailed as exc:
                if self._stopping:
                    announce_reload_outcome(False, "the service is stopping")
                    return False
                current = self.current.number if self.current else 0
                log.error("reload failed: %s; generation %d keeps serving", exc, current)
                status = f"Reload failed: {exc}; still serving generation {current}"
                self.notifier.ready(status)
                announce_reload_outcome(False, status)
                return False
            if self._stopping:
                # Ready just as the stop began: the shutdown stops it with the rest.
                announce_reload_outcome(False, "the service is stopping")
                return False
            old, self.current = self.current, new
            log.info("reloaded: generation %d serving in %.3fs", new.number, time.monotonic() - started)
            self.notifier.ready(self._status())
            announce_reload_outcome(True, self._status())
            if old is not None:
                assert self._nursery is not None
                self._nursery.start_soon(self._stop_generation, old)
            return True

    # --- generations ---------------------------------------------------------

    async def _start_first_generation(self) -> bool:
        delay = RESTART_BACKOFF_START
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                # Held so that a reload asked for meanwhile (SIGHUP) starts after this
                # generation is current and then replaces it, instead of racing it.
                async with self._reload_lock:
                    self.current = await self._start_generation()
            except StartFailed as exc:
                if self.dev:
                    log.error("%s; waiting for a change to try again", exc)
                    return await self._wait_for_first_dev_generation()
                if attempt == START_ATTEMPTS:
                    log.error("%s; giving up after %d attempts", exc, attempt)
                    # A worker's configuration error (it said why in one line: a
                    # handler that cannot be imported, sockets that do not match
                    # the manifest) is the supervisor's too: the same status tells
                    # the manager that restarting cannot help (the units'
                    # RestartPreventExitStatus=2).  Retried all the same, as an
                    # import can fail for a while (a database not up yet).
                    self.exit_status = 2 if exc.worker_status == EXIT_CONFIGURATION_ERROR else 1
                    return False
                log.error("%s; retrying in %.1fs", exc, delay)
                with trio.move_on_after(delay):
                    await self._stop.wait()
                if self._stop.is_set():
                    return False
                delay = min(delay * 2, RESTART_BACKOFF_MAX)
            else:
                break
        log.info(
            "ready: generation %d, %d worker(s)",
            self.current.number if self.current else 0,
            self.worker_count,
        )
        self.notifier.ready(self._status())
        return True

    async def _wait_for_first_dev_generation(self) -> bool:
        """dev: nothing serves yet; the file watcher's next reload starts the first generation."""
        while self.current is None:
            if self._stop.is_set():
                return False
            await self._wait_changed()
        self.notifier.ready(self._status())
        return True

    async def _start_generation(self) -> Generation:
        self.generations_started += 1
        generation = Generation(self.generations_started)
        try:
            for slot in range(self.worker_count):
                generation.workers.append(await self._spawn(generation.number, slot))
            with trio.move_on_after(self.start_timeout) as timeout:
                while not all(w.ready for w in generation.workers):
                    failed = [w for w in generation.workers if w.exited and not w.ready]
                    if failed:
                        worker = failed[0]
                        raise StartFailed(
                            f"generation {generation.number}: worker {worker.pid} exited with status "
                            f"{worker.process.returncode} before it was ready",
                            worker_status=worker.process.returncode,
                        )
                    await self._wait_changed()
            if timeout.cancelled_caught:
                raise StartFailed(
                    f"generation {generation.number}: "
                    f"not ready within start-timeout ({self.start_timeout:g}s)"
                )
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._stop_generation(generation)
            raise
        return generation

    async def _spawn(self, generation: int, slot: int) -> Worker:
        assert self._inbox is not None
        # The worker stops when this process dies (service_main).
        extra_env = {SUPERVISOR_VARIABLE: str(os.getpid())}
        interval = self.notifier.watchdog_interval
        if interval is not None:
            # The manager's own period (twice the ping interval): see the module docstring.
            extra_env["WATCHDOG_USEC"] = str(round(interval * 2 * 1_000_000))
        process = await spawn_worker(
            self.command,
            notify_socket=self._inbox.address,
            environ=self.environ,
            extra_env=extra_env,
            fresh_code=generation > 1,  # a reload: the code on disk now, not a cached .pyc
        )
        worker = Worker(process, generation, slot)
        self._workers_by_pid[worker.pid] = worker
        assert self._nursery is not None
        self._nursery.start_soon(self._reap, worker)
        if self._stopping:
            # Spawned (in a thread) while the shutdown collected its workers:
            # stop this one too, or the supervisor would wait for it forever.
            worker.stopping = True
            _signal(worker, signal.SIGTERM)
        log.debug("generation %d: started worker %d", generation, worker.pid)
        return worker

    async def _reap(self, worker: Worker) -> None:
        with trio.CancelScope(shield=True):
            # Shielded: a worker is always reaped, even while the supervisor is cancelled.
            status = await worker.process.wait()
        worker.exited = True
        self._workers_by_pid.pop(worker.pid, None)
        self._notify_changed()
        if worker.stopping or self._stopping:
            log.debug("worker %d exited with status %d", worker.pid, status)
            return
        if not worker.ready:
            return  # a failed start: the generation's start reports it
        if self.current is not None and worker in self.current.workers:
            log.warning(
                "worker %d (generation %d) died with status %s; restarting",
                worker.pid,
                worker.generation,
                _describe_status(status),
            )
            assert self._nursery is not None
            self._nursery.start_soon(self._restart_slot, worker)

    async def _restart_slot(self, dead: Worker) -> None:
        delay = RESTART_BACKOFF_START
        failures = 0
        generation = self.current
        if generation is None:
            return
        while generation is self.current and not self._stopping:
            await trio.sleep(delay)
            if generation is not self.current or self._stopping:
                return
            self.restarts += 1
            replacement = await self._spawn(dead.generation, dead.slot)
            generation.workers[generation.workers.index(dead)] = replacement
            with trio.move_on_after(self.start_timeout):
                while not replacement.ready and not replacement.exited:
                    await self._wait_changed()
            if replacement.ready:
                log.info("worker %d replaced worker %d", replacement.pid, dead.pid)
                return
            await self._stop_workers([replacement])
            failures += 1
            if failures >= START_ATTEMPTS and not self.dev:
                log.error("a worker failed to start %d times in a row; stopping the service", failures)
                self.exit_status = 1
                self.stop()
                return
            dead = replacement
            delay = min(delay * 2, RESTART_BACKOFF_MAX)

    async def _stop_generation(self, generation: Generation) -> None:
        await self._stop_workers(generation.workers)
        log.debug("generation %d stopped", generation.number)

    async def _stop_workers(self, workers: Sequence[Worker]) -> None:
        live = [w for w in workers if not w.exited]
        for worker in live:
            worker.stopping = True
            _signal(worker, signal.SIGTERM)
        deadline = trio.current_time() + self.grace_period + STOP_MARGIN
        with trio.move_on_at(deadline):
            while any(not w.exited for w in live):
                await self._wait_changed()
        for worker in live:
            if not worker.exited:
                log.warning("worker %d did not stop in time; killing it", worker.pid)
                _signal(worker, signal.SIGKILL)
        while any(not w.exited for w in live):
            await self._wait_changed()

    async def _stop_everything(self) -> None:
        self._stopping = True
        self.notifier.stopping()
        workers = [w for w in self._workers_by_pid.values() if not w.exited]
        log.info("stopping: %d worker(s) drain within %gs", len(workers), self.grace_period)
        with trio.CancelScope(shield=True):
            await self._stop_workers(workers)
        log.info("stopped")

    # --- notifications and signals -----------------------------------------

    async def _receive_notifications(self) -> None:
        inbox = self._inbox
        assert inbox is not None
        while True:
            pid, fields = await inbox.receive()
            worker = self._workers_by_pid.get(pid) if pid is not None else None
            if worker is None:
                continue
            if fields.get("READY") == "1" or fields.get("WATCHDOG") == "1":
                worker.last_ping = trio.current_time()
            if fields.get("READY") == "1" and not worker.ready:
                worker.ready = True
                log.debug("worker %d ready", worker.pid)
                self._notify_changed()

    def _workers_healthy(self) -> bool:
        """Whether every serving worker of the current generation pinged within the manager's period."""
        interval = self.notifier.watchdog_interval
        if interval is None or self.current is None:
            return True
        now = trio.current_time()
        healthy = True
        for worker in self.current.workers:
            if not worker.ready or worker.exited or worker.stopping:
                continue
            if now - worker.last_ping > 2 * interval:
                healthy = False
                if not worker.reported_stuck:
                    worker.reported_stuck = True
                    log.error(
                        "worker %d has not pinged the watchdog for %.1fs (its event loop is blocked); "
                        "no more watchdog pings to the service manager",
                        worker.pid,
                        now - worker.last_ping,
                    )
        return healthy

    async def _watch_signals(self, *, task_status: trio.TaskStatus[None]) -> None:
        wanted = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
        with trio.open_signal_receiver(*wanted) as signals:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, wanted)
            try:
                task_status.started()
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        assert self._nursery is not None
                        self._nursery.start_soon(self.reload, "SIGHUP")
                    elif not self._stop.is_set():
                        log.info("%s: stopping every worker gracefully", signal.Signals(signum).name)
                        self.stop()
                    elif signum == signal.SIGINT:
                        log.warning("second SIGINT: killing every worker")
                        for worker in list(self._workers_by_pid.values()):
                            _signal(worker, signal.SIGKILL)
            finally:
                signal.pthread_sigmask(signal.SIG_BLOCK, wanted)

    def _notify_changed(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _wait_changed(self) -> None:
        await self._changed.wait()

    def _status(self) -> str:
        generation = self.current
        if generation is None:
            return "Starting"
        pids = ", ".join(str(w.pid) for w in generation.workers)
        return f"Generation {generation.number}: {len(generation.workers)} worker(s) ({pids})"


def _signal(worker: Worker, signum: int) -> None:
    # The worker may have exited already (and been reaped): nothing to signal.
    with contextlib.suppress(ProcessLookupError):
        worker.process.send_signal(signum)


def _describe_status(status: int) -> str:
    if status < 0:
        return signal.Signals(-status).name
    return str(status)
