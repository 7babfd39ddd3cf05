"""Control video for VACE: each chunk's frames turned into a control signal on the device, batched across streams.

Kinds (``CONTROL_KINDS``):

* ``edges``: Canny edges in torch (kornia and OpenCV are not dependencies): grey → Gaussian blur (σ = 1) → Sobel
  gradients → non-maximum suppression along the gradient direction (4 bins) → double threshold (0.1 / 0.2 of
  the gradient range) with hysteresis by repeated 3×3 dilation of the strong edges inside the weak ones;
* ``depth``: Depth Anything V2 small (transformers' ``DepthAnythingForDepthEstimation``; the weights under
  ``MODEL/control/depth-anything-v2-small/``, ``wanstream download depth-anything``), relative depth normalised per
  frame to [0, 1];
* ``flow``: torchvision RAFT (large, the file ``wanstream download raft`` fetches, under ``MODEL/eval/``) from the
  previous frame to each frame, shown as torchvision's flow colour image;
* ``pose``: torchvision's Keypoint R-CNN (ResNet-50 FPN, COCO's 17 keypoints; the file ``wanstream download pose``
  fetches, under ``MODEL/control/``) at the frame's own size; up to 8 people found with a score ≥ 0.7 drawn as a
  skeleton on black (torchvision's ``draw_keypoints``, which draws on the host);
* ``video``: frames of a control video the user gives (framed like the stream's frames; its last frame repeats once
  it ends).

A control frame is ``[-1, 1]`` RGB like the input; the stream's control VAE state encodes it (a stream of its own:
the streaming encoder's caches), so the control latents of a chunk line up with its latents. Switching kind starts
a fresh control state; a fresh state mid-stream encodes ``[first frame ‖ frames]`` (the encoder's first call takes
1 + 4k frames) and keeps the last latents. The timer records ``control`` (the preprocessor) and
``control_encode`` (its VAE encode).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

CONTROL_KINDS = ("none", "edges", "depth", "flow", "pose", "video")
DEPTH_DIR = Path("control") / "depth-anything-v2-small"
RAFT_MIN_SIDE = 128


class ControlModelMissing(RuntimeError):
    """A preprocessor's weights are not on disk (the message names the ``wanstream download`` that fetches them)."""


def check_kind(kind) -> str:
    if kind not in CONTROL_KINDS:
        raise ValueError(f"control must be one of {', '.join(CONTROL_KINDS)}, got {kind!r}")
    return kind


# ------------------------------------------------------------------------------------------------ edges
def _gaussian(x: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    r = max(1, int(round(2 * sigma)))
    t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-t * t / (2 * sigma * sigma))
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))


def canny(pixels: torch.Tensor, low: float = 0.1, high: float = 0.2, hysteresis: int = 8) -> torch.Tensor:
    """Edges of ``[N, 3, H, W]`` frames in [-1, 1] → ``[N, 1, H, W]`` in {0, 1} (see the module docstring)."""
    x = pixels.float()
    grey = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3] + 1) / 2
    g = _gaussian(grey)
    sx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=x.device)
    gp = F.pad(g, (1, 1, 1, 1), mode="replicate")
    dx = F.conv2d(gp, sx.view(1, 1, 3, 3))
    dy = F.conv2d(gp, sx.t().contiguous().view(1, 1, 3, 3))
    mag = torch.sqrt(dx * dx + dy * dy)
    angle = torch.rad2deg(torch.atan2(dy, dx)) % 180
    bins = ((angle + 22.5) // 45).long() % 4                             # 0°, 45°, 90°, 135°
    mp = F.pad(mag, (1, 1, 1, 1))
    h, w = mag.shape[-2:]

    def shifted(oy, ox):
        return mp[..., 1 + oy: 1 + oy + h, 1 + ox: 1 + ox + w]
    offsets = [((0, 1), (0, -1)), ((1, 1), (-1, -1)), ((1, 0), (-1, 0)), ((1, -1), (-1, 1))]
    keep = torch.zeros_like(mag, dtype=torch.bool)
    for b, (p, q) in enumerate(offsets):
        keep |= (bins == b) & (mag >= shifted(*p)) & (mag >= shifted(*q))
    mag = mag * keep
    top = mag.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-6)
    strong = mag >= high * top
    weak = mag >= low * top
    edges = strong.float()
    for _ in range(hysteresis):
        edges = F.max_pool2d(edges, 3, 1, 1) * weak
    return edges


