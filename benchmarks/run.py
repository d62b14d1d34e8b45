"""Benchmark trio-activate against a hand-written Trio server, asyncio and nginx, with wrk.

Usage::

    python benchmarks/run.py [--quick] [--json OUT] [--plot OUT.png] [--only NAME,...] [--contenders ID,...]

Every contender serves the same handler logic (``trio_activate.examples.
hello_http``, or for asyncio a faithful port sharing its parsing rules and
response bytes; nginx, when installed, answers the same body as the
reference for this machine), so only the serving machinery differs.  Every
server binds 127.0.0.1 only; every run is bounded in time.

Scenarios (``--only`` takes the names in brackets):

1. [keepalive] requests per second over 50 keep-alive connections, and the
   server's CPU time per request;
2. [close] the same with one connection per request (``Connection: close``):
   accept and spawn cost;
3. [startup] time from exec to the first answered request;
4. [rss] memory of one serving process, idle and with 1,000 idle connections;
5. [workers] ``workers = 2`` against ``workers = 1``, under the loads of 1 and 2;
6. [reload] 20 SIGHUP reloads of ``serve --supervise`` under load: failed
   requests, and the time from SIGHUP to the new generation serving.

Noise: figures on a shared 2-core machine drift, so contenders are measured
in rounds, each round in a rotated order, and every ratio is the median of
per-round ratios to the baseline (see ``report.py``).  The server is pinned
to one core and wrk (``-t1``) to the other, except in scenarios 5 and 6,
where the server may use both.  CPU per request (from ``/proc``) is the
steadier figure: time the server spent waiting for a busy core, or for a
load generator that ran out of breath, does not count.

``--quick`` runs each load for one second, once, and finishes well within
a minute; without wrk the load scenarios are skipped with a note, and the
rest still runs.  Exit status 1 if any scenario failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import TypeVar

from harness import (
    BENCH_DIR,
    HOST,
    WRK_INSTALL_HINT,
    BenchError,
    Contender,
    Server,
    Servers,
    WrkResult,
    child_pids,
    close_all,
    cpu_seconds,
    cpu_split,
    free_port,
    machine_info,
    open_idle_connections,
    rss_mib,
    run_wrk,
    time_to_first_answer,
    trio_activate_argv,
    write_manifest,
    write_nginx_conf,
    wrk_in_background,
)
from report import (
    Row,
    Scenario,
    check_plotting,
    paired_ratio,
    plot,
    render_machine,
    render_table,
    to_json,
)

T = TypeVar("T")

SCENARIO_NAMES = ("keepalive", "close", "startup", "rss", "workers", "reload")
RELOAD_TIMEOUT = 30.0
# Pause after each wrk run: a server killed by the run's last resets is seen dead, not dying.
SETTLE = 0.5
# The supervised service's grace-period; reloads are RELOAD_GRACE_PERIOD + reload_pause
# apart, so at each one every keep-alive connection sits on the generation being replaced.
RELOAD_GRACE_PERIOD = 0.5


@dataclass(frozen=True)
class Settings:
    quick: bool
    rounds: int
    seconds: int
    warmup: int
    connections: int
    startup_runs: int
    rss_runs: int
    idle_connections: int
    reloads: int
    reload_pause: float
    time_limit: int
    only: frozenset[str]
    contenders: frozenset[str] | None
    """Contender ids to run (the baseline, ``trio``, always runs); None: all."""
    wrk: str | None
    nginx: str | None
    socket_activate: str | None
    server_cpus: set[int] | None
    wrk_cpus: set[int] | None

    def wants(self, name: str) -> bool:
        return name in self.only

    def picks(self, contender: str) -> bool:
        return self.contenders is None or contender == "trio" or contender in self.contenders

    def summary(self) -> dict[str, object]:
        out = asdict(self)
        out["only"] = sorted(self.only)
        out["contenders"] = sorted(self.contenders) if self.contenders is not None else "all"
        for key in ("server_cpus", "wrk_cpus"):
            value = out[key]
            out[key] = ",".join(str(c) for c in sorted(value)) if value else "any"
        return out


# --- contenders -------------------------------------------------------------------------------


def hand_written_trio() -> Contender:
    return Contender(
        "trio",
        "hand-written trio.serve_tcp",
        lambda port, _: [sys.executable, str(BENCH_DIR / "trio_server.py"), str(port)],
    )


def serve(*, workers: int = 1, contender_id: str = "serve", label: str = "trio-activate serve") -> Contender:
    command = trio_activate_argv()
    return Contender(
        contender_id,
        label,
        lambda port, workdir: [*command, "serve", str(write_manifest(workdir, port, workers=workers))],
    )


def serve_under_socket_activate(socket_activate: str) -> Contender:
    command = trio_activate_argv()
    return Contender(
        "serve-ssa",
        "trio-activate serve under systemd-socket-activate",
        lambda port, workdir: [
            socket_activate,
            "-l",
            f"{HOST}:{port}",
            "--fdname=http",
            *command,
            "serve",
            str(write_manifest(workdir, port)),
        ],
    )


def asyncio_server() -> Contender:
    return Contender(
        "asyncio",
        "asyncio start_server",
        lambda port, _: [sys.executable, str(BENCH_DIR / "asyncio_server.py"), str(port)],
    )


def nginx_server(nginx: str) -> Contender:
    def argv(port: int, workdir: Path) -> list[str]:
        conf = write_nginx_conf(workdir, port)
        return [nginx, "-e", "stderr", "-p", str(conf.parent), "-c", str(conf)]

    def worker(master: int) -> int:
        children = child_pids(master)
        if not children:
            raise BenchError(f"nginx master {master} has no worker")
        return children[0]

    return Contender("nginx", "nginx, 1 worker (reference)", argv, exact_bytes=False, serving_pid=worker)


def optional_contenders(settings: Settings, *, ssa: bool, nginx: bool) -> tuple[list[Contender], list[Row]]:
    """The optional contenders that are installed, and skipped rows for those that are not."""
    present: list[Contender] = []
    missing: list[Row] = []
    if ssa:
        if settings.socket_activate is not None:
            present.append(serve_under_socket_activate(settings.socket_activate))
        else:
            missing.append(
                Row(
                    "serve-ssa",
                    "trio-activate serve under systemd-socket-activate",
                    skipped="systemd-socket-activate not installed (Debian package: systemd)",
                )
            )
    if nginx:
        if settings.nginx is not None:
            present.append(nginx_server(settings.nginx))
        else:
            missing.append(Row("nginx", "nginx, 1 worker (reference)", skipped="nginx not on PATH"))
    return present, missing


# --- progress and rounds ----------------------------------------------------------------------

_STARTED = time.monotonic()


def progress(message: str) -> None:
    print(f"[{time.monotonic() - _STARTED:6.1f}s] {message}", file=sys.stderr, flush=True)


def rotated(items: Sequence[T], turn: int) -> list[T]:
    """Round ``turn``'s order: each contender takes each position in turn."""
    shift = turn % len(items) if items else 0
    return [*items[shift:], *items[:shift]]


