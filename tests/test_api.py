"""The public names are the ones the README documents, and importing them stays light."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from pathlib import Path

import trio_activate

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_every_public_name_resolves() -> None:
    """Each name is the class or function of that name defined in the package, not a stand-in
    (a module, a placeholder, another module's object of the same name)."""
    for name in trio_activate.__all__:
        value = getattr(trio_activate, name)
        assert inspect.isclass(value) or inspect.isfunction(value), (name, value)
        assert value.__name__ == name, (name, value)
        assert value.__module__.startswith("trio_activate."), (name, value.__module__)
        assert getattr(sys.modules[value.__module__], name) is value, name
    assert set(trio_activate.__all__) <= set(dir(trio_activate))


def test_the_readme_uses_only_public_names() -> None:
    used = set(re.findall(r"trio_activate\.([a-z_]+)\(", README))
    assert used, "the README shows the embedded API"
    assert used <= set(trio_activate.__all__), used - set(trio_activate.__all__)


def test_errors_share_one_base() -> None:
    for name in ("AdoptionError", "CreationError", "HandlerError", "ListenEnvError", "ManifestError"):
        assert issubclass(getattr(trio_activate, name), trio_activate.ActivationError)


def test_import_is_light_and_trio_comes_only_with_the_trio_names() -> None:
    code = (
        "import sys, trio_activate\n"
        "light = 'trio' not in sys.modules\n"
        "trio_activate.self_activate\n"
        "still_light = 'trio' not in sys.modules\n"
        "trio_activate.activated\n"
        "print(light, still_light, 'trio' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30)
    assert out.stdout.split() == ["True", "True", "True"]
