"""The supervisor's state machine, in-process: reloads, restarts and their back-off, failures, races.

The supervisor is given a scripted `FakeSpawner` (its `Spawner` parameter)
instead of real processes: each fake worker is a Trio task that becomes
ready, pings, dies with a given status, says ``STOPPING=1`` on SIGTERM, or
hangs, as its `Script` says, and reports to a fake inbox exactly the
messages a real worker sends (``READY=1``, ``STOPPING=1``, ``WATCHDOG=1``,
each with its PID).  Signals are delivered to the fake, which reacts as a
worker does: SIGKILL ends it at once (status -9), SIGTERM drains it.  Time
is pytest-trio's ``autojump_clock`` (``MockClock(autojump_threshold=0)``),
as trio tests its own listeners: back-offs of seconds and a 30 s
worker-timeout cost nothing, and every delay is exact.

The same behaviour is tested end to end, with real processes, in
``test_supervisor.py``; these tests reach the orderings that real
processes make rare (a restart under way as a reload takes over) and
check each delay to the millisecond.
"""

from __future__ import annotations

import itertools
import logging
import math
import signal
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing

from trio_activate.errors import ActivationError
from trio_activate.processes import supervisor as supervisor_module
from trio_activate.processes.spawn import WorkerCommand
from trio_activate.processes.supervisor import Supervisor

COMMAND = WorkerCommand(["a fake worker: the spawner ignores the command"], [])
GRACE = 5.0
START_TIMEOUT = 10.0


# --- the fake workers ----------------------------------------------------------


@dataclass
class Script:
    """What one fake worker does, from its spawn on."""

    # Seconds from spawn to READY=1 (a worker importing its handlers).
    start: float = 0.5
    # Exit with this status at `start` instead of becoming ready (2: a handler that does not import).
    fails_with: int | None = None
    # Never ready, never exits on its own (a hung import).
    hangs: bool = False
    # After READY=1, exit with `status` this much later (a crash); None: serve until signalled.
    dies_after: float | None = None
    status: int = 3
    # WATCHDOG=1 at half of WATCHDOG_USEC while serving, as a worker's loop does; False: its loop is stuck.
    pings: bool = True
    # On SIGTERM: STOPPING=1, then exit 0 this much later (it drains).
    drain: float = 0.5
    # The spawn itself fails (fork refused, the interpreter gone).
    spawn_error: OSError | None = None
    # The spawn returns only once this is set (a spawn that takes long, in a thread).
    spawn_held_until: trio.Event | None = None


class FakeWorker:
    """A worker as the supervisor sees it: a PID, signals, an exit status to wait for, messages."""

    def __init__(
        self,
        spawner: FakeSpawner,
        pid: int,
        generation: int,
        slot: int,
        script: Script,
        env: Mapping[str, str],
    ) -> None:
        self.spawner = spawner
        self.pid = pid
        self.generation = generation
        self.slot = slot
        self.script = script
        self.env = dict(env)
        self.returncode: int | None = None
        self.signals: list[int] = []
        self.signalled_at: list[float] = []
        self.spawned_at = trio.current_time()
        self.ready_at: float | None = None
        self.exited_at: float | None = None
        self._exited = trio.Event()
        self._sigterm = trio.Event()
        self._killed = trio.CancelScope()

    def __repr__(self) -> str:
        return f"<worker {self.pid} gen {self.generation} slot {self.slot} rc {self.returncode}>"

    # The process interface (spawn.ChildProcess).

    def send_signal(self, signum: int) -> None:
        if self.returncode is not None:
            return  # as trio.Process: an exited and reaped child gets nothing
        self.signals.append(signum)
        self.signalled_at.append(trio.current_time())
        if signum == signal.SIGKILL:
            self._killed.cancel()
        elif signum == signal.SIGTERM:
            self._sigterm.set()

    async def wait(self) -> int:
        await self._exited.wait()
        assert self.returncode is not None
        return self.returncode

    # Its life.

    def say(self, **fields: str) -> None:
        self.spawner.inbox_send.send_nowait((self.pid, dict(fields)))

    async def run(self) -> None:
        status = -signal.SIGKILL
        try:
            with self._killed:
                status = await self._live()
        finally:
            # Cancelled (a test that failed ends every worker): as if killed.
            self.returncode = status
            self.exited_at = trio.current_time()
            self._exited.set()

    async def _live(self) -> int:
        script = self.script
        if script.hangs:
            await trio.sleep_forever()
        # SIGTERM during start-up waits, as a real worker holds it pending.
        await trio.sleep(script.start)
        if script.fails_with is not None:
            return script.fails_with
        self.say(READY="1", STATUS="Serving")
        self.ready_at = trio.current_time()
        async with trio.open_nursery() as nursery:
            if script.pings:
                nursery.start_soon(self._ping)
            lifetime = script.dies_after if script.dies_after is not None else math.inf
            with trio.move_on_after(lifetime) as lived:
                await self._sigterm.wait()
            if lived.cancelled_caught:
                nursery.cancel_scope.cancel()
                return script.status
            self.say(STOPPING="1")
            await trio.sleep(script.drain)
            nursery.cancel_scope.cancel()
        return 0

    async def _ping(self) -> None:
        period = int(self.env["WATCHDOG_USEC"]) / 1_000_000 / 2
        while True:
            await trio.sleep(period)
            self.say(WATCHDOG="1")


