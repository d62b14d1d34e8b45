"""``[service] fd-store``: what the service sends to its manager's fd store, and when.

The manager here is a real datagram socket the test binds as ``NOTIFY_SOCKET``
(`helpers.notify_socket`), receiving each message with the sender's
credentials and the fds that came with it (``SCM_RIGHTS``).  What systemd
itself does with them (a restart passes them back) is tests/test_systemd.py's.
"""

from __future__ import annotations

import array
import contextlib
import signal
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import (
    TRIO_ACTIVATE,
    Process,
    clean_env,
    free_port,
    notify_socket,
    require_peer,
    started,
    write_manifest,
)

MANIFEST = """
[service]
{service}

[sockets.web]
listen = "127.0.0.1:0"

[sockets.admin]
listen = ["127.0.0.1:0", "{folder}/admin.sock"]

[handlers.echo]
socket = ["web", "admin"]
call = "trio_activate.examples:echo"
"""

_UCRED = struct.Struct("3i")


def receive_with_fds(sock: socket.socket) -> tuple[int, bytes, list[socket.socket]]:
    """The next message: (sender PID, its bytes, the fds that came with it, owned by the caller)."""
    fd_size = array.array("i").itemsize
    space = socket.CMSG_SPACE(_UCRED.size) + socket.CMSG_SPACE(253 * fd_size)
    data, ancillary, flags, _ = sock.recvmsg(4096, space, socket.MSG_CMSG_CLOEXEC)
    pid, fds = 0, array.array("i")
    for level, kind, cdata in ancillary:
        if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS):
            pid = _UCRED.unpack(cdata[: _UCRED.size])[0]
        elif (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
            fds.frombytes(cdata[: len(cdata) - len(cdata) % fd_size])
    owned = [socket.socket(fileno=fd) for fd in fds]
    assert not flags & socket.MSG_CTRUNC
    return pid, data, owned


def messages_until_ready(manager: socket.socket) -> list[tuple[int, bytes, list[socket.socket]]]:
    messages = []
    # A hand-over ends with MAINPID= and READY=1 in one datagram.
    while not messages or b"READY=1" not in messages[-1][1].splitlines():
        messages.append(receive_with_fds(manager))
    return messages


def close_all(messages: list[tuple[int, bytes, list[socket.socket]]]) -> None:
    for _, _, fds in messages:
        for fd in fds:
            fd.close()


@pytest.fixture
def manager(short_dir: Path) -> Iterator[socket.socket]:
    with notify_socket(short_dir / "notify.sock") as sock:
        yield sock


def serving(short_dir: Path, *args: str, fd_store: bool = True) -> contextlib.AbstractContextManager[Process]:
    manifest = write_manifest(
        short_dir, MANIFEST.format(service=f"fd-store = {str(fd_store).lower()}", folder=short_dir)
    )
    env = clean_env(NOTIFY_SOCKET=str(short_dir / "notify.sock"))
    return started([*TRIO_ACTIVATE, "serve", *args, str(manifest)], env=env)


def listening_addresses(process: Process) -> dict[str, list[object]]:
    """What the service logged it serves: manifest name -> addresses (host, port) or paths."""
    found: dict[str, list[object]] = {}
    for line in process.log.splitlines():
        if "info: sockets." in line and " stream (fd " in line:
            name, _, rest = line.split("info: sockets.", 1)[1].partition(": ")
            address = rest.split(" stream (fd ")[0]
            host, _, port = address.rpartition(":")
            found.setdefault(name, []).append((host, int(port)) if not address.startswith("/") else address)
    return found


@contextlib.contextmanager
def passed_back(short_dir: Path, manifest: Path, ports: dict[str, int]) -> Iterator[Process]:
    """The service started as a manager passes back its store: the real systemd-socket-activate,
    with a socket on 127.0.0.1 for each of ``ports`` under its name, execing it on a first
    connection to the first one (an echo, answered)."""
    peer = require_peer("systemd-socket-activate")
    listen = [arg for port in ports.values() for arg in ("-l", f"127.0.0.1:{port}")]
    notify = f"NOTIFY_SOCKET={short_dir / 'notify.sock'}"
    command = [
        peer,
        *listen,
        f"--fdname={':'.join(ports)}",
        "-E",
        notify,
        *TRIO_ACTIVATE,
        "serve",
        str(manifest),
    ]
    with started(command, env=clean_env()) as process:
        process.wait_for_text("Listening on")
        # The first connection makes systemd-socket-activate exec the service.
        with socket.create_connection(("127.0.0.1", next(iter(ports.values()))), timeout=10) as client:
            client.sendall(b"hello\n")
            assert client.recv(100) == b"hello\n"
        yield process


@pytest.mark.parametrize("args", [(), ("--supervise",)], ids=["single", "supervisor"])
def test_sockets_the_service_made_go_to_the_store_once_just_before_ready(
    manager: socket.socket, short_dir: Path, args: tuple[str, ...]
) -> None:
    """One FDSTORE=1 per manifest name, its fds as SCM_RIGHTS, the very listening sockets, sent by
    the process the manager started (a supervisor, not its workers), right before READY=1."""
    with serving(short_dir, *args) as process:
        messages = messages_until_ready(manager)
        try:
            stores = [(pid, data, fds) for pid, data, fds in messages if data.startswith(b"FDSTORE")]
            assert [(pid, data) for pid, data, _ in stores] == [
                (process.pid, b"FDSTORE=1\nFDNAME=web"),
                (process.pid, b"FDSTORE=1\nFDNAME=admin"),
            ]
            assert messages[-1][0] == process.pid
            assert messages[-2] == stores[-1], "stored right before READY=1"
            process.wait_for_text("stored in the service manager's fd store")
            logged = listening_addresses(process)
            received = {
                data.decode().split("FDNAME=")[1]: [fd.getsockname() for fd in fds] for _, data, fds in stores
            }
            assert received == {"web": logged["web"], "admin": logged["admin"]}
            for _, _, fds in stores:
                for fd in fds:
                    assert fd.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        finally:
            close_all(messages)
        # A reload (a new generation, or a hand-over to a successor) stores nothing again.
        process.send_signal(signal.SIGHUP)
        after = messages_until_ready(manager)
        close_all(after)
        assert not [data for _, data, _ in after if b"FDSTORE" in data], after
        assert all(not fds for _, _, fds in after)


def test_without_fd_store_nothing_is_stored(manager: socket.socket, short_dir: Path) -> None:
    with serving(short_dir, fd_store=False):
        messages = messages_until_ready(manager)
        close_all(messages)
    assert [data for _, data, _ in messages] == [messages[-1][1]], "READY=1 only"
    assert all(not fds for _, _, fds in messages)


def test_passed_sockets_are_never_stored_and_names_the_manifest_dropped_are_removed_and_closed(
    manager: socket.socket, short_dir: Path
) -> None:
    """A name passed back that the manifest no longer declares: FDSTOREREMOVE=1 for it, and its
    fd closed (nobody listens there any more); the declared ones were passed, so kept, not stored."""
    web, old = free_port(), free_port()
    manifest = write_manifest(
        short_dir,
        f"""
        [service]
        fd-store = true

        [sockets.web]
        listen = "127.0.0.1:{web}"

        [handlers.web]
        socket = "web"
        call = "trio_activate.examples:echo"
        """,
    )
    with passed_back(short_dir, manifest, {"web": web, "old": old}) as process:
        messages = messages_until_ready(manager)
        close_all(messages)
        assert [data for _, data, _ in messages[:-1]] == [b"FDSTOREREMOVE=1\nFDNAME=old"]
        assert all(not fds for _, _, fds in messages)
        process.wait_for_text("fd store: removed 'old'")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", old), timeout=10).close()
        assert "fd store: sockets.web (fd 3) was passed in LISTEN_FDS: not stored again" in process.log
        assert f"pid {process.pid}, 1 socket passed in LISTEN_FDS" in process.log


def test_a_socket_added_to_the_manifest_since_the_store_was_filled_is_created_and_stored(
    manager: socket.socket, short_dir: Path
) -> None:
    """The store passes back what an older manifest declared: the socket added since is made here,
    served, and stored (FDSTORE=1 with its fd); the passed one is not stored again."""
    web = free_port()
    manifest = write_manifest(
        short_dir,
        f"""
        [service]
        fd-store = true

        [sockets.web]
        listen = "127.0.0.1:{web}"

        [sockets.added]
        listen = "127.0.0.1:0"

        [handlers.echo]
        socket = ["web", "added"]
        call = "trio_activate.examples:echo"
        """,
    )
    with passed_back(short_dir, manifest, {"web": web}) as process:
        messages = messages_until_ready(manager)
        try:
            stored = [(data, fds) for _, data, fds in messages if b"FDSTORE=1" in data.splitlines()]
            assert [data for data, _ in stored] == [b"FDSTORE=1\nFDNAME=added"]
            (added,) = stored[0][1]
            port = added.getsockname()[1]
        finally:
            close_all(messages)
        found = process.wait_for(
            r"sockets\.added: no fd was passed for it \(new in the manifest\): created on 127\.0\.0\.1:(\d+)"
        )
        assert int(found[1]) == port
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(b"new\n")
            assert client.recv(100) == b"new\n"
        assert "fd store: sockets.web (fd 3) was passed in LISTEN_FDS: not stored again" in process.log
