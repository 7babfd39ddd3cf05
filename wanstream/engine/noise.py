"""Noise sources of a stream: all randomness of a stream comes from one of these.

A noise source is a callable ``noise(shape) -> tensor``. :class:`SeededNoise` draws from the stream's own
seeded ``torch.Generator`` (same seed + input + device → same output); :class:`ReplayNoise` returns a recorded
sequence of draws, so tests can replay a reference run exactly.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch

NoiseSource = Callable[[Sequence[int]], torch.Tensor]

RENOISE_SEED_OFFSET = 1_000_003


def renoise_seed(seed: int) -> int:
    """Seed of a stream's re-noising source (the noise a latent gets between its denoising steps) for a stream
    seeded with ``seed``. Its own source, apart from the mixing noise, so that a stream gives the same frames on
    one device and on a pipeline of ranks (where re-noising happens on the last rank)."""
    return int(seed) + RENOISE_SEED_OFFSET


class SeededNoise:
    def __init__(self, seed: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.device = torch.device(device)
        self.dtype = dtype
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(int(seed))

    def __call__(self, shape: Sequence[int]) -> torch.Tensor:
        return torch.randn(tuple(shape), generator=self.generator, device=self.device,
                           dtype=torch.float32).to(self.dtype)


class ReplayNoise:
    """Returns recorded tensors in order (reshaped to the requested shape; the element count must match)."""

    def __init__(self, draws: Iterable[torch.Tensor]):
        self._draws = iter(draws)
        self.used = 0

    def __call__(self, shape: Sequence[int]) -> torch.Tensor:
        try:
            value = next(self._draws)
        except StopIteration:
            raise RuntimeError(f"replay noise exhausted after {self.used} draws") from None
        self.used += 1
        return value.reshape(tuple(shape))
