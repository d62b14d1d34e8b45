"""Fixtures shared by the test modules; plain helpers live in the `helpers` package."""

from __future__ import annotations

import gc
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import Reaper, subreaper
from helpers.systemd import booted
from helpers.systemd_machine import SystemdMachine

from trio_activate.system.fds import open_fds


@pytest.fixture
def no_fd_leaks() -> Iterator[None]:
    """The test leaves the process's fd table as it found it (after a GC: a dropped socket closes then)."""
    before = open_fds()
    yield
    gc.collect()
    assert open_fds() == before


@pytest.fixture
def records(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> pytest.LogCaptureFixture:
    """The package's log records, whatever an earlier in-process CLI run did to its logger."""
    logger = logging.getLogger("trio_activate")
    monkeypatch.setattr(logger, "propagate", True)
    monkeypatch.setattr(logger, "handlers", [])
    caplog.set_level(logging.INFO, logger="trio_activate")
    return caplog


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A folder with a short path: a unix socket path must fit in 108 bytes, tmp_path may not."""
    with tempfile.TemporaryDirectory(prefix="ta-", dir="/tmp") as name:
        yield Path(name)


@pytest.fixture
def reaper() -> Iterator[Reaper]:
    """The test process is a child subreaper while the test runs: a process orphaned by a service
    that exited becomes the test's child, where it can be found and reaped (`Reaper.wait_exit`)."""
    with subreaper() as watcher:
        yield watcher


@pytest.fixture
def machine(tmp_path: Path) -> Iterator[SystemdMachine]:
    """A systemd manager booted for the test: Debian 12's own, 252."""
    yield from booted(252, tmp_path / "machine")


@pytest.fixture(params=[252, 254], ids=["systemd-252", "systemd-254"])
def each_machine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SystemdMachine]:
    """252 (Type=notify) and 254 (Type=notify-reload, from bookworm-backports): the reload paths."""
    yield from booted(request.param, tmp_path / "machine")
