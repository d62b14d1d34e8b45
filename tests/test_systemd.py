"""The generated units under the real systemd, booted as PID 1 of fresh namespaces.

Every test boots its own manager (`systemd_machine.SystemdMachine`, about
0.1 s), installs the units `trio-activate systemd` writes for a manifest,
and asserts on what systemd itself reports: ``systemctl show`` (states, the
main PID, the status text, restarts, the result) and the journal.  Clients
run in the manager's network namespace, on its 127.0.0.1, so the ports are
the manifests' own and nothing on the host can be in the way.

Skipped with the reason only where the machine cannot boot systemd (not
root, no cgroup2, no unshare); CI sets ``REQUIRE_INTEROP_PEERS=1``, which
turns that skip into a failure.
"""

from __future__ import annotations

import json
import re
import socket
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import TRIO_ACTIVATE, wait_until, write_asgi_app, write_manifest
from helpers.systemd import (
    CONFIG,
    UNCLEAN,
    assert_clean,
    echo_service_manifest,
    one_socket_manifest,
    read_line,
    round_trip,
    service_processes,
    start_by_first_connection,
    units_for,
)
from helpers.systemd_machine import SystemdMachine

pytestmark = pytest.mark.systemd

# --- the examples, as shipped ---------------------------------------------------


def test_echo_listens_before_the_service_runs_and_the_first_connection_starts_it(
    machine: SystemdMachine, tmp_path: Path
) -> None:
    machine.install(units_for(CONFIG / "echo.toml", tmp_path / "units"))
    machine.systemctl("start", "echo-echo.socket")
    socket_unit = machine.show("echo-echo.socket", "ActiveState", "SubState", "FileDescriptorName", "Listen")
    assert socket_unit["SubState"] == "listening"
    assert socket_unit["FileDescriptorName"] == "echo"
    assert machine.show("echo.service", "ActiveState")["ActiveState"] == "inactive"

    assert round_trip(machine, ("127.0.0.1", 7000), b"hello\n") == b"hello\n"
    service = machine.wait_for("echo.service", ActiveState="active", SubState="running")
    shown = machine.show("echo.service", "MainPID", "StatusText")
    assert shown["StatusText"].startswith("Generation 1: 1 worker(s)"), shown
    assert "sockets.echo: 127.0.0.1:7000 stream (fd 3)" in machine.journal("echo.service"), service

    machine.systemctl("stop", "echo.service", "echo-echo.socket")
    with pytest.raises(ConnectionRefusedError):
        round_trip(machine, ("127.0.0.1", 7000))
    assert machine.show("echo.service", "Result")["Result"] == "success"
    assert_clean(machine, "echo.service")


def test_udp_echo_is_started_by_its_first_datagram(machine: SystemdMachine, tmp_path: Path) -> None:
    machine.install(units_for(CONFIG / "udp-echo.toml", tmp_path / "units"))
    machine.systemctl("start", "udp-echo-udp.socket")
    with machine.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(10)
        client.sendto(b"first", ("127.0.0.1", 7001))
        assert client.recvfrom(100)[0] == b"first"
    machine.wait_for("udp-echo.service", ActiveState="active")
    machine.systemctl("stop", "udp-echo.service", "udp-echo-udp.socket")
    assert_clean(machine, "udp-echo.service")


@pytest.mark.parametrize(
    ("example", "service", "port"),
    [("http.toml", "hello-http", 8080), ("listener.toml", "listener-echo", 7002)],
)
def test_tcp_examples_serve_through_their_units(
    machine: SystemdMachine, tmp_path: Path, example: str, service: str, port: int
) -> None:
    units = units_for(CONFIG / example, tmp_path / "units")
    machine.install(units)
    sockets = [name for name in units if name.endswith(".socket")]
    machine.systemctl("start", *sockets)
    if example == "http.toml":
        for host in ("127.0.0.1", "::1"):
            with machine.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as client:
                client.settimeout(10)
                client.connect((host, port))
                client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                assert client.recv(100).startswith(b"HTTP/1.1 200 ")
    else:
        # config/listener_app.py answers in capitals.
        assert round_trip(machine, ("127.0.0.1", port), b"through a listener\n") == b"THROUGH A LISTENER\n"
    machine.wait_for(f"{service}.service", ActiveState="active")
    machine.systemctl("stop", f"{service}.service", *sockets)
    assert_clean(machine, f"{service}.service")


