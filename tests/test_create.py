"""Creating the manifest's sockets: real sockets, real files; scripted sockets only for faults.

Tests bind 127.0.0.1, ::1, files under tmp_path and unique abstract names.
The exceptions, each said where it happens: the bare-port form binds ``[::]``
(that is the form), its no-IPv6 fallback binds ``0.0.0.0``, and free-bind
binds documentation addresses (192.0.2.1, 2001:db8::1) that no host has.
"""

from __future__ import annotations

import errno
import logging
import os
import pwd
import socket
import stat
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from trio_activate.errors import CreationError
from trio_activate.model.address import AbstractAddress, Address, InetAddress, UnixAddress, parse_address
from trio_activate.model.manifest import Manifest, SocketSpec, SocketType, parse_manifest
from trio_activate.system import create
from trio_activate.system.create import CreatedSocket, create_socket, create_sockets, remove_socket_file
from trio_activate.system.fds import open_fds

STREAM, DATAGRAM, SEQPACKET = SocketType.STREAM, SocketType.DATAGRAM, SocketType.SEQPACKET


# --- helpers -------------------------------------------------------------------


@pytest.fixture
def held() -> Iterator[list[CreatedSocket]]:
    """Sockets a test created; closed at the end whatever happened."""
    items: list[CreatedSocket] = []
    yield items
    for item in items:
        item.sock.close()


def spec_for(address: Address, type: SocketType = STREAM, name: str = "web", **options: Any) -> SocketSpec:
    return SocketSpec(name=name, listen=(address,), type=type, **options)


def make(
    held: list[CreatedSocket],
    address: Address | str,
    type: SocketType = STREAM,
    *,
    folder: Path | None = None,
    **options: Any,
) -> CreatedSocket:
    if isinstance(address, str):
        address = parse_address(address)
    created = create_socket(spec_for(address, type, **options), address, folder=folder or Path("/"))
    held.append(created)
    return created


def abstract_name() -> str:
    return f"trio-activate-test-{uuid.uuid4().hex}"


def exchange(sock: socket.socket) -> None:
    """A client reaches ``sock`` and one message goes through."""
    sock.settimeout(5)
    target = sock.getsockname()
    with socket.socket(sock.family, sock.type) as client:
        client.settimeout(5)
        if sock.type == socket.SOCK_DGRAM:
            client.sendto(b"ping", target)
            assert sock.recv(16) == b"ping"
            return
        client.connect(target)
        conn, _ = sock.accept()
        with conn:
            client.sendall(b"ping")
            assert conn.recv(16) == b"ping"


def message(excinfo: pytest.ExceptionInfo[CreationError]) -> str:
    return str(excinfo.value)


def used_port(kind: int, family: int = socket.AF_INET, host: str = "127.0.0.1") -> socket.socket:
    """A socket of ours on a kernel-chosen port, without SO_REUSEADDR/SO_REUSEPORT."""
    sock = socket.socket(family, kind)
    sock.bind((host, 0))
    if kind == socket.SOCK_STREAM:
        sock.listen()
    return sock


# Scripted faults: real sockets with one call replaced, made by a factory
# swapped in for create._new_socket (the one place create.py makes sockets).


def use_socket_class(monkeypatch: pytest.MonkeyPatch, cls: type[socket.socket]) -> None:
    def factory(family: int, kind: int) -> socket.socket:
        return cls(family, kind | socket.SOCK_CLOEXEC)

    monkeypatch.setattr(create, "_new_socket", factory)


def use_factory(monkeypatch: pytest.MonkeyPatch, factory: Callable[[int, int], socket.socket]) -> None:
    monkeypatch.setattr(create, "_new_socket", factory)


# --- every form with each type ----------------------------------------------------


@pytest.mark.parametrize(
    ("text", "type", "family", "kind"),
    [
        ("127.0.0.1:0", STREAM, socket.AF_INET, socket.SOCK_STREAM),
        ("[::1]:0", STREAM, socket.AF_INET6, socket.SOCK_STREAM),
        ("127.0.0.1:0", DATAGRAM, socket.AF_INET, socket.SOCK_DGRAM),
        ("[::1]:0", DATAGRAM, socket.AF_INET6, socket.SOCK_DGRAM),
    ],
)
def test_inet_forms_bind_the_declared_host(
    held: list[CreatedSocket], text: str, type: SocketType, family: int, kind: int
) -> None:
    created = make(held, text, type)
    address = parse_address(text)
    assert created.address == address
    assert created.spec_name == "web"
    assert created.created_path is None
    assert (created.sock.family, created.sock.type) == (family, kind)
    assert created.sock.getsockname()[0] == address.bind_host  # type: ignore[union-attr]
    listening = created.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    assert listening == (kind == socket.SOCK_STREAM)
    exchange(created.sock)


