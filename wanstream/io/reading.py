"""Reading what creators record: video files in any container PyAV opens (MP4, MOV, MKV, WebM, AVI, animated GIF,
…), image sequences and single still images, as RGB ``uint8 [H, W, 3]`` frames with their timestamps.

* Nothing relies on the header's frame count (MKV, WebM and GIF headers often have none): frames are counted as
  they are decoded; :attr:`VideoInfo.frames` is the header's count when it has one, for progress only.
* Timestamps are the input's own (pts in the stream's time base), so variable-frame-rate clips keep their timing.
* Rotated phone videos (a display matrix) are turned upright; 10-bit and other pixel formats are converted to
  8-bit RGB; odd sizes are kept as they are (the engine frames them).
* An image sequence is a folder of images (natural order: ``2.png`` before ``10.png``), a printf pattern
  (``frames/%04d.png``) or a glob pattern (``'frames/*.png'``), played at ``fps`` (default 16). A still image
  becomes a clip of ``still_frames`` identical frames (default 16, i.e. one second at 16 fps).

Every problem is a :class:`~wanstream.io.files.VideoError` naming the file and the reason.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from wanstream.io.audio import AudioTrack, probe_audio
from wanstream.io.files import PathLike, VideoError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
DEFAULT_IMAGE_FPS = 16.0
DEFAULT_STILL_FRAMES = 16
MAX_FPS = 1000.0            # a stated frame rate above this is a time base, not a rate (WebM says 1000/1)


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe_video` learns about an input."""

    width: int                   # as displayed (after the rotation)
    height: int
    fps: float                   # nominal frame rate (the average; for image sequences and stills the one given)
    frames: int | None           # frame count from the container header; None when it does not say
    rotation: int = 0            # degrees counter-clockwise the decoded frames are turned (display matrix)
    kind: str = "video"          # video | images | still
    audio: str | None = None     # codec of the first audio track, None without one


@dataclass(frozen=True)
class Frame:
    image: np.ndarray            # RGB uint8 [H, W, 3], upright
    pts: int                     # timestamp in VideoSource.time_base ticks, increasing


@dataclass(frozen=True)
class VideoSource:
    """An input ready to decode: a video file, an image sequence or a still image (:func:`open_video`)."""

    path: Path                   # as given: a file, a folder or a pattern
    info: VideoInfo
    time_base: Fraction          # of the frames' pts
    start: Fraction              # seconds: the first frame's time
    files: tuple[Path, ...]      # the files read (an image sequence's members)
    audio: AudioTrack | None = None
    _stream: int = 0             # video stream index
    _repeat: int = 1             # a still image: frames made of the one image
    _step: int = 1               # pts ticks per frame where the input has none

    @property
    def name(self) -> str:
        return source_name(self.path)

    def timeline_start(self, audio: bool) -> Fraction:
        """Seconds that become 0 in an output: the earliest start of the streams kept (so their offset stays)."""
        if audio and self.audio is not None:
            return min(self.start, self.audio.start)
        return self.start

    def frames(self) -> Iterator[Frame]:
        """Decode every frame (streaming). Raises :class:`VideoError` for decode errors and when nothing decodes."""
        if self.info.kind == "video":
            yield from _video_frames(self)
        elif self.info.kind == "still":
            image = _decode_image(self.files[0])
            for i in range(self._repeat):
                yield Frame(image, i * self._step)
        else:
            size = (self.info.height, self.info.width)
            for i, file in enumerate(self.files):
                image = _decode_image(file)
                if image.shape[:2] != size:
                    raise VideoError(f"{file}: the image is {image.shape[1]}x{image.shape[0]}, the sequence's first "
                                     f"is {size[1]}x{size[0]} (every image of a sequence must have one size)")
                yield Frame(image, i * self._step)


