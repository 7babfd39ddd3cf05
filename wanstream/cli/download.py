"""``wanstream download``: fetch the released files with huggingface_hub into the layout the loader reads."""

from __future__ import annotations

from pathlib import Path

from wanstream.core.config import CAUSAL_FOLDER, HUB_CAUSAL, HUB_WAN, WAN_FOLDER

WAN_FILES = ["config.json", "diffusion_pytorch_model*", "Wan2.1_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth",
             "google/umt5-xxl/*"]


def download(name: str, root: Path) -> Path:
    """``name`` is ``sdv2-1.3b``, ``sdv2-14b`` or an evaluation model (``clip``, ``raft``: into ``root/eval/``).
    Raises RuntimeError with a clear message when offline."""
    if name in ("clip", "raft"):
        from wanstream.eval.models import download_eval_model
        return download_eval_model(name, root)
    preset = {"sdv2-1.3b": "1.3b", "sdv2-14b": "14b"}[name]
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    root = Path(root)
    try:
        snapshot_download(HUB_WAN[preset], local_dir=root / "wan_models" / WAN_FOLDER[preset],
                          allow_patterns=WAN_FILES)
        hf_hub_download(HUB_CAUSAL, f"{CAUSAL_FOLDER[preset]}/model.pt", local_dir=root / "ckpts")
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise RuntimeError(f"cannot reach the Hugging Face hub to download {name} ({type(exc).__name__}). "
                           f"Without network access, copy the files into {root} by hand "
                           f"(layout: wan_models/{WAN_FOLDER[preset]}/, ckpts/{CAUSAL_FOLDER[preset]}/model.pt)") from exc
    return root
