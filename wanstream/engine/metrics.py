"""Per-stream latency / SLO tracking and a Prometheus export of many streams.

:class:`StreamMetrics` matches output frames to input frames first-in first-out: each output takes the oldest
input that has neither been answered nor dropped, and its latency is output time minus that input's arrival
time. All times come from one clock (``time.perf_counter`` unless another is injected); explicit timestamps
passed in must be on that clock.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator

import numpy as np
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

LATENCY_PERCENTILES = {"p50": 50.0, "p90": 90.0, "p95": 95.0, "p99": 99.0, "p999": 99.9}


class _RateWindow:
    """Frames per second over the last ``window_s`` seconds of ``(time, count)`` events."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._events: deque[tuple[float, int]] = deque()
        self._start: float | None = None  # the first event: the rate's reference point until a window has passed

    def add(self, t: float, count: int) -> None:
        if self._start is None:
            self._start = t
        self._events.append((t, count))
        self._prune(t)

    def _prune(self, now: float) -> None:
        while self._events and self._events[0][0] <= now - self.window_s:
            self._events.popleft()

    def rate(self, now: float) -> float | None:
        """Frames after ``max(now - window, first event)`` divided by that span; None before any span."""
        if self._start is None:
            return None
        self._prune(now)
        start = max(now - self.window_s, self._start)
        if now <= start:
            return None
        return sum(n for t, n in self._events if t > start) / (now - start)


class StreamMetrics:
    """Latency, jitter, deadline misses, throughput and queue depth of one stream (thread-safe).

    Latency statistics cover the last ``max_samples`` output frames; the counters cover everything since
    creation or the last :meth:`reset_stats`.
    """

    def __init__(self, target_latency_s: float = 1.0, fps_window_s: float = 2.0,
                 clock: Callable[[], float] = time.perf_counter, max_samples: int = 10_000) -> None:
        if target_latency_s <= 0 or fps_window_s <= 0 or max_samples < 1:
            raise ValueError("target_latency_s, fps_window_s and max_samples must be positive")
        self.target_latency_s = target_latency_s
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: deque[float] = deque()  # arrival times of unanswered inputs, oldest first
        self._latencies: deque[float] = deque(maxlen=max_samples)
        self._jitters: deque[float] = deque(maxlen=max_samples)
        self._first_in: float | None = None
        self._first_out: float | None = None
        self._skip = 0  # outputs still to match without recording (warm-up)
        self._fps_window_s = fps_window_s
        self._clear_stats()

    def _clear_stats(self) -> None:
        self._latencies.clear()
        self._jitters.clear()
        self._last_latency: float | None = None
        self._misses = 0
        self._samples = 0
        self._frames_in = self._frames_out = self._frames_dropped = 0
        self._rate_in = _RateWindow(self._fps_window_s)
        self._rate_out = _RateWindow(self._fps_window_s)

    @staticmethod
    def _check_count(count: int) -> None:
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")

    def on_input(self, timestamp: float | None = None, count: int = 1) -> None:
        """``count`` input frames arrived at ``timestamp`` (default: now)."""
        self._check_count(count)
        with self._lock:
            t = self._clock() if timestamp is None else timestamp
            if self._first_in is None and count:
                self._first_in = t
            self._pending.extend([t] * count)
            self._frames_in += count
            self._rate_in.add(t, count)

    def on_output(self, count: int = 1, now: float | None = None) -> None:
        """``count`` output frames left at ``now`` (default: now), answering the oldest pending inputs.

        Raises ValueError (recording nothing) when fewer inputs are pending.
        """
        self._check_count(count)
        with self._lock:
            if count > len(self._pending):
                raise ValueError(f"{count} outputs but only {len(self._pending)} inputs pending")
            t = self._clock() if now is None else now
            if self._first_out is None and count:
                self._first_out = t
            for _ in range(count):
                latency = t - self._pending.popleft()
                if self._skip:
                    self._skip -= 1
                    continue
                if self._last_latency is not None:
                    self._jitters.append(abs(latency - self._last_latency))
                self._last_latency = latency
                self._latencies.append(latency)
                self._samples += 1
                self._misses += latency > self.target_latency_s
            self._frames_out += count
            self._rate_out.add(t, count)

    def on_drop(self, count: int = 1) -> None:
        """The ``count`` oldest pending inputs will never get an output (ValueError if fewer are pending)."""
        self._check_count(count)
        with self._lock:
            if count > len(self._pending):
                raise ValueError(f"{count} drops but only {len(self._pending)} inputs pending")
            for _ in range(count):
                self._pending.popleft()
            self._frames_dropped += count

    def warmup(self, n_frames: int) -> None:
        """Match the next ``n_frames`` outputs without recording their latency (jitter, misses) samples."""
        self._check_count(n_frames)
        with self._lock:
            self._skip = n_frames

    def reset_stats(self, keep_pending: bool = True) -> None:
        """Forget latency samples, jitter, misses, frame counts and FPS windows; TTFF is kept.

        With ``keep_pending`` the inputs still waiting keep their arrival times, so later outputs still match
        the right inputs; without it they are forgotten too (not counted as drops).
        """
        with self._lock:
            self._clear_stats()
            self._skip = 0
            if not keep_pending:
                self._pending.clear()

    @property
    def pending(self) -> int:
        """Inputs waiting for an output (queue depth)."""
        return len(self._pending)

    def summary(self) -> dict:
        """A snapshot: times in seconds (``ttff_s``) or milliseconds (``latency_ms``, ``jitter_ms``).

        Statistics without data are None; counts are 0.
        """
        with self._lock:
            now = self._clock()
            latencies = np.array(self._latencies) * 1e3
            jitters = np.array(self._jitters) * 1e3
            return {
                "ttff_s": None if self._first_out is None else self._first_out - self._first_in,
                "fps_out": self._rate_out.rate(now),
                "fps_in": self._rate_in.rate(now),
                "latency_ms": {**{k: _percentile(latencies, q) for k, q in LATENCY_PERCENTILES.items()},
                               "mean": float(latencies.mean()) if latencies.size else None},
                "jitter_ms": {"mean": float(jitters.mean()) if jitters.size else None,
                              "p99": _percentile(jitters, 99.0)},
                "deadline_miss_rate": self._misses / self._samples if self._samples else None,
                "deadline_misses": self._misses,
                "frames_in": self._frames_in,
                "frames_out": self._frames_out,
                "frames_dropped": self._frames_dropped,
                "pending": len(self._pending),
            }


