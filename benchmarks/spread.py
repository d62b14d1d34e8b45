"""How connections spread over the workers of one supervisor.

    python benchmarks/spread.py [--workers N] [--rounds R]

Every worker's accept loop waits on the same listening socket and, when it
wakes, drains up to ``ACCEPT_BATCH`` (64) connections before it checks the
socket again.  So one worker could take most of a burst while the others
sleep.  This runs ``trio-activate serve --workers N`` on 127.0.0.1 with a
handler that answers with its PID, opens bursts of 10, 100 and 500
connections at once (non-blocking connects, then one request on each) and
500 connections one after another, and prints each worker's share.

Bounded: ``--rounds`` bursts of each size (default 5), every socket with a
5 s timeout, the server stopped (SIGTERM, then SIGKILL) on the way out.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HANDLER = """\
import os

async def handle(stream):
    await stream.receive_some(10)
    await stream.send_all(str(os.getpid()).encode())
"""
BURSTS = (10, 100, 500)
SEQUENTIAL = 500
TIMEOUT = 5.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def burst(port: int, count: int) -> collections.Counter[str]:
    """`count` connections opened at once, then one request on each: who answered each."""
    clients = []
    try:
        for _ in range(count):
            client = socket.socket()
            clients.append(client)
            client.setblocking(False)
            with contextlib.suppress(BlockingIOError):  # a non-blocking connect is under way
                client.connect(("127.0.0.1", port))
        time.sleep(0.05)  # the whole burst is in the backlog before anyone is served
        answers: collections.Counter[str] = collections.Counter()
        for client in clients:
            client.setblocking(True)
            client.settimeout(TIMEOUT)
            client.sendall(b"x")
            answers[client.recv(20).decode()] += 1
        return answers
    finally:
        for client in clients:
            client.close()


def sequential(port: int, count: int) -> collections.Counter[str]:
    answers: collections.Counter[str] = collections.Counter()
    for _ in range(count):
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as client:
            client.sendall(b"x")
            answers[client.recv(20).decode()] += 1
    return answers


def shares(answers: collections.Counter[str]) -> str:
    total = sum(answers.values())
    return " / ".join(f"{100 * n / total:.0f}%" for _, n in sorted(answers.items(), key=lambda kv: -kv[1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "app.py").write_text(HANDLER)
        manifest = Path(folder) / "spread.toml"
        manifest.write_text(
            f'[service]\nworkers = {args.workers}\n[sockets.web]\nlisten = "127.0.0.1:{port}"\n'
            '[handlers.web]\nsocket = "web"\ncall = "app:handle"\n'
        )
        server = subprocess.Popen(
            [sys.executable, "-m", "trio_activate", "serve", str(manifest)],
            cwd=folder,
            stdin=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    sequential(port, 1)
                    break
                except OSError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise
                    time.sleep(0.05)
            time.sleep(1.0)  # every worker ready, not only the first
            print(f"{args.workers} workers, shares of the connections (largest first):")
            for count in BURSTS:
                total: collections.Counter[str] = collections.Counter()
                for _ in range(args.rounds):
                    total += burst(port, count)
                print(f"  bursts of {count:>3} x {args.rounds}: {shares(total)}")
            print(f"  {SEQUENTIAL} one after another: {shares(sequential(port, SEQUENTIAL))}")
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
