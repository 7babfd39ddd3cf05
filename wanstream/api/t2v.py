"""Text-to-video: pure-noise blocks of 3 latent frames through the same stream batch (release t2v config).

Step list ``[1000, 750, 500, 250][:n] + [0]``: the extra clean slot writes near-clean K/V into its cache row.
KV cache of 21 latent frames, no sinks.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from wanstream.core.config import T2V_CACHE
from wanstream.core.geometry import check_resolution
from wanstream.engine.latent_stream import LatentStream
from wanstream.engine.noise import SeededNoise
from wanstream.io.video import tensor_to_frames
from wanstream.models.loader import ModelBundle

FRAMES_PER_BLOCK = 3


def latent_frames_for(num_frames: int) -> int:
    """Latent frames needed for ``num_frames`` pixel frames (1 + 4k law), rounded up to whole blocks."""
    if num_frames < 1:
        raise ValueError(f"frames must be >= 1, got {num_frames}")
    latents = (num_frames - 1 + 3) // 4 + 1
    return -(-latents // FRAMES_PER_BLOCK) * FRAMES_PER_BLOCK


def text_to_video(model: ModelBundle, prompt_embeds: torch.Tensor, num_frames: int, *, width: int = 832,
                  height: int = 480, steps: int = 4, seed: int = 0, batch: bool = True) -> Iterator[np.ndarray]:
    """Yield ``num_frames`` uint8 frames ``[H, W, 3]`` as blocks finish."""
    check_resolution(width, height)
    noise = SeededNoise(seed, model.device)
    kv = model.dit.embed_prompt(prompt_embeds.to(model.device, model.dtype))
    stream = LatentStream(model.dit, model.sampler, kv, noise, tokens_per_frame=model.tokens_per_frame(height, width),
                          steps=steps, mode="t2v", batch=batch, cache=T2V_CACHE, frames_per_block=FRAMES_PER_BLOCK)
    shape = (1, FRAMES_PER_BLOCK, model.vae.z_dim, height // 8, width // 8)
    zeros = torch.zeros(shape, device=model.device, dtype=model.dtype)
    t0 = torch.tensor(stream.step_list[0], device=model.device)
    dec = model.vae.new_state()
    blocks = latent_frames_for(num_frames) // FRAMES_PER_BLOCK
    left = num_frames
    finished = []
    for b in range(blocks):
        finished += stream.push(zeros, 1.0, t0, b)
        left = yield from _decode(model, dec, finished, left)
        finished = []
    yield from _decode(model, dec, stream.drain(), left)


def _decode(model: ModelBundle, dec, finished, left: int):
    for _, latent in finished:
        frames = tensor_to_frames(model.vae.decode(dec, latent)[0])[:left]
        left -= len(frames)
        yield from frames
    return left
