"""Interop with the real `systemd-socket-activate`: `fds --json` and `serve` adopt what it passes.

`systemd-socket-activate` (systemd 252 here) binds the sockets, waits for the
first connection (or datagram) and only then execs the program in place, so
every test triggers the exec by connecting.  With ``--accept`` it forks one
process per connection instead, passing the connection unnamed.  It passes
only PATH, TERM, HOME and the ``LISTEN_*`` variables to the program.

Each test runs the peer in its own session and kills that session's process
group if the test ends early, so nothing outlives it.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    TIMEOUT,
    TRIO_ACTIVATE,
    Process,
    echo_manifest,
    free_port,
    require_peer,
    started,
    wait_until,
    write_manifest,
)


@pytest.fixture
def peer() -> str:
    return require_peer("systemd-socket-activate")


def connect(run: Process, family: socket.AddressFamily, address: Any) -> socket.socket:
    """Connect to what the peer listens on, retrying until it is bound (bounded)."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        client = socket.socket(family, socket.SOCK_STREAM)
        client.settimeout(TIMEOUT)
        try:
            client.connect(address)
        except (ConnectionRefusedError, FileNotFoundError):
            client.close()
            if run.poll() is not None:
                pytest.fail(f"exited with {run.returncode} before listening: {run.log}")
            if time.monotonic() > deadline:
                pytest.fail(f"nothing listened at {address} within {TIMEOUT}s: {run.log}")
            time.sleep(0.02)
            continue
        return client


def echo_once(client: socket.socket, payload: bytes) -> bytes:
    client.sendall(payload)
    received = b""
    while len(received) < len(payload):
        data = client.recv(65536)
        if not data:
            break
        received += data
    return received


# --- fds --json under systemd-socket-activate --------------------------------


def run_fds_json(
    peer: str, folder: Path, listen: str, family: socket.AddressFamily, address: Any, *extra: str
) -> tuple[int, dict[str, Any], str]:
    """`systemd-socket-activate -l LISTEN --fdname=http trio-activate fds --json EXTRA...`."""
    cmd = [peer, "-l", listen, "--fdname=http", *TRIO_ACTIVATE, "fds", "--json", *extra]
    with started(cmd) as run:
        with connect(run, family, address):
            status = run.wait()
        out, err = run.out, run.log
    assert out.count("\n") == 1, out  # one JSON object on one line
    report: dict[str, Any] = json.loads(out)
    return status, report, err


def test_fds_json_reports_an_ipv4_listener_named_http(peer: str, short_dir: Path) -> None:
    # free_port: systemd-socket-activate -l refuses port 0 ("Failed to parse socket address").
    port = free_port()
    status, report, err = run_fds_json(
        peer, short_dir, f"127.0.0.1:{port}", socket.AF_INET, ("127.0.0.1", port)
    )
    assert status == 0, err
    assert report == {
        "activated": True,
        "reason": None,
        "fds": [
            {
                "fd": 3,
                "name": "http",
                "family": "inet",
                "type": "stream",
                "listening": True,
                "address": f"127.0.0.1:{port}",
            }
        ],
    }


def test_fds_json_reports_an_ipv6_listener(peer: str, short_dir: Path) -> None:
    # free_port: systemd-socket-activate -l refuses port 0 ("Failed to parse socket address").
    port = free_port(socket.AF_INET6)
    status, report, err = run_fds_json(peer, short_dir, f"[::1]:{port}", socket.AF_INET6, ("::1", port))
    assert status == 0, err
    assert report["activated"] is True
    assert report["fds"] == [
        {
            "fd": 3,
            "name": "http",
            "family": "inet6",
            "type": "stream",
            "listening": True,
            "address": f"[::1]:{port}",
        }
    ]


def test_fds_json_reports_a_unix_socket_file(peer: str, short_dir: Path) -> None:
    path = str(short_dir / "http.sock")
    status, report, err = run_fds_json(peer, short_dir, path, socket.AF_UNIX, path)
    assert status == 0, err
    assert report["fds"] == [
        {"fd": 3, "name": "http", "family": "unix", "type": "stream", "listening": True, "address": path}
    ]


def test_fds_json_with_a_matching_manifest_names_the_manifest_socket(peer: str, short_dir: Path) -> None:
    # free_port: systemd-socket-activate -l refuses port 0 ("Failed to parse socket address").
    port = free_port()
    manifest = echo_manifest(short_dir, f"127.0.0.1:{port}", name="http")
    status, report, err = run_fds_json(
        peer, short_dir, f"127.0.0.1:{port}", socket.AF_INET, ("127.0.0.1", port), str(manifest)
    )
    assert status == 0, err
    assert [(entry["fd"], entry["name"], entry["socket"]) for entry in report["fds"]] == [(3, "http", "http")]
    assert "trio-activate:" not in err  # no warning: it matches


def test_fds_json_with_a_manifest_that_does_not_match_exits_2_after_the_report(
    peer: str, short_dir: Path
) -> None:
    # free_port: systemd-socket-activate -l refuses port 0 ("Failed to parse socket address").
    port = free_port()
    manifest = echo_manifest(short_dir, f"127.0.0.1:{port}", name="web")
    status, report, err = run_fds_json(
        peer, short_dir, f"127.0.0.1:{port}", socket.AF_INET, ("127.0.0.1", port), str(manifest)
    )
    assert status == 2
    assert [(entry["name"], entry["socket"]) for entry in report["fds"]] == [("http", None)]
    problems = [line for line in err.splitlines() if line.startswith("trio-activate: ")]
    assert len(problems) == 1, err
    assert "sockets.web" in problems[0]
    assert "'http'" in problems[0]


