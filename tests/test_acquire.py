"""ServiceSockets: what a service that cannot start does with the clients queued for it."""

from __future__ import annotations

import socket

import pytest

from trio_activate.system.acquire import ServiceSockets


def test_a_failed_start_closes_queued_connections_and_keeps_listening() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    owned = ServiceSockets({"web": [listener]}, "passed")
    clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
    try:
        assert owned.close_queued_clients() == 3
        for client in clients:
            assert client.recv(10) == b"", "closed by the failed service: end of stream"
        # Still listening: the next client queues for the next start.
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            assert owned.close_queued_clients() == 1
        assert owned.close_queued_clients() == 0, "nothing waits: returns at once"
        assert listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    finally:
        for client in clients:
            client.close()
        owned.close()


def test_a_failed_start_drops_queued_datagrams() -> None:
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    owned = ServiceSockets({"udp": [receiver]}, "passed")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        for payload in (b"one", b"two" * 1000):
            sender.sendto(payload, receiver.getsockname())
    try:
        assert owned.close_queued_clients() == 2
        assert owned.close_queued_clients() == 0
    finally:
        owned.close()


@pytest.mark.parametrize("limit", [1, 2])
def test_at_most_limit_per_socket_so_a_flood_cannot_keep_a_failed_start_alive(limit: int) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    owned = ServiceSockets({"web": [listener]}, "passed")
    clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
    try:
        assert owned.close_queued_clients(limit=limit) == limit
    finally:
        for client in clients:
            client.close()
        owned.close()
