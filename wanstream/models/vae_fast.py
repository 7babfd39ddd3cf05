"""A lean streaming executor for the Wan 2.1 VAE over the weights of diffusers' ``AutoencoderKLWan``.

diffusers' modules stay the owners of the weights (and the eager reference path); this module walks their
tree once and builds a flat plan of our own small ops that read the same parameters:

* **causal conv without padding copies** — a conv's time history (the last ``kt - 1`` input frames of the
  stream, zeros before the first) is carried in the cache; the conv runs over ``[history ‖ new]`` with the
  spatial padding done by the convolution itself, as a 2-D conv over the ``kt`` time taps stacked along
  channels (or ``conv3d``);
* **three implementations** (``conv_impl``, default by device and VAE width, :func:`default_conv_impl`):

  - ``nnpack`` (CPU, released widths): activations ``[B, T, C, H, W]`` (channels first). The norm of a conv's
    input writes straight into a reused ``[history ‖ new]`` buffer, where the taps of an output frame are one
    contiguous ``[kt·C, H, W]`` block: no stacking copy. Frames of 48² and more go to NNPACK's Winograd
    convolution one frame per call (about 2× oneDNN's rate on these shapes), smaller ones to oneDNN;
  - ``stack2d`` (CPU, narrow VAEs or no NNPACK): ``[B, T, H, W, C]`` (channels last), ``F.rms_norm`` over the
    innermost dim, taps stacked with a ``cat`` into one channels-last oneDNN ``conv2d``;
  - ``conv3d`` (GPUs): channels last, ``conv3d`` on the channels-last-3d view (cuDNN);

* **norm** — ``x * rsqrt(Σx² ...) * gamma`` (``F.rms_norm`` channels last); agrees with the reference's
  ``F.normalize`` + scale up to rounding (eps is ``F.normalize``'s norm floor);
* **folds** — ``quant_conv`` (1×1×1, of which only the mean half is used) is folded into the encoder's last
  conv; the decode de-normalisation ``z * std + mean`` is folded into ``post_quant_conv``.

A stream's cache is a plain list of tensors (one per time-causal op, in plan order), the same shape on every
steady-state call, so the steady-state encode (4 frames) and decode (1 latent) are pure functions of
``(input, caches)`` with static shapes — what ``torch.compile`` needs. The first call of a stream differs
only in the temporal resamplers (the first frame / latent passes through without a time conv), selected by
the Python flag ``first``.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import Tensor

CONV_IMPLS = ("nnpack", "stack2d", "conv3d")
CHANNELS_FIRST = ("nnpack",)        # impls whose activations are [B, T, C, H, W]; the others [B, T, H, W, C]


def nnpack_available() -> bool:
    """Whether torch's NNPACK convolution runs on this machine (the call also initialises NNPACK)."""
    return torch._C._get_nnpack_enabled() and torch.backends.nnpack.is_available()


# measured on a 2-core AVX-512 CPU (docs/benchmarks.md): NNPACK's Winograd convs beat oneDNN from 64² frames up
# (about 2× at 128²-256²), tie at 32² and lose below; on narrow VAEs (the tiny test preset) they lose everywhere
NNPACK_MIN_AREA = 48 * 48
NNPACK_MIN_WIDTH = 32


def default_conv_impl(device: torch.device, width: int | None = None) -> str:
    """The conv implementation of the fast path for a VAE of base ``width`` on ``device`` (measured choices):
    ``conv3d`` on GPUs; on the CPU ``nnpack`` where NNPACK runs and the VAE is not narrow, else ``stack2d``."""
    if torch.device(device).type != "cpu":
        return "conv3d"
    if width is not None and width < NNPACK_MIN_WIDTH:
        return "stack2d"
    return "nnpack" if nnpack_available() else "stack2d"