def test_unix_example_keeps_mode_and_names_and_removes_its_file_on_stop(
    machine: SystemdMachine, tmp_path: Path
) -> None:
    path = Path("/tmp/trio-activate-echo.sock")
    if path.exists():
        pytest.skip(f"{path} exists on this machine: the example's path is taken")
    machine.install(units_for(CONFIG / "unix.toml", tmp_path / "units"))
    sockets = ["unix-echo-file.socket", "unix-echo-abstract.socket", "unix-echo-packets.socket"]
    try:
        machine.systemctl("start", *sockets)
        assert path.is_socket()
        assert path.stat().st_mode & 0o777 == 0o660
        for unit, name in zip(sockets, ["file", "abstract", "packets"], strict=True):
            assert machine.show(unit, "FileDescriptorName")["FileDescriptorName"] == name
        assert round_trip(machine, str(path), b"by file\n") == b"by file\n"
        assert round_trip(machine, "\0trio-activate-echo", b"abstract\n") == b"abstract\n"
        with machine.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as client:
            client.settimeout(10)
            client.connect("\0trio-activate-packets")
            client.send(b"one message")
            assert client.recv(100) == b"one message"
        machine.systemctl("stop", "unix-echo.service", *sockets)
        assert not path.exists(), "RemoveOnStop=yes: stopping the socket removes its file"
        assert_clean(machine, "unix-echo.service")
    finally:
        if path.is_socket():
            path.unlink()


# --- reloads, restarts and stops ----------------------------------------------------


class ClientLoop:
    """Connections one after another until stopped (bounded in count and time); counts failures."""

    def __init__(
        self, machine: SystemdMachine, port: int, *, limit: int = 20_000, seconds: float = 60
    ) -> None:
        self.machine = machine
        self.port = port
        self.limit = limit
        self.deadline = time.monotonic() + seconds
        self.done = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def __enter__(self) -> ClientLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        with self.machine.netns():
            while not self._stop.is_set() and self.done < self.limit and time.monotonic() < self.deadline:
                line = f"request {self.done}\n".encode()
                try:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=10) as client:
                        client.sendall(line)
                        answer = read_line(client)
                    if answer != line:
                        self.failures.append(f"{line!r} answered {answer!r}")
                except OSError as exc:
                    self.failures.append(f"{line!r}: {exc!r}")
                self.done += 1


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_reloads_lose_no_connection_and_restart_and_stop_drain_in_flight_work(
    each_machine: SystemdMachine, tmp_path: Path, workers: int
) -> None:
    machine = each_machine
    manifest = echo_service_manifest(tmp_path / "svc", "reloading", 7100, workers=workers)
    main_pid = start_by_first_connection(machine, manifest, tmp_path / "units", 7100)

    with ClientLoop(machine, 7100, seconds=30) as clients:
        for number in range(2, 12):
            machine.systemctl("reload", "reloading.service")
            shown = machine.show("reloading.service", "ActiveState", "MainPID", "StatusText", "ReloadResult")
            assert shown["ActiveState"] == "active", "systemctl reload returns once the new code serves"
            assert shown["StatusText"].startswith(f"Generation {number}: {workers} worker(s)"), shown
            assert shown["MainPID"] == main_pid
            assert shown["ReloadResult"] == "success"
    assert clients.done > 10
    assert clients.failures == []
    journal = machine.journal("reloading.service")
    assert journal.count("systemd[1]: Reloaded reloading.service") == 10, journal
    # ExecReload= asks over the control socket in the unit's runtime directory; no signal starts one.
    assert journal.count("reload (control socket): starting generation") == 10, "one per systemctl reload"
    assert "reload (SIGHUP)" not in journal

    for action in ("restart", "stop"):
        with machine.connect(("127.0.0.1", 7100)) as in_flight:
            in_flight.sendall(b"before\n")
            assert read_line(in_flight) == b"before\n"
            stops = machine.journal("reloading.service").count("stopping: ")
            machine.systemctl(action, "--no-block", "reloading.service")
            machine.wait_for("reloading.service", ActiveState="deactivating")
            wait_until(
                lambda: machine.journal("reloading.service").count("stopping: ") > stops,  # noqa: B023
                what=f"{action}: the service logs its stop",
            )
            in_flight.sendall(b"during the stop\n")
            assert read_line(in_flight) == b"during the stop\n", f"{action}: the connection drains"
        if action == "restart":
            machine.wait_for("reloading.service", ActiveState="active")
    machine.wait_for("reloading.service", ActiveState="inactive")
    assert machine.show("reloading.service", "Result", "NRestarts") == {"Result": "success", "NRestarts": "0"}
    assert_clean(machine, "reloading.service")


