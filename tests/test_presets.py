"""Presets: the live-parameter schema, files, conversions for the server, and --preset on the command line."""

from __future__ import annotations

import json

import pytest
from lora_files import random_lora, write_lora

from wanstream.api.params import ParamsUpdate, SessionParams, WeightedPrompt
from wanstream.api.presets import Preset, PresetError
from wanstream.cli.main import build_parser, main
from wanstream.cli.presets import apply_preset, lora_specs

FULL = {"format": "wanstream-preset", "version": 1,
        "prompts": [{"text": "ink wash painting", "weight": 2.0}, {"text": "neon city", "weight": 1.0}],
        "transition_chunks": 4, "steps": 3, "noise_scale": 0.7, "noise_controller": False, "seed": 7, "fit": "pad",
        "loras": [{"path": "styles/ink.safetensors", "strength": 0.8}, {"path": "oil.safetensors"}]}


def write(tmp_path, data, name="p.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def test_round_trip_and_conversions(tmp_path):
    path = write(tmp_path, FULL)
    preset = Preset.load(path)
    assert preset.steps == 3 and preset.prompts[0] == WeightedPrompt(text="ink wash painting", weight=2.0)
    assert [(s.path, s.strength) for s in preset.lora_specs()] == [
        (tmp_path / "styles" / "ink.safetensors", 0.8), (tmp_path / "oil.safetensors", 1.0)]   # relative to the file
    again = Preset.load(preset.save(tmp_path / "sub" / "again.json"))
    assert again.model_dump(exclude={"loras"}) == preset.model_dump(exclude={"loras"})
    assert again.lora_specs() == preset.lora_specs()                        # the same files from the new folder
    assert json.loads((tmp_path / "sub" / "again.json").read_text()) == {
        **FULL, "loras": [{"path": "../styles/ink.safetensors", "strength": 0.8},
                          {"path": "../oil.safetensors", "strength": 1.0}]}
    update = preset.to_params()
    assert isinstance(update, ParamsUpdate) and type(update) is ParamsUpdate
    assert update.lora == {"ink": 0.8, "oil": 1.0} and update.steps == 3 and update.prompts == preset.prompts
    state, changed = SessionParams(prompt="start").merged(update)
    assert {"prompts", "steps", "noise_scale", "noise_controller", "seed", "lora"} <= changed
    back = Preset.from_params(state, {"ink": "styles/ink.safetensors", "oil": "oil.safetensors"})
    assert back.model_dump(exclude={"prompt"}) == preset.model_dump(exclude={"prompt"})
    with pytest.raises(PresetError, match="no file known for LoRA oil"):
        Preset.from_params(state, {"ink": "x.safetensors"})
    single = Preset.from_params(SessionParams(prompt="a fox", steps=1))
    assert single.prompt == "a fox" and single.prompts is None and single.loras == []


def test_live_lora_strengths_merge_by_name():
    state, changed = SessionParams(prompt="x", lora={"ink": 0.5, "oil": 1.0}).merged(ParamsUpdate(lora={"oil": 0.0}))
    assert state.lora == {"ink": 0.5, "oil": 0.0} and changed == {"lora"}
    with pytest.raises(ValueError, match="less than or equal to 4"):
        ParamsUpdate.model_validate({"lora": {"ink": 5}})


@pytest.mark.parametrize("data, message", [
    ({"steps": 5}, "steps: Input should be less than or equal to 4"),
    ({"steps": "2"}, "steps: Input should be a valid integer"),            # strict, as the live schema
    ({"noise_scale": 0}, "noise_scale: Input should be greater than 0"),
    ({"prompt": "a", "prompts": [{"text": "b"}]}, "give 'prompt' or 'prompts', not both"),
    ({"colour": "red"}, "colour: Extra inputs are not permitted"),
    ({"recording": True}, "recording: not part of a preset"),
    ({"lora": {"ink": 1.0}}, "lora: not part of a preset"),
    ({"loras": [{"path": "a/ink.safetensors"}, {"path": "b/ink.pt"}]}, "two LoRAs with the name ink"),
    ({"loras": [{"path": "ink.safetensors", "strength": 9}]}, "loras.0.strength: Input should be less than"),
    ({"version": 2}, "version: Input should be 1"),
    ("{not json", "not JSON"),
])
def test_bad_presets_name_the_file_and_field(tmp_path, data, message):
    path = write(tmp_path, data)
    with pytest.raises(PresetError, match=message) as info:
        Preset.load(path)
    assert str(path) in str(info.value)


def test_missing_preset_file(tmp_path):
    with pytest.raises(PresetError, match="nope.json: cannot read preset"):
        Preset.load(tmp_path / "nope.json")


# ------------------------------------------------------------------------------------------ command line
def test_preset_values_are_defaults_and_flags_win(tmp_path):
    path = write(tmp_path, FULL)
    parser = build_parser()
    argv = ["v2v", "in.mp4", "-o", "o.mp4", "--model", "m", "--preset", str(path), "--seed", "1"]
    args = apply_preset(parser, argv, "v2v", path)
    assert (args.steps, args.noise_scale, args.no_noise_controller, args.seed) == (3, 0.7, True, 1)
    assert args.prompt is None and [p.text for p in args.prompts] == ["ink wash painting", "neon city"]
    assert [s.path.name for s in lora_specs(args)] == ["ink.safetensors", "oil.safetensors"]
    argv += ["--prompt", "a fox", "--lora", "x.safetensors:0.3", "--steps", "1"]
    args = apply_preset(build_parser(), argv, "v2v", path)
    assert args.prompt == "a fox" and args.steps == 1                       # explicit flags win ...
    assert [(s.path.name, s.strength) for s in lora_specs(args)] == [("x.safetensors", 0.3)]   # ... --lora too
    bench = apply_preset(build_parser(), ["bench", "--model", "m", "--preset", str(path)], "bench", path)
    assert bench.steps == 3 and bench.seed == 7 and len(lora_specs(bench)) == 2
    from wanstream.cli.bench import spec_from_args
    assert spec_from_args(bench).lora == lora_specs(bench)


def test_v2v_with_a_preset_equals_the_same_flags(tiny_model, tiny_model_dir, clip_path, tmp_path, capsys):
    """Same settings through a preset (with a LoRA beside it) or through flags: the same file, byte for byte."""
    lora = write_lora(random_lora(tiny_model.dit, ["blocks.0.attn1.to_q", "blocks.1.attn2.to_v"], seed=1,
                                  std=0.3), "wan", tmp_path / "styles", "ink")
    preset = write(tmp_path, {"prompt": "a watercolor", "steps": 1, "seed": 3, "noise_scale": 0.6,
                              "loras": [{"path": "styles/ink.safetensors", "strength": 0.5}]})
    common = ["v2v", str(clip_path), "--model", str(tiny_model_dir), "--device", "cpu"]
    assert main([*common, "-o", str(tmp_path / "preset.mp4"), "--preset", str(preset)]) == 0
    assert main([*common, "-o", str(tmp_path / "flags.mp4"), "--prompt", "a watercolor", "--steps", "1",
                 "--seed", "3", "--noise-scale", "0.6", "--lora", f"{lora}:0.5"]) == 0
    assert main([*common, "-o", str(tmp_path / "other.mp4"), "--preset", str(preset), "--seed", "4"]) == 0
    files = {n: (tmp_path / f"{n}.mp4").read_bytes() for n in ("preset", "flags", "other")}
    assert files["preset"] == files["flags"]
    assert files["other"] != files["preset"]                                 # the seed flag did win
    assert main([*common, "-o", str(tmp_path / "x.mp4"), "--preset", str(tmp_path / "nope.json")]) == 2
    assert "nope.json: cannot read preset" in capsys.readouterr().err
    assert main([*common, "-o", str(tmp_path / "x.mp4")]) == 2
    assert "give --prompt (or a --preset with a prompt)" in capsys.readouterr().err
