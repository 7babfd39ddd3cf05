"""What pipelining the steps of Self-Forcing / LongLive blocks would save: DiT time per 3-frame block.

    python scripts/block_schedule_cost.py --model MODEL [--resolution 256x256] [--steps 2] [--repeat 20]

* ``in turn`` (what the engine runs): a block's ``steps`` denoising calls and its context pass, one after the
  other — ``steps + 1`` calls of one row of 3 latent frames;
* ``pipelined`` (the stream batch StreamDiffusionV2 runs across chunks): the same ``steps + 1`` rows of 3 frames in
  ONE call, each row a different block at its own level.

Both attend a full cache window (the backbone's capacity, no mask). Prints the median DiT time per block of each and
their ratio. Only the cost side of the choice: the pipelined schedule would also change what a block attends to
(the newest ``steps`` blocks would not yet have clean K/V), see docs/backbones.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from wanstream.models.dit import PromptKV
from wanstream.models.kv_cache import CachePolicy, KVPool, StepBuffers
from wanstream.models.loader import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--backbone", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--resolution", default="256x256")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    width, height = map(int, args.resolution.split("x"))
    model = load_model(args.model, device=args.device, text_encoder=False, vae=False, backbone=args.backbone)
    dit, bb = model.dit, model.backbone
    cache = bb.cache("t2v")
    tpf = model.tokens_per_frame(height, width)
    rows = args.steps + 1
    pool = KVPool(range(dit.num_layers), cache.capacity, tpf, dit.heads, dit.head_dim, dit.dtype, model.device,
                  text_len=dit.text_len)
    pool.acquire("s", rows)
    pool.set_prompt("s", *[{i: torch.randn(1, dit.text_len, dit.heads, dit.head_dim, device=model.device,
                                           dtype=dit.dtype) for i in range(dit.num_layers)} for _ in range(2)])
    policy = CachePolicy(cache)
    frame = 3 * cache.capacity                      # the window is full: no mask
    x1 = torch.randn(1, 3, 16, height // 8, width // 8, device=model.device, dtype=dit.dtype)
    xn = x1.expand(rows, -1, -1, -1, -1).contiguous()
    one = StepBuffers(policy, 3, tpf, model.device, [0], [0], row_values=0).fill([frame], [frame])
    many = StepBuffers(policy, 3, tpf, model.device, list(range(rows)), [0] * rows,
                       row_values=0).fill([frame] * rows, [frame] * rows)
    ts1 = torch.full((1,), 500.0, device=model.device, dtype=torch.float64)
    tsn = torch.full((rows,), 500.0, device=model.device, dtype=torch.float64)
    prompt = PromptKV(pool.pk, pool.pv)

    def sync():
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)

    def in_turn():
        for _ in range(rows):
            dit(x1, ts1, prompt, pool, one)

    def pipelined():
        dit(xn, tsn, prompt, pool, many)

    times = {}
    with torch.inference_mode():
        for name, fn in (("in turn", in_turn), ("pipelined", pipelined)) * 2:       # A B A B, keep the last
            fn()
            sync()
            samples = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                fn()
                sync()
                samples.append(time.perf_counter() - t0)
            times[name] = statistics.median(samples)
    print(f"{bb.name} {args.resolution} steps={args.steps} ({rows} rows of 3 frames, {tpf} tokens/frame, "
          f"{model.device}, {str(dit.dtype).replace('torch.', '')}):")
    for name, t in times.items():
        print(f"  {name:9s} {t * 1e3:8.2f} ms per block")
    print(f"  pipelined / in turn = {times['pipelined'] / times['in turn']:.2f}")


if __name__ == "__main__":
    main()
