"""Backbones as data: what differs between the causal Wan 2.1 models wanstream serves (pure: no torch).

Three released causal Wan 2.1 T2V-1.3B models share the DiT, the VAE, the text encoder and the key names of their
weights (``../shared/spec/backbones.md``); they differ only in the facts written down here, and every layer reads
them from a :class:`Backbone` instead of asking which model it runs:

* the schedule (``core.schedule``): latent frames per block, the step list (integer or *warped* float timesteps),
  whether the levels of consecutive chunks share a call (StreamDiffusionV2's stream batch) or every block runs its
  steps in turn followed by a clean **context pass** (Self-Forcing, LongLive: one more call at t = 0 whose only
  effect is the block's clean K/V);
* the sampler (``models.sampling``): the shift of the sigma grid;
* the KV storage (``models.kv_cache``): window, sink, adaptive sink refresh, RoPE positions (absolute: wrapped as
  released by StreamDiffusionV2, or *rebased* past the 1024-entry table by turning the cached keys back —
  Self-Forcing, LongLive; or LongLive's infinite mode, window slots) — a
  :class:`~wanstream.core.config.CacheConfig` per mode;
* the chunk rule (``core.chunking``): input frames per chunk;
* loading (``models.loader`` / ``models.checkpoints``): where the generator and its LoRA live under a model root,
  which top-level key holds them, the hub repository (``wanstream download``).

Eviction is the same ring for every backbone: LongLive's physical roll-left keeps its window in chronological
order, our ring keeps the same frames in ring order; keys carry their RoPE rotation, so attention over the window
is the same set of keys (the order only changes float rounding, far below the goldens' 1e-4).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace

from wanstream.core.chunking import BLOCK3_RULE, SDV2_RULE, ChunkRule
from wanstream.core.config import T2V_CACHE, T2V_STEPS, V2V_CACHE, V2V_STEPS, CacheConfig

MODES = ("v2v", "t2v")
ROPE_TABLE = 1024            # temporal RoPE positions of the Wan DiT table (LongLive / Self-Forcing: absolute)


def _f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", float(x)))[0]


def warped(steps: tuple[int, ...], shift: float, train_steps: int = 1000) -> list[float]:
    """``cat(t_grid, [0])[1000 - step]`` of the shifted flow-matching grid, as the float32 values the released code
    embeds (``[1000, 750, 500, 250]`` at shift 5 → ``[1000.0, 937.5, 833.3333, 625.0]``). Grid entries whose
    ``s = 1 - k/1000`` is exact in float32 (k a multiple of 125, as in every released list) come out bit-equal
    to ``torch.linspace`` and the float32 formula; tests/test_backbones.py checks each backbone against torch."""
    out = []
    for step in steps:
        k = train_steps - int(step)
        if k >= train_steps:
            out.append(0.0)
            continue
        s = _f32(1.0 - k / train_steps)
        sigma = _f32(_f32(_f32(shift) * s) / _f32(1.0 + _f32(_f32(shift - 1.0) * s)))
        out.append(_f32(sigma * train_steps))
    return out


@dataclass(frozen=True)
class Checkpoint:
    """Where a backbone's released generator lives under a model root, and how it is read."""

    generator: str | None                 # path under the root (None: the StreamDiffusionV2 ckpts/ search)
    generator_keys: tuple[str, ...]       # the top-level key holding the generator, in order of preference
    lora: str | None = None               # path of the backbone's own LoRA (LongLive), None: none
    lora_key: str | None = None           # its top-level key (the whole dict when absent)
    hub: str | None = None                # Hugging Face repository of the generator (``wanstream download``)
    hub_files: tuple[str, ...] = ()       # files of that repository, relative to ``hub_dir``
    hub_dir: str = ""                     # the folder under the root that the repository's files go to
    lora_rank: int = 0                    # rank of the released LoRA (init-random writes this rank at 1.3B)


@dataclass(frozen=True)
class Backbone:
    """One causal Wan model as data (see the module docstring)."""

    name: str
    title: str
    shift: float                          # shift of the flow-matching sigma grid
    t2v_steps: tuple[int, ...]            # configured text-to-video step list (before warping)
    warp: bool                            # t2v steps are warped onto the shifted grid (float timesteps)
    v2v_steps: tuple[int, ...]            # video-to-video step list (level 0 uses the chunk's own timestep)
    t2v_block: int                        # latent frames per text-to-video block
    v2v_rule: ChunkRule                   # input frames / latent frames per video-to-video chunk
    stream_batch: bool                    # the levels of consecutive chunks share one call (else in turn per block)
    context_pass: bool                    # after a block's last step one more call at ``context_t`` writes clean K/V
    t2v_cache: CacheConfig
    v2v_cache: CacheConfig
    checkpoint: Checkpoint
    context_t: float = 0.0
    t2v_clean_level: bool = False         # t2v step list ends with a clean level 0 in the stream batch (SDV2)
    licence: str = ""
    speed: str = ""
    good_for: str = ""
    variant_of: str | None = None         # the same weights as another backbone, another policy (named explicitly)

    # ------------------------------------------------------------------------------------------ schedule
    def step_list(self, steps: int, mode: str = "v2v") -> list[float]:
        """Denoising timesteps of ``steps`` levels: v2v the first ``steps`` of the v2v list; t2v the first ``steps``
        of the t2v list, warped where the backbone warps, with StreamDiffusionV2's clean level appended."""
        if not 1 <= int(steps) <= 4:
            raise ValueError(f"steps must be in 1..4, got {steps}")
        if mode == "v2v":
            return [float(t) for t in self.v2v_steps[:steps]]
        if mode == "t2v":
            chosen = self.t2v_steps[:steps]
            out = warped(chosen, self.shift) if self.warp else [float(t) for t in chosen]
            return out + [0.0] if self.t2v_clean_level else out
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")

    def cache(self, mode: str) -> CacheConfig:
        return self.t2v_cache if mode == "t2v" else self.v2v_cache

    def chunk_rule(self, mode: str) -> ChunkRule:
        """Input frames and latent frames per chunk (t2v: output frames per block)."""
        if mode == "t2v":
            return ChunkRule.blocks(self.t2v_block)
        return self.v2v_rule