def test_a_supervisor_killed_with_sigkill_is_restarted_and_no_client_is_refused(
    machine: SystemdMachine, tmp_path: Path
) -> None:
    manifest = echo_service_manifest(tmp_path / "svc", "crashing", 7150, workers=2)
    main_pid = start_by_first_connection(machine, manifest, tmp_path / "units", 7150)

    with ClientLoop(machine, 7150) as clients:
        wait_until(lambda: clients.done >= 5, what="the clients are under way")
        machine.systemctl("kill", "--kill-who=main", "--signal=SIGKILL", "crashing.service")
        machine.wait_for("crashing.service", NRestarts="1", ActiveState="active", timeout=30)
        served_before = clients.done
        deadline = time.monotonic() + 10
        while clients.done < served_before + 20 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert machine.show("crashing.service", "MainPID")["MainPID"] != main_pid
    assert clients.done >= served_before + 20, "the restarted service serves"
    # The socket belongs to systemd: while nobody serves, clients wait in its backlog.  Only
    # connections a killed worker was serving at that instant can fail (reset), never refused.
    assert not any("ConnectionRefused" in failure for failure in clients.failures), clients.failures
    assert len(clients.failures) <= 2, clients.failures
    assert machine.show("crashing-echo.socket", "SubState")["SubState"] == "running"
    assert service_processes(machine).count(" serve ") == 3, "the supervisor and its two workers"
    machine.systemctl("stop", "crashing.service")
    # No worker of the killed supervisor outlived it.
    assert service_processes(machine) == ""


def test_a_reload_whose_new_code_fails_fails_and_the_old_code_keeps_serving(
    each_machine: SystemdMachine, tmp_path: Path
) -> None:
    machine = each_machine
    folder = tmp_path / "svc"
    manifest = one_socket_manifest(folder, "versioned", 7200, "versioned_app:handle")
    (folder / "versioned_app.py").write_text(
        "async def handle(stream):\n    await stream.send_all(b'v1\\n')\n"
    )
    start_by_first_connection(machine, manifest, tmp_path / "units", 7200, answer=b"v1\n")

    main_pid = machine.show("versioned.service", "MainPID")["MainPID"]

    (folder / "versioned_app.py").write_text("async def handle(stream) this is not Python\n")
    result = machine.systemctl("reload", "versioned.service", check=False)
    assert result.returncode != 0, "systemctl reload fails when the new code cannot start"
    journal = machine.journal("versioned.service")
    assert "handlers.web.call: cannot import 'versioned_app'" in journal, "the reason, in the journal"
    assert "Reload failed for versioned.service" in journal
    shown = machine.show("versioned.service", "ActiveState", "MainPID", "StatusText", "ReloadResult")
    assert shown["StatusText"].startswith("Reload failed: generation 2: worker "), shown
    assert shown["StatusText"].endswith("still serving generation 1"), shown
    assert (shown["ActiveState"], shown["MainPID"], shown["ReloadResult"]) == (
        "active",
        main_pid,
        "exit-code",
    )
    assert round_trip(machine, ("127.0.0.1", 7200)) == b"v1\n", "the old code keeps serving"

    (folder / "versioned_app.py").write_text(
        "async def handle(stream):\n    await stream.send_all(b'v2\\n')\n"
    )
    machine.systemctl("reload", "versioned.service")
    assert machine.show("versioned.service", "StatusText")["StatusText"].startswith("Generation 3: ")
    assert round_trip(machine, ("127.0.0.1", 7200)) == b"v2\n"
    machine.systemctl("stop", "versioned.service")
    assert_clean(machine, "versioned.service", errors_expected=True)


