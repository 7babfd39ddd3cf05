"""The released on-disk layouts, loaded strictly, and random-weight writers of the same layouts.

Layouts:
* Wan 2.1 original folder (``Wan-AI/Wan2.1-T2V-1.3B`` / ``-14B``): ``config.json`` (Wan field names),
  ``diffusion_pytorch_model.safetensors`` or sharded ``diffusion_pytorch_model-0000x-of-0000y.safetensors`` +
  ``diffusion_pytorch_model.safetensors.index.json``, ``Wan2.1_VAE.pth``, ``models_t5_umt5-xxl-enc-bf16.pth``,
  ``google/umt5-xxl/`` (tokenizer).
* StreamDiffusionV2 causal checkpoint ``model.pt``: a dict with ``generator`` / ``generator_ema`` /
  ``state_dict`` holding ``model.<Wan key>`` tensors.
* diffusers-layout repos (``transformer/``, ``vae/`` with diffusers configs) through ``from_pretrained``.

Key conversion uses diffusers' converters. Every load is strict: missing / unexpected keys and shape
mismatches raise :class:`CheckpointError` naming them and the file.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers, convert_wan_vae_to_diffusers
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from wanstream.core.errors import CheckpointError

CAUSAL_KEYS = ("generator", "generator_ema", "state_dict")
SAFETENSORS = "diffusion_pytorch_model.safetensors"
SAFETENSORS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
# File names of the released layouts (inside the Wan folder, and ckpts/ for TAEHV).
VAE_FILE = "Wan2.1_VAE.pth"
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER_DIR = Path("google") / "umt5-xxl"
TAEHV_FILE = "taew2_1.pth"


def block_of(key: str) -> int | None:
    """The DiT block a (Wan- or diffusers-named) key belongs to, or None for the shared parts."""
    if key.startswith("blocks."):
        return int(key.split(".", 2)[1])
    return None


HEAD_KEYS = ("head.", "proj_out.", "scale_shift_table")    # the output head (Wan and diffusers names)
PATCH_KEYS = ("patch_embedding.",)


@dataclass(frozen=True)
class DitPart:
    """The part of a DiT one process holds (a pipeline stage): blocks ``[start, stop)``, with or without the patch
    embedding (the first stage runs it) and the head (the last stage); the time and text embedders always."""

    blocks: range
    patch_embedding: bool = True
    head: bool = True

    def wants(self, key: str) -> bool:
        """Whether a (Wan- or diffusers-named) DiT key is in this part."""
        block = block_of(key)
        if block is not None:
            return block in self.blocks
        if key.startswith(PATCH_KEYS):
            return self.patch_embedding
        if key.startswith(HEAD_KEYS):
            return self.head
        return True

    def check(self, num_layers: int) -> None:
        if not 0 <= self.blocks.start < self.blocks.stop <= num_layers or self.blocks.step != 1:
            raise ValueError(f"block range [{self.blocks.start}, {self.blocks.stop}) is not inside the model's "
                             f"{num_layers} blocks")


# ------------------------------------------------------------------------------------------------ files
def read_torch_file(path: Path, mmap: bool = False) -> object:
    """``torch.load`` with errors that name the file (``mmap``: tensors stay in the file until read)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # truncated zip, pickle errors, ...
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {exc})") from exc


def read_safetensors(path: Path, wanted=None) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        if wanted is None:
            return load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if wanted(k)}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read safetensors file ({exc})") from exc


def check_keys(expected: dict[str, torch.Size], got: dict[str, torch.Tensor], source: str,
               rename=lambda k: k) -> None:
    """Raise a CheckpointError naming missing / unexpected keys and wrong shapes (in the file's key names)."""
    missing = sorted(k for k in expected if k not in got)
    unexpected = sorted(k for k in got if k not in expected)
    wrong = sorted(f"{rename(k)}: file {tuple(got[k].shape)} vs model {tuple(expected[k])}"
                   for k in expected if k in got and tuple(got[k].shape) != tuple(expected[k]))
    problems = []
    if missing:
        problems.append("missing keys: " + ", ".join(rename(k) for k in missing[:20])
                        + (f" (+{len(missing) - 20} more)" if len(missing) > 20 else ""))
    if unexpected:
        problems.append("unexpected keys: " + ", ".join(rename(k) for k in unexpected[:20])
                        + (f" (+{len(unexpected) - 20} more)" if len(unexpected) > 20 else ""))
    if wrong:
        problems.append("shape mismatches: " + "; ".join(wrong[:20]))
    if problems:
        raise CheckpointError(f"{source}: " + " | ".join(problems))


