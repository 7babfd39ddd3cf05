"""Scheduling, as pure decisions on host integers (no torch): the one home of the stream-batch schedule.

Two layers:

* :class:`StreamSchedule` — the stream-batch schedule of one stream. Slot r of the stream batch holds a chunk at
  denoising level r and uses cache row r; a new chunk enters slot 0, every call shifts the slots, and the chunk
  in slot n−1 leaves clean. It also knows prepare (the first chunk: every level in turn on cache row 0, then row
  0 is copied to all rows), the sequential no-batch mode (every level of one chunk in turn on row 0), draining
  (shift without a new chunk, so every in-flight chunk leaves), step changes (drain, then re-lay the rows), the
  pipelined schedule (``lag`` = W batches in flight), and each chunk's cache frame index and RoPE position (RoPE
  refresh: ``rope_wrap_at`` → ``rope_wrap_to``). Each operation returns :class:`Stage` s: the rows this stream
  puts into successive DiT calls.
* :func:`compose` merges the stages of many streams into :class:`Call` s (the k-th stages of all streams with
  the same latent frame count run as one call), and :class:`Scheduler` decides, tick by tick, which streams'
  chunks enter (continuous batching), which wait a tick to keep the batch within the deadlines of the others
  (smaller batch), which switch to the sequential mode because their frames waited too long, which frames are
  dropped because they would miss their deadline anyway, and whether a new stream can be admitted — from a
  running estimate of the tick latency per batch size, :class:`LatencyModel`.

The runner (``runner.py``) executes calls on tensors; the multi-GPU pipeline executes the same calls split by
blocks. Neither decides anything about the schedule.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Hashable, Iterable, Sequence

from .chunking import CHUNK_FRAMES
from .config import CacheConfig, T2V_STEPS, V2V_STEPS


def step_list(steps: int, mode: str = "v2v") -> list[int]:
    """Denoising timesteps per stream-batch slot: v2v ``[700, 500, 400, 200][:n]``; t2v ``[...][:n] + [0]``."""
    if not 1 <= int(steps) <= 4:
        raise ValueError(f"steps must be in 1..4, got {steps}")
    if mode == "v2v":
        return list(V2V_STEPS[:steps])
    if mode == "t2v":
        return list(T2V_STEPS[:steps]) + [0]
    raise ValueError(f"mode must be 'v2v' or 't2v', got {mode!r}")


# ============================================================================================ plans
@dataclass(frozen=True)
class Row:
    """One batch row of a DiT call: a chunk of a stream at one denoising level."""

    stream: Hashable
    chunk: Hashable
    level: int          # index into the stream's step list; level 0 uses the chunk's own timestep
    cache_row: int      # the stream's cache row (0 .. rows-1) this row reads and writes
    frame: int          # stream frame index of the chunk's first latent frame (decides the cache slot)
    rope: int           # temporal RoPE position of the chunk's first latent frame
    final: bool         # after the call the row's x0 leaves clean; otherwise it is re-noised to level + 1
    enters: bool        # the chunk enters the stream batch with this row (its noised input is taken)
    t: int = 0          # timestep of the level (a level-0 row of a chunk with its own timestep uses that one)
    t_next: int = -1    # timestep the row is re-noised to (-1: final)


@dataclass
class Stage:
    """A stream's part of one DiT call, and what happens to its cache around it."""

    stream: Hashable
    rows: list[Row]
    frames: int = 1                 # latent frames per row
    resize: int | None = None       # before the call: the stream's cache becomes this many rows (step change)
    copy_row0: bool = False         # after the call: cache row 0 is copied to every other row (end of prepare)


@dataclass
class Call:
    """One DiT call over the rows of several streams (each stream's rows contiguous, in stream order)."""

    frames: int
    rows: list[Row] = field(default_factory=list)
    resize: list[tuple[Hashable, int]] = field(default_factory=list)
    copy_row0: list[Hashable] = field(default_factory=list)

    @property
    def streams(self) -> list[Hashable]:
        out: list[Hashable] = []
        for r in self.rows:
            if not out or out[-1] != r.stream:
                out.append(r.stream)
        return out

    def rows_of(self, stream: Hashable) -> list[Row]:
        return [r for r in self.rows if r.stream == stream]


