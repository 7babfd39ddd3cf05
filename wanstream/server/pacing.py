"""Even output pacing: the model emits a chunk of frames at once; the client should see them one by one.

:class:`Pacer` is a plain, clock-driven queue (no threads, no asyncio), so tests can drive it with a virtual
clock. The interval between released frames follows the measured production rate (an exponential average of
``gap between deliveries / frames delivered``), slightly faster so the queue drains, and much faster while a
backlog builds. At most ``max_frames`` frames wait; beyond that the oldest are dropped (latency stays bounded).
Drop markers (``push_drop``) stand for frames that will never come out (in flight at a reset); they keep
first-in first-out accounting exact for the metrics.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Any


@dataclass
class Released:
    frame: Any | None      # the frame to send now, or None
    wait_s: float | None   # when ``frame`` is None: seconds until the next frame is due (None: queue empty)
    dropped: int           # frames dropped (overflow, drop markers) since the last call, all older than ``frame``


class Pacer:
    def __init__(self, max_frames: int = 8, initial_interval_s: float = 1 / 30, speedup: float = 0.9,
                 smoothing: float = 0.25, max_interval_s: float = 0.5):
        if max_frames < 1:
            raise ValueError("max_frames must be >= 1")
        self.max_frames = max_frames
        self.interval_s = initial_interval_s
        self.speedup = speedup
        self.smoothing = smoothing
        self.max_interval_s = max_interval_s
        self._items: deque[tuple[str, Any]] = deque()   # ("frame", frame) | ("drop", count)
        self._frames = 0
        self._dropped = 0
        self._last_delivery: float | None = None
        self._next_due: float | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._frames

    def push(self, frames: list, now: float) -> None:
        """Frames produced together at ``now`` (oldest first)."""
        if not frames:
            return
        with self._lock:
            if self._last_delivery is not None:
                per_frame = min(self.max_interval_s, max(0.0, now - self._last_delivery) / len(frames))
                self.interval_s += self.smoothing * (per_frame - self.interval_s)
            self._last_delivery = now
            for f in frames:
                self._items.append(("frame", f))
            self._frames += len(frames)
            while self._frames > self.max_frames:
                self._drop_oldest_frame()

    def push_drop(self, count: int) -> None:
        """``count`` frames that were expected will never be produced."""
        if count > 0:
            with self._lock:
                self._items.append(("drop", count))

    def _drop_oldest_frame(self) -> None:
        for i, (kind, _) in enumerate(self._items):
            if kind == "frame":
                del self._items[i]
                self._frames -= 1
                self._dropped += 1
                return

    def pop(self, now: float) -> Released:
        """The next frame if it is due at ``now``; otherwise how long to wait."""
        with self._lock:
            while self._items and self._items[0][0] == "drop":
                self._dropped += self._items.popleft()[1]
            dropped, self._dropped = self._dropped, 0
            if not self._items:
                return Released(None, None, dropped)
            if self._next_due is not None and now < self._next_due:
                return Released(None, self._next_due - now, dropped)
            frame = self._items.popleft()[1]
            self._frames -= 1
            interval = self.interval_s * (self.speedup if self._frames <= self.max_frames // 2 else 0.5)
            self._next_due = now + interval   # measured from the actual release: a late consumer banks no time
            return Released(frame, None, dropped)

    def clear(self) -> int:
        """Forget queued frames (returns how many were dropped, drop markers included)."""
        with self._lock:
            n = self._dropped + sum(v if k == "drop" else 1 for k, v in self._items)
            self._items.clear()
            self._frames = 0
            self._dropped = 0
            return n
