"""The benchmark's report: the rows of :func:`wanstream.bench.harness.run` as text tables (they fit 100 columns)
and as markdown (docs/benchmarks.md)."""

from __future__ import annotations

import sys


def _f(x, fmt: str = ".2f", scale: float = 1.0) -> str:
    return "—" if x is None else format(x * scale, fmt)


def _mib(x) -> str:
    return "—" if x is None else f"{x / 2 ** 20:,.0f}"


def _mode(r: dict) -> str:
    """``batch`` / ``no-batch``, with the TAEHV ends when used (``batch, taehv both``)."""
    mode = "batch" if r["mode"] == "stream_batch" else "no-batch"
    ends = [e for e, k in (("encode", "encoder"), ("decode", "decoder")) if r.get(k, "vae") == "taehv"]
    return mode if not ends else f"{mode}, taehv {'both' if len(ends) == 2 else ends[0]}"


def _row_key(r: dict) -> list[str]:
    return [r["resolution"], str(r["steps"]), _mode(r), str(r["input_fps"])]


SPEED_COLUMNS = ["res", "steps", "mode", "input fps", "TTFF s", "FPS e2e", "FPS cap", "FPS DiT", "enc ms",
                 "DiT ms", "dec ms", "host ms"]
LATENCY_COLUMNS = ["res", "steps", "mode", "input fps", "p50 ms", "p95 ms", "p99 ms", "jitter p99", "miss %",
                   "peak MiB"]
ROOF_COLUMNS = ["res", "steps", "mode", "input fps", "DiT GFLOP", "DiT MiB", "DiT AI", "DiT TFLOP/s", "DiT % peak"]
VAE_ROOF_COLUMNS = ["res", "steps", "mode", "input fps", "enc GFLOP", "enc TFLOP/s", "dec GFLOP", "dec TFLOP/s",
                    "VAE % peak"]
WIDTH = 100          # every table fits a 100-column terminal


def _miss(r: dict) -> str:
    """The deadline miss rate, only where a deadline means something: a live source (``--input-fps N``). With
    ``--input-fps max`` frames arrive as fast as the engine takes them, so there is no deadline to miss."""
    return "—" if r.get("input_fps") in (None, "max") else _f(r["deadline_miss_rate"], ".1f", 100.0)


def speed_rows(rows: list[dict]) -> list[list[str]]:
    out = []
    for r in rows:
        st = r["stage_ms"]
        out.append(_row_key(r) + [
            _f(r["ttff_s"], ".3f"), _f(r["fps_e2e"]), _f(r["fps_capacity"]), _f(r["fps_denoise"]),
            _f(st["encode"], ".1f"), _f(st["dit"], ".1f"), _f(st["decode"], ".1f"), _f(st["host"], ".1f")])
    return out


DRIFT_COLUMNS = ["res", "steps", "mode", "input fps", "drift ms/chunk", "flags"]


def drift_rows(rows: list[dict]) -> list[list[str]]:
    """The drift watchdog's own cost (--drift-watchdog; part of host ms)."""
    return [_row_key(r) + [_f(r["drift_ms_per_chunk"], ".3f"), str(r["drift_flags"])]
            for r in rows if r.get("drift_watchdog")]


def latency_rows(rows: list[dict]) -> list[list[str]]:
    out = []
    for r in rows:
        lat = r["latency_ms"]
        out.append(_row_key(r) + [
            _f(lat["p50"], ".0f"), _f(lat["p95"], ".0f"), _f(lat["p99"], ".0f"), _f(r["jitter_ms"]["p99"], ".0f"),
            _miss(r), _mib(r["peak_mem_bytes"])])
    return out


SESSION_COLUMNS = ["res", "steps", "sessions", "serving", "FPS all", "FPS/stream min", "FPS DiT", "calls",
                   "rows/call", "call ms", "p99 ms max", "miss %"]