@pytest.mark.parametrize("type", [STREAM, DATAGRAM, SEQPACKET])
def test_unix_path_form_binds_the_file(held: list[CreatedSocket], tmp_path: Path, type: SocketType) -> None:
    path = str(tmp_path / "x.sock")
    created = make(held, path, type)
    assert created.address == UnixAddress(path)
    assert created.created_path == path
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    assert created.sock.family == socket.AF_UNIX
    assert created.sock.type == type.kernel_type
    assert created.sock.getsockname() == path
    listening = created.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    assert listening == (type is not DATAGRAM)
    exchange(created.sock)


@pytest.mark.parametrize("type", [STREAM, DATAGRAM, SEQPACKET])
def test_abstract_form_binds_the_name_and_makes_no_file(held: list[CreatedSocket], type: SocketType) -> None:
    name = abstract_name()
    created = make(held, AbstractAddress(name), type)
    assert created.created_path is None
    assert created.sock.type == type.kernel_type
    assert created.sock.getsockname() == b"\0" + name.encode()
    exchange(created.sock)


def test_a_relative_unix_path_is_resolved_against_the_folder(
    held: list[CreatedSocket], tmp_path: Path
) -> None:
    created = make(held, "./run.sock", folder=tmp_path)
    expected = str(tmp_path / "run.sock")
    assert created.address == UnixAddress(expected)
    assert created.created_path == expected
    assert created.sock.getsockname() == expected


@pytest.mark.parametrize("text", ["127.0.0.1:0", "/x.sock", "@name"])
def test_sockets_are_created_close_on_exec(held: list[CreatedSocket], tmp_path: Path, text: str) -> None:
    if text == "/x.sock":
        text = str(tmp_path / "x.sock")
    elif text == "@name":
        text = "@" + abstract_name()
    created = make(held, text)
    assert not os.get_inheritable(created.sock.fileno())


# --- options --------------------------------------------------------------------


@pytest.mark.parametrize(("type", "expected"), [(STREAM, 1), (DATAGRAM, 0)])
def test_so_reuseaddr_is_set_on_tcp_only(held: list[CreatedSocket], type: SocketType, expected: int) -> None:
    """systemd sets it on TCP; on UDP it would let a second socket share the port silently."""
    created = make(held, "127.0.0.1:0", type)
    assert created.sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == expected


@pytest.mark.parametrize("type", [STREAM, DATAGRAM])
@pytest.mark.parametrize("reuse_port", [True, False])
def test_so_reuseport_follows_reuse_port(
    held: list[CreatedSocket], type: SocketType, reuse_port: bool
) -> None:
    created = make(held, "127.0.0.1:0", type, reuse_port=reuse_port)
    assert created.sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == int(reuse_port)


def test_reuse_port_lets_two_sockets_share_a_port(held: list[CreatedSocket]) -> None:
    first = make(held, "127.0.0.1:0", reuse_port=True)
    port = first.sock.getsockname()[1]
    second = make(held, f"127.0.0.1:{port}", reuse_port=True)
    assert second.sock.getsockname()[1] == port


def test_bare_port_binds_ipv6_any_dual_stack(held: list[CreatedSocket]) -> None:
    """systemd's "7000": [::] with IPV6_V6ONLY=0, so IPv4 clients reach it too."""
    created = make(held, InetAddress(None, 0))
    sock = created.sock
    assert created.address == InetAddress(None, 0)
    assert sock.family == socket.AF_INET6
    assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
    host, port = sock.getsockname()[:2]
    assert host == "::"
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass
    with socket.create_connection(("::1", port), timeout=5):
        pass


def test_bare_port_with_ipv6_only_refuses_ipv4(held: list[CreatedSocket]) -> None:
    created = make(held, InetAddress(None, 0), ipv6_only=True)
    sock = created.sock
    assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    port = sock.getsockname()[1]
    with socket.create_connection(("::1", port), timeout=5):
        pass
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)


class RecordingSocket(socket.socket):
    options: ClassVar[list[tuple[int, int, int]]] = []

    def setsockopt(self, level: int, option: int, value: Any, *rest: Any) -> None:
        RecordingSocket.options.append((level, option, value))
        super().setsockopt(level, option, value, *rest)


