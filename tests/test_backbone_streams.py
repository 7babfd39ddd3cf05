"""Streams of Self-Forcing and LongLive on one engine: batched together each gives what it gives alone (latents
≤ 1e-5, frames within one level), for text-to-video and video-to-video, with a prompt switch in one of them; every
input frame gets one output frame."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kit import tap_latents

from wanstream.engine.loop import Engine
from wanstream.io.video import make_motion_clip

W, H = 80, 48
LATENT_TOL = 1e-5


def _prompt(i: int) -> torch.Tensor:
    return torch.randn(1, 9, 4096, generator=torch.Generator().manual_seed(200 + i)) * 0.1



# t2v: three clips; B joins two ticks late with 2 steps; C switches prompt at its 3rd block
T2V = {"A": dict(frames=45, steps=4, seed=1, start=0), "B": dict(frames=33, steps=2, seed=2, start=2),
       "C": dict(frames=57, steps=4, seed=3, start=0, switch=2)}
# v2v: three clips of input frames; B joins late, C switches prompt at tick 3
V2V = {"A": dict(frames=45, steps=2, seed=1, start=0), "B": dict(frames=33, steps=3, seed=2, start=1),
       "C": dict(frames=44, steps=2, seed=3, start=0, switch=3)}


def _run(model, mode: str, plan: dict, shared: bool, clips=None, recache: bool = False):
    one = Engine(model) if shared else None
    engines, streams, taps, fed = {}, {}, {}, {}
    out = {n: [] for n in plan}
    for tick in range(40):
        for i, (n, p) in enumerate(plan.items()):
            if tick == p["start"]:
                eng = engines[n] = one or Engine(model)
                if id(eng) not in taps:
                    tap_latents(eng, taps.setdefault(id(eng), {}))
                streams[n] = eng.open(prompt_embeds=_prompt(i), width=W, height=H, steps=p["steps"], seed=p["seed"],
                                      mode=mode, frames=p["frames"] if mode == "t2v" else None)
                fed[n] = 0
            s = streams.get(n)
            if s is None:
                continue
            if tick == p["start"] + p.get("switch", -1):
                engines[n].set_prompt_embedding(s, _prompt(9), recache=recache)
            if mode == "v2v" and fed[n] < p["frames"]:
                k = min(9 if fed[n] == 0 else 12, p["frames"] - fed[n])
                engines[n].feed(s, clips[i][fed[n]: fed[n] + k])
                fed[n] += k
                if fed[n] == p["frames"]:
                    engines[n].finish(s)
        for eng in {id(e): e for e in engines.values()}.values():
            eng.step()
        for n, s in streams.items():
            out[n] += [o for o in s.take_outputs()]
        all_fed = mode == "t2v" or all(fed[n] == p["frames"] for n, p in plan.items() if n in fed)
        if len(streams) == len(plan) and all_fed and not any(e.has_work() for e in engines.values()):
            break
    latents = {n: taps[id(engines[n])].get(streams[n].id, {}) for n in plan}
    return out, latents, engines, streams


def _compare(model, mode, plan, clips=None, recache=False):
    shared, shared_lat, engines, streams = _run(model, mode, plan, True, clips, recache)
    alone, alone_lat, alone_engines, _ = _run(model, mode, plan, False, clips, recache)
    for n, p in plan.items():
        assert not streams[n].error, streams[n].error
        assert [o.index for o in shared[n]] == list(range(p["frames"])) == [o.index for o in alone[n]], n
        assert sorted(shared_lat[n]) == sorted(alone_lat[n])
        worst = max((shared_lat[n][c] - alone_lat[n][c]).abs().max().item() for c in alone_lat[n])
        assert worst <= LATENT_TOL, (n, worst)
        diff = np.abs(np.stack([o.image for o in shared[n]]).astype(int)
                      - np.stack([o.image for o in alone[n]]).astype(int)).max()
        assert diff <= 1, (n, diff)
    engine = engines["A"]
    alone_calls = sum(e.dit_calls for e in {id(e): e for e in alone_engines.values()}.values())
    assert engine.dit_calls < 0.75 * alone_calls, (engine.dit_calls, alone_calls)      # they shared calls
    return shared, streams


@pytest.mark.parametrize("name", ["longlive", "self-forcing"])
def test_t2v_streams_batched_equal_each_alone(backbone_models, name):
    _compare(backbone_models[name], "t2v", T2V)


@pytest.mark.parametrize("name", ["longlive", "self-forcing"])
def test_v2v_streams_batched_equal_each_alone(backbone_models, name):
    clips = [make_motion_clip(60, W, H, seed=30 + i) for i in range(3)]
    _compare(backbone_models[name], "v2v", V2V, clips)


@pytest.mark.parametrize("name", ["longlive", "self-forcing", "streamdiffusionv2"])
def test_streams_with_a_recache_batched_equal_each_alone(backbone_models, tiny_model, name):
    """C switches prompt with a KV re-cache: the re-cache runs in its own call after the tick's outputs, is counted,
    and the streams still equal each alone; t2v and v2v (StreamDiffusionV2: v2v, its cache rows re-encoded at their
    levels after the stream batch drained)."""
    model = tiny_model if name == "streamdiffusionv2" else backbone_models[name]
    if name != "streamdiffusionv2":
        _, streams = _compare(model, "t2v", T2V, recache=True)
        assert streams["C"].stats.recaches == 1 and streams["A"].stats.recaches == 0
        assert streams["C"].stats.recache_frames == 6           # switch at block 2: frames 0..5 (window not full)
    clips = [make_motion_clip(60, W, H, seed=30 + i) for i in range(3)]
    _, streams = _compare(model, "v2v", V2V, clips, recache=True)
    assert streams["C"].stats.recaches == 1 and streams["B"].stats.recaches == 0


def test_streamdiffusionv2_ten_times_its_window_with_recaches(tiny_model):
    """StreamDiffusionV2 v2v over 10× its 6-frame window: RoPE wraps (50 → 5) as released, two re-caches; every
    input frame gets one output frame."""
    engine = Engine(tiny_model)
    frames = 5 + 4 * 59
    clip = make_motion_clip(frames, W, H, seed=5)
    s = engine.open(prompt_embeds=_prompt(0), width=W, height=H, steps=2)
    out = []
    for i in range(0, frames, 4):
        engine.feed(s, clip[i: i + 4])
        if i in (100, 200):
            engine.set_prompt_embedding(s, _prompt(i), recache=True)
        engine.step()
        out += s.take_outputs()
    engine.finish(s)
    engine.run_until_idle()
    out += s.take_outputs()
    assert not s.error and [o.index for o in out] == list(range(frames))
    assert s.stats.recaches == 2 and s.record.schedule.next_rope < 50


def test_cli_takes_every_backbone(tmp_path, capsys):
    """init-random / t2v (with a prompt switch) / v2v / bench on a LongLive folder; --backbone picks between two
    generators in one folder; download knows the repositories (offline: a clear error)."""
    import json

    from wanstream.cli.main import main
    from wanstream.io.video import probe_video, write_motion_clip
    root = tmp_path / "m"
    assert main(["init-random", str(root), "--backbone", "longlive"]) == 0
    out = tmp_path / "t2v.mp4"
    assert main(["t2v", "--model", str(root), "--prompt", "a fox", "--frames", "33", "--resolution", "80x48",
                 "-o", str(out), "--switch", "21:a cat"]) == 0
    assert probe_video(out).frames == 33
    clip = tmp_path / "in.mp4"
    write_motion_clip(clip, 30, 80, 48, fps=16)
    assert main(["v2v", str(clip), "--model", str(root), "--prompt", "a fox", "-o", str(tmp_path / "v.mp4")]) == 0
    assert probe_video(tmp_path / "v.mp4").frames == 30
    assert main(["bench", "--model", str(root), "--resolution", "80x48", "--frames", "57", "--warmup", "2",
                 "--no-peak", "--quiet", "--json", str(tmp_path / "b.json")]) == 0
    row = json.loads((tmp_path / "b.json").read_text())
    assert row["backbone"] == "longlive" and row["meta"]["backbone"] == "longlive"
    assert main(["init-random", str(root), "--backbone", "self-forcing"]) == 0
    capsys.readouterr()
    assert main(["t2v", "--model", str(root), "--prompt", "a", "--frames", "9", "--resolution", "80x48",
                 "-o", str(tmp_path / "x.mp4")]) == 2
    assert "several backbones" in capsys.readouterr().err
    assert main(["t2v", "--model", str(root), "--backbone", "self-forcing", "--prompt", "a", "--frames", "9",
                 "--resolution", "80x48", "-o", str(tmp_path / "x.mp4")]) == 0
    with pytest.raises(SystemExit):
        main(["t2v", "--model", str(root), "--backbone", "wan", "--prompt", "a", "-o", str(out)])
    capsys.readouterr()
    assert main(["download", "longlive-1.3b", "--dir", str(tmp_path / "dl")]) == 2
    assert "longlive_models/models/longlive_base.pt" in capsys.readouterr().err
