"""VACE (Wan2.1-VACE) beside a causal DiT: reference images and control video as per-row hints.

The weights are diffusers' modules: ``vace_patch_embedding`` (a Conv3d over 96 context channels) and
``WanVACETransformerBlock`` s (``proj_in`` on the first, ``proj_out`` on each), loaded strictly from the released
``Wan2.1-VACE-1.3B`` / ``-14B`` folder (only the ``vace_*`` tensors are read: the backbone's generator gives every
other weight). The forward is ours, the same loop as the DiT's blocks (``models/dit.py``):

* **context tokens are attended like latents.** VACE block ``j`` runs self-attention over the chunk's context tokens
  with a KV cache of its own; it is layer ``num_layers + j`` of the same :class:`~.kv_cache.KVCache` /
  ``KVPool`` (same rows, slots, ring, sinks, leases, moves, rebase), and its prompt K/V sits in the same slots.
* **hints per row.** Block ``i`` in ``layers`` adds ``hint_j · scale[b]``; a row with scale 0 gets nothing — its
  numbers equal the plain model's. Every row of a call runs the VACE blocks when any row is conditioned (rows are
  not gathered: the extra work is the VACE blocks' share of the DiT, 15 of 30 blocks for 1.3B).
* **the reference image is a fixed prefix of the stream** (:func:`encode_reference`): its latent frame runs once
  through the DiT and the VACE blocks at t = 0 (clean, as a context pass), its K/V of every layer is kept apart from
  the ring — never evicted, never refreshed, not a sink — and every later query of the stream attends it first.
  Its keys are stored rotated to RoPE position −1 (R images: −R … −1), just before the stream's first frame (the
  released model puts references right before the video). Under each backbone's RoPE rule it behaves as one more sink in
  front of sink 0: StreamDiffusionV2's wrap 50 → 5 leaves it (and the sinks) where they are; Self-Forcing /
  LongLive's rebase turns it back with the stream's other keys; LongLive's infinite mode (window slots 0 … 11)
  sees it at −1 every call.

Context channels (VACE's layout): ``[inactive 16 | reactive 16 | mask 64]``. A control frame is
``[vae(0) | vae(control) | 1]``; a frame with a reference but no control ``[vae(0) | vae(0) | 1]``; the reference
frame ``[vae(ref) | 0 | 0]`` (:func:`context_latents`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from diffusers.models.transformers.transformer_wan_vace import WanVACETransformerBlock
from safetensors import SafetensorError, safe_open
from torch import nn

from wanstream.core.errors import CheckpointError
from wanstream.models.checkpoints import (
    check_keys,
    diffusers_dit_config,
    read_wan_config,
    save_dit_safetensors,
    wan_block_shapes,
    wan_dit_shapes,
)

VACE_IN_CHANNELS = 96
MASK_CHANNELS = 64                    # the 8×8 pixel mask folded into channels
VACE_CONFIG = "config.json"
VACE_WEIGHTS = "diffusion_pytorch_model.safetensors"
SAFETENSORS_INDEX = VACE_WEIGHTS + ".index.json"


def released_layers(num_layers: int) -> list[int]:
    """The blocks that take hints in the released models: every 2nd of 1.3B's 30, every 5th of 14B's 40; a tiny
    test model (fewer than 8 blocks) every block."""
    step = {30: 2, 40: 5}.get(num_layers, 1)
    return list(range(0, num_layers, step))


@dataclass(frozen=True)
class VaceConfig:
    layers: tuple[int, ...]
    in_channels: int = VACE_IN_CHANNELS

    @classmethod
    def from_wan(cls, cfg: dict, source: str) -> "VaceConfig":
        if "vace_layers" not in cfg:
            raise CheckpointError(f"{source}: not a VACE model config (no 'vace_layers')")
        layers = tuple(int(i) for i in cfg["vace_layers"])
        if not layers or layers[0] != 0 or list(layers) != sorted(set(layers)):
            raise CheckpointError(f"{source}: vace_layers must start at 0 and increase, got {list(layers)}")
        return cls(layers, int(cfg.get("vace_in_dim", VACE_IN_CHANNELS)))


class VaceBranch(nn.Module):
    """diffusers' VACE modules for a DiT of ``dim`` / ``heads`` / ``ffn_dim``, hinting blocks ``config.layers``."""

    def __init__(self, config: VaceConfig, dim: int, heads: int, ffn_dim: int, patch_size=(1, 2, 2),
                 eps: float = 1e-6):
        super().__init__()
        self.config = config
        self.layers = config.layers
        self.vace_patch_embedding = nn.Conv3d(config.in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.vace_blocks = nn.ModuleList(
            WanVACETransformerBlock(dim, ffn_dim, heads, "rms_norm_across_heads", True, eps,
                                    apply_input_projection=j == 0, apply_output_projection=True)
            for j in range(len(config.layers)))


# ------------------------------------------------------------------------------------------------ layout
def wan_vace_shapes(dit_config: dict, vace: VaceConfig) -> dict[str, tuple[int, ...]]:
    """Every ``vace_*`` tensor of the released (original Wan) layout, with its shape."""
    d, f = dit_config["num_attention_heads"] * dit_config["attention_head_dim"], dit_config["ffn_dim"]
    pt, ph, pw = dit_config["patch_size"]
    s = {"vace_patch_embedding.weight": (d, vace.in_channels, pt, ph, pw), "vace_patch_embedding.bias": (d,)}
    for j in range(len(vace.layers)):
        b = f"vace_blocks.{j}."
        s.update(wan_block_shapes(b, d, f))
        if j == 0:
            s[b + "before_proj.weight"], s[b + "before_proj.bias"] = (d, d), (d,)
        s[b + "after_proj.weight"], s[b + "after_proj.bias"] = (d, d), (d,)
    return s


def vace_wan_config(wan_config: dict, layers: Sequence[int] | None = None) -> dict:
    """The released VACE folder's ``config.json`` for a base Wan config (``model_type: vace``)."""
    layers = released_layers(int(wan_config["num_layers"])) if layers is None else list(layers)
    return {**wan_config, "_class_name": "VaceWanModel", "model_type": "vace", "vace_layers": layers,
            "vace_in_dim": VACE_IN_CHANNELS}


def build_branch(dit_config: dict, vace: VaceConfig, wan_sd: dict[str, torch.Tensor], source: str, device="cpu",
                 dtype=torch.float32) -> VaceBranch:
    """Strictly load Wan-named ``vace_*`` tensors into a :class:`VaceBranch` (errors name the keys)."""
    check_keys({k: torch.Size(v) for k, v in wan_vace_shapes(dit_config, vace).items()}, wan_sd, source)
    d = dit_config["num_attention_heads"] * dit_config["attention_head_dim"]
    with torch.device("meta"):
        branch = VaceBranch(vace, d, dit_config["num_attention_heads"], dit_config["ffn_dim"],
                            tuple(dit_config["patch_size"]), dit_config.get("eps", 1e-6))
    sd = convert_wan_transformer_to_diffusers(dict(wan_sd))
    branch.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in sd.items()}, strict=True, assign=True)
    return branch.eval().requires_grad_(False)


