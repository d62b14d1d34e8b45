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
between fork and exec in this multi-threaded process.  It goes through a
`~trio_activate.processes.spawn.Spawner` (the real one unless another is
given): the state machine below knows a worker only as something it can
signal and wait for, and by the messages that reach its inbox, so its tests
drive it with scripted fake workers in virtual time
(``tests/test_supervisor_states.py``).

Readiness: every worker gets the supervisor's private ``NOTIFY_SOCKET`` (an
abstract unix datagram socket with ``SO_PASSCRED``, so the kernel tells
which PID sent each message).  A worker counts as serving once it sends
``READY=1``; one that exits before, or is not ready within ``start-timeout``
seconds, failed to start.  A worker that is not ready has served nothing: it
is stopped with SIGKILL, without a grace period (it would hold SIGTERM
pending until its start-up ended, a hung import never).  A worker that
cannot even be spawned (fork refused at ``RLIMIT_NPROC``, the interpreter
removed) is a failed start too, told in one line; the supervisor goes on.

A generation is N workers (``workers = N``).  A reload (SIGHUP, or a file
change under ``dev``) starts the next generation; once all its workers are
ready, the old generation gets SIGTERM and drains within its grace period.
If the new generation fails, it is stopped and the old one keeps serving.
Reloads never overlap: those asked for while one runs fold into one reload
that follows it (`PendingReload`).  A generation a reload replaced is
*retired*: a restart of one of its slots that was under way adds no worker
to it.

A worker that dies while serving is restarted in its slot after a back-off
that doubles each time the slot's worker dies within ``STABLE_AFTER``
seconds of its ``READY=1`` or fails to start (``RESTART_BACKOFF_START`` up
to ``RESTART_BACKOFF_MAX``), and starts over after one that served longer
or was killed or stopped from outside (SIGKILL: an operator, the OOM
killer; SIGTERM: an operator, shown by exit status 0 after its own
``STOPPING=1``; neither is a crash of its code); every death and every
failed attempt is one log line.  A restart that cannot spawn retries for
as long as that lasts; one whose worker fails to start ``START_ATTEMPTS``
times in a row stops the service (``dev`` never gives up).  Before any
generation was ever ready, a failed start is retried ``START_ATTEMPTS``
times, then the supervisor gives up with exit status 1; a stop asked for
meanwhile ends the start at once, never retried.

Liveness (``worker-timeout``): every worker gets ``WATCHDOG_USEC`` and so
pings the inbox (``WATCHDOG=1``) from its Trio loop, four times per
``worker-timeout``.  A serving worker silent for ``worker-timeout`` (its
loop is stuck: a handler calling ``time.sleep``, ``SIGSTOP``) is killed
with SIGKILL, in one error line, and its slot restarts.  Each worker
watches the supervisor through a pidfd and stops gracefully when it dies
(``service_main``).

Towards systemd (``NOTIFY_SOCKET`` set for the supervisor): ``READY=1`` when
the first generation is ready, ``RELOADING=1`` with ``MONOTONIC_USEC=`` when
a reload starts and ``READY=1`` when it ends (``Type=notify-reload``),
``STOPPING=1``, and ``WATCHDOG=1`` pings when ``WATCHDOG_USEC`` asks for
them.  The supervisor's PID never changes, so ``MAINPID`` stays right, and a
manager that cannot follow a main process it did not fork (systemd before
the pidfd hand-over) never has to: this is the mode generated units run.

The manager's watchdog watches the workers' loops, not only the
supervisor's: the workers ping at least twice per manager period, and the
supervisor pings the manager only while some serving worker of the current
generation has pinged within that period.  One stuck worker among others is
the supervisor's to replace (``worker-timeout``); when none pings, the
service as a whole is stuck (the one worker's loop blocked by a handler
calling ``time.sleep``), and the manager acts on it (``WatchdogSec=``:
abort and restart), as it would for a single process.

