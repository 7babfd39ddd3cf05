"""Rank 0 of the pipeline: the latent-level driver (same interface as :class:`~wanstream.engine.latent_stream.LatentStream`).

Schedule (``lag`` = W by default): W stream batches circulate; a call takes the batch that left ``lag`` calls
ago (waiting for its RETURN from the last stage if it is still in flight), shifts it, inserts the new chunk at
slot 0, runs blocks ``[0, b0)`` and sends the STEP on. The last stage returns the re-noised slots and the chunk that
left slot n-1; rank 0 keeps the host-side bookkeeping (chunk ids, frame indices, RoPE positions) exactly as
``LatentStream(lag=W)`` does, so both produce the same latents. Mixing noise is drawn here, re-noising noise on the
last stage (its own seeded source); a reference run uses the same two sources.

Prompt changes, step changes, re-seeding, block moves and the end of the pipeline travel in the same ordered
stream as the STEPs, so each stage applies them between the same two calls.
"""

from __future__ import annotations

import atexit
import functools
import logging
import time
import weakref
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Hashable

import torch

from wanstream.core.block_scheduler import (
    BlockScheduler,
    Move,
    SchedulerConfig,
    StageCost,
    boundary_move,
    check_split,
    even_split,
    format_split,
)
from wanstream.core.config import CacheConfig
from wanstream.core.schedule import Call, Row, StreamSchedule, compose
from wanstream.engine.noise import NoiseSource
from wanstream.engine.runner import ChunkInput, RunnerStream, gather_rows, row_timesteps
from wanstream.models.loader import num_layers_of
from wanstream.pipeline.launch import (
    LaunchSpec,
    connect,
    host_store,
    load_rank,
    make_transport,
    setup_rank,
    spawn_workers,
    torchrun_env,
)
from wanstream.pipeline.protocol import Kind, Message, ProtocolError
from wanstream.pipeline.stage import (
    DECODE_NONE,
    DECODE_TAEHV,
    DECODE_VAE,
    STREAM,
    PipeConfig,
    Stage,
    StepMeta,
)
from wanstream.pipeline.transport import PipelineError

log = logging.getLogger("wanstream.pipeline")

_LIVE: "weakref.WeakSet[PipelineDriver]" = weakref.WeakSet()


@atexit.register
def _abort_live_drivers() -> None:
    """Interpreter exit with a pipeline still open: stop its ranks so no thread is left inside gloo."""
    for drv in list(_LIVE):
        if not drv.closed:
            drv._abort(PipelineError("rank 0 exited without closing the pipeline", 0))

DECODERS = {"none": DECODE_NONE, "vae": DECODE_VAE, "taehv": DECODE_TAEHV}


@dataclass
class Finished:
    """A chunk that left the pipeline clean."""

    chunk: Hashable
    latent: torch.Tensor                 # [1, T, C, h, w]
    frames: torch.Tensor | None = None   # uint8 [T', H, W, 3] when the last stage decodes
    row: Row | None = None               # the row it left from


@dataclass
class _Pending:
    """A call in flight: its id and its rows (chunk ids stay here; the ring only sees host ints)."""

    call: int
    rows: list[Row]


@dataclass
class MoveRecord:
    move: Move
    chunk: int
    split: list[tuple[int, int]]
    seconds: float


def check_devices(devices) -> None:
    """Every rank's device must exist here (CUDA ranks: one GPU each)."""
    cuda = [torch.device(d) for d in devices if torch.device(d).type == "cuda"]
    if cuda and not torch.cuda.is_available():
        raise ValueError("the pipeline was asked for CUDA devices but this machine has none "
                         "(use --pipeline N --device cpu for CPU ranks)")
    count = torch.cuda.device_count() if cuda else 0
    for d in cuda:
        if (d.index or 0) >= count:
            raise ValueError(f"{d}: this machine has {count} CUDA device(s)")
    if len(set(map(str, cuda))) != len(cuda):
        raise ValueError(f"each CUDA rank needs its own GPU, got {list(map(str, devices))}")


def _guard(fn):
    """Public driver calls: any pipeline failure (or Ctrl-C) stops every rank before it propagates."""
    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        if self.closed:
            raise RuntimeError("this pipeline is closed")
        try:
            with torch.no_grad():
                out = fn(self, *args, **kwargs)
            self.health.mark("idle")
            return out
        except ValueError:      # a rejected argument: nothing was sent, the pipeline goes on
            self.health.mark("idle")
            raise
        except BaseException as exc:
            self._abort(exc)
            raise
    return wrapper


