"""Wan LoRAs as run-time adapters on the DiT, with a strength per batch row.

Many streams share one DiT call (``engine.py``), each with its own LoRA strengths (or none), so the LoRA delta
is not merged into the weights: every adapted ``nn.Linear`` gets a forward hook that adds
``((x @ A.T) * s[row, lora]) @ B.T`` (+ ``s[row, lora] * bias`` for bias deltas) to the base output, where ``s`` is
the strength of each LoRA for each batch row of the current call. The LoRAs on one layer are stacked along the
rank (one pair of matmuls for all of them); a run of rows whose strengths are all 0 is skipped, so a call where
no row uses a LoRA costs nothing extra. The base weights are never modified or reloaded; :meth:`LoRASet.detach`
removes every hook.

Files (strict: every tensor must land on a layer of the model, or the error names the keys and the file):

* **diffusers / PEFT**: ``[transformer.|base_model.model.]<module>.lora_A[.default].weight`` / ``lora_B`` (+
  ``lora_B.bias``, ``<module>.alpha``) with the module names of diffusers' ``WanTransformer3DModel``; the scale
  ``lora_alpha / r`` (``alpha_pattern``, ``use_rslora``) comes from the safetensors ``lora_adapter_metadata`` that
  diffusers writes or a PEFT folder's ``adapter_config.json`` (none: scale 1, the diffusers convention);
* **original Wan** (ComfyUI and most trainers): ``diffusion_model.blocks.N.self_attn.q.lora_A.weight`` /
  ``lora_B`` or ``lora_down`` / ``lora_up`` (+ ``.alpha``, ``.diff_b``);
* **kohya / musubi-tuner**: ``lora_unet_blocks_N_self_attn_q.lora_down.weight`` / ``lora_up`` + ``.alpha``;
* **PEFT over the original Wan module names** (LongLive's ``lora.pt``: ``{"generator_lora": {...}}`` with
  ``base_model.model.blocks.N.self_attn.q.lora_A.weight``; scale ``alpha / r`` = 1 as released): read as original
  Wan names.

Original-Wan names go through diffusers' own Wan LoRA converter (``WanLoraLoaderMixin.lora_state_dict``); kohya
names are first renamed to the original-Wan names, so LoRAs that adapt only some layers load too (diffusers'
musubi converter expects every layer of every block). ``alpha`` is folded into the up weights as ``alpha / rank``
before conversion.

Strength per call: :meth:`LoRASet.rows` sets one strength vector per batch row (``None``: the default strengths
given at load time); outside it every row uses the defaults. :attr:`LoRASet.touches_prompt` says whether
the cross-attention K/V of a prompt depend on the strengths (an adapter on the text embedder or on
``attn2.to_k`` / ``to_v``); then a stream's prompt K/V must be computed under its strengths (:meth:`LoRASet.rows`
around ``CausalWanDiT.embed_prompt``) and recomputed when they change.
"""

from __future__ import annotations

import json
import math
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from wanstream.core.errors import CheckpointError

MAX_STRENGTH = 4.0                  # |strength| of one LoRA (typical use: 0 .. 1.5)
FILE_NAMES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")   # inside a LoRA folder
_SHOWN = 20                         # keys named in an error


class LoRAError(CheckpointError):
    """A LoRA file does not fit the model (or cannot be read); the message names the file and the keys."""


# ============================================================================================ specs
@dataclass(frozen=True)
class LoRASpec:
    """A LoRA to load and its default strength (``--lora PATH[:strength]``)."""

    path: Path
    strength: float = 1.0

    @classmethod
    def parse(cls, text: str) -> "LoRASpec":
        """``PATH`` or ``PATH:STRENGTH`` (the part after the last colon is a strength when it is a number)."""
        path, sep, tail = str(text).rpartition(":")
        if sep and path:
            try:
                strength = float(tail)
            except ValueError:
                return cls(Path(text))
            return cls(Path(path), check_strength(strength, path))
        return cls(Path(text))

    @property
    def name(self) -> str:
        return lora_name(self.path)


def lora_name(path: str | Path) -> str:
    """The name a LoRA is addressed by (per-stream strengths, presets): its file name without the extension."""
    p = Path(path)
    return p.name if p.is_dir() else p.stem


def check_strength(value: float, what: str = "LoRA") -> float:
    value = float(value)
    if not math.isfinite(value) or abs(value) > MAX_STRENGTH:
        raise ValueError(f"{what}: strength must be in [-{MAX_STRENGTH:g}, {MAX_STRENGTH:g}], got {value}")
    return value


