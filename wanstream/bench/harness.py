"""``wanstream bench``: a live-source benchmark of one or many streams, with definitions behind every figure.

N streams (``--sessions N``, own prompt and seed each) of one :class:`~wanstream.engine.loop.Engine` are fed a
synthetic clip with motion one frame at a time, as live sources: frame ``i`` of every stream arrives at
``t0 + i / input_fps`` (real time; when the model is slower than the input, frames queue and their wait counts in
their latency), or, with ``--input-fps max``, the moment the previous tick returned. Every figure is defined in
``docs/benchmarks.md``; in short:

* the model is warm (a throw-away run of a few chunks first), the measured streams start cold;
* ``ttff_s``: first input frame's arrival → first output frame (the worst stream's);
* the first ``warmup`` chunks of every stream fill the stream batch and the KV cache and are left out of every
  steady-state figure: FPS, per-stage times, latency, jitter, deadline misses, roofline;
* ``fps_e2e``: output frames per second of wall time over the steady window, all streams together
  (``fps_per_session_min``: the slowest stream's); ``fps_capacity``: input frames per second of busy time (what
  the engine sustains when never starved of input); ``fps_denoise``: input frames per second of DiT time;
* ``stage_ms``: mean per engine tick of encode, DiT and decode (the engine's own timings: CUDA events on a GPU,
  wall clock on the CPU) and host = tick wall time − the three;
* ``dit_calls``, ``rows_per_call_mean``: DiT calls of the steady window and their mean batch rows;
* ``--compare-round-robin``: the same streams served one stream per tick (the old server), measured in the same
  process, reported under ``round_robin``;
* ``--compile``: the fast path compiled (the steady-state DiT call per call layout, CUDA graphs on a GPU, and the
  VAE's steady encode / decode); ``--quantize int8|fp8``: the DiT's block linears quantised;
* ``--compare-eager``: the same row also on the eager reference path (diffusers' own VAE modules, nothing
  compiled), alternated ABBA in one process, reported under ``eager`` with the paired ratios fast / eager of the
  chunk time and of the VAE time (``vs_eager``).
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from wanstream.bench import roofline
from wanstream.core.chunking import SDV2_RULE, ChunkRule
from wanstream.core.config import DTYPE_NAMES

SCHEMA = "wanstream-bench/2"
COMPARED = ("sessions", "policy", "fps_aggregate", "fps_per_session_min", "fps_capacity", "fps_denoise",
            "latency_ms", "deadline_miss_rate", "dit_calls", "rows_per_call_mean", "dit_call_ms", "ttff_s")
STAGES = ("encode", "dit", "decode")


# ------------------------------------------------------------------------------------------------- config
@dataclass
class BenchConfig:
    width: int = 512
    height: int = 512
    steps: int = 2
    batch: bool = True
    input_fps: float | None = None      # None: as fast as possible ("max")
    frames: int = 245
    warmup: int = 10                    # chunks of the measured stream left out of steady-state figures
    target_latency_s: float = 1.0
    seed: int = 0
    decoder: str = "vae"
    encoder: str = "vae"                # vae | taehv (``--taehv encode|both``)
    prime_chunks: int | None = None     # chunks of the throw-away priming stream (default: steps + 2)
    sessions: int = 1                   # streams of the engine, fed together (own prompt and seed each)
    drift_watchdog: bool = False        # the drift watchdog on every measured stream (its cost: drift_ms_per_chunk)
    reference: object = None            # a VACE reference image (uint8 [H, W, 3]) on every measured stream
    control: str | None = None          # a VACE control kind on every measured stream (bench/conditioning.py)
    conditioning_row: bool = False      # a row of the plain / conditioned pair (labelled in its table)
    rule: ChunkRule = SDV2_RULE         # the backbone's chunk rule (set from the loaded model)

    @property
    def conditioned(self) -> bool:
        return self.reference is not None or self.control is not None

    @property
    def mode(self) -> str:
        return "stream_batch" if self.batch else "no_batch"

    @property
    def resolution(self) -> str:
        return f"{self.width}x{self.height}"

    def chunks(self) -> int:
        """Chunks the pushes of ``frames`` input frames process (the end-of-stream remainder is not measured)."""
        return self.rule.chunks_in(self.frames)

    def validate(self) -> None:
        if not 1 <= self.steps <= 4:
            raise ValueError(f"steps must be in 1..4, got {self.steps}")
        if self.warmup < 1:
            raise ValueError(f"warmup must be at least 1 chunk (the first chunk primes the stream), got {self.warmup}")
        # the first measured chunk must leave the stream batch (``steps`` calls later) before the input ends
        need_chunks = self.warmup + max(2, self.steps if self.batch else 1)
        if self.chunks() < need_chunks:
            need = self.rule.frames_for(need_chunks)
            raise ValueError(f"--frames {self.frames} gives {self.chunks()} chunks; with --warmup {self.warmup} and "
                             f"{self.steps} steps ({self.mode}) at least {need} frames are needed")
        if self.input_fps is not None and self.input_fps <= 0:
            raise ValueError(f"input fps must be positive or 'max', got {self.input_fps}")
        if self.target_latency_s <= 0:
            raise ValueError(f"target latency must be positive, got {self.target_latency_s}")
        if self.sessions < 1:
            raise ValueError(f"sessions must be at least 1, got {self.sessions}")


# -------------------------------------------------------------------------------------------- machine info
def git_commit() -> tuple[str, bool | None]:
    """Short commit of the source tree and whether tracked files differ from it (``WANSTREAM_COMMIT`` wins)."""
    env = os.environ.get("WANSTREAM_COMMIT")
    if env:
        return env, None
    root = Path(__file__).resolve().parent.parent
    git = ["git", "--no-optional-locks"]      # never touch the index (another process may be committing)
    try:
        commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=10, check=True).stdout
        return commit, bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        return "unknown", None


def device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"device": torch.cuda.get_device_name(device), "device_type": "cuda",
                "device_memory_bytes": props.total_memory, "sm_count": props.multi_processor_count,
                "cuda": torch.version.cuda}
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"device": f"CPU: {name} ({os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads)",
            "device_type": "cpu"}


class PeakMemory:
    """CUDA ``max_memory_allocated`` on a GPU; the process resident-set peak (VmHWM) on the CPU.

    On Linux the RSS peak is reset at :meth:`start` (``/proc/self/clear_refs``); where that is not possible the
    figure is the process-lifetime peak and ``kind`` says so.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "rss_peak"

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.kind = "rss_peak_process_lifetime"

    def read(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        scale = 1 if sys.platform == "darwin" else 1024
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


# ---------------------------------------------------------------------------------------------- the source
def synthetic_prompt(text_dim: int, seed: int = 0) -> torch.Tensor:
    """A fixed stand-in prompt embedding ``[1, 16, text_dim]`` (zero-padded to 512 rows by the DiT).

    Speed does not depend on the prompt: cross-attention always spans all 512 text rows.
    """
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, 16, text_dim, generator=gen) * 0.1


