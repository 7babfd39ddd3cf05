"""Scaling model of the pipeline: throughput, time to first frame, latency and per-rank memory for W = 1..4 ranks,
predicted from single-device stage costs — and, where several devices are at hand, the same quantities measured.

Model (one chunk = 1 latent frame = 4 video frames; stream batch of n = steps rows):

* per-block DiT time ``c(n) = dit_ms[n] / L`` (a whole-DiT call at batch n, measured on one device);
* stage times: rank 0 ``encode + c(n)·n_0``, middle ranks ``c(n)·n_i``, last ``decode + c(n)·n_last``; one device:
  ``encode + decode + dit_ms[n]``; with W ranks the block counts are the block scheduler's plan
  (:func:`~wanstream.core.block_scheduler.plan_split`) or the even split;
* each hop carries the activations ``n × tokens × dim`` plus the slot latents (bf16): ``bytes / bandwidth +
  latency`` per hop; with asynchronous sends a stage costs ``max(compute, comm)``, without ``compute + comm``;
* throughput ``= 4 frames / max_i stage_i`` (one chunk leaves per micro-step once the ring is full);
* latency of a chunk (compute only) ``≈ n · W · micro-step`` (it is processed in n ring traversals of W stages);
* TTFF ``= 5 frames / input fps`` (buffering the first chunk) ``+ encode(5) + n full sequential DiT passes
  over 2 latent frames + W·n hops + decode(2 latents)``;
* memory of rank r: its blocks' weights + the shared embedders/head (every rank) + its blocks' KV caches
  (n rows × capacity × tokens × dim × 2) + prompt K/V + the VAE on the first and last rank (+ the text encoder on
  rank 0, listed separately) + one call's activations.

The built-in profiles (``paper-h100``) are NOT our measurements: no H100 was available. They decompose the
paper's own single-H100 throughputs (Fig. 8 and Fig. 9b, 1-GPU rows) into VAE and DiT time using the per-rank
VAE times of Fig. 11 (encode 50 ms, decode 86 ms per chunk at 480p; scaled by pixels for 512²; see
:func:`paper_profiles`). Only the 1-GPU rows are inputs; every multi-GPU number is a prediction.
``measure_profile`` measures the same inputs on any device with a real model; ``scripts/scaling_model.py
--measure-pipeline`` runs the real pipeline and reports measured numbers instead.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from wanstream.core.block_scheduler import even_split, plan_split
from wanstream.core.chunking import CHUNK_FRAMES, FIRST_CHUNK_FRAMES

TEXT_LEN = 512
VAE_PARAMS = 126_900_000           # Wan 2.1 VAE
T5_PARAMS = 5_680_000_000          # umT5-XXL encoder

DIMS = {  # Wan 2.1 T2V (config.json of the releases)
    "1.3B": dict(dim=1536, ffn_dim=8960, layers=30),
    "14B": dict(dim=5120, ffn_dim=13824, layers=40),
}
RESOLUTIONS = {"512x512": (512, 512), "480p": (832, 480)}

# Paper numbers (spec §5.2 Fig. 8 H100 rows, §5.3 Fig. 9b, §5.7 Fig. 14): FPS[model][res][W] = [1..4 steps].
PAPER_FPS = {
    "1.3B": {"480p": {1: [20.47, 17.97, 15.68, 13.95], 2: [39.77, 34.67, 30.69, 27.06],
                      3: [43.88, 43.79, 41.13, 38.09], 4: [44.38, 43.41, 43.08, 42.26]},
             "512x512": {1: [26.21, 24.02, 21.51, 19.43], 2: [51.76, 46.92, 41.09, 37.49],
                         3: [63.45, 62.76, 56.75, 54.09], 4: [64.52, 63.99, 62.43, 61.57]}},
    "14B": {"480p": {1: [12.68, 8.64, 6.49, 5.28], 2: [25.39, 17.31, 13.23, 10.69],
                     3: [37.55, 25.02, 19.12, 15.42], 4: [39.24, 33.36, 25.02, 20.05]},
            "512x512": {1: [18.71, 13.01, 10.09, 8.26], 2: [37.12, 25.72, 20.11, 16.65],
                        3: [53.84, 37.47, 29.34, 24.35], 4: [58.28, 51.09, 38.41, 31.62]}},
}
PAPER_FIG14 = {  # acceleration of "Ours" with 2 / 4 GPUs: (a) DiT only, (b) whole pipeline
    "512x512": {"dit": (1.82, 3.23), "all": (1.97, 2.46)},
    "480p": {"dit": (1.71, 3.14), "all": (1.94, 2.17)},
}
PAPER_TTFF_S = {"16 fps": 0.47, "30 fps": 0.36}   # Fig. 9a, 2 steps, 1.3B-class, 1 H100
FIG11_ENCODE_MS, FIG11_DECODE_MS = 50.0, 86.0       # per chunk, 480p, 1.3B, H100


@dataclass
class Profile:
    """Single-device stage costs of one model at one resolution (all times in ms, per chunk)."""

    model: str
    resolution: str
    width: int
    height: int
    dim: int
    ffn_dim: int
    layers: int
    encode_ms: float                  # VAE encode of a 4-frame chunk
    decode_ms: float                  # VAE decode of one latent → 4 frames
    dit_ms: dict[int, float]          # one whole-DiT call with a stream batch of n rows (n = steps)
    source: str = ""
    dtype_bytes: int = 2
    vae_params: int = VAE_PARAMS

    @property
    def tokens(self) -> int:
        return (self.height // 16) * (self.width // 16)

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.height // 8, self.width // 8

    def dit(self, n: int) -> float:
        return float(self.dit_ms[n] if n in self.dit_ms else self.dit_ms[str(n)])

    @classmethod
    def load(cls, path: str | Path) -> list["Profile"]:
        data = json.loads(Path(path).read_text())
        items = data if isinstance(data, list) else [data]
        out = []
        for d in items:
            d["dit_ms"] = {int(k): float(v) for k, v in d["dit_ms"].items()}
            out.append(cls(**d))
        return out


@dataclass
class Link:
    bandwidth_gbs: float = 100.0      # effective point-to-point bandwidth between neighbouring ranks
    latency_ms: float = 0.05          # per message
    overlap: bool = True              # sends / receives overlap compute (side streams)
    overhead_ms: float = 0.0          # per micro-step cost of running distributed that no overlap hides


@dataclass
class Prediction:
    model: str
    resolution: str
    world: int
    steps: int
    fps: float
    micro_step_ms: float
    latency_ms: float
    ttff_ms: float                    # compute part of the time to first frame
    split: list[int]
    stage_ms: list[float]
    hop_mb: float
    rank_mem_gb: list[float]          # per rank, without the text encoder
    t5_gb: float
    dit_only_speedup: float = 1.0
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ parameters
def block_params(dim: int, ffn: int) -> int:
    attn = 4 * (dim * dim + dim) + 2 * dim          # q, k, v, o (+ bias) and the q/k RMS norms
    return 2 * attn + 2 * dim + (2 * dim * ffn + ffn + dim) + 6 * dim


def shared_params(dim: int, text_dim: int = 4096, freq_dim: int = 256, in_ch: int = 16, patch: int = 4) -> int:
    patch_embed = dim * in_ch * patch + dim
    text = text_dim * dim + dim + dim * dim + dim
    time_emb = freq_dim * dim + dim + dim * dim + dim + 6 * dim * dim + 6 * dim
    head = in_ch * patch * dim + in_ch * patch + 2 * dim
    return patch_embed + text + time_emb + head


def hop_bytes(p: Profile, rows: int) -> int:
    h, w = p.latent_hw
    return rows * p.tokens * p.dim * p.dtype_bytes + rows * 16 * h * w * p.dtype_bytes + 64 * 8


def rank_memory_bytes(p: Profile, counts: list[int], steps: int, capacity: int = 6) -> list[int]:
    """Per-rank bytes: weights of its blocks + shared parts, its KV caches and prompt K/V, VAE on the ends,
    and one call's activations (hidden, FFN intermediate, attention scores)."""
    b = p.dtype_bytes
    rows = steps
    per_block_w = block_params(p.dim, p.ffn_dim) * b
    per_block_kv = rows * capacity * p.tokens * p.dim * 2 * b + 2 * TEXT_LEN * p.dim * b
    act = rows * p.tokens * (4 * p.dim + p.ffn_dim) * b + rows * (p.dim // 128) * p.tokens * \
        (capacity * p.tokens + TEXT_LEN) * b
    out = []
    for r, n in enumerate(counts):
        mem = shared_params(p.dim) * b + n * (per_block_w + per_block_kv) + act
        if r == 0 or r == len(counts) - 1:
            mem += p.vae_params * b
        out.append(mem)
    return out


# ------------------------------------------------------------------------------------------ prediction
def predict(p: Profile, world: int, steps: int, link: Link = Link(), split: str = "balanced",
            input_fps: float = 16.0) -> Prediction:
    n = steps
    dit = p.dit(n)
    per_block = dit / p.layers
    hop_ms = hop_bytes(p, n) / (link.bandwidth_gbs * 1e9) * 1e3 + link.latency_ms
    if world == 1:
        counts = [p.layers]
        compute = [p.encode_ms + p.decode_ms + dit]
        comm = [0.0]
    else:
        fixed = [p.encode_ms] + [0.0] * (world - 2) + [p.decode_ms]
        if split == "balanced":
            counts = plan_split(fixed, [per_block] * world, p.layers)
        else:
            counts = [b - a for a, b in even_split(p.layers, world)]
        compute = [f + per_block * c for f, c in zip(fixed, counts)]
        comm = [hop_ms] * world
    stage = [max(c, m) if link.overlap else c + m for c, m in zip(compute, comm)]
    if world > 1:
        stage = [t + link.overhead_ms for t in stage]
    micro = max(stage)
    fps = CHUNK_FRAMES / micro * 1e3
    latency = n * world * micro
    # first chunk: 5 frames → 2 latents, n sequential full passes at batch 1 over 2 latent frames (≈ the cost of
    # a 2-row call), each through all W ranks
    first_pass = p.dit(2) if 2 in p.dit_ms or "2" in p.dit_ms else 2 * p.dit(1)
    ttff = (p.encode_ms * FIRST_CHUNK_FRAMES / CHUNK_FRAMES + n * first_pass
            + (n * (world * hop_ms + link.overhead_ms) if world > 1 else 0.0)
            + p.decode_ms * FIRST_CHUNK_FRAMES / CHUNK_FRAMES)
    dit_even = [b - a for a, b in even_split(p.layers, world)]
    dit_only = dit / (max(dit_even) * per_block + (((0.0 if link.overlap else hop_ms) + link.overhead_ms)
                                                    if world > 1 else 0.0))
    mem = rank_memory_bytes(p, counts, steps)
    return Prediction(p.model, p.resolution, world, steps, fps, micro, latency, ttff, counts, stage,
                      hop_bytes(p, n) / 1e6, [m / 1e9 for m in mem], T5_PARAMS * p.dtype_bytes / 1e9, dit_only,
                      extra=dict(input_fps=input_fps))


# ------------------------------------------------------------------------------------------ profiles
def paper_profiles() -> list[Profile]:
    """Stage costs decomposed from the paper's single-H100 numbers (see the module docstring).

    480p: VAE = Fig. 11 (encode 50 + decode 86 ms per chunk); DiT(n) = 4 frames / FPS_1gpu(n) − VAE.
    512²: VAE scaled by the pixel count (a convolutional VAE's cost is proportional to pixels), DiT(n) the rest.
    Check of that choice: the 14B DiT then scales 480p → 512² by 0.64–0.69, close to the token ratio 0.66
    (compute-bound), while the 1.3B at n = 1 comes out slightly above its 480p value (overhead-bound).
    """
    def call_ms(fps):
        return CHUNK_FRAMES / fps * 1e3

    ref_w, ref_h = RESOLUTIONS["480p"]
    out = []
    for m, dims in DIMS.items():
        for res, (w, h) in RESOLUTIONS.items():
            scale = (w * h) / (ref_w * ref_h)
            enc, dec = FIG11_ENCODE_MS * scale, FIG11_DECODE_MS * scale
            dit = {n: call_ms(PAPER_FPS[m][res][1][n - 1]) - enc - dec for n in range(1, 5)}
            src = ("paper 1xH100 FPS (Fig. 8 / 9b) minus Fig. 11 VAE times" + ("" if res == "480p" else
                   f" scaled by pixels (x{scale:.3f})"))
            out.append(Profile(m, res, w, h, dims["dim"], dims["ffn_dim"], dims["layers"], enc, dec, dit,
                               source=src))
    return out


def measure_profile(model_dir: str | Path, device: str = "cuda", width: int = 512, height: int = 512,
                    repeats: int = 5, name: str | None = None, resolution: str | None = None) -> Profile:
    """Measure the inputs on one device with a real model: whole-DiT call at batch n = 1..4 (steady-state
    stream batch), VAE encode of 4 frames, VAE decode of one latent."""
    import torch

    from wanstream.core.config import CacheConfig
    from wanstream.engine.latent_stream import LatentStream
    from wanstream.engine.noise import SeededNoise
    from wanstream.models.loader import load_model

    bundle = load_model(model_dir, device=device, text_encoder=False)
    dev = bundle.device
    cfg = bundle.dit.transformer.config

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def best(fn):
        fn()
        sync()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t)
        return min(times) * 1e3

    tokens = bundle.tokens_per_frame(height, width)
    context = torch.zeros(1, 16, cfg.text_dim, device=dev, dtype=bundle.dtype)
    dit_ms = {}
    h, w = height // 8, width // 8
    with torch.no_grad():
        for n in range(1, 5):
            ls = LatentStream(bundle.dit, bundle.sampler, bundle.dit.embed_prompt(context), SeededNoise(0, dev),
                              tokens_per_frame=tokens, steps=n, cache=CacheConfig())
            ls.prepare(torch.zeros(1, 2, 16, h, w, device=dev, dtype=bundle.dtype), 0.8)
            z = torch.zeros(1, 1, 16, h, w, device=dev, dtype=bundle.dtype)
            t = torch.tensor(600, device=dev)
            ids = itertools.count()
            for _ in range(n + 1):        # fill every slot
                ls.push(z, 0.8, t, next(ids))
            dit_ms[n] = best(lambda: ls.push(z, 0.8, t, next(ids)))
        state = bundle.vae.new_state()
        frames = torch.zeros(1, 4, 3, height, width, device=dev, dtype=bundle.dtype)
        bundle.vae.encode(state, torch.zeros(1, 1, 3, height, width, device=dev, dtype=bundle.dtype))
        enc = best(lambda: bundle.vae.encode(state, frames))
        dstate = bundle.vae.new_state()
        lat = torch.zeros(1, 1, 16, h, w, device=dev, dtype=bundle.dtype)
        bundle.vae.decode(dstate, lat)
        dec = best(lambda: bundle.vae.decode(dstate, lat))
    dim = cfg.num_attention_heads * cfg.attention_head_dim
    return Profile(name or f"{cfg.num_layers}-block", resolution or f"{width}x{height}", width, height, dim,
                   cfg.ffn_dim, cfg.num_layers, enc, dec, dit_ms,
                   source=f"measured on {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'})",
                   dtype_bytes=torch.empty((), dtype=bundle.dtype).element_size(),
                   vae_params=sum(q.numel() for q in bundle.vae.vae.parameters()))


