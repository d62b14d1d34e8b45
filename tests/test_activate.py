"""``trio-activate activate``: the activator as a tool, against real consumers and the real peer.

The consumers are real programs: gunicorn (its own systemd support adopts
the socket), ``cat`` (``--inetd``), ``systemd-socket-activate`` on the same
consumer side by side, trio-activate's own ``serve``, and small Python
consumers written here that report what they were handed (their ``LISTEN_*``,
their PID and their fd table) over the connection they serve.

Every activator runs in a session of its own (`started`), whose whole group
is killed on the way out; servers bind 127.0.0.1 only.
"""

from __future__ import annotations

import json
import signal
import socket
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    TIMEOUT,
    TRIO_ACTIVATE,
    ClientLoop,
    Process,
    Reaper,
    ask,
    clean_env,
    echo_manifest,
    free_port,
    one_line_error,
    require_peer,
    run_cli,
    started,
    wait_until,
)

from trio_activate.errors import ActivationError
from trio_activate.model.activate_options import (
    ActivateMode,
    activate_options,
    child_environment,
)
from trio_activate.system.fds import own_pidfd_id

PYTHON = sys.executable

# A consumer that reports what it was handed: at its very first line (before any import opens
# an fd) its fd table, then LISTEN_*, its PID and what fd 3 is, as one JSON line, to the
# connection it accepts on fd 3 (or to fd 3 itself when that is a connection).
REPORTER = textwrap.dedent(
    """
    import os
    fds = sorted(int(n) for n in os.listdir("/proc/self/fd"))
    import json, signal, socket, sys
    def blocked(signum):
        for line in open("/proc/self/status"):
            if line.startswith("SigBlk:"):
                return bool(int(line.split()[1], 16) & (1 << (signum - 1)))
    report = {
        "pid": os.getpid(),
        "env": {k: v for k, v in os.environ.items() if k.startswith("LISTEN_") or k == "NOTIFY_SOCKET"},
        "fds": fds,
        "sigterm_blocked": blocked(signal.SIGTERM),
        "extra": os.environ.get("EXTRA"),
        "argv": sys.argv,
    }
    try:
        report["pidfd_id"] = os.fstat(os.pidfd_open(os.getpid())).st_ino
    except OSError:
        report["pidfd_id"] = None
    sock = socket.socket(fileno=3)
    report["listening"] = bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    report["type"] = sock.type.name
    if sock.type == socket.SOCK_DGRAM:
        data, peer = sock.recvfrom(100)
        report["datagram"] = data.decode()
        sock.sendto(json.dumps(report).encode(), peer)
    else:
        conn = sock.accept()[0] if report["listening"] else sock
        conn.sendall(json.dumps(report).encode() + b"\\n")
        conn.close()
    """
)

# One connection, answered with `helpers.ask`'s protocol ("TOKEN PID VERSION"), then exit 0:
# a command that exits after each request.
ONE_REQUEST = textwrap.dedent(
    """
    import os, socket, sys
    listener = socket.socket(fileno=3)
    conn, _ = listener.accept()
    token = b""
    while not token.endswith(b"\\n"):
        data = conn.recv(100)
        if not data:
            break
        token += data
    version = open(sys.argv[1]).read().strip() if len(sys.argv) > 1 else "v1"
    conn.sendall(token.strip() + b" %d %s\\n" % (os.getpid(), version.encode()))
    conn.close()
    """
)

# As ONE_REQUEST, but answering every connection until stopped.
SERVER = textwrap.dedent(
    """
    import os, socket, sys
    listener = socket.socket(fileno=3)
    while True:
        conn, _ = listener.accept()
        token = b""
        while not token.endswith(b"\\n"):
            data = conn.recv(100)
            if not data:
                break
            token += data
        version = open(sys.argv[1]).read().strip()
        conn.sendall(token.strip() + b" %d %s\\n" % (os.getpid(), version.encode()))
        conn.close()
    """
)


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