class LiveClip:
    """The synthetic motion clip as an endless source: ``frame(i)`` plays it forth and back (no jump cut)."""

    def __init__(self, width: int, height: int, length: int, seed: int = 0):
        from wanstream.io.video import make_motion_clip
        self.frames = make_motion_clip(max(2, length), width, height, seed=seed)

    def frame(self, i: int) -> np.ndarray:
        n = len(self.frames)
        period = 2 * n - 2
        j = i % period
        return self.frames[j if j < n else period - j]


# ------------------------------------------------------------------------------------------------ one row
def _open(engine, cfg: BenchConfig, prompts: list[torch.Tensor]) -> list:
    streams = [engine.open(prompt_embeds=p, width=cfg.width, height=cfg.height, steps=cfg.steps, batch=cfg.batch,
                           seed=cfg.seed + k, decoder=cfg.decoder, encoder=cfg.encoder) for k, p in enumerate(prompts)]
    if cfg.conditioned:
        for s in streams:
            engine.set_conditioning(s, reference=cfg.reference if cfg.reference is not None else ...,
                                    control=cfg.control)
    return streams


def _source(clip: "LiveClip", k: int, i: int) -> np.ndarray:
    """Frame ``i`` of stream ``k`` (streams start at different points of the clip)."""
    return clip.frame(i + 7 * k)[None]


