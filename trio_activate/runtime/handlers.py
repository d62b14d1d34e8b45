"""Importing the manifest's handlers, before anything is served.

Layer 3 (it runs user code, which may import trio), but it does not itself
use trio.  Every handler is imported and checked before the service signals
readiness, so a typo fails the start, not the first connection: it must be a
coroutine function that takes what its kind passes, one positional argument
(``inspect.signature(...).bind`` with a placeholder), so an
``async def handle():`` is refused at start instead of raising a
``TypeError`` on every connection.  ``trio-activate check`` runs the same
checks (in a process of its own, see ``cli.handler_check``).

Error handling: every problem is one ``HandlerError`` naming the manifest,
the handler's ``call`` key and the reason, e.g.
``service.toml: handlers.echo.call: cannot import 'myapp.echo': No module named 'myapp'``.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

from ..errors import HandlerError
from ..model.manifest import HandlerKind, HandlerSpec, Manifest
from ..model.records import record
from ..system.fresh_imports import import_project_code_from_source

__all__ = ["LoadedHandler", "load_handler", "load_handlers", "prepend_python_path"]

HandlerFunction = Callable[..., Awaitable[Any]]


@record
class LoadedHandler:
    spec: HandlerSpec
    function: HandlerFunction


def prepend_python_path(manifest: Manifest) -> None:
    """Put the manifest's ``python-path`` folders first on ``sys.path``, in order, once each."""
    folders = [str((manifest.folder / entry).resolve()) for entry in manifest.service.python_path]
    for folder in reversed(folders):
        if folder in sys.path:
            sys.path.remove(folder)
        sys.path.insert(0, folder)


def load_handlers(manifest: Manifest, *, fresh_bytecode: bool = False) -> list[LoadedHandler]:
    """Import every handler of ``manifest``.

    ``fresh_bytecode`` (``dev``, and a worker a reload starts): import the
    project's own modules from source, never from a cached ``.pyc``, which
    can pass for a file rewritten within the same second at the same size
    (``fresh_imports``).  Installed libraries keep their caches.
    """
    prepend_python_path(manifest)
    if fresh_bytecode:
        import_project_code_from_source()
    return [load_handler(manifest, spec) for spec in manifest.handlers]


def load_handler(manifest: Manifest, spec: HandlerSpec) -> LoadedHandler:
    where = f"{manifest.source}: handlers.{spec.name}.call"
    try:
        target: Any = importlib.import_module(spec.module)
    except SyntaxError as exc:
        raise HandlerError(
            f"{where}: cannot import {spec.module!r}: {exc.msg} ({exc.filename}, line {exc.lineno})"
        ) from exc
    except ImportError as exc:
        raise HandlerError(
            f"{where}: cannot import {spec.module!r}: {exc}{_missing_python_path(manifest)}"
        ) from exc
    except Exception as exc:
        raise HandlerError(f"{where}: importing {spec.module!r} raised {_describe(exc)}") from exc
    for part in spec.function.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise HandlerError(f"{where}: {spec.module!r} has no attribute {spec.function!r}") from None
    if spec.kind is HandlerKind.ASGI:
        return LoadedHandler(spec, _asgi_application(manifest, spec, target))
    if not _is_async_callable(target):
        raise HandlerError(
            f"{where}: {spec.call!r} is {_kind_of(target)}, not a coroutine function (write `async def`)"
        )
    problem = _call_problem(target)
    if problem is not None:
        raise HandlerError(f"{where}: {spec.call} {problem}; {CALLED_WITH[spec.kind]}")
    return LoadedHandler(spec, target)


# What the runtime passes each kind of handler: one positional argument.
CALLED_WITH = {
    HandlerKind.STREAM: "a stream handler is called with the stream",
    HandlerKind.DATAGRAM: "a datagram handler is called with the Trio socket",
    HandlerKind.LISTENER: "a listener handler is called with the list of its trio.SocketListener",
}


