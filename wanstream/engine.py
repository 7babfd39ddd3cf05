"""The engine: every stream of a model, scheduled together — one DiT call per tick over the rows of all of them.

Streams join an :class:`Engine` (``open``), are fed frames (``feed``, any thread), get live changes (``update``,
``set_prompt_embedding``, ``reset``, ``finish``, ``close``) and collect their restyled frames. One tick
(:meth:`Engine.step`), per resolution group of streams:

1. pending changes of each stream apply (a step change drains the stream's in-flight chunks first);
2. the :class:`~wanstream.scheduler.Scheduler` decides which streams' next chunk enters now (continuous batching:
   every stream with a whole chunk queued; with a deadline policy it may hold a stream back a tick, switch a stream
   to the sequential mode, or drop frames that would miss their deadline), from each stream's queued frames;
3. the chunks are VAE-encoded (one call per group of streams whose shapes agree), the motion-aware controller picks
   each chunk's noise level, and each stream's schedule (``scheduler.StreamSchedule``) turns it into rows;
4. :func:`~wanstream.scheduler.compose` merges all streams' rows into calls and the runner executes them — in the
   steady state ONE DiT call whose rows are the stream-batch slots of every stream, over a shared KV-cache pool;
5. finished chunks are decoded and handed to their streams as :class:`OutputFrame` s.

Each stream keeps everything of its own (prompt, noise, controller, VAE caches, cache rows, schedule), so its
output is the same whether it runs alone or batched with others (up to float rounding of batched matmuls). A
failure in one stream's own work (its frames, its encode or decode, its prompt) ends only that stream.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Hashable, Mapping, Sequence

import numpy as np
import torch

from .chunking import ChunkBuffer, ChunkInfo
from .config import LATENT_MEAN, LATENT_STD, CacheConfig, StreamSettings
from .io.video import FIT_MODES, fit_frames
from .kv_cache import CachePolicy, KVPool
from .noise import NoiseSource, SeededNoise, renoise_seed
from .noise_controller import NoiseController
from .runner import ChunkInput, Done, Runner, RunnerStream
from .scheduler import (Decision, LatencyModel, Scheduler, SLOConfig, Stage, StreamSchedule, StreamView,
                        compose)
from .timing import PhaseTimer
from .transfer import download_frames, upload_frames

log = logging.getLogger("wanstream.engine")


@dataclass
class OutputFrame:
    image: np.ndarray    # [H, W, 3] uint8
    index: int           # the frame id of the input frame it restyles (its input index unless the caller gave one)
    timestamp: float     # that input frame's timestamp


class StreamFailed(RuntimeError):
    """A stream ended with an error (its own work failed); other streams are unaffected."""


@dataclass
class StreamStats:
    """Counters of one stream's scheduling (exported by the server and the benchmark)."""

    chunks: int = 0
    frames_out: int = 0
    dropped_late: int = 0          # frames dropped because they would miss their deadline
    dropped_reset: int = 0         # frames in flight when the stream was reset
    deferred: int = 0              # ticks the stream was held back to keep others within their deadline
    sequential_switches: int = 0
    batch_switches: int = 0
    last_reasons: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


