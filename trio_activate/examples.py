"""Handlers for the example manifests in ``config/``.

They ship with the package so ``pip install . && trio-activate serve
config/echo.toml`` works from any folder.  Each is what a user would write:
a plain coroutine function taking what the runtime hands it.
"""

from __future__ import annotations

import trio

from .runtime.stopping import is_stopping

__all__ = ["echo", "hello_http", "udp_echo"]

HELLO_BODY = b"Hello, world!\n"
_MAX_HEADER_BYTES = 64 * 1024


async def echo(connection: trio.abc.HalfCloseableStream | trio.socket.SocketType) -> None:
    """Send back every byte (stream) or every message (seqpacket) until the peer closes."""
    # A stream, not necessarily a trio.SocketStream: with idle-timeout the
    # runtime hands over a stream that watches receives.
    if isinstance(connection, trio.abc.HalfCloseableStream):
        async for data in connection:
            await connection.send_all(data)
        return
    # A seqpacket connection arrives as the connected Trio socket, so each
    # message keeps its boundary: one recv is one message.
    while message := await connection.recv(65536):
        await connection.send(message)


async def udp_echo(sock: trio.socket.SocketType) -> None:
    """Send each datagram back to its sender, for the life of the service."""
    while True:
        data, peer = await sock.recvfrom(65536)
        await sock.sendto(data, peer)


async def hello_http(stream: trio.SocketStream) -> None:
    """Answer every HTTP/1.1 request on the connection with a fixed 200 response.

    Honours ``Connection: close`` and HTTP/1.0's default of closing.  Once
    the service begins to stop, the next response says ``Connection: close``
    and ends the connection: the client's following request goes to a new
    connection (the next generation, during a reload), so a steady client
    loses nothing.  (Closing an idle keep-alive connection at once would race
    a request the client may be sending right then.)  A peer that resets the
    connection just ends it.  Just enough HTTP for examples and load tests;
    not a server to put on the net.
    """
    buffer = b""
    try:
        while True:
            while b"\r\n\r\n" not in buffer:
                if len(buffer) > _MAX_HEADER_BYTES:
                    return
                data = await stream.receive_some(65536)
                if not data:
                    return
                buffer += data
            head, _, buffer = buffer.partition(b"\r\n\r\n")
            lowered = head.lower()
            close = (
                b"connection: close" in lowered
                or (
                    lowered.split(b"\r\n", 1)[0].endswith(b"http/1.0")
                    and b"connection: keep-alive" not in lowered
                )
                or is_stopping()
            )
            await stream.send_all(_response(close))
            if close:
                return
    except trio.BrokenResourceError:
        return  # the peer reset the connection: nothing left to answer


def _response(close: bool) -> bytes:
    connection = b"close" if close else b"keep-alive"
    return (
        b"HTTP/1.1 200 OK\r\n"
        b"Content-Type: text/plain\r\n"
        b"Content-Length: " + str(len(HELLO_BODY)).encode() + b"\r\n"
        b"Connection: " + connection + b"\r\n"
        b"\r\n" + HELLO_BODY
    )