# --- scenarios 1, 2 and 5: throughput ------------------------------------------------------------


class Deaths:
    """Counts the runs after which a server had died, per (scenario, contender), and restarts it.

    The hand-written ``trio.serve_tcp`` server dies on the first
    ``ECONNRESET`` its handler sees (the error escapes ``hello_http`` and
    ends ``serve_listeners``), which wrk causes when it closes connections
    with requests in flight at the end of a run.  A death is found just
    before the server's next run (or at the end) and charged to the
    scenario of the run it followed.
    """

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}
        self.runs: dict[tuple[str, str], int] = {}
        self._last: dict[str, str] = {}

    def ran(self, server: Server, scenario: Scenario) -> None:
        key = (scenario.id, server.contender.id)
        self.runs[key] = self.runs.get(key, 0) + 1
        self._last[server.contender.id] = scenario.id

    def check(self, server: Server, *, restart: bool = True) -> None:
        if server.alive():
            return
        last = self._last.get(server.contender.id)
        if last is not None:
            key = (last, server.contender.id)
            self.counts[key] = self.counts.get(key, 0) + 1
        if restart:
            server.ensure_running()

    def note(self, scenario: Scenario, row: Row) -> None:
        count = self.counts.get((scenario.id, row.contender), 0)
        if count:
            runs = self.runs.get((scenario.id, row.contender), 0)
            row.notes.append(
                f"died after {count} of {runs} run(s), restarted: a peer's reset escapes the handler "
                "and ends the server"
            )


