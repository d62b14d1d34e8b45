"""The application of config/asgi.toml: an HTTP route and a WebSocket route, in Starlette on Trio."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("Hello, world!\n")


async def echo(websocket: WebSocket) -> None:
    """Sends back every text message, until the client closes."""
    await websocket.accept()
    try:
        while True:
            await websocket.send_text(await websocket.receive_text())
    except WebSocketDisconnect:
        pass


app = Starlette(routes=[Route("/", hello), WebSocketRoute("/ws", echo)])