# ------------------------------------------------------------------------------------------------ models
def _models_root(model) -> Path | None:
    paths = getattr(model, "paths", None)
    return None if paths is None else Path(paths.root)


def load_depth(folder: Path, device, dtype):
    """Depth Anything V2 small from a transformers folder; missing → :class:`ControlModelMissing`."""
    if not (Path(folder) / "config.json").is_file():
        raise ControlModelMissing(f"depth control needs Depth Anything V2 small in {folder} (`wanstream download "
                                  f"depth-anything --dir MODEL`)")
    from transformers import DepthAnythingForDepthEstimation
    net = DepthAnythingForDepthEstimation.from_pretrained(folder, local_files_only=True)
    return net.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_raft(path: Path, device):
    """torchvision RAFT (large, or small for a file named ``raft_small*``) from its published state-dict file."""
    from torchvision.models.optical_flow import raft_large, raft_small
    if not Path(path).is_file():
        raise ControlModelMissing(f"flow control needs the RAFT weights {path} (`wanstream download raft --dir "
                                  f"MODEL`)")
    net = (raft_small if Path(path).name.startswith("raft_small") else raft_large)(weights=None)
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return net.to(device).eval().requires_grad_(False)


# COCO's skeleton (keypoint pairs) for drawing the pose control
COCO_SKELETON = [(0, 1), (0, 2), (1, 3), (2, 4), (5, 6), (5, 7), (7, 9), (6, 8), (8, 10), (5, 11), (6, 12),
                 (11, 12), (11, 13), (13, 15), (12, 14), (14, 16)]
POSE_SCORE = 0.7
POSE_PEOPLE = 8              # people drawn per frame at most (Keypoint R-CNN's detections per image)


def pose_file_name() -> str:
    from torchvision.models.detection import KeypointRCNN_ResNet50_FPN_Weights
    return KeypointRCNN_ResNet50_FPN_Weights.COCO_V1.url.rsplit("/", 1)[1]


def load_pose(path: Path, device):
    """torchvision's Keypoint R-CNN from its published state-dict file; missing → :class:`ControlModelMissing`."""
    from torchvision.models.detection import keypointrcnn_resnet50_fpn
    if not Path(path).is_file():
        raise ControlModelMissing(f"pose control needs the Keypoint R-CNN weights {path} (`wanstream download pose "
                                  f"--dir MODEL`)")
    net = keypointrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    net.roi_heads.detections_per_img = POSE_PEOPLE
    return net.to(device).eval().requires_grad_(False)


def raft_file_name() -> str:
    from torchvision.models.optical_flow import Raft_Large_Weights
    return Raft_Large_Weights.C_T_SKHT_V2.url.rsplit("/", 1)[1]


