"""The internal activator: self-activation by re-exec.

Layer 2: syscalls, no trio.  This runs before trio is imported, so a
self-activating ``serve`` pays only for the interpreter and this package's
light modules before it execs.

What it does, as systemd does for a service it starts:

1. create the manifest's sockets (``create.create_sockets``, all or nothing);
2. place them at fds 3, 4, ... in manifest order, safe against the shuffle
   hazard (see ``place_fds``), with ``FD_CLOEXEC`` cleared on exactly those;
3. set ``LISTEN_FDS``, ``LISTEN_FDNAMES``, ``LISTEN_PID`` (our own PID: exec
   in place keeps it) and ``LISTEN_PIDFDID`` (our own pidfd id, where the
   kernel has them; exec keeps it too);
4. ``execv`` the same command line.

After the exec the process adopts its sockets through exactly the path it
takes under systemd.  (This is the activator of ``self_activate()`` and of
the rare CLI start that ``LISTEN_*`` meant for another process; the CLI's
usual one is forked, so that its work overlaps the exec'd service's
start-up: see ``fast_start`` and ``activator_channel``.  Both end here, in
``settle_listen_environment`` or the exec's environment: ``LISTEN_*`` naming
the service.)  A private variable, ``TRIO_ACTIVATE_ACTIVATOR_PID``,
tells the re-exec'd process that it came from here: if it then finds no
sockets for itself, it fails with the reason instead of activating again,
so a bug can never turn into an exec loop.

Resource handling: the created sockets are owned here until the exec; if
anything fails before it, every socket created is closed and every unix
socket file created is removed.  Once fds are placed, the process is
committed: the placed fds belong to the program that the exec starts.
"""

from __future__ import annotations

import fcntl
import os
import sys
from collections.abc import MutableMapping, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from ..errors import ActivationError
from ..model.listen_env import (
    SD_LISTEN_FDS_START,
    ListenFds,
    format_listen_env,
    read_listen_env,
    unset_listen_env,
)
from ..model.manifest import Manifest, load_manifest
from ..model.private_env import ACTIVATOR_MARKER, SOCKET_FILES_VARIABLE, WORKER_FDS_VARIABLE
from .fast_start import reexec_argv
from .fds import close_all, own_pidfd_id

if TYPE_CHECKING:
    from .create import CreatedSocket

__all__ = [
    "check_not_looping",
    "exec_with_sockets",
    "place_fds",
    "reexec_with_new_sockets",
    "self_activate",
    "settle_listen_environment",
    "settle_worker_environment",
]


def place_fds(sources: Sequence[int]) -> None:
    """Make fd ``3 + i`` a duplicate of ``sources[i]``, inheritable across exec.

    The shuffle hazard: a plain loop of ``dup2(src[i], 3 + i)`` clobbers any
    later source that already sits in the target range (source 4 moved to 3,
    then source 3 "moved" to 4 is a copy of what was source 4).  So every
    source is first lifted above the range with ``F_DUPFD_CLOEXEC``, then
    each lifted copy is ``dup2``-ed into place (``dup2`` clears
    ``FD_CLOEXEC`` on its target, which is what crosses the exec), then the
    lifted copies are closed.

    The sources themselves are left open: their owners close them.  Whatever
    else sat at 3 .. 3+n-1 before is replaced; that is the point of the call.
    """
    count = len(sources)
    floor = SD_LISTEN_FDS_START + count
    lifted: list[int] = []
    try:
        for source in sources:
            lifted.append(fcntl.fcntl(source, fcntl.F_DUPFD_CLOEXEC, floor))
        for index, fd in enumerate(lifted):
            os.dup2(fd, SD_LISTEN_FDS_START + index, inheritable=True)
    finally:
        close_all(partial(os.close, fd) for fd in lifted)


def exec_with_sockets(
    created: Sequence[CreatedSocket],
    names: Sequence[str],
    argv: Sequence[str],
    *,
    pidfd_id: int | None,
    environ: MutableMapping[str, str] | None = None,
) -> None:
    """Place ``created`` at fds 3.., and exec ``argv`` with ``LISTEN_*`` naming this process.

    ``pidfd_id`` is this process's own (``fds.own_pidfd_id()``); exec keeps it.

    ``environ`` (default ``os.environ``) plus the ``LISTEN_*`` and private
    variables is the exec'd program's environment; ``environ`` itself is not
    changed.  Does not return on success.  The Python socket objects are detached
    first, so nothing in this process closes a number that now holds a
    placed socket; the original fds are closed after the placed copies
    exist.  If the exec fails, the unix socket files created are removed
    (while the placed fds still pin them, so only our own files go), the
    placed fds are closed, and the error is raised as an ``ActivationError``.
    """
    import json  # here, and create below, not at the top: start-up time (benchmarks/, scenario 3)

    from .create import remove_socket_file

    env = os.environ if environ is None else environ
    sources = [item.sock.detach() for item in created]
    placed = range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + len(sources))
    try:
        place_fds(sources)
    except BaseException:
        for item in created:
            remove_socket_file(item)  # while the sources still pin the files
        close_all(partial(os.close, fd) for fd in sources)
        raise
    # A source may itself sit in the placed range, now holding a placed
    # socket: closing that number would undo the placement.
    close_all(partial(os.close, fd) for fd in sources if fd not in placed)
    # Set for the exec'd program only: if the exec fails, this process must not
    # claim fds that are closed below (a later adoption would take whatever
    # reused the numbers).
    exec_env = dict(env)
    unset_listen_env(exec_env)  # a stale LISTEN_PIDFDID must not outlive the others
    exec_env.update(format_listen_env(names, pid=os.getpid(), pidfd_id=pidfd_id))
    exec_env[ACTIVATOR_MARKER] = str(os.getpid())
    exec_env[SOCKET_FILES_VARIABLE] = json.dumps(
        [
            [item.spec_name, item.created_path, *item.created_file_id]
            for item in created
            if item.created_path is not None and item.created_file_id is not None
        ]
    )
    try:
        os.execve(argv[0], list(argv), exec_env)
    except OSError as exc:
        for item in created:
            remove_socket_file(item)
        close_all(partial(os.close, fd) for fd in placed)
        raise ActivationError(f"cannot re-exec {argv[0]}: {exc.strerror or exc}") from None