def test_a_stop_during_a_reload_stops_both_generations_and_leaves_no_process(
    machine: SystemdMachine, tmp_path: Path
) -> None:
    folder = tmp_path / "svc"
    manifest = one_socket_manifest(folder, "slow-reload", 7250, "slow_app:handle")
    app = folder / "slow_app.py"
    app.write_text("async def handle(stream):\n    await stream.send_all(b'v1\\n')\n")
    start_by_first_connection(machine, manifest, tmp_path / "units", 7250, answer=b"v1\n")

    # The new code takes 3 s to import: the stop comes while generation 2 starts.
    app.write_text("import time\ntime.sleep(3)\n" + app.read_text())
    machine.systemctl("reload", "--no-block", "slow-reload.service")
    machine.wait_for("slow-reload.service", ActiveState="reloading")
    wait_until(
        lambda: "starting generation 2" in machine.journal("slow-reload.service"),
        what="generation 2 starts",
    )
    machine.systemctl("stop", "slow-reload.service")
    shown = machine.show("slow-reload.service", "ActiveState", "Result")
    assert shown == {"ActiveState": "inactive", "Result": "success"}, machine.journal("slow-reload.service")
    assert service_processes(machine) == ""
    journal = machine.journal("slow-reload.service")
    for word in UNCLEAN:
        assert word not in journal, journal


@pytest.mark.slow
def test_a_handler_that_cannot_be_imported_fails_the_unit_and_the_socket_keeps_listening(
    machine: SystemdMachine, tmp_path: Path
) -> None:
    folder = tmp_path / "svc"
    manifest = one_socket_manifest(folder, "broken", 7300, "broken_app:handle")
    machine.install(units_for(manifest, tmp_path / "units"))
    machine.systemctl("start", "broken-web.socket")
    with machine.connect(("127.0.0.1", 7300), timeout=30) as client:
        client.sendall(b"anyone?\n")
        # The service that cannot start closes what waited for it, so systemd
        # does not start it again and again for the same connection (closed
        # with our line unread: a reset).
        with pytest.raises(ConnectionResetError):
            read_line(client)
    shown = machine.wait_for("broken.service", ActiveState="failed")
    assert machine.show("broken.service", "Result", "ExecMainStatus", "NRestarts") == {
        "Result": "exit-code",
        "ExecMainStatus": "2",
        "NRestarts": "0",
    }, shown
    journal = machine.journal("broken.service")
    # The worker's line, with its PID, at error priority: the one error line (the supervisor's
    # line about the same worker is info: it stops at once, the worker said why).
    errors = machine.run("journalctl", "--no-pager", "-q", "-p", "err", "-u", "broken.service").stdout
    said = re.findall(r"trio-activate\[\d+\]: (.*)", errors)
    assert len(said) == 1, errors
    found = re.match(
        r"worker (\d+): service.toml: handlers.web.call: cannot import 'broken_app': No module named", said[0]
    )
    assert found, errors
    assert re.search(
        rf"generation 1: worker {found[1]} exited with status 2 before it was ready: "
        r"a configuration error; stopping",
        journal,
    ), journal
    assert "Traceback" not in journal
    assert machine.show("broken-web.socket", "ActiveState", "SubState") == {
        "ActiveState": "active",
        "SubState": "listening",
    }

    (folder / "broken_app.py").write_text(
        "async def handle(stream):\n    await stream.send_all(b'fixed\\n')\n"
    )
    assert round_trip(machine, ("127.0.0.1", 7300)) == b"fixed\n"
    machine.wait_for("broken.service", ActiveState="active")
    machine.systemctl("stop", "broken.service", "broken-web.socket")


# --- the journal -------------------------------------------------------------------


