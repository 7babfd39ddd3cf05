"""Self-attention KV cache: static storage per block and batch row, and the sink + ring write policy.

Storage is allocated once at full capacity (``capacity`` latent frames of ``tokens_per_frame`` tokens per
block and row); positions not yet written are masked, so a steady-state DiT call always has the same shapes.
Which slot a frame goes to, and how many slots are valid, are plain Python integers derived from the frame
count of the row (never read back from the device):

* frames ``0 .. sink-1`` are the sinks (the first frames written stay);
* later frames cycle through the ring of slots ``sink .. capacity-1``, oldest first.

Adaptive sink refresh is decided on the device inside attention (see ``models/attention.py``): when a new
frame's mean K/V is less similar than ``sink_threshold`` to some sink, the least similar sink is overwritten
with the new frame. It never stalls the stream and needs no host bookkeeping. The token means of what each
sink holds are kept beside the storage (``km``/``vm``, fp32), written together with the sink, so the decision
reads one vector per sink instead of the sink region.

:class:`KVPool` is the storage of a resolution group shared by many streams: each stream borrows contiguous rows
and a prompt K/V slot, and a call over several streams reads them in place (see its docstring).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Iterable, Sequence

import numpy as np
import torch

from wanstream.core.config import CacheConfig
from wanstream.core.leases import Lease, LeaseTable, Move


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

    def occupant(self, slot: int, written: int) -> int | None:
        """The frame a slot holds once ``written`` frames were written to the row (None: never written; adaptive
        sink refreshes aside)."""
        if slot >= written:
            return None
        if slot < self.sink:
            return slot
        return slot + (written - 1 - slot) // self.ring * self.ring

    def evicted(self, frame: int, frames: int, written: int) -> list[int]:
        """Older frames that writing frames ``frame .. frame+frames-1`` overwrites (a row that has written
        ``written`` frames): LongLive's roll-left evicts the same frames, oldest non-sink first."""
        out = []
        for f in range(frame, frame + frames):
            held = self.occupant(self.slot(f), written)
            if held is not None and held < f:
                out.append(held)
        return out

    def window_index(self, frame: int, written: int) -> int:
        """LongLive's infinite mode: the RoPE position of a cached frame is its place in the window, in time order
        (sinks 0 .. sink-1, then the ring's frames oldest first), once ``written`` frames were written."""
        if frame < self.sink or written <= self.capacity:
            return frame
        return self.sink + frame - (written - self.ring)

    def window_positions(self, frame: int, frames: int) -> tuple[int, list[int]]:
        """Infinite mode, a row writing frames ``frame .. frame+frames-1`` (the newest, or a re-cache of the
        window): the RoPE position of its first new frame, and of every cache slot's frame after the write."""
        written = frame + frames
        keys = []
        for slot in range(self.capacity):
            held = self.occupant(slot, written)
            keys.append(0 if held is None else self.window_index(held, written))
        return self.window_index(frame, written), keys

    def refresh_eligible(self, frame: int, frames: int = 1) -> bool:
        """Adaptive refresh compares a single new frame against sinks that all hold data."""
        return self.config.sink_threshold > -1 and self.sink > 0 and frames == 1 and frame >= self.sink


