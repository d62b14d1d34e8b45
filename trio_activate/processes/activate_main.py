"""``trio-activate activate``: the activator as a tool for any program that reads ``LISTEN_FDS``.

Layer 4, without trio: one single-threaded process and its children.  What
it does per mode (`trio_activate.model.activate_options`):

- lazy and ``--now``: create the sockets, print where they listen, wait for
  the first connection or datagram (lazy) and exec COMMAND in place with
  them, ``LISTEN_PID`` naming this very process, as systemd-socket-activate;
- ``--accept``: accept each connection and spawn one COMMAND per connection,
  the connection at fd 3 with ``LISTEN_FDNAMES=connection`` (or on stdin and
  stdout with ``--inetd``); at ``--max-connections`` children the listening
  sockets are left alone, so further connections wait in the kernel's backlog;
- ``--restart``: fork COMMAND with the sockets at fds 3..; when it exits, or
  a ``--watch`` path changes, or SIGHUP comes, start it again (lazily: on the
  next connection, unless ``--now``).  The sockets never close, so a client
  never sees a refused connection, only one that waits.  A command that keeps
  failing (non-zero exit) is started again after 0.1 s, 0.2 s, ... up to 5 s.

SIGTERM or SIGINT stops it: no more accepting or starting, SIGTERM to every
child, SIGKILL to those still running after ``--grace-period``; then exit 0.
Starting the commands is `trio_activate.system.activate_exec`'s (how each
child is named, why a forked child may run Python, and why this process
must stay single-threaded).

Resource handling: the sockets this process creates are its own until an
exec in place hands them to COMMAND; in the forking modes it keeps them for
its life and closes them (removing the unix socket files it made) before it
returns.  Every child is reaped; the watcher process is killed and reaped.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import signal
import socket
import time
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import IO

from ..errors import ActivationError
from ..model.activate_options import UNNAMED, ActivateMode, ActivateOptions, child_environment
from ..model.address import address_from_sockname
from ..model.manifest import SocketType, load_manifest
from ..system.activate_exec import (
    command_path,
    exec_placed,
    fork_command,
    listen_environment,
    place_for_exec,
    spawn_connection,
    spawn_inetd,
)
from ..system.create import CreatedSocket, create_socket, create_sockets, remove_socket_file
from ..system.fds import bound_address, close_all

__all__ = ["run_activate"]

log = logging.getLogger("trio_activate")

EXIT_OK = 0
# Crash-loop back-off of --restart: the first delay, the longest, and how long a
# command must have run for its failure to count as a new one rather than a loop.
FIRST_DELAY = 0.1
LONGEST_DELAY = 5.0
HEALTHY_RUN = 10.0
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_HANDLED = (*_STOP_SIGNALS, signal.SIGHUP, signal.SIGCHLD)
_ACCEPTED_NAME = "connection"


def run_activate(options: ActivateOptions, environ: Mapping[str, str]) -> int:
    """Run ``activate`` as ``options`` say; the exit status (an exec in place does not return).

    Error handling: `ActivationError` (one line) for a command not found, a
    manifest or a socket that cannot be made; nothing is left behind then.
    """
    env = child_environment(environ, options.setenv)
    path = command_path(options.command[0], env)
    # Held until the handlers are in place (`_Signals`): a SIGTERM from here on must find the
    # sockets and their files to clean up, not kill the process between them.
    signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED)
    created = _create(options)
    if options.mode in (ActivateMode.LAZY, ActivateMode.NOW):
        return _start_in_place(created, options, path, env)
    try:
        wakeup = _Signals()
    except BaseException:
        _close(created)
        raise
    try:
        _announce(created, options)
        if options.mode is ActivateMode.ACCEPT:
            return _Acceptor(created, options, path, env, wakeup).run()
        return _Restarter(created, options, path, env, wakeup).run()
    finally:
        wakeup.close()


def _start_in_place(
    created: list[CreatedSocket], options: ActivateOptions, path: str, env: dict[str, str]
) -> int:
    """Lazy and ``--now``: COMMAND becomes this process, the sockets at fds 3.. (0 on SIGTERM before).

    Everything the exec needs (the fds in place, ``LISTEN_*`` for this PID)
    is done before the wait, so that a first connection waits for the exec
    alone, as under systemd-socket-activate: done after, it cost 0.3 ms here.
    From the exec on, the sockets and their files are COMMAND's.
    """
    _announce(created, options)
    kinds = {3 + index: (item.sock.type, bound_address(item.sock)) for index, item in enumerate(created)}
    sources = [item.sock.detach() for item in created]
    try:
        placed = place_for_exec(sources)
    except BaseException:
        for item in created:
            remove_socket_file(item)  # while the sources still pin the files
        close_all(partial(os.close, fd) for fd in sources)
        raise
    try:
        names = [item.spec_name for item in created]
        exec_env = {**env, **listen_environment(len(placed), names, names_given=options.names_given)}
        if options.mode is ActivateMode.LAZY:
            wakeup = _Signals()  # after placing: its pipe cannot sit in 3..
            if not _wait_for_first(kinds, wakeup):
                wakeup.close()
                _abandon(created, placed)
                return EXIT_OK
        elif signal.sigpending().intersection(_STOP_SIGNALS):
            # --now: a stop that came while the sockets were made; the exec's unblocking would
            # let it kill this process with the socket files still there.
            log.info("stopped before the command started; nothing started")
            _abandon(created, placed)
            return EXIT_OK
        exec_placed(path, options.command, exec_env)
    except BaseException:
        _abandon(created, placed)
        raise


def _abandon(created: Sequence[CreatedSocket], placed: range) -> None:
    """Remove the socket files made (while the placed fds pin them), then close the placed fds."""
    for item in created:
        remove_socket_file(item)
    close_all(partial(os.close, fd) for fd in placed)


# --- sockets -----------------------------------------------------------------------------


def _create(options: ActivateOptions) -> list[CreatedSocket]:
    """The sockets, all or nothing: from ``--from``'s manifest, or one per ``-l``."""
    if options.manifest is not None:
        manifest = load_manifest(options.manifest)
        for warning in manifest.warnings:
            if "no handler" not in warning:  # activate passes sockets to a program, not to handlers
                log.warning("%s", warning)
        created = create_sockets(manifest)
        if options.mode is ActivateMode.ACCEPT:
            for spec in manifest.sockets:
                if spec.type is SocketType.DATAGRAM:
                    _close(created)
                    raise ActivationError(
                        f"activate: --accept: {manifest.source}: sockets.{spec.name} is a datagram "
                        "socket: it has no connections to accept"
                    )
        return created
    created = []
    try:
        for spec in options.sockets:
            address = spec.listen[0]
            created.append(create_socket(spec, address, folder=Path.cwd(), label=f"activate: -l {address}"))
    except BaseException:
        _close(created)
        raise
    return created


