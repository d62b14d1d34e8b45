"""The control protocol: requests, answers, the status document and its text, where the socket is.

Layer 1: pure values and parsing, no syscalls, no trio.

The protocol
------------
A client connects to the control socket (a unix stream socket), sends one
request, a JSON object on one line, and reads one answer, a JSON object on
one line; then the service closes the connection.  A request is at most
`REQUEST_MAX` bytes, newline included, and must arrive within
`REQUEST_TIMEOUT` seconds of the connection; anything else is answered (when
the peer still listens) with an error and closed::

    {"op": "status"}   ->  {"ok": true, "status": {...the status document...}}
    {"op": "reload"}   ->  {"ok": true, "message": "Generation 2: 2 worker(s) (..)"}
                       or  {"ok": false, "error": "Reload failed: ...; still serving generation 1"}
    {"op": "takeover"} ->  the offer, then the listening sockets' fds: see `model.takeover`
                           (the connection stays open until the new process serves)
    anything else      ->  {"ok": false, "error": "<what is wrong, one line>"}

``reload`` answers once the reload's outcome is known: the new generation
serves (a supervisor) or the successor took over (one process), or it failed
and the old code serves on.

The status document (``STATUS_VERSION``; keys are only ever added)::

    {"version": 1, "service": "echo", "mode": "single" | "supervisor" | "dev",
     "pid": 4711,                 # the process that answers: the one to signal
     "generation": 2,             # reloads that took over, plus 1
     "started": 1765000000.0,     # when the service started (seconds since the epoch)
     "uptime": 12.5,              # seconds since then
     "reloads": 1,                # reloads that took over
     "last_reload": null | {"ok": true, "message": "...", "at": 1765000010.0},
     "control": "/run/echo/control.sock" | null, "pid_file": "/run/echo.pid" | null,
     "workers": [{"pid": 4713, "generation": 2, "ready": true, "stopping": false,
                  "in_flight": {"web": 3}}],           # [] for one process
     "sockets": [{"name": "web", "address": "127.0.0.1:8000", "type": "stream", "fd": 3}],
     "handlers": [{"name": "web", "kind": "stream", "sockets": ["web"],
                   "in_flight": 3 | null}]}           # null: not counted (asgi, datagram, listener)

Where the socket is: ``[service] control`` or ``serve --control``, else
``$RUNTIME_DIRECTORY/control.sock`` when systemd sets ``RUNTIME_DIRECTORY``,
else none.  The process that has one also listens at the abstract name
`abstract_name` of its PID, so that ``status PID`` and ``reload --wait PID``
find it from the PID alone (same network namespace, as ``reload --wait``'s
outcome socket).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "ANSWER_MAX",
    "CONNECTIONS_FIELD",
    "CONTROL_FILE_NAME",
    "OPS",
    "REQUEST_MAX",
    "REQUEST_TIMEOUT",
    "STATUS_VERSION",
    "ControlRequestError",
    "abstract_name",
    "default_control_path",
    "encode",
    "format_connections",
    "format_status",
    "parse_connections",
    "parse_request",
]

CONTROL_FILE_NAME = "control.sock"
OPS = ("status", "reload", "takeover")
REQUEST_MAX = 4096
REQUEST_TIMEOUT = 5.0
# An answer is read up to this size by the client (a status of many workers and sockets).
ANSWER_MAX = 1 << 20
STATUS_VERSION = 1
# The connections-in-flight report a supervised worker sends its supervisor, in a notify datagram.
CONNECTIONS_FIELD = "X_TRIO_ACTIVATE_CONNECTIONS"


class ControlRequestError(ValueError):
    """A request that cannot be answered; the message says why, in one line."""


def abstract_name(pid: int) -> bytes:
    """The abstract socket name at which process ``pid``'s control server also listens."""
    return f"\0trio-activate/control/{pid}".encode()


def default_control_path(environ: Mapping[str, str]) -> str | None:
    """``$RUNTIME_DIRECTORY/control.sock`` (its first folder, when systemd lists several), or None."""
    folders = environ.get("RUNTIME_DIRECTORY", "")
    first = folders.split(":")[0]
    if not first.startswith("/"):
        return None
    return first.rstrip("/") + "/" + CONTROL_FILE_NAME


