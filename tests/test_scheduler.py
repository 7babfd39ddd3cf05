"""The pure scheduler (no torch): the stream-batch schedule of one stream, call composition, the latency model,
and the tick policy on a simulated clock (continuous batching, deadlines, bounded waits, admission, the
sequential switch) — no timing on the real clock anywhere."""

from __future__ import annotations

import pytest

from wanstream.core.chunking import ChunkBuffer
from wanstream.core.config import CacheConfig, StreamSettings
from wanstream.core.planner import Planner
from wanstream.core.schedule import Stage, StreamSchedule, compose, step_list
from wanstream.core.scheduler import LatencyModel, Scheduler, SLOConfig, StreamView


# ============================================================================================ one stream
def test_prepare_runs_every_level_on_row0_then_copies():
    s = StreamSchedule("a", 3)
    stages = s.prepare("c0", 2)
    assert [(r.level, r.cache_row, r.final, r.enters, r.t, r.t_next) for st in stages for r in st.rows] == \
        [(0, 0, False, True, 700, 500), (1, 0, False, False, 500, 400), (2, 0, True, False, 400, -1)]
    assert [st.copy_row0 for st in stages] == [False, False, True] and all(st.frames == 2 for st in stages)
    assert stages[0].rows[0].frame == 0 and stages[0].rows[0].rope == 0 and s.next_frame == 2


def test_stream_batch_fills_shifts_and_drains():
    s = StreamSchedule("a", 3)
    s.prepare("p", 2)
    seen = []
    for c in range(5):
        (st,) = s.push(c)
        seen.append([(r.chunk, r.level, r.cache_row, r.final, r.enters) for r in st.rows])
    assert seen[0] == [(0, 0, 0, False, True)]
    assert seen[1] == [(1, 0, 0, False, True), (0, 1, 1, False, False)]
    assert seen[2] == [(2, 0, 0, False, True), (1, 1, 1, False, False), (0, 2, 2, True, False)]
    assert seen[4] == [(4, 0, 0, False, True), (3, 1, 1, False, False), (2, 2, 2, True, False)]
    drained = [[(r.chunk, r.level) for r in st.rows] for st in s.drain()]
    assert drained == [[(4, 1), (3, 2)], [(4, 2)]]
    assert s.in_flight == 0 and s.drain() == []


def test_sequential_mode_and_rope_refresh():
    s = StreamSchedule("a", 2, batch=False, cache=CacheConfig(rope_wrap_at=6, rope_wrap_to=3))
    s.prepare("p", 2)
    stages = s.push(0)
    assert [(r.level, r.cache_row, r.final) for st in stages for r in st.rows] == [(0, 0, False), (1, 0, True)]
    ropes = [s.push(c)[0].rows[0].rope for c in range(1, 6)]
    assert ropes == [3, 4, 5, 3, 4]                     # position 6 would reach wrap_at: restart at 3
    assert s.calls_to_output == 1


def test_step_change_drains_then_relays_rows():
    s = StreamSchedule("a", 2)
    s.prepare("p", 2)
    s.push(0)
    s.push(1)
    stages = s.reconfigure(4)
    assert [[(r.chunk, r.level) for r in st.rows] for st in stages[:-1]] == [[(1, 1)]]
    assert stages[-1].rows == [] and stages[-1].resize == 4
    assert s.rows == 4 and s.steps_list == [700, 500, 400, 200]
    assert s.reconfigure(4) == []
    with pytest.raises(ValueError, match="steps"):
        s.reconfigure(5)
    assert s.steps == 4                                 # a rejected change changes nothing


def test_lag_keeps_w_batches_in_flight():
    s = StreamSchedule("a", 2, lag=2)
    s.prepare("p", 2)
    levels = [[(r.chunk, r.level) for r in s.push(c)[0].rows] for c in range(5)]
    # a chunk is back in slot 1 two calls after it entered (W = 2 batches circulate)
    assert levels == [[(0, 0)], [(1, 0)], [(2, 0), (0, 1)], [(3, 0), (1, 1)], [(4, 0), (2, 1)]]
    assert s.calls_to_output == 3


def test_t2v_step_list_has_a_clean_level():
    assert step_list(2, "t2v") == [1000, 750, 0]
    s = StreamSchedule("a", 2, mode="t2v")
    (st,) = s.push(0, frames=3)                        # text-to-video streams start without a prepare
    assert st.rows[0].t == 1000 and st.frames == 3 and s.rows == 3


# ============================================================================================ composition
def _stage(stream, n, frames=1, final_at=None):
    from wanstream.core.schedule import Row
    return Stage(stream, [Row(stream, 0, i, i, 0, 0, i == final_at, i == 0) for i in range(n)], frames)


def test_compose_merges_rounds_and_separates_frame_counts():
    a = [_stage("a", 2), _stage("a", 1)]
    b = [_stage("b", 3)]
    c = [_stage("c", 1, frames=2)]                     # a first chunk (2 latent frames): its own call
    d = [Stage("d", [], resize=4), _stage("d", 4)]     # a bare step change rides on round 0
    calls = compose([a, b, c, d])
    assert [(cl.frames, cl.streams, len(cl.rows)) for cl in calls] == \
        [(1, ["a", "b"], 5), (2, ["c"], 1), (1, ["a", "d"], 5)]
    assert calls[0].resize == [("d", 4)]
    assert compose([]) == [] and compose([[Stage("x", [], resize=1)]])[0].rows == []


