"""Presets on the command line: ``--preset FILE`` makes a preset the defaults of a command's flags (flags given on
the command line win), and the LoRAs and prompt a command's arguments ask for."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

PRESET_COMMANDS = ("v2v", "t2v", "bench")


def add_preset_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", dest="preset_file", type=Path, default=None, metavar="FILE",
                   help="a preset JSON (prompts, knobs, LoRAs); flags given here override its values")


def cli_defaults(preset) -> dict:
    """The command-line defaults a preset stands for (``argparse`` dests)."""
    out: dict = {"preset": preset, "preset_loras": preset.lora_specs()}
    if preset.prompts:
        out["prompt"], out["prompts"] = None, preset.prompts        # an explicit --prompt still wins
    elif preset.prompt is not None:
        out["prompt"] = preset.prompt
    for key in ("steps", "seed", "noise_scale", "fit"):
        if getattr(preset, key) is not None:
            out[key] = getattr(preset, key)
    if preset.noise_controller is not None:
        out["no_noise_controller"] = not preset.noise_controller
    cond = preset.conditioning
    if cond is not None:                            # VACE: its image read (and checked) now, --reference still wins
        out["reference_strength"] = cond.strength
        if cond.control not in (None, "none"):
            out["control"] = cond.control
        if cond.reference is not None:
            out["preset_reference"] = [cond.image(preset.folder)]
    return out


def apply_preset(parser: argparse.ArgumentParser, argv: Sequence[str] | None, command: str,
                 path: Path) -> argparse.Namespace:
    """Parse ``argv`` again with the preset as the defaults of ``command`` (so explicit flags win)."""
    from wanstream.api.presets import Preset
    preset = Preset.load(path)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    sub.set_defaults(**cli_defaults(preset))
    return parser.parse_args(argv)


def lora_specs(args: argparse.Namespace) -> list:
    """``--lora`` flags (they replace a preset's LoRAs), else the preset's LoRAs (``LoRASpec`` s)."""
    from wanstream.models.lora import LoRASpec
    if getattr(args, "lora", None):
        return [LoRASpec.parse(s) for s in args.lora]
    return list(getattr(args, "preset_loras", None) or [])


def prompt_embedding(model, args: argparse.Namespace):
    """The prompt embedding ``--prompt`` or else the preset's prompt blend asks for."""
    prompt = getattr(args, "prompt", None)
    prompts = None if prompt is not None else getattr(args, "prompts", None)
    if prompt is None and not prompts:
        raise ValueError("give --prompt (or a --preset with a prompt)")
    from wanstream.api.params import conditioning
    return conditioning(model, argparse.Namespace(prompt=prompt, prompts=prompts))
