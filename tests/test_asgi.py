"""``kind = "asgi"``: ASGI applications served by hypercorn's Trio worker on the manifest's sockets.

Real applications (``tests/asgi_apps``: Starlette on Trio through anyio, and
Quart-Trio), real clients (httpx, trio-websocket, wrk), the real kernel's
view of the socket (``ss``).  Every server binds 127.0.0.1 or a unix socket
in the test's folder, and is stopped by the ``started`` harness.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import trio
import trio_websocket
from helpers import (
    TRIO_ACTIVATE,
    Process,
    clean_env,
    free_port,
    one_line_error,
    require_peer,
    retry,
    run_cli,
    started,
    wait_until,
    write_asgi_app,
    write_manifest,
)

from trio_activate import activated
from trio_activate.errors import HandlerError, ManifestError
from trio_activate.model.manifest import HandlerKind, HttpSpec, dump_manifest, load_manifest, parse_manifest
from trio_activate.runtime.handlers import load_handler

APPS = Path(__file__).parent / "asgi_apps"
RELOADS = 20


def asgi_manifest(
    folder: Path,
    *,
    listen: str = "127.0.0.1:0",
    call: str = "starlette_app:app",
    workers: int = 1,
    grace: float = 5.0,
    extra: str = "",
    socket_extra: str = "",
) -> Path:
    return write_manifest(
        folder,
        f"""
        [service]
        workers = {workers}
        grace-period = {grace}
        python-path = ["{APPS}"]

        [sockets.web]
        listen = "{listen}"
        {socket_extra}

        [handlers.web]
        socket = "web"
        kind = "asgi"
        call = "{call}"
        {extra}
        """,
    )


def serve(manifest: Path, *args: str, **env: str) -> contextlib.AbstractContextManager[Process]:
    return started([*TRIO_ACTIVATE, "serve", *args, str(manifest)], cwd=manifest.parent, env=clean_env(**env))


def ready(process: Process, workers: int = 1) -> int:
    """The port, once the service (every worker) is ready."""
    port = process.port("web")
    process.wait_for(r"ready: generation 1" if workers > 1 else r"info: ready: ")
    return port


# --- the manifest --------------------------------------------------------------------------------

MANIFEST = """
[sockets.web]
listen = "127.0.0.1:8080"

