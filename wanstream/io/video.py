"""Video file I/O (PyAV), frame resizing and framing, pixel <-> tensor conversion and a synthetic motion clip.

Frames are RGB ``uint8`` arrays, ``[H, W, 3]`` for one frame and ``[T, H, W, 3]`` for several. Model tensors are
``[T, 3, H, W]`` floats in ``[-1, 1]``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F

from wanstream.core.geometry import FIT_MODES, check_fit, fit_resolution, parse_resolution  # noqa: F401

PathLike = str | os.PathLike


class VideoError(ValueError):
    """A video file is missing, unreadable, empty, or cannot be written."""


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe_video` learns from a file's first video stream."""

    width: int
    height: int
    fps: float
    frames: int | None  # frame count from the container header; None when it does not say


# ---------------------------------------------------------------------------------------------------------------
# reading


def _check_input(path: PathLike) -> Path:
    if not os.fspath(path):
        raise VideoError("video path is empty ('')")
    p = Path(path)
    if not p.exists():
        raise VideoError(f"{p}: no such file")
    if not p.is_file():
        raise VideoError(f"{p}: not a file")
    return p


def _open_input(path: PathLike) -> tuple[av.container.InputContainer, av.VideoStream, Path]:
    p = _check_input(path)
    try:
        container = av.open(str(p), mode="r")
    except (av.FFmpegError, OSError) as exc:
        raise VideoError(f"{p}: not a readable video file ({exc})") from None
    if not container.streams.video:
        container.close()
        raise VideoError(f"{p}: no video stream")
    return container, container.streams.video[0], p


def _stream_fps(stream: av.VideoStream, p: Path) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate:
        raise VideoError(f"{p}: the video stream has no frame rate")
    return float(rate)


def probe_video(path: PathLike) -> VideoInfo:
    """Size, frame rate and (if the header knows it) frame count of the first video stream."""
    container, stream, p = _open_input(path)
    try:
        width, height = stream.codec_context.width, stream.codec_context.height
        if width <= 0 or height <= 0:
            raise VideoError(f"{p}: the video stream has no frame size")
        return VideoInfo(width, height, _stream_fps(stream, p), stream.frames or None)
    finally:
        container.close()


def iter_frames(path: PathLike) -> Iterator[np.ndarray]:
    """Decode the first video stream frame by frame as RGB ``uint8 [H, W, 3]`` (streaming).

    Raises :class:`VideoError` for a missing / non-video file (on the first ``next``), for decode errors, and
    when the stream holds no frames at all.
    """
    container, stream, p = _open_input(path)
    stream.thread_type = "AUTO"
    count = 0
    try:
        for frame in container.decode(stream):
            count += 1
            yield frame.to_ndarray(format="rgb24")
    except av.FFmpegError as exc:
        raise VideoError(f"{p}: decoding failed after {count} frames ({exc})") from None
    finally:
        container.close()
    if count == 0:
        raise VideoError(f"{p}: the video is empty (no frames)")


def read_video(path: PathLike) -> tuple[np.ndarray, float]:
    """Decode a whole file: ``(frames uint8 [T, H, W, 3], fps)``."""
    fps = probe_video(path).fps
    return np.stack(list(iter_frames(path))), fps


# ---------------------------------------------------------------------------------------------------------------
# sizes and pixel conversion


def _frames_array(frames: np.ndarray) -> np.ndarray:
    arr = np.asarray(frames)
    if arr.ndim not in (3, 4) or arr.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T, H, W, 3] or [H, W, 3], got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {arr.dtype}")
    return arr


