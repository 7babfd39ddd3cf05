"""Suspend and resume: a stream's whole state taken off the device into host memory, and put back.

:func:`park` takes everything a stream computes with out of its engine — the planner's record (stream-batch
registers, chunk numbering, counters, degradation rung, playout model), the engine stream's tensors (prompt and a
running transition, noise controller, previous frame, VAE encoder / decoder caches, the chunks in the model), the
runner's part (noise generator states, in-flight latents, LoRA strengths, the prompt it was given) and the KV pool's
part (the stream's cache rows and prompt K/V slot) — as a :class:`ParkedStream`: JSON-able host values plus CPU
tensors. The stream's rows and slot go back to the pool. :func:`resume` checks a parked state against the engine
(model, resolution, device, shapes) before it changes anything, then rebuilds the stream in a fresh lease: its next
chunk gives exactly what it would have given had it never left (bit-exact on the CPU; ``tests/test_parking.py``).

The same state serialises to a blob for another server (:mod:`wanstream.engine.blob`). The engine's own hooks are
:meth:`Engine.park <wanstream.engine.loop.Engine.park>` and :meth:`Engine.resume
<wanstream.engine.loop.Engine.resume>`. A stream on a multi-GPU pipeline, with injected (unseeded) noise or with
its prompt given as K/V cannot be parked (:class:`NotParkable`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from wanstream.core.chunking import ChunkBuffer, ChunkInfo
from wanstream.core.config import CacheConfig, StreamSettings
from wanstream.core.geometry import check_fit
from wanstream.core.planner import StreamStats
from wanstream.core.playout import PlayoutBuffer
from wanstream.core.schedule import Slot, StreamSchedule
from wanstream.engine.conditioning import park_state, resume_state
from wanstream.engine.noise import SeededNoise
from wanstream.engine.runner import RunnerStream
from wanstream.engine.stream import EngineStream

if TYPE_CHECKING:
    from wanstream.engine.loop import Engine

FORMAT = "wanstream-parked/1"


class NotParkable(ValueError):
    """This stream cannot be parked now (the message says why); nothing was changed."""


class StateError(ValueError):
    """A parked state that does not fit this engine (another model, resolution, device, or malformed)."""


@dataclass
class ParkedStream:
    """A stream off the device: ``host`` (JSON-able values), ``tensors`` (CPU), and its input queue (in process)."""

    host: dict
    tensors: dict[str, torch.Tensor]
    buffer: ChunkBuffer | None = None
    parked_at: float = 0.0                  # the engine clock when it was parked
    extra: dict = field(default_factory=dict)   # the owner's own values (a server session's), travel with a blob

    @property
    def nbytes(self) -> int:
        """Host bytes of its tensors (what a bound on parked memory counts)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


# ============================================================================================ fingerprint
_FINGERPRINTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def model_fingerprint(model) -> str:
    """A short hash of what makes two models give the same numbers: DiT config, dtype, VAE and TAEHV presence,
    LoRA names, and a sample of every DiT and VAE weight (the first 64 values of each tensor). Computed once."""
    key = model.dit
    fp = _FINGERPRINTS.get(key)
    if fp is not None:
        return fp
    h = hashlib.sha256()
    cfg = {k: v for k, v in dict(model.dit.transformer.config).items() if not k.startswith("_")}   # (diffusers'
    # private entries, e.g. a set-ordered list of defaults, differ between processes)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    h.update(str(model.dtype).encode())
    lora = getattr(model.dit, "lora", None)
    h.update(json.dumps(list(lora.names) if lora is not None else []).encode())
    h.update(str(getattr(model, "taehv", None) is not None).encode())
    modules = [model.dit] + ([model.vae.vae] if getattr(model, "vae", None) is not None else [])
    for m in modules:
        for name, t in sorted(m.state_dict().items()):
            if t.device.type == "meta":
                continue
            h.update(name.encode())
            h.update(t.detach().reshape(-1)[:64].float().cpu().numpy().tobytes())
    fp = h.hexdigest()[:32]
    _FINGERPRINTS[key] = fp
    return fp


