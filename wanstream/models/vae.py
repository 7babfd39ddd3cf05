"""Streaming Wan 2.1 VAE over diffusers' ``AutoencoderKLWan`` weights, with per-stream causal conv caches.

Frame-count law over a stream: encode 5 frames → 2 latents on the first call, then every 4 frames → 1 latent;
decode 2 latents → 5 frames on the first call, then 1 latent → 4 frames. Streaming equals one-shot causal
encode / decode. Conventions of the released weights: encode returns the *un-normalised* mean; decode
de-normalises per channel (``z / (1/std) + mean``).
All state of a stream lives in a :class:`VAEStreamState`, so one VAE serves many streams.

Two paths over the same weights: the fast path (default, :mod:`.vae_fast`: lean norms, causal convs over
``[history ‖ new]`` without padding copies, NNPACK / oneDNN / cuDNN convolutions chosen by device and VAE width,
optionally ``torch.compile``-d in the steady state) and the eager reference (``fast=False``: diffusers' own modules
with their ``feat_cache`` lists).
:meth:`StreamingVAE.encode_many` / :meth:`StreamingVAE.decode_many` run several streams in one call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from wanstream.core.config import LATENT_MEAN, LATENT_STD
from wanstream.models.vae_fast import FastWanVAE


class _Rows:
    """Rows ``[a, b)`` of a list of fast-path cache tensors; after a batched call the streams share one list."""

    __slots__ = ("caches", "a", "b")

    def __init__(self, caches: list[Tensor], a: int, b: int):
        self.caches, self.a, self.b = caches, a, b

    def whole(self) -> bool:
        return self.a == 0 and self.b == self.caches[0].shape[0]

    def get(self) -> list[Tensor]:
        return self.caches if self.whole() else [c[self.a:self.b] for c in self.caches]


@dataclass
class VAEStreamState:
    """Causal conv caches of one stream (encoder and decoder), fresh per stream.

    ``enc_cache`` / ``dec_cache`` are diffusers' ``feat_cache`` lists (eager path); ``enc_rows`` / ``dec_rows``
    the fast path's caches (possibly rows of a list shared with the streams of the last batched call).
    A state belongs to the path of the :class:`StreamingVAE` that made it.
    """

    enc_cache: list = field(default_factory=list)
    dec_cache: list = field(default_factory=list)
    first_encode: bool = True
    first_decode: bool = True
    frames_in: int = 0
    latents_in: int = 0
    enc_rows: _Rows | None = None
    dec_rows: _Rows | None = None


def _gather(slots: list[_Rows | None], what: str) -> list[Tensor] | None:
    """The caches of several streams stacked along the batch (no copy when they already are, in order)."""
    if any(s is None for s in slots):
        if all(s is None for s in slots):
            return None
        raise ValueError(f"{what}: some streams have no caches yet; group them by phase")
    base = slots[0].caches
    if all(s.caches is base for s in slots) and slots[0].a == 0 and slots[-1].b == base[0].shape[0] and \
            all(p.b == q.a for p, q in zip(slots, slots[1:])):
        return base
    parts = [s.get() for s in slots]
    shape = parts[0][0].shape[1:]
    for i, p in enumerate(parts):
        if p[0].shape[1:] != shape:
            raise ValueError(f"{what}: stream {i} has caches of shape {tuple(p[0].shape[1:])}, stream 0 "
                             f"{tuple(shape)}: only streams at the same resolution can share a call")
    return [torch.cat(cs) for cs in zip(*parts)]


def _scatter(states: list[VAEStreamState], rows: list[int], caches: list[Tensor], attr: str) -> None:
    a = 0
    for st, n in zip(states, rows):
        setattr(st, attr, _Rows(caches, a, a + n))
        a += n


def _contiguous_caches(fn):
    """Compiled steady calls return contiguous caches, so the next call's inputs have the same strides."""
    def steady(x: Tensor, caches: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        y, out = fn(x, caches)
        return y, [c.contiguous() for c in out]
    return steady


class StreamingVAE:
    """Chunked encode / decode of many streams over one shared ``AutoencoderKLWan``.

    ``fast`` (default) runs :class:`~.vae_fast.FastWanVAE` over the module weights; ``fast=False`` runs
    diffusers' modules (the reference). ``compile`` wraps the fast steady-state calls (4-frame encode, 1-latent
    decode) in ``torch.compile(fullgraph=True, **compile_options)``; the first call of a stream stays eager.
    Each new batch size or resolution compiles again (torch's automatic dynamic shapes apply after the first).
    Build it after the VAE is on its final device and dtype. ``conv_impl`` picks the fast conv implementation
    (see :data:`~.vae_fast.CONV_IMPLS`; default by device and VAE width, :func:`~.vae_fast.default_conv_impl`).
    """

    def __init__(self, vae, mean=LATENT_MEAN, std=LATENT_STD, fast: bool = True, compile: bool = False,
                 compile_options: dict | None = None, conv_impl: str | None = None):
        if compile and not fast:
            raise ValueError("compile=True needs the fast path (fast=True)")
        self.vae = vae
        self.z_dim = vae.config.z_dim
        dev = vae.quant_conv.weight.device
        self.mean = torch.tensor(mean, dtype=torch.float32, device=dev).view(1, -1, 1, 1, 1)
        self.inv_std = 1.0 / torch.tensor(std, dtype=torch.float32, device=dev).view(1, -1, 1, 1, 1)
        self.n_enc = vae._cached_conv_counts["encoder"]
        self.n_dec = vae._cached_conv_counts["decoder"]
        self.fast = FastWanVAE(vae, self.mean, self.inv_std, conv_impl) if fast else None
        self.compiled = compile
        if compile:
            options = {"fullgraph": True, **(compile_options or {})}
            self._enc_steady = torch.compile(_contiguous_caches(self.fast.encode_steady), **options)
            self._dec_steady = torch.compile(_contiguous_caches(self.fast.decode_steady), **options)
        elif fast:
            self._enc_steady, self._dec_steady = self.fast.encode_steady, self.fast.decode_steady

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.quant_conv.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.vae.quant_conv.weight.device

    def new_state(self) -> VAEStreamState:
        return VAEStreamState([None] * self.n_enc, [None] * self.n_dec)

    # ------------------------------------------------------------------------------------------ encode
    def encode(self, state: VAEStreamState, frames: Tensor, normalize: bool = False) -> Tensor:
        """Pixels ``[B, T, 3, H, W]`` in [-1, 1] → latents ``[B, T_lat, z, H/8, W/8]``.

        First call of a stream: T = 1 + 4k (frame 0 alone, then groups of 4). Later calls: T = 4k.
        """
        return self.encode_many([state], frames, normalize, rows=[frames.shape[0]])

    @torch.no_grad()
    def encode_many(self, states: list[VAEStreamState], frames: Tensor, normalize: bool = False,
                    rows: list[int] | None = None) -> Tensor:
        """Encode the new chunks of several streams in one call: ``frames [N, T, 3, H, W]`` → ``[N, T_lat, z, h, w]``.

        Row ``i`` of ``frames`` belongs to ``states[i]`` (or ``rows[i]`` rows each, when given). Equal to
        encoding each stream alone. The streams of one call must be at the same phase and resolution: the first
        chunk of a stream (1 + 4k frames) and steady chunks (4k frames) cannot share a call, so group streams by
        ``state.first_encode`` and frame size first. Their caches are stacked along the batch; when the same
        streams come back in the same order (the steady state of a server), the stacked caches are reused as
        they are, without a copy.
        """
        rows = self._rows(states, frames, rows)
        first = self._phase(states, "first_encode", "encode")
        t = frames.shape[1]
        if first and (t < 1 or (t - 1) % 4):
            raise ValueError(f"the first encode of a stream takes 1+4k frames, got {t}")
        if not first and (t == 0 or t % 4):
            raise ValueError(f"encode after the first call takes a multiple of 4 frames, got {t}")
        x = frames.to(self.device, self.dtype)
        if self.fast is None:
            mu = self._encode_eager(states, rows, x, first)
        else:
            mu = self._encode_fast(states, rows, x, first)
        for st in states:
            st.first_encode = False
            st.frames_in += t
        if normalize:
            mu = (mu - self.mean.to(mu.dtype)) * self.inv_std.to(mu.dtype)
        return mu.transpose(1, 2)

    @staticmethod
    def _fast_caches(slots: list[_Rows | None], first: bool, what: str) -> list[Tensor] | None:
        caches = _gather(slots, what)
        if (caches is None) != first:
            raise ValueError(f"{what}: a stream past its first call has no fast-path caches (was its state made "
                             f"by a StreamingVAE with fast=False?)")
        return caches

    def _encode_fast(self, states, rows, x, first):
        caches = self._fast_caches([s.enc_rows for s in states], first, "encode")
        outs = []
        if first:
            mu, caches = self.fast.encode(x[:, :1], caches, first=True)
            outs.append(mu)
            x = x[:, 1:]
        for i in range(0, x.shape[1], 4):
            mu, caches = self._enc_steady(self._static(x[:, i:i + 4]), self._static_list(caches))
            outs.append(mu)
        _scatter(states, rows, caches, "enc_rows")
        mu = outs[0] if len(outs) == 1 else torch.cat(outs, 1)
        return mu.transpose(1, 2)                                 # [B, z, T, h, w]

    def _encode_eager(self, states, rows, x, first):
        x = x.transpose(1, 2)
        out, a = [], 0
        for st, n in zip(states, rows):
            xs = x[a:a + n]
            a += n
            groups = [xs[:, :, :1]] + [xs[:, :, 1 + 4 * i: 5 + 4 * i] for i in range((xs.shape[2] - 1) // 4)] \
                if first else [xs[:, :, 4 * i: 4 * i + 4] for i in range(xs.shape[2] // 4)]
            enc = [self.vae.encoder(g, feat_cache=st.enc_cache, feat_idx=[0]) for g in groups]
            out.append(self.vae.quant_conv(torch.cat(enc, dim=2))[:, : self.z_dim])
        return out[0] if len(out) == 1 else torch.cat(out)

    # ------------------------------------------------------------------------------------------ decode
    def decode(self, state: VAEStreamState, latents: Tensor) -> Tensor:
        """Latents ``[B, T, z, h, w]`` → pixels ``[B, T', 3, 8h, 8w]`` in [-1, 1] (float32).

        The first latent of a stream gives 1 frame, every later latent 4 frames.
        """
        return self.decode_many([state], latents, rows=[latents.shape[0]])

    @torch.no_grad()
    def decode_many(self, states: list[VAEStreamState], latents: Tensor, rows: list[int] | None = None) -> Tensor:
        """Decode the finished latents of several streams in one call: ``[N, T, z, h, w]`` → ``[N, T', 3, H, W]``.

        Row ``i`` belongs to ``states[i]`` (or ``rows[i]`` rows each). Equal to decoding each stream alone. As
        for :meth:`encode_many`, the streams must be at the same phase (``state.first_decode``: a stream's first
        latent gives 1 frame, later ones 4) and resolution.
        """
        rows = self._rows(states, latents, rows)
        first = self._phase(states, "first_decode", "decode")
        if latents.ndim != 5 or latents.shape[1] == 0:
            raise ValueError(f"expected latents [B, T>=1, z, h, w], got {tuple(latents.shape)}")
        z = latents.to(self.device)
        if self.fast is None:
            x = self._decode_eager(states, rows, z, first)
        else:
            x = self._decode_fast(states, rows, z.to(self.dtype), first)
        for st in states:
            st.first_decode = False
            st.latents_in += latents.shape[1]
        return x.float().clamp(-1, 1)

    def _decode_fast(self, states, rows, z, first):
        caches = self._fast_caches([s.dec_rows for s in states], first, "decode")
        outs = []
        for i in range(z.shape[1]):
            zi = z[:, i:i + 1]
            if first:
                y, caches = self.fast.decode(zi, caches, first=True)
                first = False
            else:
                y, caches = self._dec_steady(self._static(zi), self._static_list(caches))
            outs.append(y)
        _scatter(states, rows, caches, "dec_rows")
        return outs[0] if len(outs) == 1 else torch.cat(outs, 1)  # [B, T, 3, H, W]

    def _decode_eager(self, states, rows, z, first):
        z = z.transpose(1, 2)
        z = (z / self.inv_std.to(z.dtype) + self.mean.to(z.dtype)).to(self.dtype)
        x = self.vae.post_quant_conv(z)
        out, a = [], 0
        for st, n in zip(states, rows):
            outs = []
            for i in range(x.shape[2]):
                outs.append(self.vae.decoder(x[a:a + n, :, i: i + 1], feat_cache=st.dec_cache, feat_idx=[0],
                                             first_chunk=first and i == 0))
            out.append(torch.cat(outs, dim=2))
            a += n
        return (out[0] if len(out) == 1 else torch.cat(out)).transpose(1, 2)

    # ----------------------------------------------------------------------------------------- helpers
    @staticmethod
    def _rows(states: list[VAEStreamState], x: Tensor, rows: list[int] | None) -> list[int]:
        if not states:
            raise ValueError("no streams given")
        rows = [1] * len(states) if rows is None else list(rows)
        if len(rows) != len(states) or sum(rows) != x.shape[0] or min(rows) < 1:
            raise ValueError(f"{len(states)} streams with rows {rows} do not match a batch of {x.shape[0]}")
        if len({id(s) for s in states}) != len(states):
            raise ValueError("a stream appears twice in one call")
        return rows

    @staticmethod
    def _phase(states: list[VAEStreamState], attr: str, what: str) -> bool:
        phases = {getattr(s, attr) for s in states}
        if len(phases) > 1:
            raise ValueError(f"{what}: streams at their first call and streams in the steady state cannot share a "
                             f"call; group them by phase")
        return phases.pop()

    def _static(self, x: Tensor) -> Tensor:
        """Compiled calls take contiguous inputs, so that strides (guards) are the same on every call."""
        return x.contiguous() if self.compiled else x

    def _static_list(self, caches: list[Tensor]) -> list[Tensor]:
        return [c.contiguous() for c in caches] if self.compiled else caches
