"""Modulation as data: the schema of a stream's mappings and note slots (HTTP, presets), validated like the live
parameters (:mod:`wanstream.api.params`): strict types, unknown fields refused, each mapping's range checked with
the rules of the parameter it drives; errors name the field (``mappings.0.min: ...``).

::

    {"mappings": [
       {"target": "noise_scale", "source": {"kind": "lfo", "shape": "sine", "beats": 4}, "min": 0.5, "max": 0.9},
       {"target": "prompts.1.weight", "source": {"kind": "audio", "feature": "low"}, "min": 0, "max": 2,
        "smoothing_s": 0.2},
       {"target": "lora.ink", "source": {"kind": "cc", "channel": 0, "control": 21}, "curve": "exp"}],
     "notes": [{"note": 36, "prompt": "neon city", "transition_chunks": 2, "quantize": "beat"}]}

Targets: ``noise_scale``, ``steps``, ``seed``, ``transition_chunks``, ``prompts.<i>.weight`` (the i-th prompt of
the stream's blend), ``lora.<name>`` (a loaded LoRA, checked by the server). ``min`` / ``max`` default to the
target's usual range (:data:`DEFAULT_RANGES`); ``min > max`` inverts the source. A note slot switches the stream
to its prompt (or blend) when the note is pressed, with its transition, at once or on the next beat / bar. The
pure evaluation is :mod:`wanstream.core.modulation`; :meth:`Modulation.to_core` gives its mappings.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from wanstream.api.params import (
    MAX_BLEND_PROMPTS,
    MAX_PROMPT_CHARS,
    MAX_TRANSITION_CHUNKS,
    ParamsUpdate,
    WeightedPrompt,
)
from wanstream.core import modulation as core

MAX_MAPPINGS = 32
MAX_NOTE_SLOTS = 128
MAX_LORA_NAME = 128
Quantize = Literal["beat", "bar"]
_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

INTEGER_TARGETS = frozenset({"steps", "seed", "transition_chunks"})
DEFAULT_RANGES = {"noise_scale": (0.3, 1.0), "steps": (1, 4), "seed": (0, 127), "transition_chunks": (0, 16),
                  "weight": (0.0, 1.0), "lora": (0.0, 1.0)}
_PROMPT_WEIGHT = re.compile(r"^prompts\.([0-9])\.weight$")
_LORA = re.compile(r"^lora\.([^/\\\x00-\x1f]{1,%d})$" % MAX_LORA_NAME)


def parse_target(target: str) -> tuple[str, int | str | None]:
    """``("noise_scale", None)``, ``("weight", i)``, ``("lora", name)`` ...; ValueError naming the target."""
    if target in INTEGER_TARGETS or target == "noise_scale":
        return target, None
    m = _PROMPT_WEIGHT.match(target)
    if m and int(m.group(1)) < MAX_BLEND_PROMPTS:
        return "weight", int(m.group(1))
    m = _LORA.match(target)
    if m:
        return "lora", m.group(1)
    raise ValueError(f"unknown target {target[:64]!r} (one of noise_scale, steps, seed, transition_chunks, "
                     f"prompts.<0-{MAX_BLEND_PROMPTS - 1}>.weight, lora.<name>)")


def _check_value(target: str, value: float) -> None:
    """``value`` must be one the target's live parameter takes (the HTTP schema decides)."""
    kind, arg = parse_target(target)
    if kind in INTEGER_TARGETS:
        if float(value) != round(value):
            raise ValueError(f"{target} takes whole numbers")
        body = {kind: int(round(value))}
    elif kind == "weight":
        WeightedPrompt(text="", weight=float(value))
        return
    elif kind == "lora":
        body = {"lora": {arg: float(value)}}
    else:
        body = {kind: float(value)}
    ParamsUpdate.model_validate(body)


class LFOSource(BaseModel):
    model_config = _STRICT
    kind: Literal["lfo"]
    shape: Literal["sine", "triangle", "saw", "square"] = "sine"
    rate_hz: float | None = Field(None, gt=0, le=20, description="cycles per second (or give beats)")
    beats: float | None = Field(None, ge=1 / 16, le=256, description="one cycle per this many beats")
    phase: float = Field(0.0, ge=0, le=1)

    @model_validator(mode="after")
    def _one_rate(self) -> LFOSource:
        if (self.rate_hz is None) == (self.beats is None):
            raise ValueError("give rate_hz or beats (one of them)")
        return self


