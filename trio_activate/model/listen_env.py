"""Reading and writing the systemd ``LISTEN_*`` socket-passing protocol.

What this module owns
---------------------
The meaning of the four variables ``LISTEN_PID``, ``LISTEN_PIDFDID``,
``LISTEN_FDS`` and ``LISTEN_FDNAMES``: turning a mapping of them into "this
process was handed fds 3, 4, ... with these names" (`ListenFds`), "these
variables are not meant for this process" (`NotActivated`), or a
`~trio_activate.errors.ListenEnvError`; and the reverse, the variables an
activator sets (`format_listen_env`).

Layer 1: pure logic.  Nothing here makes a syscall, asks for the process id,
imports trio or looks at ``os.environ`` on its own.  Everything read comes in
as an argument (``environ``, ``pid``, ``pidfd_id``), so the callers in layer 2
decide where those come from and the tests drive the rules directly.

Resource handling: no fd is opened, inspected or closed here.  A `ListenFds`
only names fd *numbers*; the adoption layer takes ownership of them (sets
``FD_CLOEXEC``, checks they are open sockets, wraps them).

Theory of operation
-------------------
The rules follow libsystemd's ``sd_listen_fds_with_names()``, in its order,
because a service must agree with every other reader of the same variables
about whether it was activated:

1. ``LISTEN_PID``.  Absent: not activated.  Present, it must be a valid PID
   (a decimal integer from 1 to 2**31-1, the range of ``pid_t``), else error.
   A valid PID that is not ours means the variables were inherited from an
   ancestor and are meant for someone else: not activated, not an error.
2. ``LISTEN_PIDFDID`` (set by systemd v259 and later).  Absent: no check.
   Present, it must be an unsigned 64-bit decimal integer, else error.  If the
   caller knows our own pidfd id (the inode number of a pidfd for ourselves,
   on pidfs) and the two differ, the variables are for an earlier process that
   had our PID: not activated.  If the caller does not know our pidfd id
   (``pidfd_id=None``: old kernel, 32-bit), the check is skipped silently,
   exactly as libsystemd does.
3. ``LISTEN_FDS``.  Absent: not activated.  Present, it must be a positive
   decimal integer ``n``, else error.  The fds are ``3 .. 3+n-1``
   (`SD_LISTEN_FDS_START`).  libsystemd only requires ``3 + n`` to fit a C
   ``int``; we also require the fds to stay below 2**20, Linux's default
   ``fs.nr_open`` that no fd number can reach, so a garbage count such as
   2000000000 is an error rather than a tuple of two billion fd numbers.
4. ``LISTEN_FDNAMES``.  Absent: every fd is named ``"unknown"``.  Present, it
   is split on ``:`` without merging empty fields, so ``"a::b"`` is three names
   with ``""`` in the middle, and the count must equal ``n``.  The names are
   taken as they are, like libsystemd does: a tab, a control character, DEL,
   non-ASCII text or more than 255 characters in a passed name is not an
   error here.  Empty names and duplicate names are valid.  What a name may
   be is judged where it is declared (`fd_name_problem`, for the manifest's
   socket names and for what `format_listen_env` sends); a passed name the
   manifest does not declare is merely unclaimed (`trio_activate.model.match`).
   Refusing it here would fail a service over an fd it never asked for.

Malformed values are only reported once the earlier steps have decided the
variables are for us: garbage in ``LISTEN_FDS`` next to someone else's
``LISTEN_PID`` is not our business.

Numbers are stricter than in libsystemd, which also takes leading whitespace,
a ``+``, ``0x``/``0o``/``0b`` prefixes, and reads a leading ``0`` as octal.  No
manager sends any of those, so guessing would only hide a bug in whatever set
the variable: here a number is one or more ASCII digits with no leading zero
(``"0"`` itself is the value zero, which is then out of range for a PID or a
count).

Every error is one line naming the variable, its value (``repr``, shortened
to 80 characters), and what was expected.  `take_listen_env` removes the four
variables on every path (activated, not for us, error) so no child inherits
them, as ``sd_listen_fds(unset_environment=1)`` does.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence

from ..errors import ListenEnvError
from .records import record
from .text import parse_decimal, show_value

__all__ = [
    "CONNECTION_NAME",
    "LISTEN_VARIABLES",
    "SD_LISTEN_FDS_START",
    "SPECIAL_NAMES",
    "STORED_NAME",
    "UNKNOWN_NAME",
    "ListenFds",
    "NotActivated",
    "fd_name_problem",
    "format_listen_env",
    "read_listen_env",
    "take_listen_env",
    "unset_listen_env",
]

SD_LISTEN_FDS_START = 3
"""The first passed fd; the others follow without gaps."""

LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_PIDFDID", "LISTEN_FDS", "LISTEN_FDNAMES")
"""Every variable of the protocol, the set `unset_listen_env` removes."""

UNKNOWN_NAME = "unknown"
"""The name of every fd when ``LISTEN_FDNAMES`` is absent."""

STORED_NAME = "stored"
"""An fd from systemd's fd store that was stored without ``FDNAME=``."""

