"""``trio-activate fds``: show what ``LISTEN_*`` passed to this process.

Layer 2 (syscalls, no trio).  Each fd is inspected in place, never adopted:
nothing is closed, so the report changes nothing it reports on.

The JSON form is stable for scripts::

    {"activated": bool, "reason": str | null,
     "fds": [{"fd": int, "name": str, "family": "inet" | "inet6" | "unix",
              "type": "stream" | "datagram" | "seqpacket", "listening": bool, "address": str}]}

With a manifest, each fd also gets ``"socket"``: the manifest socket that
claims it, ``"connection"`` for an ``Accept=yes`` connection, or null.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from typing import Any

from ..errors import ActivationError
from ..model.listen_env import ListenFds, take_listen_env
from ..model.manifest import Manifest
from ..model.match import PassedSocket, match_passed
from .fds import inspect_fd, own_pidfd_id

__all__ = ["describe_passed", "report_fds"]

FAMILIES: dict[int, str] = {socket.AF_INET: "inet", socket.AF_INET6: "inet6", socket.AF_UNIX: "unix"}
TYPES: dict[int, str] = {
    socket.SOCK_STREAM: "stream",
    socket.SOCK_DGRAM: "datagram",
    socket.SOCK_SEQPACKET: "seqpacket",
}


def describe_passed(found: PassedSocket) -> dict[str, Any]:
    return {
        "fd": found.fd,
        "name": found.name,
        "family": FAMILIES.get(found.family, str(found.family)),
        "type": TYPES.get(found.type, str(found.type)),
        "listening": found.listening,
        "address": str(found.address) if found.address is not None else "",
    }


def report_fds(manifest: Manifest | None, *, as_json: bool) -> int:
    found = take_listen_env(os.environ, pid=os.getpid(), pidfd_id=own_pidfd_id())
    if not isinstance(found, ListenFds):
        _print({"activated": False, "reason": found.reason, "fds": []}, as_json)
        return 0
    passed = [inspect_fd(fd, name) for fd, name in zip(found.fds, found.names, strict=True)]
    entries = [describe_passed(p) for p in passed]
    problem = None
    if manifest is not None:
        claims: dict[int, str | None] = {p.fd: None for p in passed}
        try:
            match = match_passed(manifest, passed, names_given=found.names_given)
        except ActivationError as exc:
            problem = str(exc)
        else:
            for name, fds in match.by_socket.items():
                for fd in fds:
                    claims[fd] = name
            if match.connection is not None:
                claims[match.connection] = "connection"
            for warning in match.warnings:
                print(f"trio-activate: warning: {warning}", file=sys.stderr)
        for entry in entries:
            entry["socket"] = claims[entry["fd"]]
    _print({"activated": True, "reason": None, "fds": entries}, as_json)
    if problem is not None:
        print(f"trio-activate: {problem}", file=sys.stderr)
        return 2
    return 0


def _print(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(report))
        return
    if not report["activated"]:
        print(f"not activated: {report['reason']}")
        return
    for entry in report["fds"]:
        state = "listening" if entry["listening"] else "connected" if entry["type"] == "stream" else "bound"
        line = (
            f"fd {entry['fd']}: name {entry['name']!r}, {entry['family']} {entry['type']}, "
            f"{state}, {entry['address'] or '(unnamed)'}"
        )
        if "socket" in entry:
            claim = entry["socket"]
            line += " -> " + (
                "unclaimed" if claim is None else claim if claim == "connection" else f"sockets.{claim}"
            )
        print(line)
