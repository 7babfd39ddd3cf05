"""Stream Batch: the n denoising steps of n consecutive chunks run as one DiT call.

Slot r of the stream batch holds a chunk at denoising level ``step_list[r]``; each slot has its own KV-cache
row and its own RoPE position. Per new chunk: shift the registers, insert the new noised latent at slot 0,
one DiT call over the occupied slots, x0 for every slot, re-noise slots 0..n-2 to the next level; slot n-1
leaves clean. A chunk entering now leaves n calls later. While the pipeline fills (and while it drains at
the end of a stream) only occupied slots run, so no call computes on placeholders.

:class:`LatentStream` is the latent-level engine of one stream: prepare, stream batch, the sequential
no-batch mode, draining, live reconfiguration. Everything on the host is plain integers.

Pipelined schedule (``lag`` = W pipeline stages): W stream batches circulate at once; a new chunk joins the
batch that left the pipeline W calls ago, so slot r holds the chunk that entered r*W calls ago. Every cache
row still sees its chunks in order. ``lag=1`` is the single-device stream batch; the multi-GPU pipeline
runs the same schedule split by DiT blocks, and this class is its single-process reference.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Hashable

import torch

from .config import CacheConfig
from .kv_cache import CachePolicy, CacheStep
from .models.dit import CausalWanDiT, PromptKV
from .noise import NoiseSource
from .sampling import FlowMatchSampler, step_list


@dataclass
class Slot:
    """One register of the stream batch."""

    latent: torch.Tensor   # [1, T, C, h, w], at the slot's noise level
    frame: int             # index of its first latent frame in the stream (decides the cache slot)
    rope: int              # temporal RoPE position of its first latent frame
    chunk: Hashable        # the caller's identifier of the chunk


class LatentStream:
    """Latent-level streaming denoiser for one stream (owns its KV cache and registers)."""

    def __init__(self, dit: CausalWanDiT, sampler: FlowMatchSampler, prompt: PromptKV, noise: NoiseSource, *,
                 tokens_per_frame: int, steps: int = 2, mode: str = "v2v", batch: bool = True,
                 cache: CacheConfig = CacheConfig(), frames_per_block: int = 1, lag: int = 1,
                 renoise: NoiseSource | None = None):
        if lag < 1:
            raise ValueError(f"lag must be >= 1, got {lag}")
        self.dit = dit
        self.sampler = sampler
        self.prompt = prompt
        self.noise = noise
        self._renoise = renoise
        self.lag = lag
        self.tokens_per_frame = tokens_per_frame
        self.mode = mode
        self.cache_config = cache
        self.policy = CachePolicy(cache)
        self.frames_per_block = frames_per_block
        self.device = next(dit.parameters()).device
        self._configure(steps, batch)
        self.cache = dit.new_cache(self.rows, cache.capacity, tokens_per_frame)
        self.next_frame = 0
        self.next_rope = 0
        self.calls = 0

    # -------------------------------------------------------------- configuration
    def _configure(self, steps: int, batch: bool) -> None:
        self.steps = steps
        self.batch = batch
        self.step_list = step_list(steps, self.mode)
        self.rows = len(self.step_list) if batch else 1
        self.batches: deque[list[Slot | None]] = deque([None] * self.rows for _ in range(self.lag))
        self._t_list = torch.tensor(self.step_list, dtype=torch.long, device=self.device)

    def reconfigure(self, steps: int, batch: bool | None = None) -> list[tuple[Hashable, torch.Tensor]]:
        """Change the step count (and mode) between chunks; in-flight chunks are finished first and returned.

        Cache rows are kept per level; a new level starts from the cache of the closest existing level.
        """
        batch = self.batch if batch is None else batch
        if steps == self.steps and batch == self.batch:
            return []
        out = self.drain()
        old_rows = self.rows
        self._configure(steps, batch)
        if self.rows != old_rows:
            self.cache = self.cache.resized(self.rows)
        return out

    @property
    def renoise(self) -> NoiseSource:
        """Noise for re-noising (the last pipeline stage draws it); defaults to the mixing source."""
        return self._renoise or self.noise

    @property
    def slots(self) -> list[Slot | None]:
        """The registers of the batch processed last (slot 0 = newest chunk)."""
        return self.batches[-1]

    # ------------------------------------------------------------------ positions
    def _take_position(self, frames: int) -> tuple[int, int]:
        """Frame index and RoPE position of the next chunk (RoPE refresh: wrap_at → wrap_to)."""
        frame, rope = self.next_frame, self.next_rope
        if rope + frames > self.cache_config.rope_wrap_at:
            rope = self.cache_config.rope_wrap_to
        self.next_frame = frame + frames
        self.next_rope = rope + frames
        return frame, rope

    def noised(self, z: torch.Tensor, s) -> torch.Tensor:
        """``eps * s + z * (1 - s)`` with a fresh draw (s: float or 0-d tensor)."""
        eps = self.noise(z.shape).to(z.dtype)
        return eps * s + z * (1 - s)

    def _call(self, x: torch.Tensor, t: torch.Tensor, frames: list[int], ropes: list[int], row_start: int):
        step = CacheStep.build(self.policy, frames, ropes, x.shape[1], self.tokens_per_frame, self.device,
                               row_start=row_start)
        flow = self.dit(x, t, self.prompt, self.cache, step)
        self.calls += 1
        return self.sampler.to_x0(x, flow, t)

    # --------------------------------------------------------------------- public
    @torch.no_grad()
    def prepare(self, z: torch.Tensor, s: float) -> torch.Tensor:
        """First chunk ``z [1, L, C, h, w]``: the full step list sequentially on cache row 0, then every row
        starts as a copy of row 0. Returns the clean latents of the chunk (the first output of the stream)."""
        x = self.noised(z, s)
        frame, rope = self._take_position(z.shape[1])
        for i, t in enumerate(self.step_list):
            x0 = self._call(x, self._t_list[i: i + 1], [frame], [rope], 0)
            if i + 1 < len(self.step_list):
                x = self.sampler.add_noise(x0, self.renoise(x0.shape).to(x0.dtype), self._t_list[i + 1: i + 2])
        if self.rows > 1:
            self.cache.copy_row(0, slice(1, None))
        return x0

    @torch.no_grad()
    def push(self, z: torch.Tensor, s, t: torch.Tensor, chunk: Hashable) -> list[tuple[Hashable, torch.Tensor]]:
        """Add a chunk's clean latents ``z [1, T, C, h, w]`` mixed at noise scale ``s``; the newest slot is
        denoised from timestep ``t`` (0-d int64 tensor). Returns the chunks finished by this call."""
        noisy = self.noised(z, s)
        frame, rope = self._take_position(z.shape[1])
        t = t.reshape(1).to(self.device)
        if not self.batch:
            return [(chunk, self._sequential(noisy, t, frame, rope))]
        return self._advance(Slot(noisy, frame, rope, chunk), torch.cat([t, self._t_list[1:]]))

    @torch.no_grad()
    def drain(self) -> list[tuple[Hashable, torch.Tensor]]:
        """Finish every in-flight chunk without adding one (end of stream, or before a reconfiguration)."""
        out = []
        while any(s is not None for batch in self.batches for s in batch[:-1]):
            out += self._advance(None, self._t_list)
        return out

    # ------------------------------------------------------------------- internal
    def _sequential(self, x: torch.Tensor, t0: torch.Tensor, frame: int, rope: int) -> torch.Tensor:
        """No-batch mode: all steps of one chunk in a row; every step writes the chunk's own cache slot."""
        ts = torch.cat([t0, self._t_list[1:]])
        for i in range(len(self.step_list)):
            x0 = self._call(x, ts[i: i + 1], [frame], [rope], 0)
            if i + 1 < len(self.step_list):
                x = self.sampler.add_noise(x0, self.renoise(x0.shape).to(x0.dtype), ts[i + 1: i + 2])
        return x0

    def _advance(self, new: Slot | None, timesteps: torch.Tensor) -> list[tuple[Hashable, torch.Tensor]]:
        """One call: the batch that left ``lag`` calls ago shifts, takes ``new`` at slot 0 and runs."""
        batch = [new] + self.batches.popleft()[:-1]
        out = self._run(batch, timesteps)
        self.batches.append(batch)
        return out

    def _run(self, batch: list[Slot | None], timesteps: torch.Tensor) -> list[tuple[Hashable, torch.Tensor]]:
        occupied = [r for r, s in enumerate(batch) if s is not None]
        if not occupied:
            return []
        lo, hi = occupied[0], occupied[-1] + 1
        assert occupied == list(range(lo, hi)), "stream-batch slots must be contiguous"
        slots = batch[lo:hi]
        x = torch.cat([s.latent for s in slots])
        x0 = self._call(x, timesteps[lo:hi], [s.frame for s in slots], [s.rope for s in slots], lo)
        out = []
        if hi == self.rows:
            out.append((slots[-1].chunk, x0[-1:]))
            batch[-1] = None
        keep = min(hi, self.rows - 1) - lo
        if keep > 0:
            targets = self._t_list[lo + 1: lo + 1 + keep]
            renoised = self.sampler.add_noise(x0[:keep], self.renoise(x0[:keep].shape).to(x0.dtype), targets)
            for i in range(keep):
                batch[lo + i].latent = renoised[i: i + 1]
        return out
