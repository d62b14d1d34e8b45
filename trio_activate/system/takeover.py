"""Taking a running service's sockets over: the new process's side, up to adoption.

Layer 2: syscalls, no trio.  ``serve --takeover PATH`` calls `take_over` in
place of ``acquire_sockets``, before trio runs.  The exchange is
`trio_activate.model.takeover`'s; the old side's half and this side's last
step (telling the old one it serves) are `trio_activate.runtime.takeover`'s.

What this module owns
---------------------
Every fd received, from the ``recvmsg`` that brought it (`fd_passing`)
until `take_over` returns: then the listeners belong to the returned
`TakenOver`'s ``sockets`` (a ``ServiceSockets``, adopted through exactly the
checks inherited fds get: ``passed.adopt``), and the control socket's fd and
the connection to the old process to the `TakenOver` itself, which closes
what is still its own in ``close()``.  If any step fails, every fd received
and every socket created is closed before the `ActivationError` (one line)
propagates, and the old process, told why where it still listens, serves on.

The socket files the old process made are not ours until it confirmed the
takeover (`TakenOver.confirmed`): a new process that fails before then
removes none of them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from functools import partial
from typing import Any

from ..errors import ActivationError
from ..model.control import ANSWER_MAX, encode
from ..model.listen_env import ListenFds
from ..model.manifest import Manifest
from ..model.takeover import Offer, TakeoverError, format_failed, parse_offer
from .acquire import ServiceSockets, SocketFile, adopt_then_create
from .fd_passing import FdPassingError, receive_with_fds
from .fds import close_all
from .passed import PassedFds

__all__ = ["TAKEOVER_TIMEOUT", "TakenOver", "take_over"]

log = logging.getLogger("trio_activate")

# From connecting to holding every fd: the old process answers at once (it checks, then sends).
TAKEOVER_TIMEOUT = 10.0


class TakenOver:
    """The sockets taken over, and what comes with them; see the module docstring."""

    def __init__(
        self,
        sockets: ServiceSockets,
        link: socket.socket,
        offer: Offer,
        control_fd: int | None,
        declared: frozenset[str],
    ) -> None:
        self.sockets = sockets
        self.link = link
        self.offer = offer
        self.declared = declared
        """The manifest's socket names: a file of any other socket is no one's once confirmed."""
        self._control_fd = control_fd

    def inherited_state(self) -> dict[str, Any]:
        """What the process answering for the service inherits (``processes.control.Operated``):
        the old one's history, a reload further on, its pid file, and its control socket, whose
        fd moves to the caller with this call."""
        state = dict(self.offer.state)
        state["control"] = None
        if self._control_fd is not None and self.offer.control is not None:
            state["control"] = {**self.offer.control, "fd": self._control_fd}
            self._control_fd = None
        return state

    def confirmed(self) -> None:
        """The old process confirmed: its socket files are ours now (removed at our stop, as the
        manifest says), and the connection has served its purpose.

        The file of a socket this manifest dropped is removed now: its fd was closed at adoption,
        and the old process, which no longer accepts, was its last listener (as ``dev`` removes a
        socket it no longer serves once the old generation is done with it).
        """
        from .create import remove_socket_file_if_same

        for name, path, file_id in self.offer.files:
            if name in self.declared:
                self.sockets.files.append(SocketFile(name, path, file_id))
            else:
                log.info("sockets.%s: the manifest no longer declares it: removing %s", name, path)
                remove_socket_file_if_same(path, file_id)
        self.link.close()

    def fail(self, reason: str) -> None:
        """Tell the old process why this one cannot serve (best effort), before ``close()``."""
        with contextlib.suppress(OSError):
            self.link.settimeout(1.0)
            self.link.sendall(encode(format_failed(reason)))

    def close(self) -> None:
        """Close the connection to the old process, and the control socket's fd if still ours."""
        closes = [self.link.close]
        if self._control_fd is not None:
            closes.append(partial(os.close, self._control_fd))
            self._control_fd = None
        close_all(closes)