def resize_frames(frames: np.ndarray, width: int, height: int) -> np.ndarray:
    """Antialiased bilinear resize of ``uint8 [T, H, W, 3]`` or ``[H, W, 3]`` frames (same layout back).

    Uses torch's uint8 channels-last kernel, so down-scaling averages instead of aliasing. Frames already at
    the requested size are returned as they are.
    """
    arr = _frames_array(frames)
    if width < 1 or height < 1:
        raise ValueError(f"resize target must be positive, got {width}x{height}")
    if arr.shape[-3:-1] == (height, width):
        return arr
    batch = torch.from_numpy(np.ascontiguousarray(arr.reshape(-1, *arr.shape[-3:]))).permute(0, 3, 1, 2)
    out = F.interpolate(batch, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    out = out.permute(0, 2, 3, 1).contiguous().numpy()
    return out if arr.ndim == 4 else out[0]




def fit_frames(frames: np.ndarray, width: int, height: int, mode: str = "crop") -> np.ndarray:
    """Frame ``uint8 [T, H, W, 3]`` or ``[H, W, 3]`` frames to ``width x height`` when their aspect differs.

    * ``crop`` (default): the largest centred region of the target aspect is cut out, then resized (fills the
      frame, loses the edges of the longer side);
    * ``pad``: resized to fit inside, centred on black bars (keeps everything, letter- or pillarbox);
    * ``stretch``: resized to the target size, distorting the aspect.

    Frames already at the target size are returned as they are; resizing is :func:`resize_frames`.
    """
    check_fit(mode)
    arr = _frames_array(frames)
    if width < 1 or height < 1:
        raise ValueError(f"frame target must be positive, got {width}x{height}")
    h, w = arr.shape[-3:-1]
    if (h, w) == (height, width) or mode == "stretch":
        return resize_frames(arr, width, height)
    if mode == "crop":
        # the centred crop of the target aspect: full height when the source is wider, else full width
        cw, ch = (round(h * width / height), h) if w * height > h * width else (w, round(w * height / width))
        cw, ch = max(1, min(w, cw)), max(1, min(h, ch))
        x0, y0 = (w - cw) // 2, (h - ch) // 2
        return resize_frames(arr[..., y0: y0 + ch, x0: x0 + cw, :], width, height)
    # pad: the resized frame fits inside the target, on black
    sw, sh = (width, round(h * width / w)) if w * height > h * width else (round(w * height / h), height)
    sw, sh = max(1, min(width, sw)), max(1, min(height, sh))
    out = np.zeros((*arr.shape[:-3], height, width, 3), np.uint8)
    x0, y0 = (width - sw) // 2, (height - sh) // 2
    out[..., y0: y0 + sh, x0: x0 + sw, :] = resize_frames(arr, sw, sh)
    return out


def frames_to_tensor(frames: np.ndarray, device: torch.device | str | None = None,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``uint8 [T, H, W, 3]`` -> ``[T, 3, H, W]`` in ``[-1, 1]`` (``x / 127.5 - 1``), converted on ``device``."""
    arr = _frames_array(frames)
    if arr.ndim != 4:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got shape {arr.shape}")
    t = torch.from_numpy(np.ascontiguousarray(arr)).to(device)
    return (t.permute(0, 3, 1, 2).to(dtype) / 127.5 - 1.0).contiguous()


def tensor_to_frames(tensor: torch.Tensor) -> np.ndarray:
    """``[T, 3, H, W]`` in ``[-1, 1]`` -> ``uint8 [T, H, W, 3]`` (rounded, clamped), on the CPU."""
    if tensor.ndim != 4 or tensor.shape[1] != 3:
        raise ValueError(f"expected a tensor [T, 3, H, W], got shape {tuple(tensor.shape)}")
    pixels = ((tensor.detach().float() + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()


# ---------------------------------------------------------------------------------------------------------------
# writing


def _has_encoder(name: str) -> bool:
    try:
        av.Codec(name, "w")
    except ValueError:  # av.codec.codec.UnknownCodecError
        return False
    return True


# Encoder threads of the writer: a fixed count, so the bitstream does not depend on how many cores the process
# may use (x264's frame threads are deterministic for a given count; its "auto" count follows the core count).
ENCODER_THREADS = 4


def x264_asm_flags() -> str | None:
    """The x264 ``asm`` setting that keeps its output reproducible on this CPU (``None``: x264's own choice).

    x264's AVX-512 routines (as built into PyAV's wheels) make the bitstream differ from run to run: at 160x96
    a quarter of encodes of the same frames differed (a few percent with one thread); restricted to AVX2, 100 of
    100 runs gave the same bytes (which are also what the AVX-512 runs give most of the time). So on CPUs with
    AVX2 (which every AVX-512 CPU has) x264 is limited to AVX2. Elsewhere it keeps its own choice.
    """
    capability = torch.backends.cpu.get_cpu_capability()
    return "AVX2" if capability in ("AVX2", "AVX512") else None


class VideoWriter:
    """Encode RGB frames into a video file (H.264 in ``.mp4`` by default); use as a context manager.

    ``codec="libx264"`` falls back to ``"mpeg4"`` when this PyAV build has no x264 encoder (:attr:`codec` says
    which one is used). Quality: ``crf`` for x264 (0 = best, 18 = visually lossless), ``qscale`` for mpeg4
    (1 = best, 31 = worst). ``fps`` may be fractional (29.97 is stored as the rate 2997/100). Every written
    frame is kept: the frame count and rate read back are the ones written. Width and height must be even
    (yuv420p). Missing parent folders are created.

    Reproducible: the same frames give the same file bytes on the same machine (:data:`ENCODER_THREADS` frame
    threads, :func:`x264_asm_flags`; the container carries no creation time).
    """

    def __init__(self, path: PathLike, fps: float | Fraction, width: int, height: int, codec: str = "libx264",
                 crf: int = 18, qscale: int = 3, preset: str = "veryfast") -> None:
        if not os.fspath(path):
            raise VideoError("output video path is empty ('')")
        self.path = Path(path)
        self.width, self.height = width, height
        if width < 2 or height < 2 or width % 2 or height % 2:
            raise VideoError(f"{self.path}: width and height must be even and positive, got {width}x{height}")
        try:
            rate = Fraction(fps).limit_denominator(1001)
        except (ValueError, OverflowError):  # nan, inf
            rate = Fraction(0)
        if rate <= 0:
            raise VideoError(f"{self.path}: fps must be positive and finite, got {fps}")
        if codec == "libx264" and not _has_encoder(codec):
            codec = "mpeg4"
        if not _has_encoder(codec):
            raise VideoError(f"{self.path}: video encoder {codec!r} is not available in this PyAV build")
        self.codec = codec
        self.frames_written = 0
        self._time_base = 1 / rate
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._container = av.open(str(self.path), mode="w")
        except (av.FFmpegError, OSError, ValueError) as exc:
            raise VideoError(f"{self.path}: cannot write a video here ({exc})") from None
        try:
            self._stream = self._container.add_stream(codec, rate=rate)
            self._stream.width, self._stream.height, self._stream.pix_fmt = width, height, "yuv420p"
            ctx = self._stream.codec_context
            ctx.thread_type, ctx.thread_count = "FRAME", ENCODER_THREADS
            if codec in ("libx264", "libx265"):
                ctx.options = {"crf": str(crf), "preset": preset}
            if codec == "libx264" and (asm := x264_asm_flags()):
                ctx.options = {**ctx.options, "x264-params": f"asm={asm}"}
            elif codec == "mpeg4":
                ctx.qmin = ctx.qmax = qscale  # a constant quantiser, like ffmpeg's -q:v
            self._container.start_encoding()  # opens the file now, so a bad path fails here and not later
        except (av.FFmpegError, OSError, ValueError) as exc:
            self._container.close()
            raise VideoError(f"{self.path}: cannot write a video here ({exc})") from None
        self._closed = False

    def write(self, frames: np.ndarray) -> None:
        """Append ``uint8 [T, H, W, 3]`` or ``[H, W, 3]`` frames of the writer's size."""
        if self._closed:
            raise VideoError(f"{self.path}: the writer is closed")
        arr = _frames_array(frames)
        batch = arr[None] if arr.ndim == 3 else arr
        if batch.shape[1:3] != (self.height, self.width):
            raise VideoError(f"{self.path}: frames are {batch.shape[2]}x{batch.shape[1]}, "
                             f"the writer was opened for {self.width}x{self.height}")
        try:
            for image in batch:
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
                frame.pts, frame.time_base = self.frames_written, self._time_base
                self._container.mux(self._stream.encode(frame))
                self.frames_written += 1
        except (av.FFmpegError, OSError) as exc:
            raise VideoError(f"{self.path}: encoding failed at frame {self.frames_written} ({exc})") from None

    def close(self) -> None:
        """Flush the encoder and finish the file; calling it again does nothing."""
        if self._closed:
            return
        self._closed = True
        try:
            self._container.mux(self._stream.encode(None))
        except (av.FFmpegError, OSError) as exc:
            raise VideoError(f"{self.path}: finishing the video failed ({exc})") from None
        finally:
            self._container.close()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------------------
# synthetic clip

_PALETTE = np.array([[230, 40, 40], [40, 200, 60], [40, 90, 230], [240, 200, 30], [200, 50, 220], [30, 210, 220]],
                    dtype=np.float32)


def _motion_frames(num_frames: int, width: int, height: int, seed: int) -> Iterator[np.ndarray]:
    """The frames of :func:`make_motion_clip`, rendered one at a time (arguments are checked at once)."""
    if num_frames < 1 or width < 1 or height < 1:
        raise ValueError(f"clip needs positive frames and size, got {num_frames} frames {width}x{height}")
    rng = np.random.default_rng(seed)
    ys = np.arange(height, dtype=np.float32)[:, None]
    xs = np.arange(width, dtype=np.float32)[None, :]
    # A background that tiles (integer cycles per frame), so a pan just wraps indices around.
    tile = np.zeros((height, width, 3), np.float32) + rng.uniform(70, 150, 3).astype(np.float32)
    for _ in range(4):
        kx, ky = rng.integers(1, 9, 2)
        phase = rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * (kx * xs / width + ky * ys / height) + phase)
        tile += wave[..., None] * rng.uniform(-30, 30, 3).astype(np.float32)
    checker = np.sign(np.sin(2 * np.pi * max(1, width // 8) * xs / width) *
                      np.sin(2 * np.pi * max(1, height // 8) * ys / height))
    tile += 12 * checker[..., None]
    colours = _PALETTE[rng.permutation(len(_PALETTE))[:2]]
    size = min(width, height)
    radius, half = max(2.0, size / 8), max(2.0, size / 12)
    # Motion time: 1 per frame, 6 per frame during a short burst in the middle of the clip.
    fast = range(num_frames // 2, num_frames // 2 + max(2, num_frames // 8))
    speeds = np.array([6.0 if i in fast else 1.0 for i in range(num_frames)])
    taus = np.cumsum(speeds) - speeds[0]
    pan = max(1.0, width / 128)

    def render(tau: float) -> np.ndarray:
        ox, oy = int(round(pan * tau)), int(round(height / 16 * np.sin(2 * np.pi * tau / 40)))
        frame = tile[(np.arange(height) + oy) % height][:, (np.arange(width) + ox) % width]
        frame[..., 0] += 35 * np.sin(2 * np.pi * (xs[0] / width - tau / 48))  # a sweeping colour gradient
        tri = 1 - abs((tau / 24) % 2 - 1)  # triangle wave 0..1..0 over 48 motion steps
        cx, cy = radius + (width - 2 * radius) * tri, height * (0.3 + 0.1 * np.sin(2 * np.pi * tau / 32))
        frame[(xs - cx) ** 2 + (ys - cy) ** 2 < radius ** 2] = colours[0]
        sx = width / 2 + 0.3 * width * np.cos(2 * np.pi * tau / 64)
        sy = height / 2 + 0.3 * height * np.sin(2 * np.pi * tau / 64)
        frame[(abs(xs - sx) < half) & (abs(ys - sy) < half)] = colours[1]
        return np.clip(frame, 0, 255).astype(np.uint8)

    return (render(tau) for tau in taus)


def make_motion_clip(num_frames: int, width: int, height: int, seed: int = 0) -> np.ndarray:
    """A deterministic synthetic clip ``uint8 [T, H, W, 3]`` with clear motion.

    A textured background pans right and bobs vertically, a colour gradient sweeps across it, a circle bounces
    left-right and a square circles the centre; for about T/8 frames in the middle everything moves 6x faster.
    ``seed`` picks the texture and colours.
    """
    return np.stack(list(_motion_frames(num_frames, width, height, seed)))


def write_motion_clip(path: PathLike, num_frames: int, width: int, height: int, fps: float = 16.0,
                      seed: int = 0) -> Path:
    """Write :func:`make_motion_clip` frames to ``path`` (streamed, H.264 at crf 18); returns the path."""
    frames = _motion_frames(num_frames, width, height, seed)
    with VideoWriter(path, fps, width, height) as writer:
        for frame in frames:
            writer.write(frame)
    return writer.path
