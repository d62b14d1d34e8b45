"""The private variables trio-activate sets for its own processes, by name.

Layer 1: names only.  Kept apart from the activator so that the console
script's first code (``fast_start``), which must import next to nothing, can
tell whether sockets are on their way to this process.
"""

from __future__ import annotations

__all__ = [
    "ACTIVATOR_CHANNEL_VARIABLE",
    "ACTIVATOR_MARKER",
    "DEV_VARIABLE",
    "ERROR_TOKEN_VARIABLE",
    "FRESH_CODE_VARIABLE",
    "HANDOFF_FROM_VARIABLE",
    "HANDOFF_STATE_VARIABLE",
    "SOCKET_FILES_VARIABLE",
    "SUPERVISOR_VARIABLE",
    "WORKER_FDS_VARIABLE",
]

# Set to our PID just before the re-exec; removed by whoever adopts.
ACTIVATOR_MARKER = "TRIO_ACTIVATE_ACTIVATOR_PID"
# Set by the fast start (`fast_start`) before it re-execs: "<fd>:<pid>", the re-exec'd
# process's end of a unix seqpacket pair and the PID of the forked activator at
# the other end, which creates the sockets meanwhile and passes them over it.
ACTIVATOR_CHANNEL_VARIABLE = "TRIO_ACTIVATE_ACTIVATOR_CHANNEL"
# Set by the supervisor for each worker it spawns: JSON [[fd, name], ...] of the
# sockets it passed (with pass_fds, at the supervisor's fd numbers).  The worker
# cannot be given LISTEN_PID, which is its own PID, known only after fork; so it
# settles its own LISTEN_* first thing (settle_worker_environment).
WORKER_FDS_VARIABLE = "TRIO_ACTIVATE_WORKER_FDS"
# Set in a successor that a single-process serve hands its sockets over to on
# SIGHUP: the predecessor's PID (see handoff.py).
HANDOFF_FROM_VARIABLE = "TRIO_ACTIVATE_HANDOFF_FROM"
# Set in a hand-over successor with its predecessor's control socket (the fd it
# inherits, the file's path and identity), pid file and reload history, as JSON
# (processes.control.Operated.successor_state).
HANDOFF_STATE_VARIABLE = "TRIO_ACTIVATE_HANDOFF_STATE"
# Set by the supervisor for each worker it spawns: its own PID.  The worker
# stops when that process dies (a `kill -9`), instead of serving on, orphaned,
# with the port bound.  A hand-over successor has none: its predecessor exits
# on purpose.
SUPERVISOR_VARIABLE = "TRIO_ACTIVATE_SUPERVISOR_PID"
# Set by `trio-activate dev` in its workers: full tracebacks for start-up
# errors, and handler modules compiled from source (never stale bytecode).
DEV_VARIABLE = "TRIO_ACTIVATE_DEV"
# Set in a worker that must run the handlers' code as it is on disk now: one that
# a reload starts (a supervisor's generation after the first, a hand-over
# successor) and every worker of `dev`.  It imports the project's own modules from
# source (fresh_imports): a .pyc records its source's mtime in whole seconds and its
# size, so a file rewritten within the second at the same size would reload stale.
FRESH_CODE_VARIABLE = "TRIO_ACTIVATE_FRESH_CODE"
# The unix socket files the activator created, as JSON [[name, path, st_dev, st_ino], ...],
# so the re-exec'd process can honour remove-on-stop for files that are its own, and only those.
SOCKET_FILES_VARIABLE = "TRIO_ACTIVATE_SOCKET_FILES"
# Set by the supervisor for each worker it spawns: the fd of a pipe that the workers
# started together (a generation's, or restarts under way at once) share, holding one
# byte.  A worker that fails with a configuration error prints its line only if it
# reads that byte: the others would print the same line again, once per worker.
ERROR_TOKEN_VARIABLE = "TRIO_ACTIVATE_ERROR_TOKEN"
