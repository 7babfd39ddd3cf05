"""``python -m wanstream.cli.vae_compare VAE.pth`` (or ``--width 96``): side-by-side timing of the streaming VAE
paths in one process (eager diffusers modules vs the fast path; :func:`wanstream.bench.vae_compare.compare_vae_paths`),
on a VAE file or on a random VAE of a base width in the released layout."""

from __future__ import annotations

import argparse
import json

import torch

from wanstream.bench.vae_compare import compare_vae_paths, random_vae_state_dict


def main(argv: list[str] | None = None) -> int:
    from wanstream.cli.argtypes import int_in, resolution
    from wanstream.models.checkpoints import build_vae, read_torch_file
    from wanstream.models.vae_fast import CONV_IMPLS
    p = argparse.ArgumentParser(prog="python -m wanstream.cli.vae_compare", description=__doc__.split("\n")[0])
    p.add_argument("vae", nargs="?", help="a Wan2.1_VAE.pth-layout file (or --width)")
    p.add_argument("--width", type=int_in(1), default=None,
                   help="instead of a file: a random VAE of this base width in the released layout (96: released)")
    p.add_argument("--resolution", type=resolution, default=(64, 64), help="WxH")
    p.add_argument("--rounds", type=int_in(2), default=20)
    p.add_argument("--batch", type=int_in(1), default=1, help="streams per call")
    p.add_argument("--compile", action="store_true", help="torch.compile the fast steady-state calls")
    p.add_argument("--threads", type=int_in(1), default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--conv-impl", choices=CONV_IMPLS, default=None, help="the fast path's convs (default: by device)")
    p.add_argument("--peak", action="store_true", help="measure the device's matmul peak for the fractions")
    args = p.parse_args(argv)
    if (args.vae is None) == (args.width is None):
        p.error("give a VAE file or --width")
    width, height = args.resolution
    if args.threads:
        torch.set_num_threads(args.threads)
    sd = read_torch_file(args.vae) if args.vae else random_vae_state_dict(args.width)
    vae = build_vae(sd, args.vae or f"random VAE, base width {args.width}", args.device, getattr(torch, args.dtype))
    peak = None
    if args.peak:
        from wanstream.bench.roofline import measure_peaks
        peak = measure_peaks(args.device, getattr(torch, args.dtype))["matmul_flops_per_s"]
    out = compare_vae_paths(vae, height, width, args.rounds, args.batch, args.compile, progress=True,
                            conv_impl=args.conv_impl, peak_flops_per_s=peak)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
