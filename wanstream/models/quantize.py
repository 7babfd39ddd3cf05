"""Lower-precision DiT weights through torchao: ``int8`` (weight-only) and ``fp8`` (float8 weights and activations).

Only the linears inside the transformer blocks are quantised (self- and cross-attention projections, FFN);
the layers the output quality leans on stay in the model dtype by default (:data:`DEFAULT_EXCLUDE`):
time / text embedding MLPs, the patch embedding, the head (``proj_out``) and every norm. Patterns are
``fnmatch`` patterns over module names of diffusers' ``WanTransformer3DModel``.

* ``int8`` — ``Int8WeightOnlyConfig``: int8 weights with per-channel scales, activations stay in the model
  dtype; runs anywhere (CPU included) and halves / quarters the weight memory.
* ``fp8`` — ``Float8DynamicActivationFloat8WeightConfig`` with per-row scales (float8 e4m3 weights, activations
  quantised per call, ``torch._scaled_mm``); needs a CUDA GPU with compute capability 8.9 or newer (Ada, Hopper,
  Blackwell). Anywhere else :func:`quantize_dit` refuses with a :class:`QuantizationError` saying why.
"""

from __future__ import annotations

from fnmatch import fnmatch

import torch
from torch import nn

from wanstream.core.config import QUANTIZE_MODES

DEFAULT_EXCLUDE = ("condition_embedder.*", "patch_embedding*", "proj_out", "*norm*")
FP8_MIN_CAPABILITY = (8, 9)


class QuantizationError(ValueError):
    """The requested quantisation cannot run here (unknown mode, hardware without FP8, ...)."""


def fp8_unsupported_reason(device: torch.device | str) -> str | None:
    """Why float8 matmuls cannot run on ``device`` (``None`` when they can)."""
    device = torch.device(device)
    need = "a CUDA GPU with compute capability >= {}.{} (Ada, Hopper or newer)".format(*FP8_MIN_CAPABILITY)
    if device.type != "cuda":
        return f"--quantize fp8 needs {need}; the model is on {device.type} (use --quantize int8 there)"
    cap = torch.cuda.get_device_capability(device)
    if cap < FP8_MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        return (f"--quantize fp8 needs {need}; {name} has compute capability {cap[0]}.{cap[1]} "
                f"(use --quantize int8)")
    return None


def check_quantize(mode: str | None, device: torch.device | str) -> None:
    """Raise :class:`QuantizationError` when ``mode`` is unknown or cannot run on ``device`` (``None``: no-op)."""
    if mode is None:
        return
    if mode not in QUANTIZE_MODES:
        raise QuantizationError(f"--quantize must be one of {', '.join(QUANTIZE_MODES)}, got {mode!r}")
    if mode == "fp8" and (reason := fp8_unsupported_reason(device)):
        raise QuantizationError(reason)


def _transformer(dit: nn.Module) -> nn.Module:
    """Accept our ``CausalWanDiT`` or diffusers' ``WanTransformer3DModel``."""
    return getattr(dit, "transformer", dit)


def quantizable_linears(dit: nn.Module, exclude: tuple[str, ...] = DEFAULT_EXCLUDE) -> list[str]:
    """Names of the ``nn.Linear`` modules :func:`quantize_dit` would quantise."""
    return [name for name, m in _transformer(dit).named_modules()
            if isinstance(m, nn.Linear) and not any(fnmatch(name, p) for p in exclude)]


def _config(mode: str):
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Int8WeightOnlyConfig, PerRow
    if mode == "int8":
        return Int8WeightOnlyConfig()
    return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())


def quantize_dit(dit: nn.Module, mode: str, exclude: tuple[str, ...] = DEFAULT_EXCLUDE) -> list[str]:
    """Quantise the DiT's block linears in place (``mode`` in :data:`QUANTIZE_MODES`); returns their names.

    Call it once, after the model is on its device and dtype. Raises :class:`QuantizationError` for an unknown
    mode, for ``fp8`` where the hardware lacks float8 matmuls, and when no layer is left to quantise.
    """
    if mode is None:
        raise QuantizationError(f"--quantize must be one of {', '.join(QUANTIZE_MODES)}, got None")
    tr = _transformer(dit)
    check_quantize(mode, next(tr.parameters()).device)
    names = quantizable_linears(tr, exclude)
    if not names:
        raise QuantizationError(f"--quantize {mode}: no linear layer left to quantise (exclude={exclude})")
    from torchao.quantization import quantize_
    chosen = set(names)
    quantize_(tr, _config(mode), filter_fn=lambda m, fqn: fqn in chosen)
    return names


@torch.no_grad()
def flow_relative_error(reference: torch.Tensor, quantized: torch.Tensor) -> float:
    """``‖q - r‖ / ‖r‖`` over all elements, in float64: the figure reported for a quantised flow prediction."""
    r, q = reference.double(), quantized.double()
    return ((q - r).norm() / r.norm()).item()
