"""StreamMetrics (FIFO latency matching, drops, TTFF, jitter, misses, FPS windows, warm-up) and Prometheus export."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from wanstream.engine.metrics import MetricsRegistry, StreamMetrics


class FakeClock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make(**kwargs) -> tuple[StreamMetrics, FakeClock]:
    clock = FakeClock()
    return StreamMetrics(clock=clock, **kwargs), clock


def test_empty_summary_has_no_numbers():
    m, _ = make()
    s = m.summary()
    assert s["ttff_s"] is None and s["fps_out"] is None and s["fps_in"] is None
    assert all(v is None for v in s["latency_ms"].values()) and set(s["latency_ms"]) == {
        "p50", "p90", "p95", "p99", "p999", "mean"}
    assert s["jitter_ms"] == {"mean": None, "p99": None}
    assert s["deadline_miss_rate"] is None
    assert (s["frames_in"], s["frames_out"], s["frames_dropped"], s["pending"]) == (0, 0, 0, 0)


def test_fifo_matching_gives_exact_latencies_and_percentiles():
    m, clock = make(target_latency_s=10.0)
    # Inputs at 0, 1, ..., 99 s; outputs in the same order with latencies 1, 2, ..., 100 ms.
    for i in range(100):
        m.on_input(timestamp=100.0 + i)
    for i in range(100):
        m.on_output(now=100.0 + i + (i + 1) / 1000)
    s = m.summary()
    expected = np.arange(1, 101, dtype=float)
    for key, q in (("p50", 50), ("p90", 90), ("p95", 95), ("p99", 99), ("p999", 99.9)):
        assert s["latency_ms"][key] == pytest.approx(np.percentile(expected, q), abs=1e-6)
    assert s["latency_ms"]["p50"] == pytest.approx(50.5, abs=1e-6)
    assert s["latency_ms"]["mean"] == pytest.approx(50.5, abs=1e-6)
    assert (s["frames_in"], s["frames_out"], s["pending"]) == (100, 100, 0)


def test_batched_outputs_match_the_oldest_inputs():
    m, clock = make()
    m.on_input(count=4)             # at 100.0
    clock.t = 100.5
    m.on_input(count=4)             # at 100.5
    assert m.pending == 8
    clock.t = 101.0
    m.on_output(count=4)            # answers the first four: 1.0 s each
    clock.t = 101.25
    m.on_output(count=2)            # the next two: 0.75 s each
    s = m.summary()
    assert s["latency_ms"]["p50"] == pytest.approx(1000.0)
    assert s["latency_ms"]["mean"] == pytest.approx((4 * 1000 + 2 * 750) / 6)
    assert s["pending"] == 2
    with pytest.raises(ValueError, match="only 2 inputs pending"):
        m.on_output(count=3)
    assert m.summary()["frames_out"] == 6  # the failed call recorded nothing


def test_drops_skip_inputs_and_are_not_latency_samples():
    m, clock = make()
    for t in (100.0, 100.1, 100.2):
        m.on_input(timestamp=t)
    m.on_drop()                     # the 100.0 input is dropped
    clock.t = 100.5
    m.on_output()                   # answers 100.1
    s = m.summary()
    assert s["latency_ms"]["p50"] == pytest.approx(400.0)
    assert (s["frames_dropped"], s["frames_out"], s["pending"]) == (1, 1, 1)
    with pytest.raises(ValueError, match="drops"):
        m.on_drop(count=2)


def test_ttff_jitter_and_deadline_misses():
    m, clock = make(target_latency_s=0.25)
    latencies = [0.1, 0.3, 0.2, 0.5]
    for i, lat in enumerate(latencies):
        m.on_input(timestamp=100.0 + i)
        m.on_output(now=100.0 + i + lat)
    s = m.summary()
    assert s["ttff_s"] == pytest.approx(0.1)
    jitters = np.array([0.2, 0.1, 0.3]) * 1e3
    assert s["jitter_ms"]["mean"] == pytest.approx(jitters.mean())
    assert s["jitter_ms"]["p99"] == pytest.approx(np.percentile(jitters, 99))
    assert s["deadline_miss_rate"] == pytest.approx(0.5)
    assert s["deadline_misses"] == 2


def test_windowed_fps():
    m, clock = make(fps_window_s=2.0)
    # 10 fps in, 5 fps out for 5 s.
    for i in range(1, 51):
        clock.t = 100.0 + i / 10
        m.on_input()
        if i % 2 == 0:
            m.on_output()
    clock.t = 105.0
    s = m.summary()
    assert s["fps_in"] == pytest.approx(10.0)
    assert s["fps_out"] == pytest.approx(5.0)
    # Before a full window has passed, the rate counts from the first event.
    m2, clock2 = make(fps_window_s=2.0)
    for k in range(3):             # chunks of 4 frames every 0.25 s: 16 fps
        clock2.t = 100.0 + k * 0.25
        m2.on_input(count=4)
    assert m2.summary()["fps_in"] == pytest.approx(16.0)
    # A stalled stream decays to zero.
    clock.t = 110.0
    assert m.summary()["fps_out"] == 0.0


def test_warmup_and_reset_keep_fifo_matching():
    m, clock = make()
    m.warmup(2)
    for i in range(4):
        m.on_input(timestamp=100.0 + i)
    m.on_output(now=105.0)          # warm-up: latency 5 s, not recorded
    m.on_output(now=105.0)          # warm-up: latency 4 s, not recorded
    m.on_output(now=103.5)          # recorded: 1.5 s
    s = m.summary()
    assert s["latency_ms"]["p50"] == pytest.approx(1500.0) and s["frames_out"] == 3
    assert s["ttff_s"] == pytest.approx(5.0)

    m.reset_stats()
    s = m.summary()
    assert s["latency_ms"]["p50"] is None and s["frames_out"] == 0 and s["pending"] == 1
    assert s["ttff_s"] == pytest.approx(5.0)
    m.on_output(now=104.0)          # still matches the input at 103.0
    assert m.summary()["latency_ms"]["p50"] == pytest.approx(1000.0)
    assert m.summary()["jitter_ms"]["mean"] is None  # no jitter across a reset

    m.on_input(timestamp=110.0)
    m.reset_stats(keep_pending=False)
    assert m.pending == 0


def test_latency_memory_is_bounded():
    m, clock = make(max_samples=5)
    for i in range(20):
        m.on_input(timestamp=100.0)
        m.on_output(now=100.0 + i)
    s = m.summary()
    assert s["latency_ms"]["p50"] == pytest.approx(17000.0)  # the last five: 15..19 s
    assert s["frames_out"] == 20


def test_bad_counts_raise():
    m, _ = make()
    with pytest.raises(ValueError):
        m.on_input(count=-1)
    with pytest.raises(ValueError):
        StreamMetrics(target_latency_s=0)


def test_prometheus_render_parses():
    reg = MetricsRegistry()
    a, clock = make(target_latency_s=0.5)
    for i in range(4):
        a.on_input(timestamp=100.0 + i * 0.5)
    a.on_drop()
    clock.t = 101.6
    a.on_output(count=2)            # latencies 1.1 s and 0.6 s: both miss
    reg.add("a", a)
    reg.add("b", make()[0])         # an idle stream: no latency series
    clock.t = 102.1

    families = {f.name: f for f in text_string_to_metric_families(reg.render().decode())}
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value
              for f in families.values() for s in f.samples}
    assert values[("wanstream_active_sessions", ())] == 2
    assert values[("wanstream_stream_latency_seconds", (("quantile", "0.5"), ("session", "a")))] == \
        pytest.approx(0.85)
    # TTFF counts from the very first input, even though that one was dropped.
    assert values[("wanstream_stream_ttff_seconds", (("session", "a"),))] == pytest.approx(1.6)
    assert values[("wanstream_stream_deadline_misses_total", (("session", "a"),))] == 2
    assert values[("wanstream_stream_dropped_frames_total", (("session", "a"),))] == 1
    assert values[("wanstream_stream_queue_depth", (("session", "a"),))] == 1
    assert values[("wanstream_stream_queue_depth", (("session", "b"),))] == 0
    assert values[("wanstream_stream_output_fps", (("session", "a"),))] == 0.0  # one output event: no rate yet
    assert values[("wanstream_stream_input_fps", (("session", "a"),))] == pytest.approx(3 / 2.0)
    assert not any(name == "wanstream_stream_latency_seconds" and ("session", "b") in labels
                   for name, labels in values)
    assert families["wanstream_stream_deadline_misses"].type == "counter"

    reg.remove("b")
    reg.remove("unknown")
    assert b'wanstream_active_sessions 1.0' in reg.render()
