"""Block scheduler (pure logic): splits, the optimal plan, one-block boundary moves, margin / hysteresis, and a
simulated pipeline that converges and then stays put under measurement noise."""

from __future__ import annotations

import itertools
import random

import pytest

from wanstream.core.block_scheduler import (
    BlockScheduler,
    Move,
    SchedulerConfig,
    StageCost,
    apply_move,
    boundary_move,
    check_split,
    counts_from_ranges,
    even_split,
    parse_split,
    plan_split,
    ranges_from_counts,
    stage_times,
)


def test_even_split_matches_the_release():
    assert counts_from_ranges(even_split(30, 4)) == [8, 8, 7, 7]
    assert even_split(30, 2) == [(0, 15), (15, 30)]
    assert counts_from_ranges(even_split(40, 4)) == [10, 10, 10, 10]
    assert even_split(3, 3) == [(0, 1), (1, 2), (2, 3)]
    with pytest.raises(ValueError):
        even_split(2, 3)


def test_parse_and_check_split():
    assert parse_split("8,8,7,7", 30) == [(0, 8), (8, 16), (16, 23), (23, 30)]
    with pytest.raises(ValueError, match="covers 29"):
        parse_split("8,8,7,6", 30)
    with pytest.raises(ValueError, match="at least one"):
        parse_split("30,0", 30)
    with pytest.raises(ValueError):
        check_split([(0, 4), (5, 8)], 8)


def _brute(fixed, per_block, n):
    best = None
    for cut in itertools.combinations(range(1, n), len(fixed) - 1):
        counts = [b - a for a, b in zip((0,) + cut, cut + (n,))]
        worst = max(stage_times(fixed, per_block, counts))
        best = worst if best is None else min(best, worst)
    return best


@pytest.mark.parametrize("seed", range(20))
def test_plan_is_optimal(seed):
    rng = random.Random(seed)
    w = rng.randint(2, 4)
    n = rng.randint(w, 12)
    fixed = [rng.uniform(0, 10) for _ in range(w)]
    per_block = [rng.uniform(0.5, 3) for _ in range(w)]
    counts = plan_split(fixed, per_block, n)
    assert sum(counts) == n and min(counts) >= 1
    assert max(stage_times(fixed, per_block, counts)) == pytest.approx(_brute(fixed, per_block, n))


def test_boundary_moves():
    ranges = [(0, 3), (3, 5), (5, 6)]
    assert boundary_move(ranges, 0, 1) == Move(2, 0, 1)
    assert boundary_move(ranges, 1, 0) == Move(3, 1, 0)
    assert boundary_move(ranges, 1, 2) == Move(4, 1, 2)
    assert apply_move(ranges, Move(3, 1, 0)) == [(0, 4), (4, 5), (5, 6)]
    with pytest.raises(ValueError, match="at least one"):
        boundary_move(ranges, 2, 1)
    with pytest.raises(ValueError, match="neighbouring"):
        boundary_move(ranges, 0, 2)
    with pytest.raises(ValueError, match="not on the boundary"):
        apply_move(ranges, Move(1, 0, 1))


def _costs(ranges, fixed, per_block, noise=0.0, rng=None):
    out = []
    for (a, b), f, c in zip(ranges, fixed, per_block):
        jitter = 1 + (rng.uniform(-noise, noise) if rng else 0)
        dit = c * (b - a) * jitter
        out.append(StageCost(total=f + dit, dit=dit, blocks=b - a))
    return out


def _simulate(sched, fixed, per_block, chunks, noise=0.0, seed=0):
    rng = random.Random(seed)
    moves = []
    for chunk in range(chunks):
        sched.observe(_costs(sched.ranges, fixed, per_block, noise, rng))
        move = sched.step()
        if move is not None:
            moves.append((chunk, move))
            sched.apply(move)
            assert min(b - a for a, b in sched.ranges) >= 1
    return moves


def test_fig11_scenario_converges_to_the_plan_one_block_at_a_time():
    """1.3B, 480p, 4 steps, 4 ranks (paper Fig. 11): encode 50 ms on rank 0, decode 86 ms on rank 3, 5.03 ms per
    block. From the even split the slowest stage (rank 3) sheds blocks until the plan is reached."""
    fixed, per_block = [50.0, 0.0, 0.0, 86.0], [5.03] * 4
    sched = BlockScheduler(even_split(30, 4), SchedulerConfig(every=4))
    before = max(t.total for t in _costs(sched.ranges, fixed, per_block))
    moves = _simulate(sched, fixed, per_block, chunks=400)
    plan = plan_split(fixed, per_block, 30)
    after = max(t.total for t in _costs(sched.ranges, fixed, per_block))
    assert after == pytest.approx(max(stage_times(fixed, per_block, plan)))   # the optimal bottleneck
    assert counts_from_ranges(sched.ranges)[3] == 1 and after == pytest.approx(86 + 5.03)
    assert after < before * 0.8
    assert all(abs(m.src - m.dst) == 1 for _, m in moves)
    assert all((c + 1) % 4 == 0 for c, _ in moves)          # decisions only every K chunks
    chunks = [c for c, _ in moves]
    assert all(b - a >= 4 for a, b in zip(chunks, chunks[1:]))  # a fresh window after every move


def test_no_move_when_balanced_within_margin():
    fixed, per_block = [2.0, 0.0, 2.0], [1.0, 1.0, 1.0]
    sched = BlockScheduler([(0, 3), (3, 7), (7, 10)], SchedulerConfig(every=2, margin=0.10))
    assert _simulate(sched, fixed, per_block, chunks=40) == []


def test_hysteresis_no_oscillation_under_noise():
    """After converging, ±4 % measurement noise never moves a block back and forth."""
    fixed, per_block = [30.0, 0.0, 40.0], [2.0, 2.0, 2.0]
    sched = BlockScheduler(even_split(30, 3), SchedulerConfig(every=4, margin=0.05, hysteresis=0.05))
    _simulate(sched, fixed, per_block, chunks=200)
    settled = list(sched.ranges)
    later = _simulate(sched, fixed, per_block, chunks=800, noise=0.04, seed=1)
    assert len(later) <= 2 and sched.ranges[0][1] - settled[0][1] in (-1, 0, 1)


def test_heterogeneous_devices_get_fewer_blocks_on_the_slow_one():
    fixed, per_block = [0.0, 0.0], [1.0, 2.0]        # rank 1 is twice as slow per block
    sched = BlockScheduler(even_split(12, 2), SchedulerConfig(every=2, margin=0.05))
    _simulate(sched, fixed, per_block, chunks=100)
    assert counts_from_ranges(sched.ranges) == [8, 4]


def test_samples_from_another_split_are_ignored():
    sched = BlockScheduler(ranges_from_counts([2, 2]), SchedulerConfig(every=1, min_samples=1))
    sched.observe([StageCost(10, 2, 3), StageCost(1, 1, 1)])   # block counts of another split
    assert sched.step() is None and sched.decisions == []
    sched.observe([StageCost(10, 2, 2), StageCost(1, 1, 2)])
    move = sched.step()
    assert move == Move(1, 0, 1, move.reason) and "slowest rank 0" in move.reason
    sched.apply(move)
    assert sched.epoch == 1 and sched.ranges == [(0, 1), (1, 4)]
    assert sched.step() is None                                  # fresh samples needed after a move
