"""Small random Wan LoRAs written in the layouts they are published in (test helper).

A LoRA here is ``{diffusers module name: Delta}``; :func:`write_lora` stores it as diffusers (with diffusers'
``lora_adapter_metadata``), a PEFT folder (``adapter_config.json``), original-Wan names (``lora_A/lora_B`` or
``lora_down/lora_up`` with ``.alpha`` and ``.diff_b``) or kohya / musubi names. :func:`merged` applies the same LoRA
to a copy of a DiT the plain way (``W += s * alpha / r * up @ down``), as the reference of the run-time adapters.
The layout tables below are written from the published formats, independently of ``wanstream.models.lora``.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

LAYOUTS = ("diffusers", "peft", "wan", "wan_down_up", "kohya")

_ATTN = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "o"}
_OTHER = {"condition_embedder.text_embedder.linear_1": "text_embedding.0",
          "condition_embedder.text_embedder.linear_2": "text_embedding.2",
          "condition_embedder.time_embedder.linear_1": "time_embedding.0",
          "condition_embedder.time_embedder.linear_2": "time_embedding.2",
          "condition_embedder.time_proj": "time_projection.1", "proj_out": "head.head"}


def wan_name(module: str) -> str:
    """diffusers module name → original Wan module name."""
    if module in _OTHER:
        return _OTHER[module]
    m = re.fullmatch(r"blocks\.(\d+)\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)", module)
    if m:
        return f"blocks.{m[1]}.{'self_attn' if m[2] == 'attn1' else 'cross_attn'}.{_ATTN[m[3]]}"
    m = re.fullmatch(r"blocks\.(\d+)\.ffn\.net\.(0\.proj|2)", module)
    if m:
        return f"blocks.{m[1]}.ffn.{m[2][0]}"
    raise KeyError(module)


@dataclass
class Delta:
    down: torch.Tensor | None        # [r, in]
    up: torch.Tensor | None          # [out, r]
    alpha: float | None = None       # None: scale 1
    bias: torch.Tensor | None = None  # [out]

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.down.shape[0]


def random_lora(dit, modules: list[str], rank: int = 4, seed: int = 0, alpha: float | None = None,
                bias: tuple[str, ...] = (), std: float = 0.05) -> dict[str, Delta]:
    tr = getattr(dit, "transformer", dit)
    mods = dict(tr.named_modules())
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, name in enumerate(modules):
        lin = mods[name]
        a = None if alpha is None else alpha * (1 + (i % 3))      # different alphas per layer
        out[name] = Delta(torch.randn(rank, lin.in_features, generator=g) * std,
                          torch.randn(lin.out_features, rank, generator=g) * std, a,
                          torch.randn(lin.out_features, generator=g) * 0.1 if name in bias else None)
    return out


def write_lora(lora: dict[str, Delta], layout: str, folder: Path, name: str = "style") -> Path:
    """Write ``lora`` in ``layout`` under ``folder``; returns the path to give to the loader."""
    folder.mkdir(parents=True, exist_ok=True)
    sd: dict[str, torch.Tensor] = {}
    if layout in ("diffusers", "peft"):
        alphas = {m: d.alpha for m, d in lora.items() if d.alpha is not None}
        ranks = {d.down.shape[0] for d in lora.values()}
        config = {}
        if alphas:
            base = next(iter(alphas.values()))
            config = {"r": ranks.pop(), "lora_alpha": base,
                      "alpha_pattern": {m: a for m, a in alphas.items() if a != base}}
        prefix = "transformer." if layout == "diffusers" else "base_model.model."
        for m, d in lora.items():
            sd[f"{prefix}{m}.lora_A.weight"] = d.down.contiguous()
            sd[f"{prefix}{m}.lora_B.weight"] = d.up.contiguous()
            if d.bias is not None:
                sd[f"{prefix}{m}.lora_B.bias"] = d.bias
        if layout == "peft":
            path = folder / name
            path.mkdir(exist_ok=True)
            save_file(sd, str(path / "adapter_model.safetensors"))
            (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **config}))
            return path
        meta = {"lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in config.items()})} \
            if config else None
        path = folder / f"{name}.safetensors"
        save_file(sd, str(path), metadata=meta)
        return path
    down, up = ("lora_A", "lora_B") if layout == "wan" else ("lora_down", "lora_up")
    for m, d in lora.items():
        w = wan_name(m)
        key = f"diffusion_model.{w}" if layout.startswith("wan") else "lora_unet_" + w.replace(".", "_")
        sd[f"{key}.{down}.weight"] = d.down.contiguous()
        sd[f"{key}.{up}.weight"] = d.up.contiguous()
        if d.alpha is not None:
            sd[f"{key}.alpha"] = torch.tensor(float(d.alpha))
        if d.bias is not None:
            sd[f"{key}.diff_b"] = d.bias
    path = folder / f"{name}.safetensors"
    save_file(sd, str(path))
    return path


@torch.no_grad()
def merged(dit, loras: list[tuple[dict[str, Delta], float]]):
    """A copy of ``dit`` with ``W += s * scale * up @ down`` and ``b += s * bias`` for each (lora, s)."""
    out = copy.deepcopy(dit)
    mods = dict(out.transformer.named_modules())
    for lora, s in loras:
        for m, d in lora.items():
            lin = mods[m]
            lin.weight += s * d.scale * (d.up @ d.down)
            if d.bias is not None:
                lin.bias += s * d.bias
    return out
