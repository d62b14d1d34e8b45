"""Takeover: the messages by which a running service gives its listening sockets to a new process.

Layer 1: pure values and parsing, no syscalls, no trio.

Exec inheritance only reaches a process's own children; a new release
started beside the old one (by a deploy tool, a blue/green switch) takes the
old one's sockets over its control socket instead, the kernel's way: the fds
travel in ``SCM_RIGHTS`` messages (as HAProxy's ``expose-fd listeners`` and
Envoy's hot restart do).  The exchange, on one control connection:

1. new -> old: ``{"op": "takeover"}`` (a control request, `model.control`);
2. old -> new: the offer, one JSON line (`format_offer`): the fds' manifest
   names in the order they follow, the control socket's file (its fd comes
   last), the socket files the old one made, its reload history, and how
   many fd messages follow;
3. old -> new: that many messages, each one byte (`FD_MESSAGE_BYTE`) with at
   most `SCM_MAX_FD` fds attached (`batches`);
4. the new process adopts the fds through the checks inherited fds get,
   creates what its manifest adds, serves, then new -> old: ``{"op":
   "ready"}`` (or ``{"op": "failed", "error": ...}``, or it closes);
5. old -> new: ``{"ok": true}``: from then the new process answers for the
   service (control socket, pid file, socket files), and the old one stops
   accepting and drains within its grace period.  Until then the old one
   serves as if nothing happened: a takeover that fails at any step leaves it
   serving.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from ..model.records import record

__all__ = [
    "FD_MESSAGE_BYTE",
    "OFFER_VERSION",
    "READY",
    "SCM_MAX_FD",
    "Offer",
    "TakeoverError",
    "batches",
    "format_failed",
    "format_offer",
    "parse_new_side",
    "parse_offer",
]

# The kernel's limit of fds in one SCM_RIGHTS message (include/net/scm.h); more is EINVAL.
SCM_MAX_FD = 253
# The one data byte each fd message carries: a stream socket sends no message without data.
FD_MESSAGE_BYTE = b"\0"
OFFER_VERSION = 1
READY = {"op": "ready"}


class TakeoverError(ValueError):
    """A takeover message that cannot be used; the message says what is wrong, in one line."""


@record
class Offer:
    """What the old process gives: the fds' names, in order, and what the new one inherits with them."""

    pid: int
    """The old process, as it says (the new one checks it against ``SO_PEERCRED``)."""
    service: str
    names: tuple[str, ...]
    """One manifest socket name per listening fd, in the order the fds come."""
    control: Mapping[str, Any] | None
    """The control socket's file (``path``, ``dev``, ``ino``); its fd comes after the listeners'."""
    files: tuple[tuple[str, str, tuple[int, int]], ...]
    """The unix socket files the old process made: socket name, path, (device, inode) after bind()."""
    state: Mapping[str, Any]
    """The reload history and pid file, as a hand-over successor inherits them."""

    @property
    def fd_count(self) -> int:
        return len(self.names) + (self.control is not None)

    @property
    def messages(self) -> int:
        return len(batches(range(self.fd_count)))


def batches(fds: Sequence[int]) -> list[Sequence[int]]:
    """``fds`` in order, cut into messages of at most `SCM_MAX_FD`."""
    return [fds[start : start + SCM_MAX_FD] for start in range(0, len(fds), SCM_MAX_FD)]


def format_offer(offer: Offer) -> dict[str, Any]:
    """The offer's answer line (before `model.control.encode`)."""
    return {
        "ok": True,
        "takeover": {
            "version": OFFER_VERSION,
            "pid": offer.pid,
            "service": offer.service,
            "names": list(offer.names),
            "control": dict(offer.control) if offer.control is not None else None,
            "files": [[name, path, dev, ino] for name, path, (dev, ino) in offer.files],
            "state": dict(offer.state),
            "messages": offer.messages,
        },
    }


def parse_offer(line: bytes) -> Offer:
    """The old process's answer to ``{"op": "takeover"}``; `TakeoverError` if it is a refusal or malformed."""
    answer = _object(line, "the answer")
    if answer.get("ok") is not True:
        error = answer.get("error")
        raise TakeoverError(
            f"refused: {error}" if isinstance(error, str) else "refused, with no reason given"
        )
    body = answer.get("takeover")
    if not isinstance(body, dict):
        raise TakeoverError(
            "the answer has no 'takeover' object (is the other side a trio-activate service?)"
        )
    if body.get("version") != OFFER_VERSION:
        raise TakeoverError(f"offer version {body.get('version')!r}: this release reads {OFFER_VERSION}")
    pid, service, names = body.get("pid"), body.get("service"), body.get("names")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        raise TakeoverError(f"offer: 'pid' must be a positive integer, got {pid!r}")
    if not isinstance(service, str):
        raise TakeoverError("offer: 'service' must be a string")
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise TakeoverError("offer: 'names' must be a list of socket names")
    control = body.get("control")
    if control is not None and not (
        isinstance(control, dict)
        and isinstance(control.get("path"), str)
        and all(isinstance(control.get(key), int) for key in ("dev", "ino"))
    ):
        raise TakeoverError("offer: 'control' must be null or an object with path, dev and ino")
    files = body.get("files")
    if not isinstance(files, list):
        raise TakeoverError("offer: 'files' must be a list")
    parsed_files = []
    for item in files:
        if not (
            isinstance(item, list)
            and len(item) == 4
            and isinstance(item[0], str)
            and isinstance(item[1], str)
            and all(isinstance(n, int) and not isinstance(n, bool) for n in item[2:])
        ):
            raise TakeoverError(f"offer: each of 'files' must be [name, path, dev, ino], got {item!r:.60}")
        parsed_files.append((item[0], item[1], (item[2], item[3])))
    state = body.get("state")
    if not isinstance(state, dict):
        raise TakeoverError("offer: 'state' must be an object")
    offer = Offer(pid, service, tuple(names), control, tuple(parsed_files), state)
    if body.get("messages") != offer.messages:
        raise TakeoverError(
            f"offer: {offer.fd_count} fd(s) come in {offer.messages} message(s), "
            f"but it says {body.get('messages')!r}"
        )
    return offer


def format_failed(reason: str) -> dict[str, Any]:
    """The new process's last line when it cannot serve: the old one logs the reason and serves on."""
    return {"op": "failed", "error": reason}


def parse_new_side(line: bytes) -> str | None:
    """The new process's line after the fds: None for ready, else the reason it gives (or the problem)."""
    try:
        message = _object(line, "the line")
    except TakeoverError as exc:
        return str(exc)
    if message == READY:
        return None
    if message.get("op") == "failed" and isinstance(message.get("error"), str):
        return f"it failed: {message['error']}"
    return f"unexpected line {json.dumps(message)[:80]}"


def _object(line: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise TakeoverError(f"{what} is not a JSON line: {exc}") from None
    if not isinstance(value, dict):
        raise TakeoverError(f"{what} is not a JSON object")
    return value
