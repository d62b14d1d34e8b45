"""The README's commands are the ones CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parent.parent


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```sh\n(.+?)\n```", text)


def test_readme_opens_with_two_commands_install_and_run_then_install_and_test() -> None:
    run, test = readme_commands()[:2]
    assert run.startswith("pip install . && trio-activate ")
    assert test == "pip install '.[test]' && python -m pytest"


def test_ci_runs_the_readme_test_command_unchanged() -> None:
    test = readme_commands()[1]
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test in ci_lines


def test_the_run_command_names_an_example_that_exists() -> None:
    run = readme_commands()[0]
    (manifest,) = re.findall(r"config/\S+\.toml", run)
    assert (ROOT / manifest).is_file()
