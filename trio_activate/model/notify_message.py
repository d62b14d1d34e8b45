"""The sd_notify protocol as values: messages, the notify address, the watchdog.

What this module owns
---------------------
The meaning of the three variables a service manager sets for notification,
``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``, and the format of
the datagrams sent to that socket: building them (`format_message` and one
function per message: `ready`, `reloading`, `stopping`, `status`, `mainpid`,
`watchdog`, `extend_timeout`, and for the fd store `fd_store` and
`fd_store_remove`) and reading them back (`parse_notify_message`,
for tests and for a supervisor that receives its workers' ``READY=1``).

Layer 1: pure logic.  Nothing here makes a syscall, imports trio, reads the
clock or looks at ``os.environ`` on its own; the environment and the pid come
in as arguments.  `~trio_activate.system.notifier.Notifier` (layer 2) sends.

Resource handling: none.  `parse_notify_socket` only turns text into a
sockaddr (and `format_notify_socket` back); no socket is opened here.

Theory of operation
-------------------
A notification is one datagram on an ``AF_UNIX`` socket: lines of
``KEY=VALUE``, UTF-8.  The rules here are those of the reference receiver,
systemd's manager (``manager_dispatch_notify_fd``), because a message it
would drop is a message lost:

1. Lines are split on ``\\n`` *and* ``\\r`` (systemd's ``NEWLINE``), so a
   value containing either would split into a second, bogus line.  A value
   with a NUL byte makes systemd drop the *whole* datagram.  `format_message`
   rejects all three; `status` replaces them with spaces, because a status
   text often comes from the user or from an exception and must never fail.
2. A datagram longer than ``PIPE_BUF`` (4096 bytes, ``NOTIFY_BUFFER_MAX``) is
   dropped whole.  `format_message` rejects longer messages; `status` and
   `ready` cut a long status text to fit, on a character boundary, ending
   with ``"…"``.
3. systemd ignores a ``STATUS=`` that is not valid UTF-8, so `status` encodes
   characters that cannot be UTF-8 (lone surrogates, e.g. from undecodable
   file names) as ``"?"`` instead of failing.
4. Keys are upper-case ASCII letters, digits and ``_`` (every key systemd
   defines has that form).

``NOTIFY_SOCKET`` follows libsystemd's ``sockaddr_un_set_path``: an absolute
path, or ``@name`` for Linux's abstract namespace (the ``@`` becomes a NUL
byte).  A path needs room for its terminating NUL in the 108 bytes of
``sun_path``, an abstract name has its leading NUL instead: 107 bytes of name
either way.  Anything else is an error: relative paths (which libsystemd
also refuses) and the ``vsock:`` forms of systemd 253+ (an ``AF_VSOCK``
address for VMs, which trio-activate does not send to).

``WATCHDOG_USEC`` and ``WATCHDOG_PID`` follow ``sd_watchdog_enabled``: the
manager expects a ping at least every ``WATCHDOG_USEC`` microseconds, and
``sd_watchdog_enabled(3)`` recommends pinging at half of that.
``WATCHDOG_PID``, when set, names the one process meant to ping.  Numbers
are plain decimal digits without a leading zero, read by the same
`~trio_activate.model.text.parse_decimal` as ``LISTEN_*`` (libsystemd also
takes whitespace, signs and base prefixes; no manager sends them).  The one difference in order from
libsystemd: ``WATCHDOG_PID`` is looked at first, so a malformed
``WATCHDOG_USEC`` next to another process's ``WATCHDOG_PID`` is not our
business (libsystemd would fail on it; both end with "no watchdog", we just
do not complain about someone else's variable).

`watchdog_interval` returns ``None`` for the normal "no watchdog" cases
(absent, or for another process) and raises `ValueError` for a malformed
value.  An exception rather than a result object because the two outcomes
want different handling: "no watchdog" is silent and common, "malformed" is a
bug in whoever set the variable and deserves a warning, and the exception's
message (variable, value, what was expected) is exactly that warning.  The
caller (`~trio_activate.system.notifier.Notifier.from_environ`) logs it once and
runs without a watchdog.  This is the split `~trio_activate.model.listen_env` makes
between `~trio_activate.model.listen_env.NotActivated` and its error.
"""

from __future__ import annotations

import os
import re
import socket
import struct
from collections.abc import Mapping

from .address import UNIX_PATH_MAX
from .listen_env import fd_name_problem
from .text import parse_decimal, show_value

__all__ = [
    "FD_STORE_MAX_PER_MESSAGE",
    "NOTIFY_MESSAGE_MAX",
    "NOTIFY_VARIABLES",
    "extend_timeout",
    "fd_store",
    "fd_store_remove",
    "format_message",
    "format_notify_socket",
    "mainpid",
    "parse_notify_message",
    "parse_notify_socket",
    "ready",
    "reloading",
    "status",
    "stopping",
    "watchdog",
    "watchdog_interval",
]

