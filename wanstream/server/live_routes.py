"""Live control over HTTP: the tempo, a stream's mappings and note slots, MIDI learn (see :mod:`.live`).

``GET /api/live``: the server's tempo (BPM, beat, phase, what drives it), its MIDI inputs and Link peers (the
token is enough: nothing of any stream). A stream's own (its secret or the admin token, like ``/params``):
``GET`` / ``PUT /api/sessions/{id}/modulation`` (its mappings and note slots, the modulated values now, a pending
quantised change, its audio features; a ``PUT`` replaces them, 422 naming the field when malformed or a LoRA
target is not loaded), ``POST /api/sessions/{id}/learn`` (map the next CC to a target: 409 when no MIDI input is
open) and ``DELETE`` it.
"""

from __future__ import annotations

import asyncio
from typing import Literal

from fastapi import APIRouter, Depends, HTTPException
from pydantic import BaseModel, ConfigDict, Field

from wanstream.api.modulation import MAX_LORA_NAME, Modulation
from wanstream.server.auth import Caller
from wanstream.server.live import LiveError
from wanstream.server.outputs import MAX_URL, PushError
from wanstream.server.sessions import SessionManager


class PushRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    url: str = Field(min_length=1, max_length=MAX_URL, description="rtmp://, rtmps:// or srt:// (see --push-allow)")


class LearnRequest(BaseModel):
    """A mapping without its source: the next CC that arrives becomes it."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    target: str = Field(max_length=MAX_LORA_NAME + 8)
    min: float | None = None
    max: float | None = None
    curve: Literal["linear", "exp", "log", "smooth"] = "linear"
    smoothing_s: float = Field(0.0, ge=0, le=10)


def live_router(manager: SessionManager, controlled, caller) -> APIRouter:
    router = APIRouter()
    hub = manager.live

    def refuse(exc: LiveError) -> HTTPException:
        return HTTPException(409 if "MIDI input" in str(exc) else 422, str(exc))

    @router.get("/api/live")
    async def live_status():
        return hub.status()

    @router.get("/api/sessions/{session_id}/modulation")
    async def modulation(session_id: str, c: Caller = Depends(caller)):
        return controlled(session_id, c).live.info()

    @router.put("/api/sessions/{session_id}/modulation")
    async def set_modulation(session_id: str, spec: Modulation, c: Caller = Depends(caller)):
        session = controlled(session_id, c)
        try:
            session.live.set_modulation(spec)
        except LiveError as exc:
            raise refuse(exc) from None
        return {"ok": True, **session.live.info()}

    @router.post("/api/sessions/{session_id}/learn")
    async def learn(session_id: str, request: LearnRequest, c: Caller = Depends(caller)):
        session = controlled(session_id, c)
        try:
            session.live.learn(request.model_dump(exclude_none=True), manager.clock())
        except LiveError as exc:
            raise refuse(exc) from None
        return {"ok": True, "learning": request.target, "timeout_s": manager.settings.learn_timeout_s}

    @router.delete("/api/sessions/{session_id}/learn")
    async def cancel_learn(session_id: str, c: Caller = Depends(caller)):
        controlled(session_id, c).live.learning = None
        return {"ok": True}

    @router.get("/api/sessions/{session_id}/outputs")
    async def pushes(session_id: str, c: Caller = Depends(caller)):
        return {"pushes": controlled(session_id, c).pushes.info()}

    @router.post("/api/sessions/{session_id}/outputs")
    async def start_push(session_id: str, request: PushRequest, c: Caller = Depends(caller)):
        session = controlled(session_id, c)
        try:
            push = session.pushes.start(request.url)
        except PushError as exc:
            raise HTTPException(exc.status, str(exc)) from None
        return {"ok": True, **push.info()}

    @router.delete("/api/sessions/{session_id}/outputs/{number}")
    async def stop_push(session_id: str, number: int, c: Caller = Depends(caller)):
        session = controlled(session_id, c)
        loop = asyncio.get_running_loop()
        if not await loop.run_in_executor(None, session.pushes.stop, number):
            raise HTTPException(404, "no such push")
        return {"ok": True}

    return router
