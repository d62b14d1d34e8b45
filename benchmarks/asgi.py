"""ASGI: ``trio-activate serve`` (``kind = "asgi"``) against hypercorn alone, the same app, with wrk.

    python benchmarks/asgi.py [--quick] [--only throughput,reloads] [--rounds N] [--seconds S]
                              [--reloads N] [--json OUT] [--workdir DIR] [--no-pin] [--wrk PATH]

Both contenders serve ``asgi_hello:app`` (a plain ASGI callable answering 200
``Hello, world!\\n``, beside this script) through the same hypercorn, the one
``trio-activate[asgi]`` installs, with its Trio worker:

trio-activate   ``trio-activate serve`` with a manifest ``kind = "asgi"``,
                ``call = "asgi_hello:app"``, ``workers = 1``: one process, in
                which the runtime adopts the socket and hands hypercorn's
                ``worker_serve`` a duplicate.
hypercorn       ``hypercorn --worker-class trio --workers 1 --bind
                127.0.0.1:PORT .../asgi_hello:app``: hypercorn's own command
                line, binding by itself (a main process and one worker).

Their answers are checked to be the same bytes (but the Date header) before
anything is measured.  Two parts (``--only`` takes their names):

throughput  requests per second under wrk keep-alive and ``Connection: close``
            loads (``-t1 -c50``), in rounds, each round in a rotated order;
            the ratio is the median of the per-round ratios
            trio-activate / hypercorn.  The servers are pinned to one core and
            wrk to the other, as in ``run.py``.  Also each server's CPU time per
            request (all its processes, from ``/proc``).
reloads     20 reloads of each under wrk load (``-c50``), keep-alive then
            ``Connection: close``, one reload every second or so: for
            trio-activate, SIGHUP to ``serve --supervise`` with ``workers = 1``
            (one serving process, as hypercorn's ``--workers 1``; the supervisor
            starts the new generation, then stops the old one), waiting for its
            "reloaded: generation N serving" line; for hypercorn, SIGHUP to its
            main process, which stops its worker and then starts a new one,
            waiting for the new worker to answer.  Failed requests are wrk's
            errors and non-2xx answers.  Unpinned, as ``run.py``'s reloads.

``--quick`` (one round of one second per load, 2 reloads per load) checks that
the script works; ``tests/test_benchmarks.py`` runs it.  Exit status 1 if a
part failed to run.

Bounded: every wrk run has a duration (wrk during reloads is stopped with
SIGINT once they are done, and never runs past its limit), every wait a
timeout; every server binds 127.0.0.1 only, runs in its own session and is
stopped with its group by ``harness.Servers``.
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
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from harness import (
    BENCH_DIR,
    HOST,
    PROBE_TIMEOUT,
    BenchError,
    Contender,
    Server,
    Servers,
    WrkResult,
    child_pids,
    cpu_seconds,
    cpu_split,
    http_get,
    machine_info,
    run_wrk,
    trio_activate_argv,
    wrk_in_background,
)
from report import paired_ratio

PARTS = ("throughput", "reloads")
APP_MODULE = "asgi_hello"
CONNECTIONS = 50
# trio-activate's grace-period: hypercorn's default graceful_timeout, which its command line keeps.
GRACE_PERIOD = 3.0
RELOAD_TIMEOUT = 30.0
SETTLE = 0.5  # after each wrk run, so that the next one starts on a quiet server
TARGET_RATIO = 0.95
LOADS = ((False, "keep-alive"), (True, "Connection: close"))

TA = "trio-activate"
HC = "hypercorn"
LABELS = {TA: "trio-activate serve", HC: "hypercorn alone"}


@dataclass(frozen=True)
class Sizes:
    rounds: int
    seconds: int
    warmup: int
    reloads: int
    reload_pause: float


# Ten short rounds rather than run.py's five of 5 s: a hypercorn worker is CPU-bound at about 3,000
# req/s here, and a neighbour's burst moved one round's req/s by up to 40%; five rounds once put the
# keep-alive ratio at 0.84x while CPU per request was 1.00x.
FULL = Sizes(rounds=10, seconds=3, warmup=1, reloads=20, reload_pause=1.0)
QUICK = Sizes(rounds=1, seconds=1, warmup=0, reloads=2, reload_pause=0.3)


@dataclass
class Line:
    """One line of the table: a figure for both contenders, side by side."""

    part: str
    load: str
    figure: str
    ours: str
    theirs: str
    ratio: str
    target: str
    met: bool | None
    data: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


_STARTED = time.monotonic()


def progress(message: str) -> None:
    print(f"[asgi {time.monotonic() - _STARTED:6.1f}s] {message}", file=sys.stderr, flush=True)


# --- the contenders -------------------------------------------------------------------------------


def hypercorn_argv() -> list[str]:
    """hypercorn's own command line: the console script beside this interpreter, else ``-m``."""
    script = Path(sys.executable).with_name("hypercorn")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "hypercorn"]


