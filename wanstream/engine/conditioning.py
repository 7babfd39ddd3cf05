"""A stream's VACE conditioning in the runner: its reference prefix, hint strength and per-chunk context latents.

The tensor side of ``models/vace.py`` for the engine. Each stream may hold a :class:`StreamVace` (its runner
stream's ``vace``); a DiT call whose rows include a conditioned stream gets one :class:`~wanstream.models.vace.
VaceCall` (:func:`vace_call`): every row its context latents (its chunk's control context, else the stream's plain
context ``[vae(0) | vae(0) | 1]``), its strength (0 for rows of unconditioned streams: they get no hint and no
prefix, so they equal the plain model) and its reference prefix. A call without conditioned rows is the plain call.

The reference is encoded by the VAE once per change, in the caller's thread (``Engine.set_conditioning``); its one
DiT pass (:func:`~wanstream.models.vace.encode_reference`) runs at the stream's next tick under the stream's prompt
K/V at that time (a later prompt change keeps the prefix).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Sequence

import torch

from wanstream.engine.control import StreamControl, check_kind, encode_controls
from wanstream.models.dit import PromptKV
from wanstream.models.vace import Reference, VaceCall, context_latents, encode_reference

KEEP_CONTEXTS = 16         # chunks whose control context is kept (in flight, their context pass, a re-cache)


@dataclass
class StreamVace:
    """One stream's conditioning (see the module docstring)."""

    base: torch.Tensor                           # [1, 1, z, h, w] latent of a zero (mid-grey) frame: "no control"
    strength: float = 1.0
    reference: Reference | None = None
    contexts: dict = field(default_factory=dict)   # chunk → [1, T, 96, h, w] control context
    control: StreamControl = field(default_factory=StreamControl)

    @property
    def active(self) -> bool:
        return self.reference is not None or self.control.kind != "none"

    def plain(self, frames: int) -> torch.Tensor:
        z = self.base.expand(1, frames, *self.base.shape[2:])
        return context_latents(z, z, 1.0)

    def context(self, chunk: Hashable, frames: int) -> torch.Tensor:
        c = self.contexts.get(chunk)
        return self.plain(frames) if c is None or c.shape[1] != frames else c

    def add_context(self, chunk: Hashable, control: torch.Tensor) -> None:
        """A chunk's control latents ``[1, T, z, h, w]`` (``models/vace.py``: ``[vae(0) | vae(control) | 1]``)."""
        z = self.base.expand(1, control.shape[1], *self.base.shape[2:])
        self.contexts[chunk] = context_latents(z, control, 1.0)
        while len(self.contexts) > KEEP_CONTEXTS:
            self.contexts.pop(next(iter(self.contexts)))


def stream_prompt(pool, slot: int) -> PromptKV:
    """The prompt K/V of a pool slot, every layer (batch 1)."""
    return PromptKV({i: t[slot: slot + 1] for i, t in pool.pk.items()},
                    {i: t[slot: slot + 1] for i, t in pool.pv.items()})


def set_reference(dit, pool, stream: Hashable, vace: StreamVace, latent: torch.Tensor | None) -> None:
    """Encode (or clear, ``latent`` None) a stream's reference prefix under its current prompt K/V."""
    if latent is None:
        vace.reference = None
        return
    vace.reference = encode_reference(dit, latent.to(pool.device, pool.dtype),
                                      stream_prompt(pool, pool.leases[stream].slot))


def vace_call(streams: dict, rows: Sequence, frames: int, device, dtype) -> VaceCall | None:
    """The VACE side of a call over ``rows`` (None when no row's stream is conditioned)."""
    per_row = [getattr(streams[r.stream], "vace", None) for r in rows]
    if not any(v is not None and v.active for v in per_row):
        return None
    some = next(v for v in per_row if v is not None)
    contexts, scales = [], []
    for r, v in zip(rows, per_row):
        on = v is not None and v.active
        contexts.append((v.context(r.chunk, frames) if on else some.plain(frames)).to(device, dtype))
        scales.append(v.strength if on else 0.0)
    call = VaceCall(torch.cat(contexts), torch.tensor(scales, dtype=torch.float32).to(device, non_blocking=True))
    refs = [v.reference if v is not None and v.active else None for v in per_row]
    tokens = max((ref.tokens for ref in refs if ref is not None), default=0)
    if tokens:
        longest = next(ref for ref in refs if ref is not None and ref.tokens == tokens)
        padded = [(ref or longest).padded(tokens) for ref in refs]
        call.prefix_rows = [0 if ref is None else ref.tokens for ref in refs]
        call.prefix_k = {i: torch.cat([k[i] for k, _ in padded]) for i in longest.k}
        call.prefix_v = {i: torch.cat([v[i] for _, v in padded]) for i in longest.v}
    return call


