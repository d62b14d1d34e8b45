"""The fast start: hold shutdown signals, and fork the activator while this process re-execs.

Layer 2: syscalls, no trio.  The console script's first code
(`trio_activate.cli.entry`) calls this before it imports anything more.

Held signals: a SIGTERM or SIGINT that reaches a starting service must end
in an orderly exit, not in death by signal.  The runtime unblocks them once
its handlers are installed; everything before that point runs with them
blocked, so the entry blocks them before importing anything more (the
package's ``__init__`` is already imported and holds only the error
classes).  Only for the commands that serve: ``check`` or ``fds`` keep the
default behaviour.  The interpreter's own start-up (about 20 ms) remains a
window no code in the process can close.

The fast start: ``serve`` or ``dev`` with nothing passed self-activates by
re-exec.  Done in order (read the manifest, create the sockets, exec, then
import trio) the service's start-up pays for reading the manifest twice and
for two interpreters end to end.  So this process forks first: the child is
the activator (it reads the manifest and creates the sockets), while this
process execs at once and imports trio meanwhile, on another core.  The
re-exec'd process then takes the sockets and the manifest's document over a
private channel (``activator_channel``, called from the CLI), settles its
own ``LISTEN_*`` from them, and adopts them by exactly the path it takes
under systemd.  Errors (a bad manifest, a busy port) are reported by the
re-exec'd process, as one line, as before.  What the forked child runs is
the caller's (the CLI parses the command line): this layer never calls up.

This module imports only ``os``, ``sys``, the C modules ``_signal`` and
``_socket``, and the private variables' names (a test holds it to that):
anything more here is start-up time for every serve.
"""

from __future__ import annotations

# The C module under `signal`: `signal` builds its enums on import, and with them
# imports `enum`, a few ms that nothing else here needs.
import _signal  # type: ignore[import-not-found]  # no stub: typeshed covers `signal` only
import os
import sys

from ..model.private_env import ACTIVATOR_CHANNEL_VARIABLE, ACTIVATOR_MARKER, WORKER_FDS_VARIABLE

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

SERVING_COMMANDS = frozenset({"serve", "dev"})
# Held pending until the runtime (or supervisor) installs its handlers and unblocks them;
# blocked masks survive execv, so the self-activation re-exec is covered too.
SHUTDOWN_AND_RELOAD_SIGNALS = frozenset({_signal.SIGTERM, _signal.SIGINT, _signal.SIGHUP})
# Any of these says sockets were, or are being, passed to this process: it must
# adopt or fail as the CLI decides, never self-activate on the fast path.
PASSING_VARIABLES = (
    "LISTEN_PID",
    "LISTEN_FDS",
    ACTIVATOR_MARKER,
    ACTIVATOR_CHANNEL_VARIABLE,
    WORKER_FDS_VARIABLE,
)
# The options the CLI's parser takes before the command, each with a value.
_OPTIONS_WITH_VALUE = ("--log-level", "--log-format")
_OPTIONS_WITH_EQUALS = tuple(f"{option}=" for option in _OPTIONS_WITH_VALUE)
# ``--takeover`` and every abbreviation the CLI's parser accepts (no other option of serve begins so).
_TAKEOVER_PREFIX = "--t"
# The forked activator's exit status when it failed in a way it could not report.
ACTIVATOR_CRASHED = 70  # EX_SOFTWARE


def hold_shutdown_signals() -> None:
    """Block SIGTERM, SIGINT and SIGHUP: they wait until the service can handle them."""
    _signal.pthread_sigmask(_signal.SIG_BLOCK, SHUTDOWN_AND_RELOAD_SIGNALS)


def reexec_argv() -> list[str]:
    """The command line this process was started with, to run again in place.

    ``sys.orig_argv`` keeps the interpreter's own options (``-X``, ``-m``),
    which ``sys.argv`` loses.
    """
    return [sys.executable, *sys.orig_argv[1:]]


def serving_command(args: Sequence[str]) -> str | None:
    """``serve`` or ``dev`` when ``args`` certainly run that command, else None.

    Reads the command line the way the CLI's parser does for the options
    that may come before the command (``--log-level`` and ``--log-format``,
    each with its value); what comes after the command is the forked
    activator's to parse, and the re-exec'd service's.  Anything else before
    it, an abbreviation included, gives None: the fast start is skipped and
    the ordinary path, which parses properly, runs instead.
    """
    index = 0
    while index < len(args):
        arg = args[index]
        if arg in _OPTIONS_WITH_VALUE:
            index += 2
        elif arg.startswith(_OPTIONS_WITH_EQUALS):
            index += 1
        elif arg.startswith("-"):
            return None
        else:
            return arg if arg in SERVING_COMMANDS else None
    return None


def fast_start_applies(args: Sequence[str], environ: Mapping[str, str]) -> bool:
    """True when this process serves, nothing was passed to it, it makes its sockets, and it may fork."""
    if serving_command(args) is None:
        return False
    if any(name in environ for name in PASSING_VARIABLES):
        return False
    if any(arg.startswith(_TAKEOVER_PREFIX) for arg in args):
        # ``serve --takeover``: the sockets come from a running service, which holds their addresses.
        return False
    return _single_threaded()


def _single_threaded() -> bool:
    """Whether this process has one thread, so that ``os.fork()`` is safe to run Python after.

    Nothing in the console script starts threads, but a ``sitecustomize`` or a
    ``.pth`` file could have; when unsure, say no (the ordinary path runs).
    """
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return False


def fork_activator_and_reexec(run_activator: Callable[[int], int]) -> None:
    """Fork the activator, then exec this command line again at once.  Never returns.

    The child gets one end of a unix seqpacket pair, calls ``run_activator``
    with it (the CLI's ``run_forked_activator``) and exits with the status it
    returns, without returning here.  This
    process gives the other end to its exec'd self, with the child's PID, in
    ``TRIO_ACTIVATE_ACTIVATOR_CHANNEL``.  If the exec fails, the channel
    closes with this process, which tells the child to remove what it made.
    """
    import _socket  # the socket module's enums and selectors cost several ms here

    own_end, child_end = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
    child = os.fork()
    if child == 0:
        own_end.close()
        status = ACTIVATOR_CRASHED
        try:
            status = run_activator(child_end.detach())
        finally:
            os._exit(status)  # never back into the console script: the exec'd parent serves
    child_end.close()
    channel = own_end.detach()
    os.set_inheritable(channel, True)
    os.environ[ACTIVATOR_CHANNEL_VARIABLE] = f"{channel}:{child}"
    argv = reexec_argv()
    try:
        os.execv(argv[0], argv)
    except OSError as exc:
        print(f"trio-activate: cannot re-exec {argv[0]}: {exc.strerror or exc}", file=sys.stderr)
        os.close(channel)
        os.waitpid(child, 0)
        raise SystemExit(2) from None
