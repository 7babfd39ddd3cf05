"""A lean streaming executor for the Wan 2.1 VAE over the weights of diffusers' ``AutoencoderKLWan``.

diffusers' modules stay the owners of the weights (and the eager reference path); this module walks their
tree once and builds a flat plan of our own small ops that read the same parameters:

* **layout** — activations are ``[B, T, H, W, C]`` (frames-major, channels last), so the RMS norm reduces over
  the innermost dimension and every 2-D convolution sees a channels-last tensor;
* **norm** — ``F.rms_norm`` (``x * rsqrt(mean(x²) + eps) * gamma``) instead of ``F.normalize`` + scale; the
  two agree up to rounding (eps is ``F.normalize``'s norm floor put on the mean square);
* **causal conv without padding copies** — a conv's time history (the last ``kt - 1`` input frames of the
  stream, zeros before the first) is carried in the cache; the conv runs over ``[history ‖ new]`` with the
  spatial padding done by the convolution itself. On CPU the ``kt`` time taps are stacked along channels
  (``cat`` of shifted views) and one channels-last ``conv2d`` does the work (oneDNN, 3–7× faster than
  PyTorch's 3-D CPU conv on these shapes); elsewhere ``conv3d`` runs on the channels-last-3d view;
* **folds** — ``quant_conv`` (1×1×1, of which only the mean half is used) is folded into the encoder's last
  conv; the decode de-normalisation ``z * std + mean`` is folded into ``post_quant_conv``.

A stream's cache is a plain list of tensors (one per time-causal op, in plan order), the same shape on every
steady-state call, so the steady-state encode (4 frames) and decode (1 latent) are pure functions of
``(input, caches)`` with static shapes — what ``torch.compile`` needs. The first call of a stream differs
only in the temporal resamplers (the first frame / latent passes through without a time conv), selected by
the Python flag ``first``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

CONV_IMPLS = ("stack2d", "conv3d")


def default_conv_impl(device: torch.device) -> str:
    """``stack2d`` on CPU (oneDNN 2-D convs over stacked time taps), ``conv3d`` elsewhere."""
    return "stack2d" if torch.device(device).type == "cpu" else "conv3d"


class _Ctx:
    """Caches of one call: ``hist_in`` read in plan order (``None`` on a stream's first call: zero history),
    ``hist_out`` written in the same order."""

    def __init__(self, hist_in: list[Tensor] | None, first: bool):
        self.hist_in = hist_in
        self.first = first
        self.hist_out: list[Tensor] = []

    def take(self) -> Tensor | None:
        return None if self.hist_in is None else self.hist_in[len(self.hist_out)]


class CausalConv:
    """A ``WanCausalConv3d`` (or ``Conv2d``) over ``[B, T, H, W, C]``: time kernel ``kt``, history ``kt - 1``."""

    def __init__(self, weight: Tensor, bias: Tensor | None, padding: int, impl: str, stride_t: int = 1,
                 stride_s: int = 1, history: int | None = None):
        self.co, self.ci, self.kt, self.kh, self.kw = weight.shape
        self.bias, self.pad, self.impl = bias, padding, impl
        self.stride_t, self.stride_s = stride_t, stride_s
        self.history = self.kt - 1 if history is None else history
        self.spatial = (self.kh, self.kw) != (1, 1)
        if not self.spatial:                     # 1×1 in space: a matmul over channels (taps k-major)
            self.w = weight.permute(0, 2, 1, 3, 4).reshape(self.co, self.kt * self.ci)
        elif impl == "stack2d":
            self.w = (weight[:, :, 0] if self.kt == 1 else
                      weight.permute(0, 2, 1, 3, 4).reshape(self.co, self.kt * self.ci, self.kh, self.kw))
        else:
            self.w = weight if self.kt > 1 else weight[:, :, 0]

    @classmethod
    def from_module(cls, m, impl: str, history: int | None = None) -> "CausalConv":
        """From a diffusers ``WanCausalConv3d`` (causal time padding becomes history) or an ``nn.Conv2d``."""
        w = m.weight if m.weight.ndim == 5 else m.weight[:, :, None]
        if m.weight.ndim == 5:
            pad_w, pad_w2, pad_h, pad_h2, _, _ = m._padding
            if not pad_w == pad_w2 == pad_h == pad_h2 or tuple(m.stride[1:]) != (1, 1):
                raise ValueError(f"unsupported causal conv (padding {m._padding}, stride {m.stride})")
            return cls(w, m.bias, pad_w, impl, stride_t=m.stride[0], history=history)
        return cls(w, m.bias, m.padding[0], impl, stride_s=m.stride[0])

    def t_out(self, frames: int) -> int:
        return (frames - self.kt) // self.stride_t + 1

    def __call__(self, x: Tensor, hist: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """``x`` [B, T, H, W, Ci] → (``[B, T', H', W', Co]``, the history for the next call)."""
        if self.history:
            if hist is None:
                hist = x.new_zeros(x.shape[0], self.history, *x.shape[2:])
            seq = torch.cat([hist, x], 1)
            new_hist = seq[:, seq.shape[1] - self.history:]
        else:
            seq, new_hist = x, None
        b, s, h, w, c = seq.shape
        t = self.t_out(s)
        if not self.spatial:
            taps = seq if self.kt == 1 else self._stack(seq, t)
            return F.linear(taps, self.w, self.bias), new_hist
        if self.impl == "stack2d" or self.kt == 1:
            taps = (seq if self.kt == 1 else self._stack(seq, t)).reshape(b * t, h, w, -1)
            y = F.conv2d(taps.permute(0, 3, 1, 2), self.w, self.bias, self.stride_s, self.pad)
            y = y.permute(0, 2, 3, 1)
        else:
            y = F.conv3d(seq.permute(0, 4, 1, 2, 3), self.w, self.bias, (self.stride_t, self.stride_s, self.stride_s),
                         (0, self.pad, self.pad)).permute(0, 2, 3, 4, 1)
        return y.contiguous().view(b, t, *y.shape[-3:]), new_hist

    def _stack(self, seq: Tensor, t: int) -> Tensor:
        """Time taps stacked along channels (k-major): ``[B, t, H, W, kt * C]``."""
        st = self.stride_t
        return torch.cat([seq[:, k: k + st * (t - 1) + 1: st] for k in range(self.kt)], -1)


class Norm:
    """``WanRMS_norm`` over the channel (last) dim: ``x * rsqrt(mean(x²) + eps) * gamma (+ bias)``, then SiLU."""

    def __init__(self, m, silu: bool):
        self.c = m.gamma.shape[0]
        self.gamma = m.gamma.view(self.c)
        self.bias = m.bias.view(self.c) if isinstance(m.bias, torch.Tensor) else None
        # F.normalize divides by max(‖x‖, 1e-12); that floor, put on the mean square, is 1e-24 / C
        self.eps = 1e-24 / self.c
        self.silu = silu

    def __call__(self, x: Tensor) -> Tensor:
        y = F.rms_norm(x, (self.c,), self.gamma, self.eps)      # computes in float32 for half inputs
        if self.bias is not None:
            y = y + self.bias
        return F.silu(y, inplace=True) if self.silu else y


class ResBlock:
    def __init__(self, m, impl: str):
        self.shortcut = None if isinstance(m.conv_shortcut, torch.nn.Identity) else \
            CausalConv.from_module(m.conv_shortcut, impl)
        self.norm1, self.norm2 = Norm(m.norm1, True), Norm(m.norm2, True)
        self.conv1, self.conv2 = CausalConv.from_module(m.conv1, impl), CausalConv.from_module(m.conv2, impl)

    def __call__(self, x: Tensor, ctx: _Ctx) -> Tensor:
        h = x if self.shortcut is None else self.shortcut(x)[0]
        for norm, conv in ((self.norm1, self.conv1), (self.norm2, self.conv2)):
            x, hist = conv(norm(x), ctx.take())
            ctx.hist_out.append(hist)
        return x.add_(h)


class Attention:
    """``WanAttentionBlock``: one-head self-attention over the positions of each frame."""

    def __init__(self, m):
        self.norm = Norm(m.norm, False)
        c = m.to_qkv.out_channels // 3
        self.w_qkv, self.b_qkv = m.to_qkv.weight.view(3 * c, c), m.to_qkv.bias
        self.w_proj, self.b_proj = m.proj.weight.view(c, c), m.proj.bias

    def __call__(self, x: Tensor, ctx: _Ctx) -> Tensor:
        b, t, h, w, c = x.shape
        qkv = F.linear(self.norm(x), self.w_qkv, self.b_qkv).view(b * t, 1, h * w, 3 * c)
        q, k, v = qkv.chunk(3, dim=-1)
        o = F.scaled_dot_product_attention(q, k, v).reshape(b, t, h, w, c)
        return F.linear(o, self.w_proj, self.b_proj).add_(x)


class Resample:
    """``WanResample``: 2× spatial down / up sampling, with the causal time conv of the 3-D modes."""

    def __init__(self, m, impl: str):
        self.mode = m.mode
        if self.mode not in ("downsample2d", "downsample3d", "upsample2d", "upsample3d"):
            raise ValueError(f"unsupported WanResample mode {self.mode!r}")
        self.conv = CausalConv.from_module(m.resample[1], impl)
        self.time = None
        if self.mode == "downsample3d":
            self.time = CausalConv.from_module(m.time_conv, impl, history=1)
        elif self.mode == "upsample3d":
            self.time = CausalConv.from_module(m.time_conv, impl, history=2)

    def __call__(self, x: Tensor, ctx: _Ctx) -> Tensor:
        if self.mode.startswith("up"):     # nearest 2× in space (one copy, also interleaving time-up frames)
            x = self._time_up(x, ctx) if self.mode == "upsample3d" else x[:, :, None]
            b, t, j, h, w, c = x.shape
            x = x[:, :, :, :, None, :, None].expand(b, t, j, h, 2, w, 2, c).reshape(b, t * j, 2 * h, 2 * w, c)
            return self.conv(x)[0]
        x = self.conv(F.pad(x, (0, 0, 0, 1, 0, 1)))[0]     # ZeroPad2d((0, 1, 0, 1)), then stride 2
        if self.mode == "downsample3d":
            if ctx.first:            # the first frame passes; it becomes the history
                ctx.hist_out.append(x)
            else:
                x, hist = self.time(x, ctx.take())
                ctx.hist_out.append(hist)
        return x

    def _time_up(self, x: Tensor, ctx: _Ctx) -> Tensor:
        """``[B, T, H, W, C]`` → a view ``[B, T, j, H, W, C]``: frame ``t`` becomes frames ``(t, 0..j-1)``."""
        hist = ctx.take()
        if ctx.first:                # the first latent passes without doubling; the history starts at zero
            ctx.hist_out.append(x.new_zeros(x.shape[0], 2, *x.shape[2:]))
            return x[:, :, None]
        y, hist = self.time(x, hist)
        ctx.hist_out.append(hist)
        b, t, h, w, c2 = y.shape     # output channels [2, C] become frames 2t, 2t + 1
        return y.view(b, t, h, w, 2, c2 // 2).permute(0, 1, 4, 2, 3, 5)


class FastWanVAE:
    """The plan of one ``AutoencoderKLWan`` (Wan 2.1 layout); build it after the VAE is on its device."""

    def __init__(self, vae, mean: Tensor, inv_std: Tensor, conv_impl: str | None = None):
        if vae.config.get("is_residual", False) or vae.config.get("patch_size"):
            raise ValueError("the fast streaming VAE supports the Wan 2.1 VAE only (not the residual 2.2 layout)")
        dev = vae.quant_conv.weight.device
        self.impl = conv_impl or default_conv_impl(dev)
        if self.impl not in CONV_IMPLS:
            raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {self.impl!r}")
        z = vae.config.z_dim
        enc, dec = vae.encoder, vae.decoder
        with torch.no_grad():
            self.enc_in = CausalConv.from_module(enc.conv_in, self.impl)
            self.enc_layers = [self._layer(m) for m in enc.down_blocks] + self._mid(enc.mid_block)
            # folds computed in float32, stored in the VAE's dtype
            dt = vae.quant_conv.weight.dtype
            # quant_conv (1×1×1, mean half) folded into conv_out: W_q[:z] @ W_out, W_q[:z] @ b_out + b_q[:z]
            wq, bq = vae.quant_conv.weight[:z, :, 0, 0, 0].float(), vae.quant_conv.bias[:z].float()
            w_out = torch.einsum("zc,cikhw->zikhw", wq, enc.conv_out.weight.float())
            b_out = wq @ enc.conv_out.bias.float() + bq
            self.enc_norm = Norm(enc.norm_out, True)
            self.enc_out = CausalConv(w_out.to(dt), b_out.to(dt), enc.conv_out._padding[0], self.impl)
            # z / (1/std) + mean folded into post_quant_conv (1×1×1)
            wp, bp = vae.post_quant_conv.weight[:, :, 0, 0, 0].float(), vae.post_quant_conv.bias.float()
            self.post_w = (wp / inv_std.view(1, -1).float()).to(dt)
            self.post_b = (wp @ mean.view(-1).float() + bp).to(dt)
            self.dec_in = CausalConv.from_module(dec.conv_in, self.impl)
            self.dec_layers = self._mid(dec.mid_block)
            for up in dec.up_blocks:
                self.dec_layers += [ResBlock(r, self.impl) for r in up.resnets]
                if up.upsamplers is not None:
                    self.dec_layers.append(Resample(up.upsamplers[0], self.impl))
            self.dec_norm, self.dec_out = Norm(dec.norm_out, True), CausalConv.from_module(dec.conv_out, self.impl)

    def _layer(self, m):
        name = type(m).__name__
        if name == "WanResidualBlock":
            return ResBlock(m, self.impl)
        if name == "WanResample":
            return Resample(m, self.impl)
        if name == "WanAttentionBlock":
            return Attention(m)
        raise ValueError(f"unsupported Wan VAE layer {name}")

    def _mid(self, mid):
        layers = [ResBlock(mid.resnets[0], self.impl)]
        for attn, res in zip(mid.attentions, mid.resnets[1:]):
            layers += [Attention(attn), ResBlock(res, self.impl)]
        return layers

    @staticmethod
    def _run(x: Tensor, ctx: _Ctx, conv_in: CausalConv, layers: list, norm: Norm, conv_out: CausalConv) -> Tensor:
        x, hist = conv_in(x, ctx.take())
        ctx.hist_out.append(hist)
        for layer in layers:
            x = layer(x, ctx)
        x, hist = conv_out(norm(x), ctx.take())
        ctx.hist_out.append(hist)
        return x

    def encode(self, x: Tensor, caches: list[Tensor] | None, first: bool) -> tuple[Tensor, list[Tensor]]:
        """Pixels ``[B, T, 3, H, W]`` (1 frame when ``first``, else 4) → means ``[B, T', h, w, z]``, new caches.

        ``caches`` is ``None`` on a stream's first call (zero history)."""
        ctx = _Ctx(caches, first)
        x = x.permute(0, 1, 3, 4, 2)        # the first conv's concat makes it contiguous channels-last
        return self._run(x, ctx, self.enc_in, self.enc_layers, self.enc_norm, self.enc_out), ctx.hist_out

    def decode(self, z: Tensor, caches: list[Tensor] | None, first: bool) -> tuple[Tensor, list[Tensor]]:
        """Normalised latents ``[B, 1, z, h, w]`` → pixels ``[B, T', H, W, 3]`` (1 frame when ``first``, else 4)."""
        ctx = _Ctx(caches, first)
        x = F.linear(z.permute(0, 1, 3, 4, 2), self.post_w, self.post_b)
        return self._run(x, ctx, self.dec_in, self.dec_layers, self.dec_norm, self.dec_out), ctx.hist_out

    def encode_steady(self, x: Tensor, caches: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """The steady-state encode (a 4-frame chunk): static shapes, the unit ``torch.compile`` wraps."""
        return self.encode(x, caches, False)

    def decode_steady(self, z: Tensor, caches: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """The steady-state decode (one latent): static shapes, the unit ``torch.compile`` wraps."""
        return self.decode(z, caches, False)