def write_asgi_manifest(workdir: Path, port: int) -> Path:
    """``kind = "asgi"`` serving ``asgi_hello:app`` on 127.0.0.1:PORT, one worker."""
    path = workdir / f"asgi-{port}.toml"
    path.write_text(
        "[service]\n"
        'name = "bench-asgi"\n'
        "workers = 1\n"
        f"grace-period = {GRACE_PERIOD}\n"
        f"python-path = [{json.dumps(str(BENCH_DIR))}]\n"
        "\n"
        "[sockets.http]\n"
        f'listen = "{HOST}:{port}"\n'
        "\n"
        "[handlers.http]\n"
        'socket = "http"\n'
        'kind = "asgi"\n'
        f'call = "{APP_MODULE}:app"\n'
    )
    return path


def trio_activate(*, supervise: bool) -> Contender:
    command = trio_activate_argv()
    flags = ["--supervise"] if supervise else []
    return Contender(
        TA,
        LABELS[TA],
        lambda port, workdir: [*command, "serve", *flags, str(write_asgi_manifest(workdir, port))],
        exact_bytes=False,
    )


def hypercorn() -> Contender:
    command = hypercorn_argv()
    # hypercorn imports MODULE after putting the path's folder on sys.path.
    app = f"{BENCH_DIR / APP_MODULE}:app"
    return Contender(
        HC,
        LABELS[HC],
        lambda port, _: [
            *command,
            "--worker-class",
            "trio",
            "--workers",
            "1",
            "--bind",
            f"{HOST}:{port}",
            app,
        ],
        exact_bytes=False,
    )


def without_date(answer: bytes) -> bytes:
    return re.sub(rb"(?im)^date: [^\r\n]*\r\n", b"", answer)


def check_same_answers(servers: Sequence[Server]) -> None:
    """Both serve the same app through the same hypercorn: the same bytes but for the Date header."""
    for close in (False, True):
        answers = {
            server.contender.id: without_date(http_get(server.port, close=close)) for server in servers
        }
        if len(set(answers.values())) != 1:
            raise BenchError(f"the contenders answer differently (close={close}): {answers!r}")


def rotated(items: Sequence[Server], turn: int) -> list[Server]:
    shift = turn % len(items) if items else 0
    return [*items[shift:], *items[:shift]]


# --- throughput -----------------------------------------------------------------------------------


def measure(
    server: Server, wrk: str, seconds: int, close: bool, cpus: set[int] | None
) -> tuple[WrkResult, float]:
    """One wrk run: wrk's result, and the server's CPU seconds (every process of it) during the run."""
    if not server.alive():
        raise BenchError(f"{server.contender.label} exited: {server.log_tail()}")
    before = cpu_seconds(server.pid)
    result = run_wrk(wrk, server.port, seconds=seconds, connections=CONNECTIONS, close=close, cpus=cpus)
    cpu = cpu_seconds(server.pid) - before
    time.sleep(SETTLE)
    if not server.alive():
        raise BenchError(f"{server.contender.label} exited during a run: {server.log_tail()}")
    return result, cpu


def spread(values: Sequence[float], unit: str) -> str:
    digits = ".1f" if unit == "µs" else ",.0f"
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "-"
    middle = format(statistics.median(finite), digits)
    if len(finite) == 1:
        return middle
    return f"{middle} ({format(min(finite), digits)} - {format(max(finite), digits)})"


