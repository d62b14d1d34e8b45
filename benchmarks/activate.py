"""``trio-activate activate`` against ``systemd-socket-activate``, the same commands, side by side.

    python benchmarks/activate.py [--quick] [--only accept,lazy] [--rounds N] [--seconds S]
                                  [--starts N] [--clients N] [--json OUT] [--workdir DIR] [--no-pin]

Two parts (``--only`` takes their names):

accept  connections per second in ``--accept`` mode with a trivial command:
        ``--inetd -l 127.0.0.1:PORT /bin/echo hello`` on both, so each
        connection costs one accept, one fork and one exec of ``echo``, which
        writes its line to the connection and exits.  ``--clients`` client
        threads of this script (default 4) connect and read to EOF, one
        connection after another, for ``--seconds``; the figure is the
        connections answered per second.  Also each activator's own CPU time
        per connection (its process alone, from ``/proc``: what the accepting
        and forking cost, without the commands).  In rounds, each round in a
        rotated order; the ratio is the median of the per-round ratios
        trio-activate / systemd-socket-activate.  The activators (and their
        commands) are pinned to one core, the clients to the other.
lazy    time from the first connection to its answer in lazy mode: the
        activator listens (its "listening" line is awaited, never probed by
        connecting, which would start the command), then the clock starts,
        the client connects, and stops when the answer is read to its end.
        The command is a Python one-liner that accepts on fd 3 and answers;
        the activator must notice the connection, place the socket and exec
        it in place.  ``--starts`` starts per activator, alternating.

``--quick`` (one round of one second, 3 starts) checks that the script
works; ``tests/test_benchmarks.py`` runs it.  Exit status 1 if a part failed.

Bounded: every load runs for its seconds, every wait has a timeout, every
activator binds 127.0.0.1 only, runs in its own session and is stopped with
its whole group (SIGTERM, then SIGKILL) when its turn ends.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness import (
    HOST,
    BenchError,
    cpu_seconds,
    cpu_split,
    free_port,
    machine_info,
    pin_prefix,
    trio_activate_argv,
)
from report import paired_ratio

PARTS = ("accept", "lazy")
TA = "trio-activate"
SSA = "systemd-socket-activate"
LABELS = {TA: "trio-activate activate", SSA: "systemd-socket-activate"}
READY_TIMEOUT = 15.0
CLIENT_TIMEOUT = 10.0
ANSWER = b"hello\n"
# The lazy part's command: adopt fd 3, answer one connection.
LAZY_COMMAND = [
    sys.executable,
    "-S",
    "-c",
    "import socket; s = socket.socket(fileno=3); c = s.accept()[0]; c.sendall(b'hello\\n'); c.close()",
]


# The activators' own environment: what systemd-socket-activate passes on (and no more), so that
# both start their commands with the same variables and only the activators differ.
ACTIVATOR_ENV = {name: os.environ[name] for name in ("PATH", "TERM", "HOME", "USER") if name in os.environ}


@dataclass(frozen=True)
class Sizes:
    rounds: int
    seconds: float
    warmup: float
    starts: int
    clients: int


FULL = Sizes(rounds=5, seconds=5.0, warmup=0.5, starts=20, clients=4)
QUICK = Sizes(rounds=1, seconds=1.0, warmup=0.2, starts=3, clients=2)


@dataclass
class Line:
    part: str
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
    print(f"[activate {time.monotonic() - _STARTED:6.1f}s] {message}", file=sys.stderr, flush=True)


# --- the contenders --------------------------------------------------------------------------------


# The accept part's commands, per way of passing the connection: inetd's stdin and stdout, and
# LISTEN_FDS's fd 3 (a shell there: no program of the base system writes to fd 3 by itself).
ACCEPT_COMMANDS = {
    "inetd": (["--inetd"], ["/bin/echo", "hello"]),
    "fd3": ([], ["/bin/sh", "-c", "echo hello >&3"]),
}


def activator_argv(
    who: str, peer: str, port: int, command: Sequence[str], *, accept: str | None
) -> list[str]:
    listen = ["-l", f"{HOST}:{port}"]
    flags = [] if accept is None else ACCEPT_COMMANDS[accept][0]
    if who == SSA:
        return [peer, *(["--accept"] if accept else []), *flags, *listen, *command]
    return [
        *trio_activate_argv(),
        "activate",
        *(["--accept"] if accept else []),
        *flags,
        *listen,
        "--",
        *command,
    ]


@contextlib.contextmanager
def activator(
    argv: Sequence[str], log_path: Path, cpus: set[int] | None
) -> Iterator[subprocess.Popen[bytes]]:
    """``argv`` in its own session, stderr to ``log_path``, once it says it listens; stopped after."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*pin_prefix(cpus), *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,
            env=ACTIVATOR_ENV,
        )
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while "istening on" not in log_path.read_text(errors="replace"):
            if process.poll() is not None:
                raise BenchError(f"{argv[0]} exited with {process.returncode}: {log_path.read_text()[-500:]}")
            if time.monotonic() > deadline:
                raise BenchError(f"{argv[0]}: no listening line within {READY_TIMEOUT:g}s")
            time.sleep(0.005)
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # commands still running in the group