def measure_load(
    server: Server,
    scenario: Scenario,
    deaths: Deaths,
    settings: Settings,
    *,
    close: bool,
    seconds: int,
    pinned: bool,
) -> tuple[WrkResult, float]:
    """One wrk run against ``server``: wrk's result, and the server's CPU seconds during it.

    Redone (twice at most) if the server died during the run: a death
    after the run leaves the sample valid; a death that made wrk fail to
    connect voids it.
    """
    assert settings.wrk is not None
    result = None
    cpu = math.nan
    for _ in range(3):
        deaths.check(server)
        deaths.ran(server, scenario)
        before = cpu_seconds(server.pid)
        try:
            result = run_wrk(
                settings.wrk,
                server.port,
                seconds=seconds,
                connections=settings.connections,
                close=close,
                cpus=settings.wrk_cpus if pinned else None,
            )
        except BenchError:
            time.sleep(SETTLE)
            if server.alive():
                raise
            progress(f"  {server.contender.label} was dying as the run began; measuring again")
            continue
        cpu = cpu_seconds(server.pid) - before if server.alive() else math.nan
        # A server that dies of the run's last resets does so within moments:
        # wait, so that the next check sees it dead rather than dying.
        time.sleep(SETTLE)
        if server.alive() or not result.errors["connect"]:
            return result, cpu
        progress(f"  {server.contender.label} died during the run; measuring again")
    if result is None:
        raise BenchError(f"{server.contender.label}: no run succeeded in 3 attempts: {server.log_tail()}")
    return result, cpu


@dataclass(frozen=True)
class Load:
    """One wrk load and the two scenarios it fills: requests per second, and server CPU per request."""

    rate: Scenario
    cpu: Scenario
    close: bool


def throughput(
    loads: Sequence[Load],
    contenders: Sequence[Contender],
    settings: Settings,
    workdir: Path,
    *,
    pinned: bool,
) -> None:
    """Run every load against every contender, in rotated rounds; fill the rows.

    Requests per second is what wrk saw.  CPU per request is the server's
    own CPU time (all its processes) over the requests it answered, which a
    busy machine disturbs far less: it counts the time the server ran, not
    the time it waited for a core, nor a load generator that ran out of
    breath first.
    """
    assert settings.wrk is not None
    deaths = Deaths()
    with Servers() as servers:
        started = servers.start(contenders, workdir, settings.server_cpus if pinned else None)
        for load in loads:
            rows = {c.id: Row(c.id, c.label) for c in contenders}
            cpu_rows = {c.id: Row(c.id, c.label) for c in contenders}
            load.rate.rows[:0] = list(rows.values())
            load.cpu.rows[:0] = list(cpu_rows.values())
            for server in started if settings.warmup else ():
                measure_load(
                    server,
                    load.rate,
                    deaths,
                    settings,
                    close=load.close,
                    seconds=settings.warmup,
                    pinned=pinned,
                )
            for turn in range(settings.rounds):
                for server in rotated(started, turn):
                    result, cpu = measure_load(
                        server,
                        load.rate,
                        deaths,
                        settings,
                        close=load.close,
                        seconds=settings.seconds,
                        pinned=pinned,
                    )
                    rows[server.contender.id].samples.append(result.requests_per_second)
                    rows[server.contender.id].add_errors(result.errors)
                    micros = cpu * 1e6 / result.requests if result.requests else math.nan
                    cpu_rows[server.contender.id].samples.append(micros)
                    progress(
                        f"{load.rate.title}: round {turn + 1}/{settings.rounds}: {server.contender.label}: "
                        f"{result.requests_per_second:,.0f} req/s, {micros:.0f} µs CPU/request, "
                        f"p99 {result.latency_p99_ms:.1f} ms"
                        + (f", {result.failed} error(s)" if result.failed else "")
                    )
        time.sleep(0.3)  # a death right after the last run
        for server in started:
            deaths.check(server, restart=False)
    for load in loads:
        for row in load.rate.rows:
            deaths.note(load.rate, row)


