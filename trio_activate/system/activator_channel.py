"""The fast start's channel: the forked activator delivers its sockets to the re-exec'd service.

Layer 2: syscalls, no trio.  ``fast_start`` forks the activator and re-execs the
service at once (see its docstring for why); the two meet here, over a unix
seqpacket pair the exec'd process finds in ``TRIO_ACTIVATE_ACTIVATOR_CHANNEL``
("<fd>:<activator pid>").

The exchange, one message per arrow:

    activator -> service   header: "ok", the fd count n, n names, then 4 fields per unix socket
                           file it created (socket name, path, st_dev, st_ino); NUL-separated
                           (a path holds any byte but NUL); or "error", "one line" and nothing more
    activator -> service   b"d" and the manifest's TOML document (marshal), so the service
                           need not read and parse the file again; b"-" when marshal cannot carry it
    activator -> service   the fds, in manifest order, at most 253 per message (SCM_RIGHTS)
    service -> activator   b"ok": the sockets are the service's now, and so are the files

Resource handling: the activator owns what it created until it reads
``ok``.  If the channel closes first (the service failed to start, was
killed, or found the fds wrong) it removes the socket files it created,
while its sockets still pin them, so only its own files go, then closes
the sockets.  The service owns each received fd from ``recvmsg`` on and
closes all of them if anything is wrong; once it answers ``ok`` they are
placed at 3.. and ``LISTEN_*`` names them, as if systemd had passed them,
with ``TRIO_ACTIVATE_ACTIVATOR_PID`` set as the exec-in-place activator sets
it; the socket files are returned to the caller.  The service reaps the
activator when it takes the sockets; a service that fails before that (a
usage error) exits, and the activator, seeing the channel close, cleans up
and exits under init.  (No JSON: importing
``json`` would cost the service's start about 1.5 ms.)
"""

from __future__ import annotations

import contextlib
import marshal
import os
import socket
import struct
from collections.abc import MutableMapping, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ActivationError
from ..model.manifest import load_manifest, read_manifest_document
from ..model.private_env import ACTIVATOR_CHANNEL_VARIABLE, ACTIVATOR_MARKER
from ..model.records import record
from ..model.text import is_decimal
from .activator import settle_listen_environment
from .fds import close_all

if TYPE_CHECKING:
    from .create import CreatedSocket

__all__ = ["deliver_sockets_to_service", "receive_from_forked_activator"]

# SCM_MAX_FD: the kernel's limit on fds in one SCM_RIGHTS message.
FDS_PER_MESSAGE = 253
# Room for the header: names and socket file paths of a large manifest.
HEADER_LIMIT = 1 << 20
ACKNOWLEDGED = b"ok"
FIELDS_PER_FILE = 4

DOCUMENT_TAG = b"d"
NO_DOCUMENT = b"-"

SocketFileRecord = tuple[str, str, tuple[int, int]]
"""A unix socket file the activator created: (socket name, path, (st_dev, st_ino))."""


@record
class Delivery:
    """What the service gets besides the fds, which are in place when it has this."""

    files: list[SocketFileRecord]
    """The unix socket files the activator created: the service's now."""
    document: dict[str, Any] | None
    """The manifest's TOML document as the activator read it; None: read the file."""


_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def deliver_sockets_to_service(channel_fd: int, manifest_path: Path, *, overrides: Sequence[str] = ()) -> int:
    """The forked activator: create the manifest's sockets and pass them over ``channel_fd``.

    ``overrides``: the command line's ``--set`` texts, applied as the service
    applies them (the document passed on is the file's, as read: the service
    applies the same overrides to it).

    Returns the activator's exit status: 0 when the service took the
    sockets, 1 otherwise.  An error goes over the channel as one line for
    the service to report; the activator itself prints nothing.
    """
    from .create import create_sockets, remove_socket_file  # only the activator needs these

    with socket.socket(fileno=channel_fd) as channel:
        try:
            document = read_manifest_document(manifest_path)
            manifest = load_manifest(manifest_path, document=document, overrides=overrides)
            created = create_sockets(manifest)
        except ActivationError as exc:
            _send_quietly(channel, _encode(["error", str(exc)]))
            return 1
        taken = False
        try:
            taken = _pass(channel, created, manifest.fd_names(), _marshalled(document))
        finally:
            if not taken:
                for item in created:
                    remove_socket_file(item)  # while the socket still pins the file
            close_all(item.sock.close for item in created)
    return 0 if taken else 1


