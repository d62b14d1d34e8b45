"""What ``trio-activate init --asgi`` writes: a starter manifest and, beside it, a starter ASGI application.

Layer 5, text only.  The application is plain ASGI (no framework), so the
pair serves with ``pip install 'trio-activate[asgi]'`` alone; its docstring
says how to put a Starlette, Quart-Trio or FastAPI application in its place.
``write_new_files`` writes them all or none, never over an existing file.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["ASGI_APP", "ASGI_APP_MODULE", "ASGI_MANIFEST", "write_new_files"]

# The application's module, written beside the manifest (python-path ["."] finds it).
ASGI_APP_MODULE = "app.py"

ASGI_MANIFEST = """\
# trio-activate manifest: an ASGI application served over HTTP by hypercorn's Trio worker.
# Needs: pip install 'trio-activate[asgi]'
# Check it with `trio-activate check {path}`, serve it with `trio-activate serve {path}`
# (or `trio-activate dev {path}`: reloads on every change), then: curl http://127.0.0.1:8000/

[service]
# name = "my-service"          # default: this file's name without .toml
grace-period = 5.0             # seconds requests in flight get on a stop or reload
python-path = ["."]            # folders (relative to this file) searched for the application's module
# workers = 2                  # more than one runs a supervisor; SIGHUP reloads with zero downtime
# user = "www-data"            # the systemd unit's User=; unset: DynamicUser=yes

# The table's key is the socket's name: systemd passes it as FileDescriptorName=.
[sockets.web]
listen = "127.0.0.1:8000"      # "8000", "host:port", "[v6]:port", "/path.sock", "@abstract", or a list
# backlog = 4096

[handlers.web]
socket = "web"
kind = "asgi"
call = "app:app"               # module:attribute, an ASGI application (Starlette, Quart-Trio, FastAPI...)
# factory = true               # call names a function that returns the application

[handlers.web.http]            # every key optional
keep-alive-timeout = 5.0       # seconds an idle keep-alive connection stays open
# access-log = true            # one line per request
# root-path = "/api"           # the ASGI root_path, behind a proxy that strips a prefix
# server-header = true
# certfile = "tls/cert.pem"    # TLS: certfile and keyfile together, relative to this file
# keyfile = "tls/key.pem"
# ca-certs = "tls/clients.pem" # TLS: require client certificates signed by these CAs
# http2 = true                 # TLS: ALPN offers h2 besides http/1.1
"""

ASGI_APP = '''\
"""A starter ASGI application for trio-activate, served as {manifest} says.

Plain ASGI, no framework needed.  A framework's application works in its
place: in Starlette (on Trio through anyio), for example,

    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def hello(request):
        return PlainTextResponse("Hello, world!\\\\n")

    app = Starlette(routes=[Route("/", hello)])

The service reports ready once the lifespan startup below completed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

Message = dict[str, Any]


async def app(
    scope: dict[str, Any],
    receive: Callable[[], Awaitable[Message]],
    send: Callable[[Message], Awaitable[None]],
) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                # Open what the requests share here (a database pool, a client session).
                await send({{"type": "lifespan.startup.complete"}})
            elif message["type"] == "lifespan.shutdown":
                # And close it here: this runs once the requests in flight finished.
                await send({{"type": "lifespan.shutdown.complete"}})
                return
    elif scope["type"] == "http":
        # Read the request's body (none for a GET), then answer.
        more_body = True
        while more_body:
            message = await receive()
            more_body = message.get("more_body", False)
        await send(
            {{
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/plain; charset=utf-8")],
            }}
        )
        await send({{"type": "http.response.body", "body": f"Hello, world! ({{scope['path']}})\\n".encode()}})
'''


def write_new_files(files: list[tuple[Path, str]]) -> Path | None:
    """Write each ``(path, text)``, all or none; return the path that already exists, None when written.

    Each file is created with ``"x"`` (no check-then-write race); when one
    cannot be, the ones this call wrote are removed again.  Other errors
    (``OSError``) propagate, after the same removal.
    """
    written: list[Path] = []
    try:
        for path, text in files:
            try:
                with path.open("x", encoding="utf-8") as file:
                    written.append(path)
                    file.write(text)
            except FileExistsError:
                for done in written:
                    done.unlink(missing_ok=True)
                return path
    except OSError:
        for done in written:
            done.unlink(missing_ok=True)
        raise
    return None