def _close(created: Sequence[CreatedSocket]) -> None:
    """Close the sockets, removing the unix socket files made (while the sockets still pin them)."""
    for item in created:
        remove_socket_file(item)
    close_all(item.sock.close for item in created)


def _announce(created: Sequence[CreatedSocket], options: ActivateOptions) -> None:
    """One line per socket: where it listens, and as what COMMAND gets it."""
    for index, item in enumerate(created):
        name = item.spec_name if options.names_given else UNNAMED
        verb = "bound to" if item.sock.type == socket.SOCK_DGRAM else "listening on"
        if options.mode is ActivateMode.ACCEPT:
            where = "stdin and stdout" if options.inetd else f"fd 3 named {_ACCEPTED_NAME!r}"
            log.info(
                "%s %s (%r): each connection to its own command, on %s",
                verb,
                bound_address(item.sock),
                name,
                where,
            )
        else:
            log.info("%s %s as fd %d named %r", verb, bound_address(item.sock), 3 + index, name)


# --- signals -----------------------------------------------------------------------------


def _noted(signum: int, frame: object) -> None:
    """The handler of every signal handled: nothing; the wakeup pipe says which came."""


class _Signals:
    """The activator's signals, as bytes in a pipe that ``poll`` watches (``signal.set_wakeup_fd``).

    The console script may have blocked SIGTERM, SIGINT and SIGHUP (it does
    for ``serve``, whose name may be in COMMAND): the handlers are in place
    before they are unblocked, so one that waited is seen, not lost.
    """

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self.write_fd, warn_on_full_buffer=False)
        for signum in _HANDLED:
            signal.signal(signum, _noted)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _HANDLED)
        self.closed = False

    def take(self) -> set[int]:
        """The signals that came since the last call."""
        came: set[int] = set()
        while True:
            try:
                data = os.read(self.read_fd, 256)
            except BlockingIOError:
                return came
            if not data:
                return came
            came.update(data)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        signal.set_wakeup_fd(-1)
        for signum in _HANDLED:
            signal.signal(signum, signal.SIG_DFL)
        close_all([partial(os.close, self.read_fd), partial(os.close, self.write_fd)])


