"""Tests for trio_activate.system.notifier: sending to real unix datagram sockets.

Each test binds a real AF_UNIX SOCK_DGRAM socket (a file in tmp_path, or an
abstract name), builds the Notifier from a plain dict, and reads the exact
datagram the kernel delivered.  Failures are real too: a path nobody binds,
a socket file whose owner is gone, a receive queue that is full.
"""

from __future__ import annotations

import array
import fcntl
import logging
import os
import socket
import stat
import subprocess
import threading
import time
import types
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import require_peer

from trio_activate.system.fds import open_fds
from trio_activate.system.notifier import FdStorePlan, Notifier

OTHER_PID = 1  # init: never the test process


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket at a path, and that path."""
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        yield sock, path


@pytest.fixture
def abstract_receiver() -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket with a unique abstract name, and "@name"."""
    name = f"trio-activate-test/{os.getpid()}/{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        yield sock, "@" + name


def received(sock: socket.socket) -> list[bytes]:
    """Every datagram waiting on `sock`, without blocking."""
    datagrams = []
    while True:
        try:
            datagrams.append(sock.recv(65536, socket.MSG_DONTWAIT))
        except BlockingIOError:
            return datagrams


# --- sending ----------------------------------------------------------------


def test_sends_to_a_socket_file(receiver: tuple[socket.socket, str]) -> None:
    """NOTIFY_SOCKET=/path: the datagram arrives with the exact bytes."""
    sock, path = receiver
    with Notifier.from_environ({"NOTIFY_SOCKET": path}) as notifier:
        assert notifier.enabled
        assert notifier.address == path
        assert notifier.ready() is True
    assert received(sock) == [b"READY=1"]


def test_sends_to_an_abstract_name(abstract_receiver: tuple[socket.socket, str]) -> None:
    """NOTIFY_SOCKET=@name: the '@' is the abstract namespace's NUL."""
    sock, value = abstract_receiver
    with Notifier.from_environ({"NOTIFY_SOCKET": value}) as notifier:
        assert notifier.address == b"\0" + value[1:].encode()
        assert notifier.status("up") is True
    assert received(sock) == [b"STATUS=up"]


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        pytest.param(lambda n: n.ready(), b"READY=1", id="ready"),
        pytest.param(lambda n: n.ready("serving"), b"READY=1\nSTATUS=serving", id="ready-status"),
        pytest.param(lambda n: n.stopping(), b"STOPPING=1", id="stopping"),
        pytest.param(lambda n: n.status("a\nb"), b"STATUS=a b", id="status-newline"),
        pytest.param(lambda n: n.watchdog(), b"WATCHDOG=1", id="watchdog"),
        pytest.param(lambda n: n.extend_timeout(1.5), b"EXTEND_TIMEOUT_USEC=1500000", id="extend"),
        pytest.param(lambda n: n.extend_timeout(0.0000014), b"EXTEND_TIMEOUT_USEC=1", id="extend-round"),
        pytest.param(lambda n: n.send(b"CUSTOM=1\nX=y"), b"CUSTOM=1\nX=y", id="send"),
    ],
)
def test_each_method_sends_one_datagram_with_exact_bytes(
    receiver: tuple[socket.socket, str], call: types.FunctionType, expected: bytes
) -> None:
    """Every convenience method sends exactly one datagram and returns True."""
    sock, path = receiver
    with Notifier.from_environ({"NOTIFY_SOCKET": path}) as notifier:
        assert call(notifier) is True
    assert received(sock) == [expected]


def test_reloading_sends_clock_monotonic_in_microseconds(receiver: tuple[socket.socket, str]) -> None:
    """RELOADING=1 carries MONOTONIC_USEC of now, from CLOCK_MONOTONIC."""
    sock, path = receiver
    with Notifier.from_environ({"NOTIFY_SOCKET": path}) as notifier:
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert notifier.reloading() is True
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    [datagram] = received(sock)
    head, _, usec = datagram.partition(b"\nMONOTONIC_USEC=")
    assert head == b"RELOADING=1"
    assert before <= int(usec) <= after


def test_explicit_address_without_environ(receiver: tuple[socket.socket, str]) -> None:
    """Notifier(address) sends there; the environment is not read."""
    sock, path = receiver
    with Notifier(path, watchdog_interval=2.5) as notifier:
        assert notifier.watchdog_interval == 2.5
        assert notifier.stopping() is True
    assert received(sock) == [b"STOPPING=1"]


