#!/usr/bin/env bash
# The GPU check in one command: on one CUDA GPU (H100 / H200), no network, random weights, about 8 minutes.
#
#   scripts/gpu_check.sh [--dry-run] [OUT_DIR]          (default OUT_DIR: gpu-check-out)
#
# 1. conformance: the goldens of tests/data/conformance (stream-batch DiT eager and compiled + CUDA graphs, VAE
#    stream, noise controller) on the GPU in float32 (bound 1e-4, TF32 off) and bfloat16 (sanity bound), via
#    scripts/conformance_check.py;
# 2. a random-weight 1.3B model in the released layout (`init-random --preset 1.3b --small-text-encoder`);
# 3. benchmark rows (`python -m wanstream.cli bench` == `wanstream bench`, bf16), at each resolution of RES:
#      eager     steps 1..4 x {stream batch, no-batch}, Wan VAE                     (--sweep)
#      compiled  steps COMPILED_STEPS, compiled + CUDA graphs, Wan VAE              (--compile)
#      fp8       2 steps, fp8 weights, eager and compiled (first resolution only)   (--quantize fp8 [--compile])
#      taehv     2 steps, TAEHV instead of the Wan VAE at the decode end, the encode end and both
#                (first resolution)                                                 (--taehv [encode|both])
#      sessions  2 steps, SESSIONS streams in one engine (first resolution)         (--sessions N)
#      backbones for each of BACKBONES (self-forcing longlive): a random 1.3B model in its layout, a v2v bench
#                row (2 steps, first resolution) and t2v speed (scripts/t2v_speed.py: T2V_RES, 4 steps, 1 and
#                SESSIONS clips); StreamDiffusionV2's t2v speed beside them
#    each with TTFF, FPS, per-stage times, p50/p95/p99 latency and peak VRAM; JSON and markdown per run;
#    vae       the VAE alone at VAE_SIZES (scripts/vae_real_size.py, random base-VAE_WIDTH VAE): the official
#              streaming VAE (stand-in) vs the default path, diffusers' eager modules vs the default path, bf16
#              (the GPU default, channels-last-3d conv3d) vs fp32, 2 and 4 streams in one call vs one call each,
#              TAEHV vs the Wan VAE; paired rounds, VAE_ROUNDS each;
# 4. OUT_DIR/gpu_check.md (every table, labelled with GPU, date and commit: paste under "GPU rows" in
#    docs/benchmarks.md) and OUT_DIR/gpu_check.json (every row, every skip with its reason).
#
# Time: the script keeps to BUDGET_S seconds; a run that would start later is skipped and listed as such. A bench
# flag this checkout's `wanstream bench` lacks (see `--help`) skips its rows with that reason.
#
# Knobs (environment): PYTHON (python3), PRESET (1.3b), MODEL (OUT_DIR/models/PRESET), DEVICE (cuda),
# RES ("512x512 832x480"), FRAMES (61), WARMUP (3), COMPILED_STEPS ("2"), PRIME_COMPILED (14: chunks of the
# throw-away stream before a compiled row, so compilation and graph capture stay out of the figures),
# SESSIONS (4), BUDGET_S (480), RUNS ("conformance eager compiled fp8 taehv sessions vae backbones"), VAE_SIZES
# ("256,512"), VAE_WIDTH (96), VAE_ROUNDS (6), BACKBONES ("self-forcing longlive"), T2V_RES (832x480),
# T2V_FRAMES (81), WANSTREAM_COMMIT. The backbone rows alone:
#   RUNS="conformance backbones" scripts/gpu_check.sh
# A CPU smoke run of the whole script (tiny model, small clips):
#   DEVICE=cpu PRESET=tiny RES=64x64 FRAMES=29 WARMUP=2 PRIME_COMPILED=8 VAE_SIZES=64 VAE_WIDTH=8 \
#     scripts/gpu_check.sh /tmp/gc
set -euo pipefail

DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; shift; fi
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${1:-${OUT_DIR:-$REPO/gpu-check-out}}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PRESET=${PRESET:-1.3b}
MODEL=${MODEL:-$OUT/models/$PRESET}
DEVICE=${DEVICE:-cuda}
RES=${RES:-"512x512 832x480"}
FRAMES=${FRAMES:-61}
WARMUP=${WARMUP:-3}
COMPILED_STEPS=${COMPILED_STEPS:-2}
PRIME_COMPILED=${PRIME_COMPILED:-14}
SESSIONS=${SESSIONS:-4}
BUDGET_S=${BUDGET_S:-480}
RUNS=${RUNS:-"conformance eager compiled fp8 taehv sessions vae backbones"}
VAE_SIZES=${VAE_SIZES:-"256,512"}
VAE_WIDTH=${VAE_WIDTH:-96}
VAE_ROUNDS=${VAE_ROUNDS:-6}
BACKBONES=${BACKBONES:-"self-forcing longlive"}
T2V_RES=${T2V_RES:-832x480}
T2V_FRAMES=${T2V_FRAMES:-81}
PY=${PYTHON:-python3}
FIRST_RES=${RES%% *}
cd "$REPO"

