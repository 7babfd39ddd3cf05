"""Checkpoint layouts: released key names, strict loading, clear errors, parameter counts."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKLWan
from kit import kit_dir

from wanstream.core.config import DIT_COMMON, DIT_PRESETS
from wanstream.core.errors import CheckpointError
from wanstream.models.checkpoints import (
    build_transformer,
    build_vae,
    causal_state_dict,
    diffusers_dit_config,
    read_dit_safetensors,
    read_torch_file,
    save_dit_safetensors,
    vae_state_dict_original,
    wan_dit_shapes,
)
from wanstream.models.random_init import random_dit_weights


def _config(preset: str) -> dict:
    return diffusers_dit_config({**DIT_COMMON, **DIT_PRESETS[preset]})


def test_parameter_counts_of_presets():
    counts = {p: sum(int(torch.Size(s).numel()) for s in wan_dit_shapes(_config(p)).values()) for p in DIT_PRESETS}
    assert counts["1.3b"] == 1_418_996_800
    assert counts["14b"] == 14_288_491_584
    assert counts["tiny"] == 3_127_872
    assert len(wan_dit_shapes(_config("1.3b"))) == 825
    assert len(wan_dit_shapes(_config("14b"))) == 1095
    with torch.device("meta"):
        vae = AutoencoderKLWan(base_dim=96, z_dim=16)
    assert round(sum(p.numel() for p in vae.parameters()) / 1e6, 1) == 126.9
    assert len(vae.state_dict()) == 194


def test_released_dit_keys_and_shapes_match_the_kit():
    """What we write for model.pt has exactly the released names and shapes (the kit is the official file)."""
    kit = torch.load(kit_dir() / "model.pt", weights_only=True)["generator"]
    ours = {f"model.{k}": v for k, v in random_dit_weights(_config("tiny"), 0, torch.float32).items()}
    assert set(ours) == set(kit)
    assert all(ours[k].shape == kit[k].shape for k in kit)
    assert "model.blocks.0.self_attn.q.weight" in ours


def test_kit_dit_loads_strictly():
    sd = causal_state_dict(kit_dir() / "model.pt")
    cfg = diffusers_dit_config(json.loads((kit_dir() / "tiny_config.json").read_text())["dit"])
    model = build_transformer(cfg, sd, "model.pt")
    assert not any(p.is_meta for p in model.parameters())
    assert not any(b.is_meta for b in model.buffers())


@pytest.mark.parametrize("damage,culprit", [
    (lambda sd: sd.pop("blocks.1.ffn.2.bias"), "blocks.1.ffn.2.bias"),
    (lambda sd: sd.__setitem__("blocks.0.extra.weight", torch.zeros(1)), "blocks.0.extra.weight"),
    (lambda sd: sd.__setitem__("head.head.weight", torch.zeros(3, 3)), "head.head.weight"),
])
def test_dit_strictness_names_the_culprit(damage, culprit):
    sd = causal_state_dict(kit_dir() / "model.pt")
    damage(sd)
    cfg = diffusers_dit_config(json.loads((kit_dir() / "tiny_config.json").read_text())["dit"])
    with pytest.raises(CheckpointError, match=culprit.replace(".", r"\.")):
        build_transformer(cfg, sd, "model.pt")


def test_truncated_files_name_the_file(tmp_path):
    data = (kit_dir() / "model.pt").read_bytes()
    bad = tmp_path / "model.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.pt"):
        causal_state_dict(bad)
    weights = random_dit_weights(_config("tiny"), 0, torch.float32)
    save_dit_safetensors(tmp_path, weights, max_shard_bytes=1 << 40)
    st = tmp_path / "diffusion_pytorch_model.safetensors"
    st.write_bytes(st.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors"):
        read_dit_safetensors(tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        read_torch_file(tmp_path / "missing.pth")


def test_sharded_safetensors_round_trip(tmp_path):
    weights = random_dit_weights(_config("tiny"), 0, torch.float32)
    save_dit_safetensors(tmp_path, weights, max_shard_bytes=4 << 20)
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("diffusion_pytorch_model-*-of-*.safetensors"))) > 1
    back = read_dit_safetensors(tmp_path)
    assert set(back) == set(weights) and all(torch.equal(back[k], weights[k]) for k in weights)


def test_kit_vae_loads_strictly_and_round_trips_key_names():
    sd = read_torch_file(kit_dir() / "Wan2.1_VAE_tiny.pth")
    vae = build_vae(sd, "Wan2.1_VAE_tiny.pth")
    assert vae.config.base_dim == 8  # the width comes from the tensors
    back = vae_state_dict_original(vae)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_vae_strictness_names_the_culprit():
    sd = read_torch_file(kit_dir() / "Wan2.1_VAE_tiny.pth")
    sd.pop("decoder.upsamples.4.shortcut.weight")
    with pytest.raises(CheckpointError, match=r"decoder\.upsamples\.4\.shortcut\.weight"):
        build_vae(sd, "Wan2.1_VAE_tiny.pth")
    sd = read_torch_file(kit_dir() / "Wan2.1_VAE_tiny.pth")
    sd["encoder.head.2.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"encoder\.head\.2\.weight"):
        build_vae(sd, "Wan2.1_VAE_tiny.pth")
