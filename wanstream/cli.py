"""``wanstream`` command line: v2v | t2v | init-random | clip | bench | serve | eval | download."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .argtypes import add_taehv_arg, autoencoders, float_in, int_in, resolution, taehv_argv
from .errors import CheckpointError
from .io.video import FIT_MODES
from .presets import PRESET_COMMANDS, add_preset_arg, apply_preset, lora_specs, prompt_embedding

_steps = int_in(1, 4, "steps")
_positive = int_in(1, None, "frames")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=Path, help="model folder (see `wanstream init-random`)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")


def _creator_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", default=None, help="the prompt (required unless a --preset gives one)")
    p.add_argument("--lora", action="append", default=None, metavar="PATH[:STRENGTH]",
                   help="a Wan LoRA (diffusers/PEFT, original-Wan or kohya/musubi keys), strength default 1; "
                        "repeatable")
    add_preset_arg(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wanstream", description="Live video restyling on causal Wan 2.1 DiTs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("v2v", help="restyle video files (several files run as concurrent, batched streams)")
    p.add_argument("input", type=Path, nargs="+", help="one or more video files")
    p.add_argument("-o", "--output", type=Path, required=True,
                   help="output file; with several inputs a folder (each result named after its input)")
    _model_args(p)
    _creator_args(p)
    p.add_argument("--fit", choices=FIT_MODES, default="crop",
                   help="framing when the input's aspect differs from --resolution (centred; default crop)")
    p.add_argument("--steps", type=_steps, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resolution", type=resolution, default=None, help="WxH, multiples of 16 (default: input size)")
    p.add_argument("--no-batch", action="store_true", help="run the steps of each chunk sequentially")
    p.add_argument("--noise-scale", type=float_in(0.0, 1.0, "noise scale"), default=0.8)
    p.add_argument("--no-noise-controller", action="store_true")
    add_taehv_arg(p)
    p.add_argument("--crf", type=int_in(0, 51, "crf"), default=18,
                   help="H.264 quality of the output: 0 lossless, 18 visually lossless (default), 51 worst")
    p.add_argument("--quantize", choices=["int8", "fp8"], default=None,
                   help="DiT block linears in int8 (weight-only, any device) or fp8 (CUDA, compute capability >= 8.9)")
    from .pipeline_parallel import add_pipeline_args
    add_pipeline_args(p)

    p = sub.add_parser("t2v", help="generate a video from text")
    p.add_argument("-o", "--output", type=Path, required=True)
    _model_args(p)
    _creator_args(p)
    p.add_argument("--frames", type=_positive, default=81)
    p.add_argument("--steps", type=_steps, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resolution", type=resolution, default=(832, 480))
    p.add_argument("--fps", type=float, default=16.0)
    p.add_argument("--no-batch", action="store_true")

    p = sub.add_parser("init-random", help="write a random-weight model in the released layout")
    p.add_argument("dir", type=Path)
    p.add_argument("--preset", choices=["tiny", "1.3b", "14b"], default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--small-text-encoder", action="store_true",
                   help="write a tiny text encoder even for the 1.3b / 14b presets")

    p = sub.add_parser("clip", help="write a synthetic test clip with motion (demo / benchmark input)")
    p.add_argument("output", type=Path)
    p.add_argument("--frames", type=_positive, default=49)
    p.add_argument("--resolution", type=resolution, default=(512, 512))
    p.add_argument("--fps", type=float, default=16.0)
    p.add_argument("--seed", type=int, default=0)

    from .bench import add_bench_parser
    add_bench_parser(sub)
    from .server.cli import add_serve_parser
    add_serve_parser(sub)
    from .eval.cli import add_eval_parser
    add_eval_parser(sub)

    p = sub.add_parser("download", help="fetch the released weights (needs network access to the hub)")
    p.add_argument("name", nargs="+", choices=["sdv2-1.3b", "sdv2-14b", "clip", "raft"],
                   help="clip / raft: the evaluation models (wanstream eval)")
    p.add_argument("--dir", type=Path, default=Path("models"))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = taehv_argv(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    from .io.video import VideoError
    try:
        if args.command in PRESET_COMMANDS and args.preset_file is not None:
            args = apply_preset(parser, argv, args.command, args.preset_file)
        return COMMANDS[args.command](args)
    except (VideoError, CheckpointError, ValueError, RuntimeError, OSError) as exc:
        print(f"wanstream {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"wanstream {args.command}: interrupted", file=sys.stderr)
        return 130


def cmd_v2v(args) -> int:
    from .pipeline_parallel import check_pipeline_args, pipeline_requested, run_v2v_pipeline
    if pipeline_requested(args):
        check_pipeline_args(args)
        if args.prompt is None:
            raise ValueError("the multi-GPU pipeline needs --prompt (or a preset with one prompt, not a blend)")
        if len(args.input) > 1:
            raise ValueError("the multi-GPU pipeline restyles one file at a time")
        return run_v2v_pipeline(args)
    from .engine import Engine
    from .io.video import fit_resolution, probe_video
    from .models.loader import load_model
    from .restyle import FileJob, output_paths, report, restyle

    outputs = output_paths(args.input, args.output)
    infos = [probe_video(p) for p in args.input]
    encoder, decoder = autoencoders(args.taehv)
    model = load_model(args.model, device=args.device, taehv=bool(args.taehv), quantize=args.quantize,
                       lora=lora_specs(args))
    embeds = prompt_embedding(model, args)
    engine = Engine(model)
    jobs = []
    for path, out, info in zip(args.input, outputs, infos):
        width, height = args.resolution or fit_resolution(info.width, info.height)
        stream = engine.open(prompt_embeds=embeds, width=width, height=height, steps=args.steps,
                             noise_scale=args.noise_scale, noise_controller=not args.no_noise_controller,
                             batch=not args.no_batch, seed=args.seed, encoder=encoder, decoder=decoder,
                             fit=args.fit)
        jobs.append(FileJob(path, out, stream, info.fps, info.frames, crf=args.crf))
    elapsed = restyle(engine, jobs, desc="v2v" if len(jobs) == 1 else f"v2v x{len(jobs)}")
    report(jobs, elapsed)
    return 0


def cmd_t2v(args) -> int:
    from tqdm import tqdm

    from .io.video import VideoWriter
    from .models.loader import load_model
    from .t2v import text_to_video

    width, height = args.resolution
    model = load_model(args.model, device=args.device, lora=lora_specs(args))
    embeds = prompt_embedding(model, args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    first = None
    with VideoWriter(args.output, args.fps, width, height) as writer, \
            tqdm(total=args.frames, unit="frame", desc="t2v", disable=None) as bar:
        for frame in text_to_video(model, embeds, args.frames, width=width, height=height, steps=args.steps,
                                   seed=args.seed, batch=not args.no_batch):
            first = first if first is not None else time.perf_counter() - t0
            writer.write(frame)
            bar.update(1)
    elapsed = time.perf_counter() - t0
    print(f"frames {args.frames} | {args.frames / elapsed:.2f} FPS | time to first frame {first:.2f} s | "
          f"output {args.output}")
    return 0


def cmd_init_random(args) -> int:
    from .models.random_init import init_random
    init_random(args.dir, args.preset, seed=args.seed,
                full_text_encoder=False if args.small_text_encoder else None)
    return 0


def cmd_clip(args) -> int:
    from .io.video import write_motion_clip
    args.output.parent.mkdir(parents=True, exist_ok=True)
    width, height = args.resolution
    write_motion_clip(args.output, args.frames, width, height, args.fps)
    print(f"clip: {args.frames} frames {width}x{height} @ {args.fps:g} fps → {args.output}")
    return 0


def cmd_bench(args) -> int:
    from .bench import run_bench
    return run_bench(args)


def cmd_serve(args) -> int:
    from .server.cli import run_serve
    return run_serve(args)


def cmd_download(args) -> int:
    from .models.download import download
    for name in args.name:
        download(name, args.dir)
    return 0


def cmd_eval(args) -> int:
    from .eval.cli import run_eval
    return run_eval(args)


COMMANDS = {"v2v": cmd_v2v, "t2v": cmd_t2v, "init-random": cmd_init_random, "clip": cmd_clip,
            "bench": cmd_bench, "serve": cmd_serve, "download": cmd_download,
            "eval": cmd_eval}

if __name__ == "__main__":
    sys.exit(main())
