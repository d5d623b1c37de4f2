#!/usr/bin/env bash
# One command for a GPU machine: the CUDA tests, then the streaming benchmark at the sizes of
# the H100 anchors in benchmarks/RESULTS.md, in bf16 and fp32, then the slide data path and
# one real training step on a slide file, with a short table last.
#
# Needs a python3 with torch (and numpy) that sees a CUDA device; steps 6-7 also need the
# project's slide dependencies (tifffile, imagecodecs; openslide-python for step 6) and are
# skipped with a message without them. No network, nothing installed from this repository.
# Run from the repository root:
#
#     PYTHONPATH=. bash benchmarks/gpu_check.sh                # ~5-8 minutes on an H100, then 6-7 if time is left
#     PYTHONPATH=. bash benchmarks/gpu_check.sh --data-only    # steps 6-7 alone, ~3-5 minutes
#     PYTHONPATH=. bash benchmarks/gpu_check.sh --with-65536   # adds 65536^2 streamed (bf16), ~3 more
#
# Steps (each under `timeout`, so that steps 1-4 stay within ~8 minutes; a step that times
# out is reported and the next one runs):
#   1. python3 -m pytest tests -q -k cuda      (skipped with a message without pytest/hypothesis)
#   2. bf16: 8192^2 plain vs streamed tile 5760; 16384^2 and 32768^2 streamed tile 5760
#   3. fp32: the same
#   4. fp32: tile 2880 at 8192^2 and 16384^2 (the anchors' second lightstream column), if time allows
#   5. with --with-65536: bf16, 65536^2 streamed, tile 5760
#   6. bench_data.py --device cuda: writes the synthetic 32768^2 JPEG TIFF once (~15 s, one
#      core) to the system's temporary folder, then the reader rates with 1 and all cores, the
#      augmentation alone, one step's data work (8192^2 crop, tiles 5760 / 2880) with the
#      augmentation and normalisation on the GPU, and the extrapolated 65536^2 host share
#   7. bench_train_step.py --device cuda: one bf16 training step, width 64, tiles 5760 / 2880,
#      on the 16384^2 crop (0.5 um/px) of the 32768^2 slide file of step 6, split into its parts
# Steps 6-7 run only while they fit in TOTAL_S seconds from the start (default 570, so that a
# 10-minute slot holds the whole run); --data-only skips steps 1-5.
# Logs go to $LOG_DIR (default /tmp/gpu_check.<date>); PYTHON overrides python3.

set -u

PY=${PYTHON:-python3}
LOG_DIR=${LOG_DIR:-/tmp/gpu_check.$(date +%Y%m%d-%H%M%S)}
BUDGET_S=${BUDGET_S:-480}  # step 4 runs only if it fits in this many seconds from the start
TOTAL_S=${TOTAL_S:-570}    # steps 6-7 run only if they fit in this many seconds from the start
WITH_65536=0
DATA_ONLY=0
for arg in "$@"; do
    case "$arg" in
        --with-65536) WITH_65536=1 ;;
        --data-only) DATA_ONLY=1 ;;
        -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
        *) echo "unknown argument: $arg (try --help)" >&2; exit 2 ;;
    esac
done

mkdir -p "$LOG_DIR"
START=$(date +%s)
SUMMARY=()

stamp() { echo "[$(date +%H:%M:%S) +$(( $(date +%s) - START ))s] $*"; }

# run_step NAME TIMEOUT_S CMD...: run CMD under timeout, log to $LOG_DIR/NAME.log, record the outcome.
run_step() {
    local name=$1 limit=$2
    shift 2
    local log="$LOG_DIR/$name.log" t0 rc
    t0=$(date +%s)
    stamp "start $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
    rc=$?
    local took=$(( $(date +%s) - t0 ))
    case $rc in
        0) SUMMARY+=("$name: ok (${took}s)") ;;
        124|137) SUMMARY+=("$name: TIMED OUT after ${limit}s (partial log: $log)") ;;
        *) SUMMARY+=("$name: exit $rc (${took}s, log: $log)") ;;
    esac
    stamp "end $name: exit $rc after ${took}s"
    tail -n 3 "$log" | sed 's/^/    /'
    return 0
}

time_left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
total_left() { echo $(( TOTAL_S - ($(date +%s) - START) )); }

# run_if_time NAME TIMEOUT_S CMD...: run_step if TIMEOUT_S fits in what is left of TOTAL_S.
run_if_time() {
    if [ "$(total_left)" -ge "$2" ]; then
        run_step "$@"
    else
        SUMMARY+=("$1: SKIPPED (time budget: $(total_left)s of TOTAL_S left, needs $2s; try --data-only)")
    fi
}

