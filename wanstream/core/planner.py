"""The planner: every host decision of a tick, for the streams of one group, as one :class:`~wanstream.core.plan.Plan`.

It owns, per stream (:class:`PlannedStream`), the stream-batch schedule (:class:`~wanstream.core.schedule.
StreamSchedule`), the input queue it takes chunks from (:class:`~wanstream.core.chunking.ChunkBuffer`), the
schedule-relevant settings (steps, stream batch or sequential), the chunk numbering and the scheduling counters; and
for the group the tick policy (:class:`~wanstream.core.scheduler.Scheduler`, SLO-aware, or :class:`~wanstream.core.
scheduler.RoundRobin`) with its latency model. One :meth:`Planner.plan` per tick:

1. the stream's live changes, in order: a reset starts a fresh schedule (its cache rows are re-laid by the engine),
   a step change drains the chunks in flight and re-lays the rows (in the calls), other changes pass through;
2. the policy decides from the queued frames which streams' next chunk enters (continuous batching), which wait a
   tick, which switch mode, which late frames are dropped;
3. the chunks are taken from the queues (at the end of input, the last partial chunk padded) and numbered, and each
   stream's schedule turns them into rows (prepare for a first chunk, a stream-batch push otherwise); a stream at
   the end of its input drains;
4. :func:`~wanstream.core.schedule.compose` merges every stream's stages into calls — usually one.

The engine executes the plan (tensor work only: encode, noise, DiT calls, decode) and reports each tick's time back
(:meth:`Planner.observe`). Cache-row leases are sized here (a stream's rows are its schedule's rows; step changes
and resets resize them through the plan) and placed by the storage (``core.leases``). No torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Mapping, Sequence

from wanstream.core.backbones import Backbone
from wanstream.core.backbones import backbone as get_backbone
from wanstream.core.chunking import ChunkBuffer
from wanstream.core.config import CacheConfig, StreamSettings
from wanstream.core.plan import Entry, Plan, StreamPlan
from wanstream.core.playout import PlayoutBuffer
from wanstream.core.schedule import Stage, StreamSchedule, compose
from wanstream.core.scheduler import Decision, Scheduler, StreamView
from wanstream.core.slack import ladder

SCHEDULE_UPDATES = ("reset", "steps", "recache")   # live changes with a schedule side; the others pass through


@dataclass
class StreamStats:
    """Counters of one stream (exported by the server and the benchmark). The planner counts the scheduling, the
    engine the frames out and the frames lost to a reset."""

    chunks: int = 0
    frames_out: int = 0
    dropped_late: int = 0          # frames dropped because they would miss their deadline
    dropped_reset: int = 0         # frames in flight when the stream was reset
    deferred: int = 0              # ticks the stream was held back to keep others within their deadline
    sequential_switches: int = 0
    batch_switches: int = 0
    rung: int = 0                  # degradation rung now (0: as asked; core.slack)
    degraded_chunks: int = 0       # chunks that entered on a lower rung
    degradations: int = 0
    restorations: int = 0
    recaches: int = 0              # prompt switches with KV re-cache
    recache_frames: int = 0        # latent frames re-encoded by them (each cache row)
    last_reasons: list[str] = field(default_factory=list)
    ladder_events: list[str] = field(default_factory=list)   # the last rung moves, each with its reason

    MAX_EVENTS = 16

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


@dataclass
class PlannedStream:
    """The planner's record of one stream: host state only."""

    id: Hashable
    settings: StreamSettings         # shared with the engine's stream (steps and batch are read here)
    buffer: ChunkBuffer
    schedule: StreamSchedule
    target_latency_s: float | None = None
    stats: StreamStats = field(default_factory=StreamStats)
    next_chunk: int = 0              # chunk ids since the last reset
    deferred_run: int = 0            # consecutive ticks held back
    since_switch: int = 10 ** 9      # ticks since the last mode switch
    finishing: bool = False          # end of input: pad the last chunk, then drain
    playout: PlayoutBuffer = field(default_factory=PlayoutBuffer)   # its viewer (the engine delivers the frames)
    rung: int = 0                    # degradation rung (core.slack.ladder of its steps); 0: as asked
    since_rung: int = 10 ** 9        # chunks since the last rung change
    decoder: str = "own"             # the decoder of its rung ("own" | "taehv")
    cheap_decoder: bool = False      # a TAEHV rung exists (the engine sets it: TAEHV loaded, the stream on the VAE)
    recache: Stage | None = None     # a KV re-cache asked for this tick: runs after the tick's outputs

    @property
    def rows(self) -> int:
        """Cache rows the stream holds now (its lease)."""
        return self.schedule.rows

    @property
    def ladder(self) -> list:
        """Its degradation rungs, best first (core.slack.ladder)."""
        return ladder(self.settings.steps, self.cheap_decoder)