def exchange(port: int) -> bytes:
    with socket.create_connection((HOST, port), timeout=CLIENT_TIMEOUT) as client:
        return b"".join(iter(lambda: client.recv(4096), b""))


# --- accept ------------------------------------------------------------------------------------------


@dataclass
class Load:
    answered: int = 0
    failed: int = 0
    first_failure: str = ""


def client_load(port: int, seconds: float, clients: int) -> Load:
    """``clients`` threads connecting one connection after another for ``seconds``; what they saw."""
    load = Load()
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def run() -> None:
        while time.monotonic() < deadline:
            try:
                answer = exchange(port)
                ok, why = answer == ANSWER, f"answer {answer!r}"
            except OSError as exc:
                ok, why = False, repr(exc)
            with lock:
                if ok:
                    load.answered += 1
                else:
                    load.failed += 1
                    load.first_failure = load.first_failure or why

    threads = [threading.Thread(target=run, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + CLIENT_TIMEOUT + 5)
    return load


def run_accept(
    sizes: Sizes, peer: str, workdir: Path, server_cpus: set[int] | None, client_cpus: set[int] | None
) -> list[Line]:
    ways = list(ACCEPT_COMMANDS)
    rates: dict[str, dict[str, list[float]]] = {way: {TA: [], SSA: []} for way in ways}
    cpu_us: dict[str, dict[str, list[float]]] = {way: {TA: [], SSA: []} for way in ways}
    notes: dict[str, list[str]] = {way: [] for way in ways}
    if client_cpus is not None:
        os.sched_setaffinity(0, client_cpus)
    order = [TA, SSA]
    for round_number in range(sizes.rounds):
        for way in ways:
            command = ACCEPT_COMMANDS[way][1]
            for who in order[round_number % 2 :] + order[: round_number % 2]:
                port = free_port()
                argv = activator_argv(who, peer, port, command, accept=way)
                log_path = workdir / f"accept-{way}-{who}-{round_number}.log"
                with activator(argv, log_path, server_cpus) as process:
                    if exchange(port) != ANSWER:
                        raise BenchError(f"{who} {way}: the command's answer is not {ANSWER!r}")
                    client_load(port, sizes.warmup, sizes.clients)
                    cpu_before = cpu_seconds(process.pid)
                    started = time.perf_counter()
                    load = client_load(port, sizes.seconds, sizes.clients)
                    elapsed = time.perf_counter() - started
                    cpu = cpu_seconds(process.pid) - cpu_before
                if load.failed:
                    failures = f"{load.failed} failed ({load.first_failure})"
                    notes[way].append(f"{LABELS[who]}, round {round_number + 1}: {failures}")
                rates[way][who].append(load.answered / elapsed)
                cpu_us[way][who].append(cpu / max(load.answered, 1) * 1e6)
                progress(
                    f"accept {way} round {round_number + 1} {who}: {load.answered / elapsed:,.0f} conn/s, "
                    f"{cpu_us[way][who][-1]:.0f} µs activator CPU per connection"
                )
    lines = []
    for way in ways:
        part = f"accept {' '.join(ACCEPT_COMMANDS[way][0] + ACCEPT_COMMANDS[way][1])}"
        rate_ratio = paired_ratio(rates[way][TA], rates[way][SSA])
        cpu_ratio = paired_ratio(cpu_us[way][TA], cpu_us[way][SSA])
        lines += [
            Line(
                part,
                "connections per second, median (min - max)",
                spread(rates[way][TA], "conn/s"),
                spread(rates[way][SSA], "conn/s"),
                ratio_text(rate_ratio),
                ">= 1.00x",
                rate_ratio is not None and rate_ratio >= 1.0,
                {"rates": rates[way]},
                notes[way],
            ),
            Line(
                part,
                "activator CPU per connection (its own process), µs, median (min - max)",
                spread(cpu_us[way][TA], "µs"),
                spread(cpu_us[way][SSA], "µs"),
                ratio_text(cpu_ratio),
                "-",
                None,
                {"cpu_us": cpu_us[way]},
            ),
        ]
    return lines


# --- lazy ----------------------------------------------------------------------------------------------


def run_lazy(sizes: Sizes, peer: str, workdir: Path, server_cpus: set[int] | None) -> list[Line]:
    times: dict[str, list[float]] = {TA: [], SSA: []}
    order = [TA, SSA]
    for start in range(sizes.starts):
        for who in order[start % 2 :] + order[: start % 2]:
            port = free_port()
            argv = activator_argv(who, peer, port, LAZY_COMMAND, accept=None)
            with activator(argv, workdir / f"lazy-{who}-{start}.log", server_cpus):
                begun = time.perf_counter()
                answer = exchange(port)
                times[who].append((time.perf_counter() - begun) * 1000)
            if answer != ANSWER:
                raise BenchError(f"{who}: the lazy command's answer is not {ANSWER!r} but {answer!r}")
    progress(f"lazy: {statistics.median(times[TA]):.1f} ms vs {statistics.median(times[SSA]):.1f} ms")
    ratio = paired_ratio(times[TA], times[SSA])
    return [
        Line(
            "lazy",
            "first connection to its answer, ms, median (min - max)",
            spread(times[TA], "ms"),
            spread(times[SSA], "ms"),
            ratio_text(ratio),
            "<= 1.00x",
            ratio is not None and ratio <= 1.0,
            {"times_ms": times},
            ["the command is a Python one-liner (python -S): its start is most of either figure"],
        )
    ]


# --- the table -------------------------------------------------------------------------------------------


def spread(values: Sequence[float], unit: str) -> str:
    if not values:
        return "-"
    fmt = "{:,.0f}" if unit == "conn/s" else "{:.1f}"
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))} - {fmt.format(max(values))})"


