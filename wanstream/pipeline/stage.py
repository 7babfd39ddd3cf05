"""One pipeline stage: its share of the model, its stream state, its compute and its message handling.

A stage owns a contiguous block range ``[a, b)`` of the DiT and holds on its device only those blocks' weights,
their KV caches and their cross-attention K/V, plus the small shared parts every stage needs (patch embedding,
time and text embedders, head: about 2 % of the 1.3B / 14B weights). Stage 0 also holds the VAE (encode) and,
where prompts are given as text, the text encoder; the last stage holds the VAE or TAEHV (decode). Weights are
read from the checkpoint selectively (``mmap`` for ``model.pt``, per-tensor for safetensors): a stage never
materialises blocks it does not run.

Worker ranks run :meth:`Stage.serve`; stage 0 is driven by :class:`~.driver.PipelineDriver`. Each STEP is
computed exactly as the single-process :class:`~wanstream.engine.latent_stream.LatentStream` computes that call, just
cut at the block boundaries, so the pipeline's output equals ``LatentStream(lag=W)`` to fp32 rounding.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from wanstream.core.block_scheduler import Move, apply_move, format_split
from wanstream.core.config import CacheConfig
from wanstream.core.schedule import Row, step_list
from wanstream.engine.noise import SeededNoise
from wanstream.engine.runner import settle
from wanstream.engine.timing import recorded_seconds
from wanstream.models.dit import PromptKV
from wanstream.models.kv_cache import CachePolicy, CacheStep, KVPool
from wanstream.models.loader import ModelBundle
from wanstream.pipeline.protocol import Kind, Message, ProtocolError, f2i, i2f
from wanstream.pipeline.transport import Health, Transport

log = logging.getLogger("wanstream.pipeline")

DECODE_NONE, DECODE_VAE, DECODE_TAEHV = 0, 1, 2
STREAM = 0                      # the stream of a START (the single-stream API); OPEN adds streams by id


# ============================================================================================ settings
@dataclass
class PipeConfig:
    """Stream settings every stage needs (travels in START)."""

    steps: int = 2
    batch: bool = True
    mode: str = "v2v"
    tokens_per_frame: int = 0
    cache: CacheConfig = field(default_factory=CacheConfig)
    decode: int = DECODE_NONE
    renoise_seed: int = 0

    def to_meta(self) -> list[int]:
        c = self.cache
        return [self.steps, int(self.batch), 0 if self.mode == "v2v" else 1, self.tokens_per_frame, c.capacity,
                c.sink, f2i(c.sink_threshold), c.rope_wrap_at, c.rope_wrap_to, self.decode, self.renoise_seed]

    @classmethod
    def from_meta(cls, m: list[int]) -> "PipeConfig":
        cache = CacheConfig(capacity=m[4], sink=m[5], sink_threshold=i2f(m[6]), rope_wrap_at=m[7], rope_wrap_to=m[8])
        return cls(m[0], bool(m[1]), "v2v" if m[2] == 0 else "t2v", m[3], cache, m[9], m[10])


ROW_INTS = 8     # per row in a STEP: stream, level, cache row, frame, rope, final, t, t_next


@dataclass
class StepMeta:
    """Metadata of a STEP / RETURN (host ints): the call's rows exactly as the scheduler planned them, so every
    stage builds the same CacheStep and the last stage settles the rows the same way the runner does."""

    epoch: int
    rows: list[Row]                    # the call's rows (chunk ids stay on rank 0)
    grid: tuple[int, int, int]
    copy_row0: bool = False            # after the call: the rows' streams copy cache row 0 to all rows (prepare)
    keep: int = 0                      # RETURN: re-noised rows returned
    finished: int = 0                  # RETURN: clean rows returned
    decoded: bool = False              # RETURN: their decoded frames are included
    timings: list[tuple[int, int, int]] = field(default_factory=list)   # per stage: (dit us, busy us, blocks)

    def to_meta(self) -> list[int]:
        out = [self.epoch, len(self.rows), *self.grid, int(self.copy_row0), self.keep, self.finished,
               int(self.decoded), len(self.timings)]
        for r in self.rows:
            out += [int(r.stream), r.level, r.cache_row, r.frame, r.rope, int(r.final), r.t, r.t_next]
        for t in self.timings:
            out += list(t)
        return out

    @classmethod
    def from_meta(cls, m: list[int]) -> "StepMeta":
        epoch, n, f, h, w, copy, keep, fin, dec, nt = m[:10]
        body = m[10:]
        if len(body) != ROW_INTS * n + 3 * nt:
            raise ProtocolError(f"step metadata of {len(m)} ints does not match its counts")
        rows = []
        for i in range(n):
            sid, level, crow, frame, rope, final, t, t_next = body[ROW_INTS * i: ROW_INTS * (i + 1)]
            rows.append(Row(sid, None, level, crow, frame, rope, bool(final), False, t, t_next))
        tail = body[ROW_INTS * n:]
        timings = [tuple(tail[3 * i: 3 * i + 3]) for i in range(nt)]
        return cls(epoch, rows, (f, h, w), bool(copy), keep, fin, bool(dec), timings)


# ============================================================================================ timing
class StageTimer:
    """Per-call busy time and DiT time of this stage: host clock on CPU, CUDA events on GPU (read only once
    they completed, so timing never forces a sync)."""

    def __init__(self, device: torch.device, keep: int = 16):
        self.cuda = torch.device(device).type == "cuda"
        self.records: deque = deque(maxlen=keep)
        self._cur: dict | None = None
        self._pending: dict = {"dit": [], "busy": []}

    def start_call(self) -> None:
        self._cur, self._pending = self._pending, {"dit": [], "busy": []}

    def end_call(self) -> None:
        if self._cur is not None:
            self.records.append(self._cur)
        self._cur = None

    @contextlib.contextmanager
    def section(self, name: str):
        rec = self._cur if self._cur is not None else self._pending
        if self.cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            yield
            e.record()
            rec[name].append((s, e))
        else:
            t = time.perf_counter()
            yield
            rec[name].append(time.perf_counter() - t)

    def _sum(self, items) -> float | None:
        return recorded_seconds(items, self.cuda)

    def latest(self) -> tuple[int, int]:
        """(DiT us, busy us) of the newest completed call; (0, 0) before the first."""
        for rec in reversed(self.records):
            dit, busy = self._sum(rec["dit"]), self._sum(rec["busy"])
            if dit is not None and busy is not None:
                return int(dit * 1e6), int(busy * 1e6)
        return 0, 0


# ============================================================================================ stage
class Stage:
    """Compute and state of one rank's block range (see the module docstring)."""

    def __init__(self, model: ModelBundle, rank: int, world: int, ranges: list[tuple[int, int]],
                 transport: Transport | None = None, health: Health | None = None):
        self.model = model
        self.dit = model.dit
        self.sampler = model.sampler
        self.device = model.device
        self.rank, self.world = rank, world
        self.ranges = [tuple(r) for r in ranges]
        self.transport = transport
        self.health = health
        self.timer = StageTimer(self.device)
        self.cfg: PipeConfig | None = None
        self.pool: KVPool | None = None
        self.renoise: dict = {}         # last stage: each stream's re-noising source ...
        self.decoders: dict = {}        # ... and its streaming decoder state
        self.epoch = 0
        self.calls = 0
        self.fault: str | None = None

    # -------------------------------------------------------------- properties
    @property
    def blocks(self) -> tuple[int, int]:
        return self.ranges[self.rank]

    @property
    def layers(self) -> range:
        return range(*self.blocks)

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.world - 1

    @property
    def next(self) -> int:
        return (self.rank + 1) % self.world

    # -------------------------------------------------------------- stream state
    def start(self, cfg: PipeConfig, context: torch.Tensor) -> None:
        """A new pipeline state with one stream (``STREAM``): fresh cache pool, its rows and prompt K/V for this
        stage's blocks, its re-noise source / decoder."""
        self.configure(cfg)
        self.open_stream(STREAM, self.rows_for(cfg.steps), cfg.renoise_seed, context)

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
        self.set_prompt(context, stream)
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

    def rows_for(self, steps: int) -> int:
        return len(step_list(steps, self.cfg.mode)) if self.cfg.batch else 1

    def set_prompt(self, context: torch.Tensor, stream: int = STREAM) -> None:
        kv = self.dit.embed_prompt(context.to(self.device), layers=self.layers)
        self.pool.set_prompt(stream, kv.k, kv.v)

    def reconfigure_rows(self, stream: int, rows: int) -> None:
        """A stream's rows change (a step change, after its drain): re-laid as the runner does."""
        self.pool.resize(stream, rows)

    def reseed(self, seed: int, stream: int = STREAM) -> None:
        if self.is_last and self.cfg is not None:
            self.renoise[stream] = SeededNoise(seed, self.device)

    # -------------------------------------------------------------- compute
    def run(self, x: torch.Tensor, ts: torch.Tensor, m: StepMeta) -> torch.Tensor:
        """This stage's blocks for one call (latents in on stage 0, flow out on the last stage)."""
        if self.cfg is None:
            raise ProtocolError(f"rank {self.rank}: STEP before START")
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
        frames = ((pixels[0].float() + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)
        return frames.permute(0, 2, 3, 1).contiguous()

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

    # -------------------------------------------------------------- worker loop
    def serve(self) -> None:
        """Worker ranks (1 .. W-1): handle messages from the previous rank until STOP."""
        tr = self.transport
        prev = (self.rank - 1) % self.world
        while True:
            msg = tr.recv(prev, "the next message")
            kind = msg.kind
            if kind == Kind.STEP:
                self._on_step(msg)
            elif kind == Kind.START:
                tr.consume(msg)
                self.start(PipeConfig.from_meta(msg.meta), msg.payloads[0])
                self._forward(msg)
            elif kind == Kind.OPEN:
                tr.consume(msg)
                cfg, (stream, rows, fresh) = PipeConfig.from_meta(msg.meta), msg.meta[-3:]
                if fresh:
                    self.configure(cfg)
                self.open_stream(stream, rows, cfg.renoise_seed, msg.payloads[0])
                self._forward(msg)
            elif kind == Kind.CLOSE:
                self.close_stream(msg.meta[0])
                self._forward(msg)
            elif kind == Kind.RESET:
                self.reset_stream(*msg.meta[:3])
                self._forward(msg)
            elif kind == Kind.PROMPT:
                tr.consume(msg)
                self.set_prompt(msg.payloads[0], *msg.meta[:1])
                self._forward(msg)
            elif kind == Kind.RECONFIG:
                self.reconfigure_rows(*msg.meta[:2])
                self._forward(msg)
            elif kind == Kind.SEED:
                self.reseed(*msg.meta[:2])
                self._forward(msg)
            elif kind == Kind.MOVE:
                self._on_move(msg)
            elif kind == Kind.STOP:
                self._on_stop(msg)
                return
            else:
                raise ProtocolError(f"rank {self.rank}: unexpected {kind.name} from rank {prev}")

    def _forward(self, msg: Message) -> None:
        if not self.is_last:
            self.transport.send(self.next, Message(msg.kind, msg.call, list(msg.meta), list(msg.payloads)))

    def _injected_fault(self, call: int) -> None:
        """Tests only (``LaunchSpec.fault = "hang:<rank>:<call>"``): stall like a stuck kernel, heartbeat alive."""
        kind, rank, at = (self.fault.split(":") + ["", "", ""])[:3]
        if kind == "hang" and int(rank) == self.rank and call >= int(at):
            self.health.mark(f"computing call {call}")
            time.sleep(600)

    def _on_step(self, msg: Message) -> None:
        tr = self.transport
        if self.fault:
            self._injected_fault(msg.call)
        tr.consume(msg)
        m = StepMeta.from_meta(msg.meta)
        hidden, x_lat, ts = msg.payloads
        self.timer.start_call()
        with self.timer.section("busy"):
            out = self.run(hidden, ts, m)
            tr.release(msg)
            if self.is_last:
                reply = self.finish(x_lat, out, ts, m)
        self.timer.end_call()
        dit_us, busy_us = self.timer.latest()
        timings = m.timings + [(dit_us, busy_us, self.blocks[1] - self.blocks[0])]
        if self.is_last:
            meta = StepMeta.from_meta(reply.meta)
            meta.timings = timings
            reply.meta = meta.to_meta()
            reply.call = msg.call
            tr.send(self.next, reply)
        else:
            m.timings = timings
            tr.send(self.next, Message(Kind.STEP, msg.call, m.to_meta(), [out, x_lat, ts]))

    def _on_move(self, msg: Message) -> None:
        block, src, dst, epoch = msg.meta[:4]
        move = Move(block, src, dst)
        self._forward(msg)
        self.move_local(move, epoch)

    def move_local(self, move: Move, epoch: int) -> None:
        """This rank's part of a move (after the MOVE went on): send or receive the block, update the split."""
        tr = self.transport
        if move.src == self.rank:
            out = self.export_block(move.block)
            tr.send(move.dst, out)
            log.info("rank %d: sent block %d to rank %d (%.1f MB)", self.rank, move.block, move.dst,
                     sum(p.numel() * p.element_size() for p in out.payloads) / 1e6)
        elif move.dst == self.rank:
            msg = self.recv_block(move.src)
            self.import_block(msg)
            log.info("rank %d: received block %d from rank %d", self.rank, move.block, move.src)
        self.apply_move(move)
        self.epoch = epoch
        if move.src == self.rank or move.dst == self.rank:
            log.info("rank %d: split now %s", self.rank, format_split(self.ranges))

    def recv_block(self, src: int) -> Message:
        msg = self.transport.recv(src, "a moved block")
        if msg.kind != Kind.BLOCK:
            raise ProtocolError(f"rank {self.rank}: expected BLOCK from rank {src}, got {msg.kind.name}")
        self.transport.consume(msg)
        return msg

    def _on_stop(self, msg: Message) -> None:
        """Pass STOP on every outgoing link (the last rank's ring link is the acknowledgement to rank 0), then
        wait for STOP on every other incoming link so all receiver threads end."""
        tr = self.transport
        for dst in tr.outs:
            tr.send(dst, Message(Kind.STOP))
        prev = (self.rank - 1) % self.world
        for src in tr.ins:
            if src == prev:
                continue
            while True:
                m = tr.recv(src, "STOP")
                if m.kind == Kind.STOP:
                    break
