"""Roofline accounting: FLOPs and minimum memory traffic of one DiT call and of one streaming VAE call.

FLOPs count multiply-accumulates as 2 (a matmul ``[m, k] @ [k, n]`` is ``2·m·n·k``); element-wise work (norms,
activations, modulation, RoPE, softmax, bias adds) is not counted. Minimum bytes are a lower bound on memory
traffic: every weight read once, the attention caches read and written, the call's input read and its output
written; all intermediate activations are assumed to stay on chip. The achieved fraction of a roofline is
therefore an upper bound on how close a call runs to the hardware limit.

DiT call (one latent frame per batch row, the steady state of a stream):

* ``rows`` batch rows (stream batch: one per denoising step; no-batch: 1), ``Lq`` = tokens per latent frame,
  ``Lkv`` = cache capacity x tokens per frame (attention always spans the whole cache storage; positions not yet
  written are masked, so the work is the same), ``D`` = hidden size, ``F`` = FFN size, ``P`` = 512 text rows;
* per block and row: self-attention projections ``4·2·Lq·D²``; ``QKᵀ`` and ``PV`` against the cache
  ``2·2·Lq·Lkv·D``; cross-attention query and output projections ``2·2·Lq·D²`` (the prompt's K/V are computed
  once per prompt, not per call) and ``2·2·Lq·P·D``; FFN ``2·2·Lq·D·F``;
* per call: patch embedding, head and time embedding (per row and latent frame).

VAE call: counted by running the diffusers ``AutoencoderKLWan`` modules on the ``meta`` device (no memory, no
compute) with forward hooks that read each convolution's real output shape; the per-frame spatial attention of
the mid blocks is counted from its input shape. The counted call is the steady state of a stream (after the
first chunk): encode 4 frames → 1 latent, decode 1 latent → 4 frames.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Self

import torch
from torch import nn

TEXT_LEN = 512


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ------------------------------------------------------------------------------------------------------ DiT
@dataclass(frozen=True)
class DiTDims:
    """The dimensions of a Wan 2.1 DiT that decide its cost."""

    dim: int
    ffn_dim: int
    heads: int
    layers: int
    in_channels: int = 16
    out_channels: int = 16
    patch: tuple[int, int, int] = (1, 2, 2)
    freq_dim: int = 256
    text_len: int = TEXT_LEN

    @classmethod
    def from_preset(cls, name: str) -> DiTDims:
        """From a ``config.DIT_PRESETS`` entry (Wan ``config.json`` naming)."""
        from wanstream.core.config import DIT_COMMON, DIT_PRESETS
        cfg = {**DIT_COMMON, **DIT_PRESETS[name]}
        return cls(dim=cfg["dim"], ffn_dim=cfg["ffn_dim"], heads=cfg["num_heads"], layers=cfg["num_layers"],
                   in_channels=cfg["in_dim"], out_channels=cfg["out_dim"], patch=tuple(cfg["patch_size"]),
                   freq_dim=cfg["freq_dim"], text_len=cfg["text_len"])

    @classmethod
    def from_dit(cls, dit) -> DiTDims:
        """From a loaded :class:`~wanstream.models.dit.CausalWanDiT` (dims read from its config)."""
        cfg = dit.transformer.config
        return cls(dim=dit.dim, ffn_dim=cfg.ffn_dim, heads=dit.heads, layers=dit.num_layers,
                   in_channels=cfg.in_channels, out_channels=cfg.out_channels, patch=tuple(cfg.patch_size),
                   freq_dim=cfg.freq_dim, text_len=dit.text_len)

    @property
    def patch_volume(self) -> int:
        return math.prod(self.patch)

    def call_params(self) -> int:
        """Parameters read by one streaming call (the text embedder and the cross-attention K/V projections
        run once per prompt, so they are excluded)."""
        d, f = self.dim, self.ffn_dim
        per_block = (4 * (d * d + d) + 2 * d        # self-attention q, k, v, out (+bias), q/k RMS norm
                     + 2 * (d * d + d) + d          # cross-attention q, out (+bias), q RMS norm
                     + 2 * d                        # norm2 (affine LayerNorm)
                     + (d * f + f) + (f * d + d)    # FFN
                     + 6 * d)                       # modulation table
        glob = (self.in_channels * self.patch_volume * d + d                     # patch embedding
                + self.freq_dim * d + d + d * d + d + d * 6 * d + 6 * d          # time embedder + projection
                + d * self.out_channels * self.patch_volume + self.out_channels * self.patch_volume  # head
                + 2 * d)                                                         # head modulation
        return self.layers * per_block + glob


def dit_call_cost(dims: DiTDims, tokens_per_frame: int, rows: int = 1, frames: int = 1, cache_frames: int = 6,
                  bytes_per_el: int = 2) -> dict:
    """FLOPs and minimum bytes of one DiT call: ``rows`` batch rows of ``frames`` latent frames each, attending
    to a cache of ``cache_frames`` latent frames (the full storage; the steady state)."""
    d, f, n = dims.dim, dims.ffn_dim, dims.layers
    lq = frames * tokens_per_frame                 # query tokens per row
    lkv = cache_frames * tokens_per_frame          # cached tokens per row
    p = dims.text_len
    m = rows * lq                                  # token rows of every matmul
    proj = n * (4 * 2 * m * d * d + 2 * 2 * m * d * d)
    ffn = n * 2 * 2 * m * d * f
    self_attn = n * 2 * 2 * m * lkv * d
    cross_attn = n * 2 * 2 * m * p * d
    cells = rows * frames                          # (row, latent frame) pairs: one time embedding each
    embed = (2 * m * d * dims.in_channels * dims.patch_volume
             + 2 * m * d * dims.out_channels * dims.patch_volume
             + 2 * cells * (dims.freq_dim * d + d * d + d * 6 * d))
    flops = {"projections": proj, "ffn": ffn, "self_attention": self_attn, "cross_attention": cross_attn,
             "embed_head": embed}
    latent_elems = m * dims.in_channels * dims.patch_volume
    nbytes = {
        "weights": dims.call_params() * bytes_per_el,
        "kv_read": n * 2 * rows * lkv * d * bytes_per_el,
        "kv_write": n * 2 * m * d * bytes_per_el,
        "prompt_kv_read": n * 2 * p * d * bytes_per_el,
        "io": (latent_elems + m * dims.out_channels * dims.patch_volume) * bytes_per_el,
    }
    total_f, total_b = sum(flops.values()), sum(nbytes.values())
    return {"flops": total_f, "bytes": total_b, "intensity": total_f / total_b, "flops_by_part": flops,
            "bytes_by_part": nbytes, "rows": rows, "tokens_per_row": lq, "cache_tokens": lkv,
            "dims": asdict(dims)}


# ------------------------------------------------------------------------------------------------------ VAE
def conv_flops(module: nn.Module, output: torch.Tensor) -> int:
    """``2 · (output elements) · (input channels per group) · (kernel volume)`` of a Conv2d/Conv3d call."""
    return 2 * output.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)


def spatial_attention_flops(x_shape) -> int:
    """Single-head attention over the ``h·w`` positions of each frame, ``x [b, c, t, h, w]``: ``QKᵀ`` and ``PV``
    are ``2·(hw)²·c`` each per frame (the qkv and output 1x1 convolutions are counted as convolutions)."""
    b, c, t, h, w = x_shape
    return 2 * 2 * b * t * (h * w) ** 2 * c


class FlopCounter:
    """Forward-hook FLOP counter for convolution, linear and Wan VAE attention modules of a model."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.flops = 0
        self.by_kind: dict[str, int] = {}
        self._handles = []

    def _add(self, kind: str, value: int) -> None:
        self.flops += value
        self.by_kind[kind] = self.by_kind.get(kind, 0) + value

    def __enter__(self) -> Self:
        for mod in self.model.modules():
            if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                self._handles.append(mod.register_forward_hook(
                    lambda m, i, o: self._add("conv", conv_flops(m, o))))
            elif isinstance(mod, nn.Linear):
                self._handles.append(mod.register_forward_hook(
                    lambda m, i, o: self._add("linear", 2 * o.numel() * m.in_features)))
            elif type(mod).__name__ == "WanAttentionBlock":
                self._handles.append(mod.register_forward_hook(
                    lambda m, i, o: self._add("attention", spatial_attention_flops(i[0].shape))))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _meta_vae(vae: nn.Module) -> nn.Module:
    """A parameter-free (``meta``) copy of an ``AutoencoderKLWan`` with the same config."""
    with torch.device("meta"):
        return type(vae).from_config(dict(vae.config)).eval()


