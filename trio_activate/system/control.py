"""The control socket's fds, its peer check and its client; the pid file; telling a service's PID.

What this module owns
---------------------
- `ControlSocket`: the listening sockets of the control protocol
  (`trio_activate.model.control`): the socket file (mode 0600) and the
  abstract name of this PID, which lets ``status PID`` find it.  Created by
  the process that answers for the service (a supervisor, or one ``serve``
  process), or adopted by a hand-over successor, which inherits the file's
  fd as it inherits the listeners (`ControlSocket.handover`) and binds the
  abstract name of its own PID.
- `peer_credentials`: ``SO_PEERCRED`` of a connection.
- `ask`: the blocking client of ``status`` and ``reload``.
- `write_pid_file`, `remove_pid_file`: written by rename, removed only while
  it still names this process.
- `service_problem`: whether a PID is a trio-activate service, from its
  ``/proc/PID/cmdline``, before ``reload`` signals it.

Layer 2: syscalls, no trio.

Resource handling: a `ControlSocket` owns its sockets until ``close()``,
which removes the socket file only when asked to (the service stops, not a
hand-over) and only while the path is still the file it bound or adopted.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import stat
import struct
import time
from typing import Any, Protocol

from ..errors import ActivationError
from ..model.control import ANSWER_MAX, abstract_name, encode
from .create import remove_socket_file_if_same

__all__ = [
    "ControlClientError",
    "ControlSocket",
    "NoControlSocket",
    "ask",
    "peer_credentials",
    "remove_pid_file",
    "service_problem",
    "write_pid_file",
]

log = logging.getLogger("trio_activate")

# Unix socket paths: sun_path holds 108 bytes, NUL included.
_PATH_MAX = 107
_BACKLOG = 16


class ControlSocket:
    """The control socket's listening fds; see the module docstring."""

    def __init__(self, path: str, file_sock: socket.socket, file_id: tuple[int, int]) -> None:
        self.path = path
        self.file_sock = file_sock
        self.file_id = file_id
        self.abstract: socket.socket | None = None

    @property
    def listeners(self) -> list[socket.socket]:
        return [self.file_sock] + ([self.abstract] if self.abstract is not None else [])

    @classmethod
    def create(cls, path: str, *, where: str) -> ControlSocket:
        """Bind ``path`` (mode 0600: the owner and root only), then this PID's abstract name.

        ``where`` names the setting in errors (``--control``, ``service.toml:
        service.control``).  A stale socket file (nobody listens) is replaced;
        a live one, or a file that is no socket, is a `ActivationError`.
        """
        path = os.path.abspath(path)
        if len(os.fsencode(path)) > _PATH_MAX:
            raise ActivationError(
                f"{where}: {path}: too long for a unix socket path (at most {_PATH_MAX} bytes)"
            )
        _clear_stale(path, where)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            # Created as 0600 (umask), not chmod-ed after: no moment at which another user may connect.
            # Called before the service starts any thread.
            old_umask = os.umask(0o177)
            try:
                sock.bind(path)
            finally:
                os.umask(old_umask)
            st = os.lstat(path)
            sock.listen(_BACKLOG)
        except OSError as exc:
            sock.close()
            raise ActivationError(
                f"{where}: {path}: cannot make the control socket: {_describe(exc)}"
            ) from None
        except BaseException:
            sock.close()
            raise
        control = cls(path, sock, (st.st_dev, st.st_ino))
        control.bind_abstract()
        return control

    @classmethod
    def adopt(cls, state: dict[str, Any]) -> ControlSocket | None:
        """A hand-over successor's control socket, from what `handover` described; None if unusable
        (one warning: the successor serves without it)."""
        try:
            fd = int(state["fd"])
            path = str(state["path"])
            file_id = (int(state["dev"]), int(state["ino"]))
            sock = socket.socket(fileno=fd)
        except (KeyError, TypeError, ValueError, OSError) as exc:
            log.warning("the predecessor's control socket is unusable (%s); serving without it", exc)
            return None
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            sock.close()
            log.warning("fd %d passed as the control socket is no unix stream socket; serving without it", fd)
            return None
        sock.set_inheritable(False)
        control = cls(path, sock, file_id)
        control.bind_abstract()
        return control

    def bind_abstract(self) -> None:
        """Listen at this PID's abstract name too; a warning, not an error, when it cannot."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(abstract_name(os.getpid()))
            sock.listen(_BACKLOG)
        except OSError as exc:
            sock.close()
            log.warning(
                "control: cannot listen at the abstract name of PID %d: %s", os.getpid(), _describe(exc)
            )
            return
        self.abstract = sock

    def handover(self) -> tuple[int, dict[str, Any]]:
        """The fd a hand-over successor inherits, and what it needs to adopt it (`adopt`)."""
        fd = self.file_sock.fileno()
        return fd, {"fd": fd, "path": self.path, "dev": self.file_id[0], "ino": self.file_id[1]}

    def close(self, *, remove: bool) -> None:
        """Close every fd; with ``remove``, unlink the file first while it is still ours."""
        if remove:
            remove_socket_file_if_same(self.path, self.file_id)
        for sock in self.listeners:
            sock.close()


def _clear_stale(path: str, where: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ActivationError(f"{where}: {path}: {_describe(exc)}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ActivationError(f"{where}: {path}: exists and is not a socket; not replacing it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            pass  # nobody listens: a socket file left behind
        except OSError as exc:
            raise ActivationError(f"{where}: {path}: {_describe(exc)}") from None
        else:
            raise ActivationError(f"{where}: {path}: another process listens there (a running service?)")
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ActivationError(
            f"{where}: {path}: cannot remove the stale socket file: {_describe(exc)}"
        ) from None


class _Socket(Protocol):
    def getsockopt(self, level: int, option: int, buffersize: int, /) -> bytes: ...


def peer_credentials(sock: _Socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end, as the kernel recorded it at connect."""
    size = struct.calcsize("3i")
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, size))
    return pid, uid, gid