@pytest.mark.parametrize(("ipv6_only", "expected"), [(False, 0), (True, 1)])
def test_ipv6_sockets_set_v6only_explicitly(
    held: list[CreatedSocket], monkeypatch: pytest.MonkeyPatch, ipv6_only: bool, expected: int
) -> None:
    """The sysctl net.ipv6.bindv6only never decides: the value is always set, 0 included."""
    monkeypatch.setattr(RecordingSocket, "options", [])
    use_socket_class(monkeypatch, RecordingSocket)
    make(held, "[::1]:0", ipv6_only=ipv6_only)
    assert (socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, expected) in RecordingSocket.options


def test_no_v6only_on_ipv4_sockets(held: list[CreatedSocket], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(RecordingSocket, "options", [])
    use_socket_class(monkeypatch, RecordingSocket)
    make(held, "127.0.0.1:0")
    assert all(level != socket.IPPROTO_IPV6 for level, _, _ in RecordingSocket.options)


def test_free_bind_binds_an_address_the_host_does_not_have(held: list[CreatedSocket]) -> None:
    """192.0.2.1 (TEST-NET-1) is on no interface; IP_FREEBIND lets bind() take it anyway."""
    created = make(held, "192.0.2.1:0", free_bind=True)
    assert created.sock.getsockopt(socket.IPPROTO_IP, create.IP_FREEBIND) == 1
    assert created.sock.getsockname()[0] == "192.0.2.1"


def test_free_bind_on_ipv6(held: list[CreatedSocket]) -> None:
    created = make(held, "[2001:db8::1]:0", free_bind=True)
    assert created.sock.getsockopt(socket.IPPROTO_IPV6, create.IPV6_FREEBIND) == 1
    assert created.sock.getsockname()[0] == "2001:db8::1"


def test_a_foreign_address_without_free_bind_is_one_clear_line(held: list[CreatedSocket]) -> None:
    before = open_fds()
    with pytest.raises(CreationError) as excinfo:
        make(held, "192.0.2.1:8080")
    assert message(excinfo) == (
        "sockets.web.listen: 192.0.2.1:8080: address not available (it is not an address of this host; "
        "set free-bind = true to bind it before it is configured)"
    )
    assert open_fds() == before


# --- port 0 -------------------------------------------------------------------------


@pytest.mark.parametrize(("type", "verb"), [(STREAM, "listening on"), (DATAGRAM, "bound to")])
def test_port_0_logs_the_port_the_kernel_chose(
    held: list[CreatedSocket], caplog: pytest.LogCaptureFixture, type: SocketType, verb: str
) -> None:
    caplog.set_level(logging.INFO, logger="trio_activate")
    created = make(held, "127.0.0.1:0", type)
    port = created.sock.getsockname()[1]
    assert port != 0
    assert [r.getMessage() for r in caplog.records if r.name == "trio_activate"] == [
        f"sockets.web: {verb} 127.0.0.1:{port} (port 0: chosen by the kernel)"
    ]


def test_port_0_on_ipv6_logs_the_bracketed_form(
    held: list[CreatedSocket], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trio_activate")
    created = make(held, "[::1]:0")
    port = created.sock.getsockname()[1]
    assert f"sockets.web: listening on [::1]:{port} (port 0: chosen by the kernel)" in caplog.messages


def test_a_fixed_port_is_not_logged(held: list[CreatedSocket], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="trio_activate")
    with used_port(socket.SOCK_STREAM) as probe:
        port = probe.getsockname()[1]
    make(held, f"127.0.0.1:{port}")  # SO_REUSEADDR: a closed listener's port is free again
    assert caplog.messages == []


# --- no IPv6 on the host (scripted: the kernel here has IPv6) -------------------


def no_ipv6_factory(family: int, kind: int) -> socket.socket:
    if family == socket.AF_INET6:
        raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
    return socket.socket(family, kind | socket.SOCK_CLOEXEC)


def test_bare_port_falls_back_to_ipv4_any_without_ipv6(
    held: list[CreatedSocket], monkeypatch: pytest.MonkeyPatch
) -> None:
    """As systemd: "7000" on a host without IPv6 is 0.0.0.0:7000 (unavoidably 0.0.0.0 here)."""
    use_factory(monkeypatch, no_ipv6_factory)
    created = make(held, InetAddress(None, 0))
    assert created.sock.family == socket.AF_INET
    assert created.sock.getsockname()[0] == "0.0.0.0"
    assert created.address == InetAddress(None, 0)


def test_explicit_ipv6_without_ipv6_is_an_error(
    held: list[CreatedSocket], monkeypatch: pytest.MonkeyPatch
) -> None:
    use_factory(monkeypatch, no_ipv6_factory)
    with pytest.raises(CreationError) as excinfo:
        make(held, "[::1]:8080")
    assert message(excinfo) == (
        "sockets.web.listen: [::1]:8080: IPv6 is not available on this host "
        "(address family not supported by protocol)"
    )


def test_bare_port_with_ipv6_only_does_not_fall_back(
    held: list[CreatedSocket], monkeypatch: pytest.MonkeyPatch
) -> None:
    use_factory(monkeypatch, no_ipv6_factory)
    with pytest.raises(CreationError) as excinfo:
        make(held, InetAddress(None, 8080), ipv6_only=True)
    assert message(excinfo) == (
        "sockets.web.listen: 8080 ([::]:8080): ipv6-only is set, but IPv6 is not available on this host"
    )


# --- unix socket files: mode, owner, group ------------------------------------------


@pytest.mark.parametrize("mode", [0o666, 0o600, 0o660, 0o750])
def test_mode_is_applied_to_the_socket_file(held: list[CreatedSocket], tmp_path: Path, mode: int) -> None:
    path = str(tmp_path / "x.sock")
    make(held, path, mode=mode)
    assert stat.S_IMODE(os.stat(path).st_mode) == mode


def test_the_umask_is_restored(held: list[CreatedSocket], tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        make(held, str(tmp_path / "x.sock"))
        assert os.umask(0o027) == 0o027
    finally:
        os.umask(old)


class ObservedSocket(socket.socket):
    """Records the socket file's mode and owner right after bind() and at listen()."""

    seen: ClassVar[list[tuple[str, int, int, int]]] = []

    def bind(self, address: Any) -> None:
        super().bind(address)
        if isinstance(address, str):
            self._record("bind", address)

    def listen(self, backlog: int = 0) -> None:
        self._record("listen", self.getsockname())
        super().listen(backlog)

    def _record(self, when: str, path: str) -> None:
        st = os.lstat(path)
        ObservedSocket.seen.append((when, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid))


def test_the_file_is_born_mode_0_and_final_before_listen(
    held: list[CreatedSocket], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No moment where the file is reachable with more than the manifest allows."""
    monkeypatch.setattr(ObservedSocket, "seen", [])
    use_socket_class(monkeypatch, ObservedSocket)
    owner_args: dict[str, Any] = {"owner": "nobody"} if os.geteuid() == 0 and _has_user("nobody") else {}
    make(held, str(tmp_path / "x.sock"), mode=0o660, **owner_args)
    uid = pwd.getpwnam("nobody").pw_uid if owner_args else os.geteuid()
    assert ObservedSocket.seen[0][:2] == ("bind", 0)
    assert ObservedSocket.seen[1][:3] == ("listen", 0o660, uid)


def test_with_threads_running_the_umask_is_left_alone_and_the_mode_still_applies(
    held: list[CreatedSocket], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """umask is process-wide: another thread's files must not be born mode 0."""
    monkeypatch.setattr(ObservedSocket, "seen", [])
    use_socket_class(monkeypatch, ObservedSocket)
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    old = os.umask(0o022)
    try:
        make(held, str(tmp_path / "x.sock"), mode=0o600)
    finally:
        os.umask(old)
        stop.set()
        thread.join()
    assert ObservedSocket.seen[0][:2] == ("bind", 0o755)  # the default umask applied, not 0o777
    assert ObservedSocket.seen[1][:2] == ("listen", 0o600)
    assert stat.S_IMODE(os.stat(tmp_path / "x.sock").st_mode) == 0o600


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


needs_root_and_nobody = pytest.mark.skipif(
    os.geteuid() != 0 or not _has_user("nobody"), reason="chown to another user needs root and user nobody"
)


@needs_root_and_nobody
def test_owner_by_name_sets_user_and_primary_group(held: list[CreatedSocket], tmp_path: Path) -> None:
    """As systemd's SocketUser=: the group follows the user's primary group."""
    nobody = pwd.getpwnam("nobody")
    path = str(tmp_path / "x.sock")
    make(held, path, owner="nobody")
    st = os.stat(path)
    assert (st.st_uid, st.st_gid) == (nobody.pw_uid, nobody.pw_gid)


@needs_root_and_nobody
def test_owner_and_group_by_numeric_id(held: list[CreatedSocket], tmp_path: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    path = str(tmp_path / "x.sock")
    make(held, path, owner=str(nobody.pw_uid), group=str(os.getgid()))
    st = os.stat(path)
    assert (st.st_uid, st.st_gid) == (nobody.pw_uid, os.getgid())


@needs_root_and_nobody
def test_group_alone_leaves_the_owner(held: list[CreatedSocket], tmp_path: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    path = str(tmp_path / "x.sock")
    make(held, path, group=str(nobody.pw_gid))
    st = os.stat(path)
    assert (st.st_uid, st.st_gid) == (os.geteuid(), nobody.pw_gid)


def test_owner_and_group_of_the_current_user_by_numeric_id(held: list[CreatedSocket], tmp_path: Path) -> None:
    path = str(tmp_path / "x.sock")
    make(held, path, owner=str(os.getuid()), group=str(os.getgid()))
    st = os.stat(path)
    assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"owner": "no-such-user-xyz"}, "sockets.web.owner: 'no-such-user-xyz': no such user"),
        ({"group": "no-such-group-xyz"}, "sockets.web.group: 'no-such-group-xyz': no such group"),
        ({"owner": "4294967296"}, "sockets.web.owner: 4294967296 is out of range 0-4294967294"),
    ],
)
def test_an_unknown_owner_or_group_names_the_key_and_creates_nothing(
    held: list[CreatedSocket], tmp_path: Path, options: dict[str, Any], expected: str
) -> None:
    path = tmp_path / "x.sock"
    before = open_fds()
    with pytest.raises(CreationError) as excinfo:
        make(held, str(path), **options)
    assert message(excinfo) == expected
    assert not path.exists()
    assert open_fds() == before


# --- unix socket files already there -------------------------------------------------


def leave_stale_socket(path: Path, kind: int = socket.SOCK_STREAM) -> int:
    """Bind a socket at ``path`` and close it: the file stays, nobody listens."""
    with socket.socket(socket.AF_UNIX, kind) as sock:
        sock.bind(str(path))
    return os.lstat(path).st_ino


@pytest.mark.parametrize("type", [STREAM, DATAGRAM, SEQPACKET])
def test_a_stale_socket_file_is_replaced(
    held: list[CreatedSocket], tmp_path: Path, caplog: pytest.LogCaptureFixture, type: SocketType
) -> None:
    caplog.set_level(logging.INFO, logger="trio_activate")
    path = tmp_path / "x.sock"
    old_inode = leave_stale_socket(path, type.kernel_type)
    # A second name keeps the old inode alive, so its number is not reused.
    os.link(path, tmp_path / "old.sock")
    created = make(held, str(path), type)
    assert os.lstat(path).st_ino != old_inode
    assert created.created_file_id == (os.lstat(path).st_dev, os.lstat(path).st_ino)
    exchange(created.sock)
    assert f"sockets.web: replaced the stale socket file {path} (nobody listened on it)" in caplog.messages


@pytest.mark.parametrize("type", [STREAM, DATAGRAM, SEQPACKET])
def test_a_live_socket_is_never_removed(held: list[CreatedSocket], tmp_path: Path, type: SocketType) -> None:
    path = tmp_path / "x.sock"
    with socket.socket(socket.AF_UNIX, type.kernel_type) as live:
        live.bind(str(path))
        if type is not DATAGRAM:
            live.listen()
        inode = os.lstat(path).st_ino
        before = open_fds()
        with pytest.raises(CreationError) as excinfo:
            make(held, str(path), type)
        assert message(excinfo).startswith(
            f"sockets.web.listen: {path}: a live socket is already listening there"
        )
        assert os.lstat(path).st_ino == inode
        assert open_fds() == before
        if type is not DATAGRAM:
            probe, _ = live.accept()  # the liveness probe was a real connection
            probe.close()
        exchange(live)


def test_a_live_socket_of_another_type_is_never_removed(held: list[CreatedSocket], tmp_path: Path) -> None:
    path = tmp_path / "x.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(str(path))
        live.listen()
        inode = os.lstat(path).st_ino
        with pytest.raises(CreationError) as excinfo:
            make(held, str(path), DATAGRAM)
        assert message(excinfo) == (
            f"sockets.web.listen: {path}: a live socket of another type is already bound there "
            "(connecting says wrong type)"
        )
        assert os.lstat(path).st_ino == inode


def test_a_live_listener_with_a_full_backlog_counts_as_live(
    held: list[CreatedSocket], tmp_path: Path
) -> None:
    path = tmp_path / "x.sock"
    clients: list[socket.socket] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(str(path))
        live.listen(0)
        try:
            while True:  # fill the backlog until connect() would block
                client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                clients.append(client)
                client.setblocking(False)
                client.connect(str(path))
        except BlockingIOError:
            pass
        try:
            with pytest.raises(CreationError, match="a live socket is already listening there"):
                make(held, str(path))
        finally:
            for client in clients:
                client.close()
        assert path.exists()


@pytest.mark.parametrize(
    ("setup", "kind"),
    [
        (lambda p: p.write_text("precious"), "a regular file"),
        (lambda p: p.mkdir(), "a folder"),
        (lambda p: p.symlink_to(p.parent / "elsewhere"), "a symbolic link"),
        (lambda p: os.mkfifo(p), "a pipe (FIFO)"),
    ],
)
def test_a_non_socket_file_is_never_removed(
    held: list[CreatedSocket], tmp_path: Path, setup: Callable[[Path], object], kind: str
) -> None:
    path = tmp_path / "x.sock"
    setup(path)
    inode = os.lstat(path).st_ino
    before = open_fds()
    with pytest.raises(CreationError) as excinfo:
        make(held, str(path))
    assert message(excinfo) == (
        f"sockets.web.listen: {path}: {kind} is already there, not a socket "
        "(only a stale socket file is replaced; remove it yourself if it is not needed)"
    )
    assert os.lstat(path).st_ino == inode
    assert open_fds() == before


def test_the_regular_file_keeps_its_content(held: list[CreatedSocket], tmp_path: Path) -> None:
    path = tmp_path / "x.sock"
    path.write_text("precious")
    with pytest.raises(CreationError):
        make(held, str(path))
    assert path.read_text() == "precious"


# --- one clear line per failure ---------------------------------------------------------


@pytest.mark.parametrize(
    ("type", "kind", "reason"),
    [
        (STREAM, socket.SOCK_STREAM, "another process listens there"),
        (DATAGRAM, socket.SOCK_DGRAM, "another socket is bound there"),
    ],
)
def test_address_in_use(held: list[CreatedSocket], type: SocketType, kind: int, reason: str) -> None:
    with used_port(kind) as other:
        port = other.getsockname()[1]
        before = open_fds()
        with pytest.raises(CreationError) as excinfo:
            make(held, f"127.0.0.1:{port}", type)
        assert open_fds() == before
    assert message(excinfo) == f"sockets.web.listen: 127.0.0.1:{port}: address already in use ({reason})"


def test_address_in_use_on_ipv6(held: list[CreatedSocket]) -> None:
    with used_port(socket.SOCK_STREAM, socket.AF_INET6, "::1") as other:
        port = other.getsockname()[1]
        with pytest.raises(CreationError) as excinfo:
            make(held, f"[::1]:{port}")
    assert message(excinfo) == (
        f"sockets.web.listen: [::1]:{port}: address already in use (another process listens there)"
    )


def test_abstract_name_in_use(held: list[CreatedSocket]) -> None:
    name = abstract_name()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.bind(b"\0" + name.encode())
        before = open_fds()
        with pytest.raises(CreationError) as excinfo:
            make(held, AbstractAddress(name))
        assert open_fds() == before
    assert message(excinfo) == (
        f"sockets.web.listen: @{name}: address already in use (another process listens there)"
    )


def test_missing_parent_folder(held: list[CreatedSocket], tmp_path: Path) -> None:
    folder = tmp_path / "no" / "such" / "dir"
    before = open_fds()
    with pytest.raises(CreationError) as excinfo:
        create_socket(
            spec_for(UnixAddress(f"{folder}/x.sock"), name="api"),
            UnixAddress(f"{folder}/x.sock"),
            folder=tmp_path,
        )
    assert message(excinfo) == f"sockets.api.listen: {folder}/x.sock: folder {folder} does not exist"
    assert not folder.exists()  # not created, unlike systemd
    assert open_fds() == before


def test_missing_parent_folder_of_a_relative_path_shows_both(
    held: list[CreatedSocket], tmp_path: Path
) -> None:
    with pytest.raises(CreationError) as excinfo:
        make(held, "./run/x.sock", folder=tmp_path)
    assert message(excinfo) == (
        f"sockets.web.listen: ./run/x.sock ({tmp_path}/run/x.sock): folder {tmp_path}/run does not exist"
    )


def test_a_resolved_path_too_long_for_sun_path(held: list[CreatedSocket], tmp_path: Path) -> None:
    folder = tmp_path / ("d" * 100)
    folder.mkdir()
    with pytest.raises(CreationError, match=r"a unix socket address holds at most 107$"):
        make(held, "./x.sock", folder=folder)


def test_the_key_names_the_listen_entry_when_there_are_several(held: list[CreatedSocket]) -> None:
    with used_port(socket.SOCK_STREAM) as other:
        port = other.getsockname()[1]
        busy = InetAddress("127.0.0.1", port)
        spec = SocketSpec("web", (InetAddress("127.0.0.1", 0), busy))
        with pytest.raises(CreationError) as excinfo:
            create_socket(spec, busy, folder=Path("/"))
    assert message(excinfo).startswith(f"sockets.web.listen[1]: 127.0.0.1:{port}: address already in use")


def _unprivileged_port_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    except OSError:
        return 1024


@pytest.mark.skipif(os.geteuid() == 0, reason="root may bind port 80; the scripted test below covers EACCES")
@pytest.mark.skipif(_unprivileged_port_start() <= 80, reason="port 80 is unprivileged on this host")
def test_privileged_port_as_an_unprivileged_user(held: list[CreatedSocket]) -> None:
    """The real EACCES, where the tests run as an ordinary user."""
    with pytest.raises(CreationError) as excinfo:
        make(held, "127.0.0.1:80")
    assert message(excinfo) == (
        "sockets.web.listen: 127.0.0.1:80: permission denied (ports below 1024 need CAP_NET_BIND_SERVICE)"
    )


class BindDenied(socket.socket):
    """bind() fails as it does for a user without CAP_NET_BIND_SERVICE (tests run as root here)."""

    def bind(self, address: Any) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "0.0.0.0:80",
            "sockets.web.listen: 0.0.0.0:80: permission denied (ports below 1024 need CAP_NET_BIND_SERVICE)",
        ),
        # Above 1024 the cause is something else (an LSM, a BPF hook): no capability hint.
        ("127.0.0.1:8080", "sockets.web.listen: 127.0.0.1:8080: permission denied"),
    ],
)
def test_permission_denied_on_bind(
    held: list[CreatedSocket], monkeypatch: pytest.MonkeyPatch, text: str, expected: str
) -> None:
    use_socket_class(monkeypatch, BindDenied)
    before = open_fds()
    with pytest.raises(CreationError) as excinfo:
        make(held, text)
    assert message(excinfo) == expected
    assert open_fds() == before


