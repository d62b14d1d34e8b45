"""Getting a service its sockets: adopt what was passed, or create them.

Layer 2: syscalls, no trio.  The one place that decides where sockets come
from, for ``serve`` and for the embedded ``activated()``:

- ``LISTEN_*`` names this process: adopt the fds (``passed.adopt``).  When
  the internal activator passed them (it re-exec'd this very process, or,
  on the CLI's fast start, delivered them and the caller settled
  ``LISTEN_*``: ``activator_channel``), the unix socket files it created
  are ours too, and ``remove-on-stop`` removes them at close; under systemd
  they are systemd's, never touched.
- Not activated, ``reexec=True`` (``serve``): self-activate: create the
  sockets, place them at fds 3.., exec in place (``activator``).  Does not
  return.
- Not activated, ``reexec=False`` (embedded): create them in-process.

Resource handling: the returned ``ServiceSockets`` owns every socket (and
the socket files it made); its ``close()`` closes each once.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Collection, MutableMapping, Sequence
from typing import TYPE_CHECKING

from ..model.listen_env import CONNECTION_NAME, UNKNOWN_NAME, ListenFds, take_listen_env
from ..model.manifest import Manifest
from ..model.private_env import (
    ACTIVATOR_MARKER,
    HANDOFF_FROM_VARIABLE,
    SOCKET_FILES_VARIABLE,
    SUPERVISOR_VARIABLE,
)
from ..model.records import field, record
from .activator import check_not_looping, reexec_with_new_sockets
from .fds import bound_address, close_all, own_pidfd_id
from .passed import PassedFds, adopt

if TYPE_CHECKING:
    from .notifier import FdStorePlan

__all__ = ["ServiceSockets", "SocketFile", "acquire_sockets", "adopt_then_create", "create_service_sockets"]

log = logging.getLogger("trio_activate")
# close_queued_clients: at most this many per socket.
QUEUED_CLIENTS_LIMIT = 10_000


@record
class SocketFile:
    """A unix socket file this service made, identified as it was right after bind()."""

    socket_name: str
    path: str
    file_id: tuple[int, int]


@record(frozen=False, eq=False)
class ServiceSockets:
    """Every socket of one service, by manifest name.  Owns them until ``close()``.

    To take a socket over, remove it from ``sockets`` first.  Sockets move
    between two sets only by `take` and `absorb`, which move each socket
    (and the socket file made for it) from one owner to the other with no
    moment at which both, or neither, own it: ``dev`` follows its manifest
    that way (``processes.supervise_main``).
    """

    sockets: dict[str, list[socket.socket]]
    origin: str
    """"systemd" style passing ("passed"), "self-activated", "created" in-process, or "taken over"
    from a running service (`takeover`)."""
    connection: socket.socket | None = None
    extra: dict[str, list[socket.socket]] = field(default_factory=dict)
    """Passed fds under names the manifest does not declare, taken before adoption (``extra_names``)."""
    files: list[SocketFile] = field(default_factory=list)
    remove_on_stop: frozenset[str] = frozenset()
    undeclared: tuple[str, ...] = ()
    """Names that were passed (and closed at adoption) which the manifest does not declare."""
    created: frozenset[str] = frozenset()
    """Sockets of a passed (or taken over) set that no fd came for, so this process made them."""

    def fd_store_plan(self) -> FdStorePlan:
        """What ``[service] fd-store`` puts in the manager's fd store, and takes out of it.

        Stored: the sockets this service made itself (self-activated or created
        in-process); passed sockets never, since whoever passed them (a
        ``.socket`` unit, the fd store itself, a predecessor) keeps them
        already.  Removed: the passed names the manifest no longer declares.
        The plan borrows the sockets; this set keeps owning them.
        """
        from .notifier import FdStorePlan  # here: start-up time (scenario 3)

        made = self.origin in ("self-activated", "created")
        if not made:
            for name, group in self.sockets.items():
                if name in self.created:
                    continue
                log.info(
                    "fd store: sockets.%s (fd %s) was passed in LISTEN_FDS: not stored again",
                    name,
                    ", ".join(str(sock.fileno()) for sock in group),
                    extra={"socket": name},
                )
        stored = dict(self.sockets) if made else {n: g for n, g in self.sockets.items() if n in self.created}
        return FdStorePlan(store=stored, remove=self.undeclared)

    def never_started(self) -> None:
        """The service failed before it served: it leaves no socket file it made.

        ``remove-on-stop`` governs what a service that ran leaves behind; a
        start that failed (a handler that cannot be imported, no worker ever
        ready) must not leave a half-made service's files.  Call before ``close()``.
        """
        self.remove_on_stop = frozenset(item.socket_name for item in self.files)

    def close_queued_clients(self, limit: int = QUEUED_CLIENTS_LIMIT) -> int:
        """A service that cannot start: close the connections (drop the datagrams) waiting for it.

        Under a service manager that matters: the manager keeps its own copy
        of every listening socket, and a connection left in the backlog keeps
        it readable, so the manager starts the failed service again at once,
        over and over, until its start limit fails the socket unit itself
        (systemd 252: "Failed with result 'service-start-limit-hit'"), and
        every later client is refused.  Closed, the socket goes back to
        listening, the next client starts the service (fixed by then, or
        failing the same way, once), and the waiting clients hear now instead
        of at their timeout.  Only the process the manager started may do
        this: a supervisor's worker or a hand-over successor that fails must
        leave the queue to the generation that serves.

        Returns how many were closed; at most ``limit`` per socket, so a flood
        cannot keep a failed start alive.  Never raises for a socket error.
        """
        import select  # here: start-up time (scenario 3)

        if self.origin == "taken over":
            # Those clients queue for the process this one took the sockets from, which serves on.
            return 0
        closed = 0
        for group in self.sockets.values():
            for sock in group:
                # poll, not the socket's blocking mode: O_NONBLOCK is shared
                # with the manager's copy of the socket.
                poller = select.poll()
                poller.register(sock, select.POLLIN)
                for _ in range(limit):
                    try:
                        if not poller.poll(0):
                            break
                        if sock.type == socket.SOCK_DGRAM:
                            sock.recv(1, socket.MSG_DONTWAIT | socket.MSG_TRUNC)
                        else:
                            conn, _ = sock.accept()
                            conn.close()
                    except OSError:
                        break
                    closed += 1
        if closed:
            log.warning(
                "closed %d connection(s) or datagram(s) queued for a service that cannot start", closed
            )
        return closed

    def take(self, names: Collection[str]) -> ServiceSockets:
        """Move the sockets named ``names``, and the socket files made for them, into a new set.

        The returned set owns them from then on (with their ``remove-on-stop``),
        this one no longer does.  Names this set does not hold are skipped.
        """
        moved = ServiceSockets(
            {name: self.sockets.pop(name) for name in list(self.sockets) if name in names},
            self.origin,
            files=[item for item in self.files if item.socket_name in names],
            remove_on_stop=self.remove_on_stop & frozenset(names),
        )
        self.files = [item for item in self.files if item.socket_name not in names]
        return moved

    def absorb(self, other: ServiceSockets) -> None:
        """Move every socket of ``other``, its socket files and their ``remove-on-stop``, into this set.

        ``other`` is left empty (its ``close()`` closes nothing).  A name both
        hold is an error: take the old sockets out first (`take`).
        """
        clash = sorted(self.sockets.keys() & other.sockets.keys())
        if clash:
            raise ValueError(f"both sets hold sockets named {clash}")
        self.sockets.update(other.sockets)
        self.files.extend(other.files)
        self.remove_on_stop |= other.remove_on_stop
        other.sockets, other.files, other.remove_on_stop = {}, [], frozenset()

    def close(self) -> None:
        """Remove our ``remove-on-stop`` socket files, then close every socket once.

        Files go first: while the socket is open its inode cannot be reused,
        so the identity check cannot mistake a newer file for ours.
        """
        files, self.files = self.files, []
        removing = [item for item in files if item.socket_name in self.remove_on_stop]
        try:
            if removing:
                from .create import remove_socket_file_if_same  # here: start-up time (scenario 3)

                for item in removing:
                    remove_socket_file_if_same(item.path, item.file_id)
        finally:
            # An import can fail for want of an fd (EMFILE): the sockets are closed all the same.
            self._close_sockets()

    def _close_sockets(self) -> None:
        held = [s for groups in (self.sockets, self.extra) for group in groups.values() for s in group]
        if self.connection is not None:
            held.append(self.connection)
        self.sockets, self.extra, self.connection = {}, {}, None
        close_all(sock.close for sock in held)


def acquire_sockets(
    manifest: Manifest,
    *,
    reexec: bool,
    environ: MutableMapping[str, str] | None = None,
    extra_names: Sequence[str] = (),
    delivered_files: Sequence[tuple[str, str, tuple[int, int]]] | None = None,
) -> ServiceSockets:
    """The service's sockets; see the module docstring.

    ``extra_names``: passed fds under these names (which the manifest does
    not declare) are taken before adoption, which would close them as
    unclaimed, and kept in ``ServiceSockets.extra``.

    ``delivered_files``: the unix socket files the fast start's activator made,
    which came with its sockets (``activator_channel``) rather than in
    ``TRIO_ACTIVATE_SOCKET_FILES``.
    """
    env = os.environ if environ is None else environ
    pid = os.getpid()
    self_activated = env.get(ACTIVATOR_MARKER) == str(pid)
    # Popped on every path, so no child inherits it; trusted only from our own
    # activator, or from the predecessor that handed us its sockets and files.
    files_text = env.pop(SOCKET_FILES_VARIABLE, None)
    if not self_activated and HANDOFF_FROM_VARIABLE not in env:
        files_text = None
    pidfd_id = own_pidfd_id()
    found = take_listen_env(env, pid=pid, pidfd_id=pidfd_id)
    if not isinstance(found, ListenFds):
        check_not_looping(env, pid=pid, reason=found.reason)
        if reexec:
            reexec_with_new_sockets(manifest, pidfd_id=pidfd_id, environ=env)
        return _create_in_process(manifest)
    env.pop(ACTIVATOR_MARKER, None)
    undeclared = _undeclared_names(manifest, found, extra_names)
    # The fd store holds what an older manifest declared: a socket added since is made here (and
    # stored).  Only by the process the manager started: a worker or a hand-over successor is
    # passed every socket by whoever started it, so a missing one is an error there.
    create_missing = (
        manifest.service.fd_store
        and found.names_given
        and not self_activated
        and SUPERVISOR_VARIABLE not in env
        and HANDOFF_FROM_VARIABLE not in env
    )
    passed = PassedFds(found)
    extra: dict[str, list[socket.socket]] = {}
    try:
        for name in extra_names:
            taken = passed.take(name)
            if taken:
                extra[name] = taken
        sockets = adopt_then_create(
            manifest,
            passed,
            origin="self-activated" if self_activated else "passed",
            create_missing=create_missing,
        )
    except BaseException:
        close_all([passed.close, *(sock.close for group in extra.values() for sock in group)])
        raise
    sockets.extra = extra
    sockets.files = (
        _parse_socket_files(files_text)
        if delivered_files is None
        else [SocketFile(name, path, file_id) for name, path, file_id in delivered_files]
    ) + sockets.files
    sockets.undeclared = undeclared
    return sockets


def adopt_then_create(
    manifest: Manifest, passed: PassedFds, *, origin: str, create_missing: bool
) -> ServiceSockets:
    """Adopt ``passed`` as ``manifest``'s sockets (`passed.adopt`, every check); with
    ``create_missing``, create the manifest's sockets that no fd was passed for.

    All or nothing: if adoption or a creation fails, every fd of ``passed``
    and every socket created is closed (a socket file made is removed)
    before the error propagates.  The returned set's ``created`` names the
    sockets made here; its ``remove-on-stop`` is the manifest's (it applies to
    the socket files the set is given, and to those it made).
    """
    adopted = adopt(manifest, passed, missing_ok=create_missing)
    sockets = ServiceSockets(
        adopted.sockets, origin, connection=adopted.connection, remove_on_stop=_remove_on_stop(manifest)
    )
    adopted.sockets, adopted.connection = {}, None
    if not adopted.missing:
        return sockets
    try:
        added = create_service_sockets(manifest, adopted.missing)
    except BaseException:
        sockets.close()
        raise
    for name in adopted.missing:
        shown = ", ".join(bound_address(sock) for sock in added.sockets.get(name, []))
        log.info("sockets.%s: no fd was passed for it (new in the manifest): created on %s", name, shown)
    sockets.absorb(added)
    sockets.created = frozenset(adopted.missing)
    return sockets


def _undeclared_names(manifest: Manifest, found: ListenFds, extra_names: Sequence[str]) -> tuple[str, ...]:
    """The passed names no manifest socket claims (adoption closes their fds), each once.

    ``unknown`` (no name given) and ``connection`` (an ``Accept=yes``
    connection) are systemd's words for fds that came with no name, not names.
    """
    if not found.names_given:
        return ()
    skip = {*manifest.socket_names(), *extra_names, UNKNOWN_NAME, CONNECTION_NAME}
    return tuple(dict.fromkeys(name for name in found.names if name not in skip))


def _create_in_process(manifest: Manifest) -> ServiceSockets:
    return create_service_sockets(manifest)


def create_service_sockets(manifest: Manifest, names: Collection[str] | None = None) -> ServiceSockets:
    """Create ``manifest``'s sockets in this process (those in ``names``, when given), all or nothing.

    The returned set owns them, with the socket files they made; on error
    nothing is left (``create.create_sockets``): one ``CreationError`` line.
    """
    from .create import create_sockets

    created = create_sockets(manifest, names)
    by_name: dict[str, list[socket.socket]] = {}
    files = []
    for item in created:
        by_name.setdefault(item.spec_name, []).append(item.sock)
        if item.created_path is not None and item.created_file_id is not None:
            files.append(SocketFile(item.spec_name, item.created_path, item.created_file_id))
    remove_on_stop = _remove_on_stop(manifest) & frozenset(by_name)
    return ServiceSockets(by_name, "created", files=files, remove_on_stop=remove_on_stop)


def _remove_on_stop(manifest: Manifest) -> frozenset[str]:
    return frozenset(spec.name for spec in manifest.sockets if spec.remove_on_stop)


def _parse_socket_files(text: str | None) -> list[SocketFile]:
    """Read what the activator recorded; anything malformed is ignored (the files are then left alone)."""
    if not text:
        return []
    try:
        import json  # here, not at the top: start-up time (benchmarks/, scenario 3)

        return [SocketFile(str(n), str(p), (int(d), int(i))) for n, p, d, i in json.loads(text)]
    except (ValueError, TypeError):
        log.warning("ignoring malformed %s; socket files will not be removed on stop", SOCKET_FILES_VARIABLE)
        return []
