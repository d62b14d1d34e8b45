"""``serve`` with workers, and ``dev``: run the supervisor over the sockets in hand.

Layer 4: the supervisor's process, called by the CLI after ``acquire_sockets``
(after any self-activation re-exec), with the sockets it holds.

``dev`` follows its manifest (`FollowManifest`): each reload reads it again,
creates the sockets that are new or whose address or options changed, and
hands the new generation the unchanged sockets (the same fds: their clients
never see a refused connection) with the new ones.  A socket removed or
replaced is closed once the old generation has stopped, its socket file
removed.  Under ``serve`` the sockets are the service manager's (or were
made once, at start): every generation serves those.

Resource handling, and who owns each fd when: ``owned`` (the caller's
``ServiceSockets``) always holds the set the current generation serves, and
the caller closes it once ``run_supervisor`` returned.  Under ``dev`` a
reload that changes the sockets creates the new ones in a set of their own
(``incoming``), which owns them while the new generation starts; if it does
not take over, ``incoming`` is closed (files removed): nothing changed.  If
it does, two moves that cannot fail swap the sets: the sockets it no longer
serves are taken out of ``owned`` into a ``retired`` set (the old
generation drains on its own copies of them), then ``owned`` absorbs
``incoming``.  ``retired`` is closed, its socket files removed, once every
old worker has exited; whatever is still pending when the supervisor
returns is closed then (`FollowManifest.close`).  The supervisor only
passes fds to workers, which close their own copies.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from ..errors import ActivationError
from ..model.address import AbstractAddress, Address, InetAddress, UnixAddress, address_from_sockname
from ..model.control import STATUS_VERSION
from ..model.manifest import Manifest, SocketSpec, load_manifest
from ..model.records import replace
from ..system.acquire import ServiceSockets, create_service_sockets
from ..system.fds import bound_address, close_all
from ..system.notifier import Notifier
from ..system.takeover import TakenOver
from .control import ControlOptions, Operated, handler_entries, socket_entries
from .spawn import ProcessSpawner, WorkerCommand, worker_argv
from .supervisor import SocketChange, Supervisor
from .takeover import confirm, giving_away

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
    log_format: str = "auto",
    overrides: Sequence[str] = (),
    watch: Sequence[Path] = (),
    control: ControlOptions | None = None,
    takeover: TakenOver | None = None,
) -> int:
    """Supervise ``workers`` workers over ``owned``'s sockets until stopped; the exit status.

    ``overrides``: the ``--set`` texts the manifest was read with; every
    worker (a reload's too, and each of ``dev``'s) reads it with them, and so
    does ``dev`` when it follows the manifest's sockets.  ``control``: the
    control socket and pid file (`control`).  ``takeover``: the sockets were
    taken over from a running service, confirmed once the first generation serves.
    """
    mode = "dev" if watch else "supervisor"
    operated = None
    if takeover is not None:
        inherited = takeover.inherited_state()
        operated = Operated.for_takeover(control or ControlOptions(), mode=mode, inherited=inherited)
    elif control is not None:
        operated = Operated(control, mode=mode)
    try:
        return _run_supervisor(
            manifest,
            manifest_path,
            owned,
            workers,
            log_level,
            log_format,
            overrides,
            watch,
            operated,
            takeover,
        )
    finally:
        if operated is not None:
            operated.close()


def _run_supervisor(
    manifest: Manifest,
    manifest_path: Path,
    owned: ServiceSockets,
    workers: int,
    log_level: str,
    log_format: str,
    overrides: Sequence[str],
    watch: Sequence[Path],
    operated: Operated | None,
    takeover: TakenOver | None = None,
) -> int:
    sockets = _fds_of(owned)
    argv = worker_argv(str(manifest_path.absolute()), log_level, log_format, overrides=overrides)
    # A takeover starts a new release, as a reload does: the code on disk, not a cached .pyc.
    command = WorkerCommand(argv, sockets, dev=bool(watch), fresh_code=takeover is not None)
    spawner = GenerationSpawner(command, dict(os.environ))
    follow = FollowManifest(manifest, manifest_path, owned, spawner, overrides) if watch else None
    try:
        with Notifier.from_environ(unset=True) as notifier:
            if manifest.service.fd_store and not watch:
                # The supervisor is the process that talks to the manager: it stores.
                notifier.store_when_ready(owned.fd_store_plan())
            supervisor = Supervisor(
                command,
                workers=workers,
                grace_period=manifest.service.grace_period,
                start_timeout=manifest.service.start_timeout,
                worker_timeout=manifest.service.worker_timeout,
                notifier=notifier,
                dev=bool(watch),
                spawner=spawner,
                change_sockets=follow,
            )
            log.info(
                "supervising %s: %d worker(s) over %d socket(s)%s",
                manifest.service.name,
                workers,
                len(sockets),
                ", reloading on changes" if watch else "; SIGHUP reloads",
            )
            answering = None
            if operated is not None:
                supervisor.on_reload_outcome = operated.history.record
                answering = _answering(manifest, owned, supervisor, operated, takeover, dev=bool(watch))
            status: int = trio.run(_supervise, supervisor, list(watch), answering)
    finally:
        if follow is not None:
            follow.close()
    if supervisor.current is None:
        owned.never_started()
        owned.close_queued_clients()
    return status


def _fds_of(sockets: ServiceSockets) -> list[tuple[int, str]]:
    return [(sock.fileno(), name) for name, group in sockets.sockets.items() for sock in group]


class GenerationSpawner(ProcessSpawner):
    """The real spawner, where a generation may get sockets of its own (``dev`` following its manifest).

    Each generation's workers, its restarts included, get the command of the
    latest generation at or before it that `use` gave one to.
    """

    def __init__(self, command: WorkerCommand, environ: dict[str, str]) -> None:
        super().__init__(command, environ)
        self.commands = {1: command}

    def use(self, generation: int, command: WorkerCommand) -> None:
        self.commands[generation] = command

    def forget(self, generation: int) -> None:
        self.commands.pop(generation, None)

    def forget_before(self, generation: int) -> None:
        """Generations before ``generation`` are retired: no worker of theirs starts again."""
        keep = self.command_for(generation)
        self.commands = {g: c for g, c in self.commands.items() if g > generation}
        self.commands[generation] = keep

    def command_for(self, generation: int) -> WorkerCommand:
        return self.commands[max(g for g in self.commands if g <= generation)]


class FollowManifest:
    """``dev``: each reload brings the sockets in line with the manifest on disk (the supervisor's
    ``change_sockets``).  See the module docstring for who owns what when."""

    def __init__(
        self,
        manifest: Manifest,
        path: Path,
        owned: ServiceSockets,
        spawner: GenerationSpawner,
        overrides: Sequence[str] = (),
    ) -> None:
        self.path = path
        # The command line's --set: the manifest on disk is read with them, as at start.
        self.overrides = overrides
        self.owned = owned
        self.spawner = spawner
        self.specs = {spec.name: spec for spec in manifest.sockets}
        # Sets whose generation has yet to stop (retired) or to start (incoming): closed by close().
        self.pending: list[ServiceSockets] = []

    def __call__(self, generation: int) -> SocketChange | None:
        manifest = load_manifest(self.path, overrides=self.overrides)
        specs = {spec.name: spec for spec in manifest.sockets}
        changed = [name for name, spec in specs.items() if not _same_socket(self.specs.get(name), spec)]
        leaving = [name for name in self.specs if name not in specs or name in changed]
        if not changed and not leaving:
            return None
        self._check_free(manifest, changed, leaving)
        incoming = create_service_sockets(manifest, changed)
        # dev made them: its stop (or a later change) removes their files, as for the first ones.
        incoming.remove_on_stop = frozenset(changed)
        self.pending.append(incoming)
        fds: list[tuple[int, str]] = []
        for spec in manifest.sockets:
            group = incoming.sockets if spec.name in changed else self.owned.sockets
            fds += [(sock.fileno(), spec.name) for sock in group.get(spec.name, [])]
        self.spawner.use(generation, replace(self.spawner.command, sockets=fds))
        for name in changed:
            shown = ", ".join(bound_address(sock) for sock in incoming.sockets.get(name, []))
            was = self.specs.get(name)
            what = "added" if was is None else "was " + ", ".join(str(a) for a in was.listen)
            log.info("sockets.%s: new socket on %s for generation %d (%s)", name, shown, generation, what)
        for name in leaving:
            if name not in specs:
                log.info("sockets.%s: removed; closed once the generation serving it stops", name)
        return _Change(self, generation, incoming, specs, leaving)

    def _check_free(self, manifest: Manifest, changed: Collection[str], leaving: Collection[str]) -> None:
        """A new socket cannot be bound where one still served by the old generation is: say so."""
        held = [s for group in self.pending for sockets in group.sockets.values() for s in sockets]
        held += [sock for name in leaving for sock in self.owned.sockets.get(name, [])]
        for spec in manifest.sockets:
            if spec.name not in changed:
                continue
            for index, address in enumerate(spec.listen):
                if any(_holds(sock, address, spec, manifest.folder) for sock in held):
                    key = "listen" if len(spec.listen) == 1 else f"listen[{index}]"
                    raise ActivationError(
                        f"{manifest.source}: sockets.{spec.name}.{key}: {address}: the old socket there "
                        "serves until the old generation stops, and a new one cannot be bound beside it; "
                        "restart dev to apply this change"
                    )

    def close(self) -> None:
        """Close every set still pending (the supervisor returned): no fd outlives dev."""
        pending, self.pending = self.pending, []
        close_all(group.close for group in pending)


class _Change:
    """One reload's `SocketChange`; `FollowManifest` made it."""

    def __init__(
        self,
        follow: FollowManifest,
        generation: int,
        incoming: ServiceSockets,
        specs: dict[str, SocketSpec],
        leaving: Collection[str],
    ) -> None:
        self.follow = follow
        self.generation = generation
        self.incoming = incoming
        self.specs = specs
        self.leaving = leaving
        self.retired: ServiceSockets | None = None

    def abandon(self) -> None:
        self.follow.spawner.forget(self.generation)
        self._close(self.incoming)

    def take_over(self) -> None:
        follow = self.follow
        self.retired = follow.owned.take(self.leaving)
        follow.pending.append(self.retired)
        follow.owned.absorb(self.incoming)
        follow.pending.remove(self.incoming)
        follow.specs = self.specs
        follow.spawner.forget_before(self.generation)

    def release(self) -> None:
        if self.retired is None:
            return
        closing = {name: ", ".join(map(bound_address, group)) for name, group in self.retired.sockets.items()}
        self._close(self.retired)
        for name, where in closing.items():
            log.info("sockets.%s: closed %s (its generation stopped)", name, where)

    def _close(self, group: ServiceSockets) -> None:
        if group in self.follow.pending:
            self.follow.pending.remove(group)
        group.close()


