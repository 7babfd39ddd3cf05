"""Pushing a stream's output to a live tool: RTMP / SRT (OBS, a streaming platform, a media server) with its audio.

``POST /api/sessions/{id}/outputs`` with ``{"url": "rtmp://host/app/key"}`` (or ``rtmps://``, ``srt://``) starts a
push of that stream's restyled frames and its audio (the audio of its WebRTC / WHIP peer, silence without one);
``GET`` lists the stream's pushes, ``DELETE /api/sessions/{id}/outputs/{n}`` stops one. A push is a process of
its own (:mod:`.push_worker`, PyAV: H.264 + AAC in FLV for RTMP, MPEG-TS for SRT), fed through a pipe by a
feeder thread from a queue of the newest frames:

- the model worker only appends to that queue (``push_queue_frames``; when full the oldest frame is dropped and
  counted), so a slow or stalled server never holds a tick or another stream;
- a push that makes no progress for ``push_stall_s`` (the server stopped reading) is killed and reported
  ``failed`` to the stream's client, as is one whose process exits; nothing else is touched;
- stopping one (or closing the stream) kills its process: no thread or process outlives the push.

Who may push where: the operator allows destinations with ``serve --push-allow PREFIX`` (repeatable, e.g.
``rtmp://127.0.0.1/`` or ``rtmp://a.rtmp.youtube.com/live2/``); a URL that starts with none of them is refused
(403), so a client cannot make the server connect anywhere else. Without ``--push-allow`` pushes are off.
Bounds: ``max_pushes_per_session`` and ``max_pushes`` (running at once), counted in ``/metrics``
(``wanstream_server_pushes``, ``..._pushes_{started,refused,failed}_total``, ``..._push_frames_dropped_total``).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections import deque
from urllib.parse import urlsplit

import numpy as np

from wanstream.server.push_worker import COUNT, HEAD

log = logging.getLogger("wanstream.server.outputs")

SCHEMES = {"rtmp": "flv", "rtmps": "flv", "srt": "mpegts"}
MAX_URL = 2048
AUDIO_RATE = 48000


class PushError(ValueError):
    """A push that cannot start; ``status`` is the HTTP answer (403 not allowed, 409 over a bound, 422 bad)."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


def check_url(url: str, allowed: list[str]) -> str:
    """The container format for ``url``, or :class:`PushError` naming the problem."""
    if not isinstance(url, str) or not url or len(url) > MAX_URL or any(ord(c) < 33 for c in url):
        raise PushError(f"url: a push URL is 1-{MAX_URL} printable characters without spaces")
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES or not parts.hostname:
        raise PushError(f"url: push to rtmp://, rtmps:// or srt:// URLs (got {url[:60]!r})")
    if not allowed:
        raise PushError("pushes are off on this server (start it with --push-allow URL_PREFIX)", 403)
    if not any(url.startswith(prefix) for prefix in allowed):
        raise PushError("url: this destination is not allowed on this server (--push-allow)", 403)
    return SCHEMES[parts.scheme]


