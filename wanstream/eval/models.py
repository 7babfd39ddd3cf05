"""Where the evaluation models live, how they are found offline and how ``wanstream download`` fetches them.

* CLIP ViT-B/32, hub id ``openai/clip-vit-base-patch32`` (transformers layout: ``config.json``, the weights,
  ``preprocessor_config.json`` and the tokenizer files), downloaded to ``MODELS/eval/clip-vit-base-patch32/``.
* RAFT (torchvision ``raft_large``, weights ``Raft_Large_Weights.C_T_SKHT_V2``), the state-dict file exactly as
  torchvision publishes it, downloaded to ``MODELS/eval/raft_large_C_T_SKHT_V2-ff5fadd5.pth``.

Finding a model never touches the network. The search order is: an explicit path, ``MODELS/eval/...``, then the
caches other tools fill (the Hugging Face hub cache for CLIP, torch hub's ``checkpoints/`` for RAFT). A model
found nowhere raises :class:`MissingModelError`, whose message says how to get it.
"""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

from wanstream.core.errors import CheckpointError

CLIP_HUB_ID = "openai/clip-vit-base-patch32"
CLIP_DIR = "clip-vit-base-patch32"
CLIP_FILES = ["config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "vocab.json", "merges.txt"]
CLIP_WEIGHTS = ["model.safetensors", "pytorch_model.bin"]   # the first one the repo has is fetched
EVAL_DIR = "eval"
DEFAULT_MODELS = Path("models")
EVAL_MODELS = ("clip", "raft")
DOWNLOAD_TIMEOUT_S = 10.0         # per connect / read of the RAFT download (a network that says nothing fails)


class MissingModelError(CheckpointError):
    """An evaluation model is not on disk (the message says how to get it)."""


def raft_weights(arch: str = "large"):
    """torchvision's weights enum entry used for ``arch`` (``large`` → ``C_T_SKHT_V2``, ``small`` → ``C_T_V2``)."""
    from torchvision.models.optical_flow import Raft_Large_Weights, Raft_Small_Weights
    if arch not in ("large", "small"):
        raise ValueError(f"RAFT architecture must be 'large' or 'small', got {arch!r}")
    return Raft_Large_Weights.C_T_SKHT_V2 if arch == "large" else Raft_Small_Weights.C_T_V2


def raft_file_name(arch: str = "large") -> str:
    """The file name torchvision publishes the weights under, e.g. ``raft_large_C_T_SKHT_V2-ff5fadd5.pth``."""
    return raft_weights(arch).url.rsplit("/", 1)[1]


def raft_arch_of(path: Path) -> str:
    """``small`` for files named ``raft_small*`` (torchvision's naming), else ``large``."""
    return "small" if Path(path).name.startswith("raft_small") else "large"


def _torch_hub_file(name: str) -> Path:
    import torch.hub
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def _clip_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any((folder / w).is_file() for w in CLIP_WEIGHTS)


def _hub_cache_clip() -> Path | None:
    """The CLIP snapshot in the local Hugging Face cache, if another tool downloaded it (no network)."""
    try:
        from huggingface_hub import snapshot_download
        path = Path(snapshot_download(CLIP_HUB_ID, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure means "not cached"
        return None
    return path if _clip_complete(path) else None


def _copy_hint(name: str, target: Path) -> str:
    """Where to copy a model's files by hand."""
    if name == "clip":
        return (f"copy the files of {CLIP_HUB_ID} (config.json, model.safetensors or pytorch_model.bin, "
                f"preprocessor_config.json, tokenizer files) into {target}")
    return f"copy {raft_weights().url} to {target}"


def _how_to_get(name: str, target: Path, downloading: bool = False) -> str:
    """How to get a missing model: the download command (unless that is what failed), or where to copy it."""
    if downloading:
        return f"Without network access, {_copy_hint(name, target)}"
    host, flag = ("huggingface.co", "--clip DIR") if name == "clip" else ("download.pytorch.org", "--raft FILE")
    return (f"run `wanstream download {name} --dir {target.parent.parent}` (needs access to {host}), or "
            f"{_copy_hint(name, target)}, or pass {flag}")


def find_clip(path: str | Path | None = None, models_dir: str | Path = DEFAULT_MODELS) -> tuple[Path, str]:
    """``(folder, model id)`` of a CLIP model in the transformers layout, found without network access.

    The id is the hub id when the folder is the downloaded ``openai/clip-vit-base-patch32`` (in ``models_dir``
    or the hub cache), else ``local:<folder>``.
    """
    if path is not None:
        folder = Path(path).resolve()
        if not _clip_complete(folder):
            raise MissingModelError(f"{folder}: not a CLIP model folder (needs config.json and model.safetensors "
                                    f"or pytorch_model.bin)")
        return folder, f"local:{folder}"
    target = Path(models_dir) / EVAL_DIR / CLIP_DIR
    if _clip_complete(target):
        return target, CLIP_HUB_ID
    cached = _hub_cache_clip()
    if cached is not None:
        return cached, CLIP_HUB_ID
    raise MissingModelError(f"CLIP model {CLIP_HUB_ID} not found in {target} nor in the Hugging Face cache; "
                            + _how_to_get("clip", target))


def find_raft(path: str | Path | None = None, models_dir: str | Path = DEFAULT_MODELS) -> tuple[Path, str]:
    """``(file, model id)`` of RAFT weights (a torchvision state dict), found without network access."""
    if path is not None:
        file = Path(path).resolve()
        if not file.is_file():
            raise MissingModelError(f"{file}: RAFT weights file not found")
        return file, f"local:{file}"
    name = raft_file_name()
    target = Path(models_dir) / EVAL_DIR / name
    for candidate in (target, _torch_hub_file(name)):
        if candidate.is_file():
            return candidate, f"torchvision/raft_large:{raft_weights().name}"
    raise MissingModelError(f"RAFT weights {name} not found in {target.parent} nor in torch hub's cache "
                            f"({_torch_hub_file(name).parent}); " + _how_to_get("raft", target))


# ---------------------------------------------------------------------------------------------- download
def download_eval_model(name: str, root: str | Path = DEFAULT_MODELS, log=print) -> Path:
    """``wanstream download clip|raft``: fetch into ``root/eval/`` unless it is already on disk (offline first)."""
    root = Path(root)
    if name == "clip":
        return _download_clip(root / EVAL_DIR / CLIP_DIR, log)
    if name == "raft":
        return _download_raft(root / EVAL_DIR / raft_file_name(), log)
    raise ValueError(f"unknown evaluation model {name!r}; choose from {', '.join(EVAL_MODELS)}")


def _download_clip(target: Path, log) -> Path:
    if _clip_complete(target):
        log(f"download: {CLIP_HUB_ID} already in {target}")
        return target
    cached = _hub_cache_clip()
    if cached is not None:
        log(f"download: copying {CLIP_HUB_ID} from the Hugging Face cache ({cached}) to {target}")
        shutil.copytree(cached, target, dirs_exist_ok=True)
        return target
    from huggingface_hub import snapshot_download

    from wanstream.models.hub import check_hub, hub_failure
    by_hand = _copy_hint("clip", target)
    files = check_hub(CLIP_HUB_ID, CLIP_HUB_ID, by_hand)
    weights = next((w for w in CLIP_WEIGHTS if w in files), None)
    if weights is None:
        raise RuntimeError(f"{CLIP_HUB_ID} on the hub has none of {CLIP_WEIGHTS}")
    log(f"download: {CLIP_HUB_ID} ({weights}) → {target}")
    try:
        snapshot_download(CLIP_HUB_ID, local_dir=target, allow_patterns=[*CLIP_FILES, weights])
    except Exception as exc:  # noqa: BLE001 - the network went away midway: one line (wanstream.models.hub)
        raise hub_failure(exc, CLIP_HUB_ID, by_hand) from None
    return target


def _download_raft(target: Path, log) -> Path:
    if target.is_file():
        log(f"download: RAFT weights already in {target}")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    cached = _torch_hub_file(target.name)
    if cached.is_file():
        log(f"download: copying RAFT weights from torch hub's cache ({cached}) to {target}")
        shutil.copyfile(cached, target)
        return target
    import torch.hub
    url = raft_weights().url
    hash_prefix = target.stem.rsplit("-", 1)[1]      # torchvision names files <name>-<sha256 prefix>.pth
    log(f"download: {url} → {target}")
    partial = target.with_name(target.name + ".part")
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)     # torch.hub's urlopen has no timeout: a silent network hangs
    try:
        torch.hub.download_url_to_file(url, str(partial), hash_prefix=hash_prefix, progress=True)
    except (OSError, RuntimeError) as exc:       # URLError and timeouts are OSErrors; a hash mismatch a RuntimeError
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"cannot download {url} ({type(exc).__name__}: {exc}). "
                           + _how_to_get("raft", target, downloading=True)) from None
    except BaseException:                        # Ctrl-C: no partial file left behind
        partial.unlink(missing_ok=True)
        raise
    finally:
        socket.setdefaulttimeout(previous)
    partial.replace(target)
    return target
