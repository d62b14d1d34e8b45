"""Layer 5, the command line: the console script's first code (`entry`), the subcommands, logging.

The subcommands are `commands`; `logs` sets up the ``trio_activate``
logger's handler on stderr in the format ``--log-format`` picks (text,
journal, json); the lines' shapes are the model's
(`trio_activate.model.log_lines`).

`tracebacks` trims what ``dev`` shows of an error in the user's code to
that code's frames.

May import: every layer below.  Nothing below imports it: the fast start
(`trio_activate.system.fast_start`) gets the forked activator's code from
`entry` as a function, so the start-up path calls down, never up.

Who closes what: ``serve`` and ``dev`` own the ``ServiceSockets`` they
acquire and close it once the service or supervisor returned.
"""