def run_throughput(
    sizes: Sizes, wrk: str, workdir: Path, server_cpus: set[int] | None, wrk_cpus: set[int] | None
) -> list[Line]:
    lines: list[Line] = []
    with Servers() as servers:
        started = servers.start([trio_activate(supervise=False), hypercorn()], workdir, server_cpus)
        check_same_answers(started)
        for close, load in LOADS:
            rates: dict[str, list[float]] = {TA: [], HC: []}
            costs: dict[str, list[float]] = {TA: [], HC: []}
            errors: dict[str, int] = {TA: 0, HC: 0}
            for server in started if sizes.warmup else ():
                measure(server, wrk, sizes.warmup, close, wrk_cpus)
            for turn in range(sizes.rounds):
                for server in rotated(started, turn):
                    result, cpu = measure(server, wrk, sizes.seconds, close, wrk_cpus)
                    key = server.contender.id
                    rates[key].append(result.requests_per_second)
                    costs[key].append(cpu * 1e6 / result.requests if result.requests else math.nan)
                    errors[key] += result.failed
                    progress(
                        f"throughput, {load}: round {turn + 1}/{sizes.rounds}: {server.contender.label}: "
                        f"{result.requests_per_second:,.0f} req/s, {costs[key][-1]:.0f} µs CPU/request"
                        + (f", {result.failed} failed" if result.failed else "")
                    )
            ratio = paired_ratio(rates[TA], rates[HC])
            cost_ratio = paired_ratio(costs[TA], costs[HC])
            notes = [f"errors: {TA} {errors[TA]}, {HC} {errors[HC]}"] if any(errors.values()) else []
            lines.append(
                Line(
                    "throughput",
                    load,
                    "req/s, median (min - max)",
                    spread(rates[TA], "req/s"),
                    spread(rates[HC], "req/s"),
                    f"{ratio:.2f}x" if ratio is not None else "-",
                    f">= {TARGET_RATIO:.2f}x",
                    ratio is not None and ratio >= TARGET_RATIO,
                    {"samples": rates, "ratio": ratio, "errors": errors},
                    notes,
                )
            )
            lines.append(
                Line(
                    "throughput",
                    load,
                    "server CPU per request, µs (lower is better)",
                    spread(costs[TA], "µs"),
                    spread(costs[HC], "µs"),
                    f"{cost_ratio:.2f}x" if cost_ratio is not None else "-",
                    "-",
                    None,
                    {"samples": costs, "ratio": cost_ratio},
                )
            )
    return lines


# --- reloads --------------------------------------------------------------------------------------


@dataclass
class Reloads:
    result: WrkResult
    times_ms: list[float]
    """SIGHUP to the new worker serving, as this script saw it."""
    notes: list[str] = field(default_factory=list)


def wait_for_line(server: Server, generation: int) -> float:
    """The supervisor's "reloaded: generation N serving in X.XXXs"; its X in ms."""
    done = re.compile(rf"reloaded: generation {generation} serving in ([0-9.]+)s")
    deadline = time.monotonic() + RELOAD_TIMEOUT
    while True:
        text = server.log_path.read_text(errors="replace")
        match = done.search(text)
        if match:
            return float(match.group(1)) * 1000
        problem = re.search(r"reload failed: (.*)", text)
        if problem:
            raise BenchError(f"reload to generation {generation} failed: {problem.group(1)}")
        if not server.alive():
            raise BenchError(f"the supervisor exited during a reload: {server.log_tail()}")
        if time.monotonic() > deadline:
            raise BenchError(
                f"generation {generation} not serving within {RELOAD_TIMEOUT:g}s: {server.log_tail()}"
            )
        time.sleep(0.005)


def hypercorn_workers(main: int) -> set[int]:
    """The main process's worker processes (multiprocessing's spawn; not its resource tracker)."""
    workers = set()
    for pid in child_pids(main):
        with contextlib.suppress(OSError):
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                workers.add(pid)
    return workers


