"""Where a request's CPU time goes: ``trio.serve_listeners`` against trio-activate's ``StreamServer``.

Usage::

    python benchmarks/profile_serving.py [--load close|keepalive|both] [--seconds 8] [--rounds 2] [--out DIR]

Runs the hand-written ``trio.serve_tcp`` server (whose serving path is
``trio.serve_listeners``) and ``trio-activate serve`` (``serving.StreamServer``)
in turn, each pinned to one core, under the same wrk load pinned to the
other, and samples each with py-spy in the middle of the wrk run.  Both
handlers are ``examples.hello_http``, so the difference is the serving
machinery.

What a request costs: the server's CPU time over the sampled window (from
``/proc``, so time spent waiting for a busy core does not count) divided by
the requests wrk completed in it.  Each sample is charged to one part of
the serving path by the frames on its stack, and each part's share of the
samples splits that cost.

py-spy pauses the server for each sample (a few microseconds, 250 times a
second: the same small cost for both).  With ``--nonblocking`` it would
not, but then it often reads a stack while trio switches tasks and gets the
run loop's frame alone: on an idle machine most samples came back so, which
charges the run loop with time that belongs to the tasks.  Stacks not
rooted in ``<module>`` are still counted apart, and shares are taken over
the complete ones.

Needs py-spy (``pip install py-spy``) and permission to trace (root, or
``kernel.yama.ptrace_scope = 0``).  The raw profiles (py-spy's collapsed
stacks) are kept in ``--out``, for flame graphs.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from harness import (
    BENCH_DIR,
    Contender,
    Servers,
    cpu_seconds,
    cpu_split,
    trio_activate_argv,
    write_manifest,
    wrk_in_background,
)

# Which part of the serving path a sample belongs to: the first part one of
# whose functions is on the sample's stack.  py-spy names methods Class.method.
PARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("handler (hello_http)", ("hello_http",)),
    ("closing the connection", ("aclose_forcefully", "SocketStream.aclose", "_SocketType.close")),
    ("wrapping the socket (SocketStream)", ("SocketStream.__init__", "from_stdlib_socket")),
    ("accepting and spawning", ("_serve_one_listener", "StreamServer._accept_loop", "SocketListener.accept")),
    ("connection task, the rest", ("_run_handler", "StreamServer._serve_connection")),
    ("trio's run loop (scheduling, epoll)", ("unrolled_run",)),
)
OTHER = "other"


@dataclass
class Profile:
    """Samples of one contender under one load, summed over rounds."""

    samples: int = 0
    partial: int = 0
    requests: float = 0.0
    cpu: float = 0.0
    parts: collections.Counter[str] = field(default_factory=collections.Counter)
    leaves: collections.Counter[str] = field(default_factory=collections.Counter)
    throughput: list[float] = field(default_factory=list)

    def add(self, stacks: list[tuple[list[str], int]]) -> None:
        for stack, count in stacks:
            if not is_complete(stack):
                self.partial += count
                continue
            self.samples += count
            self.parts[part_of(stack)] += count
            self.leaves[stack[-1]] += count

    def micros(self, count: float) -> float:
        """CPU microseconds per request for ``count`` of the complete samples."""
        if not self.requests or not self.samples:
            return 0.0
        return count / self.samples * self.cpu * 1e6 / self.requests


def function_name(frame: str) -> str:
    return frame.split(" (", 1)[0]


def is_complete(stack: Sequence[str]) -> bool:
    return bool(stack) and function_name(stack[0]) == "<module>"


def part_of(stack: Sequence[str]) -> str:
    names = {function_name(frame) for frame in stack}
    for part, functions in PARTS:
        if names.intersection(functions):
            return part
    return OTHER


def read_collapsed(path: Path) -> list[tuple[list[str], int]]:
    """py-spy's ``--format raw``: one ``frame;frame;...;leaf COUNT`` line per distinct stack."""
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if stack:
            stacks.append((stack.split(";"), int(count)))
    return stacks


def short_frame(frame: str) -> str:
    name, _, where = frame.partition(" (")
    return f"{name} ({'/'.join(where.rstrip(')').split('/')[-2:])})"


@dataclass(frozen=True)
class Sampled:
    raw: Path
    requests_per_second: float
    cpu: float
    """The server's CPU seconds over the sampled window."""


