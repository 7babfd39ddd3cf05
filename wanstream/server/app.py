"""The live server: a FastAPI app over one shared model (``wanstream serve``).

Routes: ``/`` the page (static files, no build step), ``/api/ws`` WebSocket stream, ``/api/webrtc/offer``
WebRTC, ``/api/health``, ``/api/sessions`` (+ ``/{id}``, ``/{id}/params``), ``/api/recordings`` (+ ``/{file}``),
``/metrics`` (Prometheus). With a token, every API and stream call needs it: ``Authorization: Bearer T``,
``X-Token: T`` or ``?token=T`` (the page passes the one in its own URL on).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from .params import ParamsUpdate
from .sessions import SessionManager
from .settings import ServerSettings
from .webrtc import AVAILABLE as WEBRTC_AVAILABLE
from .webrtc import webrtc_router
from .ws import ws_router

log = logging.getLogger("wanstream.server")
STATIC = Path(__file__).parent / "static"
RECORDING_NAME = re.compile(r"^[\w.-]+\.mp4$")


def create_app(model, settings: ServerSettings, *, clock=time.perf_counter, stream_factory=None) -> FastAPI:
    """The app; the model worker starts with the app (lifespan) and stops with it (recordings finished)."""
    manager = SessionManager(model, settings, clock=clock, stream_factory=stream_factory)
    executor = ThreadPoolExecutor(settings.codec_threads, thread_name_prefix="wanstream-codec")
    peers: set = set()

    def token_ok(given: str | None) -> bool:
        if settings.token is None:
            return True
        return given is not None and secrets.compare_digest(given.encode(), settings.token.encode())

    def require_token(request: Request) -> None:
        given = request.query_params.get("token") or request.headers.get("x-token")
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        if not token_ok(given):
            raise HTTPException(401, "missing or wrong token", headers={"WWW-Authenticate": "Bearer"})

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        manager.start()
        reaper = asyncio.ensure_future(_reap(manager))
        try:
            yield
        finally:
            reaper.cancel()
            for pc in list(peers):
                with contextlib.suppress(Exception):
                    await pc.close()
            await asyncio.get_running_loop().run_in_executor(None, manager.shutdown)
            executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="wanstream live server", lifespan=lifespan)
    app.state.manager = manager
    app.state.settings = settings
    auth = [Depends(require_token)]

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/health", dependencies=auth)
    async def health():
        return {"status": "ok" if manager.worker.alive else "degraded", "sessions": manager.count,
                "capacity": settings.max_sessions, "device": str(getattr(model, "device", "cpu")),
                "width": settings.width, "height": settings.height, "steps": settings.steps,
                "transports": ["websocket"] + (["webrtc"] if WEBRTC_AVAILABLE else []),
                "limits": {"max_frame_bytes": settings.max_frame_bytes, "prompt_chars": 2000},
                "worker": {"chunks": manager.worker.chunks, "busy_s": round(manager.worker.busy_s, 3)}}

    @app.get("/api/sessions", dependencies=auth)
    async def sessions():
        return {"count": manager.count, "capacity": settings.max_sessions,
                "sessions": [s.info() for s in manager.list()]}

    @app.get("/api/sessions/{session_id}", dependencies=auth)
    async def session_info(session_id: str):
        return _session(manager, session_id).info()

    @app.post("/api/sessions/{session_id}/params", dependencies=auth)
    async def set_params(session_id: str, update: ParamsUpdate):
        session = _session(manager, session_id)
        try:
            state = session.apply(update)
        except (ValueError, RuntimeError) as exc:
            raise HTTPException(400, str(exc)) from None
        return {"ok": True, "session": session.id, "params": state.model_dump()}

    @app.get("/api/recordings", dependencies=auth)
    async def recordings():
        known = {r.path.name: r for r in manager.recorders}
        for s in manager.list():
            known.update({r.path.name: r for r in s.recordings})
        files = sorted(settings.record_dir.glob("*.mp4")) if settings.record_dir.is_dir() else []
        return {"dir": str(settings.record_dir), "recordings": [
            {"file": f.name, "bytes": f.stat().st_size,
             "complete": known[f.name].done.is_set() if f.name in known else True,
             "frames": known[f.name].frames_written if f.name in known else None} for f in files]}

    @app.get("/api/recordings/{name}", dependencies=auth)
    async def recording_file(name: str):
        path = settings.record_dir / name
        if not RECORDING_NAME.match(name) or not path.is_file():
            raise HTTPException(404, "no such recording")
        return FileResponse(path, media_type="video/mp4", filename=name)

    @app.get("/metrics", dependencies=auth)
    async def metrics():
        body = manager.metrics.render() + manager.totals.render()
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    app.include_router(ws_router(manager, executor, token_ok))
    app.include_router(webrtc_router(manager, executor, require_token, peers))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        code = {401: "unauthorized", 404: "not_found", 400: "bad_request", 501: "unavailable"}.get(
            exc.status_code, "error")
        return JSONResponse({"error": code, "message": exc.detail}, status_code=exc.status_code,
                            headers=exc.headers)

    return app


def _session(manager: SessionManager, session_id: str):
    session = manager.get(session_id)
    if session is None:
        raise HTTPException(404, f"no session {session_id[:64]!r}")
    return session


async def _reap(manager: SessionManager) -> None:
    while True:
        await asyncio.sleep(min(1.0, manager.settings.idle_timeout_s / 4))
        try:
            manager.reap_idle()
        except Exception:  # noqa: BLE001
            log.exception("idle reaper")


def uvicorn_config(app: FastAPI, settings: ServerSettings, log_level: str = "info"):
    import importlib.util

    import uvicorn
    if importlib.util.find_spec("websockets") is None and importlib.util.find_spec("wsproto") is None:
        raise RuntimeError("the WebSocket transport needs the 'websockets' package (pip install websockets)")
    return uvicorn.Config(app, host=settings.host, port=settings.port, log_level=log_level,
                          ws_max_size=max(16 * 2**20, 4 * settings.max_frame_bytes), ws_ping_interval=10,
                          ws_ping_timeout=20, timeout_graceful_shutdown=5)


def serve(args) -> int:
    """``wanstream serve``: load the model once, print the URL, serve until interrupted."""
    import uvicorn

    from ..models.loader import load_model
    from .cli import settings_from_args
    settings = settings_from_args(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: reachable from other machines%s", settings.host,
                    "" if settings.token else " WITHOUT a token (consider --token)")
    t0 = time.perf_counter()
    model = load_model(args.model, device=args.device, taehv=settings.decoder == "taehv")
    print(f"wanstream serve: model {args.model} on {model.device} loaded in {time.perf_counter() - t0:.1f} s",
          flush=True)
    app = create_app(model, settings)
    config = uvicorn_config(app, settings)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    query = f"?token={settings.token}" if settings.token else ""
    print(f"wanstream serve: open http://{host}:{settings.port}/{query}  "
          f"({settings.width}x{settings.height}, up to {settings.max_sessions} sessions)", flush=True)
    uvicorn.Server(config).run()
    return 0
