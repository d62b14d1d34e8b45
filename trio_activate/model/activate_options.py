"""What ``trio-activate activate`` is asked to do: its options, checked, as one value.

Layer 1: pure.  No syscalls, no trio; the command line's raw values come in
as arguments and either an `ActivateOptions` comes out or an
`ActivationError` with one line naming the option, its value and what was
expected.

The options follow ``systemd-socket-activate``'s where it has them (``-l``,
``--datagram``, ``--seqpacket``, ``--fdname``, ``-E``, ``--accept``,
``--inetd``) and add what it lacks: ``--backlog``, ``--now``,
``--max-connections``, ``--restart`` with ``--watch``, and ``--from`` to
take the sockets from a manifest.  Where it is silent about a mistake (a
count of ``--fdname`` names that matches no count of sockets is a warning
there), this is an error: the program started would otherwise adopt
sockets under names nobody meant.

The modes, exactly one of:

- lazy (the default): wait for the first connection or datagram, then exec
  COMMAND in place with the sockets at fds 3.. (as systemd-socket-activate);
- ``--now``: exec in place at once;
- ``--accept``: accept each connection, one COMMAND per connection, the
  connection at fd 3 (``--inetd``: on stdin and stdout; it implies
  ``--accept``);
- ``--restart``: COMMAND runs as a child over the sockets, started again
  when it exits or a ``--watch`` path changes (lazily, unless ``--now``).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence

from ..errors import ActivationError
from .address import Address, parse_address
from .listen_env import LISTEN_VARIABLES, fd_name_problem
from .manifest import DEFAULT_BACKLOG, SocketSpec, SocketType
from .records import record

__all__ = [
    "UNNAMED",
    "ActivateMode",
    "ActivateOptions",
    "activate_options",
    "child_environment",
    "listen_specs",
]

# The name a reader gives an fd when LISTEN_FDNAMES is not set.
UNNAMED = "unknown"
# What a child must not inherit from the activator's caller: the caller's own
# sockets' variables (stale for the child) and its service manager's notify socket
# (the child is not the manager's main process).
STALE_VARIABLES = (*LISTEN_VARIABLES, "NOTIFY_SOCKET")
DEFAULT_GRACE_PERIOD = 5.0


class ActivateMode(enum.Enum):
    LAZY = "lazy"  # exec in place on the first connection or datagram
    NOW = "now"  # exec in place at once
    ACCEPT = "accept"  # one child per connection
    RESTART = "restart"  # one child at a time over the sockets, started again


@record
class ActivateOptions:
    command: tuple[str, ...]
    mode: ActivateMode
    # One per -l address, in order, each named with its fd name (UNNAMED when
    # --fdname was not given); empty with --from.
    sockets: tuple[SocketSpec, ...] = ()
    # Whether LISTEN_FDNAMES is set: with --fdname or --from.  Without either
    # it is left out, as systemd-socket-activate does (a reader then names
    # every fd "unknown").
    names_given: bool = False
    manifest: str | None = None
    inetd: bool = False
    max_connections: int | None = None
    # --restart: start lazily (False) or at once (True), the first time and after each exit.
    restart_now: bool = False
    watch: tuple[str, ...] = ()
    # -E: (NAME, VALUE), or (NAME, None) to keep the caller's value of NAME.
    setenv: tuple[tuple[str, str | None], ...] = ()
    grace_period: float = DEFAULT_GRACE_PERIOD


def activate_options(
    *,
    command: Sequence[str],
    listen: Sequence[str] = (),
    datagram: bool = False,
    seqpacket: bool = False,
    fdnames: Sequence[str] = (),
    backlog: int | None = None,
    setenv: Sequence[str] = (),
    manifest: str | None = None,
    now: bool = False,
    accept: bool = False,
    inetd: bool = False,
    max_connections: int | None = None,
    restart: bool = False,
    watch: Sequence[str] = (),
    grace_period: float = DEFAULT_GRACE_PERIOD,
) -> ActivateOptions:
    """Check the command line's values against each other; the options, or an `ActivationError`.

    ``fdnames`` are the ``--fdname`` values as given (each may hold several
    names joined by ``:``).  Numbers arrive already checked to be positive.
    """
    if not command:
        raise ActivationError(
            "activate: no COMMAND given: trio-activate activate [OPTIONS] -- COMMAND [ARGS...]"
        )
    if datagram and seqpacket:
        raise ActivationError("activate: --datagram and --seqpacket: a socket has one type; give one of them")
    accept = accept or inetd
    mode = _mode(accept=accept, restart=restart, now=now)
    if max_connections is not None and mode is not ActivateMode.ACCEPT:
        raise ActivationError("activate: --max-connections bounds the children of --accept; add --accept")
    if watch and mode is not ActivateMode.RESTART:
        raise ActivationError("activate: --watch restarts the command on a change; add --restart")
    if manifest is not None:
        given = [
            option
            for option, value in (
                ("-l", listen),
                ("--datagram", datagram),
                ("--seqpacket", seqpacket),
                ("--fdname", fdnames),
                ("--backlog", backlog is not None),
            )
            if value
        ]
        if given:
            raise ActivationError(
                f"activate: --from {manifest} takes the sockets, their options and names from the "
                f"manifest; {given[0]} cannot be combined with it"
            )
    elif not listen:
        raise ActivationError("activate: no socket to pass: give -l ADDRESS (repeatable) or --from MANIFEST")
    kind = SocketType.DATAGRAM if datagram else SocketType.SEQPACKET if seqpacket else SocketType.STREAM
    if kind is SocketType.DATAGRAM and mode is ActivateMode.ACCEPT:
        raise ActivationError(
            "activate: --datagram with --accept: datagram sockets have no connections to accept"
        )
    if inetd and len(listen) > 1:
        raise ActivationError(
            f"activate: --inetd passes one connection on stdin and stdout; it takes one -l, not {len(listen)}"
        )
    names = _fd_names(fdnames, len(listen))
    sockets = listen_specs([_address(text) for text in listen], names, kind, backlog or DEFAULT_BACKLOG)
    return ActivateOptions(
        command=tuple(command),
        mode=mode,
        sockets=sockets,
        names_given=bool(fdnames) or manifest is not None,
        manifest=manifest,
        inetd=inetd,
        max_connections=max_connections,
        restart_now=now and mode is ActivateMode.RESTART,
        watch=tuple(watch),
        setenv=tuple(_setenv(item) for item in setenv),
        grace_period=grace_period,
    )


def _mode(*, accept: bool, restart: bool, now: bool) -> ActivateMode:
    if accept and restart:
        raise ActivationError(
            "activate: --accept and --restart: --accept starts a command per connection, --restart "
            "one command over the sockets; give one of them"
        )
    if accept:
        if now:
            raise ActivationError("activate: --now with --accept: each command starts with its connection")
        return ActivateMode.ACCEPT
    if restart:
        return ActivateMode.RESTART
    return ActivateMode.NOW if now else ActivateMode.LAZY


def _address(text: str) -> Address:
    try:
        return parse_address(text)
    except ValueError as exc:
        raise ActivationError(f"activate: -l {exc}") from None


def _fd_names(fdnames: Sequence[str], count: int) -> tuple[str, ...]:
    """One name per socket: as given, the one name given for all (as systemd-socket-activate), or UNNAMED."""
    names = [name for value in fdnames for name in value.split(":")]
    for name in names:
        problem = fd_name_problem(name)
        if problem is not None:
            raise ActivationError(f"activate: --fdname {name!r}: the name {problem}")
    if not names:
        return (UNNAMED,) * count
    if len(names) == 1:
        return (names[0],) * count
    if len(names) != count:
        raise ActivationError(
            f"activate: --fdname gives {len(names)} names for {count} socket(s) (-l): "
            "give one name for all, or one per -l, in order"
        )
    return tuple(names)


def _setenv(item: str) -> tuple[str, str | None]:
    name, sep, value = item.partition("=")
    if not name or "\0" in item:
        raise ActivationError(
            f"activate: -E {item!r}: expected NAME=VALUE, or NAME to pass the caller's value"
        )
    if name in STALE_VARIABLES and name != "NOTIFY_SOCKET":
        raise ActivationError(f"activate: -E {name}: the activator sets {name} itself")
    return name, value if sep else None


def listen_specs(
    addresses: Sequence[Address], names: Sequence[str], kind: SocketType, backlog: int
) -> tuple[SocketSpec, ...]:
    """One socket spec per ``-l`` address, named by its fd name, with the manifest's defaults otherwise."""
    return tuple(
        SocketSpec(name=name, listen=(address,), type=kind, backlog=backlog)
        for address, name in zip(addresses, names, strict=True)
    )


def child_environment(environ: Mapping[str, str], setenv: Sequence[tuple[str, str | None]]) -> dict[str, str]:
    """The command's environment but ``LISTEN_*``: the caller's without `STALE_VARIABLES`, plus ``-E``.

    ``-E NAME`` keeps the caller's value of NAME (so ``-E NOTIFY_SOCKET`` passes
    the manager's notify socket on); a NAME the caller does not have is left out.
    """
    env = {key: value for key, value in environ.items() if key not in STALE_VARIABLES}
    for name, value in setenv:
        if value is not None:
            env[name] = value
        elif name in environ:
            env[name] = environ[name]
    return env
