"""The process that pushes one stream's output (:mod:`.outputs`): frames and audio in on stdin, RTMP / SRT out.

Run as ``python -m wanstream.server.push_worker``; its first stdin line is a JSON config (``url``, ``format``,
``width``, ``height``, ``fps``, ``audio_rate``); then records ``V`` + float64 time + RGB bytes (one frame) and
``A`` + float64 time + uint32 count + float32 mono samples. Video is H.264 (x264 ultrafast / zerolatency, a
keyframe every 2 s), audio AAC at ``audio_rate``; a presentation time is the record's time since the first
frame, so the audio stays in step with the frames it came with (silence fills the gaps: the pushed stream always
has audio, as platforms require). Every 8 frames it prints ``frames N`` on stdout: the parent's proof of
progress. A network stall blocks only this process, which the parent kills (see :mod:`.outputs`).
"""

from __future__ import annotations

import json
import struct
import sys
from fractions import Fraction

import av
import numpy as np

HEAD = struct.Struct("<cd")
COUNT = struct.Struct("<I")
MAX_AUDIO_RECORD = 192000


def _read(stream, n: int) -> bytes:
    data = stream.read(n)
    if data is None or len(data) < n:
        raise EOFError
    return data


def main() -> int:
    stdin = sys.stdin.buffer
    config = json.loads(stdin.readline())
    w, h, fps, rate = config["width"], config["height"], config["fps"], config["audio_rate"]
    container = av.open(config["url"], "w", format=config["format"])
    video = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
    video.width, video.height, video.pix_fmt = w, h, "yuv420p"
    video.options = {"preset": "ultrafast", "tune": "zerolatency", "g": str(int(2 * fps))}
    video.codec_context.time_base = Fraction(1, 1000)
    audio = container.add_stream("aac", rate=rate, layout="mono")
    resampler = av.AudioResampler(format="fltp", layout="mono", rate=rate, frame_size=1024)
    t0 = None
    audio_until = 0                         # samples of audio written (its clock)
    frames = 0
    last_pts = -1

    def write_audio(samples: np.ndarray) -> None:
        nonlocal audio_until
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1).astype(np.float32), format="flt", layout="mono")
        frame.sample_rate = rate
        for out in resampler.resample(frame):
            for packet in audio.encode(out):
                container.mux(packet)
        audio_until += len(samples)

    def audio_to(t: float, samples: np.ndarray | None = None) -> None:
        """Audio up to time ``t`` (since the first frame): ``samples`` when given (ending at ``t``), silence in
        the gap before them; samples from before the audio clock are dropped."""
        end = int(round(t * rate))
        if samples is None:
            if end > audio_until:
                write_audio(np.zeros(end - audio_until, np.float32))
            return
        start = end - len(samples)
        if start > audio_until:
            write_audio(np.zeros(start - audio_until, np.float32))
        keep = samples[max(0, audio_until - start):]
        if len(keep):
            write_audio(keep)

    try:
        while True:
            kind, t = HEAD.unpack(_read(stdin, HEAD.size))
            if kind == b"V":
                image = np.frombuffer(_read(stdin, w * h * 3), np.uint8).reshape(h, w, 3)
                t0 = t if t0 is None else t0
                pts = max(int(round((t - t0) * 1000)), last_pts + 1)
                last_pts = pts
                frame = av.VideoFrame.from_ndarray(image, format="rgb24")
                frame.pts = pts
                for packet in video.encode(frame):
                    container.mux(packet)
                audio_to(pts / 1000)
                frames += 1
                if frames % 8 == 0:
                    print(f"frames {frames}", flush=True)
            elif kind == b"A":
                (n,) = COUNT.unpack(_read(stdin, COUNT.size))
                if n > MAX_AUDIO_RECORD:
                    raise ValueError(f"audio record of {n} samples")
                samples = np.frombuffer(_read(stdin, 4 * n), np.float32)
                if t0 is not None and t > t0:
                    audio_to(t - t0, samples)
            else:
                raise ValueError(f"unknown record {kind!r}")
    except EOFError:
        pass
    for packet in video.encode():
        container.mux(packet)
    for packet in audio.encode():
        container.mux(packet)
    container.close()
    print(f"done {frames}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