log() { printf '[gpu_check] %s\n' "$*" >&2; }
START=$SECONDS
SKIPPED=()                      # "name: reason"

# run NAME CMD...: runs CMD unless the budget is spent (then NAME is listed as skipped); --dry-run prints it
run() {
    local name=$1; shift
    if [ "$DRY_RUN" = 1 ]; then printf '%q ' "$@"; echo; return 0; fi
    local used=$((SECONDS - START))
    if [ "$used" -ge "$BUDGET_S" ]; then
        SKIPPED+=("$name: time budget of ${BUDGET_S}s spent (${used}s)")
        log "skip $name (budget spent)"
        return 0
    fi
    log "$name (${used}s used)"
    "$@" || { local rc=$?; SKIPPED+=("$name: failed (exit status $rc)"); log "$name FAILED"; }
}

# ------------------------------------------------------------------------------------------------ 1. install
if [ "$DRY_RUN" = 1 ]; then
    WANSTREAM_COMMIT=${WANSTREAM_COMMIT:-dry-run}
    ensure_model() { echo "ensure_model $1 $2 ${3:-}"; }
    BENCH_HELP="--compile --quantize --taehv {encode,decode,both} --sessions"
else
    # shellcheck source=scripts/gpu_env.sh
    source "$REPO/scripts/gpu_env.sh"
    BENCH_HELP=$("$PY" -m wanstream.cli bench --help 2>/dev/null || true)
fi
ws() { "$PY" -m wanstream.cli bench "$@"; }        # == `wanstream bench ...`

# has_flag FLAG RUN: whether bench has FLAG; if not, RUN is listed as skipped
has_flag() {
    if grep -q -- "$1\b" <<<"$BENCH_HELP"; then return 0; fi
    SKIPPED+=("$2: this checkout's bench has no $1 yet")
    log "skip $2 (bench has no $1)"
    return 1
}

# ---------------------------------------------------------------------------------------------- 2. conformance
for run_name in $RUNS; do
    [ "$run_name" = conformance ] || continue
    for dtype in float32 bfloat16; do
        run "conformance $dtype" "$PY" scripts/conformance_check.py --device "$DEVICE" --dtype "$dtype" \
            --json "$OUT/conformance_$dtype.json" --markdown "$OUT/conformance_$dtype.md"
    done
done

# -------------------------------------------------------------------------------------------------- 3. model
if [ "$RUNS" != conformance ]; then
    ensure_model "$PRESET" "$MODEL"
fi