[handlers.web]
socket = "web"
kind = "asgi"
call = "app:app"
"""


def test_an_asgi_handler_reads_back_with_every_default() -> None:
    manifest = parse_manifest(MANIFEST + 'factory = true\n[handlers.web.http]\nroot-path = "/api"\n')
    (handler,) = manifest.handlers
    assert handler.kind is HandlerKind.ASGI
    assert handler.factory
    assert handler.http == HttpSpec(root_path="/api")
    assert parse_manifest(dump_manifest(manifest)) == manifest
    plain = parse_manifest(MANIFEST)
    assert plain.handlers[0].http == HttpSpec()
    assert parse_manifest(dump_manifest(plain)) == plain


def test_tls_keys_read_back() -> None:
    text = (
        MANIFEST
        + '[handlers.web.http]\ncertfile = "c.pem"\nkeyfile = "k.pem"\nca-certs = "ca.pem"\nhttp2 = false\n'
    )
    manifest = parse_manifest(text)
    http = manifest.handlers[0].http
    assert http is not None
    assert (http.tls, http.http2, http.ca_certs) == (True, False, "ca.pem")
    assert parse_manifest(dump_manifest(manifest)) == manifest


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (
            "[handlers.web.http]\nkeep-alive-timout = 3\n",
            "m.toml: handlers.web.http.keep-alive-timout: unknown key; did you mean 'keep-alive-timeout'?",
        ),
        (
            "[handlers.web.http]\nkeep-alive-timeout = 0\n",
            "m.toml: handlers.web.http.keep-alive-timeout: 0 is not a timeout",
        ),
        ("[handlers.web.http]\nhttp2 = 1\n", "m.toml: handlers.web.http.http2: expected true or false, got"),
        (
            "[handlers.web.http]\nhttp2 = false\n",
            "m.toml: handlers.web.http.http2: applies to TLS only: set certfile and keyfile",
        ),
        (
            '[handlers.web.http]\ncertfile = "c.pem"\n',
            "m.toml: handlers.web.http.certfile: TLS needs both certfile and keyfile, and keyfile is not set",
        ),
        (
            '[handlers.web.http]\nca-certs = "ca.pem"\n',
            "m.toml: handlers.web.http.ca-certs: applies to TLS only",
        ),
        (
            '[handlers.web.http]\nroot-path = "api/"\n',
            "m.toml: handlers.web.http.root-path: 'api/': expected a path that starts and does not end "
            "with /",
        ),
        (
            "[handlers.web.http]\naccess-log = 'yes'\n",
            "m.toml: handlers.web.http.access-log: expected true or",
        ),
        ('http = "on"\n', "m.toml: handlers.web.http: expected a table, got"),
        ("max-connections = 10\n", "m.toml: handlers.web.max-connections: applies to stream handlers only"),
        ("factory = 1\n", "m.toml: handlers.web.factory: expected true or false"),
    ],
)
def test_bad_asgi_keys_are_one_line_naming_file_and_key(extra: str, expected: str) -> None:
    with pytest.raises(ManifestError) as caught:
        parse_manifest(MANIFEST + extra, source="m.toml")
    assert str(caught.value).startswith(expected), str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            MANIFEST.replace('kind = "asgi"', 'kind = "stream"') + "factory = true\n",
            "m.toml: handlers.web.factory: applies to asgi handlers only, and this one is stream",
        ),
        (
            MANIFEST.replace('kind = "asgi"', 'kind = "listener"') + "[handlers.web.http]\n",
            "m.toml: handlers.web.http: applies to asgi handlers only, and this one is listener",
        ),
        (
            MANIFEST.replace('listen = "127.0.0.1:8080"', 'listen = "127.0.0.1:8080"\ntype = "datagram"'),
            "m.toml: handlers.web.kind: a asgi handler cannot serve sockets.web, a datagram socket",
        ),
    ],
)
def test_asgi_keys_elsewhere_are_refused(text: str, expected: str) -> None:
    with pytest.raises(ManifestError) as caught:
        parse_manifest(text, source="m.toml")
    assert str(caught.value).startswith(expected), str(caught.value)


def test_an_accept_socket_may_be_served_by_an_asgi_handler() -> None:
    text = MANIFEST.replace('listen = "127.0.0.1:8080"', 'listen = "127.0.0.1:8080"\naccept = true')
    manifest = parse_manifest("[service]\naccept-handler = 'web'\n" + text, source="m.toml")
    assert manifest.sockets[0].accept
    assert manifest.service.accept_handler == "web"


# --- loading the application ---------------------------------------------------------------------


@pytest.fixture(autouse=True)
def apps_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(APPS))


def load(tmp_path: Path, call: str, extra: str = "") -> object:
    manifest = load_manifest(asgi_manifest(tmp_path, call=call, extra=extra))
    return load_handler(manifest, manifest.handlers[0]).function


def test_an_app_and_a_factory_load(tmp_path: Path) -> None:
    assert callable(load(tmp_path, "starlette_app:app"))
    assert type(load(tmp_path, "starlette_app:make_app", "factory = true")).__name__ == "Starlette"


@pytest.mark.parametrize(
    ("call", "extra", "expected"),
    [
        (
            "starlette_app:make_app",
            "",
            "service.toml: handlers.web.call: 'starlette_app:make_app' is a plain function, not an ASGI "
            "application; if it builds the application, set factory = true",
        ),
        (
            "starlette_app:app",
            "factory = true",
            "service.toml: handlers.web.call: the factory 'starlette_app:app' raised TypeError: ",
        ),
        (
            "starlette_app:not_an_app",
            "factory = true",
            "service.toml: handlers.web.call: 'starlette_app:not_an_app' returned a str, "
            "not an ASGI application",
        ),
        (
            "starlette_app:routes",
            "factory = true",
            "service.toml: handlers.web.call: 'starlette_app:routes' is a list, not a factory function",
        ),
        (
            "starlette_app:app",
            '[handlers.web.http]\ncertfile = "cert.pem"\nkeyfile = "key.pem"',
            "service.toml: handlers.web.http.certfile: cert.pem: no such file",
        ),
    ],
)
def test_a_wrong_application_is_one_line(tmp_path: Path, call: str, extra: str, expected: str) -> None:
    with pytest.raises(HandlerError) as caught:
        load(tmp_path, call, extra)
    assert str(caught.value).startswith(expected), str(caught.value)
    assert "\n" not in str(caught.value)


def test_without_hypercorn_kind_asgi_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [name for name in sys.modules if name.split(".")[0] == "hypercorn"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "hypercorn", None)
    with pytest.raises(HandlerError) as caught:
        load(tmp_path, "starlette_app:app")
    assert str(caught.value) == (
        "service.toml: handlers.web.kind: 'asgi' is served by hypercorn, which is not installed: "
        "pip install 'trio-activate[asgi]'"
    )


def test_hypercorn_is_imported_only_for_an_asgi_handler() -> None:
    code = (
        "import sys, trio_activate.cli.commands, trio_activate.runtime.service, "
        "trio_activate.runtime.embedded; "
        "print(sorted(m for m in sys.modules if m.startswith('hypercorn')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert done.stdout.strip() == "[]", done.stderr


# --- serving -------------------------------------------------------------------------------------


async def websocket_exchange(stream: trio.abc.Stream, host: str) -> list[str]:
    async with trio.open_nursery() as nursery:
        connection = await trio_websocket.wrap_client_stream(nursery, stream, host, "/ws")
        answers = []
        for text in ("one", "two"):
            await connection.send_message(text)
            answers.append(await connection.get_message())
        await connection.aclose()
    return [str(answer) for answer in answers]


@pytest.mark.parametrize(("call", "hello"), [("starlette_app:app", "hello"), ("quart_app:app", "quart")])
async def test_http_streaming_and_websocket_over_tcp(tmp_path: Path, call: str, hello: str) -> None:
    with serve(asgi_manifest(tmp_path, call=call)) as process:
        port = await trio.to_thread.run_sync(ready, process)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            answer = await client.get("/")
            assert (answer.status_code, answer.text.split()[0]) == (200, hello)
            async with client.stream("GET", "/stream") as streamed:
                chunks = [chunk async for chunk in streamed.aiter_text()]
            assert "".join(chunks) == "".join(f"chunk {n}\n" for n in range(5))
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        assert await websocket_exchange(stream, "127.0.0.1") == ["echo one", "echo two"]
        assert process.stop() == 0


@pytest.mark.parametrize(("call", "hello"), [("starlette_app:app", "hello"), ("quart_app:app", "quart")])
async def test_http_streaming_and_websocket_over_a_unix_socket(
    short_dir: Path, call: str, hello: str
) -> None:
    path = short_dir / "web.sock"
    with serve(asgi_manifest(short_dir, listen=str(path), call=call)) as process:
        await trio.to_thread.run_sync(process.wait_for, "info: ready: ")
        transport = httpx.AsyncHTTPTransport(uds=str(path))
        async with httpx.AsyncClient(transport=transport, base_url="http://web") as client:
            answer = await client.get("/")
            assert (answer.status_code, answer.text.split()[0]) == (200, hello)
            streamed = await client.get("/stream")
            assert streamed.text.count("chunk") == 5
        stream = await trio.open_unix_socket(str(path))
        assert await websocket_exchange(stream, "web") == ["echo one", "echo two"]
        assert process.stop() == 0


def test_the_backlog_stays_the_manifests_while_the_app_serves(tmp_path: Path) -> None:
    """Hypercorn never calls listen() again: the kernel still reports the manifest's backlog."""
    ss = shutil.which("ss")
    if ss is None:
        pytest.skip("ss not installed (iproute2)")
    with serve(asgi_manifest(tmp_path, socket_extra="backlog = 2048")) as process:
        port = ready(process)
        assert httpx.get(f"http://127.0.0.1:{port}/").status_code == 200
        listing = subprocess.run([ss, "-Hltn", f"sport = :{port}"], capture_output=True, text=True).stdout
        (line,) = listing.splitlines()
        assert line.split()[2] == "2048", listing


