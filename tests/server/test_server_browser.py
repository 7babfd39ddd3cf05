"""Real browser: Debian Chromium driven by Playwright (python, ``executable_path``, no browser download) with a
fake camera from a generated .y4m, against ``python -m wanstream.server`` (the code of ``wanstream serve``)
with the tiny random model, over both transports.

The run happens once per module in ``browser_driver.py``, in a network namespace with only ``lo`` when this
process may create one (root + unshare), so nothing but 127.0.0.1 is reachable; otherwise directly, still on
127.0.0.1 only (Chromium resolves no names, the server uses only 127.0.0.1 ICE candidates).
Skips with a reason when Chromium or Playwright is missing (``scripts/install_browser.sh`` installs both).
"""

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
def browser_run(tiny_model_dir, tmp_path_factory):
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip("Debian chromium is not installed (run scripts/install_browser.sh as root)")
    if importlib.util.find_spec("playwright") is None:
        pytest.skip("the playwright python package is not installed (run scripts/install_browser.sh)")
    for module in ("websockets", "aiortc"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"the server needs the {module} package")
    work = tmp_path_factory.mktemp("browser")
    out = work / "report.json"
    cmd = [sys.executable, str(HERE / "browser_driver.py"), "--model", str(tiny_model_dir), "--workdir", str(work),
           "--out", str(out), "--screenshot"]
    netns = netns_prefix()
    proc = subprocess.run(netns + cmd, cwd=ROOT, capture_output=True, text=True, timeout=540)
    assert out.is_file(), f"driver failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    report = json.loads(out.read_text())
    report["netns"] = bool(netns)
    assert "error" not in report, f"{report['error']}\n--- server log ---\n{report.get('server_log_tail')}"
    return report


@pytest.mark.parametrize("transport", ["ws", "webrtc"])
def test_browser_stream_params_and_stats(browser_run, transport):
    r = browser_run[transport]
    assert r["ttff_page_s"] is not None and r["fps_shown"] > 0          # frames come back
    assert r["params_roundtrip"], r["params_server"]                     # UI → server → ack → /api/sessions
    assert r["input_object_fit"] == "contain"                            # the preview frames as the model does
    assert r["frames_after_params"] >= 8                                 # still streaming after the change
    assert r["stats_ok"], r["stats_line"]                                # the stats line shows live numbers
    assert r["server_stats"]["frames_out"] > 0
    assert r["freed_after_stop"]                                         # Stop frees the session
    o = r["osc"]                                                         # OSC address shown, message applied
    assert o["target"].startswith("udp 127.0.0.1:") and o["shown"] and o["seed_on_page"] == "4242", o
    p = r["presets"]                                                     # Save / Load preset
    assert p["saved"]["format"] == "wanstream-preset" and p["saved"]["steps"] == 3 and p["saved"]["seed"] == 7, p
    assert "steps:" in p["error_banner"] and p["applied"] and p["page_steps"] == 1, p
    d = r["download"]                                                    # the page's link carries the secret
    assert d["status"] == 200 and d["ftyp"] == "ftyp" and d["bytes"] > 0 and d["has_secret"], d
    assert r["recache"] == {"transition_disabled": True, "recaches": 1}, r["recache"]   # the page's re-cache switch
    assert r["page_errors"] == []
    assert "frame-ancestors 'none'" in r["csp"] and r["csp_violations"] == [], (r["csp"], r["csp_violations"])
    if browser_run["netns"]:
        assert browser_run["netns_interfaces"] == ["lo"]


def test_browser_server_full_and_recording_after_disconnect(browser_run):
    full = browser_run["full"]
    assert "full" in full["full_banner"].lower()
    recs = full["recordings"]
    assert recs and all(r["complete"] for r in recs)
    assert all(r["decoded_frames"] == r["frames"] > 0 for r in recs)   # complete and playable


def test_browser_camera_denied_message(browser_run):
    denied = browser_run["denied"]
    assert denied["denied_status"] == "camera denied"
    assert "denied" in denied["denied_banner"]
