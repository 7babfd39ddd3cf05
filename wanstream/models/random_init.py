"""``wanstream init-random``: random-weight models written in exactly the released on-disk layout.

``ROOT/wan_models/<Wan folder>/`` gets ``config.json``, the DiT safetensors (sharded above 5 GB, with an
index, as the 14B release), ``Wan2.1_VAE.pth``, ``models_t5_umt5-xxl-enc-bf16.pth`` and the
``google/umt5-xxl`` tokenizer; ``ROOT/ckpts/taew2_1.pth`` a TAEHV decoder; and the generator of the backbone in its
released layout (``core/backbones.py``): StreamDiffusionV2 ``ROOT/ckpts/<causal folder>/model.pt`` with
``{"generator": {"model.<key>"}}``; Self-Forcing ``ROOT/checkpoints/self_forcing_dmd.pt`` with ``generator_ema``
(the weights) and ``generator`` (another output head, so loading the wrong key shows); LongLive
``ROOT/longlive_models/models/longlive_base.pt`` with ``generator`` and ``lora.pt`` with ``generator_lora`` (PEFT
keys over the Wan module names, rank 8 tiny / 256 otherwise, alpha = rank). Tests, the demo and benchmarks load only
through this path.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan

from wanstream.core.backbones import Backbone
from wanstream.core.backbones import backbone as get_backbone
from wanstream.core.config import CAUSAL_FOLDER, DIT_COMMON, DIT_PRESETS, VACE_FOLDER, VAE_PRESETS, WAN_FOLDER
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
    return random_tensors(wan_dit_shapes(config), seed, dtype)


def random_tensors(shapes: dict[str, tuple[int, ...]], seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Seeded random tensors of Wan-named shapes, by the rule of :func:`random_dit_weights` (also the VACE
    modules', ``models/vace.py``)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
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


# the 10 linear layers of a block that LongLive's LoRA adapts (PEFT names over the original Wan module names)
LORA_LAYERS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
               "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")


def random_peft_lora(config: dict, rank: int, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """LongLive's LoRA layout (``base_model.model.blocks.N.<layer>.lora_A/B.weight``) with seeded random weights;
    ``lora_B`` is not zero (unlike a fresh PEFT adapter), so the LoRA changes the output."""
    shapes = wan_dit_shapes(config)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(config["num_layers"]):
        for layer in LORA_LAYERS:
            d_out, d_in = shapes[f"blocks.{i}.{layer}.weight"]
            key = f"base_model.model.blocks.{i}.{layer}"
            out[key + ".lora_A.weight"] = (torch.randn(rank, d_in, generator=gen) * d_in ** -0.5).to(dtype)
            out[key + ".lora_B.weight"] = (torch.randn(d_out, rank, generator=gen) * 0.02 / rank ** 0.5).to(dtype)
    return out


def write_generator(root: Path, backbone: Backbone, preset: str, weights: dict[str, torch.Tensor], seed: int,
                    log=print) -> Path:
    """The generator of ``backbone`` in its released layout (see the module docstring); returns its path."""
    gen = {f"model.{k}": v for k, v in weights.items()}
    ck = backbone.checkpoint
    if ck.generator is None:                                   # StreamDiffusionV2
        path = root / "ckpts" / CAUSAL_FOLDER[preset] / "model.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"generator": gen}, path)
        return path
    path = root / ck.generator
    path.parent.mkdir(parents=True, exist_ok=True)
    if ck.generator_keys == ("generator_ema",):                # Self-Forcing: the trainer's generator and its EMA
        g = torch.Generator().manual_seed(seed + 5)
        other = {k: (v + 0.01 * torch.randn(v.shape, generator=g).to(v.dtype)) if k.startswith("model.head.head")
                 else v for k, v in gen.items()}               # shares every other tensor (saved once)
        torch.save({"generator": other, "generator_ema": gen}, path)
    else:
        torch.save({ck.generator_keys[0]: gen}, path)
    if ck.lora is not None:
        rank = 8 if preset == "tiny" else ck.lora_rank
        lora = random_peft_lora(diffusers_dit_config({**DIT_COMMON, **DIT_PRESETS[preset]}), rank, seed + 6,
                                next(iter(weights.values())).dtype)
        log(f"[init-random] {backbone.title} LoRA (rank {rank}) → {root / ck.lora}")
        torch.save({ck.lora_key: lora}, root / ck.lora)
    return path


def init_random(root: str | Path, preset: str = "tiny", seed: int = 0, full_text_encoder: bool | None = None,
                log=print, backbone: str | Backbone | None = None, vace: bool = False) -> Path:
    """Write a random model for ``preset`` (tiny | 1.3b | 14b) under ``root`` with the generator of ``backbone``
    (default StreamDiffusionV2) in its released layout; returns ``root``. ``vace``: also a Wan2.1-VACE model of the
    same size in its released layout, ``ROOT/wan_models/Wan2.1-VACE-*/`` (``models/vace.py``)."""
    if preset not in DIT_PRESETS:
        raise ValueError(f"preset must be one of {sorted(DIT_PRESETS)}, got {preset!r}")
    bb = get_backbone(backbone)
    root = Path(root)
    wan = root / "wan_models" / WAN_FOLDER[preset]
    wan.mkdir(parents=True, exist_ok=True)
    wan_cfg = {**DIT_COMMON, **DIT_PRESETS[preset]}
    (wan / "config.json").write_text(json.dumps(wan_cfg, indent=2))
    dtype = torch.float32 if preset == "tiny" else torch.bfloat16
    weights = random_dit_weights(diffusers_dit_config(wan_cfg), seed, dtype)
    save_dit_safetensors(wan, weights, SHARD_BYTES)
    path = write_generator(root, bb, preset, weights, seed, log)
    if vace:
        from wanstream.models.vace import write_vace_folder
        folder = write_vace_folder(root / "wan_models" / VACE_FOLDER[preset], wan_cfg, weights, seed + 7,
                                   shard_bytes=SHARD_BYTES)
        log(f"[init-random] VACE modules → {folder}")
    log(f"[init-random] DiT {preset} ({dtype}) → {wan} and {path} ({bb.title})")
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
    (root / "ckpts").mkdir(parents=True, exist_ok=True)
    write_random_taehv(root / "ckpts" / TAEHV_FILE, seed=seed + 3)
    log(f"[init-random] done: {root}")
    return root
