"""`trio_activate.runtime.handlers`: importing the manifest's handlers before anything is served.

Every failure is one `HandlerError` line naming the manifest, the handler's
``call`` key and the reason.  The handler modules are real files written
into the test's folder and imported for real; each test uses module names of
its own and forgets them afterwards, so no test sees another's module.
"""

from __future__ import annotations

import importlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from trio_activate.errors import HandlerError
from trio_activate.model.manifest import Manifest, parse_manifest
from trio_activate.runtime.handlers import LoadedHandler, load_handler, load_handlers, prepend_python_path


@pytest.fixture(autouse=True)
def isolated_imports(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Restore sys.path and forget every module a test imported."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        del sys.modules[name]


def manifest(tmp_path: Path, call: str, *, name: str = "web", extra: str = "") -> Manifest:
    text = f"""
[sockets.web]
listen = "127.0.0.1:0"

[handlers.{name}]
socket = "web"
call = "{call}"
{extra}
"""
    return parse_manifest(text, path=tmp_path / "service.toml", source="service.toml")


def write_module(folder: Path, name: str, text: str) -> None:
    (folder / f"{name}.py").write_text(text)
    importlib.invalidate_caches()


def load_error(tmp_path: Path, call: str) -> str:
    loaded = manifest(tmp_path, call)
    with pytest.raises(HandlerError) as caught:
        load_handlers(loaded)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("service.toml: handlers.web.call: ")
    return message


# --- what loads -------------------------------------------------------------


def test_an_async_function_loads_with_its_spec(tmp_path: Path) -> None:
    write_module(tmp_path, "ok_app", "async def handle(stream):\n    pass\n")
    loaded = manifest(tmp_path, "ok_app:handle")
    [handler] = load_handlers(loaded)
    assert isinstance(handler, LoadedHandler)
    assert handler.spec is loaded.handlers[0]
    assert handler.function is sys.modules["ok_app"].handle


def test_a_dotted_function_path_reaches_an_async_method(tmp_path: Path) -> None:
    write_module(
        tmp_path,
        "dotted_app",
        "class Server:\n    @staticmethod\n    async def handle(stream):\n        pass\n",
    )
    [handler] = load_handlers(manifest(tmp_path, "dotted_app:Server.handle"))
    assert handler.function is sys.modules["dotted_app"].Server.handle


def test_an_instance_with_an_async_call_loads(tmp_path: Path) -> None:
    write_module(
        tmp_path,
        "instance_app",
        "class Handler:\n    async def __call__(self, stream):\n        pass\n\nhandle = Handler()\n",
    )
    [handler] = load_handlers(manifest(tmp_path, "instance_app:handle"))
    assert handler.function is sys.modules["instance_app"].handle


def test_the_shipped_examples_load() -> None:
    text = """
[sockets.tcp]
listen = "127.0.0.1:0"
[sockets.udp]
listen = "127.0.0.1:0"
type = "datagram"
[handlers.echo]
socket = "tcp"
call = "trio_activate.examples:echo"
[handlers.udp]
socket = "udp"
call = "trio_activate.examples:udp_echo"
"""
    handlers = load_handlers(parse_manifest(text))
    assert [h.spec.name for h in handlers] == ["echo", "udp"]


# --- one-line errors --------------------------------------------------------


def test_a_missing_module_is_one_line_naming_the_handler(tmp_path: Path) -> None:
    message = load_error(tmp_path, "no_such_module_here:handle")
    assert message == (
        "service.toml: handlers.web.call: cannot import 'no_such_module_here': "
        "No module named 'no_such_module_here'"
    )


def test_a_missing_package_of_a_dotted_module_is_named(tmp_path: Path) -> None:
    message = load_error(tmp_path, "no_such_pkg.echo:handle")
    assert message.endswith("cannot import 'no_such_pkg.echo': No module named 'no_such_pkg'")


def test_a_syntax_error_is_one_line_with_file_and_line(tmp_path: Path) -> None:
    write_module(tmp_path, "broken_app", "import trio\n\nasync def handle(stream)\n    pass\n")
    message = load_error(tmp_path, "broken_app:handle")
    assert message.startswith("service.toml: handlers.web.call: cannot import 'broken_app': ")
    assert f"({tmp_path / 'broken_app.py'}, line 3)" in message


def test_an_exception_while_importing_names_it_and_where_it_was_raised(tmp_path: Path) -> None:
    write_module(tmp_path, "raising_app", "x = 1\nraise ValueError('no config')\n")
    message = load_error(tmp_path, "raising_app:handle")
    assert message == (
        "service.toml: handlers.web.call: importing 'raising_app' raised "
        f"ValueError: no config (at {tmp_path / 'raising_app.py'}:2)"
    )


def test_a_module_importing_something_missing_says_what(tmp_path: Path) -> None:
    write_module(tmp_path, "needs_app", "import not_installed_anywhere\n")
    message = load_error(tmp_path, "needs_app:handle")
    assert message.endswith("cannot import 'needs_app': No module named 'not_installed_anywhere'")


def test_a_missing_function_is_named(tmp_path: Path) -> None:
    write_module(tmp_path, "nofunc_app", "async def other(stream):\n    pass\n")
    message = load_error(tmp_path, "nofunc_app:handle")
    assert message == "service.toml: handlers.web.call: 'nofunc_app' has no attribute 'handle'"


@pytest.mark.parametrize(
    ("module", "definition", "kind"),
    [
        ("plain_app", "def handle(stream):\n    pass\n", "a plain function"),
        ("class_app", "class handle:\n    pass\n", "a class"),
        ("int_app", "handle = 42\n", "an int"),
        ("none_app", "handle = None\n", "a NoneType"),
        ("sync_call_app", "class C:\n    def __call__(self, s):\n        pass\nhandle = C()\n", "a callable"),
        ("gen_app", "def handle(stream):\n    yield\n", "a plain function"),
        ("agen_app", "async def handle(stream):\n    yield\n", "an async generator function"),
    ],
)
def test_not_a_coroutine_function_is_one_line_saying_what_it_is(
    tmp_path: Path, module: str, definition: str, kind: str
) -> None:
    write_module(tmp_path, module, definition)
    message = load_error(tmp_path, f"{module}:handle")
    assert message == (
        f"service.toml: handlers.web.call: '{module}:handle' is {kind}, "
        "not a coroutine function (write `async def`)"
    )


def test_the_error_names_the_failing_handler_among_several(tmp_path: Path) -> None:
    write_module(tmp_path, "good_app", "async def handle(stream):\n    pass\n")
    text = """
[sockets.a]
listen = "127.0.0.1:0"
[sockets.b]
listen = "127.0.0.1:0"
[handlers.first]
socket = "a"
call = "good_app:handle"
[handlers.second]
socket = "b"
call = "good_app:missing"
"""
    loaded = parse_manifest(text, path=tmp_path / "two.toml", source="two.toml")
    with pytest.raises(
        HandlerError, match=r"^two\.toml: handlers\.second\.call: 'good_app' has no attribute"
    ):
        load_handlers(loaded)


def test_load_handler_loads_one_spec(tmp_path: Path) -> None:
    write_module(tmp_path, "single_app", "async def handle(stream):\n    pass\n")
    loaded = manifest(tmp_path, "single_app:handle")
    prepend_python_path(loaded)
    handler = load_handler(loaded, loaded.handlers[0])
    assert handler.function is sys.modules["single_app"].handle


# --- python-path -------------------------------------------------------------


def test_python_path_goes_first_in_order_once_each(tmp_path: Path) -> None:
    (tmp_path / "lib").mkdir()
    (tmp_path / "src").mkdir()
    loaded = parse_manifest(
        '[service]\npython-path = ["src", "lib", "."]\n[sockets.web]\nlisten = "127.0.0.1:0"\n',
        path=tmp_path / "service.toml",
    )
    sys.path.append(str(tmp_path / "lib"))  # already there, further down
    prepend_python_path(loaded)
    prepend_python_path(loaded)
    expected = [str(tmp_path / "src"), str(tmp_path / "lib"), str(tmp_path)]
    assert sys.path[:3] == expected
    assert all(sys.path.count(folder) == 1 for folder in expected)


def test_python_path_is_relative_to_the_manifest_not_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "handlers").mkdir()
    write_module(tmp_path / "handlers", "relative_app", "async def handle(stream):\n    pass\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded = parse_manifest(
        '[service]\npython-path = ["handlers"]\n[sockets.web]\nlisten = "127.0.0.1:0"\n'
        '[handlers.web]\nsocket = "web"\ncall = "relative_app:handle"\n',
        path=tmp_path / "service.toml",
    )
    [handler] = load_handlers(loaded)
    assert handler.function.__module__ == "relative_app"


