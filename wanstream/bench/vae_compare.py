"""Side-by-side timing of the streaming VAE paths in one process: eager diffusers modules vs our fast path.

:func:`compare_vae_paths` times the steady-state streaming step (encode one 4-frame chunk + decode one
latent) of both paths over the same weights, alternating which path runs first in each round, and returns
the paired ratios (fast / eager) of every round, with each path's achieved FLOP/s (``roofline.py`` counts).
Run it as a script for a report, on a VAE file or on a random VAE of a given base width in the released
layout (96: the released one)::

    python -m wanstream.cli.vae_compare tests/data/conformance/Wan2.1_VAE_tiny.pth --resolution 64x64
    python -m wanstream.cli.vae_compare --width 96 --resolution 256x256 --rounds 4 --threads 2 --peak
"""

from __future__ import annotations

import statistics
import time

import torch
from tqdm import tqdm

from wanstream.models.vae import StreamingVAE


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quantiles(xs: list[float]) -> dict:
    q = statistics.quantiles(xs, n=10) if len(xs) > 1 else [xs[0]] * 9
    return {"median": statistics.median(xs), "p10": q[0], "p90": q[-1], "min": min(xs), "max": max(xs)}


@torch.no_grad()
def compare_vae_paths(vae, height: int, width: int, rounds: int = 20, batch: int = 1, compile: bool = False,
                      seed: int = 0, progress: bool = False, conv_impl: str | None = None,
                      peak_flops_per_s: float | None = None) -> dict:
    """Paired, alternated timing of one streaming step (4-frame encode + 1-latent decode) on both paths.

    ``vae`` is a diffusers ``AutoencoderKLWan``. Each path gets its own streams (``batch`` rows), started
    with the 5-frame / 2-latent first call and one untimed steady step (plus compilation when ``compile``).
    Returns milliseconds per path and part, the per-round ratios fast / eager (``ratio``: median, p10, p90),
    the largest output difference between the paths over the timed rounds, and each path's achieved FLOP/s per
    part (``tflops``; with ``peak_flops_per_s`` also as a fraction of that peak, ``peak_fraction``).
    """
    from wanstream.bench.roofline import vae_call_costs
    dev = vae.quant_conv.weight.device
    dtype = vae.quant_conv.weight.dtype
    gen = torch.Generator().manual_seed(seed)
    frames = (torch.rand(batch, 5, 3, height, width, generator=gen) * 2 - 1).to(dev, dtype)
    latents = torch.randn(batch, 2, vae.config.z_dim, height // 8, width // 8, generator=gen).to(dev, dtype)
    paths = {"eager": StreamingVAE(vae, fast=False),
             "fast": StreamingVAE(vae, fast=True, compile=compile, conv_impl=conv_impl)}
    states = {}
    for name, sv in paths.items():
        enc, dec = sv.new_state(), sv.new_state()
        sv.encode(enc, frames)
        sv.decode(dec, latents)
        for _ in range(2 if compile else 1):
            sv.encode(enc, frames[:, 1:])
            sv.decode(dec, latents[:, 1:])
        states[name] = (enc, dec)
    times = {name: {"encode": [], "decode": []} for name in paths}
    diff = {"encode": 0.0, "decode": 0.0}
    for r in tqdm(range(rounds), desc="vae compare", disable=not progress):
        order = list(paths) if r % 2 == 0 else list(paths)[::-1]
        outs = {}
        for name in order:
            sv, (enc, dec) = paths[name], states[name]
            _sync(dev)
            t0 = time.perf_counter()
            mu = sv.encode(enc, frames[:, 1:])
            _sync(dev)
            t1 = time.perf_counter()
            px = sv.decode(dec, latents[:, 1:])
            _sync(dev)
            t2 = time.perf_counter()
            times[name]["encode"].append(t1 - t0)
            times[name]["decode"].append(t2 - t1)
            outs[name] = (mu, px)
        diff["encode"] = max(diff["encode"], (outs["fast"][0] - outs["eager"][0]).abs().max().item())
        diff["decode"] = max(diff["decode"], (outs["fast"][1] - outs["eager"][1]).abs().max().item())
    total = {n: [e + d for e, d in zip(t["encode"], t["decode"])] for n, t in times.items()}
    ratio = lambda part: [f / e for f, e in zip(part("fast"), part("eager"))]  # noqa: E731
    costs = vae_call_costs(vae, height, width)
    tflops = {n: {part: batch * costs[part]["flops"] / statistics.median(t[part]) / 1e12 for part in t}
              for n, t in times.items()}
    return {
        "resolution": f"{width}x{height}", "batch": batch, "rounds": rounds, "compile": compile,
        "base_width": vae.config.base_dim, "conv_impl": paths["fast"].fast.impl,
        "gflop": {part: costs[part]["flops"] / 1e9 for part in ("encode", "decode")}, "tflops": tflops,
        "peak_fraction": None if not peak_flops_per_s else
        {n: {part: v * 1e12 / peak_flops_per_s for part, v in t.items()} for n, t in tflops.items()},
        "device": str(dev), "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
        "ms": {n: {"encode": 1e3 * statistics.median(t["encode"]), "decode": 1e3 * statistics.median(t["decode"]),
                   "total": 1e3 * statistics.median(total[n])} for n, t in times.items()},
        "ratio": _quantiles(ratio(lambda n: total[n])),
        "ratio_encode": _quantiles(ratio(lambda n: times[n]["encode"])),
        "ratio_decode": _quantiles(ratio(lambda n: times[n]["decode"])),
        "max_abs_diff": diff,
    }


def random_vae_state_dict(base_width: int, seed: int = 0) -> dict:
    """A seeded random Wan 2.1 VAE of ``base_width`` (96: the released width) as a ``Wan2.1_VAE.pth`` state dict."""
    from diffusers import AutoencoderKLWan

    from wanstream.models.checkpoints import vae_state_dict_original
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return vae_state_dict_original(AutoencoderKLWan(base_dim=base_width, z_dim=16))