def wait_for_new_worker(server: Server, old: set[int]) -> None:
    """Until a worker that is not one of ``old`` answers a request.

    hypercorn's reload joins its old workers before it starts new ones, so
    once a new worker exists the old one is gone, and an answer comes from
    the new one (a probe waits in the listening socket's backlog meanwhile).
    """
    deadline = time.monotonic() + RELOAD_TIMEOUT
    while not (hypercorn_workers(server.pid) - old):
        if not server.alive():
            raise BenchError(f"hypercorn exited during a reload: {server.log_tail()}")
        if time.monotonic() > deadline:
            raise BenchError(f"hypercorn: no new worker within {RELOAD_TIMEOUT:g}s: {server.log_tail()}")
        time.sleep(0.002)
    while True:
        try:
            if http_get(server.port, timeout=PROBE_TIMEOUT).startswith(b"HTTP/1.1 200 "):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise BenchError(f"hypercorn's new worker not answering within {RELOAD_TIMEOUT:g}s")
        time.sleep(0.002)


def reloads_under_load(contender: str, sizes: Sizes, wrk: str, workdir: Path, close: bool) -> Reloads:
    times: list[float] = []
    reported: list[float] = []
    with Servers() as servers:
        maker = trio_activate(supervise=True) if contender == TA else hypercorn()
        (server,) = servers.start([maker], workdir, None)
        if contender == HC and len(hypercorn_workers(server.pid)) != 1:
            raise BenchError(f"hypercorn --workers 1 has workers {sorted(hypercorn_workers(server.pid))}")
        limit = int(sizes.reloads * (RELOAD_TIMEOUT + sizes.reload_pause) + 10)
        with wrk_in_background(
            wrk, server.port, limit=limit, connections=CONNECTIONS, close=close, cpus=None
        ) as finish:
            time.sleep(sizes.reload_pause)
            for number in range(sizes.reloads):
                old = hypercorn_workers(server.pid) if contender == HC else set()
                sent = time.monotonic()
                os.kill(server.pid, signal.SIGHUP)
                if contender == TA:
                    reported.append(wait_for_line(server, number + 2))
                else:
                    wait_for_new_worker(server, old)
                times.append((time.monotonic() - sent) * 1000)
                time.sleep(sizes.reload_pause)
            result = finish()
        if not server.alive():
            raise BenchError(f"{server.contender.label} exited after its reloads: {server.log_tail()}")
    notes = []
    if reported:
        notes.append(f"the supervisor's own 'serving in': median {statistics.median(reported):.0f} ms")
    return Reloads(result, times, notes)


def run_reloads(sizes: Sizes, wrk: str, workdir: Path) -> list[Line]:
    lines: list[Line] = []
    for close, load in LOADS:
        runs: dict[str, Reloads] = {}
        for contender in (TA, HC):
            runs[contender] = reloads_under_load(contender, sizes, wrk, workdir, close)
            result = runs[contender].result
            progress(
                f"reloads, {load}: {LABELS[contender]}: {result.failed} failed of {result.requests:,} "
                f"({errors_text(result)}), {sizes.reloads} reloads"
            )
        ours, theirs = runs[TA], runs[HC]
        lines.append(
            Line(
                "reloads",
                load,
                f"failed requests over {sizes.reloads} reloads",
                f"{ours.result.failed:,} of {ours.result.requests:,}",
                f"{theirs.result.failed:,} of {theirs.result.requests:,}",
                "-",
                f"{TA}: 0",
                ours.result.failed == 0,
                {
                    key: {
                        "failed": run.result.failed,
                        "requests": run.result.requests,
                        "errors": run.result.errors,
                    }
                    for key, run in runs.items()
                },
                [f"{LABELS[key]}: {errors_text(run.result)}" for key, run in runs.items()],
            )
        )
        lines.append(
            Line(
                "reloads",
                load,
                "SIGHUP to the new worker serving, ms, median (min - max)",
                spread(ours.times_ms, "ms"),
                spread(theirs.times_ms, "ms"),
                "-",
                "-",
                None,
                {key: {"times_ms": run.times_ms} for key, run in runs.items()},
                ours.notes,
            )
        )
    return lines


def errors_text(result: WrkResult) -> str:
    return ", ".join(f"{kind} {n:,}" for kind, n in result.errors.items() if n) or "no errors"


# --- the run --------------------------------------------------------------------------------------