# ============================================================================================ one stream
class EngineStream:
    """One stream inside an :class:`Engine`: its settings, input queue, schedule and per-stream state."""

    def __init__(self, engine: "Engine", sid: int, group: "Group", *, settings: StreamSettings, width: int,
                 height: int, decoder: str, embedding: torch.Tensor, noise: NoiseSource | None,
                 max_queue_chunks: int | None, target_latency_s: float | None, buffer: ChunkBuffer | None = None,
                 fit: str = "crop", encoder: str = "vae"):
        self.engine = engine
        self.id = sid
        self.group = group
        self.settings = settings
        self.width, self.height = width, height
        self.fit = fit                 # framing of input frames of another aspect (io.video.fit_frames)
        self.decoder = decoder
        self.encoder = encoder         # "vae" | "taehv" (streams of any encoder / decoder mix share DiT calls)
        self.target_latency_s = target_latency_s
        self.buffer = buffer if buffer is not None else ChunkBuffer(max_chunks=max_queue_chunks)
        self.stats = StreamStats()
        self.outbox: deque[OutputFrame] = deque()
        self.closed = False
        self.error: str | None = None
        self._injected_noise = noise
        self._embedding = embedding
        self._transition: tuple[torch.Tensor, torch.Tensor, int, int] | None = None
        self._updates: deque[tuple[str, object]] = deque()
        self._lock = threading.Lock()
        self.finishing = False         # end of input: pad the last chunk, then drain
        self.deferred_run = 0          # consecutive ticks held back
        self.since_switch = 10 ** 9    # ticks since the last mode switch
        self._fresh()

    # ------------------------------------------------------------------------------------------ state
    def hand_noise(self) -> None:
        """The runner's copy of this stream's noise sources (after a reset or a new seed)."""
        rs = self.group.runner.streams[self.id]
        rs.noise, rs.renoise_source = self.noise, self.renoise

    def _fresh(self) -> None:
        """A new stream (also a reset): schedule, noise, controller, VAE caches, chunk bookkeeping."""
        m = self.engine.model
        st = self.settings
        self.schedule = StreamSchedule(self.id, st.steps, batch=st.batch, cache=st.cache, lag=self.group.runner.lag)
        self.noise = self._injected_noise or SeededNoise(st.seed, m.device)
        # re-noising between steps draws from its own source (as on a pipeline's last rank); injected noise
        # (a replayed reference run) serves both
        self.renoise = None if self._injected_noise is not None else SeededNoise(renoise_seed(st.seed), m.device)
        self.controller = NoiseController(st.noise_scale, enabled=st.noise_controller)
        self.prev_frame: torch.Tensor | None = None
        if self.encoder == "vae":
            self.enc_state = m.vae.new_state()
        else:
            from .models.taehv import TAEHVStreamEncoder
            # TAEHV latents mapped to the Wan encoder's un-normalised mean: the DiT's input convention here
            self.enc_state = TAEHVStreamEncoder(m.taehv, LATENT_MEAN, LATENT_STD)
        if self.decoder == "vae":
            self.dec_state = m.vae.new_state()
        else:
            from .models.taehv import TAEHVStreamDecoder
            self.dec_state = TAEHVStreamDecoder(m.taehv)
        self.chunks: dict[int, ChunkInfo] = {}
        self.next_chunk = 0

    @property
    def prepared(self) -> bool:
        return self.schedule.prepared

    @property
    def frames_in(self) -> int:
        return self.buffer.frames_in

    @property
    def embedding(self) -> torch.Tensor:
        return self._embedding

    @property
    def in_flight_frames(self) -> int:
        """Input frames taken by the model whose output has not come out yet."""
        return sum(info.real for info in self.chunks.values())

    def take_outputs(self) -> list[OutputFrame]:
        out = []
        while self.outbox:
            out.append(self.outbox.popleft())
        return out

    def _queue_update(self, kind: str, value) -> None:
        with self._lock:
            self._updates.append((kind, value))

    def _pop_updates(self) -> list[tuple[str, object]]:
        with self._lock:
            out = list(self._updates)
            self._updates.clear()
        return out

    def has_work(self) -> bool:
        with self._lock:
            pending = bool(self._updates)
        return not self.closed and (pending or self.finishing or self.buffer.ready())


# ============================================================================================ groups
@dataclass
class Group:
    """Streams that can share DiT calls: same resolution and cache configuration."""

    key: tuple
    runner: Runner                 # or the multi-GPU pipeline's runner (same interface)
    scheduler: Scheduler
    tokens_per_frame: int
    streams: list[EngineStream] = field(default_factory=list)