def activate(*args: str | Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> Any:
    return started([*TRIO_ACTIVATE, "activate", *map(str, args)], env=env or clean_env(), cwd=cwd)


def connect(run: Process, port: int, host: str = "127.0.0.1") -> socket.socket:
    """A connection to ``host:port``, once the activator listens there (it says so first)."""
    run.wait_for(rf"(listening on|bound to) \S*:{port}\b")
    client = socket.create_connection((host, port), timeout=TIMEOUT)
    return client


def read_all(client: socket.socket) -> bytes:
    with client:
        return b"".join(iter(lambda: client.recv(65536), b""))


def report_of(client: socket.socket) -> dict[str, Any]:
    data = read_all(client)
    assert data, "the consumer answered nothing"
    report: dict[str, Any] = json.loads(data)
    return report


def assert_names_itself(report: dict[str, Any]) -> None:
    """LISTEN_PID is the consumer's own PID, LISTEN_PIDFDID its own pidfd id where the kernel has pidfs."""
    assert report["env"]["LISTEN_PID"] == str(report["pid"])
    if own_pidfd_id() is not None:
        assert report["env"]["LISTEN_PIDFDID"] == str(report["pidfd_id"])
    else:
        assert "LISTEN_PIDFDID" not in report["env"]


@pytest.fixture
def reporter(tmp_path: Path) -> Path:
    return write(tmp_path, "reporter.py", REPORTER)


# --- the options, pure ---------------------------------------------------------------------


def test_modes_follow_the_options() -> None:
    base: dict[str, Any] = {"command": ["x"], "listen": ["127.0.0.1:1"]}
    assert activate_options(**base).mode is ActivateMode.LAZY
    assert activate_options(**base, now=True).mode is ActivateMode.NOW
    assert activate_options(**base, accept=True).mode is ActivateMode.ACCEPT
    inetd = activate_options(**base, inetd=True)
    assert (inetd.mode, inetd.inetd) == (ActivateMode.ACCEPT, True)
    restart = activate_options(**base, restart=True, now=True)
    assert (restart.mode, restart.restart_now) == (ActivateMode.RESTART, True)


@pytest.mark.parametrize(
    ("extra", "phrase"),
    [
        ({"accept": True, "restart": True}, "--accept and --restart"),
        ({"accept": True, "now": True}, "--now with --accept"),
        ({"datagram": True, "accept": True}, "datagram sockets have no connections"),
        ({"datagram": True, "seqpacket": True}, "a socket has one type"),
        ({"max_connections": 2}, "add --accept"),
        ({"watch": ["."]}, "add --restart"),
        ({"fdnames": ["a:b"]}, "gives 2 names for 1 socket"),
        ({"fdnames": ["a\tb"]}, "non-printable"),
        ({"manifest": "x.toml"}, "-l cannot be combined"),
        ({"setenv": ["LISTEN_FDS=3"]}, "sets LISTEN_FDS itself"),
        ({"setenv": ["=x"]}, "expected NAME=VALUE"),
        ({"listen": ["127.0.0.1:70000"]}, "-l '127.0.0.1:70000': port 70000 is out of range"),
        ({"command": []}, "no COMMAND given"),
        ({"listen": []}, "give -l ADDRESS"),
    ],
)
def test_conflicting_or_bad_options_are_one_line_naming_the_option(
    extra: dict[str, Any], phrase: str
) -> None:
    values: dict[str, Any] = {"command": ["x"], "listen": ["127.0.0.1:1"], **extra}
    with pytest.raises(ActivationError) as caught:
        activate_options(**values)
    assert phrase in str(caught.value)
    assert "\n" not in str(caught.value)


def test_one_fdname_names_every_socket_and_several_name_each_in_order() -> None:
    listen = ["127.0.0.1:1", "127.0.0.1:2"]
    one = activate_options(command=["x"], listen=listen, fdnames=["web"])
    assert [spec.name for spec in one.sockets] == ["web", "web"]
    both = activate_options(command=["x"], listen=listen, fdnames=["a", "b"])
    assert [spec.name for spec in both.sockets] == ["a", "b"]
    assert both.names_given
    assert not activate_options(command=["x"], listen=listen).names_given


def test_the_child_environment_drops_stale_listen_variables_and_notify_socket_and_adds_setenv() -> None:
    caller = {
        "PATH": "/bin",
        "LISTEN_PID": "1",
        "LISTEN_PIDFDID": "2",
        "LISTEN_FDS": "3",
        "LISTEN_FDNAMES": "a",
        "NOTIFY_SOCKET": "/run/n",
        "KEEP": "k",
    }
    assert child_environment(caller, [("NEW", "v")]) == {"PATH": "/bin", "KEEP": "k", "NEW": "v"}
    # -E NAME passes the caller's value on, the notify socket included; an absent NAME stays absent.
    kept = child_environment(caller, [("NOTIFY_SOCKET", None), ("ABSENT", None)])
    assert kept["NOTIFY_SOCKET"] == "/run/n"
    assert "ABSENT" not in kept


# --- usage errors on the command line -----------------------------------------------------


def test_a_busy_port_is_one_line_naming_the_option_and_address(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli("activate", "-l", f"127.0.0.1:{port}", "--", "true", cwd=tmp_path)
    assert result.returncode == 2
    assert one_line_error(result.stderr) == (
        f"trio-activate: activate: -l 127.0.0.1:{port}: "
        "address already in use (another process listens there)"
    )


def test_a_command_not_found_is_one_line_before_any_socket_is_made(short_dir: Path) -> None:
    result = run_cli("activate", "-l", "./s.sock", "--", "no-such-command-here", cwd=short_dir)
    assert result.returncode == 2
    assert one_line_error(result.stderr) == (
        "trio-activate: activate: COMMAND 'no-such-command-here' was not found on PATH"
    )
    assert not (short_dir / "s.sock").exists()


# --- lazy, --now, and systemd-socket-activate side by side --------------------------------


def test_lazy_execs_in_place_on_the_first_connection_with_listen_pid_naming_itself(reporter: Path) -> None:
    port = free_port()
    env = clean_env(LISTEN_PID="1", LISTEN_FDS="9", LISTEN_FDNAMES="stale", NOTIFY_SOCKET="/nowhere")
    with activate(
        "-l", f"127.0.0.1:{port}", "--fdname", "web", "-E", "EXTRA=yes", "--", PYTHON, reporter, env=env
    ) as run:
        found = run.wait_for(r"listening on 127\.0\.0\.1:(\d+) as fd 3 named 'web'")
        assert int(found[1]) == port
        # Nothing runs before the first connection: the activator is still itself.
        assert "activate" in Path(f"/proc/{run.pid}/cmdline").read_text().split("\0")
        report = report_of(connect(run, port))
        assert run.wait() == 0
    assert report["pid"] == run.pid  # exec in place: the same process
    env_seen = report["env"]
    assert env_seen["LISTEN_PID"] == str(run.pid)
    assert_names_itself(report)
    assert (env_seen["LISTEN_FDS"], env_seen["LISTEN_FDNAMES"]) == ("1", "web")
    assert "NOTIFY_SOCKET" not in env_seen
    assert report["extra"] == "yes"
    assert report["fds"][:4] == [0, 1, 2, 3]
    assert report["listening"] is True
    assert report["sigterm_blocked"] is False


def test_now_execs_at_once_without_waiting_for_a_connection(tmp_path: Path) -> None:
    script = write(tmp_path, "now.py", "import os; print('started', os.environ['LISTEN_PID'], flush=True)\n")
    with activate("-l", "127.0.0.1:0", "--now", "--", PYTHON, script) as run:
        assert run.wait() == 0
        assert run.out == f"started {run.pid}\n"


def test_a_datagram_starts_the_command_which_receives_it(reporter: Path) -> None:
    port = free_port(kind=socket.SOCK_DGRAM)
    with activate("-l", f"127.0.0.1:{port}", "--datagram", "--", PYTHON, reporter) as run:
        run.wait_for(rf"bound to 127\.0\.0\.1:{port} as fd 3")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(TIMEOUT)
            client.sendto(b"first", ("127.0.0.1", port))
            report = json.loads(client.recv(65536))
        assert run.wait() == 0
    assert (report["type"], report["datagram"]) == ("SOCK_DGRAM", "first")
    assert report["env"]["LISTEN_PID"] == str(run.pid)


def test_sigterm_before_the_first_connection_exits_0_and_leaves_no_socket_file(short_dir: Path) -> None:
    with activate("-l", "./s.sock", "--", "true", cwd=short_dir) as run:
        run.wait_for(r"listening on .*s\.sock")
        assert (short_dir / "s.sock").exists()
        assert run.stop(signal.SIGTERM) == 0
    assert not (short_dir / "s.sock").exists()


def run_side_by_side(
    peer_argv: list[str], ours_argv: list[str], port: int, count: int = 1
) -> list[dict[str, Any]]:
    reports = []
    for argv in (peer_argv, ours_argv):
        with started(argv, env=clean_env()) as run:
            for _ in range(count):
                deadline = time.monotonic() + TIMEOUT
                while True:
                    try:
                        client = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
                        break
                    except ConnectionRefusedError:
                        assert run.poll() is None, run.log
                        assert time.monotonic() < deadline, run.log
                        time.sleep(0.02)
                report = report_of(client)
                report["activator"] = run.pid
                reports.append(report)
    return reports


@pytest.mark.parametrize("names", [[], ["--fdname=web"]], ids=["unnamed", "named"])
def test_side_by_side_with_systemd_socket_activate_the_consumer_sees_the_same(
    reporter: Path, names: list[str]
) -> None:
    peer = require_peer("systemd-socket-activate")
    port = free_port()
    listen = ["-l", f"127.0.0.1:{port}", *names]
    theirs, ours = run_side_by_side(
        [peer, *listen, PYTHON, reporter],
        [*TRIO_ACTIVATE, "activate", *listen, "--", PYTHON, reporter],
        port,
    )

    def seen(report: dict[str, Any]) -> dict[str, Any]:
        env = dict(report["env"])
        # Each names its own process: the same rule, another PID.
        assert env.pop("LISTEN_PID") == str(report["pid"]) == str(report["activator"])
        env.pop("LISTEN_PIDFDID", None)  # systemd 252 does not send it; we do where the kernel has pidfs
        return {**report, "env": env, "pid": None, "activator": None, "pidfd_id": None}

    assert seen(ours) == seen(theirs)
    assert ours["fds"][:4] == [0, 1, 2, 3]


def test_side_by_side_in_accept_mode_the_connection_is_fd_3_of_a_process_of_its_own(reporter: Path) -> None:
    peer = require_peer("systemd-socket-activate")
    port = free_port()
    theirs, ours = run_side_by_side(
        [peer, "--accept", "-l", f"127.0.0.1:{port}", PYTHON, reporter],
        [*TRIO_ACTIVATE, "activate", "--accept", "-l", f"127.0.0.1:{port}", "--", PYTHON, reporter],
        port,
    )
    assert_names_itself(ours)
    assert ours["argv"][1:] == theirs["argv"][1:]
    for report in (theirs, ours):
        assert report["pid"] != report["activator"]
        assert report["env"]["LISTEN_PID"] == str(report["pid"])
        assert report["env"]["LISTEN_FDS"] == "1"
        assert report["listening"] is False
    # Forked with the activator's signals blocked: the command gets none of that mask.
    assert ours["sigterm_blocked"] is False
    # As the issue asks, where systemd-socket-activate passes the connection unnamed.
    assert ours["env"]["LISTEN_FDNAMES"] == "connection"
    assert "LISTEN_FDNAMES" not in theirs["env"]
    assert ours["fds"] == [0, 1, 2, 3, ours["fds"][-1]]  # and the listing's own fd


# --- --accept, --inetd, --max-connections -------------------------------------------------


@pytest.mark.slow
def test_accept_answers_50_sequential_connections_each_from_a_process_of_its_own(reporter: Path) -> None:
    with activate("-l", "127.0.0.1:0", "--accept", "--", PYTHON, reporter) as run:
        port = int(run.wait_for(r"listening on 127\.0\.0\.1:(\d+)")[1])
        reports = [
            report_of(socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)) for _ in range(50)
        ]
        run.wait_for(r"connection 50 from 127\.0\.0\.1:\d+ on 127\.0\.0\.1:\d+: pid \d+")
        assert run.stop() == 0
    pids = {report["pid"] for report in reports}
    assert len(pids) == 50
    assert run.pid not in pids
    for report in reports:
        assert_names_itself(report)
        assert report["env"] == {
            "LISTEN_PID": str(report["pid"]),
            "LISTEN_FDS": "1",
            "LISTEN_FDNAMES": "connection",
            **(
                {"LISTEN_PIDFDID": report["env"]["LISTEN_PIDFDID"]}
                if "LISTEN_PIDFDID" in report["env"]
                else {}
            ),
        }
    logged = [
        int(line.rsplit(" ", 1)[1]) for line in run.lines if " connection " in line and ": pid " in line
    ]
    assert set(logged) == pids


def test_inetd_runs_cat_on_each_connection_over_stdin_and_stdout() -> None:
    with activate("-l", "127.0.0.1:0", "--inetd", "--", "cat") as run:
        port = int(run.wait_for(r"listening on 127\.0\.0\.1:(\d+)")[1])
        for number in range(3):
            with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as client:
                payload = f"hello {number}\n".encode() * 1000
                client.sendall(payload)
                client.shutdown(socket.SHUT_WR)
                assert b"".join(iter(lambda: client.recv(65536), b"")) == payload
        assert run.stop() == 0


def test_max_connections_leaves_further_connections_waiting_until_a_child_ends(tmp_path: Path) -> None:
    # Each child says its PID at once, then holds the connection until the client closes it.
    holder = write(
        tmp_path,
        "holder.py",
        "import os, socket\ns = socket.socket(fileno=3)\ns.sendall(b'%d\\n' % os.getpid())\ns.recv(1)\n",
    )
    with activate("-l", "127.0.0.1:0", "--accept", "--max-connections", "2", "--", PYTHON, holder) as run:
        port = int(run.wait_for(r"listening on 127\.0\.0\.1:(\d+)")[1])
        clients = [socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) for _ in range(3)]
        try:
            first, second = (int(c.recv(100)) for c in clients[:2])
            assert first != second
            # The third waits in the backlog: no third child runs while two do.
            clients[2].settimeout(0.5)
            with pytest.raises(TimeoutError):
                clients[2].recv(100)
            assert run.count(r": pid \d+$") == 2
            clients[0].close()
            clients[2].settimeout(TIMEOUT)
            third = int(clients[2].recv(100))
            assert third not in (first, second)
        finally:
            for client in clients:
                client.close()
        assert run.stop() == 0