def _prime(model, cfg: BenchConfig, prompts: list[torch.Tensor], clip: LiveClip, policy: str,
           compile: bool = False) -> float:
    """Throw-away streams as fast as possible: loads kernels, allocator pools, autotuning. Returns seconds."""
    from wanstream.engine.loop import Engine
    chunks = cfg.prime_chunks if cfg.prime_chunks is not None else cfg.steps + 2
    t0 = time.perf_counter()
    if chunks <= 0:
        return 0.0
    engine = Engine(model, policy=policy, compile=compile)
    streams = _open(engine, cfg, prompts)
    for i in range(cfg.rule.frames_for(chunks)):
        for k, s in enumerate(streams):
            engine.feed(s, _source(clip, k, i))
        engine.run_until_idle()
    for s in streams:
        engine.finish(s)
    engine.run_until_idle()
    for s in streams:
        engine.close(s)
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    return time.perf_counter() - t0


def _wait_until(t: float) -> None:
    while True:
        left = t - time.perf_counter()
        if left <= 0:
            return
        time.sleep(left if left > 2e-3 else 0)


def _mean(xs) -> float | None:
    xs = list(xs)
    return float(sum(xs) / len(xs)) if xs else None


@dataclass
class _Tick:
    start: float
    end: float
    entered: dict            # stream index → chunk index that entered in this tick
    phases: dict = field(default_factory=dict)
    rows: int = 0
    calls: int = 0


