"""Two real servers behind HAProxy with the shipped ``deploy/haproxy.cfg`` (issue 15, "done when").

``python -m wanstream.server`` twice (tiny model, ``--max-sessions 2``) and HAProxy on 127.0.0.1, inside a new
network namespace with only ``lo`` when possible (the test then runs itself there): five WebSocket streams
through HAProxy land 2 + 2 and the fifth gets a clear "full" answer; a stream's HTTP calls stay on its server
(cookie) even while that server is full; per-server /metrics pass through; SIGTERM drains one server (it takes no
new streams, its streams go on) and new streams go to the other; a SIGKILLed server's streams end with an
error while the draining server's streams keep streaming; no frame crosses streams (each stream sends frame ids
from its own range and the raw downlink carries them back). Skips with the reason when ``haproxy`` is missing
(``.ci/run`` installs it). Every wait is bounded; there is no timing assert.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from deploy_helpers import ROOT, HAProxy, ServerProcess, free_port, http_json
from server_helpers import Streamer, netns_prefix, wait_until
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

pytestmark = pytest.mark.skipif(shutil.which("haproxy") is None,
                                reason="haproxy is not installed (apt-get install haproxy; .ci/run does)")

INSIDE = "WANSTREAM_TEST_IN_NETNS"
ID_RANGE = 1_000_000        # stream k sends frame ids k * ID_RANGE + i


class IdStreamer(Streamer):
    """A WebSocket stream through HAProxy sending raw frames with ids from its own range, on a thread."""

    def __init__(self, url: str, clip, k: int):
        super().__init__(url, clip, fps=10.0, id_base=k * ID_RANGE, keep_frames=True)
        self.k = k
        headers = self.client.ws.response.headers
        self.server = headers.get("X-Wanstream-Server")
        self.cookie = headers.get("Set-Cookie", "").split(";")[0]

    def crossed(self) -> list[int]:
        """Output frame ids that are not from this stream's range."""
        with self.client._lock:
            ids = [index for index, _ in self.client.frames]
        return [i for i in ids if i // ID_RANGE != self.k]


def test_two_servers_behind_haproxy(request, tmp_path):
    prefix = netns_prefix()
    if prefix and os.environ.get(INSIDE) != "1":        # run this very test again inside its own netns
        cmd = prefix + [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                        f"{Path(__file__).resolve()}::test_two_servers_behind_haproxy"]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=540,
                              env={**os.environ, INSIDE: "1"})
        assert proc.returncode == 0, f"in the network namespace:\n{proc.stdout[-8000:]}\n{proc.stderr[-3000:]}"
        assert " passed" in proc.stdout, proc.stdout[-3000:]
        return
    run_cluster(request.getfixturevalue("tiny_model_dir"), tmp_path, request.getfixturevalue("clip"))


def run_cluster(model_dir: Path, tmp_path: Path, clip) -> None:
    procs = [ServerProcess(model_dir, tmp_path / name, max_sessions=2, drain_grace=240) for name in ("s1", "s2")]
    with contextlib.ExitStack() as stack:
        for proc in procs:                  # both start now (they load the model side by side)
            stack.callback(proc.kill)
            proc.start()
        run_scenario(procs, tmp_path, clip)


def run_scenario(procs: list[ServerProcess], tmp_path: Path, clip) -> None:
    streams: list[IdStreamer] = []
    with procs[0] as s1, procs[1] as s2, \
            HAProxy(tmp_path, free_port(), {"s1": s1.port, "s2": s2.port}) as lb:
        servers = {"s1": s1, "s2": s2}
        try:
            lb.wait_status({"s1": "UP", "s2": "UP"})
            # ---- five streams: 2 + 2, the fifth is told that every server is full
            for k in range(4):
                streams.append(IdStreamer(lb.ws_url, clip, k))
            placed = sorted(s.server for s in streams)
            assert placed == ["s1", "s1", "s2", "s2"], placed
            for name, srv in servers.items():
                status, body = http_json(srv.base + "/api/ready")
                assert status == 503 and body["reason"] == "full" and body["active"] == 2, (name, body)
            lb.wait_status({"s1": "DOWN", "s2": "DOWN"})
            with pytest.raises(InvalidStatus) as refused:
                connect(lb.ws_url + "?format=raw", open_timeout=30)
            assert refused.value.response.status_code == 503
            assert b'"code":"server_full"' in refused.value.response.body
            # ---- a stream's HTTP calls stay on its server (cookie), even while it is full (DOWN in haproxy)
            for s in streams:
                status, info = http_json(lb.base + f"/api/sessions/{s.ready['session']}",
                                         {"X-Stream-Secret": s.ready["secret"], "Cookie": s.cookie})
                assert status == 200 and info["id"] == s.ready["session"], (s.server, s.cookie, status, info)
            status, _ = http_json(lb.base + f"/api/sessions/{streams[0].ready['session']}",
                                  {"X-Stream-Secret": streams[0].ready["secret"]})
            assert status == 503                     # without the cookie: a new request, and no server is ready
            # ---- per-server metrics through haproxy
            for name in servers:
                status, text = http_json(lb.base + f"/servers/{name}/metrics")
                assert status == 200 and "wanstream_server_streams_active 2.0" in text, (name, status)
            for s in streams:
                s.assert_progress(3)
            # ---- SIGTERM drains s1; a freed slot on s2 takes the next stream
            on = {name: [s for s in streams if s.server == name] for name in servers}
            s1.popen.send_signal(signal.SIGTERM)
            wait_until(lambda: http_json(s1.base + "/api/ready")[1].get("reason") == "draining", 30, "s1 draining")
            on["s2"][0].close()
            lb.wait_status({"s1": "DOWN", "s2": "UP"})
            late = IdStreamer(lb.ws_url, clip, 4)
            streams.append(late)
            assert late.server == "s2"
            for s in on["s1"] + [late]:
                s.assert_progress(3)
            assert s1.popen.poll() is None           # still draining: its streams run
            # ---- SIGKILL s2: its streams end with an error, the draining s1's streams keep streaming
            s2.popen.kill()
            for s in (on["s2"][1], late):
                wait_until(lambda s=s: s.client.closed, 60, f"stream {s.k} on the killed server to end")
                assert s.client.close_code != 1000, s.client.close_code
            for s in on["s1"]:
                s.assert_progress(3)
                assert not s.client.closed
            # ---- no frame crossed streams
            for s in streams:
                assert s.client.frame_count > 0 and s.crossed() == [], (s.k, s.crossed()[:5])
            # ---- the drain ends when s1's streams end: exit 0
            for s in on["s1"]:
                s.close()
            assert s1.popen.wait(60) == 0, s1.log()[-3000:]
        except BaseException:
            print("---- haproxy log\n", lb.log()[-3000:], "\n---- s1\n", s1.log()[-3000:], "\n---- s2\n",
                  s2.log()[-3000:])
            raise
        finally:
            for s in streams:
                s.close()