def _param_count(*modules: nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def _cache_elems(cache: list) -> int:
    return sum(t.numel() for t in cache if isinstance(t, torch.Tensor))


@torch.no_grad()
def vae_call_costs(vae: nn.Module, height: int, width: int, bytes_per_el: int = 2) -> dict:
    """Steady-state cost of one streaming encode (4 frames → 1 latent) and decode (1 latent → 4 frames).

    ``vae`` is a diffusers ``AutoencoderKLWan`` (or the ``.vae`` of a :class:`StreamingVAE`); the count runs on
    a ``meta`` copy. Minimum bytes: weights + input + output + the causal-conv feature caches read and written.
    """
    from wanstream.models.vae import StreamingVAE
    if not isinstance(vae, nn.Module):      # a StreamingVAE wrapper
        vae = vae.vae
    meta = _meta_vae(vae)
    sv = StreamingVAE(meta, fast=False)    # the hooks count diffusers' modules
    z_dim = sv.z_dim
    h, w = height // 8, width // 8
    out = {}
    # encode: the first chunk (5 frames) fills the caches; the second (4 frames) is the steady call
    st = sv.new_state()
    sv.encode(st, torch.zeros(1, 5, 3, height, width, device="meta"))
    cache_before = _cache_elems(st.enc_cache)
    with FlopCounter(meta) as fc:
        sv.encode(st, torch.zeros(1, 4, 3, height, width, device="meta"))
    in_el, out_el = 4 * 3 * height * width, z_dim * h * w
    out["encode"] = _vae_entry(fc, _param_count(meta.encoder, meta.quant_conv), in_el, out_el,
                               cache_before + _cache_elems(st.enc_cache), bytes_per_el)
    ds = sv.new_state()
    sv.decode(ds, torch.zeros(1, 2, z_dim, h, w, device="meta"))
    cache_before = _cache_elems(ds.dec_cache)
    with FlopCounter(meta) as fc:
        sv.decode(ds, torch.zeros(1, 1, z_dim, h, w, device="meta"))
    out["decode"] = _vae_entry(fc, _param_count(meta.post_quant_conv, meta.decoder), out_el, in_el,
                               cache_before + _cache_elems(ds.dec_cache), bytes_per_el)
    return out


def _vae_entry(fc: FlopCounter, params: int, in_el: int, out_el: int, cache_el: int, bpe: int) -> dict:
    nbytes = {"weights": params * bpe, "io": (in_el + out_el) * bpe, "cache_read_write": cache_el * bpe}
    total = sum(nbytes.values())
    return {"flops": fc.flops, "flops_by_kind": dict(fc.by_kind), "bytes": total, "bytes_by_part": nbytes,
            "intensity": fc.flops / total}


# ------------------------------------------------------------------------------------------------ peaks
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_time(fn, device: torch.device, repeats: int) -> float:
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
    return best


@torch.no_grad()
def measure_peaks(device: torch.device | str, dtype: torch.dtype, size: int | None = None,
                  copy_bytes: int | None = None, repeats: int = 5) -> dict:
    """Measured (not datasheet) peaks of this device: dense matmul FLOP/s in ``dtype`` (square matmul of side
    ``size``, best of ``repeats``) and copy bandwidth (read + write of a ``copy_bytes`` buffer)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    size = size or (8192 if cuda else 1024)
    copy_bytes = copy_bytes or ((1 << 30) if cuda else (128 << 20))
    reps = 10 if cuda else 1

    def matmul_time() -> float:
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        c = torch.empty(size, size, device=device, dtype=dtype)
        return _best_time(lambda: [torch.mm(a, b, out=c) for _ in range(reps)], device, repeats)

    def copy_time() -> float:
        src = torch.empty(copy_bytes, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        return _best_time(lambda: dst.copy_(src), device, repeats)

    flops = 2 * size ** 3 * reps / matmul_time()
    bandwidth = 2 * copy_bytes / copy_time()
    return {"matmul_flops_per_s": flops, "matmul_size": size, "matmul_dtype": str(dtype).replace("torch.", ""),
            "copy_bytes_per_s": bandwidth}


def roofline_time(flops: float, nbytes: float, peaks: dict) -> float:
    """Lower bound on a call's time from the measured peaks: ``max(FLOPs / peak, bytes / bandwidth)``."""
    return max(flops / peaks["matmul_flops_per_s"], nbytes / peaks["copy_bytes_per_s"])
