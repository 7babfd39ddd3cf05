"""Tiny test inputs in the containers and codecs creators have, encoded with PyAV (no files in the repository).

Each maker writes a short clip of :func:`wanstream.io.video.make_motion_clip` frames with chosen timestamps, and
optionally a sine audio track, and returns the path.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from wanstream.io.video import fit_resolution, make_motion_clip, open_video


def has_encoder(name: str) -> bool:
    try:
        av.Codec(name, "w")
    except ValueError:
        return False
    return True


def sine(seconds: float, rate: int, channels: int = 2, freq: float = 440.0) -> np.ndarray:
    """float32 [channels, samples]: a sine, a different one per channel."""
    t = np.arange(int(round(seconds * rate))) / rate
    return np.stack([0.3 * np.sin(2 * np.pi * freq * (c + 1) * t) for c in range(channels)]).astype(np.float32)


def _add_audio(container, codec: str, rate: int, channels: int):
    layout = {1: "mono", 2: "stereo"}[channels]
    stream = container.add_stream(codec, rate=rate, layout=layout)
    return stream


def _encode_audio(container, stream, samples: np.ndarray, rate: int, start_sample: int = 0) -> None:
    fmt = stream.format.name                       # e.g. fltp (aac, opus), s16 (pcm)
    size = stream.codec_context.frame_size or 1024
    resampler = av.AudioResampler(format=fmt, layout=stream.layout.name, rate=rate, frame_size=size)
    layout = stream.layout.name
    src = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples), format="fltp", layout=layout)
    src.sample_rate, src.pts, src.time_base = rate, start_sample, Fraction(1, rate)
    pts = start_sample
    for frame in [*resampler.resample(src), *resampler.resample(None)]:
        frame.pts, frame.time_base = pts, Fraction(1, rate)
        pts += frame.samples
        container.mux(stream.encode(frame))
    container.mux(stream.encode(None))


def write_clip(path: Path, *, codec: str = "libx264", frames: int = 9, width: int = 48, height: int = 32,
               fps: float = 16.0, pts: list[int] | None = None, time_base: Fraction | None = None,
               pix_fmt: str = "yuv420p", rotation: int = 0, audio: str | None = None, audio_rate: int = 48000,
               audio_channels: int = 2, audio_start: float = 0.0, audio_freq: float = 440.0,
               container_options: dict | None = None, seed: int = 0) -> Path:
    """A clip of ``frames`` motion frames; ``pts`` (in ``time_base`` ticks) for variable frame rates;
    ``rotation`` writes a display matrix (the pixels are stored turned back, as a phone stores them);
    ``audio``: an audio codec for a sine track lasting as long as the video, starting at ``audio_start`` s."""
    images = make_motion_clip(frames, width, height, seed=seed)
    if rotation % 180:
        images = np.stack([np.rot90(im, -rotation // 90) for im in images])   # stored turned back
    elif rotation:
        images = images[:, ::-1, ::-1]
    rate = Fraction(fps).limit_denominator(1001)
    tb = time_base or 1 / rate
    pts = pts if pts is not None else [round(i / rate / tb) for i in range(frames)]
    with av.open(str(path), "w", options=container_options or {}) as c:
        v = c.add_stream(codec, rate=rate)
        v.height, v.width = images.shape[1:3]
        v.pix_fmt = pix_fmt
        v.codec_context.time_base = tb
        if rotation:
            v.set_display_rotation(rotation)
        a = _add_audio(c, audio, audio_rate, audio_channels) if audio else None
        for image, t in zip(images, pts):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            frame.pts, frame.time_base = t, tb
            c.mux(v.encode(frame))
        c.mux(v.encode(None))
        if a is not None:
            duration = (pts[-1] * tb + 1 / rate) - audio_start
            _encode_audio(c, a, sine(float(duration), audio_rate, audio_channels, audio_freq), audio_rate,
                          round(audio_start * audio_rate))
    return Path(path)


def write_gif(path: Path, frames: int = 8, width: int = 48, height: int = 32,
              delays_cs: list[int] | None = None) -> Path:
    """An animated GIF (``delays_cs``: each frame's delay in 1/100 s; GIFs have no frame count in a header)."""
    delays = delays_cs or [6] * frames
    pts = list(np.cumsum([0, *delays[:-1]]))
    return write_clip(path, codec="gif", frames=frames, width=width, height=height, fps=100 / delays[0],
                      pts=[int(p) for p in pts], time_base=Fraction(1, 100), pix_fmt="rgb8")


def write_images(folder: Path, frames: int = 6, width: int = 48, height: int = 32, ext: str = ".png",
                 name: str = "frame_{:d}") -> Path:
    """An image sequence: ``folder/frame_1.png`` … (unpadded numbers: the order must be natural)."""
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(make_motion_clip(frames, width, height, seed=2)):
        Image.fromarray(image).save(folder / (name.format(i + 1) + ext))
    return folder


def decoded_audio(path: Path) -> tuple[np.ndarray, int, str]:
    """All samples of the first audio track as float32 [channels, samples], its rate and codec."""
    with av.open(str(path)) as c:
        stream = c.streams.audio[0]
        chunks = [f.to_ndarray().reshape(len(f.layout.channels), -1) if f.format.is_planar else
                  f.to_ndarray().reshape(-1, len(f.layout.channels)).T for f in c.decode(stream)]
        return np.concatenate(chunks, axis=1), stream.rate, stream.codec_context.name


def video_times(path: Path) -> list[float]:
    """The presentation time (s) of every decoded video frame."""
    with av.open(str(path)) as c:
        return [float(f.time) for f in c.decode(c.streams.video[0])]


def restyle_file(model, src: Path, out: Path, audio: bool = True, **open_kw):
    """What ``wanstream v2v SRC -o OUT`` does, on an already loaded model (tests: the tiny one, loaded once)."""
    import torch

    from wanstream.api.restyle import FileJob, restyle
    from wanstream.engine.loop import Engine
    source = open_video(src, **open_kw)
    engine = Engine(model)
    w, h = fit_resolution(source.info.width, source.info.height)
    stream = engine.open(prompt_embeds=torch.zeros(1, 4, 4096), width=w, height=h, steps=1, seed=1)
    job = FileJob(source, out, stream, audio=audio)
    restyle(engine, [job], desc="test")
    return job