def session_rows(rows: list[dict]) -> list[list[str]]:
    """Multi-stream figures: each row, and its round-robin comparison when measured."""
    out = []
    for r in rows:
        if r.get("sessions", 1) == 1 and "round_robin" not in r:
            continue
        for x, label in ((r, "batched"), (r.get("round_robin"), "round robin")):
            if x is None:
                continue
            out.append([r["resolution"], str(r["steps"]), str(x["sessions"]), label, _f(x["fps_aggregate"]),
                        _f(x["fps_per_session_min"]), _f(x["fps_denoise"]), str(x["dit_calls"]),
                        _f(x["rows_per_call_mean"], ".1f"), _f(x["dit_call_ms"], ".1f"),
                        _f(x["latency_ms"]["p99"], ".0f"), _miss({**x, "input_fps": r.get("input_fps")})])
    return out


EAGER_COLUMNS = ["res", "steps", "mode", "chunk ms fast", "chunk ms eager", "chunk ratio", "VAE ratio",
                 "DiT ms fast", "DiT ms eager"]


def eager_rows(rows: list[dict]) -> list[list[str]]:
    """``--compare-eager``: the fast path against the eager reference (paired ratios, median of the pairs)."""
    out = []
    for r in rows:
        v = r.get("vs_eager")
        if not v:
            continue
        out.append([r["resolution"], str(r["steps"]), _mode(r), _f(r["stage_ms"]["chunk"], ".1f"),
                    _f(r["eager"]["stage_ms"]["chunk"], ".1f"),
                    _f(v["chunk_ratio"], ".2f"), _f(v["vae_ratio"], ".2f"), _f(r["stage_ms"]["dit"], ".1f"),
                    _f(r["eager"]["stage_ms"]["dit"], ".1f")])
    return out


def _roofs(rows: list[dict]):
    for r in rows:
        rl = r.get("roofline")
        if rl:
            yield r, rl


def roofline_rows(rows: list[dict]) -> list[list[str]]:
    out = []
    for r, rl in _roofs(rows):
        dit = rl["dit"]
        out.append(_row_key(r) + [
            _f(dit["flops_per_call"], ",.1f", 1e-9), _f(dit["bytes_per_call"], ",.1f", 2 ** -20),
            _f(dit["intensity"], ",.0f"), _f(dit.get("achieved_flops_per_s"), ".3f", 1e-12),
            _f(dit.get("fraction_of_peak_flops"), ".1f", 100.0)])
    return out


def vae_roofline_rows(rows: list[dict]) -> list[list[str]]:
    out = []
    for r, rl in _roofs(rows):
        enc, dec = rl.get("vae_encode", {}), rl.get("vae_decode", {})
        vae_flops = enc.get("flops_per_call", 0) + dec.get("flops_per_call", 0)
        vae_s = ((r["stage_ms"]["encode"] if enc else 0.0) + (r["stage_ms"]["decode"] if dec else 0.0)) / 1e3
        peak = r.get("peak_flops_per_s")
        vae_frac = vae_flops / vae_s / peak if peak and vae_s > 0 else None
        out.append(_row_key(r) + [
            _f(enc.get("flops_per_call"), ",.1f", 1e-9), _f(enc.get("achieved_flops_per_s"), ".3f", 1e-12),
            _f(dec.get("flops_per_call"), ",.1f", 1e-9), _f(dec.get("achieved_flops_per_s"), ".3f", 1e-12),
            _f(vae_frac, ".1f", 100.0)])
    return out


