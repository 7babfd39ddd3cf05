"""Sessions and admission: every :class:`~wanstream.server.session.Session` of the server is owned by one
:class:`SessionManager`, which admits them (capacity, memory, the engine's predicted rate), runs the model worker
(one engine for every session) and exports their counters.
"""


from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from pydantic import ValidationError

from wanstream.api.params import ParamsUpdate, SessionParams, conditioning
from wanstream.core.config import CacheConfig
from wanstream.core.scheduler import SLOConfig
from wanstream.engine.loop import Engine
from wanstream.engine.metrics import MetricsRegistry
from wanstream.models.kv_cache import stream_cache_bytes
from wanstream.server.live import LiveHub
from wanstream.server.parking import ParkingLot
from wanstream.server.recording import RecordingStore
from wanstream.server.settings import ServerSettings
from wanstream.server.stats import ServerTotals

log = logging.getLogger("wanstream.server")

KNOBS = ("steps", "noise_scale", "noise_controller", "seed", "lora")


from wanstream.server.session import Session


class ServerFull(Exception):
    """No room for another session; the message says why (for the client), ``code`` is ``server_full`` or
    ``draining`` (the server is shutting down: connect again to reach another server)."""

    def __init__(self, message: str, code: str = "server_full"):
        super().__init__(message)
        self.code = code


class SessionExists(ValueError):
    """A stream migrated in whose session is on this server already."""


def estimate_session_bytes(model, width: int, height: int, steps: int = 4, cache: CacheConfig = CacheConfig()) -> int:
    """A rough upper estimate of one stream's GPU memory: its cache rows and prompt slot (one row per step), the
    hidden states of one call and the streaming VAE feature caches (encoder and decoder)."""
    elem = torch.finfo(model.dtype).bits // 8
    dit = model.dit
    tokens = model.tokens_per_frame(height, width)
    layers = len(getattr(dit, "cache_layers", range(dit.num_layers)))         # VACE blocks have caches too
    kv = stream_cache_bytes(layers, steps, cache.capacity, tokens, dit.dim, dit.text_len, model.dtype)
    hidden = 8 * steps * tokens * dit.dim * elem
    vae = 2 * 2 * 96 * height * width * elem * 12
    return int(kv + hidden + vae)


def default_params(settings: ServerSettings) -> SessionParams:
    """The parameters a new session starts with: the settings' prompt, steps, noise scale and framing, then
    ``session_defaults`` (``serve --preset``). ValueError naming the field when those are not valid."""
    base = SessionParams(prompt=settings.prompt, steps=settings.steps, noise_scale=settings.noise_scale,
                         fit=settings.fit)
    if not settings.session_defaults:
        return base
    try:
        update = ParamsUpdate.model_validate(settings.session_defaults)
    except ValidationError as exc:
        from wanstream.server.protocol import describe_errors
        raise ValueError(f"session defaults: {describe_errors(exc.errors())}") from None
    if update.lora or update.recording or update.reset:
        raise ValueError("session defaults: lora, recording and reset are not defaults of a session")
    return base.merged(update)[0]


