"""What a handler can know about the service stopping.

Layer 3 (trio).

When the service begins to stop it stops accepting at once, and connections
in flight get ``grace-period`` seconds before they are cancelled.  A
keep-alive protocol can do better than wait for that cancellation:

- ``is_stopping()``: True once the service that runs this handler began to
  stop.  An HTTP handler answers the next request with ``Connection: close``
  and ends the connection, so the client's following request goes to a new
  connection, served by the next generation during a reload
  (``examples.hello_http`` does this).
- ``move_on_stop()``: a cancel scope that the service cancels when it begins
  to stop, for waits that should end then::

      with trio_activate.move_on_stop() as idle:
          data = await stream.receive_some()
      if idle.cancelled_caught:
          return   # stopping, and the peer was between messages

  Closing a connection the peer may be sending on at that very moment is a
  race the peer must be ready for (HTTP clients retry an idempotent request
  on a closed keep-alive connection; load generators such as wrk count it as
  an error), so use it where the protocol allows the server to close
  between messages.

Outside a service (a handler called directly in a test), ``is_stopping()`` is
False and ``move_on_stop()`` never fires.

How it is found: ``Service.serve`` puts its ``StopSignal`` in a context
variable, and every task Trio spawns below it copies that context.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import trio

__all__ = ["StopSignal", "is_stopping", "move_on_stop"]


class StopSignal:
    """One per running service: whether it is stopping, and the scopes to cancel when it does."""

    def __init__(self) -> None:
        self.stopping = False
        self._scopes: set[trio.CancelScope] = set()

    def stop(self) -> None:
        self.stopping = True
        for scope in list(self._scopes):
            scope.cancel()


current_stop_signal: ContextVar[StopSignal | None] = ContextVar("trio_activate_stop_signal", default=None)


def is_stopping() -> bool:
    """True once the service running the calling task began to stop."""
    signal = current_stop_signal.get()
    return signal is not None and signal.stopping


@contextmanager
def move_on_stop() -> Iterator[trio.CancelScope]:
    """A cancel scope that is cancelled when the service begins to stop (at once if it has)."""
    signal = current_stop_signal.get()
    scope = trio.CancelScope()
    if signal is None:
        with scope:
            yield scope
        return
    if signal.stopping:
        scope.cancel()
    signal._scopes.add(scope)
    try:
        with scope:
            yield scope
    finally:
        signal._scopes.discard(scope)