class BeatSource(BaseModel):
    model_config = _STRICT
    kind: Literal["beat"]
    shape: Literal["pulse", "ramp"] = "pulse"
    division: float = Field(1.0, ge=1 / 16, le=64, description="beats per pulse (4: a bar in 4/4)")
    decay_s: float = Field(0.15, gt=0, le=10)


class AudioSource(BaseModel):
    model_config = _STRICT
    kind: Literal["audio"]
    feature: Literal["level", "onset", "low", "mid", "high"] = "level"


class CCSource(BaseModel):
    model_config = _STRICT
    kind: Literal["cc"]
    channel: int | None = Field(None, ge=0, le=15, description="MIDI channel 0-15; null: any")
    control: int = Field(ge=0, le=127)


class NoteSource(BaseModel):
    model_config = _STRICT
    kind: Literal["note"]
    channel: int | None = Field(None, ge=0, le=15)
    note: int = Field(ge=0, le=127)


Source = Annotated[Union[LFOSource, BeatSource, AudioSource, CCSource, NoteSource], Field(discriminator="kind")]


class MappingSpec(BaseModel):
    """One mapping: ``target`` ← ``min + (max - min) · curve(source)``, smoothed over ``smoothing_s``."""

    model_config = _STRICT
    target: str = Field(max_length=MAX_LORA_NAME + 8)
    source: Source
    min: float | None = None
    max: float | None = None
    curve: Literal["linear", "exp", "log", "smooth"] = "linear"
    smoothing_s: float = Field(0.0, ge=0, le=10)

    @model_validator(mode="after")
    def _check(self) -> MappingSpec:
        kind, _ = parse_target(self.target)
        lo, hi = DEFAULT_RANGES[kind]
        self.min = float(lo) if self.min is None else self.min
        self.max = float(hi) if self.max is None else self.max
        for name in ("min", "max"):
            try:
                _check_value(self.target, getattr(self, name))
            except ValidationError as exc:
                e = exc.errors()[0]
                raise ValueError(f"{name}: {self.target}: {e['msg']}") from None
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
        return self

    def to_core(self) -> core.Mapping:
        kind, _ = parse_target(self.target)
        s = self.source.model_dump()
        return core.Mapping(target=self.target, source=core.Source(**s), lo=self.min, hi=self.max,
                            curve=self.curve, smoothing_s=self.smoothing_s, integer=kind in INTEGER_TARGETS)


class NoteSlot(BaseModel):
    """Note on → this prompt (or blend), with its transition, at once or on the next beat / bar."""

    model_config = _STRICT
    channel: int | None = Field(None, ge=0, le=15)
    note: int = Field(ge=0, le=127)
    prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    prompts: list[WeightedPrompt] | None = Field(None, min_length=1, max_length=MAX_BLEND_PROMPTS)
    transition_chunks: int | None = Field(None, ge=0, le=MAX_TRANSITION_CHUNKS)
    quantize: Quantize | None = None

    @model_validator(mode="after")
    def _check(self) -> NoteSlot:
        if (self.prompt is None) == (self.prompts is None):
            raise ValueError("give 'prompt' or 'prompts' (one of them)")
        self.update()                       # the update it stands for must be valid (weights not all 0, ...)
        return self

    def matches(self, channel: int, note: int) -> bool:
        return self.note == note and (self.channel is None or self.channel == channel)

    def update(self) -> ParamsUpdate:
        body = {"prompt": self.prompt} if self.prompt is not None else \
            {"prompts": [p.model_dump() for p in self.prompts]}
        if self.transition_chunks is not None:
            body["transition_chunks"] = self.transition_chunks
        if self.quantize is not None:
            body["quantize"] = self.quantize
        return ParamsUpdate.model_validate(body)


class Modulation(BaseModel):
    """A stream's mappings and note slots (the ``modulation`` of a preset)."""

    model_config = _STRICT
    mappings: list[MappingSpec] = Field(default_factory=list, max_length=MAX_MAPPINGS)
    notes: list[NoteSlot] = Field(default_factory=list, max_length=MAX_NOTE_SLOTS)

    def to_core(self) -> list[core.Mapping]:
        return [m.to_core() for m in self.mappings]

    def lora_names(self) -> list[tuple[int, str]]:
        """``(mapping index, LoRA name)`` of every ``lora.<name>`` target (the server checks they are loaded)."""
        out = []
        for i, m in enumerate(self.mappings):
            kind, arg = parse_target(m.target)
            if kind == "lora":
                out.append((i, arg))
        return out
