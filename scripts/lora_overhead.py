"""Cost of the run-time LoRA adapters on one DiT call: paired, alternated, in one process.

    python scripts/lora_overhead.py [--dim 1536 --ffn 8960 --heads 12 --layers 4] [--rank 32] [--rows 2]
                                    [--tokens 1024] [--reps 7] [--device cpu] [--dtype float32]

Builds a random ``WanTransformer3DModel`` with the given dims (default: the 1.3B block shapes, 4 blocks), writes a
random rank-``rank`` LoRA on every linear layer of every block (original-Wan keys), and times one streaming DiT call
(``rows`` batch rows of one latent frame of ``tokens`` tokens) in four cases, alternated round by round:
``base`` (no LoRA attached), ``zero`` (attached, every row at strength 0), ``half`` (first half of the rows at 1,
the rest at 0) and ``all`` (every row at 1). Prints one JSON line: the median and min/max seconds per case and the
medians relative to ``base``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import save_file

from wanstream.core.config import CacheConfig
from wanstream.models.dit import CausalWanDiT
from wanstream.models.kv_cache import CachePolicy, CacheStep
from wanstream.models.lora import LoRASet

WAN_LAYERS = {"attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
              "attn1.to_out.0": "self_attn.o", "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k",
              "attn2.to_v": "cross_attn.v", "attn2.to_out.0": "cross_attn.o", "ffn.net.0.proj": "ffn.0",
              "ffn.net.2": "ffn.2"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--ffn", type=int, default=8960)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    a = ap.parse_args()
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)
    torch.manual_seed(0)
    tr = WanTransformer3DModel(num_attention_heads=a.heads, attention_head_dim=a.dim // a.heads, ffn_dim=a.ffn,
                               num_layers=a.layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads")
    dit = CausalWanDiT(tr.to(device, dtype).eval().requires_grad_(False))
    mods = dict(tr.named_modules())
    sd = {}
    for i in range(a.layers):
        for ours, wan in WAN_LAYERS.items():
            lin = mods[f"blocks.{i}.{ours}"]
            sd[f"diffusion_model.blocks.{i}.{wan}.lora_A.weight"] = torch.randn(a.rank, lin.in_features) * 0.01
            sd[f"diffusion_model.blocks.{i}.{wan}.lora_B.weight"] = torch.randn(lin.out_features, a.rank) * 0.01
    path = Path(tempfile.mkdtemp()) / "style.safetensors"
    save_file(sd, str(path))

    side = int(a.tokens ** 0.5)
    x = torch.randn(a.rows, 1, 16, 2 * side, 2 * (a.tokens // side), device=device, dtype=dtype)
    ts = torch.full((a.rows,), 500, device=device)
    policy = CachePolicy(CacheConfig(capacity=4, sink=0, sink_threshold=-1))
    cache = dit.new_cache(a.rows, 4, a.tokens)
    step = CacheStep.build(policy, [1] * a.rows, [1] * a.rows, 1, a.tokens, device)
    prompt = dit.embed_prompt(torch.randn(1, 64, 4096, device=device, dtype=dtype))
    lora = LoRASet.load([path], dit)
    half = a.rows // 2
    cases = {"base": None, "zero": [(0.0,)] * a.rows, "half": [(1.0,)] * half + [(0.0,)] * (a.rows - half),
             "all": [(1.0,)] * a.rows}
    times = {c: [] for c in cases}

    def call(case: str) -> float:
        rows = cases[case]
        if rows is None:
            lora.detach()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode(), (lora.rows(rows) if rows is not None else torch.no_grad()):
            dit(x, ts, prompt, cache, step)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if rows is None:
            lora.attach(dit)
        return dt

    for c in cases:                      # warm-up
        call(c)
    for r in range(a.reps):
        order = list(cases) if r % 2 == 0 else list(reversed(cases))
        for c in order:
            times[c].append(call(c))
    med = {c: statistics.median(v) for c, v in times.items()}
    print(json.dumps({"config": vars(a), "median_s": med, "min_s": {c: min(v) for c, v in times.items()},
                      "max_s": {c: max(v) for c, v in times.items()},
                      "relative_to_base": {c: round(m / med["base"], 3) for c, m in med.items()}}))


if __name__ == "__main__":
    main()