@pytest.mark.parametrize(
    ("address", "interval", "match"),
    [
        ("", None, "address must not be empty"),
        (b"", None, "address must not be empty"),
        ("/x", 0.0, "watchdog_interval must be a positive number of seconds, not 0.0"),
        ("/x", -1.0, "watchdog_interval must be a positive number of seconds, not -1.0"),
        ("/x", float("nan"), "watchdog_interval must be a positive number of seconds, not nan"),
        ("/x", float("inf"), "watchdog_interval must be a positive number of seconds, not inf"),
    ],
)
def test_explicit_arguments_are_checked(address: str | bytes, interval: float | None, match: str) -> None:
    """An empty address or a watchdog interval that is not a positive finite
    number is the caller's bug: ValueError."""
    with pytest.raises(ValueError, match=match):
        Notifier(address, watchdog_interval=interval)


@pytest.mark.parametrize("seconds", [-1.0, float("inf"), float("nan")])
def test_extend_timeout_rejects_negative_and_non_finite_seconds(
    receiver: tuple[socket.socket, str], seconds: float
) -> None:
    """A bad argument raises ValueError; nothing is sent."""
    sock, path = receiver
    with Notifier(path) as notifier, pytest.raises(ValueError, match="extend_timeout"):
        notifier.extend_timeout(seconds)
    assert received(sock) == []


def test_from_environ_reads_os_environ_by_default(
    receiver: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without an environ argument, os.environ is read (at call time)."""
    sock, path = receiver
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    with Notifier.from_environ() as notifier:
        assert notifier.ready() is True
    assert received(sock) == [b"READY=1"]


# --- failures are logged, never raised ----------------------------------------


def test_send_to_a_path_nobody_binds_returns_false_and_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """ENOENT: False and one warning naming the address, the error and the
    message; no exception."""
    path = str(tmp_path / "nobody")
    with Notifier.from_environ({"NOTIFY_SOCKET": path}) as notifier:
        assert notifier.ready() is False
    [record] = caplog.records
    assert record.name == "trio_activate"
    assert record.levelno == logging.WARNING
    assert record.getMessage() == (
        f"could not send b'READY=1' to NOTIFY_SOCKET={path!r}: [Errno 2] No such file or directory"
    )


def test_send_to_a_socket_file_whose_owner_is_gone_returns_false_and_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """ECONNREFUSED: the file is there, the socket behind it is closed."""
    path = str(tmp_path / "gone")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    with Notifier.from_environ({"NOTIFY_SOCKET": path}) as notifier:
        assert notifier.watchdog() is False
    assert [r.getMessage() for r in caplog.records] == [
        f"could not send b'WATCHDOG=1' to NOTIFY_SOCKET={path!r}: [Errno 111] Connection refused"
    ]


def test_send_to_a_full_queue_fails_at_once_and_recovers(
    receiver: tuple[socket.socket, str], caplog: pytest.LogCaptureFixture
) -> None:
    """A receiver that does not read fills up: the next send fails at once
    with EAGAIN (MSG_DONTWAIT; a blocking send would hang here), and sends
    work again once the receiver has read."""
    sock, path = receiver
    with Notifier.from_environ({"NOTIFY_SOCKET": path}) as notifier:
        sent: list[bool] = []

        def fill() -> None:
            while len(sent) < 100_000 and notifier.watchdog():
                sent.append(True)

        # In a thread, so that a send that blocks fails the test instead of
        # hanging it; closing the receiver then wakes the blocked send.
        filler = threading.Thread(target=fill, daemon=True)
        filler.start()
        filler.join(timeout=10)
        if filler.is_alive():
            sock.close()
            filler.join()
            pytest.fail(f"send blocked on a full receive queue after {len(sent)} datagrams")
        assert 1 <= len(sent) < 100_000
        [record] = caplog.records
        assert record.levelno == logging.WARNING
        assert "Resource temporarily unavailable" in record.getMessage()
        assert len(received(sock)) == len(sent)
        assert notifier.ready() is True
    assert received(sock) == [b"READY=1"]


def test_message_too_long_for_the_socket_returns_false_and_warns(
    receiver: tuple[socket.socket, str], caplog: pytest.LogCaptureFixture
) -> None:
    """EMSGSIZE from send() is a logged failure like any other; the warning
    shows the start of the message and its length."""
    _sock, path = receiver
    with Notifier.from_environ({"NOTIFY_SOCKET": path}) as notifier:
        assert notifier.send(b"X=" + b"y" * 10_000_000) is False
    [record] = caplog.records
    assert "... (10000002 bytes)" in record.getMessage()
    assert "Message too long" in record.getMessage()


# --- disabled ---------------------------------------------------------------


def test_unset_notify_socket_disables_every_method_silently(caplog: pytest.LogCaptureFixture) -> None:
    """No NOTIFY_SOCKET: enabled is False, every method returns False, no
    socket is opened, nothing is logged."""
    before = open_fds()
    with Notifier.from_environ({"WATCHDOG_USEC": "1000000"}) as notifier:
        assert notifier.enabled is False
        assert notifier.address is None
        assert notifier.watchdog_interval is None
        results = [
            notifier.send(b"X=1"),
            notifier.ready("s"),
            notifier.reloading(),
            notifier.stopping(),
            notifier.status("s"),
            notifier.watchdog(),
            notifier.extend_timeout(1),
        ]
        assert open_fds() == before
    assert results == [False] * 7
    assert caplog.records == []


@pytest.mark.parametrize("value", ["", "relative/notify", "vsock:2:1234", "@"])
def test_malformed_notify_socket_is_warned_once_and_disables(
    value: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A malformed NOTIFY_SOCKET: one warning naming the variable and the
    value when the notifier is built, then silence; not fatal."""
    with Notifier.from_environ({"NOTIFY_SOCKET": value, "WATCHDOG_USEC": "1000000"}) as notifier:
        assert notifier.enabled is False
        assert notifier.watchdog_interval is None
        assert notifier.ready() is False
        assert notifier.watchdog() is False
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage().startswith(f"NOTIFY_SOCKET={value!r}: ")
    assert record.getMessage().endswith("; notifications to the service manager are disabled")


# --- the environment ----------------------------------------------------------


def test_unset_removes_the_three_variables_and_keeps_others(receiver: tuple[socket.socket, str]) -> None:
    """unset=True: NOTIFY_SOCKET, WATCHDOG_USEC, WATCHDOG_PID go (children do
    not inherit them); the notifier still has what it read."""
    sock, path = receiver
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "7", "PATH": "/bin"}
    with Notifier.from_environ(env, pid=7, unset=True) as notifier:
        assert env == {"PATH": "/bin"}
        assert notifier.watchdog_interval == 2.0
        assert notifier.ready() is True
    assert received(sock) == [b"READY=1"]