# ------------------------------------------------------------------------------------------ tables
def _fmt(x: float, digits: int = 1) -> str:
    return f"{x:.{digits}f}" if math.isfinite(x) else "—"


def markdown(profiles: list[Profile], link: Link = Link(), worlds=(1, 2, 3, 4), steps=(1, 2, 3, 4),
             split: str = "balanced", command: str = "") -> str:
    """The prediction tables (labelled *predicted*), with the paper's numbers beside them where it has them."""
    lines = []
    lines.append("### Scaling model — **predicted** (not measured)\n")
    if command:
        lines.append(f"Produced by `{command}`.\n")
    lines.append(f"Link: {link.bandwidth_gbs:g} GB/s per hop, {link.latency_ms:g} ms per message, "
                 f"{'overlapped with compute' if link.overlap else 'not overlapped'}, "
                 f"{link.overhead_ms:g} ms distributed overhead per micro-step; block split: "
                 f"{'block-scheduler plan' if split == 'balanced' else 'even'}.\n")
    for p in profiles:
        lines.append(f"- inputs `{p.model} {p.resolution}`: encode {p.encode_ms:.1f} ms, decode {p.decode_ms:.1f} "
                     f"ms, DiT call n=1..4: {', '.join(f'{p.dit(n):.1f}' for n in steps)} ms — {p.source}")
    lines.append("")
    lines.append("Throughput, FPS — predicted / paper (Fig. 8, 1.3B H100; Fig. 9b, 14B H100):\n")
    lines.append("| model | resolution | GPUs | " + " | ".join(f"{s} step{'s' if s > 1 else ''}" for s in steps) +
                 " | block split (4 steps) |")
    lines.append("|---|---|---|" + "---|" * len(steps) + "---|")
    for p in profiles:
        for w in worlds:
            cells = []
            for s in steps:
                pr = predict(p, w, s, link, split)
                paper = PAPER_FPS.get(p.model, {}).get(p.resolution, {}).get(w)
                cells.append(f"{pr.fps:.1f} / {paper[s - 1]:.2f}" if paper else f"{pr.fps:.1f}")
            split4 = predict(p, w, steps[-1], link, split).split
            lines.append(f"| {p.model} | {p.resolution} | {w} | " + " | ".join(cells) + f" | {split4} |")
    lines.append("")
    lines.append("Acceleration with 2 / 4 GPUs, 1 step — predicted / paper (Fig. 14: (a) DiT only, (b) whole "
                 "pipeline):\n")
    lines.append("| model | resolution | (a) DiT 2 | (a) DiT 4 | (b) all 2 | (b) all 4 |")
    lines.append("|---|---|---|---|---|---|")
    for p in profiles:
        one = predict(p, 1, 1, link, split).fps
        cells = []
        paper = PAPER_FIG14.get(p.resolution) if p.model == "1.3B" else None
        for kind, idx in (("dit", 0), ("dit", 1), ("all", 0), ("all", 1)):
            w = 2 if idx == 0 else 4
            val = predict(p, w, 1, link, split).dit_only_speedup if kind == "dit" else predict(p, w, 1, link,
                                                                                              split).fps / one
            cells.append(f"{val:.2f} / {paper[kind][idx]:.2f}" if paper else f"{val:.2f}")
        lines.append(f"| {p.model} | {p.resolution} | " + " | ".join(cells) + " |")
    lines.append("")
    def grid(title: str, cell) -> None:
        lines.append(title + "\n")
        lines.append("| model | resolution | GPUs | " + " | ".join(f"{s} step{'s' if s > 1 else ''}" for s in steps)
                     + " |")
        lines.append("|---|---|---|" + "---|" * len(steps))
        for p in profiles:
            for w in worlds:
                lines.append(f"| {p.model} | {p.resolution} | {w} | "
                             + " | ".join(cell(predict(p, w, s, link, split)) for s in steps) + " |")
        lines.append("")

    grid("Time to first frame, ms — predicted: compute of the first chunk (5 frames → prepare through all "
         "ranks → decode) / with buffering the 5 frames at 16 fps input (paper Fig. 9a, 1 GPU, 2 steps: 470 ms "
         "@16 fps, 360 ms @30 fps):", lambda pr: f"{pr.ttff_ms:.0f} / {pr.ttff_ms + FIRST_CHUNK_FRAMES / 16 * 1e3:.0f}")
    grid("Chunk latency (enter rank 0 → decoded, compute only), ms / micro-step (pipeline period), ms — predicted:",
         lambda pr: f"{pr.latency_ms:.0f} / {pr.micro_step_ms:.1f}")
    grid("Memory per rank, GB (bf16 weights of its blocks + shared embedders/head, its KV caches and prompt K/V, "
         "VAE on the first and last rank, one call's activations; text encoder not included) — predicted:",
         lambda pr: ", ".join(f"{m:.1f}" for m in pr.rank_mem_gb))
    t5 = T5_PARAMS * 2 / 1e9
    lines.append(f"\nRank 0 also holds the text encoder (umT5-XXL, {t5:.1f} GB bf16) unless prompts come as "
                 f"embeddings. Paper TTFF (Fig. 9a, 2 steps, 1 GPU): {PAPER_TTFF_S['16 fps']} s @16 fps, "
                 f"{PAPER_TTFF_S['30 fps']} s @30 fps input.")
    return "\n".join(lines) + "\n"


