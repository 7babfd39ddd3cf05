"""The runner: executes the scheduler's calls on one device.

For each :class:`~wanstream.core.schedule.Call` it gathers the rows' latents (a chunk entering is mixed with its
stream's noise first), their timesteps, cache rows and prompt slots in the shared :class:`~wanstream.models.kv_cache.
KVPool`, runs ONE DiT call, converts every row to x0, re-noises the rows that stay to their next level and
returns the chunks that left clean. It decides nothing: which rows run, at which level and where they live all
come from the call. :func:`settle` (x0 + re-noise + finished rows) is shared with the last stage of the multi-GPU
pipeline, so both apply a call's outcome the same way.

The fast path: every call layout (frames per row, the rows' cache rows and prompt slots) keeps persistent
:class:`~wanstream.models.kv_cache.StepBuffers` (cache indices and timesteps uploaded with one copy, no tensor built from
host lists per call). With ``compile=True`` a layout's steady-state calls (every row's cache full: no mask, the
same shapes and structure every call) run ``torch.compile`` d (inductor, static shapes, one compiled function per
layout so layouts never recompile each other); with ``cuda_graphs`` (default: on with ``compile`` on CUDA) the
steady call is then captured once in a CUDA graph over the static buffers (the pool's storage and prompt slots, an
input buffer, the step buffers) and replayed. Fill, drain and step changes run eagerly.
"""

from __future__ import annotations

import contextlib
import types
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Hashable, Protocol, Sequence

import torch

from wanstream.core.schedule import Call, Row
from wanstream.engine.conditioning import rebase_reference, vace_call
from wanstream.engine.noise import NoiseSource, SeededNoise, renoise_seed
from wanstream.engine.timing import PhaseTimer
from wanstream.models.dit import CausalWanDiT, PromptKV
from wanstream.models.kv_cache import CachePolicy, CacheStep, KVPool, StepBuffers
from wanstream.models.sampling import FlowMatchSampler


@dataclass
class ChunkInput:
    """A chunk about to enter the stream batch: clean latents, noise scale, own level-0 timestep."""

    z: torch.Tensor                          # [1, T, C, h, w]
    s: float | torch.Tensor                  # noise scale (float or 0-d device tensor)
    t0: torch.Tensor | None = None           # level-0 timestep (0-d or [1]); None: the step list's first


@dataclass
class Done:
    """A chunk that left the stream batch clean."""

    row: Row                                 # the row it left from (stream, chunk, ...)
    latent: torch.Tensor                     # x0 [1, T, C, h, w]
    frames: torch.Tensor | None = None       # uint8 [T', H, W, 3] where it was decoded already (pipeline)


@dataclass
class RunnerStream:
    """The tensor side of one stream in a runner: its noise sources (their one holder), entering chunks and
    in-flight latents."""

    id: Hashable
    noise: NoiseSource                       # mixing noise (a chunk entering)
    renoise_source: NoiseSource | None = None    # re-noising noise (default: the mixing source)
    inputs: dict = field(default_factory=dict)     # chunk → ChunkInput
    latents: dict = field(default_factory=dict)    # chunk → latent at its current level [1, T, C, h, w]
    lora: tuple[float, ...] | None = None          # LoRA strength vector (models/lora.py); None: the defaults
    prompt: object = None                          # the last prompt given (embedding or PromptKV)
    seed: int | None = None                        # the seed of its sources (None: injected sources)
    history: dict = field(default_factory=dict)    # frame → its clean latent [1, C, h, w] (the last cache window)
    vace: object = None                            # its VACE conditioning (engine/conditioning.StreamVace) or None

    @classmethod
    def seeded(cls, stream: Hashable, seed: int, device, lora: tuple[float, ...] | None = None) -> "RunnerStream":
        """A stream whose mixing noise is ``SeededNoise(seed)`` and re-noising noise ``SeededNoise(renoise_seed(
        seed))`` (as on a pipeline's last rank, so a stream gives the same frames on one device and on a ring)."""
        st = cls(stream, None, lora=lora)
        st.reseed(seed, device)
        return st

    def reseed(self, seed: int, device) -> None:
        """Both sources start over from ``seed`` (a new seed, or a reset of a seeded stream)."""
        self.noise = SeededNoise(seed, device)
        self.renoise_source = SeededNoise(renoise_seed(seed), device)
        self.seed = int(seed)

    @property
    def renoise(self) -> NoiseSource:
        return self.renoise_source or self.noise

    def noised(self, inp: ChunkInput) -> torch.Tensor:
        """``eps * s + z * (1 - s)`` with a fresh draw (none for ``s == 0``: the clean latents as they are)."""
        if isinstance(inp.s, float) and inp.s == 0.0:
            return inp.z
        eps = self.noise(inp.z.shape).to(inp.z.dtype)
        return eps * inp.s + inp.z * (1 - inp.s)

    def remember(self, frame: int, x0: torch.Tensor, window: int) -> None:
        """Keep the clean latents of frames ``frame ..`` (``x0 [1, T, C, h, w]``) and forget frames older than the
        last ``window`` (what a KV re-cache re-encodes)."""
        for i in range(x0.shape[1]):
            self.history[frame + i] = x0[:, i]
        newest = frame + x0.shape[1]
        for f in [f for f in self.history if f < newest - window]:
            del self.history[f]

    def recalled(self, frame: int, frames: int) -> torch.Tensor:
        """Clean latents ``[1, frames, C, h, w]`` of frames ``frame ..`` (kept by :meth:`remember`)."""
        missing = [f for f in range(frame, frame + frames) if f not in self.history]
        if missing:
            raise RuntimeError(f"stream {self.id!r}: no clean latent of frames {missing} to re-cache")
        return torch.stack([self.history[f] for f in range(frame, frame + frames)], dim=1)


