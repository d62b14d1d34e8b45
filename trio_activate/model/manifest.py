"""The manifest: a TOML file declaring named sockets and the handlers that serve them.

Layer 1: pure.  ``parse_manifest`` takes the file's text; only ``load_manifest``
reads a file.  Nothing here imports trio, so the activator, which runs before
trio is imported, can read the manifest cheaply.

Theory of operation
-------------------
The TOML document is read with ``tomllib`` into plain dicts, then walked table
by table.  Each table is wrapped in a ``_Table`` that hands out keys with their
expected type and remembers which keys were taken; whatever is left over is an
unknown key, reported with a did-you-mean.  Every error is raised once, as a
``ManifestError`` whose message starts with the file name and the key path:

    service.toml: sockets.echo.listen: '127.0.0.1:70000': port 70000 is out of range 0-65535

The sockets are read before the handlers, so each handler table is read
whole in one pass, sockets included (a socket it names must be declared, and
served by no earlier handler); the rules across tables (``accept-handler``,
``accept`` sockets, duplicate addresses) run once every table is read.

The socket options (backlog, reuse-port, mode, ...) are one table,
``SOCKET_OPTIONS``: their keys, value types, the sockets each applies to and
their systemd directives.  Reading, the applies check, writing back and the
unit writer (``units``) all walk it.

The result is a tree of frozen records (``records.record``).  ``dump_manifest`` writes it back
with ``tomli-w``, every default made explicit, so ``check`` shows the user
exactly what the runtime will do, and parse -> dump -> parse is the identity.

Socket order matters: the activator passes fds in manifest order (each socket's
``listen`` addresses in turn), as systemd passes a unit's ``Listen*=`` lines.

Overrides (``--set KEY=VALUE`` on the command line) change the TOML document
before it is validated, so an overridden value meets exactly the checks a
value in the file meets; an error at an overridden key (or a table an
override created) names ``--set`` and the key instead of the file.  See
``apply_overrides`` for the rules.
"""

from __future__ import annotations

import enum
import math
import re
import socket
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from ..errors import ManifestError
from .address import AbstractAddress, Address, InetAddress, UnixAddress, parse_address
from .listen_env import fd_name_problem
from .records import field, record

__all__ = [
    "DEFAULT_BACKLOG",
    "DEFAULT_GRACE_PERIOD",
    "DEFAULT_MODE",
    "SOCKET_OPTIONS",
    "HandlerKind",
    "HandlerSpec",
    "HttpSpec",
    "Manifest",
    "OnError",
    "OnFull",
    "ServiceSpec",
    "SocketOption",
    "SocketSpec",
    "SocketType",
    "apply_overrides",
    "dump_manifest",
    "load_manifest",
    "manifest_from_dict",
    "parse_manifest",
    "read_manifest_document",
]

# systemd's Backlog= default is SOMAXCONN; the kernel caps it at
# net.core.somaxconn (4096 on current kernels) anyway.
DEFAULT_BACKLOG = 4096
DEFAULT_GRACE_PERIOD = 5.0
DEFAULT_START_TIMEOUT = 30.0
# A worker whose event loop has not pinged its supervisor for this long is
# killed and replaced.  As gunicorn's --timeout: long enough for a handler that
# computes for a few seconds without a checkpoint, short enough to end a hang.
DEFAULT_WORKER_TIMEOUT = 30.0
# The shortest [service] watchdog: pings go at half of it, from the event loop.
WATCHDOG_MIN = 1.0
# systemd's SocketMode= default.
DEFAULT_MODE = 0o666

_IDENTIFIER_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", re.ASCII)
_SERVICE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", re.ASCII)
_OCTAL_MODE = re.compile(r"(0o)?[0-7]{1,4}")
# A [Service] line of unit-extra: systemd's keys are letters and digits.
_UNIT_LINE = re.compile(r"[A-Za-z][A-Za-z0-9]*=[^\n\r]*", re.ASCII)


class SocketType(enum.Enum):
    STREAM = "stream"
    DATAGRAM = "datagram"
    SEQPACKET = "seqpacket"

    @property
    def kernel_type(self) -> socket.SocketKind:
        return _KERNEL_TYPES[self]


_KERNEL_TYPES = {
    SocketType.STREAM: socket.SOCK_STREAM,
    SocketType.DATAGRAM: socket.SOCK_DGRAM,
    SocketType.SEQPACKET: socket.SOCK_SEQPACKET,
}


@record
class ServiceSpec:
    name: str
    grace_period: float = DEFAULT_GRACE_PERIOD
    python_path: tuple[str, ...] = (".",)
    # Which stream handler serves an Accept=yes connection when there are several.
    accept_handler: str | None = None
    # Worker processes sharing the sockets; more than one runs a supervisor.
    workers: int = 1
    # Seconds a new worker has to report READY=1 before it counts as failed.
    start_timeout: float = DEFAULT_START_TIMEOUT
    # The generated unit's User=/Group= (names or numeric ids); no user: DynamicUser=yes.
    user: str | None = None
    group: str | None = None
    # Lines appended to the generated unit's [Service] section, for services that need more.
    unit_extra: tuple[str, ...] = ()
    # WatchdogSec= in the generated unit: a service whose event loop stops
    # for this long is restarted.  None: no watchdog.
    watchdog: float | None = None
    # Seconds a serving worker's event loop may go without pinging its
    # supervisor before it is killed and replaced.
    worker_timeout: float = DEFAULT_WORKER_TIMEOUT
    # The control socket's path and the pid file's, relative to the manifest's folder; None: none.
    control: str | None = None
    pid_file: str | None = None
    # Under systemd with NOTIFY_SOCKET: the sockets the service made itself go to
    # systemd's fd store once it is ready, and come back at a restart.
    fd_store: bool = False


@record
class SocketSpec:
    """One ``[sockets.NAME]`` table: one fd name, one or more addresses.

    The fields after ``type`` are the socket options, one per line of
    `SOCKET_OPTIONS` (the key with ``_`` for ``-``); their defaults are the
    options' defaults.
    """

    name: str
    listen: tuple[Address, ...]
    type: SocketType = SocketType.STREAM
    backlog: int = DEFAULT_BACKLOG
    reuse_port: bool = False
    ipv6_only: bool = False
    free_bind: bool = False
    mode: int = DEFAULT_MODE
    owner: str | None = None
    group: str | None = None
    remove_on_stop: bool = False
    # Accept=yes in the generated unit: systemd accepts, and each connection
    # gets a process of its own (a template service instance).
    accept: bool = False