class FakeInbox:
    address = "@fake-inbox"

    def __init__(self, receive: trio.MemoryReceiveChannel[tuple[int, dict[str, str]]]) -> None:
        self._receive = receive

    async def receive(self) -> tuple[int | None, dict[str, str]]:
        return await self._receive.receive()


class FakeSpawner:
    """Spawns fake workers in `nursery`: the next ones follow `scripts` in order, then `default`."""

    def __init__(self, nursery: trio.Nursery, scripts: list[Script], default: Script) -> None:
        self.nursery = nursery
        self.scripts = scripts
        self.default = default
        self.workers: list[FakeWorker] = []
        self.spawn_errors = 0
        self.inbox_send, self._inbox_receive = trio.open_memory_channel[tuple[int, dict[str, str]]](math.inf)
        self._next_pid = 1000

    @contextmanager
    def open_inbox(self) -> Iterator[FakeInbox]:
        yield FakeInbox(self._inbox_receive)

    async def spawn(
        self, generation: int, slot: int, *, notify_socket: str, extra_env: Mapping[str, str]
    ) -> FakeWorker:
        assert notify_socket == FakeInbox.address
        script = self.scripts.pop(0) if self.scripts else self.default
        if script.spawn_held_until is not None:
            await script.spawn_held_until.wait()
        else:
            await trio.lowlevel.checkpoint()
        if script.spawn_error is not None:
            self.spawn_errors += 1
            raise script.spawn_error
        self._next_pid += 1
        worker = FakeWorker(self, self._next_pid, generation, slot, script, extra_env)
        self.workers.append(worker)
        self.nursery.start_soon(worker.run)
        return worker

    def of(self, generation: int) -> list[FakeWorker]:
        return [w for w in self.workers if w.generation == generation]

    def live(self) -> list[FakeWorker]:
        return [w for w in self.workers if w.returncode is None]


@dataclass
class Running:
    supervisor: Supervisor
    spawner: FakeSpawner
    done: trio.Event = field(default_factory=trio.Event)
    status: int | None = None

    async def stopped(self) -> int:
        """Stop the supervisor and wait for it; its exit status."""
        self.supervisor.stop()
        return await self.ended()

    async def ended(self) -> int:
        """Wait (in virtual time: at most ten minutes) for the supervisor to return; its exit status."""
        with trio.fail_after(600):
            await self.done.wait()
        assert self.status is not None
        return self.status

    async def until(self, condition: Callable[[], bool]) -> None:
        """Wait (in virtual time: at most a minute) until `condition()` holds."""
        with trio.fail_after(60):
            # Polling costs nothing in virtual time, and reads like the condition it waits for.
            while not condition():  # noqa: ASYNC110
                await trio.sleep(0.001)

    async def spawned(self, count: int) -> None:
        """Wait until `count` workers were spawned, in all."""
        await self.until(lambda: len(self.spawner.workers) >= count)


