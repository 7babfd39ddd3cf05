"""One pipeline stage: its share of the model, the state of the ring's streams on it, and its compute.

A stage owns a contiguous block range ``[a, b)`` of the DiT and holds on its device only those blocks' weights,
their KV caches and their cross-attention K/V, plus the small parts every stage needs (time and text embedders);
the first stage also holds the patch embedding, the last the head (:func:`~.launch.load_rank`, through the model
loader's part filter). Stage 0 also holds the VAE (encode) and, where prompts are given as text, the text
encoder; the last stage holds the VAE or TAEHV (decode), each stream's re-noising source and decoder state.

Each call is computed exactly as the single-process runner computes it, just cut at the block boundaries, so the
pipeline's output equals ``LatentStream(lag=W)`` to fp32 rounding. Busy and DiT time per call are recorded with
the engine's :class:`~wanstream.engine.timing.PhaseTimer` (never a sync) and travel with the call to rank 0's
block scheduler.

The stage sends and receives nothing itself: rank 0's :class:`~.driver.PipelineDriver` and the workers'
:class:`~.worker.Worker` move its messages. Imports ``core``, ``models``, ``engine`` (runner, noise, timing) and
:mod:`.protocol`; nothing above, no transport.
"""

from __future__ import annotations

import contextlib

import torch

from wanstream.core.block_scheduler import Move, apply_move
from wanstream.engine.noise import SeededNoise
from wanstream.engine.runner import settle
from wanstream.engine.timing import PhaseTimer
from wanstream.io.framing import unit_to_pixels
from wanstream.models.dit import PromptKV
from wanstream.models.kv_cache import CachePolicy, CacheStep, KVPool
from wanstream.models.loader import ModelBundle
from wanstream.pipeline.protocol import (
    DECODE_NONE,
    DECODE_TAEHV,
    DECODE_VAE,
    Kind,
    Message,
    PipeConfig,
    ProtocolError,
    StepMeta,
)


