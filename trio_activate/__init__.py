"""trio-activate: Trio-native socket activation.

A TOML manifest declares named sockets and the handlers that serve them; the
runtime adopts the sockets systemd passes (``LISTEN_FDS``), or creates them
and re-execs itself through its internal activator.

``import trio_activate`` stays light: the activator runs before trio is
imported (importing trio costs ~150 ms), so names that need trio are
re-exported lazily through a module-level ``__getattr__`` (PEP 562), and
so is the manifest: the console script imports this package before it can
block SIGTERM for a starting service (see ``_entry``), so it holds nothing
but the error classes.
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
    "Manifest": ".manifest",
    "load_manifest": ".manifest",
    "Activation": ".embedded",
    "activated": ".embedded",
    "self_activate": ".activator",
    "is_stopping": ".stopping",
    "move_on_stop": ".stopping",
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
