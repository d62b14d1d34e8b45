"""Whether an fd is journald's stream: ``JOURNAL_STREAM`` against the fd's device and inode.

Layer 2: one ``fstat``, no trio.

systemd sets ``JOURNAL_STREAM=DEVICE:INODE`` for a service whose stdout or
stderr goes to the journal (systemd.exec(5)).  The variable is inherited,
so it alone proves nothing: a process whose stderr was redirected since (a
shell's ``2>file``, a pipe to another program) still has it.  Only when the
fd's own ``st_dev:st_ino`` is the pair does the stream lead to journald, as
``sd_journal_stream_fd`` and the sd-daemon(3) notes say to check.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from ..model.log_lines import parse_journal_stream

__all__ = ["JOURNAL_STREAM_VARIABLE", "is_journal_stream"]

JOURNAL_STREAM_VARIABLE = "JOURNAL_STREAM"


def is_journal_stream(fd: int, environ: Mapping[str, str]) -> bool:
    """True when `fd` is the stream ``JOURNAL_STREAM`` in `environ` names (same device and inode)."""
    wanted = parse_journal_stream(environ.get(JOURNAL_STREAM_VARIABLE, ""))
    if wanted is None:
        return False
    try:
        found = os.fstat(fd)
    except OSError:
        return False
    return (found.st_dev, found.st_ino) == wanted
