"""Shared test helpers: real peers (systemd's tools) and fd leak checks."""

from __future__ import annotations

import os
import shutil

import pytest


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
