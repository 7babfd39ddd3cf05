"""The soak and fuzz run of CI: ``scripts/soak.py --minutes 1 --sessions 4`` must end with a PASS verdict
(memory back near the warm baseline, no leaked sessions / threads / fds, no frame crossing streams, no server
error, every malformed input answered as documented). Runs inside ``unshare --net`` (only ``lo``) when possible.
The 20-minute, 8-stream figures are in docs/reliability.md.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from server_helpers import netns_prefix

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="the soak samples the server through /proc")
def test_soak_one_minute_four_sessions(tiny_model_dir, tmp_path):
    if importlib.util.find_spec("websockets") is None:
        pytest.skip("the WebSocket transport needs the websockets package")
    report_path = tmp_path / "soak.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "soak.py"), "--minutes", "1", "--sessions", "4",
           "--model", str(tiny_model_dir), "--workdir", str(tmp_path / "work"), "--json", str(report_path)]
    proc = subprocess.run(netns_prefix() + cmd, cwd=ROOT, capture_output=True, text=True, timeout=570)
    assert report_path.is_file(), \
        f"soak failed to run ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    report = json.loads(report_path.read_text())
    assert report["verdict"] == "pass", f"{proc.stdout[-4000:]}\n{report['checks']}\n{report['problems']}"
    assert proc.returncode == 0
    # the run did what it says: cycles of both transports, prompts, recordings, hostile inputs, all answered
    assert report["cycles"]["websocket"] >= 4 and report["distinct_prompts"] >= 8 and report["record_toggles"] >= 4
    if importlib.util.find_spec("aiortc") is not None:
        assert report["cycles"]["webrtc"] + report["cycles"]["webrtc_unfinished"] >= 1
    assert len(report["malformed_answered"]) >= 5 and report["malformed_answered"]["half_sent_headers"] == 1
    assert report["frames_out"] > 0 and report["frames_crossed"] == 0