# --- a socket failing mid-setup -----------------------------------------------------


class ListenFails(socket.socket):
    def listen(self, backlog: int = 0) -> None:
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")


def test_a_unix_socket_failing_after_bind_is_closed_and_its_file_removed(
    held: list[CreatedSocket], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_socket_class(monkeypatch, ListenFails)
    path = tmp_path / "x.sock"
    before = open_fds()
    with pytest.raises(CreationError) as excinfo:
        make(held, str(path))
    assert message(excinfo) == f"sockets.web.listen: {path}: cannot listen: operation not supported"
    assert not os.path.lexists(path)
    assert open_fds() == before


def test_an_inet_socket_failing_after_bind_is_closed(
    held: list[CreatedSocket], monkeypatch: pytest.MonkeyPatch
) -> None:
    use_socket_class(monkeypatch, ListenFails)
    before = open_fds()
    with pytest.raises(CreationError, match="cannot listen"):
        make(held, "127.0.0.1:0")
    assert open_fds() == before


# --- create_sockets: every address, in order, all or nothing -----------------------------


def write_manifest(tmp_path: Path, text: str) -> Manifest:
    path = tmp_path / "service.toml"
    path.write_text(text)
    return parse_manifest(text, path=path, source=str(path))


def test_create_sockets_makes_every_address_in_manifest_order(tmp_path: Path) -> None:
    name = abstract_name()
    manifest = write_manifest(
        tmp_path,
        f"""
        [sockets.web]
        listen = ["127.0.0.1:0", "[::1]:0"]
        [sockets.api]
        listen = "./api.sock"
        [sockets.metrics]
        listen = "@{name}"
        type = "datagram"
        """,
    )
    created = create_sockets(manifest)
    try:
        assert tuple(c.spec_name for c in created) == manifest.fd_names() == ("web", "web", "api", "metrics")
        assert [c.address for c in created] == [
            InetAddress("127.0.0.1", 0),
            InetAddress("::1", 0),
            UnixAddress(str(tmp_path / "api.sock")),
            AbstractAddress(name),
        ]
        assert [c.sock.family for c in created] == [
            socket.AF_INET,
            socket.AF_INET6,
            socket.AF_UNIX,
            socket.AF_UNIX,
        ]
        assert created[3].sock.type == socket.SOCK_DGRAM
        assert created[2].created_path == str(tmp_path / "api.sock")
    finally:
        for c in created:
            c.sock.close()


def test_when_the_third_socket_fails_the_first_two_are_closed_and_their_files_removed(tmp_path: Path) -> None:
    with used_port(socket.SOCK_STREAM) as other:
        port = other.getsockname()[1]
        manifest = write_manifest(
            tmp_path,
            f"""
            [sockets.a]
            listen = "./a.sock"
            [sockets.b]
            listen = "{tmp_path}/b.sock"
            [sockets.c]
            listen = "127.0.0.1:{port}"
            """,
        )
        before = open_fds()
        with pytest.raises(CreationError) as excinfo:
            create_sockets(manifest)
        assert open_fds() == before
    assert message(excinfo) == (
        f"service.toml: sockets.c.listen: 127.0.0.1:{port}: "
        "address already in use (another process listens there)"
    )
    assert not os.path.lexists(tmp_path / "a.sock")
    assert not os.path.lexists(tmp_path / "b.sock")


def test_cleanup_never_removes_a_file_that_was_already_there(tmp_path: Path) -> None:
    """Cleanup removes only files this call created, never a file that was already there."""
    (tmp_path / "keep.txt").write_text("x")
    manifest = write_manifest(
        tmp_path,
        f"""
        [sockets.a]
        listen = "./a.sock"
        [sockets.b]
        listen = "{tmp_path}/keep.txt"
        """,
    )
    with pytest.raises(
        CreationError, match=r"^service\.toml: sockets\.b\.listen: .*a regular file is already"
    ):
        create_sockets(manifest)
    assert not os.path.lexists(tmp_path / "a.sock")
    assert (tmp_path / "keep.txt").read_text() == "x"


def test_an_interrupt_mid_way_also_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """All or nothing holds for KeyboardInterrupt too: a factory that fails after 2 sockets."""
    made: list[int] = []

    def fails_after_two(family: int, kind: int) -> socket.socket:
        if len(made) == 2:
            raise KeyboardInterrupt
        made.append(family)
        return socket.socket(family, kind | socket.SOCK_CLOEXEC)

    use_factory(monkeypatch, fails_after_two)
    manifest = write_manifest(
        tmp_path,
        """
        [sockets.a]
        listen = "./a.sock"
        [sockets.b]
        listen = "127.0.0.1:0"
        [sockets.c]
        listen = "127.0.0.1:0"
        """,
    )
    before = open_fds()
    with pytest.raises(KeyboardInterrupt):
        create_sockets(manifest)
    assert made == [socket.AF_UNIX, socket.AF_INET]
    assert open_fds() == before
    assert not os.path.lexists(tmp_path / "a.sock")


def test_without_a_manifest_file_there_is_no_prefix(tmp_path: Path) -> None:
    manifest = parse_manifest(f'[sockets.api]\nlisten = "{tmp_path}/no/x.sock"\n')
    with pytest.raises(CreationError) as excinfo:
        create_sockets(manifest)
    assert (
        message(excinfo) == f"sockets.api.listen: {tmp_path}/no/x.sock: folder {tmp_path}/no does not exist"
    )


# --- remove_socket_file ---------------------------------------------------------------


def test_remove_socket_file_removes_our_file(held: list[CreatedSocket], tmp_path: Path) -> None:
    path = tmp_path / "x.sock"
    created = make(held, str(path))
    remove_socket_file(created)
    assert not os.path.lexists(path)
    remove_socket_file(created)  # already gone: nothing to do, no error


def test_remove_socket_file_leaves_a_file_someone_else_put_there(
    held: list[CreatedSocket], tmp_path: Path
) -> None:
    path = tmp_path / "x.sock"
    created = make(held, str(path))
    os.unlink(path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as successor:
        successor.bind(str(path))
        successor.listen()
        inode = os.lstat(path).st_ino
        remove_socket_file(created)
        assert os.lstat(path).st_ino == inode
        exchange(successor)


def test_remove_socket_file_leaves_a_regular_file_in_its_place(
    held: list[CreatedSocket], tmp_path: Path
) -> None:
    path = tmp_path / "x.sock"
    created = make(held, str(path))
    os.unlink(path)
    path.write_text("someone else's")
    remove_socket_file(created)
    assert path.read_text() == "someone else's"


def test_remove_socket_file_is_a_no_op_for_sockets_without_a_file(held: list[CreatedSocket]) -> None:
    created = make(held, "@" + abstract_name())
    remove_socket_file(created)
    assert created.sock.fileno() != -1  # the socket is the holder's; removing files does not close it
