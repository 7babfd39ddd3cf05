"""Presets over HTTP (the page's "Save preset" / "Load preset"), in the file format of :mod:`wanstream.api.presets`.

``POST /api/presets/validate`` checks a preset (the schema of the live params, plus: its LoRAs must be loaded on
this server, matched by name) and answers the normalised preset and the live update it stands for;
``GET /api/sessions/{id}/preset`` is a stream's state as a preset (with its mappings and note slots); ``POST /api/sessions/{id}/preset`` applies
one to a stream (its secret or the admin token, like ``/params``). A bad preset gets a 4xx naming the field.
The server never opens a file named in a preset: LoRA paths are matched by name only, and a saved preset names
each LoRA by its file name (put the preset next to its LoRAs to use it with ``--preset`` on the command line).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Depends, HTTPException

from wanstream.api.presets import Preset
from wanstream.server.auth import Caller
from wanstream.server.conditioning import conditioning_of, preset_conditioning
from wanstream.server.live import LiveError
from wanstream.server.sessions import SessionManager


def preset_router(manager: SessionManager, controlled, caller) -> APIRouter:
    """``controlled(session_id, caller)``: the session the caller may steer (else a 403 / 404);
    ``caller``: the dependency that gives the request's :class:`Caller`."""
    router = APIRouter()
    lora_set = getattr(manager.model.dit, "lora", None)
    loaded = {w.name: w for w in lora_set.loras} if lora_set is not None else {}

    def check(preset: Preset) -> dict:
        for i, lo in enumerate(preset.loras):
            if lo.name not in loaded:
                known = ", ".join(loaded) or "none"
                raise HTTPException(422, f"loras.{i}.path: LoRA {lo.name[:100]!r} is not loaded on this server "
                                         f"(loaded: {known}; start `wanstream serve` with --lora)")
        for i, name in (preset.modulation.lora_names() if preset.modulation else []):
            if name not in loaded:
                raise HTTPException(422, f"modulation.mappings.{i}.target: LoRA {name[:100]!r} is not loaded on "
                                         f"this server (loaded: {', '.join(loaded) or 'none'})")
        return preset.to_params().model_dump(exclude_none=True)

    @router.post("/api/presets/validate")
    async def validate(preset: Preset):
        params = check(preset)
        return {"ok": True, "preset": preset.to_dict(),
                "params": params}

    @router.get("/api/sessions/{session_id}/preset")
    async def session_preset(session_id: str, c: Caller = Depends(caller)):
        params = controlled(session_id, c).params
        if lora_set is not None:        # every loaded LoRA with the strength the stream runs it at
            strengths = lora_set.strengths(params.lora)
            params = params.model_copy(update={"lora": dict(zip(lora_set.names, strengths))})
        paths = {name: Path(w.path).name for name, w in loaded.items()}
        session = controlled(session_id, c)
        preset = Preset.from_params(params, paths, session.live.spec)
        preset.conditioning = await preset_conditioning(session)       # VACE (server/conditioning.py)
        return preset.to_dict()

    @router.post("/api/sessions/{session_id}/preset")
    async def apply_preset(session_id: str, preset: Preset, c: Caller = Depends(caller)):
        session = controlled(session_id, c)
        check(preset)
        apply_conditioning = await conditioning_of(manager, session, preset.conditioning)    # checked first
        try:
            state = session.apply(preset.to_params())
            apply_conditioning()
            if preset.modulation is not None:
                session.live.set_modulation(preset.modulation)
        except LiveError as exc:
            raise HTTPException(422, str(exc)) from None
        except (ValueError, RuntimeError) as exc:
            raise HTTPException(400, str(exc)) from None
        return {"ok": True, "session": session.id, "params": state.model_dump()}

    return router
