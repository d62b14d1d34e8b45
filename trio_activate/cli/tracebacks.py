"""What ``dev`` shows of an error in the user's code: the traceback of that code only.

Layer 5 (cli).  A handler that cannot be imported fails in the user's
module, several frames below trio-activate's import of it and importlib's
machinery (``<frozen importlib._bootstrap>``, ``importlib/__init__.py``),
which say nothing about the user's mistake.  Those frames are left out, in
the exception and in each one it was chained from; what is left is the
path through the user's files to the line that failed.  A ``SyntaxError``
keeps its file, line and caret, which need no frame.

Closes nothing: it formats text.
"""

from __future__ import annotations

import importlib
import traceback
from pathlib import Path

__all__ = ["user_traceback"]

_PACKAGE = str(Path(__file__).resolve().parent.parent) + "/"
_IMPORTLIB = str(Path(importlib.__file__).resolve().parent) + "/"


def _is_machinery(filename: str) -> bool:
    if filename.startswith("<frozen importlib"):
        return True
    return filename.startswith((_PACKAGE, _IMPORTLIB)) or str(Path(filename).resolve()).startswith(
        (_PACKAGE, _IMPORTLIB)
    )


def user_traceback(exc: BaseException) -> str:
    """``exc``'s traceback without trio-activate's and importlib's frames; "" when nothing of the
    user's code is left to show (an error of trio-activate's own, with no frame of theirs)."""
    shown = traceback.TracebackException.from_exception(exc)
    user_frames = 0
    pending = [shown]
    seen: set[int] = set()
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        kept = [frame for frame in current.stack if not _is_machinery(frame.filename)]
        user_frames += len(kept)
        current.stack = traceback.StackSummary.from_list(kept)
        pending += [chained for chained in (current.__cause__, current.__context__) if chained is not None]
    if not user_frames and not isinstance(exc, SyntaxError):
        return ""
    return "".join(shown.format())