@pytest.mark.slow
def test_the_journal_has_each_line_once_at_its_priority(machine: SystemdMachine, tmp_path: Path) -> None:
    """Lines come with their syslog priority (``journalctl -p`` filters) and no prefix of ours:
    journald adds ``trio-activate[PID]:`` itself.  A worker's lines name the worker."""
    folder = tmp_path / "svc"
    manifest = write_manifest(
        folder,
        """
        [service]
        name = "logging"
        workers = 2

        [sockets.web]
        listen = "127.0.0.1:7700"
        [sockets.spare]
        listen = "127.0.0.1:7701"
        [sockets.idle]
        listen = "127.0.0.1:7702"

        [handlers.web]
        socket = "web"
        call = "trio_activate.examples:echo"
        [handlers.spare]
        socket = "spare"
        kind = "listener"
        call = "quitter:run"
        """,
    )
    (folder / "quitter.py").write_text("async def run(listeners):\n    return\n")
    start_by_first_connection(machine, manifest, tmp_path / "units", 7700)
    wait_until(
        lambda: machine.journal("logging.service").count("it serves no more") == 2,
        what="each worker's warning",
    )
    journal = machine.journal("logging.service")
    warnings = machine.run(
        "journalctl",
        "--no-pager",
        "-o",
        "short-monotonic",
        "--no-hostname",
        "-p",
        "warning",
        "-u",
        "logging.service",
    ).stdout
    # The supervisor's warning (the manifest's), and each worker's, with the worker's PID.
    assert "sockets.idle: no handler serves this socket" in warnings, warnings
    returned = re.findall(
        r"worker (\d+): handlers.spare \(sockets.spare\) returned; it serves no more", warnings
    )
    assert len(set(returned)) == 2, warnings
    # Not the info lines, which the journal has.
    assert "ready: generation 1, 2 worker(s)" in journal
    assert "ready: " not in warnings, warnings
    assert "supervising logging" not in warnings, warnings
    # Each line as journald shows it: its own prefix once, no level word, no <N>.
    ours = [line for line in journal.splitlines() if "trio-activate[" in line]
    assert ours, journal
    for line in ours:
        assert not re.search(r"trio-activate\[\d+\]: .*trio-activate\[", line), line
        assert not re.search(r"\]: <\d>|: (info|warning|error|debug): ", line), line
    machine.systemctl(
        "stop", "logging.service", "logging-web.socket", "logging-spare.socket", "logging-idle.socket"
    )


# --- the watchdog ----------------------------------------------------------------


@pytest.mark.slow
def test_the_watchdog_spares_a_healthy_service_and_restarts_one_whose_loop_is_blocked(
    machine: SystemdMachine, tmp_path: Path
) -> None:
    folder = tmp_path / "svc"
    manifest = one_socket_manifest(
        folder, "watched", 7500, "watched_app:handle", service_keys="watchdog = 1.0"
    )
    (folder / "watched_app.py").write_text(
        textwrap.dedent(
            """\
            import time

            async def handle(stream):
                request = await stream.receive_some(100)
                if request == b"block\\n":
                    time.sleep(30)  # blocks the whole Trio loop: no checkpoint
                await stream.send_all(request)
            """
        )
    )
    main_pid = start_by_first_connection(machine, manifest, tmp_path / "units", 7500)
    assert "WatchdogSec=1" in (tmp_path / "units" / "watched.service").read_text().splitlines()

    time.sleep(3.5)  # over three periods
    assert machine.show("watched.service", "ActiveState", "MainPID", "NRestarts") == {
        "ActiveState": "active",
        "MainPID": main_pid,
        "NRestarts": "0",
    }

    with machine.connect(("127.0.0.1", 7500)) as client:
        client.sendall(b"block\n")
        machine.wait_for("watched.service", NRestarts="1")
    machine.wait_for("watched.service", ActiveState="active")
    assert machine.show("watched.service", "MainPID")["MainPID"] != main_pid
    journal = machine.journal("watched.service")
    assert "has not pinged the watchdog" in journal
    assert "Watchdog timeout" in journal
    assert round_trip(machine, ("127.0.0.1", 7500)) == b"ping\n", "restarted, it serves again"
    machine.systemctl("stop", "watched.service")


# --- Accept=yes ---------------------------------------------------------------------


@pytest.mark.slow
def test_accept_yes_serves_each_connection_in_a_process_of_its_own(
    machine: SystemdMachine, tmp_path: Path
) -> None:
    folder = tmp_path / "svc"
    manifest = one_socket_manifest(
        folder, "per-connection", 7600, "pid_app:handle", socket="conn", socket_keys="accept = true"
    )
    (folder / "pid_app.py").write_text(
        textwrap.dedent(
            """\
            import os

            async def handle(stream):
                line = await stream.receive_some(100)
                await stream.send_all(f"{os.getpid()} ".encode() + line)
            """
        )
    )
    units = units_for(manifest, tmp_path / "units")
    assert sorted(units) == ["per-connection-conn.socket", "per-connection-conn@.service"]
    assert "Accept=yes" in units["per-connection-conn.socket"].splitlines()
    machine.install(units)
    machine.systemctl("start", "per-connection-conn.socket")

    pids = []
    deadline = time.monotonic() + 60
    for number in range(50):
        assert time.monotonic() < deadline, f"only {number} connections within 60 s"
        pid, _, echoed = round_trip(
            machine, ("127.0.0.1", 7600), f"connection {number}\n".encode()
        ).partition(b" ")
        assert echoed == f"connection {number}\n".encode()
        pids.append(int(pid))
    assert len(set(pids)) == 50, "each connection had a process of its own"
    shown = machine.show("per-connection-conn.socket", "NAccepted", "ActiveState")
    assert shown == {"NAccepted": "50", "ActiveState": "active"}
    journal = machine.journal()
    assert "Accept=yes: serving one connection with handlers.conn" in journal
    assert "Traceback" not in journal
    machine.systemctl("stop", "per-connection-conn.socket")


