#!/usr/bin/env python3
"""Every VAE row at real sizes in one command (docs/benchmarks.md, "The VAE at the released width").

    python scripts/vae_real_size.py --out vae-rows                 # CPU, 2 threads: about 45 min on a quiet 2-core box
    python scripts/vae_real_size.py --device cuda --out vae-gpu    # GPU (scripts/gpu_check.sh runs it)

Random VAEs in the released layout (base width 96, seeded), one process, 2 torch threads by default. Each row times
the steady streaming step of a stream: encode one 4-frame chunk, decode one latent (after the 5-frame / 2-latent
first call and one untimed step). Paths run alternately, A B then B A, round after round; every figure is a median
and every ratio the median of the per-round ratios. The load average is recorded around each section.

Sections (``--only``, comma separated; all by default except ``profile``):

* ``official``: the official streaming VAE (our plain-torch stand-in of the original ``WanVAE_``,
  ``scripts/vae_official_standin.py``) against wanstream's default path, fp32, at ``--sizes``; with achieved FLOP/s
  (``roofline.py`` counts) and the fraction of the measured fp32 matmul peak;
* ``compare``: ``wanstream.bench.vae_compare`` (diffusers' eager modules against the default path) at ``--sizes``;
* ``bench``: ``wanstream bench --compare-eager`` on a model with the tiny DiT and the released-width VAE at
  ``--bench-sizes`` (the VAE's share of the chunk);
* ``bf16``: the default path in bf16 against fp32 (the CPU default), each bf16 conv layout, with the output error;
* ``batch``: N streams in one ``encode_many`` / ``decode_many`` call against N calls of one stream, N in
  ``--streams``, at ``--batch-sizes``;
* ``taehv``: the TAEHV tiny autoencoder (random weights; encode and decode) against the Wan VAE default;
* ``tiny``: the conformance VAE (base width 8) at 80x48 and 64x64: official stand-in against the default path
  (which is the same at this width as before the NNPACK path);
* ``profile``: where the time goes (torch profiler, top ops) for each path at the first size.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from vae_official_standin import OfficialStreamingVAE  # noqa: E402

from wanstream.bench import roofline  # noqa: E402
from wanstream.bench.vae_compare import compare_vae_paths, random_vae_state_dict  # noqa: E402
from wanstream.models.checkpoints import build_vae, read_torch_file  # noqa: E402
from wanstream.models.vae import StreamingVAE  # noqa: E402

SECTIONS = ("official", "compare", "bench", "bf16", "batch", "taehv", "tiny", "profile")


def load() -> float:
    return round(os.getloadavg()[0], 2)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(xs):
    return statistics.median(xs) if xs else None


# --------------------------------------------------------------------------------------------------- paths
class StepPath:
    """One way of running the steady step of ``n`` streams: ``prime()`` once, then ``step()`` → (mu, pixels)."""

    def __init__(self, name: str):
        self.name = name

    def prime(self, frames: torch.Tensor, latents: torch.Tensor) -> None:
        raise NotImplementedError

    def encode(self, frames: torch.Tensor):
        raise NotImplementedError

    def decode(self, latents: torch.Tensor):
        raise NotImplementedError


class Official(StepPath):
    def __init__(self, sd, device, dtype=torch.float32, name="official"):
        super().__init__(name)
        self.m = OfficialStreamingVAE.from_state_dict(sd, device, dtype)

    def prime(self, frames, latents):
        self.m.reset()
        self.m.stream_encode(frames[:, :5].transpose(1, 2))
        self.m.stream_decode(latents[:, :2].transpose(1, 2))
        self.encode(frames[:, 5:9])
        self.decode(latents[:, 2:3])

    def encode(self, frames):
        return self.m.stream_encode(frames.transpose(1, 2).to(self.m.conv1.weight.dtype)).transpose(1, 2)

    def decode(self, latents):
        return self.m.stream_decode(latents.transpose(1, 2).to(self.m.conv2.weight.dtype)).transpose(1, 2)


class Ours(StepPath):
    """wanstream's StreamingVAE; ``streams`` streams, in one batched call or one call per stream."""

    def __init__(self, vae, name="wanstream", streams=1, batched=True, **kw):
        super().__init__(name)
        self.sv = StreamingVAE(vae, **kw)
        self.n, self.batched = streams, batched

    def prime(self, frames, latents):
        self.enc = [self.sv.new_state() for _ in range(self.n)]
        self.dec = [self.sv.new_state() for _ in range(self.n)]
        self._run(self.sv.encode_many, self.sv.encode, self.enc, frames[:, :5])
        self._run(self.sv.decode_many, self.sv.decode, self.dec, latents[:, :2])
        self.encode(frames[:, 5:9])
        self.decode(latents[:, 2:3])

    def _run(self, many, one, states, x):
        if self.batched:
            return many(states, x)
        return torch.cat([one(s, x[i:i + 1]) for i, s in enumerate(states)])

    def encode(self, frames):
        return self._run(self.sv.encode_many, self.sv.encode, self.enc, frames)

    def decode(self, latents):
        return self._run(self.sv.decode_many, self.sv.decode, self.dec, latents)