def _percentile(values: np.ndarray, q: float) -> float | None:
    return float(np.percentile(values, q)) if values.size else None


class MetricsRegistry:
    """Streams exported to Prometheus through a private :class:`CollectorRegistry` (not the global one).

    Each scrape reads every registered stream's :meth:`StreamMetrics.summary`; per-stream series carry a
    ``session`` label. Metric names start with ``prefix``.
    """

    def __init__(self, prefix: str = "wanstream") -> None:
        self.prefix = prefix
        self._streams: dict[str, StreamMetrics] = {}
        self._lock = threading.Lock()
        self.registry = CollectorRegistry()
        self.registry.register(self)

    def add(self, session_id: str, metrics: StreamMetrics) -> None:
        """Export ``metrics`` under ``session=session_id`` (replacing a stream of the same id)."""
        with self._lock:
            self._streams[session_id] = metrics

    def remove(self, session_id: str) -> None:
        """Stop exporting a session (unknown ids are ignored)."""
        with self._lock:
            self._streams.pop(session_id, None)

    def render(self) -> bytes:
        """The Prometheus text exposition of the registry."""
        return generate_latest(self.registry)

    def collect(self) -> Iterator[Metric]:
        """Prometheus collector protocol: build the metric families from fresh summaries."""
        with self._lock:
            streams = list(self._streams.items())
        p = self.prefix
        active = GaugeMetricFamily(f"{p}_active_sessions", "Streams currently registered")
        active.add_metric([], len(streams))
        label = ["session"]
        families = {
            "fps_out": GaugeMetricFamily(f"{p}_stream_output_fps", "Output frames per second (recent window)",
                                         labels=label),
            "fps_in": GaugeMetricFamily(f"{p}_stream_input_fps", "Input frames per second (recent window)",
                                        labels=label),
            "ttff_s": GaugeMetricFamily(f"{p}_stream_ttff_seconds", "Time to first output frame", labels=label),
            "pending": GaugeMetricFamily(f"{p}_stream_queue_depth", "Input frames waiting for an output",
                                         labels=label),
            "deadline_misses": CounterMetricFamily(f"{p}_stream_deadline_misses",
                                                   "Output frames later than the latency target", labels=label),
            "frames_dropped": CounterMetricFamily(f"{p}_stream_dropped_frames", "Input frames dropped",
                                                  labels=label),
            "frames_out": CounterMetricFamily(f"{p}_stream_output_frames", "Output frames", labels=label),
            "recaches": CounterMetricFamily(f"{p}_stream_recaches", "Prompt switches with KV re-cache", labels=label),
        }
        latency = GaugeMetricFamily(f"{p}_stream_latency_seconds", "Per-frame latency percentiles (recent frames)",
                                    labels=["session", "quantile"])
        for session_id, metrics in streams:
            summary = metrics.summary()
            for key, family in families.items():
                if summary.get(key) is not None:
                    family.add_metric([session_id], summary[key])
            for key, quantile in (("p50", "0.5"), ("p95", "0.95"), ("p99", "0.99")):
                if summary["latency_ms"][key] is not None:
                    latency.add_metric([session_id, quantile], summary["latency_ms"][key] / 1e3)
        yield active
        yield from families.values()
        yield latency
