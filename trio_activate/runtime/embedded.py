"""The embedded API: ``async with activated(...) as act`` inside a user's own Trio program.

Layer 3 (trio).

``activated()`` adopts the sockets this process was passed (systemd,
``systemd-socket-activate``, or ``self_activate()``), and otherwise creates
them in-process: no re-exec (``self_activate`` is the opt-in for that).

Resource handling: inside the block, ``act`` owns every socket; the Trio
sockets and listeners it hands out are views of those same sockets, not
copies.  Leaving the block closes every socket exactly once, on success, on
error and on cancellation, and removes the ``remove-on-stop`` socket files
this process made.  A socket the program wants to keep past the block must
be taken with ``act.take(name)``.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Mapping, MutableMapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from ..errors import HandlerError
from ..model.manifest import Manifest, load_manifest, manifest_from_dict
from ..system.acquire import ServiceSockets, acquire_sockets
from ..system.notifier import Notifier
from .handlers import load_handlers
from .service import HandlerSockets, Service
from .serving import Listening

__all__ = ["Activation", "activated"]


class Activation:
    """What ``activated()`` yields: the service's sockets by manifest name."""

    def __init__(self, manifest: Manifest, owned: ServiceSockets) -> None:
        self.manifest = manifest
        self.origin = owned.origin
        self._owned = owned
        self._service: Service | None = None
        self.sockets: dict[str, list[trio.socket.SocketType]] = {
            name: [trio.socket.from_stdlib_socket(s) for s in group] for name, group in owned.sockets.items()
        }
        self.listeners: dict[str, list[trio.SocketListener]] = {
            name: [trio.SocketListener(s) for s in group]
            for name, group in self.sockets.items()
            if all(s.type == socket.SOCK_STREAM and _is_listening(s) for s in group)
        }
        self.extra: dict[str, list[trio.socket.SocketType]] = {
            name: [trio.socket.from_stdlib_socket(s) for s in group] for name, group in owned.extra.items()
        }
        """Passed sockets under names the manifest does not declare, asked for with ``extra_names``."""
        self.connection: trio.socket.SocketType | None = (
            trio.socket.from_stdlib_socket(owned.connection) if owned.connection is not None else None
        )

    def take(self, name: str) -> list[trio.socket.SocketType]:
        """Take the sockets named ``name`` out of the activation: the caller closes them."""
        self._owned.sockets.pop(name)
        self.listeners.pop(name, None)
        return self.sockets.pop(name)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> int:
        """Run the manifest's handlers as ``trio-activate serve`` does, until ``shutdown()``.

        Signals stay the program's business: call ``act.shutdown()`` for a
        graceful stop (stop accepting, drain for grace-period), or cancel.
        Returns the exit status (0, or 1 when a handler failed the service).
        """
        handlers = load_handlers(self.manifest)
        plan = []
        for handler in handlers:
            listening: list[Listening] = []
            for name in handler.spec.sockets:
                if name not in self._owned.sockets:
                    raise HandlerError(
                        f"{self.manifest.source}: handlers.{handler.spec.name}: sockets.{name} was taken "
                        "out of the activation; the handler cannot serve it"
                    )
                listening.extend(Listening(name, s) for s in self._owned.sockets[name])
            plan.append(HandlerSockets(handler, listening))
        with Notifier.from_environ(unset=True) as notifier:
            self._service = Service(self.manifest, plan, notifier=notifier)
            return await self._service.serve(task_status=task_status)

    def shutdown(self) -> None:
        """Ask a running ``serve()`` to stop gracefully."""
        if self._service is not None:
            self._service.shutdown()


def _is_listening(sock: trio.socket.SocketType) -> bool:
    return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))


@asynccontextmanager
async def activated(
    manifest: Manifest | str | Path | None = None,
    *,
    sockets: Mapping[str, str | Sequence[str] | Mapping[str, Any]] | None = None,
    environ: MutableMapping[str, str] | None = None,
    extra_names: Sequence[str] = (),
) -> AsyncIterator[Activation]:
    """Get the service's sockets for the block: adopted when passed, created otherwise.

    ``manifest`` is a path to a TOML manifest or a ``Manifest``.  Without a
    file, ``sockets`` declares them in code, each a listen address, a list
    of them, or a socket table as in the manifest::

        async with activated(sockets={"http": "127.0.0.1:8080"}) as act:
            await trio.serve_listeners(handler, act.listeners["http"])

    ``extra_names``: passed fds under these names, which the manifest does
    not declare, are kept in ``act.extra`` (owned and closed like the rest)
    instead of being closed as unclaimed.
    """
    if (manifest is None) == (sockets is None):
        raise TypeError("activated() takes a manifest or sockets=, exactly one of them")
    if sockets is not None:
        tables = {
            name: dict(value)
            if isinstance(value, Mapping)
            else {"listen": value if isinstance(value, str) else list(value)}
            for name, value in sockets.items()
        }
        manifest = manifest_from_dict({"sockets": tables})
    elif manifest is not None and not isinstance(manifest, Manifest):
        manifest = load_manifest(manifest)
    assert isinstance(manifest, Manifest)
    declared = set(manifest.socket_names()).intersection(extra_names)
    if declared:
        raise ValueError(f"extra_names: {sorted(declared)} are manifest sockets, not extra ones")
    await trio.lowlevel.checkpoint()
    owned = acquire_sockets(manifest, reexec=False, environ=environ, extra_names=extra_names)
    try:
        activation = Activation(manifest, owned)
        yield activation
    finally:
        owned.close()
