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
    """cos/sin tables per axis, ``[max_positions, pairs]`` float32, on one device.

    The spatial part of a token grid (height and width angles of every token) is built once per
    ``(frames, height, width)`` and kept; a call only gathers each row's temporal angles.
    """

    def __init__(self, head_dim: int, max_positions: int = 1024, theta: float = 10000.0, device=None):
        dims = axis_dims(head_dim)
        self.head_dim = head_dim
        self.max_positions = max_positions
        angles = [_angles(max_positions, d, theta) for d in dims]
        self.cos = [a.cos().float().to(device) for a in angles]
        self.sin = [a.sin().float().to(device) for a in angles]
        self._grids: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def to(self, device) -> "RopeTables":
        self.cos = [c.to(device) for c in self.cos]
        self.sin = [s.to(device) for s in self.sin]
        self._grids = {}
        return self

    def _grid(self, frames: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(0..frames-1, cos_hw, sin_hw)`` with ``cos_hw/sin_hw [1, frames*height*width, pairs_h + pairs_w]``."""
        key = (frames, height, width)
        hit = self._grids.get(key)
        if hit is None:
            parts = []
            for tab_list in (self.cos, self.sin):
                _, th, tw = tab_list
                fh = th[:height][None, :, None, :].expand(frames, height, width, -1)
                fw = tw[:width][None, None, :, :].expand(frames, height, width, -1)
                parts.append(torch.cat([fh, fw], dim=-1).reshape(1, frames * height * width, -1))
            hit = self._grids[key] = (torch.arange(frames, device=self.cos[0].device), *parts)
        return hit

    def for_grid(self, starts: torch.Tensor, frames: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape ``[B, frames*height*width, 1, head_dim/2]`` for tokens in (f, h, w) order.

        ``starts`` is a device int64 tensor ``[B]`` of temporal positions of each row's first frame.
        """
        steps = self._grid(frames, height, width)[0]
        return self.for_positions(starts[:, None] + steps[None], height, width)

    def for_positions(self, t_idx: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``[B, F*height*width, 1, head_dim/2]`` for frames at temporal positions ``t_idx [B, F]`` (any
        order: LongLive's infinite mode rotates a cache window whose slots are not in time order)."""
        b, frames = t_idx.shape
        _, cos_hw, sin_hw = self._grid(frames, height, width)
        out = []
        for tt, hw in ((self.cos[0], cos_hw), (self.sin[0], sin_hw)):
            ft = tt[t_idx][:, :, None, :].expand(b, frames, height * width, -1).reshape(b, hw.shape[1], -1)
            out.append(torch.cat([ft, hw.expand(b, -1, -1)], dim=-1)[:, :, None])
        return out[0], out[1]


def turn_back(k: torch.Tensor, delta: int, tables: RopeTables) -> torch.Tensor:
    """Keys ``[..., H, D]`` stored after RoPE, their temporal rotation turned back by ``delta`` positions (height
    and width untouched): attention against them from positions ``delta`` lower sees the same relative positions."""
    if not 0 < delta < tables.max_positions:
        raise ValueError(f"a RoPE rebase turns back 1..{tables.max_positions - 1} positions, got {delta}")
    pairs = k.shape[-1] // 2
    t_pairs = tables.cos[0].shape[1]
    cos = torch.ones(pairs, device=k.device)
    sin = torch.zeros(pairs, device=k.device)
    cos[:t_pairs] = tables.cos[0][delta]
    sin[:t_pairs] = -tables.sin[0][delta]
    return apply_rope(k, cos, sin)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of ``x [B, L, H, D]`` by angles ``cos/sin [B, L, 1, D/2]`` (float32 math)."""
    pairs = x.float().unflatten(-1, (-1, 2))
    re, im = pairs[..., 0], pairs[..., 1]
    out = torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1)
    return out.flatten(-2).type_as(x)
