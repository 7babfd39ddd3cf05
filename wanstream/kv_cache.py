"""Self-attention KV cache: static storage per block and batch row, and the sink + ring write policy.

Storage is allocated once at full capacity (``capacity`` latent frames of ``tokens_per_frame`` tokens per
block and row); positions not yet written are masked, so a steady-state DiT call always has the same shapes.
Which slot a frame goes to, and how many slots are valid, are plain Python integers derived from the frame
count of the row (never read back from the device):

* frames ``0 .. sink-1`` are the sinks (the first frames written stay);
* later frames cycle through the ring of slots ``sink .. capacity-1``, oldest first.

Adaptive sink refresh is decided on the device inside attention (see ``models/attention.py``): when a new
frame's mean K/V is less similar than ``sink_threshold`` to some sink, the least similar sink is overwritten
with the new frame. It never stalls the stream and needs no host bookkeeping.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from .config import CacheConfig


class CachePolicy:
    """Frame → slot rule and validity for one cache configuration."""

    def __init__(self, config: CacheConfig):
        self.config = config
        self.capacity = config.capacity
        self.sink = config.sink
        self.ring = config.capacity - config.sink

    def slot(self, frame: int) -> int:
        """Cache slot of the ``frame``-th latent frame written to a row (0-based count of frames, not RoPE)."""
        if frame < 0:
            raise ValueError(f"frame index must be >= 0, got {frame}")
        if frame < self.sink:
            return frame
        return self.sink + (frame - self.sink) % self.ring

    def valid_after(self, frame: int, frames: int = 1) -> int:
        """Number of valid slots once frames ``frame .. frame+frames-1`` are written."""
        return min(frame + frames, self.capacity)

    def refresh_eligible(self, frame: int, frames: int = 1) -> bool:
        """Adaptive refresh compares a single new frame against sinks that all hold data."""
        return self.config.sink_threshold > -1 and self.sink > 0 and frames == 1 and frame >= self.sink


class KVCache:
    """Per-block K (after RoPE) and V storage, ``[rows, capacity*tokens_per_frame, heads, head_dim]``.

    Only the blocks in ``layers`` are allocated, so a pipeline stage holds only its own blocks' caches.
    """

    def __init__(self, layers: Iterable[int], rows: int, capacity: int, tokens_per_frame: int, heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str):
        self.rows = rows
        self.capacity = capacity
        self.tokens_per_frame = tokens_per_frame
        shape = (rows, capacity * tokens_per_frame, heads, head_dim)
        self.k = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layers}
        self.v = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layers}

    @property
    def layers(self) -> list[int]:
        return sorted(self.k)

    def zero_(self) -> None:
        for t in (*self.k.values(), *self.v.values()):
            t.zero_()

    def copy_row(self, src: int, dst: Sequence[int] | slice) -> None:
        """Copy row ``src`` of every block into rows ``dst`` (stream-batch start: all rows begin as row 0)."""
        for t in (*self.k.values(), *self.v.values()):
            t[dst] = t[src]

    def resized(self, rows: int) -> "KVCache":
        """A copy with ``rows`` rows; row r starts from old row ``min(r, rows_before - 1)`` (the closest level)."""
        first = next(iter(self.k.values()))
        out = KVCache(self.layers, rows, self.capacity, self.tokens_per_frame, first.shape[2], first.shape[3],
                      first.dtype, first.device)
        src = [min(r, self.rows - 1) for r in range(rows)]
        for i in self.layers:
            out.k[i].copy_(self.k[i][src])
            out.v[i].copy_(self.v[i][src])
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k.values(), *self.v.values()))

    def pop_layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Remove a block's storage (it moves to another pipeline stage)."""
        return self.k.pop(layer), self.v.pop(layer)

    def put_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[layer], self.v[layer] = k, v


@dataclass
class CacheStep:
    """Where one DiT call writes and what it attends to, as device index tensors built from host integers."""

    write_index: torch.Tensor          # [B, T*F] token positions to write, per row
    row_index: torch.Tensor            # [B, T*F] the row of each written token
    attn_mask: torch.Tensor | None     # [B, 1, 1, capacity*F] bool, None when every row is full
    refresh_rows: torch.Tensor | None  # [B] bool: rows whose new frame may refresh a sink; None: none may
    rope_starts: torch.Tensor          # [B] int64 temporal RoPE position of each row's first new frame
    rows: slice                        # the cache rows used by batch rows 0..B-1
    sink_tokens: int                   # sink frames * tokens per frame
    sink_threshold: float

    @classmethod
    def build(cls, policy: CachePolicy, frames: Sequence[int], rope_starts: Sequence[int], num_frames: int,
              tokens_per_frame: int, device, row_start: int = 0) -> "CacheStep":
        """``frames[r]`` = frame count of batch row r before this call; ``rope_starts[r]`` = its RoPE position.

        Batch row r uses cache row ``row_start + r``.
        """
        if len(frames) != len(rope_starts):
            raise ValueError("frames and rope_starts must have one entry per batch row")
        f_tok = tokens_per_frame
        slots = [[policy.slot(f + i) for i in range(num_frames)] for f in frames]
        valid = [policy.valid_after(f, num_frames) for f in frames]
        b = len(frames)
        slot_t = torch.tensor(slots, dtype=torch.long).to(device, non_blocking=True)
        write = (slot_t[:, :, None] * f_tok + torch.arange(f_tok, device=device)).reshape(b, -1)
        rows = (torch.arange(b, device=device) + row_start)[:, None].expand_as(write)
        mask = None
        if min(valid) < policy.capacity:
            valid_t = torch.tensor(valid, dtype=torch.long).to(device, non_blocking=True) * f_tok
            mask = (torch.arange(policy.capacity * f_tok, device=device)[None] < valid_t[:, None])[:, None, None, :]
        eligible = [policy.refresh_eligible(f, num_frames) for f in frames]
        refresh = torch.tensor(eligible).to(device, non_blocking=True) if any(eligible) else None
        starts = torch.tensor(list(rope_starts), dtype=torch.long).to(device, non_blocking=True)
        return cls(write, rows, mask, refresh, starts, slice(row_start, row_start + b), policy.sink * f_tok,
                   policy.config.sink_threshold)
