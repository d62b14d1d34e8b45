"""The ``trio_activate`` logger's one handler: stderr, in the format ``--log-format`` picks.

Layer 5.  The lines' shapes are the model's (`trio_activate.model.log_lines`),
whether stderr leads to journald is the system layer's
(`trio_activate.system.journal_stream`); this module wires them to `logging`.

``auto`` is ``journal`` when ``JOURNAL_STREAM`` names stderr, else ``text``.
A process started by trio-activate itself (a supervisor's worker, a
hand-over successor) decides the same way over the stderr it inherited, and
is given the format its parent resolved (``worker_argv``).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

from ..model.log_lines import FIELDS, journal_text, json_line, local_time, syslog_priority
from ..system.journal_stream import is_journal_stream

__all__ = ["LineFormatter", "configure_logging", "resolve_format"]

log = logging.getLogger("trio_activate")


def resolve_format(chosen: str, stream: TextIO) -> str:
    """``text``, ``journal`` or ``json``: `chosen`, with ``auto`` decided by where `stream` goes."""
    if chosen != "auto":
        return chosen
    try:
        fd = stream.fileno()
    except (AttributeError, ValueError, OSError):  # a stream in memory (pytest's capture)
        return "text"
    return "journal" if is_journal_stream(fd, os.environ) else "text"


class LineFormatter(logging.Formatter):
    """A record as one line of `format_name` (several for a traceback in text and journal).

    ``pid``: the PID the lines speak for, when not this process's own (the
    forked activator's, for the service it starts).  ``worker``: this process
    is one trio-activate started (see `configure_logging`).
    """

    def __init__(self, format_name: str, *, pid: int | None = None, worker: bool = False) -> None:
        super().__init__()
        self.format_name = format_name
        self.pid = pid
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        pid = self.pid if self.pid is not None else (record.process or os.getpid())
        level = record.levelname.lower()
        exception = self._exception_text(record)
        if self.format_name == "json":
            return json_line(
                seconds=record.created,
                level=level,
                pid=pid,
                logger=record.name,
                message=message,
                fields={name: getattr(record, name, None) for name in FIELDS},
                exception=exception,
            )
        text = message if exception is None else f"{message}\n{exception}"
        if self.format_name == "journal":
            # journald attributes a line to the process that opened the stream (the
            # service's main process, the supervisor), not to the one that wrote it,
            # when it cannot tell: every worker writes to that same stream.  So a
            # worker's lines carry its PID, and the main process's do not.
            tag = f"worker {pid}: " if self.worker else ""
            return journal_text(syslog_priority(record.levelno), text, tag=tag)
        return f"{local_time(record.created)} trio-activate[{pid}]: {level}: {text}"

    def _exception_text(self, record: logging.LogRecord) -> str | None:
        parts = []
        if record.exc_info:
            parts.append(self.formatException(record.exc_info))
        if record.stack_info:
            parts.append(self.formatStack(record.stack_info))
        return "\n".join(parts) if parts else None


def configure_logging(
    level: str, chosen_format: str = "auto", *, speaking_for: int | None = None, worker: bool = False
) -> str:
    """Log lines of `level` and above on stderr, in `chosen_format`; returns the format resolved.

    ``speaking_for``: the PID to show instead of this process's own, for a
    helper process whose lines belong to another (the forked activator's, to
    the service it starts).  ``worker``: this process is a supervisor's worker
    or a hand-over successor, not the process the service manager started:
    under journald its lines name its PID.
    """
    # Replace, not add: main() may run many times in one process (tests, embedding),
    # and sys.stderr may have been swapped since the last call.
    for old in [h for h in log.handlers if getattr(h, "trio_activate_cli", False)]:
        log.removeHandler(old)
    resolved = resolve_format(chosen_format, sys.stderr)
    handler = logging.StreamHandler(sys.stderr)
    handler.trio_activate_cli = True  # type: ignore[attr-defined]
    handler.setFormatter(LineFormatter(resolved, pid=speaking_for, worker=worker))
    log.addHandler(handler)
    log.setLevel(level.upper())
    log.propagate = False
    return resolved
