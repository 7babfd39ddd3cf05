"""The conformance kit (golden traces recorded from the official implementation)."""

from __future__ import annotations

from pathlib import Path

import torch

HERE = Path(__file__).parent
SHARED_KIT = HERE.parent.parent / "shared" / "conformance"
VENDORED_KIT = HERE / "data" / "conformance"


def kit_dir() -> Path:
    """The conformance kit: ../shared/conformance when present, else the vendored copy."""
    return SHARED_KIT if (SHARED_KIT / "README.md").is_file() else VENDORED_KIT


def load_kit(name: str):
    return torch.load(kit_dir() / name, weights_only=False)