# ============================================================================================ latency model
def test_latency_model_measures_and_predicts():
    m = LatencyModel(alpha=0.5)
    assert m.predict(4) is None
    m.observe(2, 0.10)
    assert m.predict(2) == 0.10 and m.predict(4) == pytest.approx(0.20)      # one point: scaled (conservative)
    m.observe(2, 0.20)
    assert m.predict(2) == pytest.approx(0.15)
    m.observe(8, 0.30)
    assert m.predict(5) == pytest.approx(0.225) and m.predict(1) == pytest.approx(0.15)  # line, floored


# ============================================================================================ simulation
class Sim:
    """N live streams on a simulated clock, planned by the real :class:`Planner`: frames arrive at their input rate
    into bounded queues, each tick is the planner's plan, which takes ``cost(rows)`` seconds; a chunk's frames come
    out when the call its row leaves clean from ends. The policy under test decides every tick."""

    def __init__(self, fps, steps=2, slo=None, cost=lambda rows: 0.05 + 0.02 * rows, queue_chunks=None,
                 targets=None, latency=None, offsets=None):
        self.n = len(fps)
        self.fps, self.cost = fps, cost
        self.planner = Planner(Scheduler(slo, latency or LatencyModel()))
        self.buffers = [ChunkBuffer(max_chunks=queue_chunks) for _ in range(self.n)]
        targets = targets or [None] * self.n
        self.records = [self.planner.add(k, StreamSettings(steps=steps), self.buffers[k], targets[k])
                        for k in range(self.n)]
        self.offsets = offsets or [0.0] * self.n
        self.sent = [0] * self.n
        self.now = 0.0
        self.arrivals = [dict() for _ in range(self.n)]       # chunk id → arrivals of its real frames
        self.latencies = [[] for _ in range(self.n)]
        self.max_run = [0] * self.n
        self.plans = []

    @property
    def schedules(self):
        return [rec.schedule for rec in self.records]

    @property
    def decisions(self):
        return self.plans

    def feed(self):
        for k in range(self.n):
            while self.offsets[k] + self.sent[k] / self.fps[k] <= self.now:
                t = self.offsets[k] + self.sent[k] / self.fps[k]
                self.buffers[k].push(None, t)
                self.sent[k] += 1

    def tick(self):
        self.feed()
        plan = self.planner.plan(self.now)
        self.plans.append(plan)
        for k, rec in enumerate(self.records):
            self.max_run[k] = max(self.max_run[k], rec.deferred_run)
            entry = plan.streams[k].entry
            if entry is not None:
                self.arrivals[k][entry.chunk] = entry.info.arrivals[: entry.info.real]
        rows = plan.rows
        dt = self.cost(rows) if rows else 1e-3
        if rows:
            self.planner.observe(rows, dt)
        self.now += dt
        for call in plan.calls:
            for r in call.rows:
                if r.final:
                    self.latencies[r.stream] += [self.now - a for a in self.arrivals[r.stream].pop(r.chunk)]

    def run(self, seconds, max_ticks=100_000):
        for _ in range(max_ticks):                     # bounded
            if self.now >= seconds:
                break
            self.tick()
        return self

    def dropped(self, k):
        return self.buffers[k].dropped

    def miss_rate(self, target):
        lat = [x for ls in self.latencies for x in ls]
        return sum(x > target for x in lat) / len(lat)


def joined(plan) -> list:
    return [sid for sid, sp in plan.streams.items() if sp.entry is not None]


def reasons(plans) -> list[str]:
    return [r for p in plans for sp in p.streams.values() for r in sp.reasons]


def test_continuous_batching_puts_every_ready_stream_in_one_call():
    sim = Sim([16.0] * 4, cost=lambda rows: 0.05).run(20)
    ticks = [p for p in sim.plans if joined(p)][1:]                # after the prepare (every level in turn)
    assert ticks and all(len(joined(p)) == 4 for p in ticks)      # lockstep streams: all in every call ...
    assert all(len(p.calls) == 1 for p in ticks)                  # ... and ONE DiT call
    assert all(sim.dropped(k) == 0 for k in range(4))


def test_under_capacity_nothing_is_dropped_or_deferred_and_deadlines_hold():
    slo = SLOConfig(target_latency_s=1.0)
    sim = Sim([16.0] * 3, slo=slo, cost=lambda rows: 0.02 + 0.005 * rows, queue_chunks=4).run(30)
    assert all(sim.dropped(k) == 0 for k in range(3)) and max(sim.max_run) == 0
    assert sim.miss_rate(1.0) == 0.0