def test_sigterm_stops_the_children_and_sigkills_those_that_stay_past_the_grace_period(
    tmp_path: Path, reaper: Reaper
) -> None:
    stubborn = write(
        tmp_path,
        "stubborn.py",
        "import os, signal, socket, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "socket.socket(fileno=3).sendall(b'%d\\n' % os.getpid())\ntime.sleep(60)\n",
    )
    args = ["-l", "127.0.0.1:0", "--accept", "--grace-period", "0.5", "--", PYTHON, stubborn]
    with activate(*args) as run:
        port = int(run.wait_for(r"listening on 127\.0\.0\.1:(\d+)")[1])
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as client:
            child = int(client.recv(100))
            assert run.stop() == 0
        assert "still running after 0.5s: SIGKILL" in run.log
    assert not Path(f"/proc/{child}").exists()
    assert reaper.orphans() == []


# --- --restart ------------------------------------------------------------------------------


@pytest.mark.slow
def test_restart_a_command_that_exits_after_each_request_refuses_no_connection_of_200(tmp_path: Path) -> None:
    script = write(tmp_path, "one.py", ONE_REQUEST)
    port = free_port()
    with activate("-l", f"127.0.0.1:{port}", "--restart", "--", PYTHON, "-S", script) as run:
        run.wait_for(rf"listening on 127\.0\.0\.1:{port}")
        with ClientLoop(("127.0.0.1", port), max_connections=200, max_seconds=120, pause=0) as loop:
            wait_until(lambda: len(loop.answers) + len(loop.failures) >= 200, timeout=120)
        assert loop.failures == []
        assert len({answer.pid for answer in loop.answers}) == 200  # each by a command of its own
        assert run.stop() == 0


