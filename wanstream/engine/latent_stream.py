"""Stream Batch of one stream at the latent level: the schedule (``core.schedule.StreamSchedule``) executed by the
runner (``runner.Runner``) over a private cache pool.

Slot r of the stream batch holds a chunk at denoising level ``step_list[r]``; each slot has its own KV-cache row
and its own RoPE position. Per new chunk: shift the registers, insert the new noised latent at slot 0, one DiT
call over the occupied slots, x0 for every slot, re-noise slots 0..n-2 to the next level; slot n-1 leaves clean.
While the pipeline fills (and while it drains at the end of a stream) only occupied slots run, so no call
computes on placeholders. ``lag`` = W runs the pipelined schedule (W batches in flight), the single-process
reference of the multi-GPU ring.

:class:`LatentStream` is used where one stream owns the model for itself: text-to-video, the reference of the
pipeline tests, and tests of the schedule. Live streams share the model through the engine (``engine.py``),
which runs the same schedule and runner for many streams in shared calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable

import torch

from wanstream.core.config import CacheConfig
from wanstream.core.schedule import Stage, StreamSchedule, compose
from wanstream.engine.noise import NoiseSource
from wanstream.engine.runner import ChunkInput, Runner, RunnerStream
from wanstream.models.dit import CausalWanDiT, PromptKV
from wanstream.models.kv_cache import CachePolicy, KVPool
from wanstream.models.sampling import FlowMatchSampler

_PREPARE = "prepare"        # chunk id of the prepare chunk


@dataclass
class SlotView:
    """A register of the stream batch as tests and tools see it."""

    chunk: Hashable
    frame: int
    rope: int
    latent: torch.Tensor | None


class LatentStream:
    """Latent-level streaming denoiser for one stream (owns its cache pool and registers)."""

    def __init__(self, dit: CausalWanDiT, sampler: FlowMatchSampler, prompt: PromptKV, noise: NoiseSource, *,
                 tokens_per_frame: int, steps: int = 2, mode: str = "v2v", batch: bool = True,
                 cache: CacheConfig = CacheConfig(), frames_per_block: int = 1, lag: int = 1,
                 renoise: NoiseSource | None = None, pool: KVPool | None = None, compile: bool = False):
        self.dit = dit
        self.mode = mode
        self.cache_config = cache
        self.frames_per_block = frames_per_block
        self.schedule = StreamSchedule(0, steps, mode=mode, batch=batch, cache=cache, lag=lag)
        device = next(dit.parameters()).device
        self.pool = pool or KVPool(dit.cache_layers, cache.capacity, tokens_per_frame, dit.heads, dit.head_dim,
                                   dit.dtype, device, text_len=dit.text_len)
        self.runner = Runner(dit, sampler, self.pool, CachePolicy(cache), tokens_per_frame, compile=compile)
        self.stream = RunnerStream(0, noise, renoise)
        self.runner.add(self.stream, self.schedule.rows)
        self.prompt = prompt

    # ------------------------------------------------------------------------------------------ state
    @property
    def prompt(self) -> PromptKV:
        return self._prompt

    @prompt.setter
    def prompt(self, prompt: PromptKV) -> None:
        self._prompt = prompt
        self.runner.set_prompt(0, prompt)

    @property
    def noise(self) -> NoiseSource:
        return self.stream.noise

    @noise.setter
    def noise(self, noise: NoiseSource) -> None:
        self.stream.noise = noise

    @property
    def cache(self) -> KVPool:
        return self.pool

    @property
    def rows(self) -> int:
        return self.schedule.rows

    @property
    def steps(self) -> int:
        return self.schedule.steps

    @property
    def batch(self) -> bool:
        return self.schedule.batch

    @property
    def step_list(self) -> list[int]:
        return self.schedule.steps_list

    @property
    def calls(self) -> int:
        return self.runner.calls

    @property
    def slots(self) -> list[SlotView | None]:
        """The registers of the batch processed last (slot 0 = newest chunk)."""
        return [None if s is None else SlotView(s.chunk, s.frame, s.rope, self.stream.latents.get(s.chunk))
                for s in self.schedule.slots]

    # ------------------------------------------------------------------------------------------ public
    @torch.no_grad()
    def prepare(self, z: torch.Tensor, s: float) -> torch.Tensor:
        """First chunk ``z [1, L, C, h, w]``: the full step list sequentially on cache row 0, then every row
        starts as a copy of row 0. Returns the clean latents of the chunk (the first output of the stream)."""
        self.stream.inputs[_PREPARE] = ChunkInput(z, s)
        (_, x0), = self._run(self.schedule.prepare(_PREPARE, z.shape[1]))
        return x0

    @torch.no_grad()
    def push(self, z: torch.Tensor, s, t: torch.Tensor, chunk: Hashable) -> list[tuple[Hashable, torch.Tensor]]:
        """Add a chunk's clean latents ``z [1, T, C, h, w]`` mixed at noise scale ``s``; the newest slot is
        denoised from timestep ``t`` (0-d int64 tensor). Returns the chunks finished by this call."""
        self.stream.inputs[chunk] = ChunkInput(z, s, torch.as_tensor(t).to(self.pool.device))
        return self._run(self.schedule.push(chunk, z.shape[1]))

    @torch.no_grad()
    def drain(self) -> list[tuple[Hashable, torch.Tensor]]:
        """Finish every in-flight chunk without adding one (end of stream, or before a reconfiguration)."""
        return self._run(self.schedule.drain(self.frames_per_block))

    @torch.no_grad()
    def reconfigure(self, steps: int, batch: bool | None = None) -> list[tuple[Hashable, torch.Tensor]]:
        """Change the step count (and mode) between chunks; in-flight chunks are finished first and returned.

        Cache rows are kept per level; a new level starts from the cache of the closest existing level.
        """
        return self._run(self.schedule.reconfigure(steps, batch, self.frames_per_block))

    def _run(self, stages: list[Stage]) -> list[tuple[Hashable, torch.Tensor]]:
        out = []
        for call in compose([stages]):
            out += [(d.row.chunk, d.latent) for d in self.runner.run(call)]
        return out
