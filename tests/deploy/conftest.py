"""Fixtures of the deployment tests: the server tests' helpers (tests/server) and their clips."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "server"))

import pytest  # noqa: E402
from server_helpers import H, W  # noqa: E402


@pytest.fixture(scope="session")
def clip():
    from wanstream.io.video import make_motion_clip
    return make_motion_clip(48, W, H, seed=1)