@torch.no_grad()
def run_stream(model, cfg: BenchConfig, prompt: torch.Tensor | list[torch.Tensor], clip: LiveClip,
               costs: dict | None = None, peaks: dict | None = None, policy: str = "continuous",
               compile: bool = False) -> dict:
    """Prime, then run the measured live streams (one per prompt); returns one result row (see
    ``docs/benchmarks.md``)."""
    from wanstream.engine.loop import Engine
    from wanstream.engine.metrics import StreamMetrics
    cfg.validate()
    prompts = list(prompt) if isinstance(prompt, (list, tuple)) else [prompt]
    n = len(prompts)
    device = model.device
    prime_s = _prime(model, cfg, prompts, clip, policy, compile)
    memory = PeakMemory(device)
    memory.start()
    from wanstream.engine.drift import DriftConfig
    engine = Engine(model, policy=policy, compile=compile, drift=DriftConfig() if cfg.drift_watchdog else None)
    streams = _open(engine, cfg, prompts)
    metrics = [StreamMetrics(target_latency_s=cfg.target_latency_s) for _ in streams]
    outputs: list[list[tuple[float, int]]] = [[] for _ in streams]     # per stream: (time, frames) of each tick
    ticks: list[_Tick] = []
    backlog_max = 0
    t_ref = None
    order_ok = True
    next_index = [0] * n
    warm_frames = cfg.rule.frames_for(cfg.warmup)
    samples = 0
    t_start = time.perf_counter()
    for i in range(cfg.frames):
        if cfg.input_fps is None:
            arrival = time.perf_counter()
        else:
            arrival = t_start + i / cfg.input_fps
            _wait_until(arrival)
        for k, s in enumerate(streams):
            engine.feed(s, _source(clip, k, i), [arrival])
            metrics[k].on_input(timestamp=arrival)
        while any(s.buffer.ready() for s in streams):
            before = [s.record.next_chunk for s in streams]
            t0 = time.perf_counter()
            engine.step()
            t1 = time.perf_counter()
            ticks.append(_Tick(t0, t1, {k: before[k] for k, s in enumerate(streams) if s.record.next_chunk != before[k]}))
            for k, s in enumerate(streams):
                out = s.take_outputs()
                if not out:
                    continue
                metrics[k].on_output(len(out), now=t1)
                outputs[k].append((t1, len(out)))
                for o in out:
                    order_ok &= o.index == next_index[k]
                    next_index[k] += 1
                    samples += o.index >= warm_frames
            if t_ref is None and all(s.record.next_chunk >= cfg.warmup for s in streams):
                # steady state starts: forget warm-up samples, skip the warm-up frames still in flight
                t_ref = t1
                for k, s in enumerate(streams):
                    metrics[k].reset_stats(keep_pending=True)
                    metrics[k].warmup(max(0, warm_frames - s.stats.frames_out))
        if cfg.input_fps is not None:
            arrived = min(cfg.frames, int((time.perf_counter() - t_start) * cfg.input_fps) + 1)
            backlog_max = max(backlog_max, arrived - (i + 1))
    t_end = time.perf_counter()
    summaries = [m.summary() for m in metrics]
    peak_mem = memory.read()
    for (info, phases), tick in zip(engine.timer.ticks(wait=True), ticks):
        tick.phases, tick.rows, tick.calls = phases, info.get("rows", 0), info.get("calls", 0)
    dit_calls_total = engine.dit_calls
    for s in streams:
        engine.finish(s)
    engine.run_until_idle()
    for k, s in enumerate(streams):
        for o in s.take_outputs():
            order_ok &= o.index == next_index[k]
            next_index[k] += 1
    total_in = sum(s.frames_in for s in streams)
    total_out = sum(s.stats.frames_out for s in streams)
    for s in streams:
        engine.close(s)
    if t_ref is None:
        raise ValueError("the measured streams never left their warm-up chunks; give more --frames")

    steady = [t for t in ticks if t.entered and min(t.entered.values()) >= cfg.warmup]
    chunks = sum(len(t.entered) for t in steady)
    busy = sum(t.end - t.start for t in steady)
    per_stream_out = [sum(c for t, c in outs if t > t_ref) for outs in outputs]
    last_out = max(t for outs in outputs for t, _ in outs)
    window = last_out - t_ref
    dit_time = sum(t.phases.get("dit", 0.0) for t in steady)
    stage_ms = {st: 1e3 * (_mean(t.phases.get(st, 0.0) for t in steady) or 0.0) for st in STAGES}
    tick_ms = 1e3 * _mean(t.end - t.start for t in steady)
    from wanstream.bench.conditioning import CONDITIONING_STAGES
    for st in CONDITIONING_STAGES if cfg.control is not None else ():
        stage_ms[st] = 1e3 * (_mean(t.phases.get(st, 0.0) for t in steady) or 0.0)
    stage_ms["host"] = tick_ms - sum(v for v in stage_ms.values())
    stage_ms["chunk"] = tick_ms
    calls = sum(t.calls for t in steady)
    rows = sum(t.rows for t in steady)
    worst = max(range(n), key=lambda k: (summaries[k]["latency_ms"]["p99"] or 0.0))
    misses = sum(sm["deadline_misses"] for sm in summaries)
    n_samples = sum(len(m._latencies) for m in metrics)
    row = {
        "resolution": cfg.resolution, "width": cfg.width, "height": cfg.height, "steps": cfg.steps,
        "mode": cfg.mode, "encoder": cfg.encoder, "decoder": cfg.decoder, "sessions": n, "policy": policy,
        "input_fps": "max" if cfg.input_fps is None else cfg.input_fps,
        "frames": cfg.frames * n, "frames_in": total_in, "frames_out": total_out, "output_order_ok": bool(order_ok),
        "warmup_chunks": cfg.warmup, "measured_chunks": chunks, "measured_frames": sum(per_stream_out),
        "prime_s": prime_s,
        "ttff_s": max(sm["ttff_s"] for sm in summaries),
        "fps_e2e": sum(per_stream_out) / window if window > 0 else None,
        "fps_aggregate": sum(per_stream_out) / window if window > 0 else None,
        "fps_per_session_min": min(per_stream_out) / window if window > 0 else None,
        "fps_capacity": cfg.rule.frames * chunks / busy if busy > 0 else None,
        "fps_denoise": cfg.rule.frames * chunks / dit_time if dit_time > 0 else None,
        "stage_ms": stage_ms,
        "dit_calls": calls,
        "dit_calls_per_chunk": calls / chunks if chunks else None,
        "rows_per_call_mean": rows / calls if calls else None,
        "dit_call_ms": 1e3 * dit_time / calls if calls else None,
        "latency_ms": summaries[worst]["latency_ms"],
        "jitter_ms": summaries[worst]["jitter_ms"],
        "deadline_miss_rate": misses / n_samples if n_samples else None,
        "target_latency_s": cfg.target_latency_s,
        "latency_samples": samples,
        "per_session": [{"fps": per_stream_out[k] / window if window > 0 else None,
                         "latency_ms": {q: summaries[k]["latency_ms"][q] for q in ("p50", "p99")},
                         "deadline_miss_rate": summaries[k]["deadline_miss_rate"], "ttff_s": summaries[k]["ttff_s"]}
                        for k in range(n)],
        "dit_calls_total": dit_calls_total,
        "peak_mem_bytes": peak_mem, "peak_mem_kind": memory.kind,
        "timing": "cuda_events" if engine.timer.cuda else "perf_counter",
        "compiled": bool(compile), "dit_paths": _dit_paths(engine),
        "wall_s": t_end - t_start,
        "drift_watchdog": cfg.drift_watchdog,
        # the watchdog's own work per chunk (statistics of each clean latent, the score, refreshes)
        "drift_ms_per_chunk": 1e3 * sum(t.phases.get("drift", 0.0) for t in steady) / chunks
        if cfg.drift_watchdog and chunks else None,
        "drift_flags": engine.drift_counts["flags"] if cfg.drift_watchdog else None,
    }
    if cfg.conditioning_row:                     # bench/conditioning.py: the plain row and the conditioned one
        from wanstream.bench.conditioning import label
        row["conditioning"] = label(cfg.reference is not None, cfg.control)
        row["reference_once_ms"] = 1e3 * sum(t.phases.get("reference", 0.0) for t in ticks) / n \
            if cfg.reference is not None else None
    if cfg.input_fps is None:
        row["queue"] = {"backlog_max_frames": 0, "lag_end_s": 0.0, "keeps_up": None}
    else:
        row["queue"] = {"backlog_max_frames": backlog_max,
                        # how late the last tick finished after the last frame arrived
                        "lag_end_s": max(0.0, t_end - (t_start + (cfg.frames - 1) / cfg.input_fps)),
                        "keeps_up": bool(row["fps_per_session_min"] and row["fps_per_session_min"] >= cfg.input_fps)}
    if costs is not None:
        row["roofline"] = _roofline_row(row, cfg, costs, peaks)
    return row