class Taehv(StepPath):
    def __init__(self, taehv, name="taehv"):
        super().__init__(name)
        self.taehv = taehv

    def prime(self, frames, latents):
        from wanstream.core.config import LATENT_MEAN, LATENT_STD
        from wanstream.models.taehv import TAEHVStreamDecoder, TAEHVStreamEncoder
        self.enc = TAEHVStreamEncoder(self.taehv, LATENT_MEAN, LATENT_STD)
        self.dec = TAEHVStreamDecoder(self.taehv)
        self.enc.encode(frames[:, :5])
        self.dec.decode(latents[:, :2])
        self.encode(frames[:, 5:9])
        self.decode(latents[:, 2:3])

    def encode(self, frames):
        return self.enc.encode(frames)

    def decode(self, latents):
        return self.dec.decode(latents)


def inputs(n, h, w, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    frames = (torch.rand(n, 9, 3, h, w, generator=g) * 2 - 1).to(device)
    latents = torch.randn(n, 3, 16, h // 8, w // 8, generator=g).to(device)
    return frames, latents


@torch.no_grad()
def paired(paths: list[StepPath], frames, latents, rounds: int, device) -> dict:
    """Prime every path, then ``rounds`` rounds, the order reversed every other round. Per path: encode / decode
    seconds per round, the minor page faults of each call (fresh memory touched: load-independent) and the outputs
    of the last round."""
    for p in paths:
        p.prime(frames, latents)
    t = {p.name: {"encode": [], "decode": []} for p in paths}
    faults = {p.name: {"encode": [], "decode": []} for p in paths}
    outs = {}
    for r in range(rounds):
        for p in (paths if r % 2 == 0 else paths[::-1]):
            sync(device)
            f0, t0 = minor_faults(), time.perf_counter()
            mu = p.encode(frames[:, 5:9])
            sync(device)
            f1, t1 = minor_faults(), time.perf_counter()
            px = p.decode(latents[:, 2:3])
            sync(device)
            f2, t2 = minor_faults(), time.perf_counter()
            t[p.name]["encode"].append(t1 - t0)
            t[p.name]["decode"].append(t2 - t1)
            faults[p.name]["encode"].append(f1 - f0)
            faults[p.name]["decode"].append(f2 - f1)
            outs[p.name] = (mu.float(), px.float())
    return {"times": t, "faults": faults, "outs": outs}


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def ratios(t: dict, a: str, b: str, part: str) -> dict:
    r = [x / y for x, y in zip(t[a][part], t[b][part])]
    return {"median": median(r), "min": min(r), "max": max(r), "all": r}


# ------------------------------------------------------------------------------------------------ sections
def sec_official(args, ctx) -> list[dict]:
    rows = []
    for size in args.sizes:
        l0 = load()
        sd = ctx["sd"]
        vae = build_vae(sd, "random VAE", args.device, torch.float32)
        costs = roofline.vae_call_costs(vae, size, size)
        frames, latents = inputs(1, size, size, ctx["device"])
        ours = Ours(vae)
        res = paired([Official(sd, args.device), ours], frames, latents, args.rounds, ctx["device"])
        t = res["times"]
        row = {"section": "official", "size": size, "rounds": args.rounds, "conv_impl": ours.sv.fast.impl,
               "load": [l0, load()]}
        for part in ("encode", "decode"):
            ms_o, ms_w = 1e3 * median(t["official"][part]), 1e3 * median(t["wanstream"][part])
            flops = costs[part]["flops"]
            row[part] = {"official_ms": ms_o, "wanstream_ms": ms_w, "ratio": ratios(t, "wanstream", "official", part),
                         "official_faults": median(res["faults"]["official"][part]),
                         "wanstream_faults": median(res["faults"]["wanstream"][part]),
                         "gflop": flops / 1e9, "wanstream_tflops": flops / ms_w / 1e9,
                         "official_tflops": flops / ms_o / 1e9,
                         "wanstream_peak_fraction": flops / (ms_w / 1e3) / ctx["peak"],
                         "official_peak_fraction": flops / (ms_o / 1e3) / ctx["peak"]}
        mu_w, px_w = res["outs"]["wanstream"]
        mu_o, px_o = res["outs"]["official"]
        row["max_abs_diff"] = {"encode": (mu_w - mu_o).abs().max().item(), "decode": (px_w - px_o).abs().max().item()}
        rows.append(row)
        ctx["log"](row)
    return rows


def sec_compare(args, ctx) -> list[dict]:
    rows = []
    for size in args.sizes:
        l0 = load()
        vae = build_vae(ctx["sd"], "random VAE", args.device, torch.float32)
        out = compare_vae_paths(vae, size, size, rounds=args.rounds, peak_flops_per_s=ctx["peak"])
        rows.append({"section": "compare", "size": size, "load": [l0, load()], **out})
        ctx["log"](rows[-1])
    return rows


def sec_bench(args, ctx) -> list[dict]:
    """``wanstream bench --compare-eager`` on the tiny DiT with the released-width VAE (written once)."""
    from wanstream.models.checkpoints import VAE_FILE
    from wanstream.models.random_init import init_random
    rows = []
    with tempfile.TemporaryDirectory(prefix="vae-real-size-") as tmp:
        root = Path(tmp) / "tiny-dit-vae96"
        init_random(root, "tiny", seed=0, log=lambda *_: None)
        vae_file = next(root.glob(f"wan_models/*/{VAE_FILE}"))
        torch.save(ctx["sd"], vae_file)
        for size in args.bench_sizes:
            l0 = load()
            out = Path(tmp) / f"bench_{size}.json"
            cmd = [sys.executable, "-m", "wanstream", "bench", "--model", str(root), "--device", args.device,
                   "--resolution", f"{size}x{size}", "--steps", "2", "--frames", "21", "--warmup", "2",
                   "--prime-chunks", "1", "--compare-eager", "--json", str(out), "--quiet"]
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                rows.append({"section": "bench", "size": size, "error": proc.stderr[-2000:]})
                continue
            r = json.loads(out.read_text())
            st, ev = r["stage_ms"], r["eager"]["stage_ms"]
            vae_ms = st["encode"] + st["decode"]
            rl = r.get("roofline", {})
            rows.append({"section": "bench", "size": size, "load": [l0, load()], "command": " ".join(cmd[1:]),
                         "chunk_ms": st["chunk"], "eager_chunk_ms": ev["chunk"], "encode_ms": st["encode"],
                         "decode_ms": st["decode"], "dit_ms": st["dit"], "vae_share": vae_ms / st["chunk"],
                         "eager_vae_share": (ev["encode"] + ev["decode"]) / ev["chunk"], "vs_eager": r["vs_eager"],
                         "encode_tflops": rl.get("vae_encode", {}).get("achieved_flops_per_s", 0) / 1e12,
                         "decode_tflops": rl.get("vae_decode", {}).get("achieved_flops_per_s", 0) / 1e12,
                         "peak_tflops": (r.get("peak_flops_per_s") or r["meta"].get("peaks", {}).get(
                             "matmul_flops_per_s", 0)) / 1e12})
            ctx["log"](rows[-1])
    return rows


def sec_bf16(args, ctx) -> list[dict]:
    rows = []
    impls = ["conv3d"] if ctx["device"].type == "cuda" else ["nnpack", "stack2d"]
    for size in args.bf16_sizes:
        l0 = load()
        fp32 = build_vae(ctx["sd"], "random VAE", args.device, torch.float32)
        bf16 = build_vae(ctx["sd"], "random VAE", args.device, torch.bfloat16)
        frames, latents = inputs(1, size, size, ctx["device"])
        paths = [Ours(fp32, "fp32")] + [Ours(bf16, f"bf16 {i}", conv_impl=i) for i in impls]
        res = paired(paths, frames, latents, args.rounds, ctx["device"])
        t, outs = res["times"], res["outs"]
        row = {"section": "bf16", "size": size, "load": [l0, load()], "fp32_impl": paths[0].sv.fast.impl,
               "fp32_ms": {p: 1e3 * median(t["fp32"][p]) for p in ("encode", "decode")}, "bf16": {}}
        for p in paths[1:]:
            row["bf16"][p.name] = {
                "ms": {q: 1e3 * median(t[p.name][q]) for q in ("encode", "decode")},
                "ratio_vs_fp32": {q: ratios(t, p.name, "fp32", q)["median"] for q in ("encode", "decode")},
                "max_abs_diff_vs_fp32": {"encode": (outs[p.name][0] - outs["fp32"][0]).abs().max().item(),
                                         "decode": (outs[p.name][1] - outs["fp32"][1]).abs().max().item()},
                "rel_rms_vs_fp32": {q: ((outs[p.name][k] - outs["fp32"][k]).pow(2).mean().sqrt()
                                        / outs["fp32"][k].pow(2).mean().sqrt()).item()
                                    for k, q in enumerate(("encode", "decode"))}}
        rows.append(row)
        ctx["log"](row)
    return rows


def sec_batch(args, ctx) -> list[dict]:
    rows = []
    vae = build_vae(ctx["sd"], "random VAE", args.device, torch.float32)
    for size in args.batch_sizes:
        for n in args.streams:
            l0 = load()
            frames, latents = inputs(n, size, size, ctx["device"], seed=n)
            paths = [Ours(vae, "one call", streams=n, batched=True),
                     Ours(vae, "per stream", streams=n, batched=False)]
            res = paired(paths, frames, latents, args.rounds, ctx["device"])
            t = res["times"]
            row = {"section": "batch", "size": size, "streams": n, "load": [l0, load()]}
            for part in ("encode", "decode"):
                row[part] = {"batched_ms": 1e3 * median(t["one call"][part]),
                             "per_stream_ms": 1e3 * median(t["per stream"][part]),
                             "ratio": ratios(t, "one call", "per stream", part)}
            row["max_abs_diff"] = max((res["outs"]["one call"][k] - res["outs"]["per stream"][k]).abs().max().item()
                                      for k in (0, 1))
            rows.append(row)
            ctx["log"](row)
    return rows


def sec_taehv(args, ctx) -> list[dict]:
    from wanstream.models.taehv import TAEHV
    rows = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        taehv = TAEHV().to(args.device).eval()
    vae = build_vae(ctx["sd"], "random VAE", args.device, torch.float32)
    for size in args.sizes:
        l0 = load()
        frames, latents = inputs(1, size, size, ctx["device"])
        res = paired([Ours(vae, "wan vae"), Taehv(taehv)], frames, latents, args.rounds, ctx["device"])
        t = res["times"]
        row = {"section": "taehv", "size": size, "load": [l0, load()]}
        for part in ("encode", "decode"):
            row[part] = {"wan_ms": 1e3 * median(t["wan vae"][part]), "taehv_ms": 1e3 * median(t["taehv"][part]),
                         "ratio": ratios(t, "taehv", "wan vae", part)}
        rows.append(row)
        ctx["log"](row)
    return rows


def sec_tiny(args, ctx) -> list[dict]:
    rows = []
    sd = read_torch_file(HERE.parent / "tests" / "data" / "conformance" / "Wan2.1_VAE_tiny.pth")
    vae = build_vae(sd, "tiny VAE", args.device, torch.float32)
    for w, h in ((80, 48), (64, 64)):
        l0 = load()
        frames, latents = inputs(1, h, w, ctx["device"])
        ours = Ours(vae)
        res = paired([Official(sd, args.device), ours], frames, latents, max(args.rounds, 20), ctx["device"])
        t = res["times"]
        row = {"section": "tiny", "size": f"{w}x{h}", "conv_impl": ours.sv.fast.impl, "load": [l0, load()]}
        for part in ("encode", "decode"):
            row[part] = {"official_ms": 1e3 * median(t["official"][part]),
                         "wanstream_ms": 1e3 * median(t["wanstream"][part]),
                         "ratio": ratios(t, "wanstream", "official", part)}
        rows.append(row)
        ctx["log"](row)
    return rows


def sec_profile(args, ctx) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile
    size = args.sizes[0]
    vae = build_vae(ctx["sd"], "random VAE", args.device, torch.float32)
    frames, latents = inputs(1, size, size, ctx["device"])
    rows = []
    for p in (Official(ctx["sd"], args.device), Ours(vae)):
        p.prime(frames, latents)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx["device"].type == "cuda" else [])
        with profile(activities=acts) as prof:
            p.encode(frames[:, 5:9])
            p.decode(latents[:, 2:3])
            sync(ctx["device"])
        key = "self_cuda_time_total" if ctx["device"].type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=key, row_limit=14, max_name_column_width=44)
        rows.append({"section": "profile", "size": size, "path": p.name, "table": table})
        ctx["log"]({"profile": p.name, "size": size})
        print(table, file=sys.stderr)
    return rows