def ratio_text(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def render(lines: Sequence[Line]) -> str:
    header = ["part", "figure", LABELS[TA], LABELS[SSA], f"{TA} / {SSA}", "target", "met?"]
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    for line in lines:
        met = "-" if line.met is None else ("yes" if line.met else "no")
        out.append(
            "| "
            + " | ".join([line.part, line.figure, line.ours, line.theirs, line.ratio, line.target, met])
            + " |"
        )
    for line in lines:
        out += [f"- {line.part}, {line.figure}: {note}" for note in line.notes]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--quick", action="store_true", help="tiny loads, to check that the script works")
    parser.add_argument("--rounds", type=int, help="accept rounds (default 5; quick 1)")
    parser.add_argument("--seconds", type=float, help="seconds per accept load (default 5; quick 1)")
    parser.add_argument("--starts", type=int, help="lazy starts per activator (default 20; quick 3)")
    parser.add_argument("--clients", type=int, help="concurrent client threads in accept (default 4)")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the results as JSON")
    parser.add_argument("--workdir", type=Path, help="keep the activators' logs here")
    parser.add_argument(
        "--no-pin", action="store_true", help="do not pin the activators and clients to cores"
    )
    args = parser.parse_args(argv)
    parts = [p for p in args.only.split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"--only: unknown part(s) {', '.join(sorted(unknown))}; expected {', '.join(PARTS)}")
    peer = shutil.which("systemd-socket-activate")
    if peer is None:
        parser.error("systemd-socket-activate not found: apt-get install systemd")
    base = QUICK if args.quick else FULL
    sizes = Sizes(
        rounds=args.rounds or base.rounds,
        seconds=args.seconds or base.seconds,
        warmup=base.warmup,
        starts=args.starts or base.starts,
        clients=args.clients or base.clients,
    )
    server_cpus, client_cpus = (None, None) if args.no_pin else cpu_split()
    machine: dict[str, Any] = machine_info(None, None)
    for unused in ("wrk", "nginx"):
        machine.pop(unused, None)
    machine["systemd_socket_activate"] = (
        subprocess.run(["systemctl", "--version"], capture_output=True, text=True, check=False).stdout.split(
            "\n"
        )[0]
        if shutil.which("systemctl")
        else "unknown"
    )
    progress(f"machine: {json.dumps(machine)}")
    lines: list[Line] = []
    failed = False
    with contextlib.ExitStack() as stack:
        if args.workdir is not None:
            args.workdir.mkdir(parents=True, exist_ok=True)
            workdir = args.workdir.resolve()
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="activate-bench-")))
        for part in parts:
            progress(f"{part} ...")
            try:
                if part == "accept":
                    lines += run_accept(sizes, peer, workdir, server_cpus, client_cpus)
                else:
                    lines += run_lazy(sizes, peer, workdir, server_cpus)
            except BenchError as exc:
                failed = True
                progress(f"{part} failed: {exc}")
                lines.append(Line(part, "FAILED", str(exc).replace("\n", " ")[:300], "-", "-", "-", False))
    pins = (
        f"activators pinned to CPU {','.join(map(str, sorted(server_cpus)))}, clients to CPU "
        f"{','.join(map(str, sorted(client_cpus)))}"
        if server_cpus and client_cpus
        else "unpinned"
    )
    print(
        f"Machine: {machine['cores']} cores ({machine['cpu']}), Linux {machine['kernel']}, "
        f"Python {machine['python']}, trio-activate {machine['trio_activate']} "
        f"({machine['install']} install, commit {machine['commit']}), "
        f"{machine['systemd_socket_activate']}; load average {machine['loadavg']} at start.\n"
        f"Settings: accept {sizes.rounds} round(s) of {sizes.seconds:g}s, {sizes.clients} clients; "
        f"lazy {sizes.starts} start(s) per activator; {pins}.\n"
    )
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
