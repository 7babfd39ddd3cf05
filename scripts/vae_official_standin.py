"""A plain-torch stand-in for the official streaming Wan 2.1 VAE (``WanVAE_`` + ``WanVAEWrapper``), for measurement.

Not part of the runtime package: it exists so that side-by-side timings (``scripts/vae_real_size.py``) compare our
streaming VAE with code that does what the official code does, on the same weights (a ``Wan2.1_VAE.pth``-layout
state dict). Written from the behaviour described in ``../shared/spec/reference_implementation.md`` §1.7:

* ``CausalConv3d`` is an ``nn.Conv3d`` with no padding of its own; each call pads with ``F.pad`` (time: ``2p`` in
  front, minus the frames taken from the cache; space: symmetric) after concatenating the cached frames in front;
* the feature cache (``CACHE_T = 2``) holds the last two *input* frames of every cached conv, cloned, topped up
  with the last cached frame when a call has a single frame; slots are found by a running counter;
* ``RMS_norm`` is ``F.normalize`` over channels times ``sqrt(C)`` times ``gamma``;
* down-sampling: ``ZeroPad2d((0, 1, 0, 1))`` + stride-2 ``Conv2d`` per frame, the 3-D mode adds a stride-2 time
  conv over ``[last cached frame, x]`` (skipped on the first chunk, whose output is cached);
* up-sampling: nearest-exact 2x in fp32 + ``Conv2d(C, C/2)`` per frame, the 3-D mode first runs a causal
  ``time_conv`` (C → 2C) and interleaves the halves as frames (the first latent is marked ``'Rep'`` and skipped);
* one-head spatial attention per frame in the middle blocks;
* the SDV2 stream API: ``stream_encode`` (frame 0 alone then the rest on the first call, groups of 4 later; returns
  the un-normalised mean) and ``stream_decode`` (de-normalise, ``conv2``, one latent per decoder call).

Every module is ``[B, C, T, H, W]`` (channels first), as in the official code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CACHE_T = 2


class CausalConv3d(nn.Conv3d):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        pt, ph, pw = self.padding
        self._pads = (pw, pw, ph, ph, 2 * pt, 0)
        self.padding = (0, 0, 0)

    def forward(self, x: Tensor, cache: Tensor | None = None) -> Tensor:
        pads = list(self._pads)
        if cache is not None and pads[4] > 0:
            x = torch.cat([cache.to(x.device), x], dim=2)
            pads[4] -= cache.shape[2]
        return super().forward(F.pad(x, pads))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, channel_first: bool = True, images: bool = True, bias: bool = False):
        super().__init__()
        shape = (dim, 1, 1) if images else (dim, 1, 1, 1)
        self.channel_first = channel_first
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(shape if channel_first else (dim,)))
        self.bias = nn.Parameter(torch.zeros(shape if channel_first else (dim,))) if bias else 0.0

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=1 if self.channel_first else -1) * self.scale * self.gamma + self.bias


class NearestUp(nn.Upsample):
    def forward(self, x: Tensor) -> Tensor:     # computed in fp32, as the official module does
        return super().forward(x.float()).type_as(x)


def _take_cache(x: Tensor, old) -> Tensor:
    """The last ``CACHE_T`` frames of ``x``, topped up with the last frame of the old cache (cloned)."""
    cache = x[:, :, -CACHE_T:].clone()
    if cache.shape[2] < 2 and isinstance(old, Tensor):
        cache = torch.cat([old[:, :, -1:].to(cache.device), cache], dim=2)
    return cache


class Resample(nn.Module):
    def __init__(self, dim: int, mode: str):
        super().__init__()
        self.dim, self.mode = dim, mode
        if mode == "upsample2d":
            self.resample = nn.Sequential(NearestUp(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                                          nn.Conv2d(dim, dim // 2, 3, padding=1))
        elif mode == "upsample3d":
            self.resample = nn.Sequential(NearestUp(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                                          nn.Conv2d(dim, dim // 2, 3, padding=1))
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample2d":
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=(2, 2)))
        elif mode == "downsample3d":
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=(2, 2)))
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), padding=(0, 0, 0))
        else:
            raise ValueError(mode)

    def forward(self, x: Tensor, cache: list | None = None, idx: list[int] | None = None) -> Tensor:
        b, c, t, h, w = x.shape
        if self.mode == "upsample3d" and cache is not None:
            i = idx[0]
            if cache[i] is None:
                cache[i] = "Rep"
            else:
                new = x[:, :, -CACHE_T:].clone()
                if new.shape[2] < 2 and cache[i] is not None and not isinstance(cache[i], str):
                    new = torch.cat([cache[i][:, :, -1:].to(new.device), new], dim=2)
                if new.shape[2] < 2 and isinstance(cache[i], str):
                    new = torch.cat([torch.zeros_like(new), new], dim=2)
                x = self.time_conv(x) if isinstance(cache[i], str) else self.time_conv(x, cache[i])
                cache[i] = new
                x = x.reshape(b, 2, c, t, h, w)
                x = torch.stack((x[:, 0], x[:, 1]), 3).reshape(b, c, t * 2, h, w)
            idx[0] += 1
        t = x.shape[2]
        x = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        x = self.resample(x)
        x = x.view(b, t, *x.shape[1:]).permute(0, 2, 1, 3, 4)
        if self.mode == "downsample3d" and cache is not None:
            i = idx[0]
            if cache[i] is None:
                cache[i] = x.clone()
            else:
                new = x[:, :, -1:].clone()
                x = self.time_conv(torch.cat([cache[i][:, :, -1:], x], 2))
                cache[i] = new
            idx[0] += 1
        return x


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_dim, images=False), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim, images=False), nn.SiLU(), nn.Dropout(0.0), CausalConv3d(out_dim, out_dim, 3, padding=1))
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: Tensor, cache: list | None = None, idx: list[int] | None = None) -> Tensor:
        h = self.shortcut(x)
        for layer in self.residual:
            if isinstance(layer, CausalConv3d) and cache is not None:
                i = idx[0]
                new = _take_cache(x, cache[i])
                x = layer(x, cache[i])
                cache[i] = new
                idx[0] += 1
            else:
                x = layer(x)
        return x + h


class AttentionBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        skip = x
        b, c, t, h, w = x.shape
        x = self.norm(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))
        q, k, v = self.to_qkv(x).reshape(b * t, 1, c * 3, -1).permute(0, 1, 3, 2).contiguous().chunk(3, dim=-1)
        x = F.scaled_dot_product_attention(q, k, v)
        x = self.proj(x.squeeze(1).permute(0, 2, 1).reshape(b * t, c, h, w))
        return x.view(b, t, c, h, w).permute(0, 2, 1, 3, 4) + skip


def _run_cached(layer: nn.Module, x: Tensor, cache: list | None, idx: list[int]) -> Tensor:
    if isinstance(layer, (ResidualBlock, Resample)):
        return layer(x, cache, idx) if cache is not None else layer(x)
    return layer(x)


def _cached_conv(conv: CausalConv3d, x: Tensor, cache: list | None, idx: list[int]) -> Tensor:
    if cache is None:
        return conv(x)
    i = idx[0]
    new = _take_cache(x, cache[i])
    x = conv(x, cache[i])
    cache[i] = new
    idx[0] += 1
    return x


class Encoder3d(nn.Module):
    def __init__(self, dim: int, z_dim: int, dim_mult=(1, 2, 4, 4), num_res_blocks: int = 2,
                 temporal_downsample=(False, True, True)):
        super().__init__()
        dims = [dim * u for u in (1, *dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(num_res_blocks):
                blocks.append(ResidualBlock(a, b))
                a = b
            if i != len(dim_mult) - 1:
                blocks.append(Resample(b, "downsample3d" if temporal_downsample[i] else "downsample2d"))
        self.downsamples = nn.Sequential(*blocks)
        self.middle = nn.Sequential(ResidualBlock(b, b), AttentionBlock(b), ResidualBlock(b, b))
        self.head = nn.Sequential(RMSNorm(b, images=False), nn.SiLU(), CausalConv3d(b, z_dim, 3, padding=1))

    def forward(self, x: Tensor, cache: list | None = None, idx: list[int] | None = None) -> Tensor:
        x = _cached_conv(self.conv1, x, cache, idx)
        for layer in (*self.downsamples, *self.middle):
            x = _run_cached(layer, x, cache, idx)
        for layer in self.head:
            x = _cached_conv(layer, x, cache, idx) if isinstance(layer, CausalConv3d) else layer(x)
        return x


class Decoder3d(nn.Module):
    def __init__(self, dim: int, z_dim: int, dim_mult=(1, 2, 4, 4), num_res_blocks: int = 2,
                 temporal_upsample=(True, True, False)):
        super().__init__()
        dims = [dim * u for u in (dim_mult[-1], *dim_mult[::-1])]
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]),
                                    ResidualBlock(dims[0], dims[0]))
        blocks: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            if i in (1, 2, 3):
                a //= 2
            for _ in range(num_res_blocks + 1):
                blocks.append(ResidualBlock(a, b))
                a = b
            if i != len(dim_mult) - 1:
                blocks.append(Resample(b, "upsample3d" if temporal_upsample[i] else "upsample2d"))
        self.upsamples = nn.Sequential(*blocks)
        self.head = nn.Sequential(RMSNorm(b, images=False), nn.SiLU(), CausalConv3d(b, 3, 3, padding=1))

    def forward(self, x: Tensor, cache: list | None = None, idx: list[int] | None = None) -> Tensor:
        x = _cached_conv(self.conv1, x, cache, idx)
        for layer in (*self.middle, *self.upsamples):
            x = _run_cached(layer, x, cache, idx)
        for layer in self.head:
            x = _cached_conv(layer, x, cache, idx) if isinstance(layer, CausalConv3d) else layer(x)
        return x


def _count_convs(m: nn.Module) -> int:
    return sum(isinstance(x, CausalConv3d) for x in m.modules())


class OfficialStreamingVAE(nn.Module):
    """``WanVAE_`` with the SDV2 stream API; one stream (its caches live on the module, as in the official code)."""

    def __init__(self, dim: int = 96, z_dim: int = 16):
        super().__init__()
        self.z_dim = z_dim
        self.encoder = Encoder3d(dim, z_dim * 2)
        self.conv1 = CausalConv3d(z_dim * 2, z_dim * 2, 1)
        self.conv2 = CausalConv3d(z_dim, z_dim, 1)
        self.decoder = Decoder3d(dim, z_dim)
        self.first_encode = self.first_decode = True

    @classmethod
    def from_state_dict(cls, sd: dict[str, Tensor], device="cpu", dtype=torch.float32) -> "OfficialStreamingVAE":
        """From a ``Wan2.1_VAE.pth``-layout state dict (strict)."""
        from wanstream.core.config import LATENT_MEAN, LATENT_STD
        with torch.device("meta"):
            m = cls(dim=sd["encoder.conv1.weight"].shape[0], z_dim=sd["conv2.weight"].shape[0])
        m.load_state_dict(sd, strict=True, assign=True)
        m = m.to(device, dtype).eval()
        m.mean = torch.tensor(LATENT_MEAN, device=device, dtype=dtype).view(1, -1, 1, 1, 1)
        m.std = torch.tensor(LATENT_STD, device=device, dtype=dtype).view(1, -1, 1, 1, 1)
        return m

    # ---------------------------------------------------------------------------------------- the stream API
    def reset(self) -> None:
        self.first_encode = self.first_decode = True

    @torch.no_grad()
    def stream_encode(self, x: Tensor) -> Tensor:
        """``[B, 3, T, H, W]`` → un-normalised ``mu [B, z, T', h, w]`` (the SDV2 ``stream_encode``)."""
        if self.first_encode:
            self.first_encode = False
            self._enc_cache = [None] * _count_convs(self.encoder)
            parts = [x[:, :, :1], x[:, :, 1:]] if x.shape[2] > 1 else [x[:, :, :1]]
        else:
            parts = [x[:, :, 4 * i: 4 * i + 4] for i in range(x.shape[2] // 4)]
        out = torch.cat([self.encoder(p, self._enc_cache, [0]) for p in parts], 2)
        mu, _ = self.conv1(out).chunk(2, dim=1)
        return mu

    @torch.no_grad()
    def stream_decode(self, z: Tensor) -> Tensor:
        """Latents ``[B, z, T, h, w]`` (normalised) → pixels ``[B, 3, T', H, W]`` (float, clamped to [-1, 1])."""
        z = z / (1.0 / self.std.to(z)) + self.mean.to(z)
        x = self.conv2(z)
        if self.first_decode:      # latent 0 alone, then the rest in one call
            self.first_decode = False
            self._dec_cache = [None] * _count_convs(self.decoder)
            parts = [x[:, :, :1], x[:, :, 1:]] if x.shape[2] > 1 else [x]
        else:
            parts = [x[:, :, i:i + 1] for i in range(x.shape[2])]
        out = torch.cat([self.decoder(p, self._dec_cache, [0]) for p in parts], 2)
        return out.float().clamp_(-1, 1)