def run_keepalive_and_close(scenarios: dict[str, Scenario], settings: Settings, workdir: Path) -> None:
    wanted = [
        Load(scenarios[name], scenarios[f"{name}-cpu"], name == "close")
        for name in ("keepalive", "close")
        if settings.wants(name)
    ]
    if not wanted:
        return
    extra, missing = optional_contenders(settings, ssa=True, nginx=True)
    by_id = {c.id: c for c in extra}
    contenders = [hand_written_trio(), serve()]
    contenders += [by_id[key] for key in ("serve-ssa",) if key in by_id]
    contenders += [asyncio_server(), *(by_id[key] for key in ("nginx",) if key in by_id)]
    contenders = [c for c in contenders if settings.picks(c.id)]
    throughput(wanted, contenders, settings, workdir, pinned=True)
    for load in wanted:
        for scenario in (load.rate, load.cpu):
            scenario.rows.extend(
                Row(r.contender, r.label, skipped=r.skipped) for r in missing if settings.picks(r.contender)
            )
        nginx = load.cpu.row("nginx")
        if nginx is not None:
            nginx.notes.append("master and worker")


def run_workers(scenarios: dict[str, Scenario], settings: Settings, workdir: Path) -> None:
    wanted = [
        Load(scenarios["workers-keepalive"], scenarios["workers-keepalive-cpu"], False),
        Load(scenarios["workers-close"], scenarios["workers-close-cpu"], True),
    ]
    contenders = [
        hand_written_trio(),
        serve(workers=1, contender_id="serve-w1", label="trio-activate serve, workers = 1"),
        serve(workers=2, contender_id="serve-w2", label="trio-activate serve, workers = 2"),
    ]
    contenders = [c for c in contenders if settings.picks(c.id)]
    throughput(wanted, contenders, settings, workdir, pinned=False)
    for scenario in (s for load in wanted for s in (load.rate, load.cpu)):
        one, two = scenario.row("serve-w1"), scenario.row("serve-w2")
        if one is not None and two is not None:
            ratio = paired_ratio(two.samples, one.samples)
            if ratio is not None:
                two.notes.append(f"{ratio:.2f}x workers = 1")
    for load in wanted:
        two = load.cpu.row("serve-w2")
        if two is not None:
            two.notes.append("supervisor and both workers")


# --- scenario 3: start-up ------------------------------------------------------------------------


