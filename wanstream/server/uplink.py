"""Per-session input decoding: at most one frame of a session is being decoded at a time; the frames waiting
meanwhile are bounded (``max_pending``, one chunk by default), the oldest dropped and counted. A client that
floods frames therefore costs at most one codec thread and never builds a backlog; other sessions keep their
share. A burst of one chunk (network jitter) passes without loss.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor

import numpy as np

from wanstream.core.chunking import FIRST_CHUNK_FRAMES as FIRST_CHUNK
from wanstream.server.frames import FrameError
from wanstream.server.session import Session


class Uplink:
    def __init__(self, session: Session, executor: Executor,
                 decode: Callable[[object], tuple[np.ndarray, int | None]],
                 max_pending: int = FIRST_CHUNK):
        self.session = session
        self.executor = executor
        self.decode = decode
        self._pending: deque[tuple[object, float]] = deque()
        self.max_pending = max_pending
        self._task: asyncio.Task | None = None

    def offer(self, payload: object, t: float | None = None) -> None:
        """A frame arrived (call on the event loop)."""
        s = self.session
        if s.closed:
            return
        t, seq = s.note_arrival(t)
        if len(self._pending) >= self.max_pending:
            self._pending.popleft()
            s.note_drop(1)
        self._pending.append((payload, t, seq))
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        s = self.session
        try:
            while self._pending and not s.closed:
                payload, t, seq = self._pending.popleft()
                try:
                    frame, frame_id = await loop.run_in_executor(self.executor, self.decode, payload)
                except FrameError as exc:
                    s.stats.count("bad_frames")
                    s.report_error(exc.code, str(exc))
                    continue
                except Exception as exc:  # noqa: BLE001 - a bad frame must not end the session
                    s.stats.count("bad_frames")
                    s.report_error("bad_frame", f"cannot use this frame ({type(exc).__name__}: {exc})")
                    continue
                s.enqueue(frame, t, seq if frame_id is None else frame_id)
        finally:
            self._task = None

    def cancel(self) -> None:
        self._pending.clear()
        if self._task is not None:
            self._task.cancel()
