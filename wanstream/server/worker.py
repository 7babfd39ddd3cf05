"""The model worker: one thread runs the engine for every session of the server.

Each turn: every session hands its pending changes to its engine stream (creating the stream once its first
prompt is encoded), one engine tick runs — the chunks of all sessions that have one ready go through ONE DiT call
(see ``wanstream/engine.py``) — and each session receives its new output frames. Sessions feed frames from the
transports' threads; the worker sleeps until a session has a chunk ready or a change pending. A failure in one
stream's work ends that session with an error (the engine's fault callback); the worker and the others go on.
``stuck_for`` tells ``/api/health`` when a model tick has been running for too long.
"""

from __future__ import annotations

import logging
import threading
import time

import torch

from ..models.text_encoder import return_freed_heap

log = logging.getLogger("wanstream.server")


class ModelWorker:
    def __init__(self, manager):
        self.manager = manager
        self.engine = manager.engine
        self._cond = threading.Condition()
        self._signal = False
        self._stop = False
        self._thread: threading.Thread | None = None
        self._memory_released = False
        self.busy_s = 0.0
        self.ticks = 0
        self._busy_since: float | None = None

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

    def stuck_for(self) -> float:
        """Seconds the running model tick has taken so far (0 when idle)."""
        since = self._busy_since
        return 0.0 if since is None else time.monotonic() - since

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
                self.engine.release_closed()
                if self.manager.model.device.type == "cuda":
                    torch.cuda.empty_cache()
                return_freed_heap()   # the host side too: a closed stream's pages go back to the OS

    # ------------------------------------------------------------------ one turn
    def run_once(self) -> bool:
        """Hand every session's changes to the engine and run one tick; False when there was nothing to do."""
        sessions = self.manager.list()
        for s in sessions:
            try:
                s.sync(self.engine)
            except Exception as exc:  # noqa: BLE001 - one session's failure must not stop the others
                log.exception("session %s: model error", s.id[:8])
                self.manager.totals.add("worker_errors")
                s.fail("model_error", f"the model failed on this stream: {type(exc).__name__}: {exc}")
        if not self.engine.has_work():
            return False
        t0 = time.perf_counter()
        self._busy_since = time.monotonic()
        try:
            self.engine.step()
        finally:
            self._busy_since = None
            self.busy_s += time.perf_counter() - t0
        self.ticks += 1
        for s in sessions:
            stream = s.stream
            if stream is None:
                continue
            outputs = stream.take_outputs()
            if outputs:
                s.deliver(outputs)
        return True

    @property
    def chunks(self) -> int:
        """Chunks that entered the model so far (all sessions)."""
        return self.engine.chunks
