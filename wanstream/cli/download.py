"""``wanstream download``: fetch the released files with huggingface_hub into the layout the loader reads."""

from __future__ import annotations

from pathlib import Path

from wanstream.core.config import CAUSAL_FOLDER, HUB_CAUSAL, HUB_WAN, WAN_FOLDER

WAN_FILES = ["config.json", "diffusion_pytorch_model*", "Wan2.1_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth",
             "google/umt5-xxl/*"]


def download(name: str, root: Path) -> Path:
    """``name`` is ``sdv2-1.3b``, ``sdv2-14b`` or an evaluation model (``clip``, ``raft``: into ``root/eval/``).
    Raises RuntimeError with one line saying what to do when the hub cannot be reached (at once: no retries)."""
    if name in ("clip", "raft"):
        from wanstream.eval.models import download_eval_model
        return download_eval_model(name, root)
    preset = {"sdv2-1.3b": "1.3b", "sdv2-14b": "14b"}[name]
    from huggingface_hub import hf_hub_download, snapshot_download

    from wanstream.models.hub import check_hub, hub_failure
    root = Path(root)
    by_hand = (f"copy the files into {root} by hand (layout: wan_models/{WAN_FOLDER[preset]}/, "
               f"ckpts/{CAUSAL_FOLDER[preset]}/model.pt)")
    check_hub(HUB_WAN[preset], name, by_hand)
    try:
        snapshot_download(HUB_WAN[preset], local_dir=root / "wan_models" / WAN_FOLDER[preset],
                          allow_patterns=WAN_FILES)
        hf_hub_download(HUB_CAUSAL, f"{CAUSAL_FOLDER[preset]}/model.pt", local_dir=root / "ckpts")
    except Exception as exc:  # noqa: BLE001 - the network went away midway: one line (wanstream.models.hub)
        raise hub_failure(exc, name, by_hand) from None
    return root
