"""`trio_activate.system.passed`: ownership of passed fds and adoption, on real sockets at real fd numbers.

The sockets are made here and handed over by number (``detach()``), as a
manager hands them over by exec; `ListenFds` names those numbers (the owner
does not need them to start at 3).  Every test checks through /proc/self/fd
that it leaves no fd behind.
"""

from __future__ import annotations

import ast
import errno
import fcntl
import gc
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from helpers import free_port, has_ipv6, retry, started, wait_until

from trio_activate.errors import AdoptionError
from trio_activate.model.listen_env import ListenFds
from trio_activate.model.manifest import Manifest, parse_manifest
from trio_activate.model.match import Match, PassedSocket
from trio_activate.system.fds import FdNotOpenError, open_fds
from trio_activate.system.passed import DEFAULT_STEPS, Adopted, AdoptSteps, PassedFds, adopt

pytestmark = pytest.mark.usefixtures("no_fd_leaks")


def load(tmp_path: Path, text: str) -> Manifest:
    return parse_manifest(text, path=tmp_path / "service.toml", source="service.toml")


WEB = '[sockets.web]\nlisten = "127.0.0.1:0"\n'
WEB_AND_DNS = WEB + '[sockets.dns]\nlisten = "127.0.0.1:0"\ntype = "datagram"\n'


def hand_over(sock: socket.socket) -> int:
    """The socket's number, inheritable as a manager passes it; the object lets go of it."""
    os.set_inheritable(sock.fileno(), True)
    return sock.detach()


def tcp_listener(host: str = "127.0.0.1") -> int:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.bind((host, 0))
    sock.listen()
    return hand_over(sock)


def udp_socket() -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    return hand_over(sock)


def listen_fds(pairs: Sequence[tuple[int, str]], *, names_given: bool = True) -> ListenFds:
    return ListenFds(
        fds=tuple(fd for fd, _ in pairs),
        names=tuple(name for _, name in pairs),
        names_given=names_given,
        pidfd_checked=False,
    )


def is_open(fd: int) -> bool:
    return fd in open_fds()


class Connection:
    """A real accepted TCP connection: the server end is handed over, the client kept."""

    def __init__(self) -> None:
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            self.client = socket.create_connection(listener.getsockname())
            server, _ = listener.accept()
        self.fd = hand_over(server)

    def close(self) -> None:
        self.client.close()


class Injected(Exception):
    pass


class InjectedBaseException(BaseException):
    """Stands for trio.Cancelled or KeyboardInterrupt: not an Exception, so `except Exception` misses it."""


class Recorder:
    """Real steps that count calls, fail at call `fail_at`, and catch double closes.

    Each fd closed through `close_fd` is plugged at once with a /dev/null fd at
    the same number: a second close of that number, by any path (the seam, a
    socket object, a garbage-collected socket), would close the plug, which
    `check_plugs` notices.
    """

    def __init__(
        self, names: dict[int, str], fail_at: int | None = None, error: type[BaseException] = Injected
    ) -> None:
        self.names = names
        self.fail_at = fail_at
        self.error = error
        self.calls: list[str] = []
        self.closed: list[int] = []
        self.plugs: list[int] = []
        self.logged: list[str] = []
        # Opened now, not while plugging: it would take the very number to plug.
        self.null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)

    def _step(self, label: str) -> None:
        self.calls.append(label)
        if len(self.calls) == self.fail_at:
            raise self.error(f"injected at step {self.fail_at}: {label}")

    def set_cloexec(self, fd: int, name: str) -> None:
        self._step(f"set_cloexec {name}")
        DEFAULT_STEPS.set_cloexec(fd, name)

    def inspect_fd(self, fd: int, name: str) -> PassedSocket:
        self._step(f"inspect {name}")
        return DEFAULT_STEPS.inspect_fd(fd, name)

    def match_passed(
        self, manifest: Manifest, found: Sequence[PassedSocket], names_given: bool, missing_ok: bool
    ) -> Match:
        self._step("match")
        return DEFAULT_STEPS.match_passed(manifest, found, names_given, missing_ok)

    def wrap(self, fd: int) -> socket.socket:
        self._step(f"wrap {self.names.get(fd, fd)}")
        return DEFAULT_STEPS.wrap(fd)

    def close_fd(self, fd: int) -> None:
        # Recorded before the call: an attempt on a number not held counts too.
        self.closed.append(fd)
        # Like close(2): the number is released even when an error is reported.
        os.close(fd)
        plug = fcntl.fcntl(self.null, fcntl.F_DUPFD_CLOEXEC, fd)
        assert plug == fd, "the closed number was free, so F_DUPFD must land on it"
        self.plugs.append(plug)
        self._step(f"close {self.names.get(fd, fd)}")

    def warning(self, msg: str, /, *args: object) -> None:
        self._step("log")
        self.logged.append(msg % args)

    @property
    def steps(self) -> AdoptSteps:
        return AdoptSteps(self.set_cloexec, self.inspect_fd, self.match_passed, self.wrap, self.close_fd)

    def check_plugs(self) -> None:
        """Every plug is still open (nothing was closed twice); then remove them."""
        os.close(self.null)
        gc.collect()
        intact = [plug for plug in self.plugs if is_open(plug)]
        for plug in intact:
            os.close(plug)
        assert intact == self.plugs, "a number was closed a second time"