def _dit_paths(engine) -> dict:
    """DiT calls per path of the runners (eager / compiled / CUDA graph replay), all ticks of the row."""
    out: dict[str, int] = {}
    for g in engine.groups.values():
        for k, v in getattr(g.runner, "path_calls", {}).items():
            out[k] = out.get(k, 0) + v
    return out


def _compare_eager(run_fast, run_eager) -> tuple[dict, dict]:
    """Fast and eager rows alternated A B B A; returns the first fast row and the comparison (both eager rows'
    figures and the paired ratios fast / eager of the chunk time and the VAE time)."""
    fast1 = run_fast()
    eager1 = run_eager()
    eager2 = run_eager()
    fast2 = run_fast()

    def vae_ms(r):
        return r["stage_ms"]["encode"] + r["stage_ms"]["decode"]
    pairs = [(fast1, eager1), (fast2, eager2)]
    chunk = [f["stage_ms"]["chunk"] / e["stage_ms"]["chunk"] for f, e in pairs]
    vae = [vae_ms(f) / vae_ms(e) for f, e in pairs if vae_ms(e) > 0]
    eager = {k: eager1[k] for k in COMPARED}
    eager["stage_ms"] = {st: (eager1["stage_ms"][st] + eager2["stage_ms"][st]) / 2 for st in eager1["stage_ms"]}
    return fast1, {"eager": eager, "vs_eager": {
        "chunk_ratio": float(np.median(chunk)), "chunk_ratios": chunk,
        "vae_ratio": float(np.median(vae)) if vae else None, "vae_ratios": vae,
        "fast_chunk_ms": [fast1["stage_ms"]["chunk"], fast2["stage_ms"]["chunk"]],
        "eager_chunk_ms": [eager1["stage_ms"]["chunk"], eager2["stage_ms"]["chunk"]]}}


