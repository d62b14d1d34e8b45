"""`trio_activate.activated()`: the service's sockets for the length of an ``async with``.

The sockets are created in-process (127.0.0.1:0, unix paths in the test's
folder), or, in one test, passed for real by ``systemd-socket-activate``.
Every test checks through /proc/self/fd that it leaves no fd open; one test
cancels a whole ``activated()`` lifecycle after each of its scheduling steps
in turn and checks that every cancellation point leaves nothing behind.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from helpers import require_peer

from trio_activate import activated
from trio_activate.errors import HandlerError
from trio_activate.model.manifest import parse_manifest
from trio_activate.runtime.embedded import Activation
from trio_activate.system.fds import open_fds

pytestmark = pytest.mark.usefixtures("no_fd_leaks")


@pytest.fixture(autouse=True)
def quiet_logger(monkeypatch: pytest.MonkeyPatch) -> None:
    """No stderr handler left by an earlier in-process CLI run (its stream may be closed)."""
    logger = logging.getLogger("trio_activate")
    monkeypatch.setattr(logger, "handlers", [])
    monkeypatch.setattr(logger, "propagate", True)


async def echo_once(listener: trio.SocketListener) -> None:
    stream = await listener.accept()
    async with stream:
        await stream.send_all(await stream.receive_some(100))


async def round_trip(sock: trio.socket.SocketType, data: bytes) -> bytes:
    """Connect to the listening ``sock``, send ``data``, read until EOF."""
    with trio.socket.socket(sock.family, sock.type) as client:
        await client.connect(sock.getsockname())
        await client.send(data)
        received = b""
        while chunk := await client.recv(100):
            received += chunk
        return received


SERVICE = """\
[service]
name = "embedded"
grace-period = 2

[sockets.web]
listen = ["127.0.0.1:0", "./web.sock"]
remove-on-stop = true

[sockets.udp]
listen = "127.0.0.1:0"
type = "datagram"

[handlers.web]
socket = "web"
call = "trio_activate.examples:echo"