def test_restart_on_a_watched_change_serves_the_new_version(tmp_path: Path) -> None:
    version = write(tmp_path, "version.txt", "v1\n")
    # A server that answers until stopped: only a change makes a new one.
    server = write(tmp_path, "server.py", SERVER)
    args = ["-l", "127.0.0.1:0", "--restart", "--now", "--watch", version, "--", PYTHON, server, version]
    with activate(*args) as run:
        port = int(run.wait_for(r"listening on 127\.0\.0\.1:(\d+)")[1])
        run.wait_for(r"watching ")
        before = ask(("127.0.0.1", port), "a")
        assert before.version == "v1"
        assert ask(("127.0.0.1", port), "b").pid == before.pid  # the same process serves on
        mark = run.mark()
        version.write_text("v2\n")
        run.wait_for(r"started .*: pid \d+", since=mark)
        after = ask(("127.0.0.1", port), "c")
        assert (after.version, after.pid != before.pid) == ("v2", True)
        assert run.stop() == 0


def test_restart_children_get_the_sockets_at_fd_3_with_listen_pid_naming_each(reporter: Path) -> None:
    with activate("-l", "127.0.0.1:0", "--fdname", "web", "--restart", "--", PYTHON, reporter) as run:
        port = int(run.wait_for(r"listening on 127\.0\.0\.1:(\d+) as fd 3 named 'web'")[1])
        # The reporter answers one connection and exits 0: each connection meets a new child.
        reports = [
            report_of(socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)) for _ in range(2)
        ]
        assert run.stop() == 0
    assert reports[0]["pid"] != reports[1]["pid"]
    for report in reports:
        assert report["pid"] != run.pid
        assert_names_itself(report)
        assert (report["env"]["LISTEN_FDS"], report["env"]["LISTEN_FDNAMES"]) == ("1", "web")
        assert report["listening"] is True
        assert report["sigterm_blocked"] is False
        assert report["fds"][:4] == [0, 1, 2, 3]