def test_double_overload_keeps_latency_bounded_by_dropping_late_frames():
    """The model gives each stream half its input rate: without the policy the queues (and latency) grow for
    as long as the run lasts; with it, late frames are dropped, latency stays bounded and misses are rare."""
    cost = lambda rows: 0.5 + 0.0 * rows           # noqa: E731 - a chunk (4 frames) per 0.5 s tick: 8 fps each
    plain = Sim([16.0, 16.0], cost=cost).run(60)    # two 16 fps streams: 2x overload
    late = [lat[-1] for lat in plain.latencies]
    assert min(late) > 20                           # a FIFO backlog: tens of seconds behind after a minute
    slo = SLOConfig(target_latency_s=2.0, sequential_after_s=None)
    sim = Sim([16.0, 16.0], slo=slo, cost=cost, queue_chunks=8).run(60)
    for k in range(2):
        steady = sim.latencies[k][len(sim.latencies[k]) // 4:]
        assert max(steady) < 2 * 2.0                # bounded (the deadline plus at most one chunk of waiting)
        assert sim.dropped(k) > 0.3 * sim.sent[k]   # about half of the frames cannot be served, and are dropped
    assert sim.miss_rate(2.0) < 0.2
    assert any("dropped" in r for r in reasons(sim.plans))     # the stats say why
    assert sum(sp.dropped for p in sim.plans for sp in p.streams.values()) == sim.dropped(0) + sim.dropped(1)


def test_tight_deadline_stream_gets_a_smaller_batch_and_no_stream_waits_long():
    """One stream with a tight deadline among relaxed ones: the policy holds relaxed streams back a tick when
    that lets the tight one meet its deadline, but never one stream more than max_defer ticks in a row."""
    cost = lambda rows: 0.04 + 0.03 * rows          # noqa: E731
    calibrated = LatencyModel()                     # a profile of the model (e.g. from wanstream bench)
    for rows in (1, 2, 3, 4):
        calibrated.observe(rows, cost(rows))
    # the oldest frame of a chunk waits 3/8 s; with all 4 rows the call makes it 0.535 s, alone 0.445 s
    slo = SLOConfig(target_latency_s=3.0, max_defer=1, sequential_after_s=None, drop_late=False)
    sim = Sim([8.0] * 4, steps=1, slo=slo, cost=cost, targets=[0.5, None, None, None], latency=calibrated).run(40)
    assert sum(sim.max_run[1:]) > 0                 # the relaxed streams were held back at times ...
    assert max(sim.max_run) <= 1                    # ... never twice in a row (bounded wait)
    assert sim.max_run[0] == 0                      # the tight stream never waits
    tight = sim.latencies[0][len(sim.latencies[0]) // 3:]
    assert sum(x > 0.5 for x in tight) / len(tight) < 0.1
    assert max(x for ls in sim.latencies[1:] for x in ls) < 3.0        # the relaxed streams keep their deadline
    no_policy = Sim([8.0] * 4, steps=1, cost=cost).run(40)
    tight_plain = no_policy.latencies[0][len(no_policy.latencies[0]) // 3:]
    assert sum(x > 0.5 for x in tight_plain) / len(tight_plain) > 0.2    # without it, every chunk misses


def test_long_waits_switch_a_stream_to_the_sequential_mode_and_back():
    slo = SLOConfig(target_latency_s=5.0, sequential_after_s=0.5, batch_again_below_s=0.25, switch_hold_ticks=4,
                    drop_late=False)
    heavy = {"on": True}
    cost = lambda rows: 0.6 if heavy["on"] else 0.02     # noqa: E731
    sim = Sim([8.0], steps=3, slo=slo, cost=cost)
    sim.run(6)
    assert not sim.schedules[0].batch                   # frames waited >= 0.5 s: sequential
    heavy["on"] = False
    sim.run(30)
    assert sim.schedules[0].batch                       # the backlog cleared: back to the stream batch
    switches = [r for r in reasons(sim.plans) if "sequential" in r or "batch again" in r]
    assert 2 <= len(switches) <= 4                      # no flapping


def test_admission_refuses_a_stream_that_would_slow_everyone_below_their_input_rate():
    lat = LatencyModel()
    sched = Scheduler(SLOConfig(), lat)
    assert sched.admit(0, 2, [16.0])[0]                 # nothing measured yet: admitted
    for rows, secs in ((2, 0.10), (4, 0.15), (6, 0.20)):
        lat.observe(rows, secs)
    ok, why = sched.admit(4, 2, [16.0, 16.0])           # 6 rows: 0.20 s a tick → 20 fps per stream
    assert ok and "20.0" in why
    ok, why = sched.admit(6, 2, [16.0])                 # 8 rows: 0.25 s → 16 fps: still enough
    assert ok
    ok, why = sched.admit(8, 2, [16.0])                 # 10 rows: 0.30 s → 13.3 fps < 16
    assert not ok and "13.3" in why and "16" in why


def test_round_robin_and_continuous_offline_policy_without_slo():
    sched = Scheduler(None)
    views = [StreamView(k, [0.0] * 4, 4, 2, 2) for k in range(3)] + [StreamView(9, [0.0] * 3, 4, 2, 2)]
    d = sched.plan(views, 1.0)
    assert d.join == [0, 1, 2] and d.defer == [] and d.drop == {}