def settle_worker_environment(environ: MutableMapping[str, str] | None = None) -> bool:
    """In a worker the supervisor spawned, do what systemd does after fork; True if this is one.

    Moves the passed fds to 3, 4, ... (``place_fds``: the supervisor's numbers
    need not be contiguous), closes the originals, and sets ``LISTEN_FDS``,
    ``LISTEN_FDNAMES``, ``LISTEN_PID`` and ``LISTEN_PIDFDID`` naming this
    process.  Runs first thing in ``main()``, while the process is still
    single-threaded and before trio is imported; from then on the worker
    adopts through the ordinary ``LISTEN_*`` path.
    """
    env = os.environ if environ is None else environ
    text = env.pop(WORKER_FDS_VARIABLE, None)
    if text is None:
        return False
    import json  # here, not at the top: start-up time (benchmarks/, scenario 3)

    try:
        pairs = [(int(fd), str(name)) for fd, name in json.loads(text)]
    except (ValueError, TypeError):
        raise ActivationError(f"{WORKER_FDS_VARIABLE}={text[:80]!r}: expected [[fd, name], ...]") from None
    settle_listen_environment([fd for fd, _ in pairs], [name for _, name in pairs], env)
    return True


def settle_listen_environment(
    sources: Sequence[int], names: Sequence[str], environ: MutableMapping[str, str]
) -> None:
    """Do what systemd does after fork, in this process: the fds at 3, 4, ... and ``LISTEN_*`` naming us.

    Moves ``sources`` (this process's own fds, in any numbers) to 3.. with
    ``place_fds`` and closes the originals.  Replaces every ``LISTEN_*``
    variable, so a stale ``LISTEN_PIDFDID`` cannot outlive the others when
    this kernel gives no pidfd id.  Call it while the process is
    single-threaded: nothing else may open an fd in 3.. meanwhile.
    """
    placed = range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + len(sources))
    place_fds(sources)
    close_all(partial(os.close, fd) for fd in sources if fd not in placed)
    unset_listen_env(environ)
    environ.update(format_listen_env(names, pid=os.getpid(), pidfd_id=own_pidfd_id()))


def check_not_looping(environ: MutableMapping[str, str], *, pid: int, reason: str) -> None:
    """Fail when the activator re-exec'd us but we found no sockets for ourselves.

    Called by the adopting side when ``LISTEN_*`` says "not activated".
    """
    if environ.get(ACTIVATOR_MARKER) == str(pid):
        environ.pop(ACTIVATOR_MARKER, None)
        raise ActivationError(
            f"the activator re-executed this process with its sockets, but they were not found: {reason}"
        )


def self_activate(
    manifest: Manifest | str | Path,
    *,
    environ: MutableMapping[str, str] | None = None,
    argv: Sequence[str] | None = None,
) -> ListenFds | None:
    """Make sure this process has its sockets: return if it was passed them, else create them and re-exec.

    For embedded programs, call it first thing, before ``trio.run``::

        trio_activate.self_activate("service.toml")
        trio.run(main)

    Returns the ``ListenFds`` found when this process was already activated
    (by systemd, ``systemd-socket-activate``, or an earlier call); the
    ``LISTEN_*`` variables are left in place for ``activated()`` to take.
    Otherwise it does not return: the process re-execs with its sockets.

    Error handling: a manifest or creation problem raises the matching
    ``ActivationError`` with nothing left behind; malformed ``LISTEN_*`` raise
    ``ListenEnvError`` (they are not silently replaced).
    """
    env = os.environ if environ is None else environ
    if not isinstance(manifest, Manifest):
        manifest = load_manifest(manifest)
    pidfd_id = own_pidfd_id()
    found = read_listen_env(env, pid=os.getpid(), pidfd_id=pidfd_id)
    if isinstance(found, ListenFds):
        return found
    check_not_looping(env, pid=os.getpid(), reason=found.reason)
    if argv is None and sys.argv[:1] in ([""], ["-"]):
        # python < script.py, python - < script.py, the REPL: standard input was read
        # to its end, so the re-exec'd interpreter would read nothing and exit 0.
        raise ActivationError(
            "self_activate(): this program was read from standard input, which a re-exec "
            "cannot read again; run it from a file or with -m, or have systemd pass the sockets"
        )
    reexec_with_new_sockets(manifest, pidfd_id=pidfd_id, environ=env, argv=argv)


def reexec_with_new_sockets(
    manifest: Manifest,
    *,
    pidfd_id: int | None,
    environ: MutableMapping[str, str] | None = None,
    argv: Sequence[str] | None = None,
) -> NoReturn:
    """Create the manifest's sockets and exec this command line again with them (same PID).

    For callers that already found this process not activated (and checked
    it is not looping); returns only by raising.
    """
    from .create import create_sockets

    created = create_sockets(manifest)
    exec_with_sockets(created, manifest.fd_names(), argv or reexec_argv(), pidfd_id=pidfd_id, environ=environ)
    raise AssertionError("unreachable: exec_with_sockets returns only by raising")
