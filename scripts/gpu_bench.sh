#!/usr/bin/env bash
# The GPU rows of docs/benchmarks.md in one command, on one CUDA GPU (H100 / H200):
#
#   scripts/gpu_bench.sh [OUT_DIR]            (default OUT_DIR: bench-out)
#
# 1. makes wanstream importable: as is when torch (CUDA), diffusers and av import already; else from wheels in
#    .whl/ (offline machines with a preinstalled CUDA torch); else a fresh venv with `pip install -e .`;
# 2. writes a random-weight 1.3B model in the released layout (`init-random --preset 1.3b --small-text-encoder`);
# 3. runs the Fig. 12 sweep (steps 1..4 x {stream batch, no-batch}, input as fast as possible) at 512x512 and at
#    832x480 (480p), the TTFF rows (2 steps, live input at 16 and 30 FPS) and the SLO row (1 step, 512x512, live
#    input at 30 FPS, 1 s deadline);
# 4. leaves JSON per run and OUT_DIR/gpu_rows.md (every table, labelled with GPU, date, commit) to paste into
#    docs/benchmarks.md.
#
# Environment knobs: PYTHON (python3), PRESET (1.3b), MODEL (OUT_DIR/models/PRESET), DEVICE (cuda), FRAMES (245),
# WARMUP (10), RUNS ("sweep ttff slo"), SWEEP_RES ("512x512 832x480"), SLO_RES (512x512),
# WANSTREAM_COMMIT (the commit to record when .git is absent). A CPU smoke run of the script itself:
#   PRESET=tiny DEVICE=cpu SWEEP_RES=64x64 SLO_RES=64x64 FRAMES=29 WARMUP=2 scripts/gpu_bench.sh /tmp/gb
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${1:-${OUT_DIR:-$REPO/bench-out}}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PRESET=${PRESET:-1.3b}
MODEL=${MODEL:-$OUT/models/$PRESET}
DEVICE=${DEVICE:-cuda}
FRAMES=${FRAMES:-245}
WARMUP=${WARMUP:-10}
RUNS=${RUNS:-"sweep ttff slo"}
SWEEP_RES=${SWEEP_RES:-"512x512 832x480"}
SLO_RES=${SLO_RES:-512x512}
PY=${PYTHON:-python3}
cd "$REPO"

log() { printf '[gpu_bench] %s\n' "$*" >&2; }

# ------------------------------------------------------------------------------------------------ 1. install
# shellcheck source=scripts/gpu_env.sh
source "$REPO/scripts/gpu_env.sh"

ws() { "$PY" -m wanstream.cli bench "$@"; }        # == `wanstream bench ...`

# -------------------------------------------------------------------------------------------------- 2. model
ensure_model "$PRESET" "$MODEL"

# --------------------------------------------------------------------------------------------------- 3. runs
common=(--model "$MODEL" --device "$DEVICE" --frames "$FRAMES" --warmup "$WARMUP" --quiet)
for run in $RUNS; do
    case $run in
        sweep) for res in $SWEEP_RES; do
                   log "sweep $res: steps 1..4 x {stream batch, no-batch}, input as fast as possible"
                   ws "${common[@]}" --sweep --resolution "$res" --json "$OUT/sweep_$res.json" \
                      --markdown "$OUT/sweep_$res.md"
               done ;;
        ttff)  for fps in 16 30; do
                   log "TTFF: 2 steps, $SLO_RES, live input at $fps FPS"
                   ws "${common[@]}" --steps 2 --resolution "$SLO_RES" --input-fps "$fps" \
                      --json "$OUT/ttff_${SLO_RES}_2step_${fps}fps.json" \
                      --markdown "$OUT/ttff_${SLO_RES}_2step_${fps}fps.md"
               done ;;
        slo)   log "SLO: 1 step, $SLO_RES, live input at 30 FPS, 1 s deadline"
               ws "${common[@]}" --steps 1 --resolution "$SLO_RES" --input-fps 30 --target-latency 1.0 \
                  --json "$OUT/slo_${SLO_RES}_1step_30fps.json" --markdown "$OUT/slo_${SLO_RES}_1step_30fps.md" ;;
        *)     echo "gpu_bench: unknown run '$run' (sweep ttff slo)" >&2; exit 2 ;;
    esac
done

# -------------------------------------------------------------------------------------------- 4. collect rows
{
    echo "<!-- scripts/gpu_bench.sh, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $WANSTREAM_COMMIT -->"
    for f in "$OUT"/sweep_*.md "$OUT"/ttff_*.md "$OUT"/slo_*.md; do
        [ -f "$f" ] || continue
        echo
        echo "#### $(basename "$f" .md)"
        echo
        cat "$f"
    done
} > "$OUT/gpu_rows.md"
log "done: $OUT/gpu_rows.md (paste under 'GPU rows' in docs/benchmarks.md) and the JSON files beside it"
