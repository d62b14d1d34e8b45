"""Rules of `trio_activate.model.match`: one test per rule, on hand-built `PassedSocket` values."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_activate.errors import AdoptionError
from trio_activate.model.address import AbstractAddress, Address, InetAddress, UnixAddress
from trio_activate.model.manifest import Manifest, parse_manifest
from trio_activate.model.match import Match, PassedSocket, match_passed

AF_INET, AF_INET6, AF_UNIX = socket.AF_INET, socket.AF_INET6, socket.AF_UNIX
STREAM, DGRAM, SEQPACKET = socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_SEQPACKET


def manifest(text: str) -> Manifest:
    # A path only for the folder relative unix paths resolve against: nothing is read.
    return parse_manifest(text, path=Path("/srv/app/service.toml"), source="service.toml")


WEB = manifest('[sockets.web]\nlisten = "127.0.0.1:8080"\n')
WEB_AND_ADMIN = manifest(
    '[sockets.web]\nlisten = "127.0.0.1:8080"\n[sockets.admin]\nlisten = "/run/app/admin.sock"\n'
)


LOCAL_8080 = InetAddress("127.0.0.1", 8080)


def passed(
    fd: int,
    name: str,
    family: int = AF_INET,
    type: int = STREAM,
    listening: bool = True,
    address: Address | None = LOCAL_8080,
) -> PassedSocket:
    return PassedSocket(fd, name, family, type, listening, address)


def unix(fd: int, name: str, path: str, type: int = STREAM, listening: bool = True) -> PassedSocket:
    return PassedSocket(fd, name, AF_UNIX, type, listening, UnixAddress(path))


def test_fds_go_to_the_manifest_socket_of_their_name_in_passed_order() -> None:
    result = match_passed(
        WEB_AND_ADMIN,
        [passed(3, "web"), unix(4, "admin", "/run/app/admin.sock"), passed(5, "web")],
        names_given=True,
    )
    assert result == Match(
        by_socket={"web": (3, 5), "admin": (4,)}, connection=None, unclaimed=(), warnings=()
    )


def test_by_socket_keys_follow_manifest_order_not_passed_order() -> None:
    result = match_passed(
        WEB_AND_ADMIN,
        [unix(3, "admin", "/run/app/admin.sock"), passed(4, "web")],
        names_given=True,
    )
    assert list(result.by_socket) == ["web", "admin"]


def test_one_name_may_carry_an_ipv4_and_an_ipv6_fd_for_a_bare_port() -> None:
    # systemd: ListenStream=8080 twice is not allowed, but two Listen lines with
    # one FileDescriptorName are; the bare port listens on [::] (or 0.0.0.0).
    bare = manifest('[sockets.web]\nlisten = "8080"\n')
    result = match_passed(
        bare,
        [
            passed(3, "web", AF_INET6, address=InetAddress("::", 8080)),
            passed(4, "web", AF_INET, address=InetAddress("0.0.0.0", 8080)),
        ],
        names_given=True,
    )
    assert result.by_socket == {"web": (3, 4)}
    assert result.warnings == ()


def test_family_mismatch_is_an_error_naming_socket_expectation_and_what_was_passed() -> None:
    with pytest.raises(AdoptionError) as info:
        match_passed(WEB, [unix(3, "web", "/run/x.sock", type=DGRAM)], names_given=True)
    assert str(info.value) == (
        "service.toml: sockets.web: fd 3 is a unix datagram socket bound to /run/x.sock, "
        "but the manifest declares a listening stream socket on 127.0.0.1:8080"
    )


def test_specific_ipv4_host_does_not_accept_an_ipv6_socket() -> None:
    with pytest.raises(AdoptionError, match=r"sockets\.web: fd 3 is an IPv6 stream socket"):
        match_passed(WEB, [passed(3, "web", AF_INET6, address=InetAddress("::1", 8080))], names_given=True)


def test_type_mismatch_is_an_error() -> None:
    with pytest.raises(AdoptionError) as info:
        match_passed(WEB, [passed(3, "web", type=DGRAM, listening=False)], names_given=True)
    assert "fd 3 is an IPv4 datagram socket bound to 127.0.0.1:8080" in str(info.value)
    assert "the manifest declares a listening stream socket on 127.0.0.1:8080" in str(info.value)


def test_stream_socket_that_is_not_listening_is_an_error_with_a_hint() -> None:
    with pytest.raises(AdoptionError) as info:
        match_passed(WEB, [passed(3, "web", listening=False)], names_given=True)
    message = str(info.value)
    assert "sockets.web: fd 3 is an IPv4 stream socket bound to 127.0.0.1:8080, not listening" in message
    assert "must be named 'connection'" in message


def test_seqpacket_socket_must_be_listening_too() -> None:
    seq = manifest('[sockets.ctl]\nlisten = "/run/ctl.sock"\ntype = "seqpacket"\n')
    with pytest.raises(AdoptionError, match=r"seqpacket socket bound to /run/ctl\.sock, not listening"):
        match_passed(seq, [unix(3, "ctl", "/run/ctl.sock", SEQPACKET, listening=False)], names_given=True)
    ok = match_passed(seq, [unix(3, "ctl", "/run/ctl.sock", SEQPACKET)], names_given=True)
    assert ok.by_socket == {"ctl": (3,)}


def test_datagram_socket_is_not_required_to_listen() -> None:
    udp = manifest('[sockets.dns]\nlisten = "127.0.0.1:5353"\ntype = "datagram"\n')
    result = match_passed(
        udp,
        [passed(3, "dns", type=DGRAM, listening=False, address=InetAddress("127.0.0.1", 5353))],
        names_given=True,
    )
    assert result.by_socket == {"dns": (3,)}


def test_different_address_is_a_warning_naming_both_and_the_socket_is_used() -> None:
    result = match_passed(WEB, [passed(3, "web", address=InetAddress("127.0.0.1", 9090))], names_given=True)
    assert result.by_socket == {"web": (3,)}
    [warning] = result.warnings
    assert warning.startswith("service.toml: sockets.web: fd 3 is bound to 127.0.0.1:9090, ")
    assert "the manifest declares 127.0.0.1:8080" in warning


def test_port_zero_in_the_manifest_matches_any_port_but_not_any_host() -> None:
    any_port = manifest('[sockets.web]\nlisten = "127.0.0.1:0"\n')
    same_host = match_passed(
        any_port, [passed(3, "web", address=InetAddress("127.0.0.1", 41234))], names_given=True
    )
    assert same_host.warnings == ()
    other_host = match_passed(
        any_port, [passed(3, "web", address=InetAddress("127.0.0.2", 41234))], names_given=True
    )
    assert len(other_host.warnings) == 1


def test_bare_port_matches_any_host_with_that_port_only() -> None:
    bare = manifest('[sockets.web]\nlisten = "8080"\n')
    for host in ("::", "0.0.0.0", "127.0.0.1"):
        family = AF_INET6 if ":" in host else AF_INET
        result = match_passed(
            bare, [passed(3, "web", family, address=InetAddress(host, 8080))], names_given=True
        )
        assert result.warnings == (), host
    other_port = match_passed(
        bare, [passed(3, "web", address=InetAddress("0.0.0.0", 8081))], names_given=True
    )
    assert "is bound to 0.0.0.0:8081, but the manifest declares 8080" in other_port.warnings[0]


def test_ipv6_hosts_compare_as_addresses_not_text() -> None:
    v6 = manifest('[sockets.web]\nlisten = "[::1]:8080"\n')
    result = match_passed(
        v6, [passed(3, "web", AF_INET6, address=InetAddress("0:0:0:0:0:0:0:1", 8080))], names_given=True
    )
    assert result.warnings == ()


def test_relative_unix_path_is_resolved_against_the_manifest_folder() -> None:
    relative = manifest('[sockets.api]\nlisten = "./run/../api.sock"\n')
    same = match_passed(relative, [unix(3, "api", "/srv/app/api.sock")], names_given=True)
    assert same.warnings == ()
    other = match_passed(relative, [unix(3, "api", "/tmp/api.sock")], names_given=True)
    [warning] = other.warnings
    assert "fd 3 is bound to /tmp/api.sock" in warning
    assert "./run/../api.sock (/srv/app/run/../api.sock)" in warning


def test_abstract_names_must_be_equal() -> None:
    abstract = manifest('[sockets.api]\nlisten = "@api"\n')
    same = match_passed(
        abstract, [PassedSocket(3, "api", AF_UNIX, STREAM, True, AbstractAddress("api"))], names_given=True
    )
    assert same.warnings == ()
    other = match_passed(
        abstract, [PassedSocket(3, "api", AF_UNIX, STREAM, True, AbstractAddress("x"))], names_given=True
    )
    assert "fd 3 is bound to @x, but the manifest declares @api" in other.warnings[0]


def test_socket_without_an_address_gets_a_warning() -> None:
    api = manifest('[sockets.api]\nlisten = "/run/api.sock"\n')
    result = match_passed(api, [PassedSocket(3, "api", AF_UNIX, STREAM, True, None)], names_given=True)
    assert "fd 3 has no address, but the manifest declares /run/api.sock" in result.warnings[0]


def test_fd_named_connection_is_the_accept_yes_connection_and_no_listener_is_missing() -> None:
    conn = passed(3, "connection", listening=False)
    result = match_passed(WEB_AND_ADMIN, [conn], names_given=True)
    assert result == Match(by_socket={}, connection=3, unclaimed=(), warnings=())


def test_a_lone_connected_fd_under_a_manifest_name_is_the_connection() -> None:
    # systemd-socket-activate --accept --fdname=web names the connection "web".
    conn = PassedSocket(3, "web", AF_INET, STREAM, False, InetAddress("127.0.0.1", 8080), connected=True)
    result = match_passed(WEB, [conn], names_given=True)
    assert result == Match(by_socket={}, connection=3, unclaimed=(), warnings=())


def test_a_named_fd_that_is_neither_listening_nor_connected_is_an_error() -> None:
    with pytest.raises(AdoptionError, match="not listening"):
        match_passed(WEB, [passed(3, "web", listening=False)], names_given=True)


def test_single_unnamed_non_listening_stream_fd_is_the_connection() -> None:
    # systemd-socket-activate --accept passes the connection without LISTEN_FDNAMES.
    result = match_passed(WEB, [passed(3, "unknown", listening=False)], names_given=False)
    assert result.connection == 3
    assert result.by_socket == {}


def test_unnamed_connection_rule_needs_the_fd_to_be_alone() -> None:
    with pytest.raises(
        AdoptionError, match=r"fd 4 is an IPv4 stream socket bound to 127\.0\.0\.1:8080, not listening"
    ):
        match_passed(WEB, [passed(3, "unknown"), passed(4, "unknown", listening=False)], names_given=False)


def test_fd_named_connection_that_listens_is_an_error() -> None:
    with pytest.raises(AdoptionError) as info:
        match_passed(WEB, [passed(3, "connection")], names_given=True)
    assert str(info.value).startswith(
        "service.toml: fd 3 is named 'connection', which systemd gives to an Accept=yes connection, "
        "but it is an IPv4 stream socket bound to 127.0.0.1:8080; "
    )


def test_connection_must_be_a_stream_socket() -> None:
    seq = manifest('[sockets.ctl]\nlisten = "/run/ctl.sock"\ntype = "seqpacket"\n')
    with pytest.raises(AdoptionError, match="stream sockets only"):
        match_passed(
            seq, [unix(3, "connection", "/run/ctl.sock", SEQPACKET, listening=False)], names_given=True
        )


def test_connection_family_must_be_served_by_a_manifest_stream_socket() -> None:
    with pytest.raises(AdoptionError) as info:
        match_passed(WEB, [unix(3, "connection", "/run/x.sock", listening=False)], names_given=True)
    assert "Accept=yes connection (named 'connection') on a unix stream socket" in str(info.value)
    assert "the manifest declares no unix stream socket" in str(info.value)


def test_more_than_one_connection_is_an_error() -> None:
    conns = [passed(3, "connection", listening=False), passed(4, "connection", listening=False)]
    with pytest.raises(AdoptionError, match="fds 3, 4 are all Accept=yes connections"):
        match_passed(WEB, conns, names_given=True)


def test_listening_fds_next_to_a_connection_are_still_matched() -> None:
    result = match_passed(
        WEB_AND_ADMIN, [passed(3, "web"), passed(4, "connection", listening=False)], names_given=True
    )
    assert result.by_socket == {"web": (3,)}
    assert result.connection == 4


def test_unnamed_fds_go_to_the_only_manifest_socket() -> None:
    result = match_passed(WEB, [passed(3, "unknown"), passed(4, "unknown")], names_given=False)
    assert result.by_socket == {"web": (3, 4)}


def test_unnamed_fds_with_several_manifest_sockets_ask_for_file_descriptor_name() -> None:
    with pytest.raises(AdoptionError) as info:
        match_passed(WEB_AND_ADMIN, [passed(3, "unknown"), passed(4, "unknown")], names_given=False)
    assert str(info.value) == (
        "service.toml: fds 3, 4 were passed without a name (LISTEN_FDNAMES is not set), and the "
        "manifest declares 2 sockets (web, admin): unnamed fds are accepted only when the manifest "
        "declares exactly one socket; set FileDescriptorName= in each socket unit (or --fdname= for "
        "systemd-socket-activate) to one of: web, admin"
    )


def test_without_names_the_names_in_the_list_are_ignored() -> None:
    # names_given=False is authoritative: every fd counts as "unknown".
    with pytest.raises(AdoptionError, match="without a name"):
        match_passed(WEB_AND_ADMIN, [passed(3, "web")], names_given=False)


def test_explicit_unknown_name_behaves_like_no_name() -> None:
    one = match_passed(WEB, [passed(3, "unknown")], names_given=True)
    assert one.by_socket == {"web": (3,)}
    with pytest.raises(AdoptionError, match=r"fd 3 is named 'unknown' \(no FileDescriptorName= was set\)"):
        match_passed(WEB_AND_ADMIN, [passed(3, "unknown")], names_given=True)


def test_stored_fd_is_unclaimed_with_a_warning() -> None:
    result = match_passed(WEB, [passed(3, "web"), passed(4, "stored")], names_given=True)
    assert result.by_socket == {"web": (3,)}
    assert result.unclaimed == (4,)
    assert result.warnings == (
        "service.toml: fd 4 is named 'stored': an fd-store fd saved without FDNAME=, which no "
        "manifest socket claims; closing it",
    )


def test_undeclared_name_is_unclaimed_with_a_warning() -> None:
    result = match_passed(WEB, [passed(3, "metrics"), passed(4, "web")], names_given=True)
    assert result.unclaimed == (3,)
    assert result.warnings == (
        "service.toml: fd 3 is named 'metrics': the manifest declares no socket of that name "
        "(declared: web); closing it",
    )


def test_unclaimed_fds_are_not_checked() -> None:
    # Whatever it is, it will be closed: a pipe-like datagram under another name is fine.
    result = match_passed(WEB, [passed(3, "web"), unix(4, "other", "/x", type=DGRAM)], names_given=True)
    assert result.unclaimed == (4,)


def test_manifest_names_come_before_special_names() -> None:
    stored = manifest('[sockets.stored]\nlisten = "127.0.0.1:8080"\n')
    result = match_passed(stored, [passed(3, "stored")], names_given=True)
    assert result.by_socket == {"stored": (3,)}
    assert result.unclaimed == ()


def test_manifest_socket_without_fd_is_an_error_naming_it_and_the_passed_names() -> None:
    with pytest.raises(AdoptionError) as info:
        match_passed(WEB_AND_ADMIN, [passed(3, "web"), passed(4, "stored")], names_given=True)
    assert str(info.value) == (
        "service.toml: no fd was passed for sockets.admin; the fds passed are named 'web' (fd 3), "
        "'stored' (fd 4); set FileDescriptorName= in the socket unit to the manifest socket's name"
    )


def test_every_missing_socket_is_named() -> None:
    with pytest.raises(AdoptionError, match=r"no fd was passed for sockets\.web, sockets\.admin; "):
        match_passed(WEB_AND_ADMIN, [passed(3, "other")], names_given=True)


_names = st.sampled_from(["web", "admin", "stored", "connection", "unknown", "other"])
_passed_sockets = st.builds(
    lambda name, family, kind, listening: (name, family, kind, listening),
    _names,
    st.sampled_from([AF_INET, AF_INET6, AF_UNIX]),
    st.sampled_from([STREAM, DGRAM, SEQPACKET]),
    st.booleans(),
)


@given(st.lists(_passed_sockets, max_size=6), st.booleans())
def test_every_fd_ends_up_in_exactly_one_place_or_an_error(
    items: list[tuple[str, int, int, bool]], names_given: bool
) -> None:
    """Whatever is passed, a Match accounts for each fd once: claimed, connection or unclaimed."""
    sockets = [
        PassedSocket(3 + i, name, fam, kind, listening, None)
        for i, (name, fam, kind, listening) in enumerate(items)
    ]
    try:
        result = match_passed(WEB_AND_ADMIN, sockets, names_given=names_given)
    except AdoptionError:
        return
    placed = [fd for fds in result.by_socket.values() for fd in fds] + list(result.unclaimed)
    if result.connection is not None:
        placed.append(result.connection)
    assert sorted(placed) == [item.fd for item in sockets]
