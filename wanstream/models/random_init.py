"""``wanstream init-random``: random-weight models written in exactly the released on-disk layout.

``ROOT/wan_models/<Wan folder>/`` gets ``config.json``, the DiT safetensors (sharded above 5 GB, with an
index, as the 14B release), ``Wan2.1_VAE.pth``, ``models_t5_umt5-xxl-enc-bf16.pth`` and the
``google/umt5-xxl`` tokenizer; ``ROOT/ckpts/<causal folder>/model.pt`` holds ``{"generator": {"model.<key>"}}``;
``ROOT/ckpts/taew2_1.pth`` a TAEHV decoder. Tests, the demo and benchmarks load only through this path.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan

from wanstream.core.config import CAUSAL_FOLDER, DIT_COMMON, DIT_PRESETS, VAE_PRESETS, WAN_FOLDER
from wanstream.models.checkpoints import (
    T5_FILE,
    TAEHV_FILE,
    VAE_FILE,
    diffusers_dit_config,
    save_dit_safetensors,
    vae_state_dict_original,
    wan_dit_shapes,
)

SHARD_BYTES = 5 * 1024 ** 3


def random_dit_weights(config: dict, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Seeded random Wan-named DiT tensors: linear weights N(0, 0.02²)-ish, zero biases, unit norm scales,
    modulation tables ~ N(0, 1/dim) as in the architecture's own init."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in wan_dit_shapes(config).items():
        if key.endswith("modulation"):
            t = torch.randn(shape, generator=gen) / shape[-1] ** 0.5
        elif key.endswith("norm_q.weight") or key.endswith("norm_k.weight") or key.endswith("norm3.weight"):
            t = torch.ones(shape)
        elif key.endswith(".bias"):
            t = torch.zeros(shape)
        else:
            fan_in = int(torch.tensor(shape[1:]).prod()) if len(shape) > 1 else shape[0]
            t = torch.randn(shape, generator=gen) * min(0.02, fan_in ** -0.5)
        out[key] = t.to(dtype)
    return out


def init_random(root: str | Path, preset: str = "tiny", seed: int = 0, full_text_encoder: bool | None = None,
                log=print) -> Path:
    """Write a random model for ``preset`` (tiny | 1.3b | 14b) under ``root``; returns ``root``."""
    if preset not in DIT_PRESETS:
        raise ValueError(f"preset must be one of {sorted(DIT_PRESETS)}, got {preset!r}")
    root = Path(root)
    wan = root / "wan_models" / WAN_FOLDER[preset]
    causal = root / "ckpts" / CAUSAL_FOLDER[preset]
    wan.mkdir(parents=True, exist_ok=True)
    causal.mkdir(parents=True, exist_ok=True)
    wan_cfg = {**DIT_COMMON, **DIT_PRESETS[preset]}
    (wan / "config.json").write_text(json.dumps(wan_cfg, indent=2))
    dtype = torch.float32 if preset == "tiny" else torch.bfloat16
    log(f"[init-random] DiT {preset} ({dtype}) → {wan} and {causal / 'model.pt'}")
    weights = random_dit_weights(diffusers_dit_config(wan_cfg), seed, dtype)
    save_dit_safetensors(wan, weights, SHARD_BYTES)
    torch.save({"generator": {f"model.{k}": v for k, v in weights.items()}}, causal / "model.pt")
    del weights
    log(f"[init-random] VAE (base width {VAE_PRESETS[preset]}) → {wan / VAE_FILE}")
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLWan(base_dim=VAE_PRESETS[preset], z_dim=16)
    torch.save({k: v.to(dtype) for k, v in vae_state_dict_original(vae).items()}, wan / VAE_FILE)
    full = preset != "tiny" if full_text_encoder is None else full_text_encoder
    log(f"[init-random] text encoder ({'umt5-xxl' if full else 'tiny'}) → {wan / T5_FILE}")
    from wanstream.models.text_encoder import write_random_text_encoder
    write_random_text_encoder(wan, "umt5-xxl" if full else "tiny", seed=seed + 2)
    from wanstream.models.taehv import write_random_taehv
    write_random_taehv(root / "ckpts" / TAEHV_FILE, seed=seed + 3)
    log(f"[init-random] done: {root}")
    return root
