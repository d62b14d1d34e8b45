"""The handler of config/listener.toml: runs its own server over the listeners it is handed."""

from __future__ import annotations

import trio


async def shout(stream: trio.SocketStream) -> None:
    async for data in stream:
        await stream.send_all(data.upper())


async def run(listeners: list[trio.SocketListener]) -> None:
    await trio.serve_listeners(shout, listeners)
