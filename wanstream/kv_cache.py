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

:class:`KVPool` is the storage of a resolution group shared by many streams: each stream borrows contiguous rows
and a prompt K/V slot, and a call over several streams reads them in place (see its docstring).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Iterable, Sequence

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
class Lease:
    """The rows and the prompt slot a stream borrows from a :class:`KVPool`."""

    stream: Hashable
    row: int       # first pool row
    rows: int      # rows (the stream's stream-batch levels, or 1)
    slot: int      # prompt K/V slot


class KVPool(KVCache):
    """Shared cache storage of one resolution group: self-attention K/V rows and cross-attention (prompt) K/V
    slots, per block, allocated once and lent to streams.

    A stream borrows ``rows`` contiguous rows and one prompt slot; leases are kept packed in the order the streams
    joined (a stream that leaves is compacted out once, a step change re-lays the stream's rows), so when every
    stream runs in one call — the steady state — the call's rows and prompt slots are one slice each and
    attention reads the storage in place. Storage grows when a lease does not fit (at admission, never in the
    steady state); :meth:`reserve` allocates ahead.
    """

    def __init__(self, layers: Iterable[int], capacity: int, tokens_per_frame: int, heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, text_len: int = 512, rows: int = 0):
        super().__init__(layers, rows, capacity, tokens_per_frame, heads, head_dim, dtype, device)
        self.text_len = text_len
        self.heads, self.head_dim = heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        pshape = (rows, text_len, heads, head_dim)
        self.pk = {i: torch.zeros(pshape, dtype=dtype, device=device) for i in self.k}
        self.pv = {i: torch.zeros(pshape, dtype=dtype, device=device) for i in self.k}
        self.leases: dict[Hashable, Lease] = {}

    # ------------------------------------------------------------------------------------------ capacity
    @property
    def used_rows(self) -> int:
        return sum(lease.rows for lease in self.leases.values())

    @property
    def slots(self) -> int:
        return next(iter(self.pk.values())).shape[0] if self.pk else 0

    def row_bytes(self) -> int:
        """Bytes of one cache row over every block held here."""
        return 2 * len(self.k) * self.capacity * self.tokens_per_frame * self.heads * self.head_dim * self._elem()

    def slot_bytes(self) -> int:
        """Bytes of one prompt slot over every block held here."""
        return 2 * len(self.k) * self.text_len * self.heads * self.head_dim * self._elem()

    def _elem(self) -> int:
        return torch.finfo(self.dtype).bits // 8

    def reserve(self, rows: int, slots: int | None = None) -> None:
        """Grow the storage to at least ``rows`` rows and ``slots`` prompt slots (default: ``rows``)."""
        slots = rows if slots is None else slots
        if rows > self.rows:
            self.k = {i: _grown(t, rows) for i, t in self.k.items()}
            self.v = {i: _grown(t, rows) for i, t in self.v.items()}
            self.rows = rows
        if slots > self.slots:
            self.pk = {i: _grown(t, slots) for i, t in self.pk.items()}
            self.pv = {i: _grown(t, slots) for i, t in self.pv.items()}

    # ------------------------------------------------------------------------------------------ leases
    def acquire(self, stream: Hashable, rows: int) -> Lease:
        """Lend ``rows`` rows (zeroed) and a prompt slot to a new stream, after the last lease."""
        if stream in self.leases:
            raise ValueError(f"stream {stream!r} already holds cache rows")
        if rows < 1:
            raise ValueError(f"a stream needs at least one cache row, got {rows}")
        row, slot = self.used_rows, len(self.leases)
        self.reserve(row + rows, slot + 1)
        lease = Lease(stream, row, rows, slot)
        self.leases[stream] = lease
        for t in (*self.k.values(), *self.v.values()):
            t[row: row + rows].zero_()
        return lease

    def release(self, stream: Hashable) -> None:
        """Give a stream's rows and slot back; later leases move down so the leases stay packed."""
        if self.leases.pop(stream, None) is not None:
            self._repack()

    def resize(self, stream: Hashable, rows: int) -> None:
        """A stream's rows become ``rows``; row r starts from its old row ``min(r, old_rows - 1)`` (closest level)."""
        lease = self.leases[stream]
        if rows == lease.rows:
            return
        old = {i: (self.k[i][lease.row: lease.row + lease.rows].clone(),
                   self.v[i][lease.row: lease.row + lease.rows].clone()) for i in self.k}
        src = [min(r, lease.rows - 1) for r in range(rows)]
        self.reserve(self.used_rows - lease.rows + rows, len(self.leases))
        lease.rows = rows
        self._repack()
        for i, (k, v) in old.items():
            self.k[i][lease.row: lease.row + rows] = k[src]
            self.v[i][lease.row: lease.row + rows] = v[src]

    def copy_row0(self, stream: Hashable) -> None:
        """Every row of a stream becomes a copy of its row 0 (end of prepare)."""
        lease = self.leases[stream]
        if lease.rows > 1:
            self.copy_row(lease.row, slice(lease.row + 1, lease.row + lease.rows))

    def set_prompt(self, stream: Hashable, k: dict[int, torch.Tensor], v: dict[int, torch.Tensor]) -> None:
        """Write a stream's prompt K/V (``[1, text_len, heads, head_dim]`` per block) into its slot."""
        slot = self.leases[stream].slot
        for i in self.pk:
            self.pk[i][slot: slot + 1].copy_(k[i])
            self.pv[i][slot: slot + 1].copy_(v[i])

    def _repack(self) -> None:
        """Place the leases packed, in lease order. Leases that move down are copied first (ascending), then those
        that move up (descending), so no lease is overwritten before it moved."""
        moves, row = [], 0
        for slot, lease in enumerate(self.leases.values()):
            moves.append((lease, row, slot))
            row += lease.rows
        down = [m for m in moves if m[1] < m[0].row or m[2] < m[0].slot]
        up = [m for m in moves if m[1] > m[0].row]
        for lease, row, slot in down + up[::-1]:
            if row != lease.row:
                for t in (*self.k.values(), *self.v.values()):
                    t[row: row + lease.rows] = t[lease.row: lease.row + lease.rows].clone()
            if slot != lease.slot:
                for t in (*self.pk.values(), *self.pv.values()):
                    t[slot] = t[lease.slot].clone()
            lease.row, lease.slot = row, slot

    def pop_layer(self, layer: int) -> tuple[torch.Tensor, ...]:
        """Remove a block's storage (it moves to another pipeline stage): K, V, prompt K, prompt V."""
        return self.k.pop(layer), self.v.pop(layer), self.pk.pop(layer), self.pv.pop(layer)

    def put_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor, pk: torch.Tensor | None = None,
                  pv: torch.Tensor | None = None) -> None:
        self.k[layer], self.v[layer] = k, v
        if pk is not None:
            self.pk[layer], self.pv[layer] = pk, pv

    def nbytes(self) -> int:
        return super().nbytes() + sum(t.numel() * t.element_size() for t in (*self.pk.values(), *self.pv.values()))


