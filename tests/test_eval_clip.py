"""CLIP metrics on a tiny random-weight CLIP written in the real layout; segments; finding models offline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from eval_kit import write_random_clip, write_random_raft

from wanstream.core.errors import CheckpointError
from wanstream.eval.clip import load_clip
from wanstream.eval.metrics import (
    Segment,
    consecutive_consistency,
    drift_curve,
    drift_summary,
    segments,
    slope_per_100,
    text_image_scores,
)
from wanstream.eval.models import MissingModelError, find_clip, find_raft


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return write_random_clip(tmp_path_factory.mktemp("clip") / "clip-vit-base-patch32")


@pytest.fixture(scope="module")
def clip(clip_dir):
    return load_clip(clip_dir, batch=3)


def frames(n: int, seed: int = 0, h: int = 40, w: int = 56) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_image_and_text_embeddings_are_unit_rows(clip):
    img = clip.images(frames(7))                   # 3 batches of 3, 3, 1
    assert img.shape == (7, 16) and img.dtype == torch.float32
    assert torch.allclose(img.norm(dim=-1), torch.ones(7), atol=1e-5)
    txt = clip.text(["a watercolor painting", "a pencil sketch of a harbour"])
    assert txt.shape == (2, 16)
    assert torch.allclose(txt.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert not torch.allclose(txt[0], txt[1])
    # batching does not change an embedding
    assert torch.allclose(clip.images(frames(7)[4:5]), img[4:5], atol=1e-5)


def test_identical_frames_give_consistency_100_and_flat_drift(clip):
    same = np.repeat(frames(1), 6, axis=0)
    img = clip.images(same)
    assert consecutive_consistency(img) == pytest.approx([100.0] * 5, abs=1e-3)
    assert drift_curve(img, 2) == pytest.approx([100.0] * 6, abs=1e-3)


def test_clip_metric_ranges_and_segments(clip):
    img = clip.images(frames(8, seed=1))
    segs = segments([(0, "a watercolor painting"), (5, "a pencil sketch")], 8)
    txt = clip.text([s.prompt for s in segs])
    scores = text_image_scores(txt, img, segs)
    assert scores.shape == (8,) and ((scores >= -100) & (scores <= 100)).all()
    assert scores[6] == pytest.approx(float(img[6] @ txt[1]) * 100, abs=1e-4)     # the segment's own prompt
    assert scores[2] == pytest.approx(float(img[2] @ txt[0]) * 100, abs=1e-4)
    cons = consecutive_consistency(img)
    assert cons.shape == (7,) and ((cons >= -100) & (cons <= 100 + 1e-3)).all()
    assert cons.max() < 100 - 1e-3                   # different frames are not identical


def test_consistency_and_drift_on_known_vectors():
    e = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [-1.0, 0.0]]), dim=-1)
    assert consecutive_consistency(e) == pytest.approx([100 / 2 ** 0.5, 100 / 2 ** 0.5, 0.0], abs=1e-4)
    curve = drift_curve(e, ref_frames=1)
    assert curve == pytest.approx([100.0, 100 / 2 ** 0.5, 0.0, -100.0], abs=1e-4)
    summary = drift_summary(curve, 2)
    assert summary["value"] == pytest.approx(-50.0, abs=1e-4) and summary["min"] == pytest.approx(-100, abs=1e-4)
    assert slope_per_100([0.0, 1.0, 2.0]) == pytest.approx(100.0)


def test_segments_checks_the_schedule():
    assert segments([(0, "a"), (3, "b")], 5) == [Segment(0, 3, "a"), Segment(3, 5, "b")]
    with pytest.raises(ValueError, match="start at frame 0"):
        segments([(2, "a")], 5)
    with pytest.raises(ValueError, match="must increase"):
        segments([(0, "a"), (3, "b"), (3, "c")], 5)
    with pytest.raises(ValueError, match="only 5 frames"):
        segments([(0, "a"), (5, "b")], 5)
    with pytest.raises(ValueError, match="non-empty"):
        segments([(0, " ")], 5)


def test_find_models_in_the_download_layout_and_clear_errors(tmp_path, clip_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))        # an empty hub cache: nothing found there
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(MissingModelError, match=r"wanstream download clip --dir .*models.*--clip DIR"):
        find_clip(None, tmp_path / "models")
    with pytest.raises(MissingModelError, match=r"wanstream download raft --dir .*models.*--raft FILE"):
        find_raft(None, tmp_path / "models")
    with pytest.raises(MissingModelError, match="not a CLIP model folder"):
        find_clip(tmp_path)
    # the layout `wanstream download clip raft --dir models` writes
    import shutil
    shutil.copytree(clip_dir, tmp_path / "models" / "eval" / "clip-vit-base-patch32")
    folder, model_id = find_clip(None, tmp_path / "models")
    assert model_id == "openai/clip-vit-base-patch32" and folder.name == "clip-vit-base-patch32"
    raft_dir = tmp_path / "models" / "eval"
    (raft_dir / "raft_large_C_T_SKHT_V2-ff5fadd5.pth").write_bytes(b"x")
    path, raft_id = find_raft(None, tmp_path / "models")
    assert path.parent == raft_dir and raft_id == "torchvision/raft_large:C_T_SKHT_V2"
    # torch hub's cache is the second place looked at
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / "raft_large_C_T_SKHT_V2-ff5fadd5.pth").write_bytes(b"x")
    assert find_raft(None, tmp_path / "nowhere")[0].parent == hub
    assert find_raft(write_random_raft(tmp_path / "r"))[1].startswith("local:")


def test_download_is_offline_first(tmp_path, clip_dir, monkeypatch):
    """Already on disk (or in torch hub's cache): no network is touched."""
    from wanstream.eval.models import download_eval_model
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    import shutil
    shutil.copytree(clip_dir, tmp_path / "models" / "eval" / "clip-vit-base-patch32")
    logs = []
    assert download_eval_model("clip", tmp_path / "models", log=logs.append).name == "clip-vit-base-patch32"
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / "raft_large_C_T_SKHT_V2-ff5fadd5.pth").write_bytes(b"weights")
    target = download_eval_model("raft", tmp_path / "models", log=logs.append)
    assert target.read_bytes() == b"weights" and target.parent == tmp_path / "models" / "eval"
    assert "already" in logs[0] and "torch hub" in logs[1]
    with pytest.raises(ValueError, match="unknown evaluation model"):
        download_eval_model("dino", tmp_path)


