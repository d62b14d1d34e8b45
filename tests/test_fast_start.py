"""The fast start: `serve` forks the activator and re-execs at once; the sockets come over a channel.

Real processes, sockets and signals throughout, on 127.0.0.1 and unix
socket files in a short folder.  What a process left behind is seen from
outside: ``/proc`` shows a service's children and sockets, and while a
test runs the test process is a child subreaper (`reaper`), so a process
orphaned by a service that exited becomes the test's child, where it can
be found and reaped.

The in-process tests of `receive_from_forked_activator` use only inputs
that fail before it places fds at 3.. (which would clobber the test
process's own fds).
"""

from __future__ import annotations

import contextlib
import json
import marshal
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import (
    TEXT_LINE,
    TIMEOUT,
    Process,
    Reaper,
    blocks,
    clean_env,
    one_line_error,
    processes_with_parent,
    retry,
    serve_cmd,
    started,
    tcp_exchange,
    unix_exchange,
    wait_until,
    write_manifest,
)

from trio_activate.errors import ActivationError
from trio_activate.model.private_env import ACTIVATOR_CHANNEL_VARIABLE
from trio_activate.system.activator_channel import deliver_sockets_to_service, receive_from_forked_activator
from trio_activate.system.fast_start import fast_start_applies, serving_command
from trio_activate.system.fds import open_fds

SEQPACKET_TYPE = 5  # SOCK_SEQPACKET in /proc/net/unix's Type column
TCP_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's st column


# --- helpers -----------------------------------------------------------------


def tcp_echo_manifest(folder: Path) -> Path:
    """One TCP socket on a kernel-chosen port (found in the service's fds), served by echo."""
    return write_manifest(
        folder,
        """
        [sockets.web]
        listen = "127.0.0.1:0"

        [handlers.web]
        socket = "web"
        call = "trio_activate.examples:echo"
        """,
    )


def unix_echo_manifest(folder: Path, *, remove_on_stop: bool = True) -> tuple[Path, Path]:
    sock_path = folder / "echo.sock"
    manifest = write_manifest(
        folder,
        f"""
        [sockets.local]
        listen = "{sock_path}"
        remove-on-stop = {str(remove_on_stop).lower()}

        [handlers.local]
        socket = "local"
        call = "trio_activate.examples:echo"
        """,
    )
    return manifest, sock_path


def initial_environ(pid: int) -> dict[str, str]:
    """The environment `pid`'s current program was exec'd with (later unsetenv() does not change it)."""
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (item.decode(errors="replace").partition("=") for item in raw.split(b"\0") if item)
    return {name: value for name, _, value in pairs}


def socket_inodes(pid: int) -> dict[int, int]:
    """{socket inode: fd} of every socket `pid` holds."""
    found = {}
    folder = Path(f"/proc/{pid}/fd")
    for entry in folder.iterdir():
        try:
            link = os.readlink(entry)
        except OSError:
            continue
        if link.startswith("socket:["):
            found[int(link[len("socket:[") : -1])] = int(entry.name)
    return found


def listening_tcp_ports(pid: int) -> dict[int, int]:
    """{port: fd} of the listening 127.0.0.1 TCP sockets `pid` holds."""
    held = socket_inodes(pid)
    found = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        address, port_hex = fields[1].split(":")
        inode = int(fields[9])
        if address == "0100007F" and fields[3] == TCP_LISTEN and inode in held:
            found[int(port_hex, 16)] = held[inode]
    return found


def unix_socket_types(pid: int) -> dict[int, int]:
    """{fd: socket type} of every AF_UNIX socket `pid` holds."""
    held = socket_inodes(pid)
    found = {}
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        inode = int(fields[6])
        if inode in held:
            found[held[inode]] = int(fields[4], 16)
    return found


def answer(proc: Process, exchange: Callable[[], bytes]) -> bytes:
    """`exchange`'s reply, retried until the service answers; a service that exited fails at once."""

    def attempt() -> bytes:
        if proc.poll() is not None:
            pytest.fail(f"the service exited with {proc.wait()} before answering: {proc.log}")
        return exchange()

    return retry(attempt, timeout=TIMEOUT)