CONNECTION_NAME = "connection"
"""One accepted connection of an ``Accept=yes`` socket unit."""

SPECIAL_NAMES = (UNKNOWN_NAME, STORED_NAME, CONNECTION_NAME)
"""Names that systemd gives on its own, not chosen by the unit's author."""

_FD_NAME_MAX = 255
_INT_MAX = 2**31 - 1  # C int, and pid_t on Linux
_UINT64_MAX = 2**64 - 1
# libsystemd only requires that 3 + n fits a C int.  We are stricter, because
# a ListenFds holds a tuple of every fd number and name: LISTEN_FDS=2000000000
# would allocate tens of gigabytes before any fd is looked at.  A process can
# never hold an fd at or above fs.nr_open, whose Linux default is 2**20
# (1048576), so the fds 3 .. 3+n-1 must stay below that.  This also implies
# the INT_MAX rule.  (A system that raised fs.nr_open AND passes more than a
# million sockets is not a case worth a 16 GB tuple.)
_FD_NUMBER_LIMIT = 2**20
_MAX_FDS = _FD_NUMBER_LIMIT - SD_LISTEN_FDS_START


@record
class ListenFds:
    """This process was activated: it was handed `fds`, named by `names`.

    ``fds[i]`` is named ``names[i]``.  `names_given` is False when
    ``LISTEN_FDNAMES`` was absent and every name is ``"unknown"``.
    `pidfd_checked` is True when ``LISTEN_PIDFDID`` was present and compared
    with this process's own pidfd id (False: absent, or our id was unknown).
    """

    fds: tuple[int, ...]
    names: tuple[str, ...]
    names_given: bool
    pidfd_checked: bool


@record
class NotActivated:
    """The variables are absent or meant for another process.

    `reason` is a sentence for logs, e.g. ``"LISTEN_PID is not set"``.
    """

    reason: str


def _parse_decimal(
    variable: str,
    value: str,
    *,
    lowest: int,
    highest: int,
    expected: str,
    why_highest: str = "",
) -> int:
    """`~trio_activate.model.text.parse_decimal`, its error a `ListenEnvError`."""
    try:
        return parse_decimal(
            variable, value, lowest=lowest, highest=highest, expected=expected, why_highest=why_highest
        )
    except ValueError as exc:
        raise ListenEnvError(str(exc)) from None


def fd_name_problem(name: str) -> str | None:
    """Say why `name` cannot be declared as an fd name, or return None if it can.

    Used for the names a manifest declares and an activator sends, not for
    the names read from ``LISTEN_FDNAMES`` (taken as passed, as libsystemd
    does).  A valid name is at most 255 printable ASCII characters (0x20 to 0x7e) and
    contains no ``:``, the separator of ``LISTEN_FDNAMES``.  The empty name
    is valid.  The answer is a phrase to follow the name in a message, e.g.
    ``f"fd name {name!r} {problem}"``.
    """
    if ":" in name:
        return "contains ':'"
    for position, ch in enumerate(name):
        if not " " <= ch <= "~":
            return f"contains a non-printable or non-ASCII character {ch!r} at position {position}"
    if len(name) > _FD_NAME_MAX:
        return f"is longer than {_FD_NAME_MAX} characters ({len(name)})"
    return None


def _read_names(value: str, count: int) -> tuple[str, ...]:
    # Split like libsystemd's strv_split_full(..., ":",
    # EXTRACT_DONT_COALESCE_SEPARATORS): every ':' separates two fields, so
    # "a::b" is three names and "a:" is two.  The empty value "" is ONE empty
    # name there too (extract_first_word returns one "" word before it sees
    # the end), which is what str.split gives: LISTEN_FDS=1 with
    # LISTEN_FDNAMES="" names fd 3 "", and with LISTEN_FDS=2 it is a count
    # mismatch.
    #
    # One deliberate difference: libsystemd's splitter also treats '\' as an
    # escape ("a\:b" is one name "a:b", a trailing '\' is an error).  Managers
    # never escape: systemd joins the names with a plain strv_join(names, ":")
    # and rejects ':' in a name up front.  So a '\' here is a literal
    # character of the name, as the manager meant it.
    #
    # No check of the characters or the length, as in libsystemd: the names
    # are compared with the manifest's, which are checked where declared.
    names = value.split(":")
    if len(names) != count:
        raise ListenEnvError(
            f"LISTEN_FDNAMES={show_value(value)} names {len(names)} fds but LISTEN_FDS={count}"
        )
    return tuple(names)