# ============================================================================================ reading
_WAN_MODULE = (r"blocks\.\d+\.(?:self_attn|cross_attn)\.[qkvo]|blocks\.\d+\.ffn\.[02]|time_projection\.1|head\.head"
               r"|text_embedding\.[02]|time_embedding\.[02]")
_WAN_KEY = re.compile(rf"diffusion_model\.({_WAN_MODULE})\.(lora_A\.weight|lora_B\.weight|lora_down\.weight"
                      r"|lora_up\.weight|alpha|diff_b)")
_WAN_NORM_DIFF = re.compile(r"diffusion_model\..*norm[^.]*\.(diff|diff_b)")
_KOHYA_KEY = re.compile(r"lora_unet_(blocks_(\d+)_(self_attn|cross_attn)_([qkvo])|blocks_(\d+)_ffn_([02])"
                        r"|time_projection_1|head_head|(?:text|time)_embedding_[02])\.(lora_down\.weight"
                        r"|lora_up\.weight|alpha)")
_DIFFUSERS_KEY = re.compile(r"(?:transformer\.|base_model\.model\.)?(.+?)\.(lora_A(?:\.default)?\.weight"
                            r"|lora_B(?:\.default)?\.weight|lora_B(?:\.default)?\.bias|alpha)")
_UP = {"lora_up.weight": "lora_down.weight", "lora_B.weight": "lora_A.weight"}
_PEFT_WAN_KEY = re.compile(r"base_model\.model\.blocks\.\d+\.(?:self_attn|cross_attn|ffn)\..+")
TRAINER_KEY = "generator_lora"      # a trainer checkpoint's adapter of the generator (LongLive's lora.pt)


def _problem(source: str, what: str, keys: Sequence[str]) -> LoRAError:
    keys = sorted(keys)
    more = f" (+{len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
    return LoRAError(f"{source}: {what}: {', '.join(keys[:_SHOWN])}{more}")


def read_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict, Path]:
    """Tensors (float32, CPU), adapter metadata and the file actually read of a LoRA file or folder."""
    path = Path(path)
    if path.is_dir():
        found = [path / n for n in FILE_NAMES if (path / n).is_file()]
        if not found:
            raise LoRAError(f"{path}: no LoRA file in this folder (expected one of {', '.join(FILE_NAMES)})")
        path = found[0]
    if not path.is_file():
        raise LoRAError(f"{path}: LoRA file not found")
    meta: dict = {}
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            with safe_open(str(path), framework="pt", device="cpu") as f:
                raw = (f.metadata() or {}).get("lora_adapter_metadata")
                sd = {k: f.get_tensor(k) for k in f.keys()}
            meta = json.loads(raw) if raw else {}
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(sd, dict) and isinstance(sd.get(TRAINER_KEY), dict):
                sd = sd[TRAINER_KEY]                # a trainer's checkpoint: the generator's adapter (LongLive)
    except Exception as exc:  # noqa: BLE001 - truncated files, bad headers, pickles, bad JSON
        raise LoRAError(f"{path}: cannot read LoRA file ({type(exc).__name__}: {exc})") from exc
    config = path.parent / "adapter_config.json"
    if not meta and config.is_file():
        try:
            meta = json.loads(config.read_text())
        except json.JSONDecodeError as exc:
            raise LoRAError(f"{config}: invalid JSON ({exc})") from exc
    if not isinstance(sd, dict) or not sd or not all(torch.is_tensor(v) for v in sd.values()):
        raise LoRAError(f"{path}: expected a non-empty dict of tensors")
    meta = {k.removeprefix("transformer."): v for k, v in meta.items()}
    return {k: v.float() for k, v in sd.items()}, meta, path


def detect_layout(sd: Mapping[str, torch.Tensor]) -> str:
    """``"wan"`` (original Wan names), ``"peft-wan"`` (PEFT prefix over original Wan names, LongLive), ``"kohya"``
    or ``"diffusers"`` (diffusers / PEFT names)."""
    if any(k.startswith("diffusion_model.") for k in sd):
        return "wan"
    if any(k.startswith("lora_unet_") for k in sd):
        return "kohya"
    if sd and all(_PEFT_WAN_KEY.fullmatch(k) for k in sd):
        return "peft-wan"
    return "diffusers"


