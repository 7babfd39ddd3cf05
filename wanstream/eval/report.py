"""Self-contained HTML reports: inline SVG plots and inline JPEG frames, no script, no network.

:func:`render_html` draws one evaluation (summary, per-segment table, per-frame CLIP score, consecutive-frame
consistency, warp error per pair, drift curve, a strip of sampled input/output frames side by side);
:func:`render_sweep_html` draws a sweep (the Table 1 layout and quality-versus-speed plots).
"""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from wanstream.eval.metrics import DEFINITIONS

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"]

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1100px;
color:#222;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f4f4f4}td.l,th.l{text-align:left}.muted{color:#666;font-size:12px}
.plots{display:flex;flex-wrap:wrap;gap:12px}svg.plot{background:#fff;border:1px solid #ddd}
.strip{display:grid;gap:4px;align-items:start}.strip img{width:100%;image-rendering:pixelated;display:block}
.strip .lab{font-size:12px;color:#444;text-align:center}code{background:#f4f4f4;padding:0 3px}
"""


# ------------------------------------------------------------------------------------------------- SVG plots
@dataclass
class Series:
    label: str
    xs: Sequence[float]
    ys: Sequence[float | None]
    color: str = PALETTE[0]


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values (steps of 1, 2 or 5 × 10^k) covering ``[lo, hi]``."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(1, count)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    t = first
    while t <= hi + 1e-9 * step:
        ticks.append(round(t, 12))
        t += step
    return ticks


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def svg_plot(series: Sequence[Series], *, title: str, xlabel: str, ylabel: str, kind: str = "line",
             vlines: Sequence[tuple[float, str]] = (), width: int = 520, height: int = 240, name: str = "") -> str:
    """An SVG line plot (``kind="line"``; None/NaN values break the line) or labelled scatter (``"points"``)."""
    left, right, top, bottom = 58, 14, 28, 42
    pw, ph = width - left - right, height - top - bottom
    pts = [(x, y) for s in series for x, y in zip(s.xs, s.ys) if y is not None and math.isfinite(y)]
    xs = [p[0] for p in pts] or [0.0]
    ys = [p[1] for p in pts] or [0.0]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    pad = (y1 - y0) * 0.08 or max(abs(y0) * 0.01, 0.5)
    y0, y1 = y0 - pad, y1 + pad
    if kind == "points":
        xpad = (x1 - x0) * 0.08
        x0, x1 = x0 - xpad, x1 + xpad

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * ph

    e = html.escape
    out = [f'<svg class="plot" data-name="{e(name)}" xmlns="http://www.w3.org/2000/svg" width="{width}" '
           f'height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="{e(title)}">',
           f"<title>{e(title)}</title>",
           f'<text x="{width / 2}" y="17" text-anchor="middle" font-size="13" font-weight="600">{e(title)}</text>']
    for t in nice_ticks(y0, y1):
        y = sy(t)
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>'
                   f'<text x="{left - 5}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{_fmt(t)}</text>')
    for t in nice_ticks(x0, x1, 6):
        x = sx(t)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top + ph}" y2="{top + ph + 4}" stroke="#444"/>'
                   f'<text x="{x:.1f}" y="{top + ph + 16}" text-anchor="middle" font-size="11">{_fmt(t)}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>')
    for xv, label in vlines:
        if x0 <= xv <= x1:
            x = sx(xv)
            out.append(f'<line class="vline" x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + ph}" stroke="#888" '
                       f'stroke-dasharray="4 3"/><text x="{x + 3:.1f}" y="{top + 11}" font-size="10" '
                       f'fill="#555">{e(label)}</text>')
    for s in series:
        finite = [(x, y) for x, y in zip(s.xs, s.ys) if y is not None and math.isfinite(y)]
        if kind == "line":
            d, pen = [], False
            for x, y in zip(s.xs, s.ys):
                if y is None or not math.isfinite(y):
                    pen = False
                    continue
                d.append(f"{'L' if pen else 'M'}{sx(x):.1f} {sy(y):.1f}")
                pen = True
            out.append(f'<path class="series" data-points="{len(finite)}" d="{" ".join(d)}" fill="none" '
                       f'stroke="{s.color}" stroke-width="1.6"><title>{e(s.label)}</title></path>')
            if len(finite) == 1:
                (x, y), = finite
                out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{s.color}"/>')
        else:
            for x, y in finite:
                out.append(f'<circle class="series" data-points="1" cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="5" '
                           f'fill="{s.color}"><title>{e(s.label)}: {_fmt(x)}, {_fmt(y)}</title></circle>'
                           f'<text x="{sx(x) + 7:.1f}" y="{sy(y) - 6:.1f}" font-size="11">{e(s.label)}</text>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 6}" text-anchor="middle" font-size="12">{e(xlabel)}</text>'
               f'<text transform="translate(14 {top + ph / 2}) rotate(-90)" text-anchor="middle" '
               f'font-size="12">{e(ylabel)}</text>')
    if len(series) > 1 and kind == "line":
        for i, s in enumerate(series):
            out.append(f'<text x="{left + pw - 4}" y="{top + 14 + 13 * i}" text-anchor="end" font-size="11" '
                       f'fill="{s.color}">{e(s.label)}</text>')
    out.append("</svg>")
    return "".join(out)


# ------------------------------------------------------------------------------------------------- frames
def jpeg_data_uri(image: np.ndarray, quality: int = 88) -> str:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def sample_indices(n: int, k: int) -> list[int]:
    """Up to ``k`` frame indices spread evenly over ``0 .. n - 1`` (first and last included)."""
    if n <= 0 or k <= 0:
        return []
    return sorted({int(round(i)) for i in np.linspace(0, n - 1, min(k, n))})


def frame_strip(inputs: np.ndarray, outputs: np.ndarray, k: int = 8) -> str:
    idx = sample_indices(len(outputs), k)
    cells = [f'<div class="lab">frame {i}</div>' for i in idx]
    cells += [f'<img class="frame in" alt="input frame {i}" src="{jpeg_data_uri(inputs[i])}">' for i in idx]
    cells += [f'<img class="frame out" alt="output frame {i}" src="{jpeg_data_uri(outputs[i])}">' for i in idx]
    return (f'<div class="strip" style="grid-template-columns:repeat({len(idx)},1fr)">{"".join(cells)}</div>'
            f'<p class="muted">top: input (resized to the output size), bottom: output</p>')


# ------------------------------------------------------------------------------------------------ reports
def _num(v, fmt: str = ".2f") -> str:
    return "—" if v is None else format(v, fmt)


def _page(title: str, body: list[str]) -> str:
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width,initial-scale=1"><style>{CSS}</style></head>'
            f'<body>{"".join(body)}</body></html>\n')


def render_html(result: dict, inputs: np.ndarray, outputs: np.ndarray, strip: int = 8) -> str:
    """The HTML report of one :func:`~wanstream.eval.evaluate.evaluate` result and its aligned frames."""
    e = html.escape
    m = result["metrics"]
    segs = result["segments"]
    n = result["frames"]
    vlines = [(s["start"], f"prompt {i + 1}") for i, s in enumerate(segs) if i > 0]
    src = ""
    if "input" in result:
        src = (f'<p>input <code>{e(result["input"]["path"])}</code> → output <code>{e(result["output"]["path"])}'
               f'</code></p>')
    body = [f"<h1>wanstream eval</h1>{src}",
            f'<p class="muted">{n} frames, {result["width"]}x{result["height"]}, {e(result["date"])}; CLIP '
            f'<code>{e(m["clip_score"]["model"])}</code>, flow <code>{e(m["warp_error"]["model"])}</code> '
            f'({result["models"]["raft"]["flow_updates"]} updates)</p>']
    body += [f'<p class="muted">note: {e(note)}</p>' for note in result.get("notes", [])]
    rows = []
    for key, label in (("clip_score", "Text–image CLIP score"), ("clip_consistency", "CLIP temporal consistency"),
                       ("warp_error", "Warp error"), ("drift", "Drift (last frames vs first)")):
        d = DEFINITIONS[key]
        arrow = "↑" if d["higher_is_better"] else "↓"
        rows.append(f'<tr><td class="l">{label} {arrow}</td><td class="v" data-metric="{key}">'
                    f'{_num(m[key]["value"])}</td><td class="l">{e(d["unit"])}</td>'
                    f'<td class="l"><code>{e(d["version"])}</code></td></tr>')
    body.append('<h2>Summary</h2><table><tr><th class="l">metric</th><th>value</th><th class="l">unit</th>'
                f'<th class="l">definition</th></tr>{"".join(rows)}</table>'
                f'<p class="muted">drift: minimum {_num(m["drift"]["min"])}, slope '
                f'{_num(m["drift"]["slope_per_100_frames"], "+.3f")} per 100 frames, reference = first '
                f'{m["drift"]["reference_frames"]} frames; warp error: '
                f'{m["warp_error"]["pairs_without_valid_pixels"]} pair(s) without valid pixels</p>')
    if len(segs) > 1:
        srows = "".join(f'<tr><td class="l">{s["start"]}–{s["end"] - 1}</td><td class="l">{e(s["prompt"])}</td>'
                        f'<td>{_num(s["clip_score"])}</td><td>{_num(s["clip_consistency"])}</td>'
                        f'<td>{_num(s["warp_error"])}</td><td>{_num(s["drift"])}</td></tr>' for s in segs)
        body.append('<h2>Per prompt segment</h2><table><tr><th class="l">frames</th><th class="l">prompt</th>'
                    '<th>CLIP score ↑</th><th>consistency ↑</th><th>warp error ↓</th><th>drift ↑</th></tr>'
                    f'{srows}</table>')
    frames = list(range(n))
    pairs = list(range(n - 1))
    plots = [
        svg_plot([Series("CLIP score", frames, m["clip_score"]["per_frame"])], title="Text–image CLIP score per "
                 "frame", xlabel="frame", ylabel="cos × 100", vlines=vlines, name="clip_score"),
        svg_plot([Series("consistency", pairs, m["clip_consistency"]["per_pair"], PALETTE[2])],
                 title="CLIP consistency, frame t vs t+1", xlabel="frame t", ylabel="cos × 100", vlines=vlines,
                 name="clip_consistency"),
        svg_plot([Series("warp error", pairs, m["warp_error"]["per_pair"], PALETTE[1])],
                 title="Warp error per pair (t+1 warped to t)", xlabel="frame t", ylabel="MAE (0–255)",
                 vlines=vlines, name="warp_error"),
        svg_plot([Series("drift", frames, m["drift"]["curve"], PALETTE[3])],
                 title=f"Drift: similarity to the first {m['drift']['reference_frames']} frames", xlabel="frame",
                 ylabel="cos × 100", vlines=vlines, name="drift"),
    ]
    body.append(f'<h2>Over the stream</h2><div class="plots">{"".join(plots)}</div>')
    body.append(f"<h2>Frames</h2>{frame_strip(inputs, outputs, strip)}")
    defs = "".join(f'<li><code>{e(v)}</code>: {e(t)}</li>' for v, t in result["definitions"].items())
    body.append(f"<h2>Definitions</h2><ul>{defs}</ul>")
    return _page("wanstream eval", body)


def html_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A table whose first column is left-aligned text."""
    e = html.escape

    def cells(tag: str, values) -> str:
        return "".join(f'<{tag} class="l">{e(v)}</{tag}>' if i == 0 else f"<{tag}>{e(v)}</{tag}>"
                       for i, v in enumerate(values))
    return f"<table><tr>{cells('th', columns)}</tr>" + "".join(f"<tr>{cells('td', r)}</tr>" for r in rows) + \
        "</table>"


def render_sweep_html(sweep: dict, tables: Sequence[tuple[str, Sequence[str], Sequence[Sequence[str]]]]) -> str:
    """The HTML page of a sweep: its tables (``(title, columns, rows)``) and quality-versus-speed plots."""
    e = html.escape
    meta = sweep["meta"]
    rows = [r for r in sweep["rows"] if r.get("skipped") is None]
    body = ["<h1>wanstream eval --sweep</h1>",
            f'<p class="muted">{e(meta["device"])}, model <code>{e(meta["model"])}</code>, clips '
            f'{e(", ".join(c["name"] for c in meta["clips"]))}, {e(meta["date"])}; CLIP '
            f'<code>{e(meta["models"]["clip"]["id"])}</code>, flow <code>{e(meta["models"]["raft"]["id"])}</code></p>']
    for title, columns, body_rows in tables:
        body.append(f"<h2>{e(title)}</h2>{html_table(columns, body_rows)}")
    body += [f'<p class="muted">skipped <b>{e(r["name"])}</b>: {e(r["skipped"])}</p>'
             for r in sweep["rows"] if r.get("skipped") is not None]
    body.append(f'<p class="muted">FPS: {e(meta["fps_definition"])}</p>')
    if rows:
        plots = []
        for key, label in (("warp_error", "Warp error ↓"), ("clip_consistency", "CLIP consistency ↑"),
                           ("clip_score", "Text–image CLIP ↑")):
            series = [Series(r["name"], [r["fps"]], [r["metrics"][key]], PALETTE[i % len(PALETTE)])
                      for i, r in enumerate(rows)]
            plots.append(svg_plot(series, title=f"{label} vs FPS", xlabel="FPS (stream)", ylabel=label,
                                  kind="points", name=key))
        body.append(f'<h2>Quality vs speed</h2><div class="plots">{"".join(plots)}</div>')
    return _page("wanstream eval sweep", body)
