"""The model worker: one thread runs the engine for every session of the server.

Each turn: every session hands its pending changes to its engine stream (creating the stream once its first
prompt is encoded), one engine tick runs — the chunks of all sessions that have one ready go through ONE DiT call
(see ``wanstream/engine/loop.py``) — and each session receives its new output frames; a prompt switch's KV re-cache
runs after that, so the frames of the others are on their way first. Sessions feed frames from the
transports' threads; the worker sleeps until a session has a chunk ready or a change pending. A failure in one
stream's work ends that session with an error (the engine's fault callback); the worker and the others go on.
``stuck_for`` tells ``/api/health`` when a model tick has been running for too long.

Host memory: streams of several sessions batched together allocate and free tensors of many sizes from several
threads (the worker, the prompt thread, the transports, the recorders), and glibc keeps the freed pages in its
arenas (measured in a soak: an arena of 414 MB holding 41 MB of live blocks; see docs/reliability.md).
The worker returns them to the OS when it goes idle (``IDLE_TRIM_S`` after its last work: sessions closed or
paused, the transports' clean-up done by then) and at most every ``heap_trim_s`` while streams run (a trim costs
a few milliseconds), so RSS tracks live memory instead of the high-water mark of the allocator.
"""

from __future__ import annotations

import logging
import threading
import time

import torch

from wanstream.models.text_encoder import return_freed_heap

log = logging.getLogger("wanstream.server")

IDLE_TRIM_S = 1.0          # idle this long after work: freed heap pages go back to the OS


class ModelWorker:
    def __init__(self, manager):
        self.manager = manager
        self.engine = manager.engine
        self._cond = threading.Condition()
        self._signal = False
        self._stop = False
        self._thread: threading.Thread | None = None
        self._memory_released = False
        self._heap_dirty = False                # work since the last trim
        self._last_trim = time.monotonic()
        self.heap_trims = 0
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
        """Memory was freed somewhere (a closed stream, a finished recorder, a transport's teardown): release the
        closed streams' rows, and trim the heap once idle (any thread)."""
        self._memory_released = True
        self.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._signal and not self._stop:
                    if not self._cond.wait(IDLE_TRIM_S if self._heap_dirty else None) and self._heap_dirty:
                        self._trim_heap()           # idle: give the freed pages back
                if self._stop:
                    return
                self._signal = False
            while not self._stop and self.run_once():
                self._heap_dirty = True
                if time.monotonic() - self._last_trim > self.manager.settings.heap_trim_s:
                    self._trim_heap()
            if self._memory_released:
                self._memory_released = False
                self._heap_dirty = True
                self.engine.release_closed()
                if self.manager.model.device.type == "cuda":
                    torch.cuda.empty_cache()

    def _trim_heap(self) -> None:
        return_freed_heap()
        self._heap_dirty = False
        self._last_trim = time.monotonic()
        self.heap_trims += 1

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
            self.engine.step(late=False)
            self.ticks += 1
            for s in sessions:
                stream = s.stream
                if stream is None:
                    continue
                outputs = stream.take_outputs()
                if outputs:
                    s.deliver(outputs)
            self.engine.run_late()              # KV re-caches of prompt switches: after the others' frames left
        finally:
            self._busy_since = None
            self.busy_s += time.perf_counter() - t0
        return True

    @property
    def chunks(self) -> int:
        """Chunks that entered the model so far (all sessions)."""
        return self.engine.chunks
