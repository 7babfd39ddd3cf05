"""Reference images as user input: read and validated (a file, or uploaded bytes), size-capped, as RGB uint8.

What a bad image gets is a :class:`ReferenceError` naming the problem (not an image, too large, wrong type), which
the server answers with a 4xx and the command line prints. The tensor side is ``engine/conditioning.py``.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

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


# ------------------------------------------------------------------------------------------------ presets
MAX_PRESET_REFERENCE_CHARS = 8 * 2**20        # a data URI in a preset (the file or request bound is the real one)


class PresetConditioning(BaseModel):
    """A preset's VACE conditioning (``api/presets.py``): ``reference`` an image file (relative to the preset's
    folder) or the image itself as a ``data:image/png;base64,...`` URI, the hints' ``strength``, the ``control`` kind.
    The server opens no file: a preset sent to it embeds its image."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    reference: str | None = Field(None, min_length=1, max_length=MAX_PRESET_REFERENCE_CHARS)
    strength: float = Field(1.0, ge=0.0, le=4.0)
    control: Literal["none", "edges", "depth", "flow", "pose"] | None = None

    @property
    def embedded(self) -> bool:
        return self.reference is not None and self.reference.startswith("data:")

    def image(self, folder: Path | None = None, max_bytes: int = MAX_REFERENCE_BYTES) -> np.ndarray | None:
        """The reference image (None without): decoded from the URI, or read from the file."""
        if self.reference is None:
            return None
        if self.embedded:
            return decode_reference(data_uri_bytes(self.reference), "conditioning.reference", max_bytes)
        return read_reference((folder or Path.cwd()) / self.reference, max_bytes)


def data_uri_bytes(uri: str) -> bytes:
    """The bytes of a ``data:image/...;base64,`` URI (a :class:`ReferenceImageError` naming what is wrong)."""
    import base64
    import binascii
    head, sep, body = uri.partition(",")
    mime = head[len("data:"):].split(";")[0].lower()
    if not sep or not head.endswith(";base64"):
        raise ReferenceImageError("conditioning.reference: a data URI must be data:image/...;base64,...",
                                  "not_an_image")
    if mime not in REFERENCE_TYPES.values():
        raise ReferenceImageError(f"conditioning.reference: wrong type {mime[:40]!r} (use one of "
                                  f"{', '.join(REFERENCE_TYPES.values())})", "wrong_type")
    try:
        return base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise ReferenceImageError("conditioning.reference: not base64", "not_an_image") from None


def data_uri(image: np.ndarray, quality: int = 90) -> str:
    """An RGB uint8 image as a ``data:image/jpeg;base64,`` URI (a preset that carries its reference)."""
    import base64

    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