# ============================================================================================ park
def park(engine: "Engine", s: EngineStream) -> ParkedStream:
    """Take a stream out of its engine into host memory (call between ticks, with the engine's locks held: the
    engine's :meth:`~wanstream.engine.loop.Engine.park`). Raises :class:`NotParkable`, changing nothing, when it
    cannot be parked now."""
    if s.closed or s.id not in engine.streams:
        raise NotParkable("this stream is closed")
    g = s.group
    runner = g.runner
    pool = getattr(runner, "pool", None)
    if pool is None or s.id not in pool.leases:
        raise NotParkable("streams on a multi-GPU pipeline cannot be parked")
    if s.pending_updates():
        raise NotParkable("the stream has live changes waiting for its next tick")
    if s.finishing:
        raise NotParkable("the stream is finishing its input")
    if s.outbox:
        raise NotParkable("the stream has output frames not collected yet")
    rs = runner.streams[s.id]
    if rs.inputs:
        raise NotParkable("a chunk is entering the model")
    if s.record.recache is not None:
        raise NotParkable("a prompt switch with KV re-cache is pending")
    if rs.seed is None or not isinstance(rs.noise, SeededNoise) or not isinstance(rs.renoise_source, SeededNoise):
        raise NotParkable("streams with injected noise sources cannot be parked")
    if not isinstance(rs.prompt, torch.Tensor):
        raise NotParkable("the stream's prompt was given as K/V, not as an embedding")
    m = engine.model
    rec = s.record
    tensors: dict[str, torch.Tensor] = {}
    host = {
        "format": FORMAT, "model": model_fingerprint(m), "device": m.device.type, "dtype": _dtype_name(m.dtype),
        "settings": _settings_state(rec.settings),
        "schedule": _schedule_state(rec.schedule),
        "record": {"next_chunk": rec.next_chunk, "deferred_run": rec.deferred_run, "since_switch": rec.since_switch,
                   "target_latency_s": rec.target_latency_s, "stats": _stats_state(rec.stats),
                   "rung": rec.rung, "since_rung": min(rec.since_rung, 1 << 30), "decoder": rec.decoder,
                   "cheap_decoder": rec.cheap_decoder, "playout": rec.playout.state()},
        "stream": {"width": s.width, "height": s.height, "fit": s.fit, "decoder": s.decoder,
                   "chunks": {str(c): _info_state(i) for c, i in s.chunks.items()},
                   "transition": None if s.transition is None else list(s.transition[2:]),
                   "controller": {"s_init": s.controller.s_init, "sigma": s.controller.sigma,
                                  "lam": s.controller.lam, "enabled": bool(s.controller.enabled)},
                   "own_decoder": s.own_decoder, "encoder": s.encoder},
        "runner": {"seed": rs.seed, "lora": None if rs.lora is None else list(rs.lora),
                   "latents": sorted(int(c) for c in rs.latents), "history": sorted(int(f) for f in rs.history)},
        "drift": None if s.drift is None else s.drift.state(tensors),
        "vace": park_state(rs.vace, tensors),          # VACE conditioning (engine/conditioning.py)
        "vae": {"enc": _vae_state("enc", s.enc_state, tensors), "dec": _vae_state("dec", s.dec_state, tensors),
                "dec_alt": None if s.alt_dec_state is None else _vae_state("dec_alt", s.alt_dec_state, tensors)},
    }
    tensors["embedding"] = s.embedding
    if s.transition is not None:
        tensors["transition.from"], tensors["transition.to"] = s.transition[0], s.transition[1]
    if s.controller.s_prev is not None:
        tensors["controller.s_prev"] = s.controller.s_prev
    if s.prev_frame is not None:
        tensors["prev_frame"] = s.prev_frame
    tensors["noise.mix"] = rs.noise.generator.get_state()
    tensors["noise.renoise"] = rs.renoise_source.generator.get_state()
    if rs.prompt is not s.embedding:                # (the same tensor unless a transition is running)
        tensors["runner.prompt"] = rs.prompt
    for c, lat in rs.latents.items():
        tensors[f"latent.{int(c)}"] = lat
    for f, lat in rs.history.items():                 # the clean frames a KV re-cache would re-encode
        tensors[f"history.{int(f)}"] = lat
    tensors.update({f"kv.{k}": v for k, v in pool.export_rows(s.id).items()})
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    # out of the engine: rows and slot back to the pool, the record out of the planner
    g.streams.remove(s)
    g.planner.remove(s.id)
    runner.remove(s.id)
    engine.streams.pop(s.id, None)
    s.closed = True
    s.chunks.clear()
    return ParkedStream(host, tensors, rec.buffer, engine.clock())