# --- serve: an import failure stops the start, before READY ------------------


@pytest.mark.parametrize(
    ("module_text", "expected"),
    [
        (None, "cannot import 'app': No module named 'app'"),
        ("async def handle(stream)\n", "cannot import 'app': "),
        ("def handle(stream):\n    pass\n", "'app:handle' is a plain function, not a coroutine function"),
    ],
    ids=["missing", "syntax-error", "not-async"],
)
def test_serve_with_a_bad_handler_exits_2_with_one_line_and_no_ready(
    tmp_path: Path, module_text: str | None, expected: str
) -> None:
    if module_text is not None:
        (tmp_path / "app.py").write_text(module_text)
    service = tmp_path / "svc.toml"
    service.write_text(
        '[sockets.web]\nlisten = "127.0.0.1:0"\n[handlers.web]\nsocket = "web"\ncall = "app:handle"\n'
    )
    notify_path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(notify_path)
        env = {**os.environ, "NOTIFY_SOCKET": notify_path}
        result = subprocess.run(
            [sys.executable, "-m", "trio_activate", "--log-level", "warning", "serve", str(service)],
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
        )
        notify.setblocking(False)
        with pytest.raises(BlockingIOError):
            notify.recv(4096)  # nothing was sent: no READY=1, no STATUS=
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith("trio-activate: svc.toml: handlers.web.call: ")
    assert expected in line


