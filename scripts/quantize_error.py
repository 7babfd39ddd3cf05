"""Relative error of the DiT flow prediction with quantised weights, against the same model unquantised.

    python scripts/quantize_error.py MODEL_DIR --mode int8 [--device cpu] [--dtype float32] [--resolution 64x64]

Loads the DiT of MODEL_DIR (any layout ``load_model`` reads; no text encoder needed), runs the first
(prepare) call of a stream — 2 latent frames, timestep 700, a seeded random prompt embedding — then quantises
the same model in place and runs the call again. Prints one JSON line with ``rel_error = ‖q - r‖ / ‖r‖``, the
largest absolute difference and the number of quantised linears.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from wanstream.cli.argtypes import resolution
from wanstream.core.config import CacheConfig
from wanstream.models.kv_cache import CachePolicy, CacheStep
from wanstream.models.loader import load_model
from wanstream.models.quantize import QUANTIZE_MODES, flow_relative_error, quantize_dit


@torch.no_grad()
def prepare_flow(dit, latents: torch.Tensor, prompt, tokens_per_frame: int) -> torch.Tensor:
    cache = dit.new_cache(1, 6, tokens_per_frame)
    step = CacheStep.build(CachePolicy(CacheConfig(sink_threshold=-1)), [0], [0], latents.shape[1],
                           tokens_per_frame, latents.device)
    t = torch.full((1, latents.shape[1]), 700, device=latents.device)
    return dit(latents, t, prompt, cache, step).float()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model")
    p.add_argument("--mode", choices=QUANTIZE_MODES, default="int8")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--resolution", type=resolution, default=(64, 64), help="WxH of the pixel frames")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    t0 = time.perf_counter()
    model = load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype), text_encoder=False)
    dit = model.dit
    width, height = args.resolution
    g = torch.Generator().manual_seed(args.seed)
    latents = torch.randn(1, 2, 16, height // 8, width // 8, generator=g).to(args.device, dit.dtype)
    context = torch.randn(1, 16, dit.transformer.config.text_dim, generator=g).to(args.device, dit.dtype)
    tpf = model.tokens_per_frame(height, width)
    prompt = dit.embed_prompt(context)
    reference = prepare_flow(dit, latents, prompt, tpf)
    names = quantize_dit(dit, args.mode)
    quantized = prepare_flow(dit, latents, dit.embed_prompt(context), tpf)
    print(json.dumps({"model": str(args.model), "mode": args.mode, "device": args.device, "dtype": args.dtype,
                      "resolution": f"{width}x{height}", "quantized_linears": len(names),
                      "rel_error": flow_relative_error(reference, quantized),
                      "max_abs_diff": (quantized - reference).abs().max().item(),
                      "seconds": round(time.perf_counter() - t0, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
