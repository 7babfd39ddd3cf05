"""The tick policy, as pure decisions on host integers (no torch): SLO-aware continuous batching.

:class:`Scheduler` decides, tick by tick, which streams' chunks enter (continuous batching), which wait a tick to
keep the batch within the deadlines of the others (smaller batch), which switch to the sequential mode because
their frames waited too long, which frames are dropped because they would miss their deadline anyway, and whether a
new stream can be admitted — from a running estimate of the tick latency per batch size, :class:`LatencyModel`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Sequence

from wanstream.core.chunking import CHUNK_FRAMES


# ============================================================================================ latency
class LatencyModel:
    """Running estimate of the latency of one tick (VAE work + DiT call) by the rows of its DiT call.

    Measured row counts use an exponential moving average; other counts are predicted from a least-squares line
    over the measured ones (at least the smallest measured latency), or, with one measured point, by scaling it
    linearly with the rows (a conservative, compute-bound guess)."""

    def __init__(self, alpha: float = 0.2):
        self.alpha = alpha
        self.mean: dict[int, float] = {}
        self.count: dict[int, int] = {}

    def observe(self, rows: int, seconds: float) -> None:
        if rows <= 0 or seconds < 0:
            return
        old = self.mean.get(rows)
        self.mean[rows] = seconds if old is None else old + self.alpha * (seconds - old)
        self.count[rows] = self.count.get(rows, 0) + 1

    def predict(self, rows: int) -> float | None:
        if rows <= 0:
            return 0.0
        if rows in self.mean:
            return self.mean[rows]
        points = sorted(self.mean.items())
        if not points:
            return None
        if len(points) == 1:
            r0, l0 = points[0]
            return l0 * max(1.0, rows / r0)
        n = len(points)
        mx = sum(r for r, _ in points) / n
        my = sum(v for _, v in points) / n
        sxx = sum((r - mx) ** 2 for r, _ in points)
        slope = sum((r - mx) * (v - my) for r, v in points) / sxx if sxx else 0.0
        slope = max(0.0, slope)
        return max(min(v for _, v in points), my + slope * (rows - mx))

    def snapshot(self) -> dict[int, float]:
        return dict(sorted(self.mean.items()))


# ============================================================================================ policy
@dataclass
class SLOConfig:
    """Deadline policy of the live engine (the paper's SLO-aware batching and the released code's online mode)."""

    target_latency_s: float = 1.0              # per-frame deadline: arrival → output
    sequential_after_s: float | None = 0.5     # a stream whose next chunk has been ready this long runs its steps
    batch_again_below_s: float = 0.25          # in turn; it returns to the stream batch when the wait is below this
    switch_hold_ticks: int = 8                 # ticks between two mode switches of a stream (no flapping)
    max_defer: int = 1                         # consecutive ticks a ready stream may be held back (bounded wait)
    drop_late: bool = True                     # drop queued chunks that would miss their deadline anyway

    def __post_init__(self) -> None:
        if self.target_latency_s <= 0:
            raise ValueError(f"target latency must be positive, got {self.target_latency_s}")
        if self.max_defer < 0:
            raise ValueError(f"max_defer must be >= 0, got {self.max_defer}")


@dataclass
class StreamView:
    """What the policy reads of one stream with input queued (host values only)."""

    id: Hashable
    arrivals: list[float]              # queued input frames, oldest first
    chunk_len: int                     # frames of its next chunk
    rows: int                          # rows its next chunk adds to the call
    calls_to_output: int               # ticks from entering to leaving (steps in the stream batch, 1 sequential)
    sequential: bool = False           # runs its steps in turn (no-batch)
    can_batch: bool = True             # the stream batch is possible (prepared, more than one step)
    deferred: int = 0                  # consecutive ticks it was held back
    since_switch: int = 10 ** 9        # ticks since its last mode switch
    target_latency_s: float | None = None
    levels: int = 1                    # denoising levels (the step count)
    slack_s: float | None = None       # video buffered ahead of its viewer (core.playout; None: no frame out yet)
    interval_s: float = 1 / 16         # its frame interval (input rate)
    ladder: Sequence = ()              # its degradation rungs (core.slack.ladder), best first
    rung: int = 0                      # the rung it is on
    since_rung: int = 10 ** 9          # chunks since its last rung change


@dataclass
class Decision:
    """The policy's choice for the next tick."""

    join: list[Hashable] = field(default_factory=list)
    defer: list[Hashable] = field(default_factory=list)
    drop: dict[Hashable, int] = field(default_factory=dict)
    sequential: list[Hashable] = field(default_factory=list)
    batch: list[Hashable] = field(default_factory=list)
    predicted_tick_s: float | None = None
    reasons: dict[Hashable, list[str]] = field(default_factory=dict)
    rungs: dict[Hashable, int] = field(default_factory=dict)   # degradation rung changes (core.slack)

    def note(self, stream: Hashable, reason: str) -> None:
        self.reasons.setdefault(stream, []).append(reason)


