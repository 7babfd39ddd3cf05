"""The planner (pure, no torch): one plan per tick — what enters, live changes' schedule side, the end of input,
round robin as a policy — checked on host values only."""

from __future__ import annotations

from wanstream.core.chunking import ChunkBuffer
from wanstream.core.config import StreamSettings
from wanstream.core.planner import Planner
from wanstream.core.scheduler import RoundRobin


def _planner(n=2, steps=2, policy=None):
    p = Planner(policy)
    bufs = [ChunkBuffer() for _ in range(n)]
    for k in range(n):
        p.add(k, StreamSettings(steps=steps), bufs[k])
    return p, bufs


def _feed(buf, n, t=0.0):
    for _ in range(n):
        buf.push(f"frame{buf.frames_in}", t)


def test_first_chunk_prepares_then_every_stream_shares_one_call():
    p, bufs = _planner(2)
    for b in bufs:
        _feed(b, 5)
    plan = p.plan(0.0)
    assert [sp.entry.first for sp in plan.streams.values()] == [True, True]
    assert [sp.entry.latent_frames for sp in plan.streams.values()] == [2, 2]
    assert [len(c.rows) for c in plan.calls] == [2, 2] and plan.collect         # level 0, level 1; TTFF: collect
    assert plan.calls[-1].copy_row0 == [0, 1]
    for b in bufs:
        _feed(b, 4)
    plan = p.plan(1.0)
    assert len(plan.calls) == 1 and plan.rows == 2 and not plan.collect        # the new chunk at level 0 of both
    assert [sp.entry.chunk for sp in plan.streams.values()] == [1, 1]
    assert [sp.entry.frames for sp in plan.streams.values()][0] == [f"frame{i}" for i in range(5, 9)]


def test_step_change_drains_then_resizes_and_reset_drops_what_drained():
    p, (b,) = _planner(1, steps=2)
    _feed(b, 5)
    p.plan(0.0)
    _feed(b, 4)
    p.plan(0.1)                                          # chunk 1 in flight at level 0
    plan = p.plan(0.2, {0: [("steps", 3)]})
    assert plan.streams[0].updates == [("steps", 3)]
    assert [(c.resize, [r.final for r in c.rows]) for c in plan.calls] == [([], [True]), ([(0, 3)], [])]
    assert p.streams[0].rows == 3 and p.streams[0].settings.steps == 3
    _feed(b, 4)
    p.plan(0.3)
    plan = p.plan(0.4, {0: [("steps", 2), ("reset", None)]})
    assert plan.calls == [] and plan.streams[0].updates == [("steps", 2), ("reset", 2)]   # rows after the reset
    assert not p.streams[0].schedule.prepared and p.streams[0].next_chunk == 0


def test_end_of_input_pads_the_last_chunk_and_drains():
    p, (b,) = _planner(1, steps=2)
    _feed(b, 5 + 4 + 2)
    p.plan(0.0)
    p.plan(0.1)
    p.finish(0)
    plan = p.plan(0.2)
    sp = plan.streams[0]
    assert sp.entry.info.real == 2 and len(sp.entry.frames) == 4 and sp.drains and plan.collect
    finals = [r.chunk for c in plan.calls for r in c.rows if r.final]
    assert finals == [1, 2]                              # chunk 1 leaves with the push, chunk 2 with the drain
    assert not p.streams[0].finishing and p.plan(0.3).calls == []


def test_round_robin_is_a_policy_one_stream_per_tick_in_turn():
    p, bufs = _planner(3, policy=RoundRobin())
    for b in bufs:
        _feed(b, 5 + 4 * 3)
    order = []
    for t in range(6):
        plan = p.plan(float(t))
        order += [sid for sid, sp in plan.streams.items() if sp.entry is not None]
        assert sum(sp.deferred for sp in plan.streams.values()) == 2
    assert order == [0, 1, 2, 0, 1, 2]


def test_without_takes_a_failed_stream_out_of_the_calls():
    p, bufs = _planner(2)
    for b in bufs:
        _feed(b, 5)
    plan = p.plan(0.0)
    plan.without(0)
    assert {r.stream for c in plan.calls for r in c.rows} == {1} and plan.calls[-1].copy_row0 == [1]
