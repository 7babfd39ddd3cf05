"""Flow-matching sampler of StreamDiffusionV2: shifted sigma grid, x0 and re-noising (step lists: core/schedule.py).

Grid: ``s_k = linspace(1, 0, 1001)[k]`` (k < 1000, float32), ``sigma_k = shift*s_k / (1 + (shift-1)*s_k)``,
``t_k = 1000*sigma_k``. An integer timestep t uses the sigma of the nearest grid timestep; the lookup is a
precomputed table over t = 0..1000, indexed on the device (no host read).
"""

from __future__ import annotations

import torch


class FlowMatchSampler:
    def __init__(self, shift: float = 8.0, train_steps: int = 1000):
        s = torch.linspace(1.0, 0.0, train_steps + 1, dtype=torch.float32)[:-1]
        self.grid_sigmas = shift * s / (1 + (shift - 1) * s)
        self.grid_timesteps = self.grid_sigmas * train_steps
        t = torch.arange(train_steps + 1, dtype=torch.float32)
        self.index = (self.grid_timesteps[None] - t[:, None]).abs().argmin(dim=1)
        self.sigma_table = self.grid_sigmas[self.index]                  # float32, [1001]
        self.sigma_table64 = self.grid_sigmas.double()[self.index]       # float64 of the same values
        self._device_tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._device_tables:
            self._device_tables[device] = (self.sigma_table.to(device), self.sigma_table64.to(device))
        return self._device_tables[device]

    def sigma(self, t: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        """Sigma of integer timesteps (a device int64 tensor of any shape)."""
        f32, f64 = self._tables(t.device)
        return (f64 if dtype == torch.float64 else f32)[t.long()]

    def to_x0(self, x_t: torch.Tensor, flow: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x0 = x_t - sigma(t) * flow`` in float64; ``t`` is ``[B]`` or ``[B, T]`` for ``x [B, T, ...]``."""
        sig = self.sigma(t, torch.float64)
        sig = sig.reshape(*sig.shape, *([1] * (x_t.ndim - sig.ndim)))
        return (x_t.double() - sig * flow.double()).to(x_t.dtype)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``(1 - sigma) * x0 + sigma * noise`` in float32; ``t`` broadcasts from the leading dims."""
        sig = self.sigma(t, torch.float32)
        sig = sig.reshape(*sig.shape, *([1] * (x0.ndim - sig.ndim)))
        return ((1 - sig) * x0.float() + sig * noise.float()).to(x0.dtype)

