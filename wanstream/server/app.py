"""The live server: a FastAPI app over one shared model (``wanstream serve``).

Routes: ``/`` the page (static files, no build step; ``/favicon.ico``; security headers on every answer:
:mod:`.page_headers`), ``/api/ws`` WebSocket stream, ``/api/webrtc/offer``
WebRTC, ``/whip/{stream}`` and ``/whep/{stream}`` (WHIP ingest / WHEP egress, :mod:`.whip`), ``/api/health``
(liveness), ``/api/ready`` (readiness, see :mod:`.lifecycle`), ``/api/sessions`` (+ ``/{id}``, ``/{id}/params``),
``/api/recordings`` (+ ``/{file}``), ``/metrics`` (Prometheus), presets (``/api/presets/validate``,
``/api/sessions/{id}/preset``: :mod:`.preset_routes`), live control (``/api/live``, ``/api/sessions/{id}/
modulation``, ``.../learn``: :mod:`.live_routes`), pushes (``/api/sessions/{id}/outputs``: :mod:`.outputs`),
live migration (``/api/sessions/{id}/migrate``, ``/api/migrations``: :mod:`.migration`);
MIDI inputs and Ableton Link with ``midi_ports`` / ``link`` (:mod:`.midi`); OSC control over UDP with ``osc_port`` (:mod:`.osc`,
started and stopped with the app). Who may call what is decided in :mod:`.auth` before any route runs (Host /
Origin, the access token, bounded bodies); a stream's details, parameters and recordings over HTTP need its
secret or the admin token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from wanstream.api.params import ParamsUpdate
from wanstream.server.auth import Caller, Guard, caller_of
from wanstream.server.conditioning import conditioning_router
from wanstream.server.connections import guarded_http_protocol, redact_uvicorn_logs
from wanstream.server.lifecycle import export_capacity
from wanstream.server.live_routes import live_router
from wanstream.server.midi import LinkTempo, MidiInputs
from wanstream.server.migration import Migrations, migration_router
from wanstream.server.osc import OSCControl
from wanstream.server.page_headers import SecurityHeaders
from wanstream.server.preset_routes import preset_router
from wanstream.server.protocol import describe_errors
from wanstream.server.sessions import SessionManager
from wanstream.server.settings import ServerSettings
from wanstream.server.webrtc import AVAILABLE as WEBRTC_AVAILABLE
from wanstream.server.webrtc import webrtc_router
from wanstream.server.whip import whip_router
from wanstream.server.ws import ws_router

log = logging.getLogger("wanstream.server")
STATIC = Path(__file__).parent / "static"
SECRET_HELP = "send the stream's secret (X-Stream-Secret header or ?secret=, given when the stream was created) " \
              "or the admin token"


def create_app(model, settings: ServerSettings, *, clock=time.perf_counter, pipeline=None) -> FastAPI:
    """The app; the model worker starts with the app (lifespan) and stops with it (recordings finished).
    ``pipeline``: a launched multi-rank pipeline whose rank 0 stage is ``model`` (stopped with the app)."""
    manager = SessionManager(model, settings, clock=clock, pipeline=pipeline)
    executor = ThreadPoolExecutor(settings.codec_threads, thread_name_prefix="wanstream-codec")
    loop_threads = min(32, (os.cpu_count() or 1) + 4)          # asyncio's default size
    default_executor = ThreadPoolExecutor(loop_threads, thread_name_prefix="wanstream-loop")
    peers: set = set()
    totals = manager.totals
    store = manager.recordings
    _export_bounds(model, settings, manager)
    osc = OSCControl(manager) if settings.osc_port is not None else None
    midi = MidiInputs(manager.live) if settings.midi_ports else None
    link = LinkTempo(manager.live) if settings.link else None
    export_capacity(manager)
    manager.migrations = Migrations(manager)         # live migration in and out (server/migration.py)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if osc is not None:
            osc.start()                 # first: a port in use fails the start-up before anything else runs
        if midi is not None:
            midi.open(settings.midi_ports)
        if link is not None:
            link.start(asyncio.get_running_loop())
        # aiortc encodes / decodes on the loop's default executor. Both pools start all their threads now, so
        # the server's thread count is flat in use and any growth is a leak (see scripts/soak.py).
        loop = asyncio.get_running_loop()
        loop.set_default_executor(default_executor)
        _start_threads(executor, settings.codec_threads)
        _start_threads(default_executor, loop_threads)
        manager.start()
        reaper = asyncio.ensure_future(_reap(manager))
        try:
            yield
        finally:
            reaper.cancel()
            if osc is not None:
                osc.stop()
            if midi is not None:
                midi.close()
            if link is not None:
                link.stop()
            for pc in list(peers):
                with contextlib.suppress(Exception):
                    await pc.close()
            await loop.run_in_executor(None, manager.shutdown)
            executor.shutdown(wait=False, cancel_futures=True)
            default_executor.shutdown(wait=False, cancel_futures=True)

    docs = settings.api_docs
    app = FastAPI(title="wanstream live server", lifespan=lifespan, docs_url="/docs" if docs else None,
                  redoc_url="/redoc" if docs else None, openapi_url="/openapi.json" if docs else None)
    app.add_middleware(Guard, settings=settings, totals=totals)
    app.add_middleware(SecurityHeaders)         # outermost: also on the guard's refusals
    app.state.manager = manager
    app.state.settings = settings
    app.state.osc = osc

    async def caller(request: Request) -> Caller:       # async: a sync dependency would cost a worker thread
        return caller_of(request.scope)

    def controlled(session_id: str, c: Caller):
        """The session, if the caller holds its secret or the admin token (404 unknown, 403 otherwise)."""
        session = manager.get(session_id)
        if session is None:
            raise HTTPException(404, f"no session {session_id[:64]!r}")
        if not c.controls(session):
            totals.refuse("forbidden")
            raise HTTPException(403, f"this stream is not yours: {SECRET_HELP}")
        return session

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml",
                            headers={"Cache-Control": "max-age=86400"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/health")
    async def health():
        """Liveness: "ok" (200); "degraded" when the model worker is gone or a pipeline rank failed ("error" says
        why), "stuck" when one model tick has run longer than ``stuck_after_s`` (a hung kernel or call): 503, so a
        liveness probe restarts the server."""
        stuck = manager.worker.stuck_for()
        state = manager.worker_state()
        failure = manager.failure()
        extra = {"error": failure} if failure else {}
        if manager.pipeline is not None:
            extra["pipeline"] = {"ranks": manager.pipeline.world, "devices": list(manager.pipeline.spec.devices),
                                 "split": [list(r) for r in manager.pipeline.split]}
        body = {"status": state, **extra, "sessions": manager.count, "capacity": settings.max_sessions,
                "device": str(getattr(model, "device", "cpu")),
                "width": settings.width, "height": settings.height, "steps": settings.steps,
                "defaults": manager.default_params.model_dump(exclude={"recording", "lora"}),
                "transports": ["websocket"] + (["webrtc"] if WEBRTC_AVAILABLE else []),
                "limits": {"max_frame_bytes": settings.max_frame_bytes, "prompt_chars": 2000},
                "osc_port": osc.port if osc is not None else None,
                "worker": {"chunks": manager.worker.chunks, "busy_s": round(manager.worker.busy_s, 3),
                           "running_for_s": round(stuck, 3)}}
        return JSONResponse(body, status_code=200 if state == "ok" else 503)

    @app.get("/api/ready")
    async def ready():
        """Readiness for a load balancer: 200 while one more stream would be admitted, else 503 with the reason
        (full / draining / worker_unhealthy / worker_stuck)."""
        cap = manager.capacity()
        return JSONResponse(cap, status_code=200 if cap["ready"] else 503)

    @app.get("/api/sessions")
    async def sessions(c: Caller = Depends(caller)):
        """Every stream for the admin; otherwise only the streams whose secret the caller sent."""
        return {"count": manager.count, "capacity": settings.max_sessions, "load": manager.capacity(),
                "admin": c.admin,
                "sessions": [s.info() for s in manager.list() if c.controls(s)]}

    @app.get("/api/sessions/{session_id}")
    async def session_info(session_id: str, c: Caller = Depends(caller)):
        return controlled(session_id, c).info()

    @app.post("/api/sessions/{session_id}/params")
    async def set_params(session_id: str, update: ParamsUpdate, c: Caller = Depends(caller)):
        session = controlled(session_id, c)
        try:
            state = session.apply(update)
        except (ValueError, RuntimeError) as exc:
            raise HTTPException(400, str(exc)) from None
        return {"ok": True, "session": session.id, "params": state.model_dump()}

    @app.get("/api/recordings")
    async def recordings(c: Caller = Depends(caller)):
        """Every file for the admin; otherwise the recordings of the stream whose secret the caller sent."""
        listing = store.listing(lambda name: c.admin or store.owned_by(name, c.secret))
        return {**({"dir": str(settings.record_dir)} if c.admin else {}), "recordings": listing}

    @app.get("/api/recordings/{name}")
    async def recording_file(name: str, c: Caller = Depends(caller)):
        path = store.path(name)
        if path is None:
            raise HTTPException(404, "no such recording")
        if not (c.admin or store.owned_by(name, c.secret)):
            totals.refuse("forbidden")
            raise HTTPException(403, f"this recording is not yours: {SECRET_HELP}")
        return FileResponse(path, media_type="video/mp4", filename=name)

    @app.get("/metrics")
    async def metrics():
        body = manager.metrics.render() + totals.render()
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    app.include_router(ws_router(manager, executor))
    app.include_router(preset_router(manager, controlled, caller))
    app.include_router(live_router(manager, controlled, caller))
    app.include_router(conditioning_router(manager, controlled, caller))
    app.include_router(webrtc_router(manager, executor, peers))
    app.include_router(whip_router(manager, executor, peers))
    app.include_router(migration_router(manager, manager.migrations, controlled, caller))

    @app.exception_handler(StarletteHTTPException)      # FastAPI's own, and Starlette's (404 route, 400 body)
    async def http_error(request: Request, exc: StarletteHTTPException):
        code = {401: "unauthorized", 403: "forbidden", 404: "not_found", 400: "bad_request", 409: "conflict",
                413: "too_large", 415: "wrong_type", 501: "unavailable"}.get(exc.status_code, "error")
        message = exc.detail
        if message == "There was an error parsing the body":     # FastAPI's words for e.g. JSON nested too deep
            message = "malformed JSON body (nested too deeply, or not decodable)"
        return JSONResponse({"error": code, "message": message}, status_code=exc.status_code,
                            headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        """422 naming the fields; the offending values are not echoed (NaN or lone surrogates cannot be JSON)."""
        return JSONResponse({"error": "invalid", "message": describe_errors(exc.errors(), skip=("body",))},
                            status_code=422)

    return app


def _export_bounds(model, settings: ServerSettings, manager: SessionManager) -> None:
    """Apply the prompt-cache bound to the shared text encoder; export every bound and its usage to /metrics."""
    totals = manager.totals
    encoder = getattr(model, "text_encoder", None)
    if encoder is not None and hasattr(encoder, "limit_cache"):
        encoder.limit_cache(max_bytes=settings.prompt_cache_bytes)
        totals.gauge("prompt_cache_bytes", "Bytes held by the prompt embedding cache",
                     lambda: encoder.cache_info()["bytes"])
        totals.gauge("prompt_cache_entries", "Prompts in the prompt embedding cache",
                     lambda: encoder.cache_info()["entries"])
        totals.gauge("prompt_cache_evictions", "Prompts evicted from the cache (lifetime)",
                     lambda: encoder.cache_info()["evictions"], counter=True)
    store = manager.recordings
    totals.gauge("server_recording_files", "mp4 files in the recording folder", lambda: store.usage()[0])
    totals.gauge("server_recording_bytes", "Bytes of the mp4 files in the recording folder",
                 lambda: store.usage()[1])
    totals.gauge("server_recorders_running", "Recordings being written now", lambda: len(store.running()))
    totals.gauge("process_threads", "Threads of the server process", _thread_count)
    totals.gauge("server_heap_trims", "Freed host heap returned to the OS by the model worker (idle / periodic)",
                 lambda: manager.worker.heap_trims, counter=True)
    totals.limits(**{name: getattr(settings, name) for name in (
        "max_sessions", "idle_timeout_s", "max_frame_bytes", "max_control_bytes", "max_body_bytes",
        "body_timeout_s", "header_timeout_s", "keep_alive_timeout_s", "max_connections", "offer_timeout_s",
        "max_recordings_per_session", "max_recording_files", "max_recording_bytes", "prompt_cache_bytes",
        "heap_trim_s", "max_reference_bytes")})


def _start_threads(pool: ThreadPoolExecutor, n: int) -> None:
    """Make a pool of ``n`` threads start them all (it otherwise adds them one by one as work piles up)."""
    barrier = threading.Barrier(n + 1)
    for _ in range(n):
        pool.submit(barrier.wait, 30)
    barrier.wait(30)


def _thread_count() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:  # not Linux
        return threading.active_count()


async def _reap(manager: SessionManager) -> None:
    while True:
        await asyncio.sleep(min(1.0, manager.settings.idle_timeout_s / 4))
        try:
            manager.reap_idle()
        except Exception:  # noqa: BLE001
            log.exception("idle reaper")


def uvicorn_config(app: FastAPI, settings: ServerSettings, log_level: str = "info",
                   port: int | None = None):
    """uvicorn settings of the app: WebSocket limits, keep-alive and header timeouts, connection cap, no
    secrets in its logs (``port`` overrides the settings' one, e.g. 0 for a free port)."""
    import importlib.util

    import uvicorn
    if importlib.util.find_spec("websockets") is None and importlib.util.find_spec("wsproto") is None:
        raise RuntimeError("the WebSocket transport needs the 'websockets' package (pip install websockets)")
    config = uvicorn.Config(app, host=settings.host, port=settings.port if port is None else port,
                            log_level=log_level, ws_max_size=max(16 * 2**20, 4 * settings.max_frame_bytes),
                            ws_ping_interval=10, ws_ping_timeout=20, timeout_graceful_shutdown=5,
                            timeout_keep_alive=settings.keep_alive_timeout_s,
                            http=guarded_http_protocol(settings, app.state.manager.totals))
    redact_uvicorn_logs()
    return config