class Push:
    """One push of a stream's output (see the module docstring)."""

    def __init__(self, number: int, url: str, fmt: str, width: int, height: int, fps: float, settings, totals,
                 on_end=None):
        self.number = number
        self.url = url
        self.width, self.height = width, height
        self.settings = settings
        self.totals = totals
        self.on_end = on_end
        self.state = "starting"
        self.error: str | None = None
        self.frames_in = self.frames_sent = self.frames_dropped = 0
        self._queue: deque = deque()
        self._cond = threading.Condition()
        self._stopped = False
        self._progress = time.monotonic()
        self._last_error: str | None = None       # the process's last line on stderr
        config = {"url": url, "format": fmt, "width": width, "height": height, "fps": fps,
                  "audio_rate": AUDIO_RATE}
        self.proc = subprocess.Popen([sys.executable, "-m", "wanstream.server.push_worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_child_env())
        self.proc.stdin.write((json.dumps(config) + "\n").encode())
        self.proc.stdin.flush()
        self._threads = [threading.Thread(target=target, name=f"wanstream-push-{number}-{name}", daemon=True)
                         for name, target in (("feed", self._feed), ("watch", self._watch),
                                              ("log", self._stderr))]
        for t in self._threads:
            t.start()

    # ------------------------------------------------------------------ input (worker / event-loop threads)
    def frame(self, image: np.ndarray, t: float) -> None:
        self._put((b"V", t, np.ascontiguousarray(image, np.uint8).tobytes()), video=True)

    def audio(self, samples: np.ndarray, rate: int, t: float) -> None:
        if rate != AUDIO_RATE:                          # linear resampling of a mono block (rare: WebRTC is 48k)
            n = max(1, int(round(len(samples) * AUDIO_RATE / rate)))
            samples = np.interp(np.linspace(0, len(samples) - 1, n), np.arange(len(samples)), samples)
        samples = np.asarray(samples, np.float32)[:AUDIO_RATE]
        self._put((b"A", t, COUNT.pack(len(samples)) + samples.tobytes()), video=False)

    def _put(self, record, video: bool) -> None:
        with self._cond:
            if self._stopped:
                return
            if video:
                self.frames_in += 1
                videos = sum(1 for r in self._queue if r[0] == b"V")
                while videos >= self.settings.push_queue_frames:
                    dropped = self._queue.popleft()
                    if dropped[0] == b"V":
                        videos -= 1
                        self.frames_dropped += 1
                        self.totals.add("push_frames_dropped")
            elif len(self._queue) >= 8 * self.settings.push_queue_frames:
                return                                  # audio far ahead of a stalled push: dropped
            self._queue.append(record)
            self._cond.notify()

    # ------------------------------------------------------------------ threads
    def _feed(self) -> None:
        pipe = self.proc.stdin
        try:
            while True:
                with self._cond:
                    while not self._queue and not self._stopped:
                        self._cond.wait()
                    if self._stopped:
                        return
                    kind, t, payload = self._queue.popleft()
                pipe.write(HEAD.pack(kind, t) + payload)
                pipe.flush()
        except (OSError, ValueError):
            pass                                        # the process ended (killed, or it failed)

    def _watch(self) -> None:
        """Progress lines from the process; the stall watchdog; the end."""
        out = self.proc.stdout
        reader = threading.Thread(target=self._progress_lines, args=(out,), daemon=True)
        reader.start()
        while self.proc.poll() is None:
            time.sleep(0.2)
            with self._cond:
                waiting = bool(self._queue) or self.frames_in > self.frames_sent + self.frames_dropped
            if self.state == "running" or self.frames_in:
                if waiting and time.monotonic() - self._progress > self.settings.push_stall_s:
                    self._fail(f"the server stopped taking data for {self.settings.push_stall_s:g} s")
                    break
        reader.join(5)
        code = self.proc.wait()
        if not self._stopped and self.state != "failed":
            self._fail(f"the push process ended (exit code {code}): {self._last_error or 'no message'}")

    def _progress_lines(self, out) -> None:
        for line in iter(out.readline, b""):
            parts = line.decode(errors="replace").split()
            if len(parts) == 2 and parts[0] in ("frames", "done") and parts[1].isdigit():
                self.frames_sent = int(parts[1])
                self._progress = time.monotonic()
                if self.state == "starting":
                    self.state = "running"

    def _stderr(self) -> None:
        for line in iter(self.proc.stderr.readline, b""):
            text = line.decode(errors="replace").strip()
            if text:
                self._last_error = text[-300:]

    def _fail(self, message: str) -> None:
        if self.state in ("failed", "stopped"):
            return
        self.state, self.error = "failed", message
        self.totals.add("pushes_failed")
        log.info("push %s failed: %s", _redact(self.url), message)
        self._kill()
        if self.on_end is not None:
            self.on_end(self)

    # ------------------------------------------------------------------ end
    def stop(self, wait_s: float = 5.0) -> None:
        """End the push: the frames queued are sent and the file finished when the server takes them within
        ``wait_s``; otherwise the process is killed."""
        with self._cond:
            if self._stopped:
                return
            deadline = time.monotonic() + wait_s
            while self._queue and time.monotonic() < deadline and self.proc.poll() is None:
                self._cond.wait(0.05)
            self._stopped = True
            self._cond.notify_all()
        if self.state != "failed":
            self.state = "stopped"
        try:
            self.proc.stdin.close()                     # end of input: the process finishes its stream
        except OSError:
            pass
        try:
            self.proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            self._kill()

    def _kill(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def info(self) -> dict:
        return {"id": self.number, "url": _redact(self.url), "state": self.state, "error": self.error,
                "frames_in": self.frames_in, "frames_sent": self.frames_sent,
                "frames_dropped": self.frames_dropped}


def _redact(url: str) -> str:
    """A push URL without its stream key (the last path component) for logs and listings."""
    head, _, _ = url.rpartition("/")
    return f"{head}/***" if head and "//" in head else "***"


def _child_env() -> dict:
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class SessionPushes:
    """The pushes of one session: started and stopped by its owner, fed by the session (frames, audio)."""

    def __init__(self, session):
        self.session = session
        self.pushes: dict[int, Push] = {}
        self.started = 0
        self._lock = threading.Lock()

    def start(self, url: str) -> Push:
        s = self.session
        settings, totals = s.settings, s.manager.totals
        try:
            fmt = check_url(url, settings.push_allow)
            with self._lock:
                running = [p for p in self.pushes.values() if p.state in ("starting", "running")]
                if len(running) >= settings.max_pushes_per_session:
                    raise PushError(f"this stream has {len(running)} pushes running (max_pushes_per_session)",
                                    409)
                if s.manager.pushes_running() >= settings.max_pushes:
                    raise PushError(f"the server runs {settings.max_pushes} pushes already (max_pushes)", 409)
                self.started += 1
                fps = float(min(60, max(4, round(s.stats.summary()["fps_out"] or 16.0))))
                push = Push(self.started, url, fmt, s.width, s.height, fps, settings, totals,
                            on_end=lambda p: s.notify({"type": "push", **p.info()}))
                self.pushes[push.number] = push
        except PushError:
            totals.add("pushes_refused")
            raise
        totals.add("pushes_started")
        return push

    def stop(self, number: int) -> bool:
        with self._lock:
            push = self.pushes.pop(number, None)
        if push is None:
            return False
        push.stop()
        return True

    def running(self) -> int:
        return sum(1 for p in list(self.pushes.values()) if p.state in ("starting", "running"))

    def frames(self, outputs) -> None:
        for push in list(self.pushes.values()):
            for out in outputs:
                push.frame(out.image, out.timestamp)

    def audio(self, samples, rate: int, t: float) -> None:
        for push in list(self.pushes.values()):
            push.audio(samples, rate, t)

    def close(self) -> None:
        with self._lock:
            pushes, self.pushes = list(self.pushes.values()), {}
        for push in pushes:
            threading.Thread(target=push.stop, daemon=True).start()   # never holds the closing thread

    def info(self) -> list[dict]:
        return [p.info() for p in list(self.pushes.values())]
