"""Starting ``activate``'s COMMAND with its sockets: in place, spawned per connection, or forked.

Layer 2: syscalls, no trio.

Every way ends as systemd ends a service's start: the sockets at fds 3, 4, ...
(placed safe against the shuffle hazard), or one connection on stdin and
stdout (``--inetd``); ``LISTEN_FDS``, ``LISTEN_PID`` and, where the kernel
gives one, ``LISTEN_PIDFDID`` naming the process that execs, and
``LISTEN_FDNAMES`` when names were given; the signal dispositions and mask a
program expects (Python ignores SIGPIPE and SIGXFSZ, and an ignored signal
stays ignored across exec: ``cat`` would then live on after its reader
left); then ``execve``.  The ways:

- `place_for_exec` and `exec_placed` (lazy and ``--now``): this process
  becomes COMMAND, so its own PID and pidfd id are the ones to set;
- `spawn_inetd` and `spawn_connection` (``--accept``): ``posix_spawn``,
  cheap enough for a process per connection (see each for how the child
  is named without Python in it);
- `fork_command` (``--restart``): a fork, and Python in the child, which
  sets its own ``LISTEN_PID`` and ``LISTEN_PIDFDID`` before it execs.

Why Python in a forked child is safe here: it is when the process had one
thread at the fork, as no other thread can have held a lock (the
allocator's, the import lock) that the child would inherit held and wait on
forever.  ``activate`` never starts a thread (its file watcher is a process
of its own for that reason), and `fork_command` checks ``/proc/self/task``
before every fork rather than trust that: a thread that a ``sitecustomize``
started would turn it into an error, not a hang.  The child does only what
the exec needs: reset signals, place fds, build the environment, exec; any
failure is one line on stderr and exit status 127, as a shell's for a
command it cannot run.

Resource handling: the callers own the source fds; `place_for_exec` closes
them once placed (the placed ones are the caller's, for the exec); the
others leave the parent's untouched (the child's copies go with its exec).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
from collections.abc import Mapping, Sequence
from functools import partial
from typing import NoReturn

from ..errors import ActivationError
from ..model.listen_env import SD_LISTEN_FDS_START, format_listen_env
from .activator import place_fds
from .fds import close_all, own_pidfd_id, pidfd_id

__all__ = [
    "command_path",
    "exec_placed",
    "fork_command",
    "listen_environment",
    "place_for_exec",
    "reset_signals_for_exec",
    "spawn_connection",
    "spawn_inetd",
]

# Signals whose disposition a program expects to find at their default: the
# activator handles these, and Python ignores SIGPIPE and SIGXFSZ from its start.
_RESET = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGCHLD,
    signal.SIGPIPE,
    signal.SIGXFSZ,
)
# The status of a child that could not exec, as a shell's for a command it cannot run.
CANNOT_RUN = 127
# `spawn_connection`'s trampoline: the connection is at fd 3, a pipe at fd 4 brings the
# child's pidfd id (a line, empty when the kernel has none); the shell sets LISTEN_PID to
# its own PID, which its exec keeps, closes the pipe and execs the command ("$0" "$@").
_TRAMPOLINE = (
    "read -r LISTEN_PIDFDID <&4 || LISTEN_PIDFDID=; exec 4<&-; LISTEN_PID=$$; export LISTEN_PID; "
    'if [ -n "$LISTEN_PIDFDID" ]; then export LISTEN_PIDFDID; else unset LISTEN_PIDFDID; fi; '
)
_SHELL = "/bin/sh"


def command_path(command: str, environ: Mapping[str, str]) -> str:
    """The file ``command`` runs (searched on the ``PATH`` of ``environ`` when it has no ``/``).

    Checked once, before any socket is made, so a typo is one line and not a
    child that fails at every start.
    """
    path = shutil.which(command, path=environ.get("PATH", os.defpath))
    if path is None:
        where = "is not an executable file" if "/" in command else "was not found on PATH"
        raise ActivationError(f"activate: COMMAND {command!r} {where}")
    return path


def listen_environment(count: int, names: Sequence[str], *, names_given: bool) -> dict[str, str]:
    """``LISTEN_*`` for this process, which is about to exec with ``count`` fds at 3..."""
    env = format_listen_env(list(names[:count]), pid=os.getpid(), pidfd_id=own_pidfd_id())
    if not names_given:
        del env["LISTEN_FDNAMES"]  # as systemd-socket-activate without --fdname
    return env


def reset_signals_for_exec() -> None:
    """Default dispositions for the signals a program expects at default, and none blocked.

    ``trio-activate``'s console script blocks SIGTERM, SIGINT and SIGHUP from
    its first line (for ``serve``), and a blocked mask survives exec: a
    command started with them blocked would never see ``kill`` or Ctrl-C.
    """
    signal.set_wakeup_fd(-1)
    for signum in _RESET:
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())


def place_for_exec(sources: Sequence[int]) -> range:
    """Place ``sources`` at fds 3.. (safe against the shuffle hazard) and close them; the placed numbers.

    The placed fds are the caller's from then on, inheritable: the exec
    passes them.  If placing fails, the sources are left open for the caller.
    """
    placed = range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + len(sources))
    place_fds(sources)
    close_all(partial(os.close, fd) for fd in sources if fd not in placed)
    return placed


def exec_placed(path: str, argv: Sequence[str], environ: Mapping[str, str]) -> NoReturn:
    """Exec in place (same PID), the fds already placed and ``LISTEN_*`` in ``environ``, signals reset.

    Error handling: `ActivationError` when the exec fails; the placed fds
    are left to the caller, who removes the socket files they pin first.
    """
    reset_signals_for_exec()
    try:
        os.execve(path, list(argv), environ)
    except OSError as exc:
        raise ActivationError(f"activate: cannot run {path}: {exc.strerror or exc}") from None


def spawn_inetd(path: str, argv: Sequence[str], connection: int, *, environ: Mapping[str, str]) -> int:
    """Start ``argv`` with ``connection`` on its stdin and stdout, as inetd does; its PID.

    No ``LISTEN_*`` names the child, so nothing needs its PID before it
    execs: ``posix_spawn`` (a vfork and an exec in C, no Python in the child,
    no copy of this process's page tables) does it all, several times
    cheaper than `fork_command`.  Its file actions ``dup2`` the connection
    onto 0 and 1 (clearing close-on-exec there); the signals a program
    expects at default are reset and none is blocked.

    Error handling: `ActivationError` when the spawn or the exec fails.
    """
    try:
        return os.posix_spawn(
            path,
            list(argv),
            environ,
            file_actions=[(os.POSIX_SPAWN_DUP2, connection, 0), (os.POSIX_SPAWN_DUP2, connection, 1)],
            setsigdef=_RESET,
            setsigmask=(),
        )
    except OSError as exc:
        raise ActivationError(f"activate: cannot run {path}: {exc.strerror or exc}") from None


def spawn_connection(path: str, argv: Sequence[str], connection: int, *, environ: Mapping[str, str]) -> int:
    """Start ``argv`` with ``connection`` at fd 3, ``LISTEN_FDS=1``, ``LISTEN_FDNAMES=connection``; its PID.

    ``LISTEN_PID`` and ``LISTEN_PIDFDID`` name the child, which is what a
    Python fork (`fork_command`) can give too, at about twice the cost per
    connection here (the copy of this process's page tables, and the
    child's Python running on copied-on-write pages: 2-3 ms a start).  So,
    per connection, the trampoline of DESIGN.md's way (b): ``posix_spawn``
    (a vfork and an exec, no Python in the child) of ``/bin/sh``, which sets
    ``LISTEN_PID=$$`` and execs the command in its place, the PID kept.  It
    also gets the pidfd id, which that way lacks on its own: this process
    opens a pidfd for the spawned PID (the shell is waiting on the pipe,
    so the PID is that child's), reads its id, and writes it down the pipe;
    the exec keeps the id too.  The command then sees what `fork_command`
    gives it, but for ``argv[0]``, which is the resolved ``path``.  The
    shell adds nothing to the environment: ``PWD``, which dash sets, is
    removed again when the caller's environment had none.

    Error handling: `ActivationError` when the spawn fails.
    """
    env = {**environ, "LISTEN_FDS": "1", "LISTEN_FDNAMES": "connection"}
    script = _TRAMPOLINE + ("" if "PWD" in env else "unset PWD; ") + 'exec "$0" "$@"'
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    # Both above 3 and 4, the targets of the dup2s, so that neither overwrites the other's source.
    sources = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 5) if fd < 5 else fd for fd in (connection, read_end)]
    try:
        try:
            pid = os.posix_spawn(
                _SHELL,
                [_SHELL, "-c", script, path, *argv[1:]],
                env,
                file_actions=[(os.POSIX_SPAWN_DUP2, sources[0], 3), (os.POSIX_SPAWN_DUP2, sources[1], 4)],
                setsigdef=_RESET,
                setsigmask=(),
            )
        except OSError as exc:
            raise ActivationError(f"activate: cannot run {path}: {exc.strerror or exc}") from None
        identity = pidfd_id(pid)
        # BrokenPipeError: the shell died before reading (a SIGKILL); its exit is reaped as any other.
        with contextlib.suppress(BrokenPipeError):
            os.write(write_end, b"%d\n" % identity if identity is not None else b"\n")
    finally:
        close_all(partial(os.close, fd) for fd in {read_end, write_end, *sources} if fd != connection)
    return pid


def _single_threaded() -> bool:
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return False


def fork_command(
    path: str,
    argv: Sequence[str],
    sources: Sequence[int],
    names: Sequence[str],
    *,
    names_given: bool,
    environ: Mapping[str, str],
) -> int:
    """Fork a child that execs ``argv`` with ``sources`` at fds 3..; its PID.

    ``LISTEN_PID`` and ``LISTEN_PIDFDID`` name the child, set by the child
    itself (see the module's docstring).  The activator's signals
    are blocked across the fork, so none runs its handler in the child before
    the child has reset them.

    Error handling: `ActivationError` when this process has more than one
    thread (a fork could deadlock the child) or the fork fails.
    """
    if not _single_threaded():
        raise ActivationError("activate: this process has more than one thread; forking it is not safe")
    env = dict(environ)
    held = signal.pthread_sigmask(signal.SIG_BLOCK, _RESET)
    try:
        pid = os.fork()
    except OSError as exc:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
        raise ActivationError(f"activate: cannot fork: {exc.strerror or exc}") from None
    if pid == 0:
        _run_child(path, argv, sources, names, names_given=names_given, env=env)
    signal.pthread_sigmask(signal.SIG_SETMASK, held)
    return pid


def _run_child(
    path: str,
    argv: Sequence[str],
    sources: Sequence[int],
    names: Sequence[str],
    *,
    names_given: bool,
    env: dict[str, str],
) -> NoReturn:
    """In the forked child: what systemd does between fork and exec.  Never returns."""
    try:
        try:
            signal.set_wakeup_fd(-1)  # before any fd is placed: it may be a number placed over
            for signum in _RESET:
                signal.signal(signum, signal.SIG_DFL)
            place_fds(sources)
            env.update(listen_environment(len(sources), names, names_given=names_given))
            # Last: a SIGTERM that waited now takes its default action, as it would after the exec.
            signal.pthread_sigmask(signal.SIG_SETMASK, ())
            os.execve(path, list(argv), env)
        except OSError as exc:
            os.write(2, f"trio-activate: activate: cannot run {path}: {exc.strerror or exc}\n".encode())
        except BaseException as exc:
            os.write(2, f"trio-activate: activate: cannot run {path}: {exc!r}\n".encode())
    finally:
        os._exit(CANNOT_RUN)