def profile_once(
    contender: Contender, *, close: bool, seconds: int, rate: int, out: Path, tag: str, py_spy: str, wrk: str
) -> Sampled:
    """Start the server, load it with wrk, and sample it with py-spy for ``seconds`` in the middle."""
    server_cpus, wrk_cpus = cpu_split()
    raw = out / f"{tag}.txt"
    with Servers() as servers:
        (server,) = servers.start([contender], out, server_cpus)
        with wrk_in_background(
            wrk, server.port, limit=seconds + 4, connections=50, close=close, cpus=wrk_cpus
        ) as finish:
            time.sleep(1.5)
            before = cpu_seconds(server.pid)
            spy = [py_spy, "record", "-r", str(rate), "-d", str(seconds)]
            done = subprocess.run(
                [*spy, "-p", str(server.pid), "--format", "raw", "-o", str(raw)],
                capture_output=True,
                text=True,
                timeout=seconds + 30,
            )
            cpu = cpu_seconds(server.pid) - before
            if done.returncode != 0 or not raw.exists():
                raise SystemExit(f"py-spy failed ({done.returncode}): {done.stderr.strip()[-600:]}")
            result = finish()
    return Sampled(raw, result.requests_per_second, cpu)


def render(profiles: dict[str, Profile], labels: dict[str, str], load: str) -> str:
    keys = list(profiles)
    header = ["Part of the serving path"]
    for key in keys:
        header += [f"{labels[key]}: µs/request", "share"]
    lines = [f"### {load}", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for part in [*(p for p, _ in PARTS), OTHER]:
        cells = [part]
        for key in keys:
            profile = profiles[key]
            share = 100 * profile.parts[part] / profile.samples if profile.samples else 0.0
            cells += [f"{profile.micros(profile.parts[part]):.1f}", f"{share:.0f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    total = ["**server CPU per request**"]
    for key in keys:
        total += [f"**{profiles[key].micros(profiles[key].samples):.1f}**", "100%"]
    lines += ["| " + " | ".join(total) + " |", ""]
    for key in keys:
        profile = profiles[key]
        rps = ", ".join(f"{r:,.0f}" for r in profile.throughput)
        everything = profile.samples + profile.partial
        lines.append(
            f"{labels[key]}: {profile.samples} complete stacks, {profile.partial} partial ones left out "
            f"({100 * profile.partial / everything if everything else 0:.0f}%); wrk req/s while sampled: "
            f"{rps}. Top self time:"
        )
        for frame, count in profile.leaves.most_common(8):
            lines.append(f"    {100 * count / profile.samples:5.1f}%  {short_frame(frame)}")
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="benchmarks/profile_serving.py", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--load", choices=["close", "keepalive", "both"], default="both")
    parser.add_argument("--seconds", type=int, default=8, help="seconds sampled per run (default 8)")
    parser.add_argument("--rate", type=int, default=250, help="samples per second (default 250)")
    parser.add_argument(
        "--rounds", type=int, default=2, help="runs per contender and load, alternated (default 2)"
    )
    parser.add_argument("--out", type=Path, default=Path("profiles"), help="folder for raw profiles and logs")
    args = parser.parse_args(argv)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        raise SystemExit("py-spy not found: pip install py-spy")
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("wrk not found: apt-get install wrk")
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    command = trio_activate_argv()
    contenders = [
        Contender(
            "trio",
            "trio.serve_listeners",
            lambda port, _: [sys.executable, str(BENCH_DIR / "trio_server.py"), str(port)],
        ),
        Contender(
            "serve",
            "StreamServer",
            lambda port, workdir: [*command, "serve", str(write_manifest(workdir, port))],
        ),
    ]
    labels = {c.id: c.label for c in contenders}
    loads = ["close", "keepalive"] if args.load == "both" else [args.load]
    for load in loads:
        profiles = {c.id: Profile() for c in contenders}
        for turn in range(args.rounds):
            order = contenders if turn % 2 == 0 else contenders[::-1]
            for contender in order:
                tag = f"{contender.id}-{load}-{turn + 1}"
                sampled = profile_once(
                    contender,
                    close=load == "close",
                    seconds=args.seconds,
                    rate=args.rate,
                    out=out,
                    tag=tag,
                    py_spy=py_spy,
                    wrk=wrk,
                )
                profile = profiles[contender.id]
                profile.throughput.append(sampled.requests_per_second)
                profile.requests += sampled.requests_per_second * args.seconds
                profile.cpu += sampled.cpu
                profile.add(read_collapsed(sampled.raw))
                print(f"{tag}: {sampled.requests_per_second:,.0f} req/s", file=sys.stderr, flush=True)
        print(render(profiles, labels, "Connection: close" if load == "close" else "keep-alive"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
