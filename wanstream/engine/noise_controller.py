"""Motion-aware noise controller (as released): more motion → less noise and a lower timestep.

For a chunk of c frames and the frame before it, ``r_j = sqrt(mean((x_j - x_{j-1})^2))`` over batch, channel
and pixels (in the clip's dtype), ``d = clamp(max_j r_j / sigma, 0, 1)``,
``s = (s_init - 0.1*d) * lam + (1 - lam) * s_prev`` (float64) and ``t = int(1000*s) - 100``.
Everything stays on the device: ``s`` and ``t`` are 0-d tensors, so the stream never waits for a host read.
"""

from __future__ import annotations

import torch


def motion_level(prev_frame: torch.Tensor, chunk: torch.Tensor, sigma: float = 0.2) -> torch.Tensor:
    """``d`` in [0, 1] for pixel frames in [-1, 1]: ``prev_frame [B, 3, H, W]``, ``chunk [B, T, 3, H, W]``."""
    frames = torch.cat([prev_frame[:, None], chunk], dim=1)
    diff = frames[:, 1:] - frames[:, :-1]                                   # [B, T, 3, H, W]
    rms = diff.pow(2).transpose(0, 1).flatten(1).mean(dim=1).sqrt()         # [T], per new frame
    return (rms.max() / sigma).clamp(0, 1)


class NoiseController:
    """Per-stream controller state; ``enabled=False`` keeps ``s = s_init`` (and ``t = int(1000*s) - 100``)."""

    def __init__(self, s_init: float = 0.8, sigma: float = 0.2, lam: float = 0.9, enabled: bool = True):
        if not 0.0 < s_init <= 1.0:
            raise ValueError(f"noise scale must be in (0, 1], got {s_init}")
        self.s_init = float(s_init)
        self.sigma = sigma
        self.lam = lam
        self.enabled = enabled
        self.s_prev: torch.Tensor | None = None

    def reset(self, s_init: float | None = None) -> None:
        if s_init is not None:
            self.s_init = float(s_init)
        self.s_prev = None

    def __call__(self, prev_frame: torch.Tensor, chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise scale ``s`` (float64) and timestep ``t`` (int64) for the newest chunk, as 0-d device tensors."""
        dev = chunk.device
        if self.s_prev is None:
            self.s_prev = torch.tensor(self.s_init, dtype=torch.float64, device=dev)
        if self.enabled:
            d = motion_level(prev_frame, chunk, self.sigma).double()
            s = (self.s_init - 0.1 * d) * self.lam + (1 - self.lam) * self.s_prev
        else:
            s = torch.tensor(self.s_init, dtype=torch.float64, device=dev)
        self.s_prev = s
        return s, timestep_for(s)


def timestep_for(s: torch.Tensor) -> torch.Tensor:
    """``int(1000*s) - 100`` on the device (truncation; s > 0)."""
    return torch.floor(1000 * s.double()).long() - 100
