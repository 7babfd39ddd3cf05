"""One live session: its input queue, parameters, engine stream, paced output, statistics and recordings.

A session owns everything of its stream: its input queue (a :class:`~wanstream.core.chunking.ChunkBuffer`), its
parameters, its :class:`~wanstream.engine.stream.EngineStream` (cache rows, prompt K/V, noise, controller, VAE
caches; created and changed only on the model worker thread, which runs the engine), its paced output queue, its
statistics and its recordings. The streams of all sessions share the engine's DiT calls, never their state, so no
frame of one session can reach another.

This is also the frame interface the transports share: ``note_arrival`` / ``enqueue`` (or ``submit``) for
input frames, ``apply`` for parameter changes, ``await next_output()`` for paced output frames, ``close``.

Latency discipline: the input queue holds at most ``queue_chunks`` chunks (5 frames before the first chunk,
4 after); a new frame on a full queue drops the oldest, so the model always gets the newest frames and never a
backlog. A prompt change or a reset discards the frames queued before it. Prompts are encoded on their own
thread, so one stream's new prompt never stalls the others; the frames sent after a prompt change wait (in the
bounded queue) until that prompt is encoded, so they are always restyled by it — the output does not depend on
how fast the encoder was. Admission and the model worker are the manager's (:mod:`wanstream.server.sessions`).
"""


from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from wanstream.api.params import MODEL_FIELDS, PROMPT_FIELDS, ParamsUpdate, SessionParams
from wanstream.core.chunking import ChunkBuffer
from wanstream.engine.loop import EngineStream
from wanstream.engine.parking import NotParkable
from wanstream.server.conditioning import SessionConditioning
from wanstream.server.live import LiveControl
from wanstream.server.outputs import SessionPushes
from wanstream.server.pacing import Pacer, Released
from wanstream.server.recording import Recorder
from wanstream.server.stats import SessionStats

if TYPE_CHECKING:
    from wanstream.server.sessions import SessionManager

log = logging.getLogger("wanstream.server")