# --- fds --json without a peer: not activated, and malformed variables ------------------
# (These need no systemd-socket-activate, so they are never skipped for lack of it.)


def test_fds_json_without_listen_variables_is_not_activated_and_exits_0() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    result = subprocess.run(
        [*TRIO_ACTIVATE, "fds", "--json"], capture_output=True, text=True, env=env, timeout=TIMEOUT
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["activated"] is False
    assert isinstance(report["reason"], str)
    assert report["reason"]
    assert report["fds"] == []


def test_fds_json_with_listen_fds_0_is_one_line_and_exits_2() -> None:
    result = subprocess.run(
        ["/bin/sh", "-c", 'LISTEN_PID=$$ LISTEN_FDS=0 exec "$0" "$@"', *TRIO_ACTIVATE, "fds", "--json"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("trio-activate: LISTEN_FDS='0': ")
    assert "Traceback" not in result.stderr


# --- serve under systemd-socket-activate ------------------------------------


def test_serve_adopts_a_named_tcp_listener_and_stops_on_sigterm(peer: str, short_dir: Path) -> None:
    # free_port: systemd-socket-activate -l refuses port 0 ("Failed to parse socket address").
    port = free_port()
    manifest = echo_manifest(short_dir, f"127.0.0.1:{port}")
    cmd = [peer, "-l", f"127.0.0.1:{port}", "--fdname=echo", *TRIO_ACTIVATE, "serve", str(manifest)]
    with started(cmd) as run:
        with connect(run, socket.AF_INET, ("127.0.0.1", port)) as client:
            assert echo_once(client, b"hello through systemd\n") == b"hello through systemd\n"
        with connect(run, socket.AF_INET, ("127.0.0.1", port)) as client:
            assert echo_once(client, b"again") == b"again"
        status = run.stop()
        err = run.log
    assert status == 0, err
    # Adopted as passed by a manager, in place: the PID the peer had is the server's.
    assert f"pid {run.pid}, 1 socket passed in LISTEN_FDS" in err


def test_serve_adopts_a_datagram_socket_and_answers_the_datagram_that_started_it(
    peer: str, short_dir: Path
) -> None:
    # free_port: systemd-socket-activate -l refuses port 0 ("Failed to parse socket address").
    port = free_port(kind=socket.SOCK_DGRAM)
    manifest = write_manifest(
        short_dir,
        f"""
[sockets.udp]
listen = "127.0.0.1:{port}"
type = "datagram"

[handlers.udp]
socket = "udp"
call = "trio_activate.examples:udp_echo"
""",
    )
    cmd = [
        peer,
        "--datagram",
        "-l",
        f"127.0.0.1:{port}",
        "--fdname=udp",
        *TRIO_ACTIVATE,
        "serve",
        str(manifest),
    ]
    with started(cmd) as run:
        run.wait_for_text(f"Listening on 127.0.0.1:{port}")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(TIMEOUT)
            # One datagram only: it wakes the peer, which execs; it waits in the
            # socket's queue until the adopted socket reads it.
            client.sendto(b"ping", ("127.0.0.1", port))
            data, sender = client.recvfrom(65536)
        status = run.stop()
        err = run.log
    assert (data, sender) == (b"ping", ("127.0.0.1", port))
    assert status == 0, err
    assert "socket passed in LISTEN_FDS" in err


@pytest.mark.parametrize("fdname", [[], ["--fdname=echo"]], ids=["unnamed", "named"])
def test_serve_under_accept_serves_each_connection_in_a_fresh_process_that_exits_0(
    peer: str, short_dir: Path, fdname: list[str]
) -> None:
    """With --fdname, systemd-socket-activate names the connection: still an Accept=yes connection."""
    # free_port: systemd-socket-activate -l refuses port 0 ("Failed to parse socket address").
    port = free_port()
    manifest = echo_manifest(short_dir, f"127.0.0.1:{port}")
    cmd = [peer, "--accept", "-l", f"127.0.0.1:{port}", *fdname, *TRIO_ACTIVATE, "serve", str(manifest)]
    with started(cmd) as run:
        for payload in (b"first connection\n", b"second connection\n"):
            with connect(run, socket.AF_INET, ("127.0.0.1", port)) as client:
                assert echo_once(client, payload) == payload
                client.shutdown(socket.SHUT_WR)
                assert client.recv(1) == b""  # the handler returned and closed its end
        # The peer reports each child's exit; wait for both (bounded).
        wait_until(lambda: len(re.findall(r"Child \d+ died", run.log)) >= 2, what="both children died")
        err = run.log
    spawned = re.findall(r"as PID (\d+)\.", err)
    died = re.findall(r"Child (\d+) died with code (\d+)", err)
    assert len(set(spawned)) == 2, err  # one fresh process per connection
    assert sorted(died) == sorted((pid, "0") for pid in spawned), err
    assert err.count("Accept=yes: serving one connection with handlers.echo") == 2
