"""The socket options are one table: reading, the applies check, writing back and the unit all follow it.

Each test walks ``SOCKET_OPTIONS``, so an option added to the table is
checked in all four places with no test to write; a place that knew an
option the table does not (or missed one it does) fails here.
"""

from __future__ import annotations

from typing import Any

import pytest

from trio_activate.errors import ManifestError
from trio_activate.model.address import InetAddress
from trio_activate.model.manifest import (
    BACKLOG,
    BOOLEAN,
    IPV6_ONLY,
    MODE,
    SOCKET_OPTIONS,
    USER_OR_GROUP,
    Manifest,
    OptionType,
    SocketOption,
    SocketSpec,
    manifest_from_dict,
    manifest_to_dict,
)
from trio_activate.model.units import render_units

# A value other than the default, for each type in the table.
SAMPLES: dict[OptionType, Any] = {
    BOOLEAN: True,
    IPV6_ONLY: True,
    BACKLOG: 128,
    MODE: 0o640,
    USER_OR_GROUP: "nobody",
}

# A socket every option applies to: stream, on an IPv6 address and a unix socket file.
EVERYWHERE = {"listen": ["[::1]:8080", "/run/everywhere.sock"]}

# Sockets on which some options apply and others do not (each scope is both somewhere).
SOCKETS = {
    "stream-ipv4": {"listen": "127.0.0.1:8080"},
    "stream-ipv6": {"listen": "[::1]:8080"},
    "datagram-bare-port": {"listen": "8080", "type": "datagram"},
    "datagram-unix": {"listen": "/run/x.sock", "type": "datagram"},
    "seqpacket-unix": {"listen": "/run/x.sock", "type": "seqpacket"},
    "stream-abstract": {"listen": "@x"},
}


def parse(table: dict[str, Any]) -> Manifest:
    return manifest_from_dict({"sockets": {"s": table}}, source="m.toml")


def socket_unit_lines(manifest: Manifest) -> list[str]:
    units = render_units(
        manifest, command=["/usr/bin/trio-activate"], manifest_path="/srv/m.toml", systemd_version=252
    )
    assert units[0].name.endswith(".socket")
    return units[0].text.splitlines()


def unit_line(option: SocketOption, value: Any) -> str:
    assert option.directive is not None
    return f"{option.directive}={option.type.unit(value)}"


@pytest.mark.parametrize("option", SOCKET_OPTIONS, ids=lambda option: option.key)
def test_an_option_is_read_written_back_and_put_in_the_unit(option: SocketOption) -> None:
    value = SAMPLES[option.type]
    assert value != option.default
    manifest = parse({**EVERYWHERE, option.key: option.type.toml(value)})
    (spec,) = manifest.sockets
    assert getattr(spec, option.field) == value
    assert all(getattr(spec, other.field) == other.default for other in SOCKET_OPTIONS if other is not option)
    written = manifest_to_dict(manifest)["sockets"]["s"]
    assert written[option.key] == option.type.toml(value)
    assert parse(written) == manifest
    lines = socket_unit_lines(manifest)
    if option.directive is not None:
        assert unit_line(option, value) in lines
        # A default, too, is said in the unit (it shows exactly what systemd will do); no value is not.
        default_lines = socket_unit_lines(parse(EVERYWHERE))
        if option.default is None:
            assert not any(line.startswith(f"{option.directive}=") for line in default_lines)
        else:
            assert unit_line(option, option.default) in default_lines


@pytest.mark.parametrize("option", SOCKET_OPTIONS, ids=lambda option: option.key)
@pytest.mark.parametrize("name", SOCKETS)
def test_an_option_is_refused_and_left_out_where_it_does_not_apply(option: SocketOption, name: str) -> None:
    table = SOCKETS[name]
    manifest = parse(table)
    (spec,) = manifest.sockets
    written = manifest_to_dict(manifest)["sockets"]["s"]
    directives = {line.partition("=")[0] for line in socket_unit_lines(manifest)}
    if option.scope.test(spec):
        value = SAMPLES[option.type]
        assert (
            getattr(parse({**table, option.key: option.type.toml(value)}).sockets[0], option.field) == value
        )
        if option.default is not None:
            assert written[option.key] == option.type.toml(option.default)
            assert option.directive is None or option.directive in directives
        return
    assert option.key not in written
    assert option.directive not in directives
    with pytest.raises(ManifestError) as excinfo:
        parse({**table, option.key: option.type.toml(SAMPLES[option.type])})
    assert str(excinfo.value) == f"m.toml: sockets.s.{option.key}: applies to {option.scope.says}"
    if option.false_anywhere:
        assert parse({**table, option.key: False}) == manifest
    elif option.type is BOOLEAN:
        with pytest.raises(ManifestError, match=f"sockets.s.{option.key}: applies to"):
            parse({**table, option.key: False})


def test_the_keys_of_a_socket_are_listen_type_and_the_table() -> None:
    known = ", ".join(sorted(["listen", "type", *(option.key for option in SOCKET_OPTIONS)]))
    with pytest.raises(ManifestError) as excinfo:
        parse({"listen": "127.0.0.1:8080", "zzzzzz": 1})
    assert str(excinfo.value) == f"m.toml: sockets.s.zzzzzz: unknown key; known keys: {known}"
    with pytest.raises(ManifestError) as excinfo:
        parse({"listen": "127.0.0.1:8080", "reuse-address": True})
    assert str(excinfo.value) == "m.toml: sockets.s.reuse-address: unknown key; did you mean 'reuse-port'?"


def test_the_socket_spec_holds_each_option_with_the_table_default() -> None:
    spec = SocketSpec("s", (InetAddress("127.0.0.1", 8080),))
    fields = list(vars(spec))
    assert fields[:3] == ["name", "listen", "type"]
    assert sorted(fields[3:]) == sorted(option.field for option in SOCKET_OPTIONS)
    assert all(getattr(spec, option.field) == option.default for option in SOCKET_OPTIONS)
    assert len({option.key for option in SOCKET_OPTIONS}) == len(SOCKET_OPTIONS)
