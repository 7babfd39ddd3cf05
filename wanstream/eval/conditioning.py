"""Scores of VACE conditioning (``wanstream eval --reference IMG --control-adherence``): how much the output looks
like the reference image, and how well it keeps the input's structure (edges, depth).

Definitions (versioned, written into every result like the other metrics, see docs/eval.md):

* ``reference_similarity/1``: mean over output frames of 100 · cos(CLIP image embedding of the frame, CLIP image
  embedding of the reference image) — the reference framed to the output size first (centre crop), as the stream
  saw it;
* ``edge_adherence/1``: F1 of the output's Canny edges against the input's (``engine.control.canny``, the same
  edges the ``edges`` control gives the model), with a tolerance of one pixel: precision = output edge pixels within
  1 px of an input edge / output edge pixels, recall = the converse; frames where both have no edge are left out;
* ``depth_adherence/1``: Pearson correlation of Depth Anything V2's relative depth of the input and output frame,
  averaged over frames (scale- and shift-invariant; 1 = the same depth ordering and spacing).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

DEFINITIONS: dict[str, dict] = {
    "reference_similarity": {
        "version": "reference_similarity/1", "model": "clip", "higher_is_better": True, "unit": "cosine x 100",
        "text": "Reference similarity: mean over output frames of 100 * cos(CLIP image embedding of the frame, CLIP "
                "image embedding of the reference image centre-cropped to the output's aspect). Not in the paper.",
    },
    "edge_adherence": {
        "version": "edge_adherence/1", "model": None, "higher_is_better": True, "unit": "F1, 0-1",
        "text": "Edge adherence: per frame, the F1 of the output's Canny edges (wanstream's torch Canny: blur sigma "
                "1, thresholds 0.1 / 0.2 of the gradient range) against the input's with a 1-pixel tolerance; the "
                "mean over frames with an edge in either. Not in the paper.",
    },
    "depth_adherence": {
        "version": "depth_adherence/1", "model": "depth", "higher_is_better": True, "unit": "Pearson r, -1-1",
        "text": "Depth adherence: per frame, the Pearson correlation of Depth Anything V2 (small) relative depth "
                "of the input and of the output frame at the output size; the mean over frames. Not in the paper.",
    },
}


def _pixels(frames: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` → float ``[N, 3, H, W]`` in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 127.5 - 1


def reference_similarity(clip, outputs: np.ndarray, reference: np.ndarray) -> tuple[float, list[float]]:
    from wanstream.io.framing import fit_frames
    ref = fit_frames(reference, outputs.shape[2], outputs.shape[1], "crop")
    images = clip.images(outputs)
    ref_emb = clip.images(ref[None])
    per_frame = (100 * images @ ref_emb[0]).float().cpu().numpy()
    return float(per_frame.mean()), per_frame.tolist()


def edge_f1(inputs: np.ndarray, outputs: np.ndarray, batch: int = 16) -> tuple[float | None, list[float | None]]:
    from wanstream.engine.control import canny
    per_frame: list[float | None] = []
    for s in range(0, len(outputs), batch):
        e_in = canny(_pixels(inputs[s: s + batch]))
        e_out = canny(_pixels(outputs[s: s + batch]))
        near_in = F.max_pool2d(e_in, 3, 1, 1)
        near_out = F.max_pool2d(e_out, 3, 1, 1)
        n_out, n_in = e_out.sum(dim=(1, 2, 3)), e_in.sum(dim=(1, 2, 3))
        precision = (e_out * near_in).sum(dim=(1, 2, 3)) / n_out.clamp_min(1)
        recall = (e_in * near_out).sum(dim=(1, 2, 3)) / n_in.clamp_min(1)
        f1 = 2 * precision * recall / (precision + recall).clamp_min(1e-9)
        for i in range(len(f1)):
            per_frame.append(None if n_out[i] == 0 and n_in[i] == 0 else float(f1[i]))
    values = [v for v in per_frame if v is not None]
    return (float(np.mean(values)) if values else None), per_frame


def depth_correlation(inputs: np.ndarray, outputs: np.ndarray, depth_net, batch: int = 8
                      ) -> tuple[float, list[float]]:
    """Pearson r of the relative depth of input and output frames (``depth_net``: transformers'
    ``DepthAnythingForDepthEstimation``)."""
    h, w = outputs.shape[1:3]
    ph, pw = max(14, h // 14 * 14), max(14, w // 14 * 14)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    device = next(depth_net.parameters()).device
    dtype = next(depth_net.parameters()).dtype

    def depth(frames: np.ndarray) -> torch.Tensor:
        x = F.interpolate((_pixels(frames) + 1) / 2, size=(ph, pw), mode="bilinear", align_corners=False)
        with torch.no_grad():
            d = depth_net(pixel_values=((x - mean) / std).to(device, dtype)).predicted_depth.float().cpu()
        return d.flatten(1)
    per_frame: list[float] = []
    for s in range(0, len(outputs), batch):
        a, b = depth(inputs[s: s + batch]), depth(outputs[s: s + batch])
        a = a - a.mean(1, keepdim=True)
        b = b - b.mean(1, keepdim=True)
        r = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-9)
        per_frame += r.tolist()
    return float(np.mean(per_frame)), per_frame


def conditioning_metrics(inputs: np.ndarray, outputs: np.ndarray, clip, *, reference: np.ndarray | None = None,
                         control: bool = False, depth_net=None, depth_id: str | None = None) -> tuple[dict, dict]:
    """``(metrics, definitions)`` to merge into an eval result (frames already aligned)."""
    metrics: dict = {}

    def metric(name: str, value, model_id, **series) -> dict:
        d = DEFINITIONS[name]
        return {"value": value, "definition": d["version"], "model": model_id,
                "higher_is_better": d["higher_is_better"], **series}
    if reference is not None:
        value, per_frame = reference_similarity(clip, outputs, reference)
        metrics["reference_similarity"] = metric("reference_similarity", value, clip.describe()["id"],
                                                 per_frame=per_frame)
    if control:
        value, per_frame = edge_f1(inputs, outputs)
        metrics["edge_adherence"] = metric("edge_adherence", value, "canny (torch)", per_frame=per_frame)
        if depth_net is not None:
            value, per_frame = depth_correlation(inputs, outputs, depth_net)
            metrics["depth_adherence"] = metric("depth_adherence", value, depth_id, per_frame=per_frame)
    used = {DEFINITIONS[k]["version"]: DEFINITIONS[k]["text"] for k in metrics}
    return metrics, used
