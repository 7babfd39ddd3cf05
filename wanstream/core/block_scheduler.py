"""DiT block scheduler for the multi-GPU pipeline: pure logic, no torch, no communication.

A pipeline of W stages splits the DiT's L blocks into contiguous ranges ``[a_i, b_i)``, one per stage, each with at
least one block. Stage 0 also VAE-encodes and the last stage also VAE-decodes, so an even split leaves the end
stages slower than the middle ones, and the slowest stage sets the throughput of the whole pipeline.

Cost model of a stage (from measured times): ``T_i = fixed_i + c_i * n_i`` where ``n_i`` is its block count,
``c_i = dit_i / n_i`` its measured per-block DiT time (devices may differ) and ``fixed_i = total_i - dit_i`` its
time outside the DiT blocks (encode, decode, x0, re-noise, messages).

:func:`plan_split` finds the block counts that minimise ``max_i T_i`` (greedy water-filling: one block at a time
to the stage that would finish earliest; optimal for identical unit jobs on machines with linear costs and start
offsets). :class:`BlockScheduler` runs continuously: it collects per-stage samples, and every ``every`` chunks, if
the slowest stage exceeds the mean by more than ``margin`` *and* the plan would lower the bottleneck by more than
``hysteresis``, it proposes moving **one** boundary block from the slowest stage to the neighbour the plan says
should receive it. One block per decision keeps every move small (one block's weights and KV cache point to point)
and lets the next window measure its effect; measurements taken before a move are discarded.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Sequence


# ------------------------------------------------------------------------------------------------ splits
def even_split(num_blocks: int, stages: int) -> list[tuple[int, int]]:
    """Contiguous ranges, ``num_blocks // stages`` each, the remainder to the first stages (30 / 4 → 8, 8, 7, 7)."""
    if stages < 1:
        raise ValueError(f"need at least one stage, got {stages}")
    if num_blocks < stages:
        raise ValueError(f"{num_blocks} blocks cannot give each of {stages} stages at least one block")
    base, extra = divmod(num_blocks, stages)
    return ranges_from_counts([base + (1 if i < extra else 0) for i in range(stages)])


def ranges_from_counts(counts: Sequence[int]) -> list[tuple[int, int]]:
    out, start = [], 0
    for n in counts:
        if n < 1:
            raise ValueError(f"every stage needs at least one block, got counts {list(counts)}")
        out.append((start, start + n))
        start += n
    return out


def counts_from_ranges(ranges: Sequence[tuple[int, int]]) -> list[int]:
    return [b - a for a, b in ranges]


def check_split(ranges: Sequence[tuple[int, int]], num_blocks: int) -> None:
    """Raise ValueError unless ``ranges`` are contiguous, cover ``[0, num_blocks)`` and give each stage >= 1 block."""
    start = 0
    for i, (a, b) in enumerate(ranges):
        if a != start or b <= a:
            raise ValueError(f"stage {i} range [{a}, {b}) breaks the contiguous split {list(ranges)}")
        start = b
    if start != num_blocks:
        raise ValueError(f"split {list(ranges)} covers {start} blocks, the model has {num_blocks}")


def parse_split(text: str, num_blocks: int | None = None) -> list[tuple[int, int]]:
    """``"8,8,7,7"`` (block counts per stage) → ranges."""
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"split must be comma-separated block counts, got {text!r}") from None
    ranges = ranges_from_counts(counts)
    if num_blocks is not None:
        check_split(ranges, num_blocks)
    return ranges


def format_split(ranges: Sequence[tuple[int, int]]) -> str:
    return " | ".join(f"rank {i}: [{a}, {b})" for i, (a, b) in enumerate(ranges))


# ------------------------------------------------------------------------------------------------- model
@dataclass(frozen=True)
class StageCost:
    """One stage's measured times for one call (any unit, the same for all stages)."""

    total: float   # busy time of the stage per call (DiT blocks + encode / decode / head / x0 / ...)
    dit: float     # time in its DiT blocks
    blocks: int    # blocks it ran

    @property
    def fixed(self) -> float:
        return max(self.total - self.dit, 0.0)

    @property
    def per_block(self) -> float:
        return self.dit / self.blocks if self.blocks else 0.0


