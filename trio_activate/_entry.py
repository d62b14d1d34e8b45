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
# Held pending until the runtime (or supervisor) installs its handlers and unblocks them;
# blocked masks survive execv, so the self-activation re-exec is covered too.
SHUTDOWN_AND_RELOAD_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})


def hold_shutdown_signals() -> None:
    """Block SIGTERM, SIGINT and SIGHUP: they wait until the service can handle them."""
    signal.pthread_sigmask(signal.SIG_BLOCK, SHUTDOWN_AND_RELOAD_SIGNALS)


def main() -> int:
    if SERVING_COMMANDS.intersection(sys.argv[1:]):
        hold_shutdown_signals()
    from .cli import main as cli_main

    return cli_main()