NOTIFY_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
"""Every variable of the protocol: what ``sd_notify(unset_environment=1)``
and ``sd_watchdog_enabled(unset_environment=1)`` remove."""

NOTIFY_MESSAGE_MAX = 4096
"""systemd's ``NOTIFY_BUFFER_MAX`` (``PIPE_BUF``): a longer datagram is dropped."""

_KEY = re.compile(r"[A-Z0-9_]+")
# systemd splits a message on NEWLINE ("\n\r") and drops it whole on a NUL.
_LINE_BREAKS = re.compile(r"[\n\r]")
_FORBIDDEN_IN_VALUE = re.compile(r"[\n\r\0]")
_ELLIPSIS = "\N{HORIZONTAL ELLIPSIS}"
_INT_MAX = 2**31 - 1  # pid_t on Linux
_UINT64_MAX = 2**64 - 1
# USEC_INFINITY: libsystemd's timestamp_is_set() refuses it for WATCHDOG_USEC.
_USEC_INFINITY = _UINT64_MAX


# --- building messages ------------------------------------------------------


def format_message(fields: Mapping[str, str]) -> bytes:
    """One datagram carrying `fields` in their order, ``KEY=VALUE`` per line.

    Error handling: raises `ValueError` when `fields` is empty, a key is not
    ``[A-Z0-9_]+``, a value contains a newline, carriage return or NUL or
    cannot be encoded as UTF-8 (a lone surrogate), or the message is longer
    than `NOTIFY_MESSAGE_MAX` bytes.  Each of these would make the receiver
    misread or drop the message; the caller's bug should show instead.
    """
    if not fields:
        raise ValueError("a notify message needs at least one field")
    lines: list[bytes] = []
    for key, value in fields.items():
        if not _KEY.fullmatch(key):
            raise ValueError(
                f"notify key {show_value(key)}: expected upper-case ASCII letters, digits and '_'"
            )
        bad = _FORBIDDEN_IN_VALUE.search(value)
        if bad is not None:
            raise ValueError(
                f"notify field {key}={show_value(value)}: contains {bad.group()!r} at position "
                f"{bad.start()}; a value cannot contain a newline, carriage return or NUL"
            )
        try:
            encoded = value.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ValueError(
                f"notify field {key}={show_value(value)}: cannot be encoded as UTF-8 ({error.reason} "
                f"at position {error.start})"
            ) from None
        lines.append(key.encode("ascii") + b"=" + encoded)
    message = b"\n".join(lines)
    if len(message) > NOTIFY_MESSAGE_MAX:
        raise ValueError(
            f"notify message is {len(message)} bytes long; the receiver drops messages "
            f"longer than {NOTIFY_MESSAGE_MAX} bytes"
        )
    return message


def _status_value(text: str, *, room: int) -> str:
    """`text` made safe as a ``STATUS=`` value of at most `room` UTF-8 bytes."""
    text = _FORBIDDEN_IN_VALUE.sub(" ", text)
    # "replace" turns what UTF-8 cannot encode (lone surrogates) into "?".
    encoded = text.encode("utf-8", errors="replace")
    if len(encoded) > room:
        cut = room - len(_ELLIPSIS.encode("utf-8"))
        # "ignore" drops a character split by the cut.
        return encoded[:cut].decode("utf-8", errors="ignore") + _ELLIPSIS
    return encoded.decode("utf-8")


def _with_status(fields: dict[str, str], text: str) -> bytes:
    """`fields` plus ``STATUS=`` `text`, the text made to fit (never fails)."""
    head = len(format_message(fields)) + 1 if fields else 0  # +1: the "\n" before STATUS
    room = NOTIFY_MESSAGE_MAX - head - len(b"STATUS=")
    return format_message({**fields, "STATUS": _status_value(text, room=room)})


def ready(status: str | None = None) -> bytes:
    """``READY=1``: start-up is finished (or a reload is, after `reloading`).

    With `status`, a ``STATUS=`` line follows, made safe as by `status`.
    """
    if status is None:
        return format_message({"READY": "1"})
    return _with_status({"READY": "1"}, status)


def reloading(monotonic_usec: int) -> bytes:
    """``RELOADING=1`` with ``MONOTONIC_USEC``: a reload has begun.

    `monotonic_usec` is ``CLOCK_MONOTONIC`` in microseconds (in Python,
    ``time.monotonic_ns() // 1000``), which systemd compares with the time
    it asked for the reload.  ``Type=notify-reload`` (systemd 253+) requires
    it; send `ready` when the reload is done.

    Error handling: `ValueError` when `monotonic_usec` is not 0 to 2**64-1.
    """
    if not 0 <= monotonic_usec <= _UINT64_MAX:
        raise ValueError(f"MONOTONIC_USEC={monotonic_usec}: expected 0 to {_UINT64_MAX}")
    return format_message({"RELOADING": "1", "MONOTONIC_USEC": str(monotonic_usec)})