def _same_socket(old: SocketSpec | None, new: SocketSpec) -> bool:
    """Whether ``new`` can keep ``old``'s fds: the same addresses and options (``remove-on-stop`` is
    about the stop, not the socket, and dev removes its files anyway)."""
    return old is not None and replace(old, remove_on_stop=False) == replace(new, remove_on_stop=False)


_ANY_HOST = (None, ipaddress.ip_address("0.0.0.0"), ipaddress.ip_address("::"))


def _holds(sock: socket.socket, address: Address, spec: SocketSpec, folder: Path) -> bool:
    """Whether ``sock`` is bound where a new socket of ``spec`` on ``address`` would have to bind."""
    try:
        bound = address_from_sockname(sock.family, sock.getsockname())
    except OSError:
        return False
    if isinstance(address, UnixAddress):
        return isinstance(bound, UnixAddress) and bound.path == address.resolved(str(folder)).path
    if sock.type != spec.type.kernel_type:
        return False
    if isinstance(address, AbstractAddress):
        return isinstance(bound, AbstractAddress) and bound.name == address.name
    if not isinstance(bound, InetAddress) or address.port == 0 or bound.port != address.port:
        return False
    hosts = [None if h is None else ipaddress.ip_address(h) for h in (address.host, bound.host)]
    return hosts[0] == hosts[1] or any(h in _ANY_HOST for h in hosts)