def to_json(predictions: list[Prediction]) -> str:
    return json.dumps([asdict(p) for p in predictions], indent=1)


# ------------------------------------------------------------------------------------------ measuring
@dataclass
class Measurement:
    world: int
    steps: int
    fps: float                  # output frames per second after the first output
    ttff_ms: float              # first push → first output frame (frames pushed as fast as accepted)
    latency_ms: float           # median input push → output frame
    frames: int
    rank_mem_gb: list[float]
    split: list[int]


def measure_pipeline(model_dir: str | Path, devices: list[str], steps: int, width: int, height: int,
                     frames: int = 81, prompt_dim: int = 4096, seed: int = 0, rebalance: bool = True,
                     timeout: float = 300.0, threads: int | None = None) -> Measurement:
    """Run the real pipeline (W = len(devices) >= 2) on synthetic frames and measure it."""
    import numpy as np
    import torch

    from wanstream.api.pipeline_session import PipelineSession
    gen = np.random.default_rng(seed)
    clip = gen.integers(0, 256, size=(frames, height, width, 3), dtype=np.uint8)
    embeds = torch.zeros(1, 16, prompt_dim)
    session = PipelineSession(model_dir, devices=devices, prompt_embeds=embeds, width=width, height=height,
                              steps=steps, seed=seed, rebalance=rebalance, timeout=timeout, threads=threads)
    pushed: dict[int, float] = {}
    outs: list[tuple[int, float]] = []
    t0 = time.perf_counter()
    try:
        for start in range(0, frames, CHUNK_FRAMES):
            now = time.perf_counter()
            for i in range(start, min(start + CHUNK_FRAMES, frames)):
                pushed[i] = now
            got = session.push(clip[start: start + CHUNK_FRAMES])
            outs += [(o.index, time.perf_counter()) for o in got]
        outs += [(o.index, time.perf_counter()) for o in session.flush()]
        split = [b - a for a, b in session.split]
    finally:
        session.close()
    mem = session.driver.memory_report()
    first = min(t for _, t in outs)
    later = [t for _, t in outs if t > first]
    fps = (len(later) / (max(later) - first)) if later else float("nan")
    lat = sorted((t - pushed[i]) * 1e3 for i, t in outs)
    return Measurement(len(devices), steps, fps, (first - t0) * 1e3, lat[len(lat) // 2], len(outs),
                       [m / 1e9 for m in mem], split)


def measured_markdown(rows: list[Measurement], command: str = "", label: str = "") -> str:
    lines = [f"### Pipeline — **measured** {label}\n"]
    if command:
        lines.append(f"Produced by `{command}`.\n")
    lines.append("| GPUs | steps | FPS | TTFF ms | median latency ms | frames | memory per rank GB | final split |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for m in rows:
        lines.append(f"| {m.world} | {m.steps} | {m.fps:.2f} | {m.ttff_ms:.0f} | {m.latency_ms:.0f} | {m.frames} | "
                     f"{', '.join(f'{g:.2f}' for g in m.rank_mem_gb)} | {m.split} |")
    return "\n".join(lines) + "\n"
