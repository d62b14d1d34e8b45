"""The internal activator: fds placed at 3.. safely, re-exec in place, no loop, one-line errors.

Real processes and sockets throughout: every activation runs in a child
process (a re-exec would replace the test process itself), and the test
connects to it from outside to see what the re-exec'd process holds.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import TIMEOUT, Process, one_line_error, serve_cmd, started

from trio_activate.errors import ActivationError
from trio_activate.model.private_env import ACTIVATOR_MARKER
from trio_activate.system.activator import check_not_looping
from trio_activate.system.fds import own_pidfd_id

# A handler that answers each connection with what the serving process
# holds: its PID, the private and LISTEN_* variables it still has, its fds,
# what fd 3 is, and what a subprocess it spawns with close_fds=False inherits.
REPORTER = textwrap.dedent(
    '''
    import json
    import os
    import socket
    import subprocess
    import sys

    CHILD = """
    import json, os
    links = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            links[name] = os.readlink("/proc/self/fd/" + name)
        except OSError:
            pass  # the listing's own fd, closed by now
    env = {k: v for k, v in os.environ.items() if k.startswith(("LISTEN_", "TRIO_ACTIVATE"))}
    print(json.dumps({"pid": os.getpid(), "links": links, "env": env}))
    """


    def fd3():
        sock = socket.socket(fileno=3)
        try:
            return {
                "sockname": sock.getsockname(),
                "listening": bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)),
                "inheritable": os.get_inheritable(3),
                "link": os.readlink("/proc/self/fd/3"),
            }
        finally:
            sock.detach()


    async def report(stream):
        child = subprocess.run(
            [sys.executable, "-c", CHILD], close_fds=False, capture_output=True, text=True, timeout=10
        )
        info = {
            "pid": os.getpid(),
            "env": {k: v for k, v in os.environ.items() if k.startswith(("LISTEN_", "TRIO_ACTIVATE"))},
            "fds": sorted(int(n) for n in os.listdir("/proc/self/fd")),
            "fd3": fd3(),
            "child": json.loads(child.stdout),
        }
        await stream.send_all(json.dumps(info).encode())
    '''
)


def reporter_manifest(folder: Path, *, tcp_port: int | None = None) -> tuple[Path, Path]:
    """A manifest serving the REPORTER handler on a unix socket file in `folder`.

    With `tcp_port`, a second socket ``web`` on ``127.0.0.1:tcp_port`` follows it.
    """
    (folder / "ta_reporter.py").write_text(REPORTER)
    sock_path = folder / "s.sock"
    manifest = folder / "reporter.toml"
    text = f"""
[service]
python-path = ["."]

[sockets.main]
listen = "{sock_path}"
remove-on-stop = true

[handlers.main]
socket = "main"
call = "ta_reporter:report"
"""
    if tcp_port is not None:
        text += f"""
[sockets.web]
listen = "127.0.0.1:{tcp_port}"

[handlers.web]
socket = "web"
call = "trio_activate.examples:echo"
"""
    manifest.write_text(text)
    return manifest, sock_path


def ask(proc: Process, path: Path) -> dict[str, Any]:
    """Connect to the unix socket at `path` (retrying until it is there) and read the reply to EOF."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        if proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.wait()} before answering: {proc.log}")
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.settimeout(TIMEOUT)
        try:
            client.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            client.close()
            if time.monotonic() > deadline:
                pytest.fail(f"nothing listened at {path} within {TIMEOUT}s")
            time.sleep(0.05)
            continue
        with client:
            chunks = []
            while data := client.recv(65536):
                chunks.append(data)
        result: dict[str, Any] = json.loads(b"".join(chunks))
        return result


# --- place_fds: the shuffle hazard ------------------------------------------

