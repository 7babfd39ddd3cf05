"""Per-session recording to mp4 on the server (PyAV through :class:`wanstream.io.video.VideoWriter`).

A :class:`Recorder` encodes on its own thread from a bounded queue, so neither the model worker nor the event
loop waits for the encoder. :meth:`Recorder.stop` finishes the file (flushes the encoder, writes the index),
also when the session ends because the client went away; the file is then complete and playable. A finished
recorder lets go of its encoder at once (the codec's own threads end with it).

A recording is written to a hidden temporary file beside its final name (``.NAME.partial.mp4``) and renamed to
``NAME.mp4`` only once it is finished: only finished recordings are listed and downloadable. A recording that got
no frame is not kept (its temporary file is deleted), nor is one whose file could not be finished. A crash leaves
at most a hidden ``.partial.mp4`` file, never listed (it counts against the folder's budget until deleted).

:class:`RecordingStore` holds the bounds: recordings per stream, files and bytes in the recording folder
(a new recording is refused with the reason; a running one is finished when the byte budget is reached), and
who owns which file (the stream secret that may download it).
"""

from __future__ import annotations

import os
import queue
import re
import threading
import time
from pathlib import Path

import numpy as np

from wanstream.io.video import VideoWriter
from wanstream.server.auth import same_secret

_STOP = object()
RECORDING_NAME = re.compile(r"^[\w-][\w.-]{0,127}\.mp4$")   # our names; never hidden (temporary files are)


class RecordingRefused(Exception):
    """A recording cannot start; the message says which bound was reached."""


class Recorder:
    def __init__(self, path: Path, fps: float, width: int, height: int, max_queue: int = 256,
                 over_budget=None, check_every: int = 8, on_done=None):
        self.path = Path(path)
        self._on_done = on_done                # called on the recorder's thread once the file is closed
        self.fps = fps
        self.frames_written = 0
        self.frames_dropped = 0
        self.error: str | None = None
        self.cut = False                       # finished early: the disk budget was reached
        self.done = threading.Event()
        self._over_budget = over_budget        # () -> str | None: why recording must stop now
        self._check_every = check_every
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self.kept = False                      # the finished file is in place under its final name
        self._temp = partial_path(self.path)
        # the recorder renames its own hidden file (it decides what is kept: frames, budget cuts), so the writer
        # writes that file directly
        self._writer = VideoWriter(self._temp, fps, width, height, atomic=False)   # a bad path fails here
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
        """Finish the file after the queued frames (on the recorder thread; ``wait`` joins it). Never blocks
        without ``wait``."""
        if not self._stopping:
            self._stopping = True
            try:
                self._queue.put_nowait(_STOP)
            except queue.Full:                 # the thread drains the queue and then sees _stopping
                pass
        if wait:
            self._thread.join(timeout)

    def _next(self):
        while True:
            try:
                return self._queue.get(timeout=0.25)
            except queue.Empty:
                if self._stopping:
                    return _STOP

    def _run(self) -> None:
        try:
            while (item := self._next()) is not _STOP:
                if self.error is not None:
                    continue
                try:
                    self._writer.write(item)
                    self.frames_written += 1
                except Exception as exc:  # noqa: BLE001 - a full disk must not kill the session
                    self.error = str(exc)
                if self._over_budget is not None and self.frames_written % self._check_every == 0:
                    why = self._over_budget()
                    if why is not None:
                        self.error, self.cut, self._stopping = why, True, True
                        break
        finally:
            closed = False
            try:
                self._writer.close()
                closed = True
            except Exception as exc:  # noqa: BLE001
                self.error = self.error or str(exc)
            self._writer = None                # frees the encoder and its threads now, not when collected
            self._finish(closed)
            self.done.set()
            if self._on_done is not None:
                self._on_done()

    def _finish(self, closed: bool) -> None:
        """Rename the finished file into place, or delete it (no frame, or not finished)."""
        try:
            if closed and self.frames_written > 0:
                os.replace(self._temp, self.path)
                self.kept = True
                return
            self._temp.unlink(missing_ok=True)
        except OSError as exc:
            self.error = self.error or f"cannot finish the file: {exc.strerror or exc}"
            return
        if self.frames_written == 0:
            self.error = self.error or "no frame was recorded: nothing kept"

    def info(self) -> dict:
        return {"file": self.path.name, "frames": self.frames_written, "dropped": self.frames_dropped,
                "complete": self.done.is_set(), "kept": self.kept, "error": self.error}


def partial_path(path: Path) -> Path:
    """The hidden temporary file a recording is written to before it is renamed to ``path``."""
    return path.with_name(f".{path.stem}.partial{path.suffix}")