def source_name(path: PathLike) -> str:
    """A file stem for outputs named after an input (nothing is opened): a file's stem; a folder's name, or for a
    pattern (``frames/%04d.png``, ``frames/*.png``) its folder's name."""
    p = Path(path)
    if p.is_dir() or (not p.exists() and ("%" in p.name or glob.has_magic(p.name))):
        folder = p if p.is_dir() else p.parent
        return folder.resolve().name or "images"
    return p.stem


# ---------------------------------------------------------------------------------------------------------------
# opening


def _upright(image: np.ndarray, rotation: int) -> np.ndarray:
    k = round(rotation / 90) % 4
    return np.ascontiguousarray(np.rot90(image, k)) if k else image


def _rotation(frame: av.VideoFrame) -> int:
    try:
        return int(round((frame.rotation or 0) / 90)) % 4 * 90
    except (AttributeError, TypeError, ValueError):
        return 0


def _fps(stream: av.VideoStream) -> float | None:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate and 0 < rate <= MAX_FPS:
            return float(rate)
    return None


def _rate_fraction(fps: float) -> Fraction:
    try:
        rate = Fraction(fps).limit_denominator(1001)
    except (ValueError, OverflowError, TypeError):
        rate = Fraction(0)
    if not 0 < rate <= MAX_FPS:
        raise VideoError(f"frame rate must be in (0, {MAX_FPS:g}], got {fps}")
    return rate


def _natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


def _printf_files(pattern: Path) -> list[Path]:
    """Files matching a printf pattern's ``%d`` / ``%0Nd`` (``%%`` is a percent sign), ordered by number."""
    parts = re.split(r"(%%|%0?\d*d)", pattern.name)
    if not any(re.fullmatch(r"%0?\d*d", p) for p in parts):
        raise VideoError(f"{pattern}: a pattern needs a number field like %04d or %d")
    regex = "".join("%" if p == "%%" else r"(\d+)" if re.fullmatch(r"%0?\d*d", p) else re.escape(p) for p in parts)
    folder = pattern.parent
    found = []
    if folder.is_dir():
        for entry in folder.iterdir():
            if (m := re.fullmatch(regex, entry.name)) and entry.is_file():
                found.append((tuple(int(g) for g in m.groups()), entry))
    return [p for _, p in sorted(found)]


