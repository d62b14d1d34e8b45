"""The manifest: valid files become frozen values; every invalid one is one line naming file and key."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from trio_activate.errors import ManifestError
from trio_activate.model.address import AbstractAddress, InetAddress, UnixAddress
from trio_activate.model.manifest import (
    DEFAULT_BACKLOG,
    HandlerKind,
    Manifest,
    OnError,
    OnFull,
    SocketType,
    dump_manifest,
    load_manifest,
    manifest_to_dict,
    parse_manifest,
)

CONFIG = Path(__file__).parent.parent / "config"

MINIMAL = """
[sockets.echo]
listen = "127.0.0.1:7000"

[handlers.echo]
socket = "echo"
call = "myapp.echo:handle"
"""

FULL = """
[service]
name = "full"
grace-period = 2.5
python-path = [".", "lib"]
user = "nobody"
group = 65534
unit-extra = ["IPAddressAllow=10.0.0.0/8", "Environment=GREETING=hello world", "ExecStartPre="]

[sockets.web]
listen = ["127.0.0.1:8080", "[::1]:8080"]
backlog = 128
reuse-port = true
ipv6-only = true
free-bind = true

[sockets.api]
listen = "./run/api.sock"
type = "seqpacket"
mode = 0o660
owner = "root"
group = 0
remove-on-stop = true

[sockets.dns]
listen = ["53", "@dns"]
type = "datagram"

[handlers.web]
socket = ["web", "api"]
call = "myapp.web:serve"