# --- the fd store -------------------------------------------------------------------

FD_STORE_MANIFEST = """
[service]
name = "stored"
fd-store = true
grace-period = 5.0

[sockets.web]
listen = "127.0.0.1:7700"

[sockets.admin]
listen = "127.0.0.1:7701"

[handlers.echo]
socket = ["web", "admin"]
call = "trio_activate.examples:echo"
"""


@pytest.mark.slow
def test_fd_store_keeps_the_sockets_of_a_service_without_socket_units_across_restarts(
    each_machine: SystemdMachine, tmp_path: Path
) -> None:
    """No .socket unit: the service makes its sockets, stores them once ready, and every
    ``systemctl restart`` passes them back under their names while clients queue."""
    machine = each_machine
    manifest = write_manifest(tmp_path / "svc", FD_STORE_MANIFEST)
    units = units_for(manifest, tmp_path / "units", version=machine.version)
    assert sorted(units) == ["stored.service"], "fd-store: no .socket unit"
    machine.install(units)
    machine.systemctl("start", "stored.service")
    shown = machine.show("stored.service", "MainPID", "NFileDescriptorStore", "FileDescriptorStoreMax")
    assert (shown["NFileDescriptorStore"], shown["FileDescriptorStoreMax"]) == ("2", "2"), shown
    journal = machine.journal("stored.service")
    assert journal.count("stored in the service manager's fd store") == 2, journal
    pids = {shown["MainPID"]}

    with ClientLoop(machine, 7700, seconds=120) as clients:
        for restart in range(1, 6):
            served = clients.done
            wait_until(lambda: clients.done >= served + 5, what="clients are served")  # noqa: B023
            # Six starts within StartLimitIntervalSec= (10 s) would hit StartLimitBurst= (5).
            machine.systemctl("reset-failed", "stored.service")
            machine.systemctl("restart", "stored.service")
            shown = machine.show("stored.service", "ActiveState", "MainPID", "NFileDescriptorStore")
            assert shown["ActiveState"] == "active"
            assert shown["NFileDescriptorStore"] == "2", f"restart {restart}: {shown}"
            pids.add(shown["MainPID"])
        served = clients.done
        wait_until(lambda: clients.done >= served + 5, what="the last restart serves")
    assert len(pids) == 6, "each restart started a new main process"
    print("MEASURED", clients.done, len(clients.failures), clients.failures[:2])
    assert clients.done > 50
    assert clients.failures == [], f"{len(clients.failures)} of {clients.done}: {clients.failures[:3]}"
    journal = machine.journal("stored.service")
    # The supervisor (the main process) got them back; its workers, from it.  Two sockets:
    # fds passed without names would fail adoption, under each other's a warning (assert_clean).
    assert len(re.findall(r"sockets\.web \(fd [34]\) was passed in LISTEN_FDS", journal)) == 5, journal
    assert len(re.findall(r"sockets\.admin \(fd [34]\) was passed in LISTEN_FDS", journal)) == 5, journal
    assert len(re.findall(r"sockets\.web: 127\.0\.0\.1:7700 stream \(fd [34]\)", journal)) == 6, journal
    assert len(re.findall(r"sockets\.admin: 127\.0\.0\.1:7701 stream \(fd [34]\)", journal)) == 6, journal
    assert journal.count("stored in the service manager's fd store") == 2, "stored once, by the first"
    assert round_trip(machine, ("127.0.0.1", 7701)) == b"ping\n"
    assert_clean(machine, "stored.service")

    # A socket the manifest drops: removed from the store at the next restart, and closed.
    (tmp_path / "svc" / "service.toml").write_text(
        FD_STORE_MANIFEST.replace('[sockets.admin]\nlisten = "127.0.0.1:7701"\n', "").replace(
            '["web", "admin"]', '"web"'
        )
    )
    machine.systemctl("reset-failed", "stored.service")
    machine.systemctl("restart", "stored.service")
    wait_until(
        lambda: machine.show("stored.service", "NFileDescriptorStore")["NFileDescriptorStore"] == "1",
        what="the dropped socket leaves the store",
    )
    assert "fd store: removed 'admin'" in machine.journal("stored.service")
    with pytest.raises(ConnectionRefusedError):
        round_trip(machine, ("127.0.0.1", 7701))
    assert round_trip(machine, ("127.0.0.1", 7700)) == b"ping\n"

    # A socket the manifest adds (admin again): not in the store, so the service makes it and
    # stores it; the next restart passes it back under its name.
    (tmp_path / "svc" / "service.toml").write_text(FD_STORE_MANIFEST)
    for _ in range(2):
        machine.systemctl("reset-failed", "stored.service")
        machine.systemctl("restart", "stored.service")
        wait_until(
            lambda: machine.show("stored.service", "NFileDescriptorStore")["NFileDescriptorStore"] == "2",
            what="the added socket in the store",
        )
        assert round_trip(machine, ("127.0.0.1", 7701)) == b"ping\n"
    journal = machine.journal("stored.service")
    created = "sockets.admin: no fd was passed for it (new in the manifest): created on 127.0.0.1:7701"
    assert journal.count(created) == 1, journal
    assert len(re.findall(r"sockets\.admin \(fd [34]\) was passed in LISTEN_FDS", journal)) == 6, journal
    machine.systemctl("stop", "stored.service")
    with pytest.raises(ConnectionRefusedError):
        round_trip(machine, ("127.0.0.1", 7700))


