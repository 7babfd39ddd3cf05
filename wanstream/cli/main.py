"""``wanstream`` command line: v2v | t2v | init-random | clip | bench | serve | eval | download.

Building the parser imports no torch, diffusers or transformers (``--help`` and argument errors answer at once);
a command imports what it needs when it runs (:mod:`wanstream.cli.commands` and the modules named in ``COMMANDS``).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from wanstream.cli.argtypes import (
    Parser,
    add_backbone_arg,
    add_taehv_arg,
    float_in,
    int_in,
    resolution,
    seed,
    taehv_argv,
)
from wanstream.cli.presets import PRESET_COMMANDS, add_preset_arg
from wanstream.core.config import QUANTIZE_MODES
from wanstream.core.geometry import FIT_MODES

_steps = int_in(1, 4, "steps")
_frames = int_in(1, None, "frames")
_fps = float_in(0.0, 1000.0, "fps")

# command → (module, function) run with the parsed arguments
COMMANDS = {"v2v": ("wanstream.cli.commands", "cmd_v2v"), "t2v": ("wanstream.cli.commands", "cmd_t2v"),
            "init-random": ("wanstream.cli.commands", "cmd_init_random"),
            "clip": ("wanstream.cli.commands", "cmd_clip"), "download": ("wanstream.cli.commands", "cmd_download"),
            "bench": ("wanstream.cli.bench", "run_bench"), "serve": ("wanstream.cli.serve", "run_serve"),
            "eval": ("wanstream.cli.eval", "run_eval")}
DOWNLOADS = ("sdv2-1.3b", "sdv2-14b", "self-forcing-1.3b", "longlive-1.3b", "vace-1.3b", "vace-14b",
             "depth-anything", "pose", "clip", "raft")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=Path, help="model folder (see `wanstream init-random`)")
    add_backbone_arg(p)
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available, else cpu)")


def _creator_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", default=None, help="the prompt (required unless a --preset gives one)")
    p.add_argument("--lora", action="append", default=None, metavar="PATH[:STRENGTH]",
                   help="a Wan LoRA (diffusers/PEFT, original-Wan or kohya/musubi keys), strength default 1; "
                        "repeatable")
    add_preset_arg(p)


def _reference_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reference", type=Path, action="append", default=None, metavar="IMG",
                   help="a reference image (PNG, JPEG, WebP, BMP) steering the look through VACE; repeatable (up to "
                        "4); needs a Wan2.1-VACE model beside --model (`wanstream download vace-1.3b`), "
                        "docs/conditioning.md")
    p.add_argument("--reference-strength", type=float_in(0.0, 4.0, "reference strength"), default=1.0,
                   help="scale of the VACE hints, (0, 4] (default 1)")


def _control_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--control", choices=["edges", "depth", "flow", "pose"], default=None,
                   help="VACE control from the input's own frames: Canny edges, depth (Depth Anything V2 small: "
                        "`wanstream download depth-anything`), optical flow (RAFT: `wanstream download raft`) or pose "
                        "(Keypoint R-CNN: `wanstream download pose`)")
    p.add_argument("--control-video", type=Path, default=None, metavar="VIDEO",
                   help="VACE control from another video, frame by frame (e.g. a depth or pose video)")


def _seed_arg(p: argparse.ArgumentParser, what: str = "the noise") -> None:
    p.add_argument("--seed", type=seed, default=0, help=f"seed of {what}, 0..2^32-1 (same seed + input → same output)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="wanstream", description="Live video restyling on causal Wan 2.1 DiTs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)

    p = sub.add_parser("v2v", help="restyle video files (several files run as concurrent, batched streams)",
                       description="Restyle video files by a text prompt. Several inputs run as concurrent streams "
                                   "batched into shared DiT calls; each output keeps its input's frames and timing.")
    p.add_argument("input", type=Path, nargs="+",
                   help="video files (MP4, MOV, MKV, WebM, AVI, GIF, ...), image sequences (a folder, or a pattern "
                        "like frames/%%04d.png or 'frames/*.png') or still images")
    p.add_argument("-o", "--output", type=Path, required=True,
                   help="output video (.mp4, .m4v, .mov or .mkv); with several inputs a folder (each result named "
                        "after its input). Never one of the inputs")
    _model_args(p)
    _creator_args(p)
    p.add_argument("--fit", choices=FIT_MODES, default="crop",
                   help="framing when the input's aspect differs from --resolution (centred)")
    p.add_argument("--steps", type=_steps, default=2, help="denoising steps per chunk, 1-4 (more: closer to the "
                                                            "prompt, slower)")
    _seed_arg(p)
    p.add_argument("--resolution", type=resolution, default=None,
                   help="WxH, multiples of 16 (default: the input size rounded down to multiples of 16)")
    p.add_argument("--no-batch", action="store_true", help="run the steps of each chunk sequentially")
    p.add_argument("--noise-scale", type=float_in(0.0, 1.0, "noise scale"), default=0.8,
                   help="how much of the input is replaced by noise, (0, 1]: higher follows the prompt more")
    p.add_argument("--no-noise-controller", action="store_true",
                   help="keep the noise scale fixed (the motion-aware controller lowers it on fast motion)")
    add_taehv_arg(p)
    p.add_argument("--crf", type=int_in(0, 51, "crf"), default=18,
                   help="H.264 quality of the output: 0 lossless, 18 visually lossless, 51 worst")
    p.add_argument("--no-audio", action="store_true",
                   help="drop the input's audio track (by default it is kept: copied, or AAC where the output "
                        "container needs it)")
    p.add_argument("--fps", type=_fps, default=None,
                   help="frame rate of image-sequence and still-image inputs (default 16; videos keep their own)")
    p.add_argument("--still-frames", type=_frames, default=16,
                   help="frames a still-image input is restyled into (a clip of that many frames at --fps)")
    p.add_argument("--quantize", choices=QUANTIZE_MODES, default=None,
                   help="DiT block linears in int8 (weight-only, any device) or fp8 (CUDA, compute capability >= 8.9)")
    _reference_args(p)
    _control_args(p)
    from wanstream.cli.pipeline import add_pipeline_args
    add_pipeline_args(p)

    p = sub.add_parser("t2v", help="generate a video from text")
    p.add_argument("-o", "--output", type=Path, required=True, help="output video file (.mp4)")
    _model_args(p)
    _creator_args(p)
    p.add_argument("--frames", type=_frames, default=81, help="frames to generate")
    p.add_argument("--steps", type=_steps, default=4, help="denoising steps per block, 1-4")
    _seed_arg(p)
    p.add_argument("--resolution", type=resolution, default=(832, 480), help="WxH, multiples of 16")
    p.add_argument("--fps", type=_fps, default=16.0, help="frame rate of the output file")
    p.add_argument("--no-batch", action="store_true", help="run the steps of each block sequentially")
    p.add_argument("--switch", action="append", default=None, metavar="FRAME:PROMPT",
                   help="switch to PROMPT at output frame FRAME (the block it falls in) with a KV re-cache of the "
                        "recent frames (LongLive's interactive mode); repeatable")
    _reference_args(p)

    p = sub.add_parser("init-random", help="write a random-weight model in the released layout")
    p.add_argument("dir", type=Path, help="folder to write (the layout `--model` reads)")
    p.add_argument("--preset", choices=["tiny", "1.3b", "14b"], default="tiny",
                   help="model dimensions: tiny (tests, demo) or the released 1.3b / 14b shapes")
    _seed_arg(p, "the random weights")
    p.add_argument("--small-text-encoder", action="store_true",
                   help="write a tiny text encoder even for the 1.3b / 14b presets")
    p.add_argument("--backbone", choices=["streamdiffusionv2", "self-forcing", "longlive"],
                   default="streamdiffusionv2", help="whose generator to write, in its released layout")
    p.add_argument("--vace", action="store_true",
                   help="also write a Wan2.1-VACE model of the same size (wan_models/Wan2.1-VACE-*/)")

    p = sub.add_parser("clip", help="write a synthetic test clip with motion (demo / benchmark input)")
    p.add_argument("output", type=Path, help="output video file (.mp4)")
    p.add_argument("--frames", type=_frames, default=49, help="frames in the clip")
    p.add_argument("--resolution", type=resolution, default=(512, 512), help="WxH, multiples of 16")
    p.add_argument("--fps", type=_fps, default=16.0, help="frame rate of the clip")
    _seed_arg(p, "the clip's pattern")

    from wanstream.cli.bench import add_bench_parser
    add_bench_parser(sub)
    from wanstream.cli.serve import add_serve_parser
    add_serve_parser(sub)
    from wanstream.cli.eval import add_eval_parser
    add_eval_parser(sub)

    p = sub.add_parser("download", help="fetch the released weights (needs network access to the hub)")
    p.add_argument("name", nargs="+", choices=DOWNLOADS,
                   help="sdv2-1.3b / sdv2-14b: the StreamDiffusionV2 models; self-forcing-1.3b / longlive-1.3b: "
                        "those generators (+ LongLive's LoRA) beside the Wan 2.1 1.3B folder; vace-1.3b / vace-14b: "
                        "the Wan2.1-VACE model (reference images, control video); depth-anything / pose: the depth / "
                        "pose control models; clip / raft: the "
                        "evaluation models (wanstream eval)")
    p.add_argument("--dir", type=Path, default=Path("models"), help="folder to download into")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = taehv_argv(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    from wanstream.core.errors import CheckpointError
    try:
        if args.command in PRESET_COMMANDS and args.preset_file is not None:
            from wanstream.cli.presets import apply_preset
            args = apply_preset(parser, argv, args.command, args.preset_file)
        module, name = COMMANDS[args.command]
        return getattr(importlib.import_module(module), name)(args)
    except (CheckpointError, ValueError, RuntimeError, OSError) as exc:   # VideoError is a ValueError
        print(f"wanstream {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"wanstream {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