# --- PassedFds ----------------------------------------------------------------


def test_take_moves_ownership_of_every_fd_with_that_name_in_order() -> None:
    first, other, second = tcp_listener(), udp_socket(), tcp_listener()
    passed = PassedFds(listen_fds([(first, "web"), (other, "dns"), (second, "web")]))
    taken = passed.take("web")
    assert [sock.fileno() for sock in taken] == [first, second]
    assert passed.remaining() == ((other, "dns"),)
    passed.close()
    assert not is_open(other)
    # Closing the old owner left the taken sockets alone: they still listen.
    for sock in taken:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        sock.close()


def test_take_sets_cloexec_on_what_it_hands_out() -> None:
    fd = tcp_listener()
    assert os.get_inheritable(fd)
    with PassedFds(listen_fds([(fd, "web")])) as passed:
        [sock] = passed.take("web")
    with sock:
        assert not os.get_inheritable(sock.fileno())


def test_take_fd_and_take_of_an_absent_name() -> None:
    fd = tcp_listener()
    with PassedFds(listen_fds([(fd, "web")])) as passed:
        assert passed.take("nothing") == []
        with passed.take_fd(fd) as sock:
            assert sock.fileno() == fd
            with pytest.raises(ValueError, match=f"fd {fd} is not owned by this PassedFds"):
                passed.take_fd(fd)


def test_take_after_close_is_an_error() -> None:
    passed = PassedFds(listen_fds([(tcp_listener(), "web")]))
    passed.close()
    with pytest.raises(ValueError, match="closed"):
        passed.take("web")


def test_close_closes_each_fd_once_and_a_second_close_does_nothing() -> None:
    fds = [tcp_listener(), udp_socket()]
    recorder = Recorder({})
    passed = PassedFds(listen_fds([(fds[0], "a"), (fds[1], "b")]), steps=recorder.steps)
    passed.close()
    passed.close()
    assert recorder.closed == fds
    assert passed.remaining() == ()
    recorder.check_plugs()


def test_close_raises_when_an_owned_fd_was_closed_behind_its_back_and_still_closes_the_rest() -> None:
    stolen, kept = tcp_listener(), udp_socket()
    passed = PassedFds(listen_fds([(stolen, "a"), (kept, "b")]))
    os.close(stolen)
    with pytest.raises(OSError, match="Bad file descriptor") as info:
        passed.close()
    assert info.value.errno == errno.EBADF
    assert not is_open(kept)


