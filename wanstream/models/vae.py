"""Streaming Wan 2.1 VAE: diffusers' ``AutoencoderKLWan`` modules driven with per-stream causal conv caches.

Frame-count law over a stream: encode 5 frames → 2 latents on the first call, then every 4 frames → 1 latent;
decode 2 latents → 5 frames on the first call, then 1 latent → 4 frames. Streaming equals one-shot causal
encode / decode. Conventions of the released weights: encode returns the *un-normalised* mean; decode
de-normalises per channel (``z / (1/std) + mean``, written as released so results are bit-identical).
All state of a stream lives in a :class:`VAEStreamState`, so one VAE serves many streams.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import LATENT_MEAN, LATENT_STD


@dataclass
class VAEStreamState:
    """Causal conv feature caches of one stream (encoder and decoder), fresh per stream."""

    enc_cache: list = field(default_factory=list)
    dec_cache: list = field(default_factory=list)
    first_encode: bool = True
    first_decode: bool = True
    frames_in: int = 0
    latents_in: int = 0


class StreamingVAE:
    """Chunked encode / decode over a shared ``AutoencoderKLWan``."""

    def __init__(self, vae, mean=LATENT_MEAN, std=LATENT_STD):
        self.vae = vae
        self.z_dim = vae.config.z_dim
        dev = vae.quant_conv.weight.device
        self.mean = torch.tensor(mean, dtype=torch.float32, device=dev).view(1, -1, 1, 1, 1)
        self.inv_std = 1.0 / torch.tensor(std, dtype=torch.float32, device=dev).view(1, -1, 1, 1, 1)
        self.n_enc = vae._cached_conv_counts["encoder"]
        self.n_dec = vae._cached_conv_counts["decoder"]

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.quant_conv.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.vae.quant_conv.weight.device

    def new_state(self) -> VAEStreamState:
        return VAEStreamState([None] * self.n_enc, [None] * self.n_dec)

    @torch.no_grad()
    def encode(self, state: VAEStreamState, frames: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Pixels ``[B, T, 3, H, W]`` in [-1, 1] → latents ``[B, T_lat, z, H/8, W/8]``.

        First call of a stream: T = 1 + 4k (frame 0 alone, then groups of 4). Later calls: T = 4k.
        """
        t = frames.shape[1]
        x = frames.transpose(1, 2).to(self.device, self.dtype)
        if state.first_encode:
            if t < 1 or (t - 1) % 4:
                raise ValueError(f"the first encode of a stream takes 1+4k frames, got {t}")
            groups = [x[:, :, :1]] + [x[:, :, 1 + 4 * i: 5 + 4 * i] for i in range((t - 1) // 4)]
        else:
            if t == 0 or t % 4:
                raise ValueError(f"encode after the first call takes a multiple of 4 frames, got {t}")
            groups = [x[:, :, 4 * i: 4 * i + 4] for i in range(t // 4)]
        outs = [self.vae.encoder(g, feat_cache=state.enc_cache, feat_idx=[0]) for g in groups]
        state.first_encode = False
        state.frames_in += t
        mu = self.vae.quant_conv(torch.cat(outs, dim=2))[:, : self.z_dim]
        if normalize:
            mu = (mu - self.mean.to(mu.dtype)) * self.inv_std.to(mu.dtype)
        return mu.transpose(1, 2)

    @torch.no_grad()
    def decode(self, state: VAEStreamState, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``[B, T, z, h, w]`` → pixels ``[B, T', 3, 8h, 8w]`` in [-1, 1] (float32).

        The first latent of a stream gives 1 frame, every later latent 4 frames.
        """
        z = latents.transpose(1, 2).to(self.device)
        z = (z / self.inv_std.to(z.dtype) + self.mean.to(z.dtype)).to(self.dtype)
        x = self.vae.post_quant_conv(z)
        outs = []
        for i in range(x.shape[2]):
            outs.append(self.vae.decoder(x[:, :, i: i + 1], feat_cache=state.dec_cache, feat_idx=[0],
                                         first_chunk=state.first_decode))
            state.first_decode = False
        state.latents_in += x.shape[2]
        return torch.cat(outs, dim=2).float().clamp(-1, 1).transpose(1, 2)