def compose(stage_lists: Iterable[Sequence[Stage]]) -> list[Call]:
    """Merge per-stream stage sequences into calls: the k-th stages of all streams run in the k-th round, one
    call per latent frame count (rows of different lengths cannot share a call). Stages without rows (a bare
    step change) ride on a call of their round, or get a call without rows."""
    lists = [list(s) for s in stage_lists]
    calls: list[Call] = []
    for k in range(max((len(s) for s in lists), default=0)):
        round_calls: dict[int, Call] = {}
        bare: list[Stage] = []
        for stages in lists:
            if k >= len(stages):
                continue
            st = stages[k]
            if not st.rows:
                bare.append(st)
                continue
            call = round_calls.setdefault(st.frames, Call(st.frames))
            call.rows += st.rows
            if st.resize is not None:
                call.resize.append((st.stream, st.resize))
            if st.copy_row0:
                call.copy_row0.append(st.stream)
        if bare:
            host = next(iter(round_calls.values()), None)
            if host is None:
                host = round_calls.setdefault(0, Call(0))
            for st in bare:
                if st.resize is not None:
                    host.resize.append((st.stream, st.resize))
                if st.copy_row0:
                    host.copy_row0.append(st.stream)
        calls += list(round_calls.values())
    return calls


# ============================================================================================ one stream
@dataclass
class Slot:
    """A register of the stream batch (host side: which chunk, where it lives in the cache and in RoPE)."""

    chunk: Hashable
    frame: int
    rope: int


