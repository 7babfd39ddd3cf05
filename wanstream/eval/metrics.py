"""The metric definitions (versioned) and the arithmetic on embeddings; no model, no engine.

Every CLIP figure is a cosine similarity × 100 of unit embeddings. Definitions change only with a new version
string, so numbers in old JSON files stay comparable with new ones of the same version.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

SCHEMA = "wanstream-eval/1"
DRIFT_REF_FRAMES = 5        # the first chunk of a wanstream stream

DEFINITIONS: dict[str, dict] = {
    "clip_score": {
        "version": "clip_score/1", "model": "clip", "higher_is_better": True, "unit": "cosine x 100",
        "text": "Text-image CLIP score: mean over output frames of 100 * cos(text embedding of the frame's prompt, "
                "image embedding of the frame). The paper's 'Text-Image CLIP' row (StreamV2V's prompt score).",
    },
    "clip_consistency": {
        "version": "clip_consistency/1", "model": "clip", "higher_is_better": True, "unit": "cosine x 100",
        "text": "CLIP temporal consistency: mean over consecutive output frame pairs of 100 * cos(image embedding "
                "t, image embedding t+1); identical frames give 100. The paper's 'CLIP Score / Temporal CLIP' row.",
    },
    "warp_error": {
        "version": "warp_error/1", "model": "raft", "higher_is_better": False, "unit": "mean abs error, 0-255",
        "text": "Warp error: RAFT flow f (forward) and b (backward) between consecutive INPUT frames resized to "
                "the output size; valid pixels pass |f + b(x+f)|^2 <= 0.01 (|f|^2 + |b(x+f)|^2) + 0.5 and land "
                "inside the frame; output frame t+1 is warped back to t by f (bilinear) and the mean absolute "
                "difference to output frame t over valid pixels and RGB channels, on 0-255, is averaged over "
                "pairs. The paper's 'Warp Error' row.",
    },
    "drift": {
        "version": "drift/1", "model": "clip", "higher_is_better": True, "unit": "cosine x 100",
        "text": "Drift: 100 * cos(image embedding of frame t, normalised mean image embedding of the first K "
                "output frames) as a curve over the stream; the value is the mean of the last K frames, with the "
                "curve's minimum and its least-squares slope per 100 frames. Not in the paper.",
    },
}


@dataclass(frozen=True)
class Segment:
    """Frames ``start .. end - 1`` were generated for ``prompt``."""

    start: int
    end: int
    prompt: str


def segments(prompts: Sequence[tuple[int, str]], frames: int) -> list[Segment]:
    """Prompt schedule ``[(first frame, prompt), ...]`` → segments covering ``0 .. frames - 1``.

    The first entry must start at frame 0 and starts must increase; entries at or after ``frames`` are an error.
    """
    if not prompts:
        raise ValueError("give at least one prompt")
    starts = [int(s) for s, _ in prompts]
    if starts[0] != 0:
        raise ValueError(f"the first prompt must start at frame 0, got frame {starts[0]}")
    for a, b in zip(starts, starts[1:]):
        if b <= a:
            raise ValueError(f"prompt start frames must increase, got {a} then {b}")
    if starts[-1] >= frames:
        raise ValueError(f"a prompt starts at frame {starts[-1]} but only {frames} frames are compared")
    for _, text in prompts:
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"prompts must be non-empty text, got {text!r}")
    ends = starts[1:] + [frames]
    return [Segment(s, e, text) for (s, text), e in zip(prompts, ends)]


def text_image_scores(text: torch.Tensor, images: torch.Tensor, segs: Sequence[Segment]) -> np.ndarray:
    """``[N]`` 100 · cos(frame, its segment's prompt); ``text`` rows follow ``segs``."""
    scores = np.empty(images.shape[0])
    for row, seg in zip(text, segs):
        scores[seg.start: seg.end] = (images[seg.start: seg.end] @ row).double().numpy() * 100
    return scores


def consecutive_consistency(images: torch.Tensor) -> np.ndarray:
    """``[N - 1]`` 100 · cos(frame t, frame t+1)."""
    return (images[:-1] * images[1:]).sum(-1).double().numpy() * 100


def drift_curve(images: torch.Tensor, ref_frames: int = DRIFT_REF_FRAMES) -> np.ndarray:
    """``[N]`` 100 · cos(frame t, normalised mean of the first ``ref_frames`` frames)."""
    if ref_frames < 1:
        raise ValueError(f"drift reference frames must be at least 1, got {ref_frames}")
    ref = torch.nn.functional.normalize(images[:ref_frames].mean(0), dim=-1)
    return (images @ ref).double().numpy() * 100


def nanmean(xs) -> float | None:
    """Mean over the finite values; None when there is none."""
    xs = np.asarray(xs, dtype=np.float64)
    xs = xs[np.isfinite(xs)]
    return float(xs.mean()) if xs.size else None


def slope_per_100(ys) -> float | None:
    """Least-squares slope of ``ys`` against the frame index, per 100 frames (None for fewer than 2 values)."""
    ys = np.asarray(ys, dtype=np.float64)
    if ys.size < 2:
        return None
    x = np.arange(ys.size, dtype=np.float64)
    return float(np.polyfit(x, ys, 1)[0] * 100)


def drift_summary(curve: np.ndarray, ref_frames: int) -> dict:
    tail = curve[-ref_frames:]
    return {"value": nanmean(tail), "min": float(curve.min()), "slope_per_100_frames": slope_per_100(curve),
            "reference_frames": ref_frames}


def json_floats(xs) -> list[float | None]:
    """Floats for JSON (NaN / inf → None)."""
    return [float(x) if math.isfinite(x) else None for x in np.asarray(xs, dtype=np.float64).tolist()]