@pytest.mark.parametrize(
    "env",
    [
        pytest.param({"NOTIFY_SOCKET": "relative"}, id="malformed-socket"),
        pytest.param({"NOTIFY_SOCKET": "/run/n", "WATCHDOG_USEC": "x"}, id="malformed-watchdog"),
        pytest.param({"WATCHDOG_USEC": "1", "WATCHDOG_PID": str(OTHER_PID)}, id="no-socket"),
    ],
)
def test_unset_removes_the_variables_on_every_path(env: dict[str, str]) -> None:
    """Malformed or not, the variables are removed when unset=True."""
    env = {**env, "HOME": "/root"}
    with Notifier.from_environ(env, unset=True):
        pass
    assert env == {"HOME": "/root"}


def test_without_unset_the_environment_is_left_alone() -> None:
    """unset defaults to False: environ is only read."""
    env = {"NOTIFY_SOCKET": "/run/n", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "3"}
    with Notifier.from_environ(dict(env), pid=3) as notifier:
        assert notifier.watchdog_interval == 0.5
    copy = dict(env)
    with Notifier.from_environ(copy, pid=3):
        pass
    assert copy == env


def test_unset_needs_a_mutable_mapping() -> None:
    """unset=True on a read-only mapping is a TypeError, not a silent no-op."""
    env = types.MappingProxyType({"NOTIFY_SOCKET": "/run/n"})
    with pytest.raises(TypeError, match="mutable mapping"):
        Notifier.from_environ(env, unset=True)


def test_watchdog_interval_is_half_of_watchdog_usec_for_this_pid() -> None:
    """WATCHDOG_PID unset or ours: half of WATCHDOG_USEC, in seconds."""
    env = {"NOTIFY_SOCKET": "/run/n", "WATCHDOG_USEC": "30000000"}
    with Notifier.from_environ(env) as notifier:
        assert notifier.watchdog_interval == 15.0
    with Notifier.from_environ({**env, "WATCHDOG_PID": str(os.getpid())}) as notifier:
        assert notifier.watchdog_interval == 15.0


def test_watchdog_for_another_pid_is_none() -> None:
    """WATCHDOG_PID of another process: no watchdog here, no warning."""
    env = {"NOTIFY_SOCKET": "/run/n", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(OTHER_PID)}
    with Notifier.from_environ(env) as notifier:
        assert notifier.enabled
        assert notifier.watchdog_interval is None