class StreamSchedule:
    """The stream-batch schedule of one stream (see the module docstring). Host integers only."""

    def __init__(self, stream: Hashable, steps: int = 2, *, mode: str = "v2v", batch: bool = True,
                 cache: CacheConfig = CacheConfig(), lag: int = 1):
        if lag < 1:
            raise ValueError(f"lag must be >= 1, got {lag}")
        self.stream = stream
        self.mode = mode
        self.cache = cache
        self.lag = lag
        self.next_frame = 0
        self.next_rope = 0
        self.prepared = False
        self._configure(steps, batch)

    def _configure(self, steps: int, batch: bool) -> None:
        self.steps_list = step_list(steps, self.mode)
        self.steps = int(steps)
        self.batch = bool(batch)
        self.rows = self.rows_for(steps, batch)
        self.batches: deque[list[Slot | None]] = deque([None] * self.levels for _ in range(self.lag))

    def rows_for(self, steps: int, batch: bool) -> int:
        """Cache rows of this stream with ``steps`` steps in the stream batch (``batch``) or sequentially."""
        return len(step_list(steps, self.mode)) if batch else 1

    @property
    def levels(self) -> int:
        """Denoising levels a chunk goes through (the step list's length)."""
        return len(self.steps_list)

    @property
    def slots(self) -> list[Slot | None]:
        """Registers of the batch processed last (slot 0 = newest chunk)."""
        return self.batches[-1]

    @property
    def in_flight(self) -> int:
        """Chunks inside the stream batch (entered, not yet left)."""
        return sum(s is not None for b in self.batches for s in b)

    @property
    def calls_to_output(self) -> int:
        """Calls of this stream from a chunk entering to its leaving clean (steady state)."""
        return (self.levels - 1) * self.lag + 1 if self.batch else 1

    # ------------------------------------------------------------------------------------------ positions
    def take_position(self, frames: int) -> tuple[int, int]:
        """Cache frame index and RoPE position of the next chunk of ``frames`` latent frames (RoPE refresh)."""
        frame, rope = self.next_frame, self.next_rope
        if rope + frames > self.cache.rope_wrap_at:
            rope = self.cache.rope_wrap_to
        self.next_frame = frame + frames
        self.next_rope = rope + frames
        return frame, rope

    # ------------------------------------------------------------------------------------------ operations
    def prepare(self, chunk: Hashable, frames: int) -> list[Stage]:
        """The stream's first chunk: every level in turn on cache row 0, then row 0 → every row."""
        if self.prepared:
            raise RuntimeError("this stream is already prepared")
        self.prepared = True
        stages = self._sequential(chunk, frames)
        stages[-1].copy_row0 = self.rows > 1
        return stages

    def push(self, chunk: Hashable, frames: int = 1) -> list[Stage]:
        """A new chunk: one stage in the stream batch, or one stage per level in the sequential mode."""
        self.prepared = True                           # (text-to-video streams start without a prepare)
        if not self.batch:
            return self._sequential(chunk, frames)
        frame, rope = self.take_position(frames)
        return [self._advance(Slot(chunk, frame, rope), frames)]

    def drain(self, frames: int = 1) -> list[Stage]:
        """Stages that finish every in-flight chunk without adding one (end of stream, or before a change)."""
        out = []
        while any(s is not None for b in self.batches for s in b[:-1]):
            stage = self._advance(None, frames)
            if stage.rows:
                out.append(stage)
        return out

    def reconfigure(self, steps: int, batch: bool | None = None, frames: int = 1) -> list[Stage]:
        """Change the step count (and the mode) between chunks: drain stages, then the re-layout of the cache
        rows (a new level starts from the closest existing level). Empty when nothing changes."""
        batch = self.batch if batch is None else bool(batch)
        step_list(steps, self.mode)                    # validates before anything changes
        if int(steps) == self.steps and batch == self.batch:
            return []
        stages = self.drain(frames)
        old_rows = self.rows
        self._configure(steps, batch)
        if self.rows != old_rows:
            stages.append(Stage(self.stream, [], frames, resize=self.rows))
        return stages

    # ------------------------------------------------------------------------------------------ internal
    def _sequential(self, chunk: Hashable, frames: int) -> list[Stage]:
        frame, rope = self.take_position(frames)
        return [Stage(self.stream, [self._row(chunk, i, 0, frame, rope, i == 0)], frames) for i in range(self.levels)]

    def _row(self, chunk: Hashable, level: int, cache_row: int, frame: int, rope: int, enters: bool) -> Row:
        final = level == self.levels - 1
        return Row(self.stream, chunk, level, cache_row, frame, rope, final, enters, self.steps_list[level],
                   -1 if final else self.steps_list[level + 1])

    def _advance(self, new: Slot | None, frames: int) -> Stage:
        """One call: the batch that left ``lag`` calls ago shifts and takes ``new`` at slot 0."""
        batch = [new] + self.batches.popleft()[:-1]
        occupied = [r for r, s in enumerate(batch) if s is not None]
        rows = []
        if occupied:
            lo, hi = occupied[0], occupied[-1] + 1
            if occupied != list(range(lo, hi)):
                raise AssertionError("stream-batch slots must be contiguous")
            rows = [self._row(batch[r].chunk, r, r, batch[r].frame, batch[r].rope, r == 0 and new is not None)
                    for r in range(lo, hi)]
            if hi == self.levels:
                batch[-1] = None                       # the chunk in the last slot leaves clean
        self.batches.append(batch)
        return Stage(self.stream, rows, frames)


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

    def admit(self, rows_now: int, rows_new: int, input_fps: Sequence[float]) -> tuple[bool, str]:
        """Whether a new stream fits: each stream gets one chunk (4 frames) per tick, so the per-stream rate with
        the new stream's rows is ``4 / L(rows)``; it must not fall below any stream's input rate."""
        tick = self.latency.predict(rows_now + rows_new)
        if tick is None or tick <= 0:
            return True, "no latency measured yet"
        rate = CHUNK_FRAMES / tick
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
