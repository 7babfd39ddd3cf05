"""Paired, alternated measurements of the DiT fast path in one process.

    python scripts/dit_fastpath_compare.py runner  [--rounds 60] [--threads 1]
    python scripts/dit_fastpath_compare.py engine  [--rounds 40] [--threads 1] [--resolution 64x64]
    python scripts/dit_fastpath_compare.py refresh [--rounds 40] [--threads 1] [--tokens 1024] [--dtype bfloat16]

* ``runner``: one stream (2 steps) of the conformance tiny DiT on an eager runner and on a compiled one (same
  weights, same inputs); each round times one steady DiT call (``LatentStream.push``: noising, the call, x0 and
  re-noising) on both, in alternating order.
* ``engine``: per chunk: two engines over one ``init-random --preset tiny`` model (eager / ``compile=True``), one
  stream each, fed the same motion clip; each round times one tick (encode + DiT + decode + host work) on both.
* ``refresh``: the adaptive sink refresh of one block on a synthetic cache of 1.3B shape (12 heads x 128, 2 rows,
  6-frame cache, ``--tokens`` per frame: 1024 at 512x512): the reference (whole sink region read in fp32 and
  rewritten with ``where``) against the sink-means path (new frame's means + compare + one indexed write).

Each round's ratio is new / reference; the summary gives the median and p10-p90 of the ratios and the median
times. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from kit import kit_dir, load_kit, reference_refresh_sinks  # noqa: E402

from wanstream.cli.argtypes import resolution  # noqa: E402
from wanstream.core.config import CacheConfig  # noqa: E402
from wanstream.models.attention import frame_means, refresh_sinks  # noqa: E402
from wanstream.models.kv_cache import CachePolicy, CacheStep, KVCache  # noqa: E402


def summary(ref_s: list[float], new_s: list[float]) -> dict:
    ratios = [n / r for r, n in zip(ref_s, new_s)]
    return {"rounds": len(ratios), "ratio_median": statistics.median(ratios),
            "ratio_p10": float(np.percentile(ratios, 10)), "ratio_p90": float(np.percentile(ratios, 90)),
            "reference_ms_median": 1e3 * statistics.median(ref_s), "new_ms_median": 1e3 * statistics.median(new_s)}


def paired(rounds: int, ref, new) -> dict:
    """Alternate ``ref()`` and ``new()`` (order flipped every round); both return seconds."""
    ref_s, new_s = [], []
    for i in range(rounds):
        if i % 2:
            new_s.append(new())
            ref_s.append(ref())
        else:
            ref_s.append(ref())
            new_s.append(new())
    return summary(ref_s, new_s)


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# ------------------------------------------------------------------------------------------------ runner
def compare_runner(rounds: int) -> dict:
    from wanstream.engine.latent_stream import LatentStream
    from wanstream.engine.noise import SeededNoise
    from wanstream.models.checkpoints import build_transformer, causal_state_dict, diffusers_dit_config
    from wanstream.models.dit import CausalWanDiT
    from wanstream.models.sampling import FlowMatchSampler
    cfg = json.loads((kit_dir() / "tiny_config.json").read_text())["dit"]
    path = kit_dir() / "model.pt"
    dit = CausalWanDiT(build_transformer(diffusers_dit_config(cfg), causal_state_dict(path), str(path)))
    prompt = dit.embed_prompt(load_kit("text_context.pt")["context"])
    g = torch.Generator().manual_seed(0)
    zs = [torch.randn(1, 1, 16, 6, 10, generator=g) for _ in range(8)]
    t = torch.tensor(700)
    streams = {c: LatentStream(dit, FlowMatchSampler(), prompt, SeededNoise(0), tokens_per_frame=15, steps=2,
                               cache=CacheConfig(sink_threshold=0.2), compile=c) for c in (False, True)}
    count = {False: 0, True: 0}

    def push(c):
        count[c] += 1
        return streams[c].push(zs[count[c] % len(zs)], 0.8, t, count[c])

    with torch.inference_mode():
        for c, ls in streams.items():
            ls.prepare(torch.randn(1, 2, 16, 6, 10, generator=g), 0.8)
            for _ in range(12):              # fill, then compile (the compiled runner's steady layout)
                push(c)
        out = paired(rounds, lambda: timed(lambda: push(False)), lambda: timed(lambda: push(True)))
    out["paths"] = {str(c): dict(ls.runner.path_calls) for c, ls in streams.items()}
    return out


# ------------------------------------------------------------------------------------------------ engine
def compare_engine(rounds: int, width: int, height: int) -> dict:
    import tempfile

    from wanstream.engine.loop import Engine
    from wanstream.io.video import make_motion_clip
    from wanstream.models.loader import load_model
    from wanstream.models.random_init import init_random
    root = Path(tempfile.mkdtemp(prefix="fastpath-tiny-"))
    init_random(root, "tiny", seed=0, log=lambda *_: None)
    model = load_model(root, device="cpu", text_encoder=False)
    clip = make_motion_clip(5 + 4 * (rounds + 16), width, height, seed=1)
    prompt = torch.randn(1, 9, 4096, generator=torch.Generator().manual_seed(2)) * 0.1
    engines = {c: Engine(model, compile=c) for c in (False, True)}
    streams = {c: e.open(prompt_embeds=prompt, width=width, height=height, steps=2, seed=0)
               for c, e in engines.items()}
    fed = {False: 0, True: 0}

    def tick(c):
        n = 5 if fed[c] == 0 else 4
        engines[c].feed(streams[c], clip[fed[c]: fed[c] + n])
        fed[c] += n
        engines[c].step()

    for c in engines:
        for _ in range(16):                  # fill, compile, warm
            tick(c)
    out = paired(rounds, lambda: timed(lambda: tick(False)), lambda: timed(lambda: tick(True)))
    out["paths"] = {str(c): dict(next(iter(e.groups.values())).runner.path_calls) for c, e in engines.items()}
    return out


# ------------------------------------------------------------------------------------------------ refresh
def compare_refresh(rounds: int, tokens: int, dtype: torch.dtype) -> dict:
    heads, hd, rows, cap = 12, 128, 2, 6
    policy = CachePolicy(CacheConfig(capacity=cap, sink=3, sink_threshold=0.2))
    cache = KVCache([0], rows, cap, tokens, heads, hd, dtype, "cpu")
    g = torch.Generator().manual_seed(0)
    for t in (cache.k[0], cache.v[0]):
        t.copy_(torch.randn(t.shape, generator=g))
    cache.km[0].copy_(frame_means(cache.k[0], cap))
    cache.vm[0].copy_(frame_means(cache.v[0], cap))
    step = CacheStep.build(policy, [9, 10], [9, 10], 1, tokens, "cpu")
    k = torch.randn(rows, tokens, heads, hd, generator=g).to(dtype)
    v = torch.randn(rows, tokens, heads, hd, generator=g).to(dtype)

    def ref():
        reference_refresh_sinks(cache.k[0], cache.v[0], k, v, step.refresh_rows, step)

    def new():
        mk, mv = frame_means(k, 1)[:, 0], frame_means(v, 1)[:, 0]
        refresh_sinks(cache.k[0], cache.v[0], cache.km[0], cache.vm[0], k, v, mk, mv, step)

    with torch.inference_mode():
        for _ in range(3):
            ref()
            new()
        out = paired(rounds, lambda: timed(ref), lambda: timed(new))
    elem = torch.finfo(dtype).bits // 8
    sink_bytes = 2 * rows * 3 * tokens * heads * hd * elem
    out["sink_region_mib"] = sink_bytes / 2 ** 20
    out["new_frame_mib"] = sink_bytes / 3 / 2 ** 20
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["runner", "engine", "refresh"])
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--resolution", type=resolution, default=(64, 64), help="engine: WxH")
    p.add_argument("--tokens", type=int, default=1024, help="refresh: tokens per latent frame (512x512: 1024)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16", help="refresh: cache dtype")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.what == "runner":
        out = compare_runner(args.rounds)
    elif args.what == "engine":
        out = compare_engine(args.rounds, *args.resolution)
    else:
        out = compare_refresh(args.rounds, args.tokens, getattr(torch, args.dtype))
    load = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else None
    print(json.dumps({"what": args.what, "threads": args.threads, "torch": torch.__version__, "load_avg": load,
                      **out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