class Preprocessors:
    """The control preprocessors of an engine's model, each loaded on first use (or injected: tests)."""

    def __init__(self, model, depth=None, flow=None, flow_updates: int = 12, pose=None):
        self.model = model
        self._pose = pose
        self.flow_updates = flow_updates            # RAFT's refinement iterations (torchvision's default: 12)
        self.device, self.dtype = model.device, model.dtype
        self._depth, self._flow = depth, flow

    def depth_net(self):
        if self._depth is None:
            root = _models_root(self.model)
            if root is None:
                raise ControlModelMissing("depth control needs Depth Anything V2 small (`wanstream download "
                                          "depth-anything`)")
            self._depth = load_depth(root / DEPTH_DIR, self.device, self.dtype)
        return self._depth

    def flow_net(self):
        if self._flow is None:
            root = _models_root(self.model)
            if root is None:
                raise ControlModelMissing("flow control needs the RAFT weights (`wanstream download raft`)")
            self._flow = load_raft(root / "eval" / raft_file_name(), self.device)
        return self._flow

    def pose_net(self):
        if self._pose is None:
            root = _models_root(self.model)
            if root is None:
                raise ControlModelMissing("pose control needs the Keypoint R-CNN weights (`wanstream download pose`)")
            self._pose = load_pose(root / "control" / pose_file_name(), self.device)
        return self._pose

    def check(self, kind: str) -> None:
        """Load what ``kind`` needs now (a missing model is refused when the kind is set, not mid-stream)."""
        if kind == "depth":
            self.depth_net()
        elif kind == "flow":
            self.flow_net()
        elif kind == "pose":
            self.pose_net()

    @torch.no_grad()
    def run(self, kind: str, pixels: list[torch.Tensor], prev: list[torch.Tensor | None]) -> list[torch.Tensor]:
        """Control frames of several streams' chunks in one batch: ``pixels[i] [T_i, 3, H, W]`` in [-1, 1] →
        ``[T_i, 3, H, W]`` in [-1, 1]; ``prev[i]`` (flow): the frame ``[3, H, W]`` before stream i's chunk (None: its
        first frame, a still start)."""
        x = torch.cat(pixels)
        if kind == "edges":
            out = canny(x).expand(-1, 3, -1, -1) * 2 - 1
        elif kind == "depth":
            out = self._depth_frames(x)
        elif kind == "flow":
            before = torch.cat([torch.cat([(p[:1] if q is None else q[None]), p[:-1]]) for p, q in zip(pixels, prev)])
            out = self._flow_frames(before, x)
        elif kind == "pose":
            out = self._pose_frames(x)
        else:
            raise ValueError(f"no preprocessor for control {kind!r}")
        return list(out.to(x.dtype).split([p.shape[0] for p in pixels]))

    def _depth_frames(self, pixels: torch.Tensor) -> torch.Tensor:
        net = self.depth_net()
        h, w = pixels.shape[-2:]
        ph, pw = max(14, h // 14 * 14), max(14, w // 14 * 14)
        x = F.interpolate((pixels.float() + 1) / 2, size=(ph, pw), mode="bilinear", align_corners=False)
        mean = torch.tensor([0.485, 0.456, 0.406], device=x.device).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225], device=x.device).view(1, 3, 1, 1)
        d = net(pixel_values=((x - mean) / std).to(self.dtype)).predicted_depth.float()[:, None]
        d = F.interpolate(d, size=(h, w), mode="bilinear", align_corners=False)
        lo = d.amin(dim=(-2, -1), keepdim=True)
        hi = d.amax(dim=(-2, -1), keepdim=True)
        d = (d - lo) / (hi - lo).clamp_min(1e-6)
        return (d * 2 - 1).expand(-1, 3, -1, -1)

    def _pose_frames(self, x: torch.Tensor) -> torch.Tensor:
        """Skeletons of the people in each frame on black (Keypoint R-CNN at the frame's size)."""
        from torchvision.utils import draw_keypoints
        net = self.pose_net()
        h, w = x.shape[-2:]
        net.transform.min_size, net.transform.max_size = (min(h, w),), max(h, w)
        found = net([f for f in ((x.float() + 1) / 2).clamp(0, 1)])
        out = []
        for det in found:
            canvas = torch.zeros(3, h, w, dtype=torch.uint8)
            keep = det["scores"] >= POSE_SCORE
            if keep.any():
                kp = det["keypoints"][keep].cpu()
                canvas = draw_keypoints(canvas, kp[..., :2], connectivity=COCO_SKELETON, colors="white", radius=2,
                                        width=2, visibility=kp[..., 2] > 0)
            out.append(canvas)
        return (torch.stack(out).to(x.device).float() / 127.5 - 1)

    def _flow_frames(self, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
        """Flow of each pair ``before[i] → after[i]`` as a colour image (RAFT runs at ≥ 128 px per side)."""
        from torchvision.utils import flow_to_image
        net = self.flow_net()
        h, w = after.shape[-2:]
        scale = max(1.0, RAFT_MIN_SIDE / min(h, w))
        sh, sw = int(-(-h * scale // 8) * 8), int(-(-w * scale // 8) * 8)

        def sized(t):
            return F.interpolate(t.float(), size=(sh, sw), mode="bilinear", align_corners=False)
        flow = net(sized(before), sized(after), num_flow_updates=self.flow_updates)[-1]
        flow = F.interpolate(flow, size=(h, w), mode="bilinear", align_corners=False)
        flow = flow * torch.tensor([w / sw, h / sh], device=flow.device).view(1, 2, 1, 1)
        # flow_to_image scales by the largest flow of its whole batch: scale each frame by its own first, so a
        # stream's control does not depend on the streams batched with it
        norm = flow.square().sum(1, keepdim=True).sqrt().amax(dim=(-2, -1), keepdim=True)
        return flow_to_image(flow / (norm + 1e-6)).float() / 127.5 - 1


# ------------------------------------------------------------------------------------------------ per stream
@dataclass
class StreamControl:
    """A stream's control: its kind, the control VAE state, the previous input frame (flow), a control video."""

    kind: str = "none"
    enc_state: object = None
    prev: torch.Tensor | None = None
    video: Iterator | None = None
    last_video_frame: object = None
    preview: torch.Tensor | None = None         # the newest control frame [3, H, W] (server preview)

    def switch(self, kind: str, video: Iterator | None = None) -> None:
        self.kind = kind
        self.enc_state = None
        self.video = video if kind == "video" else None
        self.last_video_frame = None

    def video_frames(self, n: int, width: int, height: int, fit: str, device, dtype) -> torch.Tensor:
        """The next ``n`` frames of the control video ``[n, 3, H, W]`` in [-1, 1] (its last frame repeats)."""
        import numpy as np

        from wanstream.engine.transfer import upload_frames
        from wanstream.io.framing import fit_frames
        out = []
        for _ in range(n):
            frame = next(self.video, None) if self.video is not None else None
            if frame is None:
                frame = self.last_video_frame
            if frame is None:
                frame = np.full((height, width, 3), 128, np.uint8)
            self.last_video_frame = frame
            arr = np.asarray(frame)
            if arr.shape[:2] != (height, width):
                arr = fit_frames(arr, width, height, fit)
            out.append(arr)
        return upload_frames(np.stack(out), device, dtype)


def encode_controls(vae, items: list, batch: bool) -> list:
    """Control frames of several streams → their latents: ``items`` are ``(control, frames [T, 3, H, W],
    latent_frames)``; each stream's control VAE state encodes its frames (a fresh state mid-stream: ``[first frame ‖
    frames]``, the last latents kept). With ``batch`` the streams at the same phase and size share one
    ``encode_many`` call (as the engine's own encode, ``engine/codec.py``); a failing shared call is retried stream by
    stream. Returns per item ``[1, latent_frames, z, h, w]`` or the exception of that stream."""
    prepared = []
    for ctrl, frames, t in items:
        if ctrl.enc_state is None:
            ctrl.enc_state = vae.new_state()
            if frames.shape[0] % 4 == 0:
                frames = torch.cat([frames[:1], frames])
        prepared.append((ctrl, frames, t))
    groups: dict = {}
    for i, (ctrl, frames, _) in enumerate(prepared):
        key = (ctrl.enc_state.first_encode, tuple(frames.shape)) if batch else (i,)
        groups.setdefault(key, []).append(i)
    out: list = [None] * len(items)
    for members in groups.values():
        if len(members) > 1:
            try:
                z = vae.encode_many([prepared[i][0].enc_state for i in members],
                                    torch.stack([prepared[i][1] for i in members]))
                for row, i in enumerate(members):
                    out[i] = z[row: row + 1, -prepared[i][2]:]
                continue
            except Exception:  # noqa: BLE001 - find the stream that fails: one by one
                pass
        for i in members:
            ctrl, frames, t = prepared[i]
            try:
                out[i] = vae.encode(ctrl.enc_state, frames[None])[:, -t:]
            except Exception as exc:  # noqa: BLE001 - reported for that stream only
                out[i] = exc
    return out
