#!/usr/bin/env python
"""Scaling model of the multi-GPU pipeline: predicted (default) or measured throughput / TTFF / latency / memory.

Predict from the built-in profiles (the paper's single-H100 numbers decomposed into VAE and DiT time; no H100
was available to us), with the paper's multi-GPU numbers beside the predictions:

    python scripts/scaling_model.py --overhead-ms 4 > predicted.md

Predict from our own single-device measurements (run on the target GPU, one profile per model / resolution):

    python scripts/scaling_model.py --measure --model models/sdv2-1.3b --device cuda --resolution 512x512 \
        --name 1.3B --save profile-1.3b-512.json
    python scripts/scaling_model.py --profile profile-1.3b-512.json

Measure the real pipeline where several GPUs are at hand (same quantities, labelled measured):

    python scripts/scaling_model.py --measure-pipeline --model models/sdv2-1.3b \
        --devices cuda:0,cuda:1,cuda:2,cuda:3 --resolution 512x512 --steps 1,2,3,4
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from scaling import Link, Profile, markdown, measure_pipeline, measure_profile, measured_markdown, paper_profiles  # noqa: E402


def _resolution(text: str) -> tuple[int, int]:
    w, _, h = text.lower().partition("x")
    return int(w), int(h)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", action="append", default=None,
                   help="profile JSON file(s) from --measure (default: the built-in paper-h100 profiles)")
    p.add_argument("--bandwidth", type=float, default=100.0, help="GB/s per hop (default 100, NVLink-class)")
    p.add_argument("--latency", type=float, default=0.05, help="ms per message (default 0.05)")
    p.add_argument("--overhead-ms", type=float, default=0.0,
                   help="per micro-step distributed overhead not hidden by overlap (paper Fig. 4: 3-6 ms)")
    p.add_argument("--no-overlap", action="store_true", help="communication adds to compute")
    p.add_argument("--even", action="store_true", help="even block split instead of the scheduler's plan")
    p.add_argument("--worlds", default="1,2,3,4")
    p.add_argument("--steps", default="1,2,3,4")
    p.add_argument("--measure", action="store_true", help="measure a single-device profile with --model")
    p.add_argument("--measure-pipeline", action="store_true", help="run the real pipeline on --devices")
    p.add_argument("--model", type=Path)
    p.add_argument("--device", default="cuda")
    p.add_argument("--devices", default=None, help="comma-separated, one per rank (for --measure-pipeline)")
    p.add_argument("--resolution", type=_resolution, default=(512, 512), help="WxH (default 512x512)")
    p.add_argument("--name", default=None, help="model label for --measure (e.g. 1.3B)")
    p.add_argument("--frames", type=int, default=81, help="frames per measured run")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--save", type=Path, default=None, help="write the measured profile / rows as JSON")
    args = p.parse_args(argv)
    command = "python scripts/scaling_model.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    steps = [int(x) for x in args.steps.split(",")]
    width, height = args.resolution

    if args.measure:
        if args.model is None:
            p.error("--measure needs --model")
        res = "480p" if (width, height) == (832, 480) else f"{width}x{height}"
        prof = measure_profile(args.model, args.device, width, height, args.repeats, args.name, res)
        text = json.dumps(asdict(prof), indent=1)
        if args.save:
            args.save.write_text(text)
        print(text)
        return 0
    if args.measure_pipeline:
        if args.model is None or not args.devices:
            p.error("--measure-pipeline needs --model and --devices")
        devices = args.devices.split(",")
        rows = []
        for w in range(2, len(devices) + 1):
            for s in steps:
                rows.append(measure_pipeline(args.model, devices[:w], s, width, height, frames=args.frames))
        if args.save:
            args.save.write_text(json.dumps([asdict(r) for r in rows], indent=1))
        print(measured_markdown(rows, command, f"({args.model.name}, {width}x{height})"))
        return 0
    profiles = [q for f in args.profile for q in Profile.load(f)] if args.profile else paper_profiles()
    link = Link(args.bandwidth, args.latency, not args.no_overlap, args.overhead_ms)
    worlds = tuple(int(x) for x in args.worlds.split(","))
    print(markdown(profiles, link, worlds, tuple(steps), "even" if args.even else "balanced", command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