def http_get(machine: SystemdMachine, port: int) -> bytes:
    """The body of ``GET /`` on 127.0.0.1:`port` inside the machine (HTTP/1.0: one request, no chunks)."""
    with machine.connect(("127.0.0.1", port), timeout=60) as client:
        client.sendall(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n")
        answer = b""
        while chunk := client.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b" ", 2)[1] == b"200", answer
    return body


def test_an_asgi_app_starts_on_its_first_request_reloads_and_stops_under_systemd(
    machine: SystemdMachine, tmp_path: Path
) -> None:
    """kind = "asgi" under the real manager: the .socket unit starts it, `systemctl reload` (ExecReload=
    reload --wait) returns once the new code answers, `systemctl stop` drains and leaves nothing."""
    folder = tmp_path / "svc"
    folder.mkdir()
    write_asgi_app(folder / "web_app.py", "v1")
    manifest = write_manifest(
        folder,
        """
        [service]
        name = "asgi"
        grace-period = 2
        # Generous: a worker imports hypercorn and trio, slow on a loaded 2-core machine.
        start-timeout = 60
        python-path = ["."]

        [sockets.web]
        listen = "127.0.0.1:7700"

        [handlers.web]
        socket = "web"
        kind = "asgi"
        call = "web_app:app"
        """,
    )
    units = units_for(manifest, tmp_path / "units", version=machine.version)
    machine.install(units)
    machine.systemctl("start", "asgi-web.socket")
    assert http_get(machine, 7700) == b"v1"
    machine.wait_for("asgi.service", ActiveState="active")
    main_pid = machine.show("asgi.service", "MainPID")["MainPID"]

    write_asgi_app(folder / "web_app.py", "v2")
    machine.systemctl("reload", "asgi.service")
    shown = machine.show("asgi.service", "ActiveState", "MainPID", "ReloadResult")
    assert shown == {"ActiveState": "active", "MainPID": main_pid, "ReloadResult": "success"}
    assert {http_get(machine, 7700) for _ in range(5)} == {b"v2"}

    machine.systemctl("stop", "asgi.service")
    machine.wait_for("asgi.service", ActiveState="inactive")
    assert machine.show("asgi.service", "Result")["Result"] == "success"
    assert_clean(machine, "asgi.service")


# --- the control socket -------------------------------------------------------------


def control_status(machine: SystemdMachine, *target: str, as_owner_of: str | None = None) -> dict[str, Any]:
    """``trio-activate status --json TARGET`` inside the machine: as root, or with `as_owner_of` (a PID
    of the service) as the service's user in the service's own namespaces, as ``ExecReload=`` runs."""
    command = [*TRIO_ACTIVATE, "status", "--json", *target]
    if as_owner_of is not None:
        owner = machine.run("stat", "-c", "%u %g", f"/proc/{as_owner_of}").stdout.split()
        command = ["nsenter", "-t", as_owner_of, "-a", "-S", owner[0], "-G", owner[1], *command]
    result = machine.run(*command)
    status = json.loads(result.stdout)
    assert isinstance(status, dict), result.stdout
    return status


