"""``wanstream eval``: score a video pair (JSON + HTML report) or run a sweep (``--sweep CONFIG``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from wanstream.cli.argtypes import int_in
from wanstream.eval.models import DEFAULT_MODELS


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``wanstream eval`` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "eval", help="quality of a restyled video: CLIP score, temporal consistency, warp error, drift",
        description="Score OUTPUT (restyled) against INPUT (source) with the paper's CLIP score and warp error, CLIP "
                    "temporal consistency and drift, overall and per prompt segment; writes JSON and a "
                    "self-contained HTML report. With --sweep CONFIG: run clips through wanstream under named "
                    "settings and write a Table-1-style table with FPS beside quality (docs/eval.md).")
    p.add_argument("input", type=Path, nargs="?", help="source video (flow is computed on it)")
    p.add_argument("output", type=Path, nargs="?", help="restyled video to score")
    p.add_argument("--prompt", help="the prompt the output was generated for (from frame 0)")
    p.add_argument("--prompt-at", nargs=2, action="append", default=[], metavar=("FRAME", "PROMPT"),
                   help="a prompt change at an input frame (repeatable)")
    p.add_argument("--json", type=Path, default=None, help="result JSON (default: OUTPUT.eval.json)")
    p.add_argument("--html", type=Path, default=None, help="HTML report (default: OUTPUT.eval.html)")
    p.add_argument("--sweep", type=Path, default=None, metavar="CONFIG", help="sweep config (TOML or JSON)")
    p.add_argument("--out", type=Path, default=Path("out/sweep"), help="sweep output folder (default: out/sweep)")
    p.add_argument("--models", type=Path, default=DEFAULT_MODELS,
                   help="folder of `wanstream download clip raft` (default: models)")
    p.add_argument("--clip", type=Path, default=None, help="CLIP model folder (transformers layout)")
    p.add_argument("--raft", type=Path, default=None, help="RAFT weights file (torchvision state dict)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N for CLIP and RAFT (default: cuda if present)")
    p.add_argument("--batch-size", type=int_in(1, None, "batch size"), default=32, help="frames per CLIP call")
    p.add_argument("--flow-batch", type=int_in(1, None, "flow batch"), default=8, help="frame pairs per RAFT call")
    p.add_argument("--flow-updates", type=int_in(1, None, "flow updates"), default=12,
                   help="RAFT refinement iterations (torchvision's default, 12)")
    p.add_argument("--drift-ref", type=int_in(1, None, "drift reference frames"), default=5,
                   help="first output frames the drift curve compares against")
    p.add_argument("--reference", type=Path, default=None, metavar="IMG",
                   help="the VACE reference image the output was made with: adds reference_similarity")
    p.add_argument("--control-adherence", action="store_true",
                   help="add edge_adherence (and depth_adherence when Depth Anything V2 is under MODELS/control/)")
    p.add_argument("--max-frames", type=int_in(2, None, "max frames"), default=None, help="compare the first N frames")
    p.add_argument("--strip", type=int_in(1, 32, "strip frames"), default=8, help="frames in the report's strip")
    return p


def _prompts(args) -> list[tuple[int, str]]:
    if not args.prompt:
        raise ValueError("--prompt is required (the prompt the output was generated for)")
    changes = []
    for frame, text in args.prompt_at:
        try:
            changes.append((int(frame), text))
        except ValueError:
            raise ValueError(f"--prompt-at needs FRAME PROMPT with an integer frame, got {frame!r}") from None
    return [(0, args.prompt)] + sorted(changes)


def run_eval(args) -> int:
    from wanstream.eval.evaluate import evaluate_files, load_scorers
    if args.sweep is not None:
        if args.input or args.output:
            raise ValueError("give either INPUT OUTPUT or --sweep CONFIG, not both")
        from wanstream.eval.sweep import load_config, run_sweep
        cfg = load_config(args.sweep)                      # checked before any model is loaded
        clip, flow = load_scorers(args.models, args.clip, args.raft, args.device, args.batch_size, args.flow_updates)
        run_sweep(cfg, args.out, clip, flow, flow_batch=args.flow_batch, drift_ref=args.drift_ref, strip=args.strip,
                  log=lambda *a: print(*a, file=sys.stderr))
        print((args.out / "table.md").read_text())
        print(f"sweep: {args.out / 'table.md'}, {args.out / 'sweep.json'}, {args.out / 'sweep.html'}")
        return 0
    if args.input is None or args.output is None:
        raise ValueError("give INPUT and OUTPUT videos (or --sweep CONFIG)")
    prompts = _prompts(args)
    for path in (args.input, args.output):
        if not path.is_file():
            raise ValueError(f"{path}: video file not found")
    from wanstream.io.files import check_outputs, write_text_atomic
    json_path = args.json or args.output.with_suffix(".eval.json")
    html_path = args.html or args.output.with_suffix(".eval.html")
    check_outputs([args.input, args.output], [json_path, html_path], flag="--json / --html")   # before any work
    reference = None
    if args.reference is not None:
        from wanstream.api.conditioning import read_reference
        reference = read_reference(args.reference)                  # checked before any model is loaded
    clip, flow = load_scorers(args.models, args.clip, args.raft, args.device, args.batch_size, args.flow_updates)
    result, inputs, outputs = evaluate_files(args.input, args.output, prompts, clip, flow, max_frames=args.max_frames,
                                             drift_ref=args.drift_ref, flow_batch=args.flow_batch)
    if reference is not None or args.control_adherence:
        _add_conditioning(result, inputs, outputs, clip, reference, args)
    from wanstream.eval.report import render_html
    write_text_atomic(json_path, json.dumps(result, indent=1) + "\n")
    write_text_atomic(html_path, render_html(result, inputs, outputs, args.strip))
    m = result["metrics"]
    print(f"frames {result['frames']} | CLIP score {_f(m['clip_score']['value'])} | consistency "
          f"{_f(m['clip_consistency']['value'])} | warp error {_f(m['warp_error']['value'])} | drift "
          f"{_f(m['drift']['value'])} | {json_path} | {html_path}")
    return 0


def _add_conditioning(result: dict, inputs, outputs, clip, reference, args) -> None:
    """The VACE scores (eval/conditioning.py) into ``result``; depth only where its model is on disk."""
    from wanstream.engine.control import DEPTH_DIR, load_depth
    from wanstream.eval.conditioning import conditioning_metrics
    depth_net = depth_id = None
    if args.control_adherence:
        folder = args.models / DEPTH_DIR
        if (folder / "config.json").is_file():
            import torch
            depth_net, depth_id = load_depth(folder, clip.device, torch.float32), str(folder)
        else:
            result["notes"].append(f"depth_adherence left out: no Depth Anything V2 in {folder} (`wanstream "
                                   f"download depth-anything --dir {args.models}`)")
    metrics, definitions = conditioning_metrics(inputs, outputs, clip, reference=reference,
                                                control=args.control_adherence, depth_net=depth_net,
                                                depth_id=depth_id)
    result["metrics"].update(metrics)
    result["definitions"].update(definitions)
    for name, m in metrics.items():
        print(f"{name} {_f(m['value'])}")


def _f(v) -> str:
    return "—" if v is None else f"{v:.2f}"
