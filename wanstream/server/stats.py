"""Statistics of a session and of the whole server.

A session's frames go through two stages: the input queue (where frames may be dropped before the model sees
them) and the model + output path, measured by :class:`wanstream.engine.metrics.StreamMetrics` (latency = time an
output frame is released to the client minus the arrival time of the input frame it restyles, matched first
in, first out). :class:`SessionStats` joins both into one ``summary()`` with the keys of ``StreamMetrics`` (so a
:class:`~wanstream.engine.metrics.MetricsRegistry` exports it), where ``frames_in``/``fps_in`` count every frame that
arrived and ``frames_dropped`` every frame dropped at any stage. :class:`ServerTotals` exports server-wide
counters next to the per-session series.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

import numpy as np
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from wanstream.engine.metrics import StreamMetrics


class RateCounter:
    """Events per second over the last ``window_s`` seconds."""

    def __init__(self, clock: Callable[[], float], window_s: float = 2.0):
        self._clock = clock
        self.window_s = window_s
        self._times: deque[float] = deque()
        self._first: float | None = None

    def add(self, t: float) -> None:
        if self._first is None:
            self._first = t
        self._times.append(t)
        self._prune(t)

    def _prune(self, now: float) -> None:
        while self._times and self._times[0] <= now - self.window_s:
            self._times.popleft()

    def rate(self) -> float | None:
        now = self._clock()
        if self._first is None:
            return None
        self._prune(now)
        start = max(now - self.window_s, self._first)
        return len(self._times) / (now - start) if now > start else None


class SessionStats:
    def __init__(self, clock: Callable[[], float], target_latency_s: float = 1.0):
        self.clock = clock
        self.model = StreamMetrics(target_latency_s, fps_window_s=2.0, clock=clock)
        self._lock = threading.Lock()
        self._in_rate = RateCounter(clock)
        self.received = 0            # frames that arrived (decoded or not)
        self.dropped_early = 0       # dropped before the model: uplink, input queue, discarded on prompt change
        self.bad_frames = 0          # undecodable / oversized frames
        self.bad_messages = 0        # malformed or refused control messages
        self.dropped_messages = 0    # control messages over the rate limit
        self.queued: Callable[[], int] = lambda: 0
        self.engine: Callable[[], object] = lambda: None     # the engine stream's StreamStats, once there is one

    def on_received(self, t: float) -> None:
        with self._lock:
            self.received += 1
            self._in_rate.add(t)

    def on_dropped_early(self, n: int = 1) -> None:
        with self._lock:
            self.dropped_early += n

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + n)

    def summary(self) -> dict:
        s = self.model.summary()
        queued = self.queued()
        engine = self.engine()
        s["recaches"] = 0 if engine is None else engine.recaches
        s["recache_frames"] = 0 if engine is None else engine.recache_frames
        with self._lock:
            s["frames_to_model"] = s["frames_in"]
            s["frames_in"] = self.received
            s["fps_in"] = self._in_rate.rate()
            s["frames_dropped"] += self.dropped_early
            s["in_flight"] = s["pending"]
            s["queued"] = queued
            s["pending"] += queued
            s["bad_frames"] = self.bad_frames
            s["bad_messages"] = self.bad_messages
            s["dropped_messages"] = self.dropped_messages
        return s


# Server-wide events with a lifetime counter (wanstream_server_<key>_total).
_EVENTS = {
    "webrtc_offers_expired": "WebRTC sessions freed because the peer never connected (offer_timeout_s)",
    "recordings_started": "Recordings started",
    "recordings_refused": "Recording starts refused (per-stream count or disk budget reached)",
    "recordings_cut": "Recordings finished early because the disk budget was reached",
    "pushes_started": "RTMP / SRT pushes started",
    "pushes_refused": "Pushes refused (destination not allowed, bad URL, or max_pushes reached)",
    "pushes_failed": "Pushes ended by an error (a stalled or closed server, a failed process)",
    "push_frames_dropped": "Frames dropped because a push was not keeping up (push_queue_frames)",
    "references_set": "VACE reference images set (server/conditioning.py)",
    "references_refused": "VACE reference images refused (not an image, too large, wrong type)",
    "control_switches": "VACE control kind changes",
}
# Reasons a guard refuses a request or connection (always exported, 0 until it happens).
REFUSAL_REASONS = ("bad_host", "bad_origin", "unauthorized", "forbidden", "body_too_large", "body_timeout",
                   "header_timeout", "too_many_connections")


class ServerTotals:
    """Server-wide counters (lifetime, closed sessions included) exported as Prometheus text."""

    def __init__(self, prefix: str = "wanstream", capacity: Callable[[], int] = lambda: 0,
                 active: Callable[[], list[SessionStats]] = list):
        self.prefix = prefix
        self._capacity = capacity
        self._active = active
        self._lock = threading.Lock()
        self.counters = {"sessions_opened": 0, "sessions_rejected": 0, "sessions_closed": 0,
                         "frames_in": 0, "frames_out": 0, "frames_dropped": 0, "deadline_misses": 0,
                         "bad_frames": 0, "bad_messages": 0, "dropped_messages": 0, "worker_errors": 0,
                         **{key: 0 for key in _EVENTS}}
        self.refused: dict[str, int] = {}    # requests / connections refused by a guard, by reason
        self._gauges: dict[str, tuple[str, Callable[[], float], bool]] = {}
        self._limits: dict[str, float] = {}
        self._latencies: deque[float] = deque(maxlen=4096)
        self.registry = CollectorRegistry()
        self.registry.register(self)

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] += n

    def refuse(self, reason: str) -> None:
        """Count a request or connection refused by a guard (``wanstream_server_refused_total{reason}``)."""
        with self._lock:
            self.refused[reason] = self.refused.get(reason, 0) + 1

    def gauge(self, name: str, doc: str, value: Callable[[], float], counter: bool = False) -> None:
        """Export ``wanstream_<name>`` (``..._total`` for a counter) read from ``value()`` at every scrape."""
        self._gauges[name] = (doc, value, counter)

    def limits(self, **values: float) -> None:
        """Export configured bounds as ``wanstream_server_limit{name}`` (to read next to their counters)."""
        self._limits.update(values)

    def on_latency(self, seconds: float) -> None:
        with self._lock:
            self._latencies.append(seconds)

    def retire(self, stats: SessionStats) -> None:
        """Fold a closing session's counts into the lifetime totals."""
        s = stats.summary()
        with self._lock:
            for key in ("frames_in", "frames_out", "frames_dropped", "deadline_misses", "bad_frames",
                        "bad_messages", "dropped_messages"):
                self.counters[key] += s[key]
            self.counters["sessions_closed"] += 1

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def collect(self):
        p = self.prefix
        summaries = [s.summary() for s in self._active()]
        with self._lock:
            counters = dict(self.counters)
            lat = np.array(self._latencies)
        yield _gauge(f"{p}_server_capacity_sessions", "Most sessions served at once", self._capacity())
        for key in ("sessions_opened", "sessions_rejected", "sessions_closed", "worker_errors"):
            c = CounterMetricFamily(f"{p}_server_{key}", f"Sessions / errors: {key.replace('_', ' ')}")
            c.add_metric([], counters[key])
            yield c
        for key in ("frames_in", "frames_out", "frames_dropped", "deadline_misses", "bad_frames", "bad_messages",
                    "dropped_messages"):
            c = CounterMetricFamily(f"{p}_server_{key}", f"All sessions, lifetime: {key.replace('_', ' ')}")
            c.add_metric([], counters[key] + sum(s[key] for s in summaries))
            yield c
        yield _gauge(f"{p}_server_output_fps", "Output frames per second, all active sessions",
                     sum(s["fps_out"] or 0.0 for s in summaries))
        yield _gauge(f"{p}_server_queue_depth", "Frames waiting in all active sessions",
                     sum(s["pending"] for s in summaries))
        latency = GaugeMetricFamily(f"{p}_server_latency_seconds", "Latency percentiles of the last 4096 frames "
                                    "of all sessions", labels=["quantile"])
        if lat.size:
            for q in (0.5, 0.95, 0.99):
                latency.add_metric([str(q)], float(np.percentile(lat, q * 100)))
        yield latency
        for key, doc in _EVENTS.items():
            c = CounterMetricFamily(f"{p}_server_{key}", doc)
            c.add_metric([], counters[key])
            yield c
        with self._lock:
            refused = dict(self.refused)
        c = CounterMetricFamily(f"{p}_server_refused", "Requests / connections refused by a guard, by reason",
                                labels=["reason"])
        for reason in sorted(set(refused) | set(REFUSAL_REASONS)):
            c.add_metric([reason], refused.get(reason, 0))
        yield c
        limit = GaugeMetricFamily(f"{p}_server_limit", "Configured bounds (see docs/reliability.md)",
                                  labels=["name"])
        for name, value in sorted(self._limits.items()):
            limit.add_metric([name], float(value))
        yield limit
        for name, (doc, value, counter) in sorted(self._gauges.items()):
            if counter:
                c = CounterMetricFamily(f"{p}_{name}", doc)
                c.add_metric([], float(value()))
                yield c
            else:
                yield _gauge(f"{p}_{name}", doc, float(value()))
        ttffs = [s["ttff_s"] for s in summaries if s["ttff_s"] is not None]
        if ttffs:
            yield _gauge(f"{p}_server_ttff_seconds_max", "Largest time to first frame of the active sessions",
                         max(ttffs))


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc)
    g.add_metric([], value)
    return g