def _answering(
    manifest: Manifest,
    owned: ServiceSockets,
    supervisor: Supervisor,
    operated: Operated,
    takeover: TakenOver | None,
    *,
    dev: bool,
) -> Callable[[], Awaitable[None]]:
    """The control socket's task: answers once the first generation serves, until the stop.

    ``takeover``: first, have the old process confirm (`takeover.confirm`); if
    it does not, the supervisor stops (exit 1) and nothing is answered.
    """

    def status() -> dict[str, Any]:
        workers = supervisor.workers()
        in_flight: dict[str, int] = {}
        for worker in workers:
            for name, count in worker.connections.items():
                in_flight[name] = in_flight.get(name, 0) + count
        current = supervisor.current
        return {
            "version": STATUS_VERSION,
            "service": manifest.service.name,
            "mode": operated.mode,
            **operated.fields(),
            "generation": current.number if current is not None else 0,
            "workers": [
                {
                    "pid": w.pid,
                    "generation": w.generation,
                    "ready": w.ready,
                    "stopping": w.stopping,
                    "in_flight": dict(w.connections),
                }
                for w in workers
            ],
            "sockets": socket_entries(owned),
            "handlers": handler_entries(manifest, in_flight),
        }

    async def reload() -> tuple[bool, str]:
        return await operated.history.next_outcome(lambda: supervisor.reload("control socket"))

    def busy() -> str | None:
        if supervisor.stop_requested:
            return "the service is stopping"
        if supervisor.reloading:
            return "a reload is under way"
        return None

    give = None if dev else giving_away(manifest, owned, operated, busy=busy, stop=supervisor.stop)

    async def answer() -> None:
        await supervisor.serving.wait()
        if takeover is not None and not await confirm(takeover, operated):
            # The old process serves on (or stopped): this one must not answer for it.
            supervisor.exit_status = 1
            supervisor.stop()
            return
        stop_accepting = trio.Event()
        async with trio.open_nursery() as nursery:

            async def stop() -> None:
                await supervisor.wait_stop()
                stop_accepting.set()

            nursery.start_soon(stop)
            await operated.serve(status=status, reload=reload, stop_accepting=stop_accepting, takeover=give)
            nursery.cancel_scope.cancel()

    return answer