class KVCache:
    """Per-block K (after RoPE) and V storage, ``[rows, capacity*tokens_per_frame, heads, head_dim]``, and the
    token means of each slot's K and V, ``km``/``vm`` ``[rows, capacity, heads*head_dim]`` float32.

    The means are kept for the sink slots: every write of a frame into a sink slot (the normal write while a row
    fills, or a refresh) writes its means too, and row copies / moves carry them with K and V. Entries of ring
    slots are scratch (a row that does not refresh writes its new frame's means there). Only the blocks in
    ``layers`` are allocated, so a pipeline stage holds only its own blocks' caches.
    """

    def __init__(self, layers: Iterable[int], rows: int, capacity: int, tokens_per_frame: int, heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str):
        self.rows = rows
        self.capacity = capacity
        self.tokens_per_frame = tokens_per_frame
        self.generation = 0      # bumped whenever a storage tensor is replaced (captured CUDA graphs are stale)
        shape = (rows, capacity * tokens_per_frame, heads, head_dim)
        mshape = (rows, capacity, heads * head_dim)
        layers = list(layers)
        self.k = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layers}
        self.v = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layers}
        self.km = {i: torch.zeros(mshape, dtype=torch.float32, device=device) for i in layers}
        self.vm = {i: torch.zeros(mshape, dtype=torch.float32, device=device) for i in layers}

    @property
    def layers(self) -> list[int]:
        return sorted(self.k)

    def row_tensors(self) -> tuple[torch.Tensor, ...]:
        """Every per-row storage tensor (K, V and their slot means, all blocks): row copies and moves go over these."""
        return (*self.k.values(), *self.v.values(), *self.km.values(), *self.vm.values())

    def zero_(self) -> None:
        for t in self.row_tensors():
            t.zero_()

    def zero_rows(self, rows: slice) -> None:
        for t in self.row_tensors():
            t[rows].zero_()

    def copy_row(self, src: int, dst: Sequence[int] | slice) -> None:
        """Copy row ``src`` of every block into rows ``dst`` (stream-batch start: all rows begin as row 0)."""
        for t in self.row_tensors():
            t[dst] = t[src]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.row_tensors())

    def pop_layer(self, layer: int) -> tuple[torch.Tensor, ...]:
        """Remove a block's storage (it moves to another pipeline stage): K, V, K means, V means."""
        self.generation += 1
        return self.k.pop(layer), self.v.pop(layer), self.km.pop(layer), self.vm.pop(layer)

    def put_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor, km: torch.Tensor, vm: torch.Tensor) -> None:
        self.generation += 1
        self.k[layer], self.v[layer], self.km[layer], self.vm[layer] = k, v, km, vm