# --------------------------------------------------------------------------- environment
stamp "gpu_check: logs in $LOG_DIR"
if ! "$PY" -c 'import torch, numpy' 2>/dev/null; then
    echo "$PY cannot import torch and numpy; nothing to check" >&2
    exit 1
fi
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "torch sees no CUDA device; this script is for a GPU machine" >&2
    exit 1
fi
"$PY" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, {p.name}, {p.total_memory / 2**30:.0f} GiB")' | tee "$LOG_DIR/env.log"
timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader >>"$LOG_DIR/env.log" 2>&1 || true

# --------------------------------------------------------------------------- 1. tests
if [ "$DATA_ONLY" = 1 ]; then
    SUMMARY+=("steps 1-5 (tests, bench_streaming): SKIPPED (--data-only)")
elif "$PY" -c 'import pytest, hypothesis' 2>/dev/null; then
    run_step tests_cuda 100 "$PY" -m pytest tests -q -k cuda -p no:cacheprovider
    if grep -q "no tests ran\|deselected" "$LOG_DIR/tests_cuda.log" && ! grep -q " passed" "$LOG_DIR/tests_cuda.log"; then
        SUMMARY+=("tests_cuda: note: no test matched -k cuda")
    fi
else
    stamp "pytest or hypothesis missing: CUDA tests skipped"
    SUMMARY+=("tests_cuda: SKIPPED (pytest/hypothesis not importable)")
fi

# --------------------------------------------------------------------------- 2-5. benchmarks
BENCH=("$PY" benchmarks/bench_streaming.py --device cuda --repeat 2)
if [ "$DATA_ONLY" = 0 ]; then
    run_step bench_bf16 140 "${BENCH[@]}" --dtype bf16 --sizes 8192,16384,32768 --tiles 5760 --plain-max 8192
    run_step bench_fp32 160 "${BENCH[@]}" --dtype fp32 --sizes 8192,16384,32768 --tiles 5760 --plain-max 8192
    if [ "$(time_left)" -gt 80 ]; then
        run_step bench_fp32_tile2880 80 "${BENCH[@]}" --dtype fp32 --sizes 8192,16384 --tiles 2880 --plain-max 8192
    else
        SUMMARY+=("bench_fp32_tile2880: SKIPPED (time budget)")
    fi
    if [ "$WITH_65536" = 1 ]; then
        run_step bench_bf16_65536 300 "${BENCH[@]}" --dtype bf16 --sizes 65536 --tiles 5760 --plain-max 0 --calibrate 8192
    fi
fi

# --------------------------------------------------------------------------- 6-7. data path, training step
if "$PY" -c 'import tifffile, imagecodecs, torch_impl.pipeline.train' 2>/dev/null; then
    if "$PY" -c 'import openslide' 2>/dev/null; then
        run_if_time bench_data 180 "$PY" benchmarks/bench_data.py --size 32768 --device cuda
    else
        SUMMARY+=("bench_data: SKIPPED (openslide not importable); bench_train_step writes the slide itself")
    fi
    run_if_time bench_train_step_cuda 150 "$PY" benchmarks/bench_train_step.py --device cuda --width 64 --dtype bf16 \
        --tile 5760 --backward-tile 2880 --size 32768 --crop 16384 --repeat 1
else
    stamp "tifffile, imagecodecs or torch_impl's dependencies missing (PYTHONPATH=. ?): steps 6-7 skipped"
    SUMMARY+=("bench_data, bench_train_step_cuda: SKIPPED (tifffile/imagecodecs/torch_impl not importable)")
fi

# --------------------------------------------------------------------------- summary
echo
echo "=================== gpu_check summary ($(( $(date +%s) - START ))s) ==================="
cat "$LOG_DIR/env.log"
printf '%s\n' "${SUMMARY[@]}"
for log in "$LOG_DIR"/bench_*.log; do
    [ -e "$log" ] || continue
    echo
    echo "### $(basename "$log" .log)"
    if grep -q '^## ' "$log"; then
        sed -n '/^## /,$p' "$log"  # the benchmark's final table and its tile shapes
    elif grep -q '^slide .*um/px' "$log"; then
        sed -n '/^slide .*um\/px/,$p' "$log"  # bench_data.py's table
    else
        grep -E ' step | OOM| skipped' "$log" || echo "(no result lines; see $log)"  # progress lines
    fi
done
