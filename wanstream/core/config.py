"""Configuration as data: model dimension presets and stream settings.

Dims used at load time always come from the checkpoint (``config.json`` and tensor shapes); the presets here
are what ``wanstream init-random`` writes and what tests build.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

# Wan 2.1 T2V ``config.json`` fields (the original Wan layout, as in Wan-AI/Wan2.1-T2V-*).
DIT_PRESETS: dict[str, dict] = {
    "tiny": dict(dim=256, ffn_dim=384, freq_dim=256, num_heads=2, num_layers=2),
    "1.3b": dict(dim=1536, ffn_dim=8960, freq_dim=256, num_heads=12, num_layers=30),
    "14b": dict(dim=5120, ffn_dim=13824, freq_dim=256, num_heads=40, num_layers=40),
}
DIT_COMMON = dict(
    _class_name="WanModel", model_type="t2v", in_dim=16, out_dim=16, text_len=512, text_dim=4096, eps=1e-6,
    patch_size=[1, 2, 2], qk_norm=True, cross_attn_norm=True, window_size=[-1, -1],
)

# Wan VAE base widths per preset (the released VAE is width 96; the tiny test VAE width 8).
VAE_PRESETS: dict[str, int] = {"tiny": 8, "1.3b": 96, "14b": 96}

# Where each preset lives in the released folder layout (relative to the model root).
WAN_FOLDER = {"tiny": "Wan2.1-T2V-tiny", "1.3b": "Wan2.1-T2V-1.3B", "14b": "Wan2.1-T2V-14B"}
VACE_FOLDER = {"tiny": "Wan2.1-VACE-tiny", "1.3b": "Wan2.1-VACE-1.3B", "14b": "Wan2.1-VACE-14B"}   # beside WAN_FOLDER
CAUSAL_FOLDER = {"tiny": "wan_causal_dmd_v2v_tiny", "1.3b": "wan_causal_dmd_v2v", "14b": "wan_causal_dmd_v2v_14b"}

# Hub ids of the released files (used by ``wanstream download``).
HUB_WAN = {"1.3b": "Wan-AI/Wan2.1-T2V-1.3B", "14b": "Wan-AI/Wan2.1-T2V-14B"}
HUB_VACE = {"1.3b": "Wan-AI/Wan2.1-VACE-1.3B", "14b": "Wan-AI/Wan2.1-VACE-14B"}
HUB_CAUSAL = "jerryfeng/StreamDiffusionV2"

# Released per-channel latent statistics of the Wan 2.1 VAE.
LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
               0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
              3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

V2V_STEPS = (700, 500, 400, 200)
T2V_STEPS = (1000, 750, 500, 250)


@dataclass(frozen=True)
class CacheConfig:
    """KV cache policy, counted in latent frames (``configs/wan_causal_dmd_*.yaml`` of the release)."""

    capacity: int = 6           # latent frames held per block and batch row
    sink: int = 3               # the first frames written stay as sinks
    sink_threshold: float = 0.2  # adaptive sink refresh threshold tau; <= -1 disables it
    rope_wrap_at: int = 50      # temporal RoPE position that triggers the refresh ...
    rope_wrap_to: int = 5       # ... and the position it restarts from
    rope_rebase: bool = False   # at the wrap the cached keys are turned back by the same distance (relative
                                # positions kept: no limit, no jump); False: they keep theirs (the released refresh)
    rope_window: bool = False   # keys stored without RoPE; every call rotates the window by slot order (LongLive's
                                # infinite mode: positions 0 .. capacity-1, no limit)

    def __post_init__(self) -> None:
        if not 0 <= self.sink < self.capacity:
            raise ValueError(f"cache sink frames must be in [0, capacity={self.capacity}), got {self.sink}")
        if not 0 <= self.rope_wrap_to < self.rope_wrap_at:
            raise ValueError(f"rope_wrap_to ({self.rope_wrap_to}) must be below rope_wrap_at ({self.rope_wrap_at})")


V2V_CACHE = CacheConfig()
T2V_CACHE = CacheConfig(capacity=21, sink=0, sink_threshold=-1.0, rope_wrap_at=1000, rope_wrap_to=20)


@dataclass
class StreamSettings:
    """Per-stream knobs. Everything here may differ between streams served by one model."""

    steps: int = 2
    noise_scale: float = 0.8
    noise_controller: bool = True
    batch: bool = True              # stream batch (one DiT call per chunk) vs sequential steps per chunk
    seed: int = 0
    mode: str = "v2v"               # "v2v" | "t2v"
    frames_per_block: int = 1       # latent frames per DiT call (t2v: 3)
    cache: CacheConfig = field(default_factory=CacheConfig)
    lora: tuple[float, ...] | None = None   # LoRA strengths, one per loaded LoRA (models/lora.py); None: defaults

    def __post_init__(self) -> None:
        if self.mode not in ("v2v", "t2v"):
            raise ValueError(f"mode must be 'v2v' or 't2v', got {self.mode!r}")
        if not 1 <= int(self.steps) <= 4:
            raise ValueError(f"steps must be an integer in 1..4, got {self.steps}")
        if not 0.0 < float(self.noise_scale) <= 1.0:
            raise ValueError(f"noise_scale must be in (0, 1], got {self.noise_scale}")
        self.seed = check_seed(self.seed)


MAX_SEED = 2**32 - 1                    # seeds are 0 .. 2**32 - 1 everywhere (CLI, API, server, OSC, presets)
QUANTIZE_MODES = ("int8", "fp8")      # DiT block linears: int8 weight-only (any device), fp8 (CUDA, CC >= 8.9)



def check_seed(seed: int) -> int:
    """A seed in ``0 .. MAX_SEED`` (the one documented range), else a ValueError naming it."""
    try:
        value = None if isinstance(seed, bool) else operator.index(seed)
    except TypeError:
        value = None
    if value is None or not 0 <= value <= MAX_SEED:
        raise ValueError(f"seed must be an integer in 0..{MAX_SEED}, got {seed!r}")
    return value


# dtype names a command accepts → the torch dtype attribute (``getattr(torch, name)``), kept torch-free here
DTYPE_NAMES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
               "fp32": "float32", "float32": "float32"}