def load_branch(folder: str | Path, dit_config: dict, wan_config: dict, device="cpu",
                dtype=torch.float32) -> VaceBranch:
    """The VACE modules of a released ``Wan2.1-VACE-*`` folder, for a backbone DiT of ``dit_config`` (diffusers
    kwargs) / ``wan_config`` (its Wan ``config.json``). The folder's DiT dimensions must be the backbone's; its
    base-model tensors are not read (the backbone's generator has them) but must be the base layout's, so a file
    of another model is refused. Only the ``vace_*`` tensors are read (per tensor, memory-mapped)."""
    folder = Path(folder)
    cfg = read_wan_config(folder)
    vace = VaceConfig.from_wan(cfg, str(folder / VACE_CONFIG))
    for field in ("dim", "num_heads", "ffn_dim", "num_layers"):
        if int(cfg.get(field, -1)) != int(wan_config[field]):
            raise CheckpointError(f"{folder}: a VACE model with {field} = {cfg.get(field)} cannot sit beside a DiT "
                                  f"with {field} = {wan_config[field]}")
    if vace.layers[-1] >= int(wan_config["num_layers"]):
        raise CheckpointError(f"{folder}: vace_layers {list(vace.layers)} exceed the DiT's {wan_config['num_layers']}"
                              f" blocks")
    index = folder / SAFETENSORS_INDEX
    if index.is_file():                                        # the 14B release is sharded
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index}: invalid shard index ({exc})") from exc
    else:
        files = [VACE_WEIGHTS]
    base = set(wan_dit_shapes(dit_config))
    sd: dict[str, torch.Tensor] = {}
    for name in files:
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path}: file not found (`wanstream download vace-1.3b` or `wanstream "
                                  f"init-random --vace`)")
        try:
            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
                other = sorted(k for k in keys if not k.startswith("vace_") and k not in base)
                if other:
                    raise CheckpointError(f"{path}: unexpected keys: {', '.join(other[:20])}")
                sd.update({k: f.get_tensor(k) for k in keys if k.startswith("vace_")})
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{path}: cannot read safetensors file ({exc})") from exc
    return build_branch(dit_config, vace, sd, str(folder), device, dtype)


