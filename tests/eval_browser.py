"""Open an eval HTML report in Debian's headless Chromium (Playwright, ``executable_path``, no browser download)
and report what rendered: every plot's size and drawn series, every frame image, and every request the page made.

Usable by hand: ``python tests/eval_browser.py REPORT.html SHOT.png`` prints the JSON.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"

PROBE = """() => {
  const plots = [...document.querySelectorAll('svg.plot')].map(svg => {
    const box = svg.getBoundingClientRect();
    const series = [...svg.querySelectorAll('.series')].map(el => {
      const b = el.getBBox();
      return {tag: el.tagName, points: +el.dataset.points, bboxW: b.width, bboxH: b.height,
              length: el.getTotalLength ? el.getTotalLength() : 0};
    });
    return {name: svg.dataset.name, width: box.width, height: box.height, series,
            vlines: svg.querySelectorAll('.vline').length};
  });
  const images = [...document.querySelectorAll('img')].map(img => ({
    alt: img.alt, complete: img.complete, naturalWidth: img.naturalWidth,
    shownWidth: img.getBoundingClientRect().width}));
  const values = Object.fromEntries([...document.querySelectorAll('td[data-metric]')].map(td =>
    [td.dataset.metric, td.textContent]));
  return {plots, images, values, title: document.title};
}"""


def available() -> str | None:
    """None when the browser check can run, else the reason it cannot."""
    if not os.access(CHROMIUM, os.X_OK):
        return "Debian chromium is not installed (run scripts/install_browser.sh as root)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright python package is not installed (run scripts/install_browser.sh)"
    return None


def inspect_report(html: Path, screenshot: Path, timeout_s: float = 60) -> dict:
    from playwright.sync_api import sync_playwright
    requests: list[str] = []
    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, timeout=timeout_s * 1000,
                                     args=["--no-sandbox", "--disable-gpu", "--no-first-run",
                                           "--disable-background-networking", "--disable-component-update",
                                           "--host-resolver-rules=MAP * ~NOTFOUND"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.set_default_timeout(timeout_s * 1000)
            page.on("request", lambda r: requests.append(r.url))
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(Path(html).resolve().as_uri(), wait_until="load")
            report = page.evaluate(PROBE)
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    report["requests"] = requests
    report["page_errors"] = errors
    return report


if __name__ == "__main__":
    print(json.dumps(inspect_report(Path(sys.argv[1]), Path(sys.argv[2])), indent=1))