def test_download_without_network_says_where_to_copy(tmp_path, monkeypatch):
    """The fetch itself is replaced by a failing one: no test traffic leaves the machine."""
    import urllib.error

    import huggingface_hub
    import torch.hub

    from wanstream.eval.models import download_eval_model
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_network(*args, **kwargs):
        partial = args[1] if len(args) > 1 else None
        if partial:                                  # torch.hub writes the partial file first
            open(partial, "wb").write(b"half")
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda *a, **k: no_network())
    with pytest.raises(RuntimeError, match=r"Without network access, copy https://download\.pytorch\.org/models/"
                                           r"raft_large_C_T_SKHT_V2-ff5fadd5\.pth to .*models/eval/"):
        download_eval_model("raft", tmp_path / "models", log=lambda *_: None)
    assert list((tmp_path / "models" / "eval").iterdir()) == []          # no partial file left behind
    with pytest.raises(RuntimeError, match=r"copy the files of openai/clip-vit-base-patch32 .* into .*models/eval/"
                                           r"clip-vit-base-patch32$"):
        download_eval_model("clip", tmp_path / "models", log=lambda *_: None)


def test_clip_loader_rejects_a_mismatched_checkpoint(tmp_path, clip_dir):
    import json
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(clip_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["projection_dim"] = 8
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="bad"):
        load_clip(bad)


def test_metric_code_does_not_import_the_streaming_engine():
    """Everything but the sweep scores files alone: no session, stream batch, DiT, VAE or loader imported."""
    import subprocess
    import sys
    code = ("import sys; import wanstream.cli.eval, wanstream.eval.evaluate, wanstream.eval.report; "
            "print(sorted(m for m in sys.modules if m.startswith('wanstream')))")
    mods = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = eval(mods)
    engine = [m for m in loaded if m.startswith(("wanstream.api", "wanstream.engine", "wanstream.models",
                                                 "wanstream.pipeline", "wanstream.server", "wanstream.eval.sweep"))]
    assert engine == [], engine
    assert "wanstream.eval.flow" in loaded and "wanstream.io.video" in loaded


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_embeddings_and_flow_match_the_cpu(clip_dir, tmp_path):
    from wanstream.eval.flow import load_raft
    x = frames(4, seed=3, h=64, w=96)
    cpu, gpu = load_clip(clip_dir), load_clip(clip_dir, device="cuda")
    assert torch.allclose(cpu.images(x), gpu.images(x), atol=1e-3)
    assert torch.allclose(cpu.text(["a dog"]), gpu.text(["a dog"]), atol=1e-3)
    path = write_random_raft(tmp_path)
    f_cpu = load_raft(path, iters=3).flow(x[:2], x[1:3])
    f_gpu = load_raft(path, iters=3, device="cuda").flow(x[:2], x[1:3])
    assert f_gpu.device.type == "cuda" and torch.allclose(f_cpu, f_gpu.cpu(), atol=1e-2)


def test_evaluate_aligns_the_pair_and_scores_with_given_motion(clip, tmp_path):
    """The whole scoring on arrays: a pan of 2 px per frame with its true flow gives warp error 0, a wrong flow
    does not; frame counts and sizes are aligned, with notes."""
    from wanstream.eval.evaluate import evaluate
    from wanstream.eval.flow import Motion, inside, load_raft
    raft = load_raft(write_random_raft(tmp_path), iters=1)
    base = frames(1, seed=5, h=32, w=48)[0]
    pan = np.stack([np.roll(base, 2 * i, axis=1) for i in range(6)])
    flow = torch.zeros(5, 2, 32, 48)
    flow[:, 0] = 2.0
    right = [Motion(0, flow, inside(flow))]
    wrong = [Motion(0, -flow, inside(-flow))]
    src = np.repeat(frames(1, seed=6, h=40, w=60), 7, axis=0)         # 7 frames, another size
    r = evaluate(src, pan, [(0, "a"), (3, "b")], clip, raft, motion=right, progress=False)
    assert r["frames"] == 6 and len(r["notes"]) == 2
    assert "input has 7 frames, output 6" in r["notes"][0] and "resized to the output size 48x32" in r["notes"][1]
    assert r["metrics"]["warp_error"]["value"] == pytest.approx(0.0, abs=1e-4)
    assert r["metrics"]["warp_error"]["valid_fraction"] == pytest.approx([46 / 48] * 5)
    assert [s["end"] for s in r["segments"]] == [3, 6]
    bad = evaluate(src, pan, [(0, "a")], clip, raft, motion=wrong, progress=False)
    assert bad["metrics"]["warp_error"]["value"] > 10
    with pytest.raises(ValueError, match="at least 2 frames"):
        evaluate(src[:1], pan, [(0, "a")], clip, raft, progress=False)
