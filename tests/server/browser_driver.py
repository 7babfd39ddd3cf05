"""Real-browser run of the live server (used by test_browser.py; also runnable by hand).

Starts ``python -m wanstream.server`` (the code of ``wanstream serve``) on a free 127.0.0.1 port with the given
model, then drives Debian's Chromium through Playwright (``executable_path``, no browser download) with a
fake camera fed from a generated .y4m, over each transport: frames come back, parameters round-trip (UI →
server → ack → /api/sessions), the stats line fills, the session is freed on Stop. Also: a second page gets
"server full", a page without camera permission says "camera denied", a recording stays playable when the
page goes away mid-recording. Writes a JSON report (checks and measured figures) to --out.

Network: only 127.0.0.1. The test runs this inside ``unshare --net`` (only ``lo``) when it can; Chromium gets
``--host-resolver-rules`` so it resolves nothing, and the server uses only 127.0.0.1 ICE candidates.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import av
import numpy as np

CHROMIUM = "/usr/bin/chromium"


def write_y4m(path: Path, seconds: float = 2.0, fps: int = 30, width: int = 160, height: int = 120) -> Path:
    """A 4:2:0 y4m clip (Chromium's fake camera loops it): moving square and disc on a gradient, light noise."""
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:height, 0:width]
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{width} H{height} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        for i in range(int(seconds * fps)):
            y = (40 + 120 * xs / width + 20 * np.sin(ys / 9 + i / 5)).astype(np.float32)
            sx = int((i * 3) % (width - 30))
            y[20:50, sx:sx + 30] = 220
            cx, cy = width / 2 + 30 * np.cos(i / 8), height / 2 + 25 * np.sin(i / 8)
            y[(xs - cx) ** 2 + (ys - cy) ** 2 < 144] = 30
            y += rng.normal(0, 4, y.shape)
            u = np.full((height // 2, width // 2), 128 + 40 * np.sin(i / 10), np.float32)
            v = np.full((height // 2, width // 2), 128 - 40 * np.cos(i / 13), np.float32)
            f.write(b"FRAME\n")
            for plane in (y, u, v):
                f.write(np.clip(plane, 16, 240).astype(np.uint8).tobytes())
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def chromium_args(y4m: Path, fake_ui: bool = True) -> list[str]:
    args = ["--use-fake-device-for-media-stream", f"--use-file-for-fake-video-capture={y4m}",
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--autoplay-policy=no-user-gesture-required",
            "--allow-loopback-in-peer-connection", "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"]
    if fake_ui:
        args.append("--use-fake-ui-for-media-stream")
    return args


def poll_js(page, expr: str, timeout_s: float, interval_s: float = 0.1) -> bool:
    """Poll a JS expression until it is truthy (bounded). Evaluated through the DevTools protocol, which the page's
    Content-Security-Policy allows; Playwright's ``wait_for_function`` compiles its predicate with ``eval``, which
    the CSP (no 'unsafe-eval', as it should be) refuses."""
    deadline = time.monotonic() + timeout_s
    while True:
        if page.evaluate(f"(() => {{ try {{ return !!({expr}); }} catch (e) {{ return false; }} }})()"):
            return True
        if time.monotonic() > deadline:
            return False
        page.wait_for_timeout(interval_s * 1000)


def watch_csp(page) -> list[str]:
    """The Content-Security-Policy violations the page reports on its console (filled while the page runs)."""
    seen: list[str] = []
    page.on("console", lambda msg: seen.append(msg.text[:300]) if "Content Security Policy" in msg.text else None)
    return seen


def wait_js(page, expr: str, timeout_s: float, what: str) -> None:
    if not poll_js(page, expr, timeout_s):
        state = page.evaluate("JSON.stringify({status: wanstream.status, framesOut: wanstream.framesOut, "
                              "errors: wanstream.errors, messages: wanstream.messages, params: wanstream.params})")
        raise RuntimeError(f"timed out waiting for {what}: page state {state}")


def run_transport(browser, base: str, transport: str, server_pid: int, shot: Path | None, measure_s: float) -> dict:
    r: dict = {"transport": transport}
    page = browser.new_page(viewport={"width": 1366, "height": 768})
    r["csp_violations"] = watch_csp(page)                 # the page works under its own CSP: none expected
    r["csp"] = page.goto(f"{base}/?transport={transport}&autostart=1").headers.get("content-security-policy")
    wait_js(page, "window.wanstream && window.wanstream.framesOut >= 10", 120, f"{transport}: 10 output frames")
    r["ttff_page_s"] = page.evaluate("wanstream.ttffPage")
    # measure: output frames shown over a window, server CPU
    f0, c0, t0 = page.evaluate("wanstream.framesOut"), proc_cpu_s(server_pid), time.monotonic()
    page.wait_for_timeout(measure_s * 1000)
    f1, c1, t1 = page.evaluate("wanstream.framesOut"), proc_cpu_s(server_pid), time.monotonic()
    r["fps_shown"] = (f1 - f0) / (t1 - t0)
    r["server_cpu_pct"] = 100 * (c1 - c0) / (t1 - t0)
    stats = page.evaluate("wanstream.stats")
    r["server_stats"] = stats
    r["stats_line"] = page.inner_text("#stats")
    # parameters through the UI: prompt, steps, seed, noise scale
    page.fill("#prompt", "a pencil sketch of a harbour")
    page.click("#apply-prompt")
    page.click("#steps button[data-steps='3']")
    page.fill("#seed", "7")
    page.dispatch_event("#seed", "change")
    page.evaluate("() => { const n = document.getElementById('noise'); n.value = '0.5';"
                  " n.dispatchEvent(new Event('change')); }")
    page.select_option("#fit", "pad")
    wait_js(page, "wanstream.params && wanstream.params.steps === 3 && wanstream.params.seed === 7 && "
                  "wanstream.params.noise_scale === 0.5 && wanstream.params.fit === 'pad' && "
                  "wanstream.params.prompt === 'a pencil sketch of a harbour'",
            30, f"{transport}: parameter acks")
    r["input_object_fit"] = page.evaluate("getComputedStyle(document.getElementById('input')).objectFit")
    session_id, secret = page.evaluate("[wanstream.session, wanstream.secret]")
    server_view = get_json(f"{base}/api/sessions/{session_id}?secret={secret}")["params"]   # the stream's secret
    r["params_server"] = server_view
    r["params_roundtrip"] = (server_view["steps"] == 3 and server_view["seed"] == 7
                             and server_view["noise_scale"] == 0.5 and server_view["fit"] == "pad"
                             and server_view["prompt"] == "a pencil sketch of a harbour")
    # a prompt switch with KV re-cache through the page's checkbox (toggled as a change event, not a pointer click:
    # under load a banner appearing above the controls can move the box between Playwright's aim and its click)
    toggle = ("(on) => { const c = document.getElementById('recache'); c.checked = on;"
              " c.dispatchEvent(new Event('change')); }")
    page.evaluate(toggle, True)
    wait_js(page, "wanstream.params && wanstream.params.recache === true", 30, f"{transport}: recache on")
    page.fill("#prompt", "a watercolor of a harbour")
    page.click("#apply-prompt")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        stats = get_json(f"{base}/api/sessions/{session_id}?secret={secret}")["stats"]
        if stats.get("recaches"):
            break
        time.sleep(0.2)
    r["recache"] = {"transition_disabled": page.evaluate("document.getElementById('transition').disabled"),
                    "recaches": stats.get("recaches")}
    page.evaluate(toggle, False)
    wait_js(page, "wanstream.params && wanstream.params.recache === false", 30, f"{transport}: recache off")
    r["presets"] = check_presets(page, base, transport, session_id, secret)
    r["osc"] = check_osc(page, transport)
    before = page.evaluate("wanstream.framesOut")
    wait_js(page, f"wanstream.framesOut >= {before + 8}", 60, f"{transport}: frames after the parameter change")
    r["frames_after_params"] = page.evaluate("wanstream.framesOut") - before
    wait_js(page, "wanstream.stats && wanstream.stats.frames_out > 0 && wanstream.stats.fps_out !== null",
            30, f"{transport}: stats")
    r["stats_line"] = page.inner_text("#stats")
    r["stats_ok"] = all(k in r["stats_line"] for k in ("fps", "latency p50", "TTFF", "dropped")) and \
        page.evaluate("wanstream.stats.frames_out") > 0
    r["latency_ms"] = page.evaluate("wanstream.stats.latency_ms")
    r["ttff_server_s"] = page.evaluate("wanstream.stats.ttff_s")
    r["dropped"] = page.evaluate("wanstream.stats.frames_dropped")
    # a recording through the page, downloaded through the link it shows (which carries the stream's secret)
    page.click("#record")
    wait_js(page, "wanstream.params && wanstream.params.recording === true", 30, f"{transport}: recording on")
    before = page.evaluate("wanstream.framesOut")
    wait_js(page, f"wanstream.framesOut >= {before + 8}", 60, f"{transport}: frames while recording")
    page.click("#record")
    wait_js(page, "document.querySelector('#recordings a') !== null", 60, f"{transport}: download link")
    r["download"] = page.evaluate("""async () => {
        const a = document.querySelector('#recordings a');
        const resp = await fetch(a.href);
        const body = new Uint8Array(await resp.arrayBuffer());
        return {status: resp.status, bytes: body.length, ftyp: String.fromCharCode(...body.slice(4, 8)),
                has_secret: new URL(a.href).searchParams.has('secret')};
    }""")
    if shot is not None:
        page.screenshot(path=str(shot))
    r["page_errors"] = page.evaluate("wanstream.errors")
    page.click("#stop")
    wait_js(page, "wanstream.status === 'idle'", 10, f"{transport}: stop")
    deadline = time.monotonic() + 30
    while get_json(f"{base}/api/sessions")["count"] and time.monotonic() < deadline:
        time.sleep(0.2)
    r["freed_after_stop"] = get_json(f"{base}/api/sessions")["count"] == 0
    page.close()
    return r


def check_osc(page, transport: str) -> dict:
    """The page shows its OSC address (``serve --osc-port``); a message sent there reaches the page's controls."""
    from pythonosc.udp_client import SimpleUDPClient
    target = page.text_content("#osc-target")               # "udp HOST:PORT" (in the closed <details>)
    host, port = target.split()[1].rsplit(":", 1)
    SimpleUDPClient(host, int(port)).send_message(page.evaluate("wanstream.oscAddress") + "seed", 4242)
    wait_js(page, "wanstream.params && wanstream.params.seed === 4242", 30, f"{transport}: OSC change on the page")
    return {"target": target, "shown": page.is_visible("#osc"), "seed_on_page": page.input_value("#seed")}


def check_presets(page, base: str, transport: str, session_id: str, secret: str) -> dict:
    """Save preset downloads the stream's state; Load preset shows a refused file's field and applies a good one."""
    with page.expect_download(timeout=30_000) as download:
        page.click("#preset-save")
    saved = json.loads(Path(download.value.path()).read_text())

    def load(name: str, preset: dict) -> None:
        page.set_input_files("#preset-file", files=[{"name": name, "mimeType": "application/json",
                                                     "buffer": json.dumps(preset).encode()}])
    load("bad.json", {**saved, "steps": 9})
    wait_js(page, "wanstream.messages.some(m => m.text.includes('steps:'))", 30, f"{transport}: preset error shown")
    banner = page.inner_text("#banner-text")
    load("good.json", {**saved, "steps": 1, "seed": 11})
    wait_js(page, "wanstream.loadedPreset && wanstream.loadedPreset.seed === 11", 30, f"{transport}: preset loaded")
    server_view = get_json(f"{base}/api/sessions/{session_id}?secret={secret}")["params"]
    return {"saved": saved, "error_banner": banner, "applied": server_view["steps"] == 1 and server_view["seed"] == 11,
            "page_steps": page.evaluate("wanstream.params.steps")}


def run_server_full(browser, base: str, record_dir: Path) -> dict:
    """max-sessions 1: a second page is told the server is full; the first keeps streaming."""
    a = browser.new_page(viewport={"width": 1366, "height": 768})
    a.goto(f"{base}/?transport=ws&autostart=1")
    wait_js(a, "wanstream.framesOut >= 5", 120, "full: first page frames")
    b = browser.new_page(viewport={"width": 1366, "height": 768})
    b.goto(f"{base}/?transport=ws&autostart=1")
    wait_js(b, "wanstream.status === 'server full'", 30, "full: second page refused")
    banner = b.inner_text("#banner-text")
    rtc = browser.new_page()
    rtc.goto(f"{base}/?transport=webrtc&autostart=1")
    wait_js(rtc, "wanstream.status === 'server full'", 30, "full: WebRTC page refused")
    before = a.evaluate("wanstream.framesOut")
    wait_js(a, f"wanstream.framesOut >= {before + 5}", 60, "full: first page keeps streaming")
    # recording, then the page goes away mid-recording
    a.click("#record")
    wait_js(a, "wanstream.params && wanstream.params.recording === true", 30, "recording on")
    before = a.evaluate("wanstream.framesOut")
    wait_js(a, f"wanstream.framesOut >= {before + 12}", 60, "frames while recording")
    secret = a.evaluate("wanstream.secret")
    a.close()          # disconnect without stopping the recording
    recs = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        recs = get_json(f"{base}/api/recordings?secret={secret}")["recordings"]    # the closed stream's files
        if recs and all(r["complete"] for r in recs):
            break
        time.sleep(0.2)
    b.close()
    rtc.close()
    for r in recs:                     # playable: decode it
        with av.open(str(record_dir / r["file"])) as container:
            r["decoded_frames"] = sum(1 for _ in container.decode(video=0))
    return {"full_status": "server full", "full_banner": banner, "recordings": recs}


def run_camera_denied(pw, y4m: Path, base: str) -> dict:
    browser = pw.chromium.launch(executable_path=CHROMIUM, args=chromium_args(y4m, fake_ui=False), headless=True)
    try:
        context = browser.new_context(permissions=[])
        page = context.new_page()
        page.goto(f"{base}/?transport=ws&autostart=1")
        wait_js(page, "wanstream.status === 'camera denied'", 30, "camera denied")
        return {"denied_status": page.evaluate("wanstream.status"), "denied_banner": page.inner_text("#banner-text")}
    finally:
        browser.close()


@contextlib.contextmanager
def served(model: str, work: Path, report: dict, *server_args: str):
    """A ``python -m wanstream.server`` on a free loopback port with ``server_args``, up (health answers) for the
    ``with`` body, which gets its base URL and process. The server is stopped afterwards and the tail of its log goes
    in ``report["server_log_tail"]``."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(work / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "wanstream.server", "--model", model, "--port", str(port),
                               "--max-sessions", "1", "--idle-timeout", "30", *server_args],
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"server exited with {server.returncode}: {(work / 'server.log').read_text()}")
            try:
                report["health"] = get_json(f"{base}/api/health")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("server did not start in 180 s") from None
                time.sleep(0.3)
        yield base, server
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
        report["server_log_tail"] = (work / "server.log").read_text()[-3000:]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--workdir", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--resolution", default="64x64")
    ap.add_argument("--transports", default="ws,webrtc")
    ap.add_argument("--measure-s", type=float, default=4.0)
    ap.add_argument("--screenshot", action="store_true")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    y4m = write_y4m(work / "cam.y4m")
    report: dict = {"netns_interfaces": sorted(name for _, name in socket.if_nameindex())}
    try:
        with served(args.model, work, report, "--resolution", args.resolution, "--record-dir",
                    str(work / "recordings"), "--webrtc-loopback-candidates", "--osc-port", "0") as (base, server):
            report["port"] = int(base.rsplit(":", 1)[1])
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, args=chromium_args(y4m), headless=True)
                try:
                    for t in args.transports.split(","):
                        shot = work / f"page-{t}.png" if args.screenshot else None
                        report[t] = run_transport(browser, base, t, server.pid, shot, args.measure_s)
                    report["full"] = run_server_full(browser, base, work / "recordings")
                finally:
                    browser.close()
                report["denied"] = run_camera_denied(pw, y4m, base)
            report["metrics_head"] = urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode()[:4000]
    except Exception as exc:  # noqa: BLE001 - reported to the test
        report["error"] = f"{type(exc).__name__}: {exc}"
    args.out.write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
