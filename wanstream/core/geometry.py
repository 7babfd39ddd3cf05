"""Frame sizes: the one home of the multiple-of-16 rule and of the framing modes (no torch).

A frame's sides must be multiples of 16: the Wan VAE downsamples 8× in space and the DiT's patch embedding takes
2×2 latent patches. Inputs of another size are rounded down (:func:`fit_resolution`) and framed into the model's
size by one of :data:`FIT_MODES` (``io.video.fit_frames`` does the pixels).
"""

from __future__ import annotations

import re

VAE_STRIDE = 8          # the Wan VAE downsamples 8x in space (the DiT then takes 2x2 latent patches)
PIXEL_MULTIPLE = 16
FIT_MODES = ("crop", "pad", "stretch")
_RESOLUTION = re.compile(r"\s*(\d+)\s*[xX]\s*(\d+)\s*")


def check_resolution(width: int, height: int) -> tuple[int, int]:
    """``(width, height)`` when both are positive multiples of 16, else a ValueError naming the size."""
    if width <= 0 or height <= 0 or width % PIXEL_MULTIPLE or height % PIXEL_MULTIPLE:
        raise ValueError(f"resolution must be positive multiples of {PIXEL_MULTIPLE}, got {width}x{height}")
    return width, height


def fit_resolution(width: int, height: int, multiple: int = PIXEL_MULTIPLE) -> tuple[int, int]:
    """Round a size down to multiples of ``multiple`` (at least one multiple each way)."""
    if width < 1 or height < 1 or multiple < 1:
        raise ValueError(f"size and multiple must be positive, got {width}x{height} and multiple {multiple}")
    return max(multiple, width // multiple * multiple), max(multiple, height // multiple * multiple)


def parse_resolution(text: str, multiple: int = PIXEL_MULTIPLE) -> tuple[int, int]:
    """``"512x512"`` -> ``(512, 512)``; both sides positive multiples of ``multiple``, else ValueError."""
    match = _RESOLUTION.fullmatch(text)
    if match:
        width, height = int(match[1]), int(match[2])
        if width > 0 and height > 0 and width % multiple == 0 and height % multiple == 0:
            return width, height
    raise ValueError(f"bad resolution {text!r}: expected WxH with positive multiples of {multiple}, e.g. 512x512")


def check_fit(mode: str) -> str:
    if mode not in FIT_MODES:
        raise ValueError(f"fit must be one of {', '.join(FIT_MODES)}, got {mode!r}")
    return mode