[handlers.udp]
socket = "udp"
call = "trio_activate.examples:udp_echo"
"""


def write_service(folder: Path, text: str = SERVICE) -> Path:
    path = folder / "service.toml"
    path.write_text(text)
    return path


# --- what the block gets -------------------------------------------------------


async def test_sockets_in_code_are_created_and_usable_as_listeners() -> None:
    async with activated(sockets={"http": "127.0.0.1:0"}, environ={}) as act:
        assert isinstance(act, Activation)
        assert act.origin == "created"
        assert act.connection is None
        [sock] = act.sockets["http"]
        [listener] = act.listeners["http"]
        assert listener.socket is sock
        assert sock.getsockname()[0] == "127.0.0.1"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(echo_once, listener)
            assert await round_trip(sock, b"hello") == b"hello"
    assert sock.fileno() == -1


async def test_a_list_of_addresses_and_a_socket_table(tmp_path: Path) -> None:
    path = str(tmp_path / "api.sock")
    sockets = {
        "api": ["127.0.0.1:0", path],
        "dns": {"listen": "127.0.0.1:0", "type": "datagram"},
    }
    async with activated(sockets=sockets, environ={}) as act:
        assert [s.family for s in act.sockets["api"]] == [socket.AF_INET, socket.AF_UNIX]
        assert act.sockets["api"][1].getsockname() == path
        assert len(act.listeners["api"]) == 2
        [dns] = act.sockets["dns"]
        assert dns.type == socket.SOCK_DGRAM
        assert "dns" not in act.listeners  # a datagram socket has no listener
    assert await trio.Path(path).exists()  # no remove-on-stop: the file stays


async def test_a_manifest_file_path_and_a_manifest_object_both_work(tmp_path: Path) -> None:
    path = write_service(tmp_path)
    async with activated(str(path), environ={}) as act:
        assert set(act.sockets) == {"web", "udp"}
        assert len(act.sockets["web"]) == 2
    async with activated(parse_manifest(SERVICE, path=path), environ={}) as act:
        assert act.manifest.service.name == "embedded"


async def enter(*args: Any, **kwargs: Any) -> None:
    async with activated(*args, **kwargs):
        pass


async def test_exactly_one_of_manifest_and_sockets(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="exactly one of them"):
        await enter(write_service(tmp_path), sockets={"x": "127.0.0.1:0"}, environ={})
    with pytest.raises(TypeError, match="exactly one of them"):
        await enter(environ={})


async def test_listen_variables_meant_for_another_process_are_removed_and_sockets_created() -> None:
    environ = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "http", "PATH": "/bin"}
    async with activated(sockets={"http": "127.0.0.1:0"}, environ=environ) as act:
        assert act.origin == "created"
    assert environ == {"PATH": "/bin"}


# --- leaving the block ------------------------------------------------------


async def test_leaving_closes_every_socket_and_removes_remove_on_stop_files(tmp_path: Path) -> None:
    async with activated(write_service(tmp_path), environ={}) as act:
        held = [s for group in act.sockets.values() for s in group]
        assert (tmp_path / "web.sock").exists()
    assert [s.fileno() for s in held] == [-1, -1, -1]
    assert not (tmp_path / "web.sock").exists()


async def test_an_exception_in_the_block_still_closes_everything(tmp_path: Path) -> None:
    held: list[trio.socket.SocketType] = []

    async def fails() -> None:
        async with activated(write_service(tmp_path), environ={}) as act:
            held.extend(s for group in act.sockets.values() for s in group)
            raise RuntimeError("user code")

    with pytest.raises(RuntimeError, match="user code"):
        await fails()
    assert [s.fileno() for s in held] == [-1, -1, -1]
    assert not (tmp_path / "web.sock").exists()


async def test_a_taken_socket_is_the_callers_to_close() -> None:
    async with activated(sockets={"keep": "127.0.0.1:0", "drop": "127.0.0.1:0"}, environ={}) as act:
        [kept] = act.take("keep")
        assert "keep" not in act.sockets
        assert "keep" not in act.listeners
        [dropped] = act.sockets["drop"]
    try:
        assert dropped.fileno() == -1
        assert kept.fileno() >= 0
        assert kept.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    finally:
        kept.close()


# --- serve() -----------------------------------------------------------------


async def serve_and_record(
    act: Activation, statuses: list[int], *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    statuses.append(await act.serve(task_status=task_status))


async def test_serve_runs_the_manifests_handlers_until_shutdown(tmp_path: Path) -> None:
    statuses: list[int] = []
    async with activated(write_service(tmp_path), environ={}) as act:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_and_record, act, statuses)  # returns once every handler serves
            for sock in act.sockets["web"]:
                assert await round_trip_half_close(sock, b"stream") == b"stream"
            [udp] = act.sockets["udp"]
            with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
                await client.sendto(b"datagram", udp.getsockname())
                assert await client.recv(100) == b"datagram"
            act.shutdown()
        assert statuses == [0]


async def round_trip_half_close(sock: trio.socket.SocketType, data: bytes) -> bytes:
    with trio.socket.socket(sock.family, sock.type) as client:
        await client.connect(sock.getsockname())
        await client.send(data)
        client.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := await client.recv(100):
            received += chunk
        return received


async def test_serve_refuses_a_handler_whose_socket_was_taken(tmp_path: Path) -> None:
    async with activated(write_service(tmp_path), environ={}) as act:
        taken = act.take("udp")
        try:
            with pytest.raises(HandlerError) as caught:
                await act.serve()
        finally:
            for sock in taken:
                sock.close()
    assert str(caught.value) == (
        "service.toml: handlers.udp: sockets.udp was taken out of the activation; the handler cannot serve it"
    )


# --- cancellation at every checkpoint -----------------------------------------


class CancelAfterSteps(trio.abc.Instrument):
    """Cancels ``scope`` right after the run's ``steps``-th task step; counts steps either way."""

    def __init__(self, scope: trio.CancelScope, steps: int | None) -> None:
        self.scope = scope
        self.steps = steps
        self.taken = 0

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        self.taken += 1
        if self.taken == self.steps:
            self.scope.cancel()


async def lifecycle(manifest: Path) -> None:
    """Everything an embedding program does: activate, serve, answer a client, shut down."""
    async with activated(manifest, environ={}) as act, trio.open_nursery() as nursery:
        await nursery.start(act.serve)
        [web, _] = act.sockets["web"]
        assert await round_trip_half_close(web, b"hi") == b"hi"
        act.shutdown()


async def run_cancelled_after(manifest: Path, steps: int | None) -> tuple[int, bool]:
    """Run `lifecycle`, cancelled after ``steps`` task steps; (steps taken, whether it was cancelled)."""
    with trio.CancelScope() as scope:
        instrument = CancelAfterSteps(scope, steps)
        trio.lowlevel.add_instrument(instrument)
        try:
            await lifecycle(manifest)
        finally:
            trio.lowlevel.remove_instrument(instrument)
    return instrument.taken, scope.cancelled_caught