def test_malformed_watchdog_usec_is_warned_once_and_disables_the_watchdog(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Bad WATCHDOG_USEC: one warning naming it; notifications still work."""
    env = {"NOTIFY_SOCKET": "/run/n", "WATCHDOG_USEC": "30s"}
    with Notifier.from_environ(env) as notifier:
        assert notifier.enabled
        assert notifier.watchdog_interval is None
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage() == (
        "WATCHDOG_USEC='30s': expected a positive decimal integer of microseconds; the watchdog is disabled"
    )


# --- the socket: lazy, CLOEXEC, closed by close() -------------------------------


def test_socket_is_opened_on_first_send_with_cloexec(receiver: tuple[socket.socket, str]) -> None:
    """No fd until the first send; then exactly one, an AF_UNIX datagram
    socket with FD_CLOEXEC, reused by later sends."""
    _sock, path = receiver
    before = open_fds()
    with Notifier.from_environ({"NOTIFY_SOCKET": path}) as notifier:
        assert open_fds() == before
        assert notifier.ready()
        [fd] = open_fds() - before
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        with socket.socket(fileno=os.dup(fd)) as probe:
            assert probe.family == socket.AF_UNIX
            assert probe.type == socket.SOCK_DGRAM
        assert notifier.status("again")
        assert open_fds() - before == {fd}


def test_close_closes_the_socket_and_is_idempotent(receiver: tuple[socket.socket, str]) -> None:
    """close() releases the fd; a second close() is fine."""
    _sock, path = receiver
    before = open_fds()
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": path})
    assert notifier.ready()
    assert len(open_fds() - before) == 1
    notifier.close()
    assert open_fds() == before
    notifier.close()
    assert open_fds() == before


def test_leaving_the_with_block_closes_the_socket(receiver: tuple[socket.socket, str]) -> None:
    """The context manager closes on exit, also when the block raises."""
    _sock, path = receiver
    before = open_fds()

    def send_then_fail() -> None:
        with Notifier.from_environ({"NOTIFY_SOCKET": path}) as notifier:
            assert notifier.ready()
            assert len(open_fds() - before) == 1
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        send_then_fail()
    assert open_fds() == before


def test_send_after_close_returns_false_warns_and_opens_nothing(
    receiver: tuple[socket.socket, str], caplog: pytest.LogCaptureFixture
) -> None:
    """A closed notifier stays closed: no new socket, a warning, False."""
    sock, path = receiver
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": path})
    notifier.close()
    before = open_fds()
    assert notifier.stopping() is False
    assert open_fds() == before
    assert received(sock) == []
    [record] = caplog.records
    assert (
        record.getMessage() == f"cannot send b'STOPPING=1' to NOTIFY_SOCKET={path!r}: the notifier is closed"
    )


def test_socket_is_not_inherited_by_a_child(receiver: tuple[socket.socket, str]) -> None:
    """A child started with close_fds=False still does not get the
    notifier's fd: FD_CLOEXEC closes it at exec."""
    _sock, path = receiver
    before = open_fds()
    with Notifier.from_environ({"NOTIFY_SOCKET": path}) as notifier:
        assert notifier.ready()
        [fd] = open_fds() - before
        child = subprocess.run(
            ["/bin/sh", "-c", f"test -e /proc/self/fd/{fd} && echo open || echo closed"],
            close_fds=False,
            capture_output=True,
            text=True,
            check=True,
        )
    assert child.stdout == "closed\n"


# --- interop: libsystemd reads NOTIFY_SOCKET as we do ------------------------


@pytest.mark.parametrize("form", ["path", "abstract"])
def test_systemd_notify_sends_the_same_bytes_to_the_same_address(
    form: str,
    receiver: tuple[socket.socket, str],
    abstract_receiver: tuple[socket.socket, str],
) -> None:
    """systemd-notify (libsystemd's sd_notify) given the same NOTIFY_SOCKET
    reaches the same socket with the same datagram as Notifier.ready(status)."""
    binary = require_peer("systemd-notify")
    sock, value = receiver if form == "path" else abstract_receiver
    subprocess.run(
        [binary, "--no-block", "--ready", "--status=serving 2 sockets"],
        env={**os.environ, "NOTIFY_SOCKET": value},
        check=True,
        timeout=30,
    )
    [theirs] = received(sock)
    with Notifier.from_environ({"NOTIFY_SOCKET": value}) as notifier:
        assert notifier.ready("serving 2 sockets")
    [ours] = received(sock)
    assert ours == theirs == b"READY=1\nSTATUS=serving 2 sockets"


# --- the fd store -------------------------------------------------------------


def received_with_fds(sock: socket.socket) -> list[tuple[bytes, list[socket.socket]]]:
    """Every datagram waiting on `sock`, each with the fds that came with it (owned here).

    recvmsg, not socket.recv_fds, which drops its flags (CPython 3.11): no MSG_DONTWAIT there.
    """
    datagrams = []
    space = socket.CMSG_SPACE(253 * array.array("i").itemsize)
    while True:
        try:
            data, ancillary, flags, _ = sock.recvmsg(
                4096, space, socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC
            )
        except BlockingIOError:
            return datagrams
        fds = array.array("i")
        for level, kind, cdata in ancillary:
            if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
                fds.frombytes(cdata[: len(cdata) - len(cdata) % fds.itemsize])
        owned = [socket.socket(fileno=fd) for fd in fds]
        assert not flags & socket.MSG_CTRUNC
        datagrams.append((data, owned))


def same_socket(one: socket.socket, other: socket.socket) -> bool:
    return os.fstat(one.fileno()).st_ino == os.fstat(other.fileno()).st_ino


def test_store_fds_sends_copies_of_the_listening_sockets_with_their_name(
    receiver: tuple[socket.socket, str], tmp_path: Path
) -> None:
    """FDSTORE=1 and FDNAME= in one datagram with the fds as SCM_RIGHTS: the manager's copies
    are the very listening sockets (same inode, same address), and the sender keeps its own."""
    sock, path = receiver
    with (
        socket.create_server(("127.0.0.1", 0)) as tcp,
        socket.socket(socket.AF_UNIX) as unix,
        Notifier.from_environ({"NOTIFY_SOCKET": path}) as notifier,
    ):
        unix.bind(str(tmp_path / "web.sock"))
        unix.listen()
        assert notifier.store_fds("web", [tcp.fileno(), unix.fileno()]) is True
        ((data, fds),) = received_with_fds(sock)
        try:
            assert data == b"FDSTORE=1\nFDNAME=web"
            assert [fd.getsockname() for fd in fds] == [tcp.getsockname(), unix.getsockname()]
            assert same_socket(fds[0], tcp)
            assert same_socket(fds[1], unix)
            assert {fd.fileno() for fd in fds}.isdisjoint({tcp.fileno(), unix.fileno()}), "copies"
        finally:
            for fd in fds:
                fd.close()
        assert tcp.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1, "the sender's own, still open"


def test_more_fds_than_one_datagram_carries_go_in_several_under_the_same_name(
    receiver: tuple[socket.socket, str],
) -> None:
    sock, path = receiver
    with socket.socket() as one, Notifier.from_environ({"NOTIFY_SOCKET": path}) as notifier:
        assert notifier.store_fds("many", [one.fileno()] * 254) is True
        datagrams = received_with_fds(sock)
    assert [(data, len(fds)) for data, fds in datagrams] == [
        (b"FDSTORE=1\nFDNAME=many", 253),
        (b"FDSTORE=1\nFDNAME=many", 1),
    ]
    for _, fds in datagrams:
        for fd in fds:
            fd.close()


def test_the_plan_goes_once_right_before_the_first_ready(receiver: tuple[socket.socket, str]) -> None:
    """Removals first (they free room in the store), then the sockets, then READY=1; never again."""
    sock, path = receiver
    with (
        socket.create_server(("127.0.0.1", 0)) as web,
        Notifier.from_environ({"NOTIFY_SOCKET": path}) as notifier,
    ):
        notifier.store_when_ready(FdStorePlan(store={"web": [web]}, remove=("old",)))
        notifier.status("starting")
        assert [data for data, _ in received_with_fds(sock)] == [b"STATUS=starting"], "not before ready"
        notifier.ready()
        notifier.ready()
        datagrams = received_with_fds(sock)
        assert [data for data, _ in datagrams] == [
            b"FDSTOREREMOVE=1\nFDNAME=old",
            b"FDSTORE=1\nFDNAME=web",
            b"READY=1",
            b"READY=1",
        ]
        assert [len(fds) for _, fds in datagrams] == [0, 1, 0, 0]
        assert same_socket(datagrams[1][1][0], web)
        datagrams[1][1][0].close()


def test_a_disabled_notifier_stores_nothing_and_holds_no_plan() -> None:
    with socket.socket() as web:
        notifier = Notifier.from_environ({})
        notifier.store_when_ready(FdStorePlan(store={"web": [web]}))
        assert notifier.ready() is False
        assert notifier.store_fds("web", [web.fileno()]) is False


def test_a_failed_store_is_a_warning_not_an_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with (
        socket.socket() as web,
        Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "nobody")}) as notifier,
    ):
        assert notifier.store_fds("web", [web.fileno()]) is False
    assert "could not send b'FDSTORE=1\\nFDNAME=web'" in caplog.text
