"""Rank 0 of the pipeline: executes the engine's calls through the ring of ranks.

The engine's :class:`~wanstream.pipeline.runner.PipelineRunner` hands each call of a tick to :meth:`PipelineDriver.
execute`: rank 0 re-lays rows where the call says so (RECONFIG), gathers the rows' latents (a chunk entering is
mixed with its stream's noise here; a row that left ``lag`` calls ago waits for its RETURN from the last stage),
runs blocks ``[0, b0)`` and sends the STEP on. The last stage settles the rows and returns the re-noised ones and
the chunks that left clean (:class:`~wanstream.engine.runner.Done`, decoded there when it decodes). ``lag`` = W
calls circulate, so the ring reproduces ``LatentStream(lag=W)``; mixing noise is drawn here, re-noising noise on
the last stage (its own seeded source per stream).

Streams open, close and reset by id (OPEN / CLOSE / RESET); prompt changes, re-seeding, row changes, block moves
and the end of the pipeline travel in the same ordered stream as the STEPs, so each stage applies them between
the same two calls. Owns rank 0's side of the protocol and the block scheduler's moves; imports ``core``,
``models``, ``engine`` (runner, timing) and the rest of this package, never ``api`` or above.
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
from wanstream.core.schedule import Call, Row
from wanstream.engine.runner import Done, RunnerStream, gather_rows, row_timesteps
from wanstream.models.loader import num_layers_of
from wanstream.pipeline.health import Health, PipelineError
from wanstream.pipeline.launch import (
    LaunchSpec,
    check_devices,
    connect,
    host_store,
    load_rank,
    make_transport,
    reap,
    setup_rank,
    spawn_workers,
    torchrun_env,
    wait_up,
)
from wanstream.pipeline.protocol import DECODERS, Kind, Message, PipeConfig, ProtocolError, StepMeta
from wanstream.pipeline.stage import Stage
from wanstream.pipeline.transport import Transport

log = logging.getLogger("wanstream.pipeline")

_LIVE: "weakref.WeakSet[PipelineDriver]" = weakref.WeakSet()


@atexit.register
def _abort_live_drivers() -> None:
    """Interpreter exit with a pipeline still open: stop its ranks so no thread is left inside gloo."""
    for drv in list(_LIVE):
        if not drv.closed:
            drv._abort(PipelineError("rank 0 exited without closing the pipeline", 0))


@dataclass
class _Pending:
    """A call in flight: its id and its rows (chunk ids stay here; the ring only sees host ints)."""

    call: int
    rows: list[Row]


@dataclass
class MoveRecord:
    move: Move
    call: int                           # the calls sent before it
    split: list[tuple[int, int]]
    seconds: float


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
    """The ring of W ranks as seen from rank 0, this process (see the module docstring)."""

    def __init__(self, stage: Stage, transport: Transport, health: Health, spec: LaunchSpec, *, processes=(),
                 stores=(), schedule: SchedulerConfig | None = None):
        self.stage = stage
        self.transport = transport
        self.health = health
        self.spec = spec
        self.world = stage.world
        self.last = self.world - 1
        self.processes = list(processes)
        self._stores = list(stores)          # keep the hosted store alive while ranks use it
        self.lag = self.world                # calls in flight: one per rank
        self.scheduler = BlockScheduler(stage.ranges, schedule) if schedule is not None else None
        self.moves: list[MoveRecord] = []
        self.epoch = 0
        self.pending: deque[_Pending] = deque()
        self.finished: list[Done] = []
        self.calls = 0
        self.closed = False
        self.error: str | None = None        # why the pipeline stopped (set when it was aborted)
        self.cfg: PipeConfig | None = None   # the settings of the streams on the ranks (None: none opened yet)
        self.streams: dict[int, RunnerStream] = {}
        _LIVE.add(self)
        log.info("pipeline of %d ranks, split %s", self.world, format_split(stage.ranges))

    # ====================================================================== launching
    @classmethod
    def launch(cls, model: str | Path, devices: list[str], *, split: list[tuple[int, int]] | None = None,
               dtype: torch.dtype | None = None, decode: str = "none", vae: bool = False, text_encoder: bool = False,
               schedule: SchedulerConfig | None = None, timeout: float = 120.0,
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
            wait_up(store, spec, health, procs)
            health.mark("connecting")
            transport = make_transport(0, spec, store, health)
        except BaseException as exc:
            if health is not None:
                health.report(f"rank 0 failed during startup: {type(exc).__name__}: {exc}", 0)
                health.exited("error")
            reap(procs, spec.dead_after + 2)
            raise
        stage = Stage(model0, 0, world, split)
        health.mark("ready")
        return cls(stage, transport, health, spec, processes=procs, stores=(store, raw), schedule=schedule)

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
        wait_up(store, spec, health, [])
        transport = make_transport(0, spec, store, health)
        return cls(Stage(model0, 0, spec.world, spec.split), transport, health, spec, stores=(store, raw),
                   schedule=schedule)

    # ====================================================================== properties
    @property
    def split(self) -> list[tuple[int, int]]:
        return list(self.stage.ranges)

    @property
    def model(self):
        """Rank 0's share of the model (:class:`~wanstream.models.loader.ModelBundle`): VAE, text encoder, blocks
        ``[0, b0)``."""
        return self.stage.model

    @property
    def device(self) -> torch.device:
        return self.stage.device

    @property
    def started(self) -> bool:
        """Whether streams were opened on the ranks (there are calls to run or collect)."""
        return self.cfg is not None

    @property
    def in_flight(self) -> int:
        return len(self.pending)

    # ====================================================================== streams
    @_guard
    def open_stream(self, stream: RunnerStream, rows: int, context: torch.Tensor, *, renoise_seed: int,
                    tokens_per_frame: int, cache: CacheConfig = CacheConfig(), decode: str = "none") -> None:
        """One more stream (id ``stream.id``, an int) on every rank, batched with the others in the calls of
        :meth:`execute`. The first one (none open) starts a fresh state on every rank and fixes the settings all
        share (size, cache, decoder)."""
        if decode not in DECODERS:
            raise ValueError(f"decode must be one of {sorted(DECODERS)}, got {decode!r}")
        cfg = PipeConfig(tokens_per_frame, cache, DECODERS[decode])
        fresh = not self.streams
        if not fresh and cfg != self.cfg:
            raise ValueError("every stream of a pipeline shares its size, cache settings and decoder")
        context = self._context(context)
        if fresh:
            self._finish_in_flight()
            self.finished.clear()
        self.transport.send(1, Message(Kind.OPEN, meta=cfg.to_meta() + [int(stream.id), int(rows),
                                                                        int(renoise_seed), int(fresh)],
                                       payloads=[context]))
        if fresh:
            self.stage.configure(cfg)
            self.cfg = cfg
        self.stage.open_stream(stream.id, rows, renoise_seed, context)
        self.streams[stream.id] = stream

    @_guard
    def close_stream(self, stream: int) -> None:
        """A stream leaves; its calls in flight still finish on every rank (their chunks are dropped here)."""
        if self.streams.pop(stream, None) is None:
            return
        self.transport.send(1, Message(Kind.CLOSE, meta=[int(stream)]))
        self.stage.close_stream(stream)

    @_guard
    def reset_stream(self, stream: int, rows: int, renoise_seed: int) -> None:
        """A stream starts over: the calls in flight finish first (the other streams' chunks are kept for the
        next :meth:`execute` / :meth:`collect`), its own chunks in flight are dropped."""
        self._finish_in_flight()
        self.finished = [d for d in self.finished if d.row.stream != stream]
        st = self.streams[stream]
        st.inputs.clear()
        st.latents.clear()
        self.transport.send(1, Message(Kind.RESET, meta=[int(stream), int(rows), int(renoise_seed)]))
        self.stage.reset_stream(stream, rows, renoise_seed)

    @_guard
    def set_prompt(self, stream: int, context: torch.Tensor) -> None:
        """New prompt embedding of a stream; every stage recomputes its blocks' K/V before the next call."""
        self._need_streams()
        context = self._context(context)
        self.transport.send(1, Message(Kind.PROMPT, meta=[int(stream)], payloads=[context]))
        self.stage.set_prompt(stream, context)

    @_guard
    def reseed(self, stream: int, renoise_seed: int) -> None:
        """A stream's new re-noising seed (the last stage's source); its mixing noise is the runner stream's."""
        self._need_streams()
        self.transport.send(1, Message(Kind.SEED, meta=[int(stream), int(renoise_seed)]))

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

    # ====================================================================== calls
    @_guard
    def execute(self, call: Call) -> list[Done]:
        """Run one call of the engine's plan; returns the chunks whose RETURN arrived meanwhile."""
        self._need_streams()
        self._maybe_rebalance()
        self._run_call(call)
        return self._take_finished()

    @_guard
    def collect(self) -> list[Done]:
        """Wait for every call in flight; their finished chunks."""
        self._finish_in_flight()
        return self._take_finished()

    def _run_call(self, call: Call) -> None:
        """Re-lay rows (RECONFIG), gather the rows' latents (waiting for in-flight RETURNs that bring them back),
        run blocks ``[0, b0)``, send the STEP on."""
        for sid, rows in call.resize:
            self.transport.send(1, Message(Kind.RECONFIG, meta=[int(sid), int(rows)]))
            self.stage.reconfigure_rows(sid, rows)
        if not call.rows:
            return
        xs, own_t0 = gather_rows(call.rows, self.streams, self._collect_one)
        x = torch.cat(xs)
        ts = row_timesteps(call.rows, own_t0, self.device)
        m = StepMeta(self.epoch, list(call.rows), self.stage.grid_of(x), copy_row0=bool(call.copy_row0))
        self.calls += 1
        st = self.stage
        with st.timed_call():
            hidden = st.run(x, ts, m)
        m.timings = st.timings(m)
        self.transport.send(1, Message(Kind.STEP, self.calls, m.to_meta(), [hidden, x, ts]))
        self.pending.append(_Pending(self.calls, list(call.rows)))

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
        self.moves.append(MoveRecord(move, self.calls, self.split, time.perf_counter() - t0))
        log.info("pipeline: moved block %d from rank %d to rank %d after call %d (%s); split now %s",
                 move.block, src, dst, self.calls, reason, format_split(self.split))
        return move

    # ====================================================================== lifecycle
    def close(self) -> None:
        """Stop every rank (the calls in flight finish first; their chunks are dropped)."""
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
            reap(self.processes, self.spec.dead_after + 5)
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
        reap(self.processes, self.spec.dead_after + 2 * self.spec.poll + 1)
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
    def _need_streams(self) -> None:
        if not self.started:
            raise RuntimeError("no stream was opened on this pipeline")

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
                    self.finished.append(Done(r, x0[i: i + 1], frames))
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

    def _take_finished(self) -> list[Done]:
        out, self.finished = self.finished, []
        return out
