"""Tempo, the pure part: a beat timeline, a MIDI clock follower and beat quantisation with latency compensation.

:class:`TempoClock` is a line ``beat(t) = beat0 + (t - t0) · bpm / 60`` re-anchored by whatever drives it: nothing
(free-running at the configured tempo), MIDI clock (:class:`MidiClockFollower`, 24 pulses per quarter note) or
Ableton Link (the server polls its session and calls :meth:`TempoClock.anchor`). Times are the server's clock
(seconds); the line is replaced as one tuple, so readers on other threads always see a consistent one.

Quantised changes (:func:`target_beat`, :func:`chunk_due`): a change asked for at ``now`` is meant to show on the
next beat (or bar) that the stream can still reach. The stream's output lags its input by ``latency`` (arrival
of an input frame → its restyled frame leaving the server), so the first reachable beat is the first grid point
after ``now + latency``, and the change is handed to the stream just before the chunk holding the input frame
that arrives ``latency`` before that beat: that chunk's output is the one that lands on the beat. While the clock
is stopped (MIDI Stop) there is no next beat: quantised changes apply at once.
"""

from __future__ import annotations

import math
from collections import deque

PPQN = 24                       # MIDI clock pulses per quarter note (a beat)
MIN_BPM, MAX_BPM = 20.0, 400.0
GRIDS = ("beat", "bar")


class TempoClock:
    """A beat timeline (see the module docstring). ``source``: what drives it (``internal``, ``midi``, ``link``)."""

    def __init__(self, bpm: float = 120.0, beats_per_bar: int = 4, t0: float = 0.0, source: str = "internal"):
        check_bpm(bpm)
        if not 1 <= beats_per_bar <= 32:
            raise ValueError(f"beats per bar must be in 1..32, got {beats_per_bar}")
        self.beats_per_bar = beats_per_bar
        self.source = source
        self._line = (float(t0), 0.0, float(bpm))      # (t0, beat at t0, bpm)
        self.running = True

    @property
    def bpm(self) -> float:
        return self._line[2]

    def anchor(self, t: float, beat: float, bpm: float | None = None) -> None:
        """The beat at time ``t`` is ``beat`` (and the tempo ``bpm`` from then on, when given)."""
        bpm = self._line[2] if bpm is None else min(MAX_BPM, max(MIN_BPM, float(bpm)))
        self._line = (float(t), float(beat), bpm)

    def beat_at(self, t: float) -> float:
        t0, b0, bpm = self._line
        return b0 + (t - t0) * bpm / 60.0 if self.running else b0

    def time_of(self, beat: float) -> float:
        t0, b0, bpm = self._line
        return t0 + (beat - b0) * 60.0 / bpm

    def grid(self, name: str) -> int:
        """Beats per grid step: 1 for ``beat``, ``beats_per_bar`` for ``bar``."""
        if name == "beat":
            return 1
        if name == "bar":
            return self.beats_per_bar
        raise ValueError(f"quantise to one of {', '.join(GRIDS)}, got {name!r}")

    def snapshot(self, t: float) -> dict:
        """What the page shows: tempo, beat count, phase within the beat and the bar, what drives the clock."""
        beat = self.beat_at(t)
        return {"bpm": round(self.bpm, 2), "beat": round(beat, 3), "phase": round(beat % 1.0, 3),
                "bar_phase": round((beat % self.beats_per_bar) / self.beats_per_bar, 3),
                "beats_per_bar": self.beats_per_bar, "source": self.source, "running": self.running}


def check_bpm(bpm: float) -> float:
    if not (isinstance(bpm, (int, float)) and math.isfinite(bpm) and MIN_BPM <= bpm <= MAX_BPM):
        raise ValueError(f"tempo must be {MIN_BPM:g}-{MAX_BPM:g} BPM, got {bpm!r}")
    return float(bpm)


def target_beat(clock: TempoClock, now: float, latency: float, grid: str) -> float:
    """The first grid point (a beat number) whose time is after ``now + latency``: the first beat a change asked
    for at ``now`` can land on."""
    step = clock.grid(grid)
    earliest = clock.beat_at(now + max(0.0, latency))
    n = math.floor(earliest / step + 1e-9) + 1
    return float(n * step)


def chunk_due(clock: TempoClock, beat: float, latency: float, chunk_arrivals: list[float]) -> bool:
    """Whether the change for ``beat`` goes in before the chunk whose input frames arrived at ``chunk_arrivals``:
    its last frame arrived at or after ``time_of(beat) - latency`` (its output lands on the beat, or the beat has
    passed already)."""
    if not chunk_arrivals:
        return False
    return chunk_arrivals[-1] >= clock.time_of(beat) - max(0.0, latency)


class MidiClockFollower:
    """Follows MIDI clock (0xF8 pulses, Start / Stop / Continue, Song Position) into a :class:`TempoClock`.

    The tempo is the mean pulse interval over the last ``window`` pulses (24: one beat), so one late pulse moves
    it little; Start puts beat 0 on the next pulse; Stop freezes the beat count (``running`` False) until
    Continue."""

    def __init__(self, clock: TempoClock, window: int = PPQN):
        self.clock = clock
        self.pulses = 0
        self.times: deque[float] = deque(maxlen=max(2, window + 1))
        self._armed_start = False

    def start(self, t: float) -> None:
        self.pulses = 0
        self.times.clear()
        self._armed_start = True
        self.clock.running = True
        self.clock.anchor(t, 0.0)

    def stop(self, t: float) -> None:
        self.clock.anchor(t, self.clock.beat_at(t), None)
        self.clock.running = False
        self.times.clear()

    def resume(self, t: float) -> None:                # MIDI Continue
        self.clock.running = True
        self.times.clear()

    def song_position(self, sixteenths: int, t: float) -> None:
        self.pulses = int(sixteenths) * (PPQN // 4)
        self.clock.anchor(t, self.pulses / PPQN)

    def pulse(self, t: float) -> None:
        if not self.clock.running:
            return
        if self._armed_start:                           # the first pulse after Start is beat 0
            self._armed_start = False
            self.pulses = 0
        else:
            self.pulses += 1
        self.times.append(t)
        bpm = None
        if len(self.times) >= 2:
            interval = (self.times[-1] - self.times[0]) / (len(self.times) - 1)
            if interval > 0:
                bpm = 60.0 / (interval * PPQN)
        self.clock.anchor(t, self.pulses / PPQN, bpm)
