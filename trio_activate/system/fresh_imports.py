"""Importing the project's own code from source, never from a cached ``.pyc``.

Layer 2: the import system, no trio.  Why: a ``.pyc`` records its source's
mtime in whole seconds and its size.  A file rewritten within the second at
the same size passes that check, and a reload (``dev``, or SIGHUP) would run
the old code.  So a process that must run the code on disk now (a ``dev``
worker, one a reload starts) imports what it finds in folders outside the
interpreter's installation, the project's own code edited in place, through
a loader that compiles from source and writes nothing.  Installed libraries
keep their caches: pip writes their ``.pyc`` with their sources, and
compiling them from source on every reload would slow a large app's reloads
for nothing.

An import hook on ``sys.path_hooks`` does this per folder; modules imported
before it is installed (trio, the standard library) are not touched, and
neither are modules that a meta path finder of their own loads (an editable
install's, for one).
"""

from __future__ import annotations

import os
import sys
from importlib.machinery import (
    BYTECODE_SUFFIXES,
    EXTENSION_SUFFIXES,
    SOURCE_SUFFIXES,
    ExtensionFileLoader,
    FileFinder,
    SourceFileLoader,
    SourcelessFileLoader,
)
from typing import Any

__all__ = ["SourceOnlyLoader", "import_project_code_from_source", "installation_folders", "is_project_folder"]


class SourceOnlyLoader(SourceFileLoader):
    """A source file loader that neither reads nor writes the bytecode cache."""

    def path_stats(self, path: str) -> Any:
        # SourceLoader.get_code reads a .pyc only after path_stats succeeds, and
        # writes one only with the mtime it returns: failing here, it compiles
        # the source and writes nothing.
        raise OSError(f"{path}: compiled from source (trio-activate: fresh code)")


def is_project_folder(path: str, installation: tuple[str, ...]) -> bool:
    """Whether ``path`` (a ``sys.path`` entry) is a folder outside ``installation``'s folders."""
    real = os.path.join(os.path.realpath(path or "."), "")
    return os.path.isdir(real) and not real.startswith(installation)


def installation_folders() -> tuple[str, ...]:
    """The interpreter's own folders (sys.prefix and friends), each with a trailing separator."""
    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    return tuple(os.path.join(os.path.realpath(prefix), "") for prefix in prefixes)


def import_project_code_from_source() -> None:
    """From now on, modules in folders outside the interpreter's installation compile from source.

    Idempotent: a second call changes nothing.
    """
    if any(getattr(hook, "trio_activate_fresh", False) for hook in sys.path_hooks):
        return
    installation = installation_folders()
    loaders: list[tuple[Any, list[str]]] = [
        (ExtensionFileLoader, EXTENSION_SUFFIXES),
        (SourceOnlyLoader, SOURCE_SUFFIXES),
        (SourcelessFileLoader, BYTECODE_SUFFIXES),
    ]

    def project_finder(path: str) -> FileFinder:
        if not is_project_folder(path, installation):
            raise ImportError(f"{path}: not the project's code")  # the standard hooks take it
        return FileFinder(path, *loaders)

    project_finder.trio_activate_fresh = True  # type: ignore[attr-defined]
    sys.path_hooks.insert(0, project_finder)
    # Finders made earlier for project folders keep the caching loader: forget them.
    # (The current folder, first on sys.path under `python -m`, has one from every import.)
    for entry in [entry for entry in sys.path_importer_cache if is_project_folder(entry, installation)]:
        del sys.path_importer_cache[entry]