def _roofline_row(row: dict, cfg: BenchConfig, costs: dict, peaks: dict | None) -> dict:
    """Per DiT call (the call's rows: every session's stream-batch rows) and per VAE call of one stream."""
    rows = round(row["rows_per_call_mean"] or 1)
    dit = costs["dit_rows"](rows)
    calls_per_tick = row["dit_calls"] / max(1, row["measured_chunks"] / row["sessions"])
    per_tick = row["sessions"] if row["policy"] == "continuous" else 1
    out = {}
    entries = {"dit": (dit, calls_per_tick, row["stage_ms"]["dit"])}
    if cfg.encoder == "vae":
        entries["vae_encode"] = (costs["vae"]["encode"], per_tick, row["stage_ms"]["encode"])
    if cfg.decoder == "vae":
        entries["vae_decode"] = (costs["vae"]["decode"], per_tick, row["stage_ms"]["decode"])
    for name, (cost, calls, ms) in entries.items():
        e = {"flops_per_call": cost["flops"], "bytes_per_call": cost["bytes"], "intensity": cost["intensity"],
             "calls_per_chunk": calls}
        seconds = ms / 1e3 if ms else 0.0
        if seconds > 0 and calls:
            e["achieved_flops_per_s"] = cost["flops"] * calls / seconds
            e["achieved_bytes_per_s"] = cost["bytes"] * calls / seconds
            if peaks:
                bound = roofline.roofline_time(cost["flops"], cost["bytes"], peaks) * calls
                e["fraction_of_peak_flops"] = e["achieved_flops_per_s"] / peaks["matmul_flops_per_s"]
                e["roofline_bound_ms"] = 1e3 * bound
                e["roofline_efficiency"] = bound / seconds
        out[name] = e
    return out


def model_costs(model, width: int, height: int, cache_frames: int = 6) -> dict:
    """Roofline counts for a resolution: a DiT call of any number of rows (``dit_rows``), and the VAE calls."""
    dims = roofline.DiTDims.from_dit(model.dit)
    tpf = model.tokens_per_frame(height, width)
    bpe = roofline.dtype_bytes(model.dtype)
    vae = roofline.vae_call_costs(model.vae, height, width, bytes_per_el=bpe)

    def dit_rows(rows: int) -> dict:
        return roofline.dit_call_cost(dims, tpf, rows=rows, cache_frames=cache_frames, bytes_per_el=bpe)
    return {"dit_rows": dit_rows, "vae": vae, "tokens_per_frame": tpf, "dims": dims.__dict__}


# ---------------------------------------------------------------------------------------------- whole run
@dataclass
class BenchRun:
    model_dir: Path
    device: str | None = None
    dtype: str | None = None
    sweep: bool = False
    measure_peak: bool = True
    compare_round_robin: bool = False
    compile: bool = False
    quantize: str | None = None
    compare_eager: bool = False
    overload: float | None = None       # also both policies at this many times the measured per-stream capacity
    base: BenchConfig = field(default_factory=BenchConfig)
    lora: list = field(default_factory=list)      # LoRASpec s attached to the DiT
    backbone: str | None = None                   # which generator of the model folder (default: its layout's)
    stream_batch: bool = True                     # the loaded backbone has a stream batch (set by ``run``)

    def configs(self) -> list[BenchConfig]:
        if self.base.conditioned:              # the same streams plain, then conditioned (bench/conditioning.py)
            return [replace(self.base, reference=None, control=None, conditioning_row=True),
                    replace(self.base, conditioning_row=True)]
        if not self.sweep:
            return [self.base]
        modes = (True, False) if self.stream_batch else (False,)
        return [replace(self.base, steps=s, batch=b) for s in (1, 2, 3, 4) for b in modes]


def _warmup_statement(cfg: BenchConfig) -> str:
    prime = cfg.prime_chunks if cfg.prime_chunks is not None else "steps + 2"
    primed = ("model cold (no priming stream)" if cfg.prime_chunks == 0 else
              f"model warm (a throw-away stream of {prime} chunks runs before each row)")
    return (f"{primed}; the measured streams start cold, TTFF is the worst stream's first output; the first "
            f"{cfg.warmup} chunks of every stream ({cfg.rule.frames_for(cfg.warmup)} frames) are excluded from every "
            f"steady-state figure")


