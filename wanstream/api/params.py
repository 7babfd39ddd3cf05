"""Live parameters of a session: one pydantic schema for the WebSocket, the data channel and the HTTP API.

A client sends a partial update (:class:`ParamsUpdate`); the session keeps the full state
(:class:`SessionParams`). Types are strict (``"2"`` is not a step count, ``1`` is not a boolean), unknown fields
are refused, ranges are checked, prompts are at most 2,000 characters.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from wanstream.core.config import MAX_SEED
from wanstream.models.lora import MAX_STRENGTH

MAX_PROMPT_CHARS = 2000
MAX_BLEND_PROMPTS = 8
MAX_TRANSITION_CHUNKS = 64
MAX_LORAS = 16

LoRAStrength = Annotated[float, Field(ge=-MAX_STRENGTH, le=MAX_STRENGTH)]

# Fields whose change alters the conditioning (and so discards the frames queued before it).
PROMPT_FIELDS = frozenset({"prompt", "prompts"})
# Fields the model worker applies at the next chunk.
MODEL_FIELDS = frozenset({"prompt", "prompts", "steps", "noise_scale", "noise_controller", "seed", "lora"})


class WeightedPrompt(BaseModel):
    """One prompt of a blend; the blend is the weighted mean of the prompt embeddings."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    text: str = Field(max_length=MAX_PROMPT_CHARS)
    weight: float = Field(1.0, ge=0.0, le=100.0)


class ParamsUpdate(BaseModel):
    """A partial change of a session's parameters; fields left out (or null) keep their value."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS, description="a single prompt (ends a blend)")
    prompts: list[WeightedPrompt] | None = Field(None, min_length=1, max_length=MAX_BLEND_PROMPTS,
                                                  description="weighted prompts, blended linearly")
    transition_chunks: int | None = Field(None, ge=0, le=MAX_TRANSITION_CHUNKS,
                                          description="interpolate prompt changes over this many chunks")
    recache: bool | None = Field(None, description="prompt changes re-encode the recent frames under the new prompt "
                                                   "(LongLive's KV re-cache; excludes a transition)")
    steps: int | None = Field(None, ge=1, le=4)
    noise_scale: float | None = Field(None, gt=0.0, le=1.0)
    noise_controller: bool | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    lora: dict[str, LoRAStrength] | None = Field(None, max_length=MAX_LORAS,
                                                  description="LoRA strengths by name (0: off); names left out "
                                                              "keep their strength")
    fit: Literal["crop", "pad", "stretch"] | None = Field(
        None, description="framing of input frames of another aspect: centred crop, pad (black bars), stretch")
    recording: bool | None = None
    reset: bool | None = Field(None, description="true: drop the caches and re-prepare on the next frames")
    quantize: Literal["beat", "bar"] | None = Field(
        None, description="apply this update's prompt, seed and reset on the next beat or bar of the server's tempo "
                          "(the change is timed so the restyled frame lands on it)")

    @model_validator(mode="after")
    def _check(self) -> ParamsUpdate:
        if self.prompt is not None and self.prompts is not None:
            raise ValueError("give 'prompt' or 'prompts', not both")
        if self.prompts is not None and sum(p.weight for p in self.prompts) <= 0:
            raise ValueError("the prompt weights must not all be 0")
        return self


class SessionParams(BaseModel):
    """The full parameter state of a session (what the client sees back)."""

    prompt: str
    prompts: list[WeightedPrompt] | None = None
    transition_chunks: int = 0
    recache: bool = False
    steps: int = 2
    noise_scale: float = 0.8
    noise_controller: bool = True
    seed: int = 0
    lora: dict[str, float] = Field(default_factory=dict)
    fit: str = "crop"
    recording: bool = False

    def merged(self, update: ParamsUpdate) -> tuple[SessionParams, set[str]]:
        """The state after ``update`` and the names of the fields whose value changed."""
        values = update.model_dump(exclude_none=True, exclude={"reset", "quantize"})
        if "prompt" in values:
            values["prompts"] = None
        new = self.model_copy(update={k: v for k, v in values.items()})
        if update.prompts is not None:
            new.prompts = [p.model_copy() for p in update.prompts]
        if update.lora is not None:
            new.lora = {**self.lora, **update.lora}
        if new.recache and new.transition_chunks:
            raise ValueError("a prompt change re-caches or transitions over chunks, not both: set transition_chunks "
                             "to 0 with recache")
        changed = {k for k in type(self).model_fields if getattr(new, k) != getattr(self, k)}
        return new, changed


def blend_embeddings(embeddings: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Weighted linear mix ``sum(w_i e_i) / sum(w_i)`` (computed in float32, returned in the input dtype)."""
    if len(embeddings) != len(weights) or not embeddings:
        raise ValueError("need one weight per embedding")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("the prompt weights must not all be 0")
    if len(embeddings) == 1:
        return embeddings[0]
    mix = sum(e.float() * (w / total) for e, w in zip(embeddings, weights))
    return mix.to(embeddings[0].dtype)


def conditioning(model, params: SessionParams) -> torch.Tensor:
    """The prompt embedding a session's parameters ask for (a blend when ``prompts`` is set)."""
    if params.prompts:
        items = [p for p in params.prompts if p.weight > 0]
        return blend_embeddings([model.prompt_embedding(p.text) for p in items], [p.weight for p in items])
    return model.prompt_embedding(params.prompt)