def _fold_alpha(sd: dict[str, torch.Tensor], source: str) -> None:
    """``<module>.alpha`` → up weight × alpha / rank (in place); the alpha keys are removed."""
    for key in [k for k in sd if k.endswith(".alpha")]:
        module = key[: -len(".alpha")]
        pair = [(module + "." + up, module + "." + down) for up, down in _UP.items()
                if module + "." + up in sd and module + "." + down in sd]
        if not pair:
            raise _problem(source, "alpha without lora weights", [key])
        up, down = pair[0]
        sd[up] = sd[up] * (float(sd.pop(key)) / sd[down].shape[0])


def _check_pairs(sd: Mapping[str, torch.Tensor], source: str) -> None:
    """Every down weight has its up weight and the other way round."""
    alone = []
    for up, down in _UP.items():
        alone += [k for k in sd if k.endswith("." + up) and k[: -len(up)] + down not in sd]
        alone += [k for k in sd if k.endswith("." + down) and k[: -len(down)] + up not in sd]
    if alone:
        raise _problem(source, "lora weights without their other half (down/up, A/B)", alone)


def _wan_to_diffusers(sd: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Original-Wan LoRA names → diffusers module names, through diffusers' Wan LoRA converter."""
    bad = [k for k in sd if not _WAN_KEY.fullmatch(k) and not _WAN_NORM_DIFF.fullmatch(k)]
    full = [k for k in bad if k.endswith(".diff")]
    if full:
        raise _problem(source, "full-weight deltas (.diff) are not supported", full)
    if bad:
        raise _problem(source, "keys that match no layer of a Wan 2.1 text-to-video DiT", bad)
    norms = [k for k in sd if _WAN_NORM_DIFF.fullmatch(k)]
    nonzero = [k for k in norms if sd[k].abs().max() > 0]
    if nonzero:
        raise _problem(source, "norm-weight deltas are not supported", nonzero)
    sd = {k: v for k, v in sd.items() if k not in norms}
    if any(".lora_A." in k for k in sd) and any(".lora_down." in k for k in sd):
        raise LoRAError(f"{source}: mixes lora_A/lora_B and lora_down/lora_up names")
    _fold_alpha(sd, source)
    _check_pairs(sd, source)
    orphan = [k for k in sd if k.endswith(".diff_b") and not any(
        k[: -len("diff_b")] + w in sd for w in ("lora_A.weight", "lora_down.weight"))
        and not k.startswith("diffusion_model.blocks.")]
    if orphan:
        raise _problem(source, "bias deltas (diff_b) outside the blocks need lora weights on the same layer", orphan)
    from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin
    try:
        out = WanLoraLoaderMixin.lora_state_dict(dict(sd))
    except (KeyError, ValueError) as exc:
        raise LoRAError(f"{source}: diffusers' Wan LoRA converter refused the file ({type(exc).__name__}: {exc})") \
            from exc
    if len(out) != len(sd):
        raise LoRAError(f"{source}: the converter kept {len(out)} of {len(sd)} tensors")
    return {k.removeprefix("transformer."): v for k, v in out.items()}


def _kohya_to_wan(sd: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """kohya / musubi names → original-Wan names (``lora_unet_blocks_0_self_attn_q`` → ``blocks.0.self_attn.q``)."""
    out, bad = {}, []
    for k, v in sd.items():
        m = _KOHYA_KEY.fullmatch(k)
        if m is None:
            bad.append(k)
            continue
        if m[2] is not None:
            module = f"blocks.{m[2]}.{m[3]}.{m[4]}"
        elif m[5] is not None:
            module = f"blocks.{m[5]}.ffn.{m[6]}"
        else:
            module = re.sub(r"_(\d)$", r".\1", m[1]).replace("head_head", "head.head")
        out[f"diffusion_model.{module}.{m[7]}"] = v
    if bad:
        raise _problem(source, "keys that match no layer of a Wan 2.1 text-to-video DiT", bad)
    return out


def _peft_scale(module: str, rank: int, meta: Mapping, source: str) -> float:
    """PEFT's ``lora_alpha / r`` for one module (``alpha_pattern`` entries match a module-name suffix)."""
    if meta.get("use_dora"):
        raise LoRAError(f"{source}: DoRA adapters are not supported")
    alpha = meta.get("lora_alpha")
    for pattern, value in (meta.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", module):
            alpha = value
            break
    if alpha is None:
        return 1.0
    return float(alpha) / (math.sqrt(rank) if meta.get("use_rslora") else rank)


def _diffusers_names(sd: dict[str, torch.Tensor], meta: Mapping, source: str) -> dict[str, torch.Tensor]:
    """diffusers / PEFT names: strip the prefixes and adapter names; fold alpha (key or metadata)."""
    out, bad = {}, []
    for k, v in sd.items():
        m = _DIFFUSERS_KEY.fullmatch(k)
        if m is None:
            bad.append(k)
            continue
        out[f"{m[1]}.{m[2].replace('.default', '')}"] = v
    if bad:
        raise _problem(source, "keys that are not LoRA weights (expected <module>.lora_A.weight / lora_B.weight)",
                       bad)
    alphas = [k for k in out if k.endswith(".alpha")]
    _fold_alpha(out, source)
    _check_pairs(out, source)
    folded = {k[: -len(".alpha")] for k in alphas}
    for key in [k for k in out if k.endswith(".lora_B.weight")]:
        module = key[: -len(".lora_B.weight")]
        if module not in folded:
            out[key] = out[key] * _peft_scale(module, out[module + ".lora_A.weight"].shape[0], meta, source)
    return out


@dataclass
class LayerDelta:
    """One LoRA's delta on one linear layer: ``W += B @ A`` (alpha folded in), ``b += bias``."""

    A: torch.Tensor | None          # [r, in]
    B: torch.Tensor | None          # [out, r]
    bias: torch.Tensor | None       # [out]


@dataclass
class LoRAWeights:
    """A LoRA file read and checked against a model: its deltas by diffusers module name."""

    name: str
    path: Path
    layout: str
    layers: dict[str, LayerDelta]


def read_lora(path: str | Path, transformer: nn.Module, name: str | None = None) -> LoRAWeights:
    """Read a LoRA file in any supported layout and check it strictly against ``transformer`` (a diffusers
    ``WanTransformer3DModel`` or a ``CausalWanDiT``): every tensor must land on a linear layer with the right
    shape, else :class:`LoRAError` names the keys and the file."""
    transformer = getattr(transformer, "transformer", transformer)
    sd, meta, file = read_lora_file(path)
    source = str(file)
    layout = detect_layout(sd)
    if layout == "kohya":
        sd = _wan_to_diffusers(_kohya_to_wan(sd, source), source)
    elif layout == "wan":
        sd = _wan_to_diffusers(sd, source)
    elif layout == "peft-wan":
        sd = _wan_to_diffusers({"diffusion_model." + k.removeprefix("base_model.model."): v for k, v in sd.items()},
                               source)
    else:
        sd = _diffusers_names(sd, meta, source)
    modules = dict(transformer.named_modules())
    layers: dict[str, LayerDelta] = {}
    unmatched, wrong = [], []
    for key, t in sd.items():
        module, _, part = key.partition(".lora_")
        target = modules.get(module)
        if not isinstance(target, nn.Linear):
            unmatched.append(key)
            continue
        expect = {"A.weight": (None, target.in_features), "B.weight": (target.out_features, None),
                  "B.bias": (target.out_features,)}.get(part)
        if expect is None:
            unmatched.append(key)
            continue
        d = layers.setdefault(module, LayerDelta(None, None, None))
        if t.ndim != len(expect) or any(e is not None and s != e for s, e in zip(t.shape, expect)):
            wrong.append(f"{key} {tuple(t.shape)} vs layer {target.out_features}x{target.in_features}")
        if part == "A.weight":
            d.A = t
        elif part == "B.weight":
            d.B = t
        else:
            d.bias = t
    if unmatched:
        raise _problem(source, "keys that match no linear layer of the model", unmatched)
    for module, d in layers.items():
        if d.A is not None and d.B is not None and d.A.shape[0] != d.B.shape[1]:
            wrong.append(f"{module}: rank of lora_A {d.A.shape[0]} vs lora_B {d.B.shape[1]}")
    if wrong:
        raise _problem(source, "shape mismatches", wrong)
    return LoRAWeights(name or lora_name(path), Path(path), layout, layers)


# ============================================================================================ run time
class _CallScales:
    """The strengths of one DiT call: per row a vector over the set's LoRAs (host floats) and, on first use, the
    same as a device tensor; per group of LoRAs, the runs of rows that use any of them."""

    def __init__(self, rows: list[tuple[float, ...]], device: torch.device):
        self.rows = rows
        self.device = device
        self._tables: dict[torch.dtype, torch.Tensor] = {}
        self._plans: dict = {}

    def table(self, dtype: torch.dtype) -> torch.Tensor:
        """``[B, n_loras]`` on the device (one upload per call and dtype)."""
        if dtype not in self._tables:
            self._tables[dtype] = torch.tensor(self.rows, dtype=dtype).to(self.device, non_blocking=True)
        return self._tables[dtype]

    def segments(self, loras: tuple[int, ...]) -> list[tuple[int, int]]:
        """Runs ``[lo, hi)`` of rows with a non-zero strength for any of ``loras``."""
        key = ("seg", loras)
        if key not in self._plans:
            active = [any(r[j] != 0 for j in loras) for r in self.rows]
            runs, lo = [], None
            for i, a in enumerate(active + [False]):
                if a and lo is None:
                    lo = i
                elif not a and lo is not None:
                    runs.append((lo, i))
                    lo = None
            self._plans[key] = runs
        return self._plans[key]

    def columns(self, owner: torch.Tensor, key: tuple, dtype: torch.dtype) -> torch.Tensor:
        """``[B, R]``: each rank column's strength per row (``owner``: the LoRA of each column)."""
        key = ("col", key, dtype)
        if key not in self._plans:
            self._plans[key] = self.table(dtype)[:, owner]
        return self._plans[key]


class _Adapter:
    """The LoRAs on one linear layer, stacked along the rank; called as the layer's forward hook."""

    def __init__(self, owner: "LoRASet", deltas: list[tuple[int, LayerDelta]], device, dtype):
        self.owner = owner
        self.loras = tuple(j for j, _ in deltas)
        low = [(j, d) for j, d in deltas if d.A is not None]
        self.A = torch.cat([d.A for _, d in low]).to(device, dtype) if low else None              # [R, in]
        self.B = torch.cat([d.B for _, d in low], dim=1).to(device, dtype) if low else None       # [out, R]
        owner_cols = [j for j, d in low for _ in range(d.A.shape[0])]
        self.col_owner = torch.tensor(owner_cols, dtype=torch.long, device=device)
        self.col_key = (tuple(j for j, _ in low), tuple(d.A.shape[0] for _, d in low))
        biased = [(j, d) for j, d in deltas if d.bias is not None]
        self.bias_loras = torch.tensor([j for j, _ in biased], dtype=torch.long, device=device)
        self.bias = torch.stack([d.bias for _, d in biased]).to(device, dtype) if biased else None  # [k, out]

    def __call__(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
        x = args[0]
        scales = self.owner._scales(x.shape[0], x.device)
        runs = scales.segments(self.loras)
        if not runs:
            return None
        whole = runs == [(0, x.shape[0])]
        for lo, hi in runs:
            delta = self._delta(x[lo:hi], scales, lo, hi)
            if whole:
                out = out + delta
            else:
                out[lo:hi] += delta
        return out

    def _delta(self, x: torch.Tensor, scales: _CallScales, lo: int, hi: int) -> torch.Tensor:
        bshape = (hi - lo,) + (1,) * (x.ndim - 2) + (-1,)
        delta = 0
        if self.A is not None:
            cols = scales.columns(self.col_owner, self.col_key, x.dtype)[lo:hi]
            delta = F.linear(F.linear(x, self.A) * cols.view(bshape), self.B)
        if self.bias is not None:
            delta = delta + (scales.table(x.dtype)[lo:hi][:, self.bias_loras] @ self.bias).view(bshape)
        return delta


_PROMPT_LAYERS = re.compile(r"condition_embedder\.text_embedder\..*|blocks\.\d+\.attn2\.to_[kv]")


class LoRASet:
    """LoRAs attached to one DiT as run-time adapters (see the module docstring).

    ``names`` / ``defaults``: the LoRAs in order and their default strengths. A strength vector is a tuple with
    one strength per LoRA; :meth:`strengths` builds one from a ``{name: strength}`` mapping.
    """

    def __init__(self, loras: Sequence[LoRAWeights], defaults: Sequence[float]):
        if len(loras) != len(defaults):
            raise ValueError("need one default strength per LoRA")
        names = [w.name for w in loras]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"LoRA names must be unique (file names without extension), got {', '.join(twice)} "
                             f"twice")
        self.loras = list(loras)
        self.names = tuple(names)
        self.defaults = tuple(check_strength(s, n) for n, s in zip(names, defaults))
        self.adapters: dict[str, _Adapter] = {}
        self._hooks: list = []
        self._dit = None
        self._local = threading.local()

    # ------------------------------------------------------------------------------------------ loading
    @classmethod
    def load(cls, specs: Sequence[LoRASpec | str], dit: nn.Module) -> "LoRASet":
        """Read every LoRA strictly against ``dit`` (a ``CausalWanDiT``) and attach them."""
        specs = [s if isinstance(s, LoRASpec) else LoRASpec.parse(s) for s in specs]
        lora_set = cls([read_lora(s.path, dit) for s in specs], [s.strength for s in specs])
        lora_set.attach(dit)
        return lora_set

    def attach(self, dit: nn.Module) -> None:
        """Hook every adapted linear layer of ``dit`` and set ``dit.lora`` to this set."""
        if getattr(dit, "lora", None) is not None:
            raise RuntimeError("this DiT has LoRAs attached already (detach them first)")
        tr = getattr(dit, "transformer", dit)
        modules = dict(tr.named_modules())
        ref = tr.patch_embedding.weight
        per_layer: dict[str, list[tuple[int, LayerDelta]]] = {}
        for j, w in enumerate(self.loras):
            for name, d in w.layers.items():
                per_layer.setdefault(name, []).append((j, d))
        for name, deltas in per_layer.items():
            adapter = _Adapter(self, deltas, ref.device, ref.dtype)
            self.adapters[name] = adapter
            self._hooks.append(modules[name].register_forward_hook(adapter))
        self._dit = dit
        dit.lora = self

    def detach(self) -> None:
        """Remove every hook: the DiT computes exactly its base weights again."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self.adapters.clear()
        if self._dit is not None:
            self._dit.lora = None
            self._dit = None

    @property
    def touches_prompt(self) -> bool:
        """Whether a prompt's cross-attention K/V depend on the LoRA strengths."""
        return any(_PROMPT_LAYERS.fullmatch(n) for n in self.adapters)

    # ------------------------------------------------------------------------------------------ strengths
    def strengths(self, values: Mapping[str, float] | Sequence[float] | None = None) -> tuple[float, ...]:
        """A strength vector: ``None`` → the defaults; a mapping overrides the defaults by name (unknown names
        are refused); a sequence gives every strength in order."""
        if values is None:
            return self.defaults
        if isinstance(values, Mapping):
            unknown = sorted(set(values) - set(self.names))
            if unknown:
                known = ", ".join(self.names) or "none loaded"
                raise ValueError(f"unknown LoRA {', '.join(map(repr, unknown))} (loaded: {known})")
            return tuple(check_strength(values[n], n) if n in values else d for n, d in zip(self.names, self.defaults))
        values = tuple(values)
        if len(values) != len(self.names):
            raise ValueError(f"need {len(self.names)} LoRA strengths, got {len(values)}")
        return tuple(check_strength(v, n) for n, v in zip(self.names, values))

    @contextmanager
    def rows(self, per_row: Sequence[Sequence[float] | None]) -> Iterator[None]:
        """The strengths of the DiT calls inside: one vector per batch row (``None``: the defaults)."""
        rows = [self.defaults if r is None else tuple(r) for r in per_row]
        if any(len(r) != len(self.names) for r in rows):
            raise ValueError(f"each row needs {len(self.names)} LoRA strengths")
        previous = getattr(self._local, "current", None)
        self._local.current = rows
        try:
            yield
        finally:
            self._local.current = previous

    def _scales(self, batch: int, device: torch.device) -> _CallScales:
        """The strengths of the running call: those set by :meth:`rows`, else the defaults (kept per batch size,
        so calls with the default strengths upload nothing)."""
        rows = getattr(self._local, "current", None)
        if rows is None:
            defaults = self._local.__dict__.setdefault("defaults", {})
            if (batch, device) not in defaults:
                defaults[(batch, device)] = _CallScales([self.defaults] * batch, device)
            return defaults[(batch, device)]
        if len(rows) != batch:
            raise RuntimeError(f"LoRA strengths were set for {len(rows)} rows but the layer runs {batch}")
        cached = getattr(self._local, "cache", None)
        if cached is None or cached.rows is not rows or cached.device != device:
            cached = self._local.cache = _CallScales(rows, device)
        return cached

    def embed_prompt(self, dit, context: torch.Tensor, strengths: Sequence[float] | None = None):
        """``dit.embed_prompt(context)`` under one strength vector (the prompt K/V of a stream)."""
        with self.rows([strengths] * (1 if context.ndim == 2 else context.shape[0])):
            return dit.embed_prompt(context)