# ============================================================================================ resume
def resume(engine: "Engine", parked: ParkedStream, buffer: ChunkBuffer | None = None) -> EngineStream:
    """Rebuild a parked stream in ``engine`` (engine locks held: :meth:`~wanstream.engine.loop.Engine.resume`).
    Everything is checked before anything changes; a state that does not fit raises :class:`StateError`."""
    m = engine.model
    host, t = parked.host, parked.tensors
    plan = _validated(engine, parked)
    settings, cache, sd, width, height = plan["settings"], plan["cache"], host["stream"], plan["width"], plan["height"]
    buffer = buffer if buffer is not None else parked.buffer if parked.buffer is not None else ChunkBuffer()
    g = engine._group(width, height, cache)
    pool = getattr(g.runner, "pool", None)
    if pool is None:
        raise StateError("this engine's runner (a multi-GPU pipeline) cannot take parked streams")
    rows = plan["schedule"]["rows"]
    layout = pool.row_layout(rows)
    for name, (shape, dtype) in layout.items():
        x = t.get(f"kv.{name}")
        if x is None or tuple(x.shape) != shape or x.dtype != dtype:
            raise StateError(f"cache rows: kv.{name} must be {_dtype_name(dtype)} {list(shape)}")
    sid = engine._next_id
    engine._next_id += 1
    rec = g.planner.add(sid, settings, buffer, host["record"]["target_latency_s"])
    try:
        rec.schedule = _schedule_from(sid, host["schedule"], settings, cache, g.planner.lag, engine.backbone)
        r = host["record"]
        rec.next_chunk, rec.deferred_run, rec.since_switch = r["next_chunk"], r["deferred_run"], r["since_switch"]
        rec.stats = _stats_from(r["stats"])
        rec.rung, rec.since_rung = r["rung"], r["since_rung"]
        rec.decoder, rec.cheap_decoder = r["decoder"], bool(r["cheap_decoder"])
        rec.playout.restore(r["playout"])
        dev = m.device
        s = EngineStream(sid, g, rec, width=width, height=height, decoder=sd["decoder"],
                         embedding=t["embedding"].to(dev), fit=sd["fit"], encoder=sd.get("encoder", "vae"))
        if sd["transition"] is not None:
            k, total = sd["transition"]
            s.transition = (t["transition.from"].to(dev), t["transition.to"].to(dev), int(k), int(total))
        c = sd["controller"]
        s.controller.s_init, s.controller.sigma, s.controller.lam = c["s_init"], c["sigma"], c["lam"]
        s.controller.enabled = bool(c["enabled"])
        s.controller.s_prev = t["controller.s_prev"].to(dev) if "controller.s_prev" in t else None
        s.prev_frame = t["prev_frame"].to(dev) if "prev_frame" in t else None
        s.chunks = {int(cid): _info_from(i) for cid, i in sd["chunks"].items()}
        if (host["vae"]["enc"]["kind"] == "taehv_enc") != (s.encoder == "taehv"):
            raise StateError(f"the encoder state does not match the stream's encoder {s.encoder!r}")
        s.enc_state = _vae_from("enc", host["vae"]["enc"], t, m, dev)
        s.dec_state = _vae_from("dec", host["vae"]["dec"], t, m, dev)
        s.own_decoder = sd["own_decoder"]
        if engine.drift is not None:               # its watchdog goes on (a fresh one if it had none)
            from wanstream.engine.drift import DriftWatch
            s.drift = DriftWatch(engine.drift) if host.get("drift") is None else \
                DriftWatch.restore(engine.drift, host["drift"], t, dev)
        if host["vae"]["dec_alt"] is not None:
            s.alt_dec_state = _vae_from("dec_alt", host["vae"]["dec_alt"], t, m, dev)
        run = host["runner"]
        rs = RunnerStream.seeded(sid, run["seed"], dev, None if run["lora"] is None else tuple(run["lora"]))
        rs.noise.generator.set_state(t["noise.mix"])
        rs.renoise_source.generator.set_state(t["noise.renoise"])
        rs.prompt = t["runner.prompt"].to(dev) if "runner.prompt" in t else s.embedding
        rs.latents = {int(cid): t[f"latent.{int(cid)}"].to(dev) for cid in run["latents"]}
        rs.history = {int(f): t[f"history.{int(f)}"].to(dev) for f in run.get("history", [])}
        rs.vace = resume_state(host.get("vace"), t, m, dev)
        g.runner.add(rs, rows)
        pool.import_rows(sid, {name: t[f"kv.{name}"] for name in layout})
    except BaseException:
        g.planner.remove(sid)
        if sid in g.runner.streams:
            g.runner.remove(sid)
        raise
    g.streams.append(s)
    engine.streams[sid] = s
    return s