@asynccontextmanager
async def supervising(
    *scripts: Script, default: Script | None = None, workers: int = 1, ready: bool = True, **options: object
) -> AsyncIterator[Running]:
    """A supervisor over a fake spawner, running; stopped on the way out, and every fake worker gone."""
    async with trio.open_nursery() as workers_nursery:
        spawner = FakeSpawner(workers_nursery, list(scripts), default or Script())
        supervisor = Supervisor(
            COMMAND,
            workers=workers,
            grace_period=GRACE,
            start_timeout=START_TIMEOUT,
            spawner=spawner,
            **options,  # type: ignore[arg-type]
        )
        running = Running(supervisor, spawner)

        async def run() -> None:
            running.status = await supervisor.run()
            running.done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            try:
                if ready:
                    await running.until(lambda: supervisor.current is not None or running.done.is_set())
                yield running
            except BaseException:
                # A failed assertion: end the supervisor and every worker now, the error shows.
                nursery.cancel_scope.cancel()
                workers_nursery.cancel_scope.cancel()
                raise
            await running.stopped()
        # Every worker was stopped and reaped before run() returned.
        assert spawner.live() == []
        workers_nursery.cancel_scope.cancel()


@pytest.fixture
def log(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> pytest.LogCaptureFixture:
    logger = logging.getLogger("trio_activate")
    monkeypatch.setattr(logger, "propagate", True)
    monkeypatch.setattr(logger, "handlers", [])
    caplog.set_level(logging.DEBUG, logger="trio_activate")
    return caplog


def lines(log: pytest.LogCaptureFixture, part: str) -> list[str]:
    return [r.getMessage() for r in log.records if part in r.getMessage()]


def restart_delays(workers: list[FakeWorker]) -> list[float]:
    """For consecutive workers of one slot: the time from each one's exit to the next one's spawn."""
    delays = []
    for dead, replacement in itertools.pairwise(workers):
        assert dead.exited_at is not None
        delays.append(round(replacement.spawned_at - dead.exited_at, 6))
    return delays


# --- reloads ---------------------------------------------------------------------


async def test_a_reload_whose_generation_becomes_ready_replaces_the_old_one(
    autojump_clock: trio.testing.MockClock, log: pytest.LogCaptureFixture
) -> None:
    """The old generation gets its stop once the new one is ready: SIGTERM (it says STOPPING=1 and
    drains), and SIGKILL for one still draining after the grace period."""
    async with supervising(Script(), Script(drain=60.0), workers=2) as running:
        old = running.spawner.of(1)
        assert len(old) == 2
        assert all(w.ready_at is not None and not w.signals for w in old)

        assert await running.supervisor.reload("test") is True

        new = running.spawner.of(2)
        current = running.supervisor.current
        assert current is not None
        assert current.number == 2
        assert [w.process for w in current.workers] == new
        assert lines(log, "reloaded: generation 2 serving")
        await running.until(lambda: all(w.returncode is not None for w in old))
        # Told to stop only once the whole new generation was ready.
        ready = max(n.ready_at or math.inf for n in new)
        assert all(w.signalled_at[0] >= ready for w in old)
        quick, slow = old
        assert quick.signals == [signal.SIGTERM]
        assert quick.returncode == 0
        assert slow.signals == [signal.SIGTERM, signal.SIGKILL]
        stop_margin = supervisor_module.STOP_MARGIN
        assert slow.signalled_at[1] == pytest.approx(slow.signalled_at[0] + GRACE + stop_margin)
        assert slow.returncode == -signal.SIGKILL
        assert lines(log, f"worker {slow.pid} did not stop in time; killing it")
        assert all(w.returncode is None and not w.signals for w in new)
    # Only generation 2's workers were left for the shutdown to stop.
    assert all(w.signals == [signal.SIGTERM] for w in new)


async def test_a_reload_whose_generation_fails_leaves_the_old_one_serving(
    autojump_clock: trio.testing.MockClock, log: pytest.LogCaptureFixture
) -> None:
    async with supervising(Script(), Script(fails_with=2), Script(hangs=True)) as running:
        (old,) = running.spawner.of(1)

        assert await running.supervisor.reload("exits") is False
        (exited,) = running.spawner.of(2)
        assert exited.returncode == 2
        assert lines(
            log, f"reload failed: generation 2: worker {exited.pid} exited with status 2 before it was"
        )

        # One not ready within start-timeout has served nothing: SIGKILL, no grace period.
        began = trio.current_time()
        assert await running.supervisor.reload("hangs") is False
        (hung,) = running.spawner.of(3)
        assert hung.signals == [signal.SIGKILL]
        assert hung.signalled_at == [pytest.approx(began + START_TIMEOUT)]
        assert hung.returncode == -signal.SIGKILL
        assert lines(log, "reload failed: generation 3: not ready within start-timeout (10s)")

        current = running.supervisor.current
        assert current is not None
        assert current.number == 1
        assert [w.process for w in current.workers] == [old]
        assert old.returncode is None
        assert old.signals == []
        assert len(lines(log, "generation 1 keeps serving")) == 2


async def test_sighups_during_a_reload_fold_into_one_reload_after_it(
    autojump_clock: trio.testing.MockClock, log: pytest.LogCaptureFixture
) -> None:
    async with supervising(Script(), Script(start=5.0)) as running:
        supervisor = running.supervisor
        outcomes: list[tuple[str, bool]] = []

        async def reload(reason: str) -> None:
            outcomes.append((reason, await supervisor.reload(reason)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reload, "first")
            await running.spawned(2)
            (starting,) = running.spawner.of(2)
            for number in range(10):
                nursery.start_soon(reload, f"SIGHUP {number}")
                await trio.sleep(0.1)
            assert starting.ready_at is None  # all ten came while generation 2 started

        assert sorted(outcomes) == sorted([("first", True)] + [(f"SIGHUP {n}", True) for n in range(10)])
        # One reload for the ten: generation 3, started once generation 2 had taken over.
        assert [w.generation for w in running.spawner.workers] == [1, 2, 3]
        (follower,) = running.spawner.of(3)
        assert starting.ready_at is not None
        assert follower.spawned_at >= starting.ready_at
        current = supervisor.current
        assert current is not None
        assert current.number == 3
        assert len(lines(log, "): follows the one under way")) == 1
        assert len(lines(log, "folded into the reload that follows")) == 9
        assert len(lines(log, "starting generation")) == 2


class SocketChanges:
    """A scripted ``change_sockets`` (``dev`` following its manifest): records each call, and when."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, float]] = []
        # The next call fails with this one-line error (a port in use, a manifest error).
        self.fail_next: str | None = None

    def __call__(self, generation: int) -> RecordedChange:
        self.calls.append(("change", generation, trio.current_time()))
        if self.fail_next is not None:
            message, self.fail_next = self.fail_next, None
            raise ActivationError(message)
        return RecordedChange(self, generation)

    def of(self, generation: int) -> list[str]:
        return [what for what, number, _ in self.calls if number == generation]

    def at(self, what: str, generation: int) -> float:
        (when,) = [at for name, number, at in self.calls if (name, number) == (what, generation)]
        return when


@dataclass
class RecordedChange:
    changes: SocketChanges
    generation: int

    def _record(self, what: str) -> None:
        self.changes.calls.append((what, self.generation, trio.current_time()))

    def abandon(self) -> None:
        self._record("abandon")

    def take_over(self) -> None:
        self._record("take_over")

    def release(self) -> None:
        self._record("release")


async def test_a_reload_that_changes_the_sockets_closes_the_old_ones_only_once_the_old_generation_stopped(
    autojump_clock: trio.testing.MockClock, log: pytest.LogCaptureFixture
) -> None:
    """The new sockets are abandoned when their generation fails and taken over when it is ready;
    the ones left behind are released once every old worker has exited (after its drain, or at the
    shutdown), never while one may still accept on them.  A change that cannot be made fails the
    reload in one line, no worker spawned."""
    changes = SocketChanges()
    scripts = [Script(drain=3.0), Script(fails_with=2), Script(drain=60.0)]
    async with supervising(*scripts, change_sockets=changes) as running:
        supervisor = running.supervisor
        (first,) = running.spawner.of(1)

        assert await supervisor.reload("fails") is False
        assert changes.of(2) == ["change", "abandon"]

        changes.fail_next = "app.toml: sockets.web.listen: 127.0.0.1:8000: address already in use"
        assert await supervisor.reload("port in use") is False
        assert changes.of(3) == ["change"]
        assert running.spawner.of(3) == []
        assert lines(log, "reload failed: generation 3: app.toml: sockets.web.listen: 127.0.0.1:8000: ") == [
            "reload failed: generation 3: app.toml: sockets.web.listen: 127.0.0.1:8000: address already in "
            "use; generation 1 keeps serving"
        ]

        assert await supervisor.reload("moves") is True
        (fourth,) = running.spawner.of(4)
        await running.until(lambda: "release" in changes.of(4))
        assert changes.of(4) == ["change", "take_over", "release"]
        assert fourth.ready_at is not None
        assert first.exited_at is not None
        assert changes.at("take_over", 4) == fourth.ready_at
        # The old worker drained 3 s on the old sockets; they closed once it had exited.
        assert first.exited_at == pytest.approx(changes.at("take_over", 4) + 3.0)
        assert changes.at("release", 4) == first.exited_at

        assert await supervisor.reload("moves again") is True
        assert changes.of(5) == ["change", "take_over"]
    # Generation 4 was still draining at the shutdown: released once the shutdown stopped it.
    assert changes.of(5) == ["change", "take_over", "release"]
    assert fourth.exited_at is not None
    assert changes.at("release", 5) >= fourth.exited_at


# --- restarts ----------------------------------------------------------------------


async def test_a_worker_dying_soon_after_ready_backs_off_doubling_and_a_long_serving_one_starts_over(
    autojump_clock: trio.testing.MockClock, log: pytest.LogCaptureFixture
) -> None:
    crash = Script(dies_after=1.0, status=3)
    # Crashes 1 s after READY=1, four times; the fifth serves 20 s before it crashes.
    async with supervising(crash, crash, crash, crash, Script(dies_after=20.0, status=3)) as running:
        await running.spawned(6)
        workers = running.spawner.workers
        assert [w.returncode for w in workers[:5]] == [3] * 5
        assert restart_delays(workers) == [0.1, 0.2, 0.4, 0.8, 0.1]
        for worker, delay in zip(workers, ["0.1", "0.2", "0.4", "0.8", "0.1"], strict=False):
            assert lines(log, f"worker {worker.pid} (generation 1) died with status 3 after")[0].endswith(
                f"restarting in {delay}s"
            )
        await running.until(lambda: len(lines(log, "replaced worker")) == 5)


async def test_an_exit_0_without_stopping_first_is_a_crash_and_backs_off(
    autojump_clock: trio.testing.MockClock, log: pytest.LogCaptureFixture
) -> None:
    quits = Script(dies_after=1.0, status=0)
    async with supervising(quits, quits, quits) as running:
        await running.spawned(4)
        assert restart_delays(running.spawner.workers) == [0.1, 0.2, 0.4]
        assert len(lines(log, "died with status 0 after")) == 3


@pytest.mark.parametrize(
    ("signum", "logged"),
    [(signal.SIGKILL, "died with status SIGKILL after"), (signal.SIGTERM, "not asked by the supervisor")],
)
async def test_a_worker_killed_or_stopped_from_outside_restarts_after_0_1s_every_time(
    autojump_clock: trio.testing.MockClock, log: pytest.LogCaptureFixture, signum: int, logged: str
) -> None:
    """SIGKILL (an operator, the OOM killer), or SIGTERM (its exit 0 after its own STOPPING=1): no
    crash of its code, so never a growing back-off, however soon after its READY=1 it comes."""
    async with supervising() as running:
        for round_ in range(1, 6):
            await running.spawned(round_)
            (worker,) = running.spawner.workers[round_ - 1 :]
            await running.until(lambda: worker.ready_at is not None)  # noqa: B023 (awaited at once)
            await trio.sleep(0.2)  # 0.2 s after READY=1: well within the 10 s that make a crash loop
            worker.send_signal(signum)  # from outside: the supervisor did not ask
        await running.spawned(6)
        workers = running.spawner.workers
        expected = -signal.SIGKILL if signum == signal.SIGKILL else 0
        assert [w.returncode for w in workers[:5]] == [expected] * 5
        assert restart_delays(workers) == [0.1] * 5
        assert len(lines(log, logged)) == 5
        assert all(line.endswith("restarting in 0.1s") for line in lines(log, logged))


async def test_a_restart_under_way_when_a_reload_takes_over_adds_no_worker_to_the_old_generation(
    autojump_clock: trio.testing.MockClock, log: pytest.LogCaptureFixture
) -> None:
    """The replacement's spawn is held until the reload has taken over; the replacement is then of
    a retired generation: killed at once (it served nothing), never one of the serving workers."""
    release = trio.Event()
    async with supervising(Script(), Script(spawn_held_until=release)) as running:
        (old,) = running.spawner.of(1)
        old.send_signal(signal.SIGKILL)
        # The replacement's spawn is under way (held) once the restart's 0.1 s passed.
        await trio.sleep(0.1 + 0.01)
        assert running.spawner.scripts == []

        assert await running.supervisor.reload("test") is True
        (new,) = running.spawner.of(2)
        await trio.testing.wait_all_tasks_blocked()
        release.set()
        await running.until(lambda: len(running.spawner.of(1)) == 2)
        replacement = running.spawner.of(1)[1]
        await running.until(lambda: replacement.returncode is not None)
        assert replacement.signals == [signal.SIGKILL]
        assert replacement.ready_at is None
        current = running.supervisor.current
        assert current is not None
        assert [w.process for w in current.workers] == [new]
        assert running.spawner.live() == [new]
        # A restart still waiting out its back-off (0.1 s) when a reload takes over spawns nothing.
        (serving,) = running.spawner.live()
        serving.send_signal(signal.SIGKILL)
        await trio.sleep(0.01)
        running.spawner.scripts.append(Script(start=0.01))
        assert await running.supervisor.reload("during the back-off") is True
        assert trio.current_time() - (serving.exited_at or 0) < 0.1
        await trio.sleep(20)
        assert [w.generation for w in running.spawner.workers] == [1, 2, 1, 3]
        assert not lines(log, "replaced worker")


@pytest.mark.parametrize(("worker_status", "status"), [(2, 2), (3, 1)])
async def test_five_failed_starts_in_a_row_stop_the_service_with_the_workers_configuration_error_or_1(
    autojump_clock: trio.testing.MockClock, log: pytest.LogCaptureFixture, worker_status: int, status: int
) -> None:
    """A restart is retried (the service served: an import may fail for a while), and the fifth
    failure stops it: with 2 when the worker said 2 (its code on disk does not import), else 1."""
    broken = Script(fails_with=worker_status)
    async with supervising(Script(dies_after=1.0), default=broken) as running:
        assert await running.ended() == status
        workers = running.spawner.workers
        assert len(workers) == 6
        assert [w.returncode for w in workers] == [3] + [worker_status] * 5
        assert restart_delays(workers) == [0.1, 0.2, 0.4, 0.8, 1.6]
        assert len(lines(log, f"exited with status {worker_status} before it was ready; retrying in")) == 4
        assert lines(log, "a worker failed to start 5 times in a row; stopping the service")


async def test_a_spawn_that_fails_retries_with_back_off_for_as_long_as_it_lasts(
    autojump_clock: trio.testing.MockClock, log: pytest.LogCaptureFixture
) -> None:
    refused = Script(spawn_error=BlockingIOError(11, "Resource temporarily unavailable"))
    async with supervising(Script(dies_after=1.0), *[refused] * 8) as running:
        await running.spawned(2)
        assert running.spawner.spawn_errors == 8
        assert len(lines(log, "cannot start a worker")) == 8
        (dead, replacement) = running.spawner.workers
        # 0.1, then 0.2, 0.4, ... 10 (at most) after each refusal.
        waited = 0.1 + 0.2 + 0.4 + 0.8 + 1.6 + 3.2 + 6.4 + 10.0 + 10.0
        assert dead.exited_at is not None
        assert replacement.spawned_at - dead.exited_at == pytest.approx(waited)
        await running.until(lambda: replacement.ready_at is not None)
        assert running.supervisor.exit_status == 0


# --- liveness ------------------------------------------------------------------------


async def test_a_worker_silent_for_worker_timeout_is_killed_and_its_slot_restarts(
    autojump_clock: trio.testing.MockClock, log: pytest.LogCaptureFixture
) -> None:
    async with supervising(Script(pings=False), worker_timeout=30.0) as running:
        (stuck,) = running.spawner.of(1)
        await running.spawned(2)
        assert stuck.signals == [signal.SIGKILL]
        assert stuck.ready_at is not None
        silent = stuck.signalled_at[0] - stuck.ready_at
        # Judged every tenth of worker-timeout.
        assert 30.0 < silent <= 33.0
        assert lines(log, f"worker {stuck.pid} (generation 1) has not pinged for")
        (replacement,) = running.spawner.live()
        # The replacement pings: it outlives many worker-timeouts.
        await trio.sleep(300)
        assert replacement.returncode is None
        assert replacement.signals == []


# --- the first generation and the stop ---------------------------------------------


async def test_a_first_generation_that_never_starts_is_tried_five_times(
    autojump_clock: trio.testing.MockClock, log: pytest.LogCaptureFixture
) -> None:
    async with supervising(default=Script(fails_with=3), ready=False) as running:
        assert await running.ended() == 1
        assert [w.returncode for w in running.spawner.workers] == [3] * 5
        # 0.1, 0.2, 0.4, 0.8 between the attempts (each start takes its 0.5 s).
        assert restart_delays(running.spawner.workers) == [0.1, 0.2, 0.4, 0.8]
        assert lines(log, "giving up after 5 attempts")
        assert running.supervisor.current is None


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_configuration_error_at_the_first_start_stops_at_once_with_2_and_no_error_line_of_its_own(
    autojump_clock: trio.testing.MockClock, log: pytest.LogCaptureFixture, workers: int
) -> None:
    """Status 2 is a worker's configuration error: another attempt would print the same line again."""
    async with supervising(default=Script(fails_with=2), workers=workers, ready=False) as running:
        began = trio.current_time()
        assert await running.ended() == 2
        assert len(running.spawner.workers) == workers
        assert trio.current_time() == pytest.approx(began + 0.5)  # the one start, no back-off
        assert lines(log, "a configuration error; stopping")
        assert not lines(log, "retrying")
        assert not [r for r in log.records if r.levelno >= logging.ERROR]
        assert running.supervisor.current is None


async def test_a_stop_while_the_first_generation_hangs_stops_it_at_once_and_never_retries(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with supervising(Script(hangs=True), ready=False) as running:
        await trio.sleep(1.0)
        began = trio.current_time()
        assert await running.stopped() == 0
        assert trio.current_time() == pytest.approx(began)
        (hung,) = running.spawner.workers
        assert hung.signals == [signal.SIGKILL]


async def test_the_stop_drains_every_worker_and_kills_one_that_outlives_the_grace_period(
    autojump_clock: trio.testing.MockClock, log: pytest.LogCaptureFixture
) -> None:
    async with supervising(Script(), Script(drain=60.0), workers=2) as running:
        fast, slow = running.spawner.of(1)
        began = trio.current_time()
        assert await running.stopped() == 0
        assert fast.signals == [signal.SIGTERM]
        assert fast.returncode == 0
        assert slow.signals == [signal.SIGTERM, signal.SIGKILL]
        assert slow.signalled_at[1] == pytest.approx(began + GRACE + supervisor_module.STOP_MARGIN)
        assert slow.returncode == -signal.SIGKILL
        assert lines(log, f"worker {slow.pid} did not stop in time; killing it")