def serving_port(proc: Process) -> int:
    """The port of the one TCP listener that the process `proc` started holds, once it holds it.

    Found in the service's own fds: a listener there proves the PID the test
    started is the one serving, whatever its program is by then.
    """
    ports: dict[int, int] = {}

    def found() -> bool:
        nonlocal ports
        if proc.poll() is not None:
            pytest.fail(f"the service exited with {proc.wait()}: {proc.log}")
        try:
            ports = listening_tcp_ports(proc.pid)
        except OSError:
            return False
        return bool(ports)

    wait_until(found, timeout=TIMEOUT, what=f"a TCP listener in pid {proc.pid}")
    (port,) = ports
    return port


def channel_of(pid: int) -> tuple[int, int]:
    """(fd, activator pid) from the fast start's variable in the environment `pid` was exec'd with."""
    value = initial_environ(pid).get(ACTIVATOR_CHANNEL_VARIABLE)
    assert value is not None, f"pid {pid} was not re-exec'd by the fast start"
    fd_text, _, pid_text = value.partition(":")
    return int(fd_text), int(pid_text)


def fd_links() -> dict[int, str]:
    """What each fd of this process is: a test that must not touch fds 3.. compares these."""
    links = {}
    for fd in open_fds():
        with contextlib.suppress(OSError):  # closed meanwhile
            links[fd] = os.readlink(f"/proc/self/fd/{fd}")
    return links


def assert_no_orphans(reaper: Reaper) -> None:
    """Nothing the service started is left, running or unreaped, once it has exited."""
    assert reaper.orphans() == []


# --- which command lines take the fast start ----------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        pytest.param(["serve", "m.toml"], "serve", id="serve"),
        pytest.param(["dev", "m.toml"], "dev", id="dev"),
        pytest.param(["serve"], "serve", id="serve-without-manifest"),
        pytest.param(["serve", "m.toml", "--workers", "2"], "serve", id="serve-with-options"),
        pytest.param(["serve", "--help"], "serve", id="serve-help"),
        pytest.param(["--log-level", "debug", "serve", "m.toml"], "serve", id="log-level-then-serve"),
        pytest.param(["--log-level=debug", "dev", "m.toml"], "dev", id="log-level-equals-then-dev"),
        pytest.param(["--log-level", "serve", "m.toml"], None, id="serve-as-the-level"),
        pytest.param(["--log-format", "json", "serve", "m.toml"], "serve", id="log-format-then-serve"),
        pytest.param(
            ["--log-format=journal", "--log-level", "debug", "dev", "m.toml"], "dev", id="both-then-dev"
        ),
        pytest.param(["--log-format", "dev", "m.toml"], None, id="dev-as-the-format"),
        pytest.param(["serve", "--log-level", "debug", "m.toml"], "serve", id="serve-then-log-level"),
        pytest.param(["--log-level"], None, id="log-level-alone"),
        pytest.param(["--log-lev", "debug", "serve", "m.toml"], None, id="abbreviated-option"),
        pytest.param(["--log-level", "debug", "--version", "serve"], None, id="other-option-first"),
        pytest.param(["-h"], None, id="short-help"),
        pytest.param(["--help", "serve"], None, id="help-before-serve"),
        pytest.param(["check", "serve"], None, id="check-with-a-file-named-serve"),
        pytest.param(["fds", "m.toml"], None, id="fds"),
        pytest.param(["reload", "1"], None, id="reload"),
        pytest.param(["serv\u0435", "m.toml"], None, id="lookalike-letter"),
        pytest.param(["Serve", "m.toml"], None, id="other-case"),
        pytest.param([], None, id="empty"),
    ],
)
def test_serving_command_reads_the_command_as_the_parser_does(args: list[str], expected: str | None) -> None:
    assert serving_command(args) == expected