def _grown(t: torch.Tensor, rows: int) -> torch.Tensor:
    out = torch.zeros((rows, *t.shape[1:]), dtype=t.dtype, device=t.device)
    out[: t.shape[0]] = t
    return out


def runs(values: Sequence[int]) -> list[tuple[int, int, int]]:
    """Maximal runs of consecutive integers: ``(batch_lo, batch_hi, first_value)`` for each run."""
    out: list[tuple[int, int, int]] = []
    for b, v in enumerate(values):
        if out and v == out[-1][2] + (b - out[-1][0]):
            out[-1] = (out[-1][0], b + 1, out[-1][2])
        else:
            out.append((b, b + 1, v))
    return out


def prompt_groups(slots: Sequence[int]) -> list[tuple[int, int, int, int]]:
    """Cross-attention groups of a call from each batch row's prompt slot: ``(b_lo, b_hi, slot_lo, count)`` —
    rows ``b_lo..b_hi`` form ``count`` equal runs attending slots ``slot_lo .. slot_lo + count - 1``."""
    same: list[list[int]] = []           # runs of rows sharing a slot: [b_lo, b_hi, slot]
    for b, s in enumerate(slots):
        if same and same[-1][2] == s:
            same[-1][1] = b + 1
        else:
            same.append([b, b + 1, s])
    out: list[tuple[int, int, int, int]] = []
    for b0, b1, s in same:
        if out:
            lo, hi, s0, n = out[-1]
            if s == s0 + n and b1 - b0 == (hi - lo) // n:
                out[-1] = (lo, b1, s0, n + 1)
                continue
        out.append((b0, b1, s, 1))
    return out