# Runs in a fresh interpreter (its fds 3.. are free to clobber): puts a fresh
# close-on-exec socket at each source number and unrelated close-on-exec fds
# at the "occupied" numbers, calls place_fds, reports inodes and flags.
PLACE_SCRIPT = """
import fcntl, json, os, socket, sys
from trio_activate.system.activator import place_fds
from trio_activate.system.fds import open_fds

sources, occupied = json.loads(sys.argv[1])

def put(make, number):
    # Via a number far above, as dup3() refuses to copy an fd onto itself.
    fd = make()
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100)
    os.close(fd)
    os.dup2(high, number, inheritable=False)
    os.close(high)


for number in occupied:
    put(lambda: os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC), number)
for number in sources:
    put(lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).detach(), number)
inodes = {n: os.fstat(n).st_ino for n in sources}
before = sorted(open_fds())
place_fds(sources)
after = sorted(open_fds())
print(json.dumps({
    "source_inodes": [inodes[n] for n in sources],
    "placed_inodes": [os.fstat(3 + i).st_ino for i in range(len(sources))],
    "before": before,
    "after": after,
    "inheritable": [fd for fd in after if fd > 2 and os.get_inheritable(fd)],
}))
"""


@pytest.mark.parametrize(
    ("sources", "occupied"),
    [
        pytest.param([4, 3], [], id="reversed-in-range"),
        pytest.param([5, 4, 3], [], id="three-reversed"),
        pytest.param([4, 5, 3], [], id="rotated"),
        pytest.param([3, 4], [], id="already-in-place"),
        pytest.param([6, 3], [], id="one-above-one-in-range"),
        pytest.param([5, 6], [3, 4], id="targets-held-by-other-fds"),
    ],
)
def test_place_fds_puts_source_i_at_3_plus_i_whatever_sits_in_the_range(
    sources: list[int], occupied: list[int]
) -> None:
    """Rule: fd 3+i ends up as sources[i], even when sources sit in the target range
    (a plain dup2 loop would copy one source twice); FD_CLOEXEC is cleared on exactly
    3..3+n-1; the lifted copies are closed and the sources outside the range left open."""
    result = subprocess.run(
        [sys.executable, "-c", PLACE_SCRIPT, json.dumps([sources, occupied])],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    placed = set(range(3, 3 + len(sources)))
    assert len(set(report["source_inodes"])) == len(sources)  # the setup made distinct sockets
    assert report["placed_inodes"] == report["source_inodes"]
    assert set(report["after"]) == set(report["before"]) | placed  # no lifted copy left over
    assert set(report["inheritable"]) == placed


# --- self-activated serve ----------------------------------------------------


def test_self_activated_serve_keeps_its_pid_and_adopts_fd_3(short_dir: Path) -> None:
    """Rule: `serve` without LISTEN_* creates its socket, execs in place (same PID) and
    adopts fd 3 as under systemd; the handler sees no LISTEN_* or private variable left."""
    manifest, sock_path = reporter_manifest(short_dir)
    with started(serve_cmd(manifest)) as proc:
        report = ask(proc, sock_path)
        status, err = proc.stop(), proc.log
    assert report["pid"] == proc.pid
    assert report["env"] == {}
    assert report["fd3"]["sockname"] == str(sock_path)
    assert report["fd3"]["listening"] is True
    assert report["fd3"]["inheritable"] is False  # adoption set FD_CLOEXEC again
    assert status == 0, err
    assert f"pid {proc.pid}, 1 socket created by the internal activator" in err
    # The re-exec'd process knows the activator made the file, so remove-on-stop removes it.
    assert not sock_path.exists()


def test_a_subprocess_of_a_handler_inherits_no_listening_fd_and_no_listen_variables(
    short_dir: Path,
) -> None:
    """Rule: after adoption the fds are FD_CLOEXEC and LISTEN_*/TRIO_ACTIVATE_* are
    unset, so a subprocess spawned with close_fds=False gets neither."""
    manifest, sock_path = reporter_manifest(short_dir)
    with started(serve_cmd(manifest)) as proc:
        report = ask(proc, sock_path)
        status, err = proc.stop(), proc.log
    assert status == 0, err
    child = report["child"]
    assert child["pid"] != proc.pid
    assert child["env"] == {}
    assert report["fd3"]["link"].startswith("socket:[")
    assert report["fd3"]["link"] not in child["links"].values()
    # Nothing of the server's crosses: no socket at all (the accepted connection,
    # trio's wakeup pair), and fd 3 is the child's own listing or nothing.
    assert [link for link in child["links"].values() if link.startswith("socket:")] == []


@pytest.mark.parametrize(
    "stale",
    [
        pytest.param(
            {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "main"}, id="listen-pid-of-pid-1"
        ),
        pytest.param({ACTIVATOR_MARKER: "1"}, id="activator-marker-of-pid-1"),
    ],
)
def test_serve_with_variables_for_another_process_self_activates(
    short_dir: Path, stale: dict[str, str]
) -> None:
    """Rule: LISTEN_PID (or the activator's marker) naming another process is "not for
    us", not an error and not a loop: serve self-activates, and nothing stale reaches handlers."""
    manifest, sock_path = reporter_manifest(short_dir)
    with started(serve_cmd(manifest), env={**os.environ, **stale}) as proc:
        report = ask(proc, sock_path)
        status, err = proc.stop(), proc.log
    assert report["pid"] == proc.pid
    assert report["env"] == {}
    assert report["fd3"]["sockname"] == str(sock_path)
    assert status == 0, err
    assert "created by the internal activator" in err


def test_re_exec_that_finds_no_sockets_fails_instead_of_looping(short_dir: Path) -> None:
    """Rule: a process the activator re-exec'd (marker == its own PID) that finds no
    LISTEN_* fails with the reason; it never activates again.  A shell trampoline
    gives the exec'd program a marker naming its own PID."""
    manifest, sock_path = reporter_manifest(short_dir)
    result = subprocess.run(
        ["/bin/sh", "-c", f'{ACTIVATOR_MARKER}=$$ exec "$0" "$@"', *serve_cmd(manifest)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 2
    line = one_line_error(result.stderr)
    assert "the activator re-executed this process with its sockets, but they were not found" in line
    assert "LISTEN_PID is not set" in line
    assert not sock_path.exists()


def test_serve_imports_no_trio_up_to_the_point_of_the_re_exec(short_dir: Path) -> None:
    """Rule: the activator runs before trio is imported, so a self-activating serve stays
    fast.  A re-exec'd process that finds no sockets stops exactly where it would
    otherwise activate; `-X importtime` lists every module imported by then."""
    manifest, _ = reporter_manifest(short_dir)
    cmd = [sys.executable, "-X", "importtime", *serve_cmd(manifest)[1:]]
    result = subprocess.run(
        ["/bin/sh", "-c", f'{ACTIVATOR_MARKER}=$$ exec "$0" "$@"', *cmd],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 2
    imported = [line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines() if "|" in line]
    assert "trio_activate.system.activator" in imported
    assert "trio_activate.system.acquire" in imported
    assert [name for name in imported if name == "trio" or name.startswith("trio.")] == []


# What the console script's first code may add to what the script itself imports
# (`re` and `sys`) before the fast start forks and re-execs: every module more is
# start-up time for every self-activated serve (benchmarks/, scenario 3).
FAST_START_MODULES = {
    "__future__",  # imported by `from __future__ import annotations` itself: a few dozen lines
    "trio_activate",
    "trio_activate.errors",
    "trio_activate.cli",  # each layer's __init__ is a docstring
    "trio_activate.cli.entry",
    "trio_activate.system",
    "trio_activate.system.fast_start",
    "trio_activate.model",
    "trio_activate.model.private_env",
}


def test_the_console_script_imports_next_to_nothing_before_the_fast_start() -> None:
    """Rule: up to its fork and re-exec, a fast start imports only the lean modules
    above (no trio, no socket module, no manifest reader), measured against what
    pip's console script wrapper imports anyway."""
    code = (
        "import sys, re\n"
        "before = set(sys.modules)\n"
        "from trio_activate.cli.entry import main\n"
        "print(' '.join(sorted(set(sys.modules) - before)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT, check=True
    )
    added = set(result.stdout.split())
    assert {"trio_activate.cli.entry", "trio_activate.system.fast_start"} <= added
    assert added <= FAST_START_MODULES, sorted(added - FAST_START_MODULES)


def test_check_not_looping_fails_only_for_our_own_marker() -> None:
    """Rule: the marker naming this PID means "re-exec'd by the activator": fail with the
    reason and drop the marker; a marker of another PID, or none, is not our business."""
    env = {ACTIVATOR_MARKER: "1234"}
    with pytest.raises(ActivationError, match=r"were not found: LISTEN_PID is not set$"):
        check_not_looping(env, pid=1234, reason="LISTEN_PID is not set")
    assert ACTIVATOR_MARKER not in env

    other = {ACTIVATOR_MARKER: "1234"}
    check_not_looping(other, pid=4321, reason="LISTEN_PID is not set")
    assert other == {ACTIVATOR_MARKER: "1234"}

    empty: dict[str, str] = {}
    check_not_looping(empty, pid=1234, reason="LISTEN_PID is not set")
    assert empty == {}


# --- self_activate() for embedded programs ----------------------------------

EMBEDDED_SCRIPT = """
import json, os, socket, sys
print(f"pid {os.getpid()}", file=sys.stderr, flush=True)
import trio_activate

found = trio_activate.self_activate(sys.argv[1])
trio_imported = "trio" in sys.modules


def describe(fd):
    sock = socket.socket(fileno=fd)
    try:
        return [int(sock.family), int(sock.type), sock.getsockname(), os.get_inheritable(fd)]
    finally:
        sock.detach()


try:
    pidfd = os.pidfd_open(os.getpid())
    pidfd_id = os.fstat(pidfd).st_ino
    os.close(pidfd)
except OSError:
    pidfd_id = None
from trio_activate.system.fds import open_fds
print(json.dumps({
    "pid": os.getpid(),
    "argv": sys.argv,
    "fds": list(found.fds),
    "names": list(found.names),
    "pidfd_checked": found.pidfd_checked,
    "pidfd_id": pidfd_id,
    "env": {k: v for k, v in os.environ.items() if k.startswith("LISTEN_")},
    "sockets": [describe(fd) for fd in found.fds],
    "open": sorted(open_fds()),
    "trio_imported": trio_imported,
}))
"""


def test_self_activate_in_a_script_re_execs_in_place_with_fds_from_3_in_manifest_order(
    short_dir: Path,
) -> None:
    """Rule: `self_activate()` at the top of a script creates the sockets, places them at
    3, 4, ... in manifest order (each address of a socket in turn) and execs the same
    command line in place: same PID, same argv, LISTEN_* left for `activated()`."""
    script = short_dir / "embedded.py"
    script.write_text(EMBEDDED_SCRIPT)
    first, second = short_dir / "a.sock", short_dir / "b.sock"
    manifest = short_dir / "embedded.toml"
    manifest.write_text(
        textwrap.dedent(
            f"""
            [sockets.web]
            listen = ["{first}", "127.0.0.1:0"]

            [sockets.packets]
            listen = "{second}"
            type = "datagram"
            """
        )
    )
    cmd = [sys.executable, str(script), str(manifest), "extra-argument"]
    with started(cmd, cwd=short_dir) as proc:
        proc.wait()
        out, err = proc.out, proc.log
    assert proc.returncode == 0, err
    # The script ran twice, before and after the re-exec, both times as the same process.
    assert [line for line in err.splitlines() if line.startswith("pid ")] == [f"pid {proc.pid}"] * 2
    report = json.loads(out)
    assert report["pid"] == proc.pid
    assert report["argv"] == [str(script), str(manifest), "extra-argument"]
    assert report["fds"] == [3, 4, 5]
    assert report["names"] == ["web", "web", "packets"]
    unix, inet = int(socket.AF_UNIX), int(socket.AF_INET)
    stream, datagram = int(socket.SOCK_STREAM), int(socket.SOCK_DGRAM)
    web_unix, web_inet, packets = report["sockets"]
    assert web_unix == [unix, stream, str(first), True]
    assert web_inet[:2] == [inet, stream]
    assert web_inet[2][0] == "127.0.0.1"
    assert web_inet[2][1] != 0  # the kernel's port, kept across the exec
    assert web_inet[3] is True
    assert packets == [unix, datagram, str(second), True]
    assert report["trio_imported"] is False  # the activator runs before trio is imported
    # Nothing but stdio and the placed fds crossed the exec.
    assert report["open"] == [0, 1, 2, 3, 4, 5]
    assert report["env"]["LISTEN_PID"] == str(report["pid"])
    assert report["env"]["LISTEN_FDS"] == "3"
    assert report["env"]["LISTEN_FDNAMES"] == "web:web:packets"
    if own_pidfd_id() is not None:
        assert report["env"]["LISTEN_PIDFDID"] == str(report["pidfd_id"])
        assert report["pidfd_checked"] is True
    else:
        assert "LISTEN_PIDFDID" not in report["env"]


# Calls self_activate and reports what it left behind when it failed.
FAILING_EMBEDDED_SCRIPT = """
import json, os, sys
import trio_activate
from trio_activate.system.fds import open_fds

def variables():
    return {k: v for k, v in os.environ.items() if k.startswith(("LISTEN_", "TRIO_ACTIVATE"))}

manifest, argv = sys.argv[1], json.loads(sys.argv[2])
env_before, fds_before = variables(), sorted(open_fds())
try:
    trio_activate.self_activate(manifest, argv=argv or None)
except trio_activate.ActivationError as exc:
    error = f"{type(exc).__name__}: {exc}"
else:
    error = None
print(json.dumps({
    "error": error,
    "env_before": env_before,
    "env_after": variables(),
    "fds_before": fds_before,
    "fds_after": sorted(open_fds()),
}))
"""


def run_failing_embedded(folder: Path, manifest: Path, argv: list[str]) -> dict[str, Any]:
    script = folder / "failing.py"
    script.write_text(FAILING_EMBEDDED_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), str(manifest), json.dumps(argv)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def test_self_activate_that_cannot_exec_leaves_no_fd_no_file_and_no_variables(short_dir: Path) -> None:
    """Rule: when the exec fails, the placed fds are closed, the socket file removed, and
    the environment does not claim fds that are gone (a later `activated()` would
    otherwise adopt whatever reused fd 3)."""
    manifest, sock_path = reporter_manifest(short_dir)
    report = run_failing_embedded(short_dir, manifest, [str(short_dir / "no-such-python")])
    assert report["error"] is not None
    assert report["error"].startswith("ActivationError: cannot re-exec ")
    assert "No such file or directory" in report["error"]
    assert report["fds_after"] == report["fds_before"]
    assert report["env_after"] == report["env_before"] == {}
    assert not sock_path.exists()


@pytest.mark.parametrize("how", ["python < script", "python - < script"])
def test_self_activate_in_a_program_read_from_standard_input_refuses_in_one_line(
    short_dir: Path, how: str
) -> None:
    """Rule: standard input is gone once read, so a re-exec would run nothing and exit 0;
    `self_activate()` says so instead, creating nothing."""
    manifest, sock_path = reporter_manifest(short_dir)
    program = (
        "import trio_activate\n"
        "try:\n"
        f"    trio_activate.self_activate({str(manifest)!r})\n"
        "except trio_activate.ActivationError as exc:\n"
        "    print(exc)\n"
        "    raise SystemExit(2)\n"
        "print('re-execed')\n"
    )
    argv = [sys.executable] if how == "python < script" else [sys.executable, "-"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "TRIO_ACTIVATE_"))}
    result = subprocess.run(argv, input=program, capture_output=True, text=True, env=env, timeout=30)
    assert result.returncode == 2, result
    assert result.stdout == (
        "self_activate(): this program was read from standard input, which a re-exec cannot read "
        "again; run it from a file or with -m, or have systemd pass the sockets\n"
    )
    assert not sock_path.exists()


def test_self_activate_creation_error_closes_what_it_made(short_dir: Path) -> None:
    """Rule: creation is all or nothing: when the second socket cannot bind, the first is
    closed and its file removed, and nothing is set in the environment."""
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        manifest, sock_path = reporter_manifest(short_dir, tcp_port=port)
        report = run_failing_embedded(short_dir, manifest, [])
    assert report["error"] is not None
    assert report["error"].startswith("CreationError: ")
    assert f"127.0.0.1:{port}" in report["error"]
    assert report["fds_after"] == report["fds_before"]
    assert report["env_after"] == report["env_before"] == {}
    assert not sock_path.exists()


# --- bad inputs to serve: one line, exit 2, nothing created ------------------


def test_serve_with_malformed_listen_fds_is_one_line_naming_it(short_dir: Path) -> None:
    """Rule: LISTEN_PID naming us with LISTEN_FDS=abc is an error, not "not activated":
    exit 2, one line naming the variable and value, and no socket is created instead."""
    manifest, sock_path = reporter_manifest(short_dir)
    result = subprocess.run(
        ["/bin/sh", "-c", 'LISTEN_PID=$$ LISTEN_FDS=abc exec "$0" "$@"', *serve_cmd(manifest)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 2
    line = one_line_error(result.stderr)
    assert "LISTEN_FDS='abc'" in line
    assert "expected a positive decimal integer" in line
    assert not sock_path.exists()


def test_serve_with_a_manifest_error_is_one_line(tmp_path: Path) -> None:
    manifest = tmp_path / "bad.toml"
    manifest.write_text('[sockets.web]\nlisten = "127.0.0.1:70000"\n')
    result = subprocess.run(serve_cmd(manifest), capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 2
    line = one_line_error(result.stderr)
    assert str(manifest) in line
    assert "sockets.web.listen" in line
    assert "70000" in line


def test_serve_with_a_port_in_use_is_one_line_and_leaves_no_socket_file(short_dir: Path) -> None:
    """Rule: a creation error names the key and address; the unix socket created before
    it is closed and its file removed."""
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        manifest, sock_path = reporter_manifest(short_dir, tcp_port=port)
        result = subprocess.run(serve_cmd(manifest), capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 2
    line = one_line_error(result.stderr)
    assert "sockets.web.listen" in line
    assert f"127.0.0.1:{port}" in line
    assert "address already in use" in line
    assert not sock_path.exists()


def test_serve_stops_cleanly_even_when_the_socket_file_was_replaced(short_dir: Path) -> None:
    """Rule: remove-on-stop removes only the file the activator made: a file put at the
    path since (here after unlinking ours) is left alone."""
    manifest, sock_path = reporter_manifest(short_dir)
    with started(serve_cmd(manifest)) as proc:
        ask(proc, sock_path)
        sock_path.unlink()
        sock_path.write_text("somebody else's")
        status, err = proc.stop(), proc.log
    assert status == 0, err
    assert sock_path.read_text() == "somebody else's"


def test_pid_is_unchanged_across_the_exec_even_under_the_console_script(short_dir: Path) -> None:
    """Rule: the re-exec runs the same command line; through the installed console
    script (not `-m`) the PID is kept too."""
    script = Path(sys.executable).parent / "trio-activate"
    if not script.exists():
        pytest.skip(f"no console script at {script}")
    manifest, sock_path = reporter_manifest(short_dir)
    with started([str(script), "serve", str(manifest)]) as proc:
        report = ask(proc, sock_path)
        status, err = proc.stop(), proc.log
    assert report["pid"] == proc.pid
    assert status == 0, err
    assert "created by the internal activator" in err
