"""Shared test helpers: real peers (systemd's tools) and fd leak checks."""

from __future__ import annotations

import gc
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from trio_activate.system.fds import open_fds


def require_peer(binary: str) -> str:
    """Path of a real interop peer, e.g. systemd-socket-activate.

    Skipped with a reason when it is missing, except where the environment
    promises the peers (CI sets REQUIRE_INTEROP_PEERS=1 after
    installing them): there a missing peer is a failure, never a skip.
    """
    path = shutil.which(binary)
    if path is None:
        if os.environ.get("REQUIRE_INTEROP_PEERS"):
            pytest.fail(f"{binary} is required (REQUIRE_INTEROP_PEERS is set) but not on PATH")
        pytest.skip(f"{binary} not installed (Debian package: systemd)")
    return path


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
