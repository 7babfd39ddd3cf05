"""Text-to-video speed of a backbone through the engine: FPS of output frames and time to the first frame.

    python scripts/t2v_speed.py --model MODEL [--backbone NAME] [--resolution 832x480] [--frames 81] [--steps 4]
                                [--clips 1] [--device cuda] [--json out.json] [--markdown out.md]

A warm-up clip of one block runs first (kernels, allocator); then ``--clips`` clips of ``--frames`` frames run as
streams of one engine (their blocks share each tick's DiT calls). FPS = all clips' output frames ÷ wall time from
the start to the last frame (VAE decode included, as LongLive's 20.7 FPS and Self-Forcing's 17 FPS are stated for
whole generation); TTFF = time to the first output frame of the slowest clip.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from wanstream.api.t2v import Clip, text_to_videos
from wanstream.models.loader import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--backbone", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--resolution", default="832x480")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--clips", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--markdown", type=Path, default=None)
    args = ap.parse_args()
    width, height = map(int, args.resolution.split("x"))
    model = load_model(args.model, device=args.device, text_encoder=False, backbone=args.backbone)

    def sync():
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)

    prompts = [torch.randn(1, 16, model.dit.transformer.config.text_dim, generator=torch.Generator().manual_seed(k))
               * 0.1 for k in range(args.clips)]
    for _ in text_to_videos(model, [Clip(prompts[0], 9)], width=width, height=height, steps=args.steps):
        pass                                                        # warm-up
    sync()
    t0 = time.perf_counter()
    first: dict[int, float] = {}
    frames = 0
    for i, _ in text_to_videos(model, [Clip(p, args.frames, seed=k) for k, p in enumerate(prompts)], width=width,
                               height=height, steps=args.steps):
        first.setdefault(i, time.perf_counter() - t0)
        frames += 1
    sync()
    wall = time.perf_counter() - t0
    row = {"backbone": model.backbone.name, "device": torch.cuda.get_device_name(model.device)
           if model.device.type == "cuda" else "cpu", "dtype": str(model.dtype).replace("torch.", ""),
           "resolution": args.resolution, "steps": args.steps, "clips": args.clips, "frames": frames,
           "seconds": round(wall, 3), "fps": round(frames / wall, 2), "ttff_s": round(max(first.values()), 3)}
    line = (f"| {row['backbone']} | {row['device']} | {row['dtype']} | {row['resolution']} | {row['steps']} | "
            f"{row['clips']} | {row['frames']} | {row['fps']} | {row['ttff_s']} |")
    print(json.dumps(row))
    if args.json:
        args.json.write_text(json.dumps(row, indent=1) + "\n")
    if args.markdown:
        args.markdown.write_text("| backbone | device | dtype | res | steps | clips | frames | FPS | TTFF s |\n"
                                 "|---|---|---|---|---|---|---|---|---|\n" + line + "\n")


if __name__ == "__main__":
    main()
