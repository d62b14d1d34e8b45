"""``serve`` with workers, and ``dev``: run the supervisor over the sockets in hand.

Layer 4: the supervisor's process, called by the CLI after ``acquire_sockets``
(after any self-activation re-exec), with the sockets it holds.

Resource handling: ``owned`` stays the caller's; the supervisor only passes
its fds to workers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from ..model.manifest import Manifest
from ..system.acquire import ServiceSockets
from ..system.notifier import Notifier
from .spawn import WorkerCommand, worker_argv
from .supervisor import Supervisor

if TYPE_CHECKING:
    from watchfiles import Change

__all__ = ["run_supervisor"]

log = logging.getLogger("trio_activate")


def run_supervisor(
    manifest: Manifest,
    manifest_path: Path,
    owned: ServiceSockets,
    *,
    workers: int,
    log_level: str,
    watch: Sequence[Path] = (),
) -> int:
    sockets = [(sock.fileno(), name) for name, group in owned.sockets.items() for sock in group]
    command = WorkerCommand(worker_argv(str(manifest_path.absolute()), log_level), sockets, dev=bool(watch))
    with Notifier.from_environ(unset=True) as notifier:
        supervisor = Supervisor(
            command,
            workers=workers,
            grace_period=manifest.service.grace_period,
            start_timeout=manifest.service.start_timeout,
            worker_timeout=manifest.service.worker_timeout,
            notifier=notifier,
            dev=bool(watch),
        )
        log.info(
            "supervising %s: %d worker(s) over %d socket(s)%s",
            manifest.service.name,
            workers,
            len(sockets),
            ", reloading on changes" if watch else "; SIGHUP reloads",
        )
        status: int = trio.run(_supervise, supervisor, list(watch))
    if supervisor.current is None:
        owned.never_started()
        owned.close_queued_clients()
    return status


async def _supervise(supervisor: Supervisor, watch: list[Path]) -> int:
    stop_watching = trio.Event()
    async with trio.open_nursery() as nursery:
        if watch:
            nursery.start_soon(_reload_on_changes, supervisor, watch, stop_watching)
        status = await supervisor.run(handle_signals=True)
        # Before cancelling: awatch waits in a thread that cancellation cannot
        # interrupt (for up to its 5 s timeout); the event ends it within one step.
        stop_watching.set()
        nursery.cancel_scope.cancel()
    return status


async def _reload_on_changes(supervisor: Supervisor, paths: list[Path], stop: trio.Event) -> None:
    from watchfiles import awatch

    existing = [p.absolute() for p in paths if p.exists()]
    for path in paths:
        if not path.exists():
            log.warning("not watching %s: it does not exist", path)
    async for changes in awatch(*existing, watch_filter=CodeChangeFilter(existing), stop_event=stop):
        changed = sorted({path for _, path in changes})
        more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
        log.info("changed: %s%s", changed[0], more)
        await supervisor.reload(f"{changed[0]} changed")


class CodeChangeFilter:
    """Which changes reload: Python code as watchfiles' `PythonFilter` sees it, and any watched file itself.

    A folder (the manifest's, a ``python-path`` entry) also holds logs,
    editor swap and lock files (``.#app.py``), bytecode caches and other
    people's code (``node_modules/``, ``.venv/``); reloading on those would
    loop (a worker's own log line would trigger the next reload) or restart
    for nothing.  Knowing them all is the library's business, kept up to date
    there.  ``.pyi`` and ``.toml`` files reload too (type stubs,
    ``pyproject.toml``, a manifest beside the code), as they did before the
    library's filter decided.  A file named explicitly (the manifest, a
    ``--watch`` file) reloads whatever its name.
    """

    EXTRA_EXTENSIONS = (".pyi", ".toml")

    def __init__(self, watched: Sequence[Path]) -> None:
        from watchfiles import PythonFilter  # as awatch: only dev pays for importing watchfiles

        self.files = {str(p) for p in watched if p.is_file()}
        self.code = PythonFilter(extra_extensions=self.EXTRA_EXTENSIONS)

    def __call__(self, change: Change, path: str) -> bool:
        return path in self.files or self.code(change, path)
