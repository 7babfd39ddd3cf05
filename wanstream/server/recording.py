"""Per-session recording to mp4 on the server (PyAV through :class:`wanstream.io.video.VideoWriter`).

A :class:`Recorder` encodes on its own thread from a bounded queue, so neither the model worker nor the event
loop waits for the encoder. :meth:`Recorder.stop` finishes the file (flushes the encoder, writes the index),
also when the session ends because the client went away; the file is then complete and playable.
"""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path

import numpy as np

from ..io.video import VideoWriter

_STOP = object()


class Recorder:
    def __init__(self, path: Path, fps: float, width: int, height: int, max_queue: int = 256):
        self.path = Path(path)
        self.fps = fps
        self.frames_written = 0
        self.frames_dropped = 0
        self.error: str | None = None
        self.done = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._writer = VideoWriter(self.path, fps, width, height)   # opens the file now: a bad path fails here
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"recorder-{self.path.name}", daemon=True)
        self._thread.start()

    def write(self, image: np.ndarray) -> None:
        if self._stopping:
            return
        try:
            self._queue.put_nowait(image)
        except queue.Full:
            self.frames_dropped += 1

    def stop(self, wait: bool = False, timeout: float | None = 30.0) -> None:
        """Finish the file after the queued frames (on the recorder thread; ``wait`` joins it)."""
        if not self._stopping:
            self._stopping = True
            self._queue.put(_STOP)
        if wait:
            self._thread.join(timeout)

    def _run(self) -> None:
        try:
            while True:
                item = self._queue.get()
                if item is _STOP:
                    break
                if self.error is None:
                    try:
                        self._writer.write(item)
                        self.frames_written += 1
                    except Exception as exc:  # noqa: BLE001 - a full disk must not kill the session
                        self.error = str(exc)
        finally:
            try:
                self._writer.close()
            except Exception as exc:  # noqa: BLE001
                self.error = self.error or str(exc)
            self.done.set()

    def info(self) -> dict:
        return {"file": self.path.name, "frames": self.frames_written, "dropped": self.frames_dropped,
                "complete": self.done.is_set(), "error": self.error}


def recording_path(record_dir: Path, session_id: str, number: int) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(record_dir) / f"{stamp}-{session_id[:8]}-{number}.mp4"