@pytest.mark.parametrize(
    "name",
    [
        "LISTEN_PID",
        "LISTEN_FDS",
        "TRIO_ACTIVATE_ACTIVATOR_PID",
        "TRIO_ACTIVATE_ACTIVATOR_CHANNEL",
        "TRIO_ACTIVATE_WORKER_FDS",
    ],
)
@pytest.mark.parametrize("value", ["1", ""])
def test_any_passing_variable_turns_the_fast_start_off(name: str, value: str) -> None:
    """Rule: set at all, even empty, a passing variable means sockets were or are being passed."""
    assert fast_start_applies(["serve", "m.toml"], {name: value}) is False
    assert fast_start_applies(["serve", "m.toml"], {"PATH": "/bin", name: value}) is False


def test_the_fast_start_applies_to_serving_commands_in_a_single_threaded_process_only() -> None:
    """Rule: fork only where it is safe: one thread.  Run in a fresh interpreter, as this
    test process may hold threads (trio's thread cache)."""
    script = textwrap.dedent(
        """
        import json, threading
        from trio_activate.system.fast_start import fast_start_applies

        results = [
            fast_start_applies(["serve", "m.toml"], {}),
            fast_start_applies(["--log-level", "debug", "dev", "m.toml"], {"PATH": "/bin"}),
            fast_start_applies(["check", "m.toml"], {}),
        ]
        stop = threading.Event()
        thread = threading.Thread(target=stop.wait)
        thread.start()
        results.append(fast_start_applies(["serve", "m.toml"], {}))
        stop.set()
        thread.join()
        print(json.dumps(results))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=TIMEOUT, env=clean_env()
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [True, True, False, False]


# --- a self-activated serve ---------------------------------------------------


def test_fast_started_serve_answers_as_the_started_pid_and_leaves_no_activator(
    tmp_path: Path, reaper: Reaper
) -> None:
    """Rule: `serve` forks the activator and re-execs in place: the PID the test started
    serves the socket from fd 3; the activator has exited and been reaped (no child, no
    zombie); the channel was closed (no seqpacket socket left in the service)."""
    manifest = tcp_echo_manifest(tmp_path)
    with started(serve_cmd(manifest), env=clean_env()) as proc:
        port = serving_port(proc)
        assert answer(proc, lambda: tcp_exchange("127.0.0.1", port, b"ping\n")) == b"ping\n"
        channel_fd, activator = channel_of(proc.pid)
        # What the service holds, once it serves.
        children = processes_with_parent(proc.pid)
        activator_left = Path(f"/proc/{activator}").exists()
        listeners = listening_tcp_ports(proc.pid)
        unix_types = unix_socket_types(proc.pid)
        status, err = proc.stop(), proc.log
    assert activator != proc.pid
    assert channel_fd >= 3
    assert children == []
    assert not activator_left, f"activator {activator} was not reaped"
    assert listeners == {port: 3}
    assert SEQPACKET_TYPE not in unix_types.values(), unix_types  # the channel is closed
    assert status == 0, err
    assert f"pid {proc.pid}, 1 socket created by the internal activator" in err
    assert "Traceback" not in err
    # The activator logs the kernel's choice of port; it speaks for the service, under its PID.
    assert "chosen by the kernel" in err
    pids = {found[1] for line in err.splitlines() if (found := re.match(TEXT_LINE, line))}
    assert pids == {str(proc.pid)}, err
    assert_no_orphans(reaper)


def test_passing_variables_for_another_process_self_activate_without_the_fast_start(
    tmp_path: Path, reaper: Reaper
) -> None:
    """Rule: with LISTEN_* set (here for PID 1, so "not for us") no activator is forked:
    the ordinary path re-execs with the sockets, and the service still serves them."""
    manifest = tcp_echo_manifest(tmp_path)
    env = clean_env(LISTEN_PID="1", LISTEN_FDS="1")
    with started(serve_cmd(manifest), env=env) as proc:
        port = serving_port(proc)
        assert answer(proc, lambda: tcp_exchange("127.0.0.1", port, b"ping\n")) == b"ping\n"
        exec_env = initial_environ(proc.pid)
        status, err = proc.stop(), proc.log
    assert ACTIVATOR_CHANNEL_VARIABLE not in exec_env
    assert exec_env.get("LISTEN_PID") == str(proc.pid)  # what the ordinary activator set
    assert status == 0, err
    assert f"pid {proc.pid}, 1 socket created by the internal activator" in err
    assert_no_orphans(reaper)


def test_dev_takes_the_fast_start_too(tmp_path: Path, reaper: Reaper) -> None:
    """Rule: `dev` self-activates by the fast start as `serve` does: the PID the test started
    holds the socket and supervises a worker; the activator is not among its children."""
    manifest = tcp_echo_manifest(tmp_path)
    with started([sys.executable, "-m", "trio_activate", "dev", str(manifest)], env=clean_env()) as proc:
        port = serving_port(proc)
        assert answer(proc, lambda: tcp_exchange("127.0.0.1", port, b"ping\n")) == b"ping\n"
        _, activator = channel_of(proc.pid)
        activator_left = Path(f"/proc/{activator}").exists()
        children = processes_with_parent(proc.pid)
        status, err = proc.stop(), proc.log
    assert not activator_left, f"activator {activator} was not reaped"
    assert activator not in children
    assert len(children) == 1  # the worker
    assert status == 0, err
    assert_no_orphans(reaper)


@pytest.mark.parametrize("remove_on_stop", [True, False])
def test_unix_socket_file_lives_while_serving_and_remove_on_stop_decides_after(
    short_dir: Path, remove_on_stop: bool, reaper: Reaper
) -> None:
    """Rule: the activator's file is the service's once it took the sockets: it stays while
    serving; on SIGTERM (exit 0) the service removes it if remove-on-stop says so, and
    the activator never removes a file it handed over."""
    manifest, sock_path = unix_echo_manifest(short_dir, remove_on_stop=remove_on_stop)
    with started(serve_cmd(manifest), env=clean_env()) as proc:
        assert answer(proc, lambda: unix_exchange(str(sock_path), b"hello")) == b"hello"
        channel_of(proc.pid)  # the fast start made it
        assert stat.S_ISSOCK(sock_path.lstat().st_mode)
        assert unix_socket_types(proc.pid)[3] == socket.SOCK_STREAM
        status, err = proc.stop(), proc.log
    assert status == 0, err
    assert sock_path.exists() is not remove_on_stop
    assert_no_orphans(reaper)


# --- errors: one line, exit 2, nothing left ------------------------------------


def test_busy_port_is_one_line_and_the_activator_removes_the_file_it_made(
    short_dir: Path, reaper: Reaper
) -> None:
    """Rule: the activator's creation error comes back over the channel and is printed once
    by the service (exit 2, no traceback); the unix socket file made before the busy port
    is gone; the activator was reaped."""
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        manifest, sock_path = busy_port_manifest(short_dir, port)
        result = subprocess.run(
            serve_cmd(manifest), capture_output=True, text=True, timeout=TIMEOUT, env=clean_env()
        )
    assert result.returncode == 2, result.stderr
    line = one_line_error(result.stderr)
    assert line.startswith(f"trio-activate: {manifest.name}: sockets.web.listen: 127.0.0.1:{port}: ")
    assert "address already in use" in line
    assert result.stdout == ""
    assert not sock_path.exists()
    assert_no_orphans(reaper)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            '[sockets.web]\nlisten = "127.0.0.1:0"\nbogus = 1\n',
            "sockets.web.bogus: unknown key",
            id="unknown-key",
        ),
        pytest.param("[sockets.web\n", "", id="toml-syntax"),
        pytest.param(None, "cannot read: No such file or directory", id="missing-file"),
    ],
)
def test_manifest_error_is_printed_once_not_by_the_activator_too(
    tmp_path: Path, text: str | None, expected: str, reaper: Reaper
) -> None:
    """Rule: the activator prints nothing of its own: a bad manifest gives exactly one line
    (the service's), exit 2; the activator does not linger after the service exits."""
    manifest = tmp_path / "bad.toml"
    if text is not None:
        manifest.write_text(text)
    result = subprocess.run(
        serve_cmd(manifest), capture_output=True, text=True, timeout=TIMEOUT, env=clean_env()
    )
    assert result.returncode == 2
    line = one_line_error(result.stderr)
    assert line.startswith(f"trio-activate: {manifest}")
    assert expected in line
    assert result.stdout == ""
    # The service failed before it took the sockets, so it did not reap the activator:
    # the orphan ends on its own once the channel closes (see the report).
    for orphan in reaper.orphans():
        assert reaper.wait_exit(orphan) == 1


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["serve", "--help"], id="serve"),
        pytest.param(["--log-level", "debug", "serve", "--help"], id="log-level-serve"),
        pytest.param(["serve", "m.toml", "--help"], id="serve-manifest"),
        pytest.param(["dev", "--help"], id="dev"),
    ],
)
def test_help_is_printed_exactly_once(args: list[str], reaper: Reaper) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "trio_activate", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=clean_env(),
    )
    command = "dev" if "dev" in args else "serve"
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("usage:") == 1, result.stdout
    assert result.stdout.startswith(f"usage: trio-activate {command} ")
    assert result.stderr == ""
    for orphan in reaper.orphans():
        assert reaper.wait_exit(orphan) == 2  # the activator's usage-error status