SDV2 = Backbone(
    name="streamdiffusionv2", title="StreamDiffusionV2", shift=8.0, t2v_steps=T2V_STEPS, warp=False,
    v2v_steps=V2V_STEPS, t2v_block=3, v2v_rule=SDV2_RULE, stream_batch=True, context_pass=False,
    t2v_cache=T2V_CACHE, v2v_cache=V2V_CACHE, t2v_clean_level=True,
    checkpoint=Checkpoint(None, ("generator", "generator_ema", "state_dict"), hub="jerryfeng/StreamDiffusionV2"),
    licence="code Apache-2.0; weights: see the model card (not verified here)",
    speed="no FPS figure in the repository README",
    good_for="live video-to-video restyling: 1-latent chunks (4 input frames), stream batch over the steps, "
             "adaptive sink; the lowest latency per chunk")

# Self-Forcing: 21-frame global cache, no sink (configs/self_forcing_dmd.yaml: no local_attn_size / sink_size).
# Past 21 frames the released code fails; here the window rolls (ring, no sink) — a documented choice.
SF_CACHE = CacheConfig(capacity=21, sink=0, sink_threshold=-1.0, rope_wrap_at=ROPE_TABLE, rope_wrap_to=21,
                       rope_rebase=True)
SELF_FORCING = Backbone(
    name="self-forcing", title="Self-Forcing", shift=5.0, t2v_steps=T2V_STEPS, warp=True, v2v_steps=V2V_STEPS,
    t2v_block=3, v2v_rule=BLOCK3_RULE, stream_batch=False, context_pass=True, t2v_cache=SF_CACHE, v2v_cache=SF_CACHE,
    checkpoint=Checkpoint("checkpoints/self_forcing_dmd.pt", ("generator_ema",), hub="gdhe17/Self-Forcing",
                          hub_files=("checkpoints/self_forcing_dmd.pt",)),
    licence="code Apache-2.0; weights CC BY-NC-SA 4.0 (non-commercial, HF model card)",
    speed="17 FPS on one GPU with sub-second latency (paper); real time on one RTX 4090 (README)",
    good_for="short text-to-video clips (the 21 latent frames it was trained on, about 5 s); the common base of the "
             "family")

# LongLive v1.0: 12-frame window with a 3-frame sink, roll-left eviction, absolute RoPE (window slots in the
# infinite mode: CacheConfig.rope_window), peft LoRA rank 256 unmerged.
LL_CACHE = CacheConfig(capacity=12, sink=3, sink_threshold=-1.0, rope_wrap_at=ROPE_TABLE, rope_wrap_to=12,
                       rope_rebase=True)
LL_INFINITE_CACHE = replace(LL_CACHE, rope_rebase=False, rope_window=True)
LONGLIVE = Backbone(
    name="longlive", title="LongLive", shift=5.0, t2v_steps=T2V_STEPS, warp=True, v2v_steps=V2V_STEPS,
    t2v_block=3, v2v_rule=BLOCK3_RULE, stream_batch=False, context_pass=True, t2v_cache=LL_CACHE, v2v_cache=LL_CACHE,
    checkpoint=Checkpoint("longlive_models/models/longlive_base.pt", ("generator", "generator_ema", "model"),
                          lora="longlive_models/models/lora.pt", lora_key="generator_lora",
                          hub="Efficient-Large-Model/LongLive-1.3B",
                          hub_files=("models/longlive_base.pt", "models/lora.pt"), hub_dir="longlive_models",
                          lora_rank=256),
    licence="code Apache-2.0 (two model files still carry CC BY-NC-SA 4.0 headers); weights: see the model card "
            "(not verified here)",
    speed="20.7 FPS on one H100 (README v1.0); 24.8 FPS with FP8 (not in v1.0's code)",
    good_for="long text-to-video (minutes) and interactive prompt switches: KV re-cache of the recent frames "
             "under the new prompt; infinite mode with window-slot RoPE positions")

LONGLIVE_INFINITE = replace(
    LONGLIVE, name="longlive-infinite", title="LongLive (infinite)", t2v_cache=LL_INFINITE_CACHE,
    v2v_cache=LL_INFINITE_CACHE, variant_of="longlive",
    good_for="LongLive for unbounded runs: keys stored without RoPE, the window rotated by slot order every call "
             "(positions never pass 11); equal to LongLive until the window first rolls")

BACKBONES: dict[str, Backbone] = {b.name: b for b in (SDV2, SELF_FORCING, LONGLIVE, LONGLIVE_INFINITE)}


def backbone(name: str | Backbone | None) -> Backbone:
    """The backbone named ``name`` (``None``: StreamDiffusionV2); a clear error for an unknown name."""
    if isinstance(name, Backbone):
        return name
    if name is None:
        return SDV2
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r} (known: {', '.join(BACKBONES)})") from None
