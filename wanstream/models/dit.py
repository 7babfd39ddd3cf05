"""Causal Wan 2.1 DiT with a self-attention KV cache and block-range execution.

diffusers' ``WanTransformer3DModel`` is the weight container and the source of every submodule (patch
embedding, time/text embedders, blocks, head); the forward loop here is our own: it embeds the integer
timestep of every latent frame (float64 sinusoid), applies per-frame modulation, rotates q/k with per-row
temporal RoPE offsets, attends over the KV cache, and can run any block range ``[a, b)`` with or without
the patch embedding and the head, so one GPU and a pipeline of GPUs run the same code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from wanstream.models.attention import cross_attention, prompt_kv, self_attention
from wanstream.models.kv_cache import CacheStep, KVCache
from wanstream.models.rope import RopeTables
from wanstream.models.vace import VaceBranch, VaceCall, hints


@dataclass
class PromptKV:
    """Cross-attention K/V of one (or a batch of) prompt embeddings for a set of blocks."""

    k: dict[int, torch.Tensor]
    v: dict[int, torch.Tensor]


def timestep_sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Wan's sinusoidal embedding of integer timesteps, computed in float64: ``[cos | sin]``."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    args = t.to(torch.float64)[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class CausalWanDiT(nn.Module):
    """Frame-causal streaming forward over a ``WanTransformer3DModel``'s weights."""

    def __init__(self, transformer: nn.Module, max_positions: int = 1024):
        super().__init__()
        self.transformer = transformer
        cfg = transformer.config
        self.num_layers = cfg.num_layers
        self.heads = cfg.num_attention_heads
        self.head_dim = cfg.attention_head_dim
        self.dim = self.heads * self.head_dim
        self.freq_dim = cfg.freq_dim
        self.patch_size = tuple(cfg.patch_size)
        self.out_channels = cfg.out_channels
        self.text_len = 512
        self.rope = RopeTables(self.head_dim, max_positions, device=self._device())
        self.lora = None        # a models.lora.LoRASet while LoRAs are attached (per-row strengths)
        self.vace: VaceBranch | None = None     # VACE modules beside the backbone (models/vace.py), when loaded

    @property
    def cache_layers(self) -> range:
        """The layers with a KV cache and prompt K/V: the DiT's blocks, then the VACE blocks (``num_layers + j``)."""
        return range(self.num_layers + (len(self.vace.vace_blocks) if self.vace is not None else 0))

    def attention_of(self, layer: int):
        """The block of a cache layer (a DiT block, or VACE block ``layer - num_layers``)."""
        if layer < self.num_layers:
            return self.transformer.blocks[layer]
        return self.vace.vace_blocks[layer - self.num_layers]

    def _anchor(self) -> torch.Tensor:
        """A weight every holder of the DiT has (a pipeline stage may hold no patch embedding or head)."""
        return self.transformer.condition_embedder.time_embedder.linear_1.weight

    def _device(self) -> torch.device:
        return self._anchor().device

    @property
    def dtype(self) -> torch.dtype:
        return self._anchor().dtype

    def _apply(self, fn, recurse=True):  # keep the RoPE tables beside the weights on .to(device)
        out = super()._apply(fn, recurse)
        self.rope.to(self._device())
        return out

    # ----------------------------------------------------------------- prompt
    def embed_prompt(self, context: torch.Tensor, layers: range | None = None) -> PromptKV:
        """Text embedding MLP + per-block cross-attention K/V, computed once per prompt.

        ``context [P, L <= text_len, text_dim]`` is zero-padded to ``text_len`` rows first (all rows are
        attended, as released).
        """
        if context.ndim == 2:
            context = context[None]
        if context.shape[1] > self.text_len:
            raise ValueError(f"prompt embedding has {context.shape[1]} rows, at most {self.text_len} allowed")
        pad = self.text_len - context.shape[1]
        context = torch.nn.functional.pad(context, (0, 0, 0, pad)).to(self._device(), self.dtype)
        text = self.transformer.condition_embedder.text_embedder(context)
        layers = self.cache_layers if layers is None else layers
        k, v = {}, {}
        for i in layers:
            k[i], v[i] = prompt_kv(self.attention_of(i).attn2, text)
        return PromptKV(k, v)

    # ---------------------------------------------------------------- forward
    def new_cache(self, rows: int, capacity: int, tokens_per_frame: int, layers: range | None = None) -> KVCache:
        layers = self.cache_layers if layers is None else layers
        return KVCache(layers, rows, capacity, tokens_per_frame, self.heads, self.head_dim, self.dtype,
                       self._device())

    def time_embedding(self, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Integer timesteps ``[B, T]`` → ``e [B, T, dim]`` and block modulation ``e0 [B, T, 6, dim]``."""
        ce = self.transformer.condition_embedder
        weight_dtype = ce.time_embedder.linear_1.weight.dtype
        e = ce.time_embedder(timestep_sinusoid(timesteps, self.freq_dim).to(weight_dtype))
        e0 = ce.time_proj(ce.act_fn(e)).unflatten(-1, (6, -1))
        return e, e0

    def patchify(self, latents: torch.Tensor, conv: nn.Conv3d | None = None
                 ) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Pipeline-layout latents ``[B, T, C, H, W]`` → tokens ``[B, T*h*w, dim]`` and the grid ``(T, h, w)``.

        The patch embedding (a Conv3d with stride = kernel = patch) is applied as the matmul it is, on the
        patches: a row's tokens then do not depend on which other rows share the call (the CPU's conv kernels
        round differently for different batch sizes), so a stream batched with others equals itself alone."""
        conv = self.transformer.patch_embedding if conv is None else conv       # VACE: its own embedding
        pt, ph, pw = self.patch_size
        b, t, c, hh, ww = latents.shape
        f, h, w = t // pt, hh // ph, ww // pw
        x = latents.to(self.dtype).reshape(b, f, pt, c, h, ph, w, pw)
        x = x.permute(0, 1, 4, 6, 3, 2, 5, 7).reshape(b, f * h * w, c * pt * ph * pw)     # (c, pt, ph, pw) order
        x = torch.nn.functional.linear(x, conv.weight.reshape(conv.weight.shape[0], -1), conv.bias)
        return x, (f, h, w)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """Head output ``[B, L, C*pt*ph*pw]`` → flow in pipeline layout ``[B, T, C, H, W]``."""
        b = x.shape[0]
        f, h, w = grid
        pt, ph, pw = self.patch_size
        x = x.reshape(b, f, h, w, pt, ph, pw, self.out_channels)
        x = x.permute(0, 1, 4, 7, 2, 5, 3, 6)  # b, f, pt, c, h, ph, w, pw
        return x.reshape(b, f * pt, self.out_channels, h * ph, w * pw)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, prompt: PromptKV, cache: KVCache,
                step: CacheStep, blocks: tuple[int, int] | None = None,
                grid: tuple[int, int, int] | None = None, vace: VaceCall | None = None) -> torch.Tensor:
        """Run blocks ``[a, b)`` of one streaming DiT call.

        - ``x``: latents ``[B, T, C, H, W]`` when ``a == 0`` (patch embedding runs), else hidden ``[B, L, dim]``
          (then ``grid`` = ``(T, h, w)`` of the token grid is required).
        - ``timesteps``: ``[B, T]`` (one timestep per latent frame: integer or warped float values) or ``[B]``.
        - ``step.key_positions`` (LongLive's infinite mode): keys are cached without RoPE and the window is rotated
          by each slot's position in every call.
        - ``vace`` (``models/vace.py``): per-row VACE hints and reference prefixes (blocks from 0 only).
        - Returns the flow prediction ``[B, T, C, H, W]`` when ``b == num_layers`` (head runs), else hidden.
        """
        a, b_end = (0, self.num_layers) if blocks is None else blocks
        if not 0 <= a < b_end <= self.num_layers:
            raise ValueError(f"block range [{a}, {b_end}) is not inside [0, {self.num_layers})")
        if a == 0:
            x, grid = self.patchify(x)
        elif grid is None:
            raise ValueError("grid (frames, h, w) is required when the block range does not start at 0")
        f, h, w = grid
        bsz = x.shape[0]
        if timesteps.ndim == 1:
            timesteps = timesteps[:, None].expand(bsz, f)
        e, e0 = self.time_embedding(timesteps)
        cos, sin = self.rope.for_grid(step.rope_starts, f, h, w)
        key_rope = None if step.key_positions is None else self.rope.for_positions(step.key_positions, h, w)
        hinted: dict[int, torch.Tensor] = {}
        if vace is not None and vace.context is not None:
            if a != 0 or self.vace is None:
                raise ValueError("VACE hints need the VACE modules and a block range from 0")
            hinted = dict(zip(self.vace.layers, hints(self, self.vace, x, vace, e0, f, cos, sin, prompt, cache, step,
                                                      key_rope)))
        for i in range(a, b_end):
            prefix = vace.prefix(i) if vace is not None else None
            x = self.run_block(self.transformer.blocks[i], i, x, e0, f, cos, sin, prompt, cache, step, key_rope, prefix)
            if i in hinted:
                x = x + hinted[i] * vace.scale.to(x.dtype)[:, None, None]
        if b_end < self.num_layers:
            return x
        return self._head(x, e, grid)

    def run_block(self, blk: nn.Module, i: int, x: torch.Tensor, e0: torch.Tensor, frames: int, cos, sin,
                  prompt: PromptKV, cache: KVCache, step: CacheStep, key_rope=None, prefix=None) -> torch.Tensor:
        """One transformer block ``blk`` (a DiT block or a VACE block: the same submodules) over cache layer ``i``."""
        mod = (blk.scale_shift_table[:, None] + e0.float()).chunk(6, dim=2)  # each [B, T, 1, dim]
        shift1, scale1, gate1, shift2, scale2, gate2 = mod

        def per_frame(t: torch.Tensor) -> torch.Tensor:
            return t.float().unflatten(1, (frames, -1))

        def flat(t: torch.Tensor) -> torch.Tensor:
            return t.flatten(1, 2)

        y = flat(blk.norm1(per_frame(x)) * (1 + scale1) + shift1).type_as(x)
        window = {} if key_rope is None else {"key_rope": key_rope}        # LongLive's infinite mode only
        if prefix is not None:
            window["prefix"] = prefix                                      # a VACE reference
        y = self_attention(blk.attn1, y, cos, sin, cache.k[i], cache.v[i], step, cache.km[i], cache.vm[i], **window)
        x = flat(per_frame(x) + per_frame(y) * gate1).type_as(x)
        y = blk.norm2(x.float()).type_as(x)
        x = x + cross_attention(blk.attn2, y, prompt.k[i], prompt.v[i], step.prompt_groups)
        y = flat(blk.norm3(per_frame(x)) * (1 + scale2) + shift2).type_as(x)
        y = blk.ffn(y)
        return flat(per_frame(x) + per_frame(y) * gate2).type_as(x)

    def _head(self, x: torch.Tensor, e: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        tr = self.transformer
        frames = grid[0]
        shift, scale = (tr.scale_shift_table[:, None] + e.float()[:, :, None]).chunk(2, dim=2)  # [B, T, 1, dim]
        y = tr.norm_out(x.float().unflatten(1, (frames, -1))) * (1 + scale) + shift
        y = tr.proj_out(y.flatten(1, 2).type_as(x))
        return self.unpatchify(y, grid)
