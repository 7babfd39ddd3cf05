"""Video I/O: write -> read round trips, frame rates, resizing, resolution parsing, tensor conversion, errors."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch

from wanstream.io import writing
from wanstream.io.video import (
    VideoError,
    VideoInfo,
    VideoWriter,
    fit_frames,
    fit_resolution,
    frames_to_tensor,
    iter_frames,
    make_motion_clip,
    parse_resolution,
    probe_video,
    read_video,
    resize_frames,
    tensor_to_frames,
    write_motion_clip,
)


@pytest.fixture(scope="module")
def clip() -> np.ndarray:
    return make_motion_clip(12, 64, 48, seed=1)


def yuv420_round_trip(frames: np.ndarray) -> np.ndarray:
    """``frames`` converted to the writer's yuv420p and back, by the same swscale conversion PyAV applies when
    encoding and decoding: what a lossless encode must give back. (A 64x48 texture loses ~7 levels on average to
    the 4:2:0 chroma alone, and the exact figure depends on swscale's code path for the CPU: it is no bound.)"""
    import av
    return np.stack([av.VideoFrame.from_ndarray(f, format="rgb24").reformat(format="yuv420p").to_ndarray(
        format="rgb24") for f in frames])


@pytest.mark.parametrize("fps", [16.0, 29.97, Fraction(30000, 1001)])
def test_round_trip_keeps_count_size_fps_and_pixels(tmp_path, clip, fps):
    path = tmp_path / "out.mp4"
    with VideoWriter(path, fps, 64, 48, crf=0) as writer:
        writer.write(clip[:5])          # a batch ...
        for frame in clip[5:]:          # ... and single frames
            writer.write(frame)
    assert writer.frames_written == len(clip)
    frames, read_fps = read_video(path)
    assert frames.shape == clip.shape and frames.dtype == np.uint8
    assert read_fps == pytest.approx(float(fps), abs=1e-3)
    np.testing.assert_array_equal(frames, yuv420_round_trip(clip))      # crf 0: H.264 is lossless in YUV
    info = probe_video(path)
    assert info == VideoInfo(64, 48, info.fps, len(clip))


def test_iter_frames_streams_rgb_frames(tmp_path, clip):
    path = write_motion_clip(tmp_path / "sub" / "clip.mp4", 6, 32, 32, fps=8)
    frames = list(iter_frames(path))
    assert len(frames) == 6
    assert all(f.shape == (32, 32, 3) and f.dtype == np.uint8 for f in frames)


def test_mpeg4_and_fallback_when_x264_is_missing(tmp_path, clip, monkeypatch):
    monkeypatch.setattr(writing, "_has_encoder", lambda name: name != "libx264")
    path = tmp_path / "out.mp4"
    with VideoWriter(path, 16, 64, 48, qscale=2) as writer:
        writer.write(clip)
    assert writer.codec == "mpeg4"
    frames, fps = read_video(path)
    assert len(frames) == len(clip) and fps == pytest.approx(16.0)
    # qscale is honoured: measured against what a lossless codec would give back (the 4:2:0 conversion alone),
    # the finest quantiser loses far less than the coarsest (measured: 2.9 and 16.9 levels on average)
    reference = yuv420_round_trip(clip).astype(np.int16)
    fine = np.abs(frames.astype(np.int16) - reference).mean()
    with VideoWriter(path, 16, 64, 48, qscale=31) as coarse:
        coarse.write(clip)
    assert fine < 0.5 * np.abs(read_video(path)[0].astype(np.int16) - reference).mean()


def test_close_twice_and_write_after_close(tmp_path, clip):
    writer = VideoWriter(tmp_path / "out.mp4", 16, 64, 48)
    writer.write(clip[0])
    writer.close()
    writer.close()
    with pytest.raises(VideoError, match="closed"):
        writer.write(clip[0])
    assert len(read_video(tmp_path / "out.mp4")[0]) == 1


def test_writer_rejects_bad_frames_and_settings(tmp_path, clip):
    with VideoWriter(tmp_path / "out.mp4", 16, 64, 48) as writer:
        with pytest.raises(VideoError, match="opened for 64x48"):
            writer.write(np.zeros((48, 32, 3), np.uint8))
        with pytest.raises(ValueError, match="uint8"):
            writer.write(clip.astype(np.float32))
        writer.write(clip[0])
    with pytest.raises(VideoError, match="even"):
        VideoWriter(tmp_path / "odd.mp4", 16, 63, 48)
    with pytest.raises(VideoError, match="fps"):
        VideoWriter(tmp_path / "zero.mp4", 0, 64, 48)
    with pytest.raises(VideoError, match="not available"):
        VideoWriter(tmp_path / "x.mp4", 16, 64, 48, codec="no-such-codec")


def test_unwritable_output_path_names_the_file(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    with pytest.raises(VideoError, match="file.txt"):
        VideoWriter(blocker / "out.mp4", 16, 64, 48)
    with pytest.raises(VideoError, match=r"out\.nosuchformat"):
        VideoWriter(tmp_path / "out.nosuchformat", 16, 64, 48)
    with pytest.raises(VideoError, match="empty"):
        VideoWriter("", 16, 64, 48)


def test_bad_inputs_raise_video_error_naming_the_file(tmp_path):
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n")
    missing = tmp_path / "missing.mp4"
    for fn in (probe_video, read_video, lambda p: next(iter_frames(p))):
        with pytest.raises(VideoError, match="missing.mp4.*no such file"):
            fn(missing)
        with pytest.raises(VideoError, match="notes.mp4.*not a readable video"):
            fn(text)
        with pytest.raises(VideoError, match="empty"):
            fn("")
        with pytest.raises(VideoError, match="folder with no images"):
            fn(tmp_path)


def test_no_video_stream_and_empty_video(tmp_path):
    # An mp4 closed before any frame keeps no video track; an avi keeps the stream with zero frames (written
    # in place: an atomic writer keeps no file without a frame).
    VideoWriter(tmp_path / "none.mp4", 16, 32, 32, atomic=False).close()
    with pytest.raises(VideoError, match="none.mp4: no video stream"):
        probe_video(tmp_path / "none.mp4")
    VideoWriter(tmp_path / "empty.avi", 16, 32, 32, codec="mpeg4", atomic=False).close()
    with pytest.raises(VideoError, match="empty.avi: the video is empty"):
        read_video(tmp_path / "empty.avi")


def test_resize_frames_layout_and_antialiasing():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (3, 40, 60, 3), dtype=np.uint8)
    out = resize_frames(frames, 30, 20)
    assert out.shape == (3, 20, 30, 3) and out.dtype == np.uint8
    assert resize_frames(frames[0], 30, 20).shape == (20, 30, 3)
    np.testing.assert_array_equal(resize_frames(frames[1], 30, 20), out[1])
    assert resize_frames(frames, 60, 40) is frames
    # A 1-pixel checkerboard averages to grey when antialiased (plain bilinear would alias it).
    checker = ((np.indices((64, 64)).sum(0) % 2) * 255).astype(np.uint8)
    small = resize_frames(np.repeat(checker[..., None], 3, -1), 16, 16)
    assert np.abs(small.astype(int) - 128).max() <= 2
    # A constant image stays constant, up- or down-scaled.
    flat = np.full((1, 8, 8, 3), 77, np.uint8)
    assert (resize_frames(flat, 32, 24) == 77).all() and (resize_frames(flat, 2, 2) == 77).all()
    with pytest.raises(ValueError, match="shape"):
        resize_frames(np.zeros((4, 4), np.uint8), 2, 2)
    with pytest.raises(ValueError, match="positive"):
        resize_frames(frames, 0, 2)


def test_fit_and_parse_resolution():
    assert fit_resolution(640, 360) == (640, 352)
    assert fit_resolution(1000, 10) == (992, 16)
    assert fit_resolution(100, 70, multiple=8) == (96, 64)
    with pytest.raises(ValueError):
        fit_resolution(0, 10)
    assert parse_resolution("512x512") == (512, 512)
    assert parse_resolution(" 832X480 ") == (832, 480)
    for bad in ("512", "512x", "axb", "0x16", "500x512", "-16x16", "512x512x3", "16.0x16"):
        with pytest.raises(ValueError, match=rf"{bad!r}.*WxH.*multiples of 16"):
            parse_resolution(bad)


def test_tensor_conversions_invert_each_other():
    frames = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    frames[0, 0, 0] = (0, 128, 255)
    t = frames_to_tensor(frames)
    assert t.shape == (2, 3, 5, 7) and t.dtype == torch.float32
    assert t.min() >= -1 and t.max() <= 1
    assert t[0, :, 0, 0].tolist() == pytest.approx([-1.0, 128 / 127.5 - 1, 1.0], abs=1e-6)
    np.testing.assert_array_equal(tensor_to_frames(t), frames)
    assert frames_to_tensor(frames, dtype=torch.float64).dtype == torch.float64
    clamped = tensor_to_frames(torch.tensor([-3.0, 3.0, 0.0]).view(1, 3, 1, 1))
    assert clamped.tolist() == [[[[0, 255, 128]]]]
    with pytest.raises(ValueError, match=r"\[T, 3, H, W\]"):
        tensor_to_frames(torch.zeros(3, 4, 4))
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
        frames_to_tensor(frames[0])


def test_motion_clip_is_deterministic_and_moves():
    a = make_motion_clip(16, 64, 48, seed=3)
    assert a.shape == (16, 48, 64, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, make_motion_clip(16, 64, 48, seed=3))
    assert not np.array_equal(a, make_motion_clip(16, 64, 48, seed=4))
    motion = np.abs(np.diff(a.astype(np.int16), axis=0)).mean(axis=(1, 2, 3))
    assert (motion > 1).all()
    assert motion[7:9].min() > 1.5 * np.median(motion)  # the fast-motion burst (frames 8, 9)
    with pytest.raises(ValueError, match="positive"):
        make_motion_clip(0, 64, 48)


def test_write_motion_clip_checks_arguments_before_creating_the_file(tmp_path):
    with pytest.raises(ValueError, match="positive"):
        write_motion_clip(tmp_path / "bad.mp4", 0, 64, 48)
    assert not (tmp_path / "bad.mp4").exists()


# ---------------------------------------------------------------------------------------------------------------
# framing (--fit) and reproducible files

def _ramp(width: int, height: int, frames: int = 2) -> np.ndarray:
    """Frames whose red channel is the column and green channel the row (so geometry is visible in values)."""
    ys, xs = np.mgrid[0:height, 0:width]
    img = np.stack([xs % 256, ys % 256, (xs + ys) % 256], axis=-1).astype(np.uint8)
    return np.stack([img] * frames)


def test_fit_crop_cuts_the_centre_of_the_longer_side():
    wide, tall = _ramp(160, 96), _ramp(96, 160)
    assert np.array_equal(fit_frames(wide, 96, 96, "crop"), wide[:, :, 32:128])        # no resize needed
    assert np.array_equal(fit_frames(tall, 96, 96, "crop"), tall[:, 32:128])
    big = _ramp(320, 192)
    assert np.array_equal(fit_frames(big, 96, 96), resize_frames(big[:, :, 64:256], 96, 96))   # crop is the default
    assert np.array_equal(fit_frames(big, 80, 48), resize_frames(big, 80, 48))         # same aspect: a resize
    assert np.array_equal(fit_frames(wide[0], 96, 96, "crop"), wide[0, :, 32:128])      # one frame [H, W, 3]


def test_fit_pad_centres_the_whole_frame_on_black():
    wide, tall = _ramp(160, 96), _ramp(96, 160)
    out = fit_frames(wide, 160, 160, "pad")
    assert out.shape == (2, 160, 160, 3)
    assert np.array_equal(out[:, 32:128], wide) and not out[:, :32].any() and not out[:, 128:].any()
    out = fit_frames(tall, 160, 160, "pad")
    assert np.array_equal(out[:, :, 32:128], tall) and not out[:, :, :32].any() and not out[:, :, 128:].any()
    big = _ramp(320, 192)
    out = fit_frames(big, 128, 128, "pad")                  # 320x192 → 128x77 (rounded), 25 rows of bar above
    assert np.array_equal(out[:, 25:102], resize_frames(big, 128, 77))
    assert not out[:, :25].any() and not out[:, 102:].any()


def test_fit_stretch_and_errors():
    wide = _ramp(160, 96)
    assert np.array_equal(fit_frames(wide, 64, 64, "stretch"), resize_frames(wide, 64, 64))
    assert fit_frames(wide, 160, 96, "pad") is wide                             # already the target size
    with pytest.raises(ValueError, match="fit must be one of crop, pad, stretch"):
        fit_frames(wide, 64, 64, "zoom")
    with pytest.raises(ValueError, match="positive"):
        fit_frames(wide, 0, 64)


def test_same_frames_give_the_same_file_bytes(tmp_path):
    """x264 with its AVX-512 routines differs between runs (measured: a quarter of runs at 160x96); the writer
    pins the threads and the instruction set, so 12 encodes of the same frames are one file."""
    frames = make_motion_clip(17, 160, 96, seed=1)
    files = set()
    for i in range(12):
        with VideoWriter(tmp_path / f"{i}.mp4", 16, 160, 96) as writer:
            writer.write(frames)
        files.add((tmp_path / f"{i}.mp4").read_bytes())
    assert len(files) == 1


@pytest.mark.parametrize("fit", ["crop", "pad", "stretch"])
def test_streams_frame_their_input_by_their_fit(tiny_model, fit):
    from wanstream.api.session import StreamSession
    clip = make_motion_clip(5, 80, 48, seed=3)
    session = StreamSession(tiny_model, prompt_embeds=torch.zeros(1, 4, 4096), width=48, height=48, fit=fit)
    try:
        session.engine.feed(session.stream, clip)
        images, _ = session.stream.buffer.take()
        assert np.array_equal(np.stack(images), fit_frames(clip, 48, 48, fit))
    finally:
        session.close()


def test_unknown_fit_is_refused(tiny_model):
    from wanstream.api.session import StreamSession
    with pytest.raises(ValueError, match="fit must be one of crop, pad, stretch, got 'zoom'"):
        StreamSession(tiny_model, prompt_embeds=torch.zeros(1, 4, 4096), width=48, height=48, fit="zoom")