def test_a_failed_start_leaves_no_socket_file_it_made(tmp_path: Path) -> None:
    """Rule: a self-activated serve whose handler cannot be imported removes the socket file it created,
    whatever remove-on-stop says (that setting is for a service that ran)."""
    service = tmp_path / "svc.toml"
    service.write_text(
        '[sockets.web]\nlisten = "./web.sock"\n[handlers.web]\nsocket = "web"\ncall = "app:handle"\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "trio_activate", "serve", str(service)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "cannot import 'app'" in result.stderr
    assert not (tmp_path / "web.sock").exists()


def test_a_file_that_is_not_ours_survives_a_failed_start(tmp_path: Path) -> None:
    """The removal is by identity: a socket file someone else put at the path afterwards stays."""
    (tmp_path / "app.py").write_text(
        "import os, socket\n"
        "os.unlink(os.path.join(os.path.dirname(__file__), 'web.sock'))\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "s.bind(os.path.join(os.path.dirname(__file__), 'web.sock'))\n"
        "raise RuntimeError('replaced the socket file, then failed')\n"
    )
    service = tmp_path / "svc.toml"
    service.write_text(
        '[sockets.web]\nlisten = "./web.sock"\n[handlers.web]\nsocket = "web"\ncall = "app:handle"\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "trio_activate", "serve", str(service)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "replaced the socket file, then failed" in result.stderr
    assert (tmp_path / "web.sock").exists()


@pytest.mark.parametrize("options", [["workers=1"], ["workers=2"], ["workers=1", "--supervise"]])
def test_serve_refuses_a_handler_that_takes_no_argument_at_start_in_one_line_and_exit_2(
    tmp_path: Path, options: list[str]
) -> None:
    """Before, ``async def handle():`` served, and every connection then failed with a TypeError."""
    (tmp_path / "app.py").write_text("async def handle():\n    pass\n")
    service = tmp_path / "svc.toml"
    service.write_text(
        f"[service]\n{options[0]}\n"
        '[sockets.web]\nlisten = "127.0.0.1:0"\n[handlers.web]\nsocket = "web"\ncall = "app:handle"\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "trio_activate", "serve", str(service), *options[1:]],
        capture_output=True,
        text=True,
        timeout=30,
        start_new_session=True,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    problem = "svc.toml: handlers.web.call: app:handle takes no argument; "
    problem += "a stream handler is called with the stream"
    assert result.stderr.count(problem) == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if problem in line or ": error: " in line]
    assert len(errors) == 1, result.stderr
    assert "retrying" not in result.stderr