def test_take_is_all_or_nothing_when_wrapping_fails() -> None:
    first, second = tcp_listener(), tcp_listener()
    recorder = Recorder({first: "first", second: "second"}, fail_at=4)  # the second wrap
    with PassedFds(listen_fds([(first, "web"), (second, "web")]), steps=recorder.steps) as passed:
        with pytest.raises(Injected):
            passed.take("web")
        assert recorder.calls == ["set_cloexec web", "wrap first", "set_cloexec web", "wrap second"]
        assert passed.remaining() == ((first, "web"), (second, "web"))
        assert recorder.closed == []
        assert is_open(first)
        assert is_open(second)
    assert recorder.closed == [first, second]
    recorder.check_plugs()


def test_take_of_a_non_socket_is_an_adoption_error_and_ownership_stays(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("x")
    fd = os.open(path, os.O_RDONLY)
    with PassedFds(listen_fds([(fd, "web")])) as passed:
        with pytest.raises(AdoptionError, match=rf"fd {fd} \('web'\): cannot use it as a socket"):
            passed.take("web")
        assert passed.remaining() == ((fd, "web"),)
    assert not is_open(fd)


def test_passed_fds_refuses_a_number_twice() -> None:
    fd = tcp_listener()
    try:
        with pytest.raises(ValueError, match="appears twice"):
            PassedFds(listen_fds([(fd, "a"), (fd, "b")]))
    finally:
        os.close(fd)


# --- adopt: the good paths ------------------------------------------------------


def test_adopt_sets_cloexec_and_wraps_the_passed_numbers_without_duplicates(tmp_path: Path) -> None:
    web, dns = tcp_listener(), udp_socket()
    before = open_fds()
    with adopt(load(tmp_path, WEB_AND_DNS), listen_fds([(web, "web"), (dns, "dns")])) as adopted:
        assert {name: [s.fileno() for s in socks] for name, socks in adopted.sockets.items()} == {
            "web": [web],
            "dns": [dns],
        }
        assert adopted.connection is None
        assert adopted.warnings == ()
        assert not os.get_inheritable(web)
        assert not os.get_inheritable(dns)
        assert open_fds() == before
    assert not is_open(web)
    assert not is_open(dns)


def test_several_fds_under_one_name_are_all_adopted_in_order(tmp_path: Path) -> None:
    hosts = ["127.0.0.1", "::1"] if has_ipv6() else ["127.0.0.1", "127.0.0.1"]
    fds = [tcp_listener(host) for host in hosts]
    manifest = load(tmp_path, '[sockets.web]\nlisten = "0"\n')  # bare port 0: any host, any port
    with adopt(manifest, listen_fds([(fd, "web") for fd in fds])) as adopted:
        listeners = adopted.sockets["web"]
        assert [sock.fileno() for sock in listeners] == fds
        for listener in listeners:
            with socket.create_connection(listener.getsockname()[:2]):
                conn, _ = listener.accept()
                conn.close()


def test_unclaimed_and_stored_fds_are_logged_and_closed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    web, metrics, stored = tcp_listener(), tcp_listener(), udp_socket()
    caplog.set_level(logging.WARNING, logger="trio_activate")
    listen = listen_fds([(web, "web"), (metrics, "metrics"), (stored, "stored")])
    with adopt(load(tmp_path, WEB), listen) as adopted:
        assert not is_open(metrics)
        assert not is_open(stored)
        assert [s.fileno() for s in adopted.sockets["web"]] == [web]
        logged = tuple(r.getMessage() for r in caplog.records if r.name == "trio_activate")
        assert logged == adopted.warnings
        assert f"fd {metrics} is named 'metrics'" in logged[0]
        assert f"fd {stored} is named 'stored'" in logged[1]
        assert all(message.endswith("closing it") for message in logged)


@pytest.mark.parametrize(
    "name", ["a\tb", "del\x7f", "caf\xe9", "x" * 256], ids=["tab", "del", "utf-8", "256"]
)
def test_a_passed_name_no_manifest_could_declare_is_unclaimed_like_any_other(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, name: str
) -> None:
    """LISTEN_FDNAMES is read as libsystemd reads it; a name the manifest does
    not declare, whatever its characters, is closed with a one-line warning."""
    web, odd = tcp_listener(), tcp_listener()
    caplog.set_level(logging.WARNING, logger="trio_activate")
    with adopt(load(tmp_path, WEB), listen_fds([(web, "web"), (odd, name)])) as adopted:
        assert not is_open(odd)
        assert [s.fileno() for s in adopted.sockets["web"]] == [web]
        (warning,) = adopted.warnings
        assert warning.startswith(
            f"service.toml: fd {odd} is named {name!r}: the manifest declares no socket"
        )
        assert "\n" not in warning


def test_accept_yes_connection_named_connection(tmp_path: Path) -> None:
    conn = Connection()
    try:
        with adopt(load(tmp_path, WEB), listen_fds([(conn.fd, "connection")])) as adopted:
            assert adopted.sockets == {}
            assert adopted.connection is not None
            conn.client.sendall(b"ping")
            assert adopted.connection.recv(4) == b"ping"
    finally:
        conn.close()


def test_accept_yes_connection_passed_alone_without_names(tmp_path: Path) -> None:
    # systemd-socket-activate --accept without --fdname.
    conn = Connection()
    try:
        listen = listen_fds([(conn.fd, "unknown")], names_given=False)
        with adopt(load(tmp_path, WEB), listen) as adopted:
            assert adopted.connection is not None
            assert adopted.connection.fileno() == conn.fd
    finally:
        conn.close()


def test_adopt_takes_what_an_embedder_left_in_a_passed_fds(tmp_path: Path) -> None:
    web, extra = tcp_listener(), udp_socket()
    passed = PassedFds(listen_fds([(web, "web"), (extra, "extra")]))
    [mine] = passed.take("extra")
    with mine, adopt(load(tmp_path, WEB), passed) as adopted:
        assert adopted.warnings == ()  # "extra" was taken, so nothing is unclaimed
        assert passed.remaining() == ()
        assert mine.getsockname()[0] == "127.0.0.1"  # still open and ours
    with pytest.raises(ValueError, match="give the steps to PassedFds"):
        adopt(load(tmp_path, WEB), PassedFds(listen_fds([])), steps=DEFAULT_STEPS)
    with pytest.raises(ValueError, match="this PassedFds is closed"):
        adopt(load(tmp_path, WEB), passed)


def test_adopted_close_closes_everything_once_and_again_does_nothing(tmp_path: Path) -> None:
    web = tcp_listener()
    adopted = adopt(load(tmp_path, WEB), listen_fds([(web, "web")]))
    [sock] = adopted.sockets["web"]
    adopted.close()
    assert sock.fileno() == -1
    assert adopted.sockets == {}
    adopted.close()


_LIST_FDS = "import os; print(sorted(int(n) for n in os.listdir('/proc/self/fd')))"


def child_fds() -> set[int]:
    out = subprocess.run([sys.executable, "-c", _LIST_FDS], close_fds=False, capture_output=True, check=True)
    return set(ast.literal_eval(out.stdout.decode()))


def test_a_process_spawned_after_adoption_does_not_inherit_the_fds(tmp_path: Path) -> None:
    web, dns = tcp_listener(), udp_socket()
    # The control: as passed, the fds are inheritable, so a child would get them.
    assert {web, dns} <= child_fds()
    with adopt(load(tmp_path, WEB_AND_DNS), listen_fds([(web, "web"), (dns, "dns")])):
        assert not {web, dns} & child_fds()


# --- adopt: every failure closes every fd -----------------------------------------


def check_adoption_error(
    tmp_path: Path, manifest_text: str, fds: list[tuple[int, str]], pattern: str
) -> None:
    """Adoption fails with `pattern`, and every passed fd is closed exactly once."""
    recorder = Recorder({})
    with pytest.raises(AdoptionError, match=pattern) as info:
        adopt(load(tmp_path, manifest_text), listen_fds(fds), steps=recorder.steps)
    assert not getattr(info.value, "__notes__", None)  # no close failed during the cleanup
    assert sorted(recorder.closed) == sorted(fd for fd, _ in fds)
    recorder.check_plugs()


def test_fd_not_open_is_an_error_and_its_number_is_never_closed(tmp_path: Path) -> None:
    web = tcp_listener()
    recorder = Recorder({})
    missing = os.open(os.devnull, os.O_RDONLY)
    os.close(missing)
    listen = listen_fds([(web, "web"), (missing, "dns")])
    with pytest.raises(FdNotOpenError, match=rf"fd {missing} \('dns'\) is not open") as info:
        adopt(load(tmp_path, WEB_AND_DNS), listen, steps=recorder.steps)
    assert recorder.closed == [web]
    assert not getattr(info.value, "__notes__", None)  # no close failed during the cleanup
    recorder.check_plugs()


def test_regular_file_is_an_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "data"
    path.write_text("x")
    fd = os.open(path, os.O_RDONLY)
    check_adoption_error(tmp_path, WEB, [(fd, "web")], rf"fd {fd} \('web'\) is a regular file \({path}\)")


def test_pipe_is_an_error_naming_it(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    os.close(write_end)
    check_adoption_error(tmp_path, WEB, [(read_end, "web")], rf"fd {read_end} \('web'\) is a pipe")


def test_family_mismatch_is_an_error(tmp_path: Path) -> None:
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    unix.bind(str(tmp_path / "web.sock"))
    fd = hand_over(unix)
    check_adoption_error(
        tmp_path, WEB, [(fd, "web")], rf"sockets\.web: fd {fd} is a unix datagram socket bound to .*web\.sock"
    )


def test_type_mismatch_is_an_error(tmp_path: Path) -> None:
    fd = udp_socket()
    check_adoption_error(tmp_path, WEB, [(fd, "web")], rf"sockets\.web: fd {fd} is an IPv4 datagram socket")


def test_stream_socket_that_is_not_listening_is_an_error(tmp_path: Path) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    fd = hand_over(sock)
    check_adoption_error(tmp_path, WEB, [(fd, "web")], rf"fd {fd} is an IPv4 stream socket .*, not listening")


def test_error_after_other_fds_were_checked_closes_them_all(tmp_path: Path) -> None:
    # The mismatch is the last fd: the good ones before it are closed too.
    web, dns = tcp_listener(), tcp_listener()
    check_adoption_error(tmp_path, WEB_AND_DNS, [(web, "web"), (dns, "dns")], rf"sockets\.dns: fd {dns}")


# The fault scenario passes one fd of every kind adopt treats differently:
# two fds under one name, a datagram socket, an undeclared name, `stored`, and
# an Accept=yes connection.  adopt makes these calls, in this order:
FAULT_STEPS = [
    *(f"set_cloexec {name}" for name in ("web", "web", "dns", "metrics", "stored", "connection")),
    *(f"inspect {name}" for name in ("web", "web", "dns", "metrics", "stored", "connection")),
    "match",
    "log",  # metrics is unclaimed
    "log",  # stored is unclaimed
    "wrap connection",
    "wrap web 1",
    "wrap web 2",
    "wrap dns",
    "close metrics",
    "close stored",
]


class FaultScenario:
    def __init__(self, tmp_path: Path, fail_at: int | None, error: type[BaseException]) -> None:
        self.connection = Connection()
        self.fds = {
            tcp_listener(): "web 1",
            tcp_listener(): "web 2",
            udp_socket(): "dns",
            tcp_listener(): "metrics",
            udp_socket(): "stored",
            self.connection.fd: "connection",
        }
        self.listen = listen_fds([(fd, label.split()[0]) for fd, label in self.fds.items()])
        self.manifest = load(tmp_path, WEB_AND_DNS)
        self.recorder = Recorder(self.fds, fail_at, error)

    def adopt(self) -> Adopted:
        return adopt(self.manifest, self.listen, log=self.recorder, steps=self.recorder.steps)


def test_fault_scenario_without_a_fault_makes_every_listed_step(tmp_path: Path) -> None:
    scenario = FaultScenario(tmp_path, None, Injected)
    with scenario.adopt() as adopted:
        assert scenario.recorder.calls == FAULT_STEPS
        assert sorted(adopted.sockets) == ["dns", "web"]
        assert adopted.connection is not None
        assert len(scenario.recorder.logged) == 2
    scenario.connection.close()
    assert sorted(scenario.recorder.closed) == sorted(
        fd for fd, label in scenario.fds.items() if label in ("metrics", "stored")
    )
    scenario.recorder.check_plugs()


@pytest.mark.parametrize("error", [Injected, InjectedBaseException])
@pytest.mark.parametrize("fail_at", range(1, len(FAULT_STEPS) + 1), ids=lambda n: f"{n}-{FAULT_STEPS[n - 1]}")
def test_a_fault_at_any_step_closes_every_fd_exactly_once(
    tmp_path: Path, fail_at: int, error: type[BaseException]
) -> None:
    before = open_fds()
    scenario = FaultScenario(tmp_path, fail_at, error)
    with pytest.raises(error, match=f"injected at step {fail_at}: {FAULT_STEPS[fail_at - 1]}$"):
        scenario.adopt()
    scenario.connection.close()
    # Never closed twice: a second close would have hit the plug at its number.
    scenario.recorder.check_plugs()
    # The steps up to the fault ran, then only the cleanup's closes...
    calls = scenario.recorder.calls
    assert calls[:fail_at] == FAULT_STEPS[:fail_at]
    assert all(call.startswith("close ") for call in calls[fail_at:])
    # ...which closed each passed fd once...
    assert sorted(scenario.recorder.closed) == sorted(scenario.fds)
    # ...and nothing else was left open or closed.
    assert open_fds() == before


# --- with the real peer ------------------------------------------------------------

_SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")
_needs_socket_activate = pytest.mark.skipif(
    _SOCKET_ACTIVATE is None, reason="systemd-socket-activate is not installed (Debian package systemd)"
)

# The service: read LISTEN_*, adopt, report what it got as JSON on stdout.
_SERVICE = """
import json, os, sys
from trio_activate.system.fds import own_pidfd_id
from trio_activate.model.listen_env import take_listen_env
from trio_activate.model.manifest import load_manifest
from trio_activate.system.passed import adopt

listen = take_listen_env(os.environ, pid=os.getpid(), pidfd_id=own_pidfd_id())
with adopt(load_manifest(sys.argv[1]), listen) as adopted:
    if adopted.connection is not None:
        adopted.connection.sendall(b"hello from the service")
    print(json.dumps({
        "sockets": {
            name: [[s.fileno(), s.family, os.get_inheritable(s.fileno())] for s in socks]
            for name, socks in adopted.sockets.items()
        },
        "connection": None if adopted.connection is None else adopted.connection.fileno(),
        "warnings": adopted.warnings,
    }))
"""


def run_socket_activate(args: list[str], manifest: Path, port: int) -> tuple[dict[str, Any], bytes]:
    """Run the service under systemd-socket-activate; its report, and what it sent a client."""
    assert _SOCKET_ACTIVATE is not None
    command = [_SOCKET_ACTIVATE, *args, sys.executable, "-c", _SERVICE, str(manifest)]
    # systemd-socket-activate starts the service on the first connection.
    with (
        started(command) as proc,
        retry(lambda: socket.create_connection(("127.0.0.1", port))) as client,
    ):
        wait_until(lambda: "\n" in proc.out or proc.poll() is not None, timeout=20, what="a report")
        if "\n" not in proc.out:
            raise AssertionError(f"the service printed no report (so far: {proc.out!r}):\n{proc.log}")
        report = proc.out.splitlines()[0]
        client.settimeout(10)
        try:
            received = client.recv(100)
        except ConnectionResetError:  # the service closed the listener with us in its backlog
            received = b""
    # (With --accept, systemd-socket-activate keeps serving: leaving `started` stops it.)
    parsed: dict[str, Any] = json.loads(report)
    return parsed, received


@_needs_socket_activate
def test_adopts_what_systemd_socket_activate_passes_under_one_name(tmp_path: Path) -> None:
    # free_port: systemd-socket-activate -l refuses port 0 ("Failed to parse socket address").
    port = free_port()
    manifest = tmp_path / "service.toml"
    manifest.write_text(f'[sockets.web]\nlisten = ["127.0.0.1:{port}", "./web.sock"]\n')
    args = ["-l", f"127.0.0.1:{port}", "-l", str(tmp_path / "web.sock"), "--fdname=web"]
    report, _ = run_socket_activate(args, manifest, port)
    assert report == {
        "sockets": {"web": [[3, socket.AF_INET, False], [4, socket.AF_UNIX, False]]},
        "connection": None,
        "warnings": [],
    }


@_needs_socket_activate
def test_adopts_the_connection_systemd_socket_activate_accept_passes(tmp_path: Path) -> None:
    # free_port: systemd-socket-activate -l refuses port 0 ("Failed to parse socket address").
    port = free_port()
    manifest = tmp_path / "service.toml"
    manifest.write_text(f'[sockets.web]\nlisten = "127.0.0.1:{port}"\n')
    report, received = run_socket_activate(["-l", f"127.0.0.1:{port}", "--accept"], manifest, port)
    assert report == {"sockets": {}, "connection": 3, "warnings": []}
    assert received == b"hello from the service"


# --- a LISTEN_FDS larger than what was passed --------------------------------

# The service, in a process the shell made the LISTEN_PID of: fd 3 is a
# listening socket, fd 4 is missing, and the process holds fds of its own at
# numbers LISTEN_FDS counts (5, 1000, and the highest its RLIMIT_NOFILE
# allows, raised as far as the hard limit lets it), inheritable so that an
# FD_CLOEXEC set on them would show.  Then `serve` runs; the report says
# which of its own fds are still as they were.
_COUNTED_TOO_MANY = r"""
import json, os, resource, socket, sys
count = int(os.environ["LISTEN_FDS"])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if hard == resource.RLIM_INFINITY or hard > count + 3:
    hard = count + 3
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen()
fd = listener.detach()
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
assert not os.path.exists("/proc/self/fd/4")
own = {}
for number in (5, 1000, hard - 1):
    fd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(fd, number)  # inheritable
    os.close(fd)
    own[number] = os.fstat(number).st_ino
from trio_activate.cli.commands import main
status = main(["serve", sys.argv[1]])
def untouched(number, ino):
    try:
        return os.fstat(number).st_ino == ino and os.get_inheritable(number)
    except OSError:
        return False
print(json.dumps({
    "status": status,
    "highest_own": hard - 1,
    "own_untouched": {str(n): untouched(n, ino) for n, ino in own.items()},
    "fd_3_open": os.path.exists("/proc/self/fd/3"),
}))
"""


def test_listen_fds_counting_a_missing_fd_fails_at_once_and_touches_only_what_was_found(
    tmp_path: Path,
) -> None:
    """LISTEN_FDS=100000 with fd 4 missing: the one-line EBADF error, fd 3
    (found open, so passed) closed, and no other fd touched: the process's
    own fds inside the counted range are neither closed nor made
    close-on-exec.  (Before, every number up to 100002 was closed.)"""
    manifest = tmp_path / "service.toml"
    manifest.write_text(WEB + '[handlers.web]\nsocket = "web"\ncall = "trio_activate.examples:echo"\n')
    env = {key: value for key, value in os.environ.items() if not key.startswith("LISTEN_")}
    env["LISTEN_FDS"] = "100000"
    out = subprocess.run(
        [
            "/bin/sh",
            "-c",
            'LISTEN_PID=$$ exec "$0" "$@"',
            sys.executable,
            "-c",
            _COUNTED_TOO_MANY,
            str(manifest),
        ],
        env=env,
        capture_output=True,
        check=True,
        timeout=120,
    )
    assert out.stderr.decode() == (
        "trio-activate: fd 4 ('unknown') is not open (EBADF): "
        "LISTEN_FDS says it was passed, but nothing is there\n"
    )
    report = json.loads(out.stdout)
    assert report["status"] == 2
    assert report["fd_3_open"] is False
    highest = str(report["highest_own"])
    assert report["own_untouched"] == {"5": True, "1000": True, highest: True}