class Engine:
    """The multi-stream engine of one model (see the module docstring)."""

    def __init__(self, model, *, slo: SLOConfig | None = None, policy: str = "continuous",
                 clock: Callable[[], float] = time.perf_counter, reserve_rows: int = 0, runner_factory=None,
                 batch_vae: bool | None = None, compile: bool = False):
        if policy not in ("continuous", "round_robin"):
            raise ValueError(f"policy must be 'continuous' or 'round_robin', got {policy!r}")
        self.model = model
        self.slo = slo
        self.policy = policy
        self.clock = clock
        self.reserve_rows = reserve_rows
        self.runner_factory = runner_factory      # (engine, width, height, cache) → runner; default: one device
        self.compile = compile                    # the default runner's steady-state DiT call compiled (+ CUDA graphs)
        # VAE work of several streams in one call: on by default on GPUs (fewer launches, the device never waits
        # on Python between streams); off on the CPU, where stacking the caches measured slower at larger sizes
        self.batch_vae = model.device.type == "cuda" if batch_vae is None else bool(batch_vae)
        self.timer = PhaseTimer(model.device)
        self.groups: dict[tuple, Group] = {}
        self.streams: dict[int, EngineStream] = {}
        self._next_id = 0
        self._rr = 0
        self._registry = threading.Lock()         # streams / groups
        self._tick = threading.RLock()            # one tick at a time
        self._closed: list[EngineStream] = []
        self.ticks = 0
        self.chunks = 0                           # chunks that entered the model
        self.dit_calls = 0
        self.rows_run = 0
        self.on_fault: Callable[[EngineStream, str], None] | None = None

    # ------------------------------------------------------------------------------------------ streams
    def open(self, *, prompt_embeds: torch.Tensor, width: int, height: int, steps: int = 2,
             noise_scale: float = 0.8, noise_controller: bool = True, batch: bool = True, seed: int = 0,
             cache: CacheConfig | None = None, decoder: str = "vae", encoder: str = "vae",
             noise: NoiseSource | None = None,
             max_queue_chunks: int | None = None, target_latency_s: float | None = None,
             buffer: ChunkBuffer | None = None, fit: str = "crop",
             lora: Mapping[str, float] | None = None) -> EngineStream:
        """A new stream; ``prompt_embeds [1, L, text_dim]`` (zero-padded to the text length here). ``buffer``: an
        input queue the caller already fills (the server's session), else a new one; ``fit``: how frames of
        another aspect are framed; ``lora``: strengths by LoRA name (others: the loaded defaults); ``encoder`` /
        ``decoder``: ``vae`` (Wan VAE) or ``taehv`` (the tiny autoencoder) at each end: streams with any mix share
        DiT calls."""
        if width % 16 or height % 16 or width <= 0 or height <= 0:
            raise ValueError(f"resolution must be positive multiples of 16, got {width}x{height}")
        for name, value in (("decoder", decoder), ("encoder", encoder)):
            if value not in ("vae", "taehv"):
                raise ValueError(f"{name} must be 'vae' or 'taehv', got {value!r}")
            if value == "taehv" and getattr(self.model, "taehv", None) is None:
                raise ValueError(f"{name}='taehv' needs a model loaded with taehv=True")
        if fit not in FIT_MODES:
            raise ValueError(f"fit must be one of {', '.join(FIT_MODES)}, got {fit!r}")
        settings = StreamSettings(steps=steps, noise_scale=noise_scale, noise_controller=noise_controller,
                                  batch=batch, seed=seed, cache=cache or CacheConfig(),
                                  lora=self.lora_strengths(lora))
        embedding = self.pad_prompt(prompt_embeds)
        with self._tick, self._registry, torch.inference_mode():
            group = self._group(width, height, settings.cache)
            sid = self._next_id
            self._next_id += 1
            s = EngineStream(self, sid, group, settings=settings, width=width, height=height, decoder=decoder,
                             encoder=encoder,
                             embedding=embedding, noise=noise, max_queue_chunks=max_queue_chunks,
                             target_latency_s=target_latency_s, buffer=buffer, fit=fit)
            group.runner.add(RunnerStream(sid, s.noise, lora=settings.lora, renoise_source=s.renoise),
                             s.schedule.rows)
            group.runner.set_prompt(sid, embedding)
            group.streams.append(s)
            self.streams[sid] = s
        return s

    def lora_strengths(self, lora: Mapping[str, float] | None) -> tuple[float, ...] | None:
        """A validated LoRA strength vector from strengths by name (``None``: the loaded defaults)."""
        lora_set = self.model.dit.lora
        if lora_set is None:
            if lora:
                raise ValueError(f"no LoRA is loaded (asked for {', '.join(map(repr, lora))})")
            return None
        return None if lora is None else lora_set.strengths(lora)

    def pad_prompt(self, embeds: torch.Tensor) -> torch.Tensor:
        """Validate a prompt embedding and zero-pad it to the text length (so embeddings can be blended)."""
        dit = self.model.dit
        text_dim = dit.transformer.config.text_dim
        embeds = torch.as_tensor(embeds)
        if embeds.ndim == 2:
            embeds = embeds[None]
        if embeds.ndim != 3 or embeds.shape[0] != 1 or embeds.shape[2] != text_dim:
            raise ValueError(f"prompt embedding must be [L, {text_dim}], got {tuple(embeds.shape)}")
        if embeds.shape[1] > dit.text_len:
            raise ValueError(f"prompt embedding has {embeds.shape[1]} rows, at most {dit.text_len} allowed")
        if not torch.isfinite(embeds).all():
            raise ValueError("prompt embedding has non-finite values")
        embeds = torch.nn.functional.pad(embeds, (0, 0, 0, dit.text_len - embeds.shape[1]))
        return embeds.to(self.model.device, self.model.dtype)

    def _group(self, width: int, height: int, cache: CacheConfig) -> Group:
        key = (width, height, cache)
        g = self.groups.get(key)
        if g is None:
            m, dit = self.model, self.model.dit
            tpf = m.tokens_per_frame(height, width)
            if self.runner_factory is not None:
                runner = self.runner_factory(self, width, height, cache)
            else:
                pool = KVPool(range(dit.num_layers), cache.capacity, tpf, dit.heads, dit.head_dim, dit.dtype,
                              m.device, text_len=dit.text_len)
                if self.reserve_rows:
                    pool.reserve(self.reserve_rows)
                runner = Runner(dit, m.sampler, pool, CachePolicy(cache), tpf, timer=self.timer, compile=self.compile)
            g = self.groups[key] = Group(key, runner, Scheduler(self.slo, LatencyModel()), tpf)
        return g

    def feed(self, stream: EngineStream, frames, timestamps: Sequence[float] | None = None,
             arrivals: Sequence[float] | None = None, frame_ids: Sequence[int] | None = None) -> int:
        """Queue frames (uint8 ``[N, H, W, 3]`` or ``[H, W, 3]``, any size: framed by the stream's ``fit``).
        Thread-safe. Returns how many queued frames were pushed out of a bounded queue."""
        if stream.closed:
            raise RuntimeError("this stream is closed" + (f": {stream.error}" if stream.error else ""))
        arr = np.asarray(frames)
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4 or arr.shape[-1] != 3:
            raise ValueError(f"frames must be uint8 [N, H, W, 3] or [H, W, 3], got shape {arr.shape}")
        if arr.dtype != np.uint8:
            raise ValueError(f"frames must be uint8, got {arr.dtype}")
        if arr.shape[1:3] != (stream.height, stream.width):
            arr = fit_frames(arr, stream.width, stream.height, stream.fit)
        n = arr.shape[0]
        now = self.clock()
        timestamps = [now] * n if timestamps is None else list(timestamps)
        if len(timestamps) != n:
            raise ValueError(f"got {n} frames but {len(timestamps)} timestamps")
        arrivals = timestamps if arrivals is None else list(arrivals)
        dropped = 0
        for i in range(n):
            dropped += stream.buffer.push(arr[i], timestamps[i], arrivals[i],
                                          None if frame_ids is None else frame_ids[i])
        return dropped

    def update(self, stream: EngineStream, *, steps: int | None = None, noise_scale: float | None = None,
               noise_controller: bool | None = None, seed: int | None = None,
               lora: Mapping[str, float] | None = None) -> None:
        """Knob changes, applied in order at the stream's next tick (before its next chunk). ``lora``: strengths
        by LoRA name (a name left out: its default strength)."""
        if steps is not None:
            StreamSettings(steps=steps)                 # validates
            stream._queue_update("steps", int(steps))
        if noise_scale is not None:
            StreamSettings(noise_scale=noise_scale)
            stream._queue_update("noise_scale", float(noise_scale))
        if noise_controller is not None:
            stream._queue_update("noise_controller", bool(noise_controller))
        if seed is not None:
            stream._queue_update("seed", int(seed))
        if lora is not None:
            stream._queue_update("lora", self.lora_strengths(lora))

    def set_prompt_embedding(self, stream: EngineStream, embedding: torch.Tensor, transition_chunks: int = 0) -> None:
        """New prompt from the stream's next DiT call; with ``transition_chunks`` = K > 0 the embedding moves
        linearly from the current one over the next K chunks."""
        stream._queue_update("prompt", (self.pad_prompt(embedding), int(transition_chunks)))

    def reset(self, stream: EngineStream, discard_queued: bool = True) -> None:
        """Start over on the next frame: queued frames are discarded, in-flight chunks dropped, fresh state.
        ``discard_queued=False``: the caller restarted the stream's buffer itself when the reset was asked for (the
        frames queued since then are the new start)."""
        if discard_queued:
            stream.buffer.restart()
        stream._queue_update("reset", None)

    def finish(self, stream: EngineStream) -> None:
        """End of input: the remaining frames go in (the last partial chunk padded), then the stream drains, so
        every frame fed comes out."""
        stream.finishing = True

    def close(self, stream: EngineStream) -> None:
        """End a stream (any thread); its cache rows go back to the pool at the start of the next tick, or at
        :meth:`release_closed`."""
        if stream.closed:
            return
        stream.closed = True
        with self._registry:
            self._closed.append(stream)

    def release_closed(self) -> None:
        """Give the rows of closed streams back to the pool now (waits for a running tick)."""
        with self._tick, torch.inference_mode():
            self._release_closed()

    def _release_closed(self) -> None:
        with self._registry:
            closed, self._closed = self._closed, []
            for s in closed:
                self.streams.pop(s.id, None)
                if s in s.group.streams:
                    s.group.streams.remove(s)
                    s.group.runner.remove(s.id)
                s.chunks.clear()
                s.outbox.clear()

    def fail(self, stream: EngineStream, message: str) -> None:
        """End a stream with an error (its own work failed); the others go on."""
        if stream.closed:
            return
        stream.error = message
        log.warning("stream %s failed: %s", stream.id, message)
        self.close(stream)
        if self.on_fault is not None:
            self.on_fault(stream, message)

    # ------------------------------------------------------------------------------------------ admission
    def admit(self, width: int, height: int, steps: int, input_fps: float | None,
              cache: CacheConfig | None = None) -> tuple[bool, str]:
        """Whether another stream keeps every stream at its input rate (from the measured tick latency)."""
        cache = cache or CacheConfig()
        with self._registry:
            g = self.groups.get((width, height, cache))
            if g is None:
                return True, "no stream of this resolution yet"
            rows = sum(s.schedule.rows for s in g.streams if not s.closed)
            rates = [r for r in ([input_fps] if input_fps else []) if r]
            return g.scheduler.admit(rows, steps, rates)

    def stream_bytes(self, width: int, height: int, steps: int, cache: CacheConfig | None = None) -> int:
        """Device bytes a new stream adds to the cache pool (its rows and prompt slot)."""
        cache = cache or CacheConfig()
        dit = self.model.dit
        elem = torch.finfo(self.model.dtype).bits // 8
        tokens = self.model.tokens_per_frame(height, width)
        per_row = 2 * dit.num_layers * cache.capacity * tokens * dit.dim * elem
        per_slot = 2 * dit.num_layers * dit.text_len * dit.dim * elem
        return steps * per_row + per_slot

    # ------------------------------------------------------------------------------------------ ticks
    def has_work(self) -> bool:
        with self._registry:
            streams = list(self.streams.values())
            closed = bool(self._closed)
        return closed or any(s.has_work() for s in streams)

    def step(self) -> dict[int, list[OutputFrame]]:
        """One tick over every group (see the module docstring). Returns the new output frames per stream (they
        are also queued in each stream's ``outbox``)."""
        with self._tick, torch.inference_mode():
            self._release_closed()
            out: dict[int, list[OutputFrame]] = {}
            for g in list(self.groups.values()):
                self._tick_group(g, out)
            return out

    def run_until_idle(self, max_ticks: int = 10 ** 6) -> None:
        for _ in range(max_ticks):
            if not self.has_work():
                return
            self.step()

    def _tick_group(self, g: Group, out: dict) -> None:
        now = self.clock()
        streams = [s for s in g.streams if not s.closed]
        if not streams:
            return
        t0 = time.perf_counter()
        self.timer.start()
        stages: dict[int, list[Stage]] = {}
        self._collect = False
        for s in streams:
            try:
                stages[s.id] = self._apply_updates(s)
            except Exception as exc:  # noqa: BLE001 - one stream's failure ends only that stream
                self._stream_error(s, "update", exc)
        streams = [s for s in streams if not s.closed]
        decision = self._decide(g, streams, now, sum(len(st.rows) for v in stages.values() for st in v))
        for s in streams:
            self._apply_decision(s, decision, stages)
        taken = {}
        for s in streams:
            if s.closed:
                continue
            if s.id in decision.join:
                chunk = s.buffer.take()
            elif s.finishing and not s.buffer.ready():
                chunk = s.buffer.take_padded()      # end of input: the last partial chunk, padded
            else:
                chunk = None
            if chunk is not None:
                taken[s.id] = chunk
        self._enter_chunks(g, [s for s in streams if s.id in taken], taken, stages)
        for s in streams:
            if s.finishing and not s.closed and len(s.buffer) == 0:
                s.finishing = False
                self._collect = True                # end of input: every call in flight comes back
                stages.setdefault(s.id, [])
                stages[s.id] += s.schedule.drain()
        live = [s for s in streams if not s.closed and stages.get(s.id)]
        calls = compose([stages[s.id] for s in live])
        rows = sum(len(c.rows) for c in calls)
        finished: dict[int, list[Done]] = {}
        for call in calls:
            try:
                done = g.runner.run(call)
            except Exception as exc:  # noqa: BLE001 - a shared call failed: its streams end, the engine goes on
                log.exception("DiT call failed")
                for sid in {r.stream for r in call.rows}:
                    self._stream_error(self.streams.get(sid), "model", exc)
                continue
            for d in done:
                finished.setdefault(d.row.stream, []).append(d)
            self.dit_calls += bool(call.rows)
        if self._collect:
            self._collect = False
            for d in g.runner.pending():
                finished.setdefault(d.row.stream, []).append(d)
        self._decode(g, finished, out)
        self.rows_run += rows
        self.ticks += 1
        self.timer.annotate(rows=rows, streams=len(live), calls=sum(bool(c.rows) for c in calls),
                            chunks=len(taken))
        self.timer.end()
        if rows:
            g.scheduler.latency.observe(rows, time.perf_counter() - t0)

    # ------------------------------------------------------------------------------------------ tick parts
    def _apply_updates(self, s: EngineStream) -> list[Stage]:
        stages: list[Stage] = []
        m = self.model
        for kind, value in s._pop_updates():
            if kind == "reset":
                s.stats.dropped_reset += s.in_flight_frames
                s.group.runner.reset(s.id, s.schedule.rows_for(s.settings.steps, s.settings.batch))
                if s._transition is not None:
                    s._transition = None
                    s.group.runner.set_prompt(s.id, s._embedding)
                s._fresh()
                s.hand_noise()
                stages = []
            elif kind == "prompt":
                embedding, k = value
                if k > 0:
                    s._transition = (s._embedding, embedding, 0, k)
                else:
                    s._transition = None
                    s.group.runner.set_prompt(s.id, embedding)
                s._embedding = embedding
            elif kind == "noise_scale":
                s.settings.noise_scale = value
                s.controller.s_init = value
            elif kind == "noise_controller":
                s.settings.noise_controller = value
                s.controller.enabled = value
            elif kind == "seed":
                s.settings.seed = value
                if s._injected_noise is None:
                    s.noise = SeededNoise(value, m.device)
                    s.renoise = SeededNoise(renoise_seed(value), m.device)
                    s.hand_noise()
                    s.group.runner.reseed(s.id, value)
            elif kind == "steps":
                s.settings.steps = value
                stages += s.schedule.reconfigure(value)
            elif kind == "lora":
                s.settings.lora = value
                s.group.runner.set_lora(s.id, value)
        return stages

    def _decide(self, g: Group, streams: list[EngineStream], now: float, running_rows: int) -> Decision:
        views = []
        for s in streams:
            if s.buffer.held:
                continue
            arrivals = s.buffer.arrivals()
            n = s.buffer.next_len
            if len(arrivals) < n:
                continue
            sch = s.schedule
            views.append(StreamView(
                s.id, arrivals, n, rows=sch.rows if sch.prepared and sch.batch else 1,
                calls_to_output=sch.calls_to_output if sch.prepared else 1, sequential=not sch.batch,
                can_batch=sch.prepared and s.settings.batch, deferred=s.deferred_run, since_switch=s.since_switch,
                target_latency_s=s.target_latency_s, levels=sch.levels))
        if self.policy == "round_robin" and views:
            order = sorted(views, key=lambda v: (v.id - self._rr) % (self._next_id or 1))
            pick = order[0]
            self._rr = pick.id + 1
            d = Decision(join=[pick.id], defer=[v.id for v in views if v is not pick])
            return d
        return g.scheduler.plan(views, now, running_rows)

    def _apply_decision(self, s: EngineStream, d: Decision, stages: dict) -> None:
        s.since_switch += 1
        if s.id in d.reasons:
            s.stats.last_reasons = d.reasons[s.id]
        if s.id in d.defer:
            s.deferred_run += 1
            s.stats.deferred += 1
        elif s.id in d.join:
            s.deferred_run = 0
        drop = d.drop.get(s.id, 0)
        if drop:
            s.stats.dropped_late += s.buffer.drop_oldest(drop)
        if s.id in d.sequential or s.id in d.batch:
            to_batch = s.id in d.batch
            stages.setdefault(s.id, [])
            stages[s.id] += s.schedule.reconfigure(s.settings.steps, batch=to_batch)
            s.since_switch = 0
            if to_batch:
                s.stats.batch_switches += 1
            else:
                s.stats.sequential_switches += 1

    def _enter_chunks(self, g: Group, joining: list[EngineStream], taken: dict, stages: dict) -> None:
        """Encode the joining streams' chunks, pick their noise levels, turn them into schedule rows."""
        m = self.model
        pixels = {}
        for s in joining:
            images, info = taken[s.id]
            try:
                pixels[s.id] = upload_frames(images, m.device, m.dtype)
            except Exception as exc:  # noqa: BLE001
                self._stream_error(s, "frames", exc)
        joining = [s for s in joining if s.id in pixels]
        encoding = getattr(g.runner, "encoding", contextlib.nullcontext)
        with self.timer.section("encode"), encoding():
            latents = self._encode(joining, pixels)
        for s in joining:
            if s.id not in latents:
                continue
            images, info = taken[s.id]
            frames = pixels[s.id]
            z = latents[s.id]
            cid = s.next_chunk
            s.next_chunk += 1
            s.chunks[cid] = info
            s.stats.chunks += 1
            self.chunks += 1
            self._advance_transition(s)
            rs = g.runner.streams[s.id]
            if not s.schedule.prepared:
                rs.inputs[cid] = ChunkInput(z, s.settings.noise_scale)
                new = s.schedule.prepare(cid, z.shape[1])
                s.controller.reset()
                self._collect = True                # the first output as soon as it is there (TTFF)
            else:
                sc, t = s.controller(s.prev_frame[None], frames[None])
                rs.inputs[cid] = ChunkInput(z, sc, t)
                new = s.schedule.push(cid, z.shape[1])
            s.prev_frame = frames[-1]
            stages.setdefault(s.id, [])
            stages[s.id] += new

    def _encode(self, streams: list[EngineStream], pixels: dict) -> dict[int, torch.Tensor]:
        """Encode the new chunks (Wan VAE or TAEHV, per stream): one call per group of streams with the same encoder
        at the same phase (first chunk or steady) when VAE batching is on, else one call per stream. A failing
        batched call is retried stream by stream, so only the stream at fault ends."""
        groups: dict[tuple, list[EngineStream]] = {}
        for s in streams:
            key = (s.encoder, s.enc_state.first_encode, tuple(pixels[s.id].shape)) if self.batch_vae else (s.id,)
            groups.setdefault(key, []).append(s)
        out = {}
        for members in groups.values():
            if len(members) > 1:
                try:
                    z = self._encode_many(members, torch.stack([pixels[s.id] for s in members]))
                    out.update({s.id: z[i: i + 1] for i, s in enumerate(members)})
                    continue
                except Exception:  # noqa: BLE001 - find the stream at fault below
                    log.exception("batched encode failed; encoding stream by stream")
            for s in members:
                try:
                    frames = pixels[s.id][None]
                    out[s.id] = (self.model.vae.encode(s.enc_state, frames) if s.encoder == "vae"
                                 else s.enc_state.encode(frames))
                except Exception as exc:  # noqa: BLE001
                    self._stream_error(s, "encode", exc)
        return out

    def _encode_many(self, members: list[EngineStream], frames: torch.Tensor) -> torch.Tensor:
        if members[0].encoder == "vae":
            return self.model.vae.encode_many([s.enc_state for s in members], frames)
        from .models.taehv import TAEHVStreamEncoder
        return TAEHVStreamEncoder.encode_many([s.enc_state for s in members], frames)

    def _advance_transition(self, s: EngineStream) -> None:
        if s._transition is None:
            return
        start, end, k, total = s._transition
        k += 1
        blend = torch.lerp(start.float(), end.float(), k / total).to(end.dtype)
        s.group.runner.set_prompt(s.id, blend)
        s._transition = None if k >= total else (start, end, k, total)

    def _decode(self, g: Group, finished: dict[int, list[Done]], out: dict) -> None:
        """Decode the finished chunks into output frames. Each stream's chunks go in order; the k-th chunks of
        all streams at the same phase share one decoder call when VAE batching is on."""
        queues = {sid: deque(items) for sid, items in finished.items()}
        with self.timer.section("decode"):
            while queues:
                batch = []
                for sid in list(queues):
                    s = self.streams.get(sid)
                    if s is None or s.closed or not queues[sid]:
                        queues.pop(sid)
                        continue
                    batch.append((s, queues[sid].popleft()))
                if not batch:
                    break
                self._decode_round(batch, out)

    def _decode_round(self, batch: list[tuple[EngineStream, Done]], out: dict) -> None:
        images: dict[int, np.ndarray] = {}
        groups: dict[tuple, list[tuple[EngineStream, Done]]] = {}
        for s, d in batch:
            if d.frames is not None:                 # decoded where it finished (the pipeline's last stage)
                images[s.id] = d.frames.cpu().numpy()
                continue
            phase = s.dec_state.first_decode if s.decoder == "vae" else s.dec_state.frames_to_drop
            key = (s.decoder, phase, tuple(d.latent.shape)) if self.batch_vae else (s.id,)
            groups.setdefault(key, []).append((s, d))
        for members in groups.values():
            if len(members) > 1:
                try:
                    pixels = self._decode_many(members)
                    images.update({s.id: download_frames(pixels[i]) for i, (s, _) in enumerate(members)})
                    continue
                except Exception:  # noqa: BLE001 - find the stream at fault below
                    log.exception("batched decode failed; decoding stream by stream")
            for s, d in members:
                try:
                    images[s.id] = download_frames(self._decode_many([(s, d)])[0])
                except Exception as exc:  # noqa: BLE001
                    self._stream_error(s, "decode", exc)
        for s, d in batch:
            if s.id not in images or s.closed:
                continue
            info = s.chunks.pop(d.row.chunk)
            frames_out = [OutputFrame(img, fid, ts) for img, fid, ts in
                          zip(images[s.id][: info.real], info.frame_ids, info.timestamps)]
            s.stats.frames_out += len(frames_out)
            s.outbox.extend(frames_out)
            out.setdefault(s.id, []).extend(frames_out)

    def _decode_many(self, members: list[tuple[EngineStream, Done]]) -> torch.Tensor:
        latents = torch.cat([d.latent for _, d in members])
        if members[0][0].decoder == "vae":
            return self.model.vae.decode_many([s.dec_state for s, _ in members], latents)
        from .models.taehv import TAEHVStreamDecoder
        return TAEHVStreamDecoder.decode_many([s.dec_state for s, _ in members], latents)

    def _stream_error(self, s: EngineStream | None, phase: str, exc: BaseException) -> None:
        if s is None:
            return
        log.exception("stream %s: %s failed", s.id, phase, exc_info=exc)
        self.fail(s, f"the model failed on this stream ({phase}): {type(exc).__name__}: {exc}")
