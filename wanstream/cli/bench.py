"""``wanstream bench``: the command line of the benchmark harness (:mod:`wanstream.bench.harness`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from wanstream.cli.argtypes import add_backbone_arg, add_taehv_arg, autoencoders, int_in, resolution, seed
from wanstream.core.chunking import FIRST_CHUNK_FRAMES as FIRST_CHUNK
from wanstream.core.config import DTYPE_NAMES, QUANTIZE_MODES


def _input_fps(text: str) -> float | None:
    if text.lower() == "max":
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"input fps must be a positive number or 'max', got {text!r}")
    return value



def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``wanstream bench`` on the CLI's subparsers."""
    p = subparsers.add_parser("bench", help="benchmark one live stream: TTFF, FPS, stage times, latency SLO",
                              description="Feed a synthetic motion clip as a live source through a stream and "
                                          "report TTFF, FPS, per-stage times, latency percentiles, jitter, "
                                          "deadline misses, peak memory and roofline figures "
                                          "(definitions: docs/benchmarks.md).")
    p.add_argument("--model", required=True, type=Path, help="model folder (see `wanstream init-random`)")
    add_backbone_arg(p)
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default=None,
                   help="weights/compute dtype (default: bf16 on CUDA, fp32 on the CPU)")
    p.add_argument("--resolution", type=resolution, default=(512, 512), help="WxH, multiples of 16")
    p.add_argument("--steps", type=int_in(1, 4), default=2, help="denoising steps 1..4")
    p.add_argument("--no-batch", action="store_true", help="sequential steps per chunk instead of the stream batch")
    p.add_argument("--input-fps", type=_input_fps, default=None, metavar="FPS|max",
                   help="live source rate, e.g. 16 or 30 (real time; slower models queue), or max (default)")
    p.add_argument("--frames", type=int_in(FIRST_CHUNK), default=245, help="input frames of the stream")
    p.add_argument("--warmup", type=int_in(1), default=10,
                   help="chunks at the start of the stream left out of steady-state figures")
    p.add_argument("--target-latency", type=float, default=1.0, help="deadline for the miss rate, seconds")
    p.add_argument("--seed", type=seed, default=0, help="seed of the first stream (stream k uses seed + k), "
                                                          "0..2^32-1")
    add_taehv_arg(p)
    p.add_argument("--prime-chunks", type=int_in(0), default=None,
                   help="chunks of the throw-away stream that warms the model before each row (default: steps + 2; "
                        "0: none, TTFF then includes one-off initialisation)")
    p.add_argument("--sessions", type=int_in(1, 64, "sessions"), default=1,
                   help="streams fed together, each with its own prompt and seed, batched into shared DiT calls")
    p.add_argument("--compare-round-robin", action="store_true",
                   help="also measure the same streams served one stream per DiT call (reported as round_robin)")
    p.add_argument("--overload", type=float, default=None, metavar="X",
                   help="then feed the streams at X times the per-stream rate just measured, under today's policy "
                        "and under the playback-slack policy: continuous-playback ratio, time to first chunk, "
                        "stalls, degraded share (needs --input-fps max)")
    p.add_argument("--drift-watchdog", action="store_true",
                   help="run the drift watchdog on every stream and report its cost per chunk (drift_ms_per_chunk)")
    p.add_argument("--compile", action="store_true",
                   help="compile the steady-state DiT call (CUDA graphs on a GPU) and the VAE's steady encode/decode")
    p.add_argument("--quantize", choices=QUANTIZE_MODES, default=None,
                   help="quantise the DiT's block linears (fp8 needs a GPU with FP8)")
    p.add_argument("--compare-eager", action="store_true",
                   help="also run each row on the eager reference path (diffusers VAE modules, nothing compiled), "
                        "alternated A B B A; reports the paired ratios")
    p.add_argument("--sweep", action="store_true", help="steps 1..4 x {stream batch, no-batch} in one table")
    p.add_argument("--reference", type=Path, default=None, metavar="IMG",
                   help="VACE cost: the streams plain, then with this reference image (needs a Wan2.1-VACE model)")
    p.add_argument("--control", choices=["edges", "depth", "flow", "pose"], default=None,
                   help="VACE cost: the streams plain, then with this control kind (with --reference: both)")
    p.add_argument("--no-peak", action="store_true", help="skip measuring the device's matmul / copy peaks")
    p.add_argument("--json", type=Path, default=None, help="write the result as JSON here")
    p.add_argument("--markdown", type=Path, default=None, help="write the rows as a markdown table here")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--lora", action="append", default=None, metavar="PATH[:STRENGTH]",
                   help="run with this LoRA attached (repeatable); measures the adapters' cost")
    from wanstream.cli.presets import add_preset_arg
    add_preset_arg(p)
    return p


def _reference(args):
    if args.reference is None:
        refs = getattr(args, "preset_reference", None)              # a --preset's image
        return refs[0] if refs else None
    from wanstream.api.conditioning import read_reference
    return read_reference(args.reference)          # one image (bench measures the cost of one prefix frame)


def spec_from_args(args):
    from wanstream.bench.harness import BenchConfig, BenchRun
    width, height = args.resolution
    base = BenchConfig(width=width, height=height, steps=args.steps, batch=not args.no_batch,
                       input_fps=args.input_fps, frames=args.frames, warmup=args.warmup,
                       target_latency_s=args.target_latency, seed=args.seed,
                       encoder=autoencoders(args.taehv)[0], decoder=autoencoders(args.taehv)[1],
                       prime_chunks=args.prime_chunks,
                       sessions=args.sessions, drift_watchdog=args.drift_watchdog,
                       reference=_reference(args), control=args.control)
    base.validate()
    if args.overload is not None and (not args.overload > 0 or args.input_fps is not None or args.sweep):
        raise ValueError("--overload X needs X > 0, the default --input-fps max (it measures the capacity first) "
                         "and no --sweep")
    from wanstream.cli.presets import lora_specs
    return BenchRun(model_dir=args.model, device=args.device, dtype=args.dtype, sweep=args.sweep,
                    measure_peak=not args.no_peak, base=base, lora=lora_specs(args),
                    compare_round_robin=args.compare_round_robin, compile=args.compile, quantize=args.quantize,
                    compare_eager=args.compare_eager, overload=args.overload, backbone=args.backbone)


def run_bench(args) -> int:
    """``wanstream bench``: run, print the table, write JSON / markdown. Returns the exit code."""
    from wanstream.bench.harness import run
    from wanstream.bench.report import print_table, render_markdown
    spec = spec_from_args(args)
    log = (lambda *a, **k: None) if args.quiet else (lambda *a, **k: print(*a, file=sys.stderr, **k))
    result = run(spec, log=log)
    print_table(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = result if spec.sweep or len(result["rows"]) > 1 else {**result["rows"][0], "meta": result["meta"]}
        args.json.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(render_markdown(result))
    return 0