def take_over(path: str, manifest: Manifest, *, timeout: float = TAKEOVER_TIMEOUT) -> TakenOver:
    """Connect to the control socket at ``path``, take the service's sockets, adopt them for ``manifest``.

    The manifest's sockets that the old one does not have are created here
    (a new release may add one); fds under names this manifest does not
    declare are closed, with a warning, as unclaimed passed fds are.
    Raises `ActivationError`, one line naming ``--takeover PATH``.
    """
    where = f"--takeover {path}"
    link = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    received: list[int] = []
    try:
        offer = _receive(link, path, received, timeout)
        control_fd = received[len(offer.names)] if offer.control is not None else None
        # From here the PassedFds owns the listeners; `received` keeps only the control fd.
        passed = PassedFds(ListenFds(tuple(received[: len(offer.names)]), offer.names, True, False))
        received[:] = [] if control_fd is None else [control_fd]
        try:
            sockets = adopt_then_create(manifest, passed, origin="taken over", create_missing=True)
        except ActivationError as exc:
            with contextlib.suppress(OSError):
                link.sendall(encode(format_failed(str(exc))))
            raise
    except BaseException as exc:
        close_all([link.close, *(partial(os.close, fd) for fd in received)])
        if isinstance(exc, TakeoverError):
            raise ActivationError(f"{where}: {exc}") from None
        if isinstance(exc, OSError):
            raise ActivationError(f"{where}: {exc.strerror or exc}") from None
        raise
    log.info(
        "took %d socket(s) over from process %d (service %s) through %s",
        len(offer.names),
        offer.pid,
        offer.service,
        path,
    )
    return TakenOver(sockets, link, offer, control_fd, frozenset(manifest.socket_names()))


def _receive(link: socket.socket, path: str, received: list[int], timeout: float) -> Offer:
    """Ask for the sockets; the offer, every fd appended to ``received`` as it arrives (the caller
    owns them).

    The old process is the one the offer names: ``SO_PEERCRED`` cannot tell, since a listening
    socket passed on keeps the credentials of the process that called ``listen()``.
    """
    deadline = time.monotonic() + timeout
    link.settimeout(timeout)
    try:
        link.connect(path)
    except (ConnectionRefusedError, FileNotFoundError) as exc:
        raise TakeoverError(f"{exc.strerror or exc}: no service listens there") from None
    except PermissionError:
        raise TakeoverError("permission denied: only the service's user and root may take it over") from None
    # Refused at once, the old one may close before our request is sent: its answer is still there.
    with contextlib.suppress(BrokenPipeError):
        link.sendall(encode({"op": "takeover"}))
    data = b""
    offer: Offer | None = None
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TakeoverError(f"the sockets did not arrive within {timeout:g}s")
        link.settimeout(left)
        try:
            chunk, fds = receive_with_fds(link, 65536)
        except TimeoutError:
            raise TakeoverError(f"the sockets did not arrive within {timeout:g}s") from None
        except FdPassingError as exc:
            raise TakeoverError(str(exc)) from None
        received.extend(fds)
        if not chunk:
            if offer is None:
                raise TakeoverError("the service closed the connection without an answer")
            raise TakeoverError(
                f"the service closed the connection after {len(received)} of {offer.fd_count} fd(s)"
            )
        data += chunk
        if offer is None:
            line, newline, rest = data.partition(b"\n")
            if not newline:
                if len(data) > ANSWER_MAX:
                    raise TakeoverError(f"the answer is longer than {ANSWER_MAX} bytes")
                if received:
                    raise TakeoverError("fds came before the offer that names them")
                continue
            offer = parse_offer(line)
            data = rest
        if len(data) > offer.messages or len(received) > offer.fd_count:
            raise TakeoverError(
                f"more than the offer said came: {len(received)} fd(s) in {len(data)} message(s), "
                f"for {offer.fd_count} in {offer.messages}"
            )
        if len(data) == offer.messages:
            if len(received) != offer.fd_count:
                raise TakeoverError(f"{len(received)} fd(s) arrived, the offer named {offer.fd_count}")
            return offer
