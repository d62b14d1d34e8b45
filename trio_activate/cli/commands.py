"""The ``trio-activate`` command line.

Layer 5: wires subcommands to the layers below.  Only the subcommands that
serve import trio, and only after the activator has run, so a self-activating
``serve`` re-execs before paying for that import.

Exit codes: 0 success, 1 a handler failed the service (or ``reload --wait``:
the reload failed, or its outcome never came), 2 usage or manifest/activation
error (one line on stderr, never a traceback).  A supervisor exits with its
workers' 2 (``processes.supervisor``); of the workers started together, only
the first to fail prints its line (`_first_to_tell`).

``--set KEY=VALUE`` (``serve``, ``dev``, ``check``) goes to every process that
reads the manifest: the forked activator parses this same command line, the
re-exec'd service runs it again, and workers and successors get it in their
command line (``spawn.worker_argv``).
"""

from __future__ import annotations

import argparse
import errno
import logging
import math
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .. import __version__
from ..errors import ActivationError, StartInterrupted
from ..model.log_lines import LOG_FORMATS, LOG_LEVELS
from ..model.manifest import Manifest, dump_manifest, load_manifest
from ..model.private_env import (
    ACTIVATOR_CHANNEL_VARIABLE,
    DEV_VARIABLE,
    ERROR_TOKEN_VARIABLE,
    HANDOFF_FROM_VARIABLE,
    WORKER_FDS_VARIABLE,
)
from ..model.text import is_decimal
from ..system.activator import settle_worker_environment
from ..system.fast_start import hold_shutdown_signals
from ..system.fds import close_all
from .logs import configure_logging

if TYPE_CHECKING:
    from ..system.acquire import ServiceSockets
    from ..system.takeover import TakenOver

# Layer 2 only up to the re-exec: trio is imported by `serve` after it.

__all__ = ["main"]

log = logging.getLogger("trio_activate")

# A supervisor's worker: the fd of the error token it shares with the workers started
# with it (see _take_error_token); None elsewhere.
_ERROR_TOKEN: int | None = None
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_ERROR = 2
# reload --wait: a new generation has start-timeout (30 s by default) to be ready.
DEFAULT_RELOAD_WAIT = 90.0
STATUS_TIMEOUT = 10.0
PID_T_MAX = 2**31 - 1