def run_startup(scenario: Scenario, settings: Settings, workdir: Path) -> None:
    command = trio_activate_argv()
    starters: list[tuple[str, str, Callable[[int], list[str]]]] = [
        (
            "trio",
            "bare Trio script",
            lambda port: [sys.executable, str(BENCH_DIR / "trio_server.py"), str(port)],
        ),
        ("serve", "trio-activate serve (self-activated)", lambda port: [*command, "serve", manifest(port)]),
    ]
    if settings.socket_activate is not None:
        ssa = settings.socket_activate
        starters.append(
            (
                "serve-ssa",
                "trio-activate serve under systemd-socket-activate",
                lambda port: [
                    ssa,
                    "-l",
                    f"{HOST}:{port}",
                    "--fdname=http",
                    *command,
                    "serve",
                    manifest(port),
                ],
            )
        )

    def manifest(port: int) -> str:
        return str(write_manifest(workdir, port))

    starters = [starter for starter in starters if settings.picks(starter[0])]
    rows = {key: Row(key, label) for key, label, _ in starters}
    scenario.rows.extend(rows.values())
    if settings.socket_activate is None and settings.picks("serve-ssa"):
        scenario.rows.append(
            Row(
                "serve-ssa",
                "trio-activate serve under systemd-socket-activate",
                skipped="systemd-socket-activate not installed (Debian package: systemd)",
            )
        )
    for turn in range(settings.startup_runs):
        for key, _, argv in rotated(starters, turn):
            port = free_port()
            seconds = time_to_first_answer(argv(port), port, workdir / f"startup-{key}.log")
            rows[key].samples.append(seconds * 1000)
        progress(
            f"{scenario.title}: run {turn + 1}/{settings.startup_runs}: "
            + ", ".join(f"{rows[k].label} {rows[k].samples[-1]:.0f} ms" for k, _, _ in starters)
        )


# --- scenario 4: memory --------------------------------------------------------------------------


def run_rss(idle: Scenario, loaded: Scenario, settings: Settings, workdir: Path) -> None:
    extra, missing = optional_contenders(settings, ssa=False, nginx=True)
    contenders = [c for c in (hand_written_trio(), serve(), asyncio_server(), *extra) if settings.picks(c.id)]
    for scenario in (idle, loaded):
        scenario.rows.extend(Row(c.id, c.label) for c in contenders)
        scenario.rows.extend(
            Row(r.contender, r.label, skipped=r.skipped) for r in missing if settings.picks(r.contender)
        )
    for turn in range(settings.rss_runs):
        for contender in rotated(contenders, turn):
            with Servers() as servers:
                (server,) = servers.start([contender], workdir, None)
                pid = contender.serving_pid(server.pid)
                time.sleep(0.2)
                idle_mib = rss_mib(pid)
                held = open_idle_connections(server.port, settings.idle_connections)
                try:
                    time.sleep(0.2)
                    loaded_mib = rss_mib(pid)
                finally:
                    close_all(held)
            _row(idle, contender.id).samples.append(idle_mib)
            _row(loaded, contender.id).samples.append(loaded_mib)
            progress(
                f"{idle.title}: run {turn + 1}/{settings.rss_runs}: {contender.label}: "
                f"{idle_mib:.1f} MiB idle, {loaded_mib:.1f} MiB with {settings.idle_connections} connections"
            )
    for scenario in (idle, loaded):
        nginx = scenario.row("nginx")
        if nginx is not None and nginx.skipped is None:
            nginx.notes.append("the worker process alone")


def _row(scenario: Scenario, contender: str) -> Row:
    row = scenario.row(contender)
    assert row is not None, contender
    return row


# --- scenario 6: reloads under load --------------------------------------------------------------


def wait_for_reload(server: Server, generation: int, timeout: float = RELOAD_TIMEOUT) -> float:
    """The supervisor's own figure for this generation: "reloaded: generation N serving in X.XXXs"."""
    done = re.compile(rf"reloaded: generation {generation} serving in ([0-9.]+)s")
    failed = re.compile(r"reload failed: (.*)")
    deadline = time.monotonic() + timeout
    while True:
        text = server.log_path.read_text(errors="replace")
        match = done.search(text)
        if match:
            return float(match.group(1))
        problem = failed.search(text)
        if problem:
            raise BenchError(f"reload to generation {generation} failed: {problem.group(1)}")
        if not server.alive():
            raise BenchError(f"the supervisor exited during reload {generation - 1}: {server.log_tail()}")
        if time.monotonic() > deadline:
            raise BenchError(f"generation {generation} not serving within {timeout:g}s: {server.log_tail()}")
        time.sleep(0.005)