def plan_split(fixed: Sequence[float], per_block: Sequence[float], num_blocks: int) -> list[int]:
    """Block counts (each >= 1, sum = ``num_blocks``) minimising ``max_i fixed_i + per_block_i * n_i``.

    Ties go to the earlier stage, so the plan is deterministic.
    """
    w = len(fixed)
    if len(per_block) != w:
        raise ValueError("fixed and per_block need one entry per stage")
    if num_blocks < w:
        raise ValueError(f"{num_blocks} blocks cannot give each of {w} stages at least one block")
    counts = [1] * w
    for _ in range(num_blocks - w):
        finish = [fixed[i] + per_block[i] * (counts[i] + 1) for i in range(w)]
        counts[min(range(w), key=lambda i: (finish[i], i))] += 1
    return counts


def stage_times(fixed: Sequence[float], per_block: Sequence[float], counts: Sequence[int]) -> list[float]:
    return [f + c * n for f, c, n in zip(fixed, per_block, counts)]


@dataclass(frozen=True)
class Move:
    """Move ``block`` from stage ``src`` to its neighbour ``dst`` (``|src - dst| == 1``)."""

    block: int
    src: int
    dst: int
    reason: str = ""


def boundary_move(ranges: Sequence[tuple[int, int]], src: int, dst: int, reason: str = "") -> Move:
    """The block that moves when stage ``src`` gives one block to its neighbour ``dst``."""
    if abs(src - dst) != 1 or not (0 <= src < len(ranges) and 0 <= dst < len(ranges)):
        raise ValueError(f"blocks move only between neighbouring stages, got {src} → {dst} of {len(ranges)}")
    a, b = ranges[src]
    if b - a < 2:
        raise ValueError(f"stage {src} has only {b - a} block; every stage keeps at least one")
    return Move(b - 1 if dst == src + 1 else a, src, dst, reason)


def apply_move(ranges: Sequence[tuple[int, int]], move: Move) -> list[tuple[int, int]]:
    """The split after ``move`` (validated)."""
    expected = boundary_move(ranges, move.src, move.dst)
    if expected.block != move.block:
        raise ValueError(f"block {move.block} is not on the boundary of stage {move.src} towards {move.dst}")
    counts = counts_from_ranges(ranges)
    counts[move.src] -= 1
    counts[move.dst] += 1
    return ranges_from_counts(counts)


# --------------------------------------------------------------------------------------------- scheduler
@dataclass
class SchedulerConfig:
    every: int = 8            # decide every K chunks (fresh samples since the last move)
    margin: float = 0.10      # act only when the slowest stage exceeds the mean by more than this fraction
    hysteresis: float = 0.05  # ... and the plan lowers the bottleneck by more than this fraction
    min_samples: int = 4      # samples per stage needed for a decision
    warmup: int = 0           # chunks ignored at the start (pipeline fill, first-call effects)

    def __post_init__(self) -> None:
        if self.every < 1 or self.min_samples < 1:
            raise ValueError("every and min_samples must be >= 1")
        if self.margin < 0 or not 0 <= self.hysteresis < 1:
            raise ValueError("margin must be >= 0 and hysteresis in [0, 1)")


@dataclass
class Decision:
    """What the scheduler saw at a decision point (logged with every move, useful in tests)."""

    chunk: int
    totals: list[float]
    dits: list[float]
    counts: list[int]
    plan: list[int]
    predicted: float
    move: Move | None