A reload's outcome also goes to whoever waits for it
(`~trio_activate.system.reload_outcome`: ``trio-activate reload --wait``, systemd
252's ``ExecReload=``).

Resource handling: the supervisor owns nothing but its notify socket and
its worker processes; the listening sockets belong to the caller (the CLI),
which closes them after ``run()`` returns.  Every worker is reaped.  Under
``dev`` a reload may change the sockets (``change_sockets``, a
`SocketChange`): the supervisor only says when, in one order.  The new
sockets are the change's until the new generation takes over (``abandon``
closes them if it does not); ``take_over`` moves them into the caller's
set and moves out the sockets the new generation does not serve, which
``release`` closes once every worker of the old generation has exited, so
the old generation drains on them.  The owner of each fd at each step is
the caller's to keep (``supervise_main.FollowManifest``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Protocol

import trio

from ..errors import ActivationError
from ..model.control import CONNECTIONS_FIELD, parse_connections
from ..model.manifest import DEFAULT_WORKER_TIMEOUT
from ..model.private_env import SUPERVISOR_VARIABLE
from ..model.records import field, record
from ..runtime.signals import watch_signals
from ..runtime.watchdog import serve_watchdog
from ..system.notifier import Notifier
from ..system.reload_outcome import announce_reload_outcome
from .spawn import ChildProcess, Inbox, ProcessSpawner, Spawner, WorkerCommand, stop_then_kill

__all__ = ["SocketChange", "Supervisor"]

log = logging.getLogger("trio_activate")

START_ATTEMPTS = 5
# A worker's exit status for a usage, manifest, handler or activation error (cli.EXIT_ERROR).
EXIT_CONFIGURATION_ERROR = 2
RESTART_BACKOFF_START = 0.1
RESTART_BACKOFF_MAX = 10.0
# A worker that served this long before it died resets its slot's back-off; one
# that died sooner doubles it (a crash loop), up to RESTART_BACKOFF_MAX.  As long
# as the longest back-off, so a slot in a crash loop is never restarted faster.
STABLE_AFTER = RESTART_BACKOFF_MAX
# After SIGTERM a worker has its grace period to drain, and this much more to exit.
STOP_MARGIN = 5.0
# A reload waits at most this long for the old generation to stop accepting.
STOP_ACCEPTING_WAIT = 2.0


@record(frozen=False, eq=False)
class Worker:
    process: ChildProcess
    generation: int
    slot: int
    ready: bool = False
    stopping: bool = False
    # It said STOPPING=1: it accepts no new connection (it drains what it has).
    stopped_accepting: bool = False
    exited: bool = False
    # trio.current_time() of its READY=1, and of its last READY=1 or WATCHDOG=1.
    ready_at: float = 0.0
    last_ping: float = 0.0
    # Killed for its silence (worker-timeout): its error line said so already.
    timed_out: bool = False
    # Its connections in flight per handler, as it last reported them (the status).
    connections: dict[str, int] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.process.pid


@record(frozen=False, eq=False)
class Generation:
    number: int
    workers: list[Worker] = field(default_factory=list)
    # Set once it is being stopped (replaced by a reload, or failed to start):
    # no worker may join it from then on.
    retired: bool = False
    # Each slot's last restart back-off.
    backoff: dict[int, float] = field(default_factory=dict)

    def live(self) -> list[Worker]:
        return [w for w in self.workers if not w.exited]

    def restart_delay(self, slot: int, served: float) -> float:
        """The back-off before restarting `slot`, whose worker died after serving `served` seconds."""
        previous = self.backoff.get(slot)
        if previous is None or served >= STABLE_AFTER:
            delay = RESTART_BACKOFF_START
        else:
            delay = min(previous * 2, RESTART_BACKOFF_MAX)
        self.backoff[slot] = delay
        return delay

    def back_off(self, slot: int, delay: float) -> float:
        """After a failed restart of `slot` that waited `delay`: the next, longer wait."""
        self.backoff[slot] = min(delay * 2, RESTART_BACKOFF_MAX)
        return self.backoff[slot]


class StartFailed(Exception):
    """A generation did not become ready; the message says why."""

    def __init__(
        self,
        message: str,
        *,
        generation: int,
        worker_status: int | None = None,
        worker_pid: int | None = None,
    ) -> None:
        super().__init__(message)
        self.generation = generation
        # The exit status of the worker that failed it; None for a timeout.
        self.worker_status = worker_status
        self.worker_pid = worker_pid

    def about(self) -> dict[str, int]:
        """``extra=`` for the line that logs it."""
        fields = {"generation": self.generation}
        if self.worker_pid is not None:
            fields["worker_pid"] = self.worker_pid
        return fields