def reload_under_load(
    settings: Settings, workdir: Path, *, close: bool
) -> tuple[WrkResult, list[float], list[float]]:
    """(wrk's result, the supervisor's reload times, the times the harness saw), all in one run."""
    assert settings.wrk is not None
    command = trio_activate_argv()
    supervised = Contender(
        "supervised",
        "trio-activate serve --supervise",
        lambda port, wd: [
            *command,
            "serve",
            "--supervise",
            str(write_manifest(wd, port, grace_period=RELOAD_GRACE_PERIOD)),
        ],
    )
    reported: list[float] = []
    seen: list[float] = []
    with Servers() as servers:
        (server,) = servers.start([supervised], workdir, None)
        limit = int(settings.reloads * (RELOAD_TIMEOUT + settings.reload_pause) + 10)
        with wrk_in_background(
            settings.wrk, server.port, limit=limit, connections=settings.connections, close=close, cpus=None
        ) as finish:
            time.sleep(settings.reload_pause)
            for reload in range(settings.reloads):
                sent = time.monotonic()
                os.kill(server.pid, signal.SIGHUP)
                reported.append(wait_for_reload(server, reload + 2) * 1000)
                seen.append((time.monotonic() - sent) * 1000)
                time.sleep(RELOAD_GRACE_PERIOD + settings.reload_pause)
            result = finish()
    return result, reported, seen


def run_reload(failed: Scenario, timing: Scenario, settings: Settings, workdir: Path) -> None:
    for close, label in ((True, "Connection: close load"), (False, "keep-alive load")):
        result, reported, seen = reload_under_load(settings, workdir, close=close)
        key = "close" if close else "keepalive"
        failures = Row(
            key, f"serve --supervise, {label}", samples=[float(result.failed)], errors=result.errors
        )
        failures.notes.append(
            f"{result.requests:,} requests in {result.seconds:.1f}s, {len(reported)} reloads"
        )
        times = Row(key, f"serve --supervise, {label}", samples=reported)
        seen.sort()
        times.notes.append(
            f"SIGHUP to the log line as the harness saw it: median {seen[len(seen) // 2]:.0f} ms"
        )
        failed.rows.append(failures)
        timing.rows.append(times)
        progress(
            f"{failed.title}: {label}: {result.failed} failed of {result.requests:,}; "
            f"reloads {min(reported):.0f}-{max(reported):.0f} ms"
        )
    failed.notes.append(
        f"keep-alive: after SIGHUP the old generation answers each connection's next request with "
        f"Connection: close (trio_activate.is_stopping); what is still open after its grace-period "
        f"({RELOAD_GRACE_PERIOD:g} s here) is cancelled"
    )


# --- the run ------------------------------------------------------------------------------------


def build_scenarios() -> dict[str, Scenario]:
    return {
        "keepalive": Scenario("1-keepalive", "1 Keep-alive, wrk -c 50", "req/s", "higher"),
        "keepalive-cpu": Scenario(
            "1-keepalive-cpu", "1 Keep-alive: server CPU per request", "µs", "lower", per_request=True
        ),
        "close": Scenario("2-close", "2 Connection: close, wrk -c 50", "req/s", "higher"),
        "close-cpu": Scenario(
            "2-close-cpu", "2 Connection: close: server CPU per request", "µs", "lower", per_request=True
        ),
        "startup": Scenario("3-startup", "3 Exec to first answer", "ms", "lower", show_delta=True),
        "rss-idle": Scenario("4a-rss-idle", "4a RSS, idle", "MiB", "lower", show_delta=True),
        "rss-loaded": Scenario(
            "4b-rss-1000", "4b RSS, 1,000 idle connections", "MiB", "lower", show_delta=True
        ),
        "workers-keepalive": Scenario("5a-workers-keepalive", "5a Keep-alive, unpinned", "req/s", "higher"),
        "workers-keepalive-cpu": Scenario(
            "5a-workers-keepalive-cpu",
            "5a Keep-alive, unpinned: server CPU per request",
            "µs",
            "lower",
            per_request=True,
        ),
        "workers-close": Scenario("5b-workers-close", "5b Connection: close, unpinned", "req/s", "higher"),
        "workers-close-cpu": Scenario(
            "5b-workers-close-cpu",
            "5b Connection: close, unpinned: server CPU per request",
            "µs",
            "lower",
            per_request=True,
        ),
        "reload-failed": Scenario(
            "6a-reload-failed", "6a Reloads: failed requests", "requests", "lower", None
        ),
        "reload-time": Scenario(
            "6b-reload-time", "6b Reloads: SIGHUP to new generation serving", "ms", "lower", None
        ),
    }