def cgroup_processes(machine: SystemdMachine, unit: str) -> set[int]:
    cgroup = machine.show(unit, "ControlGroup")["ControlGroup"]
    return {int(pid) for pid in machine.run("cat", f"/sys/fs/cgroup{cgroup}/cgroup.procs").stdout.split()}


def test_the_control_socket_is_in_the_runtime_directory_and_answers_status_and_reload_under_systemd(
    each_machine: SystemdMachine, tmp_path: Path
) -> None:
    """No manifest key: the unit's RuntimeDirectory= gives the supervisor $RUNTIME_DIRECTORY/control.sock
    (0600); `status` finds it by MainPID and by path, `systemctl reload` waits on it, and `systemctl
    stop` leaves neither the socket, the folder nor a process."""
    machine = each_machine
    folder = tmp_path / "svc"
    manifest = one_socket_manifest(
        folder,
        "controlled",
        7800,
        "versioned_app:handle",
        service_keys="workers = 2\ngrace-period = 5.0",
    )
    app = folder / "versioned_app.py"
    app.write_text("async def handle(stream):\n    await stream.send_all(b'v1\\n')\n")
    assert "control =" not in manifest.read_text(), "no manifest key: the default"
    main_pid = start_by_first_connection(machine, manifest, tmp_path / "units", 7800, answer=b"v1\n")
    path = "/run/controlled/control.sock"

    owner = machine.run("stat", "-c", "%u", f"/proc/{main_pid}").stdout.strip()
    assert owner != "0"
    assert machine.run("stat", "-c", "%a %u %F", path).stdout.split() == ["600", owner, "socket"]
    assert machine.run("stat", "-c", "%a %u", "/run/controlled").stdout.split() == ["700", owner]
    # Any other user is kept out by the modes, before the service's own check of the peer's uid.
    stranger = machine.run(
        *("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c"),
        f"import socket; socket.socket(socket.AF_UNIX).connect({path!r})",
        check=False,
    )
    assert "PermissionError" in stranger.stderr, stranger

    first = control_status(machine, main_pid)
    assert control_status(machine, "--control", path)["workers"] == first["workers"]
    assert control_status(machine, "--control", path, as_owner_of=main_pid)["workers"] == first["workers"]
    assert (first["mode"], first["pid"], first["generation"], first["control"]) == (
        "supervisor",
        int(main_pid),
        1,
        path,
    )
    assert first["last_reload"] is None
    assert [(s["name"], s["address"], s["type"]) for s in first["sockets"]] == [
        ("web", "127.0.0.1:7800", "stream")
    ]
    workers = {worker["pid"] for worker in first["workers"]}
    assert len(workers) == 2
    assert cgroup_processes(machine, "controlled.service") == {int(main_pid), *workers}

    app.write_text("async def handle(stream):\n    await stream.send_all(b'v2\\n')\n")
    machine.systemctl("reload", "controlled.service")
    second = control_status(machine, main_pid)
    assert (second["generation"], second["last_reload"]["ok"]) == (2, True), second
    new_workers = {worker["pid"] for worker in second["workers"] if worker["generation"] == 2}
    assert len(new_workers) == 2
    assert not new_workers & workers
    wait_until(
        lambda: cgroup_processes(machine, "controlled.service") == {int(main_pid), *new_workers},
        what="generation 1 drains and leaves the cgroup",
    )
    assert round_trip(machine, ("127.0.0.1", 7800)) == b"v2\n"

    app.write_text("async def handle(stream) this is not Python\n")
    assert machine.systemctl("reload", "controlled.service", check=False).returncode != 0
    failed = control_status(machine, "--control", path)
    assert failed["generation"] == 2, failed
    assert failed["last_reload"]["ok"] is False, failed
    assert failed["last_reload"]["message"].endswith("still serving generation 2"), failed
    assert {worker["pid"] for worker in failed["workers"]} == new_workers
    assert round_trip(machine, ("127.0.0.1", 7800)) == b"v2\n"

    machine.systemctl("stop", "controlled.service")
    assert machine.show("controlled.service", "Result")["Result"] == "success"
    assert machine.run("test", "-e", "/run/controlled", check=False).returncode == 1, "folder removed"
    assert service_processes(machine) == ""
    assert_clean(machine, "controlled.service", errors_expected=True)
