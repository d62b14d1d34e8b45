"""A Starlette application (on Trio through anyio) that the asgi tests serve.

``ASGI_EVENTS``: a file that gets a line ``startup PID`` and ``shutdown PID``
from the lifespan; ``ASGI_FAIL_STARTUP``: the startup raises (``ASGI_FAIL_IF``: while that file exists);
``ASGI_HOLD_IF``: the startup waits while that file exists (at most ``HOLD_AT_MOST`` seconds).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket


def _event(what: str) -> None:
    path = os.environ.get("ASGI_EVENTS")
    if path:
        with open(path, "a") as events:
            events.write(f"{what} {os.getpid()}\n")


def _should_fail() -> bool:
    fail_if = os.environ.get("ASGI_FAIL_IF")
    return bool(os.environ.get("ASGI_FAIL_STARTUP")) or (fail_if is not None and os.path.exists(fail_if))


HOLD_AT_MOST = 10.0
HOLD_POLL = 0.02


def _held() -> bool:
    hold_if = os.environ.get("ASGI_HOLD_IF")
    return hold_if is not None and os.path.exists(hold_if)


async def _hold() -> None:
    for _ in range(round(HOLD_AT_MOST / HOLD_POLL)):
        if not _held():
            return
        await anyio.sleep(HOLD_POLL)


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    _event("startup")
    await _hold()
    if _should_fail():
        raise RuntimeError("the database is unreachable")
    yield
    _event("shutdown")


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse(f"hello {os.getpid()} {request.scope.get('root_path', '')}")


async def slow(request: Request) -> PlainTextResponse:
    await anyio.sleep(float(request.query_params.get("seconds", "0.3")))
    return PlainTextResponse("slow done")


async def stream(request: Request) -> StreamingResponse:
    async def chunks() -> AsyncIterator[str]:
        for number in range(5):
            yield f"chunk {number}\n"
            await anyio.sleep(0.01)

    return StreamingResponse(chunks(), media_type="text/plain")


async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    while True:
        text = await websocket.receive_text()
        if text == "bye":
            await websocket.close()
            return
        await websocket.send_text(f"echo {text}")


routes = [
    Route("/", hello),
    Route("/slow", slow),
    Route("/stream", stream),
    WebSocketRoute("/ws", echo),
]

app = Starlette(routes=routes, lifespan=lifespan)


def make_app() -> Starlette:
    """The factory form: ``call = "starlette_app:make_app"`` with ``factory = true``."""
    return Starlette(routes=routes, lifespan=lifespan)


def not_an_app() -> str:
    """A factory that returns something else."""
    return "not an application"
