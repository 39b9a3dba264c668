#!/usr/bin/env bash
# The first GPU run, in order and within 8 minutes (time boxes of 1-5 add up to 470 s; 6 and 7 get
# what is left of BUDGET_S = 480 and are skipped, saying so, when under MIN_BOX_S is left):
#   1 versions and the decoder `auto` picks       4 coreset; kNN at D = 152 vs padded 160; the 2^31 probe;
#   2 decoder probe: EXIF 1..8 and odd files         Mahalanobis TF32 vs float64
#   3 the compiled kernel tests                   5 a tiny fit + scan on CUDA against a CPU scan
#   6 `vade bench` on CUDA: nvjpeg decoding, the bf16 channels_last backbone, Triton kNN, Zarr writes, the
#     fp32 / torch.cdist baseline, ceilings, the sweep (bank sizes, GPU coreset) -> $OUT/bench_cuda.json
#   7 `vade bench --gpus 1`: a Dask scan on the GPU, per-worker figures -> $OUT/bench_gpus1.json
#
#   OUT=/some/dir bash benchmarks/device_all.sh   on the GPU machine (carry .whl: see below)
#   bash benchmarks/device_all.sh --bench         steps 1, 6 and 7 only (a short call for the benchmarks)
#   bash benchmarks/device_all.sh --dry-run       anywhere: every step that runs without CUDA, the CUDA
#                                                 steps reported as skipped (also chosen when no GPU is seen);
#                                                 6 and 7 run small on the CPU
#   bash benchmarks/device_all.sh --dry-run --bench   the same, steps 1, 6 and 7
#
# The GPU machine has torch, triton 3.6, torchvision, pyarrow; zarr, dask and the Lite0 weights travel
# as wheels in ./.whl (../shared/tools/device-wheels.sh fetches them) and are installed into /tmp here.
# Writes into $OUT: device_all_log.txt (everything), device_all.json (each step's findings),
# device_all_summary.txt (one line per step), nvidia_smi.txt, bench_*.json. Exit 1 if a step failed.
set -u
cd "$(dirname "$0")/.."
DRY=0 ONLY_BENCH=0
for arg in "$@"; do
  case $arg in
    --dry-run) DRY=1 ;;
    --bench) ONLY_BENCH=1 ;;
    *) echo "usage: bash benchmarks/device_all.sh [--dry-run] [--bench]" >&2; exit 2 ;;
  esac