@dataclass
class CacheStep:
    """Where one DiT call writes and what it reads, as device index tensors built from host integers.

    Batch row b uses cache row ``cache_rows[b]``. ``segments`` are the maximal runs of batch rows whose cache rows
    are consecutive: self-attention reads each run's rows as one slice (in the steady state: one run). With
    ``prompts`` (per-row prompt slots), cross-attention reads the pool's prompt slots in ``prompt_groups``; without,
    the prompt K/V has batch 1 (shared) or B (per row).
    """

    write_index: torch.Tensor          # [B, T*F] token positions to write, per row
    row_index: torch.Tensor            # [B, T*F] the cache row of each written token
    attn_mask: torch.Tensor | None     # [B, 1, 1, capacity*F] bool, None when every row is full
    refresh_rows: torch.Tensor | None  # [B] bool: rows whose new frame may refresh a sink; None: none may
    rope_starts: torch.Tensor          # [B] int64 temporal RoPE position of each row's first new frame
    segments: list[tuple[int, int, int]]   # (batch lo, batch hi, first cache row)
    sink_tokens: int                   # sink frames * tokens per frame
    sink_threshold: float
    prompt_groups: list[tuple[int, int, int, int]] | None = None
    masked: list[bool] | None = None   # per segment: attend with the mask (its streams still fill their cache)

    @property
    def rows(self) -> slice:
        """The cache rows of a call whose rows are one run (the usual case)."""
        if len(self.segments) != 1:
            raise ValueError("this call's cache rows are not one slice")
        b0, b1, r0 = self.segments[0]
        return slice(r0, r0 + b1 - b0)

    @classmethod
    def build(cls, policy: CachePolicy, frames: Sequence[int], rope_starts: Sequence[int], num_frames: int,
              tokens_per_frame: int, device, row_start: int = 0, cache_rows: Sequence[int] | None = None,
              prompts: Sequence[int] | None = None, streams: Sequence | None = None) -> "CacheStep":
        """``frames[r]`` = frame count of batch row r before this call; ``rope_starts[r]`` = its RoPE position.

        Batch row r uses cache row ``cache_rows[r]`` (default ``row_start + r``) and, with ``prompts``, prompt
        slot ``prompts[r]``. With ``streams`` (each row's stream), a stream whose rows are all full attends
        without a mask even when another stream of the call still fills its cache, exactly as it would alone.
        """
        if len(frames) != len(rope_starts):
            raise ValueError("frames and rope_starts must have one entry per batch row")
        b = len(frames)
        cache_rows = list(range(row_start, row_start + b)) if cache_rows is None else list(cache_rows)
        streams = [0] * b if streams is None else list(streams)
        if len(cache_rows) != b or len(streams) != b or (prompts is not None and len(prompts) != b):
            raise ValueError("cache_rows, prompts and streams must have one entry per batch row")
        f_tok = tokens_per_frame
        slots = [[policy.slot(f + i) for i in range(num_frames)] for f in frames]
        valid = [policy.valid_after(f, num_frames) for f in frames]
        slot_t = torch.tensor(slots, dtype=torch.long).to(device, non_blocking=True)
        write = (slot_t[:, :, None] * f_tok + torch.arange(f_tok, device=device)).reshape(b, -1)
        rows_t = torch.tensor(cache_rows, dtype=torch.long).to(device, non_blocking=True)
        rows = rows_t[:, None].expand_as(write)
        filling = {sid for sid, n in zip(streams, valid) if n < policy.capacity}
        masked = [sid in filling for sid in streams]
        mask = None
        if filling:
            valid_t = torch.tensor(valid, dtype=torch.long).to(device, non_blocking=True) * f_tok
            mask = (torch.arange(policy.capacity * f_tok, device=device)[None] < valid_t[:, None])[:, None, None, :]
        eligible = [policy.refresh_eligible(f, num_frames) for f in frames]
        refresh = torch.tensor(eligible).to(device, non_blocking=True) if any(eligible) else None
        starts = torch.tensor(list(rope_starts), dtype=torch.long).to(device, non_blocking=True)
        groups = prompt_groups(prompts) if prompts is not None else None
        segments = []                      # runs of consecutive cache rows that also agree on needing the mask
        for b0, b1, r0 in runs(cache_rows):
            for i in range(b0, b1):
                if i == b0 or masked[i] != masked[i - 1]:
                    segments.append([i, i + 1, r0 + i - b0])
                else:
                    segments[-1][1] = i + 1
        return cls(write, rows, mask, refresh, starts, [tuple(x) for x in segments], policy.sink * f_tok,
                   policy.config.sink_threshold, groups, [masked[x[0]] for x in segments])