def _marshalled(document: dict[str, Any]) -> bytes:
    try:
        return DOCUMENT_TAG + marshal.dumps(document)
    except ValueError:  # a TOML date or time, which marshal cannot carry (and no manifest key takes)
        return NO_DOCUMENT


def _pass(
    channel: socket.socket, created: Sequence[CreatedSocket], names: Sequence[str], document: bytes
) -> bool:
    files = [
        field
        for item in created
        if item.created_path is not None and item.created_file_id is not None
        for field in (item.spec_name, item.created_path, *map(str, item.created_file_id))
    ]
    fds = [item.sock.fileno() for item in created]
    try:
        channel.sendall(_encode(["ok", str(len(names)), *names, *files]))
        channel.sendall(document)
        for start in range(0, len(fds), FDS_PER_MESSAGE):
            socket.send_fds(channel, [b"f"], fds[start : start + FDS_PER_MESSAGE])
        return channel.recv(len(ACKNOWLEDGED)) == ACKNOWLEDGED
    except OSError:
        return False  # the service is gone (EPIPE, ECONNRESET): it took nothing


def _send_quietly(channel: socket.socket, message: bytes) -> None:
    with contextlib.suppress(OSError):  # the service is gone; nobody is left to tell
        channel.sendall(message)


def receive_from_forked_activator(environ: MutableMapping[str, str]) -> Delivery | None:
    """In the re-exec'd service: take the forked activator's sockets; None if there is none.

    Afterwards the fds sit at 3.. and ``environ`` holds ``LISTEN_*`` naming
    this process and the activator marker: the state an exec-in-place
    activation leaves, adopted by the same path.  Returns the socket files
    the activator created, which are this service's now, and the manifest's
    document as the activator read it.  Raises
    ``ActivationError`` with the activator's own message when it could not
    create the sockets, or naming the variable when the channel is wrong.
    """
    text = environ.pop(ACTIVATOR_CHANNEL_VARIABLE, None)
    if text is None:
        return None
    channel_fd, activator_pid = _parse_channel(text)
    try:
        channel = socket.socket(fileno=channel_fd)
    except OSError as exc:
        raise ActivationError(
            f"{ACTIVATOR_CHANNEL_VARIABLE}={text}: fd {channel_fd} is not a socket ({exc.strerror or exc})"
        ) from None
    try:
        with channel:
            channel.setblocking(True)
            # A socketpair's peer credentials are its creator's: this very process, before its exec.
            maker = _UCRED.unpack(channel.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))[0]
            if maker != os.getpid():
                raise ActivationError(
                    f"{ACTIVATOR_CHANNEL_VARIABLE}={text}: fd {channel_fd} is not the channel this "
                    f"process made before its re-exec (it was made by {maker or 'nobody'})"
                )
            names, delivery, fds = _receive(channel, text)
            try:
                channel.sendall(ACKNOWLEDGED)
            except OSError as exc:
                close_all(partial(os.close, fd) for fd in fds)
                raise ActivationError(
                    f"the activator (pid {activator_pid}) went away before it delivered the sockets: "
                    f"{exc.strerror or exc}"
                ) from None
    finally:
        _reap(activator_pid)
    # The channel is closed: its number may be one of 3.., which the sockets take now.
    settle_listen_environment(fds, names, environ)
    environ[ACTIVATOR_MARKER] = str(os.getpid())
    return delivery