# -------------------------------------------------------------------------------------------- DiT keys
def diffusers_dit_config(wan_config: dict) -> dict:
    """Wan ``config.json`` fields → ``WanTransformer3DModel`` init kwargs."""
    try:
        dim, heads = int(wan_config["dim"]), int(wan_config["num_heads"])
        return dict(
            patch_size=tuple(wan_config.get("patch_size", (1, 2, 2))), num_attention_heads=heads,
            attention_head_dim=dim // heads, in_channels=int(wan_config.get("in_dim", 16)),
            out_channels=int(wan_config.get("out_dim", 16)), text_dim=int(wan_config.get("text_dim", 4096)),
            freq_dim=int(wan_config.get("freq_dim", 256)), ffn_dim=int(wan_config["ffn_dim"]),
            num_layers=int(wan_config["num_layers"]), cross_attn_norm=True, qk_norm="rms_norm_across_heads",
            eps=float(wan_config.get("eps", 1e-6)),
        )
    except KeyError as exc:
        raise CheckpointError(f"Wan config is missing field {exc}") from exc


def read_wan_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found (a Wan 2.1 model folder needs config.json)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid JSON ({exc})") from exc


def causal_state_dict(path: Path, wanted=None, keys: tuple[str, ...] = CAUSAL_KEYS,
                      strict_key: bool = False) -> dict[str, torch.Tensor]:
    """Wan-named DiT tensors of a causal generator checkpoint (the ``model.`` prefix stripped): the first of
    ``keys`` present (StreamDiffusionV2's ``model.pt``: ``generator`` / ``generator_ema`` / ``state_dict`` or a bare
    state dict; Self-Forcing: ``generator_ema``; LongLive: ``generator``). ``strict_key``: one of ``keys`` must be
    there (the error names it and the keys found). With ``wanted(key)``, only those tensors are read (the file is
    memory-mapped)."""
    obj = read_torch_file(path, mmap=wanted is not None)
    found = None
    if isinstance(obj, dict):
        for key in keys:
            if key in obj and isinstance(obj[key], dict):
                obj, found = obj[key], key
                break
    if strict_key and found is None:
        top = ", ".join(map(repr, list(obj)[:10])) if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path}: no generator under the key {' / '.join(map(repr, keys))} (found: {top})")
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state dict (or a dict with one of {keys})")
    out = {(k[len("model."):] if k.startswith("model.") else k): v for k, v in obj.items()}
    if wanted is not None:
        out = {k: v.clone() for k, v in out.items() if wanted(k)}      # detached from the mapped file
    return out


