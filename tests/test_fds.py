"""`trio_activate.system.fds` against real kernel objects: sockets, pipes, files, pidfds."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
from helpers import has_ipv6

from trio_activate.errors import AdoptionError
from trio_activate.model.address import AbstractAddress, InetAddress, UnixAddress
from trio_activate.system.fds import (
    FdNotOpenError,
    close_all,
    inspect_fd,
    open_fds,
    own_pidfd_id,
    set_cloexec,
)

pytestmark = pytest.mark.usefixtures("no_fd_leaks")


def closed_fd_number() -> int:
    """A number that is not open right now (the lowest free one)."""
    fd = os.open(os.devnull, os.O_RDONLY)
    os.close(fd)
    return fd


def test_own_pidfd_id_is_the_inode_of_a_pidfd_for_this_process() -> None:
    value = own_pidfd_id()
    if value is None:
        pytest.skip("no pidfs on this kernel (Linux < 6.9) or no pidfd_open")
    pidfd = os.pidfd_open(os.getpid())
    try:
        assert value == os.fstat(pidfd).st_ino
    finally:
        os.close(pidfd)


def test_own_pidfd_id_differs_between_processes() -> None:
    mine = own_pidfd_id()
    if mine is None:
        pytest.skip("no pidfs on this kernel (Linux < 6.9) or no pidfd_open")
    child = subprocess.run(
        [sys.executable, "-c", "from trio_activate.system.fds import own_pidfd_id; print(own_pidfd_id())"],
        check=True,
        capture_output=True,
        text=True,
    )
    assert int(child.stdout) != mine


def test_set_cloexec_sets_the_flag() -> None:
    read_end, write_end = os.pipe()
    try:
        os.set_inheritable(read_end, True)
        os.set_inheritable(write_end, True)
        set_cloexec(read_end)
        assert os.get_inheritable(read_end) is False
        assert os.get_inheritable(write_end) is True  # only the fd given is touched
    finally:
        os.close(read_end)
        os.close(write_end)


def test_set_cloexec_on_a_closed_fd_is_an_adoption_error_naming_it() -> None:
    fd = closed_fd_number()
    with pytest.raises(FdNotOpenError) as info:
        set_cloexec(fd, name="web")
    assert isinstance(info.value, AdoptionError)
    assert info.value.fd == fd
    assert str(info.value).startswith(f"fd {fd} ('web') is not open (EBADF)")


def test_inspect_ipv4_listener() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        found = inspect_fd(sock.fileno(), "web")
        assert found.fd == sock.fileno()
        assert found.name == "web"
        assert (found.family, found.type, found.listening) == (socket.AF_INET, socket.SOCK_STREAM, True)
        assert found.address == InetAddress("127.0.0.1", sock.getsockname()[1])


@pytest.mark.skipif(not has_ipv6(), reason="no IPv6 on this host")
def test_inspect_ipv6_listener() -> None:
    with socket.socket(socket.AF_INET6) as sock:
        sock.bind(("::1", 0))
        sock.listen()
        found = inspect_fd(sock.fileno(), "web")
        assert found.family == socket.AF_INET6
        assert found.address == InetAddress("::1", sock.getsockname()[1])


def test_inspect_bound_but_not_listening_stream_socket() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        assert inspect_fd(sock.fileno(), "web").listening is False


def test_inspect_udp_socket() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        found = inspect_fd(sock.fileno(), "dns")
        assert (found.family, found.type, found.listening) == (socket.AF_INET, socket.SOCK_DGRAM, False)


def test_inspect_unix_path_and_seqpacket(tmp_path: Path) -> None:
    path = str(tmp_path / "ctl.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.bind(path)
        sock.listen()
        found = inspect_fd(sock.fileno(), "ctl")
        assert (found.family, found.type, found.listening) == (socket.AF_UNIX, socket.SOCK_SEQPACKET, True)
        assert found.address == UnixAddress(path)


def test_inspect_abstract_unix_socket() -> None:
    name = f"trio-activate-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        assert inspect_fd(sock.fileno(), "x").address == AbstractAddress(name)


def test_inspect_unnamed_socketpair_end() -> None:
    left, right = socket.socketpair()
    with left, right:
        found = inspect_fd(left.fileno(), "x")
        assert (found.family, found.listening, found.address) == (socket.AF_UNIX, False, None)


def test_inspect_sees_the_type_without_the_nonblocking_flag() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK) as sock:
        assert inspect_fd(sock.fileno(), "x").type == socket.SOCK_STREAM


def test_inspect_leaves_the_fd_open_unchanged_and_opens_nothing() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        sock.setblocking(False)
        before = open_fds()
        inspect_fd(sock.fileno(), "web")
        assert open_fds() == before
        # Still the same live socket, with its flags as they were.
        assert sock.getblocking() is False
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1


def test_inspect_regular_file_says_what_it_is(tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    path.write_text("not a socket")
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(AdoptionError) as info:
            inspect_fd(fd, "web")
        assert str(info.value) == (
            f"fd {fd} ('web') is a regular file ({path}), not a socket: only sockets can be passed"
        )
        os.fstat(fd)  # the error left it open: its owner closes it
    finally:
        os.close(fd)


def test_inspect_pipe_says_what_it_is() -> None:
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(AdoptionError, match=rf"fd {read_end} \('web'\) is a pipe \(FIFO\) \(pipe:\["):
            inspect_fd(read_end, "web")
    finally:
        os.close(read_end)
        os.close(write_end)


def test_inspect_folder_says_what_it_is_in_the_words_socket_creation_uses(tmp_path: Path) -> None:
    """One wording for a file that is no socket, passed as an fd or found where a socket file goes."""
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(
            AdoptionError, match=rf"^fd {fd} \('web'\) is a folder \({tmp_path}\), not a socket"
        ):
            inspect_fd(fd, "web")
    finally:
        os.close(fd)


def test_inspect_anonymous_inode_says_what_it_is() -> None:
    fd = os.eventfd(0)
    try:
        with pytest.raises(AdoptionError, match=r"an anonymous inode\) \(anon_inode:\[eventfd\]\)"):
            inspect_fd(fd, "web")
    finally:
        os.close(fd)


def test_inspect_closed_fd_is_fd_not_open_error() -> None:
    fd = closed_fd_number()
    with pytest.raises(FdNotOpenError, match=rf"^fd {fd} \('web'\) is not open"):
        inspect_fd(fd, "web")


def test_open_fds_lists_exactly_the_open_fds() -> None:
    before = open_fds()
    fd = os.open(os.devnull, os.O_RDONLY)
    try:
        assert open_fds() == before | {fd}
    finally:
        os.close(fd)
    assert fd not in open_fds()
    # The fd listdir used for /proc/self/fd is gone by the time we look.
    for number in open_fds():
        os.fstat(number)


def test_inspect_tells_a_connection_from_a_socket_that_does_not_listen() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        with socket.create_connection(listener.getsockname()) as client, socket.socket() as idle:
            idle.bind(("127.0.0.1", 0))
            assert inspect_fd(client.fileno(), "c").connected
            assert not inspect_fd(idle.fileno(), "i").connected
            assert not inspect_fd(listener.fileno(), "l").connected


def test_close_all_closes_every_one_after_a_failure_then_raises_the_first() -> None:
    closed: list[int] = []

    def close(number: int) -> None:
        closed.append(number)
        if number in (1, 3):
            raise OSError(number, f"close {number} failed")

    with pytest.raises(OSError, match="close 1 failed"):
        close_all(partial(close, number) for number in range(5))
    assert closed == [0, 1, 2, 3, 4]


def test_close_all_closes_the_rest_before_an_interrupt_propagates() -> None:
    first, second = socket.socketpair()

    def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        close_all([first.close, interrupted, second.close])
    assert (first.fileno(), second.fileno()) == (-1, -1)
    close_all([])  # nothing to close: returns
