"""The systemd watchdog as a Trio task: `serve_watchdog`.

What this module owns
---------------------
The schedule of ``WATCHDOG=1`` pings.  With ``WatchdogSec=`` in its unit, a
service gets ``WATCHDOG_USEC`` and must ping at least that often or be
killed; `~trio_activate.system.notifier.Notifier` reads the variables and knows the
interval (half of ``WATCHDOG_USEC``, as ``sd_watchdog_enabled(3)``
recommends), this task keeps time.

Layer 3: trio.  Pinging from a task of the service's own event loop is the
point: if the loop is stuck (a blocking call, a busy task that never
checkpoints), the pings stop and systemd restarts the service, which is what
the watchdog is for.  A thread would keep pinging for a dead loop.

Resource handling: `serve_watchdog` only borrows the notifier; whoever built
it closes it, after this task has ended.

Error handling: a ping that cannot be sent is logged by the notifier and the
task carries on; it never raises for a failed ping.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from ..system.notifier import Notifier

__all__ = ["serve_watchdog"]


async def serve_watchdog(
    notifier: Notifier,
    *,
    healthy: Callable[[], bool] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Ping the service manager's watchdog until cancelled.

    When `notifier` has a watchdog interval, sends ``WATCHDOG=1`` at once,
    reports started, and then pings every interval until cancelled.  When it
    has none (no ``WATCHDOG_USEC``, another process's ``WATCHDOG_PID``, or no
    ``NOTIFY_SOCKET``), reports started and returns at once, so
    ``await nursery.start(serve_watchdog, notifier)`` works either way.

    Pings keep to a fixed grid (0, i, 2i, ...), so the time spent sending
    never accumulates into drift.  If the task wakes up more than an interval
    late (the loop was blocked), it pings once and starts a new grid from
    there instead of sending every missed ping in a burst: the missed ones
    cannot be made up, and a burst would only hide the stall.

    `healthy`, when given, is asked before every ping, and a ping is sent
    only when it says yes: a supervisor's loop is fine while a worker's is
    stuck, and the manager must hear of the worker (see `Supervisor`).
    """
    interval = notifier.watchdog_interval
    if interval is None:
        task_status.started()
        return
    if healthy is None or healthy():
        notifier.watchdog()
    task_status.started()
    next_ping = trio.current_time() + interval
    while True:
        await trio.sleep_until(next_ping)
        if healthy is None or healthy():
            notifier.watchdog()
        next_ping += interval
        now = trio.current_time()
        if next_ping <= now:
            next_ping = now + interval
