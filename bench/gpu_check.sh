#!/usr/bin/env bash
# One-shot GPU check on a bare machine with torch, nvcc and pytest but no network: build the
# extension in place for the visible card, count the shared-memory atomics in its machine
# code (when cuobjdump is there), run the CUDA tests and a few CPU smoke tests, the CUDA
# benchmark of the scan, the kernels of another commit when given (timed the same way,
# right after, so that a tight budget keeps it), an Nsight Compute profile of the kernels
# (when ncu is there), memcheck and racecheck on small shapes (when compute-sanitizer is
# there), the model benchmark, then build variants. About 8–10 minutes with everything;
# every stage runs under `timeout` inside one overall budget, so one hang cannot eat the
# rest. A short summary table is printed last.
#
#   bash bench/gpu_check.sh                 # from anywhere; logs in $OUT, else ./gpu_out
#
# Environment: OUT (log folder), GPU_CHECK_BUDGET (seconds for everything, default 480),
# GPU_CHECK_NCU_CASES (benchmark cases to profile, default "a c"),
# GPU_CHECK_SKIP_SANITIZER=1 (no compute-sanitizer runs),
# GPU_CHECK_PYTEST_ARGS (default "-x -q -rs": stop at the first CUDA failure),
# GPU_CHECK_VARIANTS (build variants of the kernels to time, see "tuning" below),
# GPU_CHECK_SKIP_MODEL=1 (no model benchmark), GPU_CHECK_SKIP_NCU=1 (no profile),
# GPU_CHECK_BASELINE (a source tree of another commit to build and time, default
# ./gpu_baseline when it exists; make it with
#   rm -rf gpu_baseline && mkdir gpu_baseline && git archive COMMIT | tar -x -C gpu_baseline
# and carry it to the device: it is git-ignored).
# At most 8 files are written to $OUT (the device tool returns no more).
set -u
cd "$(dirname "$0")/.."

OUT=${OUT:-./gpu_out}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.log"
: >"$SUMMARY"
BUDGET=${GPU_CHECK_BUDGET:-480}
DEADLINE=$(( $(date +%s) + BUDGET ))
PYTEST_ARGS=${GPU_CHECK_PYTEST_ARGS:-"-x -q -rs"}
STATUS=0
declare -a ROWS=()

export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export MAX_JOBS=${MAX_JOBS:-16}
export PATH="$CUDA_HOME/bin:$PATH"
# torch builds with ninja only when `ninja` is on PATH; the pip-installed one sits beside
# python3. Without it the build falls back to one file at a time.
PYBIN=$(dirname "$(python3 -c 'import sys; print(sys.executable)')")
export PATH="$PYBIN:$PATH"
export PYTHONUNBUFFERED=1

log() { echo "$*" | tee -a "$SUMMARY"; }

# run_stage NAME CAP_SECONDS LOGFILE COMMAND...: runs COMMAND under timeout (the smaller of
# CAP and what is left of the budget), output to LOGFILE; records status, time and a note.
run_stage() {
  local name=$1 cap=$2 logfile=$3; shift 3
  local left=$(( DEADLINE - $(date +%s) - 5 ))
  local limit=$(( cap < left ? cap : left ))
  if (( limit < 10 )); then
    ROWS+=("$(printf '%-14s %-8s %6s  %s' "$name" skipped - "out of time budget")")
    STATUS=1
    return 1
  fi
  log "== $name (limit ${limit}s): $*"
  local start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$logfile" 2>&1
  local rc=$?
  local took=$(( $(date +%s) - start ))
  local state=ok
  if (( rc == 124 || rc == 137 )); then state=TIMEOUT; STATUS=1
  elif (( rc != 0 )); then state="FAIL($rc)"; STATUS=1; fi
  # The note: pytest's summary line, else the log's last line.
  local note
  note=$(grep -E '^(=+ )?[0-9]+ (passed|failed|skipped|error)|no tests ran' "$logfile" | tail -1)
  [[ -z $note ]] && note=$(tail -1 "$logfile")
  ROWS+=("$(printf '%-14s %-8s %5ss  %s' "$name" "$state" "$took" "${note:0:90}")")
  log "   -> $state in ${took}s"
  return $rc
}

# ---------------------------------------------------------------------------- the machine
log "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap,clocks.max.sm \
  --format=csv 2>&1 | tee -a "$SUMMARY"
python3 -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.version.cuda, "available", torch.cuda.is_available())' 2>&1 | tee -a "$SUMMARY"
"$CUDA_HOME/bin/nvcc" --version | tail -2 | tee -a "$SUMMARY"
# The build's setuptools, for the record (pyproject needs >= 64).
python3 -c 'import setuptools; print("setuptools", setuptools.__version__)' 2>&1 | tee -a "$SUMMARY"
command -v ninja >/dev/null && log "ninja $(ninja --version)" || log "ninja: not found (slow build)"