class SessionManager:
    """All sessions of the server, admission control and the model worker.

    ``pipeline``: a launched :class:`~wanstream.pipeline.PipelineDriver` (``model`` is then its rank 0 stage):
    the engine's calls, all streams batched, run on its ranks; a failed rank ends the streams (model errors),
    :meth:`failure` says why, and :meth:`shutdown` stops the ranks."""

    def __init__(self, model, settings: ServerSettings, clock: Callable[[], float] = time.perf_counter,
                 free_memory: Callable[[], int | None] | None = None, pipeline=None):
        from wanstream.server.worker import ModelWorker
        self.model = model
        self.settings = settings
        self.clock = clock
        self.default_params = default_params(settings)
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        self.draining = False               # SIGTERM: no new sessions (see lifecycle.py)
        self.metrics = MetricsRegistry()
        self.totals = ServerTotals(capacity=lambda: settings.max_sessions,
                                   active=lambda: [s.stats for s in self.list()])
        self.pipeline = pipeline
        runners = None
        if pipeline is not None:
            from wanstream.pipeline.runner import runner_factory
            runners = runner_factory(pipeline, settings.decoder)
        from wanstream.engine.drift import DriftConfig
        self.engine = Engine(model, slo=SLOConfig(target_latency_s=settings.target_latency_s), clock=clock,
                             runner_factory=runners, policy=settings.policy,
                             drift=DriftConfig() if settings.drift_watchdog else None)
        self.engine.on_fault = self._on_fault
        self.parking = ParkingLot(self.totals, settings.park_max_bytes)     # parked streams (server/parking.py)
        for key, doc in (("flags", "Streams flagged by the drift watchdog (--drift-watchdog)"),
                         ("refreshes", "Cache refreshes (sinks re-primed) of flagged streams")):
            self.totals.gauge(f"server_drift_{key}", doc, lambda key=key: self.engine.drift_counts[key], counter=True)
        self._prompts = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wanstream-prompts")
        self.worker = ModelWorker(self)
        self.live = LiveHub(self, settings)         # tempo, MIDI state, live counters (server/live.py)
        self.totals.gauge("server_pushes", "RTMP / SRT pushes running", self.pushes_running)
        self.totals.limits(max_pushes=settings.max_pushes, max_pushes_per_session=settings.max_pushes_per_session,
                           push_queue_frames=settings.push_queue_frames, push_stall_s=settings.push_stall_s)
        self._free_memory = free_memory or self._cuda_free_memory
        self.recordings = RecordingStore(settings.record_dir, settings.max_recordings_per_session,
                                         settings.max_recording_files, settings.max_recording_bytes,
                                         on_event=self.totals.add, on_done=self.worker.memory_released)

    # ------------------------------------------------------------------ admission
    def _cuda_free_memory(self) -> int | None:
        device = getattr(self.model, "device", torch.device("cpu"))
        if device.type != "cuda":
            return None
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached)

    def _no_room(self) -> ServerFull | None:
        """(Under the lock.) Why another session cannot be admitted now, or None: the one admission rule of
        ``open`` and of the readiness a load balancer reads (``readiness``)."""
        s = self.settings
        if self.draining:
            return ServerFull("Server is draining (shutting down): it takes no new streams. Connect again to be "
                              "served by another server.", code="draining")
        if len(self._sessions) >= s.max_sessions:
            return ServerFull(f"Server is full: all {s.max_sessions} session slots are in use. Try again later.")
        free = self._free_memory()
        if free is not None:
            need = estimate_session_bytes(self.model, s.width, s.height) + s.vram_reserve_bytes
            if free < need:
                return ServerFull(f"Server is full: not enough GPU memory for another stream "
                                  f"({free / 2**30:.1f} GiB free, about {need / 2**30:.1f} GiB needed). "
                                  f"Try again later.")
        return None

    def open(self, transport: str, loop: asyncio.AbstractEventLoop | None = None) -> Session:
        """A new session, or :class:`ServerFull` (existing sessions are not touched)."""
        s = self.settings
        failure = self.failure()
        if failure is not None:
            self.totals.add("sessions_rejected")
            raise ServerFull(f"The server cannot take streams: its model pipeline failed ({failure}).")
        with self._lock:
            refusal = self._no_room()
            if refusal is not None:
                self.totals.add("sessions_rejected")
                raise refusal
            session = Session(self, transport, loop)
            self._sessions[session.id] = session
        self.metrics.add(session.id, session.stats)
        self.totals.add("sessions_opened")
        log.info("session %s opened (%s), %d/%d", session.id[:8], transport, self.count, s.max_sessions)
        return session

    def adopt(self, sid: str, secret: str, params: SessionParams, parked, buffer_head: dict, images: list,
              shift: float, arrivals: int, token: str, loop) -> Session:
        """A stream migrated in (server/migration.py): a session with its id, secret, parameters, frame numbering,
        queued frames and parked state, waiting for its client (``resume_token``). ServerFull when there is no room,
        ValueError when that session is here already or its queue is malformed; nothing changes then."""
        with self._lock:
            refusal = self._no_room()
            if refusal is not None:
                self.totals.add("sessions_rejected")
                raise refusal
            if sid in self._sessions:
                raise SessionExists(f"session {sid[:8]}... is already on this server")
            session = Session(self, "migrated", loop, encode=False)
            session.buffer.restore(buffer_head, images, shift)
            session.id, session.secret, session.params = sid, secret, params
            session._arrivals = arrivals
            session.parked = parked
            session._parked_frames_in = session.buffer.frames_in
            session.resume_token = token
            self._sessions[sid] = session
        for _, info in sorted(parked.host["stream"]["chunks"].items(), key=lambda kv: int(kv[0])):
            for ts in info["arrivals"][: info["real"]]:        # its frames in the model come out here
                session.stats.model.on_input(timestamp=ts)
        self.metrics.add(session.id, session.stats)
        self.totals.add("sessions_opened")
        for victim in self.parking.add(session, parked.nbytes):
            victim.expire()
        return session

    def claim(self, token: str, loop) -> Session | None:
        """The migrated-in session waiting for the client that presents ``token`` (once), or None."""
        from wanstream.server.auth import same_secret
        with self._lock:
            for s in self._sessions.values():
                if s.resume_token is not None and same_secret(token, s.resume_token):
                    s.resume_token = None
                    s.transport, s.loop = "websocket", loop
                    s.last_input = self.clock()
                    return s
        return None

    def _remove(self, session: Session) -> None:
        with self._lock:
            if self._sessions.pop(session.id, None) is None:
                return
        self.metrics.remove(session.id)
        self.totals.retire(session.stats)
        log.info("session %s closed (%s), %d/%d", session.id[:8], session.close_reason, self.count,
                 self.settings.max_sessions)

    def release(self, stream) -> None:
        """A closed session's stream: its cache rows go back to the pool at the worker's next turn."""
        self.engine.close(stream)
        self.worker.memory_released()

    def encode_prompt(self, params: SessionParams) -> Future:
        """The conditioning of ``params`` (text encoder, blends), computed on the prompt thread."""
        return self._prompts.submit(conditioning, self.model, params)

    def submit_prompt_work(self, fn) -> Future:
        """Other text-encoder work (a modulated blend's prompts) on the prompt thread."""
        return self._prompts.submit(fn)

    def pushes_running(self) -> int:
        return sum(s.pushes.running() for s in self.list())

    def lora_names(self) -> list[str]:
        lora_set = getattr(self.model.dit, "lora", None)
        return list(lora_set.names) if lora_set is not None else []

    # ------------------------------------------------------------------ lookup
    def get(self, session_id: str) -> Session | None:
        with self._lock:
            return self._sessions.get(session_id)

    def list(self) -> list[Session]:
        with self._lock:
            return list(self._sessions.values())

    @property
    def count(self) -> int:
        with self._lock:
            return len(self._sessions)

    # ------------------------------------------------------------------ readiness, capacity, drain
    def worker_state(self) -> str:
        """"ok"; "degraded" when the model worker is gone or the model pipeline failed (:meth:`failure`); "stuck"
        when one model tick has run longer than ``stuck_after_s`` (a hung kernel or call)."""
        if not self.worker.alive or self.failure() is not None:
            return "degraded"
        return "stuck" if self.worker.stuck_for() > self.settings.stuck_after_s else "ok"

    def readiness(self) -> tuple[str | None, str]:
        """``(None, "ready")`` while one more stream would be admitted, else ``(reason, message)`` with reason
        ``draining`` / ``worker_unhealthy`` / ``worker_stuck`` / ``full``."""
        worker = self.worker_state()
        if worker != "ok" and not self.draining:
            reason = "worker_unhealthy" if worker == "degraded" else "worker_stuck"
            return reason, (f"the model worker is {worker}" + (
                f": one model tick has run {self.worker.stuck_for():.0f} s" if worker == "stuck" else ""))
        with self._lock:
            refusal = self._no_room()
        if refusal is None:
            return None, "ready"
        return ("draining" if refusal.code == "draining" else "full"), str(refusal)

    def predicted_stream_fps(self) -> float | None:
        """Frames per second each stream would get with one more stream at the default steps, from the engine's
        measured tick latency (the scheduler's latency model); None before any tick at this resolution."""
        from wanstream.core.schedule import StreamSchedule
        backbone = self.engine.backbone
        group = self.engine.groups.get((self.settings.width, self.settings.height, backbone.cache("v2v")))
        if group is None:
            return None
        rows = sum(st.schedule.rows_per_tick for st in list(group.streams) if not st.closed)
        new = StreamSchedule("new", self.settings.steps, backbone=backbone).rows_per_tick
        tick = group.planner.latency.predict(rows + new)
        return backbone.chunk_rule("v2v").frames / tick if tick else None

    def capacity(self) -> dict:
        """Load and capacity for autoscalers and load balancers (``/api/sessions``, ``/api/ready``)."""
        reason, message = self.readiness()
        active = self.count
        fps = self.predicted_stream_fps()
        return {"active": active, "max": self.settings.max_sessions,
                "free": 0 if self.draining else max(0, self.settings.max_sessions - active),
                "ready": reason is None, "reason": reason, "message": message, "draining": self.draining,
                "predicted_fps_per_stream_next": None if fps is None else round(fps, 2)}

    def start_drain(self) -> None:
        """Refuse new sessions from now on (``ServerFull`` with code ``draining``); running ones go on."""
        if not self.draining:
            self.draining = True
            log.info("draining: new streams are refused, %d running", self.count)

    def end_all(self, reason: str, message: str) -> None:
        """Close every session, telling each client why (the end of a drain)."""
        for s in self.list():
            s.notify({"type": "closed", "reason": reason, "message": message})
            s.close("server shutdown")

    # ------------------------------------------------------------------ lifecycle
    def failure(self) -> str | None:
        """Why the model cannot serve any more (a pipeline rank failed); None while it can."""
        return self.pipeline.failure() if self.pipeline is not None else None

    def reap_idle(self) -> list[Session]:
        """Close the sessions without input for ``idle_timeout_s`` (and every session once the model pipeline
        failed: a session waiting for input would otherwise learn it only with its next chunk)."""
        failure = self.failure()
        if failure is not None:
            for s in self.list():
                s.fail("model_error", f"the model pipeline failed: {failure}")
        now, st = self.clock(), self.settings
        idle = []
        for s in self.list():
            if s.resume_token is not None:          # migrated here; its client has not come back
                if now - s.created > st.resume_timeout_s:
                    s.close("migration_unclaimed")
                    idle.append(s)
                continue
            limit = st.parked_timeout_s if s.parked is not None else st.idle_timeout_s
            if now - s.last_input > limit:
                s.notify({"type": "closed", "reason": "idle",
                          "message": f"No frames for {limit:g} s: the session was closed."})
                s.close("idle")
                idle.append(s)
        if any(s.park_due(now) for s in self.list()):
            self.worker.notify()                    # the worker parks them at its next turn
        return idle

    def _on_fault(self, stream, message: str) -> None:
        """A stream's model work failed (engine thread): only its session ends, with the reason."""
        self.totals.add("worker_errors")
        for s in self.list():
            if s.stream is stream:
                s.fail("model_error", message)

    def start(self) -> None:
        self.worker.start()

    def shutdown(self) -> None:
        """Close every session, finish every recording, stop the worker."""
        for s in self.list():
            s.close("server shutdown")
        self.worker.stop()
        self._stop_pipeline()
        self._prompts.shutdown(wait=False, cancel_futures=True)
        self.recordings.stop_all(wait=True)

    def _stop_pipeline(self) -> None:
        """Stop every rank: cleanly once the worker is gone, at once if a model tick is still stuck in it."""
        drv = self.pipeline
        if drv is None or drv.closed:
            return
        if self.worker.alive:
            drv._abort(RuntimeError("server shutdown while a model tick was still running"))
            return
        try:
            drv.close()
        except Exception:  # noqa: BLE001 - close() stopped the ranks the hard way; shutdown goes on
            log.exception("stopping the pipeline")