class Scheduler:
    """The tick policy over the streams of one resolution group (see the module docstring)."""

    def __init__(self, slo: SLOConfig | None = None, latency: LatencyModel | None = None):
        self.slo = slo
        self.latency = latency or LatencyModel()

    def plan(self, streams: Sequence[StreamView], now: float, running_rows: int = 0) -> Decision:
        """Decide the next tick for the streams with input queued (``running_rows``: rows of streams that run
        this tick without new input, e.g. draining)."""
        d = Decision()
        ready = [s for s in streams if len(s.arrivals) >= s.chunk_len]
        slo = self.slo
        if slo is None:                                # offline / Python API: every ready stream, no drops
            d.join = [s.id for s in ready]
            return d
        for s in ready:
            self._drop_late(s, now, d)
            self._mode_switch(s, now, d)
        rows = {s.id: self._after_switch(s, d)[0] for s in ready}
        total = running_rows + sum(rows.values())
        tick = self.latency.predict(total)
        d.predicted_tick_s = tick
        join = list(ready)
        if tick is not None and slo.max_defer > 0:
            join = self._smaller_batch(ready, rows, running_rows, now, d)
        d.join = [s.id for s in join]
        d.defer = [s.id for s in ready if s not in join]
        for sid in d.defer:
            d.note(sid, "deferred")
        d.predicted_tick_s = self.latency.predict(running_rows + sum(rows[s.id] for s in join))
        return d

    def admit(self, rows_now: int, rows_new: int, input_fps: Sequence[float],
              chunk_frames: int = CHUNK_FRAMES) -> tuple[bool, str]:
        """Whether a new stream fits: each stream gets one chunk (``chunk_frames``: 4 for StreamDiffusionV2) per
        tick, so the per-stream rate with the new stream's rows is ``chunk_frames / L(rows)``; it must not fall
        below any stream's input rate."""
        tick = self.latency.predict(rows_now + rows_new)
        if tick is None or tick <= 0:
            return True, "no latency measured yet"
        rate = chunk_frames / tick
        need = max(input_fps, default=0.0)
        if rate < need:
            return False, (f"the server would fall behind: with another stream each stream would get about "
                           f"{rate:.1f} frames/s, below the {need:g} frames/s input rate")
        return True, f"predicted {rate:.1f} frames/s per stream"

    # ------------------------------------------------------------------------------------------ policies
    def _target(self, s: StreamView) -> float:
        return s.target_latency_s if s.target_latency_s is not None else self.slo.target_latency_s

    def _drop_late(self, s: StreamView, now: float, d: Decision) -> None:
        """Keep the newest chunk; drop older queued chunks whose frames would miss their deadline anyway."""
        if not self.slo.drop_late:
            return
        tick = self.latency.predict(s.rows)
        if tick is None:
            return
        arrivals = s.arrivals
        dropped = 0
        while len(arrivals) - dropped >= 2 * s.chunk_len:
            wait = now - arrivals[dropped]
            if wait + s.calls_to_output * tick <= self._target(s):
                break
            dropped += s.chunk_len
        if dropped:
            d.drop[s.id] = dropped
            d.note(s.id, f"dropped {dropped} late frames")

    def _mode_switch(self, s: StreamView, now: float, d: Decision) -> None:
        slo = self.slo
        if slo.sequential_after_s is None or s.since_switch < slo.switch_hold_ticks:
            return
        # how long its next chunk has been ready (its last frame arrived): the wait the model causes, without the
        # time the camera needs to deliver a chunk
        wait = now - s.arrivals[d.drop.get(s.id, 0) + s.chunk_len - 1]
        if not s.sequential and s.can_batch and s.levels > 1 and wait >= slo.sequential_after_s:
            d.sequential.append(s.id)
            d.note(s.id, f"sequential: frames waited {wait:.2f} s")
        elif s.sequential and s.can_batch and wait < slo.batch_again_below_s:
            d.batch.append(s.id)
            d.note(s.id, "stream batch again")

    def _after_switch(self, s: StreamView, d: Decision) -> tuple[int, int]:
        """A stream's rows per call and calls until its next output, after this tick's mode switches: sequential
        is one row and one call, the stream batch one row per level and as many calls."""
        if s.id in d.sequential:
            return 1, 1
        if s.id in d.batch:
            return s.levels, s.levels
        return s.rows, s.calls_to_output

    def _smaller_batch(self, ready: list[StreamView], rows: dict, running_rows: int, now: float,
                       d: Decision) -> list[StreamView]:
        """Hold back streams with slack when that lets streams at risk meet their deadline; never a stream held
        back ``max_defer`` ticks in a row, and only when it keeps its own deadline."""
        def predicted(s: StreamView, tick: float, extra_wait: float = 0.0) -> float:
            wait = now - s.arrivals[d.drop.get(s.id, 0)] + extra_wait
            return wait + self._after_switch(s, d)[1] * tick

        total = running_rows + sum(rows.values())
        tick = self.latency.predict(total)
        at_risk = [s for s in ready if predicted(s, tick) > self._target(s)]
        if not at_risk:
            return list(ready)
        candidates = [s for s in ready if s not in at_risk and s.deferred < self.slo.max_defer]
        candidates.sort(key=lambda s: self._target(s) - predicted(s, tick), reverse=True)   # most slack first
        held: list[StreamView] = []
        for c in candidates:
            trial = held + [c]
            t_small = self.latency.predict(total - sum(rows[x.id] for x in trial))
            if any(predicted(x, t_small, extra_wait=t_small) > self._target(x) for x in trial):
                break
            held = trial
            if all(predicted(s, t_small) <= self._target(s) for s in at_risk):
                return [s for s in ready if s not in held]
        return list(ready)                          # holding back does not save anyone: everyone joins


class RoundRobin(Scheduler):
    """One stream per tick, in turn (the server before the engine batched streams): the baseline that
    ``bench --compare-round-robin`` measures the continuous batching against. No deadline policy."""

    def __init__(self, latency: LatencyModel | None = None):
        super().__init__(None, latency)
        self._next = 0                  # the turn goes to the first ready stream with an id >= this, else wraps

    def plan(self, streams: Sequence[StreamView], now: float, running_rows: int = 0) -> Decision:
        ready = sorted((s for s in streams if len(s.arrivals) >= s.chunk_len), key=lambda s: s.id)
        if not ready:
            return Decision()
        pick = next((s for s in ready if s.id >= self._next), ready[0])
        self._next = pick.id + 1
        return Decision(join=[pick.id], defer=[s.id for s in ready if s is not pick])
