"""A session's VACE conditioning over HTTP: a reference image (upload / replace / clear), the control kind and the
hints' strength, and a preview of the control frame the model receives.

Routes (the stream's secret or the admin token, like ``/params``):

* ``PUT /api/sessions/{id}/reference`` — the body is the image (``Content-Type`` image/png, image/jpeg, image/webp
  or image/bmp; at most ``max_reference_bytes``, read by the guard before anything else). 413 too large (bytes or
  pixels), 415 wrong type, 400 not an image, 409 when the model has no VACE modules; never a 500.
* ``DELETE /api/sessions/{id}/reference`` — clear it.
* ``POST /api/sessions/{id}/conditioning`` ``{"control": "none|edges|depth|flow|pose", "strength": 0..4}`` — 422 naming the
  field when malformed, 409 when the control's model is missing (the message names ``wanstream download``).
* ``GET /api/sessions/{id}/conditioning`` — what the session has; ``GET /api/sessions/{id}/control.jpg`` — the
  newest control frame the model received (404 while there is none).

The image is decoded and framed to the session size on a worker thread, VAE-encoded on the prompt thread (off the
model worker's ticks) and handed to the stream by the worker, like a prompt. Each change carries the session's whole
conditioning, so a newer change supersedes an older one still being encoded (a parked stream keeps its conditioning:
``engine/parking.py`` carries it). Counted in /metrics: ``wanstream_server_references_set_total``, ``..._references_refused_total``,
``..._control_switches_total``, and the sessions with a reference / a control now.
"""

from __future__ import annotations

import asyncio
import io
import logging
import threading
from typing import Literal

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from wanstream.api.conditioning import REFERENCE_TYPES, ReferenceImageError, decode_reference

log = logging.getLogger("wanstream.server")

REFERENCE_PATH_SUFFIX = "/reference"
STATUS = {"not_an_image": 400, "too_large": 413, "wrong_type": 415}