class SpawnFailed(StartFailed):
    """A worker process could not even be created (no process to spare, the interpreter gone)."""


@record(frozen=False, eq=False)
class PendingReload:
    """A reload asked for while another runs: every request meanwhile waits for this one's outcome."""

    done: trio.Event = field(default_factory=trio.Event)
    taken_over: bool = False


class SocketChange(Protocol):
    """A reload's change to the listening sockets (``dev`` following its manifest).

    Made by the supervisor's ``change_sockets`` before the new generation
    starts, with the new sockets it owns until one of these is called:
    """

    def abandon(self) -> None:
        """The new generation did not take over: close the sockets made for it; nothing changed."""

    def take_over(self) -> None:
        """The new generation took over: the new sockets join the current set, and the ones it
        no longer serves (removed, replaced) leave it, still open for the old generation."""

    def release(self) -> None:
        """Every worker of the old generation has exited: close the sockets that left the set."""


class Supervisor:
    def __init__(
        self,
        command: WorkerCommand,
        *,
        workers: int,
        grace_period: float,
        start_timeout: float,
        worker_timeout: float = DEFAULT_WORKER_TIMEOUT,
        notifier: Notifier | None = None,
        dev: bool = False,
        environ: Mapping[str, str] | None = None,
        spawner: Spawner | None = None,
        change_sockets: Callable[[int], SocketChange | None] | None = None,
    ) -> None:
        """``spawner``: how workers start and report; by default ``command`` run as a
        process with ``environ`` (`ProcessSpawner`).  A test gives a scripted fake.

        ``change_sockets`` (``dev``): called as each reload begins, with the new
        generation's number, before its first worker is spawned; it makes the
        sockets the manifest on disk asks for, sees that the spawner hands them
        to that generation's workers, and returns the `SocketChange`, or None
        when the sockets stay as they are.  An ``ActivationError`` it raises
        (one line: the manifest, a port in use) fails the reload, nothing
        changed.  Without it every generation serves the sockets it began with.
        """
        self.worker_count = workers
        self.grace_period = grace_period
        self.start_timeout = start_timeout
        self.worker_timeout = worker_timeout
        self.notifier = notifier if notifier is not None else Notifier(None)
        self.dev = dev
        if spawner is None:
            spawner = ProcessSpawner(command, dict(os.environ if environ is None else environ))
        self.spawner = spawner
        self.change_sockets = change_sockets
        self.current: Generation | None = None
        self.generations_started = 0
        self.exit_status = 0
        self._workers_by_pid: dict[int, Worker] = {}
        self._changed = trio.Event()
        self._stop = trio.Event()
        self._stopping = False
        self._reload_lock = trio.Lock()
        # The reload that follows the one under way, once asked for.
        self._pending_reload: PendingReload | None = None
        # While the first generation starts: cancelled by stop(), which need not wait for it.
        self._first_start: trio.CancelScope | None = None
        # Whether WATCHDOG=1 is withheld from the manager (logged once per stall).
        self._withholding = False
        self._nursery: trio.Nursery | None = None
        self._inbox: Inbox | None = None
        # Set once the first generation serves.
        self.serving = trio.Event()
        # Called with each reload's outcome, besides a waiting `reload --wait` (the control socket).
        self.on_reload_outcome: Callable[[bool, str], object] | None = None

    # --- public --------------------------------------------------------------

    async def run(
        self, *, handle_signals: bool = False, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> int:
        """Start the first generation and supervise until stopped; return the exit status.

        ``handle_signals`` (``trio-activate serve`` with workers, ``dev``): SIGTERM and
        SIGINT stop every worker gracefully, a second SIGINT kills them, SIGHUP reloads.
        """
        with self.spawner.open_inbox() as inbox:
            self._inbox = inbox
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._receive_notifications)
                nursery.start_soon(self._watch_liveness)
                # The service manager watches the supervisor (its MAINPID); the
                # supervisor vouches for its workers' loops.
                await nursery.start(partial(serve_watchdog, self.notifier, healthy=self._workers_healthy))
                if handle_signals:
                    await nursery.start(self._watch_signals)
                if not await self._start_first_generation():
                    nursery.cancel_scope.cancel()
                    return self.exit_status
                self.serving.set()
                task_status.started()
                await self._stop.wait()
                await self._stop_everything()
                nursery.cancel_scope.cancel()
        return self.exit_status

    async def wait_stop(self) -> None:
        """Return once a stop was asked for."""
        await self._stop.wait()

    def workers(self) -> list[Worker]:
        """The live workers, oldest generation first."""
        live = [w for w in self._workers_by_pid.values() if not w.exited]
        return sorted(live, key=lambda w: (w.generation, w.slot, w.pid))

    @property
    def reloading(self) -> bool:
        """Whether a reload is under way or asked for."""
        return self._reload_lock.locked() or self._pending_reload is not None

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def stop(self) -> None:
        self._stop.set()
        if self._first_start is not None:
            # A first generation still starting has served nothing: stopped now,
            # not at the end of its start-timeout, and never retried.
            self._first_start.cancel()
        # Whoever waits for a change (the dev supervisor waiting for its first
        # generation) must see the stop too.
        self._notify_changed()

    async def reload(self, reason: str) -> bool:
        """Start the next generation; once it is ready, stop the current one.  True if it took over.

        Reloads asked for while one runs fold into one that follows it, which
        starts the code on disk then, with every change they asked for; each
        returns its outcome.  How it ended also goes to a waiting
        ``trio-activate reload --wait``.
        """
        if self._stop.is_set():
            self._tell(False, "the service is stopping")
            return False
        pending = self._pending_reload
        if pending is not None:
            log.debug("reload (%s): folded into the reload that follows the one under way", reason)
            await pending.done.wait()
            return pending.taken_over
        pending = self._pending_reload = PendingReload()
        if self._reload_lock.locked():
            log.info("reload (%s): follows the one under way", reason)
        try:
            async with self._reload_lock:
                # From here on, a reload asked for is one more, to follow this one.
                self._pending_reload = None
                pending.taken_over = await self._reload_once(reason)
        finally:
            if self._pending_reload is pending:
                # Cancelled before it could run: the service stops.
                self._pending_reload = None
                self._tell(False, "the service is stopping")
            pending.done.set()
        return pending.taken_over

    async def _reload_once(self, reason: str) -> bool:
        if self._stop.is_set():
            self._announce(False, "the service is stopping")
            return False
        started = time.monotonic()
        log.info(
            "reload (%s): starting generation %d",
            reason,
            self.generations_started + 1,
            extra=_about(self.generations_started + 1),
        )
        self.notifier.reloading()
        change: SocketChange | None = None
        try:
            change = self._change_sockets(self.generations_started + 1)
            new = await self._start_generation()
        except BaseException as exc:
            if change is not None:
                change.abandon()
            if not isinstance(exc, StartFailed):
                raise
            if self._stop.is_set():
                self._announce(False, "the service is stopping")
                return False
            current = self.current.number if self.current else 0
            log.error("reload failed: %s; generation %d keeps serving", exc, current, extra=exc.about())
            status = f"Reload failed: {exc}; still serving generation {current}"
            self.notifier.ready(status)
            self._announce(False, status)
            return False
        if self._stop.is_set():
            # Ready just as the stop began: the shutdown stops it with the rest.
            if change is not None:
                change.abandon()
            self._announce(False, "the service is stopping")
            return False
        old, self.current = self.current, new
        if change is not None:
            change.take_over()
            if old is None:
                change.release()  # nothing served the sockets that left (dev's first start failed)
        # A change: dev's wait for its first generation ends on it.
        self._notify_changed()
        if old is not None:
            # Retired now, before anything else runs: a restart of one of its
            # slots that is under way must not add a worker to it any more.
            old.retired = True
            log.debug(
                "reload: generation %d ready; generation %d stops accepting",
                new.number,
                old.number,
                extra=_about(old.number),
            )
            # The outcome is told once the old code takes no new connection, so that
            # whoever waits for the reload (systemctl reload) then reaches the new code.
            await self._stop_accepting(old)
            log.debug("reload: generation %d accepts no more", old.number, extra=_about(old.number))
        log.info(
            "reloaded: generation %d serving in %.3fs",
            new.number,
            time.monotonic() - started,
            extra=_about(new.number),
        )
        self.notifier.ready(self._status())
        self._announce(True, self._status())
        if old is not None:
            assert self._nursery is not None
            self._nursery.start_soon(self._stop_replaced_generation, old, change)
        return True

    def _change_sockets(self, generation: int) -> SocketChange | None:
        if self.change_sockets is None:
            return None
        try:
            return self.change_sockets(generation)
        except ActivationError as exc:
            # Its number is spent, as a generation's that failed to start: the log names each once.
            self.generations_started = generation
            raise StartFailed(f"generation {generation}: {exc}", generation=generation) from exc

    async def _stop_replaced_generation(self, old: Generation, change: SocketChange | None) -> None:
        """Stop the generation a reload replaced, then close the sockets only it served."""
        try:
            await self._stop_generation(old)
        finally:
            if change is not None:
                change.release()

    async def _stop_accepting(self, generation: Generation) -> None:
        """SIGTERM to `generation`; wait until each of its workers said ``STOPPING=1`` (it accepts no
        more) or exited, for at most ``STOP_ACCEPTING_WAIT`` seconds (a stuck worker is no reason to
        hold the reload: `_stop_generation` deals with it)."""
        live = [w for w in generation.workers if not w.exited]
        for worker in live:
            worker.stopping = True
            _signal(worker, signal.SIGTERM)
        with trio.move_on_after(STOP_ACCEPTING_WAIT):
            while any(not (w.exited or w.stopped_accepting) for w in live):
                await self._wait_changed()

    def _announce(self, taken_over: bool, status: str) -> None:
        # With a reload to follow, that one answers: a waiter listening now may
        # have sent its SIGHUP after this reload began, so this reload's code
        # need not have what it asked for.  The follower always answers.
        if self._pending_reload is None:
            self._tell(taken_over, status)

    def _tell(self, taken_over: bool, status: str) -> None:
        announce_reload_outcome(taken_over, status)
        if self.on_reload_outcome is not None:
            self.on_reload_outcome(taken_over, status)

    # --- generations ---------------------------------------------------------

    async def _start_first_generation(self) -> bool:
        delay = RESTART_BACKOFF_START
        for attempt in range(1, START_ATTEMPTS + 1):
            if self._stop.is_set():
                return False
            failure: StartFailed | None = None
            with trio.CancelScope() as self._first_start:
                try:
                    # Held so that a reload asked for meanwhile (SIGHUP) starts after this
                    # generation is current and then replaces it, instead of racing it.
                    async with self._reload_lock:
                        self.current = await self._start_generation()
                except StartFailed as exc:
                    failure = exc
            self._first_start = None
            if self.current is not None:
                break  # serving; a stop asked for meanwhile follows in run()
            if failure is None or self._stop.is_set():
                return False  # stopped while it started
            if self.dev:
                log.error("%s; waiting for a change to try again", failure, extra=failure.about())
                return await self._wait_for_first_dev_generation()
            if failure.worker_status == EXIT_CONFIGURATION_ERROR:
                # A worker's configuration error (it said why in one line: a
                # handler that cannot be imported, sockets that do not match
                # the manifest) is the supervisor's too, at once: another
                # attempt would run the same files and print the same line,
                # and the same status tells the manager that restarting cannot
                # help (the units' RestartPreventExitStatus=2).  Not an error
                # line of its own: the worker's line is the one that says why.
                log.info("%s: a configuration error; stopping", failure, extra=failure.about())
                self.exit_status = EXIT_CONFIGURATION_ERROR
                return False
            if attempt == START_ATTEMPTS:
                log.error("%s; giving up after %d attempts", failure, attempt, extra=failure.about())
                self.exit_status = 1
                return False
            log.error("%s; retrying in %.1fs", failure, delay, extra=failure.about())
            with trio.move_on_after(delay):
                await self._stop.wait()
            delay = min(delay * 2, RESTART_BACKOFF_MAX)
        number = self.current.number if self.current else 0
        log.info("ready: generation %d, %d worker(s)", number, self.worker_count, extra=_about(number))
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
                    # Also one that was ready and died: nothing would restart it,
                    # as its generation is not current yet.
                    failed = [w for w in generation.workers if w.exited]
                    if failed:
                        worker = failed[0]
                        raise StartFailed(
                            f"generation {generation.number}: worker {worker.pid} exited with status "
                            f"{worker.process.returncode} before "
                            + ("the generation was ready" if worker.ready else "it was ready"),
                            generation=generation.number,
                            worker_status=worker.process.returncode,
                            worker_pid=worker.pid,
                        )
                    await self._wait_changed()
            if timeout.cancelled_caught:
                raise StartFailed(
                    f"generation {generation.number}: "
                    f"not ready within start-timeout ({self.start_timeout:g}s)",
                    generation=generation.number,
                )
            log.debug(
                "generation %d: all %d worker(s) ready",
                generation.number,
                len(generation.workers),
                extra=_about(generation.number),
            )
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._stop_generation(generation)
            raise
        return generation

    async def _spawn(self, generation: int, slot: int) -> Worker:
        assert self._inbox is not None
        # A worker pings at half of WATCHDOG_USEC: four pings per worker-timeout,
        # and at least two per period of the manager's own watchdog (twice our
        # interval) when there is one.  See the module docstring.
        # Capped at a day: WATCHDOG_USEC must stay below 2**64-1 for any worker-timeout.
        period = min(self.worker_timeout / 2, 86_400.0)
        interval = self.notifier.watchdog_interval
        if interval is not None:
            period = min(period, interval * 2)
        extra_env = {
            "WATCHDOG_USEC": str(max(1, round(period * 1_000_000))),
            # The worker stops when this process dies (service_main).
            SUPERVISOR_VARIABLE: str(os.getpid()),
        }
        try:
            process = await self.spawner.spawn(
                generation, slot, notify_socket=self._inbox.address, extra_env=extra_env
            )
        except (OSError, RuntimeError) as exc:
            # fork refused (EAGAIN at RLIMIT_NPROC), the interpreter gone (ENOENT:
            # a virtualenv removed under us), no thread left to fork from
            # (RuntimeError): this worker cannot start, but what serves goes on.
            raise SpawnFailed(
                f"generation {generation}: cannot start a worker: {exc}", generation=generation
            ) from exc
        worker = Worker(process, generation, slot)
        self._workers_by_pid[worker.pid] = worker
        assert self._nursery is not None
        self._nursery.start_soon(self._reap, worker)
        if self._stopping:
            # Spawned (in a thread) while the shutdown collected its workers:
            # stop this one too, or the supervisor would wait for it forever.
            worker.stopping = True
            _signal(worker, signal.SIGTERM)
        log.debug(
            "generation %d: started worker %d", generation, worker.pid, extra=_about(generation, worker)
        )
        return worker

    async def _reap(self, worker: Worker) -> None:
        with trio.CancelScope(shield=True):
            # Shielded: a worker is always reaped, even while the supervisor is cancelled.
            status = await worker.process.wait()
        worker.exited = True
        self._workers_by_pid.pop(worker.pid, None)
        self._notify_changed()
        if worker.stopping or self._stopping:
            log.debug("worker %d exited with status %d", worker.pid, status, extra=_about(worker=worker))
            return
        if not worker.ready:
            return  # a failed start: the generation's start reports it
        generation = self.current
        if generation is None or worker not in generation.workers:
            return  # of a generation still starting: its start reports it
        served = trio.current_time() - worker.ready_at
        killed = status == -signal.SIGKILL and not worker.timed_out
        stopped = status == 0 and worker.stopped_accepting
        if killed or stopped:
            # Killed or stopped from outside (an operator's kill -9 or kill, the OOM
            # killer): no crash of its code, which started and served.  A growing
            # back-off here would leave the socket with fewer workers, at times none,
            # for as long as the kills go on; a code that crashes on its own (an
            # exit, SIGSEGV, SIGABRT) still backs off, and one that no longer starts
            # backs off as a failed start.
            served = STABLE_AFTER
        delay = generation.restart_delay(worker.slot, served)
        if worker.timed_out:
            log.debug("worker %d killed; restarting in %gs", worker.pid, delay, extra=_about(worker=worker))
        elif stopped:
            log.info(
                "worker %d (generation %d) stopped after %.1fs serving, not asked by the supervisor; "
                "restarting in %gs",
                worker.pid,
                worker.generation,
                trio.current_time() - worker.ready_at,
                delay,
                extra=_about(worker=worker),
            )
        else:
            log.warning(
                "worker %d (generation %d) died with status %s after %.1fs serving; restarting in %gs",
                worker.pid,
                worker.generation,
                _describe_status(status),
                trio.current_time() - worker.ready_at,
                delay,
                extra=_about(worker=worker),
            )
        assert self._nursery is not None
        self._nursery.start_soon(self._restart_slot, generation, worker, delay)

    async def _restart_slot(self, generation: Generation, dead: Worker, delay: float) -> None:
        failures = 0
        while True:
            await trio.sleep(delay)
            if generation.retired or self._stop.is_set():
                return
            try:
                replacement = await self._spawn(generation.number, dead.slot)
            except SpawnFailed as exc:
                # The machine's fault (no process to spare, the interpreter gone),
                # not the code's: retried as long as it lasts, each attempt logged.
                delay = generation.back_off(dead.slot, delay)
                log.error(
                    "%s (to replace worker %d); retrying in %gs",
                    exc,
                    dead.pid,
                    delay,
                    extra=_about(generation.number, dead),
                )
                continue
            if generation.retired:
                # Replaced by a reload while this worker was being spawned: it would
                # serve the old code beside the new generation.  It served nothing.
                replacement.stopping = True
                _signal(replacement, signal.SIGKILL)
                return
            generation.workers[generation.workers.index(dead)] = replacement
            with trio.move_on_after(self.start_timeout) as waited:
                while not replacement.ready and not replacement.exited:
                    await self._wait_changed()
            if replacement.ready:
                log.info(
                    "worker %d replaced worker %d",
                    replacement.pid,
                    dead.pid,
                    extra=_about(generation.number, replacement),
                )
                return
            if replacement.stopping:
                return  # its generation stops (a reload, the shutdown)
            await self._stop_workers([replacement])
            failures += 1
            if waited.cancelled_caught:
                why = f"was not ready within start-timeout ({self.start_timeout:g}s)"
            else:
                why = f"exited with status {replacement.process.returncode} before it was ready"
            if failures >= START_ATTEMPTS and not self.dev:
                log.error(
                    "worker %d %s; a worker failed to start %d times in a row; stopping the service",
                    replacement.pid,
                    why,
                    failures,
                    extra=_about(generation.number, replacement),
                )
                # The worker's configuration error (it could not import the code
                # on disk) is the service's: 2 tells the manager not to restart it.
                failed_with = replacement.process.returncode
                self.exit_status = EXIT_CONFIGURATION_ERROR if failed_with == EXIT_CONFIGURATION_ERROR else 1
                self.stop()
                return
            delay = generation.back_off(dead.slot, delay)
            log.error(
                "worker %d (generation %d) %s; retrying in %gs",
                replacement.pid,
                generation.number,
                why,
                delay,
                extra=_about(generation.number, replacement),
            )
            dead = replacement

    async def _stop_generation(self, generation: Generation) -> None:
        generation.retired = True
        live = [w.pid for w in generation.workers if not w.exited]
        if live:
            log.debug(
                "generation %d stopping: worker(s) %s drain within %gs",
                generation.number,
                ", ".join(map(str, live)),
                self.grace_period,
                extra=_about(generation.number),
            )
        await self._stop_workers(generation.workers)
        log.debug("generation %d stopped", generation.number, extra=_about(generation.number))

    async def _stop_workers(self, workers: Sequence[Worker]) -> None:
        live = [w for w in workers if not w.exited]
        first: dict[int, int | None] = {}
        for worker in live:
            if worker.stopping:
                # Signalled already (a reload's _stop_accepting, a spawn during the stop).
                first[worker.pid] = None
                continue
            worker.stopping = True
            # One not ready has served nothing: no grace period for it (and until
            # its handlers' import begins, it would hold SIGTERM pending).
            first[worker.pid] = signal.SIGTERM if worker.ready else signal.SIGKILL
        await stop_then_kill(
            [w.process for w in live],
            self.grace_period + STOP_MARGIN,
            first_signal=lambda process: first[process.pid],
            on_kill=lambda process: log.warning(
                "worker %d did not stop in time; killing it",
                process.pid,
                extra={"worker_pid": process.pid},
            ),
        )

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
            if CONNECTIONS_FIELD in fields:
                worker.connections = parse_connections(fields[CONNECTIONS_FIELD])
            if fields.get("STOPPING") == "1" and not worker.stopped_accepting:
                worker.stopped_accepting = True
                self._notify_changed()
            if fields.get("READY") == "1" and not worker.ready:
                worker.ready = True
                worker.ready_at = worker.last_ping
                log.debug("worker %d ready", worker.pid, extra=_about(worker=worker))
                self._notify_changed()

    def _workers_healthy(self) -> bool:
        """Whether the current generation serves: one of its workers pinged within the manager's period.

        One stuck worker among others is the supervisor's to replace (worker-timeout);
        when none pings, the service as a whole is stuck, and the manager acts.
        """
        interval = self.notifier.watchdog_interval
        if interval is None or self.current is None:
            return True
        now = trio.current_time()
        serving = [w for w in self.current.workers if w.ready and not w.exited and not w.stopping]
        if not serving or any(now - w.last_ping <= 2 * interval for w in serving):
            self._withholding = False
            return True
        if not self._withholding:
            self._withholding = True
            log.error(
                "the service has not pinged the watchdog for %.1fs: no worker of generation %d did "
                "(their event loops are blocked); no more watchdog pings to the service manager",
                now - max(w.last_ping for w in serving),
                self.current.number,
                extra=_about(self.current.number),
            )
        return False

    async def _watch_liveness(self) -> None:
        """Kill a serving worker whose event loop has been silent for worker-timeout; its slot restarts."""
        period = self.worker_timeout / 10
        last_check = trio.current_time()
        while True:
            await trio.sleep(period)
            now = trio.current_time()
            late = now - last_check > 2 * period
            last_check = now
            if late:
                # This loop was stalled (or the machine slept): the pings that
                # waited in the inbox meanwhile are read before anyone is judged.
                continue
            for worker in list(self._workers_by_pid.values()):
                if not worker.ready or worker.exited or worker.stopping or worker.timed_out:
                    continue
                if now - worker.last_ping > self.worker_timeout:
                    worker.timed_out = True
                    log.error(
                        "worker %d (generation %d) has not pinged for %.1fs, over worker-timeout (%gs): "
                        "its event loop is stuck; killing it",
                        worker.pid,
                        worker.generation,
                        now - worker.last_ping,
                        self.worker_timeout,
                        extra=_about(worker=worker),
                    )
                    _signal(worker, signal.SIGKILL)

    async def _watch_signals(self, *, task_status: trio.TaskStatus[None]) -> None:
        await watch_signals(
            stop=self.stop,
            stopping="stopping every worker gracefully",
            stop_asked=self._stop.is_set,
            cancel=self._kill_every_worker,
            cancelling="killing every worker",
            reload=self._start_reload,
            task_status=task_status,
        )

    def _start_reload(self) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(self.reload, "SIGHUP")

    def _kill_every_worker(self) -> None:
        for worker in list(self._workers_by_pid.values()):
            _signal(worker, signal.SIGKILL)

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


def _about(generation: int | None = None, worker: Worker | None = None) -> dict[str, int]:
    """``extra=`` for a line about a generation or a worker: fields of their own in JSON logs."""
    fields = {}
    if worker is not None:
        fields["generation"] = worker.generation
        fields["worker_pid"] = worker.pid
    if generation is not None:
        fields["generation"] = generation
    return fields


def _signal(worker: Worker, signum: int) -> None:
    # The worker may have exited already (and been reaped): nothing to signal.
    with contextlib.suppress(ProcessLookupError):
        worker.process.send_signal(signum)


def _describe_status(status: int) -> str:
    if status < 0:
        return signal.Signals(-status).name
    return str(status)
