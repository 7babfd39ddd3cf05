"""The model worker: one thread runs all model work of all sessions, one chunk at a time, round robin.

The model (weights, text encoder cache) is shared and a :class:`~wanstream.session.StreamSession` is not
thread-safe, so everything that touches torch happens here. Each turn serves the next session (in order) that
has a full chunk queued or parameter changes pending: reset, then prompt / knob changes, then the chunk.
An exception in one session's work ends that session with an error; the worker and the others go on.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import torch

from ..session import StreamSession
from .params import PROMPT_FIELDS, conditioning

log = logging.getLogger("wanstream.server")

KNOBS = ("steps", "noise_scale", "noise_controller", "seed")


class ModelWorker:
    def __init__(self, manager, stream_factory=None):
        self.manager = manager
        self.model = manager.model
        self.factory = stream_factory or StreamSession
        self._cond = threading.Condition()
        self._signal = False
        self._stop = False
        self._thread: threading.Thread | None = None
        self._next = 0
        self._memory_released = False
        self.busy_s = 0.0
        self.chunks = 0

    # ------------------------------------------------------------------ thread
    def start(self) -> None:
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._run, name="wanstream-model-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def notify(self) -> None:
        with self._cond:
            self._signal = True
            self._cond.notify()

    def memory_released(self) -> None:
        self._memory_released = True
        self.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._signal and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                self._signal = False
            while not self._stop and self.run_once():
                pass
            if self._memory_released:
                self._memory_released = False
                if self.model.device.type == "cuda":
                    torch.cuda.empty_cache()

    # ------------------------------------------------------------------ one turn
    def run_once(self) -> bool:
        """Serve the next session that has work; False when none has."""
        sessions = self.manager.list()
        n = len(sessions)
        for i in range(n):
            session = sessions[(self._next + i) % n]
            work = session.take_work()
            if work is not None:
                self._next = (self._next + i + 1) % n
                self._serve(session, work)
                return True
        return False

    def _serve(self, session, work) -> None:
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                outputs, dropped = self._do(session, work)
        except Exception as exc:  # noqa: BLE001 - one session's failure must not stop the others
            log.exception("session %s: model error", session.id[:8])
            self.manager.totals.add("worker_errors")
            session.finish_work([])
            session.fail("model_error", f"the model failed on this stream: {type(exc).__name__}: {exc}")
            return
        finally:
            self.busy_s += time.perf_counter() - t0
        self.chunks += bool(work.frames)
        session.finish_work(outputs, dropped)

    def _do(self, session, work) -> tuple[list, int]:
        params = work.params
        outputs: list = []
        dropped = 0
        stream = session.stream
        if work.reset and stream is not None:
            dropped = stream.frames_in - stream.frames_out
            stream.reset()
            session.frame_ids.clear()
        if stream is None:
            if not work.frames:
                return [], dropped           # the parameters are read when the stream starts
            stream = self.factory(self.model, prompt_embeds=conditioning(self.model, params),
                                  width=session.width, height=session.height, steps=params.steps,
                                  noise_scale=params.noise_scale, noise_controller=params.noise_controller,
                                  seed=params.seed, decoder=session.settings.decoder)
            session.stream = stream
        else:
            if work.dirty & PROMPT_FIELDS:
                stream.set_prompt_embedding(conditioning(self.model, params), params.transition_chunks)
            knobs = {k: getattr(params, k) for k in KNOBS if k in work.dirty}
            if knobs:
                outputs += stream.update(**knobs)
        if work.frames:
            images = np.stack([f for f, _, _ in work.frames])
            stamps = [t for _, t, _ in work.frames]
            base = stream.frames_in
            for i, (_, t, frame_id) in enumerate(work.frames):
                session.stats.model.on_input(timestamp=t)
                session.frame_ids[base + i] = frame_id
            outputs += stream.push(images, timestamps=stamps)
        for out in outputs:                  # the client's frame ids instead of the stream's own count
            out.index = session.frame_ids.pop(out.index, out.index)
        return outputs, dropped
