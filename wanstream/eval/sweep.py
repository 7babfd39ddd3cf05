"""``wanstream eval --sweep CONFIG``: run clips through wanstream under named settings, score every output and
write a table laid out like the paper's Table 1, with each setting's FPS beside its quality.

The only module of ``wanstream.eval`` that touches the engine, and only through the public API
(:func:`~wanstream.models.loader.load_model`, :class:`~wanstream.api.session.StreamSession`,
:class:`~wanstream.core.config.CacheConfig`). The config (TOML or JSON; relative paths are relative to it)::

    model = "models"                 # a model folder (load_model)
    device = "cuda"                  # optional; default cuda when available
    resolution = "512x512"           # optional; default each clip's size rounded down to multiples of 16
    seed = 0
    prime_frames = 13                # optional: frames of the throw-away stream that warms a loaded model (0: none)
    [defaults]                       # optional: keys every setting starts from
    steps = 2
    [[clips]]
    path = "clips/dog.mp4"
    prompt = "a dog walks on the grass, watercolor"
    prompts = [[48, "a dog walks on the grass, pencil sketch"]]   # optional prompt changes at input frames
    max_frames = 120                 # optional
    [[settings]]
    name = "SDV2 2 steps"
    [[settings]]
    name = "no sink refresh"
    sink_refresh = false

Setting keys: ``name`` (required, unique), ``steps`` 1–4, ``batch``, ``noise_scale``, ``noise_controller``,
``sink_refresh``, ``cache = {capacity, sink, ...}`` (CacheConfig fields), ``encoder`` / ``decoder`` vae|taehv
(the autoencoder at each end), ``quantize``, ``seed``, ``transition_chunks``, ``drift_watchdog`` (the online drift
watchdog, engine/drift.py, with its default threshold: compare a setting with it on and off). A setting that cannot
run here (``quantize`` while ``load_model`` has no such option, ``taehv`` without TAEHV weights) is kept as a row
with the reason instead of numbers.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import re
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from wanstream.core.config import CacheConfig
from wanstream.core.errors import CheckpointError
from wanstream.eval.evaluate import score
from wanstream.eval.flow import input_motion
from wanstream.eval.metrics import nanmean
from wanstream.eval.report import render_html, render_sweep_html
from wanstream.io.files import write_text_atomic
from wanstream.io.video import VideoWriter, fit_resolution, parse_resolution, probe_video, read_video, resize_frames

TOP_KEYS = {"model", "device", "resolution", "seed", "prime_frames", "defaults", "clips", "settings"}
CLIP_KEYS = {"path", "name", "prompt", "prompts", "max_frames"}
SETTING_KEYS = {"name", "steps", "batch", "noise_scale", "noise_controller", "sink_refresh", "cache", "decoder",
                "encoder", "quantize", "seed", "transition_chunks", "drift_watchdog"}
CACHE_KEYS = {f.name for f in dataclasses.fields(CacheConfig)}
PRIME_FRAMES = 13          # a throw-away stream (first chunk + 2 chunks) warms each loaded model before timing
METRIC_ROWS = [("clip_consistency", "CLIP Score / Temporal CLIP ↑"), ("warp_error", "Warp Error ↓"),
               ("clip_score", "Text–Image CLIP ↑"), ("drift", "Drift (last vs first frames) ↑")]


# ------------------------------------------------------------------------------------------------- config
def slug(name: str) -> str:
    """A setting or clip name as a file name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "unnamed"


@dataclass
class Setting:
    name: str
    steps: int = 2
    batch: bool = True
    noise_scale: float = 0.8
    noise_controller: bool = True
    sink_refresh: bool = True
    cache: dict = field(default_factory=dict)
    decoder: str = "vae"
    encoder: str = "vae"
    quantize: str | None = None
    seed: int | None = None
    transition_chunks: int = 0
    drift_watchdog: bool = False

    def cache_config(self) -> CacheConfig:
        """The setting's KV cache policy; ``sink_refresh = false`` disables the adaptive sink refresh."""
        cache = dict(self.cache)
        if not self.sink_refresh:
            cache["sink_threshold"] = -1.0
        return CacheConfig(**cache)

    def columns(self) -> dict:
        cc = self.cache_config()
        return {"steps": self.steps, "batch": self.batch, "noise_controller": self.noise_controller,
                "noise_scale": self.noise_scale, "sink_refresh": cc.sink_threshold > -1,
                "cache": f"{cc.capacity}/{cc.sink}", "encoder": self.encoder, "decoder": self.decoder,
                "quantize": self.quantize, "drift_watchdog": self.drift_watchdog}

    @property
    def taehv(self) -> bool:
        return "taehv" in (self.encoder, self.decoder)