class KVPool(KVCache):
    """Shared cache storage of one resolution group: self-attention K/V rows and cross-attention (prompt) K/V
    slots, per block, allocated once and lent to streams.

    A stream borrows ``rows`` contiguous rows and one prompt slot; where leases go is decided by
    :class:`~wanstream.core.leases.LeaseTable` (packed in join order), and this class copies its tensors as the
    table's moves say. So when every stream runs in one call — the steady state — the call's rows and prompt slots
    are one slice each and attention reads the storage in place. Storage grows when a lease does not fit (at
    admission, never in the steady state); :meth:`reserve` allocates ahead.
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
        self.leases = LeaseTable()

    # ------------------------------------------------------------------------------------------ capacity
    @property
    def used_rows(self) -> int:
        return self.leases.used_rows

    @property
    def slots(self) -> int:
        return next(iter(self.pk.values())).shape[0] if self.pk else 0

    def reserve(self, rows: int, slots: int | None = None) -> None:
        """Grow the storage to at least ``rows`` rows and ``slots`` prompt slots (default: ``rows``)."""
        slots = rows if slots is None else slots
        if rows > self.rows:
            for store in (self.k, self.v, self.km, self.vm):
                for i, t in store.items():
                    store[i] = _grown(t, rows)
            self.rows = rows
            self.generation += 1
        if slots > self.slots:
            self.pk = {i: _grown(t, slots) for i, t in self.pk.items()}
            self.pv = {i: _grown(t, slots) for i, t in self.pv.items()}
            self.generation += 1

    # ------------------------------------------------------------------------------------------ leases
    def acquire(self, stream: Hashable, rows: int) -> Lease:
        """Lend ``rows`` rows (zeroed) and a prompt slot to a new stream, after the last lease."""
        lease = self.leases.acquire(stream, rows)
        self.reserve(lease.row + rows, lease.slot + 1)
        self.zero_rows(slice(lease.row, lease.row + rows))
        return lease

    def release(self, stream: Hashable) -> None:
        """Give a stream's rows and slot back; later leases move down so the leases stay packed."""
        self._apply(self.leases.release(stream))

    def resize(self, stream: Hashable, rows: int) -> None:
        """A stream's rows become ``rows``; row r starts from its old row ``min(r, old_rows - 1)`` (closest level)."""
        lease = self.leases[stream]
        if rows == lease.rows:
            return
        old = [t[lease.row: lease.row + lease.rows].clone() for t in self.row_tensors()]
        src = [min(r, lease.rows - 1) for r in range(rows)]
        self.reserve(self.used_rows - lease.rows + rows, len(self.leases))
        self._apply(self.leases.resize(stream, rows))
        for t, o in zip(self.row_tensors(), old):
            t[lease.row: lease.row + rows] = o[src]

    def rebase(self, stream: Hashable, delta: int, tables) -> None:
        """Turn a stream's cached keys back by ``delta`` RoPE positions (``models.rope.turn_back``): its next
        frames take positions ``delta`` lower and see every cached key at the same relative position."""
        from wanstream.models.rope import turn_back
        lease = self.leases[stream]
        rows = slice(lease.row, lease.row + lease.rows)
        for k in self.k.values():
            k[rows] = turn_back(k[rows], delta, tables)

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

    # ------------------------------------------------------------------------------------------ export / import
    def _stores(self) -> tuple[tuple[str, dict[int, torch.Tensor], bool], ...]:
        """(name, per-block storage, per row (True) or per prompt slot (False))."""
        return (("k", self.k, True), ("v", self.v, True), ("km", self.km, True), ("vm", self.vm, True),
                ("pk", self.pk, False), ("pv", self.pv, False))

    def row_layout(self, rows: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name → (shape, dtype) of what :meth:`export_rows` gives for a lease of ``rows`` rows."""
        return {f"{name}.{i}": ((rows if per_row else 1, *t.shape[1:]), t.dtype)
                for name, store, per_row in self._stores() for i, t in store.items()}

    def export_rows(self, stream: Hashable) -> dict[str, torch.Tensor]:
        """Copies of a stream's cache rows (``k``/``v``/``km``/``vm.<block>``, ``[rows, ...]``) and prompt slot
        (``pk``/``pv.<block>``, ``[1, ...]``), every block held here (parking a stream)."""
        lease = self.leases[stream]
        out = {}
        for name, store, per_row in self._stores():
            lo, n = (lease.row, lease.rows) if per_row else (lease.slot, 1)
            for i, t in store.items():
                out[f"{name}.{i}"] = t[lo: lo + n].clone()
        return out

    def import_rows(self, stream: Hashable, tensors: dict[str, torch.Tensor]) -> None:
        """Write what :meth:`export_rows` gave into a stream's lease of the same rows (names, shapes and dtypes are
        checked before anything is written)."""
        lease = self.leases[stream]
        layout = self.row_layout(lease.rows)
        for name, (shape, dtype) in layout.items():
            t = tensors.get(name)
            if t is None or tuple(t.shape) != shape or t.dtype != dtype:
                raise ValueError(f"cache rows: {name} must be {dtype} {list(shape)}, got "
                                 f"{None if t is None else (t.dtype, list(t.shape))}")
        for name, store, per_row in self._stores():
            lo, n = (lease.row, lease.rows) if per_row else (lease.slot, 1)
            for i, t in store.items():
                t[lo: lo + n].copy_(tensors[f"{name}.{i}"])

    def _apply(self, moves: list[Move]) -> None:
        """Copy the moved leases' rows and prompt slots (the table ordered the moves so none overwrites another)."""
        for m in moves:
            if m.dst_row != m.src_row:
                for t in self.row_tensors():
                    t[m.dst_row: m.dst_row + m.rows] = t[m.src_row: m.src_row + m.rows].clone()
            if m.dst_slot != m.src_slot:
                for t in (*self.pk.values(), *self.pv.values()):
                    t[m.dst_slot] = t[m.src_slot].clone()

    def pop_layer(self, layer: int) -> tuple[torch.Tensor, ...]:
        """Remove a block's storage (it moves to another pipeline stage): K, V, K means, V means, prompt K, prompt V."""
        return (*super().pop_layer(layer), self.pk.pop(layer), self.pv.pop(layer))

    def put_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor, km: torch.Tensor, vm: torch.Tensor,
                  pk: torch.Tensor | None = None, pv: torch.Tensor | None = None) -> None:
        super().put_layer(layer, k, v, km, vm)
        if pk is not None:
            self.pk[layer], self.pv[layer] = pk, pv

    def nbytes(self) -> int:
        return super().nbytes() + sum(t.numel() * t.element_size() for t in (*self.pk.values(), *self.pv.values()))


