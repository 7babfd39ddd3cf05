"""Frames between the host and the device: uint8 over the bus, float conversion on the device.

* Upload (:func:`upload_frames`): the frames are stacked straight into a pinned uint8 staging buffer, copied to the
  device without blocking the host and converted there to ``[T, 3, H, W]`` in ``[-1, 1]`` — ``x / 127.5 - 1`` in
  float32, then the model dtype, the numbers of ``io.framing.pixels_to_unit``. Pinned buffers come from PyTorch's
  caching host allocator, which reuses a block only after the copy from it has completed.
* Download (:func:`start_download`): the output is converted to uint8 ``[T, H, W, 3]`` on the device and copied
  into pinned memory without blocking; a CUDA event marks its arrival, so the host can queue more work (the next
  stream's decode) before :meth:`PendingFrames.wait` blocks on that event only. :func:`download_frames` is both in
  one step. The numbers are those of ``io.framing.unit_to_pixels``.

On the CPU both are the plain conversions.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from wanstream.io.framing import pixels_to_unit, unit_to_pixels


def upload_frames(frames: Sequence[np.ndarray] | np.ndarray, device, dtype: torch.dtype) -> torch.Tensor:
    """uint8 frames (``[T, H, W, 3]`` or a list of ``[H, W, 3]``) → ``[T, 3, H, W]`` in ``[-1, 1]`` on ``device``."""
    device = torch.device(device)
    first = np.asarray(frames[0])
    if first.dtype != np.uint8 or first.ndim != 3 or first.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [H, W, 3], got {first.dtype} {first.shape}")
    shape = (len(frames), *first.shape)
    if device.type == "cuda":
        staging = torch.empty(shape, dtype=torch.uint8, pin_memory=True)
        np.stack(frames, out=staging.numpy())
        raw = staging.to(device, non_blocking=True)
    else:
        raw = torch.from_numpy(np.stack(frames)).to(device)
    return pixels_to_unit(raw, dtype)


class PendingFrames:
    """uint8 frames ``[T, H, W, 3]`` on their way to the host; :meth:`wait` returns them as a numpy array."""

    def __init__(self, host: torch.Tensor, event=None):
        self._host = host
        self._event = event

    def ready(self) -> bool:
        return self._event is None or self._event.query()

    def wait(self) -> np.ndarray:
        if self._event is not None:
            self._event.synchronize()
        return self._host.numpy()


def start_download(tensor: torch.Tensor) -> PendingFrames:
    """``[T, 3, H, W]`` in ``[-1, 1]`` → uint8 (rounded, clamped), converted on the device; the copy to the host
    starts."""
    pixels = unit_to_pixels(tensor)
    if not pixels.is_cuda:
        return PendingFrames(pixels.cpu())
    host = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
    host.copy_(pixels, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return PendingFrames(host, event)


def download_frames(tensor: torch.Tensor) -> np.ndarray:
    """:func:`start_download` and wait: uint8 frames ``[T, H, W, 3]`` on the host."""
    return start_download(tensor).wait()
