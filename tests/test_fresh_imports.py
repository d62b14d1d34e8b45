"""fresh_imports: the project's code compiles from source; installed libraries keep their caches.

Each rule runs in a fresh interpreter: the hook changes that process's imports for good.
"""

from __future__ import annotations

import os
import py_compile
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

from trio_activate.system.fresh_imports import installation_folders, is_project_folder

TIMEOUT = 30


def test_project_folders_are_the_folders_outside_the_installation(tmp_path: Path) -> None:
    """Rule: a sys.path entry is the project's code when it is a folder outside the
    interpreter's installation (sys.prefix and friends); the standard library and
    site-packages are not, nor is a path that is no folder."""
    assert is_project_folder(str(tmp_path), installation_folders())
    assert not is_project_folder(sysconfig.get_paths()["stdlib"], installation_folders())
    assert not is_project_folder(sysconfig.get_paths()["purelib"], installation_folders())
    assert not is_project_folder(str(tmp_path / "missing"), installation_folders())
    (tmp_path / "file.zip").write_bytes(b"")
    assert not is_project_folder(str(tmp_path / "file.zip"), installation_folders())


def run_python(code: str, cwd: Path) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=True,
    )
    return result.stdout.split()


def stale_pyc_trap(folder: Path) -> Path:
    """app.py at v2 with a valid-looking .pyc of v1: same size, same mtime."""
    app = folder / "app.py"
    app.write_text("VERSION = 'v1'\n")
    py_compile.compile(str(app), doraise=True)
    before = app.stat()
    app.write_text("VERSION = 'v2'\n")
    os.utime(app, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert app.stat().st_size == before.st_size
    return app


def test_without_the_hook_the_trap_serves_the_stale_code(tmp_path: Path) -> None:
    """The trap the other rules rely on is real: a plain import runs v1 from the .pyc."""
    stale_pyc_trap(tmp_path)
    assert run_python("import app; print(app.VERSION)", tmp_path) == ["v1"]


def test_project_modules_compile_from_source_and_write_no_pyc(tmp_path: Path) -> None:
    """Rule: after the hook, a module in a project folder is compiled from its source
    (v2, where the .pyc says v1), by SourceOnlyLoader, and its .pyc is left as it was."""
    app = stale_pyc_trap(tmp_path)
    pyc = next((tmp_path / "__pycache__").glob("app.*.pyc"))
    cached = pyc.read_bytes()
    out = run_python(
        """
        import sys
        sys.path.insert(0, ".")
        from trio_activate.system.fresh_imports import import_project_code_from_source
        import_project_code_from_source()
        import app
        print(app.VERSION, type(app.__spec__.loader).__name__)
        """,
        tmp_path,
    )
    assert out == ["v2", "SourceOnlyLoader"]
    assert pyc.read_bytes() == cached
    assert app.read_text() == "VERSION = 'v2'\n"


def test_installed_libraries_keep_their_bytecode_cache(tmp_path: Path) -> None:
    """Rule: a module from the installation imported after the hook (here the standard
    library's `colorsys` and the installed `tomli_w`) loads with the standard loader."""
    out = run_python(
        """
        from trio_activate.system.fresh_imports import import_project_code_from_source
        import_project_code_from_source()
        import colorsys, tomli_w
        print(type(colorsys.__spec__.loader).__name__, type(tomli_w.__spec__.loader).__name__)
        """,
        tmp_path,
    )
    assert out == ["SourceFileLoader", "SourceFileLoader"]


def test_installing_the_hook_twice_installs_it_once(tmp_path: Path) -> None:
    """Rule: idempotent; load_handlers may run more than once in one process."""
    out = run_python(
        """
        import sys
        from trio_activate.system.fresh_imports import import_project_code_from_source
        before = len(sys.path_hooks)
        import_project_code_from_source()
        import_project_code_from_source()
        print(len(sys.path_hooks) - before)
        """,
        tmp_path,
    )
    assert out == ["1"]
