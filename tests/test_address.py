"""Listen addresses: every systemd form parses, writes back as written, and bad text is one clear phrase."""

from __future__ import annotations

import ipaddress
import re
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_activate.model.address import (
    AbstractAddress,
    InetAddress,
    UnixAddress,
    address_from_sockname,
    parse_address,
)


@pytest.mark.parametrize(
    ("text", "expected", "family"),
    [
        ("7000", InetAddress(None, 7000), socket.AF_INET6),
        ("0", InetAddress(None, 0), socket.AF_INET6),
        ("127.0.0.1:7000", InetAddress("127.0.0.1", 7000), socket.AF_INET),
        ("0.0.0.0:80", InetAddress("0.0.0.0", 80), socket.AF_INET),
        ("[::1]:7000", InetAddress("::1", 7000), socket.AF_INET6),
        ("[::]:65535", InetAddress("::", 65535), socket.AF_INET6),
        ("[fe80::1%eth0]:80", InetAddress("fe80::1%eth0", 80), socket.AF_INET6),
        ("/run/x.sock", UnixAddress("/run/x.sock"), socket.AF_UNIX),
        ("./x.sock", UnixAddress("./x.sock"), socket.AF_UNIX),
        ("../run/x.sock", UnixAddress("../run/x.sock"), socket.AF_UNIX),
        ("@name", AbstractAddress("name"), socket.AF_UNIX),
    ],
)
def test_every_systemd_form_parses_to_its_typed_value(text: str, expected: object, family: int) -> None:
    address = parse_address(text)
    assert address == expected
    assert address.family == family
    assert str(address) == text


def test_ipv6_hosts_are_written_in_compressed_form() -> None:
    assert str(parse_address("[0:0:0:0:0:0:0:1]:80")) == "[::1]:80"


@pytest.mark.parametrize(
    ("text", "phrase"),
    [
        ("70000", "port 70000 is out of range 0-65535"),
        ("127.0.0.1:65536", "port 65536 is out of range 0-65535"),
        ("127.0.0.1:http", "port 'http' is not a number"),
        ("127.0.0.1:", "port '' is not a number"),
        ("localhost:80", "host 'localhost' is not a numeric IP address"),
        ("::1:80", "needs brackets"),
        ("[::1]80", 'expected "[v6]:port"'),
        ("[nope]:80", "'nope' is not an IPv6 address"),
        ("run/x.sock", "is not a listen address"),
        ("", "is not a listen address"),
        ("@", "needs a name after '@'"),
        ("/" + "x" * 107, "holds at most 107"),
        ("@" + "x" * 108, "holds at most 107"),
        ("/run/", "must name a file"),
        ("/run/a\0b", "NUL"),
        ("-1", "is not a listen address"),
        ("+80", "is not a listen address"),
    ],
)
def test_bad_addresses_are_rejected_with_a_phrase_naming_the_value(text: str, phrase: str) -> None:
    with pytest.raises(ValueError, match=re.escape(phrase)) as info:
        parse_address(text)
    assert "\n" not in str(info.value)


def test_relative_unix_paths_resolve_against_the_manifest_folder() -> None:
    assert UnixAddress("./x.sock").resolved("/srv/app") == UnixAddress("/srv/app/x.sock")
    assert UnixAddress("/run/x.sock").resolved("/srv/app") == UnixAddress("/run/x.sock")


def test_socknames_from_the_kernel_become_addresses(tmp_path: object) -> None:
    with socket.socket(socket.AF_INET) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        assert address_from_sockname(s.family, s.getsockname()) == InetAddress("127.0.0.1", port)
    with socket.socket(socket.AF_UNIX) as s:
        s.bind("\0trio-activate-test-address")
        assert address_from_sockname(s.family, s.getsockname()) == AbstractAddress(
            "trio-activate-test-address"
        )
    a, b = socket.socketpair()
    with a, b:
        assert address_from_sockname(a.family, a.getsockname()) is None


# Property tests: whatever the text, the parser answers with an Address or a
# ValueError; and every address it produces writes back to text that parses
# to the same address.

ports = st.integers(min_value=0, max_value=65535)
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
names = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=100)
addresses = st.one_of(
    ports.map(lambda p: InetAddress(None, p)),
    st.builds(InetAddress, ipv4, ports),
    st.builds(InetAddress, ipv6, ports),
    names.map(lambda n: UnixAddress("/" + n.replace("\0", "")) if not n.endswith("/") else UnixAddress("/x")),
    names.map(AbstractAddress),
)


@given(addresses)
def test_every_address_writes_back_to_text_that_parses_to_it(address: object) -> None:
    assert parse_address(str(address)) == address


@given(st.text(max_size=200))
def test_any_text_gives_an_address_or_a_value_error(text: str) -> None:
    outcome: object
    try:
        outcome = parse_address(text)
    except ValueError as exc:
        outcome = exc
    if isinstance(outcome, ValueError):
        assert str(outcome)
    else:
        assert parse_address(str(outcome)) == outcome


@given(ipv4, ports)
def test_host_port_keeps_host_and_port(host: str, port: int) -> None:
    address = parse_address(f"{host}:{port}")
    assert isinstance(address, InetAddress)
    assert ipaddress.ip_address(address.host or "") == ipaddress.ip_address(host)
    assert address.port == port


@given(st.integers(min_value=65536, max_value=10**12))
def test_ports_beyond_65535_are_out_of_range(port: int) -> None:
    with pytest.raises(ValueError, match="out of range 0-65535"):
        parse_address(f"127.0.0.1:{port}")