class ControlClientError(Exception):
    """A control request got no answer; the message says why, in one line."""


class NoControlSocket(ControlClientError):
    """Nobody listens at the address: the service has no control socket (or is gone)."""


def ask(address: str | bytes, op: str, *, timeout: float, expect_pid: int | None = None) -> dict[str, Any]:
    """Send ``{"op": op}`` to the control socket at ``address``; the answer object.

    ``expect_pid``: the listener must be that process (an abstract name anyone could bind).
    """
    shown = address if isinstance(address, str) else f"the control socket of PID {expect_pid}"
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout)
        try:
            try:
                sock.connect(address)
            except (ConnectionRefusedError, FileNotFoundError) as exc:
                raise NoControlSocket(f"{shown}: {_describe(exc)}") from None
            if expect_pid is not None and peer_credentials(sock)[0] != expect_pid:
                raise ControlClientError(f"{shown}: another process listens there")
            # A service that refuses us answers and closes at once, perhaps before our request
            # is sent: its answer is still there to read.
            with contextlib.suppress(BrokenPipeError):
                sock.sendall(encode({"op": op}))
            data = b""
            while not data.endswith(b"\n"):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ControlClientError(f"{shown}: no answer within {timeout:g}s")
                sock.settimeout(left)
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
                if len(data) > ANSWER_MAX:
                    raise ControlClientError(f"{shown}: the answer is longer than {ANSWER_MAX} bytes")
        except TimeoutError:
            raise ControlClientError(f"{shown}: no answer within {timeout:g}s") from None
        except OSError as exc:
            raise ControlClientError(f"{shown}: {_describe(exc)}") from None
    if not data.endswith(b"\n"):
        raise ControlClientError(f"{shown}: the service closed the connection without an answer")
    try:
        answer = json.loads(data)
    except ValueError:
        raise ControlClientError(f"{shown}: the answer is not JSON") from None
    if not isinstance(answer, dict) or not isinstance(answer.get("ok"), bool):
        raise ControlClientError(f"{shown}: the answer is not a control answer")
    return answer


def write_pid_file(path: str, pid: int, *, where: str) -> None:
    """``path`` names ``pid``, replaced in one rename (a reader never sees it half written)."""
    # Named by the writer: a predecessor and its successor may both write the successor's PID at once.
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, f"{pid}\n".encode())
        finally:
            os.close(fd)
        os.rename(temporary, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise ActivationError(f"{where}: {path}: cannot write the pid file: {_describe(exc)}") from None


def remove_pid_file(path: str, pid: int) -> None:
    """Remove ``path`` if it still names ``pid`` (a successor may have rewritten it)."""
    try:
        with open(path, encoding="ascii", errors="replace") as file:
            text = file.read(32).strip()
    except FileNotFoundError:
        return
    except OSError as exc:
        log.warning("cannot read the pid file %s before removing it: %s", path, _describe(exc))
        return
    if text != str(pid):
        return
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove the pid file %s: %s", path, _describe(exc))


def service_problem(pid: int) -> str | None:
    """None when process ``pid`` is a trio-activate ``serve`` or ``dev``; else why it is not one."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            raw = file.read(65536)
    except FileNotFoundError:
        # Gone, or hidden: under /proc's hidepid=invisible (systemd's ProtectProc=invisible) a
        # process of the same user that is not dumpable (it changed credentials, as a unit's
        # DynamicUser= or User= service did) has no /proc entry for us, yet we may signal it.
        # That is `ExecReload=trio-activate reload $MAINPID` in every generated unit: the
        # manager names the PID, and the sandbox hides it.  kill(pid, 0) tells the two apart.
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return f"PID {pid}: no such process"
        except PermissionError:
            return f"PID {pid} is not a trio-activate service this user may signal"
        return None
    except OSError as exc:
        return f"PID {pid}: cannot read /proc/{pid}/cmdline: {_describe(exc)}"
    argv = [part.decode(errors="replace") for part in raw.split(b"\0")]
    if raw.endswith(b"\0"):
        argv.pop()
    if not argv:
        return f"PID {pid} is not a trio-activate service (no command line: a kernel thread or a zombie)"
    ours = any(
        os.path.basename(arg) == "trio-activate"
        or (arg == "-m" and index + 1 < len(argv) and argv[index + 1] == "trio_activate")
        for index, arg in enumerate(argv[:3])
    )
    if ours and any(arg in ("serve", "dev") for arg in argv):
        return None
    shown = " ".join(argv)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return f"PID {pid} is not a trio-activate service ({shown!r})"


def _describe(exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return "address already in use"
    return exc.strerror or str(exc)
