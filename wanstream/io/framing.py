"""Frame sizes and pixels: resizing, framing to another aspect (``--fit``), pixel <-> tensor conversion.

Frames are RGB ``uint8`` arrays, ``[H, W, 3]`` for one frame and ``[T, H, W, 3]`` for several. Model tensors are
``[T, 3, H, W]`` floats in ``[-1, 1]``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from wanstream.core.geometry import check_fit


def _frames_array(frames: np.ndarray) -> np.ndarray:
    arr = np.asarray(frames)
    if arr.ndim not in (3, 4) or arr.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T, H, W, 3] or [H, W, 3], got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {arr.dtype}")
    return arr


def resize_frames(frames: np.ndarray, width: int, height: int) -> np.ndarray:
    """Antialiased bilinear resize of ``uint8 [T, H, W, 3]`` or ``[H, W, 3]`` frames (same layout back).

    Uses torch's uint8 channels-last kernel, so down-scaling averages instead of aliasing. Frames already at
    the requested size are returned as they are.
    """
    arr = _frames_array(frames)
    if width < 1 or height < 1:
        raise ValueError(f"resize target must be positive, got {width}x{height}")
    if arr.shape[-3:-1] == (height, width):
        return arr
    batch = torch.from_numpy(np.ascontiguousarray(arr.reshape(-1, *arr.shape[-3:]))).permute(0, 3, 1, 2)
    out = F.interpolate(batch, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    out = out.permute(0, 2, 3, 1).contiguous().numpy()
    return out if arr.ndim == 4 else out[0]




def fit_frames(frames: np.ndarray, width: int, height: int, mode: str = "crop") -> np.ndarray:
    """Frame ``uint8 [T, H, W, 3]`` or ``[H, W, 3]`` frames to ``width x height`` when their aspect differs.

    * ``crop`` (default): the largest centred region of the target aspect is cut out, then resized (fills the
      frame, loses the edges of the longer side);
    * ``pad``: resized to fit inside, centred on black bars (keeps everything, letter- or pillarbox);
    * ``stretch``: resized to the target size, distorting the aspect.

    Frames already at the target size are returned as they are; resizing is :func:`resize_frames`.
    """
    check_fit(mode)
    arr = _frames_array(frames)
    if width < 1 or height < 1:
        raise ValueError(f"frame target must be positive, got {width}x{height}")
    h, w = arr.shape[-3:-1]
    if (h, w) == (height, width) or mode == "stretch":
        return resize_frames(arr, width, height)
    if mode == "crop":
        # the centred crop of the target aspect: full height when the source is wider, else full width
        cw, ch = (round(h * width / height), h) if w * height > h * width else (w, round(w * height / width))
        cw, ch = max(1, min(w, cw)), max(1, min(h, ch))
        x0, y0 = (w - cw) // 2, (h - ch) // 2
        return resize_frames(arr[..., y0: y0 + ch, x0: x0 + cw, :], width, height)
    # pad: the resized frame fits inside the target, on black
    sw, sh = (width, round(h * width / w)) if w * height > h * width else (round(w * height / h), height)
    sw, sh = max(1, min(width, sw)), max(1, min(height, sh))
    out = np.zeros((*arr.shape[:-3], height, width, 3), np.uint8)
    x0, y0 = (width - sw) // 2, (height - sh) // 2
    out[..., y0: y0 + sh, x0: x0 + sw, :] = resize_frames(arr, sw, sh)
    return out


def pixels_to_unit(raw: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 ``[T, H, W, 3]`` (on any device) → ``[T, 3, H, W]`` in ``[-1, 1]``: ``x / 127.5 - 1`` in float32, then
    ``dtype``. The one home of this conversion (files, the engine's upload)."""
    return (raw.permute(0, 3, 1, 2).contiguous().float() / 127.5 - 1.0).to(dtype)


def unit_to_pixels(tensor: torch.Tensor) -> torch.Tensor:
    """``[T, 3, H, W]`` in ``[-1, 1]`` → uint8 ``[T, H, W, 3]`` (rounded, clamped) on the tensor's device. The one
    home of this conversion (files, the engine's download, a pipeline's last rank)."""
    if tensor.ndim != 4 or tensor.shape[1] != 3:
        raise ValueError(f"expected a tensor [T, 3, H, W], got shape {tuple(tensor.shape)}")
    pixels = ((tensor.detach().float() + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous()


def frames_to_tensor(frames: np.ndarray, device: torch.device | str | None = None,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``uint8 [T, H, W, 3]`` -> ``[T, 3, H, W]`` in ``[-1, 1]``, converted on ``device``."""
    arr = _frames_array(frames)
    if arr.ndim != 4:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got shape {arr.shape}")
    return pixels_to_unit(torch.from_numpy(np.ascontiguousarray(arr)).to(device), dtype)


def tensor_to_frames(tensor: torch.Tensor) -> np.ndarray:
    """``[T, 3, H, W]`` in ``[-1, 1]`` -> ``uint8 [T, H, W, 3]`` (rounded, clamped), on the CPU."""
    return unit_to_pixels(tensor).cpu().numpy()