KNOBS = ("steps", "noise_scale", "noise_controller", "seed", "lora")


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
    def __init__(self, manager: SessionManager, transport: str, loop: asyncio.AbstractEventLoop | None,
                 encode: bool = True):
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
        self.params = manager.default_params.model_copy(deep=True)
        self.stats = SessionStats(self.clock, settings.target_latency_s)
        self.pacer = Pacer(settings.output_queue_frames)
        self.closed = False
        self.close_reason: str | None = None
        self.stream: EngineStream | None = None     # created, changed and released by the model worker only
        self.parked = None                          # its state while parked (engine.parking.ParkedStream)
        self._parked_frames_in = 0                  # input frames when it was parked (more: resume)
        self._no_park_at = -1                       # a park was refused at this input count (too large)
        self.freeze = False                         # a migration takes the stream: park it now, hold the input
        self.handoff: dict | None = None            # after a migration: the client's last message (a redirect)
        self.resume_token: str | None = None        # a migrated-in stream waiting for its client
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
        # the newest encoding: (gen, embedding, transition chunks, re-cache)
        self._encoded: tuple[int, torch.Tensor, int, bool] | None = None
        self._listeners: list[Callable[[dict], None]] = []
        self._on_close: list[Callable[[str], None]] = []
        self._wake = asyncio.Event() if loop is not None else None
        self.stats.queued = lambda: len(self.buffer)
        self.live = LiveControl(self)           # modulation, MIDI slots and learn, quantised changes, audio
        self.pushes = SessionPushes(self)       # RTMP / SRT pushes of the output (server/outputs.py)
        self.conditioning = SessionConditioning(self)   # VACE reference / control (server/conditioning.py)
        self.stats.engine = lambda: None if self.stream is None else self.stream.stats
        if encode:
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
        """Apply a validated change: model knobs at the next chunk; queued frames dropped on prompt change/reset.
        With ``quantize`` the change waits for the next beat / bar it can land on (:mod:`.live`)."""
        if update.quantize is not None:
            with self._lock:
                if self.closed:
                    raise RuntimeError("this session is closed")
                new, changed = self.params.merged(update)
                if "lora" in changed:
                    self.manager.engine.lora_strengths(new.lora)
            self.live.schedule(update, self.clock(), self.manager.encode_prompt)
            self.manager.worker.notify()
            return self.params
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
            self._encode_prompt(new, new.transition_chunks, new.recache)
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

    def _encode_prompt(self, params: SessionParams, transition_chunks: int, recache: bool = False) -> None:
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
                self._encoded = (gen, embedding, transition_chunks, recache)
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

    def _apply_due(self, update: ParamsUpdate, embedding) -> None:
        """(Worker, before a tick.) A quantised change whose chunk has come: the session takes it as if it were
        asked for now, except that the queued frames stay (they are after the beat) and the prompt is encoded
        already."""
        with self._lock:
            if self.closed:
                return
            new, changed = self.params.merged(update)
            try:
                if "lora" in changed:
                    self.manager.engine.lora_strengths(new.lora)
            except ValueError as exc:
                self.report_error("bad_params", str(exc))
                return
            if update.reset:
                self._reset = True
                self.buffer.restart(discard=False)  # the queued frames start the new stream
            self._dirty |= (changed & MODEL_FIELDS) - PROMPT_FIELDS
            old, self.params = self.params, new
            if changed & PROMPT_FIELDS and embedding is not None:
                self._prompt_gen += 1
                self._encoded = (self._prompt_gen, embedding, new.transition_chunks, new.recache)
        if "recording" in changed:
            try:
                self._set_recording(new.recording)
            except Exception as exc:  # noqa: BLE001 - the client is told; the stream goes on
                with self._lock:
                    self.params = self.params.model_copy(update={"recording": old.recording})
                self.report_error("recording", f"cannot start recording: {exc}")
        self.notify({"type": "params", "ok": True, "params": self.params.model_dump(), "source": "beat"})

    def has_newest_prompt(self) -> bool:
        with self._lock:
            return self._given_gen == self._prompt_gen

    # ------------------------------------------------------------------ model worker side
    def sync(self, engine) -> None:
        """Worker thread, between ticks: create the stream once its newest prompt is encoded; hand it the changes
        (a quantised change whose beat has come, a newly encoded prompt, a reset, knobs, the modulated values);
        release the held queue once the stream has the newest prompt; park the stream after ``park_after_s``
        without input, resume it when anything new comes."""
        if self.parked is not None and not self._resume(engine):
            return                                  # parked, and nothing new
        if self.stream is not None:
            due = self.live.due()
            if due is not None:
                self._apply_due(*due)
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
            engine.set_prompt_embedding(stream, encoded[1], encoded[2], recache=encoded[3])
            given = encoded[0]
        knobs = {k: getattr(params, k) for k in KNOBS if k in dirty}
        if knobs:
            engine.update(stream, **knobs)
        self.live.modulate(engine, stream, dirty)
        self.conditioning.handover(stream)
        with self._lock:
            self._given_gen = given
            self.buffer.held = self._held()
        self._park(engine)

    def _held(self) -> bool:
        """(Under the lock.) The queue waits: a prompt not yet encoded or a change not yet handed to the stream,
        or a migration taking the stream."""
        return self.freeze or self._given_gen < self._prompt_gen or bool(self._dirty) or self._reset

    # ------------------------------------------------------------------ suspend and resume (model worker side)
    def park_due(self, now: float) -> bool:
        """The stream has had no input for ``park_after_s`` and is not parked yet."""
        p = self.settings.park_after_s
        return self.stream is not None and p > 0 and now - self.last_input >= p and \
            self._no_park_at != self.buffer.frames_in

    def _park(self, engine) -> None:
        """Park the stream (its whole state to host memory, its rows back to the pool) once it has had no input
        for ``park_after_s``, or at once when a migration takes it (``freeze``)."""
        stream = self.stream
        if stream is None or self.closed:
            return
        idle = self.park_due(self.clock())
        with self._lock:
            busy = bool(self._dirty) or self._reset or self._given_gen < self._prompt_gen
        if not (self.freeze or idle) or busy or stream.pending_updates() or (self.buffer.ready() and not self.freeze):
            return
        try:
            parked = engine.park(stream)
        except NotParkable:
            self._no_park_at = self.buffer.frames_in
            return
        lot = self.manager.parking
        if not self.freeze and not lot.fits(parked.nbytes):
            self._no_park_at = self.buffer.frames_in
            self.stream = engine.resume(parked, self.buffer)
            return
        with self._lock:
            if self.closed:
                return                              # closed meanwhile: its state goes with it
            self.stream = None
            self.parked = parked
            self._parked_frames_in = self.buffer.frames_in
        for victim in lot.add(self, parked.nbytes):
            victim.expire()
        log.info("session %s parked (%.1f MiB in host memory)", self.id[:8], parked.nbytes / 2**20)

    def _resume(self, engine) -> bool:
        """Resume a parked stream when something new came (frames, a change); True when it runs again."""
        with self._lock:
            new = self.buffer.frames_in > self._parked_frames_in or bool(self._dirty) or self._reset or \
                self._given_gen < self._prompt_gen
            if self.freeze or self.closed or not new:
                return False
            parked = self.parked
        stream = engine.resume(parked, self.buffer)
        with self._lock:
            closed = self.closed
            if not closed:
                self.stream, self.parked = stream, None
        self.manager.parking.remove(self, resumed=not closed)
        if closed:
            self.manager.release(stream)
            return False
        log.info("session %s resumed", self.id[:8])
        return True

    def expire(self) -> None:
        """Close a parked session whose memory is needed (the client is told why)."""
        from wanstream.server.parking import EXPIRED_MESSAGE
        self.notify({"type": "closed", "reason": "parked_expired", "message": EXPIRED_MESSAGE})
        self.close("parked_expired")

    def deliver(self, outputs: list, dropped_in_flight: int = 0) -> None:
        """Output frames (``OutputFrame``) of the model, oldest first; ``dropped_in_flight`` frames before them
        will never come out."""
        self.pacer.push_drop(dropped_in_flight)
        self.pacer.push(outputs, self.clock())
        rec = self.recorder
        if rec is not None:
            for out in outputs:
                rec.write(out.image)
        if self.pushes.pushes:
            self.pushes.frames(outputs)
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
                "stats": self.stats.summary(), "recordings": [r.info() for r in self.recordings],
                "live": self.live.info(), "pushes": self.pushes.info(), "serving": self.serving_stats(events=8)}

    def serving_stats(self, events: int = 2) -> dict:
        """Parked or not; its degradation rung and the last moves with their reasons; its viewer's stalls and slack
        (core/playout.py); the drift watchdog's score and refreshes (engine/drift.py)."""
        out: dict = {"parked": self.parked is not None}
        stream = self.stream
        if stream is None:
            return out
        rec = stream.record
        st = rec.stats
        out.update({"rung": st.rung, "steps_now": rec.schedule.steps, "decoder_now": stream.decoder,
                    "degraded_chunks": st.degraded_chunks, "degradations": st.degradations,
                    "restorations": st.restorations, "ladder_events": st.ladder_events[-events:],
                    **rec.playout.summary(self.clock())})
        drift = getattr(stream, "drift", None)
        if drift is not None:
            out["drift"] = drift.summary()
        return out

    def stats_message(self) -> dict:
        s = self.stats.summary()
        return {"type": "stats", "session": self.id, "fps_in": s["fps_in"], "fps_out": s["fps_out"],
                "latency_ms": {"p50": s["latency_ms"]["p50"], "p95": s["latency_ms"]["p95"]},
                "ttff_s": s["ttff_s"], "frames_in": s["frames_in"], "frames_to_model": s["frames_to_model"],
                "frames_out": s["frames_out"], "frames_dropped": s["frames_dropped"], "queued": s["queued"],
                "in_flight": s["in_flight"], "deadline_misses": s["deadline_misses"],
                "bad_frames": s["bad_frames"], "bad_messages": s["bad_messages"],
                "dropped_messages": s["dropped_messages"], "recording": self.recorder is not None,
                "recordings": [r.info() for r in self.recordings], "serving": self.serving_stats()}

    # ------------------------------------------------------------------ end
    def close(self, reason: str = "closed") -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self.close_reason = reason
            stream, self.stream = self.stream, None
            self.parked = None                      # a parked state (host memory): freed now
            self._encoded = None                    # the prompt embedding (MiBs): freed now, not by a GC pass
        self.manager.parking.remove(self)
        self.buffer.clear()
        if self.live.audio is not None:
            self.manager.live.counters.add("audio_dropped", self.live.audio.dropped)
        if stream is not None:
            self.manager.release(stream)
        if self.recorder is not None:
            self.recorder.stop()
            self.recorder = None
        self.pushes.close()
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