class HandlerKind(enum.Enum):
    """How the runtime calls a handler.

    - ``stream``: ``await handle(stream)`` once per connection;
    - ``datagram``: ``await handle(sock)`` once per fd, for the life of the service;
    - ``listener``: ``await run(listeners)`` once, with every listener;
    - ``asgi``: an ASGI application, served over HTTP by hypercorn's Trio worker.
    """

    STREAM = "stream"
    DATAGRAM = "datagram"
    LISTENER = "listener"
    ASGI = "asgi"


class OnError(enum.Enum):
    """What an exception from one connection's handler does."""

    LOG = "log"
    EXIT = "exit"


class OnFull(enum.Enum):
    """What a new connection meets while ``max-connections`` are open."""

    WAIT = "wait"  # left in the kernel's backlog until a connection closes
    CLOSE = "close"  # accepted and closed at once


DEFAULT_KEEP_ALIVE_TIMEOUT = 5.0


@record
class HttpSpec:
    """An asgi handler's ``[handlers.NAME.http]`` table (every key optional).

    File paths are as written; a relative one is resolved against the
    manifest's folder when the handler is loaded, which is also where a
    missing file is reported.
    """

    keep_alive_timeout: float = DEFAULT_KEEP_ALIVE_TIMEOUT
    # ALPN offers h2 besides http/1.1 (TLS only: cleartext HTTP/2 is what a client asks for).
    http2: bool = True
    root_path: str = ""
    server_header: bool = True
    access_log: bool = False
    certfile: str | None = None
    keyfile: str | None = None
    # Client certificates signed by these CAs are required.
    ca_certs: str | None = None

    @property
    def tls(self) -> bool:
        return self.certfile is not None


@record
class HandlerSpec:
    """One ``[handlers.NAME]`` table: a ``module:function`` serving some sockets.

    ``kind`` is always resolved: when the table does not set it, it follows
    the sockets' type (datagram sockets: datagram; others: stream).
    """

    name: str
    sockets: tuple[str, ...]
    call: str
    kind: HandlerKind = HandlerKind.STREAM
    max_connections: int | None = None
    on_error: OnError = OnError.LOG
    idle_timeout: float | None = None
    """Seconds a connection may go without receiving a byte; None: no limit."""
    max_lifetime: float | None = None
    """Seconds a connection may last at all; None: no limit."""
    on_full: OnFull = OnFull.WAIT
    access_log: bool = False
    """One info line per connection, at its end, on the ``trio_activate.access`` logger."""
    # asgi: ``call`` names a function that returns the application.
    factory: bool = False
    # asgi: the [handlers.NAME.http] table, every default when it is absent.
    http: HttpSpec | None = None

    @property
    def module(self) -> str:
        return self.call.partition(":")[0]

    @property
    def function(self) -> str:
        return self.call.partition(":")[2]


@record
class Manifest:
    service: ServiceSpec
    sockets: tuple[SocketSpec, ...]
    handlers: tuple[HandlerSpec, ...]
    # Where the manifest came from; relative unix paths and python-path
    # entries are resolved against its folder.  Not part of equality, so a
    # manifest dumped and parsed elsewhere still compares equal.
    path: Path | None = field(default=None, compare=False)
    warnings: tuple[str, ...] = field(default=(), compare=False)

    @property
    def folder(self) -> Path:
        return self.path.parent if self.path is not None else Path.cwd()

    @property
    def source(self) -> str:
        return self.path.name if self.path is not None else "<manifest>"

    def socket_names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.sockets)

    def handler_for(self, socket_name: str) -> HandlerSpec | None:
        for handler in self.handlers:
            if socket_name in handler.sockets:
                return handler
        return None

    def fd_names(self) -> tuple[str, ...]:
        """The ``LISTEN_FDNAMES`` an activator passes: one name per address, in order."""
        return tuple(spec.name for spec in self.sockets for _ in spec.listen)


# --- reading ---------------------------------------------------------------


def load_manifest(
    path: str | Path, *, document: dict[str, Any] | None = None, overrides: Sequence[str] = ()
) -> Manifest:
    """Read and validate the manifest at ``path``.

    ``document``: the file's TOML, already read by ``read_manifest_document``
    (the fast start's activator does, for the service), so it is not read
    and parsed again; it is validated all the same.  ``overrides``: the
    command line's ``--set KEY=VALUE`` texts, applied to the document (a
    copy: ``document`` is left as it is) before it is validated.

    Error handling: every problem, including an unreadable file, is one
    ``ManifestError`` whose message starts with the file's name, or with
    ``--set KEY`` for a problem an override brought.
    """
    path = Path(path)
    if document is None:
        document = read_manifest_document(path)
    overridden = Overridden()
    if overrides:
        document, overridden = apply_overrides(document, overrides, source=str(path))
    return _Parser(str(path), path.absolute(), overridden).parse(document)


