"""Signals while a service imports its handlers: a stop stops the start.

Layer 2: no trio.  From the console script's first line
(`trio_activate.system.fast_start.hold_shutdown_signals`) SIGTERM, SIGINT and SIGHUP
are blocked: one that arrives during start-up waits, and the runtime
handles it once it listens.  That is right for the interpreter's and
trio's own imports, which are short.  Importing the handlers runs the
user's code, which is not:

- it may take long (a slow import, a database it waits for); a stop asked
  for then must stop the start, not wait for it;
- it may start threads or processes, which would inherit the blocked mask
  and never see these signals.

So around that import (`interruptible_start`) the three are unblocked:
SIGTERM and SIGINT raise `StartInterrupted` in the main thread, wherever
the import is (a ``time.sleep`` included: PEP 475 retries a system call
only when the handler does not raise), and SIGHUP is remembered.  After it
they stay unblocked (threads the handlers started may take any of them),
with a handler that remembers each one, until the runtime's Trio receiver
replaces it and calls `redeliver`, which raises them again, in order, into
that receiver.  Nothing is lost and nothing takes its default action.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from ..errors import StartInterrupted

__all__ = ["StartInterrupted", "interruptible_start", "redeliver"]

_STOP = (signal.SIGTERM, signal.SIGINT)
_ALL = {*_STOP, signal.SIGHUP}
_remembered: list[int] = []


def _raise(signum: int, frame: FrameType | None) -> None:
    raise StartInterrupted(signum)


def _remember(signum: int, frame: FrameType | None) -> None:
    _remembered.append(signum)


@contextmanager
def interruptible_start() -> Iterator[None]:
    """Within: SIGTERM/SIGINT raise `StartInterrupted` (at once if one waited), SIGHUP is remembered.

    Main thread only (Python runs signal handlers there).  On the way out,
    however it ends, every one of the three is remembered until `redeliver`.
    """
    # SIGHUP first: a pending one must be remembered, not lost, when the mask opens.
    signal.signal(signal.SIGHUP, _remember)
    for signum in _STOP:
        signal.signal(signum, _raise)
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _ALL)
        yield
    finally:
        for signum in _ALL:
            signal.signal(signum, _remember)


def redeliver() -> None:
    """Raise the remembered signals again, in order: call once the receiver that handles them is installed."""
    pending = list(_remembered)
    _remembered.clear()
    for signum in pending:
        signal.raise_signal(signum)
