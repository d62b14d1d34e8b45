"""The shutdown and reload signals as a Trio task: `watch_signals`.

What this module owns
---------------------
The one signal loop of every process that serves: a service (`service`),
an ``Accept=yes`` connection served once, and the supervisor
(`trio_activate.processes.supervisor`).  Each says what its stop, its
cancel and its reload are; the loop is the same:

- the first SIGTERM or SIGINT asks for a graceful stop (one info line);
- a SIGINT after a stop was asked for (a second Ctrl-C, or one after a
  handler failed the service) stops at once (one warning line); a SIGTERM
  then changes nothing;
- SIGHUP reloads, each time, when the caller can reload; otherwise it is
  left blocked (a supervised worker leaves reloads to its supervisor).

Layer 3: trio.  Signals held pending since the console script's first line
(`trio_activate.system.fast_start.hold_shutdown_signals`), and those
remembered while the handlers were imported (`start_signals.redeliver`),
arrive here, in order, once the receiver is installed.  When the loop ends
the signals are blocked again: from there to the process's exit, a late one
stays pending instead of killing the process with its default action.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable

import trio

from ..system.start_signals import redeliver

__all__ = ["SHUTDOWN_SIGNALS", "watch_signals"]

log = logging.getLogger("trio_activate")

SHUTDOWN_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})


async def watch_signals(
    *,
    stop: Callable[[], object],
    stopping: str,
    stop_asked: Callable[[], bool],
    cancel: Callable[[], object],
    cancelling: str,
    reload: Callable[[], object] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Handle SIGTERM, SIGINT (and SIGHUP, with ``reload``) until cancelled.

    ``stop``: the graceful stop, on the first SIGTERM or SIGINT while
    ``stop_asked()`` is false; logged as ``"<SIGNAL>: <stopping>"``.
    ``cancel``: on a SIGINT once ``stop_asked()`` is true; logged as
    ``"second SIGINT: <cancelling>"``.  ``reload``: called on each SIGHUP (it
    must not block: it starts the reload in the caller's nursery); None
    leaves SIGHUP blocked.
    """
    wanted = set(SHUTDOWN_SIGNALS)
    if reload is not None:
        wanted.add(signal.SIGHUP)
    with trio.open_signal_receiver(*wanted) as signals:
        # Signals held pending since start-up are delivered now, into the receiver,
        # and so are those remembered while the handlers were imported (none in a
        # process that imported none, such as the supervisor).
        signal.pthread_sigmask(signal.SIG_UNBLOCK, wanted)
        redeliver()
        try:
            task_status.started()
            async for signum in signals:
                if signum == signal.SIGHUP:
                    assert reload is not None
                    reload()
                elif not stop_asked():
                    log.info("%s: %s", signal.Signals(signum).name, stopping)
                    stop()
                elif signum == signal.SIGINT:
                    log.warning("second SIGINT: %s", cancelling)
                    cancel()
        finally:
            # From here to process exit, a late signal must not kill us
            # with the default action: keep it pending instead.
            signal.pthread_sigmask(signal.SIG_BLOCK, wanted)