def read_manifest_document(path: str | Path) -> dict[str, Any]:
    """The TOML document at ``path``, not validated yet (``load_manifest`` validates)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return _parse_toml(text, str(path))


def parse_manifest(text: str, *, path: Path | None = None, source: str | None = None) -> Manifest:
    """Validate manifest ``text``.  ``source`` names the file in messages."""
    where = source if source is not None else (str(path) if path is not None else "<manifest>")
    return _Parser(where, path).parse(_parse_toml(text, where))


def _parse_toml(text: str, where: str) -> dict[str, Any]:
    # Here, not at the top: a fast-started service gets the document from its
    # activator and never needs tomllib (start-up time: benchmarks/, scenario 3).
    import tomllib

    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(f"{where}: invalid TOML: {exc}") from None


def manifest_from_dict(document: dict[str, Any], *, source: str = "<code>") -> Manifest:
    """Validate a manifest given as data (the TOML document's shape), for users without a file."""
    return _Parser(source, None).parse(document)


# --- overrides ---------------------------------------------------------------

# The tables of the top level, and for each an example of a key inside it.
_TOP_TABLES = {
    "service": "service.workers",
    "sockets": "sockets.NAME.listen",
    "handlers": "handlers.NAME.call",
}
_NAMED_TABLES = {"sockets": "socket", "handlers": "handler"}


def parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    """One ``--set`` text: the dotted key's parts and the value.

    ``KEY=VALUE``: KEY is a TOML dotted key (``sockets.http.listen``;
    quoted parts as in TOML, ``sockets."a.b".listen``); VALUE is read as a
    TOML value when it is one (a number, ``true``, an array, a quoted
    string), else taken as the string it is (``127.0.0.1:9000``).
    """
    import tomllib  # only for overrides: a start without them does not pay for it

    start = 0
    while (equals := text.find("=", start)) != -1:
        start = equals + 1
        key_text = text[:equals]
        if "\n" in key_text or "\r" in key_text:
            break
        try:
            keyed = tomllib.loads(f"{key_text} = 0")
        except tomllib.TOMLDecodeError:
            continue  # an "=" inside a quoted part of the key: try the next one
        keys: list[str] = []
        node: Any = keyed
        while isinstance(node, dict) and len(node) == 1:
            ((key, node),) = node.items()
            keys.append(key)
        if node != 0 or isinstance(node, bool) or not keys:
            continue
        return tuple(keys), _override_value(text[equals + 1 :])
    raise ManifestError(f"--set {_shorten(text)!r}: expected KEY=VALUE, e.g. --set service.workers=4")


def _override_value(text: str) -> Any:
    import tomllib

    try:
        document = tomllib.loads(f"value = {text}")
    except tomllib.TOMLDecodeError:
        return text
    return document["value"] if document.keys() == {"value"} else text


@record
class Overridden:
    """What ``--set`` changed in a document: the parser names ``--set KEY`` in an error about it."""

    keys: frozenset[str] = frozenset()
    """The keys set (an error at one or at an entry of its value is the override's)."""
    tables: frozenset[str] = frozenset()
    """The tables created to hold them (an error at the table itself is the override's)."""

    def __bool__(self) -> bool:
        return bool(self.keys)

    def covers(self, key_path: str) -> bool:
        path = key_path.partition("[")[0]  # listen[1]: an entry of the value set
        return path in self.tables or any(path == key or path.startswith(f"{key}.") for key in self.keys)


def apply_overrides(
    document: dict[str, Any], overrides: Sequence[str], *, source: str
) -> tuple[dict[str, Any], Overridden]:
    """``document`` with each ``--set KEY=VALUE`` of ``overrides`` applied, in order (the last wins).

    Returns the new document (``document`` itself is not changed) and what
    the overrides set or created, for the parser to say ``--set KEY`` in an
    error about it.

    Rules: KEY names one key inside a table, never a table itself
    (``--set sockets=1`` is an error naming it); its first part is one of
    the manifest's tables (``service``, ``sockets``, ``handlers``), and a
    ``[sockets.NAME]`` or ``[handlers.NAME]`` table must be in the file: an
    override changes a socket or a handler, it does not declare one (so a
    misspelt name is an error with a did-you-mean, not a new socket).  What
    the value may be is the file's rule for that key, checked by the parser.
    ``source`` names the file in messages.
    """
    result = dict(document)
    keys_set: set[str] = set()
    created: set[str] = set()
    for text in overrides:
        keys, value = parse_override(text)
        dotted = ".".join(keys)

        def fail(message: str, dotted: str = dotted) -> ManifestError:
            return ManifestError(f"--set {dotted}: {message}")

        top = keys[0]
        if top not in _TOP_TABLES:
            close = _close_matches(top, list(_TOP_TABLES), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(_TOP_TABLES)}"
            raise fail(f"unknown key {top!r}; {hint}")
        # How many parts name tables: [service] is one, [sockets.NAME] two.
        depth = 2 if top in _NAMED_TABLES else 1
        if len(keys) <= depth:
            raise fail(f"names a table; --set sets one key in it (e.g. --set {_TOP_TABLES[top]}=...)")
        if top in _NAMED_TABLES:
            declared = result.get(top)
            names = list(declared) if isinstance(declared, dict) else []
            if keys[1] not in names:
                close = _close_matches(keys[1], names, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"declared: {', '.join(names) or 'none'}"
                raise fail(
                    f"{source} declares no {_NAMED_TABLES[top]} named {keys[1]!r} ({hint}); "
                    "--set changes a table of the file, it does not add one"
                )
        node = result
        for index, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is None:
                child = {}
                created.add(".".join(keys[: index + 1]))
            elif not isinstance(child, dict):
                raise fail(f"{'.'.join(keys[: index + 1])} is not a table in {source}")
            else:
                child = dict(child)  # a copy: the caller's document stays as it was
            node[key] = child
            node = child
        node[keys[-1]] = value
        keys_set.add(dotted)
    return result, Overridden(frozenset(keys_set), frozenset(created))


_T = TypeVar("_T")


class _Table:
    """One TOML table being read: hands out keys and remembers which were taken."""

    def __init__(self, parser: _Parser, data: dict[str, Any], key_path: str) -> None:
        self.parser = parser
        self.data = data
        self.key_path = key_path
        self.taken: set[str] = set()

    def where(self, key: str) -> str:
        return f"{self.key_path}.{key}" if self.key_path else key

    def error(self, key: str, message: str) -> ManifestError:
        return self.parser.error(self.where(key), message)

    def get(self, key: str, check: Callable[[str, Any], _T], default: _T) -> _T:
        self.taken.add(key)
        if key not in self.data:
            return default
        return check(key, self.data[key])

    def require(self, key: str, check: Callable[[str, Any], _T], hint: str) -> _T:
        self.taken.add(key)
        if key not in self.data:
            where = self.key_path or "top level"
            raise self.parser.error(where, f"missing key {key!r} ({hint})")
        return check(key, self.data[key])

    def option(self, option: SocketOption) -> Any:
        """A socket option's value: checked as its type says, or its default."""
        return self.get(option.key, lambda key, value: option.type.check(self, key, value), option.default)

    def subtable(self, key: str) -> _Table | None:
        self.taken.add(key)
        if key not in self.data:
            return None
        value = self.data[key]
        if not isinstance(value, dict):
            raise self.error(key, f"expected a table, got {_type_name(value)}")
        return _Table(self.parser, value, self.where(key))

    def finish(self) -> None:
        """Reject keys nobody took, suggesting the closest known one."""
        for key in self.data:
            if key in self.taken:
                continue
            close = _close_matches(key, sorted(self.taken), n=1)
            hint = (
                f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(sorted(self.taken))}"
            )
            raise self.error(key, f"unknown key{hint}")

    # Type checks, each returning the checked value.  bool is a subclass of
    # int in Python, so every numeric check rejects it explicitly.

    def string(self, key: str, value: Any) -> str:
        if not isinstance(value, str):
            raise self.error(key, f"expected a string, got {_type_name(value)}")
        return value

    def boolean(self, key: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise self.error(key, f"expected true or false, got {_type_name(value)}")
        return value

    def backlog(self, key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"expected an integer, got {_type_name(value)}")
        if not 1 <= value <= 2**31 - 1:
            raise self.error(key, f"{value} is out of range 1-{2**31 - 1}")
        return value

    def mode(self, key: str, value: Any) -> int:
        if isinstance(value, bool):
            raise self.error(key, 'expected an octal mode such as 0o660 or "0660", got a boolean')
        if isinstance(value, int):
            if not 0 <= value <= 0o7777:
                raise self.error(key, f"{value:#o} is out of range 0o0-0o7777")
            return value
        if isinstance(value, str):
            if not _OCTAL_MODE.fullmatch(value):
                raise self.error(key, f'{value!r} is not an octal mode (expected e.g. "0660")')
            return int(value.removeprefix("0o"), 8)
        raise self.error(key, f'expected an octal mode such as 0o660 or "0660", got {_type_name(value)}')

    def user_or_group(self, key: str, value: Any) -> str:
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return str(value)
        if isinstance(value, str) and value and ":" not in value and not value.isspace():
            return value
        raise self.error(key, f"{value!r}: expected a user or group name, or a numeric id")

    def strings(self, key: str, value: Any) -> tuple[str, ...]:
        """A string or a non-empty list of strings."""
        if isinstance(value, str):
            return (value,)
        if not isinstance(value, list):
            raise self.error(key, f"expected a string or a list of strings, got {_type_name(value)}")
        if not value:
            raise self.error(key, "expected at least one entry, got an empty list")
        for index, item in enumerate(value):
            if not isinstance(item, str):
                raise self.error(f"{key}[{index}]", f"expected a string, got {_type_name(item)}")
        return tuple(value)

    def string_list(self, key: str, value: Any) -> tuple[str, ...]:
        """A list of strings, possibly empty."""
        if value == []:
            return ()
        if isinstance(value, str):
            raise self.error(key, 'expected a list of strings, got a string (write ["..."])')
        return self.strings(key, value)


def _close_matches(word: str, choices: list[str], n: int) -> list[str]:
    import difflib  # only an error needs it: valid manifests do not pay for it

    return difflib.get_close_matches(word, choices, n=n)


def _shorten(text: str, limit: int = 40) -> str:
    """`text`, cut to `limit` characters with an ellipsis: an error line stays one short line."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _type_name(value: object) -> str:
    names = {
        bool: "a boolean",
        int: "an integer",
        float: "a float",
        str: "a string",
        list: "an array",
        dict: "a table",
    }
    return names.get(type(value), type(value).__name__)


# --- socket options: one table ---------------------------------------------
#
# Every key of a [sockets.NAME] table after listen and type is one line of
# SOCKET_OPTIONS, and each place that knows the options walks it: the parser
# reads and checks the key, refuses it on sockets it does not apply to, and
# manifest_to_dict and units.py write it back (to TOML and to the .socket
# unit) where it applies.  So an option added there is read, checked,
# written back and put in the unit alike; only applying it (system/create.py)
# is code of its own, as every option is a different syscall.  Its value
# lives in the SocketSpec field of the same name, whose default is the
# option's.


@record
class OptionType:
    """How an option's value is checked when read, written back to TOML and written in a unit."""

    check: Callable[[_Table, str, Any], Any]
    """A `_Table` check: the value as TOML has it, or a ManifestError naming the key."""
    toml: Callable[[Any], Any]
    unit: Callable[[Any], str]


@record
class Scope:
    """The sockets an option applies to."""

    says: str
    """What the error on other sockets says after "applies to"."""
    test: Callable[[SocketSpec], bool]


@record
class SocketOption:
    """One key of ``[sockets.NAME]``: its type, where it applies, its ``.socket`` unit directive."""

    key: str
    type: OptionType
    scope: Scope
    directive: str | None
    """The systemd.socket(5) setting; None where the unit writer says it in its own way."""
    false_anywhere: bool = False
    """Where it does not apply, ``false`` passes (it asks for nothing); else the key itself is refused."""

    @property
    def field(self) -> str:
        """The `SocketSpec` field holding the value."""
        return self.key.replace("-", "_")

    @property
    def default(self) -> Any:
        """`SocketSpec`'s default: the field declares it, for specs made in code as well."""
        return getattr(SocketSpec, self.field)

    def value_in(self, spec: SocketSpec) -> Any:
        """The value ``spec`` has, or None where the option does not apply or is unset.

        What is not None is written back to TOML and (with a directive) in
        the unit: every applicable value, defaults included, so that both
        show exactly what the runtime does.
        """
        return getattr(spec, self.field) if self.scope.test(spec) else None


def _as_is(value: Any) -> Any:
    return value


def _yes(value: bool) -> str:
    return "yes" if value else "no"


def _octal(mode: int) -> str:
    # TOML writers have no octal integers: the string form round-trips, and
    # SocketMode= takes the same digits.
    return f"{mode:04o}"


BOOLEAN = OptionType(_Table.boolean, _as_is, _yes)
# systemd's BindIPv6Only= names its choices; "both" is dual-stack.
IPV6_ONLY = OptionType(_Table.boolean, _as_is, lambda only: "ipv6-only" if only else "both")
BACKLOG = OptionType(_Table.backlog, _as_is, str)
MODE = OptionType(_Table.mode, _octal, _octal)
USER_OR_GROUP = OptionType(_Table.user_or_group, _as_is, str)

CONNECTION_SOCKETS = Scope("stream and seqpacket sockets only", lambda s: s.type is not SocketType.DATAGRAM)
# Accept=yes passes each connection to a process of its own, which a stream or asgi handler serves.
ACCEPT_KINDS = (HandlerKind.STREAM, HandlerKind.ASGI)
STREAM_SOCKETS = Scope(
    "stream sockets only (trio-activate serves stream connections)", lambda s: s.type is SocketType.STREAM
)
IP_ADDRESSES = Scope(
    "IP addresses only, and listen has none", lambda s: any(isinstance(a, InetAddress) for a in s.listen)
)
IPV6_ADDRESSES = Scope(
    "IPv6 addresses only, and listen has none",
    lambda s: any(isinstance(a, InetAddress) and a.family == socket.AF_INET6 for a in s.listen),
)
UNIX_FILES = Scope(
    "unix socket files only, and listen has none",
    lambda s: any(isinstance(a, UnixAddress) for a in s.listen),
)

# In this order the options are read, checked, written back and put in the unit.
SOCKET_OPTIONS: tuple[SocketOption, ...] = (
    SocketOption("backlog", BACKLOG, CONNECTION_SOCKETS, "Backlog"),
    # No directive: Accept= decides which service the unit starts (Accept=yes or Service=).
    SocketOption("accept", BOOLEAN, STREAM_SOCKETS, None, false_anywhere=True),
    SocketOption("reuse-port", BOOLEAN, IP_ADDRESSES, "ReusePort", false_anywhere=True),
    SocketOption("free-bind", BOOLEAN, IP_ADDRESSES, "FreeBind", false_anywhere=True),
    SocketOption("ipv6-only", IPV6_ONLY, IPV6_ADDRESSES, "BindIPv6Only", false_anywhere=True),
    SocketOption("mode", MODE, UNIX_FILES, "SocketMode"),
    SocketOption("owner", USER_OR_GROUP, UNIX_FILES, "SocketUser"),
    SocketOption("group", USER_OR_GROUP, UNIX_FILES, "SocketGroup"),
    SocketOption("remove-on-stop", BOOLEAN, UNIX_FILES, "RemoveOnStop"),
)


class _Parser:
    def __init__(self, where: str, path: Path | None, overridden: Overridden | None = None) -> None:
        self.where = where
        self.path = path
        # Key paths set or created by --set: an error about one of them (or a key
        # below one) is the override's, and names it instead of the file.
        self.overridden = overridden if overridden is not None else Overridden()
        self.warnings: list[str] = []

    def error(self, key_path: str, message: str) -> ManifestError:
        if self.overridden and self.overridden.covers(key_path):
            return ManifestError(f"--set {key_path}: {message}")
        return ManifestError(f"{self.where}: {key_path}: {message}")

    def parse(self, document: dict[str, Any]) -> Manifest:
        top = _Table(self, document, "")
        service_table = top.subtable("service")
        sockets_table = top.subtable("sockets")
        handlers_table = top.subtable("handlers")
        top.finish()

        service = self.service(service_table)
        if sockets_table is None or not sockets_table.data:
            raise self.error("sockets", "the manifest declares no socket (add a [sockets.NAME] table)")
        sockets = tuple(self.socket(sockets_table, name) for name in sockets_table.data)
        handlers = self.handlers(handlers_table, sockets)
        self.check_accept_handler(service, handlers)
        self.check_accept_sockets(service, sockets, handlers)
        self.check_fd_store(service, sockets)
        self.check_duplicate_addresses(sockets)
        return Manifest(service, sockets, handlers, path=self.path, warnings=tuple(self.warnings))

    # [service]

    def service(self, table: _Table | None) -> ServiceSpec:
        default_name = self.path.stem if self.path is not None else "service"
        if table is None:
            return ServiceSpec(self.service_name("service.name", default_name, from_file_name=True))
        name = table.get("name", table.string, None)
        grace = table.get("grace-period", self.duration(table), DEFAULT_GRACE_PERIOD)
        python_path: tuple[str, ...] = table.get("python-path", table.string_list, (".",))
        accept_handler = table.get("accept-handler", table.string, None)
        workers = table.get("workers", self.positive_int(table), 1)
        start_timeout = table.get("start-timeout", self.duration(table), DEFAULT_START_TIMEOUT)
        if start_timeout == 0:
            raise table.error("start-timeout", "0 leaves a worker no time to start (expected a number > 0)")
        watchdog = table.get("watchdog", self.duration(table), None)
        if watchdog is not None and not watchdog >= WATCHDOG_MIN:
            raise table.error(
                "watchdog",
                f"{watchdog:g} is too short: the service pings at half of it "
                f"(expected at least {WATCHDOG_MIN:g})",
            )
        worker_timeout = table.get("worker-timeout", self.duration(table), DEFAULT_WORKER_TIMEOUT)
        if worker_timeout == 0:
            raise table.error(
                "worker-timeout", "0 would kill every worker at once (expected a number of seconds > 0)"
            )
        user = table.get("user", table.user_or_group, None)
        group = table.get("group", table.user_or_group, None)
        if group is not None and user is None:
            raise table.error(
                "group", "applies with user only (without user, DynamicUser= allocates the group)"
            )
        unit_extra: tuple[str, ...] = table.get("unit-extra", self.unit_lines(table), ())
        control = table.get("control", self.file_path(table), None)
        pid_file = table.get("pid-file", self.file_path(table), None)
        fd_store = table.get("fd-store", table.boolean, False)
        table.finish()
        if name is None:
            name = self.service_name("service.name", default_name, from_file_name=True)
        else:
            name = self.service_name("service.name", name, from_file_name=False)
        return ServiceSpec(
            name,
            grace,
            python_path,
            accept_handler,
            workers,
            start_timeout,
            user,
            group,
            unit_extra,
            watchdog,
            worker_timeout,
            control=control,
            pid_file=pid_file,
            fd_store=fd_store,
        )

    def service_name(self, key_path: str, name: str, *, from_file_name: bool) -> str:
        if _SERVICE_NAME.fullmatch(name) and len(name) <= 200:
            return name
        origin = f"the file name gives {name!r}, which" if from_file_name else f"{name!r}"
        raise self.error(
            key_path,
            f"{origin} is not a usable service name (letters, digits, '_', '.', '-'; at most 200)",
        )

    def duration(self, table: _Table) -> Callable[[str, Any], float]:
        """Any duration key's check (grace-period, start-timeout, watchdog, ...): finite seconds >= 0.

        Each key's own lower bound, if any, is checked where the key is read.
        """

        def check(key: str, value: Any) -> float:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise table.error(key, f"expected a number of seconds, got {_type_name(value)}")
            try:
                seconds = float(value)
            except OverflowError:
                # TOML integers have no bound; a float holds up to about 1.8e308.
                raise table.error(key, f"{_shorten(str(value))} is too large for a duration") from None
            if not math.isfinite(seconds) or seconds < 0:
                raise table.error(key, f"{value!r} is not a duration (expected a finite number >= 0)")
            return seconds

        return check

    # [sockets.NAME]

    def socket(self, sockets: _Table, name: str) -> SocketSpec:
        table = sockets.subtable(name)
        assert table is not None
        problem = fd_name_problem(name)
        if problem is not None:
            raise self.error(table.key_path, f"socket name {name!r} cannot be an fd name: {problem}")
        listen_texts = table.require("listen", table.strings, 'e.g. listen = "127.0.0.1:8000"')
        listen = tuple(
            self.address(table, index, text, len(listen_texts)) for index, text in enumerate(listen_texts)
        )
        type_text = table.get("type", table.string, "stream")
        try:
            sock_type = SocketType(type_text)
        except ValueError:
            raise table.error("type", f"{type_text!r}: expected one of stream, datagram, seqpacket") from None
        spec = SocketSpec(
            name, listen, sock_type, **{option.field: table.option(option) for option in SOCKET_OPTIONS}
        )
        table.finish()
        self.check_socket_options(table, spec)
        return spec

    def address(self, table: _Table, index: int, text: str, count: int) -> Address:
        try:
            return parse_address(text)
        except ValueError as exc:
            key = "listen" if count == 1 else f"listen[{index}]"
            raise table.error(key, str(exc)) from None

    def unit_lines(self, table: _Table) -> Callable[[str, Any], tuple[str, ...]]:
        def check(key: str, value: Any) -> tuple[str, ...]:
            lines = table.string_list(key, value)
            for index, line in enumerate(lines):
                if not _UNIT_LINE.fullmatch(line):
                    raise table.error(
                        f"{key}[{index}]", f"{line!r} is not a one-line systemd setting (expected Key=Value)"
                    )
            return lines

        return check

    def check_socket_options(self, table: _Table, spec: SocketSpec) -> None:
        """Options that cannot apply to the socket's addresses or type are errors, not ignored."""
        inet = [a for a in spec.listen if isinstance(a, InetAddress)]
        if spec.type is SocketType.SEQPACKET and inet:
            raise table.error(
                "type",
                f"seqpacket sockets are unix-only (as systemd's ListenSequentialPacket=), "
                f"but listen has {inet[0]}",
            )
        for option in SOCKET_OPTIONS:
            if option.key not in table.data or option.scope.test(spec):
                continue
            if option.false_anywhere and getattr(spec, option.field) is False:
                continue  # false asks for nothing, whatever the socket
            raise table.error(option.key, f"applies to {option.scope.says}")

    # [handlers.NAME]

    def handlers(
        self, handlers_table: _Table | None, sockets: tuple[SocketSpec, ...]
    ) -> tuple[HandlerSpec, ...]:
        """Every ``[handlers.NAME]`` table, each read whole in one pass, in file order."""
        handlers: list[HandlerSpec] = []
        if handlers_table is not None:
            for name in handlers_table.data:
                handlers.append(self.handler(handlers_table, name, sockets, handlers))
        for spec in sockets:
            if not any(spec.name in handler.sockets for handler in handlers):
                self.warnings.append(
                    f"{self.where}: sockets.{spec.name}: no handler serves this socket "
                    "(fine if an embedding program takes it)"
                )
        return tuple(handlers)

    def handler(
        self, handlers: _Table, name: str, sockets: tuple[SocketSpec, ...], earlier: list[HandlerSpec]
    ) -> HandlerSpec:
        """One handler: its keys, then the sockets it names, then its kind and what fits that kind.

        Every socket is parsed by now (``[sockets]`` is read before
        ``[handlers]``), so the table is checked against them here, whole;
        ``earlier``: the handlers before it, which may have claimed a socket.
        """
        table = handlers.subtable(name)
        assert table is not None
        served = table.require("socket", table.strings, "the name of a [sockets.NAME] table")
        call = table.require("call", table.string, 'e.g. call = "myapp.echo:handle"')
        module, sep, function = call.partition(":")
        if not sep or not _IDENTIFIER_PATH.fullmatch(module) or not _IDENTIFIER_PATH.fullmatch(function):
            raise table.error("call", f'{call!r}: expected "module:function", e.g. "myapp.echo:handle"')
        kind_text = table.get("kind", table.string, None)
        explicit_kind = None
        if kind_text is not None:
            explicit_kind = self.enum_value(table, "kind", HandlerKind, kind_text)
        on_error_text = table.get("on-error", table.string, None)
        on_error = OnError.LOG
        if on_error_text is not None:
            on_error = self.enum_value(table, "on-error", OnError, on_error_text)
        max_connections = table.get("max-connections", self.positive_int(table), None)
        idle_timeout = table.get("idle-timeout", self.positive_duration(table), None)
        max_lifetime = table.get("max-lifetime", self.positive_duration(table), None)
        on_full_text = table.get("on-full", table.string, None)
        on_full = OnFull.WAIT
        if on_full_text is not None:
            on_full = self.enum_value(table, "on-full", OnFull, on_full_text)
            if max_connections is None:
                raise table.error("on-full", "applies only with max-connections, which is not set")
        access_log = table.get("access-log", table.boolean, False)
        factory = table.get("factory", table.boolean, False)
        http_table = table.subtable("http")
        table.finish()
        types = self.served_types(table, name, served, sockets, earlier)
        kind = self.handler_kind(table, explicit_kind, types)
        http = None
        if kind is HandlerKind.ASGI:
            http = self.http(http_table) if http_table is not None else HttpSpec()
        else:
            for key in ("factory", "http"):
                if key in table.data:
                    raise table.error(key, f"applies to asgi handlers only, and this one is {kind.value}")
        return HandlerSpec(
            name,
            served,
            call,
            kind,
            max_connections,
            on_error,
            idle_timeout,
            max_lifetime,
            on_full,
            access_log,
            factory,
            http,
        )

    def http(self, table: _Table) -> HttpSpec:
        """An asgi handler's ``[handlers.NAME.http]`` table."""
        keep_alive = table.get(
            "keep-alive-timeout", self.positive_duration(table), DEFAULT_KEEP_ALIVE_TIMEOUT
        )
        http2 = table.get("http2", table.boolean, True)
        root_path = table.get("root-path", table.string, "")
        if root_path and (not root_path.startswith("/") or root_path.endswith("/")):
            raise table.error(
                "root-path", f"{_shorten(root_path)!r}: expected a path that starts and does not end with /"
            )
        server_header = table.get("server-header", table.boolean, True)
        access_log = table.get("access-log", table.boolean, False)
        files = {
            key: table.get(key, self.file_path(table), None) for key in ("certfile", "keyfile", "ca-certs")
        }
        table.finish()
        if (files["certfile"] is None) != (files["keyfile"] is None):
            given, missing = ("certfile", "keyfile") if files["keyfile"] is None else ("keyfile", "certfile")
            raise table.error(given, f"TLS needs both certfile and keyfile, and {missing} is not set")
        if files["certfile"] is None:
            for key in ("ca-certs", "http2"):
                if key in table.data:
                    raise table.error(key, "applies to TLS only: set certfile and keyfile")
        return HttpSpec(
            keep_alive, http2, root_path, server_header, access_log,
            files["certfile"], files["keyfile"], files["ca-certs"],
        )  # fmt: skip

    def file_path(self, table: _Table) -> Callable[[str, Any], str]:
        def check(key: str, value: Any) -> str:
            text = table.string(key, value)
            if not text or "\0" in text:
                raise table.error(key, f"{text!r}: expected a file path")
            return text

        return check

    def positive_duration(self, table: _Table) -> Callable[[str, Any], float]:
        def check(key: str, value: Any) -> float:
            seconds = self.duration(table)(key, value)
            if seconds == 0:
                raise table.error(
                    key, "0 is not a timeout (expected a number of seconds > 0; leave it out for none)"
                )
            return seconds

        return check

    _E = TypeVar("_E", bound=enum.Enum)

    def enum_value(self, table: _Table, key: str, kind: type[_E], text: str) -> _E:
        try:
            return kind(text)
        except ValueError:
            choices = ", ".join(str(member.value) for member in kind)
            raise table.error(key, f"{text!r}: expected one of {choices}") from None

    def positive_int(self, table: _Table) -> Callable[[str, Any], int]:
        def check(key: str, value: Any) -> int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise table.error(key, f"expected an integer, got {_type_name(value)}")
            if value < 1:
                raise table.error(key, f"{value} is out of range: expected at least 1")
            return value

        return check

    def served_types(
        self,
        table: _Table,
        name: str,
        served: tuple[str, ...],
        sockets: tuple[SocketSpec, ...],
        earlier: list[HandlerSpec],
    ) -> dict[str, SocketType]:
        """The type of each socket the handler names, each declared and served by no other handler."""
        types = {spec.name: spec.type for spec in sockets}
        claimed = {sock_name: handler.name for handler in earlier for sock_name in handler.sockets}
        for index, sock_name in enumerate(served):
            key = "socket" if len(served) == 1 else f"socket[{index}]"
            if sock_name not in types:
                close = _close_matches(sock_name, list(types), n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"declared: {', '.join(types)}"
                raise table.error(key, f"no socket named {sock_name!r} ({hint})")
            if sock_name in claimed:
                raise table.error(
                    key, f"socket {sock_name!r} is already served by handlers.{claimed[sock_name]}"
                )
            claimed[sock_name] = name
        return {sock_name: types[sock_name] for sock_name in served}

    def handler_kind(
        self, table: _Table, explicit: HandlerKind | None, types: dict[str, SocketType]
    ) -> HandlerKind:
        """The handler's kind (the table's, else its sockets' types give it), checked against its sockets."""
        kind = explicit
        if kind is None:
            if set(types.values()) == {SocketType.DATAGRAM}:
                kind = HandlerKind.DATAGRAM
            elif SocketType.DATAGRAM in types.values():
                raise table.error(
                    "socket", "mixes datagram and connection sockets; give each kind its own handler"
                )
            else:
                kind = HandlerKind.STREAM
        fits = {
            HandlerKind.STREAM: {SocketType.STREAM, SocketType.SEQPACKET},
            HandlerKind.DATAGRAM: {SocketType.DATAGRAM},
            HandlerKind.LISTENER: {SocketType.STREAM},
            HandlerKind.ASGI: {SocketType.STREAM},
        }[kind]
        for sock_name, sock_type in types.items():
            if sock_type not in fits:
                raise table.error(
                    "kind",
                    f"a {kind.value} handler cannot serve sockets.{sock_name}, a {sock_type.value} socket",
                )
        if kind is not HandlerKind.STREAM:
            for key in (
                "max-connections",
                "on-error",
                "idle-timeout",
                "max-lifetime",
                "on-full",
                "access-log",
            ):
                if key in table.data:
                    raise table.error(key, f"applies to stream handlers only, and this one is {kind.value}")
        seqpacket = [sock_name for sock_name, sock_type in types.items() if sock_type is SocketType.SEQPACKET]
        if "idle-timeout" in table.data and seqpacket:
            # A seqpacket connection is handed over as the Trio socket
            # itself, whose receives the runtime does not see.
            raise table.error(
                "idle-timeout",
                f"applies to stream sockets only, and sockets.{seqpacket[0]} is seqpacket "
                "(its connections come as the Trio socket; max-lifetime applies to them)",
            )
        return kind

    def check_accept_handler(self, service: ServiceSpec, handlers: tuple[HandlerSpec, ...]) -> None:
        if service.accept_handler is None:
            return
        streams = [h.name for h in handlers if h.kind in ACCEPT_KINDS]
        if service.accept_handler not in streams:
            raise self.error(
                "service.accept-handler",
                f"{service.accept_handler!r} is not a stream or asgi handler (stream and asgi handlers: "
                f"{', '.join(streams) or 'none'})",
            )

    def check_accept_sockets(
        self, service: ServiceSpec, sockets: tuple[SocketSpec, ...], handlers: tuple[HandlerSpec, ...]
    ) -> None:
        """An ``accept = true`` socket passes one connection per process: a stream handler serves it."""
        serving: set[str] = set()
        for spec in sockets:
            if not spec.accept:
                continue
            handler = next((h for h in handlers if spec.name in h.sockets), None)
            if handler is None:
                continue  # warned already: no handler serves it
            if handler.kind not in ACCEPT_KINDS:
                raise self.error(
                    f"sockets.{spec.name}.accept",
                    f"each connection is passed to its own process, which handlers.{handler.name} "
                    f"(kind {handler.kind.value}) cannot serve; it needs a stream or asgi handler",
                )
            serving.add(handler.name)
        if len(serving) > 1 and service.accept_handler is None:
            raise self.error(
                "service.accept-handler",
                f"Accept=yes sockets are served by {', '.join(sorted(serving))}, and a passed "
                "connection does not say which socket it came from; set accept-handler to one of them",
            )

    def check_fd_store(self, service: ServiceSpec, sockets: tuple[SocketSpec, ...]) -> None:
        """``fd-store``: the service makes its own sockets, no ``.socket`` unit, so no ``Accept=yes``."""
        if not service.fd_store:
            return
        for spec in sockets:
            if spec.accept:
                raise self.error(
                    "service.fd-store",
                    f"true makes the service create its sockets itself, with no .socket unit, but "
                    f"sockets.{spec.name} sets accept = true, which needs one (systemd accepts); "
                    "set one of them to false",
                )
            if spec.remove_on_stop:
                raise self.error(
                    "service.fd-store",
                    f"true keeps the sockets open in systemd across a restart, but "
                    f"sockets.{spec.name} sets remove-on-stop = true: the socket file would be gone "
                    "while the socket still listens; set one of them to false",
                )

    # Cross-table rules

    def check_duplicate_addresses(self, sockets: tuple[SocketSpec, ...]) -> None:
        seen: dict[tuple[object, ...], str] = {}
        for spec in sockets:
            for index, address in enumerate(spec.listen):
                key_path = f"sockets.{spec.name}.listen" + ("" if len(spec.listen) == 1 else f"[{index}]")
                for identity in self.bind_identities(spec, address):
                    if identity in seen:
                        raise self.error(key_path, f"{address} is already declared at {seen[identity]}")
                    seen[identity] = key_path

    def bind_identities(self, spec: SocketSpec, address: Address) -> Iterator[tuple[object, ...]]:
        """What two binds would collide on.  Port 0 never collides: each gets its own port.

        TCP and UDP have separate port spaces; a unix path or abstract name is
        one name whatever the socket type.
        """
        if isinstance(address, InetAddress):
            if address.port != 0:
                yield ("inet", spec.type, address.bind_host, address.port)
        elif isinstance(address, UnixAddress):
            folder = self.path.parent if self.path is not None else Path(".")
            yield ("unix", str(Path(address.resolved(str(folder)).path)))
        elif isinstance(address, AbstractAddress):
            yield ("abstract", address.name)


# --- writing ---------------------------------------------------------------


def manifest_to_dict(manifest: Manifest) -> dict[str, Any]:
    """The manifest as TOML-ready data, every default explicit."""
    service = {
        "name": manifest.service.name,
        "grace-period": manifest.service.grace_period,
        "python-path": list(manifest.service.python_path),
    }
    if manifest.service.accept_handler is not None:
        service["accept-handler"] = manifest.service.accept_handler
    service["workers"] = manifest.service.workers
    service["start-timeout"] = manifest.service.start_timeout
    if manifest.service.watchdog is not None:
        service["watchdog"] = manifest.service.watchdog
    service["worker-timeout"] = manifest.service.worker_timeout
    if manifest.service.user is not None:
        service["user"] = manifest.service.user
    if manifest.service.group is not None:
        service["group"] = manifest.service.group
    service["unit-extra"] = list(manifest.service.unit_extra)
    if manifest.service.control is not None:
        service["control"] = manifest.service.control
    if manifest.service.pid_file is not None:
        service["pid-file"] = manifest.service.pid_file
    service["fd-store"] = manifest.service.fd_store
    sockets: dict[str, Any] = {}
    for spec in manifest.sockets:
        listen = [str(a) for a in spec.listen]
        table: dict[str, Any] = {"listen": listen[0] if len(listen) == 1 else listen, "type": spec.type.value}
        for option in SOCKET_OPTIONS:
            value = option.value_in(spec)
            if value is not None:
                table[option.key] = option.type.toml(value)
        sockets[spec.name] = table
    handlers: dict[str, Any] = {}
    for handler in manifest.handlers:
        handler_table: dict[str, Any] = {
            "socket": handler.sockets[0] if len(handler.sockets) == 1 else list(handler.sockets),
            "call": handler.call,
            "kind": handler.kind.value,
        }
        if handler.kind is HandlerKind.STREAM:
            if handler.max_connections is not None:
                handler_table["max-connections"] = handler.max_connections
                handler_table["on-full"] = handler.on_full.value
            handler_table["on-error"] = handler.on_error.value
            if handler.idle_timeout is not None:
                handler_table["idle-timeout"] = handler.idle_timeout
            if handler.max_lifetime is not None:
                handler_table["max-lifetime"] = handler.max_lifetime
            handler_table["access-log"] = handler.access_log
        if handler.kind is HandlerKind.ASGI:
            handler_table["factory"] = handler.factory
            if handler.http is not None:
                handler_table["http"] = _http_to_dict(handler.http)
        handlers[handler.name] = handler_table
    document: dict[str, Any] = {"service": service, "sockets": sockets}
    if handlers:
        document["handlers"] = handlers
    return document


def _http_to_dict(http: HttpSpec) -> dict[str, Any]:
    table: dict[str, Any] = {
        "keep-alive-timeout": http.keep_alive_timeout,
        "root-path": http.root_path,
        "server-header": http.server_header,
        "access-log": http.access_log,
    }
    if http.tls:
        table.update(http2=http.http2, certfile=http.certfile, keyfile=http.keyfile)
        if http.ca_certs is not None:
            table["ca-certs"] = http.ca_certs
    return table


def dump_manifest(manifest: Manifest) -> str:
    """The normalized manifest as TOML text; ``parse_manifest`` reads it back equal."""
    import tomli_w  # only `check` writes TOML: the serving path does not pay for it

    return tomli_w.dumps(manifest_to_dict(manifest))