def check(engine: "Engine", parked: ParkedStream) -> tuple[int, int]:
    """Whether a parked state fits ``engine`` (nothing is changed): its ``(width, height)``, or
    :class:`StateError` saying why not."""
    plan = _validated(engine, parked)
    return plan["width"], plan["height"]


def _validated(engine: "Engine", parked: ParkedStream) -> dict:
    try:
        return _check(engine, parked.host, parked.tensors)
    except StateError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise StateError(f"malformed parked state ({type(exc).__name__}: {exc})") from None


def _check(engine: "Engine", host: dict, t: dict[str, torch.Tensor]) -> dict:
    """Validate a parked state against the engine; returns the objects it describes (nothing is changed)."""
    m = engine.model
    if not isinstance(host, dict) or host.get("format") != FORMAT:
        raise StateError(f"not a parked stream of format {FORMAT}")
    if host["model"] != model_fingerprint(m):
        raise StateError("the stream was made by another model (weights, config, LoRAs or dtype differ)")
    if host["device"] != m.device.type:
        raise StateError(f"the stream ran on a {host['device']} device, this engine is on {m.device.type}")
    if host["dtype"] != _dtype_name(m.dtype):
        raise StateError(f"the stream ran in {host['dtype']}, this engine in {_dtype_name(m.dtype)}")
    sd = host["stream"]
    width, height = _int(sd["width"], 16, 1 << 14), _int(sd["height"], 16, 1 << 14)
    check_fit(sd["fit"])
    if sd["decoder"] not in ("vae", "taehv") or sd["own_decoder"] not in ("vae", "taehv"):
        raise StateError(f"unknown decoder {sd['decoder']!r}")
    if "taehv" in (sd["decoder"], sd.get("alt_decoder")) and getattr(m, "taehv", None) is None:
        raise StateError("the stream decodes with TAEHV, which this engine has not loaded")
    if sd.get("encoder", "vae") not in ("vae", "taehv"):
        raise StateError(f"unknown encoder {sd['encoder']!r}")
    if sd.get("encoder") == "taehv" and getattr(m, "taehv", None) is None:
        raise StateError("the stream encodes with TAEHV, which this engine has not loaded")
    settings = _settings_from(host["settings"], engine)
    cache = settings.cache
    sch = _schedule_from(0, host["schedule"], settings, cache, 1, engine.backbone)      # validates registers
    rows = sch.rows
    dit = m.dit
    text_dim = dit.transformer.config.text_dim
    emb_shape = (1, dit.text_len, text_dim)
    names = ("embedding",) + (("runner.prompt",) if "runner.prompt" in t else ()) + \
        (("transition.from", "transition.to") if sd["transition"] else ())
    for name in names:
        _tensor(t, name, emb_shape, m.dtype)
    if sd["transition"] is not None:
        k, total = sd["transition"]
        if not 0 <= _int(k, 0, 64) < _int(total, 1, 64):
            raise StateError("transition: bad chunk counts")
    if "prev_frame" in t:
        _tensor(t, "prev_frame", (3, height, width), m.dtype)
    if "controller.s_prev" in t:
        _tensor(t, "controller.s_prev", (), torch.float64)
    gen_len = torch.Generator(device=m.device).get_state().numel()
    for name in ("noise.mix", "noise.renoise"):
        _tensor(t, name, (gen_len,), torch.uint8)
    run = host["runner"]
    _int(run["seed"], 0, 2 ** 32 - 1)
    in_flight = {sl.chunk for b in sch.batches for sl in b if sl is not None}
    latents = {_int(c, 0, 1 << 40) for c in run["latents"]}
    chunks = {_int(int(c), 0, 1 << 40) for c in sd["chunks"]}
    if latents != in_flight or chunks != in_flight:
        raise StateError("the chunks in flight of the schedule, the runner and the stream do not agree")
    h, w = height // 8, width // 8
    z = m.vae.z_dim if m.vae is not None else 16
    for c in latents:
        x = _tensor(t, f"latent.{c}", None, None)
        if x.ndim != 5 or x.shape[0] != 1 or tuple(x.shape[2:]) != (z, h, w) or not x.is_floating_point():
            raise StateError(f"latent.{c}: expected [1, T, {z}, {h}, {w}], got {list(x.shape)}")
    for c, info in sd["chunks"].items():
        _info_from(info)
    if not 0 <= host["record"]["next_chunk"] <= 1 << 40 or any(c >= host["record"]["next_chunk"] for c in chunks):
        raise StateError("chunk numbering is inconsistent")
    r = host["record"]
    _stats_from(r["stats"])
    if r["cheap_decoder"] and getattr(m, "taehv", None) is None or r["decoder"] not in ("own", "taehv"):
        raise StateError("the stream's degradation ladder needs a TAEHV decoder, which this engine has not loaded")
    from wanstream.core.slack import ladder
    _int(r["rung"], 0, len(ladder(settings.steps, bool(r["cheap_decoder"]))) - 1)
    _int(r["since_rung"], 0, 1 << 30)
    PlayoutBuffer().restore(r["playout"])
    if host.get("drift") is not None:
        from wanstream.engine.drift import DriftConfig, DriftWatch
        DriftWatch.restore(DriftConfig(), host["drift"], t, "cpu")
    resume_state(host.get("vace"), t, m, "cpu")       # checks the conditioning (nothing kept)
    return {"settings": settings, "cache": cache, "width": width, "height": height,
            "schedule": {"rows": rows}}