def gather_rows(rows: Sequence[Row], streams: dict, wait_latent: Callable[[], None] | None = None
                ) -> tuple[list[torch.Tensor], dict]:
    """The inputs of a call's rows: a chunk entering (noised; its own first timestep, if any, in ``own_t0``) or a
    chunk's latent from its previous call (``wait_latent`` is called until it is there, where it arrives later)."""
    xs, own_t0 = [], {}
    for r in rows:
        st = streams[r.stream]
        if r.enters:
            inp = st.inputs.pop(r.chunk)
            xs.append(st.noised(inp))
            if inp.t0 is not None:
                own_t0[(r.stream, r.chunk)] = inp.t0
        else:
            while wait_latent is not None and r.chunk not in st.latents:
                wait_latent()
            xs.append(st.latents.pop(r.chunk))
    return xs, own_t0


def row_timesteps(rows: Sequence[Row], own_t0: dict, device) -> torch.Tensor:
    """Per-row float64 timesteps ``[B]`` (integer or warped float values): each row's level timestep, or the
    chunk's own timestep where it has one (``own_t0[(stream, chunk)]``, level-0 rows)."""
    ts = torch.tensor([r.t for r in rows], dtype=torch.float64).to(device, non_blocking=True)
    return own_timesteps(ts, rows, own_t0)


def own_timesteps(ts: torch.Tensor, rows: Sequence[Row], own_t0: dict) -> torch.Tensor:
    """Level-0 rows of chunks with their own timestep take it, in place (device copies, no host read)."""
    for b, r in enumerate(rows):
        t0 = own_t0.get((r.stream, r.chunk)) if r.level == 0 else None
        if t0 is not None:
            ts[b: b + 1] = t0.reshape(1)
    return ts


def settle(sampler: FlowMatchSampler, x: torch.Tensor, flow: torch.Tensor, ts: torch.Tensor, rows: Sequence[Row],
           renoise: Callable[[Hashable], NoiseSource], t_next: torch.Tensor | None = None,
           ) -> tuple[list[tuple[Row, torch.Tensor]], list[tuple[Row, torch.Tensor]]]:
    """The outcome of a call: x0 of every row (float64 math, as released); each stream's rows that stay are
    re-noised to their next level with ONE draw of that stream's re-noising source, the final rows leave clean (and a
    final row that ``hold`` s also stays, clean, as the input of its chunk's context pass); a context row's output is
    dropped (only the K/V it wrote count). ``t_next`` (``[B]`` on the device, each row's ``Row.t_next``) saves
    building the re-noise timesteps here.

    Returns ``(kept, finished)``: ``[(row, latent [1, T, C, h, w])]`` each, in row order."""
    x0 = sampler.to_x0(x, flow, ts)
    kept, finished = [], []
    b = 0
    while b < len(rows):
        e = b
        while e < len(rows) and rows[e].stream == rows[b].stream:
            e += 1
        stay = [i for i in range(b, e) if rows[i].renoised]
        if stay:
            lo, hi = stay[0], stay[-1] + 1
            if stay != list(range(lo, hi)):
                raise AssertionError("a stream's rows that stay must be contiguous")
            sub = x0[lo:hi]
            if t_next is not None:
                targets = t_next[lo:hi]
            else:
                targets = torch.tensor([rows[i].t_next for i in stay], dtype=torch.float64).to(x.device,
                                                                                               non_blocking=True)
            eps = renoise(rows[b].stream)(sub.shape).to(sub.dtype)
            renoised = sampler.add_noise(sub, eps, targets)
            kept += [(rows[i], renoised[i - lo: i - lo + 1]) for i in stay]
        finished += [(rows[i], x0[i: i + 1]) for i in range(b, e) if rows[i].final]
        kept += [(rows[i], x0[i: i + 1]) for i in range(b, e) if rows[i].hold]
        b = e
    return kept, finished


