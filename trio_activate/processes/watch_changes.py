"""A file watcher in a process of its own: ``activate --restart --watch``'s eyes.

    python -m trio_activate.processes.watch_changes PARENT_PID PATH...

Prints ``ready`` once watching, then one line per batch of changes (the
changed paths, tab-separated) on stdout, flushed, until stdout closes or
PARENT_PID is no longer its parent.

Why a process: watchfiles watches from threads of its own, and ``activate``
forks its commands and runs Python in the child before the exec, which is
safe only while the forking process has a single thread
(`trio_activate.system.activate_exec`).  The watcher is the same library
``dev`` watches with, with its default filter (version control folders,
caches, editor swap files do not count).
"""

from __future__ import annotations

import os
import sys

# How often (ms) the watcher looks up from waiting: to say it is ready, and to see its parent gone.
_LOOK_UP_MS = 200


def main(args: list[str]) -> int:
    from watchfiles import watch

    parent, paths = int(args[0]), args[1:]
    ready = False
    try:
        for changes in watch(*paths, yield_on_timeout=True, rust_timeout=_LOOK_UP_MS, raise_interrupt=False):
            if os.getppid() != parent:
                return 0
            if not ready:
                # The first timeout: the watch is in place, so a change from now on is seen.
                print("ready", flush=True)
                ready = True
            if changes:
                print("\t".join(sorted({path for _, path in changes})), flush=True)
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
