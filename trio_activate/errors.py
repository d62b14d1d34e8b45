"""The one error hierarchy of trio-activate.

Every error that reaches a user is one line: what is wrong, where (file and
key, or environment variable), the value, and what was expected.  The CLI
prints ``str(error)`` and exits 2; it never shows a traceback for these.

Layer 1: no syscalls, no trio.
"""

from __future__ import annotations

__all__ = [
    "ActivationError",
    "AdoptionError",
    "CreationError",
    "HandlerError",
    "ListenEnvError",
    "ManifestError",
    "StartInterrupted",
]


class ActivationError(Exception):
    """Base class: something stops the service from getting its sockets."""


class ManifestError(ActivationError):
    """The manifest file cannot be read, parsed or validated.

    The message starts with the file name and the key path, e.g.
    ``service.toml: sockets.echo.listen: port 70000 is out of range 0-65535``.
    """


class ListenEnvError(ActivationError):
    """``LISTEN_*`` variables are present but malformed.

    The message names the variable and the value, e.g.
    ``LISTEN_FDS='-1': expected a positive decimal integer``.
    """


class AdoptionError(ActivationError):
    """A passed fd cannot be used: not open, not a socket, wrong family or type,
    or the fds cannot be matched to the manifest."""


class CreationError(ActivationError):
    """A socket from the manifest cannot be created (address in use, permission,
    missing directory, a live socket or a non-socket file in the way)."""


class HandlerError(ActivationError):
    """A handler named in the manifest cannot be imported, or is not a coroutine
    function, or does not fit its sockets."""


class StartInterrupted(BaseException):
    """SIGTERM or SIGINT while the handlers were imported: stop, having served nothing.

    Not an error of the service (`trio_activate.system.start_signals` raises it).  A
    BaseException, as KeyboardInterrupt is: the ``except Exception`` that
    reports a handler module's import error (and any in the user's own code)
    must let it through.  Here rather than beside its raiser so that the CLI
    can name it without importing anything before the re-exec.
    """

    def __init__(self, signum: int) -> None:
        import signal

        super().__init__(signal.Signals(signum).name)
        self.signum = signum
