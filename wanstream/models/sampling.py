"""Flow-matching sampler of the causal Wan models: shifted sigma grid, x0 and re-noising (step lists: a backbone's
``step_list``, ``core/backbones.py``).

Grid: ``s_k = linspace(1, 0, 1001)[k]`` (k < 1000, float32), ``sigma_k = shift*s_k / (1 + (shift-1)*s_k)``,
``t_k = 1000*sigma_k``; StreamDiffusionV2 uses shift 8, Self-Forcing and LongLive shift 5. A timestep — an integer
(StreamDiffusionV2) or a warped float (937.5, 833.33…) — uses the sigma of the nearest grid timestep, found on the
device (an argmin over the grid, float64 as the released x0 conversion; for every integer timestep and every
released float one it picks the same entry as a float32 comparison), so no host read is needed.
"""

from __future__ import annotations

import torch


class FlowMatchSampler:
    def __init__(self, shift: float = 8.0, train_steps: int = 1000):
        self.shift = float(shift)
        s = torch.linspace(1.0, 0.0, train_steps + 1, dtype=torch.float32)[:-1]
        self.grid_sigmas = shift * s / (1 + (shift - 1) * s)
        self.grid_timesteps = self.grid_sigmas * train_steps
        # the same lookup tabulated for the integer timesteps 0..1000 (the official trace's tables)
        t = torch.arange(train_steps + 1, dtype=torch.float32)
        self.index = (self.grid_timesteps[None] - t[:, None]).abs().argmin(dim=1)
        self.sigma_table = self.grid_sigmas[self.index]                  # float32, [1001]
        self.sigma_table64 = self.grid_sigmas.double()[self.index]       # float64 of the same values
        self._device_tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if device not in self._device_tables:
            self._device_tables[device] = (self.grid_timesteps.double().to(device), self.grid_sigmas.to(device),
                                           self.grid_sigmas.double().to(device))
        return self._device_tables[device]

    def grid_index(self, t: torch.Tensor) -> torch.Tensor:
        """Grid index of the nearest grid timestep of each ``t`` (any shape, integer or float, on the device)."""
        grid, _, _ = self._tables(t.device)
        return (grid - t.double()[..., None]).abs().argmin(dim=-1)

    def sigma(self, t: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        """Sigma of timesteps ``t`` (a device tensor of any shape)."""
        _, f32, f64 = self._tables(t.device)
        return (f64 if dtype == torch.float64 else f32)[self.grid_index(t)]

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