class _Buffers(threading.local):
    """Reusable scratch tensors by (shape, dtype, device), one set per thread, the most recently used kept up to
    ``BUDGET`` bytes: the ``[history ‖ new]`` input of a causal conv (and a resampler's padded or 2x input) lives
    only during one op, so ops of the same shape share one buffer, within a call and, when the working set fits
    the budget (a 256² stream's does), call after call. A fresh large CPU tensor costs page faults on first
    touch, tens of ms per 100 MB; a buffer larger than the budget is not kept."""

    BUDGET = 1 << 30

    def __init__(self):
        self.free: dict[tuple, Tensor] = {}
        self.nbytes = 0

    def get(self, shape: tuple, like: Tensor) -> Tensor:
        if torch.compiler.is_compiling():        # inductor plans its own buffers
            return like.new_empty(shape)
        key = (tuple(shape), like.dtype, like.device)
        buf = self.free.pop(key, None)
        if buf is None:
            buf = like.new_empty(shape)
            self.nbytes += buf.nbytes
        while self.free and self.nbytes > self.BUDGET:            # least recently used first
            self.nbytes -= self.free.pop(next(iter(self.free))).nbytes
        if self.nbytes > self.BUDGET:                               # alone larger than the budget: not kept
            self.nbytes -= buf.nbytes
        else:
            self.free[key] = buf                                    # most recently used last
        return buf


SCRATCH = _Buffers()


class _Ctx:
    """Caches of one call: ``hist_in`` read in plan order (``None`` on a stream's first call: zero history),
    ``hist_out`` written in the same order."""

    def __init__(self, hist_in: list[Tensor] | None, first: bool):
        self.hist_in = hist_in
        self.first = first
        self.hist_out: list[Tensor] = []

    def take(self) -> Tensor | None:
        return None if self.hist_in is None else self.hist_in[len(self.hist_out)]


