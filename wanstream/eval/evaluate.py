"""Score one (input, output) video pair: CLIP score, CLIP consistency, warp error, drift, per prompt segment.

Works on any pair of videos (other systems' outputs too): it only needs the frames. The input is resized to the
output's size (antialiased bilinear, as wanstream resizes its input) so the flow is in output pixels. When the
two frame counts differ, the first ``min`` frames are compared and the result says so.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from wanstream.eval.clip import ClipEmbedder
from wanstream.eval.flow import FlowModel, Motion, input_motion, warp_errors
from wanstream.eval.metrics import (
    DEFINITIONS,
    DRIFT_REF_FRAMES,
    SCHEMA,
    Segment,
    consecutive_consistency,
    drift_curve,
    drift_summary,
    json_floats,
    nanmean,
    segments,
    text_image_scores,
)
from wanstream.io.video import probe_video, read_video, resize_frames


def align(inputs: np.ndarray, outputs: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Same frame count (the shorter one's) and the input resized to the output size; notes on what changed."""
    notes = []
    n = min(len(inputs), len(outputs))
    if len(inputs) != len(outputs):
        notes.append(f"input has {len(inputs)} frames, output {len(outputs)}: the first {n} are compared")
    if n < 2:
        raise ValueError(f"need at least 2 frames in both videos, got {len(inputs)} input and {len(outputs)} output")
    inputs, outputs = inputs[:n], outputs[:n]
    h, w = outputs.shape[1:3]
    if inputs.shape[1:3] != (h, w):
        notes.append(f"input frames {inputs.shape[2]}x{inputs.shape[1]} resized to the output size {w}x{h} "
                     f"for optical flow")
        inputs = resize_frames(inputs, w, h)
    return inputs, outputs, notes


def _bar(total: int, desc: str, progress: bool):
    return tqdm(total=total, desc=desc, unit="frame", disable=None if progress else True, leave=False)


def evaluate(inputs: np.ndarray, outputs: np.ndarray, prompts: Sequence[tuple[int, str]], clip: ClipEmbedder,
             flow: FlowModel, *, drift_ref: int = DRIFT_REF_FRAMES, flow_batch: int = 8,
             motion: Sequence[Motion] | None = None, progress: bool = True) -> dict:
    """All metrics of a pair of uint8 videos ``[N, H, W, 3]``; ``prompts`` is ``[(first frame, text), ...]``.

    ``motion`` reuses flow already computed on the aligned input (the sweep scores many outputs of one input).
    Returns the JSON-ready result (``schema`` wanstream-eval/1).
    """
    inputs, outputs, notes = align(inputs, outputs)
    return score(inputs, outputs, prompts, clip, flow, drift_ref=drift_ref, flow_batch=flow_batch, motion=motion,
                 progress=progress, notes=notes)