def wan_to_diffusers_dit(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return convert_wan_transformer_to_diffusers(dict(sd))  # the converter pops keys from its input


def _meta_dit(config: dict) -> WanTransformer3DModel:
    with torch.device("meta"):
        return WanTransformer3DModel(**config)


def wan_dit_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of the original Wan DiT layout for a diffusers config, with its shape."""
    d, f, n = config["num_attention_heads"] * config["attention_head_dim"], config["ffn_dim"], config["num_layers"]
    cin, cout, tdim, fdim = config["in_channels"], config["out_channels"], config["text_dim"], config["freq_dim"]
    pt, ph, pw = config["patch_size"]
    s = {"patch_embedding.weight": (d, cin, pt, ph, pw), "patch_embedding.bias": (d,),
         "text_embedding.0.weight": (d, tdim), "text_embedding.0.bias": (d,),
         "text_embedding.2.weight": (d, d), "text_embedding.2.bias": (d,),
         "time_embedding.0.weight": (d, fdim), "time_embedding.0.bias": (d,),
         "time_embedding.2.weight": (d, d), "time_embedding.2.bias": (d,),
         "time_projection.1.weight": (6 * d, d), "time_projection.1.bias": (6 * d,),
         "head.modulation": (1, 2, d), "head.head.weight": (cout * pt * ph * pw, d),
         "head.head.bias": (cout * pt * ph * pw,)}
    for i in range(n):
        s.update(wan_block_shapes(f"blocks.{i}.", d, f))
    return s


def wan_block_shapes(prefix: str, d: int, f: int) -> dict[str, tuple[int, ...]]:
    """The tensors of one transformer block of the original Wan layout (model width ``d``, FFN width ``f``): the DiT's
    ``blocks.i.`` and the VACE blocks' ``vace_blocks.j.`` alike."""
    s = {prefix + "modulation": (1, 6, d)}
    for att in ("self_attn", "cross_attn"):
        for p in "qkvo":
            s[f"{prefix}{att}.{p}.weight"], s[f"{prefix}{att}.{p}.bias"] = (d, d), (d,)
        s[f"{prefix}{att}.norm_q.weight"], s[f"{prefix}{att}.norm_k.weight"] = (d,), (d,)
    s[prefix + "norm3.weight"], s[prefix + "norm3.bias"] = (d,), (d,)
    s[prefix + "ffn.0.weight"], s[prefix + "ffn.0.bias"] = (f, d), (f,)
    s[prefix + "ffn.2.weight"], s[prefix + "ffn.2.bias"] = (d, f), (d,)
    return s


def build_transformer(config: dict, wan_sd: dict[str, torch.Tensor], source: str, device="cpu",
                      dtype=torch.float32, part: DitPart | None = None) -> WanTransformer3DModel:
    """Strictly load Wan-named DiT weights into a diffusers ``WanTransformer3DModel``.

    With ``part``, exactly that part's tensors are expected and materialised; the rest stays on the meta device
    (a pipeline stage)."""
    if part is not None:
        part.check(config["num_layers"])
    wanted = part.wants if part is not None else (lambda key: True)
    expected = {k: torch.Size(v) for k, v in wan_dit_shapes(config).items() if wanted(k)}
    check_keys(expected, wan_sd, source)
    model = _meta_dit(config)
    sd = {k: v.to(device=device, dtype=dtype) for k, v in wan_to_diffusers_dit(wan_sd).items()}
    res = model.load_state_dict(sd, strict=part is None, assign=True)
    if part is not None and [k for k in res.missing_keys if wanted(k)]:
        raise CheckpointError(f"{source}: missing {[k for k in res.missing_keys if wanted(k)][:5]}")
    # Non-persistent RoPE buffers stay on meta after an assign-load; we do not use them (own RoPE tables),
    # but nothing may be left on the meta device.
    model.rope.freqs_cos = torch.empty(0, device=device)
    model.rope.freqs_sin = torch.empty(0, device=device)
    return model.eval().requires_grad_(False)


def drop_outside(model: torch.nn.Module, part: DitPart) -> None:
    """Put the parameters of ``model`` (diffusers-named) that ``part`` does not hold on the meta device."""
    part.check(model.config.num_layers)
    for name, p in list(model.named_parameters()):
        if not part.wants(name):
            owner, _, leaf = name.rpartition(".")
            module = model.get_submodule(owner) if owner else model
            setattr(module, leaf, torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False))


