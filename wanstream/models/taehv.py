"""TAEHV: the tiny video autoencoder for Wan 2.1 latents (``taew2_1.pth`` layout), a fast encoder and decoder.

Layout (``nn.Sequential`` indices give the released state-dict keys, 128 tensors, ~11.3M parameters):

* encoder: Conv(3→64) ReLU, then per stage [TPool, Conv stride 2 (no bias), 3 MemBlocks] x3, Conv(64→16).
* decoder: Clamp, Conv(16→256) ReLU, then per stage [3 MemBlocks, Upsample 2x, TGrow, Conv (no bias)]
  for widths 256→128→64→64, ReLU, Conv(64→3).

A MemBlock sees its own input at the previous time step (zeros before the first); TPool / TGrow merge /
split frames through channels. Time runs causally, so a stream is decoded latent by latent with only each
MemBlock's last input kept as state (:class:`TAEHVStreamDecoder`), matching the one-shot
:meth:`TAEHV.decode_video` exactly; encoding streams the same way (:class:`TAEHVStreamEncoder`).

Value conventions: latents are raw DiT latents (no mean/std de-normalisation); pixels are in [-1, 1]
(the network's [0, 1] output is clamped and mapped with ``x * 2 - 1``). Frame-count law as the Wan VAE:
over a stream, ``1 + k`` latents give ``1 + 4k`` frames (each latent makes 4 frames; the first 3 frames
of the stream are dropped), and ``1 + 4k`` frames give ``1 + k`` latents (the stream is encoded with 3 copies
of its first frame in front, so that latent 0 sees frame 0 alone and latent ``k`` frames ``4k - 3 .. 4k``, the
Wan VAE's alignment and the mirror of the decoder's dropped frames; :meth:`TAEHV.encode_video`, the one-shot
reference, pads at the end instead).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import Tensor, nn

from wanstream.core.errors import CheckpointError

DECODER_WIDTHS = (256, 128, 64, 64)


def _conv(n_in: int, n_out: int, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, stride=stride, padding=1, bias=bias)


class Clamp(nn.Module):
    """Soft clamp of latents to (-3, 3): ``3 * tanh(x / 3)``."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """Residual block fed with its input and its input at the previous time step (``past``)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(_conv(2 * n_in, n_out), nn.ReLU(), _conv(n_out, n_out), nn.ReLU(),
                                  _conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x: Tensor, past: Tensor) -> Tensor:
        """``x``, ``past``: [N, C, H, W]."""
        return self.act(self.conv(torch.cat([x, past], 1)) + self.skip(x))


