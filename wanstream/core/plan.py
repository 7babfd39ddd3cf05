"""The plan of one engine tick (no torch): what the planner decided, and all the engine executes.

A :class:`Plan` covers the streams of one group (same size and cache settings) for one tick:

* per stream (:class:`StreamPlan`): the live changes taken this tick, in order (``updates``; the schedule side —
  a step change's drain and re-layout, a reset's fresh schedule — is already in the calls, the tensor side is the
  engine's), late frames dropped, whether it was held back, a switch between the stream batch and the sequential
  mode, the chunk that enters the model (:class:`Entry`: its frames, ids and whether it is the stream's first), and
  whether the stream reached the end of its input and drains;
* the DiT calls (:class:`~wanstream.core.schedule.Call`, usually one) over the rows of every stream, with the cache
  re-layouts they carry (``resize``, ``copy_row0``);
* ``late_calls``: KV re-caches of prompt switches, run after the tick's outputs left (off the other streams' path);
* ``collect``: after the calls, bring back every call still in flight (a pipeline of ranks keeps calls in flight;
  the first output of a stream and the end of a stream want them now).

The single-device runner and the multi-GPU ring execute the same calls; :meth:`Plan.without` takes a stream out of
the calls when its own work failed while the plan ran (its encode, its frames), so the others go on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable

from wanstream.core.chunking import ChunkInfo
from wanstream.core.schedule import Call


@dataclass
class Entry:
    """A chunk that enters the model this tick."""

    chunk: int                    # the stream's chunk id (0, 1, 2, … since its last reset)
    frames: list                  # its pixel frames (opaque here: numpy arrays from the stream's queue)
    info: ChunkInfo               # frame ids, timestamps, arrivals, real (non-padding) frames
    latent_frames: int            # latent frames it encodes to (2 for a stream's first chunk, then 1)
    first: bool                   # the stream's first chunk: it is prepared (every level in turn), not pushed


@dataclass
class StreamPlan:
    """One stream's part of a tick."""

    stream: Hashable
    updates: list[tuple[str, object]] = field(default_factory=list)  # live changes, in order; ("reset", rows)
    dropped: int = 0              # late frames dropped from the head of its queue
    deferred: bool = False        # held back this tick (a smaller batch keeps others within their deadline)
    switch: str | None = None     # "sequential" | "batch": its mode changed this tick
    entry: Entry | None = None    # the chunk that enters the model, if any
    drains: bool = False          # end of input reached: every chunk in flight leaves
    reasons: list[str] = field(default_factory=list)


@dataclass
class Plan:
    """Everything one tick does for one group (see the module docstring)."""

    tick: int
    now: float
    streams: dict[Hashable, StreamPlan] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    late_calls: list[Call] = field(default_factory=list)   # after the tick's outputs: KV re-caches (prompt switches)
    collect: bool = False
    predicted_s: float | None = None     # the latency model's prediction for the tick's rows

    @property
    def rows(self) -> int:
        """Batch rows of the tick's DiT calls, all calls together."""
        return sum(len(c.rows) for c in self.calls)

    @property
    def dit_calls(self) -> int:
        return sum(bool(c.rows) for c in self.calls) + sum(bool(c.rows) for c in self.late_calls)

    @property
    def entries(self) -> list[tuple[Hashable, Entry]]:
        return [(sid, sp.entry) for sid, sp in self.streams.items() if sp.entry is not None]

    def without(self, stream: Hashable) -> None:
        """Take a stream out of the tick's calls (its own work failed while the plan ran); calls left with nothing
        to do are dropped."""
        self.calls = _without(self.calls, stream)
        self.late_calls = _without(self.late_calls, stream)


def _without(calls: list[Call], stream: Hashable) -> list[Call]:
    out = []
    for c in calls:
        rows = [r for r in c.rows if r.stream != stream]
        resize = [(s, n) for s, n in c.resize if s != stream]
        copy = [s for s in c.copy_row0 if s != stream]
        rebase = [(s, n) for s, n in c.rebase if s != stream]
        if rows or resize or copy or rebase:
            out.append(Call(c.frames, rows, resize, copy, rebase))
    return out