done
BUDGET_S=480 MIN_BOX_S=45
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null || DRY=1
if [ "$DRY" = 1 ]; then OUT="${OUT:-benchmarks/results/device_all_dryrun}"; else OUT="${OUT:-benchmarks/results/device_all}"; fi
[ "$DRY" = 1 ] && BUDGET_S=1800  # a CPU dry run is not held to the GPU call's 8 minutes
mkdir -p "$OUT"
LOG="$OUT/device_all_log.txt" JSON="$OUT/device_all.json" SUMMARY="$OUT/device_all_summary.txt"
: > "$LOG"; : > "$SUMMARY"; rm -f "$JSON"
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/vade-site .whl/*.whl >>"$LOG" 2>&1 \
    && export PYTHONPATH="/tmp/vade-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET
FAILED=0
START=$(date +%s)

step() {  # step NAME BOX_SECONDS COMMAND...: run in a time box, log it, one summary line
  local name=$1 box=$2 t0 rc status
  shift 2
  t0=$(date +%s)
  echo "=== $name (time box ${box} s, $(($(date +%s) - START)) s in)" | tee -a "$LOG"
  timeout -k 10 "$box" "$@" >>"$LOG" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status="TIMED OUT after ${box} s"; FAILED=1 ;;
    *) status="FAILED (exit $rc)"; FAILED=1 ;;
  esac
  tail -n 3 "$LOG" | sed 's/^/    /'
  printf '%-44s %-24s %4d s\n' "$name" "$status" "$(($(date +%s) - t0))" | tee -a "$SUMMARY"
}

skip() {  # skip NAME REASON
  printf '%-44s %-24s %s\n' "$1" "skipped" "($2)" | tee -a "$SUMMARY"
  echo "=== $1: skipped ($2)" >> "$LOG"
}

boxed() {  # boxed NAME MAX_BOX COMMAND...: a step in what is left of BUDGET_S, or skipped saying so
  local name=$1 box=$2 left
  shift 2
  left=$((BUDGET_S - 10 - ($(date +%s) - START)))
  [ "$left" -lt "$box" ] && box=$left
  if [ "$box" -lt "$MIN_BOX_S" ]; then skip "$name" "time budget: ${left} s left of ${BUDGET_S}"; return; fi
  step "$name" "$box" "$@"
}

PROBE=("$PY" benchmarks/device_probe.py --json "$JSON" --work /tmp/vade-device)

if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv > "$OUT/nvidia_smi.txt" 2>&1
fi
[ "$DRY" = 1 ] && echo "dry run: no CUDA device; CUDA steps are skipped" | tee -a "$LOG" "$SUMMARY"
step "1 versions, decoder choice" 20 "${PROBE[@]}" versions
VADE=("$PY" -m engine.cli)
if [ "$DRY" = 1 ]; then  # small, on the CPU: the steps' commands and outputs stay tested
  BENCH=("${VADE[@]}" bench --device cpu --images 16 --image-size 128 --sweep --sweep-max 10000 --json "$OUT/bench_cpu_dryrun.json")
  BENCH_DASK=("${VADE[@]}" bench --device cpu --workers 1 --images 16 --image-size 128 --no-baseline --json "$OUT/bench_workers1_dryrun.json")
else
  BENCH=("${VADE[@]}" bench --device cuda --decoder nvjpeg --images 1000 --image-size 512 --sweep --sweep-budget 40 --json "$OUT/bench_cuda.json")
  BENCH_DASK=("${VADE[@]}" bench --gpus 1 --device cuda --decoder nvjpeg --images 1000 --image-size 512 --no-baseline --json "$OUT/bench_gpus1.json")
fi

if [ "$ONLY_BENCH" = 1 ]; then
  boxed "6 vade bench$([ "$DRY" = 1 ] && echo ' (CPU, small)' || echo ' on CUDA (nvjpeg, bf16)')" 240 "${BENCH[@]}"
  boxed "7 vade bench --gpus 1$([ "$DRY" = 1 ] && echo ' (CPU: --workers 1)')" 150 "${BENCH_DASK[@]}"
  echo "total $(($(date +%s) - START)) s; results in $OUT" | tee -a "$SUMMARY"
  exit "$FAILED"
fi
step "2 decoder probe (EXIF 1..8, odd files)" 45 "${PROBE[@]}" decoders
if [ "$DRY" = 1 ]; then
  step "3a kernel tests (CPU interpreter)" 210 "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels_triton.py tests/test_kernels_gpu_paths.py
  step "3b sm_90 compile of the default launches" 90 "$PY" benchmarks/compile_sm90.py --quick --out "$OUT/compile_sm90_quick.json"
  skip "3c kernel tests compiled on the GPU" "no CUDA device"
else
  step "3 kernel tests compiled on the GPU" 210 "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels_triton.py
fi
if [ "$DRY" = 1 ]; then
  skip "4 coreset, kNN D=152 vs 160, 2^31, TF32" "no CUDA device"
else
  step "4 coreset, kNN D=152 vs 160, 2^31, TF32" 90 "${PROBE[@]}" kernels
fi
step "5 tiny fit + scan, CUDA vs CPU$([ "$DRY" = 1 ] && echo ' (CPU half)')" 105 "${PROBE[@]}" fitscan
boxed "6 vade bench$([ "$DRY" = 1 ] && echo ' (CPU, small)' || echo ' on CUDA (nvjpeg, bf16)')" 240 "${BENCH[@]}"
boxed "7 vade bench --gpus 1$([ "$DRY" = 1 ] && echo ' (CPU: --workers 1)')" 150 "${BENCH_DASK[@]}"
echo "total $(($(date +%s) - START)) s; results in $OUT" | tee -a "$SUMMARY"
exit "$FAILED"