def test_restart_backs_off_a_command_that_keeps_failing(tmp_path: Path) -> None:
    with activate("-l", "127.0.0.1:0", "--restart", "--now", "--", "false") as run:
        for delay in ("0.1", "0.2", "0.4"):
            run.wait_for(rf"ended with exit status 1; starting it again in {delay}s")
        assert run.stop() == 0


def test_sighup_restarts_the_command(tmp_path: Path) -> None:
    server = write(
        tmp_path, "sleeper.py", "import os, time\nprint(os.getpid(), flush=True)\ntime.sleep(60)\n"
    )
    with activate("-l", "127.0.0.1:0", "--restart", "--now", "--", PYTHON, server) as run:
        first = int(run.wait_for(r"started .*: pid (\d+)")[1])
        mark = run.mark()
        run.send_signal(signal.SIGHUP)
        second = int(run.wait_for(r"started .*: pid (\d+)", since=mark)[1])
        assert second != first
        assert run.stop() == 0


# --- real consumers nobody here wrote ---------------------------------------------------------


def test_gunicorn_adopts_the_socket_and_binds_none_of_its_own(tmp_path: Path) -> None:
    pytest.importorskip("gunicorn")
    write(
        tmp_path,
        "wsgi_hello.py",
        "import os\n"
        "def app(environ, start_response):\n"
        "    start_response('200 OK', [('Content-Type', 'text/plain')])\n"
        "    return [b'hello from %d, child of %d\\n' % (os.getpid(), os.getppid())]\n",
    )
    port, own_bind = free_port(), free_port()
    gunicorn = [
        PYTHON,
        "-m",
        "gunicorn",
        "--workers",
        "1",
        "--bind",
        f"127.0.0.1:{own_bind}",
        "wsgi_hello:app",
    ]
    with activate("-l", f"127.0.0.1:{port}", "--", *gunicorn, cwd=tmp_path) as run:
        client = connect(run, port)
        client.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        answer = read_all(client)
        assert answer.startswith(b"HTTP/1.0 200 OK") or answer.startswith(b"HTTP/1.1 200 OK"), answer
        # gunicorn's master is the activator itself, exec'd in place; its worker answered.
        assert answer.endswith(b", child of %d\n" % run.pid), answer
        # It bound nothing of its own: its --bind address is not listening.
        with socket.socket() as probe, pytest.raises(ConnectionRefusedError):
            probe.connect(("127.0.0.1", own_bind))
        assert run.stop() == 0