STARTER_MANIFEST = """\
# trio-activate manifest: named sockets and the handlers that serve them.
# Check it with `trio-activate check {path}`.

[service]
# name = "my-service"          # default: this file's name without .toml
grace-period = 5.0             # seconds in-flight handlers get on shutdown
python-path = ["."]            # folders (relative to this file) searched for handler modules
# workers = 1                  # more than one runs a supervisor; SIGHUP reloads with zero downtime
# worker-timeout = 30.0        # a worker whose event loop stalls this long is replaced
# watchdog = 10.0              # WatchdogSec= in the systemd unit
# user = "www-data"            # the systemd unit's User=; unset: DynamicUser=yes

# The table's key is the socket's name: systemd passes it as FileDescriptorName=.
[sockets.echo]
listen = "127.0.0.1:7000"      # "7000", "host:port", "[v6]:port", "/path.sock", "@abstract", or a list
type = "stream"                # stream | datagram | seqpacket
# backlog = 4096
# reuse-port = false
# ipv6-only = false            # IPv6 addresses only
# free-bind = false
# mode = "0660"                # unix socket files only; also owner, group, remove-on-stop
# accept = false               # stream only: Accept=yes, one process per connection (systemd)

[handlers.echo]
socket = "echo"                # a socket name, or a list of names
call = "trio_activate.examples:echo"   # module:function; await echo(stream) per connection
# max-connections = 1000       # stop accepting while this many are open
# on-full = "wait"             # at max-connections: "wait" in the backlog, or "close" at once
# idle-timeout = 60.0          # close a connection that received nothing for this long
# max-lifetime = 3600.0        # close a connection this old
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # A supervisor's worker or a hand-over successor (spawn_worker names its sockets so).
    worker = WORKER_FDS_VARIABLE in os.environ
    args.log_format = configure_logging(args.log_level, args.log_format, worker=worker)
    command: Callable[[argparse.Namespace], int] = args.command
    try:
        return command(args)
    except ActivationError as exc:
        if not _first_to_tell():
            # Another worker started with this one failed too and printed the same line.
            return EXIT_ERROR
        trace = ""
        if DEV_VARIABLE in os.environ and exc.__cause__ is not None:
            # dev: where in the user's code it failed (a typo's line and caret), that code's frames only.
            from .tracebacks import user_traceback

            trace = user_traceback(exc.__cause__)
        _report(str(exc), trace, worker=worker, log_format=args.log_format)
        return EXIT_ERROR
    except OSError as exc:
        if exc.errno not in (errno.EMFILE, errno.ENFILE):
            raise
        # Out of fds is the machine's limit, not a bug: one line, and exit 1 (a supervisor's worker
        # is started again; a manager's Restart= applies), not a configuration error's 2.
        _report(out_of_fds_line(exc), "", worker=worker, log_format=args.log_format)
        return EXIT_FAILED


def _report(line: str, trace: str, *, worker: bool, log_format: str) -> None:
    """The one line a command that failed leaves on stderr (after ``trace``, dev's user frames)."""
    if worker or log_format != "text":
        # A worker's line says whose it is, as its log lines do: several workers (and
        # their supervisor) share one stderr.  Under journald it is error-priority,
        # in JSON one object.  One write each, so lines never run together.
        if trace:
            sys.stderr.write(trace)
        log.error("%s", line)
    else:
        sys.stderr.write(f"{trace}trio-activate: {line}\n")
        sys.stderr.flush()


def out_of_fds_line(exc: OSError) -> str:
    """One line for EMFILE or ENFILE: which limit, and where to raise it."""
    import resource

    where = f" ({exc.filename})" if exc.filename else ""
    if exc.errno == errno.ENFILE:
        return f"out of file descriptors{where}: the system's limit (fs.file-max) is reached"
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return (
        f"out of file descriptors{where}: this process may open {soft} (RLIMIT_NOFILE); raise it "
        "(LimitNOFILE= in the unit, ulimit -n in a shell)"
    )


def _take_error_token() -> None:
    """In a supervisor's worker: keep the error token's fd (``ERROR_TOKEN_VARIABLE``), for us alone.

    Out of the environment and close-on-exec: no process the handlers start inherits it.
    """
    global _ERROR_TOKEN
    text = os.environ.pop(ERROR_TOKEN_VARIABLE, None)
    if text is None or not is_decimal(text) or len(text) > 9:
        return
    try:
        os.set_inheritable(int(text), False)
    except OSError:
        return
    _ERROR_TOKEN = int(text)


def _first_to_tell() -> bool:
    """Whether this process prints its configuration error: True, unless a worker started with it
    took the token first (the same line, once per worker, would say nothing more)."""
    if _ERROR_TOKEN is None:
        return True
    try:
        return os.read(_ERROR_TOKEN, 1) != b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trio-activate",
        description="Trio-native socket activation, configured by a TOML manifest.",
    )
    parser.add_argument("--version", action="version", version=f"trio-activate {__version__}")
    _add_log_options(parser, default_level="info", default_format="auto")
    # Accepted after the command too (`trio-activate serve --log-level debug m.toml`): there they
    # default to nothing, so that one given before the command stays.
    logging_options = argparse.ArgumentParser(add_help=False)
    _add_log_options(logging_options, default_level=argparse.SUPPRESS, default_format=argparse.SUPPRESS)
    subcommands = _SubcommandsWithLogging(
        parser.add_subparsers(title="commands", metavar="COMMAND", required=True), logging_options
    )

    check = subcommands.add_parser(
        "check",
        help="validate manifests and print them normalized",
        description="Validate each MANIFEST and print it normalized as TOML, every default explicit.",
    )
    check.add_argument("manifests", nargs="+", metavar="MANIFEST", type=Path)
    _add_set_option(check)
    check.add_argument(
        "--no-import",
        action="store_true",
        help="do not import the handlers (by default each is imported, with the manifest's python-path, "
        "and its signature checked against what its kind passes)",
    )
    check.set_defaults(command=cmd_check)

    init = subcommands.add_parser(
        "init",
        help="write a commented starter manifest",
        description="Write a commented starter manifest to PATH; never overwrites a file.",
    )
    init.add_argument("path", nargs="?", default=Path("service.toml"), type=Path, metavar="PATH")
    init.add_argument(
        "--asgi",
        action="store_true",
        help="an ASGI service: the manifest and a starter application, app.py, beside it",
    )
    init.set_defaults(command=cmd_init)

    serve = subcommands.add_parser(
        "serve",
        help="run the service: adopt passed sockets, or self-activate",
        description=(
            "Run the manifest's handlers. Under systemd (or systemd-socket-activate) adopt the passed "
            "sockets; otherwise create them and re-exec through the internal activator, so both take "
            "the same path. SIGTERM or SIGINT stop gracefully; a second SIGINT cancels at once."
        ),
    )
    serve.add_argument("manifest", type=Path, metavar="MANIFEST")
    serve.add_argument(
        "--workers",
        type=_positive_int,
        metavar="N",
        help="worker processes sharing the sockets (default: [service] workers, else 1); "
        "more than one runs a supervisor",
    )
    serve.add_argument(
        "--supervise",
        action="store_true",
        help="run a supervisor even with one worker (SIGHUP then reloads with zero downtime)",
    )
    _add_set_option(serve)
    _add_control_options(serve)
    serve.add_argument(
        "--takeover",
        metavar="PATH",
        help="take the listening sockets (and the control socket) over from the service whose control "
        "socket is PATH; it stops accepting and drains once this process serves",
    )
    serve.set_defaults(command=cmd_serve)

    dev = subcommands.add_parser(
        "dev",
        help="serve with auto-reload: new code takes over when it is ready",
        description=(
            "Create the sockets once and serve them with one worker; on a change to the manifest, its "
            "python-path folders or a --watch path, start a new worker, and stop the old one once the "
            "new one is ready. A new worker that fails leaves the old one serving."
        ),
    )
    dev.add_argument("manifest", type=Path, metavar="MANIFEST")
    dev.add_argument(
        "--watch", type=Path, action="append", default=[], metavar="PATH", help="also watch PATH"
    )
    _add_set_option(dev)
    _add_control_options(dev)
    dev.set_defaults(command=cmd_dev)

    reload = subcommands.add_parser(
        "reload",
        help="reload a running serve with zero downtime",
        description=(
            "Reload a running trio-activate serve or dev (supervised or not), by PID, pid file or "
            "control socket. With --wait (or --control), return once the new code serves (exit 0), "
            "or fail (exit 1) when it could not start and the old code keeps serving: asked over the "
            "service's control socket when it has one, else by SIGHUP. A PID that is not a "
            "trio-activate service is not signalled (exit 2)."
        ),
    )
    reload.add_argument("target", nargs="?", metavar="PID|PIDFILE")
    reload.add_argument(
        "--wait", action="store_true", help="wait for the outcome; exit 1 when the new code failed"
    )
    reload.add_argument(
        "--control", metavar="PATH", help="ask the control socket at PATH (implies --wait) instead of a PID"
    )
    reload.add_argument(
        "--timeout",
        type=_positive_float,
        default=DEFAULT_RELOAD_WAIT,
        metavar="SECONDS",
        help=f"with --wait: give up after SECONDS (default {DEFAULT_RELOAD_WAIT:g})",
    )
    reload.set_defaults(command=cmd_reload)

    status = subcommands.add_parser(
        "status",
        help="show a running service: generation, processes, sockets, connections, reloads",
        description=(
            "Ask a running trio-activate serve or dev over its control socket, found by PID or pid "
            "file (the socket it also listens on under its PID) or given with --control, and print "
            "its generation, main and worker PIDs, sockets, connections in flight per handler, "
            "uptime and reloads."
        ),
    )
    status.add_argument("target", nargs="?", metavar="PID|PIDFILE")
    status.add_argument("--control", metavar="PATH", help="the control socket's path")
    status.add_argument("--json", action="store_true", help="print the status document as JSON")
    status.add_argument(
        "--timeout",
        type=_positive_float,
        default=STATUS_TIMEOUT,
        metavar="SECONDS",
        help=f"give up after SECONDS (default {STATUS_TIMEOUT:g})",
    )
    status.set_defaults(command=cmd_status)

    units = subcommands.add_parser(
        "systemd",
        help="write the .socket and .service units for a manifest",
        description=(
            "Write one .socket unit per socket name and one .service unit that runs "
            "`trio-activate serve MANIFEST` with them. Without --output, print them."
        ),
    )
    units.add_argument("manifest", type=Path, metavar="MANIFEST")
    units.add_argument("--output", type=Path, metavar="DIR", help="write the unit files into DIR")
    units.add_argument("--user", action="store_true", help="units for a user manager (systemctl --user)")
    units.add_argument("--name", help="the service's unit name (default: [service] name)")
    units.add_argument(
        "--systemd-version",
        type=_positive_int,
        metavar="N",
        help="target systemd version (default: from `systemctl --version`); 253+ gets Type=notify-reload",
    )
    units.add_argument("--force", action="store_true", help="overwrite existing unit files")
    units.set_defaults(command=cmd_systemd)

    _add_activate_parser(subcommands)

    fds = subcommands.add_parser(
        "fds",
        help="show the sockets this process was passed",
        description=(
            "Show what LISTEN_* passed to this process: each fd's number, name, family, type, "
            "listening state and address, and with MANIFEST how each matches. Run it under "
            "systemd-socket-activate or as a unit's ExecStart= to check the unit."
        ),
    )
    fds.add_argument("manifest", nargs="?", type=Path, metavar="MANIFEST")
    fds.add_argument("--json", action="store_true", help="print one JSON object, stable for scripts")
    fds.set_defaults(command=cmd_fds)
    return parser