def score(inputs: np.ndarray, outputs: np.ndarray, prompts: Sequence[tuple[int, str]], clip: ClipEmbedder,
          flow: FlowModel, *, drift_ref: int = DRIFT_REF_FRAMES, flow_batch: int = 8,
          motion: Sequence[Motion] | None = None, progress: bool = True, notes: list[str] | None = None) -> dict:
    """:func:`evaluate` on frames already :func:`align`-ed."""
    notes = list(notes or [])
    n = len(outputs)
    segs = segments(prompts, n)
    if drift_ref < 1:
        raise ValueError(f"drift reference frames must be at least 1, got {drift_ref}")
    if drift_ref >= n:
        notes.append(f"drift reference shortened from {drift_ref} to {n - 1} frames (only {n} frames)")
        drift_ref = n - 1

    with _bar(n, "CLIP", progress) as bar:
        images = clip.images(outputs, progress=bar)
    text = clip.text([s.prompt for s in segs])
    scores = text_image_scores(text, images, segs)
    consistency = consecutive_consistency(images)
    drift = drift_curve(images, drift_ref)
    if motion is None:
        with _bar(n - 1, "flow", progress) as bar:
            warp, valid_frac = warp_errors(outputs, input_motion(inputs, flow, flow_batch, progress=bar), flow.device)
    else:
        warp, valid_frac = warp_errors(outputs, motion, flow.device)

    truncated = [s.prompt for s in segs if clip.prompt_tokens(s.prompt) > clip.max_tokens]
    if truncated:
        notes.append(f"{len(truncated)} prompt(s) longer than CLIP's {clip.max_tokens} tokens were truncated")
    models = {"clip": clip.describe(), "raft": flow.describe()}

    def metric(name: str, value, **series) -> dict:
        d = DEFINITIONS[name]
        return {"value": value, "definition": d["version"], "model": models[d["model"]]["id"],
                "higher_is_better": d["higher_is_better"], **series}

    nan_pairs = int(np.sum(~np.isfinite(warp)))
    result = {
        "schema": SCHEMA,
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "frames": n, "width": int(outputs.shape[2]), "height": int(outputs.shape[1]),
        "models": models,
        "metrics": {
            "clip_score": metric("clip_score", nanmean(scores), per_frame=json_floats(scores)),
            "clip_consistency": metric("clip_consistency", nanmean(consistency), per_pair=json_floats(consistency)),
            "warp_error": metric("warp_error", nanmean(warp), per_pair=json_floats(warp),
                                 valid_fraction=json_floats(valid_frac), pairs_without_valid_pixels=nan_pairs,
                                 alpha=0.01, beta=0.5),
            "drift": {**metric("drift", None), **drift_summary(drift, drift_ref), "curve": json_floats(drift)},
        },
        "segments": [segment_metrics(s, scores, consistency, warp, images, drift_ref) for s in segs],
        "definitions": {d["version"]: d["text"] for d in DEFINITIONS.values()},
        "notes": notes,
    }
    return result


def segment_metrics(seg: Segment, scores: np.ndarray, consistency: np.ndarray, warp: np.ndarray,
                    images: torch.Tensor, drift_ref: int) -> dict:
    """The metrics restricted to one prompt segment (pairs with both frames inside it; drift against the
    segment's own first frames)."""
    ref = min(drift_ref, seg.end - seg.start)
    drift = drift_curve(images[seg.start: seg.end], ref)
    return {"start": seg.start, "end": seg.end, "prompt": seg.prompt,
            "clip_score": nanmean(scores[seg.start: seg.end]),
            "clip_consistency": nanmean(consistency[seg.start: seg.end - 1]),
            "warp_error": nanmean(warp[seg.start: seg.end - 1]),
            "drift": nanmean(drift[-ref:])}


def _file_info(path: Path, frames: np.ndarray) -> dict:
    return {"path": str(path), "frames_read": int(len(frames)), "width": int(frames.shape[2]),
            "height": int(frames.shape[1]), "fps": probe_video(path).fps}


def evaluate_files(input_path: Path, output_path: Path, prompts: Sequence[tuple[int, str]], clip: ClipEmbedder,
                   flow: FlowModel, *, max_frames: int | None = None, **kw) -> tuple[dict, np.ndarray, np.ndarray]:
    """:func:`evaluate` on two video files; also returns the aligned input and output frames (for the report)."""
    inputs, _ = read_video(input_path)
    outputs, _ = read_video(output_path)
    if max_frames is not None:
        inputs, outputs = inputs[:max_frames], outputs[:max_frames]
    info = {"input": _file_info(input_path, inputs), "output": _file_info(output_path, outputs)}
    inputs, outputs, notes = align(inputs, outputs)
    result = score(inputs, outputs, prompts, clip, flow, notes=notes, **kw)
    return {**info, **result}, inputs, outputs


def load_scorers(models_dir: Path, clip_path: Path | None = None, raft_path: Path | None = None,
                 device: str | None = None, clip_batch: int = 32, flow_updates: int = 12
                 ) -> tuple[ClipEmbedder, FlowModel]:
    """Find (offline) and load CLIP and RAFT on ``device`` (default: cuda when available)."""
    from wanstream.eval.clip import load_clip
    from wanstream.eval.flow import load_raft
    from wanstream.eval.models import find_clip, find_raft
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    clip_dir, clip_id = find_clip(clip_path, models_dir)
    raft_file, raft_id = find_raft(raft_path, models_dir)
    return (load_clip(clip_dir, clip_id, device=device, batch=clip_batch),
            load_raft(raft_file, raft_id, iters=flow_updates, device=device))
