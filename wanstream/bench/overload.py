"""``wanstream bench --sessions N --overload X``: the playback-slack policy beside today's, on the same input.

The bench's row (input as fast as the engine takes it) measures what each stream gets at full quality
(``fps_per_session_min``). Then N live streams are fed at X times that rate — more than the engine can serve at
full quality; frames keep arriving while a tick runs, as at a server) — twice in the same process: under today's policy (``continuous``: the SLO-aware scheduler, late
frames dropped) and under the slack policy (``slack``: core/slack.py), both with the server's settings (a deadline
of ``--target-latency``, an input queue of one chunk). For each stream, from its viewer model
(:class:`~wanstream.core.playout.PlayoutBuffer`, fed by the engine as frames come out):

* ``continuous_ratio``: share of the wall time from its first output frame to the end in which its viewer was not
  stalled;
* ``ttfc_s``: time to first chunk (its first input frame's arrival → its first output frame);
* ``stalls`` and ``stalled_s``: how many times its viewer waited for frames, and for how long in all;
* ``degraded_share``: share of its chunks that entered on a lower rung of its degradation ladder;
* frames in / out / dropped before the model, latency p50 / p99 of the frames that came out.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from wanstream.core.chunking import ChunkBuffer
from wanstream.core.scheduler import SLOConfig

POLICIES = ("continuous", "slack")


def run_overload(model, cfg, prompts: list[torch.Tensor], clip, overload: float, capacity_fps: float,
                 log=print) -> dict:
    """Both policies at ``overload`` x ``capacity_fps`` frames/s per stream; returns the comparison."""
    input_fps = overload * capacity_fps
    out = {"overload": overload, "capacity_fps_per_stream": capacity_fps, "input_fps": input_fps,
           "sessions": len(prompts), "policies": {}}
    for policy in POLICIES:
        log(f"[bench] overload {overload:g}x: {len(prompts)} streams at {input_fps:.2f} fps each, policy {policy}")
        out["policies"][policy] = live_row(model, cfg, prompts, clip, policy, input_fps)
    today, slack = out["policies"]["continuous"], out["policies"]["slack"]
    if today["continuous_ratio_mean"] and slack["continuous_ratio_mean"] is not None:
        out["continuous_ratio_gain"] = slack["continuous_ratio_mean"] / today["continuous_ratio_mean"]
    if today["ttfc_s_max"] and slack["ttfc_s_max"] is not None:
        out["ttfc_ratio"] = slack["ttfc_s_max"] / today["ttfc_s_max"]
    return out


@torch.no_grad()
def live_row(model, cfg, prompts: list[torch.Tensor], clip, policy: str, input_fps: float) -> dict:
    """N live streams at ``input_fps`` under ``policy`` with the server's deadline settings."""
    from wanstream.bench.harness import _prime, _source, _wait_until
    from wanstream.engine.loop import Engine
    from wanstream.engine.metrics import StreamMetrics
    _prime(model, cfg, prompts, clip, policy)
    engine = Engine(model, slo=SLOConfig(target_latency_s=cfg.target_latency_s), policy=policy)
    n = len(prompts)
    metrics = [StreamMetrics(target_latency_s=cfg.target_latency_s) for _ in range(n)]

    def taken(k):
        return lambda info: [metrics[k].on_input(timestamp=a) for a in info.arrivals[: info.real]]
    streams = [engine.open(prompt_embeds=p, width=cfg.width, height=cfg.height, steps=cfg.steps, batch=cfg.batch,
                           seed=cfg.seed + k, decoder=cfg.decoder, buffer=ChunkBuffer(max_chunks=1, on_take=taken(k)),
                           target_latency_s=cfg.target_latency_s) for k, p in enumerate(prompts)]
    first_out: list[float | None] = [None] * n
    t_start = time.perf_counter()
    i = 0
    while True:
        # every frame whose time has come arrives (while a tick runs, frames keep arriving, as at a server: a
        # bounded queue drops the oldest)
        now = time.perf_counter()
        while i < cfg.frames and t_start + i / input_fps <= now:
            for k, s in enumerate(streams):
                engine.feed(s, _source(clip, k, i), [t_start + i / input_fps])
            i += 1
        if any(s.buffer.ready() for s in streams):
            engine.step()
            now = time.perf_counter()
            for k, s in enumerate(streams):
                got = len(s.take_outputs())
                if got:
                    metrics[k].on_output(got, now=now)
                    first_out[k] = now if first_out[k] is None else first_out[k]
        elif i < cfg.frames:
            _wait_until(t_start + i / input_fps)
        else:
            break
    t_end = time.perf_counter()
    per = []
    for k, s in enumerate(streams):
        pb, st, sm = s.record.playout, s.stats, metrics[k].summary()
        per.append({"continuous_ratio": pb.continuous_ratio(t_end),
                    "ttfc_s": None if first_out[k] is None else first_out[k] - t_start,
                    "stalls": pb.stalls, "stalled_s": pb.stalled_s, "longest_stall_s": pb.longest_stall_s,
                    "degraded_share": st.degraded_chunks / st.chunks if st.chunks else 0.0,
                    "degradations": st.degradations, "restorations": st.restorations,
                    "frames_in": s.frames_in, "frames_out": st.frames_out, "dropped": s.buffer.dropped,
                    "latency_ms": {q: sm["latency_ms"][q] for q in ("p50", "p99")},
                    "ladder_events": list(st.ladder_events[-4:])})
    for s in streams:
        engine.close(s)

    def mean(key):
        xs = [p[key] for p in per if p[key] is not None]
        return float(np.mean(xs)) if xs else None
    ratios = [p["continuous_ratio"] for p in per if p["continuous_ratio"] is not None]
    ttfcs = [p["ttfc_s"] for p in per if p["ttfc_s"] is not None]
    return {"policy": policy, "input_fps": input_fps, "wall_s": t_end - t_start,
            "continuous_ratio_min": min(ratios) if ratios else None, "continuous_ratio_mean": mean("continuous_ratio"),
            "ttfc_s_max": max(ttfcs) if ttfcs else None, "stalls_mean": mean("stalls"),
            "stalled_s_mean": mean("stalled_s"), "degraded_share_mean": mean("degraded_share"),
            "per_session": per}


OVERLOAD_COLUMNS = ["policy", "input fps", "CPR min", "CPR mean", "TTFC s max", "stalls/stream",
                    "stalled s/stream", "degraded %", "frames out", "dropped"]


def overload_rows(rows: list[dict]) -> list[list[str]]:
    """Table rows of each bench row's overload comparison (report.py prints them)."""
    def f(x, fmt=".2f", scale=1.0):
        return "—" if x is None else format(x * scale, fmt)
    out = []
    for r in rows:
        o = r.get("overload")
        if not o:
            continue
        for policy, x in o["policies"].items():
            out.append([policy, f(x["input_fps"]), f(x["continuous_ratio_min"], ".3f"),
                        f(x["continuous_ratio_mean"], ".3f"), f(x["ttfc_s_max"], ".2f"), f(x["stalls_mean"], ".1f"),
                        f(x["stalled_s_mean"], ".2f"), f(x["degraded_share_mean"], ".0f", 100.0),
                        str(sum(p["frames_out"] for p in x["per_session"])),
                        str(sum(p["dropped"] for p in x["per_session"]))])
    return out
