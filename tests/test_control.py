"""Control video for VACE: the preprocessors (Canny in torch, Depth Anything V2 and RAFT with tiny random weights),
live switches of kind and strength on a stream sharing calls with a plain one, an external control video, and the
error a missing model gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wanstream.engine.control import ControlModelMissing, Preprocessors, canny
from wanstream.engine.loop import Engine
from wanstream.io.video import make_motion_clip

W, H = 80, 48


@pytest.fixture(scope="module")
def vace_model(tmp_path_factory):
    from wanstream.models.loader import load_model
    from wanstream.models.random_init import init_random
    root = tmp_path_factory.mktemp("vace_control")
    init_random(root, "tiny", seed=0, log=lambda *_: None, vace=True)
    return load_model(root, device="cpu", text_encoder=False)


def tiny_depth():
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config
    torch.manual_seed(0)
    bb = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=56,
                      patch_size=14, out_features=["stage1", "stage2", "stage3", "stage4"], reshape_hidden_states=False)
    cfg = DepthAnythingConfig(backbone_config=bb, reassemble_hidden_size=32, neck_hidden_sizes=[8, 16, 16, 32],
                              fusion_hidden_size=16, head_hidden_size=8)
    return DepthAnythingForDepthEstimation(cfg).eval()


def tiny_pose():
    from torchvision.models.detection import keypointrcnn_resnet50_fpn
    torch.manual_seed(0)
    net = keypointrcnn_resnet50_fpn(weights=None, weights_backbone=None).eval()
    with torch.no_grad():                  # every proposal a confident person, so skeletons are drawn
        net.roi_heads.box_predictor.cls_score.bias[1] = 20.0
    net.roi_heads.detections_per_img = 2
    return net


def tiny_raft():
    from torchvision.models.optical_flow import raft_small
    torch.manual_seed(0)
    return raft_small(weights=None).eval()


def _prompt(i: int) -> torch.Tensor:
    return torch.randn(1, 9, 4096, generator=torch.Generator().manual_seed(300 + i)) * 0.1


def test_canny_finds_the_outline_of_a_square():
    img = -torch.ones(1, 3, 32, 32)
    img[:, :, 8:24, 8:24] = 1
    e = canny(img)[0, 0]
    assert e.shape == (32, 32) and set(e.unique().tolist()) <= {0.0, 1.0}
    assert e[6:10, 8:24].sum() >= 14 and e[8:24, 6:10].sum() >= 14          # the border is found
    assert e[12:20, 12:20].sum() == 0 and e[:4, :].sum() == 0              # not inside, not in the flat outside


def test_preprocessors_batch_across_streams(vace_model):
    pre = Preprocessors(vace_model, depth=tiny_depth(), flow=tiny_raft(), flow_updates=2, pose=tiny_pose())
    torch.manual_seed(1)
    a, b = torch.rand(2, 3, H, W) * 2 - 1, torch.rand(2, 3, H, W) * 2 - 1
    drawn = pre.run("pose", [b], [None])[0]
    assert drawn.shape == b.shape and (drawn > -1).any()               # a skeleton on black
    for kind in ("edges", "depth", "flow", "pose"):
        prev = [None, torch.rand(3, H, W) * 2 - 1]
        both = pre.run(kind, [a, b], prev)
        alone = pre.run(kind, [b], prev[1:])[0]
        assert [t.shape for t in both] == [a.shape, b.shape]
        assert both[1].min() >= -1 and both[1].max() <= 1
        tol = 1.01 / 127.5 if kind == "flow" else 1e-4            # flow colours are uint8: one level
        assert (both[1] - alone).abs().max() <= tol, kind


def test_missing_depth_weights_name_the_download(vace_model):
    eng = Engine(vace_model)
    s = eng.open(prompt_embeds=_prompt(0), width=W, height=H, steps=1)
    with pytest.raises(ControlModelMissing, match="wanstream download depth-anything"):
        eng.set_conditioning(s, control="depth")
    with pytest.raises(ControlModelMissing, match="wanstream download raft"):
        eng.set_conditioning(s, control="flow")
    with pytest.raises(ControlModelMissing, match="wanstream download pose"):
        eng.set_conditioning(s, control="pose")
    with pytest.raises(ValueError, match="control must be one of"):
        eng.set_conditioning(s, control="scribble")


def test_live_control_switches_while_sharing_calls_with_a_plain_stream(vace_model):
    """One stream goes edges → depth (strength 0.5) → video → flow → none while another runs plain in the same
    calls: every frame comes out, the plain stream equals itself alone, control changes the output and is timed."""
    clips = [make_motion_clip(25, W, H, seed=40 + i) for i in range(2)]
    eng = Engine(vace_model)
    eng._preprocessors = Preprocessors(vace_model, depth=tiny_depth(), flow=tiny_raft(), flow_updates=2)
    ctl = eng.open(prompt_embeds=_prompt(0), width=W, height=H, steps=2, seed=1)
    plain = eng.open(prompt_embeds=_prompt(1), width=W, height=H, steps=2, seed=2)
    alone_eng = Engine(vace_model)
    alone = alone_eng.open(prompt_embeds=_prompt(1), width=W, height=H, steps=2, seed=2)
    reference_free = Engine(vace_model)
    free = reference_free.open(prompt_embeds=_prompt(0), width=W, height=H, steps=2, seed=1)
    video = [np.full((H, W, 3), v, np.uint8) for v in range(0, 250, 25)]
    switches = {0: dict(control="edges"), 1: dict(control="depth", strength=0.5), 2: dict(control="video",
                control_video=video), 3: dict(control="flow"), 4: dict(control="none")}
    fed, tick, sections = 0, 0, set()
    while fed < 25:
        k = 5 if fed == 0 else 4
        if tick in switches:
            eng.set_conditioning(ctl, **switches[tick])
        for e, s, clip in ((eng, ctl, clips[0]), (eng, plain, clips[1]), (alone_eng, alone, clips[1]),
                           (reference_free, free, clips[0])):
            e.feed(s, clip[fed: fed + k])
        fed += k
        tick += 1
        for e in (eng, alone_eng, reference_free):
            e.step()
        for _, secs in eng.timer.ticks():
            sections |= set(secs)
    for e, s in ((eng, ctl), (eng, plain), (alone_eng, alone), (reference_free, free)):
        e.finish(s)
        e.run_until_idle(100)
    out = {n: np.stack([o.image for o in s.take_outputs()]) for n, s in
           (("ctl", ctl), ("plain", plain), ("alone", alone), ("free", free))}
    assert not ctl.error and all(len(v) == 25 for v in out.values())
    assert np.abs(out["plain"].astype(int) - out["alone"].astype(int)).max() <= 1
    assert np.abs(out["ctl"].astype(int) - out["free"].astype(int)).max() > 5           # control steers
    assert eng.rows_run / eng.dit_calls > 1.5                                           # shared calls
    assert {"control", "control_encode"} <= sections
    st = eng.groups[next(iter(eng.groups))].runner.streams[ctl.id].vace
    assert st.control.kind == "none" and not st.active


def test_eval_scores_reference_similarity_and_control_adherence(tmp_path, vace_model):
    """``wanstream eval --reference IMG --control-adherence``: the scores and their definitions in the JSON; an
    output that is its input has edge adherence 1 and depth adherence 1; a reference equal to every frame scores
    100; without a depth model the result says how to get one."""
    import json

    from eval_kit import write_random_clip, write_random_raft
    from PIL import Image

    from wanstream.cli.main import main
    from wanstream.eval.conditioning import depth_correlation, edge_f1
    src = tmp_path / "in.mp4"
    assert main(["clip", str(src), "--frames", "9", "--resolution", "160x96", "--fps", "16"]) == 0
    clip_dir, raft = write_random_clip(tmp_path / "clip"), write_random_raft(tmp_path)
    ref = tmp_path / "ref.png"
    Image.fromarray(np.full((96, 160, 3), 90, np.uint8)).save(ref)
    out_json = tmp_path / "e.json"
    assert main(["eval", str(src), str(src), "--prompt", "x", "--clip", str(clip_dir), "--raft", str(raft),
                 "--flow-updates", "2", "--device", "cpu", "--json", str(out_json), "--html",
                 str(tmp_path / "e.html"), "--reference", str(ref), "--control-adherence",
                 "--models", str(tmp_path / "none")]) == 0
    result = json.loads(out_json.read_text())
    m = result["metrics"]
    assert m["edge_adherence"]["value"] == pytest.approx(1.0)
    assert -100 <= m["reference_similarity"]["value"] <= 100 and len(m["reference_similarity"]["per_frame"]) == 9
    assert {"reference_similarity/1", "edge_adherence/1"} <= set(result["definitions"])
    assert any("wanstream download depth-anything" in n for n in result["notes"])
    frames = make_motion_clip(4, 96, 64, seed=3)
    flat = np.full_like(frames, 120)                       # an output that lost every edge
    assert edge_f1(frames, flat)[0] == 0.0 and edge_f1(flat, flat)[0] is None
    class Luma(torch.nn.Module):             # a stand-in depth model: brightness as depth (not constant)
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, pixel_values):
            from types import SimpleNamespace
            return SimpleNamespace(predicted_depth=pixel_values.mean(1) * self.w)
    assert depth_correlation(frames, frames, Luma())[0] == pytest.approx(1.0, abs=1e-5)
    assert depth_correlation(frames, 255 - frames, Luma())[0] == pytest.approx(-1.0, abs=1e-4)


def test_control_encodes_of_several_streams_share_a_vae_call_and_equal_each_alone(vace_model, monkeypatch):
    clips = [make_motion_clip(13, W, H, seed=60 + i) for i in range(2)]
    calls = []
    original = type(vace_model.vae).encode_many

    def counted(self, states, frames, *a, **k):
        calls.append(len(states))
        return original(self, states, frames, *a, **k)
    monkeypatch.setattr(type(vace_model.vae), "encode_many", counted)

    def run(names):
        eng = Engine(vace_model, batch_vae=True)
        lat = {}
        original_decode = eng.codec.decode

        def tap(finished):
            for sid, items in finished.items():
                for _, d in items:
                    lat.setdefault(sid, {})[d.row.chunk] = d.latent.clone()
            return original_decode(finished)
        eng.codec.decode = tap
        streams = []
        for i in names:
            s = eng.open(prompt_embeds=_prompt(i), width=W, height=H, steps=2, seed=i)
            eng.set_conditioning(s, control="edges")
            streams.append(s)
        fed = 0
        while fed < 13:
            k = 5 if fed == 0 else 4
            for i, s in zip(names, streams):
                eng.feed(s, clips[i][fed: fed + k])
            fed += k
            eng.step()
        for s in streams:
            eng.finish(s)
        eng.run_until_idle(100)
        return [lat[s.id] for s in streams]
    together = run([0, 1])
    shared = calls.count(2)
    alone = [run([0])[0], run([1])[0]]
    assert shared == 6                      # 3 chunks: per chunk one call for both streams' frames, one for controls
    for a, b in zip(together, alone):
        assert max((a[c] - b[c]).abs().max().item() for c in b) <= 1e-5
