"""The ``trio-activate`` console script's first code: hold shutdown signals, then import the CLI.

A SIGTERM or SIGINT that reaches a starting service must end in an orderly
exit, not in death by signal.  The runtime unblocks them once its handlers
are installed; everything before that point should run with them blocked,
so this module blocks them before importing anything more (the package's
``__init__`` is already imported and holds only the error classes).  Only
for the commands that serve: ``check`` or ``fds`` keep the default
behaviour.  The interpreter's own start-up (about 20 ms) remains a window
no code in the process can close.
"""

from __future__ import annotations

import signal
import sys

SERVING_COMMANDS = frozenset({"serve", "dev"})


def main() -> int:
    if SERVING_COMMANDS.intersection(sys.argv[1:]):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
    from .cli import main as cli_main

    return cli_main()