def body_limit(path: str, settings) -> int | None:
    """The guard's body bound of a path that carries an image (None: ``max_body_bytes``): a reference upload is
    bounded by ``max_reference_bytes``; a preset, which may embed one as base64, by that plus a third."""
    if path.startswith("/api/sessions/") and path.endswith(REFERENCE_PATH_SUFFIX):
        return settings.max_reference_bytes
    if (path.startswith("/api/sessions/") and path.endswith("/preset")) or path == "/api/presets/validate":
        return max(settings.max_body_bytes, settings.max_reference_bytes * 4 // 3 + settings.max_body_bytes)
    return None


class ConditioningUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    control: Literal["none", "edges", "depth", "flow", "pose"] | None = None
    strength: float | None = Field(None, ge=0.0, le=4.0)


class SessionConditioning:
    """One session's conditioning: the reference (framed to the session size), strength, control kind; the newest
    prepared change waiting for the model worker."""

    def __init__(self, session):
        self.session = session
        self.reference = None                 # uint8 [H, W, 3] image(s) framed to the session size, or None
        self.strength = float(session.settings.default_strength)
        self.control = session.settings.default_control
        self._lock = threading.Lock()
        self._gen = 0
        self._given = 0
        self._ready = None                    # (gen, engine.conditioning.VaceUpdate)
        default = session.settings.default_reference
        if default is not None or self.control != "none":      # serve --reference / --control
            ref = None if default is None else [_fit(d, session.width, session.height, session.settings.fit)
                                                for d in (default if isinstance(default, list) else [default])]
            self.change(reference=ref)

    @property
    def active(self) -> bool:
        return self.reference is not None or self.control != "none"

    def info(self) -> dict:
        with self._lock:
            return {"reference": self.reference is not None, "strength": self.strength, "control": self.control,
                    "pending": self._gen > self._given}

    def change(self, reference=..., strength: float | None = None, control: str | None = None) -> None:
        """Record a change and prepare the whole conditioning on the prompt thread (the VAE encode)."""
        with self._lock:
            if reference is not ...:
                self.reference = reference
            if strength is not None:
                self.strength = float(strength)
            if control is not None:
                self.control = control
            self._gen += 1
            gen, ref, s, kind = self._gen, self.reference, self.strength, self.control
        self._prepare(gen, ref, s, kind)

    def _prepare(self, gen: int, ref, strength: float, kind: str) -> None:
        from wanstream.engine.conditioning import prepare_update
        manager = self.session.manager
        s = self.session

        def work():
            return prepare_update(manager.model, s.width, s.height, "stretch", ref, strength, kind, None,
                                  manager.engine.preprocessors)

        def done(future) -> None:
            try:
                update = future.result()
            except Exception as exc:  # noqa: BLE001 - the stream keeps what it has; the client is told
                log.warning("session %s: conditioning failed: %s", s.id[:8], exc)
                s.report_error("conditioning_error", f"cannot use this conditioning ({type(exc).__name__}: {exc})")
                return
            with self._lock:
                if self._ready is None or gen > self._ready[0]:
                    self._ready = (gen, update)
            manager.worker.notify()
        manager.submit_prompt_work(work).add_done_callback(done)

    def handover(self, stream) -> None:
        """(Model worker.) Give the stream the newest prepared change it does not have yet."""
        with self._lock:
            ready = self._ready
            if ready is None or ready[0] <= self._given:
                return
            self._given = ready[0]
        stream.queue_update("vace", ready[1])

    def preview(self) -> np.ndarray | None:
        """The newest control frame the model received, uint8 ``[H, W, 3]`` (None: none yet)."""
        stream = self.session.stream
        if stream is None:
            return None
        runner_stream = stream.group.runner.streams.get(stream.id) if hasattr(stream.group.runner, "streams") else None
        vace = getattr(runner_stream, "vace", None)
        frame = getattr(getattr(vace, "control", None), "preview", None)
        if frame is None or self.control == "none":
            return None
        return ((frame.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()


async def conditioning_of(manager, session, cond):
    """A preset's conditioning, checked (embedded image decoded on a thread, VACE present, control model present):
    a function that applies it to the session (nothing without). A 4xx names what is wrong."""
    if cond is None:
        return lambda: None
    from wanstream.engine.conditioning import check_vace
    try:
        check_vace(manager.model)
    except ValueError as exc:
        raise HTTPException(409, str(exc)) from None
    image = ...
    if cond.reference is not None:
        if not cond.embedded:
            raise HTTPException(422, "conditioning.reference: a preset sent to the server embeds its image "
                                     "(data:image/png;base64,...); the server opens no file")
        loop = asyncio.get_running_loop()
        try:
            image = await loop.run_in_executor(None, lambda: _fit(
                cond.image(max_bytes=manager.settings.max_reference_bytes), session.width, session.height,
                getattr(session.params, "fit", None) or manager.settings.fit))
        except ReferenceImageError as exc:
            raise HTTPException(STATUS[exc.kind], str(exc)) from None
    if cond.control in ("depth", "flow", "pose"):
        from wanstream.engine.control import ControlModelMissing
        try:
            await asyncio.get_running_loop().run_in_executor(None, manager.engine.preprocessors.check, cond.control)
        except ControlModelMissing as exc:
            raise HTTPException(409, str(exc)) from None

    def apply() -> None:
        session.conditioning.change(reference=image, strength=cond.strength, control=cond.control)
    return apply


async def preset_conditioning(session):
    """The session's conditioning as a preset's (its first reference embedded as JPEG), or None without any."""
    from wanstream.api.conditioning import PresetConditioning, data_uri
    cond = session.conditioning
    if not cond.active and cond.strength == 1.0:
        return None
    ref = cond.reference
    first = ref[0] if isinstance(ref, list) else ref
    uri = None if first is None else await asyncio.get_running_loop().run_in_executor(None, data_uri, first)
    return PresetConditioning(reference=uri, strength=cond.strength, control=cond.control)


def _fit(image: np.ndarray, width: int, height: int, fit: str) -> np.ndarray:
    from wanstream.io.framing import fit_frames
    return fit_frames(image, width, height, fit) if image.shape[:2] != (height, width) else image


def conditioning_router(manager, controlled, caller) -> APIRouter:
    router = APIRouter()
    totals = manager.totals
    settings = manager.settings

    def has_vace() -> None:
        from wanstream.engine.conditioning import check_vace
        try:
            check_vace(manager.model)
        except ValueError as exc:
            raise HTTPException(409, str(exc)) from None

    @router.put(f"/api/sessions/{{session_id}}{REFERENCE_PATH_SUFFIX}")
    async def put_reference(session_id: str, request: Request, c=Depends(caller)):
        session = controlled(session_id, c)
        has_vace()
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in REFERENCE_TYPES.values():
            totals.add("references_refused")
            raise HTTPException(415, f"wrong type: a reference image is sent as {', '.join(REFERENCE_TYPES.values())}"
                                     f" (got Content-Type {ctype[:64] or 'none'!r})")
        body = await request.body()
        loop = asyncio.get_running_loop()
        try:
            image = await loop.run_in_executor(None, lambda: _fit(
                decode_reference(body, max_bytes=settings.max_reference_bytes,
                                 max_pixels=settings.max_frame_pixels), session.width, session.height,
                getattr(session.params, "fit", None) or settings.fit))
        except ReferenceImageError as exc:
            totals.add("references_refused")
            raise HTTPException(STATUS[exc.kind], str(exc)) from None
        session.conditioning.change(reference=image)
        totals.add("references_set")
        manager.worker.notify()
        return {"ok": True, "session": session.id, "conditioning": session.conditioning.info()}

    @router.delete(f"/api/sessions/{{session_id}}{REFERENCE_PATH_SUFFIX}")
    async def clear_reference(session_id: str, c=Depends(caller)):
        session = controlled(session_id, c)
        has_vace()
        session.conditioning.change(reference=None)
        return {"ok": True, "session": session.id, "conditioning": session.conditioning.info()}

    @router.get("/api/sessions/{session_id}/conditioning")
    async def get_conditioning(session_id: str, c=Depends(caller)):
        return controlled(session_id, c).conditioning.info()

    @router.post("/api/sessions/{session_id}/conditioning")
    async def set_conditioning(session_id: str, update: ConditioningUpdate, c=Depends(caller)):
        session = controlled(session_id, c)
        has_vace()
        if update.control in ("depth", "flow", "pose"):
            from wanstream.engine.control import ControlModelMissing
            try:
                await asyncio.get_running_loop().run_in_executor(None, manager.engine.preprocessors.check,
                                                                 update.control)
            except ControlModelMissing as exc:
                raise HTTPException(409, str(exc)) from None
        if update.control is not None and update.control != session.conditioning.control:
            totals.add("control_switches")
        session.conditioning.change(strength=update.strength, control=update.control)
        return {"ok": True, "session": session.id, "conditioning": session.conditioning.info()}

    @router.get("/api/sessions/{session_id}/control.jpg")
    async def control_preview(session_id: str, c=Depends(caller)):
        session = controlled(session_id, c)
        frame = await asyncio.get_running_loop().run_in_executor(None, session.conditioning.preview)
        if frame is None:
            raise HTTPException(404, "no control frame yet (set a control kind; frames must be flowing)")
        from PIL import Image
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, "JPEG", quality=80)
        return Response(buf.getvalue(), media_type="image/jpeg", headers={"Cache-Control": "no-store"})

    totals.gauge("sessions_with_reference", "Sessions with a VACE reference image now",
                 lambda: sum(s.conditioning.reference is not None for s in manager.list()))
    totals.gauge("sessions_with_control", "Sessions with a VACE control kind now",
                 lambda: sum(s.conditioning.control != "none" for s in manager.list()))
    return router