# -------------------------------------------------------------------------------------------- VAE keys
def vae_config_from_state_dict(sd: dict[str, torch.Tensor], source: str) -> dict:
    """``AutoencoderKLWan`` kwargs inferred from the tensor shapes of an original-layout VAE."""
    try:
        base = sd["encoder.conv1.weight"].shape[0]
        z2 = sd["conv1.weight"].shape[0]
    except KeyError as exc:
        raise CheckpointError(f"{source}: not a Wan VAE state dict (missing {exc})") from exc
    return dict(base_dim=int(base), z_dim=int(z2 // 2), dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                temperal_downsample=[False, True, True], dropout=0.0)


def _vae_inverse_map(model_keys: Iterable[str]) -> dict[str, str]:
    """diffusers VAE key → original key (inverting the documented conversion rules)."""
    def inv(k: str) -> str:
        k = re.sub(r"^(encoder|decoder)\.conv_in\.", r"\1.conv1.", k)
        k = re.sub(r"^quant_conv\.", "conv1.", k)
        k = re.sub(r"^post_quant_conv\.", "conv2.", k)
        k = re.sub(r"^(encoder|decoder)\.norm_out\.gamma$", r"\1.head.0.gamma", k)
        k = re.sub(r"^(encoder|decoder)\.conv_out\.", r"\1.head.2.", k)
        res = {"norm1.gamma": "residual.0.gamma", "conv1": "residual.2", "norm2.gamma": "residual.3.gamma",
               "conv2": "residual.6", "conv_shortcut": "shortcut"}
        m = re.match(r"^(encoder|decoder)\.mid_block\.resnets\.(\d)\.(norm1\.gamma|conv1|norm2\.gamma|conv2)(.*)$", k)
        if m:
            return f"{m[1]}.middle.{2 * int(m[2])}.{res[m[3]]}{m[4]}"
        k = re.sub(r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.middle.1.", k)
        m = re.match(r"^encoder\.down_blocks\.(\d+)\.(norm1\.gamma|conv1|norm2\.gamma|conv2|conv_shortcut)(.*)$", k)
        if m:
            return f"encoder.downsamples.{m[1]}.{res[m[2]]}{m[3]}"
        k = re.sub(r"^encoder\.down_blocks\.", "encoder.downsamples.", k)
        m = re.match(r"^decoder\.up_blocks\.(\d)\.resnets\.(\d)\.(norm1\.gamma|conv1|norm2\.gamma|conv2|conv_shortcut)(.*)$", k)
        if m:
            return f"decoder.upsamples.{4 * int(m[1]) + int(m[2])}.{res[m[3]]}{m[4]}"
        m = re.match(r"^decoder\.up_blocks\.(\d)\.upsamplers\.0\.(.*)$", k)
        if m:
            return f"decoder.upsamples.{4 * int(m[1]) + 3}.{m[2]}"
        return k
    return {k: inv(k) for k in model_keys}


def build_vae(sd: dict[str, torch.Tensor], source: str, device="cpu", dtype=torch.float32) -> AutoencoderKLWan:
    """Strictly load an original-layout Wan VAE state dict; dims come from the tensor shapes."""
    config = vae_config_from_state_dict(sd, source)
    with torch.device("meta"):
        model = AutoencoderKLWan(**config)
    inverse = _vae_inverse_map(model.state_dict().keys())
    expected = {inverse[k]: v.shape for k, v in model.state_dict().items()}
    check_keys(expected, sd, source)
    converted = convert_wan_vae_to_diffusers(dict(sd))
    converted = {k: v.to(device=device, dtype=dtype) for k, v in converted.items()}
    model.load_state_dict(converted, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def vae_state_dict_original(model: AutoencoderKLWan) -> dict[str, torch.Tensor]:
    """A diffusers Wan VAE's weights under the original ``Wan2.1_VAE.pth`` key names."""
    inverse = _vae_inverse_map(model.state_dict().keys())
    return {inverse[k]: v for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------ sharded writing
def save_dit_safetensors(folder: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> None:
    """Write Wan-named DiT weights as one file, or shards + index when larger than ``max_shard_bytes``."""
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if total <= max_shard_bytes:
        save_file(tensors, str(folder / SAFETENSORS))
        return
    shards, cur, size = [], {}, 0
    for k, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k], size = t, size + nbytes
    shards.append(cur)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name))
        weight_map.update({k: name for k in shard})
    (folder / SAFETENSORS_INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                                        "weight_map": weight_map}, indent=1))


def read_dit_safetensors(folder: Path, wanted=None) -> dict[str, torch.Tensor]:
    """Wan-named DiT weights from a single or sharded safetensors folder (``wanted(key)``: only those are read)."""
    folder = Path(folder)
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index}: invalid shard index ({exc})") from exc
    else:
        files = [SAFETENSORS]
    out: dict[str, torch.Tensor] = {}
    for name in files:
        out.update(read_safetensors(folder / name, wanted))
    return out