# ------------------------------------------------------------------------------------------------ markdown
def _f(x, fmt=".2f"):
    return "—" if x is None else format(x, fmt)


def markdown(result: dict) -> str:
    m = result["meta"]
    out = [f"**{m['machine']}**, torch {m['torch']}, {m['threads']} threads, {m['device']}, commit `{m['commit']}`"
           f"{' (dirty tree)' if m['dirty'] else ''}, {m['date']}; load average {m['load_start']} → {m['load_end']}; "
           f"fp32 matmul peak {m['peak_tflops']:.3f} TFLOP/s. Command: `{m['command']}`.", ""]
    rows = result["rows"]
    sec = [r for r in rows if r["section"] == "official"]
    if sec:
        out += [f"Official streaming VAE (stand-in) vs wanstream's default path, fp32, base width {m['width']}, "
                "median of paired rounds:", "",
                "| size | part | official ms | wanstream ms | ratio (min–max) | GFLOP | wanstream TFLOP/s | % peak | "
                "official % peak | page faults official / wanstream | max diff | load |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sec:
            for part in ("encode", "decode"):
                p = r[part]
                out.append(f"| {r['size']}² | {part} | {p['official_ms']:,.0f} | {p['wanstream_ms']:,.0f} | "
                           f"**{p['ratio']['median']:.2f}** ({p['ratio']['min']:.2f}–{p['ratio']['max']:.2f}) | "
                           f"{p['gflop']:,.0f} | {p['wanstream_tflops']:.3f} | "
                           f"{100 * p['wanstream_peak_fraction']:.0f} | "
                           f"{100 * p['official_peak_fraction']:.0f} | "
                           f"{p['official_faults'] / 1e3:,.0f}k / {p['wanstream_faults'] / 1e3:,.0f}k | "
                           f"{r['max_abs_diff'][part]:.1e} | "
                           f"{r['load'][0]}→{r['load'][1]} |")
        out.append("")
    sec = [r for r in rows if r["section"] == "compare"]
    if sec:
        out += [f"`vae_compare` (diffusers' eager modules vs the default path), base width {m['width']}, fp32:", "",
                "| size | eager ms enc + dec | fast ms enc + dec | ratio enc | ratio dec | fast TFLOP/s enc / dec | "
                "% peak enc / dec | load |", "|---|---|---|---|---|---|---|---|"]
        for r in sec:
            e, f, pf = r["ms"]["eager"], r["ms"]["fast"], r["peak_fraction"]["fast"]
            out.append(f"| {r['size']}² | {e['encode']:,.0f} + {e['decode']:,.0f} | {f['encode']:,.0f} + "
                       f"{f['decode']:,.0f} | **{r['ratio_encode']['median']:.2f}** | "
                       f"**{r['ratio_decode']['median']:.2f}** | {r['tflops']['fast']['encode']:.3f} / "
                       f"{r['tflops']['fast']['decode']:.3f} | {100 * pf['encode']:.0f} / {100 * pf['decode']:.0f} | "
                       f"{r['load'][0]}→{r['load'][1]} |")
        out.append("")
    sec = [r for r in rows if r["section"] == "bench"]
    if sec:
        out += [f"`wanstream bench --compare-eager` (tiny DiT, base-{m['width']} VAE, 2 steps; fast path vs eager "
                "reference):",
                "", "| size | chunk ms fast | chunk ms eager | chunk fast/eager | VAE fast/eager | enc ms | dec ms | "
                "DiT ms | VAE share of chunk | enc / dec TFLOP/s | load |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sec:
            if "error" in r:
                out.append(f"| {r['size']}² | failed: {r['error'][-200:]!r} |")
                continue
            out.append(f"| {r['size']}² | {r['chunk_ms']:,.0f} | {r['eager_chunk_ms']:,.0f} | "
                       f"**{r['vs_eager']['chunk_ratio']:.2f}** | **{_f(r['vs_eager']['vae_ratio'])}** | "
                       f"{r['encode_ms']:,.0f} | "
                       f"{r['decode_ms']:,.0f} | {r['dit_ms']:,.1f} | {100 * r['vae_share']:.0f} % | "
                       f"{r['encode_tflops']:.3f} / {r['decode_tflops']:.3f} | {r['load'][0]}→{r['load'][1]} |")
        out.append("")
    sec = [r for r in rows if r["section"] == "bf16"]
    if sec:
        out += [f"bf16 against fp32, base width {m['width']}:", "",
                "| size | bf16 path | enc ms | dec ms | enc bf16/fp32 | dec bf16/fp32 | enc rel. RMS err | "
                "dec max err | load |", "|---|---|---|---|---|---|---|---|---|"]
        for r in sec:
            out.append(f"| {r['size']}² | fp32 ({r['fp32_impl']}) | {r['fp32_ms']['encode']:,.0f} | "
                       f"{r['fp32_ms']['decode']:,.0f} | 1 | 1 | — | — | {r['load'][0]}→{r['load'][1]} |")
            for name, b in r["bf16"].items():
                out.append(f"| {r['size']}² | {name} | {b['ms']['encode']:,.0f} | {b['ms']['decode']:,.0f} | "
                           f"**{b['ratio_vs_fp32']['encode']:.2f}** | **{b['ratio_vs_fp32']['decode']:.2f}** | "
                           f"{b['rel_rms_vs_fp32']['encode']:.1e} | {b['max_abs_diff_vs_fp32']['decode']:.1e} | |")
        out.append("")
    sec = [r for r in rows if r["section"] == "batch"]
    if sec:
        out += [f"N streams in one call against one call per stream (default path, fp32, base width {m['width']}):",
                "",
                "| size | streams | enc ms one call | enc ms per stream | enc ratio | dec ms one call | "
                "dec ms per stream | dec ratio | load |", "|---|---|---|---|---|---|---|---|---|"]
        for r in sec:
            e, d = r["encode"], r["decode"]
            out.append(f"| {r['size']}² | {r['streams']} | {e['batched_ms']:,.0f} | {e['per_stream_ms']:,.0f} | "
                       f"**{e['ratio']['median']:.2f}** | {d['batched_ms']:,.0f} | {d['per_stream_ms']:,.0f} | "
                       f"**{d['ratio']['median']:.2f}** | {r['load'][0]}→{r['load'][1]} |")
        out.append("")
    sec = [r for r in rows if r["section"] == "taehv"]
    if sec:
        out += ["TAEHV (random weights) against the Wan VAE (default path), per streaming step:", "",
                "| size | Wan enc ms | TAEHV enc ms | enc ratio | Wan dec ms | TAEHV dec ms | dec ratio | load |",
                "|---|---|---|---|---|---|---|---|"]
        for r in sec:
            e, d = r["encode"], r["decode"]
            out.append(f"| {r['size']}² | {e['wan_ms']:,.0f} | {e['taehv_ms']:,.1f} | **{e['ratio']['median']:.3f}** "
                       f"| {d['wan_ms']:,.0f} | {d['taehv_ms']:,.1f} | **{d['ratio']['median']:.3f}** | "
                       f"{r['load'][0]}→{r['load'][1]} |")
        out.append("")
    sec = [r for r in rows if r["section"] == "tiny"]
    if sec:
        out += ["Tiny VAE (conformance, base width 8): official stand-in vs the default path:", "",
                "| size | path | official ms enc + dec | wanstream ms enc + dec | enc ratio | dec ratio | load |",
                "|---|---|---|---|---|---|---|"]
        for r in sec:
            e, d = r["encode"], r["decode"]
            out.append(f"| {r['size']} | {r['conv_impl']} | {e['official_ms']:.1f} + {d['official_ms']:.1f} | "
                       f"{e['wanstream_ms']:.1f} + {d['wanstream_ms']:.1f} | **{e['ratio']['median']:.2f}** | "
                       f"**{d['ratio']['median']:.2f}** | {r['load'][0]}→{r['load'][1]} |")
        out.append("")
    for r in rows:
        if r["section"] == "profile":
            out += [f"Profile, {r['path']}, {r['size']}² (one encode + one decode):", "", "```", r["table"], "```", ""]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------------ main
def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("vae-real-size"), help="folder for the JSON and markdown")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--width", type=int, default=96, help="VAE base width (96: the released one)")
    p.add_argument("--sizes", type=_ints, default=[256, 512], help="square frame sizes of the main rows")
    p.add_argument("--bench-sizes", type=_ints, default=[256])
    p.add_argument("--bf16-sizes", type=_ints, default=[256])
    p.add_argument("--batch-sizes", type=_ints, default=[256])
    p.add_argument("--streams", type=_ints, default=[2, 4])
    p.add_argument("--rounds", type=int, default=4, help="paired rounds per row (order reversed every other)")
    p.add_argument("--only", default=",".join(s for s in SECTIONS if s != "profile"),
                   help=f"sections, comma separated: {', '.join(SECTIONS)}")
    args = p.parse_args(argv)
    only = [s for s in args.only.split(",") if s]
    bad = sorted(set(only) - set(SECTIONS))
    if bad:
        p.error(f"unknown sections: {', '.join(bad)}")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True).stdout
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                                capture_output=True, text=True).stdout.strip())
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else "?"
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"CPU: {cpu} ({os.cpu_count()} logical cores)")
    peak = roofline.measure_peaks(device, torch.float32)["matmul_flops_per_s"]
    meta = {"date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "machine": machine, "device": str(device),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "commit": commit.strip() or "unknown",
            "dirty": dirty, "peak_tflops": peak / 1e12, "load_start": load(), "width": args.width,
            "command": "python scripts/vae_real_size.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    ctx = {"device": device, "peak": peak, "sd": random_vae_state_dict(args.width, seed=1),
           "log": lambda row: print(json.dumps({k: v for k, v in row.items() if k != "table"}, default=str)[:400],
                                    file=sys.stderr, flush=True)}
    rows = []
    for name in SECTIONS:
        if name in only:
            print(f"[vae_real_size] {name} (load {load()})", file=sys.stderr, flush=True)
            rows += globals()[f"sec_{name}"](args, ctx)
    meta["load_end"] = load()
    result = {"meta": meta, "rows": rows}
    (args.out / "vae_real_size.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    (args.out / "vae_real_size.md").write_text(markdown(result) + "\n")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
