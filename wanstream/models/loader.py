"""Find and load a whole model (DiT + VAE + text encoder, optional TAEHV) from a folder.

Accepted roots:
* the released layouts of the three backbones (``core/backbones.py``), each with ``ROOT/wan_models/Wan2.1-T2V-*/``
  (Wan folder: config, VAE, text encoder) and its generator: StreamDiffusionV2 ``ROOT/ckpts/wan_causal_dmd_v2v*/
  model.pt``; Self-Forcing ``ROOT/checkpoints/self_forcing_dmd.pt`` (``generator_ema``); LongLive
  ``ROOT/longlive_models/models/longlive_base.pt`` (``generator``) + ``lora.pt`` (``generator_lora``, attached as
  an unmerged run-time LoRA); optional ``ROOT/ckpts/taew2_1.pth``. The layout found names the backbone; a root
  holding several generators needs ``backbone=`` (``--backbone``);
* a Wan 2.1 folder itself (``config.json`` + weights), with an optional ``model.pt`` beside it;
* a diffusers-layout repo (``transformer/``, ``vae/``), loaded with ``from_pretrained``.
When a causal ``model.pt`` is present it provides every DiT weight; the Wan folder then only gives
``config.json``, the VAE and the text encoder.

One loader for every holder of a model: a whole model on one device, or a pipeline stage's part (``part``: blocks
``[a, b)`` with or without the patch embedding / head, read selectively; VAE, text encoder and TAEHV each optional).
Owns :class:`ModelBundle`; imports ``core`` and ``models`` only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from wanstream.core.backbones import BACKBONES, SDV2, Backbone
from wanstream.core.backbones import backbone as get_backbone
from wanstream.core.errors import CheckpointError
from wanstream.models.checkpoints import (
    T5_FILE,
    TAEHV_FILE,
    TOKENIZER_DIR,
    VAE_FILE,
    DitPart,
    build_transformer,
    build_vae,
    causal_state_dict,
    diffusers_dit_config,
    drop_outside,
    read_dit_safetensors,
    read_torch_file,
    read_wan_config,
)
from wanstream.models.dit import CausalWanDiT
from wanstream.models.lora import LoRAError, LoRASet, LoRASpec, read_lora
from wanstream.models.quantize import check_quantize, quantize_dit
from wanstream.models.sampling import FlowMatchSampler
from wanstream.models.vae import StreamingVAE


@dataclass
class ModelPaths:
    root: Path
    wan_dir: Path | None
    causal: Path | None
    diffusers: bool = False
    taehv: Path | None = None
    backbone: Backbone = SDV2
    lora: Path | None = None                 # the backbone's own LoRA (LongLive)
    vace: Path | None = None                 # a Wan2.1-VACE folder beside the Wan folder (models/vace.py)

    @classmethod
    def discover(cls, root: str | Path, backbone: str | Backbone | None = None) -> "ModelPaths":
        """The files of a model root; ``backbone`` names which generator to load where the layout does not say (or
        says several)."""
        root = Path(root)
        named = None if backbone is None else get_backbone(backbone)
        if not root.is_dir():
            raise CheckpointError(f"{root}: model folder not found (run `wanstream download` or "
                                  f"`wanstream init-random`)")
        if (root / "transformer" / "config.json").is_file():
            return cls(root, None, None, diffusers=True, backbone=named or SDV2)
        taehv = next((p for p in (root / "ckpts" / TAEHV_FILE, root / TAEHV_FILE) if p.is_file()), None)
        if (root / "config.json").is_file():
            causal = root / "model.pt"
            return cls(root, root, causal if causal.is_file() else None, taehv=taehv, backbone=named or SDV2)
        wans = sorted(p for p in (root / "wan_models").glob("Wan2.1-T2V-*") if (p / "config.json").is_file())
        if not wans:
            raise CheckpointError(f"{root}: no Wan 2.1 model found (expected wan_models/Wan2.1-T2V-*/config.json, "
                                  f"a Wan folder with config.json, or a diffusers repo with transformer/)")
        if len(wans) > 1:
            raise CheckpointError(f"{root}: several Wan models found ({', '.join(p.name for p in wans)}); "
                                  f"pass one of those folders as --model")
        found = {b.name: g for b in BACKBONES.values() if b.variant_of is None and (g := generator_files(root, b))}
        if named is None and len(found) > 1:
            raise CheckpointError(f"{root}: generators of several backbones found ({', '.join(sorted(found))}); "
                                  f"pass --backbone to pick one")
        bb = named or (BACKBONES[next(iter(found))] if found else SDV2)
        gens = generator_files(root, bb)
        if len(gens) > 1:
            raise CheckpointError(f"{root}: several causal checkpoints found ({', '.join(str(p) for p in gens)})")
        if not gens and bb.checkpoint.generator is not None:
            raise CheckpointError(f"{root}: no {bb.title} generator (expected {root / bb.checkpoint.generator}; "
                                  f"`wanstream download {bb.name}-1.3b` or `wanstream init-random --backbone "
                                  f"{bb.name}`)")
        lora = None
        if bb.checkpoint.lora is not None:
            lora = root / bb.checkpoint.lora
            if not lora.is_file():
                raise CheckpointError(f"{root}: {bb.title} needs its LoRA {lora} (file not found)")
        vaces = sorted(p for p in (root / "wan_models").glob("Wan2.1-VACE-*") if (p / "config.json").is_file())
        if len(vaces) > 1:
            raise CheckpointError(f"{root}: several VACE models found ({', '.join(p.name for p in vaces)})")
        return cls(root, wans[0], gens[0] if gens else None, taehv=taehv, backbone=bb, lora=lora,
                   vace=vaces[0] if vaces else None)


def generator_files(root: Path, backbone: Backbone) -> list[Path]:
    """The generator checkpoints of ``backbone`` under a model root (StreamDiffusionV2: ``ckpts/wan_causal_dmd_*/
    model.pt``, one per preset; the others: their one released path)."""
    if backbone.checkpoint.generator is None:
        return sorted((root / "ckpts").glob("wan_causal_dmd_*/model.pt"))
    path = root / backbone.checkpoint.generator
    return [path] if path.is_file() else []


@dataclass
class ModelBundle:
    """Everything that turns tensors into tensors, shared by all streams (or a pipeline stage's share of it)."""

    dit: CausalWanDiT
    vae: StreamingVAE | None                 # None: loaded without (a pipeline stage that neither encodes nor decodes)
    text_encoder: object | None
    sampler: FlowMatchSampler
    device: torch.device
    dtype: torch.dtype
    paths: ModelPaths
    taehv: object | None = None
    backbone: Backbone = SDV2                # what the model is: step lists, context pass, cache policy, LoRA

    def prompt_embedding(self, prompt: str) -> torch.Tensor:
        """``[1, 512, 4096]`` embedding of a text prompt (cached per prompt by the encoder)."""
        if self.text_encoder is None:
            raise RuntimeError("this model was loaded without a text encoder; pass a prompt embedding instead")
        return self.text_encoder.encode([prompt])

    def tokens_per_frame(self, height: int, width: int) -> int:
        """DiT tokens of one latent frame at a pixel resolution (patch 2×2 on the 8× latent grid)."""
        pt, ph, pw = self.dit.patch_size
        return (height // 8 // ph) * (width // 8 // pw)

    def resident_bytes(self) -> int:
        """Bytes of the DiT weights materialised here (a part's meta tensors excluded)."""
        return sum(p.numel() * p.element_size() for p in self.dit.parameters() if p.device.type != "meta")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def num_layers_of(root: str | Path, backbone: str | Backbone | None = None) -> int:
    """DiT blocks of a model folder (from its config, nothing loaded)."""
    paths = ModelPaths.discover(root, backbone)
    if paths.diffusers:
        import json
        return int(json.loads((paths.root / "transformer" / "config.json").read_text())["num_layers"])
    return int(read_wan_config(paths.wan_dir)["num_layers"])


def load_model(root: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
               text_encoder: bool = True, taehv: bool = False, quantize: str | None = None,
               lora: Sequence[LoRASpec | str] = (), *, vae: bool = True, part: DitPart | None = None,
               backbone: str | Backbone | None = None, vace: bool | None = None) -> ModelBundle:
    """Load a model folder strictly (errors name the file and the culprit).

    ``backbone``: which generator of the root to load (default: the one its layout holds, ``ModelPaths.discover``);
    the bundle's ``backbone`` and sampler (the backbone's shift) follow it. LongLive's own LoRA is attached first,
    unmerged, at strength 1, named ``longlive``.

    ``quantize`` (``"int8"`` | ``"fp8"``, see :mod:`.quantize`) quantises the DiT's block linears after loading.
    ``lora``: LoRA files (``PATH[:strength]`` or :class:`~.lora.LoRASpec`) attached as run-time adapters
    (:mod:`.lora`; ``bundle.dit.lora``); a missing LoRA file is reported before the model loads.
    ``part``: only that part of the DiT (blocks ``[a, b)``, with or without the patch embedding and the head) is
    read and materialised, the rest stays on the meta device (a pipeline stage); ``vae``, ``text_encoder`` and
    ``taehv`` say which of the others to load.
    ``vace``: load the VACE modules of ``ROOT/wan_models/Wan2.1-VACE-*/`` beside the backbone (``bundle.dit.vace``):
    None when that folder is there (and the whole DiT loads), True required, False never.
    """
    paths = ModelPaths.discover(root, backbone)
    lora = [s if isinstance(s, LoRASpec) else LoRASpec.parse(s) for s in lora]
    if part is not None and (quantize is not None or lora or paths.lora is not None):
        raise ValueError("a part of the DiT loads without quantisation or LoRAs")
    missing = [str(s.path) for s in lora if not s.path.exists()]
    if missing:
        raise LoRAError(f"LoRA file not found: {', '.join(missing)}")
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    check_quantize(quantize, device)
    if paths.diffusers:
        transformer, vae_model = _load_diffusers(paths.root, device, dtype, part, vae)
    else:
        transformer = load_dit(paths, device, dtype, part)
        vae_model = load_vae(paths, device, dtype) if vae else None
    encoder = None
    if text_encoder:
        encoder = load_text_encoder_of(paths, device, dtype)
    tae = None
    if taehv:
        if paths.taehv is None:
            raise CheckpointError(f"{paths.root}: --taehv needs ckpts/{TAEHV_FILE}")
        from wanstream.models.taehv import load_taehv
        tae = load_taehv(paths.taehv, device=device, dtype=dtype)
    dit = CausalWanDiT(transformer)
    if vace or (vace is None and paths.vace is not None and part is None):
        if part is not None:
            raise ValueError("a part of the DiT loads without VACE (not on the multi-GPU ring yet)")
        if paths.vace is None:
            raise CheckpointError(f"{paths.root}: no VACE model (expected wan_models/Wan2.1-VACE-*/; `wanstream "
                                  f"download vace-1.3b` or `wanstream init-random --vace`)")
        from wanstream.models.vace import load_branch
        wan_cfg = read_wan_config(paths.wan_dir)
        dit.vace = load_branch(paths.vace, diffusers_dit_config(wan_cfg), wan_cfg, device, dtype)
    if quantize is not None:
        quantize_dit(dit, quantize)
    if lora or paths.lora is not None:
        own = [] if paths.lora is None else [(read_lora(paths.lora, dit, name=paths.backbone.name), 1.0)]
        specs = [s if isinstance(s, LoRASpec) else LoRASpec.parse(s) for s in lora]
        weights = own + [(read_lora(s.path, dit), s.strength) for s in specs]
        LoRASet([w for w, _ in weights], [d for _, d in weights]).attach(dit)
    return ModelBundle(dit, StreamingVAE(vae_model) if vae_model is not None else None, encoder,
                       FlowMatchSampler(paths.backbone.shift), device, dtype, paths, tae, paths.backbone)


def load_dit(paths: ModelPaths, device: torch.device, dtype: torch.dtype, part: DitPart | None = None):
    """The DiT of a released-layout model (causal ``model.pt`` when present, else the Wan folder's weights),
    strictly; with ``part`` only its tensors are read (``model.pt`` memory-mapped, safetensors per tensor) and
    materialised, the rest stays on the meta device."""
    config = diffusers_dit_config(read_wan_config(paths.wan_dir))
    wanted = None if part is None else part.wants
    if paths.causal is not None:
        ck = paths.backbone.checkpoint
        sd = causal_state_dict(paths.causal, wanted, ck.generator_keys, strict_key=ck.generator is not None)
        source = str(paths.causal)
    else:
        sd, source = read_dit_safetensors(paths.wan_dir, wanted), str(paths.wan_dir)
    return build_transformer(config, sd, source, device, dtype, part=part)


def load_vae(paths: ModelPaths, device: torch.device, dtype: torch.dtype):
    vae_path = paths.wan_dir / VAE_FILE
    return build_vae(read_torch_file(vae_path), str(vae_path), device, dtype)


def load_text_encoder_of(paths: ModelPaths, device: torch.device, dtype: torch.dtype):
    """The UMT5 text encoder of a released-layout model."""
    from wanstream.models.text_encoder import load_text_encoder
    if paths.diffusers:
        raise CheckpointError(f"{paths.root}: text encoders of diffusers-layout repos are not supported yet; "
                              f"load with text_encoder=False and pass prompt embeddings")
    return load_text_encoder(paths.wan_dir / T5_FILE, paths.wan_dir / TOKENIZER_DIR, device=device, dtype=dtype)


def _load_diffusers(root: Path, device: torch.device, dtype: torch.dtype, part: DitPart | None, vae: bool):
    """A diffusers-layout repo through ``from_pretrained`` (strict); a part is loaded whole on the CPU, then what it
    does not hold goes to the meta device before the rest moves to ``device``."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    models = []
    for cls, sub in ((WanTransformer3DModel, "transformer"), (AutoencoderKLWan, "vae"))[: 2 if vae else 1]:
        try:
            model, info = cls.from_pretrained(root, subfolder=sub, torch_dtype=dtype, local_files_only=True,
                                              output_loading_info=True)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{root / sub}: cannot load diffusers-layout weights ({exc})") from exc
        bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        if bad:
            raise CheckpointError(f"{root / sub}: " + " | ".join(f"{k}: {v}" for k, v in bad.items()))
        models.append(model.eval().requires_grad_(False))
    if part is not None:
        drop_outside(models[0], part)
    models = [m._apply(lambda t: t if t.is_meta else t.to(device)) for m in models]   # meta tensors stay
    return models[0], (models[1] if vae else None)