def rebase(host: dict, shift: float) -> None:
    """Move every time of a parked state by ``shift`` seconds (a state from another process's clock)."""
    for info in host["stream"]["chunks"].values():
        info["timestamps"] = [float(x) + shift for x in info["timestamps"]]
        info["arrivals"] = [float(x) + shift for x in info["arrivals"]]
    p = host["record"]["playout"]
    for k in PlayoutBuffer.TIMES:
        if isinstance(p.get(k), (int, float)) and not isinstance(p.get(k), bool):
            p[k] = p[k] + shift


# ============================================================================================ host values
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _int(v, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise StateError(f"expected an integer in {lo}..{hi}, got {v!r}")
    return v


def _tensor(t: dict, name: str, shape: tuple | None, dtype: torch.dtype | None) -> torch.Tensor:
    x = t.get(name)
    if not isinstance(x, torch.Tensor):
        raise StateError(f"missing tensor {name}")
    if (shape is not None and tuple(x.shape) != tuple(shape)) or (dtype is not None and x.dtype != dtype):
        raise StateError(f"{name}: expected {_dtype_name(dtype) if dtype else ''} {list(shape or ())}, got "
                         f"{_dtype_name(x.dtype)} {list(x.shape)}")
    return x


def _settings_state(st: StreamSettings) -> dict:
    return {"steps": st.steps, "noise_scale": st.noise_scale, "noise_controller": bool(st.noise_controller),
            "batch": bool(st.batch), "seed": st.seed, "mode": st.mode, "frames_per_block": st.frames_per_block,
            "cache": dataclasses.asdict(st.cache), "lora": None if st.lora is None else list(st.lora)}


def _settings_from(d: dict, engine: "Engine") -> StreamSettings:
    cache = CacheConfig(**{k: d["cache"][k] for k in ("capacity", "sink", "sink_threshold", "rope_wrap_at",
                                                     "rope_wrap_to")},
                        **{k: bool(d["cache"].get(k, False)) for k in ("rope_rebase", "rope_window")})
    lora = None if d["lora"] is None else tuple(float(x) for x in d["lora"])
    lora_set = engine.model.dit.lora
    if lora is not None and (lora_set is None or len(lora) != len(lora_set.names)):
        raise StateError("the stream's LoRA strengths do not match the LoRAs loaded here")
    if d["mode"] != "v2v" or d["frames_per_block"] != 1:
        raise StateError("only video-to-video streams can be parked")
    return StreamSettings(steps=_int(d["steps"], 1, 4), noise_scale=float(d["noise_scale"]),
                          noise_controller=bool(d["noise_controller"]), batch=bool(d["batch"]),
                          seed=_int(d["seed"], 0, 2 ** 32 - 1), cache=cache, lora=lora)


def _schedule_state(sch: StreamSchedule) -> dict:
    return {"backbone": sch.backbone.name, "steps": sch.steps, "batch": sch.batch, "lag": sch.lag,
            "next_frame": sch.next_frame, "next_rope": sch.next_rope, "prepared": sch.prepared, "block": sch.block,
            "rebase": sch._rebase,
            "batches": [[None if sl is None else [sl.chunk, sl.frame, sl.rope] for sl in b] for b in sch.batches]}


def _schedule_from(sid, d: dict, settings: StreamSettings, cache: CacheConfig, lag: int,
                   backbone) -> StreamSchedule:
    if d["lag"] != lag:
        raise StateError(f"the stream's schedule has {d['lag']} calls in flight, this engine {lag}")
    if d.get("backbone") != backbone.name:
        raise StateError(f"the stream ran the {d.get('backbone')!r} backbone, this engine runs {backbone.name!r}")
    sch = StreamSchedule(sid, _int(d["steps"], 1, 4), mode=settings.mode, batch=bool(d["batch"]), cache=cache,
                         lag=lag, backbone=backbone)
    sch.next_frame = _int(d["next_frame"], 0, 1 << 40)
    sch.next_rope = _int(d["next_rope"], 0, cache.rope_wrap_at)
    sch.prepared = bool(d["prepared"])
    sch.block = _int(d["block"], 1, 64)
    sch._rebase = _int(d["rebase"], 0, 1 << 40)
    batches = d["batches"]
    if len(batches) != lag or any(len(b) != sch.levels for b in batches):
        raise StateError("the schedule's registers do not match its step count")
    sch.batches.clear()
    for b in batches:
        sch.batches.append([None if sl is None else Slot(_int(sl[0], 0, 1 << 40), _int(sl[1], 0, 1 << 40),
                                                         _int(sl[2], 0, cache.rope_wrap_at)) for sl in b])
    return sch


def _stats_state(st: StreamStats) -> dict:
    return st.as_dict()


def _stats_from(d: dict) -> StreamStats:
    st = StreamStats()
    for f in dataclasses.fields(StreamStats):
        if f.name in d:
            v = d[f.name]
            ok = isinstance(v, list) if f.name.endswith(("reasons", "events")) else \
                (isinstance(v, (int, float)) and not isinstance(v, bool))
            if not ok:
                raise StateError(f"stats: bad {f.name}")
            setattr(st, f.name, list(v) if isinstance(v, list) else v)
    return st


def _info_state(info: ChunkInfo) -> dict:
    return {"indices": info.indices, "frame_ids": info.frame_ids, "timestamps": info.timestamps,
            "arrivals": info.arrivals, "real": info.real, "first": info.first}


def _info_from(d: dict) -> ChunkInfo:
    n = len(d["indices"])
    if not 1 <= n <= 8 or any(len(d[k]) != n for k in ("frame_ids", "timestamps", "arrivals")):
        raise StateError("a chunk's frame records are malformed")
    return ChunkInfo([int(x) for x in d["indices"]], [int(x) for x in d["frame_ids"]],
                     [float(x) for x in d["timestamps"]], [float(x) for x in d["arrivals"]],
                     _int(d["real"], 0, n), bool(d["first"]))


# ============================================================================================ VAE states
def _vae_state(prefix: str, state, tensors: dict) -> dict:
    """A decoder / encoder state as host values + tensors: a :class:`~wanstream.models.vae.VAEStreamState` (field
    by field) or a TAEHV stream's :class:`~wanstream.models.taehv.TAEHVStreamDecoder` /
    :class:`~wanstream.models.taehv.TAEHVStreamEncoder` (its memory and phase)."""
    from wanstream.models.taehv import TAEHVStreamDecoder, TAEHVStreamEncoder
    if isinstance(state, (TAEHVStreamDecoder, TAEHVStreamEncoder)):
        for k, v in state.memory.items():
            tensors[f"{prefix}.memory.{int(k)}"] = v
        memory = sorted(int(k) for k in state.memory)
        if isinstance(state, TAEHVStreamEncoder):
            return {"kind": "taehv_enc", "first_encode": bool(state.first_encode), "memory": memory}
        return {"kind": "taehv", "frames_to_drop": state.frames_to_drop, "memory": memory}
    out: dict = {"kind": "vae"}
    for f in dataclasses.fields(state):
        v = getattr(state, f.name)
        if isinstance(v, bool) or isinstance(v, int):
            out[f.name] = v
        elif isinstance(v, list):                       # diffusers' feat_cache: None | tensor | "Rep"
            entries = []
            for i, e in enumerate(v):
                if isinstance(e, torch.Tensor):
                    tensors[f"{prefix}.{f.name}.{i}"] = e
                    entries.append("T")
                elif e is None or e == "Rep":
                    entries.append(e)
                else:
                    raise NotParkable(f"VAE state {f.name}: entries of type {type(e).__name__} cannot be parked")
            out[f.name] = entries
        elif v is None:
            out[f.name] = None
        elif hasattr(v, "get") and hasattr(v, "caches"):  # rows of a (possibly shared) fast-path cache list
            caches = v.get()
            for i, c in enumerate(caches):
                tensors[f"{prefix}.{f.name}.{i}"] = c
            out[f.name] = {"rows": len(caches)}
        else:
            raise NotParkable(f"VAE state field {f.name} of type {type(v).__name__} cannot be parked")
    return out


def _vae_from(prefix: str, d: dict, t: dict, model, device):
    if d["kind"] in ("taehv", "taehv_enc"):
        from wanstream.core.config import LATENT_MEAN, LATENT_STD
        from wanstream.models.taehv import TAEHVStreamDecoder, TAEHVStreamEncoder
        if model.taehv is None:
            raise StateError("the stream runs TAEHV, which this engine has not loaded")
        if d["kind"] == "taehv":
            dec = TAEHVStreamDecoder(model.taehv)
            dec.frames_to_drop = _int(d["frames_to_drop"], 0, 16)
        else:
            dec = TAEHVStreamEncoder(model.taehv, LATENT_MEAN, LATENT_STD)
            dec.first_encode = bool(d["first_encode"])
        dec.memory = {int(k): _tensor(t, f"{prefix}.memory.{int(k)}", None, None).to(device) for k in d["memory"]}
        return dec
    from wanstream.models.vae import _Rows
    vae = model.vae
    state = vae.new_state()
    for f in dataclasses.fields(state):
        if f.name not in d:
            raise StateError(f"VAE state: {f.name} is missing")
        v = d[f.name]
        cur = getattr(state, f.name)
        if isinstance(cur, bool):
            setattr(state, f.name, bool(v))
        elif isinstance(cur, int):
            setattr(state, f.name, _int(v, 0, 1 << 40))
        elif isinstance(cur, list):
            if not isinstance(v, list) or len(v) != len(cur):
                raise StateError(f"VAE state {f.name}: expected {len(cur)} entries")
            setattr(state, f.name, [_tensor(t, f"{prefix}.{f.name}.{i}", None, vae.dtype).to(device) if e == "T"
                                    else _none_or_rep(e) for i, e in enumerate(v)])
        elif v is None:
            setattr(state, f.name, None)
        else:
            n = _int(v["rows"], 1, 4096)
            caches = [_tensor(t, f"{prefix}.{f.name}.{i}", None, vae.dtype).to(device) for i in range(n)]
            if any(c.shape[0] != 1 for c in caches):
                raise StateError(f"VAE state {f.name}: caches of one stream have batch 1")
            setattr(state, f.name, _Rows(caches, 0, 1))
    return state


def _none_or_rep(e):
    if e is None or e == "Rep":
        return e
    raise StateError(f"VAE state: bad cache entry {e!r}")