@dataclass
class ClipSpec:
    path: Path
    name: str
    prompts: list[tuple[int, str]]
    max_frames: int | None = None


@dataclass
class SweepConfig:
    source: Path
    model: Path
    clips: list[ClipSpec]
    settings: list[Setting]
    device: str | None = None
    resolution: tuple[int, int] | None = None
    seed: int = 0
    prime_frames: int = PRIME_FRAMES


def _check_keys(where: str, table, allowed: set[str]) -> None:
    if not isinstance(table, dict):
        raise ValueError(f"{where}: expected a table, got {type(table).__name__}")
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; allowed: "
                         f"{', '.join(sorted(allowed))}")


def _setting(where: str, raw: dict) -> Setting:
    _check_keys(where, raw, SETTING_KEYS)
    if not isinstance(raw.get("name"), str) or not raw["name"].strip():
        raise ValueError(f"{where}: every setting needs a non-empty 'name'")
    types = {"steps": int, "batch": bool, "noise_scale": (int, float), "noise_controller": bool,
             "sink_refresh": bool, "cache": dict, "decoder": str, "encoder": str, "quantize": (str, type(None)),
             "seed": (int, type(None)), "transition_chunks": int, "drift_watchdog": bool}
    for key, kind in types.items():
        if key in raw and (not isinstance(raw[key], kind) or (kind is int and isinstance(raw[key], bool))):
            raise ValueError(f"{where}: {key!r} has the wrong type ({raw[key]!r})")
    s = Setting(**raw)
    if not 1 <= s.steps <= 4:
        raise ValueError(f"{where}: steps must be in 1..4, got {s.steps}")
    if not 0 < s.noise_scale <= 1:
        raise ValueError(f"{where}: noise_scale must be in (0, 1], got {s.noise_scale}")
    for end in ("decoder", "encoder"):
        if getattr(s, end) not in ("vae", "taehv"):
            raise ValueError(f"{where}: {end} must be 'vae' or 'taehv', got {getattr(s, end)!r}")
    if s.transition_chunks < 0:
        raise ValueError(f"{where}: transition_chunks must be >= 0, got {s.transition_chunks}")
    _check_keys(f"{where}: cache", s.cache, CACHE_KEYS)
    try:
        s.cache_config()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: cache: {exc}") from None
    return s


def _clip(where: str, raw: dict, base: Path) -> ClipSpec:
    _check_keys(where, raw, CLIP_KEYS)
    if not isinstance(raw.get("path"), str):
        raise ValueError(f"{where}: 'path' (a video file) is required")
    if not isinstance(raw.get("prompt"), str) or not raw["prompt"].strip():
        raise ValueError(f"{where}: 'prompt' (non-empty text) is required")
    changes = raw.get("prompts", [])
    if not isinstance(changes, list) or not all(isinstance(c, list) and len(c) == 2 and isinstance(c[0], int)
                                                and c[0] > 0 and isinstance(c[1], str) for c in changes):
        raise ValueError(f"{where}: 'prompts' must be a list of [frame > 0, \"text\"] pairs, got {changes!r}")
    path = (base / raw["path"]).resolve()
    max_frames = raw.get("max_frames")
    if max_frames is not None and (not isinstance(max_frames, int) or max_frames < 2):
        raise ValueError(f"{where}: max_frames must be an integer >= 2, got {max_frames!r}")
    return ClipSpec(path, raw.get("name") or path.stem, [(0, raw["prompt"])] + [(f, t) for f, t in changes],
                    max_frames)


