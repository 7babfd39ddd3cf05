"""Browser driver of the VACE conditioning test: ``python -m wanstream.server`` with a tiny random model that has
its VACE modules, Debian's Chromium through Playwright with a fake camera. Through the page: stream, upload a
reference image (the drop zone's file input), switch the control kind (the select) and see its preview, while
frames keep flowing; a bad image, a GIF and a too-large file get 4xx naming the problem. Writes a JSON report.

Reuses the camera clip, the Chromium flags and the polling of ``browser_driver.py``.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

from browser_driver import CHROMIUM, chromium_args, get_json, served, wait_js, watch_csp, write_y4m


def image_bytes(fmt: str, size=(48, 40)) -> bytes:
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(3)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def flowing(page, n: int, what: str) -> None:
    before = page.evaluate("wanstream.framesOut")
    wait_js(page, f"wanstream.framesOut >= {before + n}", 90, what)


def run(browser, base: str) -> dict:
    r: dict = {}
    page = browser.new_page(viewport={"width": 1366, "height": 900})
    r["page_errors"] = []
    page.on("pageerror", lambda e: r["page_errors"].append(str(e)))
    r["csp_violations"] = watch_csp(page)
    page.goto(f"{base}/?transport=ws&autostart=1")
    wait_js(page, "window.wanstream && window.wanstream.framesOut >= 8", 120, "8 output frames")
    sid, secret = page.evaluate("[wanstream.session, wanstream.secret]")
    page.click("#vace summary")
    page.set_input_files("#ref-file", files=[{"name": "ref.png", "mimeType": "image/png",
                                              "buffer": image_bytes("PNG")}])
    wait_js(page, "wanstream.conditioning.reference === true", 60, "the reference upload")
    deadline = time.monotonic() + 60
    while get_json(f"{base}/api/sessions/{sid}/conditioning?secret={secret}")["pending"]:
        if time.monotonic() > deadline:
            raise RuntimeError("the reference never reached the stream")
        time.sleep(0.2)
    r["reference_preview"] = page.evaluate("!document.getElementById('ref-preview').classList.contains('hidden')")
    flowing(page, 8, "frames after the reference")
    page.select_option("#control", "edges")
    wait_js(page, "wanstream.conditioning.control === 'edges' && wanstream.conditioning.previews >= 1", 90,
            "the edges control and its preview")
    flowing(page, 8, "frames after the control switch")
    r["control_preview_px"] = page.evaluate("document.getElementById('control-preview').naturalWidth")
    page.select_option("#control", "depth")                            # no depth model on this server: refused
    wait_js(page, "wanstream.conditioning.errors.length >= 1", 30, "the depth refusal")
    r["depth_refused"] = page.evaluate("wanstream.conditioning.errors[0]")
    r["control_after_refusal"] = page.evaluate("document.getElementById('control').value")
    bad = [("bad.png", "image/png", b"this is not an image"), ("anim.gif", "image/gif", image_bytes("GIF")),
           ("huge.bmp", "image/bmp", image_bytes("BMP", (1400, 1100)))]
    for name, mime, data in bad:
        page.set_input_files("#ref-file", files=[{"name": name, "mimeType": mime, "buffer": data}])
    wait_js(page, "wanstream.conditioning.errors.length >= 4", 60, "the bad images refused")
    r["bad_images"] = page.evaluate("wanstream.conditioning.errors.slice(1)")
    r["banner"] = page.inner_text("#banner-text")
    page.click("#ref-clear")
    wait_js(page, "wanstream.conditioning.reference === false", 30, "the reference cleared")
    flowing(page, 8, "frames after the bad images and the clear")
    r["status"] = page.evaluate("wanstream.status")
    r["metrics"] = [line for line in __import__("urllib.request").request.urlopen(f"{base}/metrics", timeout=10)
                    .read().decode().splitlines() if "reference" in line or "control" in line]
    page.close()
    return r


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--workdir", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    y4m = write_y4m(work / "cam.y4m")
    report: dict = {}
    try:
        with served(args.model, work, report, "--resolution", "64x64", "--record-dir", str(work / "rec")) as (base, _):
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, args=chromium_args(y4m), headless=True)
                try:
                    report.update(run(browser, base))
                finally:
                    browser.close()
    except Exception as exc:  # noqa: BLE001 - reported to the test
        report["error"] = f"{type(exc).__name__}: {exc}"
    args.out.write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