def test_lifespan_runs_once_per_worker_and_readiness_waits_for_it(tmp_path: Path) -> None:
    events = tmp_path / "events"
    with serve(asgi_manifest(tmp_path, workers=2), ASGI_EVENTS=str(events)) as process:
        ready(process, workers=2)
        starts = events.read_text().split("\n")
        assert len([line for line in starts if line.startswith("startup")]) == 2
        assert process.stop() == 0
    lines = events.read_text().splitlines()
    pids = {line.split()[1] for line in lines}
    assert len(pids) == 2
    assert sorted(lines) == sorted([f"startup {pid}" for pid in pids] + [f"shutdown {pid}" for pid in pids])
    assert "Running on" not in process.log


def test_a_failing_startup_is_a_failed_start_in_one_line(tmp_path: Path) -> None:
    with serve(asgi_manifest(tmp_path), ASGI_FAIL_STARTUP="1") as process:
        assert process.wait() == 1
    errors = [line for line in process.lines if "error" in line]
    assert len(errors) == 1, process.log
    assert errors[0].endswith(
        "handlers.web: lifespan startup failed: RuntimeError: the database is unreachable"
    )
    assert "ready" not in process.log
    assert "Traceback" not in process.log


def test_a_failing_startup_under_reload_leaves_the_old_generation_serving(tmp_path: Path) -> None:
    switch = tmp_path / "fail"
    with serve(asgi_manifest(tmp_path, workers=2), ASGI_FAIL_IF=str(switch)) as process:
        port = ready(process, workers=2)
        switch.touch()
        mark = process.mark()
        process.send_signal(signal.SIGHUP)
        process.wait_for(r"reload failed", since=mark)
        assert httpx.get(f"http://127.0.0.1:{port}/").text.startswith("hello")
        switch.unlink()
        mark = process.mark()
        process.send_signal(signal.SIGHUP)
        process.wait_for(r"reloaded: generation \d+ serving", since=mark)
        assert httpx.get(f"http://127.0.0.1:{port}/").status_code == 200
        assert process.stop() == 0


