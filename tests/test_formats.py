"""What creators record, restyled: MKV, WebM (no frame count, no duration), MOV, AVI, animated GIF, variable frame
rates, rotated phone videos, 10-bit, odd sizes, image sequences and still images — frame count and timestamps
kept, the audio track carried (copied where the container takes it, AAC otherwise), in sync."""

from __future__ import annotations

import re
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from media import (
    _encode_audio,
    decoded_audio,
    has_encoder,
    restyle_file,
    sine,
    video_times,
    write_clip,
    write_gif,
    write_images,
)

from wanstream.io.video import (
    VideoError,
    fit_resolution,
    make_motion_clip,
    open_video,
    probe_video,
    read_video,
)

VFR_PTS = [0, 40, 70, 150, 200, 260, 300, 390, 400]          # milliseconds, irregular


def _times_from_zero(path: Path) -> np.ndarray:
    t = np.array(video_times(path))
    return t - t[0]


CASES = {
    # name: (file name, write_clip keywords, encoder needed)
    "mkv-h264-opus": ("a.mkv", dict(audio="libopus"), "libopus"),
    "webm-vp9-opus-live": ("a.webm", dict(codec="libvpx-vp9", audio="libopus", container_options={"live": "1"}),
                           "libvpx-vp9"),
    "webm-vp8-vfr-live": ("b.webm", dict(codec="libvpx", time_base=Fraction(1, 1000), pts=VFR_PTS,
                                         container_options={"live": "1"}), "libvpx"),
    "mov-prores10-pcm": ("a.mov", dict(codec="prores", pix_fmt="yuv422p10le", audio="pcm_s16le"), "prores"),
    "avi-mjpeg-pcm": ("a.avi", dict(codec="mjpeg", pix_fmt="yuvj420p", audio="pcm_s16le"), "mjpeg"),
    "mp4-vfr": ("vfr.mp4", dict(time_base=Fraction(1, 1000), pts=VFR_PTS), "libx264"),
    "mp4-10bit": ("10bit.mp4", dict(pix_fmt="yuv420p10le"), "libx264"),
    "mkv-ffv1-odd-size": ("odd.mkv", dict(codec="ffv1", width=45, height=35), "ffv1"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_container_restyles_keeping_count_timing_and_audio(case, tiny_model, tmp_path):
    name, kw, encoder = CASES[case]
    if not has_encoder(encoder):
        pytest.skip(f"this PyAV build has no {encoder} encoder")
    src = write_clip(tmp_path / name, **kw)
    out = tmp_path / "out.mp4"
    job = restyle_file(tiny_model, src, out)
    frames_in, _ = read_video(src)
    frames_out, _ = read_video(out)
    assert len(frames_out) == len(frames_in) == job.written
    info = probe_video(src)
    assert frames_out.shape[1:3] == fit_resolution(info.width, info.height)[::-1]
    # every frame keeps its input timestamp, exactly (VFR included): the output uses the input's time base
    np.testing.assert_allclose(_times_from_zero(out), _times_from_zero(src), atol=1e-9)
    if kw.get("audio"):
        samples, rate, codec = decoded_audio(out)
        ref, ref_rate, ref_codec = decoded_audio(src)
        assert rate == ref_rate
        # the output container (mp4) takes Opus packets as they are, PCM is re-encoded as AAC
        assert job.audio_copied == (ref_codec not in ("pcm_s16le",)) and (codec == "aac") != job.audio_copied
        assert abs(samples.shape[1] - ref.shape[1]) <= 2048        # AAC frames: 1024 samples + priming


def test_webm_without_count_or_duration_is_read_by_counting(tmp_path):
    """What MediaRecorder writes: the header says neither how many frames nor how long (live WebM)."""
    if not has_encoder("libvpx"):
        pytest.skip("no libvpx encoder")
    src = write_clip(tmp_path / "rec.webm", codec="libvpx", frames=7, container_options={"live": "1"})
    import av
    with av.open(str(src)) as c:
        assert c.streams.video[0].frames == 0 and c.duration is None      # really nothing in the header
    info = probe_video(src)
    assert info.frames is None and info.fps == pytest.approx(16.0)
    assert len(read_video(src)[0]) == 7


def test_gif_keeps_its_frame_delays(tiny_model, tmp_path):
    delays = [5, 5, 10, 10, 4, 4, 20, 5]                       # 1/100 s each: a variable rate
    src = write_gif(tmp_path / "anim.gif", delays_cs=delays)
    out = tmp_path / "out.mp4"
    restyle_file(tiny_model, src, out)
    assert len(read_video(out)[0]) == len(delays)
    np.testing.assert_allclose(_times_from_zero(out), np.cumsum([0, *delays[:-1]]) / 100, atol=1e-9)


@pytest.mark.parametrize("rotation", [90, -90, 180])
def test_rotated_phone_video_is_turned_upright(tiny_model, tmp_path, rotation):
    """The pixels are stored turned; the display matrix says how to show them: frames come out as displayed."""
    src = write_clip(tmp_path / "phone.mp4", rotation=rotation, width=48, height=32, frames=5)
    info = probe_video(src)
    assert (info.width, info.height, info.rotation) == (48, 32, rotation % 360)
    frames, _ = read_video(src)
    upright = make_motion_clip(5, 48, 32, seed=0).astype(int)
    # H.264 at crf 18 of a 48x32 texture differs from the drawn frames by ~14 levels on average; any other
    # orientation of the same size (turned by 180, flipped) by ~37: the frames are the upright ones
    error = np.abs(frames - upright).mean()
    others = [np.abs(frames - upright[:, ::-1, ::-1]).mean(), np.abs(frames - upright[:, ::-1]).mean(),
              np.abs(frames - upright[:, :, ::-1]).mean()]
    assert error < 0.5 * min(others), (error, others)
    out = tmp_path / "out.mp4"
    restyle_file(tiny_model, src, out)
    assert read_video(out)[0].shape == (5, 32, 48, 3)


def test_audio_is_copied_bit_exact_and_keeps_its_offset(tiny_model, tmp_path):
    """An AAC track in an mp4: its packets are copied, so the decoded samples are the input's, and it starts as
    late after the video as in the input."""
    src = write_clip(tmp_path / "talk.mp4", audio="aac", audio_start=0.25, frames=9)
    out = tmp_path / "out.mp4"
    job = restyle_file(tiny_model, src, out)
    assert job.audio_copied is True
    got, rate, codec = decoded_audio(out)
    ref, ref_rate, _ = decoded_audio(src)
    assert codec == "aac" and rate == ref_rate and np.array_equal(got, ref)
    import av

    def offset(path):
        with av.open(str(path)) as c:
            v, a = c.streams.video[0], c.streams.audio[0]
            return float(a.start_time * a.time_base - v.start_time * v.time_base)
    assert offset(out) == pytest.approx(offset(src), abs=1e-3)


def test_batched_files_keep_each_its_own_audio(tiny_model, tmp_path):
    """Two files with different sounds (and lengths) restyled as one batched run: each output carries its own."""
    import torch

    from wanstream.api.restyle import FileJob, restyle
    from wanstream.engine.loop import Engine
    clips = [write_clip(tmp_path / "low.mp4", audio="aac", audio_freq=220, frames=9),
             write_clip(tmp_path / "high.mkv", audio="libopus", audio_freq=880, frames=13, seed=1)]
    engine = Engine(tiny_model)
    jobs = [FileJob(open_video(c), tmp_path / "out" / f"{c.stem}.mp4",
                    engine.open(prompt_embeds=torch.zeros(1, 4, 4096), width=48, height=32, steps=1))
            for c in clips]
    restyle(engine, jobs)
    for clip, job in zip(clips, jobs):
        assert job.audio_copied is True
        got, ref = decoded_audio(job.output)[0], decoded_audio(clip)[0]
        # the same samples; Matroska keeps timestamps in milliseconds, so Opus's 312-sample start (6.5 ms) is
        # stored as 7 ms there and the copy starts up to 1 ms (48 samples) off
        shift = _shift(got, ref, 48 if clip.suffix == ".mkv" else 0)
        assert shift is not None, clip.name
        assert len(read_video(job.output)[0]) == len(read_video(clip)[0])


def test_same_input_with_audio_and_vfr_gives_the_same_bytes(tiny_model, tmp_path):
    """Reproducible files, also with a re-encoded (AAC) track and an input's own timestamps."""
    src = write_clip(tmp_path / "a.mov", time_base=Fraction(1, 1000), pts=VFR_PTS, audio="pcm_s16le")
    outs = [tmp_path / "1.mp4", tmp_path / "2.mp4"]
    for out in outs:
        assert restyle_file(tiny_model, src, out).audio_copied is False
    assert outs[0].read_bytes() == outs[1].read_bytes()


def _shift(got: np.ndarray, ref: np.ndarray, most: int) -> int | None:
    """The shift (samples, within ``most``) that makes the common part of two sample arrays equal, or None."""
    for k in sorted(range(-most, most + 1), key=abs):
        a, b = got[:, max(0, k):], ref[:, max(0, -k):]
        n = min(a.shape[1], b.shape[1])
        if n > 0.9 * ref.shape[1] and np.array_equal(a[:, :n], b[:, :n]):
            return k
    return None


def test_no_audio_drops_the_track_and_mkv_copies_pcm(tiny_model, tmp_path):
    src = write_clip(tmp_path / "a.mov", codec="mjpeg", pix_fmt="yuvj420p", audio="pcm_s16le", frames=5)
    restyle_file(tiny_model, src, tmp_path / "silent.mp4", audio=False)
    import av
    with av.open(str(tmp_path / "silent.mp4")) as c:
        assert not c.streams.audio
    job = restyle_file(tiny_model, src, tmp_path / "out.mkv")     # Matroska takes PCM as it is
    assert job.audio_copied is True
    assert np.array_equal(decoded_audio(tmp_path / "out.mkv")[0], decoded_audio(src)[0])


def test_image_sequences_folder_printf_and_glob(tiny_model, tmp_path):
    folder = write_images(tmp_path / "shots", frames=11)           # frame_1.png … frame_11.png: natural order
    by_folder = open_video(folder, fps=8)
    assert [p.name for p in by_folder.files][-3:] == ["frame_9.png", "frame_10.png", "frame_11.png"]
    assert by_folder.info.frames == 11 and by_folder.info.fps == 8 and by_folder.info.kind == "images"
    assert by_folder.files == open_video(folder / "frame_%d.png").files == open_video(folder / "*.png").files
    out = tmp_path / "out.mp4"
    restyle_file(tiny_model, folder, out, fps=8)
    frames, fps = read_video(out)
    assert len(frames) == 11 and fps == pytest.approx(8.0)


def test_still_image_becomes_a_short_clip(tiny_model, tmp_path):
    image = write_images(tmp_path / "s", frames=1, ext=".jpg") / "frame_1.jpg"
    source = open_video(image, still_frames=6, fps=12)
    assert source.info.kind == "still" and source.info.frames == 6
    out = tmp_path / "out.mp4"
    restyle_file(tiny_model, image, out, still_frames=6, fps=12)
    frames, fps = read_video(out)
    assert len(frames) == 6 and fps == pytest.approx(12.0)


def test_unreadable_inputs_fail_in_one_line_naming_the_reason(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "notes.mkv").write_text("not a video")
    mixed = write_images(tmp_path / "mixed", frames=2)
    write_images(mixed, frames=1, width=64, name="frame_{:d}9")      # frame_19.png: another size
    sound = tmp_path / "sound.m4a"
    import av
    with av.open(str(sound), "w") as c:
        _encode_audio(c, c.add_stream("aac", rate=48000, layout="stereo"), sine(0.1, 48000), 48000)
    cases = {tmp_path / "empty": "no images", tmp_path / "notes.png": "the image cannot be decoded",
             tmp_path / "notes.mkv": "not a readable video or image file",
             tmp_path / "none_%03d.png": "no file matches", tmp_path / "x*.png": "no file matches",
             sound: "no video stream (an audio file?)"}
    for path, reason in cases.items():
        with pytest.raises(VideoError, match=re.escape(reason)) as err:
            list(open_video(path).frames())
        assert "\n" not in str(err.value) and str(path.name) in str(err.value)
    with pytest.raises(VideoError, match="frame_19.png: the image is 64x32, the sequence's first is 48x32"):
        list(open_video(mixed).frames())