def rebase_reference(vace: StreamVace | None, delta: int, tables) -> None:
    """A RoPE rebase turns the stream's cached keys back by ``delta``: its reference prefix turns with them."""
    if vace is None or vace.reference is None:
        return
    from wanstream.models.rope import turn_back
    ref = vace.reference
    vace.reference = Reference({i: turn_back(k, delta, tables) for i, k in ref.k.items()}, ref.v)


# ------------------------------------------------------------------------------------------------ live changes
MAX_STRENGTH = 4.0
MAX_REFERENCES = 4            # reference images of one stream (each one more latent frame in its prefix)


@dataclass
class VaceUpdate:
    """A live change of a stream's conditioning, prepared in the caller's thread (``prepare_update``) and applied
    at the stream's next tick (``apply_update``). ``reference``: its latent, None (clear) or ``...`` (unchanged);
    ``control``: a kind of ``engine/control.py`` (None: unchanged), ``video`` its frames for kind ``video``."""

    base: torch.Tensor | None
    reference: object = ...
    strength: float | None = None
    control: str | None = None
    video: object = None


def check_strength(strength) -> float:
    try:
        s = float(strength)
    except (TypeError, ValueError):
        raise ValueError(f"strength must be a number, got {strength!r}") from None
    if not 0.0 <= s <= MAX_STRENGTH:
        raise ValueError(f"strength must be in [0, {MAX_STRENGTH:g}], got {s:g}")
    return s


def check_vace(model) -> None:
    if getattr(model.dit, "vace", None) is None:
        raise ValueError("this model has no VACE modules: put a Wan2.1-VACE model beside it (`wanstream download "
                         "vace-1.3b`, or `wanstream init-random --vace` for a random one)")


def encode_image(model, image, width: int, height: int, fit: str) -> torch.Tensor:
    """An image (uint8 ``[H, W, 3]``, any size: framed like the stream's frames) → its latent ``[1, 1, z, h, w]``
    (a first-frame VAE encode on a fresh state: the latent space of the stream's chunks)."""
    import numpy as np

    from wanstream.engine.transfer import upload_frames
    from wanstream.io.video import fit_frames
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"a reference image must be uint8 [H, W, 3], got {arr.dtype} {list(arr.shape)}")
    if arr.shape[:2] != (height, width):
        arr = fit_frames(arr[None], width, height, fit)[0]
    with torch.inference_mode():
        pixels = upload_frames(arr[None], model.device, model.dtype)
        return model.vae.encode(model.vae.new_state(), pixels[None])


def base_latent(model, width: int, height: int) -> torch.Tensor:
    """The latent of a zero (mid-grey) frame: VACE's "nothing here" for the inactive half and for frames without
    control."""
    import numpy as np
    return encode_image(model, np.full((height, width, 3), 128, np.uint8), width, height, "stretch")


def prepare_update(model, width: int, height: int, fit: str, reference=..., strength=None, control=None,
                   video=None, preprocessors=None) -> VaceUpdate:
    """Validate and VAE-encode a change (the caller's thread: off the engine's tick); a control kind whose model
    is missing is refused here."""
    check_vace(model)
    s = None if strength is None else check_strength(strength)
    if control is not None:
        check_kind(control)
        if control == "video" and video is None:
            raise ValueError("control 'video' needs the control video's frames")
        if preprocessors is not None:
            preprocessors.check(control)
    ref = reference
    if reference is not None and reference is not ...:
        images = list(reference) if isinstance(reference, (list, tuple)) else [reference]
        if not 1 <= len(images) <= MAX_REFERENCES:
            raise ValueError(f"a stream takes 1 to {MAX_REFERENCES} reference images, got {len(images)}")
        ref = torch.cat([encode_image(model, img, width, height, fit) for img in images], dim=1)
    return VaceUpdate(base_latent(model, width, height), ref, s, control, iter(video) if video is not None else None)


def apply_update(runner, stream: Hashable, update: VaceUpdate) -> None:
    """The tensor side at the tick: the stream's :class:`StreamVace` (created on first use), its reference prefix
    (one DiT pass over the reference frame) and strength."""
    if not hasattr(runner, "pool") or not hasattr(runner, "dit"):
        raise ValueError("VACE conditioning runs on one device (not on the multi-GPU ring yet)")
    st = runner.streams[stream]
    if st.vace is None:
        st.vace = StreamVace(update.base.to(runner.device))
    if update.strength is not None:
        st.vace.strength = update.strength
    if update.reference is not ...:
        set_reference(runner.dit, runner.pool, stream, st.vace, update.reference)
    if update.control is not None and (update.control != st.vace.control.kind or update.video is not None):
        st.vace.control.switch(update.control, update.video)
        st.vace.contexts.clear()