def test_usage_error_is_printed_exactly_once(tmp_path: Path, reaper: Reaper) -> None:
    manifest = tcp_echo_manifest(tmp_path)
    result = subprocess.run(
        [*serve_cmd(manifest), "--workers", "0"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=clean_env(),
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("usage:") == 1, result.stderr
    assert result.stderr.count("error:") == 1, result.stderr
    assert "argument --workers" in result.stderr
    for orphan in reaper.orphans():
        assert reaper.wait_exit(orphan) == 2


# --- the activator's side alone -------------------------------------------------

# The header's encoding is the two sides' private business: these tests treat it as
# opaque bytes and rely only on the documented exchange (one header message, one
# message with the manifest's document, then the fds, then b"ok" back), replaying
# what the real activator sent where needed.


def start_activator(manifest: Path) -> tuple[socket.socket, threading.Thread, list[int]]:
    """`deliver_sockets_to_service` in a thread on one end of a real pair; the test holds the other."""
    service_end, activator_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    service_end.settimeout(TIMEOUT)
    statuses: list[int] = []
    channel_fd = activator_end.detach()
    thread = threading.Thread(
        target=lambda: statuses.append(deliver_sockets_to_service(channel_fd, manifest))
    )
    thread.start()
    return service_end, thread, statuses


def joined(thread: threading.Thread, statuses: list[int]) -> int:
    thread.join(TIMEOUT)
    assert not thread.is_alive(), f"the activator did not return within {TIMEOUT}s"
    (status,) = statuses
    return status


def busy_port_manifest(folder: Path, port: int) -> tuple[Path, Path]:
    """A unix socket file first, then a TCP socket on `port` (which the test holds busy)."""
    sock_path = folder / "first.sock"
    manifest = write_manifest(
        folder,
        f"""
        [sockets.first]
        listen = "{sock_path}"

        [handlers.first]
        socket = "first"
        call = "trio_activate.examples:echo"

        [sockets.web]
        listen = "127.0.0.1:{port}"

        [handlers.web]
        socket = "web"
        call = "trio_activate.examples:echo"
        """,
    )
    return manifest, sock_path


@pytest.mark.parametrize("acknowledge", [False, True])
@pytest.mark.usefixtures("no_fd_leaks")
def test_activator_removes_its_file_unless_the_service_acknowledges(
    short_dir: Path, acknowledge: bool
) -> None:
    """Rule: the activator sends the header, the manifest's document (marshal, after a b"d"),
    then the fds; it owns what it made until it
    reads b"ok": without it (the service closed the channel) it removes its socket file
    and returns 1; with it, the file is the service's and stays, and it returns 0."""
    manifest, sock_path = unix_echo_manifest(short_dir, remove_on_stop=True)
    service_end, thread, statuses = start_activator(manifest)
    with service_end:
        header = service_end.recv(1 << 20)
        document = service_end.recv(1 << 20)
        data, fds, flags, _ = socket.recv_fds(service_end, 16, 4)
        with socket.socket(fileno=fds[0]) as received:
            assert (len(fds), flags) == (1, 0)
            assert document[:1] == b"d"
            assert marshal.loads(document[1:]) == tomllib.loads(manifest.read_text())
            assert data
            assert b"local" in header
            assert str(sock_path).encode() in header  # the file it made, for the service to own
            assert received.getsockname() == str(sock_path)
            assert received.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
            assert stat.S_ISSOCK(sock_path.lstat().st_mode)
            if acknowledge:
                service_end.sendall(b"ok")
                assert joined(thread, statuses) == 0
            else:
                service_end.close()
                assert joined(thread, statuses) == 1
            file_left = sock_path.exists()
    try:
        assert file_left is acknowledge
    finally:
        sock_path.unlink(missing_ok=True)


@pytest.mark.usefixtures("no_fd_leaks")
def test_activator_error_reaches_the_service_side_as_its_one_line(short_dir: Path) -> None:
    """Rule: a creation error goes over the channel, and the service side raises it as the
    activator's own line; the activator returns 1 and the file it made first is gone.
    Both sides run here, on one pair made by this process (so it passes the maker check);
    an error fails before any fd could be placed."""
    before = fd_links()
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        manifest, sock_path = busy_port_manifest(short_dir, port)
        service_end, thread, statuses = start_activator(manifest)
        service_end.setblocking(True)  # as the exec'd service finds it
        environ = {ACTIVATOR_CHANNEL_VARIABLE: f"{service_end.detach()}:1"}  # PID 1: nothing to reap
        with pytest.raises(ActivationError) as excinfo:
            receive_from_forked_activator(environ)
        assert joined(thread, statuses) == 1
    assert str(excinfo.value).startswith(f"{manifest.name}: sockets.web.listen: 127.0.0.1:{port}: ")
    assert "address already in use" in str(excinfo.value)
    assert "\n" not in str(excinfo.value)
    assert environ == {}
    assert not sock_path.exists()
    assert fd_links() == before


# --- the service's side alone: errors before any fd is placed -------------------


@pytest.mark.parametrize(
    "value", ["x:1", "3", "", "3:", ":1", "-3:1", "3:1:2", "3:-1", "3:0", " 3:1", "\uff13:1", "3:\uff11"]
)
@pytest.mark.usefixtures("no_fd_leaks")
def test_malformed_channel_variable_is_an_error_naming_it(value: str) -> None:
    before = fd_links()
    environ = {ACTIVATOR_CHANNEL_VARIABLE: value, "LISTEN_KEEP": "x"}
    with pytest.raises(ActivationError, match=rf"^{ACTIVATOR_CHANNEL_VARIABLE}=.*: expected <fd>:<pid>$"):
        receive_from_forked_activator(environ)
    assert environ == {"LISTEN_KEEP": "x"}
    assert fd_links() == before


def test_receive_without_the_variable_does_nothing() -> None:
    environ = {"LISTEN_KEEP": "x"}
    assert receive_from_forked_activator(environ) is None
    assert environ == {"LISTEN_KEEP": "x"}


@pytest.mark.usefixtures("no_fd_leaks")
def test_channel_fd_that_is_a_pipe_is_an_error_and_the_pipe_is_left_alone() -> None:
    before = fd_links()
    read_end, write_end = os.pipe()
    try:
        environ = {ACTIVATOR_CHANNEL_VARIABLE: f"{read_end}:1"}
        with pytest.raises(ActivationError) as excinfo:
            receive_from_forked_activator(environ)
        message = str(excinfo.value)
        assert message.startswith(f"{ACTIVATOR_CHANNEL_VARIABLE}={read_end}:1: fd {read_end} is not a socket")
        assert environ == {}
        os.fstat(read_end)  # not the library's to close: still open
    finally:
        os.close(read_end)
        os.close(write_end)
    assert fd_links() == before


@pytest.mark.usefixtures("no_fd_leaks")
def test_channel_fd_that_is_closed_is_an_error() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    os.close(write_end)
    environ = {ACTIVATOR_CHANNEL_VARIABLE: f"{read_end}:1"}
    with pytest.raises(ActivationError, match=rf"fd {read_end} is not a socket"):
        receive_from_forked_activator(environ)
    assert environ == {}


@pytest.mark.usefixtures("no_fd_leaks")
def test_channel_fd_that_is_a_socket_made_elsewhere_is_refused_and_closed() -> None:
    """Rule: only the pair this very process made before its exec is the channel; any other
    socket (here one with no peer: SO_PEERCRED says pid 0) is refused before any recv."""
    before = fd_links()
    fd = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET).detach()
    environ = {ACTIVATOR_CHANNEL_VARIABLE: f"{fd}:1"}  # PID 1 is never our child: nothing to reap
    with pytest.raises(ActivationError, match=r"is not the channel this process made .* by nobody\)$"):
        receive_from_forked_activator(environ)
    assert environ == {}
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(fd)  # the library took it and closed it
    assert fd_links() == before


@dataclass
class HandOver:
    """What the real activator sent for a one-socket manifest: its header, document and fd messages."""

    header: bytes
    document: bytes
    messages: list[tuple[bytes, list[int]]]


@pytest.fixture
def hand_over(short_dir: Path) -> Iterator[HandOver]:
    """Captured from `deliver_sockets_to_service`, which is then told no (it cleans up); the fds are ours."""
    manifest, _ = unix_echo_manifest(short_dir)
    service_end, thread, statuses = start_activator(manifest)
    with service_end:
        header = service_end.recv(1 << 20)
        document = service_end.recv(1 << 20)
        data, fds, _, _ = socket.recv_fds(service_end, 16, 4)
    captured = HandOver(header, document, [(data, fds)])
    try:
        assert joined(thread, statuses) == 1
        yield captured
    finally:
        for _, received in captured.messages:
            for fd in received:
                os.close(fd)


@pytest.mark.parametrize(
    ("scenario", "expected"),
    [
        pytest.param("closed", r"\) exited without the sockets$", id="closed-at-once"),
        pytest.param("garbage", r"\) sent garbage$", id="garbage-header"),
        pytest.param("header-only", r"\) exited without the sockets$", id="no-document"),
        pytest.param("garbage-document", r"\) sent garbage$", id="garbage-document"),
        pytest.param("no-fds", r"^the activator exited after 0 of 1 sockets$", id="no-fds"),
        pytest.param(
            "everything", r"^the activator \(pid 1\) went away before it delivered the sockets: ", id="gone"
        ),
    ],
)
@pytest.mark.usefixtures("no_fd_leaks")
def test_channel_failures_are_errors_and_close_every_received_fd(
    hand_over: HandOver, scenario: str, expected: str
) -> None:
    """Rule: whatever goes wrong on the channel is one ActivationError, raised before any fd
    is placed at 3..; every fd received is closed, and no LISTEN_* is set.  The sender's
    end is closed before the call, so the final ack (which comes before placement) fails."""
    before = fd_links()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours:
        if scenario == "garbage":
            ours.sendall(b"\xff not a header")
        if scenario in ("header-only", "garbage-document", "no-fds", "everything"):
            ours.sendall(hand_over.header)
        if scenario == "garbage-document":
            ours.sendall(b"d\xff\xfe")
        if scenario in ("no-fds", "everything"):
            ours.sendall(hand_over.document)
        if scenario == "everything":
            for data, fds in hand_over.messages:
                socket.send_fds(ours, [data], fds)
    environ = {ACTIVATOR_CHANNEL_VARIABLE: f"{theirs.detach()}:1"}
    with pytest.raises(ActivationError, match=expected):
        receive_from_forked_activator(environ)
    assert environ == {}
    assert fd_links() == before  # the channel and every received fd closed, nothing moved


# --- signals and deaths during the start ---------------------------------------


def first_child(pid: int) -> int | None:
    """A child of `pid` (its main thread's), or None; cheap enough to poll in a tight loop."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


@pytest.mark.parametrize(
    "when", ["at-once", "once-held", "activator-alive", "group-once-held", "group-activator-alive"]
)
def test_a_signal_during_the_start_ends_in_an_orderly_exit_with_nothing_left(
    short_dir: Path, when: str, reaper: Reaper
) -> None:
    """Rule: SIGTERM (or SIGINT to the whole process group, so to the activator too) that
    arrives while the service starts waits until it can be handled (at the latest when
    the handlers' import begins), then stops it: exit 0, the socket file removed
    (remove-on-stop), no activator left; the activator, whose signals are held as well,
    finishes the hand-over.  Sent at once, the
    signal may beat the console script's first code, a window no code can close: then
    the process dies by it, before anything was created."""
    manifest, sock_path = unix_echo_manifest(short_dir, remove_on_stop=True)
    signum = signal.SIGINT if when.startswith("group-") else signal.SIGTERM
    with started(serve_cmd(manifest), env=clean_env()) as proc:
        if when.endswith("once-held"):
            wait_until(lambda: blocks(proc.pid, signum), what=f"{signum.name} held")
        elif when.endswith("activator-alive"):
            # Tight polling: the activator lives for some tens of ms.  Should it be gone
            # already (a fast machine), the signal still comes during the start.
            deadline = time.monotonic() + TIMEOUT
            while first_child(proc.pid) is None and not sock_path.exists():
                assert time.monotonic() < deadline, "neither an activator nor a socket file appeared"
                time.sleep(0.001)
        if when.startswith("group-"):
            os.killpg(proc.pid, signum)
        else:
            proc.send_signal(signum)
        proc.wait()
        err = proc.log
    if when == "at-once":
        assert proc.returncode in (0, -signal.SIGTERM), err
    else:
        assert proc.returncode == 0, err
        # Held pending until the handlers' import, it stops the start there (start_signals),
        # or the service, were it already past that.
        assert (
            f"{signum.name} while starting: stopped before serving" in err
            or f"{signum.name}: shutting down gracefully" in err
        ), err
    assert "Traceback" not in err
    assert not sock_path.exists()
    assert_no_orphans(reaper)


# Re-exec'd by the fast start, this stand-in for the console script dies by SIGKILL
# before it takes the sockets: a service that crashed at start-up.
DIES_AFTER_EXEC = """\
import os
import signal
import sys

channel = os.environ.get("TRIO_ACTIVATE_ACTIVATOR_CHANNEL")
if channel is not None:
    print("activator", channel.partition(":")[2], file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

from trio_activate.cli.entry import main

sys.exit(main())
"""


def test_activator_removes_its_file_when_the_service_dies_before_taking_the_sockets(
    short_dir: Path, reaper: Reaper
) -> None:
    """Rule: the channel closing without b"ok" tells the activator the service is gone: it
    removes the socket file it created and exits 1, whether it had sent the sockets yet or not."""
    script = short_dir / "dies.py"
    script.write_text(DIES_AFTER_EXEC)
    manifest, sock_path = unix_echo_manifest(short_dir, remove_on_stop=False)
    result = subprocess.run(
        [sys.executable, str(script), "serve", str(manifest)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=clean_env(),
    )
    assert result.returncode == -signal.SIGKILL, result.stderr
    (activator,) = (
        int(line.split()[1]) for line in result.stderr.splitlines() if line.startswith("activator ")
    )
    assert reaper.orphans() == [activator]
    assert reaper.wait_exit(activator) == 1
    assert not sock_path.exists()
    assert_no_orphans(reaper)
