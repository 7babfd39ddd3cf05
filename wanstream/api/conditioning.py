"""Reference images as user input: read and validated (a file, or uploaded bytes), size-capped, as RGB uint8.

What a bad image gets is a :class:`ReferenceError` naming the problem (not an image, too large, wrong type), which
the server answers with a 4xx and the command line prints. The tensor side is ``engine/conditioning.py``.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

MAX_REFERENCE_BYTES = 16 * 1024 * 1024        # an uploaded / read reference file
MAX_REFERENCE_PIXELS = 4096 * 4096            # decoded size (a small file can decode to a huge image)
REFERENCE_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "BMP": "image/bmp"}


class ReferenceImageError(ValueError):
    """A reference image that cannot be used; ``kind``: ``not_an_image`` | ``too_large`` | ``wrong_type``."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


def decode_reference(data: bytes, name: str = "the reference image", max_bytes: int = MAX_REFERENCE_BYTES,
                     max_pixels: int = MAX_REFERENCE_PIXELS) -> np.ndarray:
    """Image bytes (PNG, JPEG, WebP or BMP) → RGB ``uint8 [H, W, 3]``; refused with the reason otherwise."""
    from PIL import Image, UnidentifiedImageError
    if len(data) > max_bytes:
        raise ReferenceImageError(f"{name} is too large: {len(data)} bytes, at most {max_bytes}", "too_large")
    if not data:
        raise ReferenceImageError(f"{name} is empty: not an image", "not_an_image")
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format not in REFERENCE_TYPES:
                raise ReferenceImageError(f"{name} is a {img.format} image; use one of "
                                          f"{', '.join(sorted(REFERENCE_TYPES))}", "wrong_type")
            w, h = img.size
            if w * h > max_pixels:
                raise ReferenceImageError(f"{name} is too large: {w}x{h} pixels, at most {max_pixels}", "too_large")
            arr = np.array(img.convert("RGB"), dtype=np.uint8)         # a writable copy
    except ReferenceImageError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ReferenceImageError(f"{name} is not an image ({type(exc).__name__})", "not_an_image") from None
    return arr


def read_reference(path: str | Path, max_bytes: int = MAX_REFERENCE_BYTES) -> np.ndarray:
    """A reference image file (read only: the file is never opened for writing)."""
    path = Path(path)
    if not path.is_file():
        raise ReferenceImageError(f"{path}: reference image not found", "not_an_image")
    size = path.stat().st_size
    if size > max_bytes:
        raise ReferenceImageError(f"{path}: reference image is too large: {size} bytes, at most {max_bytes}",
                                  "too_large")
    return decode_reference(path.read_bytes(), str(path), max_bytes)
