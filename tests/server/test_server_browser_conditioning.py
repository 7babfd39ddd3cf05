"""Real browser, VACE: the page uploads a reference image and switches the control kind on a live stream; frames
keep flowing; bad images get a 4xx naming the problem (driver: ``browser_conditioning.py``, same set-up and skips
as ``test_server_browser.py``)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from server_helpers import netns_prefix

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip("Debian chromium is not installed (run scripts/install_browser.sh as root)")
    if importlib.util.find_spec("playwright") is None:
        pytest.skip("the playwright python package is not installed (run scripts/install_browser.sh)")
    if importlib.util.find_spec("websockets") is None:
        pytest.skip("the server needs the websockets package")
    from wanstream.models.random_init import init_random
    work = tmp_path_factory.mktemp("browser_vace")
    model = work / "model"
    init_random(model, "tiny", seed=0, log=lambda *_: None, vace=True)
    out = work / "report.json"
    cmd = [sys.executable, str(HERE / "browser_conditioning.py"), "--model", str(model), "--workdir", str(work),
           "--out", str(out)]
    proc = subprocess.run(netns_prefix() + cmd, cwd=ROOT, capture_output=True, text=True, timeout=540)
    assert out.is_file(), f"driver failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    r = json.loads(out.read_text())
    assert "error" not in r, f"{r['error']}\n--- server log ---\n{r.get('server_log_tail')}"
    return r


def test_page_uploads_a_reference_and_switches_control_while_frames_flow(report):
    assert report["reference_preview"] and report["control_preview_px"] == 64
    d = report["depth_refused"]
    assert d["status"] == 409 and "wanstream download depth-anything" in d["message"]
    assert report["control_after_refusal"] == "edges"                     # the select shows what the stream has
    codes = sorted(e["status"] for e in report["bad_images"])
    assert codes == [400, 413, 415], report["bad_images"]
    messages = " | ".join(e["message"] for e in report["bad_images"])
    assert "not an image" in messages and "limited to" in messages and "wrong type" in messages
    assert "Reference refused" in report["banner"]
    assert report["status"] not in ("idle", "error") and report["page_errors"] == []
    assert report["csp_violations"] == []
    assert any(line.startswith("wanstream_server_references_set_total 1") for line in report["metrics"])
