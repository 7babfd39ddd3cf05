"""The runner: executes the scheduler's calls on one device.

For each :class:`~wanstream.scheduler.Call` it gathers the rows' latents (a chunk entering is mixed with its
stream's noise first), their timesteps, cache rows and prompt slots in the shared :class:`~wanstream.kv_cache.
KVPool`, runs ONE DiT call, converts every row to x0, re-noises the rows that stay to their next level and
returns the chunks that left clean. It decides nothing: which rows run, at which level and where they live all
come from the call. :func:`settle` (x0 + re-noise + finished rows) is shared with the last stage of the multi-GPU
pipeline, so both apply a call's outcome the same way.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Hashable, Sequence

import torch

from .kv_cache import CachePolicy, CacheStep, KVPool
from .models.dit import CausalWanDiT, PromptKV
from .noise import NoiseSource
from .sampling import FlowMatchSampler
from .scheduler import Call, Row
from .timing import PhaseTimer


@dataclass
class ChunkInput:
    """A chunk about to enter the stream batch: clean latents, noise scale, own level-0 timestep."""

    z: torch.Tensor                          # [1, T, C, h, w]
    s: float | torch.Tensor                  # noise scale (float or 0-d device tensor)
    t0: torch.Tensor | None = None           # level-0 timestep (int64, 0-d or [1]); None: the step list's first


@dataclass
class Done:
    """A chunk that left the stream batch clean."""

    row: Row                                 # the row it left from (stream, chunk, ...)
    latent: torch.Tensor                     # x0 [1, T, C, h, w]
    frames: torch.Tensor | None = None       # uint8 [T', H, W, 3] where it was decoded already (pipeline)


@dataclass
class RunnerStream:
    """The tensor side of one stream: its noise sources, entering chunks and in-flight latents."""

    id: Hashable
    noise: NoiseSource                       # mixing noise (a chunk entering)
    renoise_source: NoiseSource | None = None    # re-noising noise (default: the mixing source)
    inputs: dict = field(default_factory=dict)     # chunk → ChunkInput
    latents: dict = field(default_factory=dict)    # chunk → latent at its current level [1, T, C, h, w]

    @property
    def renoise(self) -> NoiseSource:
        return self.renoise_source or self.noise

    def noised(self, inp: ChunkInput) -> torch.Tensor:
        """``eps * s + z * (1 - s)`` with a fresh draw."""
        eps = self.noise(inp.z.shape).to(inp.z.dtype)
        return eps * inp.s + inp.z * (1 - inp.s)


def row_timesteps(rows: Sequence[Row], own_t0: dict, device) -> torch.Tensor:
    """Per-row int64 timesteps ``[B]``: each row's level timestep, or the chunk's own timestep where it has one
    (``own_t0[(stream, chunk)]``, level-0 rows)."""
    ts = torch.tensor([r.t for r in rows], dtype=torch.long).to(device, non_blocking=True)
    for b, r in enumerate(rows):
        t0 = own_t0.get((r.stream, r.chunk)) if r.level == 0 else None
        if t0 is not None:
            ts[b: b + 1] = t0.reshape(1)
    return ts


def settle(sampler: FlowMatchSampler, x: torch.Tensor, flow: torch.Tensor, ts: torch.Tensor, rows: Sequence[Row],
           renoise: Callable[[Hashable], NoiseSource]) -> tuple[list[tuple[Row, torch.Tensor]],
                                                                list[tuple[Row, torch.Tensor]]]:
    """The outcome of a call: x0 of every row (float64 math, as released); each stream's rows that stay are
    re-noised to their next level with ONE draw of that stream's re-noising source, the final rows leave clean.

    Returns ``(kept, finished)``: ``[(row, latent [1, T, C, h, w])]`` each, in row order."""
    x0 = sampler.to_x0(x, flow, ts)
    kept, finished = [], []
    b = 0
    while b < len(rows):
        e = b
        while e < len(rows) and rows[e].stream == rows[b].stream:
            e += 1
        stay = [i for i in range(b, e) if not rows[i].final]
        if stay:
            lo, hi = stay[0], stay[-1] + 1
            if stay != list(range(lo, hi)):
                raise AssertionError("a stream's rows that stay must be contiguous")
            sub = x0[lo:hi]
            targets = torch.tensor([rows[i].t_next for i in stay], dtype=torch.long).to(x.device, non_blocking=True)
            eps = renoise(rows[b].stream)(sub.shape).to(sub.dtype)
            renoised = sampler.add_noise(sub, eps, targets)
            kept += [(rows[i], renoised[i - lo: i - lo + 1]) for i in stay]
        finished += [(rows[i], x0[i: i + 1]) for i in range(b, e) if rows[i].final]
        b = e
    return kept, finished


class Runner:
    """Executes calls over the streams of one resolution group on one device (see the module docstring)."""

    def __init__(self, dit: CausalWanDiT, sampler: FlowMatchSampler, pool: KVPool, policy: CachePolicy,
                 tokens_per_frame: int, timer: PhaseTimer | None = None):
        self.dit = dit
        self.sampler = sampler
        self.pool = pool
        self.policy = policy
        self.tokens_per_frame = tokens_per_frame
        self.device = pool.device
        self.streams: dict[Hashable, RunnerStream] = {}
        self.timer = timer
        self.calls = 0
        self.rows_run = 0
        self.lag = 1                    # calls in flight: every call completes before the next

    # ------------------------------------------------------------------------------------------ streams
    def add(self, stream: RunnerStream, rows: int) -> None:
        if stream.id in self.streams:
            raise ValueError(f"stream {stream.id!r} is already in this runner")
        self.pool.acquire(stream.id, rows)
        self.streams[stream.id] = stream

    def remove(self, stream_id: Hashable) -> None:
        self.streams.pop(stream_id, None)
        self.pool.release(stream_id)

    def reset(self, stream_id: Hashable, rows: int) -> None:
        """A stream starts over: fresh (zeroed) cache rows, no chunks in flight; its prompt slot is kept."""
        st = self.streams[stream_id]
        st.inputs.clear()
        st.latents.clear()
        lease = self.pool.leases[stream_id]
        self.pool.resize(stream_id, rows)
        for t in (*self.pool.k.values(), *self.pool.v.values()):
            t[lease.row: lease.row + lease.rows].zero_()

    def set_prompt(self, stream_id: Hashable, embedding: torch.Tensor | PromptKV) -> None:
        """A stream's prompt: an embedding ``[1, text_len, text_dim]`` (its K/V are computed here) or K/V."""
        prompt = embedding if isinstance(embedding, PromptKV) else self.dit.embed_prompt(embedding)
        self.pool.set_prompt(stream_id, prompt.k, prompt.v)

    def reseed(self, stream_id: Hashable, seed: int) -> None:
        """Re-noising uses the stream's mixing source here, which the engine replaces itself."""

    def pending(self) -> list[Done]:
        """Chunks finished by calls still in flight (none here: every call completes in :meth:`run`)."""
        return []

    @property
    def prompts(self) -> PromptKV:
        return PromptKV(self.pool.pk, self.pool.pv)

    # ------------------------------------------------------------------------------------------ calls
    def run(self, call: Call) -> list[Done]:
        """Execute one call; returns the chunks that left clean."""
        for sid, rows in call.resize:
            self.pool.resize(sid, rows)
        finished: list = []
        if call.rows:
            finished = self._dit_call(call)
        for sid in call.copy_row0:
            self.pool.copy_row0(sid)
        return finished

    def _dit_call(self, call: Call) -> list[Done]:
        rows = call.rows
        xs, own_t0 = [], {}
        for r in rows:
            st = self.streams[r.stream]
            if r.enters:
                inp = st.inputs.pop(r.chunk)
                xs.append(st.noised(inp))
                if inp.t0 is not None:
                    own_t0[(r.stream, r.chunk)] = inp.t0
            else:
                xs.append(st.latents.pop(r.chunk))
        x = xs[0] if len(xs) == 1 else torch.cat(xs)
        ts = row_timesteps(rows, own_t0, self.device)
        leases = self.pool.leases
        step = CacheStep.build(self.policy, [r.frame for r in rows], [r.rope for r in rows], call.frames,
                               self.tokens_per_frame, self.device,
                               cache_rows=[leases[r.stream].row + r.cache_row for r in rows],
                               prompts=[leases[r.stream].slot for r in rows], streams=[r.stream for r in rows])
        with self.timer.section("dit") if self.timer is not None else contextlib.nullcontext():
            flow = self.dit(x, ts, self.prompts, self.pool, step)
            kept, finished = settle(self.sampler, x, flow, ts, rows, lambda sid: self.streams[sid].renoise)
        for r, latent in kept:
            self.streams[r.stream].latents[r.chunk] = latent
        self.calls += 1
        self.rows_run += len(rows)
        return [Done(r, x0) for r, x0 in finished]

