"""Optical flow (torchvision RAFT), forward–backward occlusion check, backward warping and the warp error.

Conventions: a flow field is ``[B, 2, H, W]`` float32 in pixels, channel 0 = x (right), channel 1 = y (down).
The forward flow ``f`` of a pair (frame t, frame t+1) says where each pixel ``x`` of frame t is in frame t+1:
``x + f(x)``; the backward flow ``b`` is the same from frame t+1 to frame t. Images are floats on the 0–255
scale, ``[B, C, H, W]``.

The warp error of a pair of *output* frames, with flow computed on the matching *input* frames:
``mean over valid x and channels of |out_t(x) − out_{t+1}(x + f(x))|``, where a pixel is valid when it passes the
forward–backward check ``|f + b(x+f)|² ≤ α(|f|² + |b(x+f)|²) + β`` (α = 0.01, β = 0.5) and ``x + f(x)`` lies
inside the frame. Sampling at non-integer positions is bilinear.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from wanstream.core.errors import CheckpointError
from wanstream.eval.models import raft_arch_of, raft_weights

ALPHA = 0.01
BETA = 0.5
RAFT_MIN_SIDE = 128     # RAFT's 4-level correlation pyramid on a 1/8 grid needs at least 128 px per side


# ------------------------------------------------------------------------------------------------ warping
def _grid(flow: torch.Tensor) -> torch.Tensor:
    """Sampling positions ``x + flow(x)`` in grid_sample's normalised coordinates (align_corners=True)."""
    _, _, h, w = flow.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=flow.device, dtype=flow.dtype),
                            torch.arange(w, device=flow.device, dtype=flow.dtype), indexing="ij")
    px = xs + flow[:, 0]
    py = ys + flow[:, 1]
    gx = 2 * px / max(w - 1, 1) - 1
    gy = 2 * py / max(h - 1, 1) - 1
    return torch.stack([gx, gy], dim=-1)


def warp(image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """``image`` sampled at ``x + flow(x)`` (bilinear; zero outside the frame): the image of the next frame
    brought back onto the current frame's pixels."""
    return F.grid_sample(image, _grid(flow), mode="bilinear", padding_mode="zeros", align_corners=True)


def inside(flow: torch.Tensor) -> torch.Tensor:
    """``[B, H, W]`` bool: ``x + flow(x)`` lies inside the frame."""
    _, _, h, w = flow.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=flow.device, dtype=flow.dtype),
                            torch.arange(w, device=flow.device, dtype=flow.dtype), indexing="ij")
    px, py = xs + flow[:, 0], ys + flow[:, 1]
    return (px >= 0) & (px <= w - 1) & (py >= 0) & (py <= h - 1)


def occlusion_mask(fwd: torch.Tensor, bwd: torch.Tensor, alpha: float = ALPHA, beta: float = BETA) -> torch.Tensor:
    """``[B, H, W]`` bool, True where a pixel of the first frame fails the forward–backward check:
    ``|f + b(x+f)|² > α(|f|² + |b(x+f)|²) + β`` (occluded in, or moved out of, the second frame).

    Called with ``(bwd, fwd)`` it marks the pixels of the second frame that were not visible in the first
    (disoccluded)."""
    b_at = warp(bwd, fwd)
    lhs = (fwd + b_at).square().sum(1)
    rhs = alpha * (fwd.square().sum(1) + b_at.square().sum(1)) + beta
    return lhs > rhs


def valid_mask(fwd: torch.Tensor, bwd: torch.Tensor, alpha: float = ALPHA, beta: float = BETA) -> torch.Tensor:
    """Pixels the warp error counts: not occluded, and ``x + f(x)`` inside the frame."""
    return ~occlusion_mask(fwd, bwd, alpha, beta) & inside(fwd)


def channels_first(frames, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` (numpy or torch) → uint8 ``[B, 3, H, W]`` on ``device``."""
    t = torch.as_tensor(np.ascontiguousarray(frames) if isinstance(frames, np.ndarray) else frames)
    if t.ndim != 4 or t.shape[-1] != 3 or t.dtype != torch.uint8:
        raise ValueError(f"frames must be uint8 [B, H, W, 3], got {t.dtype} {tuple(t.shape)}")
    return t.to(device).permute(0, 3, 1, 2)


def to_float_images(frames, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` (numpy or torch) → float32 ``[B, 3, H, W]`` on the 0–255 scale."""
    return channels_first(frames, device).float()


def warp_error(out_t: torch.Tensor, out_next: torch.Tensor, fwd: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[B]`` mean absolute difference (0–255) between ``out_t`` and ``out_next`` warped back by ``fwd``, over
    the valid pixels and all channels; NaN for a pair without a valid pixel."""
    diff = (out_t - warp(out_next, fwd)).abs().mean(1)            # [B, H, W], mean over channels
    m = valid.to(diff.dtype)
    count = m.sum((1, 2))
    total = (diff * m).sum((1, 2))
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, float("nan")))