def _add_activate_parser(subcommands: _SubcommandsWithLogging) -> None:
    activate = subcommands.add_parser(
        "activate",
        help="pass sockets to any program that reads LISTEN_FDS, as systemd-socket-activate does",
        description=(
            "Create the sockets and start COMMAND with them at fds 3.. as systemd passes them "
            "(LISTEN_FDS, LISTEN_FDNAMES, LISTEN_PID, LISTEN_PIDFDID). By default wait for the first "
            "connection or datagram, then exec COMMAND in place; --now execs at once; --accept runs one "
            "COMMAND per connection; --restart runs COMMAND as a child and starts it again when it "
            "exits or a --watch path changes, keeping the sockets open all along."
        ),
    )
    activate.add_argument(
        "-l",
        "--listen",
        action="append",
        default=[],
        metavar="ADDRESS",
        help='listen on ADDRESS (repeatable): "7000", "127.0.0.1:7000", "[::1]:7000", "/path.sock", '
        '"./path.sock" or "@name", as a manifest\'s listen',
    )
    activate.add_argument("-d", "--datagram", action="store_true", help="datagram sockets (default: stream)")
    activate.add_argument("--seqpacket", action="store_true", help="seqpacket sockets (default: stream)")
    activate.add_argument(
        "--fdname",
        action="append",
        default=[],
        metavar="NAME[:NAME...]",
        help="the sockets' names in LISTEN_FDNAMES, one per -l in order, or one for all "
        "(default: LISTEN_FDNAMES is not set, and readers name every fd 'unknown')",
    )
    activate.add_argument(
        "--backlog",
        type=_positive_int,
        metavar="N",
        help="the listen backlog (default 4096, capped by somaxconn)",
    )
    activate.add_argument(
        "-E",
        "--setenv",
        action="append",
        default=[],
        metavar="NAME[=VALUE]",
        help="set NAME to VALUE in COMMAND's environment (NAME alone: keep the caller's, e.g. NOTIFY_SOCKET)",
    )
    activate.add_argument(
        "--from",
        dest="manifest",
        metavar="MANIFEST",
        help="take the sockets, their options and names from MANIFEST (instead of -l)",
    )
    activate.add_argument(
        "--now", action="store_true", help="start COMMAND at once, not on the first connection"
    )
    activate.add_argument(
        "-a",
        "--accept",
        action="store_true",
        help="accept each connection and run one COMMAND per connection, the connection at fd 3 "
        "(LISTEN_FDS=1, LISTEN_FDNAMES=connection)",
    )
    activate.add_argument(
        "--inetd",
        action="store_true",
        help="with --accept (implied): the connection on stdin and stdout instead",
    )
    activate.add_argument(
        "--max-connections",
        type=_positive_int,
        metavar="N",
        help="with --accept: at most N commands at once; further connections wait in the backlog",
    )
    activate.add_argument(
        "--restart",
        action="store_true",
        help="run COMMAND as a child and start it again when it exits (or on SIGHUP), keeping the sockets",
    )
    activate.add_argument(
        "--watch",
        action="append",
        default=[],
        metavar="PATH",
        help="with --restart: also start COMMAND again when a file under PATH changes (repeatable)",
    )
    activate.add_argument(
        "--grace-period",
        type=_positive_float,
        default=5.0,
        metavar="SECONDS",
        help="on SIGTERM or SIGINT: how long the children have to exit before SIGKILL (default 5)",
    )
    activate.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARGS...]")
    activate.set_defaults(command=cmd_activate)