def recording_path(record_dir: Path, session_id: str, number: int) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(record_dir) / f"{stamp}-{session_id[:8]}-{number}.mp4"


class RecordingStore:
    """The recordings of a server: bounds, owners, running recorders. Thread-safe."""

    def __init__(self, record_dir: Path, max_per_session: int, max_files: int, max_bytes: int,
                 on_event=lambda name: None, scan_interval_s: float = 1.0, on_done=None):
        self.dir = Path(record_dir)
        self.max_per_session = max_per_session
        self.max_files = max_files
        self.max_bytes = max_bytes
        self._on_event = on_event                  # counts "recordings_started" / "_refused" / "_cut"
        self._on_done = on_done                    # a recorder finished (its encoder's memory is free)
        self._scan_interval_s = scan_interval_s
        self._lock = threading.Lock()
        self._owners: dict[str, str] = {}          # file name → secret of the stream that recorded it
        self._recorders: dict[str, Recorder] = {}  # file name → its recorder (this server's files)
        self._scan: tuple[float, int, int] | None = None

    # ------------------------------------------------------------------ disk
    def usage(self, fresh: bool = False) -> tuple[int, int]:
        """``(files, bytes)`` of the mp4 files in the folder, running recordings' temporary files included
        (re-read at most every ``scan_interval_s``)."""
        now = time.monotonic()
        with self._lock:
            if not fresh and self._scan is not None and now - self._scan[0] < self._scan_interval_s:
                return self._scan[1], self._scan[2]
        files = total = 0
        if self.dir.is_dir():
            for f in self.dir.glob("*.mp4"):
                try:
                    total += f.stat().st_size
                except OSError:
                    continue
                files += 1
        with self._lock:
            self._scan = (now, files, total)
        return files, total

    def _over_budget(self) -> str | None:
        _, used = self.usage()
        if used >= self.max_bytes:
            self._on_event("recordings_cut")
            return f"recording stopped: the recordings folder reached its budget of {self.max_bytes} bytes"
        return None

    # ------------------------------------------------------------------ start / stop
    def start(self, session_id: str, secret: str, number: int, fps: float, width: int, height: int) -> Recorder:
        """A new running recording of a stream (its ``number``-th), or :class:`RecordingRefused`."""
        why = None
        if number > self.max_per_session:
            why = f"this stream has used its {self.max_per_session} recordings"
        else:
            files, used = self.usage(fresh=True)
            if files >= self.max_files:
                why = f"the recordings folder holds {files} files, the limit is {self.max_files}"
            elif used >= self.max_bytes:
                why = f"the recordings folder is at its budget of {self.max_bytes} bytes"
        if why is not None:
            self._on_event("recordings_refused")
            raise RecordingRefused(why)
        rec = Recorder(recording_path(self.dir, session_id, number), fps, width, height,
                       over_budget=self._over_budget, on_done=self._on_done)
        with self._lock:
            self._owners[rec.path.name] = secret
            self._recorders[rec.path.name] = rec
            self._scan = None
        self._on_event("recordings_started")
        return rec

    def running(self) -> list[Recorder]:
        with self._lock:
            return [r for r in self._recorders.values() if not r.done.is_set()]

    def stop_all(self, wait: bool = True) -> None:
        for r in self.running():
            r.stop(wait=wait)

    # ------------------------------------------------------------------ listing / access
    def owned_by(self, name: str, secret: str | None) -> bool:
        with self._lock:
            owner = self._owners.get(name)
        return same_secret(secret, owner)

    def path(self, name: str) -> Path | None:
        """The file of a recording name (None for names that are not recordings of this folder)."""
        if not RECORDING_NAME.match(name):
            return None
        path = self.dir / name
        try:
            return path if path.is_file() else None
        except OSError:                            # e.g. a name the file system refuses
            return None

    def listing(self, visible=lambda name: True) -> list[dict]:
        """The finished recordings (at most ``max_files``, newest last) that ``visible(name)`` admits, with the
        state of this server's recorders (temporary files of running or cut-short recordings are not listed)."""
        found = self.dir.glob("*.mp4") if self.dir.is_dir() else []
        files = sorted(f for f in found if RECORDING_NAME.match(f.name))[-self.max_files:]
        with self._lock:
            known = dict(self._recorders)
        out = []
        for f in files:
            if not visible(f.name):
                continue
            rec = known.get(f.name)
            try:
                size = f.stat().st_size
            except OSError:
                continue
            out.append({"file": f.name, "bytes": size, "complete": True,      # (only finished files have the name)
                        "frames": rec.frames_written if rec else None, "error": rec.error if rec else None})
        return out
