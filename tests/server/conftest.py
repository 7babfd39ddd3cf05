"""Fixtures of the server tests: the tiny model (tests/conftest.py) at 64x64, in-process servers on 127.0.0.1."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from server_helpers import H, W  # noqa: E402


@pytest.fixture(scope="session")
def clip():
    from wanstream.io.video import make_motion_clip
    return make_motion_clip(48, W, H, seed=1)


@pytest.fixture(scope="session")
def clip_b():
    from wanstream.io.video import make_motion_clip
    return make_motion_clip(48, W, H, seed=2)

