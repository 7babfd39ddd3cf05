"""``wanstream eval --sweep`` on the tiny preset on the CPU, and the sweep config's checks."""

from __future__ import annotations

import json

import pytest
from eval_kit import write_random_clip, write_random_raft

from wanstream.cli.main import main
from wanstream.eval.sweep import load_config, render_table, slug

FRAMES = 13


def write_config(path, model, clip, extra_settings: str = "") -> None:
    path.write_text(f"""
model = "{model}"
device = "cpu"
resolution = "64x64"
seed = 3
prime_frames = 5

[defaults]
steps = 2

[[clips]]
path = "{clip.name}"
prompt = "a watercolor painting"
prompts = [[8, "a pencil sketch"]]

[[settings]]
name = "SDV2 2 steps"

[[settings]]
name = "1 step"
steps = 1

[[settings]]
name = "no sink, fixed noise"
sink_refresh = false
noise_controller = false
cache = {{capacity = 4, sink = 2}}

[[settings]]
name = "fp8"
quantize = "fp8"
{extra_settings}""")


@pytest.fixture(scope="module")
def sweep(tiny_model_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("sweep")
    clip = work / "motion.mp4"
    assert main(["clip", str(clip), "--frames", str(FRAMES), "--resolution", "64x64"]) == 0
    write_config(work / "sweep.toml", tiny_model_dir, clip,
                 '\n[[settings]]\nname = "taehv"\nencoder = "taehv"\ndecoder = "taehv"\n')
    out = work / "out"
    rc = main(["eval", "--sweep", str(work / "sweep.toml"), "--out", str(out), "--device", "cpu",
               "--clip", str(write_random_clip(work / "clip")), "--raft", str(write_random_raft(work)),
               "--flow-updates", "1"])
    assert rc == 0
    return out, json.loads((out / "sweep.json").read_text())


def test_sweep_writes_the_table_in_table1_layout(sweep):
    out, result = sweep
    table = (out / "table.md").read_text()
    lines = table.splitlines()
    head = next(line for line in lines if line.startswith("| Metric |"))
    assert head == "| Metric | SDV2 2 steps | 1 step | no sink, fixed noise | fp8 | taehv |"
    for label in ("CLIP Score / Temporal CLIP ↑", "Warp Error ↓", "Text–Image CLIP ↑", "FPS ↑"):
        row = next(line for line in lines if line.startswith(f"| {label} |"))
        cells = [c.strip() for c in row.strip("|").split("|")][1:]
        assert cells[3] == "skipped"                                   # fp8: no FP8 GPU here
        assert all(float(c) == float(c) for i, c in enumerate(cells) if i != 3), row
    assert "Skipped **fp8**: quantization ('fp8') cannot run here" in table
    assert (out / "sweep.html").is_file() and "<svg" in (out / "sweep.html").read_text()


def test_sweep_rows_carry_quality_fps_and_their_settings(sweep):
    out, result = sweep
    rows = {r["name"]: r for r in result["rows"]}
    assert rows["fp8"]["skipped"] and rows["fp8"]["fps"] is None
    ran = [r for r in result["rows"] if r["skipped"] is None]
    assert len(ran) == 4
    for r in ran:
        assert r["fps"] > 0 and all(v is not None for v in r["metrics"].values()), r
        assert len(r["clips"]) == 1
        folder = out / slug(r["name"])
        assert (folder / "motion.mp4").is_file() and (folder / "motion.eval.html").is_file()
        per_clip = json.loads((folder / "motion.eval.json").read_text())
        assert per_clip["frames"] == FRAMES and [s["start"] for s in per_clip["segments"]] == [0, 8]
        assert per_clip["metrics"]["warp_error"]["value"] == pytest.approx(r["metrics"]["warp_error"])
    assert rows["1 step"]["steps"] == 1 and rows["SDV2 2 steps"]["steps"] == 2
    nosink = rows["no sink, fixed noise"]
    assert not nosink["sink_refresh"] and not nosink["noise_controller"] and nosink["cache"] == "4/2"
    assert rows["taehv"]["decoder"] == rows["taehv"]["encoder"] == "taehv"                 # TAEHV at both ends
    # the settings really ran differently: different outputs, different scores
    assert len({round(r["metrics"]["warp_error"], 6) for r in ran}) == len(ran)
    # the flow of the input is computed once per clip and shared; the table matches the JSON
    assert render_table(result) == (out / "table.md").read_text()


@pytest.mark.parametrize("snippet, message", [
    ('[[settings]]\nname = "x"\nsteps = 7\n', "steps must be in 1..4"),
    ('[[settings]]\nname = "x"\nquantise = "fp8"\n', "unknown key(s) 'quantise'"),
    ('[[settings]]\nname = "x"\ncache = {capacity = 3, sink = 3}\n', "cache sink frames must be in [0, capacity=3)"),
    ('[[settings]]\nname = "x"\ncache = {size = 3}\n', "cache: unknown key(s) 'size'"),
    ('[[settings]]\nname = "x"\ndecoder = "vqgan"\n', "decoder must be 'vae' or 'taehv'"),
    ('[[settings]]\nname = "x"\nencoder = "vqgan"\n', "encoder must be 'vae' or 'taehv'"),
    ('[[settings]]\nname = "1 step"\n', "setting names must be unique as file names, clashing: 1 step"),
    ('[[settings]]\nname = "1/step"\n', "clashing: 1 step, 1/step"),
    ('[[settings]]\nsteps = 2\n', "needs a non-empty 'name'"),
    ('[[settings]]\nname = "x"\nbatch = "yes"\n', "'batch' has the wrong type"),
])
def test_sweep_config_errors_name_the_key(tmp_path, snippet, message):
    write_config(tmp_path / "s.toml", tmp_path, tmp_path / "c.mp4", "\n" + snippet)
    with pytest.raises(ValueError, match=r"s\.toml: settings\[4\]|s\.toml: setting names") as err:
        load_config(tmp_path / "s.toml")
    assert message in str(err.value)


def test_sweep_config_top_level_and_clip_errors(tmp_path):
    (tmp_path / "a.toml").write_text('model = "m"\nclips = []\nsettings = [{name = "x"}]\n')
    with pytest.raises(ValueError, match="'clips' must be a non-empty list"):
        load_config(tmp_path / "a.toml")
    (tmp_path / "b.json").write_text('{"model": "m", "clips": [{"path": "c.mp4", "prompt": "p", '
                                     '"prompts": [[0, "q"]]}], "settings": [{"name": "x"}]}')
    with pytest.raises(ValueError, match=r"clips\[0\]: 'prompts' must be a list of \[frame > 0"):
        load_config(tmp_path / "b.json")
    (tmp_path / "c.toml").write_text('model = "m"\nmodle = 1\n')
    with pytest.raises(ValueError, match="unknown key.*'modle'"):
        load_config(tmp_path / "c.toml")
    (tmp_path / "d.toml").write_text('model = "m"\n[[clips]\n')
    with pytest.raises(ValueError, match="d.toml: not valid TOML"):
        load_config(tmp_path / "d.toml")
    write_config(tmp_path / "e.toml", tmp_path / "model", tmp_path / "clip.mp4")
    cfg = load_config(tmp_path / "e.toml")
    assert cfg.clips[0].path == (tmp_path / "clip.mp4").resolve()            # relative to the config file
    assert cfg.clips[0].prompts == [(0, "a watercolor painting"), (8, "a pencil sketch")]
    assert [s.steps for s in cfg.settings] == [2, 1, 2, 2]                   # defaults apply, settings win
    assert cfg.settings[2].cache_config().sink_threshold == -1.0
    assert cfg.settings[2].cache_config().capacity == 4


def test_sweep_setting_turns_the_drift_watchdog_on(tmp_path, tiny_model):
    """``drift_watchdog = true``: the setting's stream runs with the online watchdog (engine/drift.py), so a sweep
    compares it on and off; the table shows the knob."""
    from wanstream.eval.sweep import _session
    clip = tmp_path / "c.mp4"
    clip.write_bytes(b"")
    cfg_path = tmp_path / "sweep.toml"
    write_config(cfg_path, tmp_path, clip, '\n[[settings]]\nname = "watchdog"\ndrift_watchdog = true\n')
    settings = {s.name: s for s in load_config(cfg_path).settings}
    assert settings["watchdog"].drift_watchdog and not settings["1 step"].drift_watchdog
    assert settings["watchdog"].columns()["drift_watchdog"] is True
    with _session(tiny_model, settings["watchdog"], "a watercolor painting", 64, 64, 0) as s:
        assert s.engine.drift is not None and s.stream.drift is not None
    with _session(tiny_model, settings["1 step"], "a watercolor painting", 64, 64, 0) as s:
        assert s.engine.drift is None and s.stream.drift is None