def stream_cache_bytes(num_layers: int, rows: int, capacity: int, tokens_per_frame: int, dim: int, text_len: int,
                       dtype: torch.dtype) -> int:
    """Device bytes of one stream's share of a pool (the one home of this estimate): ``rows`` cache rows (K and V
    of ``capacity`` frames of ``tokens_per_frame`` tokens, plus the fp32 slot means) and one prompt slot (K and V
    of ``text_len`` tokens), every block."""
    elem = torch.finfo(dtype).bits // 8
    per_row = 2 * num_layers * capacity * dim * (tokens_per_frame * elem + 4)
    per_slot = 2 * num_layers * text_len * dim * elem
    return rows * per_row + per_slot


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

    Batch row b uses cache row ``cache_row[b]``. ``segments`` are the maximal runs of batch rows whose cache rows
    are consecutive and that agree on needing the mask (``masked``: a stream still filling its cache attends with
    it, a full one without, exactly as alone): self-attention reads each run's rows as one slice (in the steady
    state: one run, no mask). With ``prompts`` (per-row prompt slots), cross-attention reads the pool's prompt
    slots in ``prompt_groups``; without, the prompt K/V has batch 1 (shared) or B (per row). The tensors are usually
    views of a :class:`StepBuffers`, refilled in place for every call of the same layout.
    """

    write_index: torch.Tensor          # [B, T*F] token positions to write, per row
    row_index: torch.Tensor            # [B, T*F] the cache row of each written token
    attn_mask: torch.Tensor | None     # [B, 1, 1, capacity*F] bool, None when every row is full
    refresh_rows: torch.Tensor | None  # [B] bool: rows whose new frame may refresh a sink; None: none may
    rope_starts: torch.Tensor          # [B] int64 temporal RoPE position of each row's first new frame
    segments: list[tuple[int, int, int]]   # (batch lo, batch hi, first cache row)
    sink_tokens: int                   # sink frames * tokens per frame
    sink_threshold: float
    cache_row: torch.Tensor            # [B] int64 cache row of each batch row
    slot_index: torch.Tensor           # [B, T] int64 cache slot of each new frame
    token_offsets: torch.Tensor        # [F] int64 0..F-1
    write_means: bool                  # some new frame lands in a sink slot: its token means are written too
    prompt_groups: list[tuple[int, int, int, int]] | None = None
    masked: list[bool] | None = None   # per segment: attend with the mask (its streams still fill their cache)
    key_positions: torch.Tensor | None = None   # [B, capacity] RoPE position of each slot (keys stored un-rotated)

    @property
    def rows(self) -> slice:
        """The cache rows of a call whose rows are one run (the usual case)."""
        if len(self.segments) != 1:
            raise ValueError("this call's cache rows are not one slice")
        b0, b1, r0 = self.segments[0]
        return slice(r0, r0 + b1 - b0)

    @property
    def structure(self) -> tuple[bool, bool, bool]:
        """What changes the computation of a call besides tensor values: mask, refresh, sink-mean writes."""
        return self.attn_mask is not None, self.refresh_rows is not None, self.write_means

    @classmethod
    def build(cls, policy: CachePolicy, frames: Sequence[int], rope_starts: Sequence[int], num_frames: int,
              tokens_per_frame: int, device, row_start: int = 0, cache_rows: Sequence[int] | None = None,
              prompts: Sequence[int] | None = None, streams: Sequence | None = None) -> "CacheStep":
        """``frames[r]`` = frame count of batch row r before this call; ``rope_starts[r]`` = its RoPE position.

        Batch row r uses cache row ``cache_rows[r]`` (default ``row_start + r``) and, with ``prompts``, prompt
        slot ``prompts[r]``. With ``streams`` (each row's stream), a stream whose rows are all full attends
        without a mask even when another stream of the call still fills its cache, exactly as it would alone.
        One-off buffers; a caller with repeating layouts keeps a :class:`StepBuffers`.
        """
        b = len(frames)
        cache_rows = list(range(row_start, row_start + b)) if cache_rows is None else list(cache_rows)
        buffers = StepBuffers(policy, num_frames, tokens_per_frame, device, cache_rows, prompts, streams=streams)
        return buffers.fill(frames, rope_starts)


class StepBuffers:
    """The device tensors of the :class:`CacheStep` s of one call layout (frames per row, the rows' cache rows and
    prompt slots), allocated once and refilled in place: each call uploads its host integers (slots, valid
    lengths, refresh eligibility, RoPE starts and ``row_values`` more float64 values per row, e.g. timesteps) with
    ONE copy from a host staging buffer (pinned on CUDA, two in turn so a copy still in flight is never
    overwritten) and derives the write indices and the mask on the device. The tensors keep their addresses, so
    a compiled call or a captured CUDA graph reads the new values.
    """

    def __init__(self, policy: CachePolicy, num_frames: int, tokens_per_frame: int, device,
                 cache_rows: Sequence[int], prompts: Sequence[int] | None = None, row_values: int = 0,
                 streams: Sequence | None = None):
        b = len(cache_rows)
        if b < 1:
            raise ValueError("a call needs at least one batch row")
        self.streams = [0] * b if streams is None else list(streams)
        if (prompts is not None and len(prompts) != b) or len(self.streams) != b:
            raise ValueError("cache_rows, prompts and streams must have one entry per batch row")
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        device = torch.device(device)
        self.policy, self.b, self.frames, self.f_tok = policy, b, num_frames, tokens_per_frame
        self.row_values = row_values
        self.row_runs = runs(cache_rows)
        self.groups = prompt_groups(prompts) if prompts is not None else None
        window = policy.config.rope_window
        n = b * (num_frames + 3 + row_values + (policy.capacity if window else 0))
        pinned = device.type == "cuda"
        self._host = [torch.zeros(n, dtype=torch.long, pin_memory=pinned) for _ in range(2 if pinned else 1)]
        self._host_np = [h.numpy() for h in self._host]
        self._events = [None] * len(self._host)
        self._turn = 0
        self.ints = torch.zeros(n, dtype=torch.long, device=device)
        bt = b * num_frames
        self.slot_index = self.ints[:bt].view(b, num_frames)
        self.valid_tokens = self.ints[bt: bt + b]
        self.eligible = self.ints[bt + b: bt + 2 * b]
        self.rope_starts = self.ints[bt + 2 * b: bt + 3 * b]
        vend = bt + (3 + row_values) * b
        self.values = self.ints[bt + 3 * b: vend].view(torch.float64).view(row_values, b)   # e.g. timesteps
        self.key_positions = self.ints[vend:].view(b, policy.capacity) if window else None
        self.cache_row = torch.tensor(list(cache_rows), dtype=torch.long).to(device)
        self.row_index = self.cache_row[:, None].expand(b, num_frames * tokens_per_frame)
        self.token_offsets = torch.arange(tokens_per_frame, device=device)
        self.positions = torch.arange(policy.capacity * tokens_per_frame, device=device)
        self.write_index = torch.zeros(b, num_frames * tokens_per_frame, dtype=torch.long, device=device)
        self.mask = torch.zeros(b, 1, 1, policy.capacity * tokens_per_frame, dtype=torch.bool, device=device)
        self.refresh = torch.zeros(b, dtype=torch.bool, device=device)

    def fill(self, frames: Sequence[int], rope_starts: Sequence[int],
             values: Sequence[Sequence[float]] = (), resink: Sequence[bool] | None = None) -> CacheStep:
        """The step of a call whose batch row r writes frames ``frames[r] ..`` and starts at RoPE position
        ``rope_starts[r]``; ``values[j][r]`` go to ``self.values[j, r]``. ``resink[r]``: the row's first frames go
        to the sink slots (a KV re-cache that makes them the new sink)."""
        b, nf, pol = self.b, self.frames, self.policy
        if len(frames) != b or len(rope_starts) != b:
            raise ValueError("frames and rope_starts must have one entry per batch row")
        if len(values) != self.row_values or any(len(v) != b for v in values):
            raise ValueError(f"expected {self.row_values} value lists of {b} entries")
        resink = resink or [False] * b
        slots = [i if again and i < pol.sink else pol.slot(f + i) for f, again in zip(frames, resink)
                 for i in range(nf)]
        valid = [pol.valid_after(f, nf) for f in frames]
        eligible = [pol.refresh_eligible(f, nf) for f in frames]
        host = self._host_np[self._turn]
        event = self._events[self._turn]
        if event is not None:
            event.synchronize()          # the copy from this staging buffer two calls ago has completed
        bt = b * nf
        host[:bt] = slots
        host[bt: bt + b] = np.asarray(valid) * self.f_tok
        host[bt + b: bt + 2 * b] = eligible
        host[bt + 2 * b: bt + 3 * b] = rope_starts
        if values:
            host.view(np.float64)[bt + 3 * b: bt + (3 + self.row_values) * b] = \
                np.asarray(values, dtype=np.float64).reshape(-1)
        if self.key_positions is not None:          # infinite mode: positions by place in the window
            placed = [pol.window_positions(f, nf) for f in frames]
            host[bt + 2 * b: bt + 3 * b] = [q for q, _ in placed]
            host[bt + (3 + self.row_values) * b:] = [p for _, keys in placed for p in keys]
        self.ints.copy_(self._host[self._turn], non_blocking=True)
        if self.ints.is_cuda:
            if event is None:
                event = self._events[self._turn] = torch.cuda.Event()
            event.record()
            self._turn = (self._turn + 1) % len(self._host)
        torch.add(self.token_offsets, self.slot_index[:, :, None], alpha=self.f_tok,
                  out=self.write_index.view(b, nf, self.f_tok))
        mask, segments, masked = None, self.row_runs, [False] * len(self.row_runs)
        filling = {sid for sid, n in zip(self.streams, valid) if n < pol.capacity}
        if filling:
            torch.lt(self.positions, self.valid_tokens[:, None], out=self.mask.view(b, -1))
            mask = self.mask
            segments, masked = self._split(self.row_runs, [sid in filling for sid in self.streams])
        refresh = self.refresh.copy_(self.eligible) if any(eligible) else None
        write_means = pol.sink > 0 and min(slots) < pol.sink
        return CacheStep(self.write_index, self.row_index, mask, refresh, self.rope_starts, segments,
                         pol.sink * self.f_tok, pol.config.sink_threshold, self.cache_row, self.slot_index,
                         self.token_offsets, write_means, self.groups, masked, self.key_positions)

    @staticmethod
    def _split(row_runs, row_masked: list[bool]) -> tuple[list[tuple[int, int, int]], list[bool]]:
        """The runs of consecutive cache rows, split where the rows' need for the mask changes."""
        segments: list[list[int]] = []
        for b0, b1, r0 in row_runs:
            for i in range(b0, b1):
                if i == b0 or row_masked[i] != row_masked[i - 1]:
                    segments.append([i, i + 1, r0 + i - b0])
                else:
                    segments[-1][1] = i + 1
        return [tuple(x) for x in segments], [row_masked[x[0]] for x in segments]
