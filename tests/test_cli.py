"""Command line: v2v / t2v end to end on the tiny model, and one clear error line for bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from wanstream.cli.main import main
from wanstream.io.video import probe_video, read_video


def test_v2v_end_to_end_keeps_count_and_fps(tiny_model_dir, clip_path, tmp_path):
    out = tmp_path / "out.mp4"
    proc = subprocess.run([sys.executable, "-m", "wanstream.cli", "v2v", str(clip_path), "-o", str(out),
                           "--model", str(tiny_model_dir), "--prompt", "a watercolor", "--steps", "2",
                           "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert "frames 14" in last and "FPS" in last and "time to first frame" in last
    info = probe_video(out)
    frames, fps = read_video(out)
    assert len(frames) == 14 and abs(fps - 12.5) < 1e-3 and (info.width, info.height) == (80, 48)


def test_v2v_options_and_resolution(tiny_model_dir, clip_path, tmp_path, capsys):
    out = tmp_path / "o.mp4"
    code = main(["v2v", str(clip_path), "-o", str(out), "--model", str(tiny_model_dir), "--prompt", "x",
                 "--steps", "3", "--no-batch", "--no-noise-controller", "--noise-scale", "0.7", "--seed", "3",
                 "--resolution", "64x32", "--device", "cpu"])
    assert code == 0
    frames, _ = read_video(out)
    assert frames.shape == (14, 32, 64, 3)


def test_t2v_cli(tiny_model_dir, tmp_path):
    out = tmp_path / "t.mp4"
    assert main(["t2v", "--prompt", "a fox", "--frames", "10", "-o", str(out), "--model", str(tiny_model_dir),
                 "--resolution", "64x48", "--steps", "1", "--device", "cpu"]) == 0
    assert len(read_video(out)[0]) == 10


@pytest.mark.parametrize("case", ["missing", "not_video", "bad_model", "steps", "resolution", "noise"])
def test_bad_input_gives_one_error_line(case, tiny_model_dir, clip_path, tmp_path, capsys):
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    args = {"missing": [str(tmp_path / "nope.mp4"), "--model", str(tiny_model_dir)],
            "not_video": [str(text), "--model", str(tiny_model_dir)],
            "bad_model": [str(clip_path), "--model", str(tmp_path)],
            "steps": [str(clip_path), "--model", str(tiny_model_dir), "--steps", "5"],
            "resolution": [str(clip_path), "--model", str(tiny_model_dir), "--resolution", "50x30"],
            "noise": [str(clip_path), "--model", str(tiny_model_dir), "--noise-scale", "2"]}[case]
    try:
        code = main(["v2v", *args, "-o", str(tmp_path / "o.mp4"), "--prompt", "x", "--device", "cpu"])
    except SystemExit as exc:   # argparse rejects bad option values itself
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith(("wanstream v2v: error:", "wanstream v2v: error", "usage:")) or \
        "error:" in err.splitlines()[-1]
    expected = {"missing": "nope.mp4", "not_video": "notes.mp4", "bad_model": "no Wan 2.1 model",
                "steps": "1..4", "resolution": "16", "noise": "(0, 1]"}[case]
    assert expected in err


def test_outputs_and_device_are_checked_before_anything_loads(tiny_model_dir, clip_path, tmp_path, capsys,
                                                              monkeypatch):
    """-o naming a folder or lacking a video extension, and --device cuda without CUDA: one line each, before the
    model loads (the loader is replaced by one that fails the test), nothing written."""
    import torch

    import wanstream.models.loader as loader

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(loader, "load_model", no_load)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "folder").mkdir()
    model = ["--model", str(tiny_model_dir), "--prompt", "x"]
    frames = [tmp_path / f"f{i}.png" for i in range(3)]
    cases = [
        (["v2v", str(clip_path), "-o", str(tmp_path / "folder"), *model], "is a folder: give -o/--output a file name"),
        (["v2v", str(clip_path), "-o", str(tmp_path / "styled"), *model], "needs a video file extension"),
        (["v2v", str(clip_path), "-o", str(tmp_path / "s.webm"), *model], "got '.webm'"),
        (["v2v", str(clip_path), "-o", str(tmp_path / "s.mp4"), *model, "--device", "cuda"],
         "--device cuda: CUDA is not available here (torch.cuda.is_available() is False); use --device cpu"),
        (["v2v", *map(str, frames), "-o", str(tmp_path / "s.mp4"), *model], "give its folder or a quoted pattern"),
        (["t2v", "-o", str(tmp_path / "folder"), *model], "is a folder"),
        (["t2v", "-o", str(tmp_path / "t.mp4"), *model, "--device", "cuda:0"], "CUDA is not available"),
        (["clip", str(tmp_path / "c.gif")], "OUTPUT needs a video file extension"),
    ]
    before = sorted(tmp_path.rglob("*"))
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, (argv, err)
    assert sorted(tmp_path.rglob("*")) == before


def _offline_env(tmp_path, port: int, **extra) -> dict:
    """No way out: the hub endpoint and every proxy point at a loopback port, no cache holds a model."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "hf_hub_offline")}
    url = f"http://127.0.0.1:{port}"
    env.update(HF_ENDPOINT=url, HTTP_PROXY=url, HTTPS_PROXY=url, http_proxy=url, https_proxy=url,
               HF_HUB_CACHE=str(tmp_path / "hf"), HF_HOME=str(tmp_path / "hf-home"), TORCH_HOME=str(tmp_path / "th"),
               HF_HUB_DISABLE_TELEMETRY="1", **extra)
    return env


