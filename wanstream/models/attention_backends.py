"""Which kernel computes attention: PyTorch SDPA by default, FlashAttention 3 or SageAttention when installed.

:func:`attend` takes and returns the ``[B, S, heads, head_dim]`` layout of the DiT. SDPA (always available)
picks its own kernel — on a GPU in the steady state (no mask, bf16/fp16) that is flash or cuDNN attention; the
optional backends are used only where they apply (CUDA, bf16/fp16, no mask) and SDPA covers every other call,
so selecting one never breaks a call:

* ``sdpa`` — ``torch.nn.functional.scaled_dot_product_attention``;
* ``flash3`` — ``flash_attn_interface.flash_attn_func`` (FlashAttention 3, Hopper);
* ``sage`` — ``sageattention.sageattn`` (8-bit Q·K; changes the numbers slightly, so never picked by ``auto``);
* ``auto`` — ``flash3`` when it imports, else ``sdpa``.

Select with :func:`set_attention_backend` or the ``WANSTREAM_ATTENTION`` environment variable (read at import).
Asking for a backend whose package is not installed is an error naming the package. The optional kernels run
as a registered custom op, so ``torch.compile`` and CUDA graphs treat them as one opaque kernel.
"""

from __future__ import annotations

import importlib
import os

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "sdpa", "flash3", "sage")
_PACKAGES = {"flash3": ("flash_attn_interface", "flash_attn_func"), "sage": ("sageattention", "sageattn")}
_kernels: dict[str, object] = {}
_active = "sdpa"


def available(name: str) -> bool:
    """Whether an optional backend's package imports here (``sdpa`` always does)."""
    if name == "sdpa":
        return True
    return _kernel(name) is not None


def _kernel(name: str):
    if name not in _kernels:
        module, attr = _PACKAGES[name]
        try:
            _kernels[name] = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError, OSError):
            _kernels[name] = None
    return _kernels[name]


def set_attention_backend(name: str) -> str:
    """Select the attention backend (see the module docstring); returns the one now active."""
    global _active
    if name not in BACKENDS:
        raise ValueError(f"attention backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    if name == "auto":
        name = "flash3" if available("flash3") else "sdpa"
    elif not available(name):
        raise ValueError(f"attention backend {name!r} needs the package {_PACKAGES[name][0]!r}, "
                         "which is not installed")
    _active = name
    return name


def attention_backend() -> str:
    return _active


def backend_for(q: torch.Tensor, mask: torch.Tensor | None) -> str:
    """The backend a call uses: the active one where it applies, else ``sdpa``."""
    if _active == "sdpa" or mask is not None or not q.is_cuda or q.dtype not in (torch.bfloat16, torch.float16):
        return "sdpa"
    return _active


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of ``q [B, Sq, H, D]`` over ``k/v [B, Sk, H, D]`` (``mask [B, 1, 1, Sk]`` bool or None), non-causal,
    scale ``1/sqrt(D)``; returns ``[B, Sq, H, D]``."""
    backend = backend_for(q, mask)
    if backend == "sdpa":
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask)
        return out.transpose(1, 2)
    return torch.ops.wanstream.attend_ext(q, k.type_as(q), v.type_as(q), backend)


@torch.library.custom_op("wanstream::attend_ext", mutates_args=())
def _attend_ext(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
    fn = _kernel(backend)
    if backend == "flash3":
        out = fn(q, k, v, causal=False)
        out = out[0] if isinstance(out, tuple) else out      # older FA3 builds return (out, lse)
    else:
        out = fn(q, k, v, tensor_layout="NHD", is_causal=False)
    return out.contiguous()


@_attend_ext.register_fake
def _(q, k, v, backend):
    return torch.empty_like(q)


try:
    set_attention_backend(os.environ.get("WANSTREAM_ATTENTION", "auto"))
except ValueError as exc:
    raise ValueError(f"WANSTREAM_ATTENTION: {exc}") from None