def _parse_channel(text: str) -> tuple[int, int]:
    fd_text, _, pid_text = text.partition(":")
    if not (is_decimal(fd_text) and is_decimal(pid_text)) or (
        int(pid_text) == 0  # waitpid(0) would wait for any child
    ):
        raise ActivationError(f"{ACTIVATOR_CHANNEL_VARIABLE}={text[:80]!r}: expected <fd>:<pid>")
    return int(fd_text), int(pid_text)


def _receive(channel: socket.socket, text: str) -> tuple[list[str], Delivery, list[int]]:
    """The header, the document and every fd; on any error, no fd is left open."""
    exited = f"the activator ({ACTIVATOR_CHANNEL_VARIABLE}={text}) exited without the sockets"
    header = channel.recv(HEADER_LIMIT)
    if not header:
        raise ActivationError(exited)
    names, files = _decode(header, text)
    message = channel.recv(HEADER_LIMIT)
    if not message:
        raise ActivationError(exited)
    delivery = Delivery(files, _unmarshalled(message, text))
    fds: list[int] = []
    try:
        while len(fds) < len(names):
            wanted = min(FDS_PER_MESSAGE, len(names) - len(fds))
            data, received, flags, _ = socket.recv_fds(channel, 1, wanted)
            fds.extend(received)
            if not data:
                raise ActivationError(f"the activator exited after {len(fds)} of {len(names)} sockets")
            if flags & socket.MSG_CTRUNC:
                raise ActivationError(
                    f"{len(fds)} of {len(names)} sockets arrived from the activator; "
                    "the rest were cut off (is the open file limit too low?)"
                )
    except BaseException:
        close_all(partial(os.close, fd) for fd in fds)
        raise
    return names, delivery, fds


def _unmarshalled(message: bytes, text: str) -> dict[str, Any] | None:
    # marshal, not JSON: it is built in (nothing to import), and the bytes come from
    # our own fork over a channel this process made (checked above), never from outside.
    if message == NO_DOCUMENT:
        return None
    try:
        if message[:1] != DOCUMENT_TAG:
            raise ValueError(message[:1])
        document = marshal.loads(message[1:])
        if not isinstance(document, dict):
            raise TypeError(type(document))
    except (ValueError, EOFError, TypeError):
        raise ActivationError(f"the activator ({ACTIVATOR_CHANNEL_VARIABLE}={text}) sent garbage") from None
    return document


def _reap(pid: int) -> None:
    """Wait for the activator, which exits as soon as the channel tells it the outcome."""
    with contextlib.suppress(ChildProcessError):  # not our child (a hand-made variable)
        os.waitpid(pid, 0)


def _encode(fields: Sequence[str]) -> bytes:
    return b"\0".join(field.encode("utf-8", "surrogateescape") for field in fields)


def _decode(header: bytes, text: str) -> tuple[list[str], list[SocketFileRecord]]:
    """(names, socket files) from an "ok" header; an "error" header is raised as its line."""
    if header.startswith(b"error\0"):
        raise ActivationError(header[len(b"error\0") :].decode("utf-8", "replace"))
    fields = [field.decode("utf-8", "surrogateescape") for field in header.split(b"\0")]
    try:
        if fields[0] != "ok":
            raise ValueError(fields[0])
        count = int(fields[1])
        names, rest = fields[2 : 2 + count], fields[2 + count :]
        if len(names) != count or len(rest) % FIELDS_PER_FILE:
            raise ValueError("field count")
        files = [
            (rest[i], rest[i + 1], (int(rest[i + 2]), int(rest[i + 3])))
            for i in range(0, len(rest), FIELDS_PER_FILE)
        ]
    except (ValueError, IndexError):
        raise ActivationError(f"the activator ({ACTIVATOR_CHANNEL_VARIABLE}={text}) sent garbage") from None
    return names, files