@pytest.mark.parametrize(
    ("options", "taken_over"),
    [(["--supervise"], r"reloaded: generation 2 serving"), ([], r"handed over to process \d+")],
    ids=["supervised", "hand-over"],
)
def test_a_process_starting_leaves_the_serving_ones_accept_loop_non_blocking(
    tmp_path: Path, options: list[str], taken_over: str
) -> None:
    """Every process's listening fd is one open file description, and O_NONBLOCK belongs to it: a
    worker (or successor) that made it blocking as it started (``socket.dup()`` does, through
    ``settimeout``) left a serving one's next ``accept()`` blocking its whole event loop until
    another client came; and a sibling worker whose first ``accept()`` came then was never ready.
    Here the new process holds in its lifespan startup, past its own setup of the socket, while
    the old one serves requests, which it must go on answering."""
    events, hold = tmp_path / "events", tmp_path / "hold"
    manifest = asgi_manifest(tmp_path)
    with serve(manifest, *options, ASGI_EVENTS=str(events), ASGI_HOLD_IF=str(hold)) as process:
        port = ready(process)
        old = int(events.read_text().split()[1])
        hold.touch()
        mark = process.mark()
        process.send_signal(signal.SIGHUP)
        wait_until(lambda: events.read_text().count("startup") == 2, what="the new worker's startup")
        for _ in range(2):
            # A connection each: the old process accepts it, then waits for the next one in its
            # event loop (not in the kernel's accept()), where it answers this one.
            answer = httpx.get(f"http://127.0.0.1:{port}/", headers={"Connection": "close"}, timeout=5)
            assert answer.text.startswith(f"hello {old}")
        hold.unlink()
        process.wait_for(taken_over, since=mark)
        assert process.stop() == 0


def keep_alive_idle_then(port: int, delay: float) -> tuple[str, bytes]:
    """A keep-alive connection: one request, idle ``delay`` s, then a second request; the second answer."""
    request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(request)
        first = conn.recv(65536)
        assert b"200" in first.split(b"\r\n")[0]
        time.sleep(delay)
        try:
            conn.sendall(request)
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
        except OSError as exc:
            return "error", str(exc).encode()
    return "answered" if data else "closed", data