# The card's compute capability, e.g. "9.0" (nvidia-smi, else torch).
ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' ')
if [[ -z $ARCH ]]; then
  ARCH=$(python3 -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$ARCH}
# The device image's default compiler (/opt/gcc/bin/g++, a wrapper) links libstdc++
# statically into the extension; every C++ exception (an argument error) then crashes the
# process. Build with the system g++ when there is one.
# The image sets CXX to that wrapper, so the system compiler is chosen whatever CXX says
# (GPU_CHECK_KEEP_CXX=1 keeps the environment's).
if [[ -z ${GPU_CHECK_KEEP_CXX:-} && -x /usr/bin/g++ ]]; then
  export CC=/usr/bin/gcc CXX=/usr/bin/g++ LDSHARED="/usr/bin/g++ -shared"
fi
log "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS CUDA_HOME=$CUDA_HOME CXX=${CXX:-}"

# ---------------------------------------------------------------------------- build
if ! run_stage build 300 "$OUT/build.log" env FORCE_CUDA=1 python3 setup.py build_ext --inplace; then
  log "build failed; last 60 lines of $OUT/build.log:"
  tail -60 "$OUT/build.log" | tee -a "$SUMMARY"
  printf '%s\n' "${ROWS[@]}"
  exit 1
fi
export PYTHONPATH=.
if ! python3 -c 'import coupled_mamba_ext as c, sys; i = c.build_info(); print(i);
sys.exit(0 if i["cuda"] else 1)' 2>&1 | tee -a "$SUMMARY"; then
  log "the build has no CUDA kernels (or does not import): stopping"
  printf '%s\n' "${ROWS[@]}"
  exit 1
fi

# ---------------------------------------------------------------------------- machine code
# What the shared-memory atomics of the kernels compile to for this card (a float add is a
# compare-and-swap loop, ATOMS.CAST.SPIN, with nvcc 13.0: docs/kernels.md; only the
# time-lanes backward has them): the forms of ATOMS in the built extension's SASS, counted.
if command -v cuobjdump >/dev/null; then
  run_stage sass 30 "${TMPDIR:-/tmp}/sass.log" bash -c \
    'cuobjdump --dump-sass coupled_mamba_ext/_C*.so | grep -oE "ATOMS(\.[A-Z0-9]+)*" | sort | uniq -c | tr -s " \n" " "; echo'
fi

# ---------------------------------------------------------------------------- tests
# shellcheck disable=SC2086  # PYTEST_ARGS is a list of flags
run_stage cuda-tests 260 "$OUT/pytest_cuda.log" python3 -m pytest tests -m cuda $PYTEST_ARGS \
  --durations=10
run_stage cpu-smoke 60 "$OUT/pytest_cpu.log" python3 -m pytest -q -m "not cuda" \
  tests/test_state_update.py tests/test_scan_errors.py \
  "tests/test_scan_forward.py::test_optional_arguments" \
  "tests/test_scan_gradients.py::test_gradients_optional_arguments"

# ---------------------------------------------------------------------------- benchmarks
run_stage bench-scan 200 "$OUT/bench_scan.log" python3 bench/bench_scan.py --device cuda \
  --json "$OUT/bench_scan.json"
# Another commit's kernels, built in their own tree and timed in this run, so that a kernel
# change is measured against its predecessor on the same card (bf16, no reference loop).
BASELINE=${GPU_CHECK_BASELINE:-}
[[ -z $BASELINE && -f gpu_baseline/setup.py ]] && BASELINE=gpu_baseline
BASELINE_TABLE=""
if [[ -n $BASELINE ]]; then
  blog="${TMPDIR:-/tmp}/baseline.log"
  if run_stage baseline 150 "$blog" bash -c "cd '$BASELINE' && FORCE_CUDA=1 python3 setup.py \
      build_ext --inplace >/dev/null && PYTHONPATH=. python3 bench/bench_scan.py --device cuda \
      --dtype bfloat16 --no-reference"; then
    BASELINE_TABLE=$'\n'"baseline ${BASELINE}:"$'\n'
    BASELINE_TABLE+=$(sed -n '/^shape /,/^copy bandwidth/p' "$blog")$'\n'
  fi
fi

