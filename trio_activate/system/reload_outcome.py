"""How a reload ended, told to whoever asked for it: `announce_reload_outcome`, `ReloadWaiter`.

What this module owns
---------------------
SIGHUP carries no reply address, so ``trio-activate reload --wait PID``
(systemd 252's ``ExecReload=``, or an operator) needs another way to learn
whether the new code took over.  The waiter binds a unix datagram socket at
an abstract name derived from the target's PID, then sends SIGHUP; the
process that reloads, once the reload is over either way, sends one
datagram to that name::

    RELOAD=done|failed
    STATUS=<what happened, one line>

Nobody bound there (a reload from ``kill -HUP``) means nobody waits: the
datagram is refused at once and that is fine.  The waiter believes only a
datagram whose sender the kernel names as the target PID (``SO_PASSCRED``),
so another local process cannot fake an outcome, and it watches the target
through a pidfd, so a target that dies mid-reload ends the wait at once.

Abstract names belong to a network namespace: systemd runs ``ExecReload=``
in the service's own namespaces, so both ends meet (a unit with
``PrivateNetwork=`` included).  Reloads of one service do not overlap (the
manager queues them, and ``bind`` refuses a second waiter on the same PID).

Layer 2: syscalls, no trio.  `announce_reload_outcome` is one non-blocking
``sendto``, safe to call from a Trio task.

Resource handling: `ReloadWaiter` owns its socket and the target's pidfd;
leaving its ``with`` block closes both.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import time

from ..model import notify_message

__all__ = ["ReloadWaitError", "ReloadWaiter", "announce_reload_outcome", "outcome_address"]

log = logging.getLogger("trio_activate")
# The receiver is gone, or was never there: nobody waits for this reload.
_NOBODY_WAITS = (errno.ECONNREFUSED, errno.ENOENT)


class ReloadWaitError(Exception):
    """The wait could not begin or ended without an outcome; the message says why, in one line."""


def outcome_address(pid: int) -> bytes:
    """The abstract socket name a waiter for `pid`'s reload binds."""
    return f"\0trio-activate/reload-outcome/{pid}".encode()


def announce_reload_outcome(taken_over: bool, status: str, *, pid: int | None = None) -> bool:
    """Tell a waiting ``reload --wait`` how this process's reload ended; True if one was waiting."""
    message = notify_message.format_message(
        {"RELOAD": "done" if taken_over else "failed", "STATUS": _one_line(status)}
    )
    address = outcome_address(os.getpid() if pid is None else pid)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL, address)
    except OSError as exc:
        if exc.errno not in _NOBODY_WAITS:
            log.warning("could not report the reload's outcome to its waiter: %s", exc)
        return False
    return True


class ReloadWaiter:
    """Wait for `pid`'s next reload outcome: bind, then signal, then `wait`.

    ``with ReloadWaiter(pid) as waiter: os.kill(pid, SIGHUP); waiter.wait(timeout)``.

    Error handling: `ProcessLookupError` when `pid` is not running;
    `ReloadWaitError` when the name is taken (another reload of `pid` is
    being waited for), when `pid` cannot be watched, when it exits before it
    tells the outcome, and on timeout.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._sock: socket.socket | None = None
        self._pidfd: int | None = None

    def __enter__(self) -> ReloadWaiter:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            try:
                sock.bind(outcome_address(self.pid))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise ReloadWaitError(f"another reload of PID {self.pid} is being waited for") from None
                raise ReloadWaitError(f"cannot wait for PID {self.pid}'s reload: {exc.strerror}") from None
            try:
                self._pidfd = os.pidfd_open(self.pid)
            except ProcessLookupError:
                raise  # no such process: the caller says so as it would for the signal
            except OSError as exc:
                raise ReloadWaitError(f"cannot watch PID {self.pid}: {exc.strerror}") from None
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    def wait(self, timeout: float) -> tuple[bool, str]:
        """The outcome: (True if the new code took over, the service's one-line status)."""
        assert self._sock is not None, "use ReloadWaiter in a with block"
        assert self._pidfd is not None
        deadline = time.monotonic() + timeout
        poller = select.poll()
        poller.register(self._sock, select.POLLIN)
        poller.register(self._pidfd, select.POLLIN)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ReloadWaitError(f"PID {self.pid} did not tell how its reload ended within {timeout:g}s")
            ready = {fd for fd, _ in poller.poll(left * 1000)}
            if self._sock.fileno() in ready:
                data, ancillary, _, _ = self._sock.recvmsg(4096, notify_message.credentials_space())
                if notify_message.sender_pid(ancillary) != self.pid:
                    continue  # not from the process we signalled: ignore it
                fields = notify_message.parse_notify_message(data)
                return fields.get("RELOAD") == "done", fields.get("STATUS", "")
            if self._pidfd in ready:
                raise ReloadWaitError(f"PID {self.pid} exited before its reload ended")


def _one_line(text: str) -> str:
    return " ".join(text.split())