def test_an_idle_connection_is_answered_with_connection_close_just_after_the_stop(tmp_path: Path) -> None:
    """Hypercorn alone closes an idle connection the moment it stops; here its next request is
    answered (with ``Connection: close``) for a short while first."""
    with serve(asgi_manifest(tmp_path)) as process:
        port = ready(process)
        outcome: list[tuple[str, bytes]] = []
        client = threading.Thread(target=lambda: outcome.append(keep_alive_idle_then(port, 0.5)))
        client.start()
        time.sleep(0.3)  # the client idles between its requests
        process.send_signal(signal.SIGTERM)
        client.join(10)
        assert process.wait() == 0
    ((kind, data),) = outcome
    assert kind == "answered", data
    head = data.split(b"\r\n\r\n")[0].lower()
    assert b"connection: close" in head


# --- reloads under load --------------------------------------------------------------------------


def wrk_report(output: str) -> tuple[int, int]:
    """(requests, failed) from wrk's own summary: socket errors and non-2xx/3xx responses."""
    requests = int(re.search(r"(\d+) requests in", output)[1])  # type: ignore[index]
    failed = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", output))
    status = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return requests, failed + (int(status[1]) if status else 0)


@pytest.mark.slow
@pytest.mark.parametrize("close", [False, True], ids=["keep-alive", "connection-close"])
def test_reloads_under_load_lose_no_request(tmp_path: Path, close: bool) -> None:
    """20 reloads of two workers under wrk: no failed request, and a request in flight across each
    reload finishes."""
    wrk = shutil.which("wrk")
    if wrk is None:
        pytest.skip("wrk not installed (apt-get install wrk)")
    with serve(asgi_manifest(tmp_path, workers=2, grace=3.0)) as process:
        port = ready(process, workers=2)
        argv = [wrk, "-t1", "-c20", "-d60s", "--timeout", "5s", f"http://127.0.0.1:{port}/"]
        if close:
            argv[1:1] = ["-H", "Connection: close"]
        load = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(0.3)
            for number in range(2, RELOADS + 2):
                slow: list[int] = []
                in_flight = threading.Thread(
                    target=lambda slow=slow: slow.append(
                        httpx.get(f"http://127.0.0.1:{port}/slow", timeout=10).status_code
                    )
                )
                in_flight.start()
                time.sleep(0.05)
                mark = process.mark()
                process.send_signal(signal.SIGHUP)
                process.wait_for(rf"reloaded: generation {number} serving", since=mark)
                in_flight.join(10)
                assert slow == [200], f"reload {number}: the request in flight got {slow}"
        finally:
            if load.poll() is None:
                load.send_signal(signal.SIGINT)
            out, _ = load.communicate(timeout=15)
        requests, failed = wrk_report(out)
        print(f"{RELOADS} reloads, {'close' if close else 'keep-alive'}: {failed} failed of {requests}")
        assert requests > 1000, out
        assert failed == 0, out
        assert process.stop() == 0


# --- Accept=yes ----------------------------------------------------------------------------------


def accept_peer(tmp_path: Path, *env: str) -> tuple[list[str], int]:
    """``systemd-socket-activate --accept`` (``env`` set) on an ``accept = true`` asgi manifest; its port."""
    peer = require_peer("systemd-socket-activate")
    # free_port: systemd-socket-activate -l refuses port 0.
    port = free_port()
    manifest = asgi_manifest(tmp_path, listen=f"127.0.0.1:{port}", socket_extra="accept = true")
    setenv = [f"--setenv={item}" for item in env]
    argv = [peer, "--accept", "-l", f"127.0.0.1:{port}", *setenv]
    return [*argv, *TRIO_ACTIVATE, "serve", str(manifest)], port


