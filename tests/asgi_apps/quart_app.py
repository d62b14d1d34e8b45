"""A Quart-Trio application that the asgi tests serve: HTTP, a streamed response, a WebSocket."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import trio
from quart import websocket
from quart_trio import QuartTrio

app = QuartTrio(__name__)


@app.route("/")
async def hello() -> str:
    return f"quart {os.getpid()}"


@app.route("/stream")
async def stream() -> tuple[AsyncIterator[bytes], int, dict[str, str]]:
    async def chunks() -> AsyncIterator[bytes]:
        for number in range(5):
            yield f"chunk {number}\n".encode()
            await trio.sleep(0.01)

    return chunks(), 200, {"Content-Type": "text/plain"}


@app.websocket("/ws")
async def echo() -> None:
    while True:
        text = await websocket.receive()
        if text == "bye":
            return
        await websocket.send(f"echo {text}")
