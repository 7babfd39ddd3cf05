"""Modulation, the pure part: a source gives a value in [0, 1], a curve shapes it, a range maps it onto a live
parameter, a one-pole filter smooths it; evaluated once per chunk, host floats only (no torch, no numpy).

A :class:`Mapping` names its target (a live parameter: ``noise_scale``, ``steps``, ``seed``, ``transition_chunks``,
``prompts.<i>.weight``, ``lora.<name>``), its :class:`Source` and how the source's value becomes the target's.
:class:`Modulator` evaluates a stream's mappings from one :class:`Inputs` snapshot (time, tempo, audio features,
MIDI controller and note state) and returns only the targets whose value moved beyond a dead band since it last
returned them, so a steady source causes no live change. The cost is O(mappings) per chunk.

Sources (:data:`SOURCE_KINDS`):

- ``lfo``: ``shape`` (sine, triangle, saw, square) at ``rate_hz``, or once every ``beats`` beats of the tempo;
- ``beat``: ``pulse`` (1 on each ``division`` of beats, decaying with ``decay_s``) or ``ramp`` (the phase within
  the division, 0 → 1);
- ``audio``: a feature of the stream's audio (``level``, ``onset``, ``low``, ``mid``, ``high``), already in [0, 1];
- ``cc``: a MIDI control change (``channel`` 0-15 or any, ``control`` 0-127), value / 127;
- ``note``: a MIDI note's velocity / 127 while it is held, 0 once released.

A source that has given nothing yet (no CC moved, no audio track) gives None: its mapping leaves the parameter
alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping as MappingType

SOURCE_KINDS = ("lfo", "beat", "audio", "cc", "note")
LFO_SHAPES = ("sine", "triangle", "saw", "square")
BEAT_SHAPES = ("pulse", "ramp")
AUDIO_FEATURES = ("level", "onset", "low", "mid", "high")
CURVES = ("linear", "exp", "log", "smooth")
CURVE_K = 4.0               # steepness of the exp / log curves
DEAD_BAND = 1e-3            # a float target is re-sent when it moved more than this fraction of its range


def lfo(shape: str, phase: float) -> float:
    """One cycle of ``shape`` at ``phase`` (any real; its fraction is used), in [0, 1]; starts at 0 (sine: at
    its middle rising, like sin)."""
    p = phase % 1.0
    if shape == "sine":
        return 0.5 + 0.5 * math.sin(2 * math.pi * p)
    if shape == "triangle":
        return 2 * p if p < 0.5 else 2 - 2 * p
    if shape == "saw":
        return p
    if shape == "square":
        return 1.0 if p < 0.5 else 0.0
    raise ValueError(f"unknown LFO shape {shape!r} (one of {', '.join(LFO_SHAPES)})")


def curve(name: str, x: float) -> float:
    """Shape ``x`` in [0, 1] (clamped) onto [0, 1]: ``linear``; ``exp`` (slow start, fast end); ``log`` (its
    inverse: fast start); ``smooth`` (smoothstep: slow at both ends)."""
    x = min(1.0, max(0.0, x))
    if name == "linear":
        return x
    if name == "exp":
        return math.expm1(CURVE_K * x) / math.expm1(CURVE_K)
    if name == "log":
        return math.log1p(math.expm1(CURVE_K) * x) / CURVE_K
    if name == "smooth":
        return x * x * (3 - 2 * x)
    raise ValueError(f"unknown curve {name!r} (one of {', '.join(CURVES)})")


def smooth(previous: float | None, target: float, dt: float, tau: float) -> float:
    """One-pole low-pass step: move ``previous`` toward ``target`` by ``1 - exp(-dt / tau)`` (``tau`` 0: jump)."""
    if previous is None or tau <= 0:
        return target
    if dt <= 0:
        return previous
    return previous + (target - previous) * (1.0 - math.exp(-dt / tau))


@dataclass(frozen=True)
class Source:
    """Where a mapping's value comes from (see the module docstring; fields unused by a kind are ignored)."""

    kind: str
    shape: str = "sine"                 # lfo: LFO_SHAPES; beat: BEAT_SHAPES
    rate_hz: float | None = None        # lfo: cycles per second ...
    beats: float | None = None          # ... or one cycle per this many beats (tempo-synced)
    phase: float = 0.0                  # lfo: phase offset, cycles
    division: float = 1.0               # beat: beats per pulse / ramp (4: once a bar in 4/4, 0.5: eighths)
    decay_s: float = 0.15               # beat pulse: time constant of its decay
    feature: str = "level"              # audio: AUDIO_FEATURES
    channel: int | None = None          # cc / note: MIDI channel 0-15, None: any
    control: int = 0                    # cc: controller number 0-127
    note: int = 60                      # note: note number 0-127