def test_a_trio_activate_service_under_activate_from_its_own_manifest(tmp_path: Path) -> None:
    port = free_port()
    manifest = echo_manifest(tmp_path, f"127.0.0.1:{port}")
    with activate("--from", manifest, "--", *TRIO_ACTIVATE, "serve", manifest, cwd=tmp_path) as run:
        run.wait_for(rf"listening on 127\.0\.0\.1:{port} as fd 3 named 'echo'")
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as client:
            client.sendall(b"ping\n")
            assert client.recv(100) == b"ping\n"
        # The service adopted the passed socket (as under systemd) in the activator's own process.
        assert Path(f"/proc/{run.pid}/cmdline").read_bytes().split(b"\0")[-2] == str(manifest).encode()
        assert run.stop() == 0


def test_the_command_gets_signals_at_their_defaults_through_the_console_script() -> None:
    """Nothing blocked, SIGPIPE not ignored (Python ignores it, and an ignored signal stays
    ignored across exec: a ``cat`` whose reader left would live on)."""
    # The word "serve" in the command line makes the console script hold SIGTERM, SIGINT and
    # SIGHUP from its first line (for serve); the command must not inherit that.
    script = Path(sys.executable).parent / "trio-activate"
    if not script.exists():
        pytest.skip("the trio-activate script is not installed beside this interpreter")
    argv = [
        script,
        "activate",
        "-l",
        "127.0.0.1:0",
        "--now",
        "--",
        "sh",
        "-c",
        "cat /proc/self/status",
        "serve",
    ]
    with started(argv, env=clean_env()) as run:
        assert run.wait() == 0
        status = dict(line.split(":\t", 1) for line in run.out.splitlines() if ":\t" in line)
    assert int(status["SigBlk"], 16) == 0
    assert int(status["SigIgn"], 16) & (1 << (signal.SIGPIPE - 1)) == 0
