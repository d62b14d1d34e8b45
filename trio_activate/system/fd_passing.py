"""Passing fds over a unix socket (``SCM_RIGHTS``), received so that none can leak.

Layer 2: syscalls, no trio.  The sending side builds the ancillary data for
``sendmsg`` (a trio socket's or a stdlib one's); the receiving side reads
with `receive_with_fds`.

Why not ``socket.send_fds``/``socket.recv_fds``: in CPython 3.11 they drop
their ``flags`` argument (``recv_fds`` calls ``recvmsg`` without it, fixed in
3.13), so a receiver could not ask for ``MSG_CMSG_CLOEXEC``, and a trio
socket's ``sendmsg`` must be awaited.  What they do is kept, with the
standard library's constants and its ``CMSG_SPACE``: no hand-built cmsg.

Receiving is safe by construction:

- ``MSG_CMSG_CLOEXEC``: the kernel installs each fd close-on-exec, so no
  fork and exec in another thread can take one along before we set it;
- a control buffer sized for `SCM_MAX_FD` fds, the most one message can
  carry, so the kernel never has to truncate for want of room;
- every fd received is owned at once: returned to the caller, or closed
  before any error propagates;
- a message flagged ``MSG_CTRUNC`` (the kernel could not install every fd:
  no fd to spare under ``RLIMIT_NOFILE``) closes what did arrive and fails:
  a batch with holes in it cannot be matched to its names.
"""

from __future__ import annotations

import array
import os
import socket
from collections.abc import Sequence
from functools import partial
from typing import Protocol

from ..model.takeover import SCM_MAX_FD
from .fds import close_all

__all__ = ["RECEIVE_CONTROL_SIZE", "FdPassingError", "receive_with_fds", "rights"]

_INT_SIZE = array.array("i").itemsize
RECEIVE_CONTROL_SIZE = socket.CMSG_SPACE(SCM_MAX_FD * _INT_SIZE)


class FdPassingError(OSError):
    """Fds could not be received whole; whatever arrived is closed.  One line."""


def rights(fds: Sequence[int]) -> list[tuple[int, int, bytes]]:
    """The ancillary data that sends ``fds`` (at most `SCM_MAX_FD`) with a ``sendmsg``."""
    if len(fds) > SCM_MAX_FD:
        raise ValueError(f"{len(fds)} fds in one message: the kernel takes at most {SCM_MAX_FD}")
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


class _Receiver(Protocol):
    def recvmsg(
        self, bufsize: int, ancbufsize: int, flags: int, /
    ) -> tuple[bytes, list[tuple[int, int, bytes]], int, object]: ...


def receive_with_fds(sock: _Receiver, bufsize: int) -> tuple[bytes, list[int]]:
    """One ``recvmsg``: the bytes, and the fds that came with them, now the caller's to close.

    A unix stream socket hands over the fds of at most one message per call,
    so a sender that sends each batch as its own ``sendmsg`` is read batch by
    batch.  Raises `FdPassingError` (after closing every fd received) when
    the kernel flagged the control data truncated; ``OSError`` from the call
    itself propagates (nothing was received then).
    """
    data, ancdata, flags, _ = sock.recvmsg(bufsize, RECEIVE_CONTROL_SIZE, socket.MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            numbers = array.array("i")
            numbers.frombytes(payload[: len(payload) - len(payload) % _INT_SIZE])
            fds.extend(numbers)
    if flags & socket.MSG_CTRUNC:
        close_all(partial(os.close, fd) for fd in fds)
        raise FdPassingError(
            "the kernel truncated the fds sent (MSG_CTRUNC: no fd to spare?); "
            f"closed the {len(fds)} that arrived"
        )
    return data, fds