def render(lines: Sequence[Line]) -> str:
    header = ["part", "load", "figure", LABELS[TA], LABELS[HC], f"{TA} / {HC}", "target", "met?"]
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    for line in lines:
        met = "-" if line.met is None else ("yes" if line.met else "no")
        cells = [line.part, line.load, line.figure, line.ours, line.theirs, line.ratio, line.target, met]
        out.append("| " + " | ".join(cells) + " |")
    for line in lines:
        out += [f"- {line.part}, {line.load}, {line.figure}: {note}" for note in line.notes]
    return "\n".join(out)


def render_machine(machine: dict[str, Any], sizes: Sizes, pins: str) -> str:
    return (
        f"Machine: {machine['cores']} cores ({machine['cpu']}), Linux {machine['kernel']}, "
        f"Python {machine['python']}, trio {machine['trio']}, hypercorn {machine['hypercorn']}, "
        f"trio-activate {machine['trio_activate']} ({machine['install']} install, "
        f"commit {machine['commit']}), wrk {machine['wrk']}; "
        f"load average {machine['loadavg']} at start, {machine['loadavg_end']} at the end.\n"
        f"Settings: throughput {sizes.rounds} round(s) of {sizes.seconds}s per load, "
        f"wrk -t1 -c{CONNECTIONS}, {pins}; {sizes.reloads} reloads per contender and load, "
        f"unpinned, grace period {GRACE_PERIOD:g}s on both.\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--quick", action="store_true", help="tiny loads, to check that the script works")
    parser.add_argument("--rounds", type=int, help="throughput rounds per load (default 10; quick 1)")
    parser.add_argument("--seconds", type=int, help="seconds per throughput wrk run (default 3; quick 1)")
    parser.add_argument("--reloads", type=int, help="reloads per contender and load (default 20; quick 2)")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the results as JSON")
    parser.add_argument("--workdir", type=Path, help="keep the manifests and server logs here")
    parser.add_argument(
        "--no-pin", action="store_true", help="do not pin the servers and wrk to separate cores"
    )
    parser.add_argument("--wrk", default=shutil.which("wrk"), help="the wrk binary (default: wrk on PATH)")
    args = parser.parse_args(argv)
    parts = [p for p in args.only.split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"--only: unknown part(s) {', '.join(sorted(unknown))}; expected {', '.join(PARTS)}")
    if args.wrk is None:
        parser.error("wrk not found: apt-get install wrk")
    try:
        hypercorn_version = metadata.version("hypercorn")
    except metadata.PackageNotFoundError:
        parser.error("hypercorn is not installed: pip install '.[asgi]'")
    base = QUICK if args.quick else FULL
    sizes = Sizes(
        rounds=args.rounds or base.rounds,
        seconds=args.seconds or base.seconds,
        warmup=base.warmup,
        reloads=args.reloads or base.reloads,
        reload_pause=base.reload_pause,
    )
    server_cpus, wrk_cpus = (None, None) if args.no_pin else cpu_split()
    machine: dict[str, Any] = {**machine_info(args.wrk, None), "hypercorn": hypercorn_version}
    machine.pop("nginx", None)
    progress(f"machine: {json.dumps(machine)}")
    lines: list[Line] = []
    failed = False
    with contextlib.ExitStack() as stack:
        if args.workdir is not None:
            args.workdir.mkdir(parents=True, exist_ok=True)
            workdir = args.workdir.resolve()
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="asgi-bench-")))
        for part in parts:
            progress(f"{part} ...")
            try:
                if part == "throughput":
                    lines += run_throughput(sizes, args.wrk, workdir, server_cpus, wrk_cpus)
                else:
                    lines += run_reloads(sizes, args.wrk, workdir)
            except BenchError as exc:
                failed = True
                progress(f"{part} failed: {exc}")
                lines.append(
                    Line(part, "-", "FAILED", str(exc).replace("\n", " ")[:300], "-", "-", "-", False)
                )
    machine["loadavg_end"] = machine_info(None, None)["loadavg"]
    pins = (
        f"servers pinned to CPU {','.join(map(str, sorted(server_cpus)))}, wrk to CPU "
        f"{','.join(map(str, sorted(wrk_cpus)))}"
        if server_cpus and wrk_cpus
        else "unpinned"
    )
    print(render_machine(machine, sizes, pins))
    print(render(lines))
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {"machine": machine, "sizes": asdict(sizes), "lines": [asdict(x) for x in lines]}, indent=2
            )
            + "\n"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
