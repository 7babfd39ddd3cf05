"""Frame codecs of the transports: JPEG and a lossless raw-RGB message both ways, video frames from WebRTC.

Every uploaded frame ends up as RGB ``uint8 [H, W, 3]`` at the session resolution: a frame of another aspect
ratio is framed by the session's ``fit`` (centred crop by default, pad or stretch: :func:`~wanstream.io.video.
fit_frames`, the same rule as files), then resized. Anything that is not a decodable frame raises
:class:`FrameError` with a short code for the client.

Raw message (little endian): ``b"WSRF"``, uint16 width, uint16 height, uint32 frame index, then
``width * height * 3`` RGB bytes. Downlink raw messages carry the index of the input frame they restyle.
"""

from __future__ import annotations

import io
import struct

import numpy as np
from PIL import Image

from wanstream.io.video import fit_frames

JPEG_MAGIC = b"\xff\xd8\xff"
RAW_MAGIC = b"WSRF"
RAW_HEADER = struct.Struct("<4sHHI")


class FrameError(ValueError):
    """An uploaded frame that cannot be used; ``code`` is sent to the client with the message."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def fit_frame(image: np.ndarray, width: int, height: int, fit: str = "crop") -> np.ndarray:
    """Frame ``image`` to ``width x height`` (``fit``: crop | pad | stretch); frames of that size pass as they are."""
    if image.shape[:2] == (height, width):
        return image
    return fit_frames(np.ascontiguousarray(image), width, height, fit)


def decode_frame(data: bytes, width: int, height: int, max_pixels: int,
                 fit: str = "crop") -> tuple[np.ndarray, int | None]:
    """A JPEG or raw message → ``(RGB frame at width x height, index or None)``."""
    if data[:4] == RAW_MAGIC:
        image, index = unpack_raw(data, max_pixels)
        return fit_frame(image, width, height, fit), index
    if data[:3] != JPEG_MAGIC:
        raise FrameError("not_jpeg", "binary messages must be JPEG images (or raw WSRF frames)")
    try:
        img = Image.open(io.BytesIO(data), formats=["JPEG"])
        w, h = img.size
        if w < 1 or h < 1 or w * h > max_pixels:
            raise FrameError("frame_too_large", f"JPEG of {w}x{h} pixels is over the limit of {max_pixels} pixels")
        img.draft("RGB", (width, height))   # DCT scaling: big camera frames decode at a fraction of the cost
        rgb = np.array(img.convert("RGB"))   # writable (torch warns on read-only arrays)
    except FrameError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise FrameError("bad_jpeg", f"cannot decode the JPEG frame ({exc})") from None
    return fit_frame(rgb, width, height, fit), None


def encode_jpeg(image: np.ndarray, quality: int = 85) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def pack_raw(image: np.ndarray, index: int = 0) -> bytes:
    h, w = image.shape[:2]
    return RAW_HEADER.pack(RAW_MAGIC, w, h, index & 0xFFFFFFFF) + np.ascontiguousarray(image, np.uint8).tobytes()


def unpack_raw(data: bytes, max_pixels: int = 1 << 30) -> tuple[np.ndarray, int]:
    if len(data) < RAW_HEADER.size:
        raise FrameError("bad_raw", "raw frame shorter than its header")
    magic, w, h, index = RAW_HEADER.unpack_from(data)
    if magic != RAW_MAGIC or w < 1 or h < 1:
        raise FrameError("bad_raw", "raw frame header is invalid")
    if w * h > max_pixels:
        raise FrameError("frame_too_large", f"raw frame of {w}x{h} pixels is over the limit of {max_pixels}")
    if len(data) != RAW_HEADER.size + w * h * 3:
        raise FrameError("bad_raw", f"raw frame of {w}x{h} needs {w * h * 3} bytes, "
                                    f"got {len(data) - RAW_HEADER.size}")
    image = np.frombuffer(data, np.uint8, offset=RAW_HEADER.size).reshape(h, w, 3).copy()
    return image, index


def video_frame_to_rgb(frame, width: int, height: int, fit: str = "crop") -> np.ndarray:
    """An ``av.VideoFrame`` (WebRTC) → RGB frame at the session size."""
    return fit_frame(frame.to_ndarray(format="rgb24"), width, height, fit)
