"""The stream-batch schedule, as pure decisions on host integers (no torch): its one home.

:class:`StreamSchedule` is the schedule of one stream. Slot r of the stream batch holds a chunk at denoising level
r and uses cache row r; a new chunk enters slot 0, every call shifts the slots, and the chunk in slot n−1 leaves
clean. It also knows prepare (the first chunk: every level in turn on cache row 0, then row 0 is copied to all
rows), the sequential no-batch mode (every level of one chunk in turn on row 0), draining (shift without a new
chunk, so every in-flight chunk leaves), step changes (drain, then re-lay the rows), the pipelined schedule
(``lag`` = W batches in flight), and each chunk's cache frame index and RoPE position (RoPE refresh:
``rope_wrap_at`` → ``rope_wrap_to``). What differs between backbones is read from their description
(:class:`~wanstream.core.backbones.Backbone`): the step list (integer or warped float timesteps), whether the levels
share a call (the stream batch) or a block runs its levels in turn, and whether a clean *context pass* follows a
block's last level (Self-Forcing, LongLive: a row at ``context_t`` over the block's clean x0, whose output is
discarded — only the K/V it writes count). Each operation returns :class:`Stage` s: the rows this stream puts into
successive DiT calls. :func:`compose` merges the stages of many streams into :class:`Call` s (the k-th stages of
all streams with the same latent frame count run as one call).

The runner (``engine/runner.py``) executes calls on tensors; the multi-GPU pipeline executes the same calls split
by blocks. Neither decides anything about the schedule. Which streams' chunks enter a tick is decided by the
policy in :mod:`wanstream.core.scheduler`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Hashable, Iterable, Sequence

from wanstream.core.backbones import Backbone
from wanstream.core.backbones import backbone as get_backbone
from wanstream.core.config import CacheConfig


def step_list(steps: int, mode: str = "v2v", backbone: Backbone | str | None = None) -> list[float]:
    """Denoising timesteps per level (StreamDiffusionV2: v2v ``[700, 500, 400, 200][:n]``; t2v ``[...][:n] + [0]``;
    the others: :meth:`Backbone.step_list`)."""
    return get_backbone(backbone).step_list(steps, mode)


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
    t: float = 0        # timestep of the level (a level-0 row of a chunk with its own timestep uses that one)
    t_next: float = -1  # timestep the row is re-noised to (-1: final, or a context row)
    hold: bool = False      # a final row whose clean x0 also stays as the input of the chunk's context row
    context: bool = False   # a context pass: the chunk's clean x0 in, only the K/V it writes count (output dropped)
    recache: bool = False   # a KV re-cache: the stream's recent clean frames in (noised to ``t`` when t > 0)
    resink: bool = False    # (a re-cache) its first frames become the sink: written to the sink slots

    @property
    def renoised(self) -> bool:
        """After the call the row's x0 is re-noised to ``t_next`` for the chunk's next level."""
        return not self.final and not self.context


@dataclass
class Stage:
    """A stream's part of one DiT call, and what happens to its cache around it."""

    stream: Hashable
    rows: list[Row]
    frames: int = 1                 # latent frames per row
    resize: int | None = None       # before the call: the stream's cache becomes this many rows (step change)
    copy_row0: bool = False         # after the call: cache row 0 is copied to every other row (end of prepare)
    rebase: int = 0                 # before the call: the stream's cached keys are turned back this many positions


@dataclass
class Call:
    """One DiT call over the rows of several streams (each stream's rows contiguous, in stream order)."""

    frames: int
    rows: list[Row] = field(default_factory=list)
    resize: list[tuple[Hashable, int]] = field(default_factory=list)
    copy_row0: list[Hashable] = field(default_factory=list)
    rebase: list[tuple[Hashable, int]] = field(default_factory=list)

    @property
    def streams(self) -> list[Hashable]:
        out: list[Hashable] = []
        for r in self.rows:
            if not out or out[-1] != r.stream:
                out.append(r.stream)
        return out

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
            _carry(call, st)
        if bare:
            host = next(iter(round_calls.values()), None)
            if host is None:
                host = round_calls.setdefault(0, Call(0))
            for st in bare:
                _carry(host, st)
        calls += list(round_calls.values())
    return calls


