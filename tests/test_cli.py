"""Command line: v2v / t2v end to end on the tiny model, and one clear error line for bad input."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from wanstream.cli import main
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


def test_download_offline_is_a_clear_error(tmp_path, capsys):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "wanstream.cli", "download", "sdv2-1.3b", "--dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2
    assert "cannot reach the Hugging Face hub" in proc.stderr and "Traceback" not in proc.stderr


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


def test_v2v_several_files_batched_equal_separate_runs(tiny_model_dir, tmp_path):
    """Three files (different lengths, one of another size) as concurrent streams of one engine: each output
    keeps its frame count and fps and decodes to the frames of that file restyled alone (lossless output, so the
    comparison sees the restyled frames: batched rows may round a pixel differently, by one level at most)."""
    from wanstream.io.video import write_motion_clip
    clips = [write_motion_clip(tmp_path / "a.mp4", 14, 80, 48, 12.5),
             write_motion_clip(tmp_path / "b.mp4", 21, 80, 48, 16.0),
             write_motion_clip(tmp_path / "c.mp4", 9, 64, 48, 10.0)]
    common = ["--model", str(tiny_model_dir), "--prompt", "ink", "--steps", "2", "--seed", "5", "--device", "cpu",
              "--crf", "0"]
    assert main(["v2v", *map(str, clips), "-o", str(tmp_path / "together"), *common]) == 0
    for clip in clips:
        alone = tmp_path / f"alone-{clip.name}"
        assert main(["v2v", str(clip), "-o", str(alone), *common]) == 0
        got, fps = read_video(tmp_path / "together" / clip.name)
        ref, ref_fps = read_video(alone)
        src, src_fps = read_video(clip)
        assert len(got) == len(ref) == len(src) and fps == ref_fps == src_fps
        diff = np.abs(got.astype(int) - ref.astype(int))
        assert diff.max() <= 2 and diff.mean() < 0.01, (clip.name, diff.mean(), diff.max())
    with pytest.raises(ValueError, match="must be a folder"):
        from wanstream.restyle import output_paths
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
    from wanstream.argtypes import autoencoders, taehv_argv
    from wanstream.cli import build_parser
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
