"""Per-phase timings that never force a device sync: CUDA events on a GPU (resolved once they completed), the
host clock on the CPU. The one section timer: the engine (encode / DiT / decode per tick) and every pipeline stage
(busy / DiT time per call) use it. Imports torch only."""

from __future__ import annotations

import contextlib
import time
from collections import deque

import torch


def recorded_seconds(items, cuda: bool) -> float | None:
    """Total seconds of recorded sections: host durations, or (CUDA) event pairs — ``None`` while one has not
    completed yet (never waits)."""
    total = 0.0
    for it in items:
        if cuda:
            s, e = it
            if not e.query():
                return None
            total += s.elapsed_time(e) / 1e3
        else:
            total += it
    return total


class PhaseTimer:
    """Records named sections per tick; :meth:`ticks` returns the completed ticks' seconds per phase.

    A section recorded outside a tick opens a tick of its own, or, with ``carry``, counts in the next tick (a
    pipeline stage: rank 0's encode belongs to its next call)."""

    def __init__(self, device: torch.device | str, keep: int = 4096, carry: bool = False):
        self.cuda = torch.device(device).type == "cuda"
        self.carry = carry
        self._done: deque = deque(maxlen=keep)      # (tick info, {phase: [records]})
        self._cur: dict | None = None
        self._info: dict = {}
        self._carried: dict = {}                    # with ``carry``: sections recorded since the last tick

    def start(self, **info) -> None:
        """Begin a tick (``info``: what the caller wants back with it, e.g. rows and streams)."""
        self.end()
        self._cur, self._info, self._carried = self._carried, dict(info), {}

    def end(self) -> None:
        if self._cur is not None:
            self._done.append((self._info, self._cur))
        self._cur = None

    def annotate(self, **info) -> None:
        self._info.update(info)

    @contextlib.contextmanager
    def section(self, name: str):
        if self._cur is not None:
            rec = self._cur.setdefault(name, [])
        elif self.carry:
            rec = self._carried.setdefault(name, [])
        else:
            self._cur, self._info = {}, {}
            rec = self._cur.setdefault(name, [])
        if self.cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            try:
                yield
            finally:
                e.record()
                rec.append((s, e))
        else:
            t = time.perf_counter()
            try:
                yield
            finally:
                rec.append(time.perf_counter() - t)

    def _seconds(self, items) -> float | None:
        return recorded_seconds(items, self.cuda)

    def ticks(self, wait: bool = False) -> list[tuple[dict, dict[str, float]]]:
        """Completed ticks as ``(info, {phase: seconds})``, oldest first, and forgets them. Ticks whose device
        work has not finished stay for later, unless ``wait`` (one sync, for the end of a benchmark)."""
        if wait and self.cuda and self._done:
            torch.cuda.synchronize()
        out = []
        while self._done:
            info, rec = self._done[0]
            secs = {k: self._seconds(v) for k, v in rec.items()}
            if any(v is None for v in secs.values()):
                break
            self._done.popleft()
            out.append((info, secs))
        return out
