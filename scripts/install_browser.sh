#!/usr/bin/env bash
# Install what the real-browser server tests need: Debian's chromium (apt) and the playwright python package
# (pip, into $VENV, default .venv). Idempotent: does nothing that is already done. Never downloads a browser
# build of its own (no `playwright install`): the tests drive /usr/bin/chromium through `executable_path`.
# Not root (apt impossible): says so and exits 0; the browser tests then skip with a reason.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PY="$VENV/bin/python"

if [ -x /usr/bin/chromium ]; then
    echo "install_browser: chromium present ($(/usr/bin/chromium --version 2>/dev/null | head -n1))"
elif [ "$(id -u)" -ne 0 ]; then
    echo "install_browser: not root, cannot apt-get install chromium; the browser tests will skip" >&2
    exit 0
else
    echo "install_browser: apt-get install chromium"
    export DEBIAN_FRONTEND=noninteractive
    if ! { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }; then
        echo "install_browser: apt-get could not install chromium; the browser tests will skip" >&2
    fi
fi

if [ ! -x "$PY" ]; then
    echo "install_browser: no virtualenv at $VENV (set VENV=...); skipping the python packages" >&2
    exit 0
fi
if "$PY" -c "import playwright, websockets, aiortc" 2>/dev/null; then
    echo "install_browser: playwright, websockets, aiortc present"
else
    echo "install_browser: pip install playwright websockets aiortc"
    "$PY" -m pip install -q playwright websockets 'aiortc==1.16.*' ||
        echo "install_browser: pip could not install playwright; the browser tests will skip" >&2
fi