def _wait_for_first(kinds: Mapping[int, tuple[int, str]], wakeup: _Signals) -> bool:
    """Lazy mode: True once a connection or datagram waits on any fd of ``kinds``; False on SIGTERM or SIGINT.

    ``kinds``: each fd's socket type and where it listens, for the line.
    """
    poller = select.poll()
    poller.register(wakeup.read_fd, select.POLLIN)
    for fd in kinds:
        poller.register(fd, select.POLLIN)
    while True:
        for fd, _ in poller.poll():
            if fd != wakeup.read_fd:
                kind, where = kinds[fd]
                what = "datagram" if kind == socket.SOCK_DGRAM else "connection"
                log.debug("first %s on %s: starting the command", what, where)
                return True
        came = wakeup.take()
        if came.intersection(_STOP_SIGNALS):
            log.info("stopped before the first connection; nothing started")
            return False


# --- the forking modes -------------------------------------------------------------------


def _describe_status(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


class _Forking:
    """What ``--accept`` and ``--restart`` share: the poll loop, children, reaping and the stop."""

    def __init__(
        self,
        created: list[CreatedSocket],
        options: ActivateOptions,
        path: str,
        env: dict[str, str],
        wakeup: _Signals,
    ) -> None:
        self.created = created
        self.options = options
        self.path = path
        self.env = env
        self.wakeup = wakeup
        self.poller = select.poll()
        self.poller.register(wakeup.read_fd, select.POLLIN)
        self.by_fd = {item.sock.fileno(): item for item in created}
        self.listening = False
        # pid -> what it serves, for its exit line
        self.children: dict[int, str] = {}
        self.stopping = False

    # listening sockets in the poll set, or not

    def listen(self, on: bool) -> None:
        if on == self.listening:
            return
        for fd in self.by_fd:
            if on:
                self.poller.register(fd, select.POLLIN)
            else:
                self.poller.unregister(fd)
        self.listening = on

    # the loop

    def run(self) -> int:
        try:
            self.started()
            while not (self.stopping and not self.children):
                timeout = self.timeout()
                events = self.poller.poll(None if timeout is None else max(0, int(timeout * 1000) + 1))
                for fd, _ in events:
                    if fd in self.by_fd and self.listening:
                        self.readable(self.by_fd[fd])
                    else:
                        self.other_readable(fd)
                came = self.wakeup.take()
                if signal.SIGCHLD in came or self.children:
                    self.reap()
                if came.intersection(_STOP_SIGNALS) and not self.stopping:
                    self.stop()
                if signal.SIGHUP in came and not self.stopping:
                    self.hangup()
                self.tick()
            return EXIT_OK
        finally:
            self.kill_all()
            self.finished()
            _close(self.created)

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            what = self.children.pop(pid, None)
            if what is not None:
                self.exited(pid, what, status)
            else:
                self.other_exited(pid, status)

    def stop(self) -> None:
        """SIGTERM or SIGINT: start nothing more, SIGTERM every child, SIGKILL them after the grace period."""
        self.stopping = True
        self.listen(False)
        self.stop_deadline = time.monotonic() + self.options.grace_period
        log.info(
            "stopping: %d child(ren) get SIGTERM and %gs to exit",
            len(self.children),
            self.options.grace_period,
        )
        for pid in self.children:
            _signal(pid, signal.SIGTERM)

    def timeout(self) -> float | None:
        if self.stopping:
            return self.stop_deadline - time.monotonic()
        return None

    def tick(self) -> None:
        if self.stopping and self.children and time.monotonic() >= self.stop_deadline:
            log.warning(
                "%d child(ren) still running after %gs: SIGKILL",
                len(self.children),
                self.options.grace_period,
            )
            self.kill_all()

    def kill_all(self) -> None:
        for pid in list(self.children):
            _signal(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            del self.children[pid]

    # for the modes

    def started(self) -> None:
        pass

    def finished(self) -> None:
        pass

    def readable(self, item: CreatedSocket) -> None:
        raise NotImplementedError

    def other_readable(self, fd: int) -> None:
        pass

    def exited(self, pid: int, what: str, status: int) -> None:
        raise NotImplementedError

    def other_exited(self, pid: int, status: int) -> None:
        pass

    def hangup(self) -> None:
        pass


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


class _Acceptor(_Forking):
    """``--accept``: one child per connection, at most ``--max-connections`` at once."""

    def started(self) -> None:
        for item in self.created:
            item.sock.setblocking(False)
        self.count = 0
        self.listen(True)

    def readable(self, item: CreatedSocket) -> None:
        # Take every connection waiting, up to the limit: one poll per connection would
        # halve the rate under load.
        while self.listening:
            try:
                connection, peer = item.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue  # the client gave up before we took it
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("cannot accept on %s: %s", bound_address(item.sock), exc.strerror)
                    return
                raise
            with connection:
                try:
                    pid = self.spawn(connection.fileno())
                except ActivationError as exc:
                    log.error("connection from %s: %s", _peer(connection.family, peer), exc)
                    continue
            self.count += 1
            shown_peer = _peer(connection.family, peer)
            self.children[pid] = f"connection {self.count} from {shown_peer}"
            log.info(
                "connection %d from %s on %s: pid %d", self.count, shown_peer, bound_address(item.sock), pid
            )
            limit = self.options.max_connections
            if limit is not None and len(self.children) >= limit:
                self.listen(False)

    def spawn(self, connection: int) -> int:
        if self.options.inetd:
            return spawn_inetd(self.path, self.options.command, connection, environ=self.env)
        return spawn_connection(self.path, self.options.command, connection, environ=self.env)

    def exited(self, pid: int, what: str, status: int) -> None:
        log.debug("%s: pid %d ended with %s", what, pid, _describe_status(status))
        if not self.stopping:
            self.listen(True)


def _peer(family: int, peer: object) -> str:
    try:
        shown = address_from_sockname(family, peer)
    except (TypeError, ValueError):
        shown = None
    return str(shown) if shown else "a unix socket client"


class _Restarter(_Forking):
    """``--restart``: COMMAND as a child over the sockets, started again when it exits or code changes."""

    def started(self) -> None:
        self.failures = 0
        self.run_started = 0.0
        self.start_at: float | None = None  # a back-off's end
        self.replacing = False  # the child was told to stop so that a new one starts
        self.watcher: _Watcher | None = None
        if self.options.watch:
            self.watcher = _Watcher(self.options.watch)
            self.poller.register(self.watcher.fd, select.POLLIN)
        self.schedule(0.0)

    def finished(self) -> None:
        if self.watcher is not None:
            self.watcher.close()

    def schedule(self, delay: float) -> None:
        """Start COMMAND after ``delay`` s: at once with ``--now``, else on the next connection."""
        if delay > 0:
            self.start_at = time.monotonic() + delay
        elif self.options.restart_now:
            self.start()
        else:
            self.listen(True)

    def timeout(self) -> float | None:
        if self.stopping:
            return super().timeout()
        if self.start_at is not None:
            return self.start_at - time.monotonic()
        return None

    def tick(self) -> None:
        super().tick()
        if self.start_at is not None and not self.stopping and time.monotonic() >= self.start_at:
            self.start_at = None
            self.schedule(0.0)

    def readable(self, item: CreatedSocket) -> None:
        self.start()

    def start(self) -> None:
        self.listen(False)
        pid = fork_command(
            self.path,
            self.options.command,
            [item.sock.fileno() for item in self.created],
            [item.spec_name for item in self.created],
            names_given=self.options.names_given,
            environ=self.env,
        )
        self.children[pid] = "the command"
        self.run_started = time.monotonic()
        log.info("started %s: pid %d", self.options.command[0], pid)

    def exited(self, pid: int, what: str, status: int) -> None:
        ended = _describe_status(status)
        if self.stopping:
            log.info("pid %d ended with %s", pid, ended)
            return
        if self.replacing:
            self.replacing = False
            log.info("pid %d ended with %s; starting the command again", pid, ended)
            self.failures = 0
            self.schedule(0.0)
            return
        if os.waitstatus_to_exitcode(status) == 0:
            self.failures = 0
            log.info("pid %d ended with %s; starting it again on the next connection", pid, ended)
            self.schedule(0.0)
            return
        if time.monotonic() - self.run_started >= HEALTHY_RUN:
            self.failures = 0
        self.failures += 1
        delay = min(FIRST_DELAY * 2 ** (self.failures - 1), LONGEST_DELAY)
        log.warning("pid %d ended with %s; starting it again in %gs", pid, ended, delay)
        self.schedule(delay)

    def replace(self, why: str) -> None:
        """A change or SIGHUP: stop the running command (a new one starts once it ended), or start now."""
        if self.children:
            if not self.replacing:
                log.info(
                    "%s: stopping pid %s to start the command again", why, ", ".join(map(str, self.children))
                )
                self.replacing = True
                for pid in self.children:
                    _signal(pid, signal.SIGTERM)
        elif self.start_at is not None:
            log.info("%s: starting the command again now", why)
            self.start_at = None
            self.failures = 0
            self.schedule(0.0)

    def hangup(self) -> None:
        self.replace("SIGHUP")

    def other_readable(self, fd: int) -> None:
        if self.watcher is None or fd != self.watcher.fd:
            return
        for line in self.watcher.lines():
            if line == "ready":
                log.info("watching %s", ", ".join(self.options.watch))
            else:
                changed = line.split("\t")
                more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
                self.replace(f"changed: {changed[0]}{more}")
        if self.watcher.ended and not self.stopping:
            self.poller.unregister(self.watcher.fd)
            log.warning("the file watcher ended; no longer watching %s", ", ".join(self.options.watch))
            self.watcher.close()
            self.watcher = None

    def other_exited(self, pid: int, status: int) -> None:
        if self.watcher is not None and pid == self.watcher.process.pid:
            self.watcher.process.returncode = os.waitstatus_to_exitcode(status)


class _Watcher:
    """The watcher process (`trio_activate.processes.watch_changes`) and the pipe of its lines."""

    def __init__(self, paths: Sequence[str]) -> None:
        import subprocess
        import sys

        for path in paths:
            if not os.path.exists(path):
                raise ActivationError(f"activate: --watch {path}: no such file or folder")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "trio_activate.processes.watch_changes", str(os.getpid()), *paths],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
        )
        assert self.process.stdout is not None
        self.stream: IO[bytes] = self.process.stdout
        self.fd = self.stream.fileno()
        os.set_blocking(self.fd, False)
        self.pending = b""
        self.ended = False

    def lines(self) -> list[str]:
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            if not data:
                self.ended = True
                break
            self.pending += data
        *complete, self.pending = self.pending.split(b"\n")
        return [line.decode(errors="replace") for line in complete]

    def close(self) -> None:
        if self.process.returncode is None:
            _signal(self.process.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.process.pid, 0)
            self.process.returncode = -signal.SIGKILL
        self.stream.close()
