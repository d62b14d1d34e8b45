"""ServiceSockets: what a service that cannot start does with the clients queued for it."""

from __future__ import annotations

import socket

import pytest

from trio_activate.model.listen_env import ListenFds
from trio_activate.model.manifest import parse_manifest
from trio_activate.system.acquire import ServiceSockets, _undeclared_names


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


# --- fd-store: what goes to the manager's store --------------------------------


@pytest.mark.parametrize(
    ("origin", "stored"), [("created", True), ("self-activated", True), ("passed", False)]
)
def test_only_sockets_the_service_made_are_stored(origin: str, stored: bool) -> None:
    """Passed sockets (a .socket unit's, the store's own, a predecessor's) are the manager's already."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        owned = ServiceSockets({"web": [listener]}, origin, undeclared=("old",))
        plan = owned.fd_store_plan()
        assert dict(plan.store) == ({"web": [listener]} if stored else {})
        assert plan.remove == ("old",)
        owned.sockets = {}  # the plan borrowed; the test's `with` closes the listener


def test_passed_names_the_manifest_does_not_declare_are_the_ones_to_remove() -> None:
    """Each once, in passed order; 'unknown' and 'connection' are no names of the store's."""
    manifest = parse_manifest(
        '[sockets.web]\nlisten = "127.0.0.1:7000"\n[handlers.web]\nsocket = "web"\ncall = "m:f"\n',
        source="t.toml",
    )
    found = ListenFds((3, 4, 5, 6, 7), ("old", "web", "old", "stored", "unknown"), True, False)
    assert _undeclared_names(manifest, found, ()) == ("old", "stored")
    assert _undeclared_names(manifest, found, ("old",)) == ("stored",), "an embedding program's extra names"
    unnamed = ListenFds((3,), ("unknown",), False, False)
    assert _undeclared_names(manifest, unnamed, ()) == ()
