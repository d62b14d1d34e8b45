"""trio-activate: Trio-native socket activation.

A TOML manifest declares named sockets and the handlers that serve them; the
runtime adopts the sockets systemd passes (``LISTEN_FDS``), or creates them
and re-execs itself through its internal activator.

``import trio_activate`` stays light: the activator runs before trio is
imported (importing trio costs ~150 ms), so names that need trio are
re-exported lazily through a module-level ``__getattr__`` (PEP 562), and
so is the manifest: the console script imports this package before it can
block SIGTERM for a starting service (see ``cli.entry``), so it holds
nothing but the error classes.

The layers, each a subpackage that imports only those below it (checked by
``tests/test_layers.py`` with import-linter), and ``errors`` under them all:

    cli        the command line and the console script's first code
    processes  the supervisor and its workers, the single-process hand-over
    runtime    Trio: serving, handlers, readiness, shutdown, the embedded API
    system     syscalls without Trio: fds, sockets, adoption, the activator
    model      pure values and parsing: manifest, addresses, LISTEN_*, units
"""

from __future__ import annotations

from .errors import ActivationError as ActivationError
from .errors import AdoptionError as AdoptionError
from .errors import CreationError as CreationError
from .errors import HandlerError as HandlerError
from .errors import ListenEnvError as ListenEnvError
from .errors import ManifestError as ManifestError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~10 ms here)

if TYPE_CHECKING:
    from typing import Any

__version__ = "0.1.0"

__all__ = [
    "Activation",
    "ActivationError",
    "AdoptionError",
    "CreationError",
    "HandlerError",
    "ListenEnvError",
    "Manifest",
    "ManifestError",
    "activated",
    "is_stopping",
    "load_manifest",
    "move_on_stop",
    "self_activate",
]

# name -> module that defines it; imported on first access.
_LAZY: dict[str, str] = {
    "Manifest": ".model.manifest",
    "load_manifest": ".model.manifest",
    "Activation": ".runtime.embedded",
    "activated": ".runtime.embedded",
    "self_activate": ".system.activator",
    "is_stopping": ".runtime.stopping",
    "move_on_stop": ".runtime.stopping",
}


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'trio_activate' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module_name, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