def parse_request(data: bytes) -> str:
    """The op of one request line (its newline removed); `ControlRequestError` otherwise."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ControlRequestError(f"not UTF-8 (byte {exc.start})") from None
    try:
        request = json.loads(text)
    except ValueError as exc:
        raise ControlRequestError(f"not JSON: {exc}") from None
    if not isinstance(request, dict):
        raise ControlRequestError(f"expected a JSON object, got {type(request).__name__}")
    unknown = sorted(set(request) - {"op"})
    if unknown:
        raise ControlRequestError(f"unknown key {unknown[0]!r}; a request has only 'op'")
    op = request.get("op")
    if op not in OPS:
        shown = json.dumps(op)[:40] if op is not None else "none"
        raise ControlRequestError(f"op {shown}: expected one of {', '.join(OPS)}")
    assert isinstance(op, str)
    return op


def encode(answer: Mapping[str, Any]) -> bytes:
    """One answer (or request) as its line."""
    return json.dumps(answer, separators=(", ", ": ")).encode() + b"\n"


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h {minutes}m"
    if hours:
        return f"{hours}h {minutes}m {secs}s"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def _table(rows: Sequence[Sequence[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        (indent + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))).rstrip()
        for row in rows
    ]


def format_status(status: Mapping[str, Any]) -> str:
    """The status document as a short aligned text, for people (scripts read ``--json``)."""
    last = status.get("last_reload")
    if last is None:
        last_text = "none"
    else:
        at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last.get("at", 0)))
        last_text = f"{'ok' if last.get('ok') else 'failed'} at {at}: {last.get('message', '')}"
    pairs = [
        ("service", f"{status.get('service')} ({status.get('mode')})"),
        ("pid", str(status.get("pid"))),
        ("generation", str(status.get("generation"))),
        ("uptime", _duration(float(status.get("uptime", 0)))),
        ("reloads", str(status.get("reloads"))),
        ("last reload", last_text),
    ]
    if status.get("control"):
        pairs.append(("control", str(status["control"])))
    if status.get("pid_file"):
        pairs.append(("pid file", str(status["pid_file"])))
    width = max(len(key) for key, _ in pairs) + 1
    lines = [f"{(key + ':').ljust(width)} {value}" for key, value in pairs]
    workers = status.get("workers") or []
    if workers:
        lines.append("workers:")
        rows = [["PID", "GENERATION", "STATE", "IN FLIGHT"]]
        for worker in workers:
            state = "stopping" if worker.get("stopping") else "ready" if worker.get("ready") else "starting"
            flight = worker.get("in_flight") or {}
            rows.append(
                [
                    str(worker.get("pid")),
                    str(worker.get("generation")),
                    state,
                    ", ".join(f"{name} {count}" for name, count in sorted(flight.items())) or "-",
                ]
            )
        lines += _table(rows)
    sockets = status.get("sockets") or []
    if sockets:
        lines.append("sockets:")
        rows = [["NAME", "FD", "TYPE", "ADDRESS"]]
        for entry in sockets:
            rows.append([str(entry.get(key)) for key in ("name", "fd", "type", "address")])
        lines += _table(rows)
    handlers = status.get("handlers") or []
    if handlers:
        lines.append("handlers:")
        rows = [["NAME", "KIND", "IN FLIGHT", "SOCKETS"]]
        for handler in handlers:
            flight = handler.get("in_flight")
            rows.append(
                [
                    str(handler.get("name")),
                    str(handler.get("kind")),
                    "-" if flight is None else str(flight),
                    ", ".join(handler.get("sockets") or []),
                ]
            )
        lines += _table(rows)
    return "\n".join(lines) + "\n"


def parse_connections(text: str) -> dict[str, int]:
    """A worker's ``X_TRIO_ACTIVATE_CONNECTIONS`` value (a JSON object of handler name to count);
    whatever is malformed counts as nothing."""
    try:
        counts = json.loads(text)
    except ValueError:
        return {}
    if not isinstance(counts, dict):
        return {}
    return {
        str(name): count
        for name, count in counts.items()
        if isinstance(count, int) and not isinstance(count, bool) and count >= 0
    }


def format_connections(counts: Mapping[str, int]) -> str:
    return json.dumps(dict(counts), separators=(",", ":"))