def load_config(path: str | Path) -> SweepConfig:
    """Read and check a sweep config (``.toml`` or ``.json``); errors name the file and the key."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the sweep config ({exc.strerror or exc})") from None
    try:
        raw = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except ValueError as exc:
        raise ValueError(f"{path}: not valid {'JSON' if path.suffix.lower() == '.json' else 'TOML'} ({exc})") from None
    _check_keys(str(path), raw, TOP_KEYS)
    base = path.parent
    if not isinstance(raw.get("model"), str):
        raise ValueError(f"{path}: 'model' (a model folder) is required")
    for key in ("clips", "settings"):
        if not isinstance(raw.get(key), list) or not raw[key]:
            raise ValueError(f"{path}: '{key}' must be a non-empty list of tables")
    defaults = raw.get("defaults", {})
    _check_keys(f"{path}: defaults", defaults, SETTING_KEYS - {"name"})
    settings = [_setting(f"{path}: settings[{i}]", {**defaults, **s} if isinstance(s, dict) else s)
                for i, s in enumerate(raw["settings"])]
    clips = [_clip(f"{path}: clips[{i}]", c, base) for i, c in enumerate(raw["clips"])]
    for what, names in (("setting", [s.name for s in settings]), ("clip", [c.name for c in clips])):
        # names become file names: they must stay apart once reduced to [A-Za-z0-9._-]
        dup = sorted({n for n in names if [slug(m) for m in names].count(slug(n)) > 1})
        if dup:
            raise ValueError(f"{path}: {what} names must be unique as file names, clashing: {', '.join(dup)}"
                             + (" (set 'name' on clips that share a file stem)" if what == "clip" else ""))
    resolution = None
    if raw.get("resolution") is not None:
        try:
            resolution = parse_resolution(str(raw["resolution"]))
        except ValueError as exc:
            raise ValueError(f"{path}: resolution: {exc}") from None
    ints = {"seed": raw.get("seed", 0), "prime_frames": raw.get("prime_frames", PRIME_FRAMES)}
    for key, value in ints.items():
        if not isinstance(value, int) or isinstance(value, bool) or (key == "prime_frames" and value < 0):
            raise ValueError(f"{path}: {key} must be {'a non-negative ' if key == 'prime_frames' else 'an '}"
                             f"integer, got {value!r}")
    return SweepConfig(path, (base / raw["model"]).resolve(), clips, settings, raw.get("device"), resolution,
                       ints["seed"], ints["prime_frames"])


# ---------------------------------------------------------------------------------------------------- run
class _Models:
    """Models loaded once per ``quantize`` value (with TAEHV when a setting uses it), each primed by a
    throw-away stream before its first timed one."""

    def __init__(self, cfg: SweepConfig, log):
        self.cfg, self.log = cfg, log
        self.taehv = any(s.taehv for s in cfg.settings)
        self.loaded: dict[str | None, object] = {}
        self.primed: set[str | None] = set()

    def get(self, setting: Setting):
        """``(model, None)`` or ``(None, the reason the setting cannot run)``."""
        from wanstream.models.loader import default_device, load_model
        from wanstream.models.quantize import QuantizationError, check_quantize
        kwargs = {}
        if setting.quantize is not None:
            try:
                check_quantize(setting.quantize, self.cfg.device or default_device())
            except QuantizationError as exc:
                return None, f"quantization ({setting.quantize!r}) cannot run here: {exc}"
            kwargs["quantize"] = setting.quantize
        key = setting.quantize
        if key not in self.loaded:
            self.log(f"[sweep] loading {self.cfg.model} (quantize={key})")
            try:
                self.loaded[key] = load_model(self.cfg.model, device=self.cfg.device, taehv=self.taehv, **kwargs)
            except CheckpointError as exc:
                if not self.taehv:
                    raise
                self.log(f"[sweep] without TAEHV: {exc}")            # TAEHV settings are skipped, not the rest
                self.loaded[key] = load_model(self.cfg.model, device=self.cfg.device, **kwargs)
        model = self.loaded[key]
        if setting.taehv and model.taehv is None:
            return None, f"no TAEHV in {self.cfg.model} (ckpts/taew2_1.pth)"
        return model, None


def _session(model, setting: Setting, prompt: str, width: int, height: int, seed: int):
    from wanstream.api.session import StreamSession
    engine = None
    if setting.drift_watchdog:
        from wanstream.engine.drift import DriftConfig
        from wanstream.engine.loop import Engine
        engine = Engine(model, drift=DriftConfig())
    return StreamSession(model, prompt=prompt, width=width, height=height, steps=setting.steps,
                         noise_scale=setting.noise_scale, noise_controller=setting.noise_controller,
                         batch=setting.batch, seed=seed, cache=setting.cache_config(), decoder=setting.decoder,
                         encoder=setting.encoder, engine=engine)


def stream_clip(model, setting: Setting, clip: ClipSpec, frames: np.ndarray, width: int, height: int, seed: int
                ) -> tuple[np.ndarray, float]:
    """Push ``frames`` through a fresh session as fast as possible (prompt changes at their frames); returns the
    output frames in input order and the wall seconds from the first push to the end of the flush."""
    changes = dict(clip.prompts[1:])
    outs = []
    with _session(model, setting, clip.prompts[0][1], width, height, seed) as session:
        t0 = time.perf_counter()
        for i, frame in enumerate(tqdm(frames, desc=f"{setting.name} × {clip.name}", unit="frame", disable=None,
                                       leave=False)):
            if i in changes:
                session.update(prompt=changes[i], transition_chunks=setting.transition_chunks)
            outs += session.push(frame)
        outs += session.flush()
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        seconds = time.perf_counter() - t0
    indices = [o.index for o in outs]
    if indices != list(range(len(frames))):
        raise RuntimeError(f"{clip.name}: the stream returned frames {indices[:8]}... for {len(frames)} inputs")
    return np.stack([o.image for o in outs]), seconds


def run_sweep(cfg: SweepConfig, out_dir: Path, clip_scorer, flow_model, *, flow_batch: int = 8,
              drift_ref: int = 5, strip: int = 8, log=print) -> dict:
    """Run every clip under every setting, score the outputs, write videos, per-clip reports, ``sweep.json``,
    ``table.md`` and ``sweep.html`` into ``out_dir``; returns the sweep result."""
    from wanstream.bench.harness import device_info, git_commit
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    models = _Models(cfg, log)
    acc = {s.name: {"seconds": 0.0, "frames": 0, "clips": [], "skipped": None} for s in cfg.settings}
    device = None
    for clip in cfg.clips:
        frames, _ = read_video(clip.path)
        fps = probe_video(clip.path).fps
        frames = frames[: clip.max_frames] if clip.max_frames else frames
        width, height = cfg.resolution or fit_resolution(frames.shape[2], frames.shape[1])
        inputs = resize_frames(frames, width, height)
        log(f"[sweep] clip {clip.name}: {len(frames)} frames → {width}x{height}; input flow")
        with tqdm(total=len(inputs) - 1, desc=f"flow {clip.name}", unit="pair", disable=None, leave=False) as bar:
            motion = list(input_motion(inputs, flow_model, flow_batch, progress=bar))
        for setting in cfg.settings:
            row = acc[setting.name]
            if row["skipped"] is not None:
                continue
            model, reason = models.get(setting)
            if model is None:
                row["skipped"] = reason
                log(f"[sweep] skip {setting.name}: {reason}")
                continue
            device = device or model.device
            seed = cfg.seed if setting.seed is None else setting.seed
            if setting.quantize not in models.primed and cfg.prime_frames:
                stream_clip(model, setting, ClipSpec(clip.path, "prime", clip.prompts[:1]),
                            inputs[:cfg.prime_frames], width, height, seed)
                models.primed.add(setting.quantize)
            log(f"[sweep] {setting.name} × {clip.name}")
            outputs, seconds = stream_clip(model, setting, clip, inputs, width, height, seed)
            video = out_dir / slug(setting.name) / f"{slug(clip.name)}.mp4"
            with VideoWriter(video, fps, width, height) as writer:
                writer.write(outputs)
            result = score(inputs, outputs, clip.prompts, clip_scorer, flow_model, drift_ref=drift_ref,
                           motion=motion, progress=False)
            result.update(setting=setting.name, clip=clip.name, input={"path": str(clip.path)},
                          output={"path": str(video)}, fps=len(frames) / seconds)
            write_text_atomic(video.with_suffix(".eval.json"), json.dumps(result, indent=1) + "\n")
            write_text_atomic(video.with_suffix(".eval.html"), render_html(result, inputs, outputs, strip))
            row["seconds"] += seconds
            row["frames"] += len(frames)
            row["clips"].append({"clip": clip.name, "fps": len(frames) / seconds,
                                 **{k: result["metrics"][k]["value"] for k, _ in METRIC_ROWS}})
    rows = []
    for s in cfg.settings:
        a = acc[s.name]
        r = {"name": s.name, **s.columns(), "skipped": a["skipped"], "clips": a["clips"],
             "fps": a["frames"] / a["seconds"] if a["seconds"] else None,
             "metrics": {k: nanmean([c[k] for c in a["clips"] if c[k] is not None]) for k, _ in METRIC_ROWS}}
        rows.append(r)
    commit, dirty = git_commit()
    meta = {"schema": "wanstream-eval-sweep/1", "config": str(cfg.source), "model": str(cfg.model),
            "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"), "commit": commit, "dirty": dirty,
            **device_info(device or torch.device("cpu")), "torch": torch.__version__,
            "clips": [{"name": c.name, "path": str(c.path), "prompts": c.prompts} for c in cfg.clips],
            "models": {"clip": clip_scorer.describe(), "raft": flow_model.describe()},
            "fps_definition": "input frames / wall seconds from the first push to the end of the flush of a fresh "
                              "stream (model loaded and primed; frames pushed as fast as possible; includes the "
                              "first chunk); summed over clips. Steady-state speed: `wanstream bench`.",
            "aggregation": "each metric is the mean over clips of the per-clip value"}
    sweep = {"meta": meta, "rows": rows}
    table = render_table(sweep)
    write_text_atomic(out_dir / "sweep.json", json.dumps(sweep, indent=1, default=str) + "\n")
    write_text_atomic(out_dir / "table.md", table)
    write_text_atomic(out_dir / "sweep.html", render_sweep_html(sweep, tables(sweep)))
    return sweep


# ------------------------------------------------------------------------------------------------- table
def _cell(v, fmt: str = ".2f") -> str:
    return "—" if v is None else format(v, fmt)


def _yes(v: bool) -> str:
    return "✓" if v else "–"


def _autoencoders(r: dict) -> str:
    """``vae/vae``, ``taehv/vae``, ... (encoder/decoder; rows written before the encoder key: ``vae``)."""
    return f"{r.get('encoder', 'vae')}/{r['decoder']}"


def tables(sweep: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """``(title, columns, rows)``: the paper's Table 1 layout (metrics as rows, settings as columns, FPS beside
    quality), then one row per setting with its knobs (the layout of the paper's ablation table)."""
    rows = sweep["rows"]
    t1 = []
    for key, label in METRIC_ROWS + [("fps", "FPS ↑")]:
        t1.append([label] + ["skipped" if r["skipped"] is not None else
                             _cell(r["fps"] if key == "fps" else r["metrics"][key]) for r in rows])
    ablation = []
    for r in rows:
        m = r["metrics"]
        knobs = [r["name"], str(r["steps"]), _yes(r["batch"]), _yes(r["sink_refresh"]), _yes(r["noise_controller"]),
                 r["cache"], _autoencoders(r), r["quantize"] or "–", _yes(r.get("drift_watchdog", False))]
        values = ([m["clip_consistency"], m["warp_error"], m["clip_score"], m["drift"], r["fps"]])
        ablation.append(knobs + (["skipped"] * 5 if r["skipped"] is not None else [_cell(v) for v in values]))
    return [("Table 1 layout", ["Metric"] + [r["name"] for r in rows], t1),
            ("Settings", ["Setting", "steps", "batch", "sink refresh", "noise controller", "cache (frames/sinks)",
                          "autoencoder (enc/dec)", "quantize", "drift watchdog", "Temporal CLIP ↑", "Warp ↓",
                          "Text–Image CLIP ↑", "Drift ↑",
                          "FPS ↑"], ablation)]


def render_table(sweep: dict) -> str:
    """The sweep's :func:`tables` as markdown, with a header naming device, model, clips and scoring models."""
    meta, rows = sweep["meta"], sweep["rows"]
    clips = ", ".join(c["name"] for c in meta["clips"])
    lines = [f"# wanstream eval sweep — {meta['device']}, {meta['date'][:10]}, commit {meta['commit']}",
             "", f"Model `{meta['model']}`; clips: {clips}; CLIP `{meta['models']['clip']['id']}`, flow "
             f"`{meta['models']['raft']['id']}`. FPS: {meta['fps_definition']}", ""]
    for i, (_, columns, body) in enumerate(tables(sweep)):
        lines += ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in body] + [""]
        if i == 0:
            lines += [f"Skipped **{r['name']}**: {r['skipped']}" for r in rows if r["skipped"] is not None] + [""]
    return "\n".join(lines)
