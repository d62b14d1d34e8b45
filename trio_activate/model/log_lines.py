"""What one log line looks like in each format: text, journal (syslog priority prefix) and JSON.

Layer 1, pure: the CLI's logging handler (`trio_activate.cli.logs`) calls
these with what a log record holds (its time, level, PID, message, fields);
nothing here reads the clock, the environment or an fd.

The formats (``--log-format``):

- ``text``, for a terminal or a file: ``2026-12-04 19:58:01.123
  trio-activate[PID]: info: message``, the local time with milliseconds.
- ``journal``, for journald's stream (``JOURNAL_STREAM`` naming stderr):
  ``<6>message``.  journald reads the ``<N>`` prefix of each line as its
  syslog priority (sd-daemon(3)), so ``journalctl -p warning`` filters, and
  it adds the time, the name and the PID itself.
- ``json``, for log shippers: one object per line, see `json_line`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping

from .text import is_decimal

__all__ = [
    "FIELDS",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "journal_text",
    "json_line",
    "local_time",
    "parse_journal_stream",
    "syslog_priority",
    "utc_time",
]

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("auto", "text", "journal", "json")
# What a line is about, when the code that logs it says so (``extra=``): JSON
# fields of their own, so a shipper can filter on them.
FIELDS = ("socket", "handler", "generation", "worker_pid")

# The logging module's level numbers (not imported here: start-up time).
_ERROR = 40
_WARNING = 30
_INFO = 20
# syslog priorities (sd-daemon(3)'s SD_ERR, SD_WARNING, SD_INFO, SD_DEBUG).
_SD_ERR = 3
_SD_WARNING = 4
_SD_INFO = 6
_SD_DEBUG = 7


def syslog_priority(levelno: int) -> int:
    """The syslog priority of a logging level: 3 error and critical, 4 warning, 6 info, 7 debug."""
    if levelno >= _ERROR:
        return _SD_ERR
    if levelno >= _WARNING:
        return _SD_WARNING
    if levelno >= _INFO:
        return _SD_INFO
    return _SD_DEBUG


def journal_text(priority: int, text: str, *, tag: str = "") -> str:
    """`text` for journald: every line with ``<priority>`` and `tag` in front.

    journald makes each line of its stream an entry of its own, so a
    traceback's lines need the prefix as much as the first one (without it
    they would be entries at the stream's default priority, info).
    """
    return "\n".join(f"<{priority}>{tag}{line}" for line in text.split("\n"))


def local_time(seconds: float) -> str:
    """``2026-12-04 19:58:01.123``: `seconds` since the epoch, local time, milliseconds."""
    whole = int(seconds)
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(whole)) + f".{_millis(seconds, whole):03d}"


def utc_time(seconds: float) -> str:
    """``2026-12-04T18:58:01.123Z``: `seconds` since the epoch, ISO-8601 UTC, milliseconds."""
    whole = int(seconds)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{_millis(seconds, whole):03d}Z"


def _millis(seconds: float, whole: int) -> int:
    # Truncated, never rounded up to 1000.
    return min(int((seconds - whole) * 1000), 999)


def json_line(
    *,
    seconds: float,
    level: str,
    pid: int,
    logger: str,
    message: str,
    fields: Mapping[str, object] = {},
    exception: str | None = None,
) -> str:
    """One JSON object on one line: time, level, pid, logger, message, then the `fields` that are set.

    ``time`` is `utc_time`; `fields` whose value is None are left out;
    ``exception`` (a formatted traceback) is a field of its own.  Newlines
    inside strings are escaped, and everything else outside ASCII too, so
    the line is one line whatever the message holds.
    """
    record: dict[str, object] = {
        "time": utc_time(seconds),
        "level": level,
        "pid": pid,
        "logger": logger,
        "message": message,
    }
    for key, value in fields.items():
        if value is not None:
            record[key] = value
    if exception is not None:
        record["exception"] = exception
    return json.dumps(record, default=str)


def parse_journal_stream(text: str) -> tuple[int, int] | None:
    """``JOURNAL_STREAM``'s ``DEVICE:INODE`` (systemd.exec(5)) as two numbers, or None when it is not that."""
    device, colon, inode = text.partition(":")
    if not colon or not is_decimal(device) or not is_decimal(inode):
        return None
    return int(device), int(inode)