def _add_log_options(parser: argparse.ArgumentParser, *, default_level: str, default_format: str) -> None:
    parser.add_argument(
        "--log-level",
        default=default_level,
        choices=LOG_LEVELS,
        help="what to log on stderr (default: info)",
    )
    parser.add_argument(
        "--log-format",
        default=default_format,
        choices=LOG_FORMATS,
        help="how: journal (a syslog priority on each line) when JOURNAL_STREAM names stderr, "
        "text (timestamped) elsewhere, or json, one object per line (default: auto)",
    )


def _add_set_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a manifest key, validated as the file is (repeatable): e.g. "
        "--set sockets.http.listen=127.0.0.1:9000, --set service.workers=4; VALUE is read as a "
        "TOML value when it is one (a number, true, an array, a quoted string), else as a string",
    )


def _add_control_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--control",
        metavar="PATH",
        help="the control socket for status and reload (default: [service] control, else "
        "$RUNTIME_DIRECTORY/control.sock under systemd, else none)",
    )
    parser.add_argument(
        "--pid-file",
        metavar="PATH",
        help="write the PID to signal to PATH once serving (default: [service] pid-file)",
    )


class _SubcommandsWithLogging:
    """``add_parser`` of `subcommands`, each subcommand taking the logging options too."""

    def __init__(
        self,
        subcommands: argparse._SubParsersAction[argparse.ArgumentParser],
        options: argparse.ArgumentParser,
    ) -> None:
        self.subcommands = subcommands
        self.options = options

    def add_parser(self, name: str, *, help: str, description: str) -> argparse.ArgumentParser:
        return self.subcommands.add_parser(name, parents=[self.options], help=help, description=description)


