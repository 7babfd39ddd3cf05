# Shared set-up of the GPU scripts (sourced by gpu_bench.sh and gpu_check.sh; expects REPO, PY, DEVICE and a
# `log` function to be set):
#
# * makes wanstream importable: as is when torch (CUDA), diffusers and av import already; else from wheels in .whl/
#   (offline machines with a preinstalled CUDA torch); else a fresh venv with `pip install -e .` (PY changes);
# * checks that torch sees a CUDA device when DEVICE is cuda*, and logs torch's version and the GPU;
# * exports WANSTREAM_COMMIT (the checkout's short hash, "+dirty" with local changes) unless it is set;
# * defines `ensure_model PRESET DIR [BACKBONE]`: writes a random-weight model in the released layout once.

if "$PY" -c "import torch, diffusers, av, ftfy, safetensors, transformers" 2>/dev/null; then
    log "using the installed packages of $("$PY" -c 'import sys; print(sys.executable)')"
elif compgen -G "$REPO/.whl/*.whl" >/dev/null; then
    log "installing the wheels in .whl/ beside the preinstalled torch (offline)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/wanstream-site \
        "$REPO"/.whl/*.whl
    export PYTHONPATH=/tmp/wanstream-site${PYTHONPATH:+:$PYTHONPATH}
else
    log "creating .venv-gpu and installing wanstream (needs network access to PyPI)"
    "$PY" -m venv "$REPO/.venv-gpu"
    "$REPO/.venv-gpu/bin/pip" install -q -e "$REPO"
    PY=$REPO/.venv-gpu/bin/python
fi
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
DEVICE=$DEVICE "$PY" - <<'PYEOF'
import os, sys, torch
if os.environ["DEVICE"].startswith("cuda") and not torch.cuda.is_available():
    sys.exit("torch sees no CUDA device; this script needs a GPU (DEVICE=cpu for a smoke run)")
name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print(f"[gpu] torch {torch.__version__}, {name}", file=sys.stderr)
PYEOF
if [ -z "${WANSTREAM_COMMIT:-}" ] && git -C "$REPO" rev-parse --short HEAD >/dev/null 2>&1; then
    WANSTREAM_COMMIT=$(git -C "$REPO" rev-parse --short HEAD)
    git -C "$REPO" --no-optional-locks diff --quiet HEAD -- 2>/dev/null || WANSTREAM_COMMIT="$WANSTREAM_COMMIT+dirty"
fi
export WANSTREAM_COMMIT=${WANSTREAM_COMMIT:-unknown}

ensure_model() {   # PRESET DIR [BACKBONE]
    if [ ! -f "$2/.done" ]; then
        log "writing a random $1 ${3:-streamdiffusionv2} model to $2"
        "$PY" -m wanstream.cli init-random --preset "$1" --small-text-encoder --backbone "${3:-streamdiffusionv2}" "$2"
        touch "$2/.done"
    fi
}