def _download(tmp_path, name, env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wanstream.cli", "download", name, "--dir", str(tmp_path / "models")],
                          capture_output=True, text=True, timeout=120, env=env)


def _closed_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("name", ["sdv2-1.3b", "sdv2-14b", "clip", "raft"])
def test_download_without_network_is_one_line(name, tmp_path):
    """Every target, the network unreachable (a closed loopback port): exit 2, one line saying what to do, no
    partial file. (``clip`` used to retry for ~25 s and print a 60-line traceback.)"""
    proc = _download(tmp_path, name, _offline_env(tmp_path, _closed_port()))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("wanstream download: error: cannot ") and "copy" in lines[0], lines[0]
    assert "refused" in lines[0].lower()
    models = tmp_path / "models"
    assert not models.exists() or not [p for p in models.rglob("*") if p.is_file()]


def test_download_asks_the_silent_hub_once_within_its_timeout(tmp_path):
    """A network that accepts but never answers: one request, given up after HF_HUB_ETAG_TIMEOUT, no retries."""
    import socket
    import threading
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted = []

    def accept():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            accepted.append(conn)                   # kept open, never answered
    threading.Thread(target=accept, daemon=True).start()
    try:
        proc = _download(tmp_path, "clip", _offline_env(tmp_path, server.getsockname()[1], HF_HUB_ETAG_TIMEOUT="1"))
    finally:
        server.close()
        for conn in accepted:
            conn.close()
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Timeout" in lines[0], proc.stderr
    assert len(accepted) == 1


def test_download_with_hf_hub_offline_touches_no_network(tmp_path):
    env = _offline_env(tmp_path, _closed_port(), HF_HUB_OFFLINE="1")
    for name in ("sdv2-1.3b", "clip"):
        proc = _download(tmp_path, name, env)
        assert proc.returncode == 2 and "HF_HUB_OFFLINE is set" in proc.stderr and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