def cmd_check(args: argparse.Namespace) -> int:
    paths: list[Path] = args.manifests
    for index, path in enumerate(paths):
        manifest = load_manifest(path, overrides=args.overrides)
        for warning in manifest.warnings:
            log.warning("%s", warning)
        if not args.no_import:
            from .handler_check import check_handlers_in_subprocess

            check_handlers_in_subprocess(manifest)
        if len(paths) > 1:
            print(("\n" if index else "") + f"# {path}")
        sys.stdout.write(dump_manifest(manifest))
    return EXIT_OK


def cmd_init(args: argparse.Namespace) -> int:
    from .starters import ASGI_APP, ASGI_APP_MODULE, ASGI_MANIFEST, write_new_files

    path: Path = args.path
    files = [(path, (ASGI_MANIFEST if args.asgi else STARTER_MANIFEST).format(path=path))]
    if args.asgi:
        files.append((path.parent / ASGI_APP_MODULE, ASGI_APP.format(manifest=path.name)))
    try:
        # "x": create, and fail if anything is there, without a check-then-write race.
        existing = write_new_files(files)
    except OSError as exc:
        print(f"trio-activate: {exc.filename or path}: cannot write: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_ERROR
    if existing is not None:
        print(f"trio-activate: {existing}: already exists; not overwriting it", file=sys.stderr)
        return EXIT_ERROR
    wrote = " and ".join(str(p) for p, _ in files)
    print(f"wrote {wrote}; check it with: trio-activate check {path}", file=sys.stderr)
    return EXIT_OK


def _load_and_acquire(path: Path, overrides: list[str], *, warn: bool) -> tuple[Manifest, ServiceSockets]:
    """The manifest and its sockets: adopted, or created by a self-activation re-exec.

    Runs before trio is imported, so a re-exec does not pay for it.  The fast
    start's re-exec'd process (see system.fast_start) is past that point: its activator
    is reading the manifest and making the sockets right now, perhaps on this
    very core.  It imports trio first, which comes next anyway, then takes
    the sockets and the manifest's document, ready instead of waited for.
    """
    from ..system.acquire import acquire_sockets

    delivery = None
    if ACTIVATOR_CHANNEL_VARIABLE in os.environ:
        import trio  # noqa: F401

        from ..system.activator_channel import receive_from_forked_activator

        delivery = receive_from_forked_activator(os.environ)
    manifest = load_manifest(path, document=delivery.document if delivery else None, overrides=overrides)
    if warn:
        for warning in manifest.warnings:
            log.warning("%s", warning)
    files = delivery.files if delivery else None
    return manifest, acquire_sockets(manifest, reexec=True, delivered_files=files)


def cmd_serve(args: argparse.Namespace) -> int:
    # First thing (again, for an in-process main()): signals during start-up wait.
    hold_shutdown_signals()
    is_worker = settle_worker_environment()
    if is_worker:
        _take_error_token()
    taken = None
    if args.takeover is not None:
        manifest, taken = _load_and_take_over(
            args.manifest, args.overrides, args.takeover, is_worker=is_worker
        )
        owned = taken.sockets
    else:
        # A supervisor's worker: the supervisor already showed the manifest's warnings.
        manifest, owned = _load_and_acquire(args.manifest, args.overrides, warn=not is_worker)
    try:
        workers = args.workers if args.workers is not None else manifest.service.workers
        # PID 1 (a container's init) must not hand over on SIGHUP: its exit would end
        # the PID namespace, the service with it.  A supervisor keeps PID 1 across reloads.
        supervise = args.supervise or os.getpid() == 1
        control = None
        if not is_worker:
            from ..processes.control import resolve_options

            control = resolve_options(
                manifest, control=args.control, pid_file=args.pid_file, environ=os.environ
            )
        if not is_worker and owned.connection is None and (workers > 1 or supervise):
            from ..processes.supervise_main import run_supervisor

            return run_supervisor(
                manifest,
                args.manifest,
                owned,
                workers=workers,
                log_level=args.log_level,
                log_format=args.log_format,
                overrides=args.overrides,
                control=control,
                takeover=taken,
            )
        from ..processes.service_main import run_service
        from ..processes.spawn import WorkerCommand, worker_argv

        # A standalone process (not a supervisor's worker) reloads on SIGHUP by
        # handing its sockets over to a successor; a hand-over successor is one too.
        reload_command = None
        if not is_worker or HANDOFF_FROM_VARIABLE in os.environ:
            sockets = [(sock.fileno(), name) for name, group in owned.sockets.items() for sock in group]
            argv = worker_argv(
                str(args.manifest.absolute()), args.log_level, args.log_format, overrides=args.overrides
            )
            reload_command = WorkerCommand(argv, sockets)
        return run_service(manifest, owned, reload_command=reload_command, control=control, takeover=taken)
    except StartInterrupted as stop:
        log.info("%s while starting: stopped before serving", stop)
        if taken is not None:
            taken.fail(f"{stop} while starting")
        if is_worker:
            owned.files = []
        else:
            owned.never_started()
        return EXIT_OK
    except (ActivationError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno not in (errno.EMFILE, errno.ENFILE):
            raise
        # A start that failed, for a configuration error or for want of fds (one line, from main).
        if taken is not None:
            taken.fail(str(exc))
        if is_worker:
            # A supervisor's worker or a hand-over successor: the socket files still
            # serve whoever started it, remove-on-stop or not.
            owned.files = []
        else:
            # The process the manager started.
            owned.never_started()
            owned.close_queued_clients()
        raise
    finally:
        close_all([owned.close, *([taken.close] if taken is not None else [])])


def _load_and_take_over(
    path: Path, overrides: list[str], control_path: str, *, is_worker: bool
) -> tuple[Manifest, TakenOver]:
    """``serve --takeover``: the manifest, and the sockets of the service that answers at ``control_path``."""
    from ..system.takeover import take_over

    if is_worker or any(name in os.environ for name in ("LISTEN_FDS", "LISTEN_PID")):
        raise ActivationError(
            f"--takeover {control_path}: sockets were passed to this process already (LISTEN_FDS); "
            "take them over from a service, or adopt what was passed, not both"
        )
    manifest = load_manifest(path, overrides=overrides)
    for warning in manifest.warnings:
        log.warning("%s", warning)
    return manifest, take_over(os.path.abspath(control_path), manifest)


def cmd_dev(args: argparse.Namespace) -> int:
    hold_shutdown_signals()
    manifest, owned = _load_and_acquire(args.manifest, args.overrides, warn=True)
    # dev made these sockets: stopping removes every socket file it created.
    owned.remove_on_stop = frozenset(manifest.socket_names())
    try:
        from ..processes.control import resolve_options
        from ..processes.supervise_main import run_supervisor

        control = resolve_options(manifest, control=args.control, pid_file=args.pid_file, environ=os.environ)
        watch = [manifest.path or args.manifest]
        watch += [manifest.folder / entry for entry in manifest.service.python_path]
        watch += args.watch
        return run_supervisor(
            manifest,
            args.manifest,
            owned,
            workers=1,
            log_level=args.log_level,
            log_format=args.log_format,
            overrides=args.overrides,
            watch=watch,
            control=control,
        )
    finally:
        owned.close()


def run_forked_activator(channel_fd: int) -> int:
    """The activator ``fast_start`` forks for a fast start: this command line's sockets, over ``channel_fd``.

    Returns the exit status.  It prints nothing of its own: the re-exec'd
    parent parses the same command line and reports any usage error, and
    reports the activator's errors, which come over the channel.
    """
    from ..system.activator_channel import deliver_sockets_to_service

    quiet = open(os.devnull, "w")  # noqa: SIM115 - for the life of this short process
    saved = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = quiet
    try:
        args = build_parser().parse_args()
    except SystemExit:  # --help, --version or a usage error: the parent shows it
        return EXIT_ERROR
    finally:
        sys.stdout, sys.stderr = saved
    # What it logs (a port chosen by the kernel, a cleanup that failed) is the service's
    # to say: the service is our parent, re-exec'd under the same PID.
    configure_logging(args.log_level, args.log_format, speaking_for=os.getppid())
    return deliver_sockets_to_service(channel_fd, args.manifest, overrides=args.overrides)


def _target_pid(target: str) -> int | str:
    """The PID ``target`` names (a PID, or a pid file), or the one line saying why it names none."""
    if is_decimal(target):
        if not _is_pid(target):
            return f"{target[:40]!r} is not a PID"
        return int(target)
    try:
        text = Path(target).read_text().strip()
    except OSError as exc:
        return f"{target}: cannot read: {exc.strerror or exc}"
    if not _is_pid(text):
        return f"{target}: {text[:40]!r} is not a PID"
    return int(text)


def _control_target(args: argparse.Namespace) -> tuple[str | bytes, int | None, str] | str:
    """Where to ask: (address, the PID that must listen there, how to name it), or the usage error."""
    from ..model.control import abstract_name
    from ..system.control import service_problem

    target: str | None = args.target
    if args.control is not None:
        if target is not None:
            return f"give a PID, a pid file or --control, not both ({target!r} and --control)"
        return os.path.abspath(args.control), None, args.control
    if target is None:
        return "give the service's PID, its pid file, or --control PATH"
    pid = _target_pid(target)
    if isinstance(pid, str):
        return pid
    problem = service_problem(pid)
    if problem is not None:
        return f"{problem}; nothing done"
    return abstract_name(pid), pid, f"PID {pid}"


def cmd_status(args: argparse.Namespace) -> int:
    import json

    from ..model.control import format_status
    from ..system.control import ControlClientError, NoControlSocket, ask

    where = _control_target(args)
    if isinstance(where, str):
        print(f"trio-activate: {where}", file=sys.stderr)
        return EXIT_ERROR
    address, pid, shown = where
    try:
        answer = ask(address, "status", timeout=args.timeout, expect_pid=pid)
    except NoControlSocket as exc:
        problem = str(exc)
        if pid is not None:
            problem = (
                f"{shown} has no control socket (serve --control PATH, or [service] control, gives it one), "
                "or it listens in another network namespace (give --control PATH)"
            )
        print(f"trio-activate: status: {problem}", file=sys.stderr)
        return EXIT_ERROR
    except ControlClientError as exc:
        print(f"trio-activate: status: {exc}", file=sys.stderr)
        return EXIT_FAILED
    status = answer.get("status")
    if not answer["ok"] or not isinstance(status, dict):
        print(f"trio-activate: status of {shown}: {answer.get('error', 'no status')}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps(status))
    else:
        sys.stdout.write(format_status(status))
    return EXIT_OK


def cmd_reload(args: argparse.Namespace) -> int:
    from ..system.control import ControlClientError, NoControlSocket, ask

    where = _control_target(args)
    if isinstance(where, str):
        print(f"trio-activate: {where}", file=sys.stderr)
        return EXIT_ERROR
    address, pid, shown = where
    if pid is None or args.wait:
        # systemd stops a reload in progress (a stop or restart job came) with
        # SIGTERM, and counts a control process killed by it as the unit's failure
        # (Result=signal).  The reload did not fail: the service is stopping.
        signal.signal(signal.SIGTERM, _raise_interrupted)
        # The control socket answers with the outcome: the one way to wait that needs no signal.
        try:
            answer = ask(address, "reload", timeout=args.timeout, expect_pid=pid)
        except NoControlSocket as exc:
            if pid is None:
                print(f"trio-activate: reload: {exc}", file=sys.stderr)
                return EXIT_ERROR
            return _reload_by_signal(pid, args)  # no control socket: SIGHUP, and its outcome socket
        except ControlClientError as exc:
            print(f"trio-activate: reload: {exc}", file=sys.stderr)
            return EXIT_FAILED
        except _Interrupted:
            print(f"trio-activate: reload of {shown}: no longer waiting (SIGTERM)", file=sys.stderr)
            return EXIT_OK
        if not answer["ok"]:
            print(f"trio-activate: reload of {shown} failed: {answer.get('error', '')}", file=sys.stderr)
            return EXIT_FAILED
        print(f"reloaded {shown}: {answer.get('message', '')}", file=sys.stderr)
        return EXIT_OK
    return _send_sighup(pid)


def _reload_by_signal(pid: int, args: argparse.Namespace) -> int:
    from ..system.reload_outcome import ReloadWaiter, ReloadWaitError

    # SIGTERM raises _Interrupted here too (see cmd_reload).
    try:
        # Bound before the signal, so the outcome cannot arrive before we listen.
        with ReloadWaiter(pid) as waiter:
            status = _send_sighup(pid)
            if status != EXIT_OK:
                return status
            taken_over, text = waiter.wait(args.timeout)
    except ProcessLookupError as exc:
        # As without --wait: a PID that names no process is a usage error.
        print(f"trio-activate: cannot signal PID {pid}: {exc.strerror}", file=sys.stderr)
        return EXIT_ERROR
    except ReloadWaitError as exc:
        print(f"trio-activate: reload: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except _Interrupted:
        print(f"trio-activate: reload of PID {pid}: no longer waiting (SIGTERM)", file=sys.stderr)
        return EXIT_OK
    if not taken_over:
        print(f"trio-activate: reload of PID {pid} failed: {text}", file=sys.stderr)
        return EXIT_FAILED
    print(f"reloaded PID {pid}: {text}", file=sys.stderr)
    return EXIT_OK


class _Interrupted(Exception):
    """SIGTERM while `reload --wait` waited."""


def _raise_interrupted(signum: int, frame: object) -> None:
    raise _Interrupted


def _send_sighup(pid: int) -> int:
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:
        print(f"trio-activate: cannot signal PID {pid}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_ERROR
    print(f"sent SIGHUP to {pid}", file=sys.stderr)
    return EXIT_OK


def _is_pid(text: str) -> bool:
    """Plain decimal digits naming one process: 1 to 2**31-1.

    ``kill(0, ...)`` would signal our own process group (the shell's job,
    the script that ran us), and a number beyond ``pid_t`` cannot be passed.
    """
    return is_decimal(text) and len(text) <= 10 and 1 <= int(text) <= PID_T_MAX


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds > 0")
    return value


def _positive_int(text: str) -> int:
    if not is_decimal(text) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


def cmd_activate(args: argparse.Namespace) -> int:
    from ..model.activate_options import activate_options
    from ..processes.activate_main import run_activate

    argv: list[str] = args.argv
    if argv[:1] == ["--"]:
        argv = argv[1:]
    options = activate_options(
        command=argv,
        listen=args.listen,
        datagram=args.datagram,
        seqpacket=args.seqpacket,
        fdnames=args.fdname,
        backlog=args.backlog,
        setenv=args.setenv,
        manifest=args.manifest,
        now=args.now,
        accept=args.accept,
        inetd=args.inetd,
        max_connections=args.max_connections,
        restart=args.restart,
        watch=args.watch,
        grace_period=args.grace_period,
    )
    return run_activate(options, os.environ)


def cmd_fds(args: argparse.Namespace) -> int:
    from ..system.fds_report import report_fds

    manifest = load_manifest(args.manifest) if args.manifest is not None else None
    return report_fds(manifest, as_json=args.json)


def cmd_systemd(args: argparse.Namespace) -> int:
    from ..model.units import render_units, unit_name_part
    from ..system.unit_paths import check_reachable, needed_paths, service_user

    manifest = load_manifest(args.manifest)
    if args.name is not None and unit_name_part(args.name) != args.name:
        print(f"trio-activate: --name {args.name!r}: not a valid unit name", file=sys.stderr)
        return EXIT_ERROR
    version = args.systemd_version if args.systemd_version is not None else _installed_systemd_version()
    command = _own_command()
    manifest_path = args.manifest.resolve()
    units = render_units(
        manifest,
        command=command,
        manifest_path=str(manifest_path),
        systemd_version=version,
        user=args.user,
        name=args.name,
        needed_paths=[] if args.user else needed_paths(manifest, manifest_path, command),
    )
    if not args.user:
        # After rendering: what the manifest cannot express is reported first.  A user
        # manager runs the service as the user running this: nothing to check there.
        check_reachable(manifest, manifest_path, command, service_user(manifest))
    if args.output is None:
        for index, unit in enumerate(units):
            print(("\n" if index else "") + f"### {unit.name}")
            sys.stdout.write(unit.text)
        return EXIT_OK
    folder: Path = args.output
    if not folder.is_dir():
        print(f"trio-activate: --output {folder}: not a folder", file=sys.stderr)
        return EXIT_ERROR
    existing = [unit.name for unit in units if (folder / unit.name).exists()]
    if existing and not args.force:
        print(f"trio-activate: {folder / existing[0]}: already exists; --force overwrites", file=sys.stderr)
        return EXIT_ERROR
    for unit in units:
        (folder / unit.name).write_text(unit.text, encoding="utf-8")
        print(f"wrote {folder / unit.name}", file=sys.stderr)
    return EXIT_OK


def _installed_systemd_version() -> int | None:
    """The first number `systemctl --version` prints ("systemd 252 (252.38-1)"), or None."""
    import shutil
    import subprocess

    systemctl = shutil.which("systemctl")
    if systemctl is None:
        return None
    try:
        out = subprocess.run([systemctl, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    words = out.split()
    if len(words) >= 2 and words[0] == "systemd" and is_decimal(words[1]):
        return int(words[1])
    return None


def _own_command() -> list[str]:
    """How a unit should start trio-activate: the console script if this is it, else python -m."""
    import shutil

    script = Path(sys.argv[0])
    if script.name == "trio-activate" and script.is_file():
        return [str(script.resolve())]
    found = shutil.which("trio-activate")
    if found is not None:
        return [str(Path(found).resolve())]
    return [str(Path(sys.executable).absolute()), "-m", "trio_activate"]
