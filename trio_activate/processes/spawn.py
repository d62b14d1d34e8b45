"""Starting worker processes over our sockets, and hearing their ``READY=1``.

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

Resource handling: the inbox owns its socket (closed on leaving the
``with``); a spawned ``trio.Process`` belongs to the caller, who must reap it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence

import trio

from ..model.listen_env import LISTEN_VARIABLES
from ..model.notify_message import credentials_space, parse_notify_message, parse_notify_socket, sender_pid
from ..model.private_env import DEV_VARIABLE, FRESH_CODE_VARIABLE, SUPERVISOR_VARIABLE, WORKER_FDS_VARIABLE
from ..model.records import record

__all__ = ["NotifyInbox", "WorkerCommand", "spawn_worker", "worker_argv"]

# Variables a worker must not inherit from whoever spawns it.
_PRIVATE = (
    *LISTEN_VARIABLES,
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    FRESH_CODE_VARIABLE,
    SUPERVISOR_VARIABLE,
)


@record
class WorkerCommand:
    """How to start one worker: the command line, and the sockets as (fd, name) to pass."""

    argv: Sequence[str]
    sockets: Sequence[tuple[int, str]]
    dev: bool = False


def worker_argv(manifest_path: str, log_level: str) -> list[str]:
    """``trio-activate serve`` for a worker: this interpreter, this package, the same manifest."""
    return [sys.executable, "-m", "trio_activate", "--log-level", log_level, "serve", manifest_path]


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
) -> trio.Process:
    """Start one worker with ``command``'s sockets, reporting to ``notify_socket``.  The caller reaps it.

    ``fresh_code``: a reload starts it, so it imports the project's modules from
    source (``TRIO_ACTIVATE_FRESH_CODE``); ``dev`` workers always do.
    """
    env = {k: v for k, v in environ.items() if k not in _PRIVATE}
    import json  # here, not at the top: start-up time (benchmarks/, scenario 3)

    env[WORKER_FDS_VARIABLE] = json.dumps([[fd, name] for fd, name in command.sockets])
    env["NOTIFY_SOCKET"] = notify_socket
    if command.dev:
        env[DEV_VARIABLE] = "1"
    if command.dev or fresh_code:
        env[FRESH_CODE_VARIABLE] = "1"
    env.update(extra_env or {})
    return await trio.lowlevel.open_process(
        list(command.argv),
        pass_fds=[fd for fd, _ in command.sockets],
        env=env,
        stdin=subprocess.DEVNULL,
    )