[handlers.dns]
socket = "dns"
call = "myapp.dns:answer"
"""


def parse(text: str, name: str = "service.toml") -> Manifest:
    return parse_manifest(textwrap.dedent(text), path=Path("/srv") / name, source=name)


def error_of(text: str) -> str:
    with pytest.raises(ManifestError) as info:
        parse(text)
    message = str(info.value)
    assert "\n" not in message, "an error is one line"
    assert message.startswith("service.toml: "), "an error names the file first"
    return message


def test_minimal_manifest_takes_every_default() -> None:
    manifest = parse(MINIMAL)
    assert manifest.service.name == "service"  # the file's stem
    assert manifest.service.grace_period == 5.0
    assert manifest.service.python_path == (".",)
    assert (manifest.service.user, manifest.service.group, manifest.service.unit_extra) == (None, None, ())
    (echo,) = manifest.sockets
    assert echo.name == "echo"
    assert echo.listen == (InetAddress("127.0.0.1", 7000),)
    assert echo.type is SocketType.STREAM
    assert echo.backlog == DEFAULT_BACKLOG
    assert (echo.reuse_port, echo.ipv6_only, echo.free_bind, echo.remove_on_stop) == (False,) * 4
    assert echo.mode == 0o666
    (handler,) = manifest.handlers
    assert (handler.sockets, handler.module, handler.function) == (("echo",), "myapp.echo", "handle")
    assert manifest.warnings == ()


def test_every_option_is_read_into_typed_values() -> None:
    manifest = parse(FULL)
    assert manifest.service.name == "full"
    assert manifest.service.grace_period == 2.5
    assert manifest.service.python_path == (".", "lib")
    # A numeric id is kept as text, as User=/Group= take it.
    assert (manifest.service.user, manifest.service.group) == ("nobody", "65534")
    assert manifest.service.unit_extra == (
        "IPAddressAllow=10.0.0.0/8",
        "Environment=GREETING=hello world",
        "ExecStartPre=",
    )
    web, api, dns = manifest.sockets
    assert web.listen == (InetAddress("127.0.0.1", 8080), InetAddress("::1", 8080))
    assert (web.backlog, web.reuse_port, web.ipv6_only, web.free_bind) == (128, True, True, True)
    assert api.listen == (UnixAddress("./run/api.sock"),)
    assert api.type is SocketType.SEQPACKET
    assert (api.mode, api.owner, api.group, api.remove_on_stop) == (0o660, "root", "0", True)
    assert dns.listen == (InetAddress(None, 53), AbstractAddress("dns"))
    assert dns.type is SocketType.DATAGRAM
    assert manifest.handler_for("api") == manifest.handlers[0]
    assert manifest.fd_names() == ("web", "web", "api", "dns", "dns")


def test_handler_kind_follows_the_socket_type_unless_set() -> None:
    manifest = parse(FULL)
    web, dns = manifest.handlers
    assert web.kind is HandlerKind.STREAM
    assert dns.kind is HandlerKind.DATAGRAM
    assert (web.max_connections, web.on_error) == (None, OnError.LOG)
    explicit = parse(MINIMAL + 'kind = "listener"\n')
    assert explicit.handlers[0].kind is HandlerKind.LISTENER


def test_stream_handler_options_are_read() -> None:
    manifest = parse(
        "[service]\naccept-handler = 'echo'\n" + MINIMAL + "max-connections = 10\non-error = 'exit'\n"
    )
    (handler,) = manifest.handlers
    assert (handler.max_connections, handler.on_error) == (10, OnError.EXIT)
    assert manifest.service.accept_handler == "echo"
    assert parse(dump_manifest(manifest)) == manifest


def test_timeouts_and_on_full_are_read_and_written_back() -> None:
    manifest = parse(
        MINIMAL + "max-connections = 10\nidle-timeout = 30\nmax-lifetime = 3600.5\non-full = 'close'\n"
    )
    (handler,) = manifest.handlers
    assert (handler.idle_timeout, handler.max_lifetime, handler.on_full) == (30.0, 3600.5, OnFull.CLOSE)
    dumped = dump_manifest(manifest)
    assert "idle-timeout = 30.0" in dumped
    assert "max-lifetime = 3600.5" in dumped
    assert 'on-full = "close"' in dumped
    assert parse(dumped) == manifest


def test_timeouts_are_unset_and_on_full_waits_by_default() -> None:
    (handler,) = parse(MINIMAL).handlers
    assert (handler.idle_timeout, handler.max_lifetime, handler.on_full) == (None, None, OnFull.WAIT)
    (limited,) = parse(MINIMAL + "max-connections = 3\n").handlers
    assert limited.on_full is OnFull.WAIT
    assert 'on-full = "wait"' in dump_manifest(parse(MINIMAL + "max-connections = 3\n"))
    assert "on-full" not in dump_manifest(parse(MINIMAL))


def test_max_lifetime_applies_to_a_seqpacket_socket() -> None:
    text = (
        "[sockets.p]\nlisten = '/run/p.sock'\ntype = 'seqpacket'\n[handlers.p]\nsocket = 'p'\ncall = 'm:f'\n"
    )
    (handler,) = parse(text + "max-lifetime = 60\n").handlers
    assert handler.max_lifetime == 60.0


def test_access_log_is_off_by_default_and_read_and_written_back() -> None:
    (handler,) = parse(MINIMAL).handlers
    assert handler.access_log is False
    assert "access-log = false" in dump_manifest(parse(MINIMAL))
    manifest = parse(MINIMAL + "access-log = true\n")
    assert manifest.handlers[0].access_log is True
    assert manifest_to_dict(manifest)["handlers"]["echo"]["access-log"] is True
    assert parse(dump_manifest(manifest)) == manifest
    # Seqpacket connections take it too (their line has no byte counts).
    seqpacket = parse(
        "[sockets.p]\nlisten = '/run/p.sock'\ntype = 'seqpacket'\n"
        "[handlers.p]\nsocket = 'p'\ncall = 'm:f'\naccess-log = true\n"
    )
    assert seqpacket.handlers[0].access_log is True
    # Not a stream handler: not written at all, like the other stream-only keys.
    (dns,) = [h for h in manifest_to_dict(parse(FULL))["handlers"].values() if h["kind"] == "datagram"]
    assert "access-log" not in dns


def test_manifest_values_are_immutable() -> None:
    manifest = parse(MINIMAL)
    with pytest.raises(AttributeError):
        manifest.sockets[0].backlog = 1  # type: ignore[misc]


@pytest.mark.parametrize("text", [MINIMAL, FULL])
def test_parse_dump_parse_is_the_identity(text: str) -> None:
    first = parse(text)
    dumped = dump_manifest(first)
    again = parse(dumped)
    assert again == first
    assert dump_manifest(again) == dumped


@pytest.mark.parametrize("path", sorted(CONFIG.glob("*.toml")), ids=lambda p: p.name)
def test_every_example_in_config_is_valid_and_round_trips(path: Path) -> None:
    manifest = load_manifest(path)
    assert manifest.warnings == ()
    assert parse_manifest(dump_manifest(manifest), path=path) == manifest


def test_mode_is_accepted_as_octal_integer_or_string_and_written_as_string() -> None:
    as_int = parse(MINIMAL.replace('"127.0.0.1:7000"', '"/run/x.sock"\nmode = 0o640'))
    as_str = parse(MINIMAL.replace('"127.0.0.1:7000"', '"/run/x.sock"\nmode = "0640"'))
    assert as_int.sockets[0].mode == as_str.sockets[0].mode == 0o640
    assert 'mode = "0640"' in dump_manifest(as_int)


def test_port_zero_asks_the_kernel_and_is_never_a_duplicate() -> None:
    manifest = parse(
        """
        [sockets.a]
        listen = ["127.0.0.1:0", "127.0.0.1:0"]
        [handlers.a]
        socket = "a"
        call = "m:f"
        """
    )
    assert manifest.sockets[0].listen == (InetAddress("127.0.0.1", 0),) * 2


def test_watchdog_and_accept_are_read_and_written_back() -> None:
    text = "[service]\nwatchdog = 2.5\n" + MINIMAL.replace(
        'listen = "127.0.0.1:7000"', 'listen = "127.0.0.1:7000"\naccept = true'
    )
    manifest = parse_manifest(text, source="t.toml")
    assert manifest.service.watchdog == 2.5
    assert manifest.sockets[0].accept is True
    assert parse_manifest(dump_manifest(manifest), source="t.toml") == manifest
    plain = parse_manifest(MINIMAL, source="t.toml")
    assert plain.service.watchdog is None
    assert plain.sockets[0].accept is False


def test_a_socket_without_handler_is_a_warning_not_an_error() -> None:
    manifest = parse('[sockets.lonely]\nlisten = "7000"\n')
    assert manifest.handlers == ()
    (warning,) = manifest.warnings
    assert warning.startswith("service.toml: sockets.lonely: no handler serves this socket")


def test_same_port_on_tcp_and_udp_is_not_a_duplicate() -> None:
    manifest = parse(
        """
        [sockets.tcp]
        listen = "127.0.0.1:53"
        [sockets.udp]
        listen = "127.0.0.1:53"
        type = "datagram"
        """
    )
    assert len(manifest.sockets) == 2


# Every invalid case: (manifest text, the error's text after "service.toml: ").
INVALID = {
    "toml syntax names line and column": (
        '[sockets.echo]\nlisten = "7000\n',
        r"invalid TOML: .*\(at line 2, column 15\)",
    ),
    "unknown top-level key, did you mean": (
        MINIMAL + "\n[servce]\nname = 'x'\n",
        r"servce: unknown key; did you mean 'service'\?",
    ),
    "unknown socket key, did you mean": (
        MINIMAL.replace("[handlers.echo]", "backlg = 5\n[handlers.echo]"),
        r"sockets.echo.backlg: unknown key; did you mean 'backlog'\?",
    ),
    "unknown service key": (
        "[service]\nworkrs = 2\n" + MINIMAL,
        r"service.workrs: unknown key",
    ),
    "unknown handler key": (
        MINIMAL + 'calll = "x"\n',
        r"handlers.echo.calll: unknown key; did you mean 'call'\?",
    ),
    "port out of range": (
        MINIMAL.replace("7000", "70000"),
        r"sockets.echo.listen: '127.0.0.1:70000': port 70000 is out of range 0-65535",
    ),
    "bad address in a list names the index": (
        MINIMAL.replace('"127.0.0.1:7000"', '["127.0.0.1:7000", "nope"]'),
        r"sockets.echo.listen\[1\]: 'nope' is not a listen address",
    ),
    "listen missing": (
        "[sockets.echo]\ntype = 'stream'\n",
        r"sockets.echo: missing key 'listen'",
    ),
    "listen wrong type": (
        "[sockets.echo]\nlisten = 7000\n",
        r"sockets.echo.listen: expected a string or a list of strings, got an integer",
    ),
    "listen empty list": (
        "[sockets.echo]\nlisten = []\n",
        r"sockets.echo.listen: expected at least one entry",
    ),
    "listen list of wrong types": (
        "[sockets.echo]\nlisten = ['7000', 7001]\n",
        r"sockets.echo.listen\[1\]: expected a string, got an integer",
    ),
    "backlog as bool": (
        MINIMAL.replace("[handlers.echo]", "backlog = true\n[handlers.echo]"),
        r"sockets.echo.backlog: expected an integer, got a boolean",
    ),
    "backlog zero": (
        MINIMAL.replace("[handlers.echo]", "backlog = 0\n[handlers.echo]"),
        r"sockets.echo.backlog: 0 is out of range",
    ),
    "backlog on datagram": (
        "[sockets.d]\nlisten = '7000'\ntype = 'datagram'\nbacklog = 5\n",
        r"sockets.d.backlog: applies to stream and seqpacket sockets only",
    ),
    "bad type": (
        "[sockets.echo]\nlisten = '7000'\ntype = 'raw'\n",
        r"sockets.echo.type: 'raw': expected one of stream, datagram, seqpacket",
    ),
    "seqpacket on inet": (
        "[sockets.echo]\nlisten = '7000'\ntype = 'seqpacket'\n",
        r"sockets.echo.type: seqpacket sockets are unix-only",
    ),
    "reuse-port as string": (
        "[sockets.echo]\nlisten = '7000'\nreuse-port = 'yes'\n",
        r"sockets.echo.reuse-port: expected true or false, got a string",
    ),
    "ipv6-only on ipv4": (
        "[sockets.echo]\nlisten = '127.0.0.1:1'\nipv6-only = true\n",
        r"sockets.echo.ipv6-only: applies to IPv6 addresses only",
    ),
    "free-bind on unix": (
        "[sockets.echo]\nlisten = '/run/x.sock'\nfree-bind = true\n",
        r"sockets.echo.free-bind: applies to IP addresses only",
    ),
    "mode on tcp": (
        "[sockets.echo]\nlisten = '7000'\nmode = '0660'\n",
        r"sockets.echo.mode: applies to unix socket files only",
    ),
    "mode not octal string": (
        "[sockets.echo]\nlisten = '/run/x.sock'\nmode = 'rw-rw----'\n",
        r"sockets.echo.mode: 'rw-rw----' is not an octal mode",
    ),
    "mode out of range": (
        "[sockets.echo]\nlisten = '/run/x.sock'\nmode = 0o77777\n",
        r"sockets.echo.mode: 0o77777 is out of range",
    ),
    "mode as float": (
        "[sockets.echo]\nlisten = '/run/x.sock'\nmode = 6.6\n",
        r"sockets.echo.mode: expected an octal mode",
    ),
    "owner empty": (
        "[sockets.echo]\nlisten = '/run/x.sock'\nowner = ''\n",
        r"sockets.echo.owner: '': expected a user or group name",
    ),
    "socket name with colon": (
        "[sockets.'a:b']\nlisten = '7000'\n",
        r"sockets.a:b: socket name 'a:b' cannot be an fd name: contains ':'",
    ),
    "socket name too long": (
        f"[sockets.{'x' * 256}]\nlisten = '7000'\n",
        r"cannot be an fd name: .*255",
    ),
    "socket name not printable ascii": (
        "[sockets.'caf\u00e9']\nlisten = '7000'\n",
        r"cannot be an fd name",
    ),
    "no socket at all": (
        "[service]\nname = 'x'\n",
        r"sockets: the manifest declares no socket",
    ),
    "empty sockets table": (
        "[sockets]\n",
        r"sockets: the manifest declares no socket",
    ),
    "sockets not a table": (
        "sockets = 3\n",
        r"sockets: expected a table, got an integer",
    ),
    "duplicate address across sockets": (
        "[sockets.a]\nlisten = '127.0.0.1:80'\n[sockets.b]\nlisten = '127.0.0.1:80'\n",
        r"sockets.b.listen: 127.0.0.1:80 is already declared at sockets.a.listen",
    ),
    "duplicate address within a socket": (
        "[sockets.a]\nlisten = ['[::1]:80', '[0:0::1]:80']\n",
        r"sockets.a.listen\[1\]: \[::1\]:80 is already declared at sockets.a.listen\[0\]",
    ),
    "bare port duplicates [::]": (
        "[sockets.a]\nlisten = ['80', '[::]:80']\n",
        r"sockets.a.listen\[1\]: \[::\]:80 is already declared",
    ),
    "duplicate unix path, relative and absolute": (
        "[sockets.a]\nlisten = ['./x.sock', '/srv/x.sock']\n",
        r"sockets.a.listen\[1\]: /srv/x.sock is already declared",
    ),
    "duplicate abstract name across types": (
        "[sockets.a]\nlisten = '@n'\n[sockets.b]\nlisten = '@n'\ntype = 'datagram'\n",
        r"sockets.b.listen: @n is already declared",
    ),
    "handler names a missing socket": (
        MINIMAL.replace('socket = "echo"', 'socket = "ecko"'),
        r"handlers.echo.socket: no socket named 'ecko' \(did you mean 'echo'\?\)",
    ),
    "socket claimed by two handlers": (
        MINIMAL + '[handlers.again]\nsocket = "echo"\ncall = "m:f"\n',
        r"handlers.again.socket: socket 'echo' is already served by handlers.echo",
    ),
    "handler without call": (
        '[sockets.echo]\nlisten = "7000"\n[handlers.echo]\nsocket = "echo"\n',
        r"handlers.echo: missing key 'call'",
    ),
    "call without colon": (
        MINIMAL.replace("myapp.echo:handle", "myapp.echo.handle"),
        r"handlers.echo.call: 'myapp.echo.handle': expected \"module:function\"",
    ),
    "call with bad module": (
        MINIMAL.replace("myapp.echo:handle", "my-app:handle"),
        r"handlers.echo.call: 'my-app:handle'",
    ),
    "kind unknown": (
        MINIMAL + 'kind = "http"\n',
        r"handlers.echo.kind: 'http': expected one of stream, datagram, listener",
    ),
    "datagram handler on a stream socket": (
        MINIMAL + 'kind = "datagram"\n',
        r"handlers.echo.kind: a datagram handler cannot serve sockets.echo, a stream socket",
    ),
    "listener handler on a seqpacket socket": (
        "[sockets.p]\nlisten = '@p'\ntype = 'seqpacket'\n"
        "[handlers.p]\nsocket = 'p'\ncall = 'm:f'\nkind = 'listener'\n",
        r"handlers.p.kind: a listener handler cannot serve sockets.p, a seqpacket socket",
    ),
    "handler mixing datagram and stream sockets": (
        "[sockets.a]\nlisten = '127.0.0.1:1'\n[sockets.b]\nlisten = '127.0.0.1:1'\ntype = 'datagram'\n"
        "[handlers.h]\nsocket = ['a', 'b']\ncall = 'm:f'\n",
        r"handlers.h.socket: mixes datagram and connection sockets",
    ),
    "max-connections zero": (
        MINIMAL + "max-connections = 0\n",
        r"handlers.echo.max-connections: 0 is out of range: expected at least 1",
    ),
    "max-connections on a listener handler": (
        MINIMAL + "kind = 'listener'\nmax-connections = 5\n",
        r"handlers.echo.max-connections: applies to stream handlers only, and this one is listener",
    ),
    "idle-timeout zero": (
        MINIMAL + "idle-timeout = 0\n",
        r"handlers.echo.idle-timeout: 0 is not a timeout \(expected a number of seconds > 0; leave it out",
    ),
    "idle-timeout negative": (
        MINIMAL + "idle-timeout = -1\n",
        r"handlers.echo.idle-timeout: -1 is not a duration \(expected a finite number >= 0\)",
    ),
    "idle-timeout not a number": (
        MINIMAL + "idle-timeout = '30s'\n",
        r"handlers.echo.idle-timeout: expected a number of seconds, got a string",
    ),
    "max-lifetime infinite": (
        MINIMAL + "max-lifetime = inf\n",
        r"handlers.echo.max-lifetime: inf is not a duration",
    ),
    "max-lifetime an integer too large for a float": (
        MINIMAL + "max-lifetime = 1" + "0" * 400 + "\n",
        r"handlers.echo.max-lifetime: 1000000000000000000000000000000000000... is too large for a duration",
    ),
    "idle-timeout on a datagram handler": (
        "[sockets.d]\nlisten = '127.0.0.1:53'\ntype = 'datagram'\n"
        "[handlers.d]\nsocket = 'd'\ncall = 'm:f'\nidle-timeout = 5\n",
        r"handlers.d.idle-timeout: applies to stream handlers only, and this one is datagram",
    ),
    "max-lifetime on a listener handler": (
        MINIMAL + "kind = 'listener'\nmax-lifetime = 5\n",
        r"handlers.echo.max-lifetime: applies to stream handlers only, and this one is listener",
    ),
    "access-log on a datagram handler": (
        "[sockets.d]\nlisten = '127.0.0.1:53'\ntype = 'datagram'\n"
        "[handlers.d]\nsocket = 'd'\ncall = 'm:f'\naccess-log = true\n",
        r"handlers.d.access-log: applies to stream handlers only, and this one is datagram",
    ),
    "access-log on a listener handler": (
        MINIMAL + "kind = 'listener'\naccess-log = false\n",
        r"handlers.echo.access-log: applies to stream handlers only, and this one is listener",
    ),
    "access-log not a boolean": (
        MINIMAL + "access-log = 'yes'\n",
        r"handlers.echo.access-log: expected true or false, got a string",
    ),
    "idle-timeout on a seqpacket socket": (
        "[sockets.p]\nlisten = '/run/p.sock'\ntype = 'seqpacket'\n"
        "[handlers.p]\nsocket = 'p'\ncall = 'm:f'\nidle-timeout = 5\n",
        r"handlers.p.idle-timeout: applies to stream sockets only, and sockets.p is seqpacket",
    ),
    "on-full unknown": (
        MINIMAL + "max-connections = 5\non-full = 'drop'\n",
        r"handlers.echo.on-full: 'drop': expected one of wait, close",
    ),
    "on-full without max-connections": (
        MINIMAL + "on-full = 'close'\n",
        r"handlers.echo.on-full: applies only with max-connections, which is not set",
    ),
    "on-error unknown": (
        MINIMAL + "on-error = 'ignore'\n",
        r"handlers.echo.on-error: 'ignore': expected one of log, exit",
    ),
    "grace-period an integer too large for a float": (
        "[service]\ngrace-period = 1" + "0" * 400 + "\n" + MINIMAL,
        r"service.grace-period: 1000000000000000000000000000000000000... is too large for a duration",
    ),
    "start-timeout an integer too large for a float": (
        "[service]\nstart-timeout = -1" + "0" * 400 + "\n" + MINIMAL,
        r"service.start-timeout: -100000000000000000000000000000000000... is too large for a duration",
    ),
    "worker-timeout zero": (
        "[service]\nworker-timeout = 0\n" + MINIMAL,
        r"service.worker-timeout: 0 would kill every worker at once \(expected a number of seconds > 0\)",
    ),
    "worker-timeout not a number": (
        "[service]\nworker-timeout = 'long'\n" + MINIMAL,
        r"service.worker-timeout: expected a number of seconds, got a string",
    ),
    "watchdog too short": (
        "[service]\nwatchdog = 0.5\n" + MINIMAL,
        r"service.watchdog: 0.5 is too short: the service pings at half of it \(expected at least 1\)",
    ),
    "watchdog not a number": (
        "[service]\nwatchdog = '10s'\n" + MINIMAL,
        r"service.watchdog: expected a number of seconds, got a string",
    ),
    "accept on a datagram socket": (
        "[sockets.d]\nlisten = '127.0.0.1:53'\ntype = 'datagram'\naccept = true\n",
        r"sockets.d.accept: applies to stream sockets only",
    ),
    "accept served by a listener handler": (
        MINIMAL.replace('listen = "127.0.0.1:7000"', 'listen = "127.0.0.1:7000"\naccept = true')
        + "kind = 'listener'\n",
        r"sockets.echo.accept: each connection is passed to its own process, which handlers.echo "
        r"\(kind listener\) cannot serve; it needs a stream or asgi handler",
    ),
    "accept sockets of two handlers": (
        "[sockets.a]\nlisten = '127.0.0.1:1'\naccept = true\n"
        "[sockets.b]\nlisten = '127.0.0.1:2'\naccept = true\n"
        "[handlers.a]\nsocket = 'a'\ncall = 'm:a'\n[handlers.b]\nsocket = 'b'\ncall = 'm:b'\n",
        r"service.accept-handler: Accept=yes sockets are served by a, b, and a passed connection "
        r"does not say which socket it came from; set accept-handler to one of them",
    ),
    "accept-handler not a stream handler": (
        "[service]\naccept-handler = 'nope'\n" + MINIMAL,
        r"service.accept-handler: 'nope' is not a stream or asgi handler \(stream and asgi handlers: echo\)",
    ),
    "grace-period negative": (
        "[service]\ngrace-period = -1\n" + MINIMAL,
        r"service.grace-period: -1 is not a duration",
    ),
    "grace-period infinite": (
        "[service]\ngrace-period = inf\n" + MINIMAL,
        r"service.grace-period: inf is not a duration",
    ),
    "grace-period string": (
        "[service]\ngrace-period = '5s'\n" + MINIMAL,
        r"service.grace-period: expected a number of seconds, got a string",
    ),
    "python-path as string": (
        "[service]\npython-path = '.'\n" + MINIMAL,
        r"service.python-path: expected a list of strings, got a string",
    ),
    "user neither a name nor an id": (
        "[service]\nuser = -1\n" + MINIMAL,
        r"service.user: -1: expected a user or group name, or a numeric id",
    ),
    "group without user": (
        "[service]\ngroup = 'www'\n" + MINIMAL,
        r"service.group: applies with user only \(without user, DynamicUser= allocates the group\)",
    ),
    "unit-extra as a string": (
        "[service]\nunit-extra = 'A=b'\n" + MINIMAL,
        r"service.unit-extra: expected a list of strings, got a string",
    ),
    "unit-extra line without =": (
        "[service]\nunit-extra = ['IPAddressAllow=any', 'PrivateNetwork']\n" + MINIMAL,
        r"service.unit-extra\[1\]: 'PrivateNetwork' is not a one-line systemd setting \(expected Key=Value\)",
    ),
    "unit-extra line of two lines": (
        '[service]\nunit-extra = ["A=b\\nC=d"]\n' + MINIMAL,
        r"service.unit-extra\[0\]: 'A=b\\nC=d' is not a one-line systemd setting",
    ),
    "unit-extra section header": (
        "[service]\nunit-extra = ['[Install]']\n" + MINIMAL,
        r"service.unit-extra\[0\]: '\[Install\]' is not a one-line systemd setting",
    ),
    "service name unusable": (
        "[service]\nname = 'my service'\n" + MINIMAL,
        r"service.name: 'my service' is not a usable service name",
    ),
}


@pytest.mark.parametrize(("text", "expected"), INVALID.values(), ids=INVALID.keys())
def test_invalid_manifest_is_one_line_naming_file_and_key(text: str, expected: str) -> None:
    message = error_of(text)
    assert re.search(expected, message.removeprefix("service.toml: ")), message


def test_a_file_name_that_cannot_be_a_service_name_asks_for_one() -> None:
    with pytest.raises(ManifestError, match=r"my service.toml: service.name: the file name gives"):
        parse(MINIMAL, name="my service.toml")


def test_unreadable_and_missing_files_are_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ManifestError, match=r"nope.toml: cannot read: No such file or directory$"):
        load_manifest(missing)
    folder = tmp_path / "folder.toml"
    folder.mkdir()
    with pytest.raises(ManifestError, match=r"folder.toml: cannot read: Is a directory$"):
        load_manifest(folder)
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(ManifestError, match=r"binary.toml: not UTF-8 text"):
        load_manifest(binary)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_permission_denied_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "secret.toml"
    path.write_text(MINIMAL)
    path.chmod(0)
    with pytest.raises(ManifestError, match=r"secret.toml: cannot read: Permission denied$"):
        load_manifest(path)


def test_load_keeps_the_path_so_relative_paths_resolve_against_the_manifest(tmp_path: Path) -> None:
    path = tmp_path / "svc.toml"
    path.write_text(MINIMAL)
    manifest = load_manifest(path)
    assert manifest.folder == tmp_path
    assert manifest.service.name == "svc"


def test_importing_the_manifest_does_not_import_trio() -> None:
    """The activator runs before trio is imported: the manifest must stay light."""
    code = "import sys, trio_activate.model.manifest, trio_activate; print('trio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- [service] fd-store -----------------------------------------------------------


def test_fd_store_is_off_by_default_and_read_and_written_back() -> None:
    assert parse_manifest(MINIMAL, source="t.toml").service.fd_store is False
    manifest = parse_manifest("[service]\nfd-store = true\n" + MINIMAL, source="t.toml")
    assert manifest.service.fd_store is True
    assert parse_manifest(dump_manifest(manifest), source="t.toml") == manifest


@pytest.mark.parametrize(
    ("service", "socket_keys", "message"),
    [
        ('fd-store = "yes"', "", r"t\.toml: service\.fd-store: expected true or false, got a string"),
        (
            "fd-store = true",
            "accept = true",
            r"t\.toml: service\.fd-store: true makes the service create its sockets itself, with no "
            r"\.socket unit, but sockets\.echo sets accept = true",
        ),
    ],
    ids=["not-a-boolean", "with-accept"],
)
def test_fd_store_errors_are_one_line_naming_the_key(service: str, socket_keys: str, message: str) -> None:
    text = f"[service]\n{service}\n" + MINIMAL.replace(
        'listen = "127.0.0.1:7000"', f'listen = "127.0.0.1:7000"\n{socket_keys}'
    )
    with pytest.raises(ManifestError, match=f"^{message}") as raised:
        parse_manifest(text, source="t.toml")
    assert "\n" not in str(raised.value)


def test_fd_store_with_remove_on_stop_is_an_error_the_file_would_go_while_systemd_keeps_the_socket() -> None:
    text = (
        "[service]\nfd-store = true\n"
        '[sockets.api]\nlisten = "/run/t/api.sock"\nremove-on-stop = true\n'
        '[handlers.api]\nsocket = "api"\ncall = "m:f"\n'
    )
    with pytest.raises(
        ManifestError, match=r"^t\.toml: service\.fd-store: .*sockets\.api sets remove-on-stop"
    ):
        parse_manifest(text, source="t.toml")