class Norm:
    """``WanRMS_norm`` over the channel dim: ``x * rsqrt(mean(x²) + eps) * gamma (+ bias)``, then SiLU.

    Channels last: ``F.rms_norm`` over the innermost dim. Channels first (``[B, T, C, H, W]``): the channel norm
    (one reduction), then scale, gamma and SiLU in place, written to ``out`` when given (a causal conv's input
    buffer, so that the conv needs no concatenation)."""

    def __init__(self, m, silu: bool, channels_first: bool = False):
        self.c = m.gamma.shape[0]
        self.cf = channels_first
        shape = (self.c, 1, 1) if channels_first else (self.c,)
        self.gamma = m.gamma.view(shape)
        self.bias = m.bias.view(shape) if isinstance(m.bias, torch.Tensor) else None
        # F.normalize divides by max(‖x‖, 1e-12); that floor, put on the mean square, is 1e-24 / C
        self.eps = 1e-24 / self.c
        self.silu = silu

    def __call__(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        if self.cf:
            # Σ x² over channels as a product then a sum (torch's strided norm reduction is several times slower);
            # the product uses the output as scratch. x / max(‖x‖, 1e-12) · √C, as F.normalize does.
            if x.dtype == torch.float32:
                sq = torch.mul(x, x, out=out) if out is not None else x * x
            else:
                sq = x.float().square_()
            inv = sq.sum(2, keepdim=True).clamp_min_(1e-24).rsqrt_().mul_(self.c ** 0.5).to(x.dtype)
            y = torch.mul(x, inv, out=out) if out is not None else x * inv
            y.mul_(self.gamma)
        else:
            y = F.rms_norm(x, (self.c,), self.gamma, self.eps)      # computes in float32 for half inputs
            if out is not None:
                y = out.copy_(y)
        if self.bias is not None:
            y.add_(self.bias)
        return F.silu(y, inplace=True) if self.silu else y


class CausalConv:
    """A ``WanCausalConv3d`` (or ``Conv2d``) over ``[B, T, ...]`` frames: time kernel ``kt``, history ``kt - 1``.

    ``norm`` (a :class:`Norm`), when given, is applied to the input first; on the channels-first layout it writes
    straight into the ``[history ‖ new]`` buffer."""

    def __init__(self, weight: Tensor, bias: Tensor | None, padding: int, impl: str, stride_t: int = 1,
                 stride_s: int = 1, history: int | None = None):
        self.co, self.ci, self.kt, self.kh, self.kw = weight.shape
        self.bias, self.pad, self.impl = bias, padding, impl
        self.cf = impl in CHANNELS_FIRST
        self.stride_t, self.stride_s = stride_t, stride_s
        self.history = self.kt - 1 if history is None else history
        self.spatial = (self.kh, self.kw) != (1, 1)
        # NNPACK: float32, stride 1 (its strided mode is slow); the rest of the channels-first convs use conv2d
        self.nnpack = impl == "nnpack" and stride_s == 1 and weight.dtype == torch.float32
        if not self.spatial:                     # 1×1 in space: a matmul over channels (taps k-major)
            self.w = weight.permute(0, 2, 1, 3, 4).reshape(self.co, self.kt * self.ci)
        elif impl in ("stack2d", "nnpack"):
            self.w = (weight[:, :, 0] if self.kt == 1 else
                      weight.permute(0, 2, 1, 3, 4).reshape(self.co, self.kt * self.ci, self.kh, self.kw)).contiguous()
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

    def __call__(self, x: Tensor, hist: Tensor | None = None, norm: Norm | None = None
                 ) -> tuple[Tensor, Tensor | None]:
        """``x`` [B, T, ...] → (``[B, T', ...]``, the history for the next call)."""
        if self.cf:
            return self._channels_first(x, hist, norm)
        if norm is not None:
            x = norm(x)
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

    def _channels_first(self, x: Tensor, hist: Tensor | None, norm: Norm | None) -> tuple[Tensor, Tensor | None]:
        """``[B, T, C, H, W]``: frames ``t .. t + kt - 1`` of the contiguous ``[history ‖ new]`` buffer are one
        ``[kt * C, H, W]`` block, so the time taps of an output frame are a view (no stacking copy)."""
        b, t_in = x.shape[:2]
        hn = self.history
        if hn:
            seq = SCRATCH.get((b, hn + t_in, *x.shape[2:]), x)
            if hist is None:
                seq[:, :hn].zero_()
            else:
                seq[:, :hn].copy_(hist)
            if norm is not None:
                norm(x, out=seq[:, hn:])
            else:
                seq[:, hn:].copy_(x)
            new_hist = seq[:, t_in:].clone()          # a copy: the buffer is not kept alive by the cache
        else:
            seq, new_hist = (norm(x) if norm is not None else x), None
        s, c, h, w = seq.shape[1:]
        t, st, kt = self.t_out(s), self.stride_t, self.kt
        if not self.spatial:                          # per output frame: [Co, kt*C] @ [kt*C, H*W]
            if kt == 1:
                y = torch.matmul(self.w, seq.reshape(b * s, c, h * w)).view(b, s, self.co, h * w)
            else:
                y = torch.stack([torch.matmul(self.w, seq[:, j * st: j * st + kt].reshape(b, kt * c, h * w))
                                 for j in range(t)], 1)
            if self.bias is not None:
                y += self.bias.view(self.co, 1)
            return y.view(b, t, self.co, h, w), new_hist
        if self.nnpack and h * w >= NNPACK_MIN_AREA:  # one frame per call (NNPACK's fast inference mode)
            pad = [self.pad, self.pad]
            y = None
            for i in range(b):
                for j in range(t):
                    yj = torch._nnpack_spatial_convolution(seq[i, j * st: j * st + kt].reshape(1, kt * c, h, w),
                                                           self.w, self.bias, pad)
                    if b * t == 1:
                        y = yj
                    else:                             # frame by frame into the output: one frame in flight
                        y = yj.new_empty(b * t, *yj.shape[1:]) if y is None else y
                        y[i * t + j].copy_(yj[0])
        else:
            taps = seq.reshape(b * s, c, h, w) if kt == 1 else \
                torch.stack([seq[:, j * st: j * st + kt] for j in range(t)], 1).reshape(b * t, kt * c, h, w)
            y = F.conv2d(taps, self.w, self.bias, self.stride_s, self.pad)
        return y.view(b, t, *y.shape[1:]), new_hist


class ResBlock:
    def __init__(self, m, impl: str):
        cf = impl in CHANNELS_FIRST
        self.shortcut = None if isinstance(m.conv_shortcut, torch.nn.Identity) else \
            CausalConv.from_module(m.conv_shortcut, impl)
        self.norm1, self.norm2 = Norm(m.norm1, True, cf), Norm(m.norm2, True, cf)
        self.conv1, self.conv2 = CausalConv.from_module(m.conv1, impl), CausalConv.from_module(m.conv2, impl)

    def __call__(self, x: Tensor, ctx: _Ctx) -> Tensor:
        h = x if self.shortcut is None else self.shortcut(x)[0]
        for norm, conv in ((self.norm1, self.conv1), (self.norm2, self.conv2)):
            x, hist = conv(x, ctx.take(), norm)
            ctx.hist_out.append(hist)
        return x.add_(h)


class Attention:
    """``WanAttentionBlock``: one-head self-attention over the positions of each frame."""

    def __init__(self, m, impl: str):
        self.cf = impl in CHANNELS_FIRST
        self.norm = Norm(m.norm, False, self.cf)
        c = m.to_qkv.out_channels // 3
        self.w_qkv, self.b_qkv = m.to_qkv.weight.view(3 * c, c), m.to_qkv.bias
        self.w_proj, self.b_proj = m.proj.weight.view(c, c), m.proj.bias

    def __call__(self, x: Tensor, ctx: _Ctx) -> Tensor:
        if self.cf:                  # [B, T, C, H, W]: channel matmuls on [C, H*W] frames
            b, t, c, h, w = x.shape
            qkv = torch.baddbmm(self.b_qkv.view(1, -1, 1), self.w_qkv.expand(b * t, -1, -1),
                                self.norm(x).view(b * t, c, h * w))
            q, k, v = qkv.transpose(1, 2).unsqueeze(1).chunk(3, dim=-1)
            o = F.scaled_dot_product_attention(q, k, v).squeeze(1)                 # [BT, HW, C]
            y = torch.baddbmm(self.b_proj.view(1, -1, 1), self.w_proj.expand(b * t, -1, -1), o.transpose(1, 2))
            return y.view(b, t, c, h, w).add_(x)
        b, t, h, w, c = x.shape
        qkv = F.linear(self.norm(x), self.w_qkv, self.b_qkv).view(b * t, 1, h * w, 3 * c)
        q, k, v = qkv.chunk(3, dim=-1)
        o = F.scaled_dot_product_attention(q, k, v).reshape(b, t, h, w, c)
        return F.linear(o, self.w_proj, self.b_proj).add_(x)


class Resample:
    """``WanResample``: 2× spatial down / up sampling, with the causal time conv of the 3-D modes."""

    def __init__(self, m, impl: str):
        self.mode = m.mode
        self.cf = impl in CHANNELS_FIRST
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
            if self.mode == "upsample3d":
                x = self._time_up(x, ctx)
            if self.cf:              # into a reused buffer: the conv reads it once
                b, t, c, h, w = x.shape
                up = SCRATCH.get((b, t, c, 2 * h, 2 * w), x)
                up.view(b, t, c, h, 2, w, 2).copy_(x[:, :, :, :, None, :, None].expand(b, t, c, h, 2, w, 2))
                x = up
            else:
                b, t, h, w, c = x.shape
                x = x[:, :, :, None, :, None].expand(b, t, h, 2, w, 2, c).reshape(b, t, 2 * h, 2 * w, c)
            return self.conv(x)[0]
        # ZeroPad2d((0, 1, 0, 1)), then stride 2
        if self.cf:                  # into a reused buffer: the conv reads it once
            b, t, c, h, w = x.shape
            padded = SCRATCH.get((b, t, c, h + 1, w + 1), x)
            padded[..., h, :].zero_()
            padded[..., :h, w].zero_()
            padded[..., :h, :w].copy_(x)
            x = self.conv(padded)[0]
        else:
            x = self.conv(F.pad(x, (0, 0, 0, 1, 0, 1)))[0]
        if self.mode == "downsample3d":
            if ctx.first:            # the first frame passes; it becomes the history
                ctx.hist_out.append(x)
            else:
                x, hist = self.time(x, ctx.take())
                ctx.hist_out.append(hist)
        return x

    def _time_up(self, x: Tensor, ctx: _Ctx) -> Tensor:
        """``[B, T, ...]`` → ``[B, 2T, ...]``: the time conv's output channels ``[2, C]`` become frames 2t, 2t + 1
        (a view on the channels-first layout)."""
        hist = ctx.take()
        if ctx.first:                # the first latent passes without doubling; the history starts at zero
            ctx.hist_out.append(x.new_zeros(x.shape[0], 2, *x.shape[2:]))
            return x
        y, hist = self.time(x, hist)
        ctx.hist_out.append(hist)
        if self.cf:
            b, t, c2, h, w = y.shape
            return y.view(b, t * 2, c2 // 2, h, w)
        b, t, h, w, c2 = y.shape
        return y.view(b, t, h, w, 2, c2 // 2).permute(0, 1, 4, 2, 3, 5).reshape(b, t * 2, h, w, c2 // 2)


class FastWanVAE:
    """The plan of one ``AutoencoderKLWan`` (Wan 2.1 layout); build it after the VAE is on its device."""

    def __init__(self, vae, mean: Tensor, inv_std: Tensor, conv_impl: str | None = None):
        if vae.config.get("is_residual", False) or vae.config.get("patch_size"):
            raise ValueError("the fast streaming VAE supports the Wan 2.1 VAE only (not the residual 2.2 layout)")
        dev = vae.quant_conv.weight.device
        self.impl = conv_impl or default_conv_impl(dev, vae.config.base_dim)
        if self.impl not in CONV_IMPLS:
            raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {self.impl!r}")
        if self.impl == "nnpack" and not nnpack_available():      # (the check also initialises NNPACK)
            raise ValueError("conv_impl='nnpack' needs torch's NNPACK, which is not available (or disabled) here")
        self.channels_first = cf = self.impl in CHANNELS_FIRST
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
            self.enc_norm = Norm(enc.norm_out, True, cf)
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
            self.dec_norm = Norm(dec.norm_out, True, cf)
            self.dec_out = CausalConv.from_module(dec.conv_out, self.impl)

    def _layer(self, m):
        name = type(m).__name__
        if name == "WanResidualBlock":
            return ResBlock(m, self.impl)
        if name == "WanResample":
            return Resample(m, self.impl)
        if name == "WanAttentionBlock":
            return Attention(m, self.impl)
        raise ValueError(f"unsupported Wan VAE layer {name}")

    def _mid(self, mid):
        layers = [ResBlock(mid.resnets[0], self.impl)]
        for attn, res in zip(mid.attentions, mid.resnets[1:]):
            layers += [Attention(attn, self.impl), ResBlock(res, self.impl)]
        return layers

    @staticmethod
    def _run(x: Tensor, ctx: _Ctx, conv_in: CausalConv, layers: list, norm: Norm, conv_out: CausalConv) -> Tensor:
        x, hist = conv_in(x, ctx.take())
        ctx.hist_out.append(hist)
        for layer in layers:
            x = layer(x, ctx)
        x, hist = conv_out(x, ctx.take(), norm)
        ctx.hist_out.append(hist)
        return x

    def encode(self, x: Tensor, caches: list[Tensor] | None, first: bool) -> tuple[Tensor, list[Tensor]]:
        """Pixels ``[B, T, 3, H, W]`` (1 frame when ``first``, else 4) → means ``[B, T', z, h, w]``, new caches.

        ``caches`` is ``None`` on a stream's first call (zero history). The means may be a strided view."""
        ctx = _Ctx(caches, first)
        if self.channels_first:
            return self._run(x, ctx, self.enc_in, self.enc_layers, self.enc_norm, self.enc_out), ctx.hist_out
        x = x.permute(0, 1, 3, 4, 2)        # the first conv's concat makes it contiguous channels-last
        mu = self._run(x, ctx, self.enc_in, self.enc_layers, self.enc_norm, self.enc_out)
        return mu.permute(0, 1, 4, 2, 3), ctx.hist_out

    def decode(self, z: Tensor, caches: list[Tensor] | None, first: bool) -> tuple[Tensor, list[Tensor]]:
        """Normalised latents ``[B, 1, z, h, w]`` → pixels ``[B, T', 3, H, W]`` (1 frame when ``first``, else 4),
        possibly a strided view."""
        ctx = _Ctx(caches, first)
        if self.channels_first:
            b, t, zc, h, w = z.shape
            x = torch.baddbmm(self.post_b.view(1, -1, 1), self.post_w.expand(b * t, -1, -1),
                              z.reshape(b * t, zc, h * w)).view(b, t, -1, h, w)
            return self._run(x, ctx, self.dec_in, self.dec_layers, self.dec_norm, self.dec_out), ctx.hist_out
        x = F.linear(z.permute(0, 1, 3, 4, 2), self.post_w, self.post_b)
        y = self._run(x, ctx, self.dec_in, self.dec_layers, self.dec_norm, self.dec_out)
        return y.permute(0, 1, 4, 2, 3), ctx.hist_out

    def encode_steady(self, x: Tensor, caches: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """The steady-state encode (a 4-frame chunk): static shapes, the unit ``torch.compile`` wraps."""
        return self.encode(x, caches, False)

    def decode_steady(self, z: Tensor, caches: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """The steady-state decode (one latent): static shapes, the unit ``torch.compile`` wraps."""
        return self.decode(z, caches, False)