def tables(rows: list[dict]) -> list[tuple[str, list[str], list[list[str]]]]:
    """Every table of a result: (title, columns, rows); empty tables are left out."""
    out = [("speed", SPEED_COLUMNS, speed_rows(rows)),
           ("latency (miss %: frames later than --target-latency; only with a live --input-fps)", LATENCY_COLUMNS,
            latency_rows(rows)),
           ("sessions (all streams of the engine together)", SESSION_COLUMNS, session_rows(rows)),
           ("drift watchdog (its work per chunk, included in host ms)", DRIFT_COLUMNS, drift_rows(rows)),
           ("fast path vs the eager reference (paired, A B B A; ratios fast / eager)", EAGER_COLUMNS,
            eager_rows(rows)),
           ("roofline, DiT (per call, steady state; minimum bytes)", ROOF_COLUMNS, roofline_rows(rows)),
           ("roofline, VAE (per call, steady state)", VAE_ROOF_COLUMNS, vae_roofline_rows(rows))]
    from wanstream.bench.overload import OVERLOAD_COLUMNS, overload_rows
    out.append(("overload (--overload: today's policy vs playback slack on the same input; CPR: continuous-"
                "playback ratio)", OVERLOAD_COLUMNS, overload_rows(rows)))
    from wanstream.bench.conditioning import COND_COLUMNS, conditioning_rows
    out.append(("VACE conditioning (--reference / --control: ms per tick, one chunk per stream; the plain row is "
                "the same streams without)", COND_COLUMNS, conditioning_rows(rows)))
    return [t for t in out if t[2]]


def _header(meta: dict) -> list[str]:
    title = (f"wanstream bench — {meta.get('backbone', 'streamdiffusionv2')} | {meta['device']} | {meta['dtype']} | "
             f"torch {meta['torch']} | commit "
             f"{meta['commit']}{' (dirty)' if meta.get('dirty') else ''} | {meta['date']}")
    lines = [title, f"warm-up: {meta['warmup']}",
             f"host load average (1 min): {meta.get('host_load_start')} at start, {meta.get('host_load_end')} at end"]
    if meta.get("peaks"):
        p = meta["peaks"]
        lines.append(f"measured peaks: {p['matmul_flops_per_s'] / 1e12:.3f} TFLOP/s ({p['matmul_dtype']} "
                     f"{p['matmul_size']}³ matmul), {p['copy_bytes_per_s'] / 1e9:.1f} GB/s (copy, read + write)")
    return lines


def _plain_table(columns: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(columns)]
    return ["  ".join(c.rjust(w) for c, w in zip(columns, widths))] + \
           ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows]


def _wrapped(line: str) -> list[str]:
    import textwrap
    return textwrap.wrap(line, WIDTH, subsequent_indent="  ") or [""]


def render_text(result: dict) -> str:
    """The human tables as plain text, each at most :data:`WIDTH` columns wide."""
    lines = [w for line in _header(result["meta"]) for w in _wrapped(line)]
    for title, columns, rows in tables(result["rows"]):
        lines += ["", *_wrapped(title + ":"), *_plain_table(columns, rows)]
    return "\n".join(lines)


def print_table(result: dict, file=None) -> None:
    print(render_text(result), file=file or sys.stdout)


def render_markdown(result: dict) -> str:
    """Markdown tables of the rows, labelled with device, dtype, torch, commit and date (for docs/benchmarks.md)."""
    meta = result["meta"]
    head = (f"**{meta.get('backbone', 'streamdiffusionv2')}** on **{meta['device']}**, {meta['dtype']}, torch "
            f"{meta['torch']}, commit `{meta['commit']}`"
            f"{' (dirty tree)' if meta.get('dirty') else ''}, {meta['date'][:10]}, host load average "
            f"{meta.get('host_load_start')} → {meta.get('host_load_end')}; {meta['warmup']}.")
    if meta.get("peaks"):
        p = meta["peaks"]
        head += (f" Measured peaks: {p['matmul_flops_per_s'] / 1e12:.3f} TFLOP/s ({p['matmul_dtype']} matmul), "
                 f"{p['copy_bytes_per_s'] / 1e9:.1f} GB/s copy.")
    lines = [head, ""]
    for title, columns, rows in tables(result["rows"]):
        lines += [f"*{title}*", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(r) + " |" for r in rows] + [""]
    return "\n".join(lines)