def control_contexts(engine, runner, entries: list, pixels: dict) -> None:
    """The control context of every entering chunk of a controlled stream (``entries``: ``(stream, entry,
    latent_frames)``; ``pixels``: stream id → its chunk's frames ``[T, 3, H, W]`` on the device): preprocessors
    batched by kind across streams, then each stream's control VAE encode. Timed as ``control`` and
    ``control_encode``."""
    by_kind: dict[str, list] = {}
    for s, entry, t in entries:
        v = getattr(runner.streams.get(s.id), "vace", None)
        if v is not None and v.control.kind != "none" and s.id in pixels:
            by_kind.setdefault(v.control.kind, []).append((s, entry, t, v))
    if not by_kind:
        return
    model = engine.model
    frames = {}
    with engine.timer.section("control"):
        for kind, members in by_kind.items():
            if kind == "video":
                for s, entry, _, v in members:
                    frames[s.id] = v.control.video_frames(pixels[s.id].shape[0], s.width, s.height, s.fit,
                                                          model.device, model.dtype)
                continue
            try:
                outs = engine.preprocessors.run(kind, [pixels[s.id] for s, *_ in members],
                                                [v.control.prev for *_, v in members])
            except Exception as exc:  # noqa: BLE001 - a failing preprocessor ends the streams that use it
                for s, *_ in members:
                    engine._stream_error(s, "control", exc)
                continue
            for (s, _, _, v), out in zip(members, outs):
                frames[s.id] = out
                v.control.prev = pixels[s.id][-1]
        for members in by_kind.values():
            for s, *_, v in members:
                v.control.preview = frames[s.id][-1]          # what the model receives (the page's preview)
    with engine.timer.section("control_encode"):
        todo = [(s, entry, t, v) for members in by_kind.values() for s, entry, t, v in members if s.id in frames]
        latents = encode_controls(model.vae, [(v.control, frames[s.id], t) for s, _, t, v in todo], engine.codec.batch)
        for (s, entry, _, v), z in zip(todo, latents):
            if isinstance(z, Exception):            # one stream's control ends only that stream
                engine._stream_error(s, "control", z)
            else:
                v.add_context(entry.chunk, z)


# ------------------------------------------------------------------------------------------------ parking
def park_state(vace: StreamVace | None, tensors: dict) -> dict | None:
    """A stream's conditioning as host values + tensors (``engine/parking.py``): strength, reference prefix, control
    kind, its encoder state and previous frame, the control contexts of the chunks in flight."""
    if vace is None:
        return None
    from wanstream.engine.parking import NotParkable, _vae_state
    ctl = vace.control
    if ctl.kind == "video":
        raise NotParkable("a stream steered by a control video cannot be parked (the video is not part of its state)")
    tensors["vace.base"] = vace.base
    ref = vace.reference
    for i in ref.k if ref is not None else ():
        tensors[f"vace.ref.k.{i}"], tensors[f"vace.ref.v.{i}"] = ref.k[i], ref.v[i]
    for c, ctx in vace.contexts.items():
        tensors[f"vace.ctx.{int(c)}"] = ctx
    if ctl.prev is not None:
        tensors["vace.prev"] = ctl.prev
    return {"strength": vace.strength, "reference": ref is not None, "contexts": [int(c) for c in vace.contexts],
            "control": ctl.kind, "enc": None if ctl.enc_state is None else _vae_state("vace.enc", ctl.enc_state,
                                                                                       tensors)}


def resume_state(d: dict | None, t: dict, model, device) -> StreamVace | None:
    """The :class:`StreamVace` of :func:`park_state` (checked against the model; ``StateError`` otherwise)."""
    if d is None:
        return None
    from wanstream.engine.parking import StateError, _vae_from
    if getattr(model.dit, "vace", None) is None:
        raise StateError("the stream has VACE conditioning; this engine's model has no VACE modules")
    check_kind(d["control"])
    base = t["vace.base"]
    if base.ndim != 5 or base.shape[:2] != (1, 1):
        raise StateError("vace.base: expected [1, 1, z, h, w]")
    vace = StreamVace(base.to(device), check_strength(d["strength"]))
    if d["reference"]:
        layers = list(model.dit.cache_layers)
        try:
            k = {i: t[f"vace.ref.k.{i}"].to(device) for i in layers}
            v = {i: t[f"vace.ref.v.{i}"].to(device) for i in layers}
        except KeyError as exc:
            raise StateError(f"the reference prefix misses {exc}") from None
        if len({x.shape for x in (*k.values(), *v.values())}) != 1:
            raise StateError("the reference prefix's layers differ in shape")
        vace.reference = Reference(k, v)
    vace.contexts = {int(c): t[f"vace.ctx.{int(c)}"].to(device) for c in d["contexts"]}
    vace.control.kind = d["control"]
    vace.control.prev = t["vace.prev"].to(device) if "vace.prev" in t else None
    vace.control.enc_state = None if d["enc"] is None else _vae_from("vace.enc", d["enc"], t, model, device)
    return vace