def stopping() -> bytes:
    """``STOPPING=1``: shutdown has begun."""
    return format_message({"STOPPING": "1"})


def status(text: str) -> bytes:
    """``STATUS=`` `text`, a one-line free-form status for ``systemctl status``.

    Never fails: newlines, carriage returns and NULs become spaces, what UTF-8
    cannot encode becomes ``"?"``, and a text too long for one message is cut
    to fit and ends with ``"…"`` (see the module docstring for why).
    """
    return _with_status({}, text)


def mainpid(pid: int, *, ready: bool = False) -> bytes:
    """``MAINPID=`` `pid`: the service's main process is `pid`.

    With `ready`, ``READY=1`` follows in the same datagram: a process that
    hands its service over to `pid` ends the reload with it, and one datagram
    means the manager never sees the reload end under the old main PID.

    Error handling: `ValueError` when `pid` is not 1 to 2**31-1.
    """
    if not 1 <= pid <= _INT_MAX:
        raise ValueError(f"MAINPID={pid}: expected a process id from 1 to {_INT_MAX}")
    fields = {"MAINPID": str(pid)}
    if ready:
        fields["READY"] = "1"
    return format_message(fields)


def watchdog() -> bytes:
    """``WATCHDOG=1``: the keep-alive ping, due at least every ``WATCHDOG_USEC``."""
    return format_message({"WATCHDOG": "1"})


def extend_timeout(usec: int) -> bytes:
    """``EXTEND_TIMEOUT_USEC=`` `usec`: the current start, stop or runtime
    timeout is extended to `usec` microseconds from now.

    Error handling: `ValueError` when `usec` is not 0 to 2**64-1.
    """
    if not 0 <= usec <= _UINT64_MAX:
        raise ValueError(f"EXTEND_TIMEOUT_USEC={usec}: expected 0 to {_UINT64_MAX}")
    return format_message({"EXTEND_TIMEOUT_USEC": str(usec)})


FD_STORE_MAX_PER_MESSAGE = 253
"""The kernel's ``SCM_MAX_FD``: at most this many fds ride one datagram."""


def _fd_name(name: str) -> str:
    # systemd's fdname_is_valid(): an invalid FDNAME= is ignored with a warning
    # and the fds are stored as "stored", which no manifest name would find again.
    problem = "is empty" if name == "" else fd_name_problem(name)
    if problem is not None:
        raise ValueError(f"FDNAME={show_value(name)}: the fd name {problem}")
    return name


def fd_store(name: str) -> bytes:
    """``FDSTORE=1`` with ``FDNAME=`` `name`: keep the fds sent with it in the fd store.

    The fds go in the same datagram as ``SCM_RIGHTS`` ancillary data (at most
    `FD_STORE_MAX_PER_MESSAGE`); the manager keeps its own copies, which come
    back at the service's next start in ``LISTEN_FDS``, named `name` in
    ``LISTEN_FDNAMES``.  The unit must set ``FileDescriptorStoreMax=`` above 0,
    or the manager closes them (and logs a warning).

    Error handling: `ValueError` when `name` is empty, longer than 255
    characters, or holds a ``:`` or a character that is not printable ASCII.
    """
    return format_message({"FDSTORE": "1", "FDNAME": _fd_name(name)})


def fd_store_remove(name: str) -> bytes:
    """``FDSTOREREMOVE=1`` with ``FDNAME=`` `name`: the manager closes every stored fd of that name.

    Error handling: as `fd_store`.
    """
    return format_message({"FDSTOREREMOVE": "1", "FDNAME": _fd_name(name)})


# --- reading messages -------------------------------------------------------


def parse_notify_message(data: bytes) -> dict[str, str]:
    """The fields of a received datagram, read as systemd reads them.

    Lines split on ``\\n`` and ``\\r``; empty lines and lines without ``=``
    are ignored (systemd looks fields up by their ``KEY=`` prefix, so such a
    line never matches anything); when a key repeats, the first value wins
    (as systemd's ``strv_find_startswith``).  Bytes that are not UTF-8 are
    decoded as U+FFFD, so one bad ``STATUS=`` does not lose a ``READY=1`` next
    to it.  One trailing NUL byte is allowed, as systemd allows it.

    Error handling: raises `ValueError` where systemd drops the whole
    datagram: it is longer than `NOTIFY_MESSAGE_MAX` bytes, or contains a NUL
    byte before its last byte.
    """
    if len(data) > NOTIFY_MESSAGE_MAX:
        raise ValueError(
            f"notify message is {len(data)} bytes long; at most {NOTIFY_MESSAGE_MAX} bytes are read"
        )
    if data.endswith(b"\0"):
        data = data[:-1]
    nul = data.find(b"\0")
    if nul != -1:
        raise ValueError(f"notify message contains a NUL byte at position {nul}")
    fields: dict[str, str] = {}
    for line in _LINE_BREAKS.split(data.decode("utf-8", errors="replace")):
        key, sep, value = line.partition("=")
        if sep:
            fields.setdefault(key, value)
    return fields