def run(spec: BenchRun, log=print) -> dict:
    """Load the model, run every configured row; returns ``{"meta": ..., "rows": [...]}``."""
    from wanstream.models.loader import load_model
    dtype = getattr(torch, DTYPE_NAMES[spec.dtype]) if spec.dtype else None
    t0 = time.perf_counter()
    model = load_model(spec.model_dir, device=spec.device, dtype=dtype, text_encoder=False,
                       taehv="taehv" in (spec.base.encoder, spec.base.decoder), lora=spec.lora,
                       quantize=spec.quantize, backbone=spec.backbone,
                       vace=True if spec.base.conditioned else None)
    spec.base = replace(spec.base, rule=model.backbone.chunk_rule("v2v"),           # a backbone without a stream
                        batch=spec.base.batch and model.backbone.stream_batch)    # batch runs its steps in turn
    spec.stream_batch = model.backbone.stream_batch
    spec.base.validate()
    eager_model = None
    if spec.compare_eager:                   # the reference path: diffusers' own VAE modules, nothing compiled
        from wanstream.models.vae import StreamingVAE
        eager_model = replace(model, vae=StreamingVAE(model.vae.vae, fast=False))
    if spec.compile:
        from wanstream.models.vae import StreamingVAE
        model = replace(model, vae=StreamingVAE(model.vae.vae, compile=True))
    load_s = time.perf_counter() - t0
    commit, dirty = git_commit()
    meta = {"schema": SCHEMA, "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "commit": commit, "dirty": dirty, "torch": torch.__version__, "python": platform.python_version(),
            **device_info(model.device), "dtype": str(model.dtype).replace("torch.", ""),
            "model": str(spec.model_dir), "backbone": model.backbone.name, "load_s": load_s,
            "host_load_start": _loadavg(),
            "prompt": "synthetic embedding (speed does not depend on the prompt)",
            "lora": [f"{s.path}:{s.strength:g}" for s in spec.lora],
            "compile": spec.compile, "quantize": spec.quantize,
            "warmup": _warmup_statement(spec.base)}
    with torch.no_grad():
        peaks = roofline.measure_peaks(model.device, model.dtype) if spec.measure_peak else None
        meta["peaks"] = peaks
        configs = spec.configs()
        cfg0 = configs[0]
        costs = model_costs(model, cfg0.width, cfg0.height, cache_frames=model.backbone.cache("v2v").capacity)
        meta["model_dims"] = costs["dims"]
        meta["tokens_per_frame"] = costs["tokens_per_frame"]
        prompts = [synthetic_prompt(model.dit.transformer.config.text_dim, cfg0.seed + k)
                   for k in range(cfg0.sessions)]
        clip = LiveClip(cfg0.width, cfg0.height, min(cfg0.frames, 96), seed=cfg0.seed)
        rows = []
        for cfg in configs:
            log(f"[bench] {cfg.resolution} steps={cfg.steps} {cfg.mode} sessions={cfg.sessions} input="
                f"{'max' if cfg.input_fps is None else cfg.input_fps} frames={cfg.frames} warmup={cfg.warmup}")
            if eager_model is not None:
                log("[bench] alternating with the eager reference path (A B B A)")
                row, cmp = _compare_eager(
                    lambda: run_stream(model, cfg, prompts, clip, costs, peaks, compile=spec.compile),
                    lambda: run_stream(eager_model, cfg, prompts, clip, costs, peaks))
                row.update(cmp)
            else:
                row = run_stream(model, cfg, prompts, clip, costs, peaks, compile=spec.compile)
            if spec.compare_round_robin:
                log("[bench] the same streams, one stream per DiT call (round robin)")
                rr = run_stream(model, cfg, prompts, clip, costs, peaks, policy="round_robin")
                row["round_robin"] = {k: rr[k] for k in COMPARED}
                row["round_robin"]["stage_ms"] = rr["stage_ms"]
            if spec.overload:
                from wanstream.bench.overload import run_overload
                row["overload"] = run_overload(model, cfg, prompts, clip, spec.overload, row["fps_per_session_min"],
                                               log)
            rows.append({**{k: meta[k] for k in ("device", "device_type", "dtype", "torch", "commit", "date",
                                                 "backbone")},
                         **row, "peak_flops_per_s": peaks["matmul_flops_per_s"] if peaks else None})
    meta["host_load_end"] = _loadavg()
    return {"meta": meta, "rows": rows}


def _loadavg() -> float | None:
    """The host's 1-minute load average (other processes competing for the cores skew CPU figures)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None
