"""Presets: a JSON file with prompt(s) and blend weights, the knobs and the LoRAs (paths and strengths).

A preset is validated with the live parameter schema of the server (:class:`~wanstream.api.params.ParamsUpdate`, the
same fields, types and ranges) plus its LoRA files::

    {"format": "wanstream-preset", "version": 1,
     "prompts": [{"text": "ink wash painting", "weight": 2}, {"text": "neon city", "weight": 1}],
     "transition_chunks": 4, "steps": 2, "noise_scale": 0.7, "noise_controller": true, "seed": 7, "fit": "pad",
     "loras": [{"path": "styles/ink.safetensors", "strength": 0.8}],
     "modulation": {"mappings": [{"target": "noise_scale", "source": {"kind": "lfo", "beats": 4}}]},
     "conditioning": {"reference": "look.png", "strength": 0.8, "control": "depth"}}

Every field is optional. ``modulation`` (mappings and note slots, :mod:`wanstream.api.modulation`) is applied by
the server; the file commands ignore it. ``conditioning`` (:class:`~wanstream.api.conditioning.PresetConditioning`):
a VACE reference image (a file relative to the preset, or embedded as a data URI — the server takes only embedded
ones, within its body bound), strength and control kind. LoRA paths are relative to the preset file's folder (a preset travels with its LoRAs).
``--preset FILE`` on ``v2v`` / ``t2v`` / ``bench`` makes the preset the defaults of the command's flags, so flags
given on the command line win (``--lora`` replaces the preset's LoRA list; ``--prompt`` its prompt or blend);
``bench`` uses only steps, seed and LoRAs (its prompt is a fixed embedding); on ``serve`` it gives the defaults
of new sessions (``wanstream/cli/serve.py``). The server turns a preset into a live update with
:meth:`Preset.to_params` and a session's state into a preset with :meth:`Preset.from_params`; a preset a client
sends names its LoRAs by their file names only (:func:`lora_name_of`: no file is looked at).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from wanstream.api.conditioning import PresetConditioning
from wanstream.api.modulation import Modulation
from wanstream.api.params import MAX_LORAS, ParamsUpdate, SessionParams
from wanstream.models.lora import MAX_STRENGTH, LoRASpec

FORMAT = "wanstream-preset"
VERSION = 1
_NOT_IN_PRESET = ("recording", "reset", "lora", "quantize")   # live-only fields (a preset names LoRAs by path)
_KNOBS = ("prompt", "prompts", "transition_chunks", "steps", "noise_scale", "noise_controller", "seed", "fit")


class PresetError(ValueError):
    """A preset file is missing, not JSON, or does not fit the schema (the message names the file and field)."""


MAX_LORA_PATH_CHARS = 1024
LORA_FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


def lora_name_of(path: str) -> str:
    """The name a preset's LoRA path stands for, from the text alone (no file is looked at, so a server never
    tells which of its folders exist): the last path component, without a LoRA file suffix. It is the name
    :func:`~.models.lora.lora_name` gives the loaded file (a folder keeps its whole name)."""
    base = path.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    for suffix in LORA_FILE_SUFFIXES:
        if base.lower().endswith(suffix) and len(base) > len(suffix):
            return base[: -len(suffix)]
    return base


class PresetLoRA(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    path: str = Field(min_length=1, max_length=MAX_LORA_PATH_CHARS,
                      description="LoRA file or folder, relative to the preset file's folder")
    strength: float = Field(1.0, ge=-MAX_STRENGTH, le=MAX_STRENGTH)

    @property
    def name(self) -> str:
        return lora_name_of(self.path)


class Preset(ParamsUpdate):
    """A preset: the live parameters (:class:`ParamsUpdate`'s schema) and LoRAs with their files."""

    format: Literal["wanstream-preset"] = FORMAT
    version: Literal[1] = VERSION
    loras: list[PresetLoRA] = Field(default_factory=list, max_length=MAX_LORAS)
    modulation: Modulation | None = Field(None, description="mappings and note slots (api/modulation.py)")
    conditioning: PresetConditioning | None = Field(None, description="VACE reference / control (api/conditioning.py)")
    _folder: Path | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _check_preset(self) -> Preset:
        given = [k for k in _NOT_IN_PRESET if getattr(self, k) is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: not part of a preset (LoRAs go in 'loras' with their paths)")
        names = [lo.name for lo in self.loras]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"two LoRAs with the name {', '.join(twice)} (names are file names without extension)")
        return self

    # ------------------------------------------------------------------------------------------ files
    @property
    def folder(self) -> Path | None:
        """The folder of the file it was loaded from (relative paths in it are relative to it)."""
        return self._folder

    @classmethod
    def load(cls, path: str | Path) -> Preset:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise PresetError(f"{path}: cannot read preset ({exc.strerror or exc})") from None
        try:
            json.loads(text)
        except json.JSONDecodeError as exc:
            raise PresetError(f"{path}: not JSON ({exc})") from None
        try:
            preset = cls.model_validate_json(text)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'preset'}: {e['msg']}" for e in exc.errors())
            raise PresetError(f"{path}: {problems}") from None
        preset._folder = path.resolve().parent
        return preset

    def save(self, path: str | Path) -> Path:
        """Write the preset; LoRA paths are rewritten relative to the new file's folder (same files)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = self.to_dict()
        folder = path.resolve().parent
        for entry, spec in zip(data["loras"], self.lora_specs()):
            entry["path"] = os.path.relpath(spec.path.resolve(), folder)
        cond = self.conditioning
        if cond is not None and cond.reference is not None and not cond.embedded:     # the same image file
            source = (self._folder or Path.cwd()) / cond.reference
            data["conditioning"]["reference"] = os.path.relpath(source.resolve(), folder)
        path.write_text(json.dumps(data, indent=2) + "\n")
        return path

    # ------------------------------------------------------------------------------------------ conversions
    def to_dict(self) -> dict:
        """The preset as a file holds it (JSON types; the live-only fields left out)."""
        return self.model_dump(mode="json", exclude_none=True, exclude=set(_NOT_IN_PRESET))

    def lora_specs(self) -> list[LoRASpec]:
        """The LoRAs to load (relative paths resolved against the preset file's folder)."""
        base = self._folder or Path.cwd()
        return [LoRASpec(Path(os.path.normpath(base / lo.path)), lo.strength) for lo in self.loras]

    def to_params(self) -> ParamsUpdate:
        """The live update this preset asks for (LoRA strengths by name; the LoRAs must be loaded)."""
        values = {k: getattr(self, k) for k in _KNOBS if getattr(self, k) is not None}
        if self.loras:
            values["lora"] = {lo.name: lo.strength for lo in self.loras}
        return ParamsUpdate(**values)

    @classmethod
    def from_params(cls, params: SessionParams, lora_paths: Mapping[str, str | Path] | None = None,
                    modulation: Modulation | None = None) -> Preset:
        """A preset of a session's parameters; ``lora_paths``: the file of each loaded LoRA by name;
        ``modulation``: the stream's mappings and note slots (none: left out)."""
        lora_paths = lora_paths or {}
        unknown = sorted(set(params.lora) - set(lora_paths))
        if unknown:
            raise PresetError(f"no file known for LoRA {', '.join(unknown)}")
        values = {k: getattr(params, k) for k in _KNOBS if getattr(params, k) is not None}
        if params.prompts:
            values.pop("prompt")
        loras = [PresetLoRA(path=str(lora_paths[n]), strength=s) for n, s in params.lora.items()]
        if modulation is not None and (modulation.mappings or modulation.notes):
            values["modulation"] = modulation.model_copy(deep=True)
        return cls(**values, loras=loras)