def test_accept_yes_serves_each_connection_in_a_process_of_its_own_under_systemd_socket_activate(
    tmp_path: Path,
) -> None:
    """The real peer accepts and forks: each connection is one process, lifespan around it, exit 0."""
    events = tmp_path / "events"
    argv, port = accept_peer(tmp_path, f"ASGI_EVENTS={events}")
    with started(argv, env=clean_env()) as run:
        answers = [retry(lambda: httpx.get(f"http://127.0.0.1:{port}/", timeout=5)) for _ in range(2)]
        # Two requests on one keep-alive connection: one process answers both.
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            kept = [client.get("/").text for _ in range(2)]
        wait_until(lambda: len(re.findall(r"Child \d+ died", run.log)) >= 3, what="the three children died")
        err = run.log
    assert [answer.status_code for answer in answers] == [200, 200]
    pids = [answer.text.split()[1] for answer in answers]
    spawned = re.findall(r"as PID (\d+)\.", err)
    assert pids == spawned[:2], err
    assert len(set(spawned)) == 3, "a process per connection"
    assert kept == [f"hello {spawned[2]} "] * 2
    died = re.findall(r"Child (\d+) died with code (\d+)", err)
    assert sorted(died) == sorted((pid, "0") for pid in spawned), err
    assert err.count("Accept=yes: serving one connection with handlers.web") == 3
    lines = events.read_text().splitlines()
    assert sorted(lines) == sorted(f"{what} {pid}" for pid in spawned for what in ("startup", "shutdown"))


def test_accept_yes_a_failing_startup_closes_the_connection_unanswered_in_one_line_exit_1(
    tmp_path: Path,
) -> None:
    argv, port = accept_peer(tmp_path, "ASGI_FAIL_STARTUP=1")
    with started(argv, env=clean_env()) as run:
        client = retry(lambda: socket.create_connection(("127.0.0.1", port), timeout=5))
        with client:
            client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            with contextlib.suppress(ConnectionResetError):  # closed with the request unread
                assert client.recv(4096) == b"", "no answer"
        wait_until(lambda: "died with code" in run.log, what="the child died")
        err = run.log
    assert re.search(r"Child \d+ died with code 1", err), err
    failures = [line for line in err.splitlines() if "error:" in line]
    assert len(failures) == 1, err
    assert failures[0].endswith(
        "handlers.web: lifespan startup failed: RuntimeError: the database is unreachable"
    )
    assert "Traceback" not in err


def test_accept_yes_sigterm_closes_an_idle_keep_alive_connection_and_exits_0(tmp_path: Path) -> None:
    argv, port = accept_peer(tmp_path)
    with started(argv, env=clean_env()) as run:
        client = retry(lambda: socket.create_connection(("127.0.0.1", port), timeout=5))
        with client:
            client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            first = b""
            while b"hello" not in first:
                first += client.recv(4096)
            assert first.startswith(b"HTTP/1.1 200"), first
            assert b"connection: close" not in first.lower()
            (pid,) = re.findall(r"as PID (\d+)\.", run.wait_for_text("as PID"))
            os.kill(int(pid), signal.SIGTERM)
            began = time.monotonic()
            assert client.recv(4096) == b"", "the idle connection is closed"
            assert time.monotonic() - began < 3
        wait_until(lambda: "died with code" in run.log, what="the child died")
        assert f"Child {pid} died with code 0" in run.log, run.log


# --- systemd units -------------------------------------------------------------------------------


