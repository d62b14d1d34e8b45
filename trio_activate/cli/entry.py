"""The ``trio-activate`` console script's first code: hold shutdown signals, start fast, import the CLI.

Imports only `trio_activate.system.fast_start` before it knows which
command runs (see there for why, and for what a fast start is); the CLI's
own modules, and argparse with them, come after the fork and the re-exec.
"""

from __future__ import annotations

import os
import sys

from ..system.fast_start import (
    SERVING_COMMANDS,
    fast_start_applies,
    fork_activator_and_reexec,
    hold_shutdown_signals,
)


def main() -> int:
    if SERVING_COMMANDS.intersection(sys.argv[1:]):
        hold_shutdown_signals()
        if fast_start_applies(sys.argv[1:], os.environ):
            fork_activator_and_reexec(_run_forked_activator)
    from .commands import main as cli_main

    return cli_main()


def _run_forked_activator(channel_fd: int) -> int:
    from .commands import run_forked_activator

    return run_forked_activator(channel_fd)