async def test_cancelled_at_each_checkpoint_leaves_no_fd_open_and_no_socket_file(tmp_path: Path) -> None:
    manifest = write_service(tmp_path)
    before = open_fds()
    total, cancelled = await run_cancelled_after(manifest, None)
    assert not cancelled
    assert 20 < total < 2000  # a bound on the loop below
    cancelled_count = 0
    for steps in range(1, total + 1):
        _, cancelled = await run_cancelled_after(manifest, steps)
        cancelled_count += cancelled
        # No gc.collect(): a socket merely dropped, not closed, would still hold its fd here.
        assert open_fds() == before, f"fds left open when cancelled after step {steps}"
        assert not (tmp_path / "web.sock").exists(), f"socket file left after step {steps}"
    # Scheduling order varies from run to run, so a late step may fall after the
    # block ended; nearly every one must have cancelled something.
    assert cancelled_count >= total * 0.8


async def test_cancelled_before_the_sockets_exist_creates_none(tmp_path: Path) -> None:
    manifest = write_service(tmp_path)
    before = open_fds()
    with trio.CancelScope() as scope:
        scope.cancel()
        async with activated(manifest, environ={}):
            pytest.fail("the block ran in a cancelled scope")
    assert open_fds() == before
    assert not (tmp_path / "web.sock").exists()


# --- adopting passed sockets --------------------------------------------------

EMBEDDING_PROGRAM = """\
import sys

import trio

from trio_activate import activated


async def main():
    async with activated(sys.argv[1]) as act:
        [listener] = act.listeners["web"]
        stream = await listener.accept()
        async with stream:
            await stream.send_all(act.origin.encode() + b" " + await stream.receive_some(100))


trio.run(main)
"""


def test_sockets_passed_by_systemd_socket_activate_are_adopted(tmp_path: Path) -> None:
    activate = require_peer("systemd-socket-activate")
    program = tmp_path / "program.py"
    program.write_text(EMBEDDING_PROGRAM)
    manifest = tmp_path / "service.toml"
    manifest.write_text('[sockets.web]\nlisten = "./passed.sock"\n')
    path = str(tmp_path / "passed.sock")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_"))}
    proc = subprocess.Popen(
        [activate, "-l", path, "--fdname=web", sys.executable, str(program), str(manifest)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(15)
            deadline = time.monotonic() + 15
            while not os.path.exists(path):  # bound by systemd-socket-activate at start
                assert proc.poll() is None, proc.communicate()[1].decode()
                assert time.monotonic() < deadline, "systemd-socket-activate did not bind"
                time.sleep(0.01)
            client.connect(path)
            client.sendall(b"hello")
            assert client.recv(100) == b"passed hello"
        _, stderr = proc.communicate(timeout=15)
        assert proc.returncode == 0, stderr.decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=15)


EXTRA_PROGRAM = """
import sys
import trio
from trio_activate import activated


async def main():
    async with activated(sys.argv[1], extra_names=["admin"]) as act:
        [admin] = act.extra["admin"]
        print(sorted(act.sockets), sorted(act.extra), admin.getsockname(), flush=True)
        [listener] = act.listeners["web"]
        stream = await listener.accept()
        async with stream:
            await stream.send_all(b"web " + await stream.receive_some(100))


trio.run(main)
"""


def test_extra_names_keep_passed_fds_the_manifest_does_not_declare(tmp_path: Path) -> None:
    """Rule: an embedding program can take a passed name before adoption closes it as unclaimed."""
    activate = require_peer("systemd-socket-activate")
    program = tmp_path / "program.py"
    program.write_text(EXTRA_PROGRAM)
    manifest = tmp_path / "service.toml"
    manifest.write_text('[sockets.web]\nlisten = "./web.sock"\n')
    web, admin = str(tmp_path / "web.sock"), str(tmp_path / "admin.sock")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_"))}
    argv = [
        activate,
        "-l",
        web,
        "-l",
        admin,
        "--fdname=web:admin",
        sys.executable,
        str(program),
        str(manifest),
    ]
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    try:
        deadline = time.monotonic() + 15
        while not os.path.exists(web):
            assert proc.poll() is None, proc.communicate()[1].decode()
            assert time.monotonic() < deadline, "systemd-socket-activate did not bind"
            time.sleep(0.01)
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(15)
            client.connect(web)
            client.sendall(b"hello")
            assert client.recv(100) == b"web hello"
        out, err = proc.communicate(timeout=15)
        assert proc.returncode == 0, err.decode()
        assert out.decode().strip() == f"['web'] ['admin'] {admin}"
        assert "closing" not in err.decode(), "the extra fd was not treated as unclaimed"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=15)


async def test_extra_names_must_not_be_manifest_sockets() -> None:
    with pytest.raises(ValueError, match=r"extra_names: \['web'\] are manifest sockets"):
        async with activated(sockets={"web": "127.0.0.1:0"}, extra_names=["web"]):
            pass