def test_units_for_an_asgi_manifest_verify(tmp_path: Path) -> None:
    analyze = require_peer("systemd-analyze")
    folder = tmp_path / "readable"
    folder.mkdir()
    folder.chmod(0o755)
    manifest = asgi_manifest(folder, listen="127.0.0.1:8080", workers=2)
    out = tmp_path / "units"
    out.mkdir()
    done = run_cli("systemd", str(manifest), "--output", str(out), "--systemd-version", "252")
    assert done.returncode == 0, done.stderr
    checked = subprocess.run(
        [analyze, "verify", *sorted(str(p) for p in out.iterdir())],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (checked.returncode, checked.stderr) == (0, "")


def test_a_missing_certificate_stops_serve_in_one_line(tmp_path: Path) -> None:
    manifest = asgi_manifest(tmp_path, extra='[handlers.web.http]\ncertfile = "c.pem"\nkeyfile = "k.pem"')
    done = subprocess.run(
        [*TRIO_ACTIVATE, "--log-level", "error", "serve", str(manifest)],
        capture_output=True,
        text=True,
        timeout=30,
        env=clean_env(),
    )
    assert done.returncode == 2
    assert one_line_error(done.stderr).endswith(
        "service.toml: handlers.web.http.certfile: c.pem: no such file"
    )


# --- activated() ---------------------------------------------------------------------------------


async def test_activated_serve_runs_an_asgi_handler(tmp_path: Path) -> None:
    manifest = load_manifest(asgi_manifest(tmp_path))
    async with activated(manifest) as act:
        port = act.sockets["web"][0].getsockname()[1]
        async with trio.open_nursery() as nursery:
            statuses: list[int] = []

            async def serve_it(*, task_status: trio.TaskStatus[None]) -> None:
                statuses.append(await act.serve(task_status=task_status))

            await nursery.start(serve_it)
            async with httpx.AsyncClient() as client:
                answer = await client.get(f"http://127.0.0.1:{port}/")
            assert answer.text.startswith(f"hello {os.getpid()}")
            act.shutdown()
        assert statuses == [0]


# --- the [handlers.NAME.http] table --------------------------------------------------------------


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made here."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    certfile, keyfile = folder / "cert.pem", folder / "key.pem"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return certfile, keyfile


@pytest.mark.parametrize("http2", [True, False])
def test_tls_answers_http1_and_http2_by_alpn(tmp_path: Path, http2: bool) -> None:
    certfile, _ = self_signed(tmp_path)
    extra = '[handlers.web.http]\ncertfile = "cert.pem"\nkeyfile = "key.pem"\n'
    if not http2:
        extra += "http2 = false\n"
    with serve(asgi_manifest(tmp_path, extra=extra)) as process:
        port = ready(process)
        url = f"https://127.0.0.1:{port}/"
        context = ssl.create_default_context(cafile=str(certfile))
        with httpx.Client(verify=context) as client:
            answer = client.get(url)
            assert (answer.status_code, answer.http_version) == (200, "HTTP/1.1")
        with httpx.Client(verify=context, http2=True) as client:
            answer = client.get(url)
            expected = "HTTP/2" if http2 else "HTTP/1.1"
            assert (answer.status_code, answer.http_version) == (200, expected)
            assert answer.text.startswith("hello")
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/", timeout=2)
        assert process.stop() == 0


def test_root_path_server_header_access_log_and_keep_alive_timeout(tmp_path: Path) -> None:
    extra = (
        '[handlers.web.http]\nroot-path = "/api"\nserver-header = false\naccess-log = true\n'
        "keep-alive-timeout = 0.5\n"
    )
    with serve(asgi_manifest(tmp_path, extra=extra)) as process:
        port = ready(process)
        answer = httpx.get(f"http://127.0.0.1:{port}/")
        assert answer.text.split()[-1] == "/api"
        assert "server" not in answer.headers
        process.wait_for(r'"GET / 1\.1" 200')
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            began = time.monotonic()
            data = b""
            while chunk := conn.recv(65536):  # to the EOF: the server closes the idle connection
                data += chunk
            assert data.startswith(b"HTTP/1.1 200")
            assert 0.4 < time.monotonic() - began < 3
        assert process.stop() == 0


# --- dev ---------------------------------------------------------------------------------------------


def test_dev_reloads_an_asgi_app_when_its_code_changes(tmp_path: Path) -> None:
    """`dev` with an asgi handler: each change to the app's file is served by the next generation, and
    only by it once the reload is announced."""
    write_asgi_app(tmp_path / "plain_app.py", "v1")
    manifest = write_manifest(
        tmp_path,
        """
        [service]
        grace-period = 2
        python-path = ["."]

        [sockets.web]
        listen = "127.0.0.1:0"

        [handlers.web]
        socket = "web"
        kind = "asgi"
        call = "plain_app:app"
        """,
    )
    with started([*TRIO_ACTIVATE, "dev", str(manifest)], cwd=tmp_path, env=clean_env()) as process:
        port = process.port("web")
        process.wait_for(r"ready: generation 1")
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=10).text == "v1"
        for generation in (2, 3, 4):
            mark = process.mark()
            write_asgi_app(tmp_path / "plain_app.py", f"v{generation}")
            process.wait_for(rf"reloaded: generation {generation} serving", since=mark)
            # Once the reload is announced, every new connection gets the new code: the old
            # generation said STOPPING=1 only after hypercorn's accept loops had ended.
            answers = {httpx.get(f"http://127.0.0.1:{port}/", timeout=10).text for _ in range(10)}
            assert answers == {f"v{generation}"}
        assert process.stop() == 0
    assert process.count(r"error|Traceback") == 0, process.log