class Planner:
    """Host decisions of one group of streams, one :class:`Plan` per tick (see the module docstring)."""

    def __init__(self, policy: Scheduler | None = None, *, cache: CacheConfig = CacheConfig(), lag: int = 1,
                 backbone: Backbone | str | None = None):
        self.policy = policy or Scheduler()
        self.cache = cache
        self.lag = lag                   # calls in flight on the runner (a pipeline of W ranks: W)
        self.backbone = get_backbone(backbone)   # the model's: step lists, context pass, stream batch or not
        self.streams: dict[Hashable, PlannedStream] = {}
        self.ticks = 0

    @property
    def latency(self):
        return self.policy.latency

    # ------------------------------------------------------------------------------------------ streams
    def add(self, stream: Hashable, settings: StreamSettings, buffer: ChunkBuffer,
            target_latency_s: float | None = None) -> PlannedStream:
        """A new stream; its cache rows are ``record.rows``."""
        if stream in self.streams:
            raise ValueError(f"stream {stream!r} is already planned")
        rec = PlannedStream(stream, settings, buffer, self._schedule(stream, settings), target_latency_s)
        self.streams[stream] = rec
        return rec

    def remove(self, stream: Hashable) -> None:
        self.streams.pop(stream, None)

    def finish(self, stream: Hashable) -> None:
        """End of input (any thread): the remaining frames go in, the last partial chunk padded, then it drains."""
        self.streams[stream].finishing = True

    def rows(self) -> int:
        """Cache rows of every stream of the group."""
        return sum(rec.rows for rec in self.streams.values())

    def admit(self, steps: int, input_fps: Sequence[float], mode: str = "v2v") -> tuple[bool, str]:
        """Whether one more stream with ``steps`` keeps every stream at its input rate (from the rows each stream
        adds to a tick and the frames a tick gives it: the backbone's chunk)."""
        new = StreamSchedule("new", steps, mode=mode, backbone=self.backbone).rows_per_tick
        now = sum(rec.schedule.rows_per_tick for rec in self.streams.values())
        return self.policy.admit(now, new, input_fps, self.backbone.chunk_rule(mode).frames)

    def observe(self, rows: int, seconds: float) -> None:
        """A tick with ``rows`` batch rows took ``seconds`` (feeds the latency model)."""
        self.policy.latency.observe(rows, seconds)

    def _schedule(self, stream: Hashable, settings: StreamSettings) -> StreamSchedule:
        return StreamSchedule(stream, settings.steps, mode=settings.mode, batch=settings.batch, cache=settings.cache,
                              lag=self.lag, backbone=self.backbone)

    # ------------------------------------------------------------------------------------------ the tick
    def plan(self, now: float, updates: Mapping[Hashable, Sequence[tuple[str, object]]] | None = None,
             streams: Sequence[Hashable] | None = None) -> Plan:
        """The next tick for ``streams`` (default: every stream, in the order they joined) with the live changes
        taken since the last tick (``updates[stream]``, in order)."""
        updates = updates or {}
        order = [self.streams[s] for s in (self.streams if streams is None else streams)]
        plan = Plan(self.ticks, now)
        self.ticks += 1
        stages: dict[Hashable, list[Stage]] = {}
        for rec in order:
            sp = plan.streams[rec.id] = StreamPlan(rec.id)
            stages[rec.id] = self._updates(rec, updates.get(rec.id, ()), sp)
        running = sum(len(st.rows) for v in stages.values() for st in v)
        decision = self._decide([rec for rec in order if rec.recache is None], now, running)
        plan.predicted_s = decision.predicted_tick_s
        for rec in order:
            self._apply(rec, decision, plan.streams[rec.id], stages[rec.id])
        for rec in order:
            sp = plan.streams[rec.id]
            if rec.recache is not None:
                continue                                # re-caching: its next chunk waits for the next tick
            if rec.id in decision.join:
                chunk = rec.buffer.take()
            elif rec.finishing and not rec.buffer.ready():
                chunk = rec.buffer.take_padded()        # end of input: the last partial chunk, padded
            else:
                chunk = None
            if chunk is not None:
                stages[rec.id] += self._enter(rec, chunk, sp)
                plan.collect |= sp.entry.first          # the first output as soon as it is there (TTFF)
            if rec.finishing and len(rec.buffer) == 0:
                rec.finishing = False
                sp.drains = plan.collect = True         # end of input: every call in flight comes back
                stages[rec.id] += rec.schedule.drain()
        plan.calls = compose([stages[rec.id] for rec in order if stages[rec.id]])
        plan.late_calls = compose([[rec.recache] for rec in order if rec.recache is not None])
        for rec in order:
            rec.recache = None
        return plan

    def _updates(self, rec: PlannedStream, updates: Sequence[tuple[str, object]], sp: StreamPlan) -> list[Stage]:
        """The schedule side of a stream's live changes; every change is passed on in ``sp.updates``."""
        stages: list[Stage] = []
        for kind, value in updates:
            if kind == "reset":
                rec.schedule = self._schedule(rec.id, rec.settings)
                rec.next_chunk = 0
                stages = []                             # whatever drained before the reset is dropped with it
                value = rec.schedule.rows
                rec.decoder = "own"                     # (the engine's reset starts its own decoder afresh)
                self._set_rung(rec, 0, "restored: the stream was reset", sp)
            elif kind == "steps":
                rec.settings.steps = int(value)
                stages += rec.schedule.reconfigure(int(value))
                self._set_rung(rec, 0, "restored: the steps were changed", sp)
            elif kind == "recache":
                drain, rec.recache = rec.schedule.recache(keep_sink=bool(value))
                stages += drain
                if rec.recache is not None:
                    rec.stats.recaches += 1
                    rec.stats.recache_frames += rec.recache.frames * len(rec.recache.rows)
            sp.updates.append((kind, value))
        return stages

    def _decide(self, order: list[PlannedStream], now: float, running_rows: int) -> Decision:
        views = []
        for rec in order:
            if rec.buffer.held:
                continue
            arrivals = rec.buffer.arrivals()
            n = rec.buffer.next_len
            if len(arrivals) < n:
                continue
            sch = rec.schedule
            views.append(StreamView(
                rec.id, arrivals, n, rows=sch.rows if sch.prepared and sch.batch else 1,
                calls_to_output=sch.calls_to_output if sch.prepared else 1, sequential=not sch.batch,
                can_batch=sch.can_batch and rec.settings.batch, deferred=rec.deferred_run,
                since_switch=rec.since_switch, target_latency_s=rec.target_latency_s, levels=sch.levels,
                slack_s=rec.playout.slack(now), interval_s=rec.playout.interval, ladder=rec.ladder, rung=rec.rung,
                since_rung=rec.since_rung))
        return self.policy.plan(views, now, running_rows)

    def _apply(self, rec: PlannedStream, d: Decision, sp: StreamPlan, stages: list[Stage]) -> None:
        """The policy's decision for one stream: counters, late drops, a mode switch."""
        rec.since_switch += 1
        if rec.id in d.reasons:
            rec.stats.last_reasons = sp.reasons = d.reasons[rec.id]
        if rec.id in d.defer:
            rec.deferred_run += 1
            rec.stats.deferred += 1
            sp.deferred = True
        elif rec.id in d.join:
            rec.deferred_run = 0
        drop = d.drop.get(rec.id, 0)
        if drop:
            sp.dropped = rec.buffer.drop_oldest(drop)
            rec.stats.dropped_late += sp.dropped
        rung = d.rungs.get(rec.id, rec.rung)
        if rung != rec.rung:
            steps = rec.ladder[rung].steps
            if steps != rec.schedule.steps:
                stages += rec.schedule.reconfigure(steps)
            why = [r for r in d.reasons.get(rec.id, ()) if r.startswith(("degraded", "restored"))]
            self._set_rung(rec, rung, why[-1] if why else f"rung {rung}", sp)
        if rec.id in d.sequential or rec.id in d.batch:
            to_batch = rec.id in d.batch
            stages += rec.schedule.reconfigure(rec.settings.steps, batch=to_batch)
            rec.since_switch = 0
            sp.switch = "batch" if to_batch else "sequential"
            if to_batch:
                rec.stats.batch_switches += 1
            else:
                rec.stats.sequential_switches += 1

    @staticmethod
    def _set_rung(rec: PlannedStream, rung: int, reason: str, sp: StreamPlan) -> None:
        """Move a stream to a rung of its ladder (its schedule's steps are the caller's): a decoder change goes to
        the engine in ``sp.updates`` (``("decoder", "own" | "taehv")``), the move and its reason to the stats."""
        decoder = rec.ladder[rung].decoder
        if decoder != rec.decoder:
            sp.updates.append(("decoder", decoder))
            rec.decoder = decoder
        if rung == rec.rung:
            return
        st = rec.stats
        if rung > rec.rung:
            st.degradations += 1
        else:
            st.restorations += 1
        rec.rung = st.rung = rung
        rec.since_rung = 0
        st.ladder_events = (st.ladder_events + [f"chunk {rec.next_chunk}: {reason}"])[-StreamStats.MAX_EVENTS:]

    def _enter(self, rec: PlannedStream, chunk: tuple[list, object], sp: StreamPlan) -> list[Stage]:
        """A chunk taken from the queue enters the stream's schedule: numbered, then prepared or pushed."""
        frames, info = chunk
        first = not rec.schedule.prepared
        latent_frames = rec.buffer.rule.latent_frames(info.first)
        cid = rec.next_chunk
        rec.next_chunk += 1
        rec.stats.chunks += 1
        rec.playout.note_arrivals(info.arrivals[: info.real])
        rec.since_rung += 1
        if rec.rung:
            rec.stats.degraded_chunks += 1
        sp.entry = Entry(cid, frames, info, latent_frames, first)
        if first and rec.settings.mode == "v2v":               # text-to-video blocks start from noise: no prepare
            return rec.schedule.prepare(cid, latent_frames)
        return rec.schedule.push(cid, latent_frames)