def test_v2v_twice_gives_the_same_file(tiny_model_dir, clip_path, tmp_path):
    """Same seed + input + device → the same mp4 bytes, from two separate processes."""
    outs = [tmp_path / "a.mp4", tmp_path / "b.mp4"]
    for out in outs:
        proc = subprocess.run([sys.executable, "-m", "wanstream.cli", "v2v", str(clip_path), "-o", str(out),
                               "--model", str(tiny_model_dir), "--prompt", "a watercolor", "--seed", "5",
                               "--resolution", "64x48", "--fit", "pad", "--device", "cpu"],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
    assert outs[0].read_bytes() == outs[1].read_bytes()
    assert read_video(outs[0])[0].shape == (14, 48, 64, 3)


def yuv420_round_trip_bound(rgb_levels: int = 1) -> int:
    """How far two RGB frames that differ by at most ``rgb_levels`` per value can differ once each went through the
    writer's yuv420p (BT.601, limited range: swscale's default) and back, with lossless H.264 (crf 0) between.

    Forward, a channel of Y, U or V is a weighted sum of R, G, B (U and V also averaged over 2x2 pixels: weights
    summing to 1), so it moves by at most ``sum |coefficients| * rgb_levels`` before rounding, and one level more
    after (rounding can turn any difference into the next integer). Back, R, G, B are weighted sums of Y, U, V
    (chroma interpolated: weights summing to 1): the same again. For one level: Y, U, V move by 1, then blue by
    1.164 + 2.017 = 3.18 → 4 levels (red 3, green 3)."""
    to_yuv = np.array([[0.257, 0.504, 0.098], [-0.148, -0.291, 0.439], [0.439, -0.368, -0.071]])
    to_rgb = np.array([[1.164, 0.0, 1.596], [1.164, -0.392, -0.813], [1.164, 2.017, 0.0]])
    yuv = np.floor(np.abs(to_yuv).sum(axis=1) * rgb_levels) + 1
    return int((np.floor(np.abs(to_rgb) @ yuv) + 1).max())


def _three_clips(tmp_path):
    from wanstream.io.video import write_motion_clip
    return [write_motion_clip(tmp_path / "a.mp4", 14, 80, 48, 12.5),
            write_motion_clip(tmp_path / "b.mp4", 21, 80, 48, 16.0),
            write_motion_clip(tmp_path / "c.mp4", 9, 64, 48, 10.0)]


def test_batched_files_equal_separate_runs_before_encoding(tiny_model, tmp_path, monkeypatch):
    """Three files (different lengths, one of another size) as concurrent streams of one engine: the frames handed
    to each writer are those of the file restyled alone, up to one level. Batched and single DiT calls differ only
    in the order of float sums (a difference far below one level: mean 1e-4 levels measured), and rounding to
    uint8 turns a difference below one level into at most one level."""
    import torch

    from wanstream.api.restyle import FileJob, restyle
    from wanstream.engine.loop import Engine
    from wanstream.io import writing
    from wanstream.io.video import open_video
    written: dict[Path, list[np.ndarray]] = {}
    plain_write = writing.VideoWriter.write

    def capture(self, frames, pts=None):
        written.setdefault(self.path, []).append(np.asarray(frames))
        plain_write(self, frames, pts)
    monkeypatch.setattr(writing.VideoWriter, "write", capture)
    clips = _three_clips(tmp_path)

    def run(paths, folder):
        engine = Engine(tiny_model)
        jobs = []
        for p in paths:
            source = open_video(p)
            stream = engine.open(prompt_embeds=torch.zeros(1, 4, 4096), width=source.info.width,
                                 height=source.info.height, steps=2, seed=5)
            jobs.append(FileJob(source, tmp_path / folder / p.name, stream))
        restyle(engine, jobs)
        return engine

    engine = run(clips, "together")
    assert engine.rows_run > engine.dit_calls                     # a and b really shared DiT calls
    for clip in clips:
        run([clip], "alone")
        got, ref = (np.stack(written[tmp_path / folder / clip.name]) for folder in ("together", "alone"))
        assert len(got) == len(ref) == len(read_video(clip)[0])
        diff = np.abs(got.astype(int) - ref.astype(int))
        assert diff.max() <= 1, (clip.name, diff.max())
        assert diff.mean() < 0.01, (clip.name, diff.mean())       # a few values round the other way, not more


def test_v2v_several_files_batched_equal_separate_runs(tiny_model_dir, tmp_path):
    """The command line: several files as one batched run; each output keeps its frame count and fps and decodes
    to that file restyled alone, up to the difference one level before encoding can become after the lossless
    mp4's YUV 4:2:0 round trip (:func:`yuv420_round_trip_bound`)."""
    clips = _three_clips(tmp_path)
    common = ["--model", str(tiny_model_dir), "--prompt", "ink", "--steps", "2", "--seed", "5", "--device", "cpu",
              "--crf", "0"]
    assert main(["v2v", *map(str, clips), "-o", str(tmp_path / "together"), *common]) == 0
    bound = yuv420_round_trip_bound(1)
    assert bound == 4
    for clip in clips:
        alone = tmp_path / f"alone-{clip.name}"
        assert main(["v2v", str(clip), "-o", str(alone), *common]) == 0
        got, fps = read_video(tmp_path / "together" / clip.name)
        ref, ref_fps = read_video(alone)
        src, src_fps = read_video(clip)
        assert len(got) == len(ref) == len(src) and fps == ref_fps == src_fps
        diff = np.abs(got.astype(int) - ref.astype(int))
        assert diff.max() <= bound and diff.mean() < 0.01, (clip.name, diff.mean(), diff.max())
    from wanstream.api.restyle import output_paths
    from wanstream.io.video import VideoError
    with pytest.raises(VideoError, match="must be a folder"):
        output_paths(clips, tmp_path / "x.mp4")


def test_serve_loads_its_loras_before_serving(tiny_model_dir, tmp_path):
    """``serve --lora`` reaches the loader: a missing file is named and nothing is served."""
    missing = tmp_path / "no-such-style.safetensors"
    proc = subprocess.run([sys.executable, "-m", "wanstream.server", "--model", str(tiny_model_dir), "--device", "cpu",
                           "--lora", f"{missing}:0.5", "--port", "0"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and f"LoRA file not found: {missing}" in proc.stderr


@pytest.mark.parametrize("flags,named", [(["--taehv"], "--taehv"), (["--quantize", "int8"], "--quantize"),
                                         (["--lora", "style.safetensors"], "--lora")])
def test_v2v_refuses_what_the_pipeline_does_not_run(tiny_model_dir, clip_path, tmp_path, capsys, flags, named):
    """The same rule as serve: refused before anything loads or a rank starts, naming the flag."""
    code = main(["v2v", str(clip_path), "-o", str(tmp_path / "o.mp4"), "--model", str(tiny_model_dir), "--prompt",
                 "ink", "--pipeline", "2", "--device", "cpu", *flags])
    err = capsys.readouterr().err
    assert code == 2 and f"{named} cannot be combined with --pipeline / --gpus" in err, err
    assert not (tmp_path / "o.mp4").exists()


@pytest.mark.parametrize("flags,ends", [([], ("vae", "vae")), (["--taehv"], ("vae", "taehv")),
                                        (["--taehv", "decode"], ("vae", "taehv")),
                                        (["--taehv", "encode"], ("taehv", "vae")),
                                        (["--taehv=both"], ("taehv", "taehv"))])
def test_taehv_flag_picks_the_ends(flags, ends):
    """``--taehv`` alone still means decode, also right before the input file (which stays the input)."""
    from wanstream.cli.argtypes import autoencoders, taehv_argv
    from wanstream.cli.main import build_parser
    for argv in (["v2v", *flags, "in.mp4", "-o", "o.mp4", "--model", "m"],
                 ["v2v", "in.mp4", "-o", "o.mp4", *flags, "--model", "m"]):
        args = build_parser().parse_args(taehv_argv(argv))
        assert [str(p) for p in args.input] == ["in.mp4"] and autoencoders(args.taehv) == ends


def test_v2v_with_taehv_at_both_ends(tiny_model_dir, clip_path, tmp_path):
    """The tiny autoencoder at both ends (random weights): every frame out, at the input's size."""
    out = tmp_path / "t.mp4"
    assert main(["v2v", "--taehv", "both", str(clip_path), "-o", str(out), "--model", str(tiny_model_dir),
                 "--prompt", "x", "--device", "cpu"]) == 0
    frames, _ = read_video(out)
    assert frames.shape == (14, 48, 80, 3)
    with pytest.raises(SystemExit):
        main(["v2v", str(clip_path), "-o", str(out), "--model", str(tiny_model_dir), "--taehv", "nope"])
