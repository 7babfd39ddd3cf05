"""Readiness, capacity and the drain (``/api/ready``, ``/api/sessions`` load, ``/metrics`` gauges, SIGTERM).

In-process: the admission rule behind ``/api/ready`` and the drain of :class:`DrainingServer` (begun without a
signal, the server runs on a thread). In a subprocess: a real ``SIGTERM`` to ``python -m wanstream.server``
drains it and the process exits 0.
"""

from __future__ import annotations

import re
import signal
import threading

import pytest
from deploy_helpers import ServerProcess, http_json
from server_helpers import LiveServer, Streamer, WSClient, server_settings, wait_until

from wanstream.server.app import uvicorn_config
from wanstream.server.lifecycle import DrainingServer


def metric(text: str, name: str) -> float:
    m = re.search(rf"^wanstream_{name} (\S+)$", text, re.M)
    assert m, f"wanstream_{name} not in /metrics"
    return float(m.group(1))


class DrainingLiveServer(LiveServer):
    """LiveServer with the drain of ``wanstream serve``."""

    def __init__(self, model, settings):
        super().__init__(model, settings)
        config = uvicorn_config(self.app, settings, log_level="warning", port=0)
        self.server = DrainingServer(config, self.manager, settings.drain_grace_s)
        self.thread = threading.Thread(target=self.server.run, name="test-uvicorn", daemon=True)


def test_ready_full_and_capacity_metrics(tiny_model, tmp_path, clip):
    with LiveServer(tiny_model, server_settings(tmp_path, max_sessions=2)) as srv:
        status, body = srv.http("GET", "/api/ready")
        assert status == 200 and body["ready"] and body["free"] == 2 and body["max"] == 2
        a = Streamer(srv.ws_url, clip)
        try:
            status, body = srv.http("GET", "/api/ready")
            assert status == 200 and body["active"] == 1 and body["free"] == 1
            b = Streamer(srv.ws_url, clip)
            try:
                status, body = srv.http("GET", "/api/ready")
                assert status == 503 and body["reason"] == "full" and "full" in body["message"]
                assert body["active"] == 2 and body["free"] == 0
                status, health = srv.http("GET", "/api/health")
                assert status == 200 and health["status"] == "ok"          # liveness is not readiness
                _, listing = srv.http("GET", "/api/sessions")
                assert listing["load"]["active"] == 2 and listing["load"]["ready"] is False
                a.assert_progress(4)                # a tick ran: the latency model predicts the next stream
                _, text = srv.http("GET", "/metrics")
                assert metric(text, "server_streams_active") == 2
                assert metric(text, "server_streams_max") == 2
                assert metric(text, "server_streams_free") == 0
                assert metric(text, "server_ready") == 0
                assert metric(text, "server_draining") == 0
                fps = metric(text, "server_predicted_fps_per_stream_next")
                assert fps > 0 and fps == pytest.approx(srv.manager.predicted_stream_fps(), rel=0.5)
            finally:
                b.close()
            wait_until(lambda: srv.http("GET", "/api/ready")[0] == 200, 30, "ready again after a stream ended")
        finally:
            a.close()


def test_worker_down_is_not_ready(tiny_model, tmp_path):
    with LiveServer(tiny_model, server_settings(tmp_path, max_sessions=2)) as srv:
        srv.manager.worker.stop()
        status, body = srv.http("GET", "/api/ready")
        assert status == 503 and body["reason"] == "worker_unhealthy"
        status, health = srv.http("GET", "/api/health")
        assert status == 503 and health["status"] == "degraded"        # a liveness probe restarts it


def test_drain_refuses_new_streams_lets_running_ones_finish(tiny_model, tmp_path, clip):
    settings = server_settings(tmp_path, max_sessions=3, drain_grace_s=120.0)
    with DrainingLiveServer(tiny_model, settings) as srv:
        a = Streamer(srv.ws_url, clip)
        try:
            srv.server.begin_drain()
            wait_until(lambda: srv.manager.draining, 10, "drain started")
            status, body = srv.http("GET", "/api/ready")
            assert status == 503 and body["reason"] == "draining" and body["free"] == 0
            refused = WSClient(srv.ws_url)
            assert "draining" in refused.wait_error("draining")["message"]
            refused.close()
            a.assert_progress(4)                # the running stream goes on
            assert not srv.server.should_exit
        finally:
            a.close()
        wait_until(lambda: not srv.thread.is_alive(), 60, "server exit once the last stream ended")


def test_drain_grace_ends_remaining_streams(tiny_model, tmp_path, clip):
    settings = server_settings(tmp_path, max_sessions=2, drain_grace_s=0.0)
    with DrainingLiveServer(tiny_model, settings) as srv:
        a = Streamer(srv.ws_url, clip)
        try:
            a.assert_progress(2)
            srv.server.begin_drain()
            closed = wait_until(lambda: next(iter(a.client.of_type("closed")), None), 30, "closed notice")
            assert closed["reason"] == "draining"
            wait_until(lambda: a.client.closed, 30, "stream closed by the drain")
        finally:
            a.close()
        wait_until(lambda: not srv.thread.is_alive(), 60, "server exit after the grace")


def test_sigterm_drains_then_exits_zero(tiny_model_dir, tmp_path, clip):
    with ServerProcess(tiny_model_dir, tmp_path / "srv", max_sessions=2, drain_grace=120) as proc:
        a = Streamer(proc.ws_url, clip)
        try:
            a.assert_progress(2)
            proc.popen.send_signal(signal.SIGTERM)
            wait_until(lambda: http_json(proc.base + "/api/ready")[0] == 503, 30, "ready 503 after SIGTERM")
            assert http_json(proc.base + "/api/ready")[1]["reason"] == "draining"
            refused = WSClient(proc.ws_url)
            refused.wait_error("draining")
            refused.close()
            a.assert_progress(4)
            assert proc.popen.poll() is None
        finally:
            a.close()
        assert proc.popen.wait(60) == 0, proc.log()