class TPool(nn.Module):
    """Merge each ``stride`` consecutive frames into one (channel concat + 1x1 conv)."""

    def __init__(self, n_f: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n_f * stride, n_f, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """[B, T, C, H, W] → [B, T / stride, C, H, W]; T must be a multiple of ``stride``."""
        b, t, c, h, w = x.shape
        if t % self.stride:
            raise ValueError(f"TPool: {t} frames is not a multiple of stride {self.stride}")
        return self.conv(x.reshape(b * t // self.stride, self.stride * c, h, w)).unflatten(0, (b, -1))


class TGrow(nn.Module):
    """Split each frame into ``stride`` frames (1x1 conv to ``stride`` x channels, last rows = last frame)."""

    def __init__(self, n_f: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n_f, n_f * stride, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """[B, T, C, H, W] → [B, T * stride, C, H, W]."""
        b, t, c, h, w = x.shape
        return self.conv(x.flatten(0, 1)).reshape(b, t * self.stride, c, h, w)


def _run(layers: nn.Sequential, x: Tensor, memory: dict[int, Tensor] | None = None) -> Tensor:
    """Apply ``layers`` to a video ``x`` [B, T, C, H, W], parallel over time.

    A MemBlock's past is its input shifted one step in time; the step before the first frame is
    ``memory[i]`` (zeros when absent). When ``memory`` is given, each MemBlock's last input frame is
    stored there, so consecutive calls continue one causal stream.
    """
    for i, layer in enumerate(layers):
        b, t = x.shape[:2]
        if isinstance(layer, MemBlock):
            first = memory.get(i) if memory is not None else None
            first = torch.zeros_like(x[:, 0]) if first is None else first
            past = torch.cat([first[:, None], x[:, :-1]], 1)
            if memory is not None:
                memory[i] = x[:, -1].clone()
            x = layer(x.flatten(0, 1), past.flatten(0, 1)).unflatten(0, (b, t))
        elif isinstance(layer, (TPool, TGrow)):
            x = layer(x)
        else:
            x = layer(x.flatten(0, 1)).unflatten(0, (b, t))
    return x


class TAEHV(nn.Module):
    """Tiny autoencoder for Wan 2.1 latents; parameters match the released ``taew2_1.pth``."""

    def __init__(self, latent_channels: int = 16, image_channels: int = 3, encoder_width: int = 64,
                 decoder_widths: tuple[int, int, int, int] = DECODER_WIDTHS,
                 encoder_time_downscale: tuple[bool, bool, bool] = (True, True, False),
                 decoder_time_upscale: tuple[bool, bool, bool] = (False, True, True)) -> None:
        super().__init__()
        self.latent_channels = latent_channels
        self.image_channels = image_channels
        e = encoder_width
        enc: list[nn.Module] = [_conv(image_channels, e), nn.ReLU()]
        for down in encoder_time_downscale:
            enc += [TPool(e, 2 if down else 1), _conv(e, e, stride=2, bias=False)]
            enc += [MemBlock(e, e) for _ in range(3)]
        enc.append(_conv(e, latent_channels))
        self.encoder = nn.Sequential(*enc)

        n = decoder_widths
        dec: list[nn.Module] = [Clamp(), _conv(latent_channels, n[0]), nn.ReLU()]
        for k, up in enumerate(decoder_time_upscale):
            dec += [MemBlock(n[k], n[k]) for _ in range(3)]
            dec += [nn.Upsample(scale_factor=2), TGrow(n[k], 2 if up else 1), _conv(n[k], n[k + 1], bias=False)]
        dec += [nn.ReLU(), _conv(n[3], image_channels)]
        self.decoder = nn.Sequential(*dec)

        self.t_downscale = 2 ** sum(encoder_time_downscale)
        self.t_upscale = 2 ** sum(decoder_time_upscale)
        self.frames_to_trim = self.t_upscale - 1

    def _decode(self, latents: Tensor, memory: dict[int, Tensor] | None = None) -> Tensor:
        """Untrimmed decode of [B, T, C, h, w] latents to [B, T * t_upscale, 3, 8h, 8w] pixels in [-1, 1]."""
        if latents.ndim != 5 or latents.shape[2] != self.latent_channels:
            raise ValueError(f"expected latents [B, T, {self.latent_channels}, h, w], got {tuple(latents.shape)}")
        p = self.decoder[1].weight
        x = _run(self.decoder, latents.to(p.device, p.dtype), memory)
        return x.clamp(0, 1) * 2 - 1

    @torch.no_grad()
    def decode_video(self, latents: Tensor) -> Tensor:
        """One-shot decode: [B, T, C, h, w] raw latents → [B, 4T - 3, 3, 8h, 8w] pixels in [-1, 1]."""
        return self._decode(latents)[:, self.frames_to_trim:]

    @torch.no_grad()
    def encode_video(self, pixels: Tensor) -> Tensor:
        """One-shot encode: [B, T, 3, H, W] pixels in [-1, 1] → [B, ceil(T / 4), C, H / 8, W / 8] latents.

        Frames are padded at the end with copies of the last frame to a multiple of 4.
        """
        if pixels.ndim != 5 or pixels.shape[2] != self.image_channels:
            raise ValueError(f"expected pixels [B, T, {self.image_channels}, H, W], got {tuple(pixels.shape)}")
        p = self.encoder[0].weight
        x = (pixels.to(p.device, p.dtype) + 1) / 2
        pad = -x.shape[1] % self.t_downscale
        x = torch.cat([x, x[:, -1:].expand(-1, pad, -1, -1, -1)], 1)
        return _run(self.encoder, x)


def _many(states: list, x: Tensor, rows: list[int] | None, phase: str, run) -> Tensor:
    """Run ``run(batch_state, x)`` once for several streams of one :class:`TAEHV` at the same phase (attribute
    ``phase``): their MemBlock memories are stacked along the batch and handed back as per-stream views."""
    rows = [1] * len(states) if rows is None else list(rows)
    if not states or len(rows) != len(states) or sum(rows) != x.shape[0]:
        raise ValueError(f"{len(states)} streams with rows {rows} do not match a batch of {x.shape[0]}")
    if len({id(d) for d in states}) != len(states) or len({id(d.taehv) for d in states}) != 1:
        raise ValueError("one call takes distinct streams of one TAEHV")
    if len({getattr(d, phase) for d in states}) != 1:
        raise ValueError("streams at their first call and streams in the steady state cannot share a call; "
                         "group them by phase")
    batch = copy.copy(states[0])
    batch.memory = {k: torch.cat([d.memory[k] for d in states]) for k in states[0].memory}
    out = run(batch, x)
    a = 0
    for d, n in zip(states, rows):
        d.memory = {k: v[a:a + n] for k, v in batch.memory.items()}
        setattr(d, phase, getattr(batch, phase))
        a += n
    return out


class TAEHVStreamEncoder:
    """Causal streaming encode of one stream over a shared :class:`TAEHV`, with the Wan VAE's frame law.

    A stream's first call takes ``1 + 4k`` frames and gives ``1 + k`` latents (3 copies of frame 0 go in front,
    see the module docstring), later calls ``4k`` frames → ``k`` latents. TPool groups never straddle two calls,
    so only each MemBlock's last input is kept between calls. Latents are TAEHV's (the DiT's) own; with ``mean``
    and ``std`` they are mapped to the Wan encoder's un-normalised mean (``z * std + mean``), the DiT input
    convention of this pipeline (:meth:`~wanstream.models.vae.StreamingVAE.encode` without ``normalize``).
    """

    def __init__(self, taehv: TAEHV, mean=None, std=None) -> None:
        self.taehv = taehv
        p = taehv.encoder[0].weight
        self.shift = None if mean is None else (
            torch.as_tensor(mean, dtype=torch.float32).to(p.device, p.dtype).view(1, 1, -1, 1, 1),
            torch.as_tensor(std, dtype=torch.float32).to(p.device, p.dtype).view(1, 1, -1, 1, 1))
        self.reset()

    def reset(self) -> None:
        """Forget the stream: the next :meth:`encode` starts a new one."""
        self.memory: dict[int, Tensor] = {}
        self.first_encode = True

    @torch.no_grad()
    def encode(self, pixels: Tensor) -> Tensor:
        """The next frames ``[B, T, 3, H, W]`` in [-1, 1] of the stream → latents ``[B, T', C, H/8, W/8]``."""
        n = self.taehv.t_downscale
        if pixels.ndim != 5 or pixels.shape[2] != self.taehv.image_channels:
            raise ValueError(f"expected pixels [B, T, {self.taehv.image_channels}, H, W], got {tuple(pixels.shape)}")
        t = pixels.shape[1]
        if self.first_encode and (t < 1 or (t - 1) % n):
            raise ValueError(f"the first encode of a stream takes 1+{n}k frames, got {t}")
        if not self.first_encode and (t == 0 or t % n):
            raise ValueError(f"encode after the first call takes a multiple of {n} frames, got {t}")
        p = self.taehv.encoder[0].weight
        x = (pixels.to(p.device, p.dtype) + 1) / 2
        if self.first_encode:
            x = torch.cat([x[:, :1].expand(-1, n - 1, -1, -1, -1), x], 1)
        z = _run(self.taehv.encoder, x, self.memory)
        self.first_encode = False
        if self.shift is not None:
            z = z * self.shift[1] + self.shift[0]
        return z

    @staticmethod
    @torch.no_grad()
    def encode_many(encoders: list["TAEHVStreamEncoder"], pixels: Tensor, rows: list[int] | None = None) -> Tensor:
        """Encode the next frames of several streams in one call: ``[N, T, 3, H, W]`` → ``[N, T', C, h, w]``.

        Row ``i`` belongs to ``encoders[i]`` (or ``rows[i]`` rows each); equal to encoding each stream alone. The
        streams must share one :class:`TAEHV` and a resolution and be at the same phase (``first_encode``)."""
        return _many(encoders, pixels, rows, "first_encode", lambda batch, x: batch.encode(x))


class TAEHVStreamDecoder:
    """Causal streaming decode of one stream over a shared :class:`TAEHV`.

    Holds each decoder MemBlock's last input (per stream, batch size fixed by the first call) and the
    number of start-of-stream frames still to drop. Latents are decoded one at a time; nothing is recomputed.
    """

    def __init__(self, taehv: TAEHV) -> None:
        self.taehv = taehv
        self.reset()

    def reset(self) -> None:
        """Forget the stream: the next :meth:`decode` starts a new one."""
        self.memory: dict[int, Tensor] = {}
        self.frames_to_drop = self.taehv.frames_to_trim

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Decode the next ``T >= 1`` latents [B, T, C, h, w] of the stream → [B, T', 3, 8h, 8w] in [-1, 1].

        ``T' = 4T`` except on a stream's first call, where the first 3 frames are dropped (2 latents → 5).
        """
        if latents.ndim != 5 or latents.shape[1] == 0:
            raise ValueError(f"expected latents [B, T>=1, C, h, w], got {tuple(latents.shape)}")
        frames = torch.cat([self.taehv._decode(latents[:, t:t + 1], self.memory)
                            for t in range(latents.shape[1])], 1)
        drop = min(self.frames_to_drop, frames.shape[1])
        self.frames_to_drop -= drop
        return frames[:, drop:]

    @staticmethod
    @torch.no_grad()
    def decode_many(decoders: list["TAEHVStreamDecoder"], latents: Tensor, rows: list[int] | None = None) -> Tensor:
        """Decode the next latents of several streams in one call: ``[N, T, C, h, w]`` → ``[N, T', 3, H, W]``.

        Row ``i`` belongs to ``decoders[i]`` (or ``rows[i]`` rows each); equal to decoding each stream alone.
        The streams must share one :class:`TAEHV`, a resolution and their phase (a stream's first call drops
        3 frames, later calls none): group them by ``frames_to_drop`` first. Their MemBlock memories are
        stacked along the batch for the call and handed back as per-stream views.
        """
        return _many(decoders, latents, rows, "frames_to_drop", lambda batch, z: batch.decode(z))


# ------------------------------------------------------------------------------------------- checkpoints
def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, bad pickle, ...
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in sd.items()):
        raise CheckpointError(f"{path}: not a TAEHV state dict (expected a dict of named tensors)")
    return sd


def _config_from_state_dict(sd: dict[str, Tensor]) -> dict:
    """Channel counts read from tensor shapes (released defaults where a key is absent; the key check reports it)."""
    def dim(key: str, axis: int, default: int) -> int:
        t = sd.get(key)
        return t.shape[axis] if t is not None and t.ndim > axis else default

    return dict(latent_channels=dim("decoder.1.weight", 1, 16), image_channels=dim("decoder.22.weight", 0, 3),
                encoder_width=dim("encoder.0.weight", 0, 64),
                decoder_widths=tuple(dim(f"decoder.{i}.weight", 0, d) for i, d in zip((1, 8, 14, 20), DECODER_WIDTHS)))


def _check_keys(model: nn.Module, sd: dict[str, Tensor], path: Path) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = sorted(f"{k}: file {tuple(sd[k].shape)} vs model {expected[k]}"
                   for k in expected if k in sd and tuple(sd[k].shape) != expected[k])
    problems = [f"{name}: {', '.join(items)}" for name, items in
                (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong)) if items]
    if problems:
        raise CheckpointError(f"{path}: " + " | ".join(problems))


def load_taehv(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> TAEHV:
    """Load a ``taew2_1.pth``-layout file strictly (fp16 on CUDA, fp32 otherwise unless ``dtype`` is given).

    TGrow weights with more output channels than the module are trimmed to their last rows (the
    last-frame outputs), as the released file stores a stride-2 weight for the stride-1 first TGrow.
    Raises :class:`CheckpointError` naming the file and the offending keys.
    """
    path = Path(path)
    device = torch.device(device)
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    sd = _read_state_dict(path)
    with torch.device("meta"):
        model = TAEHV(**_config_from_state_dict(sd))
    for i, layer in enumerate(model.decoder):
        key = f"decoder.{i}.conv.weight"
        if isinstance(layer, TGrow) and key in sd and sd[key].shape[0] > layer.conv.out_channels:
            sd[key] = sd[key][-layer.conv.out_channels:]
    _check_keys(model, sd, path)
    model.load_state_dict(sd, assign=True)
    return model.to(device, dtype).eval()


def write_random_taehv(path: str | Path, seed: int = 0) -> None:
    """Write a random-weight TAEHV file in the released layout (default channel counts).

    Conv weights are PyTorch's default init scaled by 1.7 and the output bias is 0.5, so that decoded
    pixels are mid-range and depend on earlier latents instead of vanishing into the [0, 1] clamp.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TAEHV()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.mul_(1.7)
        model.decoder[-1].bias.fill_(0.5)
    torch.save(model.state_dict(), Path(path))