def random_vace_weights(dit_config: dict, vace: VaceConfig, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Seeded random ``vace_*`` tensors in the released layout (``after_proj`` not zero, so hints show)."""
    from wanstream.models.random_init import random_tensors
    return random_tensors(wan_vace_shapes(dit_config, vace), seed, dtype)


def write_vace_folder(folder: Path, wan_config: dict, base_weights: dict[str, torch.Tensor], seed: int,
                      layers: Sequence[int] | None = None, shard_bytes: int = 5 * 1024 ** 3) -> Path:
    """A random VACE model in the released layout: ``config.json`` + one safetensors file with the base DiT's
    tensors and the ``vace_*`` ones (as the release ships the whole model)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = vace_wan_config(wan_config, layers)
    dtype = next(iter(base_weights.values())).dtype
    vace = random_vace_weights(diffusers_dit_config(cfg), VaceConfig.from_wan(cfg, str(folder)), seed, dtype)
    save_dit_safetensors(folder, {**base_weights, **vace}, shard_bytes)
    (folder / VACE_CONFIG).write_text(json.dumps(cfg, indent=2))
    return folder


# ------------------------------------------------------------------------------------------------ a call
@dataclass
class VaceCall:
    """The VACE side of one DiT call.

    - ``context``: ``[B, T, 96, H, W]`` context latents of the call's frames (rows without conditioning: any
      values, their ``scale`` is 0), or None (no hints: only a reference prefix).
    - ``scale``: ``[B]`` hint scale per row (0: none).
    - ``prefix_k/v``: per layer (main blocks and ``num_layers + j``), ``[B, P, heads, head_dim]``: each row's
      reference prefix (zero-padded to the longest); ``prefix_rows[b]`` (host): how many of its tokens row b attends
      (0: none, as without a prefix).
    """

    context: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    prefix_k: dict[int, torch.Tensor] | None = None
    prefix_v: dict[int, torch.Tensor] | None = None
    prefix_rows: list[int] | None = None

    def prefix(self, layer: int):
        if self.prefix_k is None or not any(self.prefix_rows):
            return None
        return self.prefix_k[layer], self.prefix_v[layer], self.prefix_rows


def hints(dit, branch: VaceBranch, x: torch.Tensor, call: VaceCall, e0, frames: int, cos, sin, prompt, cache,
          step, key_rope=None) -> list[torch.Tensor]:
    """The hint of every VACE block for hidden ``x [B, L, dim]`` (patch-embedded latents): the context is
    patch-embedded, added to ``x`` through ``proj_in``, and run through the VACE blocks in turn (each attending its
    own cache layer ``num_layers + j``); ``proj_out`` of each is its hint."""
    c, _ = dit.patchify(call.context, branch.vace_patch_embedding)
    out = []
    for j, blk in enumerate(branch.vace_blocks):
        if j == 0:
            c = blk.proj_in(c) + x
        layer = dit.num_layers + j
        c = dit.run_block(blk, layer, c, e0, frames, cos, sin, prompt, cache, step, key_rope, call.prefix(layer))
        out.append(blk.proj_out(c))
    return out


def context_latents(inactive: torch.Tensor, reactive: torch.Tensor, mask: float) -> torch.Tensor:
    """``[B, T, 96, H, W]`` VACE context from two latent videos ``[B, T, 16, H, W]`` and a constant mask value."""
    b, t, _, h, w = inactive.shape
    m = inactive.new_full((b, t, MASK_CHANNELS, h, w), mask)
    return torch.cat([inactive, reactive, m], dim=2)


@dataclass
class Reference:
    """A stream's reference prefix: K/V of its R reference frames per layer, ``[1, P, heads, head_dim]``, keys
    rotated to RoPE positions −R … −1 (see the module docstring)."""

    k: dict[int, torch.Tensor]
    v: dict[int, torch.Tensor]

    @property
    def tokens(self) -> int:
        return next(iter(self.k.values())).shape[1]

    def padded(self, tokens: int) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """K/V zero-padded to ``tokens`` (a call's rows share one prefix length; the padding is never attended)."""
        pad = tokens - self.tokens
        if pad == 0:
            return self.k, self.v
        return ({i: torch.nn.functional.pad(t, (0, 0, 0, 0, 0, pad)) for i, t in self.k.items()},
                {i: torch.nn.functional.pad(t, (0, 0, 0, 0, 0, pad)) for i, t in self.v.items()})


def encode_reference(dit, latent: torch.Tensor, prompt, scale: float = 1.0) -> Reference:
    """Run the clean latent frames of R reference images ``[1, R, 16, H, W]`` once through the DiT and the VACE
    blocks at t = 0 (context ``[vae(ref) | 0 | 0]``; they attend each other), into a scratch cache of R frames; its
    K/V become the prefix, keys turned back by R positions. ``prompt``: the stream's prompt K/V (a
    :class:`~.dit.PromptKV` with one prompt, every cache layer)."""
    from wanstream.core.config import CacheConfig
    from wanstream.models.kv_cache import CachePolicy, CacheStep
    from wanstream.models.rope import turn_back
    r = latent.shape[1]
    tpf = (latent.shape[-2] // dit.patch_size[1]) * (latent.shape[-1] // dit.patch_size[2])
    cache = dit.new_cache(1, r, tpf)
    step = CacheStep.build(CachePolicy(CacheConfig(capacity=r, sink=0, sink_threshold=-1)), [0], [0], r, tpf,
                           latent.device)
    ctx = torch.cat([latent, torch.zeros_like(latent),
                     latent.new_zeros(1, r, MASK_CHANNELS, *latent.shape[-2:])], dim=2)
    call = VaceCall(ctx, torch.full((1,), float(scale), device=latent.device))
    t = torch.zeros(1, r, device=latent.device)
    dit(latent, t, prompt, cache, step, vace=call)
    k = {i: turn_back(cache.k[i], r, dit.rope) for i in cache.k}
    return Reference(k, dict(cache.v))
