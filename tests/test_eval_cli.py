"""``wanstream eval`` end to end on the demo's kind of output (tiny random model, synthetic motion clip), the
report opened in headless Chromium, and the command's clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from eval_browser import available, inspect_report
from eval_kit import write_random_clip, write_random_raft

from wanstream.cli.main import main

FRAMES = 17
PROMPT, PROMPT2, SWITCH = "a watercolor painting of a city street", "a pencil sketch", 9


@pytest.fixture(scope="module")
def eval_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_models")
    return write_random_clip(root / "clip"), write_random_raft(root)


@pytest.fixture(scope="module")
def demo_pair(tiny_model_dir, tmp_path_factory):
    """What `make demo` does, shorter: a motion clip restyled by the tiny random model."""
    work = tmp_path_factory.mktemp("demo")
    src, out = work / "input.mp4", work / "output.mp4"
    assert main(["clip", str(src), "--frames", str(FRAMES), "--resolution", "160x96", "--fps", "16"]) == 0
    assert main(["v2v", str(src), "-o", str(out), "--model", str(tiny_model_dir), "--prompt", PROMPT,
                 "--steps", "2", "--seed", "1", "--device", "cpu"]) == 0
    return src, out


@pytest.fixture(scope="module")
def evaluated(demo_pair, eval_models):
    src, out = demo_pair
    clip_dir, raft_file = eval_models
    rc = main(["eval", str(src), str(out), "--prompt", PROMPT, "--prompt-at", str(SWITCH), PROMPT2,
               "--clip", str(clip_dir), "--raft", str(raft_file), "--flow-updates", "2", "--device", "cpu",
               "--batch-size", "5", "--flow-batch", "6"])
    assert rc == 0
    return json.loads(out.with_suffix(".eval.json").read_text()), out.with_suffix(".eval.html")


def test_eval_writes_json_with_every_metric_its_definition_and_models(evaluated):
    result, html = evaluated
    assert result["schema"] == "wanstream-eval/1" and result["frames"] == FRAMES
    assert (result["width"], result["height"]) == (160, 96)
    m = result["metrics"]
    assert {k: m[k]["definition"] for k in m} == {"clip_score": "clip_score/1", "clip_consistency":
                                                  "clip_consistency/1", "warp_error": "warp_error/1",
                                                  "drift": "drift/1"}
    assert set(result["definitions"]) == {"clip_score/1", "clip_consistency/1", "warp_error/1", "drift/1"}
    assert m["clip_score"]["model"] == result["models"]["clip"]["id"]
    assert m["warp_error"]["model"] == result["models"]["raft"]["id"]
    assert result["models"]["raft"]["architecture"] == "torchvision raft_small"
    assert len(m["clip_score"]["per_frame"]) == FRAMES and len(m["drift"]["curve"]) == FRAMES
    assert len(m["clip_consistency"]["per_pair"]) == FRAMES - 1 and len(m["warp_error"]["per_pair"]) == FRAMES - 1
    # each summary is the mean of its series
    assert m["clip_score"]["value"] == pytest.approx(np.mean(m["clip_score"]["per_frame"]))
    assert m["clip_consistency"]["value"] == pytest.approx(np.mean(m["clip_consistency"]["per_pair"]))
    assert m["warp_error"]["value"] == pytest.approx(np.mean(m["warp_error"]["per_pair"]))
    assert m["drift"]["value"] == pytest.approx(np.mean(m["drift"]["curve"][-5:]))
    assert all(0 <= v <= 1 for v in m["warp_error"]["valid_fraction"])
    assert 0 < m["warp_error"]["value"] < 255 and -100 <= m["clip_score"]["value"] <= 100
    assert m["drift"]["curve"][0] <= 100 + 1e-6
    segs = result["segments"]
    assert [(s["start"], s["end"], s["prompt"]) for s in segs] == [(0, SWITCH, PROMPT), (SWITCH, FRAMES, PROMPT2)]
    # per segment: the mean over the segment's own frames / pairs
    assert segs[1]["clip_score"] == pytest.approx(np.mean(m["clip_score"]["per_frame"][SWITCH:]))
    assert segs[0]["warp_error"] == pytest.approx(np.mean(m["warp_error"]["per_pair"][:SWITCH - 1]))
    assert result["input"]["frames_read"] == result["output"]["frames_read"] == FRAMES
    assert html.is_file() and html.stat().st_size > 10_000


def test_report_renders_in_headless_chromium(evaluated, tmp_path):
    reason = available()
    if reason:
        pytest.skip(reason)
    _, html = evaluated
    shot = tmp_path / "eval_report.png"            # the screenshot stays in the pytest tmp dir as an artefact
    r = inspect_report(html, shot)
    assert r["page_errors"] == []
    # self-contained: the page itself and inline data only
    assert all(u.startswith(("file:", "data:")) for u in r["requests"]), r["requests"]
    plots = {p["name"]: p for p in r["plots"]}
    assert set(plots) == {"clip_score", "clip_consistency", "warp_error", "drift"}
    expected = {"clip_score": FRAMES, "drift": FRAMES, "clip_consistency": FRAMES - 1, "warp_error": FRAMES - 1}
    for name, p in plots.items():
        assert p["width"] > 300 and p["height"] > 150, p
        (series,) = p["series"]
        assert series["points"] == expected[name]
        assert series["length"] > 100 and series["bboxW"] > 0.5 * p["width"], (name, series)
        assert p["vlines"] == 1                                      # the prompt change is marked
    frames = [i for i in r["images"] if i["alt"].startswith(("input", "output"))]
    assert len(frames) == 16 and all(i["complete"] and i["naturalWidth"] == 160 and i["shownWidth"] > 50
                                     for i in frames)
    assert set(r["values"]) == {"clip_score", "clip_consistency", "warp_error", "drift"}
    assert shot.is_file() and shot.stat().st_size > 20_000


def test_eval_errors_are_clear(demo_pair, eval_models, tmp_path, monkeypatch, capsys):
    src, out = demo_pair
    clip_dir, raft_file = eval_models
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cases = [
        (["eval", str(src), str(out), "--prompt", "x", "--models", str(tmp_path / "m")],
         "wanstream download clip --dir"),
        (["eval", str(src), str(out), "--prompt", "x", "--models", str(tmp_path / "m"), "--clip", str(clip_dir)],
         "wanstream download raft --dir"),
        (["eval", str(src), str(tmp_path / "missing.mp4"), "--prompt", "x"], "missing.mp4: video file not found"),
        (["eval", str(src), str(out)], "--prompt is required"),
        (["eval", str(src), str(out), "--prompt", "x", "--prompt-at", "two", "y"], "integer frame"),
        (["eval", str(src), str(out), "--prompt", "x", "--prompt-at", str(FRAMES), "y", "--clip", str(clip_dir),
          "--raft", str(raft_file), "--flow-updates", "1", "--device", "cpu"], f"only {FRAMES} frames"),
        (["eval", str(src)], "give INPUT and OUTPUT"),
        (["eval", str(src), str(out), "--sweep", str(tmp_path / "s.toml")], "not both"),
        (["eval", "--sweep", str(tmp_path / "s.toml")], "s.toml: cannot read the sweep config"),
        (["eval", str(src), str(out), "--prompt", "x", "--json", str(src)],          # a report over a video
         f"refusing to write {src}: it is the input {src}"),
        (["eval", str(src), str(out), "--prompt", "x", "--html", str(out)], f"refusing to write {out}"),
    ]
    kept = src.read_bytes(), out.read_bytes()
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "wanstream eval: error:" in err and message in err, (argv, err)
    assert (src.read_bytes(), out.read_bytes()) == kept