# --------------------------------------------------------------------------------------------------- 4. bench
common=(--model "$MODEL" --device "$DEVICE" --frames "$FRAMES" --warmup "$WARMUP" --quiet --no-peak)
compiled=(--compile --prime-chunks "$PRIME_COMPILED")
bench() {   # NAME FILE-STEM BENCH-ARGS...
    local name=$1 stem=$2; shift 2
    run "$name" ws "${common[@]}" "$@" --json "$OUT/$stem.json" --markdown "$OUT/$stem.md"
}
for run_name in $RUNS; do
    case $run_name in
        conformance) ;;
        eager)    for res in $RES; do
                      bench "eager sweep $res" "eager_$res" --sweep --resolution "$res"
                  done ;;
        compiled) if has_flag --compile "compiled"; then
                      for res in $RES; do
                          for steps in $COMPILED_STEPS; do
                              bench "compiled $res ${steps} steps" "compiled_${res}_${steps}step" \
                                  --resolution "$res" --steps "$steps" "${compiled[@]}"
                          done
                      done
                  fi ;;
        fp8)      if has_flag --quantize "fp8"; then
                      bench "fp8 $FIRST_RES" "fp8_${FIRST_RES}" --resolution "$FIRST_RES" --quantize fp8
                      if has_flag --compile "fp8 compiled"; then
                          bench "fp8 compiled $FIRST_RES" "fp8_compiled_${FIRST_RES}" --resolution "$FIRST_RES" \
                              --quantize fp8 "${compiled[@]}"
                      fi
                  fi ;;
        taehv)    bench "taehv $FIRST_RES" "taehv_${FIRST_RES}" --resolution "$FIRST_RES" --taehv
                  if has_flag "encode,decode,both" "taehv encode / both"; then
                      for ends in encode both; do
                          bench "taehv $ends $FIRST_RES" "taehv_${ends}_${FIRST_RES}" --resolution "$FIRST_RES" \
                              --taehv "$ends"
                      done
                  fi ;;
        vae)      run "vae at $VAE_SIZES" "$PY" scripts/vae_real_size.py --device "$DEVICE" --out "$OUT" \
                      --width "$VAE_WIDTH" --sizes "$VAE_SIZES" --bf16-sizes "$VAE_SIZES" \
                      --batch-sizes "${VAE_SIZES##*,}" --rounds "$VAE_ROUNDS" --only official,compare,bf16,batch,taehv ;;
        sessions) if has_flag --sessions "sessions"; then
                      bench "$SESSIONS sessions $FIRST_RES" "sessions${SESSIONS}_${FIRST_RES}" \
                          --resolution "$FIRST_RES" --sessions "$SESSIONS"
                  fi ;;
        backbones) t2v() {   # NAME MODEL-DIR CLIPS
                      run "t2v $1 x$3" "$PY" scripts/t2v_speed.py --model "$2" --device "$DEVICE" \
                          --resolution "$T2V_RES" --frames "$T2V_FRAMES" --steps 4 --clips "$3" \
                          --json "$OUT/t2v_$1_x$3.json" --markdown "$OUT/t2v_$1_x$3.md"
                  }
                  t2v streamdiffusionv2 "$MODEL" 1
                  for b in $BACKBONES; do
                      bmodel="$OUT/models/$PRESET-$b"
                      [ "$DRY_RUN" = 1 ] || ensure_model "$PRESET" "$bmodel" "$b"
                      run "v2v $b $FIRST_RES" ws --model "$bmodel" --device "$DEVICE" --frames "$FRAMES" \
                          --warmup "$WARMUP" --quiet --no-peak --resolution "$FIRST_RES" --steps 2 \
                          --json "$OUT/backbone_${b}_${FIRST_RES}.json" --markdown "$OUT/backbone_${b}_${FIRST_RES}.md"
                      t2v "$b" "$bmodel" 1
                      t2v "$b" "$bmodel" "$SESSIONS"
                  done ;;
        *)        echo "gpu_check: unknown run '$run_name' (conformance eager compiled fp8 taehv sessions vae backbones)" >&2
                  exit 2 ;;
    esac
done
[ "$DRY_RUN" = 1 ] && exit 0

# -------------------------------------------------------------------------------------------- 5. collect rows
GPU=$("$PY" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')")
{
    echo "<!-- scripts/gpu_check.sh on $GPU, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $WANSTREAM_COMMIT," \
         "$((SECONDS - START)) s -->"
    for f in "$OUT"/conformance_*.md "$OUT"/eager_*.md "$OUT"/compiled_*.md "$OUT"/fp8_*.md "$OUT"/taehv_*.md \
             "$OUT"/sessions*.md "$OUT"/vae_real_size.md "$OUT"/backbone_*.md "$OUT"/t2v_*.md; do
        [ -f "$f" ] || continue
        printf '\n#### %s\n\n' "$(basename "$f" .md)"
        cat "$f"
    done
    if [ "${#SKIPPED[@]}" -gt 0 ]; then
        printf '\nSkipped:\n\n'
        printf -- '- %s\n' "${SKIPPED[@]}"
    fi
} > "$OUT/gpu_check.md"
SKIPPED_LINES=$(printf '%s\n' "${SKIPPED[@]+"${SKIPPED[@]}"}")
OUT=$OUT GPU=$GPU SKIPPED_LINES=$SKIPPED_LINES "$PY" - <<'EOF'
import json, os, pathlib
out = pathlib.Path(os.environ["OUT"])
runs = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json")) if p.name != "gpu_check.json"}
skipped = [s for s in os.environ["SKIPPED_LINES"].splitlines() if s]
(out / "gpu_check.json").write_text(json.dumps(
    {"gpu": os.environ["GPU"], "commit": os.environ.get("WANSTREAM_COMMIT"), "runs": runs, "skipped": skipped},
    indent=1, default=str) + "\n")
EOF
log "done in $((SECONDS - START)) s: $OUT/gpu_check.md (paste under 'GPU rows' in docs/benchmarks.md), $OUT/gpu_check.json"