def read_listen_env(
    environ: Mapping[str, str], *, pid: int, pidfd_id: int | None
) -> ListenFds | NotActivated:
    """Read the ``LISTEN_*`` variables from `environ` for the process `pid`.

    `pidfd_id` is this process's own pidfd id, or None when it cannot be had;
    then a ``LISTEN_PIDFDID`` is parsed but not compared.  `environ` is not
    changed (see `take_listen_env`).

    Error handling: raises `ListenEnvError` when a variable that matters is
    malformed (see the module docstring for the order of the checks).
    Returns `NotActivated` when the variables are absent or for another
    process.
    """
    pid_value = environ.get("LISTEN_PID")
    if pid_value is None:
        return NotActivated("LISTEN_PID is not set")
    listen_pid = _parse_decimal(
        "LISTEN_PID",
        pid_value,
        lowest=1,
        highest=_INT_MAX,
        expected=f"a process id, a decimal integer from 1 to {_INT_MAX}",
    )
    if listen_pid != pid:
        return NotActivated(f"LISTEN_PID={listen_pid} is for another process (this is {pid})")

    pidfd_checked = False
    pidfd_value = environ.get("LISTEN_PIDFDID")
    if pidfd_value is not None:
        listen_pidfd_id = _parse_decimal(
            "LISTEN_PIDFDID",
            pidfd_value,
            lowest=0,
            highest=_UINT64_MAX,
            expected=f"a pidfd id, a decimal integer from 0 to {_UINT64_MAX}",
        )
        if pidfd_id is not None:
            if listen_pidfd_id != pidfd_id:
                return NotActivated(
                    f"LISTEN_PIDFDID={listen_pidfd_id} is for another process (this pidfd id is {pidfd_id})"
                )
            pidfd_checked = True

    fds_value = environ.get("LISTEN_FDS")
    if fds_value is None:
        return NotActivated("LISTEN_FDS is not set")
    count = _parse_decimal(
        "LISTEN_FDS",
        fds_value,
        lowest=1,
        highest=_MAX_FDS,
        expected="a positive decimal integer",
        why_highest=(
            f", the most fds that fit below {_FD_NUMBER_LIMIT}, Linux's default "
            "limit on fd numbers (fs.nr_open)"
        ),
    )
    fds = tuple(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count))

    names_value = environ.get("LISTEN_FDNAMES")
    if names_value is None:
        names: tuple[str, ...] = (UNKNOWN_NAME,) * count
    else:
        names = _read_names(names_value, count)

    return ListenFds(
        fds=fds,
        names=names,
        names_given=names_value is not None,
        pidfd_checked=pidfd_checked,
    )


def unset_listen_env(environ: MutableMapping[str, str]) -> None:
    """Remove the four ``LISTEN_*`` variables from `environ`, where present.

    With ``os.environ`` this also unsets them in the process environment, so
    children started later do not inherit them.
    """
    for variable in LISTEN_VARIABLES:
        environ.pop(variable, None)


def take_listen_env(
    environ: MutableMapping[str, str],
    *,
    pid: int,
    pidfd_id: int | None,
    unset: bool = True,
) -> ListenFds | NotActivated:
    """`read_listen_env`, then (when `unset`) `unset_listen_env`.

    The variables are removed on every path: activated, not for us, and when
    `ListenEnvError` is raised, like ``sd_listen_fds(1)``.  Variables that are
    not for this process are removed too, so they cannot reach a child whose
    PID happens to match.
    """
    try:
        return read_listen_env(environ, pid=pid, pidfd_id=pidfd_id)
    finally:
        if unset:
            unset_listen_env(environ)


def format_listen_env(names: Sequence[str], *, pid: int, pidfd_id: int | None) -> dict[str, str]:
    """The variables an activator sets to pass ``len(names)`` fds to `pid`.

    The fds must sit at ``3 .. 3+len(names)-1`` in `names` order.
    ``LISTEN_PIDFDID`` is included only when `pidfd_id` is not None.

    Error handling: raises `ValueError` when `names` is empty or a name is not
    a valid fd name (see `fd_name_problem`), or when `pid` or `pidfd_id` is
    out of range; `TypeError` when `names` is a single string.
    """
    if isinstance(names, str):
        raise TypeError(f"names must be a sequence of names, not the string {names!r}")
    if len(names) == 0:
        raise ValueError("cannot pass zero fds: LISTEN_FDS must be positive")
    if len(names) > _MAX_FDS:
        raise ValueError(f"cannot pass {len(names)} fds: at most {_MAX_FDS}")
    for index, name in enumerate(names):
        problem = fd_name_problem(name)
        if problem is not None:
            raise ValueError(f"fd name {index} {show_value(name)} {problem}")
    if not 1 <= pid <= _INT_MAX:
        raise ValueError(f"pid {pid} is not a valid process id (1 to {_INT_MAX})")
    if pidfd_id is not None and not 0 <= pidfd_id <= _UINT64_MAX:
        raise ValueError(f"pidfd id {pidfd_id} is not an unsigned 64-bit integer")

    environ = {
        "LISTEN_PID": str(pid),
        "LISTEN_FDS": str(len(names)),
        "LISTEN_FDNAMES": ":".join(names),
    }
    if pidfd_id is not None:
        environ["LISTEN_PIDFDID"] = str(pidfd_id)
    return environ
