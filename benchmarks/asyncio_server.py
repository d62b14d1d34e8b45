"""The asyncio contender: ``asyncio.start_server`` with a line-for-line port of ``hello_http``.

Usage: ``python benchmarks/asyncio_server.py PORT``.  Binds 127.0.0.1 only.

The parsing rules and the response bytes are those of
``trio_activate.examples.hello_http``; they are copied rather than imported,
because importing the package's examples would import trio and inflate this
server's start-up time and memory.  ``tests/test_benchmarks.py`` checks that
the copies stay equal, and the harness checks every contender's answers
byte for byte before it measures anything.

``backlog=4096`` matches the other contenders (asyncio's default is 100).
An exception in one connection (a peer reset) is logged by asyncio's
exception handler and the server keeps serving, as trio-activate's
``on-error = "log"`` does.
"""

from __future__ import annotations

import asyncio
import sys

HELLO_BODY = b"Hello, world!\n"
MAX_HEADER_BYTES = 64 * 1024


def response(close: bool) -> bytes:
    connection = b"close" if close else b"keep-alive"
    return (
        b"HTTP/1.1 200 OK\r\n"
        b"Content-Type: text/plain\r\n"
        b"Content-Length: " + str(len(HELLO_BODY)).encode() + b"\r\n"
        b"Connection: " + connection + b"\r\n"
        b"\r\n" + HELLO_BODY
    )


RESPONSE_CLOSE = response(True)
RESPONSE_KEEP_ALIVE = response(False)


async def hello_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """``examples.hello_http``: ``reader.read`` for ``receive_some``, ``write``+``drain`` for ``send_all``."""
    buffer = b""
    try:
        while True:
            while b"\r\n\r\n" not in buffer:
                if len(buffer) > MAX_HEADER_BYTES:
                    return
                data = await reader.read(65536)
                if not data:
                    return
                buffer += data
            head, _, buffer = buffer.partition(b"\r\n\r\n")
            lowered = head.lower()
            close = b"connection: close" in lowered or (
                lowered.split(b"\r\n", 1)[0].endswith(b"http/1.0")
                and b"connection: keep-alive" not in lowered
            )
            writer.write(RESPONSE_CLOSE if close else RESPONSE_KEEP_ALIVE)
            await writer.drain()
            if close:
                return
    finally:
        writer.close()


async def serve(port: int) -> None:
    server = await asyncio.start_server(hello_http, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    asyncio.run(serve(int(sys.argv[1])))


if __name__ == "__main__":
    main()