class BlockScheduler:
    """Continuous rebalancing: :meth:`observe` per finished call, :meth:`step` once per chunk."""

    def __init__(self, ranges: Sequence[tuple[int, int]], config: SchedulerConfig | None = None):
        self.config = config or SchedulerConfig()
        self.ranges = [tuple(r) for r in ranges]
        self.num_blocks = self.ranges[-1][1]
        check_split(self.ranges, self.num_blocks)
        self.epoch = 0
        self.chunks = 0
        self._since = 0
        self._samples: list[list[StageCost]] = [[] for _ in self.ranges]
        self.decisions: list[Decision] = []

    @property
    def stages(self) -> int:
        return len(self.ranges)

    def observe(self, costs: Sequence[StageCost], epoch: int | None = None) -> None:
        """Add one call's per-stage costs; samples from before the last move (``epoch`` older) are ignored."""
        if epoch is not None and epoch != self.epoch:
            return
        if len(costs) != self.stages:
            raise ValueError(f"expected {self.stages} stage costs, got {len(costs)}")
        if self.chunks < self.config.warmup:
            return
        for i, c in enumerate(costs):
            if c.blocks != self.ranges[i][1] - self.ranges[i][0]:
                return  # a sample taken under another split
        for i, c in enumerate(costs):
            self._samples[i].append(c)
            del self._samples[i][:-max(self.config.every * 4, self.config.min_samples)]

    def step(self) -> Move | None:
        """Call once per chunk; every ``every`` chunks returns a move to perform, or None."""
        self.chunks += 1
        self._since += 1
        if self._since < self.config.every or self.chunks <= self.config.warmup:
            return None
        if min(len(s) for s in self._samples) < self.config.min_samples:
            return None
        self._since = 0
        decision = self.decide()
        self.decisions.append(decision)
        return decision.move

    def decide(self) -> Decision:
        """Decision from the current samples (median per stage), without side effects."""
        totals = [statistics.median(c.total for c in s) for s in self._samples]
        dits = [statistics.median(c.dit for c in s) for s in self._samples]
        counts = counts_from_ranges(self.ranges)
        fixed = [max(t - d, 0.0) for t, d in zip(totals, dits)]
        per_block = [d / n for d, n in zip(dits, counts)]
        plan = plan_split(fixed, per_block, self.num_blocks)
        predicted = max(stage_times(fixed, per_block, plan))
        worst = max(totals)
        mean = sum(totals) / len(totals)
        move = None
        if worst > mean * (1 + self.config.margin) and predicted < worst * (1 - self.config.hysteresis):
            move = self._first_move(totals, fixed, per_block, counts, plan)
        return Decision(self.chunks, totals, dits, counts, plan, predicted, move)

    def _first_move(self, totals, fixed, per_block, counts, plan) -> Move | None:
        """One boundary move of the slowest stage towards the plan (to the neighbour that ends up faster)."""
        slow = max(range(self.stages), key=lambda i: (totals[i], -i))
        before = sum(counts[:slow])          # blocks left of the slow stage, now and in the plan
        before_plan = sum(plan[:slow])
        after_plan = sum(plan[:slow + 1])
        candidates = []
        if slow > 0 and before_plan > before:        # the left boundary moves right: give the first block left
            candidates.append(slow - 1)
        if slow + 1 < self.stages and after_plan < before + counts[slow]:  # the right boundary moves left
            candidates.append(slow + 1)
        candidates = [d for d in candidates if counts[slow] > 1]
        if not candidates:
            return None
        dst = min(candidates, key=lambda d: (fixed[d] + per_block[d] * (counts[d] + 1), d))
        reason = (f"stage times {', '.join(f'{t:.3g}' for t in totals)}; slowest rank {slow} exceeds the mean "
                  f"by {max(totals) / (sum(totals) / len(totals)) - 1:.0%}; plan {plan}")
        return boundary_move(self.ranges, slow, dst, reason)

    def apply(self, move: Move) -> list[tuple[int, int]]:
        """Record a performed move: new split, new epoch, fresh samples."""
        self.ranges = apply_move(self.ranges, move)
        self.epoch += 1
        self._samples = [[] for _ in self.ranges]
        self._since = 0
        return list(self.ranges)