async def _supervise(
    supervisor: Supervisor, watch: list[Path], answering: Callable[[], Awaitable[None]] | None = None
) -> int:
    stop_watching = trio.Event()
    async with trio.open_nursery() as nursery:
        if watch:
            nursery.start_soon(_reload_on_changes, supervisor, watch, stop_watching)
        if answering is not None:
            nursery.start_soon(answering)
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
    reloads = CodeChangeFilter(existing)
    log.info("%s", watching_line(existing, reloads.code.extensions))
    async for changes in awatch(*existing, watch_filter=reloads, stop_event=stop):
        changed = sorted({path for _, path in changes})
        more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
        log.info("changed: %s%s", changed[0], more)
        await supervisor.reload(f"{changed[0]} changed")


def watching_line(paths: Sequence[Path], extensions: Sequence[str]) -> str:
    """What dev watches, in one line: the folders (for files with these extensions) and the files
    watched by name (which reload whatever their name)."""
    folders = [str(p) for p in paths if p.is_dir()]
    files = [str(p) for p in paths if not p.is_dir()]
    parts = []
    if folders:
        parts.append(f"{', '.join(extensions)} files in {', '.join(dict.fromkeys(folders))}")
    if files:
        parts.append(f"the files {', '.join(dict.fromkeys(files))}")
    return "watching " + (" and ".join(parts) or "nothing")


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