def _call_problem(target: object) -> str | None:
    """Why ``target`` cannot be called with one positional argument, or None when it can.

    None too when Python cannot tell its signature (a C function): the call
    itself will say.
    """
    try:
        signature = inspect.signature(target)  # type: ignore[arg-type]  # checked callable above
    except (TypeError, ValueError):
        return None
    try:
        signature.bind(object())
    except TypeError as exc:
        positional = [
            p
            for p in signature.parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
        ]
        if not positional:
            return "takes no argument"
        return f"cannot be called with one argument ({exc})"
    return None


def _missing_python_path(manifest: Manifest) -> str:
    """``"; python-path folder 'lib' does not exist (/srv/app/lib)"`` for each entry missing, else ``""``."""
    missing = [
        f"; python-path folder {entry!r} does not exist ({(manifest.folder / entry).resolve()})"
        for entry in manifest.service.python_path
        if not (manifest.folder / entry).exists()
    ]
    return "".join(missing)


def _asgi_application(manifest: Manifest, spec: HandlerSpec, target: Any) -> HandlerFunction:
    """The ASGI application of an asgi handler (``factory``: what calling ``call`` returns).

    Checks that hypercorn, which serves it, is installed (imported here, not
    at module level: it is optional), and that each TLS file exists.
    """
    where = f"{manifest.source}: handlers.{spec.name}"
    try:
        import hypercorn.trio  # noqa: F401
    except ImportError:
        raise HandlerError(
            f"{where}.kind: 'asgi' is served by hypercorn, which is not installed: "
            "pip install 'trio-activate[asgi]'"
        ) from None
    if spec.http is not None:
        for key in ("certfile", "keyfile", "ca-certs"):
            name = getattr(spec.http, key.replace("-", "_"))
            if name is not None and not (manifest.folder / name).is_file():
                raise HandlerError(f"{where}.http.{key}: {name}: no such file")
    if spec.factory:
        if not callable(target):
            raise HandlerError(f"{where}.call: {spec.call!r} is {_kind_of(target)}, not a factory function")
        try:
            target = target()
        except Exception as exc:
            raise HandlerError(f"{where}.call: the factory {spec.call!r} raised {_describe(exc)}") from exc
        if inspect.isawaitable(target):
            close = getattr(target, "close", None)
            if close is not None:
                close()
            raise HandlerError(
                f"{where}.call: the factory {spec.call!r} is async; it must return the application"
            )
    if not _is_async_callable(target):
        made = "returned " if spec.factory else ""
        hint = "; if it builds the application, set factory = true" if not spec.factory else ""
        raise HandlerError(
            f"{where}.call: {spec.call!r} {made or 'is '}{_kind_of(target)}, not an ASGI application{hint}"
        )
    function: HandlerFunction = target
    return function


def _is_async_callable(target: object) -> bool:
    if inspect.iscoroutinefunction(target):
        return True
    # An instance whose __call__ is ``async def`` is awaitable-returning too.
    call = getattr(type(target), "__call__", None)  # noqa: B004 - the type's, not the instance's
    return call is not None and not inspect.isclass(target) and inspect.iscoroutinefunction(call)


def _kind_of(target: object) -> str:
    if inspect.isclass(target):
        return "a class"
    if inspect.isasyncgenfunction(target):
        return "an async generator function"
    if callable(target):
        return "a plain function" if inspect.isfunction(target) else "a callable"
    name = type(target).__name__
    return f"{'an' if name[0].lower() in 'aeiou' else 'a'} {name}"


def _describe(exc: BaseException) -> str:
    """``ValueError: boom (at myapp/echo.py:3)``: the exception and where user code raised it."""
    frames = traceback.extract_tb(exc.__traceback__)
    user = [f for f in frames if "importlib" not in f.filename]
    where = f" (at {user[-1].filename}:{user[-1].lineno})" if user else ""
    return f"{type(exc).__name__}: {exc}{where}"