class PipelineDriver:
    """Latent-level pipeline over W ranks; this process is rank 0 (see the module docstring)."""

    def __init__(self, stage: Stage, spec: LaunchSpec, *, processes=(), stores=(), lag: int | None = None,
                 schedule: SchedulerConfig | None = None):
        self.stage = stage
        self.transport = stage.transport
        self.health = stage.health
        self.spec = spec
        self.world = stage.world
        self.last = self.world - 1
        self.processes = list(processes)
        self._stores = list(stores)          # keep the hosted store alive while ranks use it
        self.lag = lag or self.world
        if self.lag < 1:
            raise ValueError(f"lag must be >= 1, got {lag}")
        self.scheduler = BlockScheduler(stage.ranges, schedule) if schedule is not None else None
        self.moves: list[MoveRecord] = []
        self.epoch = 0
        self.pending: deque[_Pending] = deque()
        self.finished: list[Finished] = []
        self.calls = 0
        self.chunks = 0
        self.closed = False
        self.error: str | None = None        # why the pipeline stopped (set when it was aborted)
        self.started = False
        self.streams: dict = {}
        self._opened: set = set()            # streams of open_stream (the engine's) now on the ranks
        _LIVE.add(self)
        log.info("pipeline of %d ranks, split %s", self.world, format_split(stage.ranges))

    # ====================================================================== launching
    @classmethod
    def launch(cls, model: str | Path, devices: list[str], *, split: list[tuple[int, int]] | None = None,
               dtype: torch.dtype | None = None, decode: str = "none", vae: bool = False, text_encoder: bool = False,
               schedule: SchedulerConfig | None = None, lag: int | None = None, timeout: float = 120.0,
               dead_after: float = 10.0, threads: int | None = None, log_level: int = logging.WARNING,
               startup_timeout: float = 900.0, fault: str | None = None) -> "PipelineDriver":
        """Spawn ranks 1..W-1 on this machine (loopback rendezvous), load rank 0 here, connect everyone.

        ``devices[r]`` is rank r's device (``cpu`` for gloo-only CPU pipelines). ``decode``: what the last rank
        loads to decode (none | vae | taehv); ``vae``: rank 0 loads the VAE (to encode frames).
        """
        world = len(devices)
        if world < 2:
            raise ValueError(f"a pipeline needs at least 2 ranks, got {world}")
        if decode not in DECODERS:
            raise ValueError(f"decode must be one of {sorted(DECODERS)}, got {decode!r}")
        check_devices(devices)
        layers = num_layers_of(model)
        split = [tuple(r) for r in split] if split else even_split(layers, world)
        check_split(split, layers)
        if len(split) != world:
            raise ValueError(f"split has {len(split)} stages for {world} ranks")
        dname = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16", None: None}[dtype]
        spec = LaunchSpec(str(model), [str(d) for d in devices], split, dname, decode, timeout, dead_after,
                          startup_timeout, threads=threads, log_level=log_level, fault=fault)
        store, raw, host, port = host_store(spec)
        procs = spawn_workers(spec, host, port)
        health = None
        try:
            factory = lambda: connect(host, port, spec.prefix, spec.startup_timeout)[0]  # noqa: E731
            health = setup_rank(0, spec, store, factory)
            device = torch.device(devices[0])
            if device.type == "cuda":
                torch.cuda.set_device(device)
            health.mark("loading")
            model0 = load_rank(spec, 0, vae=vae, text_encoder=text_encoder)
            store.set("up/0", "1")
            _wait_up(store, spec, health, procs)
            health.mark("connecting")
            transport = make_transport(0, spec, store, health)
        except BaseException as exc:
            if health is not None:
                health.report(f"rank 0 failed during startup: {type(exc).__name__}: {exc}", 0)
                health.exited("error")
            _reap(procs, spec.dead_after + 2)
            raise
        stage = Stage(model0, 0, world, split, transport, health)
        health.mark("ready")
        return cls(stage, spec, processes=procs, stores=(store, raw), lag=lag, schedule=schedule)

    @classmethod
    def join_torchrun(cls, model: str | Path, spec: LaunchSpec, *, vae: bool = False, text_encoder: bool = False,
                      schedule: SchedulerConfig | None = None) -> "PipelineDriver":
        """Rank 0 under torchrun (the other ranks run :func:`~.launch.run_worker`)."""
        env = torchrun_env()
        if env is None or env["rank"] != 0:
            raise RuntimeError("join_torchrun is for rank 0 of a torchrun launch")
        master = not env["agent_store"]
        store, raw = connect(env["host"], env["port"], spec.prefix, spec.startup_timeout, master)
        factory = lambda: connect(env["host"], env["port"], spec.prefix, spec.startup_timeout)[0]  # noqa: E731
        health = setup_rank(0, spec, store, factory)
        device = torch.device(spec.devices[0])
        if device.type == "cuda":
            torch.cuda.set_device(device)
        model0 = load_rank(spec, 0, vae=vae, text_encoder=text_encoder)
        store.set("up/0", "1")
        _wait_up(store, spec, health, [])
        transport = make_transport(0, spec, store, health)
        return cls(Stage(model0, 0, spec.world, spec.split, transport, health), spec, stores=(store, raw),
                   schedule=schedule)

    # ====================================================================== properties
    @property
    def split(self) -> list[tuple[int, int]]:
        return list(self.stage.ranges)

    @property
    def model(self):
        return self.stage.model

    @property
    def device(self) -> torch.device:
        return self.stage.device

    @property
    def in_flight(self) -> int:
        return len(self.pending)

    # ====================================================================== stream API
    @_guard
    def start(self, context: torch.Tensor, *, tokens_per_frame: int, noise: NoiseSource, renoise_seed: int,
              steps: int = 2, batch: bool = True, cache: CacheConfig = CacheConfig(), mode: str = "v2v",
              decode: str = "none") -> None:
        """Begin a new stream on every rank (also a reset: in-flight chunks are dropped)."""
        self._finish_in_flight()
        self.finished.clear()
        if decode not in DECODERS:
            raise ValueError(f"decode must be one of {sorted(DECODERS)}, got {decode!r}")
        cfg = PipeConfig(steps, batch, mode, tokens_per_frame, cache, DECODERS[decode], int(renoise_seed))
        context = self._context(context)
        self.transport.send(1, Message(Kind.START, meta=cfg.to_meta(), payloads=[context]))
        self.stage.start(cfg, context)
        self.cfg = cfg
        self.schedule = StreamSchedule(STREAM, steps, mode=mode, batch=batch, cache=cache, lag=self.lag)
        self.streams = {STREAM: RunnerStream(STREAM, noise)}
        self._opened = set()
        self.chunks = 0
        self.started = True

    @property
    def steps(self) -> int:
        return self.schedule.steps

    @property
    def rows(self) -> int:
        return self.schedule.rows

    @property
    def noise(self) -> NoiseSource | None:
        return self.streams[STREAM].noise if self.started else None

    @_guard
    def prepare(self, z: torch.Tensor, s, chunk: Hashable = 0) -> Finished:
        """First chunk ``z [1, L, C, h, w]``: the full step list sequentially through the ring on cache row 0,
        then every stage copies row 0 to the other rows. Returns the chunk's clean latents (and frames)."""
        self._need_start()
        self.streams[STREAM].inputs[chunk] = ChunkInput(z.to(self.device), s)
        self._execute(self.schedule.prepare(chunk, z.shape[1]))
        self._finish_in_flight()
        (done,) = self._take_finished()
        return done

    @_guard
    def push(self, z: torch.Tensor, s, t: torch.Tensor, chunk: Hashable) -> list[Finished]:
        """Add a chunk (clean latents ``z [1, T, C, h, w]``, noise scale ``s``, newest-slot timestep ``t``).

        Returns the chunks whose RETURN arrived meanwhile (in order); the pipeline keeps up to ``lag`` calls in
        flight, so outputs trail the single-device schedule by up to ``lag - 1`` calls.
        """
        self._need_start()
        self.streams[STREAM].inputs[chunk] = ChunkInput(z.to(self.device), s,
                                                        torch.as_tensor(t).reshape(1).to(self.device))
        self.chunks += 1
        self._maybe_rebalance()
        self._execute(self.schedule.push(chunk, z.shape[1]))
        return self._take_finished()

    @_guard
    def drain(self) -> list[Finished]:
        """Finish every in-flight chunk (end of stream, or before a reconfiguration)."""
        self._need_start()
        self._execute(self.schedule.drain())
        self._finish_in_flight()
        return self._take_finished()

    @_guard
    def reconfigure(self, steps: int) -> list[Finished]:
        """New step count between chunks: drain, then every stage re-lays its rows (as the runner does)."""
        self._need_start()
        self._execute(self.schedule.reconfigure(int(steps)))
        self._finish_in_flight()
        return self._take_finished()

    @_guard
    def set_prompt(self, context: torch.Tensor, stream: int = STREAM) -> None:
        """New prompt embedding of a stream; every stage recomputes its blocks' K/V before the next call."""
        self._need_start()
        context = self._context(context)
        self.transport.send(1, Message(Kind.PROMPT, meta=[int(stream)], payloads=[context]))
        self.stage.set_prompt(context, stream)

    @_guard
    def reseed(self, noise: NoiseSource, renoise_seed: int, stream: int = STREAM) -> None:
        self._need_start()
        self.streams[stream].noise = noise
        self.transport.send(1, Message(Kind.SEED, meta=[int(renoise_seed), int(stream)]))

    # ====================================================================== many streams (the engine's runner)
    @_guard
    def open_stream(self, stream: RunnerStream, rows: int, context: torch.Tensor, *, renoise_seed: int,
                    tokens_per_frame: int, cache: CacheConfig = CacheConfig(), decode: str = "none") -> None:
        """One more stream (id ``stream.id``, an int) on every rank, batched with the others in the calls of
        :meth:`execute`. The first one (none open) starts a fresh stream state on every rank — what a
        :meth:`start` left is dropped — and fixes the settings all share (size, cache, decoder)."""
        if decode not in DECODERS:
            raise ValueError(f"decode must be one of {sorted(DECODERS)}, got {decode!r}")
        cfg = PipeConfig(tokens_per_frame=tokens_per_frame, cache=cache, decode=DECODERS[decode],
                         renoise_seed=int(renoise_seed))
        fresh = not self._opened
        if not fresh:
            old = self.cfg
            if (old.tokens_per_frame, old.cache, old.decode, old.mode) != (cfg.tokens_per_frame, cache, cfg.decode,
                                                                           cfg.mode):
                raise ValueError("every stream of a pipeline shares its size, cache settings and decoder")
        context = self._context(context)
        if fresh:
            self._finish_in_flight()
            self.finished.clear()
        self.transport.send(1, Message(Kind.OPEN, meta=cfg.to_meta() + [int(stream.id), int(rows), int(fresh)],
                                       payloads=[context]))
        if fresh:
            self.stage.configure(cfg)
            self.cfg, self.started, self.streams = cfg, True, {}
        self.stage.open_stream(stream.id, rows, cfg.renoise_seed, context)
        self.streams[stream.id] = stream
        self._opened.add(stream.id)

    @_guard
    def close_stream(self, stream: int) -> None:
        """A stream leaves; its calls in flight still finish on every rank (their chunks are dropped here)."""
        self._opened.discard(stream)
        if self.streams.pop(stream, None) is None:
            return
        self.transport.send(1, Message(Kind.CLOSE, meta=[int(stream)]))
        self.stage.close_stream(stream)

    @_guard
    def reset_stream(self, stream: int, rows: int, renoise_seed: int) -> None:
        """A stream starts over: the calls in flight finish first (the other streams' chunks are kept for the
        next :meth:`execute` / :meth:`collect`), its own chunks in flight are dropped."""
        self._finish_in_flight()
        self.finished = [f for f in self.finished if f.row.stream != stream]
        st = self.streams[stream]
        st.inputs.clear()
        st.latents.clear()
        self.transport.send(1, Message(Kind.RESET, meta=[int(stream), int(rows), int(renoise_seed)]))
        self.stage.reset_stream(stream, rows, renoise_seed)

    def failure(self) -> str | None:
        """Why this pipeline cannot serve (a rank failed or exited, or it was stopped); None while it can."""
        if self.error is not None:
            return self.error
        if self.closed:
            return "the pipeline was stopped"
        for rank, p in enumerate(self.processes, start=1):
            if p.exitcode is not None:
                return f"rank {rank} exited (exit code {p.exitcode})"
        return None

    def _context(self, context: torch.Tensor) -> torch.Tensor:
        context = context.to(self.device, self.model.dtype)
        return context[None] if context.ndim == 2 else context

    @_guard
    def execute(self, call: Call) -> list[Finished]:
        """Run one call of a runner's plan (the engine's pipeline runner); returns the chunks whose RETURN arrived
        meanwhile."""
        self._need_start()
        self._maybe_rebalance()
        self.run_call(call)
        return self._take_finished()

    @_guard
    def collect(self) -> list[Finished]:
        """Wait for every call in flight; their finished chunks."""
        self._finish_in_flight()
        return self._take_finished()

    # ====================================================================== calls
    def _execute(self, stages) -> None:
        for call in compose([stages]):
            self.run_call(call)

    def run_call(self, call: Call) -> None:
        """Execute one call of the schedule through the ring: re-lay rows (RECONFIG), gather the rows' latents
        (waiting for in-flight RETURNs that bring them back), run blocks ``[0, b0)``, send the STEP on."""
        for sid, rows in call.resize:
            self.transport.send(1, Message(Kind.RECONFIG, meta=[int(sid), int(rows)]))
            self.stage.reconfigure_rows(sid, rows)
        if not call.rows:
            return
        xs, own_t0 = gather_rows(call.rows, self.streams, self._collect_one)
        x = torch.cat(xs)
        ts = row_timesteps(call.rows, own_t0, self.device)
        m = StepMeta(self.epoch, list(call.rows), self.stage.grid_of(x), copy_row0=bool(call.copy_row0))
        call_id = self._new_call()
        self._run_and_send(call_id, x, ts, m)
        self.pending.append(_Pending(call_id, list(call.rows)))

    @_guard
    def move_block(self, src: int, dst: int, reason: str = "requested") -> Move:
        """Move one boundary block from rank ``src`` to its neighbour ``dst`` now (between two calls).

        Calls already in flight finish on the old owner: each stage handles the MOVE after them, in order.
        """
        move = boundary_move(self.stage.ranges, src, dst, reason)
        t0 = time.perf_counter()
        self.epoch += 1
        self.transport.send(1, Message(Kind.MOVE, meta=[move.block, src, dst, self.epoch]))
        if src == 0:
            self.transport.send(1, self.stage.export_block(move.block))
        elif dst == 0:
            while True:
                msg = self.transport.recv(1, "a moved block")
                if msg.kind == Kind.RETURN and self.last == 1:
                    self._apply_return(msg)
                    continue
                if msg.kind != Kind.BLOCK:
                    raise ProtocolError(f"rank 0: expected BLOCK from rank 1, got {msg.kind.name}")
                self.transport.consume(msg)
                self.stage.import_block(msg)
                break
        self.stage.apply_move(move)
        self.stage.epoch = self.epoch
        if self.scheduler is not None:
            self.scheduler.apply(move)
        rec = MoveRecord(move, self.chunks, self.split, time.perf_counter() - t0)
        self.moves.append(rec)
        log.info("pipeline: moved block %d from rank %d to rank %d at chunk %d (%s); split now %s",
                    move.block, src, dst, self.chunks, reason, format_split(self.split))
        return move

    # ====================================================================== lifecycle
    def close(self) -> None:
        """Stop every rank (in-flight chunks are dropped: call :meth:`drain` first to keep them)."""
        if self.closed:
            return
        try:
            with torch.no_grad():
                self._finish_in_flight()
            self.transport.send(1, Message(Kind.STOP))
            for src in self.transport.ins:
                while self.transport.recv(src, "STOP").kind != Kind.STOP:
                    pass
            self.transport.close()
            self.health.exited("ok")
            _reap(self.processes, self.spec.dead_after + 5)
        except BaseException as exc:
            self._abort(exc)
            raise
        finally:
            self.closed = True

    def memory_report(self) -> list[int]:
        """Bytes per rank (CUDA: peak allocated; CPU: weights + caches + VAE held); workers publish theirs when
        they stop, so the full list is there after :meth:`close`."""
        out = [self.stage.memory_bytes()]
        for r in range(1, self.world):
            key = f"mem/{r}"
            out.append(int(self.health.store.get(key).decode()) if self.health.store.check([key]) else -1)
        return out

    def _abort(self, exc: BaseException) -> None:
        if self.closed:
            return
        self.closed = True
        if isinstance(exc, PipelineError):
            msg, culprit = str(exc), exc.rank
        elif isinstance(exc, KeyboardInterrupt):
            msg, culprit = "rank 0 was interrupted (Ctrl-C)", 0
        else:
            msg, culprit = f"rank 0 failed: {type(exc).__name__}: {exc}", 0
        self.error = msg
        self.health.report(msg, culprit)
        self.health.exited("error")
        if culprit is not None and 1 <= culprit <= len(self.processes):
            stuck = self.processes[culprit - 1]     # dead, stopped or hung: it cannot exit on its own
            if stuck.is_alive():
                stuck.kill()
        _reap(self.processes, self.spec.dead_after + 2 * self.spec.poll + 1)
        self.transport.close(wait=2.0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()
        else:
            self._abort(exc[1])
        return False

    # ====================================================================== internals
    def _need_start(self) -> None:
        if not self.started:
            raise RuntimeError("start() the stream first")

    def _new_call(self) -> int:
        self.calls += 1
        return self.calls

    def _run_and_send(self, call: int, x: torch.Tensor, ts: torch.Tensor, m: StepMeta) -> None:
        st = self.stage
        st.timer.start_call()
        with st.timer.section("busy"):
            hidden = st.run(x, ts, m)
        st.timer.end_call()
        dit_us, busy_us = st.timer.latest()
        m.timings = [(dit_us, busy_us, st.blocks[1] - st.blocks[0])]
        self.transport.send(1, Message(Kind.STEP, call, m.to_meta(), [hidden, x, ts]))

    def _recv_return(self) -> Message:
        msg = self.transport.recv(self.last, "a RETURN")
        if msg.kind != Kind.RETURN:
            raise ProtocolError(f"rank 0: expected RETURN from rank {self.last}, got {msg.kind.name}")
        return msg

    def _collect_one(self) -> None:
        self._apply_return(self._recv_return())

    def _apply_return(self, msg: Message) -> None:
        if not self.pending:
            raise ProtocolError(f"RETURN of call {msg.call} with no call in flight")
        c = self.pending.popleft()
        if msg.call != c.call:
            raise ProtocolError(f"RETURN of call {msg.call}, expected {c.call}")
        self.transport.consume(msg)
        m = StepMeta.from_meta(msg.meta)
        stay = [r for r in c.rows if not r.final]
        done = [r for r in c.rows if r.final]
        if (m.keep, m.finished) != (len(stay), len(done)):
            raise ProtocolError(f"RETURN of call {c.call}: {m.keep} kept / {m.finished} finished rows, expected "
                                f"{len(stay)} / {len(done)}")
        payloads = list(msg.payloads)
        if stay:
            renoised = payloads.pop(0)
            for i, r in enumerate(stay):
                if r.stream in self.streams:            # (a stream closed meanwhile: dropped)
                    self.streams[r.stream].latents[r.chunk] = renoised[i: i + 1]
        if done:
            x0 = payloads.pop(0)
            for i, r in enumerate(done):
                frames = payloads.pop(0) if m.decoded else None
                if r.stream in self.streams:
                    self.finished.append(Finished(r.chunk, x0[i: i + 1], frames, r))
        self._observe(m)

    def _observe(self, m: StepMeta) -> None:
        if self.scheduler is None or len(m.timings) != self.world or m.epoch != self.epoch:
            return          # samples from before the last move are stale
        costs = [StageCost(total=busy / 1e6, dit=dit / 1e6, blocks=n) for dit, busy, n in m.timings]
        self.scheduler.observe(costs)

    def _maybe_rebalance(self) -> None:
        if self.scheduler is None:
            return
        move = self.scheduler.step()
        if move is not None:
            self.move_block(move.src, move.dst, move.reason)

    def _finish_in_flight(self) -> None:
        while self.pending:
            self._collect_one()

    def _take_finished(self) -> list[Finished]:
        out, self.finished = self.finished, []
        return out


def _wait_up(store, spec: LaunchSpec, health, procs) -> None:
    """Wait until every rank has loaded its stage, watching the spawned processes and reported errors."""
    deadline = time.monotonic() + spec.startup_timeout
    while True:
        missing = [r for r in range(spec.world) if not store.check([f"up/{r}"])]
        if not missing:
            return
        for r, p in enumerate(procs, start=1):
            if p.exitcode is not None:
                errs = {e[0]: e[2] for e in health.errors()}
                raise PipelineError(errs.get(r, f"rank {r} exited during startup (exit code {p.exitcode})"), r)
        errs = health.errors()
        if errs:
            raise PipelineError(errs[0][2], errs[0][1])
        if time.monotonic() > deadline:
            raise PipelineError(f"ranks {missing} did not start within {spec.startup_timeout:.0f} s", missing[0])
        time.sleep(spec.poll)


def _reap(procs, wait: float) -> None:
    """Join the spawned ranks; terminate, then kill, any that is still there after ``wait`` seconds."""
    deadline = time.monotonic() + wait
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():   # stuck or stopped: it had its chance to exit on its own
            p.kill()
            p.join(5.0)
