"""``wanstream download``: fetch the released files with huggingface_hub into the layout the loader reads."""

from __future__ import annotations

from pathlib import Path

from wanstream.core.backbones import BACKBONES
from wanstream.core.config import CAUSAL_FOLDER, HUB_CAUSAL, HUB_VACE, HUB_WAN, VACE_FOLDER, WAN_FOLDER

WAN_FILES = ["config.json", "diffusion_pytorch_model*", "Wan2.1_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth",
             "google/umt5-xxl/*"]
# name → (Wan preset, backbone)
MODELS = {"sdv2-1.3b": ("1.3b", "streamdiffusionv2"), "sdv2-14b": ("14b", "streamdiffusionv2"),
          "self-forcing-1.3b": ("1.3b", "self-forcing"), "longlive-1.3b": ("1.3b", "longlive")}


def download(name: str, root: Path) -> Path:
    """``name`` is one of :data:`MODELS` (the Wan 2.1 folder and the backbone's generator, each in its released
    layout under ``root``) or an evaluation model (``clip``, ``raft``: into ``root/eval/``). Raises RuntimeError with
    one line saying what to do when the hub cannot be reached (at once: no retries)."""
    if name in ("clip", "raft"):
        from wanstream.eval.models import download_eval_model
        return download_eval_model(name, root)
    if name == "depth-anything":
        return download_depth(Path(root))
    if name == "pose":
        return download_pose(Path(root))
    if name.startswith("vace-"):
        return download_vace(name.removeprefix("vace-"), Path(root))
    preset, backbone = MODELS[name]
    ck = BACKBONES[backbone].checkpoint
    from huggingface_hub import hf_hub_download, snapshot_download

    from wanstream.models.hub import check_hub, hub_failure
    root = Path(root)
    wan = f"wan_models/{WAN_FOLDER[preset]}/"
    if ck.generator is None:
        gen = f"ckpts/{CAUSAL_FOLDER[preset]}/model.pt"
    else:
        gen = ", ".join(f"{ck.hub_dir}/{f}" if ck.hub_dir else f for f in ck.hub_files)
    by_hand = f"copy the files into {root} by hand (layout: {wan}, {gen})"
    check_hub(HUB_WAN[preset], name, by_hand)
    try:
        snapshot_download(HUB_WAN[preset], local_dir=root / wan, allow_patterns=WAN_FILES)
        if ck.generator is None:
            hf_hub_download(HUB_CAUSAL, f"{CAUSAL_FOLDER[preset]}/model.pt", local_dir=root / "ckpts")
        else:
            for file in ck.hub_files:
                hf_hub_download(ck.hub, file, local_dir=root / ck.hub_dir if ck.hub_dir else root)
    except Exception as exc:  # noqa: BLE001 - the network went away midway: one line (wanstream.models.hub)
        raise hub_failure(exc, name, by_hand) from None
    return root


def download_vace(preset: str, root: Path) -> Path:
    """The released Wan2.1-VACE folder (config + weights) into ``root/wan_models/Wan2.1-VACE-*/`` (models/vace.py
    reads only its ``vace_*`` tensors beside the backbone's generator)."""
    from huggingface_hub import snapshot_download

    from wanstream.models.hub import check_hub, hub_failure
    name = f"vace-{preset}"
    folder = f"wan_models/{VACE_FOLDER[preset]}/"
    by_hand = f"copy config.json and diffusion_pytorch_model*.safetensors of {HUB_VACE[preset]} into {root / folder}"
    check_hub(HUB_VACE[preset], name, by_hand)
    try:
        snapshot_download(HUB_VACE[preset], local_dir=root / folder,
                          allow_patterns=["config.json", "diffusion_pytorch_model*"])
    except Exception as exc:  # noqa: BLE001 - the network went away midway: one line (wanstream.models.hub)
        raise hub_failure(exc, name, by_hand) from None
    return root


DEPTH_HUB = "depth-anything/Depth-Anything-V2-Small-hf"


def download_depth(root: Path) -> Path:
    """Depth Anything V2 small (transformers layout) into ``root/control/depth-anything-v2-small/`` (the depth
    control of engine/control.py)."""
    from huggingface_hub import snapshot_download

    from wanstream.engine.control import DEPTH_DIR
    from wanstream.models.hub import check_hub, hub_failure
    by_hand = f"copy the files of {DEPTH_HUB} into {root / DEPTH_DIR}"
    check_hub(DEPTH_HUB, "depth-anything", by_hand)
    try:
        snapshot_download(DEPTH_HUB, local_dir=root / DEPTH_DIR, allow_patterns=["*.json", "*.safetensors"])
    except Exception as exc:  # noqa: BLE001
        raise hub_failure(exc, "depth-anything", by_hand) from None
    return root


def download_pose(root: Path) -> Path:
    """torchvision's Keypoint R-CNN weights file into ``root/control/`` (the pose control of engine/control.py)."""
    import torch
    from torchvision.models.detection import KeypointRCNN_ResNet50_FPN_Weights

    from wanstream.engine.control import pose_file_name
    url = KeypointRCNN_ResNet50_FPN_Weights.COCO_V1.url
    target = root / "control" / pose_file_name()
    if target.is_file():
        return root
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    try:
        torch.hub.download_url_to_file(url, str(part), progress=False)
        part.replace(target)
    except Exception as exc:  # noqa: BLE001
        part.unlink(missing_ok=True)
        raise RuntimeError(f"cannot download {url} ({type(exc).__name__}: {exc}); copy that file to {target} by "
                           f"hand") from None
    return root
