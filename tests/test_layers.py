"""The layers' import direction, and no import circle, checked by import-linter (contracts in pyproject.toml).

Each layer imports only the layers below it (cli, processes, runtime,
system, model, errors); nothing below the runtime imports trio; no two
modules of the package import each other, directly or through others.
The second test shows the check is live: a copy of the package with one
upward import, or one circle inside a layer, breaks exactly that contract.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.lint

ROOT = Path(__file__).parent.parent
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"

LAYERS = "Each layer imports only the layers below it"
NO_TRIO = "Below the runtime, nothing imports trio"
NO_CIRCLE = "No import circle"
NO_HYPERCORN = "Hypercorn (optional, for asgi handlers) is imported in the runtime layer only"


def lint_imports(cwd: Path, pythonpath: Path | None = None) -> tuple[int, dict[str, str]]:
    """lint-imports' exit status, and each contract's verdict (KEPT or BROKEN) by the start of its name."""
    env = dict(os.environ, COLUMNS="300")  # one line per contract: its name, then its verdict
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    done = subprocess.run(
        [str(LINT_IMPORTS), str(cwd / "pyproject.toml"), "--no-cache"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    verdicts = {}
    for name in (LAYERS, NO_TRIO, NO_CIRCLE, NO_HYPERCORN):
        found = re.search(rf"^{re.escape(name)}.*\b(KEPT|BROKEN)$", done.stdout, re.M)
        assert found, f"{name!r} not in lint-imports' output:\n{done.stdout}{done.stderr}"
        verdicts[name] = found[1]
    return done.returncode, verdicts


def test_the_package_keeps_its_import_contracts() -> None:
    status, verdicts = lint_imports(ROOT)
    assert verdicts == {LAYERS: "KEPT", NO_TRIO: "KEPT", NO_CIRCLE: "KEPT", NO_HYPERCORN: "KEPT"}
    assert status == 0


@pytest.mark.parametrize(
    ("module", "added", "broken"),
    [
        # The pure layer calling up into the command line (and, through it, trio).
        ("model/address.py", "from ..cli import commands", {LAYERS, NO_TRIO, NO_CIRCLE}),
        # Two modules of the syscall layer importing each other (passed imports fds).
        ("system/fds.py", "from . import passed", {NO_CIRCLE}),
        # The syscall layer importing trio, which costs the CLI's path 150 ms.
        ("system/create.py", "import trio", {NO_TRIO}),
        # The optional ASGI server imported outside the runtime layer.
        ("processes/spawn.py", "import hypercorn", {NO_HYPERCORN}),
    ],
)
def test_a_broken_contract_is_caught(tmp_path: Path, module: str, added: str, broken: set[str]) -> None:
    shutil.copytree(
        ROOT / "trio_activate", tmp_path / "trio_activate", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with (tmp_path / "trio_activate" / module).open("a") as f:
        f.write(f"\n{added}  # the violation under test\n")
    status, verdicts = lint_imports(tmp_path, pythonpath=tmp_path)
    assert {name for name, verdict in verdicts.items() if verdict == "BROKEN"} == broken
    assert status != 0
