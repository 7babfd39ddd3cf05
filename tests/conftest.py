"""Shared fixtures: the conformance kit, tiny random models written through the real layout."""

from __future__ import annotations

import json
import os
from pathlib import Path

# torch's OpenMP threads spin-wait by default: on a shared, loaded CI machine that makes small ops many times
# slower (measured: one RAFT call 6.2 s → 0.13 s at load average 6). Set before torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402
from kit import kit_dir, load_kit

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def kit_dit():
    """The conformance tiny DiT (model.pt) loaded through our strict loader."""
    from wanstream.models.checkpoints import build_transformer, causal_state_dict, diffusers_dit_config
    from wanstream.models.dit import CausalWanDiT
    cfg = json.loads((kit_dir() / "tiny_config.json").read_text())["dit"]
    path = kit_dir() / "model.pt"
    return CausalWanDiT(build_transformer(diffusers_dit_config(cfg), causal_state_dict(path), str(path)))


@pytest.fixture(scope="session")
def kit_context() -> torch.Tensor:
    return load_kit("text_context.pt")["context"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random model written by `init-random` in the released layout."""
    from wanstream.models.random_init import init_random
    root = tmp_path_factory.mktemp("tiny_model")
    init_random(root, "tiny", seed=0, log=lambda *_: None)
    return root


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from wanstream.models.loader import load_model
    return load_model(tiny_model_dir, device="cpu")


@pytest.fixture(scope="session")
def clip_path(tmp_path_factory) -> Path:
    """A 14-frame 80x48 motion clip at 12.5 FPS."""
    from wanstream.io.video import write_motion_clip
    path = tmp_path_factory.mktemp("clip") / "in.mp4"
    write_motion_clip(path, 14, 80, 48, fps=12.5)
    return path


@pytest.fixture(scope="session")
def backbone_models(tmp_path_factory):
    """Tiny random Self-Forcing and LongLive models written by `init-random --backbone` and loaded (no text encoder),
    by backbone name."""
    from wanstream.models.loader import load_model
    from wanstream.models.random_init import init_random
    out = {}
    for name in ("self-forcing", "longlive"):
        root = tmp_path_factory.mktemp(name)
        init_random(root, "tiny", seed=0, log=lambda *_: None, backbone=name)
        out[name] = load_model(root, device="cpu", text_encoder=False)
    return out