# Which --only name selects each scenario.
GROUP = {
    "keepalive": "keepalive",
    "keepalive-cpu": "keepalive",
    "close": "close",
    "close-cpu": "close",
    "startup": "startup",
    "rss-idle": "rss",
    "rss-loaded": "rss",
    "workers-keepalive": "workers",
    "workers-keepalive-cpu": "workers",
    "workers-close": "workers",
    "workers-close-cpu": "workers",
    "reload-failed": "reload",
    "reload-time": "reload",
}


@dataclass(frozen=True)
class Step:
    """Code that fills some scenarios; it runs when --only selects any of them."""

    scenarios: tuple[str, ...]
    needs_wrk: bool
    run: Callable[[dict[str, Scenario], Settings, Path], None]


STEPS = (
    Step(("keepalive", "keepalive-cpu", "close", "close-cpu"), True, run_keepalive_and_close),
    Step(("startup",), False, lambda s, settings, w: run_startup(s["startup"], settings, w)),
    Step(
        ("rss-idle", "rss-loaded"),
        False,
        lambda s, settings, w: run_rss(s["rss-idle"], s["rss-loaded"], settings, w),
    ),
    Step(
        ("workers-keepalive", "workers-keepalive-cpu", "workers-close", "workers-close-cpu"),
        True,
        run_workers,
    ),
    Step(
        ("reload-failed", "reload-time"),
        True,
        lambda s, settings, w: run_reload(s["reload-failed"], s["reload-time"], settings, w),
    ),
)


def run_all(settings: Settings, workdir: Path) -> tuple[list[Scenario], bool]:
    """Every selected scenario; (those scenarios in table order, whether any step failed)."""
    scenarios = build_scenarios()
    wanted = [key for key in scenarios if settings.wants(GROUP[key])]
    failed = False
    for step in STEPS:
        keys = [key for key in step.scenarios if key in wanted]
        if not keys:
            continue
        if step.needs_wrk and settings.wrk is None:
            for key in keys:
                scenarios[key].skipped = WRK_INSTALL_HINT
            continue
        try:
            step.run(scenarios, settings, workdir)
        except BenchError as exc:
            failed = True
            progress(f"{', '.join(keys)} failed: {exc}")
            for key in keys:
                scenarios[key].skipped = f"FAILED: {exc}"
    return [scenarios[key] for key in wanted], failed