def _sequence_files(path: Path) -> list[Path] | None:
    """The images of a folder or a pattern (None when ``path`` is neither)."""
    if path.is_dir():
        files = [p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
        if not files:
            raise VideoError(f"{path}: a folder with no images ({', '.join(IMAGE_EXTENSIONS)}) to read as a sequence")
        return sorted(files, key=_natural_key)
    if path.exists():
        return None
    text = os.fspath(path)
    if "%" in path.name:
        files = _printf_files(path)
    elif glob.has_magic(text):
        files = sorted((Path(p) for p in glob.glob(text) if os.path.isfile(p)), key=_natural_key)
    else:
        return None
    if not files:
        raise VideoError(f"{path}: no file matches this pattern")
    return files


def _open_container(p: Path) -> av.container.InputContainer:
    try:
        return av.open(str(p), mode="r")
    except (av.FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise VideoError(f"{p}: not a readable video or image file ({exc})") from None


def _decode_image(p: Path) -> np.ndarray:
    """The first picture of an image file, upright, RGB."""
    container = _open_container(p)
    try:
        if not container.streams.video:
            raise VideoError(f"{p}: not an image")
        for frame in container.decode(container.streams.video[0]):
            return _upright(frame.to_ndarray(format="rgb24"), _rotation(frame))
    except av.FFmpegError as exc:
        raise VideoError(f"{p}: the image cannot be decoded ({exc})") from None
    finally:
        container.close()
    raise VideoError(f"{p}: the image holds no picture")


def _is_image_format(container: av.container.InputContainer) -> bool:
    return container.format.name.endswith("_pipe") or container.format.name == "image2"


def open_video(path: PathLike, fps: float | None = None, still_frames: int = DEFAULT_STILL_FRAMES) -> VideoSource:
    """Probe an input (decoding its first frame, so an undecodable file fails here) and return a
    :class:`VideoSource`. ``fps`` is the rate of image sequences and stills (default 16); videos keep their own."""
    if not os.fspath(path):
        raise VideoError("video path is empty ('')")
    p = Path(path)
    if still_frames < 1:
        raise VideoError(f"a still image needs at least 1 frame, got {still_frames}")
    image_rate = _rate_fraction(DEFAULT_IMAGE_FPS if fps is None else fps)
    files = _sequence_files(p)
    if files is not None:
        first = _decode_image(files[0])
        info = VideoInfo(first.shape[1], first.shape[0], float(image_rate), len(files), kind="images")
        return VideoSource(p, info, 1 / image_rate, Fraction(0), tuple(files))
    if not p.exists():
        raise VideoError(f"{p}: no such file")
    if not p.is_file():
        raise VideoError(f"{p}: not a file")
    container = _open_container(p)
    try:
        if not container.streams.video:
            what = " (an audio file?)" if container.streams.audio else ""
            raise VideoError(f"{p}: no video stream{what}")
        stream = container.streams.video[0]
        if _is_image_format(container):
            image = _decode_image(p)
            info = VideoInfo(image.shape[1], image.shape[0], float(image_rate), still_frames, kind="still")
            return VideoSource(p, info, 1 / image_rate, Fraction(0), (p,), _repeat=still_frames)
        first = None
        try:
            for frame in container.decode(stream):
                first = frame
                break
        except av.FFmpegError as exc:
            raise VideoError(f"{p}: the video cannot be decoded ({exc})") from None
        if first is None:
            raise VideoError(f"{p}: the video is empty (no frames)")
        rotation = _rotation(first)
        width, height = (first.height, first.width) if rotation % 180 else (first.width, first.height)
        rate = _fps(stream)
        if rate is None:
            raise VideoError(f"{p}: the video stream has no frame rate")
        time_base = stream.time_base or Fraction(1, 90000)
        start_pts = first.pts if first.pts is not None else (stream.start_time or 0)
        step = max(1, round(1 / (Fraction(rate).limit_denominator(1001) * time_base)))
        audio = probe_audio(container, p)
        info = VideoInfo(width, height, rate, stream.frames or None, rotation, "video",
                         audio.codec if audio else None)
        return VideoSource(p, info, Fraction(time_base), start_pts * Fraction(time_base), (p,), audio,
                           _stream=stream.index, _step=step)
    finally:
        container.close()


def _video_frames(source: VideoSource) -> Iterator[Frame]:
    p = source.path
    container = _open_container(p)
    stream = container.streams[source._stream]
    stream.thread_type = "AUTO"
    count, last = 0, None
    try:
        for frame in container.decode(stream):
            pts = frame.pts
            if pts is None:
                pts = 0 if last is None else last + source._step
            if last is not None and pts <= last:     # broken or duplicated timestamps: keep the order, move on
                pts = last + 1
            count += 1
            last = pts
            yield Frame(_upright(frame.to_ndarray(format="rgb24"), source.info.rotation), pts)
    except av.FFmpegError as exc:
        raise VideoError(f"{p}: decoding failed after {count} frames ({exc})") from None
    finally:
        container.close()
    if count == 0:
        raise VideoError(f"{p}: the video is empty (no frames)")


# ---------------------------------------------------------------------------------------------------------------
# the simple forms


def probe_video(path: PathLike) -> VideoInfo:
    """Size (as displayed), frame rate, header frame count, rotation, kind and audio codec of an input."""
    return open_video(path).info


def iter_frames(path: PathLike) -> Iterator[np.ndarray]:
    """Decode an input frame by frame as RGB ``uint8 [H, W, 3]`` (streaming; errors on the first ``next``)."""
    for frame in open_video(path).frames():
        yield frame.image


def read_video(path: PathLike) -> tuple[np.ndarray, float]:
    """Decode a whole input: ``(frames uint8 [T, H, W, 3], fps)``."""
    source = open_video(path)
    return np.stack([f.image for f in source.frames()]), source.info.fps