class RunnerProtocol(Protocol):
    """What the engine needs of a runner: :class:`Runner` (one device) and
    :class:`~wanstream.pipeline.runner.PipelineRunner` (the multi-GPU ring) both provide it."""

    streams: dict[Hashable, RunnerStream]
    lag: int                  # calls in flight at once: 1 on one device, W on a ring of W ranks

    def add(self, stream: RunnerStream, rows: int) -> None: ...       # lease ``rows`` cache rows and a prompt slot
    def remove(self, stream_id: Hashable) -> None: ...                # give them back
    def reset(self, stream_id: Hashable, rows: int) -> None: ...      # fresh rows and noise, nothing in flight
    def reseed(self, stream_id: Hashable, seed: int) -> None: ...
    def set_prompt(self, stream_id: Hashable, embedding: torch.Tensor) -> None: ...
    def set_lora(self, stream_id: Hashable, strengths: tuple[float, ...] | None) -> None: ...
    def enter(self, stream_id: Hashable, chunk: Hashable, inp: ChunkInput) -> None: ...
    def run(self, call: Call) -> list[Done]: ...                      # the chunks that came back clean
    def pending(self) -> list[Done]: ...                              # wait for every call in flight
    def encoding(self) -> ContextManager: ...                         # around the tick's VAE encode


STEADY_AFTER = 2      # a layout's calls run compiled from its 2nd consecutive call without a mask
GRAPH_WARMUP = 2      # compiled calls of a layout (on a side stream) before its CUDA graph is captured
MAX_LAYOUTS = 32      # layouts kept (least recently used dropped, with their compiled code and graph)


@dataclass
class _Layout:
    """Persistent state of one call layout: step buffers, steady-call count, compiled call, CUDA graph."""

    buffers: StepBuffers
    steady: int = 0                            # consecutive calls without a mask
    forward: Callable | None = None            # the compiled (or plain) DiT call of this layout
    warm: int = 0                              # side-stream calls done towards a capture for ``warm_key``
    warm_key: tuple | None = None
    graph: object | None = None                # torch.cuda.CUDAGraph
    graph_key: tuple | None = None             # (pool generation, step structure, input shape, dtype)
    x: torch.Tensor | None = None              # the graph's input buffer
    out: torch.Tensor | None = None            # the graph's output (overwritten by each replay)


