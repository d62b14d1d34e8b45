"""Starting worker processes over our sockets, hearing their ``READY=1``, and stopping them.

Layer 4 (processes, on trio).  Shared by the supervisor (generations of
workers) and by the single-process hand-over on SIGHUP.

A worker is ``trio-activate serve`` itself.  Its PID, which ``LISTEN_PID``
must name, is known only after fork, so it gets the sockets with
``pass_fds`` (at our fd numbers) and a private variable naming them, and
sets its own ``LISTEN_*`` first thing (``activator.settle_worker_environment``).
The fork and exec happen in C (``subprocess`` through
``trio.lowlevel.open_process``): no Python runs between them in this
multi-threaded process.

``NotifyInbox`` is the private ``NOTIFY_SOCKET`` workers report to: an
abstract unix datagram socket with ``SO_PASSCRED``, so the kernel attaches
the sender's PID to every message and one socket serves every worker.

The supervisor starts its workers through a `Spawner`: `ProcessSpawner`
(this command, these sockets, a ``NotifyInbox``) unless it is given another,
as its tests give it a scripted fake whose workers are Trio tasks.

`stop_then_kill` is the one way a child is stopped: SIGTERM (it drains),
SIGKILL to whatever still runs after its grace period, and a wait until
each is reaped.

Resource handling: the inbox owns its socket (closed on leaving the
``with``); a spawned ``trio.Process`` belongs to the caller, who must reap it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Protocol, TypeVar

import trio

from ..model.listen_env import LISTEN_VARIABLES
from ..model.notify_message import credentials_space, parse_notify_message, parse_notify_socket, sender_pid
from ..model.private_env import (
    DEV_VARIABLE,
    ERROR_TOKEN_VARIABLE,
    FRESH_CODE_VARIABLE,
    HANDOFF_STATE_VARIABLE,
    SUPERVISOR_VARIABLE,
    WORKER_FDS_VARIABLE,
)
from ..model.records import field, record

__all__ = [
    "ChildProcess",
    "Inbox",
    "NotifyInbox",
    "ProcessSpawner",
    "Spawner",
    "WorkerCommand",
    "spawn_worker",
    "stop_then_kill",
    "worker_argv",
]

log = logging.getLogger("trio_activate")

# Variables a worker must not inherit from whoever spawns it.
_PRIVATE = (
    *LISTEN_VARIABLES,
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    FRESH_CODE_VARIABLE,
    SUPERVISOR_VARIABLE,
    ERROR_TOKEN_VARIABLE,
    HANDOFF_STATE_VARIABLE,
)


@record
class WorkerCommand:
    """How to start one worker: the command line, and the sockets as (fd, name) to pass."""

    argv: Sequence[str]
    sockets: Sequence[tuple[int, str]]
    dev: bool = False
    fresh_code: bool = False
    """Every worker imports the project's modules from source, the first generation's too (a
    supervisor that took a running service over: a new release, as a reload's)."""


def worker_argv(
    manifest_path: str, log_level: str, log_format: str = "auto", *, overrides: Sequence[str] = ()
) -> list[str]:
    """``trio-activate serve`` for a worker: this interpreter, this package, the same manifest,
    logging at `log_level` in `log_format` (the one its spawner resolved: they share stderr).

    ``overrides``: the ``--set KEY=VALUE`` texts the manifest was read with,
    passed on as they came (``--set=``: a text that starts with ``-`` stays
    the option's value).
    """
    argv = [
        sys.executable,
        "-m",
        "trio_activate",
        "--log-level",
        log_level,
        "--log-format",
        log_format,
        "serve",
        manifest_path,
    ]
    return argv + [f"--set={text}" for text in overrides]


class NotifyInbox:
    """A private ``NOTIFY_SOCKET``: ``with NotifyInbox() as inbox``, then ``await inbox.receive()``."""

    def __init__(self) -> None:
        self.address = ""
        self._sock: trio.socket.SocketType | None = None

    def __enter__(self) -> NotifyInbox:
        # Bound before trio sees it: binding an abstract name never blocks.
        plain = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            plain.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            import secrets  # here, not at the top: start-up time (benchmarks/, scenario 3)

            address = f"@trio-activate/{os.getpid()}/{secrets.token_hex(8)}"
            # Bound where the workers' Notifier sends: the same codec reads their NOTIFY_SOCKET.
            plain.bind(parse_notify_socket(address))
            self._sock = trio.socket.from_stdlib_socket(plain)
        except BaseException:
            plain.close()
            raise
        self.address = address
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def receive(self) -> tuple[int | None, dict[str, str]]:
        """The next message: the sender's PID (None if the kernel gave none) and its fields."""
        assert self._sock is not None, "use NotifyInbox in a with block"
        data, ancillary, _flags, _address = await self._sock.recvmsg(4096, credentials_space())
        return sender_pid(ancillary), parse_notify_message(data)


async def spawn_worker(
    command: WorkerCommand,
    *,
    notify_socket: str,
    environ: Mapping[str, str],
    extra_env: Mapping[str, str] | None = None,
    fresh_code: bool = False,
    extra_fds: Sequence[int] = (),
) -> trio.Process:
    """Start one worker with ``command``'s sockets, reporting to ``notify_socket``.  The caller reaps it.

    ``fresh_code``: a reload starts it, so it imports the project's modules from
    source (``TRIO_ACTIVATE_FRESH_CODE``); ``dev`` workers always do.
    ``extra_fds``: more fds it inherits, at the same numbers (``extra_env`` names them).
    """
    env = {k: v for k, v in environ.items() if k not in _PRIVATE}
    import json  # here, not at the top: start-up time (benchmarks/, scenario 3)

    env[WORKER_FDS_VARIABLE] = json.dumps([[fd, name] for fd, name in command.sockets])
    env["NOTIFY_SOCKET"] = notify_socket
    if command.dev:
        env[DEV_VARIABLE] = "1"
    if command.dev or command.fresh_code or fresh_code:
        env[FRESH_CODE_VARIABLE] = "1"
    env.update(extra_env or {})
    process = await trio.lowlevel.open_process(
        list(command.argv),
        pass_fds=[*(fd for fd, _ in command.sockets), *extra_fds],
        env=env,
        stdin=subprocess.DEVNULL,
    )
    import shlex  # here, not at the top: start-up time (benchmarks/, scenario 3)

    log.debug(
        "spawned process %d: %s, with %s",
        process.pid,
        shlex.join(command.argv),
        ", ".join(f"fd {fd} (sockets.{name})" for fd, name in command.sockets) or "no socket",
        extra={"worker_pid": process.pid},
    )
    return process


class ChildProcess(Protocol):
    """A started child as `stop_then_kill` needs it: a `trio.Process`, or a test's fake."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None:
        """None until it has exited and was reaped."""

    def send_signal(self, signum: int) -> None: ...

    async def wait(self) -> int:
        """Wait until it has exited, reap it; its exit status.  Several tasks may wait at once."""


class Inbox(Protocol):
    """Where workers' sd_notify messages arrive: a `NotifyInbox`, or a test's fake."""

    @property
    def address(self) -> str:
        """The ``NOTIFY_SOCKET`` a worker gets."""

    async def receive(self) -> tuple[int | None, dict[str, str]]:
        """The next message: the sender's PID (None if unknown) and its fields."""


class Spawner(Protocol):
    """How the supervisor starts its workers and hears from them."""

    def open_inbox(self) -> AbstractContextManager[Inbox]:
        """The inbox for every worker's ``READY=1``, ``STOPPING=1`` and ``WATCHDOG=1``, open within."""

    async def spawn(
        self, generation: int, slot: int, *, notify_socket: str, extra_env: Mapping[str, str]
    ) -> ChildProcess:
        """Start worker ``slot`` of ``generation``, reporting to ``notify_socket``, with ``extra_env``
        on top of its environment.  Raises OSError or RuntimeError when no process can be started."""


class ProcessSpawner:
    """The real `Spawner`: ``command`` (``trio-activate serve``) as a process, a `NotifyInbox`.

    Workers started together share an error token (``TRIO_ACTIVATE_ERROR_TOKEN``):
    a pipe holding one byte, which the first of them to fail with a
    configuration error reads, and then prints its one line; the others, whose
    line would be the same, stay silent.  Together: the slots of one
    generation as it starts; a spawn for another generation, or for a slot
    the token has seen already (a restart, a retry), gets a fresh token, so
    a later failure is told again.
    """

    def __init__(self, command: WorkerCommand, environ: Mapping[str, str]) -> None:
        self.command = command
        self.environ = environ
        self._token: _ErrorToken | None = None

    def open_inbox(self) -> NotifyInbox:
        return NotifyInbox()

    def command_for(self, generation: int) -> WorkerCommand:
        """The command (and sockets) of ``generation``'s workers: ``command``, unless a subclass
        gives a generation sockets of its own (``dev`` following its manifest)."""
        return self.command

    async def spawn(
        self, generation: int, slot: int, *, notify_socket: str, extra_env: Mapping[str, str]
    ) -> trio.Process:
        # A duplicate of the token's fd for this spawn alone (close-on-exec here,
        # inherited by the worker through pass_fds): another task may retire the
        # token while this spawn runs in a thread, and closes only its own fd.
        token = os.dup(self._error_token(generation, slot))
        try:
            return await spawn_worker(
                self.command_for(generation),
                notify_socket=notify_socket,
                environ=self.environ,
                extra_env={**extra_env, ERROR_TOKEN_VARIABLE: str(token)},
                fresh_code=generation > 1,  # a reload: the code on disk now, not a cached .pyc
                extra_fds=[token],
            )
        finally:
            os.close(token)

    def _error_token(self, generation: int, slot: int) -> int:
        token = self._token
        if token is None or token.generation != generation or slot in token.slots:
            if token is not None:
                os.close(token.fd)
                self._token = None
            read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                os.write(write_end, b"!")
            finally:
                os.close(write_end)
            token = self._token = _ErrorToken(generation, read_end)
        token.slots.add(slot)
        return token.fd


@record(frozen=False, eq=False)
class _ErrorToken:
    generation: int
    fd: int
    slots: set[int] = field(default_factory=set)


P = TypeVar("P", bound=ChildProcess)


def _sigterm(process: ChildProcess) -> int | None:
    return signal.SIGTERM


def _nothing(process: ChildProcess) -> None:
    return None


async def stop_then_kill(
    processes: Sequence[P],
    grace: float,
    *,
    first_signal: Callable[[P], int | None] = _sigterm,
    on_kill: Callable[[P], object] = _nothing,
) -> None:
    """Stop ``processes``: SIGTERM to each, SIGKILL to each still running ``grace`` seconds later.

    Returns once every one has exited and was reaped.  ``first_signal``: the
    signal each gets first when not SIGTERM (SIGKILL for one that served
    nothing; None for one signalled already, only waited for).  ``on_kill``
    is called for each one that needs the SIGKILL (to log it).  Shielded: a
    stop that began runs to its end even when its caller is cancelled, so no
    child is left running or unreaped.
    """
    with trio.CancelScope(shield=True):
        for process in processes:
            signum = first_signal(process)
            if signum is not None:
                _send(process, signum)
        with trio.move_on_after(grace):
            await _wait_all(processes)
        for process in processes:
            if process.returncode is None:
                on_kill(process)
                _send(process, signal.SIGKILL)
        await _wait_all(processes)


def _send(process: ChildProcess, signum: int) -> None:
    if process.returncode is None:
        # It may exit meanwhile: then there is nothing to signal.
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signum)


async def _wait_all(processes: Sequence[ChildProcess]) -> None:
    async with trio.open_nursery() as nursery:
        for process in processes:
            nursery.start_soon(process.wait)
