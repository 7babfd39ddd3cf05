"""A deterministic synthetic clip with clear motion (demo, tests and benchmarks: ``wanstream clip``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from wanstream.io.files import PathLike
from wanstream.io.writing import VideoWriter

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