# --------------------------------------------------------------------------------------------------- RAFT
class FlowModel:
    """RAFT with its weights' input transform; :meth:`flow` takes uint8 frames of any size ≥ 1 px.

    Frames are padded (edge replicate) to a multiple of 8 and to at least 128 px per side, as RAFT needs; the
    flow of the original pixels is cropped back out.
    """

    def __init__(self, model: torch.nn.Module, arch: str, model_id: str, source: str, iters: int = 12,
                 device: torch.device | str = "cpu"):
        if iters < 1:
            raise ValueError(f"RAFT flow updates must be at least 1, got {iters}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.arch, self.model_id, self.source, self.iters = arch, model_id, source, int(iters)
        self.transform = raft_weights(arch).transforms()

    def describe(self) -> dict:
        return {"id": self.model_id, "architecture": f"torchvision raft_{self.arch}", "source": self.source,
                "flow_updates": self.iters, "device": str(self.device)}

    @torch.no_grad()
    def flow(self, first, second) -> torch.Tensor:
        """Flow from ``first`` to ``second`` (uint8 ``[B, H, W, 3]`` each) → float32 ``[B, 2, H, W]``."""
        a, b = channels_first(first, self.device), channels_first(second, self.device)
        if a.shape != b.shape:
            raise ValueError(f"flow needs frames of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
        h, w = a.shape[-2:]
        ph = max(RAFT_MIN_SIDE, -(-h // 8) * 8) - h
        pw = max(RAFT_MIN_SIDE, -(-w // 8) * 8) - w
        a, b = self.transform(a, b)                               # float in [-1, 1]
        if ph or pw:
            a = F.pad(a, (0, pw, 0, ph), mode="replicate")
            b = F.pad(b, (0, pw, 0, ph), mode="replicate")
        flows = self.model(a, b, num_flow_updates=self.iters)
        return flows[-1][:, :, :h, :w].float()


def load_raft(path: str | Path, model_id: str | None = None, iters: int = 12,
              device: torch.device | str = "cpu") -> FlowModel:
    """Build torchvision's RAFT (``raft_small`` for files named ``raft_small*``, else ``raft_large``) and load
    the state dict at ``path`` strictly."""
    from torchvision.models.optical_flow import raft_large, raft_small
    path = Path(path)
    arch = raft_arch_of(path)
    model = (raft_small if arch == "small" else raft_large)(weights=None, progress=False)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle/zip errors of a corrupt file come in many types
        raise CheckpointError(f"{path}: cannot read RAFT weights ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a RAFT state dict, got {type(state).__name__}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: does not match torchvision raft_{arch} "
                              f"({str(exc).splitlines()[0]}; files named raft_small* load as raft_small)") from exc
    return FlowModel(model, arch, model_id or f"local:{path}", str(path), iters=iters, device=device)


# ------------------------------------------------------------------------------------------ pair batches
@dataclass
class Motion:
    """Forward flow and validity of the input pairs ``start .. start + len - 1`` (pair i = frames i, i+1)."""

    start: int
    fwd: torch.Tensor         # [B, 2, H, W]
    valid: torch.Tensor       # [B, H, W] bool

    def __len__(self) -> int:
        return self.fwd.shape[0]


def input_motion(frames: np.ndarray, model: FlowModel, batch: int = 8, progress=None) -> Iterator[Motion]:
    """Forward and backward flow of consecutive input frames, ``batch`` pairs per RAFT call (both directions
    in one call), as :class:`Motion` batches. ``progress`` (a tqdm bar or None) is advanced per pair."""
    n = len(frames) - 1
    for s in range(0, n, batch):
        e = min(n, s + batch)
        first, second = frames[s:e], frames[s + 1:e + 1]
        both = model.flow(np.concatenate([first, second]), np.concatenate([second, first]))
        fwd, bwd = both[: e - s], both[e - s:]
        yield Motion(s, fwd, valid_mask(fwd, bwd))
        if progress is not None:
            progress.update(e - s)


def warp_errors(frames: np.ndarray, motions: Iterable[Motion], device: torch.device | str = "cpu"
                ) -> tuple[np.ndarray, np.ndarray]:
    """Warp error of each consecutive pair of ``frames`` (uint8 ``[N, H, W, 3]``) and the fraction of valid
    pixels per pair, using the input ``motions``: two float arrays of length N − 1."""
    errs, fracs = [], []
    for m in motions:
        out = to_float_images(frames[m.start: m.start + len(m) + 1], device)
        fwd, valid = m.fwd.to(device), m.valid.to(device)
        if out.shape[-2:] != fwd.shape[-2:]:
            raise ValueError(f"output frames are {out.shape[-1]}x{out.shape[-2]} but the flow is "
                             f"{fwd.shape[-1]}x{fwd.shape[-2]}")
        errs.append(warp_error(out[:-1], out[1:], fwd, valid).cpu())
        fracs.append(valid.float().mean((1, 2)).cpu())
    if not errs:
        return np.zeros(0), np.zeros(0)
    return torch.cat(errs).double().numpy(), torch.cat(fracs).double().numpy()