def _fresh_function(fn: Callable) -> Callable:
    """A copy of ``fn`` with its own code object: torch.compile keeps one cache per code object, so each layout
    compiles once and never counts as a recompile of another."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


class Runner:
    """Executes calls over the streams of one resolution group on one device (see the module docstring)."""

    def __init__(self, dit: CausalWanDiT, sampler: FlowMatchSampler, pool: KVPool, policy: CachePolicy,
                 tokens_per_frame: int, timer: PhaseTimer | None = None, compile: bool = False,
                 cuda_graphs: bool | None = None):
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
        self.compile = bool(compile)
        on_cuda = self.device.type == "cuda"
        self.cuda_graphs = self.compile and on_cuda if cuda_graphs is None else bool(cuda_graphs)
        if self.cuda_graphs and not on_cuda:
            raise ValueError(f"cuda_graphs needs a CUDA device; this runner's pool is on {self.device}")
        self.path_calls = {"eager": 0, "compiled": 0, "graph": 0}     # DiT calls per execution path
        self._layouts: OrderedDict[tuple, _Layout] = OrderedDict()
        self._graph_pool = None
        self._side_stream = None

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
        """A stream starts over: fresh (zeroed) cache rows, no chunks in flight, a seeded stream's noise from its
        seed again; its prompt slot is kept."""
        st = self.streams[stream_id]
        st.inputs.clear()
        st.latents.clear()
        st.history.clear()
        if st.seed is not None:
            st.reseed(st.seed, self.device)
        lease = self.pool.leases[stream_id]
        self.pool.resize(stream_id, rows)
        self.pool.zero_rows(slice(lease.row, lease.row + lease.rows))

    def enter(self, stream_id: Hashable, chunk: Hashable, inp: ChunkInput) -> None:
        """A chunk about to enter the stream batch (its row in a coming call has ``enters``)."""
        self.streams[stream_id].inputs[chunk] = inp

    def set_prompt(self, stream_id: Hashable, embedding: torch.Tensor | PromptKV) -> None:
        """A stream's prompt: an embedding ``[1, text_len, text_dim]`` (its K/V are computed here, under the
        stream's LoRA strengths) or K/V."""
        st = self.streams[stream_id]
        lora = self.dit.lora
        if isinstance(embedding, PromptKV):
            prompt = embedding
        elif lora is not None:
            prompt = lora.embed_prompt(self.dit, embedding, st.lora)
        else:
            prompt = self.dit.embed_prompt(embedding)
        st.prompt = embedding
        self.pool.set_prompt(stream_id, prompt.k, prompt.v)

    def set_lora(self, stream_id: Hashable, strengths: tuple[float, ...] | None) -> None:
        """A stream's LoRA strengths (``None``: the defaults), from its next call. When the LoRAs touch the
        cross-attention K/V, the stream's prompt K/V are recomputed with the new strengths."""
        st = self.streams[stream_id]
        st.lora = strengths
        lora = self.dit.lora
        if lora is not None and lora.touches_prompt and st.prompt is not None:
            if isinstance(st.prompt, PromptKV):
                raise ValueError("the prompt of this stream was given as K/V: pass an embedding so that it can be "
                                 "recomputed for new LoRA strengths")
            self.set_prompt(stream_id, st.prompt)

    def reseed(self, stream_id: Hashable, seed: int) -> None:
        """A stream's noise starts over from ``seed`` (from its next draw)."""
        self.streams[stream_id].reseed(seed, self.device)

    def pending(self) -> list[Done]:
        """Chunks finished by calls still in flight (none here: every call completes in :meth:`run`)."""
        return []

    def encoding(self) -> ContextManager:
        return contextlib.nullcontext()

    @property
    def prompts(self) -> PromptKV:
        return PromptKV(self.pool.pk, self.pool.pv)

    # ------------------------------------------------------------------------------------------ calls
    def run(self, call: Call) -> list[Done]:
        """Execute one call; returns the chunks that left clean."""
        for sid, delta in call.rebase:
            self.pool.rebase(sid, delta, self.dit.rope)
            rebase_reference(self.streams[sid].vace, delta, self.dit.rope)
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
        for r in rows:
            if r.recache:                           # a KV re-cache: the stream's clean frames, noised to the level
                sigma = 0.0 if r.t == 0 else float(self.sampler.sigma(torch.tensor([float(r.t)]))[0])
                st = self.streams[r.stream]
                st.inputs[r.chunk] = ChunkInput(st.recalled(r.frame, call.frames), sigma)
        xs, own_t0 = gather_rows(rows, self.streams)
        x = xs[0] if len(xs) == 1 else torch.cat(xs)
        leases = self.pool.leases
        lay = self._layout(call.frames, tuple(leases[r.stream].row + r.cache_row for r in rows),
                           tuple(leases[r.stream].slot for r in rows), tuple(r.stream for r in rows))
        step = lay.buffers.fill([r.frame for r in rows], [r.rope for r in rows],
                                ([r.t for r in rows], [r.t_next for r in rows]),
                                [r.resink for r in rows] if any(r.resink for r in rows) else None)
        ts, t_next = lay.buffers.values
        own_timesteps(ts, rows, own_t0)
        lay.steady = lay.steady + 1 if step.attn_mask is None else 0
        lora = self.dit.lora
        strengths = (contextlib.nullcontext() if lora is None else
                     lora.rows([self.streams[r.stream].lora for r in rows]))
        vace = vace_call(self.streams, rows, call.frames, self.device, x.dtype)
        with self.timer.section("dit") if self.timer is not None else contextlib.nullcontext(), strengths:
            flow = self._forward(lay, x, ts, step, vace)
            kept, finished = settle(self.sampler, x, flow, ts, rows, lambda sid: self.streams[sid].renoise, t_next)
        for r, latent in kept:
            self.streams[r.stream].latents[r.chunk] = latent
        for r, x0 in finished:
            self.streams[r.stream].remember(r.frame, x0, self.policy.capacity)
        self.calls += 1
        self.rows_run += len(rows)
        return [Done(r, x0) for r, x0 in finished]

    # ------------------------------------------------------------------------------------------ fast path
    def _layout(self, frames: int, cache_rows: tuple[int, ...], prompts: tuple[int, ...],
                streams: tuple) -> _Layout:
        key = (frames, cache_rows, prompts, streams)
        lay = self._layouts.get(key)
        if lay is None:
            buffers = StepBuffers(self.policy, frames, self.tokens_per_frame, self.device, cache_rows, prompts,
                                  row_values=2, streams=streams)
            lay = self._layouts[key] = _Layout(buffers)
            while len(self._layouts) > MAX_LAYOUTS:
                self._layouts.popitem(last=False)
        else:
            self._layouts.move_to_end(key)
        return lay

    def _dit(self, x: torch.Tensor, ts: torch.Tensor, step: CacheStep, vace=None) -> torch.Tensor:
        """The DiT call over the pool: what is compiled and captured (calls with VACE rows run eager)."""
        return self.dit(x, ts, PromptKV(self.pool.pk, self.pool.pv), self.pool, step, vace=vace)

    def _forward(self, lay: _Layout, x: torch.Tensor, ts: torch.Tensor, step: CacheStep, vace=None) -> torch.Tensor:
        # per-stream LoRA strengths and VACE rows live outside the traced call: such calls run eager (not yet traced)
        if (lay.steady < STEADY_AFTER or not (self.compile or self.cuda_graphs) or self.dit.lora is not None
                or vace is not None):
            self.path_calls["eager"] += 1
            return self._dit(x, ts, step) if vace is None else self._dit(x, ts, step, vace)
        if lay.forward is None:
            fn = types.MethodType(_fresh_function(Runner._dit), self)
            lay.forward = torch.compile(fn, fullgraph=True, dynamic=False) if self.compile else fn
        if not self.cuda_graphs:
            self.path_calls["compiled"] += 1
            return lay.forward(x, ts, step)
        return self._graph_call(lay, x, ts, step)

    def _graph_call(self, lay: _Layout, x: torch.Tensor, ts: torch.Tensor, step: CacheStep) -> torch.Tensor:
        """Replay the layout's CUDA graph; before that, warm up on a side stream and capture (real calls all)."""
        key = (self.pool.generation, step.structure, tuple(x.shape), x.dtype)
        if lay.graph is not None and lay.graph_key == key:
            lay.x.copy_(x)
            lay.graph.replay()
            self.path_calls["graph"] += 1
            return lay.out
        lay.graph = lay.out = lay.x = None        # stale: the pool's storage or the call's structure changed
        if lay.warm_key != key:
            lay.warm, lay.warm_key = 0, key
        if lay.warm < GRAPH_WARMUP:              # compile, autotune and lazy CUDA set-up away from the capture
            lay.warm += 1
            self.path_calls["compiled" if self.compile else "eager"] += 1
            main = torch.cuda.current_stream(self.device)
            if self._side_stream is None:
                self._side_stream = torch.cuda.Stream(self.device)
            self._side_stream.wait_stream(main)
            with torch.cuda.stream(self._side_stream):
                out = lay.forward(x, ts, step)
            main.wait_stream(self._side_stream)
            out.record_stream(main)
            return out
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        lay.x = x.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool, capture_error_mode="thread_local"):
            lay.out = lay.forward(lay.x, ts, step)
        lay.graph, lay.graph_key = graph, key
        graph.replay()                           # the capture recorded this call; the replay runs it
        self.path_calls["graph"] += 1
        return lay.out
