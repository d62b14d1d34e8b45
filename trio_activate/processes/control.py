"""The control socket and the pid file of the process that answers for a service.

Layer 4.  A supervisor (``supervise_main``) or one ``serve`` process
(``service_main``) makes its `Operated` before trio runs: the control socket
(`trio_activate.system.control.ControlSocket`) bound or adopted from a
predecessor, the pid file's path, the reloads' history.  Once the service
serves, `Operated.serve` writes the pid file and answers the control socket
(`trio_activate.runtime.control.serve_control`) until the service stops.

A single-process hand-over passes the control socket's fd to the successor
with the listeners (`successor_state`), with the pid file's path and the
history: the socket file keeps its inode, so a client never finds the path
missing or bound twice, and the predecessor, which stops accepting on it the
moment it hands over, neither removes it nor keeps answering.  At that same
moment (when it tells the manager ``MAINPID=``) the predecessor rewrites the
pid file to name the successor.

Who closes what: `Operated.close` closes the control socket (removing its file
unless a successor took it over) and removes the pid file while it names
this process.  The caller calls it once trio returned.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import trio

from ..model.address import address_from_sockname
from ..model.manifest import HandlerKind, Manifest
from ..model.private_env import HANDOFF_STATE_VARIABLE
from ..model.records import record
from ..runtime.control import ReloadHistory, Takeover, serve_control
from ..system.acquire import ServiceSockets
from ..system.control import ControlSocket, remove_pid_file, write_pid_file

__all__ = ["ControlOptions", "Operated"]

log = logging.getLogger("trio_activate")

_KINDS = {socket.SOCK_STREAM: "stream", socket.SOCK_DGRAM: "datagram", socket.SOCK_SEQPACKET: "seqpacket"}


@record
class ControlOptions:
    """Where the control socket and the pid file go (None: none), and the setting that said so."""

    control: str | None = None
    control_where: str = "--control"
    pid_file: str | None = None
    pid_file_where: str = "--pid-file"


class Operated:
    """One answering process's control socket, pid file and reload history; see the module docstring."""

    def __init__(
        self, options: ControlOptions, *, mode: str, inherited: Mapping[str, Any] | None = None
    ) -> None:
        self.mode = mode
        self.pid_file = options.pid_file
        self.pid_file_where = options.pid_file_where
        self.control: ControlSocket | None = None
        self.handed_over = False
        # Whether the control socket's file is ours to remove at the stop: a hand-over
        # successor's only once its predecessor has exited (before, a failed hand-over
        # leaves it the predecessor's).
        self.owns_files = inherited is None
        self.history = ReloadHistory()
        if inherited is not None:
            self._inherit(inherited)
        elif options.control is not None:
            self.control = ControlSocket.create(options.control, where=options.control_where)

    @classmethod
    def for_successor(cls, mode: str, environ: dict[str, str] | os._Environ[str]) -> Operated | None:
        """A hand-over successor's, from its predecessor's `successor_state`; None if not one."""
        text = environ.pop(HANDOFF_STATE_VARIABLE, None)
        if text is None:
            return None
        try:
            state = json.loads(text)
            if not isinstance(state, dict):
                raise ValueError("not an object")
        except ValueError:
            log.warning("ignoring malformed %s: no control socket or pid file", HANDOFF_STATE_VARIABLE)
            return None
        return cls(ControlOptions(), mode=mode, inherited=state)

    def _inherit(self, state: Mapping[str, Any]) -> None:
        pid_file = state.get("pid_file")
        self.pid_file = pid_file if isinstance(pid_file, str) else None
        self.pid_file_where = "the pid file"
        try:
            last = state.get("last_reload")
            self.history = ReloadHistory(
                generation=int(state["generation"]),
                reloads=int(state["reloads"]),
                started=float(state["started"]),
                last=last if isinstance(last, dict) else None,
            )
        except (KeyError, TypeError, ValueError):
            self.history = ReloadHistory()
        control = state.get("control")
        if isinstance(control, dict):
            self.control = ControlSocket.adopt(control)

    @classmethod
    def for_takeover(cls, options: ControlOptions, *, mode: str, inherited: Mapping[str, Any]) -> Operated:
        """A process that took a running service over (``serve --takeover``): the old one's history
        and control socket; its own pid file if it names one, else the old one's."""
        operated = cls(ControlOptions(), mode=mode, inherited=inherited)
        if options.pid_file is not None:
            operated.pid_file, operated.pid_file_where = options.pid_file, options.pid_file_where
        return operated

    def inheritance(self, message: str) -> tuple[int | None, dict[str, Any]]:
        """What a process that takes over from this one inherits, as if it took over with
        ``message``: the control socket's fd (None: none), and the state that describes it all."""
        state: dict[str, Any] = {
            "generation": self.history.generation + 1,
            "reloads": self.history.reloads + 1,
            "started": self.history.started,
            "last_reload": {"ok": True, "message": message, "at": time.time()},
            "pid_file": self.pid_file,
            "control": None,
        }
        fd = None
        if self.control is not None:
            fd, state["control"] = self.control.handover()
        return fd, state

    def successor_state(self, successor_message: str) -> tuple[list[int], dict[str, str]]:
        """The fds a hand-over successor inherits and its private variable, as if the reload
        under way took over with ``successor_message``."""
        fd, state = self.inheritance(successor_message)
        return ([] if fd is None else [fd]), {HANDOFF_STATE_VARIABLE: json.dumps(state)}

    def fields(self) -> dict[str, Any]:
        """The status document's fields about this process."""
        return {
            "pid": os.getpid(),
            **self.history.fields(),
            "control": self.control.path if self.control is not None else None,
            "pid_file": self.pid_file,
        }

    def write_pid_file(self, pid: int | None = None) -> None:
        if self.pid_file is not None:
            write_pid_file(self.pid_file, os.getpid() if pid is None else pid, where=self.pid_file_where)

    def handed_over_to(self, pid: int) -> None:
        """A successor took over: the pid file names it from now on; the control socket is its."""
        self.handed_over = True
        if self.pid_file is not None:
            try:
                self.write_pid_file(pid)
            except Exception as exc:  # one line: the hand-over is done anyway
                log.warning("%s", exc)

    async def serve(
        self,
        *,
        status: Callable[[], dict[str, Any]],
        reload: Callable[[], Awaitable[tuple[bool, str]]],
        stop_accepting: trio.Event,
        takeover: Takeover | None = None,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serving now: write the pid file, answer the control socket until cancelled."""
        try:
            self.write_pid_file()
        except Exception as exc:  # one line: the service serves on
            log.error("%s", exc)
        if self.control is None:
            task_status.started()
            return
        await serve_control(
            self.control.listeners,
            status=status,
            reload=reload,
            stop_accepting=stop_accepting,
            takeover=takeover,
            task_status=task_status,
        )

    def close(self) -> None:
        """Close the control socket (its file removed unless handed over); the pid file if it names us."""
        if self.control is not None:
            self.control.close(remove=self.owns_files and not self.handed_over)
            self.control = None
        if self.pid_file is not None:
            remove_pid_file(self.pid_file, os.getpid())


def socket_entries(owned: ServiceSockets) -> list[dict[str, Any]]:
    """The status document's ``sockets``."""
    entries = []
    for name, group in owned.sockets.items():
        for sock in group:
            try:
                address = address_from_sockname(sock.family, sock.getsockname())
                shown = str(address) if address is not None else "(unnamed)"
                fd = sock.fileno()
            except OSError:
                shown, fd = "(closed)", -1
            kind = _KINDS.get(sock.type, str(sock.type))
            entries.append({"name": name, "address": shown, "type": kind, "fd": fd})
    return entries


def handler_entries(manifest: Manifest, in_flight: Mapping[str, int | None]) -> list[dict[str, Any]]:
    """The status document's ``handlers``."""
    return [
        {
            "name": spec.name,
            "kind": spec.kind.value,
            "sockets": list(spec.sockets),
            "in_flight": in_flight.get(spec.name) if spec.kind is HandlerKind.STREAM else None,
        }
        for spec in manifest.handlers
    ]


def resolve_options(
    manifest: Manifest,
    *,
    control: str | None,
    pid_file: str | None,
    environ: Mapping[str, str],
) -> ControlOptions:
    """The command line's paths, else the manifest's (relative to its folder), else the default control
    socket under ``$RUNTIME_DIRECTORY``."""
    from ..model.control import default_control_path

    source = manifest.source
    control_path: str | None
    if control is not None:
        control_path, control_where = os.path.abspath(control), "--control"
    elif manifest.service.control is not None:
        control_path = str(manifest.folder / manifest.service.control)
        control_where = f"{source}: service.control"
    else:
        control_path = default_control_path(environ)
        control_where = "RUNTIME_DIRECTORY"
    if pid_file is not None:
        pid_path: str | None = os.path.abspath(pid_file)
        pid_where = "--pid-file"
    elif manifest.service.pid_file is not None:
        pid_path = str(manifest.folder / manifest.service.pid_file)
        pid_where = f"{source}: service.pid-file"
    else:
        pid_path, pid_where = None, "--pid-file"
    return ControlOptions(control_path, control_where, pid_path, pid_where)
