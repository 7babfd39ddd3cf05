"""The benchmark's report: the rows of :func:`wanstream.bench.harness.run` as text tables (they fit 100 columns)
and as markdown (docs/benchmarks.md)."""

from __future__ import annotations

import sys


def _f(x, fmt: str = ".2f", scale: float = 1.0) -> str:
    return "—" if x is None else format(x * scale, fmt)


def _mib(x) -> str:
    return "—" if x is None else f"{x / 2 ** 20:,.0f}"


def _row_key(r: dict) -> list[str]:
    return [r["resolution"], str(r["steps"]), "batch" if r["mode"] == "stream_batch" else "no-batch",
            str(r["input_fps"])]


MAIN_COLUMNS = ["res", "steps", "mode", "input fps", "TTFF s", "FPS e2e", "FPS cap", "FPS DiT", "enc ms",
                "DiT ms", "dec ms", "host ms", "p50 ms", "p95 ms", "p99 ms", "jitter p99", "miss %", "peak MiB"]
ROOF_COLUMNS = ["res", "steps", "mode", "input fps", "DiT GFLOP", "DiT MiB", "DiT AI", "DiT TFLOP/s", "DiT % peak",
                "enc GFLOP", "enc TFLOP/s", "dec GFLOP", "dec TFLOP/s", "VAE % peak"]


def main_rows(rows: list[dict]) -> list[list[str]]:
    out = []
    for r in rows:
        st, lat = r["stage_ms"], r["latency_ms"]
        out.append(_row_key(r) + [
            _f(r["ttff_s"], ".3f"), _f(r["fps_e2e"]), _f(r["fps_capacity"]), _f(r["fps_denoise"]),
            _f(st["encode"], ".1f"), _f(st["dit"], ".1f"), _f(st["decode"], ".1f"), _f(st["host"], ".1f"),
            _f(lat["p50"], ".0f"), _f(lat["p95"], ".0f"), _f(lat["p99"], ".0f"), _f(r["jitter_ms"]["p99"], ".0f"),
            _f(r["deadline_miss_rate"], ".1f", 100.0), _mib(r["peak_mem_bytes"])])
    return out


SESSION_COLUMNS = ["res", "steps", "sessions", "serving", "FPS all", "FPS/session min", "FPS DiT", "DiT calls",
                   "rows/call", "DiT call ms", "p99 ms (worst)", "miss %"]


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
                        _f(x["latency_ms"]["p99"], ".0f"), _f(x["deadline_miss_rate"], ".1f", 100.0)])
    return out


EAGER_COLUMNS = ["res", "steps", "mode", "chunk ms fast", "chunk ms eager", "chunk fast/eager", "VAE fast/eager",
                 "DiT ms fast", "DiT ms eager"]


def eager_rows(rows: list[dict]) -> list[list[str]]:
    """``--compare-eager``: the fast path against the eager reference (paired ratios, median of the pairs)."""
    out = []
    for r in rows:
        v = r.get("vs_eager")
        if not v:
            continue
        out.append([r["resolution"], str(r["steps"]), "batch" if r["mode"] == "stream_batch" else "no-batch",
                    _f(r["stage_ms"]["chunk"], ".1f"), _f(r["eager"]["stage_ms"]["chunk"], ".1f"),
                    _f(v["chunk_ratio"], ".2f"), _f(v["vae_ratio"], ".2f"), _f(r["stage_ms"]["dit"], ".1f"),
                    _f(r["eager"]["stage_ms"]["dit"], ".1f")])
    return out


def roofline_rows(rows: list[dict]) -> list[list[str]]:
    out = []
    for r in rows:
        rl = r.get("roofline")
        if not rl:
            continue
        dit, enc, dec = rl["dit"], rl["vae_encode"], rl.get("vae_decode", {})
        vae_flops = enc["flops_per_call"] + dec.get("flops_per_call", 0)
        vae_s = (r["stage_ms"]["encode"] + (r["stage_ms"]["decode"] if dec else 0.0)) / 1e3
        peak = r.get("peak_flops_per_s")
        vae_frac = vae_flops / vae_s / peak if peak and vae_s > 0 else None
        out.append(_row_key(r) + [
            _f(dit["flops_per_call"], ",.1f", 1e-9), _f(dit["bytes_per_call"], ",.1f", 2 ** -20),
            _f(dit["intensity"], ",.0f"), _f(dit.get("achieved_flops_per_s"), ".3f", 1e-12),
            _f(dit.get("fraction_of_peak_flops"), ".1f", 100.0),
            _f(enc["flops_per_call"], ",.1f", 1e-9), _f(enc.get("achieved_flops_per_s"), ".3f", 1e-12),
            _f(dec.get("flops_per_call"), ",.1f", 1e-9), _f(dec.get("achieved_flops_per_s"), ".3f", 1e-12),
            _f(vae_frac, ".1f", 100.0)])
    return out


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


def render_text(result: dict) -> str:
    """The human tables as plain text."""
    rows = result["rows"]
    lines = _header(result["meta"]) + [""] + _plain_table(MAIN_COLUMNS, main_rows(rows))
    sess = session_rows(rows)
    if sess:
        lines += ["", "sessions (all streams of the engine together):"] + _plain_table(SESSION_COLUMNS, sess)
    eager = eager_rows(rows)
    if eager:
        lines += ["", "fast path vs the eager reference (paired, A B B A):"] + _plain_table(EAGER_COLUMNS, eager)
    roof = roofline_rows(rows)
    if roof:
        lines += ["", "roofline (per call, steady state; minimum bytes):"] + _plain_table(ROOF_COLUMNS, roof)
    return "\n".join(lines)


def print_table(result: dict, file=None) -> None:
    """The human tables: rich when installed, plain text otherwise."""
    file = file or sys.stdout
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(render_text(result), file=file)
        return
    console = Console(file=file, width=200)
    for line in _header(result["meta"]):
        console.print(line, highlight=False)
    for title, columns, rows in (("stream", MAIN_COLUMNS, main_rows(result["rows"])),
                                 ("sessions (all streams of the engine together)", SESSION_COLUMNS,
                                  session_rows(result["rows"])),
                                 ("fast path vs the eager reference (paired, A B B A)", EAGER_COLUMNS,
                                  eager_rows(result["rows"])),
                                 ("roofline (per call, steady state; minimum bytes)", ROOF_COLUMNS,
                                  roofline_rows(result["rows"]))):
        if not rows:
            continue
        table = Table(title=title)
        for c in columns:
            table.add_column(c, justify="right")
        for r in rows:
            table.add_row(*r)
        console.print(table)


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
    for columns, rows in ((MAIN_COLUMNS, main_rows(result["rows"])), (SESSION_COLUMNS, session_rows(result["rows"])),
                          (EAGER_COLUMNS, eager_rows(result["rows"])), (ROOF_COLUMNS, roofline_rows(result["rows"]))):
        if rows:
            lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(r) + " |" for r in rows] + [""]
    return "\n".join(lines)
