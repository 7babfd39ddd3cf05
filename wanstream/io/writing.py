"""Writing video files: :class:`VideoWriter` (H.264 by default), complete or not at all, optionally with an input's
audio track and timestamps."""

from __future__ import annotations

import os
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

from wanstream.io.audio import AudioMux, AudioTrack
from wanstream.io.files import PathLike, VideoError, commit, discard, temp_beside
from wanstream.io.framing import _frames_array


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

    Timing: frames are ``1 / fps`` apart unless :meth:`write` gets their ``pts``, in ticks of ``time_base``
    (e.g. an input's own timestamps, for variable frame rates); ``start`` (seconds) is subtracted from those and
    from the ``audio`` track's, which is carried along (:class:`~wanstream.io.audio.AudioMux`).

    ``atomic`` (the default): the file is written to a hidden temporary file beside ``path`` and renamed to
    ``path`` by :meth:`close` only when complete and holding at least one frame; an exception inside the ``with``
    block (Ctrl-C included) or :meth:`abort` removes it, so a failure never leaves a partial or empty file.

    Reproducible: the same frames give the same file bytes on the same machine (:data:`ENCODER_THREADS` frame
    threads, :func:`x264_asm_flags`; the container carries no creation time).
    """

    def __init__(self, path: PathLike, fps: float | Fraction, width: int, height: int, codec: str = "libx264",
                 crf: int = 18, qscale: int = 3, preset: str = "veryfast", *, time_base: Fraction | None = None,
                 start: Fraction | float = 0, audio: AudioTrack | None = None, atomic: bool = True) -> None:
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
        self.time_base = Fraction(time_base) if time_base else 1 / rate
        self._step = 1 / (rate * self.time_base)         # ticks per frame when no pts is given
        self._shift = round(Fraction(start) / self.time_base)
        self._last_pts: int | None = None
        self._closed = False
        self._audio: AudioMux | None = None
        self.temp_path: Path | None = None
        try:
            if atomic:
                self.temp_path = temp_beside(self.path)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self._container = av.open(str(self.temp_path or self.path), mode="w")
        except (av.FFmpegError, OSError, ValueError) as exc:
            discard(self.temp_path)
            raise VideoError(f"{self.path}: cannot write a video here ({exc})") from None
        try:
            self._stream = self._container.add_stream(codec, rate=rate)
            self._stream.width, self._stream.height, self._stream.pix_fmt = width, height, "yuv420p"
            ctx = self._stream.codec_context
            if time_base:
                ctx.time_base = self._stream.time_base = self.time_base
            ctx.thread_type, ctx.thread_count = "FRAME", ENCODER_THREADS
            if codec in ("libx264", "libx265"):
                ctx.options = {"crf": str(crf), "preset": preset}
            if codec == "libx264" and (asm := x264_asm_flags()):
                ctx.options = {**ctx.options, "x264-params": f"asm={asm}"}
            elif codec == "mpeg4":
                ctx.qmin = ctx.qmax = qscale  # a constant quantiser, like ffmpeg's -q:v
            if audio is not None:
                self._audio = AudioMux(audio, self._container, Fraction(start))
            self._container.start_encoding()  # opens the file now, so a bad path fails here and not later
        except (av.FFmpegError, OSError, ValueError) as exc:
            self.abort()
            if isinstance(exc, VideoError):
                raise
            raise VideoError(f"{self.path}: cannot write a video here ({exc})") from None

    @property
    def audio_copied(self) -> bool | None:
        """True: the audio packets are copied; False: re-encoded as AAC; None: no audio track."""
        return None if self._audio is None else self._audio.copy

    def write(self, frames: np.ndarray, pts: int | Sequence[int] | None = None) -> None:
        """Append ``uint8 [T, H, W, 3]`` or ``[H, W, 3]`` frames of the writer's size; ``pts``: their timestamps in
        ``time_base`` ticks (one int per frame, increasing; ``start`` is subtracted), else ``1 / fps`` apart."""
        if self._closed:
            raise VideoError(f"{self.path}: the writer is closed")
        arr = _frames_array(frames)
        batch = arr[None] if arr.ndim == 3 else arr
        if batch.shape[1:3] != (self.height, self.width):
            raise VideoError(f"{self.path}: frames are {batch.shape[2]}x{batch.shape[1]}, "
                             f"the writer was opened for {self.width}x{self.height}")
        stamps = [pts] if isinstance(pts, (int, np.integer)) else pts
        if stamps is not None and len(stamps) != len(batch):
            raise ValueError(f"got {len(batch)} frames but {len(stamps)} timestamps")
        try:
            for i, image in enumerate(batch):
                if stamps is None:
                    t = round(self.frames_written * self._step)
                else:
                    t = int(stamps[i]) - self._shift
                if self._last_pts is not None and t <= self._last_pts:
                    raise VideoError(f"{self.path}: frame timestamps must increase, got {t} after "
                                     f"{self._last_pts}")
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
                frame.pts, frame.time_base = t, self.time_base
                self._container.mux(self._stream.encode(frame))
                self._last_pts = t
                self.frames_written += 1
                if self._audio is not None:
                    self._audio.mux_until(t * self.time_base)
        except (av.FFmpegError, OSError) as exc:
            raise VideoError(f"{self.path}: encoding failed at frame {self.frames_written} ({exc})") from None

    def close(self) -> None:
        """Flush the encoder and finish the file (then, when atomic, move it into place); calling it again does
        nothing. An atomic writer that got no frame keeps no file and raises :class:`VideoError`."""
        if self._closed:
            return
        self._closed = True
        try:
            self._container.mux(self._stream.encode(None))
            if self._audio is not None:
                self._audio.close()
        except (av.FFmpegError, OSError, VideoError) as exc:
            self._drop()
            if isinstance(exc, VideoError):
                raise
            raise VideoError(f"{self.path}: finishing the video failed ({exc})") from None
        try:
            self._container.close()
        except (av.FFmpegError, OSError) as exc:
            discard(self.temp_path)
            raise VideoError(f"{self.path}: finishing the video failed ({exc})") from None
        if self.temp_path is not None:
            if self.frames_written == 0:
                discard(self.temp_path)
                raise VideoError(f"{self.path}: no frame was written, so no file was kept")
            try:
                commit(self.temp_path, self.path)
            except OSError as exc:
                discard(self.temp_path)
                raise VideoError(f"{self.path}: cannot move the finished video into place ({exc})") from None

    def _drop(self) -> None:
        if self._audio is not None:
            self._audio.abort()
        try:
            self._container.close()
        except (av.FFmpegError, OSError):
            pass
        discard(self.temp_path)

    def abort(self) -> None:
        """Stop without finishing: the temporary file is removed (a non-atomic writer's file stays, unfinished)."""
        self._closed = True
        self._drop()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()
