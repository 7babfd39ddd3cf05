"""``python -m wanstream.cli.vae_compare VAE.pth``: side-by-side timing of the streaming VAE paths in one process
(eager diffusers modules vs the fast path; :func:`wanstream.bench.vae_compare.compare_vae_paths`)."""

from __future__ import annotations

import argparse
import json

import torch

from wanstream.bench.vae_compare import compare_vae_paths


def main(argv: list[str] | None = None) -> int:
    from wanstream.cli.argtypes import int_in, resolution
    from wanstream.models.checkpoints import build_vae, read_torch_file
    p = argparse.ArgumentParser(prog="python -m wanstream.cli.vae_compare", description=__doc__.split("\n")[0])
    p.add_argument("vae", help="a Wan2.1_VAE.pth-layout file")
    p.add_argument("--resolution", type=resolution, default=(64, 64), help="WxH")
    p.add_argument("--rounds", type=int_in(2), default=20)
    p.add_argument("--batch", type=int_in(1), default=1, help="streams per call")
    p.add_argument("--compile", action="store_true", help="torch.compile the fast steady-state calls")
    p.add_argument("--threads", type=int_in(1), default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    args = p.parse_args(argv)
    width, height = args.resolution
    if args.threads:
        torch.set_num_threads(args.threads)
    vae = build_vae(read_torch_file(args.vae), args.vae, args.device, getattr(torch, args.dtype))
    out = compare_vae_paths(vae, height, width, args.rounds, args.batch, args.compile, progress=True)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
