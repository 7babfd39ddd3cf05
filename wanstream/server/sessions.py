"""Sessions and admission: one :class:`Session` per connection, owned by one :class:`SessionManager`.

A session owns everything of its stream: its input queue (a :class:`~wanstream.chunking.ChunkBuffer`), its
parameters, its :class:`~wanstream.engine.EngineStream` (cache rows, prompt K/V, noise, controller, VAE caches;
created and changed only on the model worker thread, which runs the engine), its paced output queue, its
statistics and its recordings. The streams of all sessions share the engine's DiT calls, never their state, so no
frame of one session can reach another.

This is also the frame interface the transports share: ``note_arrival`` / ``enqueue`` (or ``submit``) for
input frames, ``apply`` for parameter changes, ``await next_output()`` for paced output frames, ``close``.

Latency discipline: the input queue holds at most ``queue_chunks`` chunks (5 frames before the first chunk,
4 after); a new frame on a full queue drops the oldest, so the model always gets the newest frames and never a
backlog. A prompt change or a reset discards the frames queued before it. Prompts are encoded on their own
thread, so one stream's new prompt never stalls the others; the frames sent after a prompt change wait (in the
bounded queue) until that prompt is encoded, so they are always restyled by it — the output does not depend on
how fast the encoder was.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from ..chunking import ChunkBuffer
from ..engine import Engine, EngineStream
from ..metrics import MetricsRegistry
from ..scheduler import SLOConfig
from .pacing import Pacer, Released
from .params import MODEL_FIELDS, PROMPT_FIELDS, ParamsUpdate, SessionParams, conditioning
from .recording import Recorder, RecordingStore
from .settings import ServerSettings
from .stats import ServerTotals, SessionStats

log = logging.getLogger("wanstream.server")

KNOBS = ("steps", "noise_scale", "noise_controller", "seed", "lora")


class ServerFull(Exception):
    """No room for another session; the message says why (for the client), ``code`` is ``server_full`` or
    ``draining`` (the server is shutting down: connect again to reach another server)."""

    def __init__(self, message: str, code: str = "server_full"):
        super().__init__(message)
        self.code = code


class TokenBucket:
    def __init__(self, rate: float, burst: float, clock: Callable[[], float]):
        self.rate, self.burst, self.clock = rate, burst, clock
        self.tokens = burst
        self.t = clock()

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
        self.t = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class Session:
    def __init__(self, manager: SessionManager, transport: str, loop: asyncio.AbstractEventLoop | None):
        settings = manager.settings
        self.manager = manager
        self.settings = settings
        self.clock = manager.clock
        self.id = uuid.uuid4().hex
        self.secret = secrets.token_urlsafe(24)     # the stream's authority over HTTP (see auth.py); never listed
        self.transport = transport
        self.loop = loop
        self.width, self.height = settings.width, settings.height
        self.created = self.clock()
        self.last_input = self.created
        self.params = SessionParams(prompt=settings.prompt, steps=settings.steps, noise_scale=settings.noise_scale)
        self.stats = SessionStats(self.clock, settings.target_latency_s)
        self.pacer = Pacer(settings.output_queue_frames)
        self.closed = False
        self.close_reason: str | None = None
        self.stream: EngineStream | None = None     # created, changed and released by the model worker only
        self.recorder: Recorder | None = None
        self.recordings: list[Recorder] = []
        self.control_bucket = TokenBucket(settings.control_rate, settings.control_burst, self.clock)
        self._error_bucket = TokenBucket(2.0, 5, self.clock)
        self._lock = threading.Lock()
        self.buffer = ChunkBuffer(max_chunks=settings.queue_chunks, on_drop=self.stats.on_dropped_early,
                                  on_take=self._on_take)
        self._arrivals = 0
        self._dirty: set[str] = set()
        self._reset = False
        self._prompt_gen = 0                    # the newest prompt asked for
        self._given_gen = 0                     # the prompt the stream has (0: no stream yet)
        self._encoded: tuple[int, torch.Tensor, int] | None = None   # newest encoding: (gen, embedding, transition)
        self._listeners: list[Callable[[dict], None]] = []
        self._on_close: list[Callable[[str], None]] = []
        self._wake = asyncio.Event() if loop is not None else None
        self.stats.queued = lambda: len(self.buffer)
        self._encode_prompt(self.params, 0)

    # ------------------------------------------------------------------ inputs (transport side)
    @property
    def chunk_len(self) -> int:
        return self.buffer.next_len

    def note_arrival(self, t: float | None = None) -> tuple[float, int]:
        """A frame arrived (before decoding): ``(arrival time, arrival number)``."""
        t = self.clock() if t is None else t
        self.last_input = t
        self.stats.on_received(t)
        with self._lock:
            seq = self._arrivals
            self._arrivals += 1
        return t, seq

    def note_drop(self, n: int = 1) -> None:
        """``n`` arrived frames were dropped before reaching the queue."""
        self.stats.on_dropped_early(n)

    def enqueue(self, frame: np.ndarray, t: float, frame_id: int) -> None:
        """Queue a decoded RGB frame (session size) that arrived at ``t``; the oldest is dropped when full.

        ``frame_id`` comes back as the ``index`` of the output frame that restyles it (the client's own frame
        number when it sent one, else the arrival number)."""
        if self.closed:
            return
        self.buffer.push(frame, t, t, frame_id)
        if self.buffer.ready():
            self.manager.worker.notify()

    def _on_take(self, info) -> None:
        """A chunk went to the model (engine thread): its frames are in flight now."""
        for ts in info.arrivals[: info.real]:
            self.stats.model.on_input(timestamp=ts)

    def submit(self, frame: np.ndarray, t: float | None = None, frame_id: int | None = None) -> None:
        """``note_arrival`` + ``enqueue`` for a frame already at the session size."""
        t, seq = self.note_arrival(t)
        self.enqueue(frame, t, seq if frame_id is None else frame_id)

    # ------------------------------------------------------------------ parameters
    def apply(self, update: ParamsUpdate) -> SessionParams:
        """Apply a validated change: model knobs at the next chunk; queued frames dropped on prompt change/reset."""
        with self._lock:
            if self.closed:
                raise RuntimeError("this session is closed")
            new, changed = self.params.merged(update)
            if "lora" in changed:
                self.manager.engine.lora_strengths(new.lora)   # unknown names / bad strengths: a 4xx, nothing set
            if update.reset:
                self._reset = True
                self.buffer.restart()               # the frames after the reset start the new stream
            self._dirty |= changed & MODEL_FIELDS
            old, self.params = self.params, new
            wake = bool(self._dirty) or self._reset
            if wake:
                self.buffer.held = True             # the next frames wait for the worker to hand over the change
        if changed & PROMPT_FIELDS:
            self.buffer.clear()                     # frames from before the change (counted as dropped)
            self._encode_prompt(new, new.transition_chunks)
        if "recording" in changed:
            try:
                self._set_recording(new.recording)
            except Exception as exc:
                with self._lock:
                    self.params = self.params.model_copy(update={"recording": old.recording})
                raise ValueError(f"cannot start recording: {exc}") from None
        if wake:
            self.manager.worker.notify()
        return self.params

    def _encode_prompt(self, params: SessionParams, transition_chunks: int) -> None:
        """Encode the conditioning of ``params`` on the prompt thread; the worker gives it to the stream.

        Until then the session's queue is held: the frames after the change wait for their prompt."""
        with self._lock:
            self._prompt_gen += 1
            gen = self._prompt_gen
            self.buffer.held = True

        def done(future) -> None:
            try:
                embedding = future.result()
            except Exception as exc:  # noqa: BLE001 - the stream keeps its prompt; the client is told
                log.warning("session %s: prompt encoding failed: %s", self.id[:8], exc)
                with self._lock:                    # fall back to the newest prompt that did encode
                    if gen == self._prompt_gen:
                        self._prompt_gen = max(self._given_gen, self._encoded[0] if self._encoded else 0)
                        self.buffer.held = self.stream is None or self._held()
                self.report_error("prompt_error", f"cannot use this prompt ({type(exc).__name__}: {exc})")
                self.manager.worker.notify()
                return
            with self._lock:
                if self.closed or (self._encoded is not None and gen < self._encoded[0]):
                    return                          # a newer prompt is encoded already
                self._encoded = (gen, embedding, transition_chunks)
            self.manager.worker.notify()
        self.manager.encode_prompt(params).add_done_callback(done)

    def _set_recording(self, on: bool) -> None:
        if on and self.recorder is None:
            fps = self.stats.summary()["fps_out"] or 16.0
            fps = float(min(60, max(4, round(fps))))
            rec = self.manager.recordings.start(self.id, self.secret, len(self.recordings) + 1, fps,
                                                self.width, self.height)
            self.recordings.append(rec)
            self.recorder = rec
        elif not on and self.recorder is not None:
            rec, self.recorder = self.recorder, None
            rec.stop()

    # ------------------------------------------------------------------ model worker side
    def sync(self, engine) -> None:
        """Worker thread, between ticks: create the stream once its newest prompt is encoded; hand it the changes
        (a newly encoded prompt, a reset, knobs); release the held queue once the stream has the newest prompt."""
        with self._lock:
            if self.closed:
                return
            encoded, latest = self._encoded, self._prompt_gen
            if self.stream is None and (encoded is None or encoded[0] < latest):
                return                              # the prompt the first frames are for is still being encoded
            dirty, self._dirty = self._dirty, set()
            reset, self._reset = self._reset, False
            params = self.params
        given = self._given_gen
        if self.stream is None:
            stream = engine.open(prompt_embeds=encoded[1], width=self.width, height=self.height, steps=params.steps,
                                 noise_scale=params.noise_scale, noise_controller=params.noise_controller,
                                 seed=params.seed, lora=params.lora or None, decoder=self.settings.decoder,
                                 encoder=self.settings.encoder,
                                 buffer=self.buffer,
                                 target_latency_s=self.settings.target_latency_s)
            with self._lock:
                closed = self.closed
                if not closed:
                    self.stream = stream
                    self._given_gen = encoded[0]
                    self.buffer.held = self._held()
            if closed:                              # closed while the stream was being made
                self.manager.release(stream)
            return
        stream = self.stream
        if reset:
            self.deliver([], stream.in_flight_frames)   # the frames in flight will never come out
            engine.reset(stream, discard_queued=False)
        if encoded is not None and encoded[0] > given:
            engine.set_prompt_embedding(stream, encoded[1], encoded[2])
            given = encoded[0]
        knobs = {k: getattr(params, k) for k in KNOBS if k in dirty}
        if knobs:
            engine.update(stream, **knobs)
        with self._lock:
            self._given_gen = given
            self.buffer.held = self._held()

    def _held(self) -> bool:
        """(Under the lock.) The queue waits: a prompt not yet encoded or a change not yet handed to the stream."""
        return self._given_gen < self._prompt_gen or bool(self._dirty) or self._reset

    def deliver(self, outputs: list, dropped_in_flight: int = 0) -> None:
        """Output frames (``OutputFrame``) of the model, oldest first; ``dropped_in_flight`` frames before them
        will never come out."""
        self.pacer.push_drop(dropped_in_flight)
        self.pacer.push(outputs, self.clock())
        rec = self.recorder
        if rec is not None:
            for out in outputs:
                rec.write(out.image)
        self._wake_loop()

    # ------------------------------------------------------------------ outputs (transport side)
    def poll_output(self, now: float | None = None) -> Released:
        """Release the next due output frame (if any) and account for it in the metrics."""
        now = self.clock() if now is None else now
        r = self.pacer.pop(now)
        if r.dropped:
            try:
                self.stats.model.on_drop(r.dropped)
            except ValueError:
                log.warning("session %s: drop accounting out of step", self.id[:8])
        if r.frame is not None:
            try:
                self.stats.model.on_output(1, now=now)
            except ValueError:
                log.warning("session %s: output accounting out of step", self.id[:8])
            self.manager.totals.on_latency(now - r.frame.timestamp)
        return r

    async def next_output(self):
        """The next output frame, released at an even pace; None once the session is closed."""
        while not self.closed:
            r = self.poll_output()
            if r.frame is not None:
                return r.frame
            if r.wait_s is not None:
                await asyncio.sleep(r.wait_s)
            else:
                self._wake.clear()
                await self._wake.wait()
        return None

    def _wake_loop(self) -> None:
        if self.loop is not None and self._wake is not None and not self.loop.is_closed():
            try:
                self.loop.call_soon_threadsafe(self._wake.set)
            except RuntimeError:  # loop closed meanwhile
                pass

    # ------------------------------------------------------------------ messages to the client
    def add_listener(self, listener: Callable[[dict], None]) -> None:
        """``listener(message)`` is called on the event loop for notices and errors meant for the client."""
        self._listeners.append(listener)

    def on_close(self, callback: Callable[[str], None]) -> None:
        self._on_close.append(callback)

    def _on_loop(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the session's event loop (now when already there, or without a loop)."""
        if self.loop is None:
            fn()
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            fn()
        elif not self.loop.is_closed():
            try:
                self.loop.call_soon_threadsafe(fn)
            except RuntimeError:  # loop closed meanwhile
                pass

    def notify(self, message: dict) -> None:
        def send():
            for listener in list(self._listeners):
                listener(message)
        self._on_loop(send)

    def report_error(self, code: str, message: str) -> None:
        """A per-session error for the client (rate limited: a flood of bad input yields a few messages)."""
        if self._error_bucket.take():
            self.notify({"type": "error", "code": code, "message": message})

    def fail(self, code: str, message: str) -> None:
        """End the session because of an error on the server side (the client is told why)."""
        self.notify({"type": "error", "code": code, "message": message})
        self.close(code)

    # ------------------------------------------------------------------ status
    def info(self) -> dict:
        return {"id": self.id, "transport": self.transport, "age_s": round(self.clock() - self.created, 3),
                "width": self.width, "height": self.height, "params": self.params.model_dump(),
                "stats": self.stats.summary(), "recordings": [r.info() for r in self.recordings]}

    def stats_message(self) -> dict:
        s = self.stats.summary()
        return {"type": "stats", "session": self.id, "fps_in": s["fps_in"], "fps_out": s["fps_out"],
                "latency_ms": {"p50": s["latency_ms"]["p50"], "p95": s["latency_ms"]["p95"]},
                "ttff_s": s["ttff_s"], "frames_in": s["frames_in"], "frames_to_model": s["frames_to_model"],
                "frames_out": s["frames_out"], "frames_dropped": s["frames_dropped"], "queued": s["queued"],
                "in_flight": s["in_flight"], "deadline_misses": s["deadline_misses"],
                "bad_frames": s["bad_frames"], "bad_messages": s["bad_messages"],
                "dropped_messages": s["dropped_messages"], "recording": self.recorder is not None,
                "recordings": [r.info() for r in self.recordings]}

    # ------------------------------------------------------------------ end
    def close(self, reason: str = "closed") -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self.close_reason = reason
            stream, self.stream = self.stream, None
            self._encoded = None                    # the prompt embedding (MiBs): freed now, not by a GC pass
        self.buffer.clear()
        if stream is not None:
            self.manager.release(stream)
        if self.recorder is not None:
            self.recorder.stop()
            self.recorder = None
        self.pacer.clear()
        self.manager._remove(self)
        self._wake_loop()
        def run_callbacks():
            for callback in self._on_close:
                try:
                    callback(reason)
                except Exception:  # noqa: BLE001 - a transport's cleanup must not stop the others
                    log.exception("session %s: close callback failed", self.id[:8])
        self._on_loop(run_callbacks)


def estimate_session_bytes(model, width: int, height: int, steps: int = 4, cache_frames: int = 6) -> int:
    """A rough upper estimate of one stream's GPU memory: KV caches of every stream-batch row, the hidden
    states of one call and the streaming VAE feature caches (encoder and decoder)."""
    elem = torch.finfo(model.dtype).bits // 8
    dit = model.dit
    tokens = model.tokens_per_frame(height, width)
    kv = 2 * dit.num_layers * steps * cache_frames * tokens * dit.dim * elem
    hidden = 8 * steps * tokens * dit.dim * elem
    vae = 2 * 2 * 96 * height * width * elem * 12
    return int(kv + hidden + vae)


class SessionManager:
    """All sessions of the server, admission control and the model worker.

    ``pipeline``: a launched :class:`~wanstream.pipeline.PipelineDriver` (``model`` is then its rank 0 stage):
    the engine's calls, all streams batched, run on its ranks; a failed rank ends the streams (model errors),
    :meth:`failure` says why, and :meth:`shutdown` stops the ranks."""

    def __init__(self, model, settings: ServerSettings, clock: Callable[[], float] = time.perf_counter,
                 free_memory: Callable[[], int | None] | None = None, pipeline=None):
        from .worker import ModelWorker
        self.model = model
        self.settings = settings
        self.clock = clock
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        self.draining = False               # SIGTERM: no new sessions (see lifecycle.py)
        self.metrics = MetricsRegistry()
        self.totals = ServerTotals(capacity=lambda: settings.max_sessions,
                                   active=lambda: [s.stats for s in self.list()])
        self.pipeline = pipeline
        runners = None
        if pipeline is not None:
            from ..pipeline.session import runner_factory
            runners = runner_factory(pipeline, settings.decoder)
        self.engine = Engine(model, slo=SLOConfig(target_latency_s=settings.target_latency_s), clock=clock,
                             runner_factory=runners)
        self.engine.on_fault = self._on_fault
        self._prompts = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wanstream-prompts")
        self.worker = ModelWorker(self)
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
        from ..chunking import CHUNK_FRAMES
        from ..config import CacheConfig
        group = self.engine.groups.get((self.settings.width, self.settings.height, CacheConfig()))
        if group is None:
            return None
        rows = sum(st.schedule.rows for st in list(group.streams) if not st.closed)
        tick = group.scheduler.latency.predict(rows + self.settings.steps)
        return CHUNK_FRAMES / tick if tick else None

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
        now = self.clock()
        idle = [s for s in self.list() if now - s.last_input > self.settings.idle_timeout_s]
        for s in idle:
            s.notify({"type": "closed", "reason": "idle",
                      "message": f"No frames for {self.settings.idle_timeout_s:g} s: the session was closed."})
            s.close("idle")
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