_UCRED = struct.Struct("3i")


def sender_pid(ancillary: list[tuple[int, int, bytes]]) -> int | None:
    """The sender's PID in a datagram's ancillary data (``SCM_CREDENTIALS``), or None.

    A receiver with ``SO_PASSCRED`` gets the sender's credentials from the
    kernel with every datagram, so it knows who sent it without trusting the
    message.
    """
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(data) >= _UCRED.size:
            pid, _uid, _gid = _UCRED.unpack(data[: _UCRED.size])
            return int(pid)
    return None


def credentials_space() -> int:
    """The ancillary buffer size `sender_pid` needs (for ``recvmsg``)."""
    return socket.CMSG_SPACE(_UCRED.size)


# --- the environment --------------------------------------------------------


def parse_notify_socket(value: str) -> str | bytes:
    """The sockaddr to send to for a ``NOTIFY_SOCKET`` `value`.

    An absolute path is returned as it is (a `str`, as `socket.socket.sendto`
    takes it); ``@name`` becomes ``b"\\0name"``, an abstract address, the name
    encoded as the file system encoding encodes it (`os.fsencode`, which
    gives back the bytes of an undecodable environment value).

    Error handling: raises `ValueError`, naming the variable and the value,
    for an empty value, a relative path, a lone ``"/"`` or ``"@"``, a NUL, a
    name longer than 107 bytes, and the ``vsock:`` forms.
    """
    shown = f"NOTIFY_SOCKET={show_value(value)}"
    expected = 'expected an absolute path or "@name" (abstract namespace)'
    if value.startswith("/"):
        name = value
    elif value.startswith("@"):
        name = value[1:]
    elif value.startswith("vsock"):
        raise ValueError(f"{shown}: AF_VSOCK addresses are not supported; {expected}")
    elif value == "":
        raise ValueError(f"{shown}: the value is empty; {expected}")
    else:
        raise ValueError(f"{shown}: {expected}")
    if value in ("/", "@"):
        raise ValueError(f"{shown}: {expected}; {value!r} alone names no socket")
    if "\0" in name:
        raise ValueError(f"{shown}: contains a NUL character")
    encoded = os.fsencode(name)
    if len(encoded) > UNIX_PATH_MAX:
        raise ValueError(
            f"{shown}: the name is {len(encoded)} bytes long; a unix socket address "
            f"holds at most {UNIX_PATH_MAX}"
        )
    return b"\0" + encoded if value.startswith("@") else value


def format_notify_socket(address: str | bytes) -> str:
    """The ``NOTIFY_SOCKET`` value for a sockaddr, the inverse of `parse_notify_socket`.

    ``b"\\0name"`` becomes ``"@name"`` and a path stays a path, decoded as
    `os.fsdecode` decodes it, so the bytes of an undecodable name come back
    from `parse_notify_socket` unchanged.  For messages, and for passing the
    manager's address on to another process in a variable.
    """
    if isinstance(address, bytes):
        if address.startswith(b"\0"):
            return "@" + os.fsdecode(address[1:])
        return os.fsdecode(address)
    return address


def watchdog_interval(environ: Mapping[str, str], *, pid: int) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings for the process `pid`, or None.

    The interval is half of ``WATCHDOG_USEC``.  None when ``WATCHDOG_USEC``
    is absent, or ``WATCHDOG_PID`` names another process.  `environ` is not
    changed.

    Error handling: raises `ValueError` naming the variable and its value
    when ``WATCHDOG_PID`` is not a process id (1 to 2**31-1) or, for this
    process, ``WATCHDOG_USEC`` is not a positive decimal integer below
    2**64-1 (``USEC_INFINITY``).  See the module docstring for why this
    raises instead of returning None.
    """
    usec_value = environ.get("WATCHDOG_USEC")
    if usec_value is None:
        return None
    pid_value = environ.get("WATCHDOG_PID")
    if pid_value is not None:
        watchdog_pid = parse_decimal(
            "WATCHDOG_PID",
            pid_value,
            lowest=1,
            highest=_INT_MAX,
            expected=f"a process id, a decimal integer from 1 to {_INT_MAX}",
        )
        if watchdog_pid != pid:
            return None
    usec = parse_decimal(
        "WATCHDOG_USEC",
        usec_value,
        lowest=1,
        highest=_USEC_INFINITY - 1,
        expected="a positive decimal integer of microseconds",
    )
    return usec / 2_000_000
