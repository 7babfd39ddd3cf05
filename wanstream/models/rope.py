"""3-D rotary position embedding of the Wan DiT with a temporal offset per batch row.

Each head vector is read as interleaved (real, imag) pairs. The pairs are split between time, height and
width as ``d - 4*(d//6)``, ``2*(d//6)``, ``2*(d//6)`` real dims (44/42/42 for head dim 128). The angle tables
are computed in float64 (as Wan does) and kept as float32 cos/sin; the rotation runs in float32.
The temporal index is an absolute latent-frame position that the caller chooses (any start offset), so keys
written to a KV cache keep the position they were written with.
"""

from __future__ import annotations

import torch


def axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Real dims given to (time, height, width) for a head dim."""
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"head_dim must be even and >= 6, got {head_dim}")
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def _angles(positions: int, dim: int, theta: float) -> torch.Tensor:
    inv = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    return torch.outer(torch.arange(positions, dtype=torch.float64), inv)


class RopeTables:
    """cos/sin tables per axis, ``[max_positions, pairs]`` float32, on one device."""

    def __init__(self, head_dim: int, max_positions: int = 1024, theta: float = 10000.0, device=None):
        dims = axis_dims(head_dim)
        self.head_dim = head_dim
        self.max_positions = max_positions
        angles = [_angles(max_positions, d, theta) for d in dims]
        self.cos = [a.cos().float().to(device) for a in angles]
        self.sin = [a.sin().float().to(device) for a in angles]

    def to(self, device) -> "RopeTables":
        self.cos = [c.to(device) for c in self.cos]
        self.sin = [s.to(device) for s in self.sin]
        return self

    def for_grid(self, starts: torch.Tensor, frames: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape ``[B, frames*height*width, 1, head_dim/2]`` for tokens in (f, h, w) order.

        ``starts`` is a device int64 tensor ``[B]`` of temporal positions of each row's first frame.
        """
        b = starts.shape[0]
        t_idx = starts[:, None] + torch.arange(frames, device=starts.device)[None]
        out = []
        for tab_list in (self.cos, self.sin):
            tt, th, tw = tab_list
            ft = tt[t_idx][:, :, None, None, :].expand(b, frames, height, width, -1)
            fh = th[:height][None, None, :, None, :].expand(b, frames, height, width, -1)
            fw = tw[:width][None, None, None, :, :].expand(b, frames, height, width, -1)
            out.append(torch.cat([ft, fh, fw], dim=-1).reshape(b, frames * height * width, 1, -1))
        return out[0], out[1]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of ``x [B, L, H, D]`` by angles ``cos/sin [B, L, 1, D/2]`` (float32 math)."""
    pairs = x.float().unflatten(-1, (-1, 2))
    re, im = pairs[..., 0], pairs[..., 1]
    out = torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1)
    return out.flatten(-2).type_as(x)