class Stage:
    """Compute and state of one rank's block range (see the module docstring)."""

    def __init__(self, model: ModelBundle, rank: int, world: int, ranges: list[tuple[int, int]]):
        self.model = model
        self.dit = model.dit
        self.sampler = model.sampler
        self.device = model.device
        self.rank, self.world = rank, world
        self.ranges = [tuple(r) for r in ranges]
        self.timer = PhaseTimer(self.device, keep=16, carry=True)   # rank 0: its encode counts in its next call
        self.cfg: PipeConfig | None = None
        self.pool: KVPool | None = None
        self.renoise: dict = {}         # last stage: each stream's re-noising source ...
        self.decoders: dict = {}        # ... and its streaming decoder state
        self.epoch = 0
        self.calls = 0
        self._latest = (0, 0)           # (DiT us, busy us) of the newest call whose timing completed

    # -------------------------------------------------------------- properties
    @property
    def blocks(self) -> tuple[int, int]:
        return self.ranges[self.rank]

    @property
    def layers(self) -> range:
        return range(*self.blocks)

    @property
    def is_last(self) -> bool:
        return self.rank == self.world - 1

    @property
    def next(self) -> int:
        return (self.rank + 1) % self.world

    # -------------------------------------------------------------- stream state
    def configure(self, cfg: PipeConfig) -> None:
        """Settings shared by every stream (resolution, cache, decoder) and an empty cache pool."""
        self.cfg = cfg
        self.policy = CachePolicy(cfg.cache)
        dit = self.dit
        self.pool = KVPool(self.layers, cfg.cache.capacity, cfg.tokens_per_frame, dit.heads, dit.head_dim,
                           self.model.dtype, self.device, text_len=dit.text_len)
        self.renoise, self.decoders = {}, {}

    def open_stream(self, stream: int, rows: int, renoise_seed: int, context: torch.Tensor) -> None:
        """One more stream: its cache rows, prompt K/V, and (last stage) re-noise source and decoder."""
        self.pool.acquire(stream, rows)
        self.set_prompt(stream, context)
        self._fresh_stream(stream, renoise_seed)

    def close_stream(self, stream: int) -> None:
        self.pool.release(stream)
        self.renoise.pop(stream, None)
        self.decoders.pop(stream, None)

    def reset_stream(self, stream: int, rows: int, renoise_seed: int) -> None:
        """A stream starts over (as the runner's reset): zeroed rows, fresh re-noise source and decoder."""
        self.pool.resize(stream, rows)
        lease = self.pool.leases[stream]
        self.pool.zero_rows(slice(lease.row, lease.row + lease.rows))
        self._fresh_stream(stream, renoise_seed)

    def _fresh_stream(self, stream: int, renoise_seed: int) -> None:
        if not self.is_last:
            return
        self.renoise[stream] = SeededNoise(renoise_seed, self.device)
        self.decoders[stream] = None
        if self.cfg.decode == DECODE_VAE:
            if self.model.vae is None:
                raise RuntimeError(f"rank {self.rank} decodes but was loaded without the VAE")
            self.decoders[stream] = self.model.vae.new_state()
        elif self.cfg.decode == DECODE_TAEHV:
            if self.model.taehv is None:
                raise RuntimeError(f"rank {self.rank} decodes with TAEHV but was loaded without it")
            from wanstream.models.taehv import TAEHVStreamDecoder
            self.decoders[stream] = TAEHVStreamDecoder(self.model.taehv)

    def set_prompt(self, stream: int, context: torch.Tensor) -> None:
        kv = self.dit.embed_prompt(context.to(self.device), layers=self.layers)
        self.pool.set_prompt(stream, kv.k, kv.v)

    def reconfigure_rows(self, stream: int, rows: int) -> None:
        """A stream's rows change (a step change, after its drain): re-laid as the runner does."""
        self.pool.resize(stream, rows)

    def reseed(self, stream: int, seed: int) -> None:
        if self.is_last and self.cfg is not None:
            self.renoise[stream] = SeededNoise(seed, self.device)

    # -------------------------------------------------------------- compute
    @contextlib.contextmanager
    def timed_call(self):
        """One call's busy time (everything inside, and what was recorded since the last call) and DiT time."""
        self.timer.start()
        with self.timer.section("busy"):
            yield
        self.timer.end()

    def timings(self, m: StepMeta) -> list[tuple[int, int, int]]:
        """The call's per-stage timings with this stage's appended: (DiT us, busy us, blocks) of its newest call
        whose device work completed (never waits; (0, 0) before the first)."""
        for _, secs in self.timer.ticks():
            self._latest = (int(secs.get("dit", 0.0) * 1e6), int(secs.get("busy", 0.0) * 1e6))
        return m.timings + [(*self._latest, self.blocks[1] - self.blocks[0])]

    def run(self, x: torch.Tensor, ts: torch.Tensor, m: StepMeta) -> torch.Tensor:
        """This stage's blocks for one call (latents in on stage 0, flow out on the last stage)."""
        if self.cfg is None:
            raise ProtocolError(f"rank {self.rank}: STEP before OPEN")
        leases = self.pool.leases
        step = CacheStep.build(self.policy, [r.frame for r in m.rows], [r.rope for r in m.rows], m.grid[0],
                               self.cfg.tokens_per_frame, self.device,
                               cache_rows=[leases[r.stream].row + r.cache_row for r in m.rows],
                               prompts=[leases[r.stream].slot for r in m.rows], streams=[r.stream for r in m.rows])
        with self.timer.section("dit"):
            out = self.dit(x, ts, PromptKV(self.pool.pk, self.pool.pv), self.pool, step, blocks=self.blocks,
                           grid=None if self.blocks[0] == 0 else tuple(m.grid))
        if m.copy_row0:
            for sid in {r.stream for r in m.rows}:
                self.pool.copy_row0(sid)
        self.calls += 1
        return out

    def grid_of(self, latents: torch.Tensor) -> tuple[int, int, int]:
        pt, ph, pw = self.dit.patch_size
        _, t, _, h, w = latents.shape
        return (t // pt, h // ph, w // pw)

    def finish(self, x_lat: torch.Tensor, flow: torch.Tensor, ts: torch.Tensor, m: StepMeta) -> Message:
        """Last stage: the call's outcome (``runner.settle``: x0, re-noise, clean rows) and the decode of the
        clean rows → the RETURN message for stage 0 (re-noised rows, then clean rows, then their frames)."""
        kept, finished = settle(self.sampler, x_lat, flow, ts, m.rows, self.renoise.__getitem__)
        out = StepMeta(m.epoch, [], m.grid, keep=len(kept), finished=len(finished))
        payloads = []
        if kept:
            payloads.append(torch.cat([x for _, x in kept]))
        if finished:
            payloads.append(torch.cat([x for _, x in finished]))
            if self.cfg.decode != DECODE_NONE:
                payloads += [self._decode(x, self.decoders[r.stream]) for r, x in finished]
                out.decoded = True
        return Message(Kind.RETURN, meta=out.to_meta(), payloads=payloads)

    def _decode(self, latent: torch.Tensor, state) -> torch.Tensor:
        """Clean latents → uint8 frames ``[T', H, W, 3]`` on this device (``state``: the stream's decoder)."""
        if self.cfg.decode == DECODE_VAE:
            pixels = self.model.vae.decode(state, latent)
        else:
            pixels = state.decode(latent)
        return unit_to_pixels(pixels[0])

    def memory_bytes(self) -> int:
        """Peak device memory on CUDA; on the CPU the bytes this stage holds (weights, caches, prompt K/V, VAE)."""
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        total = self.model.resident_bytes()
        if self.pool is not None:
            total += self.pool.nbytes()
        for extra in (self.model.vae.vae if self.model.vae is not None else None, self.model.taehv):
            if extra is not None:
                total += sum(p.numel() * p.element_size() for p in extra.parameters())
        return total

    # -------------------------------------------------------------- block moves
    def export_block(self, i: int) -> Message:
        """Take block ``i`` off this stage: its weights, KV cache and prompt K/V in a BLOCK message."""
        blk = self.dit.transformer.blocks[i]
        params = [t.detach() for t in blk.state_dict().values()]
        has_cache = self.pool is not None and i in self.pool.k
        payloads = list(params)
        if has_cache:
            payloads += list(self.pool.pop_layer(i))   # K, V, K means, V means, prompt K, prompt V
        blk.to("meta")
        return Message(Kind.BLOCK, meta=[i, len(params), int(has_cache), self.epoch],
                       payloads=payloads)

    def import_block(self, msg: Message) -> int:
        i, n, has_cache, _ = msg.meta[:4]
        blk = self.dit.transformer.blocks[i]
        names = list(blk.state_dict().keys())
        shapes = [t.shape for t in blk.state_dict().values()]
        if n != len(names) or len(msg.payloads) != n + 6 * has_cache:
            raise ProtocolError(f"rank {self.rank}: block {i} arrived with {len(msg.payloads)} tensors")
        params = msg.payloads[:n]
        for name, shape, t in zip(names, shapes, params):
            if t.shape != shape:
                raise ProtocolError(f"rank {self.rank}: block {i} tensor {name} {tuple(t.shape)} vs {tuple(shape)}")
        blk.load_state_dict(dict(zip(names, params)), strict=True, assign=True)
        blk.requires_grad_(False)
        rest = msg.payloads[n:]
        if has_cache:
            if self.pool is None:
                raise ProtocolError(f"rank {self.rank}: block {i} brought a KV cache but no stream is running")
            self.pool.put_layer(i, *rest[:6])
        return i

    def apply_move(self, move: Move) -> None:
        self.ranges = apply_move(self.ranges, move)