def settings_from(args: argparse.Namespace) -> Settings:
    quick: bool = args.quick
    server_cpus, wrk_cpus = (None, None) if args.no_pin else cpu_split()
    wrk = args.wrk if args.wrk is not None else shutil.which("wrk")
    if wrk is not None and not (os.path.isfile(wrk) and os.access(wrk, os.X_OK)):
        wrk = None
    only = frozenset(args.only.split(",")) if args.only else frozenset(SCENARIO_NAMES)
    unknown = only - set(SCENARIO_NAMES)
    if unknown:
        raise SystemExit(
            f"--only: unknown scenario(s) {', '.join(sorted(unknown))}; known: {', '.join(SCENARIO_NAMES)}"
        )
    return Settings(
        quick=quick,
        rounds=args.rounds or (1 if quick else 5),
        seconds=args.seconds or (1 if quick else 5),
        warmup=0 if quick else 1,
        connections=50,
        startup_runs=3 if quick else 40,
        rss_runs=1 if quick else 3,
        idle_connections=1000,
        reloads=2 if quick else 20,
        reload_pause=0.2 if quick else 0.5,
        time_limit=args.time_limit or (150 if quick else 2400),
        only=only,
        contenders=frozenset(args.contenders.split(",")) if args.contenders else None,
        wrk=wrk,
        nginx=shutil.which("nginx"),
        socket_activate=shutil.which("systemd-socket-activate"),
        server_cpus=server_cpus,
        wrk_cpus=wrk_cpus,
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="benchmarks/run.py",
        description="Benchmark trio-activate serve against hand-written Trio, asyncio and nginx, with wrk.",
    )
    parser.add_argument("--quick", action="store_true", help="one second per load, one round: a smoke run")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the results as JSON")
    parser.add_argument("--plot", type=Path, metavar="OUT.png", help="also draw them (needs matplotlib)")
    parser.add_argument("--only", metavar="NAME,...", help=f"run only these: {', '.join(SCENARIO_NAMES)}")
    parser.add_argument(
        "--contenders",
        metavar="ID,...",
        help="run only these contenders besides the trio baseline: serve, serve-ssa, asyncio, nginx, "
        "serve-w1, serve-w2 (default: all)",
    )
    parser.add_argument(
        "--rounds", type=int, metavar="N", help="rounds per load scenario (default 5; quick 1)"
    )
    parser.add_argument("--seconds", type=int, metavar="S", help="seconds per wrk run (default 5; quick 1)")
    parser.add_argument("--wrk", metavar="PATH", help="the wrk to use (default: wrk on PATH)")
    parser.add_argument(
        "--no-pin", action="store_true", help="do not pin the server and wrk to separate cores"
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        metavar="DIR",
        help="keep manifests and server logs in DIR (default: temporary)",
    )
    parser.add_argument(
        "--time-limit", type=int, metavar="S", help="abort after S seconds (default 2400; quick 150)"
    )
    return parser.parse_args(argv)


class TimeLimitExceeded(Exception):
    pass


@dataclass
class _Alarm:
    seconds: int

    def __enter__(self) -> None:
        def expired(signum: int, frame: FrameType | None) -> None:
            raise TimeLimitExceeded(f"the run took longer than its time limit ({self.seconds}s)")

        signal.signal(signal.SIGALRM, expired)
        signal.alarm(self.seconds)

    def __exit__(self, *exc_info: object) -> None:
        signal.alarm(0)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plot is not None:
        check_plotting()
    settings = settings_from(args)
    if settings.wrk is None:
        print(f"benchmarks: {WRK_INSTALL_HINT}; skipping the scenarios that need it", file=sys.stderr)
    machine = machine_info(settings.wrk, settings.nginx)
    progress(f"machine: {json.dumps(machine)}")
    if machine["install"] == "editable" and settings.wants("startup"):
        print(
            "benchmarks: trio-activate is an editable install: its import hook slows every interpreter "
            "start, and scenario 3 starts two; for figures users see, run from `pip install '.[bench]'`",
            file=sys.stderr,
        )
    with contextlib.ExitStack() as stack:
        if args.workdir is not None:
            args.workdir.mkdir(parents=True, exist_ok=True)
            workdir = args.workdir.resolve()
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="trio-activate-bench-")))
        stack.enter_context(_Alarm(settings.time_limit))
        scenarios, failed = run_all(settings, workdir)
    machine["loadavg_end"] = machine_info(None, None)["loadavg"]
    summary = settings.summary()
    print(render_machine(machine, summary))
    print()
    print(render_table(scenarios))
    if args.json is not None:
        args.json.write_text(json.dumps(to_json(scenarios, machine, summary), indent=2) + "\n")
    if args.plot is not None:
        plot(scenarios, render_machine(machine, summary), args.plot)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