def _carry(call: Call, st: Stage) -> None:
    """A stage's cache re-layouts ride on the call of its round."""
    if st.resize is not None:
        call.resize.append((st.stream, st.resize))
    if st.copy_row0:
        call.copy_row0.append(st.stream)
    if st.rebase:
        call.rebase.append((st.stream, st.rebase))


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
                 cache: CacheConfig | None = None, lag: int = 1, backbone: Backbone | str | None = None):
        if lag < 1:
            raise ValueError(f"lag must be >= 1, got {lag}")
        self.stream = stream
        self.mode = mode
        self.backbone = get_backbone(backbone)
        self.cache = cache or self.backbone.cache(mode)
        self.lag = lag
        self.next_frame = 0
        self.next_rope = 0
        self.prepared = False
        self.block = 1                  # latent frames of the chunks pushed last (what draining rows carry)
        self._rebase = 0                # positions the cached keys turn back before the next chunk
        self._configure(steps, batch)

    def _configure(self, steps: int, batch: bool) -> None:
        self.steps_list = self.backbone.step_list(steps, self.mode)
        self.steps = int(steps)
        self.batch = bool(batch) and self.backbone.stream_batch
        self.rows = self.rows_for(steps, batch)
        self.batches: deque[list[Slot | None]] = deque([None] * self.levels for _ in range(self.lag))

    def rows_for(self, steps: int, batch: bool) -> int:
        """Cache rows of this stream with ``steps`` steps in the stream batch (``batch``) or sequentially."""
        return len(self.backbone.step_list(steps, self.mode)) if batch and self.backbone.stream_batch else 1

    @property
    def rows_per_tick(self) -> int:
        """Batch rows this stream adds to a tick's calls in the steady state (the stream batch: one per level in
        one call; in turn: one per level, plus the context pass)."""
        return self.rows if self.batch else self.levels + int(self.backbone.context_pass)

    @property
    def can_batch(self) -> bool:
        """The stream batch is possible: the backbone shares levels across chunks and the stream is prepared."""
        return self.prepared and self.backbone.stream_batch
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
            if self.cache.rope_rebase:
                self._rebase += rope - self.cache.rope_wrap_to
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
        self.block = frames
        if not self.batch:
            return self._sequential(chunk, frames)
        frame, rope = self.take_position(frames)
        return [self._advance(Slot(chunk, frame, rope), frames)]

    def drain(self, frames: int | None = None) -> list[Stage]:
        """Stages that finish every in-flight chunk without adding one (end of stream, or before a change)."""
        frames = frames or self.block
        out = []
        while any(s is not None for b in self.batches for s in b[:-1]):
            stage = self._advance(None, frames)
            if stage.rows:
                out.append(stage)
        return out

    def reconfigure(self, steps: int, batch: bool | None = None, frames: int | None = None) -> list[Stage]:
        """Change the step count (and the mode) between chunks: drain stages, then the re-layout of the cache
        rows (a new level starts from the closest existing level). Empty when nothing changes."""
        batch = self.batch if batch is None else bool(batch) and self.backbone.stream_batch
        self.backbone.step_list(steps, self.mode)      # validates before anything changes
        if int(steps) == self.steps and batch == self.batch:
            return []
        frames = frames or self.block
        stages = self.drain(frames)
        old_rows = self.rows
        self._configure(steps, batch)
        if self.rows != old_rows:
            stages.append(Stage(self.stream, [], frames, resize=self.rows))
        return stages

    def recache(self, keep_sink: bool = True) -> tuple[list[Stage], Stage | None]:
        """A prompt switch with KV re-cache (LongLive's mechanism, here for every backbone): the stages that drain
        the chunks in flight (so every cached frame has its clean latent), then ONE stage that re-encodes the
        stream's recent clean frames under the new prompt into every cache row — row r at its level's timestep
        (noised to it; Self-Forcing / LongLive: one row at the context timestep, clean) — its output dropped.

        Which frames, as LongLive: while the cache is not full, every frame written so far (the sink too); once full,
        with ``keep_sink`` (LongLive's ``global_sink: true``, shipped) the frames of the non-sink window (the sink
        keeps its K/V), without it the whole window, its oldest frames written into the sink slots (``global_sink:
        false``: they become the sink). The others keep their cache slots; their RoPE positions are the ones just
        before the stream's next (their own, unless a RoPE wrap lies inside the window: then contiguous positions
        ending at the current one). ``None``: nothing cached yet."""
        stages = self.drain()
        written, cfg = self.next_frame, self.cache
        if written == 0:
            return stages, None
        full = written > cfg.capacity
        m = cfg.capacity - cfg.sink if full and keep_sink else min(written, cfg.capacity)
        first, rope = written - m, max(0, self.next_rope - m)
        if self.backbone.context_pass:
            levels = [(0, self.backbone.context_t)]
        elif self.batch:
            levels = [(r, self.steps_list[r]) for r in range(self.rows)]
        else:                                          # one row, written last by a chunk's last level
            levels = [(0, self.steps_list[-1])]
        rows = [Row(self.stream, ("recache", level), level, level, first, rope, False, True, t, -1, context=True,
                    recache=True, resink=full and not keep_sink) for level, t in levels]
        return stages, Stage(self.stream, rows, m)

    # ------------------------------------------------------------------------------------------ internal
    def _sequential(self, chunk: Hashable, frames: int) -> list[Stage]:
        """Every level of one chunk in turn on cache row 0; with a context pass, one more stage over its clean x0."""
        frame, rope = self.take_position(frames)
        stages = [Stage(self.stream, [self._row(chunk, i, 0, frame, rope, i == 0)], frames) for i in range(self.levels)]
        stages[0].rebase, self._rebase = self._rebase, 0
        if self.backbone.context_pass:
            stages.append(Stage(self.stream, [Row(self.stream, chunk, self.levels, 0, frame, rope, False, False,
                                                  self.backbone.context_t, -1, context=True)], frames))
        return stages

    def _row(self, chunk: Hashable, level: int, cache_row: int, frame: int, rope: int, enters: bool) -> Row:
        final = level == self.levels - 1
        return Row(self.stream, chunk, level, cache_row, frame, rope, final, enters, self.steps_list[level],
                   -1 if final else self.steps_list[level + 1], hold=final and self.backbone.context_pass)

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