@dataclass
class Inputs:
    """What sources read, captured once per evaluation. ``beat``: the tempo's beat count at ``now`` (fractional);
    ``bpm``: its tempo; ``audio``: feature → [0, 1]; ``cc``: (channel, control) → [0, 1]; ``notes``: (channel,
    note) → velocity in [0, 1] (0: released)."""

    now: float
    beat: float = 0.0
    bpm: float = 120.0
    audio: MappingType[str, float] = field(default_factory=dict)
    cc: MappingType[tuple[int, int], float] = field(default_factory=dict)
    notes: MappingType[tuple[int, int], float] = field(default_factory=dict)


def _midi_value(table: MappingType[tuple[int, int], float], channel: int | None, number: int) -> float | None:
    if channel is not None:
        return table.get((channel, number))
    values = [v for (_, n), v in table.items() if n == number]
    return max(values) if values else None


def source_value(src: Source, inputs: Inputs) -> float | None:
    """The source's value in [0, 1] at ``inputs``, or None while it has given nothing."""
    kind = src.kind
    if kind == "lfo":
        cycles = inputs.beat / src.beats if src.beats else inputs.now * (src.rate_hz or 0.0)
        return lfo(src.shape, cycles + src.phase)
    if kind == "beat":
        within = inputs.beat % src.division if src.division > 0 else 0.0
        if src.shape == "ramp":
            return within / src.division if src.division > 0 else 0.0
        seconds = within * 60.0 / inputs.bpm if inputs.bpm > 0 else 0.0
        return math.exp(-seconds / src.decay_s) if src.decay_s > 0 else float(seconds == 0)
    if kind == "audio":
        return inputs.audio.get(src.feature)
    if kind == "cc":
        return _midi_value(inputs.cc, src.channel, src.control)
    if kind == "note":
        return _midi_value(inputs.notes, src.channel, src.note)
    raise ValueError(f"unknown source kind {kind!r} (one of {', '.join(SOURCE_KINDS)})")


@dataclass(frozen=True)
class Mapping:
    """``target`` ← ``lo + (hi - lo) · curve(source)``, smoothed over ``smoothing_s``; ``integer``: rounded (steps,
    seed, transition_chunks). ``lo > hi`` inverts the source."""

    target: str
    source: Source
    lo: float
    hi: float
    curve: str = "linear"
    smoothing_s: float = 0.0
    integer: bool = False

    def value(self, x: float) -> float:
        return self.lo + (self.hi - self.lo) * curve(self.curve, x)


class Modulator:
    """The mappings of one stream and their filter state; :meth:`evaluate` once per chunk (module docstring)."""

    def __init__(self, mappings: list[Mapping] | tuple[Mapping, ...] = ()):
        self.mappings = tuple(mappings)
        self._smoothed: dict[int, float] = {}
        self._sent: dict[str, float] = {}
        self._last: float | None = None
        self.evaluations = 0

    def evaluate(self, inputs: Inputs) -> dict[str, float]:
        """Targets whose value changed (beyond the dead band, or as an integer) since they were last returned.
        Two mappings of one target: the later one wins."""
        dt = 0.0 if self._last is None else inputs.now - self._last
        self._last = inputs.now
        self.evaluations += 1
        out: dict[str, float] = {}
        for i, m in enumerate(self.mappings):
            x = source_value(m.source, inputs)
            if x is None:
                continue
            y = smooth(self._smoothed.get(i), m.value(x), dt, m.smoothing_s)
            self._smoothed[i] = y
            value = float(round(y)) if m.integer else y
            sent = self._sent.get(m.target)
            band = 0.0 if m.integer else DEAD_BAND * abs(m.hi - m.lo)
            if sent is None or abs(value - sent) > band:
                out[m.target] = value
        self._sent.update(out)
        return out

    def forget(self, target: str) -> None:
        """The target was set by hand: the next evaluation sends it again."""
        self._sent.pop(target, None)