# Nsight Compute on one forward and one backward launch per case (GPU_CHECK_NCU_CASES,
# default "a c": the short and the long regime), bf16: where the time goes (throughput
# against the peaks, occupancy, what warps stall on). One log for all cases.
if command -v ncu >/dev/null && [[ -z ${GPU_CHECK_SKIP_NCU:-} ]]; then
  run_stage ncu 150 "$OUT/ncu.log" bash -c 'for case in '"${GPU_CHECK_NCU_CASES:-a c}"'; do
    ncu -k regex:coupled_scan --launch-skip 2 --launch-count 2 --clock-control none \
      --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
      --section SchedulerStats --section MemoryWorkloadAnalysis_Tables \
      python3 bench/profile_scan.py --case "$case" || exit 1
  done'
fi
# Out-of-bounds accesses and shared-memory races, small shapes, both mappings
# (after the benchmarks: the sanitizers slow everything down, and a tight budget skips them).
if command -v compute-sanitizer >/dev/null && [[ -z ${GPU_CHECK_SKIP_SANITIZER:-} ]]; then
  for tool in memcheck racecheck; do
    tlog="${TMPDIR:-/tmp}/$tool.log"
    # Only 8 files come back from $OUT: on a failure the first reports go to the summary.
    if ! run_stage "$tool" 90 "$tlog" compute-sanitizer --tool "$tool" --error-exitcode 1 \
        python3 bench/sanitize_scan.py; then
      grep -m 12 -E "^========= [A-Z]" "$tlog" | tee -a "$SUMMARY"
    fi
  done
fi

if [[ -z ${GPU_CHECK_SKIP_MODEL:-} ]]; then
  # Its log and figures stay behind (only 8 files come back from $OUT); the JSON has it all.
  run_stage bench-model 120 "${TMPDIR:-/tmp}/bench_model.log" python3 bench/bench_model.py \
    --device cuda --json "$OUT/bench_model.json" --out "${TMPDIR:-/tmp}/bench_model_out"
fi

# ---------------------------------------------------------------------------- tuning
# Build-time knobs of the kernels (macros; see the .cu files): each variant, a comma-separated
# list of NAME=VALUE, is rebuilt (NVCC_APPEND_FLAGS) and timed alone (bf16, no reference:
# state and time lanes side by side); its table goes to the summary. Last, because the
# in-place build is then the last variant's. The default times two state-lanes forwards
# against the built default (256 threads, at least 2 blocks per multiprocessor): at least 3
# blocks (80 registers: 50 % more resident warps; 4 and 88 bytes spilled with 4 and 8
# states per lane), and blocks of 128 threads, at least 4 of them (the same warps per
# multiprocessor in smaller blocks: more blocks where rows are few). GPU_CHECK_VARIANTS=""
# skips this; e.g. "COUPLED_MAMBA_BWD_THREADS=128,COUPLED_MAMBA_BWD_MIN_BLOCKS=3" times the
# time-lanes backward's block shape.
VARIANT_TABLES=""
VARIANTS=${GPU_CHECK_VARIANTS-COUPLED_MAMBA_FWD_LANE_MIN_BLOCKS=3 COUPLED_MAMBA_FWD_LANE_THREADS=128,COUPLED_MAMBA_FWD_LANE_MIN_BLOCKS=4}
for variant in $VARIANTS; do
  flags="-D${variant//,/ -D}"
  touch csrc/cuda/*.cu
  vlog="${TMPDIR:-/tmp}/variant_${variant//[^A-Za-z0-9_]/_}.log"
  if run_stage "variant" 150 "$vlog" env FORCE_CUDA=1 NVCC_APPEND_FLAGS="$flags" \
      bash -c 'python3 setup.py build_ext --inplace >/dev/null && python3 bench/bench_scan.py --device cuda --dtype bfloat16 --no-reference'; then
    VARIANT_TABLES+=$'\n'"variant ${flags}:"$'\n'
    VARIANT_TABLES+=$(sed -n '/^shape /,/^copy bandwidth/p' "$vlog")$'\n'
  fi
done

# ---------------------------------------------------------------------------- summary
{
  echo
  if grep -q '^shape' "$OUT/bench_scan.log" 2>/dev/null; then
    echo "bench_scan (from $OUT/bench_scan.log):"
    sed -n '/^coupled_mamba_ext .*load average/,$p' "$OUT/bench_scan.log"
    echo
  fi
  [[ -n $BASELINE_TABLE ]] && echo "$BASELINE_TABLE"
  [[ -n $VARIANT_TABLES ]] && echo "$VARIANT_TABLES"
  echo "gpu_check: $(date '+%F %T'), $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), archs $TORCH_CUDA_ARCH_LIST, logs in $OUT"
  printf '%-14s %-8s %6s  %s\n' stage status time note
  printf '%s\n' "${ROWS[@]}"
} | tee -a "$SUMMARY"
exit $STATUS
