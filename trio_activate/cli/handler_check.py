"""``trio-activate check``'s deep part: import a manifest's handlers in a process of its own.

Layer 5.  ``check`` goes as deep as ``serve`` does before it binds: it
imports every handler with the manifest's ``python-path`` and checks what
``serve`` checks (`trio_activate.runtime.handlers`: a coroutine function
that takes what its kind passes).

Why a process of its own, one per manifest, rather than importing in the
CLI process: the import runs the user's module code, which cannot be
unimported.  Two manifests may name modules alike (``app``) in different
folders, a module may start threads, install signal handlers, patch other
modules, call ``sys.exit()`` or crash the interpreter in a C extension; in
a child, whatever it does ends with the child, each manifest is checked on
a clean interpreter as ``serve`` starts on one, and the CLI only reads the
one line it reports.  It costs one interpreter start per manifest (tens of
milliseconds), which ``--no-import`` skips.

The child runs ``python -P -m trio_activate.cli.handler_check PATH`` with
the normalized manifest (``dump_manifest``: the overrides applied, every
value checked) on its stdin; ``-P`` keeps the current folder off
``sys.path``, as the console script does, so only ``python-path`` and the
installed packages decide.  What the user's code prints goes to the CLI's
stderr; the child's answer comes alone on its stdout: ``ok``, or the
``HandlerError`` line.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ..errors import HandlerError
from ..model.manifest import Manifest, dump_manifest, parse_manifest

__all__ = ["check_handlers_in_subprocess"]

_OK = "ok"
_ERROR = "error: "


def check_handlers_in_subprocess(manifest: Manifest) -> None:
    """Import ``manifest``'s handlers in a child process; raise its `HandlerError`, if any, here."""
    if not manifest.handlers:
        return
    path = manifest.path if manifest.path is not None else manifest.folder / "manifest.toml"
    try:
        child = subprocess.run(
            [sys.executable, "-P", "-m", __name__, str(path)],
            input=dump_manifest(manifest),
            stdout=subprocess.PIPE,
            text=True,
            check=False,
        )
    except OSError as exc:
        raise HandlerError(
            f"{manifest.source}: cannot start {sys.executable} to import the handlers: {exc.strerror or exc}"
        ) from None
    answer = child.stdout
    if child.returncode == 0 and answer == _OK:
        return
    if child.returncode == 0 and answer.startswith(_ERROR):
        raise HandlerError(answer.removeprefix(_ERROR))
    how = f"signal {-child.returncode}" if child.returncode < 0 else f"status {child.returncode}"
    raise HandlerError(
        f"{manifest.source}: importing the handlers ended the process with {how} before they were checked"
    )


def _main() -> int:
    # The answer goes to the real stdout; what the user's code prints, to stderr.
    answer = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    manifest = parse_manifest(sys.stdin.read(), path=Path(sys.argv[1]))
    from ..runtime.handlers import load_handlers

    try:
        load_handlers(manifest)
    except HandlerError as exc:
        answer.write(f"{_ERROR}{exc}")
    else:
        answer.write(_OK)
    answer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
