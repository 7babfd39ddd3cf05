"""The engine: every stream of a model, scheduled together — one DiT call per tick over the rows of all of them.

Streams join an :class:`Engine` (``open``), are fed frames (``feed``, any thread — the one door frames come in by),
get live changes (``update``, ``set_prompt_embedding``, ``reset``, ``finish``, ``close``) and collect their
restyled frames. One tick (:meth:`Engine.step`), per group of streams that can share calls (same size and cache):

1. the group's :class:`~wanstream.core.planner.Planner` makes the tick's :class:`~wanstream.core.plan.Plan` from
   the streams' queues and live changes: which chunks enter, which streams wait or switch mode, which late frames
   are dropped, and the DiT calls over every stream's rows (pure host decisions, no torch);
2. the engine executes it: the tensor side of the live changes (prompt K/V, noise, LoRA strengths, reset state),
   VAE encode of the entering chunks (:class:`~wanstream.engine.codec.StreamCodec`), each chunk's noise level from
   the motion-aware controller, the calls on the runner (one device, or the multi-GPU ring — the same interface,
   :class:`~wanstream.engine.runner.RunnerProtocol`), VAE decode of the chunks that left clean;
3. output frames go to each stream's ``outbox``; the tick's time goes back to the planner's latency model.

Each stream keeps everything of its own (prompt, noise, controller, VAE caches, cache rows, schedule), so its output
is the same whether it runs alone or batched with others (up to float rounding of batched matmuls). A failure in one
stream's own work (its frames, its encode or decode, its prompt) ends only that stream.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from wanstream.core.backbones import SDV2
from wanstream.core.chunking import BlockRequests, ChunkBuffer
from wanstream.core.config import CacheConfig, StreamSettings, check_seed
from wanstream.core.geometry import VAE_STRIDE, check_fit, check_resolution
from wanstream.core.plan import Plan
from wanstream.core.planner import Planner
from wanstream.core.schedule import Call
from wanstream.core.scheduler import RoundRobin, Scheduler, SLOConfig
from wanstream.core.slack import SlackPolicy
from wanstream.engine.codec import StreamCodec
from wanstream.engine.drift import DriftConfig, DriftWatch, watch
from wanstream.engine.runner import ChunkInput, Done, Runner, RunnerProtocol, RunnerStream
from wanstream.engine.stream import EngineStream, OutputFrame, StreamFailed
from wanstream.engine.timing import PhaseTimer
from wanstream.engine.transfer import upload_frames
from wanstream.io.video import fit_frames
from wanstream.models.kv_cache import CachePolicy, KVPool

__all__ = ["Engine", "EngineStream", "Group", "OutputFrame", "StreamFailed"]

log = logging.getLogger("wanstream.engine")
POLICIES = ("continuous", "round_robin", "slack")


@dataclass
class Group:
    """Streams that can share DiT calls: same resolution and cache configuration."""

    key: tuple
    runner: RunnerProtocol
    planner: Planner
    tokens_per_frame: int
    streams: list[EngineStream] = field(default_factory=list)
    late: list = field(default_factory=list)     # calls after the tick's outputs (KV re-caches)


class Engine:
    """The multi-stream engine of one model (see the module docstring)."""

    def __init__(self, model, *, slo: SLOConfig | None = None, policy: str = "continuous",
                 clock: Callable[[], float] = time.perf_counter, reserve_rows: int = 0, runner_factory=None,
                 batch_vae: bool | None = None, compile: bool = False, drift: DriftConfig | None = None):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.model = model
        self.backbone = getattr(model, "backbone", SDV2)   # every stream of an engine runs the model's backbone
        self.slo = slo
        self.policy = policy
        self.clock = clock
        self.reserve_rows = reserve_rows
        self.runner_factory = runner_factory      # (engine, width, height, cache) → runner; default: one device
        self.compile = compile                    # the default runner's steady-state DiT call compiled (+ CUDA graphs)
        # VAE work of several streams in one call: on by default on GPUs (fewer launches, the device never waits
        # on Python between streams); off on the CPU, where stacking the caches measured slower at larger sizes
        batch_vae = model.device.type == "cuda" if batch_vae is None else bool(batch_vae)
        self.codec = StreamCodec(model, batch_vae, self._stream_error)
        self.timer = PhaseTimer(model.device)
        self.groups: dict[tuple, Group] = {}
        self.streams: dict[int, EngineStream] = {}
        self._next_id = 0
        self._registry = threading.Lock()         # streams / groups
        self._tick = threading.RLock()            # one tick at a time
        self._closed: list[EngineStream] = []
        self.ticks = 0
        self.chunks = 0                           # chunks that entered the model
        self.dit_calls = 0
        self.rows_run = 0
        self.on_fault: Callable[[EngineStream, str], None] | None = None
        self.drift = drift                        # the drift watchdog of every stream (engine/drift.py); None: off
        self.drift_counts = {"flags": 0, "refreshes": 0}

    @property
    def batch_vae(self) -> bool:
        return self.codec.batch

    # ------------------------------------------------------------------------------------------ streams
    def open(self, *, prompt_embeds: torch.Tensor, width: int, height: int, steps: int = 2,
             noise_scale: float = 0.8, noise_controller: bool = True, batch: bool = True, seed: int = 0,
             cache: CacheConfig | None = None, decoder: str = "vae", encoder: str = "vae",
             max_queue_chunks: int | None = None,
             target_latency_s: float | None = None, buffer: ChunkBuffer | None = None, fit: str = "crop",
             lora: Mapping[str, float] | None = None, mode: str = "v2v",
             frames: int | None = None) -> EngineStream:
        """A new stream; ``prompt_embeds [1, L, text_dim]`` (zero-padded to the text length here). ``buffer``: an
        input queue the caller already fills (the server's session), else a new one; ``fit``: how frames of
        another aspect are framed; ``lora``: strengths by LoRA name (others: the loaded defaults); ``encoder`` /
        ``decoder``: ``vae`` (Wan VAE) or ``taehv`` (the tiny autoencoder) at each end — streams of any mix share
        DiT calls.

        ``mode="t2v"``: a text-to-video stream — no input frames; its blocks start from the stream's noise.
        ``frames``: the clip's output frames (its blocks are asked for at once and the stream finishes after them);
        ``None``: blocks are asked for with :meth:`generate`. ``cache`` defaults to the backbone's for the mode."""
        check_resolution(width, height)
        for name, value in (("decoder", decoder), ("encoder", encoder)):
            if value not in ("vae", "taehv"):
                raise ValueError(f"{name} must be 'vae' or 'taehv', got {value!r}")
            if value == "taehv" and getattr(self.model, "taehv", None) is None:
                raise ValueError(f"{name}='taehv' needs a model loaded with taehv=True")
        check_fit(fit)
        settings = StreamSettings(steps=steps, noise_scale=noise_scale, noise_controller=noise_controller,
                                  batch=batch, seed=seed, cache=cache or self.backbone.cache(mode),
                                  lora=self.lora_strengths(lora), mode=mode)
        embedding = self.pad_prompt(prompt_embeds)
        rule = self.backbone.chunk_rule(mode)
        if mode == "t2v":
            if buffer is not None:
                raise ValueError("a text-to-video stream has no input queue")
            buffer = BlockRequests(rule, total_frames=frames)
            if frames is not None:
                buffer.request(buffer.blocks_for(frames), self.clock())
        else:
            buffer = buffer if buffer is not None else ChunkBuffer(max_chunks=max_queue_chunks)
            buffer.rule = rule
        m = self.model
        with self._tick, self._registry, torch.inference_mode():
            group = self._group(width, height, settings.cache)
            sid = self._next_id
            self._next_id += 1
            record = group.planner.add(sid, settings, buffer, target_latency_s)
            s = EngineStream(sid, group, record, width=width, height=height, decoder=decoder, embedding=embedding,
                             fit=fit, encoder=encoder)
            s.fresh(m.vae, getattr(m, "taehv", None))
            s.drift = DriftWatch(self.drift) if self.drift is not None else None
            record.cheap_decoder = decoder == "vae" and getattr(m, "taehv", None) is not None
            try:
                group.runner.add(RunnerStream.seeded(sid, settings.seed, m.device, settings.lora), record.rows)
                group.runner.set_prompt(sid, embedding)
            except BaseException:
                group.planner.remove(sid)
                group.runner.remove(sid)
                raise
            group.streams.append(s)
            self.streams[sid] = s
            if mode == "t2v" and frames is not None:
                group.planner.finish(sid)            # the clip's blocks are all asked for
        return s

    def generate(self, stream: EngineStream, blocks: int = 1) -> None:
        """Ask a text-to-video stream for ``blocks`` more blocks (any thread)."""
        if not isinstance(stream.buffer, BlockRequests):
            raise ValueError("generate() is for text-to-video streams")
        stream.buffer.request(blocks, self.clock())

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
                pool = KVPool(dit.cache_layers, cache.capacity, tpf, dit.heads, dit.head_dim, dit.dtype,
                              m.device, text_len=dit.text_len)
                if self.reserve_rows:
                    pool.reserve(self.reserve_rows)
                runner = Runner(dit, m.sampler, pool, CachePolicy(cache), tpf, timer=self.timer, compile=self.compile)
            policy = RoundRobin() if self.policy == "round_robin" else \
                (SlackPolicy if self.policy == "slack" else Scheduler)(self.slo)
            g = self.groups[key] = Group(key, runner, Planner(policy, cache=cache, lag=runner.lag,
                                                              backbone=self.backbone), tpf)
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
            stream.queue_update("steps", int(steps))
        if noise_scale is not None:
            StreamSettings(noise_scale=noise_scale)
            stream.queue_update("noise_scale", float(noise_scale))
        if noise_controller is not None:
            stream.queue_update("noise_controller", bool(noise_controller))
        if seed is not None:
            stream.queue_update("seed", check_seed(seed))
        if lora is not None:
            stream.queue_update("lora", self.lora_strengths(lora))

    def set_prompt_embedding(self, stream: EngineStream, embedding: torch.Tensor, transition_chunks: int = 0,
                             recache: bool = False, keep_sink: bool = True) -> None:
        """New prompt from the stream's next DiT call; with ``transition_chunks`` = K > 0 the embedding moves
        linearly from the current one over the next K chunks. ``recache``: LongLive's prompt switch — the stream's
        recent frames are re-encoded under the new prompt into its KV cache (chunks in flight finish first, the
        re-cache runs after the tick's outputs, the stream's next chunk waits one tick; ``StreamStats.recaches``).
        ``keep_sink``: once the cache is full the sink keeps its K/V (LongLive's ``global_sink: true``); else the
        window's oldest frames become the new sink."""
        if recache and transition_chunks:
            raise ValueError("a prompt switch re-caches or transitions over chunks, not both")
        stream.queue_update("prompt", (self.pad_prompt(embedding), int(transition_chunks)))
        if recache:
            stream.queue_update("recache", bool(keep_sink))

    def set_conditioning(self, stream: EngineStream, *, reference=..., strength: float | None = None,
                         control: str | None = None, control_video=None) -> None:
        """VACE conditioning of a stream (``engine/conditioning.py``), from its next tick: ``reference`` a uint8
        ``[H, W, 3]`` image or a list of up to 4 (framed like its frames; VAE-encoded here, in the caller's thread;
        each one more frame of the stream's reference prefix), None to clear it,
        ``...`` unchanged; ``strength`` the hints' scale; ``control`` a kind of ``engine/control.py`` (``none``
        ends it; ``video``: ``control_video`` an iterable of uint8 frames). The model needs its VACE modules."""
        from wanstream.engine.conditioning import prepare_update
        stream.queue_update("vace", prepare_update(self.model, stream.width, stream.height, stream.fit, reference,
                                                   strength, control, control_video, self.preprocessors))

    @property
    def preprocessors(self):
        """The control preprocessors (``engine/control.py``), models loaded on first use."""
        if getattr(self, "_preprocessors", None) is None:
            from wanstream.engine.control import Preprocessors
            self._preprocessors = Preprocessors(self.model)
        return self._preprocessors

    def reset(self, stream: EngineStream, discard_queued: bool = True) -> None:
        """Start over on the next frame: queued frames are discarded, in-flight chunks dropped, fresh state.
        ``discard_queued=False``: the caller restarted the stream's buffer itself when the reset was asked for (the
        frames queued since then are the new start)."""
        if discard_queued:
            stream.buffer.restart()
        stream.queue_update("reset", None)

    def finish(self, stream: EngineStream) -> None:
        """End of input: the remaining frames go in (the last partial chunk padded), then the stream drains, so
        every frame fed comes out."""
        stream.group.planner.finish(stream.id)

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
                    s.group.planner.remove(s.id)
                    s.group.runner.remove(s.id)
                s.chunks.clear()
                s.outbox.clear()

    # ------------------------------------------------------------------------------------------ suspend / resume
    def park(self, stream: EngineStream):
        """Take a stream off the device into host memory (:mod:`wanstream.engine.parking`); its cache rows go back
        to the pool. Raises :class:`~wanstream.engine.parking.NotParkable` (nothing changed) when it cannot be
        parked now. Returns the :class:`~wanstream.engine.parking.ParkedStream`."""
        from wanstream.engine.parking import park
        with self._tick, self._registry, torch.inference_mode():
            return park(self, stream)

    def resume(self, parked, buffer: ChunkBuffer | None = None) -> EngineStream:
        """A parked stream back in the engine (a new stream object and id, the same state): its next chunk gives
        what it would have given had it never been parked. ``buffer``: its input queue (default: the one it had)."""
        from wanstream.engine.parking import resume
        with self._tick, self._registry, torch.inference_mode():
            return resume(self, parked, buffer)

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
        cache = cache or self.backbone.cache("v2v")
        with self._registry:
            g = self.groups.get((width, height, cache))
            if g is None:
                return True, "no stream of this resolution yet"
            return g.planner.admit(steps, [input_fps] if input_fps else [])

    # ------------------------------------------------------------------------------------------ ticks
    def has_work(self) -> bool:
        with self._registry:
            streams = list(self.streams.values())
            closed = bool(self._closed)
        return closed or any(s.has_work() for s in streams)

    def step(self, late: bool = True) -> None:
        """One tick over every group (see the module docstring); output frames go to each stream's ``outbox``.
        ``late=False``: the tick's late calls (KV re-caches) wait for :meth:`run_late` (the server delivers the
        tick's frames first); the next tick runs them first in any case."""
        with self._tick, torch.inference_mode():
            self._release_closed()
            for g in list(self.groups.values()):
                self._tick_group(g)
        if late:
            self.run_late()

    def run_late(self) -> None:
        """The KV re-caches the last tick asked for (prompt switches), after its outputs."""
        with self._tick, torch.inference_mode():
            for g in list(self.groups.values()):
                self._run_late(g)

    def _run_late(self, g: Group) -> None:
        calls, g.late = g.late, []
        for call in calls:
            call = Call(call.frames, [r for r in call.rows if r.stream in g.runner.streams])   # closed meanwhile
            if not call.rows:
                continue
            try:
                g.runner.run(call)
            except Exception as exc:  # noqa: BLE001 - a failed re-cache ends its streams, the engine goes on
                log.exception("KV re-cache failed")
                for sid in {r.stream for r in call.rows}:
                    self._stream_error(self.streams.get(sid), "recache", exc)

    def run_until_idle(self, max_ticks: int = 10 ** 6) -> None:
        for _ in range(max_ticks):
            if not self.has_work():
                return
            self.step()

    def _tick_group(self, g: Group) -> None:
        self._run_late(g)                            # a re-cache asked for last tick comes before anything else
        streams = [s for s in g.streams if not s.closed]
        if not streams:
            return
        t0 = time.perf_counter()
        self.timer.start()
        plan = g.planner.plan(self.clock(), {s.id: s.pop_updates() for s in streams}, [s.id for s in streams])
        for s in streams:
            self._apply_updates(g, s, plan)
        self._enter(g, plan)
        finished: dict[int, list[tuple[EngineStream, Done]]] = {}
        for call in plan.calls:
            try:
                done = g.runner.run(call)
            except Exception as exc:  # noqa: BLE001 - a shared call failed: its streams end, the engine goes on
                log.exception("DiT call failed")
                for sid in {r.stream for r in call.rows}:
                    self._stream_error(self.streams.get(sid), "model", exc)
                continue
            self._finished(done, finished)
        if plan.collect:
            self._finished(g.runner.pending(), finished)
        if self.drift is not None:
            with self.timer.section("drift"):
                watch(self, g, plan, finished)
        with self.timer.section("decode"):
            self._outputs(self.codec.decode(finished))
        g.late += plan.late_calls
        self.dit_calls += plan.dit_calls
        self.rows_run += plan.rows
        self.ticks += 1
        self.timer.annotate(rows=plan.rows, streams=len({r.stream for c in plan.calls for r in c.rows}),
                            calls=plan.dit_calls, chunks=len(plan.entries))
        self.timer.end()
        if plan.rows:
            g.planner.observe(plan.rows, time.perf_counter() - t0)

    # ------------------------------------------------------------------------------------------ plan execution
    def _apply_updates(self, g: Group, s: EngineStream, plan: Plan) -> None:
        """The tensor side of a stream's live changes, in the order they were made."""
        try:
            for kind, value in plan.streams[s.id].updates:
                if kind == "reset":
                    s.stats.dropped_reset += s.in_flight_frames
                    g.runner.reset(s.id, value)
                    if s.transition is not None:
                        s.transition = None
                        g.runner.set_prompt(s.id, s.embedding)
                    s.fresh(self.model.vae, getattr(self.model, "taehv", None))
                elif kind == "prompt":
                    embedding, k = value
                    if k > 0:
                        s.transition = (s.embedding, embedding, 0, k)
                    else:
                        s.transition = None
                        g.runner.set_prompt(s.id, embedding)
                    s.embedding = embedding
                elif kind == "noise_scale":
                    s.settings.noise_scale = value
                    s.controller.s_init = value
                elif kind == "noise_controller":
                    s.settings.noise_controller = value
                    s.controller.enabled = value
                elif kind == "seed":
                    s.settings.seed = value
                    g.runner.reseed(s.id, value)
                elif kind == "lora":
                    s.settings.lora = value
                    g.runner.set_lora(s.id, value)
                elif kind == "decoder":
                    s.switch_decoder(value, getattr(self.model, "taehv", None))
                elif kind == "vace":
                    from wanstream.engine.conditioning import apply_update
                    with self.timer.section("reference"):
                        apply_update(g.runner, s.id, value)
        except Exception as exc:  # noqa: BLE001 - one stream's failure ends only that stream
            self._stream_error(s, "update", exc)
            plan.without(s.id)

    def _enter(self, g: Group, plan: Plan) -> None:
        """The chunks that enter: uploaded, VAE-encoded, each given its noise level; the runner gets them."""
        m = self.model
        pixels = {}
        joining = []
        latents = {}
        for sid, entry in plan.entries:
            s = self.streams.get(sid)
            if s is None or s.closed:
                continue
            if s.settings.mode == "t2v":               # a block from pure noise: zero latents mixed at scale 1
                latents[sid] = torch.zeros((1, entry.latent_frames, m.vae.z_dim, s.height // VAE_STRIDE,
                                            s.width // VAE_STRIDE), device=m.device, dtype=m.dtype)
                continue
            try:
                pixels[sid] = upload_frames(entry.frames, m.device, m.dtype)
                joining.append(s)
            except Exception as exc:  # noqa: BLE001
                self._stream_error(s, "frames", exc)
        with self.timer.section("encode"), g.runner.encoding():
            latents.update(self.codec.encode(joining, pixels))
        if getattr(m.dit, "vace", None) is not None:           # VACE control contexts of the entering chunks
            from wanstream.engine.conditioning import control_contexts
            control_contexts(self, g.runner, [(self.streams[sid], e, latents[sid].shape[1]) for sid, e in
                                              plan.entries if sid in pixels and sid in latents], pixels)
        for sid, entry in plan.entries:
            s = self.streams.get(sid)
            if s is None or sid not in latents:
                continue
            z = latents[sid]
            s.chunks[entry.chunk] = entry.info
            self.chunks += 1
            self._advance_transition(g, s)
            if sid not in pixels:                          # text-to-video: all noise
                inp = ChunkInput(z, 1.0)
            elif entry.first:
                inp = ChunkInput(z, s.settings.noise_scale)
                s.controller.reset()
            else:
                sc, t = s.controller(s.prev_frame[None], pixels[sid][None])
                inp = ChunkInput(z, sc, t)
            g.runner.enter(sid, entry.chunk, inp)
            if sid in pixels:
                s.prev_frame = pixels[sid][-1]
        for sid, sp in plan.streams.items():
            s = self.streams.get(sid)
            if (sp.entry is not None and sid not in latents) or s is None or s.closed:
                plan.without(sid)                       # it ended (its frames or its encode failed, or closed)

    def _advance_transition(self, g: Group, s: EngineStream) -> None:
        if s.transition is None:
            return
        start, end, k, total = s.transition
        k += 1
        blend = torch.lerp(start.float(), end.float(), k / total).to(end.dtype)
        g.runner.set_prompt(s.id, blend)
        s.transition = None if k >= total else (start, end, k, total)

    def _finished(self, done: list[Done], into: dict[int, list[tuple[EngineStream, Done]]]) -> None:
        for d in done:
            s = self.streams.get(d.row.stream)
            if s is not None and not s.closed:
                into.setdefault(s.id, []).append((s, d))

    def _outputs(self, decoded) -> None:
        """Decoded chunks become the output frames of the input frames they restyle (padding frames give none)."""
        for s, d, images in decoded:
            if s.closed:
                continue
            info = s.chunks.pop(d.row.chunk)
            frames_out = [OutputFrame(img, fid, ts) for img, fid, ts in
                          zip(images[: info.real], info.frame_ids, info.timestamps)]
            s.stats.frames_out += len(frames_out)
            s.record.playout.deliver(len(frames_out), self.clock())
            s.outbox.extend(frames_out)

    def _stream_error(self, s: EngineStream | None, phase: str, exc: BaseException) -> None:
        if s is None:
            return
        log.exception("stream %s: %s failed", s.id, phase, exc_info=exc)
        self.fail(s, f"the model failed on this stream ({phase}): {type(exc).__name__}: {exc}")
