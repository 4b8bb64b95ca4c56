#!/usr/bin/env bash
# The GPU check, one call on a machine with an NVIDIA GPU and a CUDA build of torch (sized for the lent H200:
# 16 cores, no network, 6 minutes in all with the build): build pyengine for the visible GPU only, run the CUDA
# tests in parallel, compute-sanitizer memcheck over a subset that reaches every kernel and dtype family,
# racecheck over one GEMM and one row reduction, the CUDA benchmark, and a summary. Every step runs under its own
# timeout (150 + 75 + 60 + 30 + 45 s at most), so a hang costs only that step. At most 8 files land in
# ${OUT:-gpu-check}/, none in a subfolder: summary.txt, build.log, tests.log, memcheck.log, racecheck.log,
# bench.log, bench-results.md, bench-results.json.
#   bash benchmarks/gpu_check.sh                   everything
#   bash benchmarks/gpu_check.sh --only tests,memcheck   the build, then the steps named
#   bash benchmarks/gpu_check.sh --dry-run         without a GPU (CI runs it): the script parses, every test
#                                                  selection below selects tests, the build command is well formed
# PYTHON picks the interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
out=${OUT:-gpu-check}
steps="tests,memcheck,racecheck,bench"
dry=0
while [ $# -gt 0 ]; do
  case "$1" in
    --only) steps=$2; shift 2 ;;
    --dry-run) dry=1; shift ;;
    *) echo "usage: $0 [--only STEP[,STEP]] [--dry-run]   steps: $steps"; exit 2 ;;
  esac
done

# What each test step selects (pytest -k expressions over tests/); --dry-run checks each selects something.
TESTS_K="cuda"
MEMCHECK_K="cuda-cuda and not gradcheck and (special_values or half_precision or (layouts_and_sizes and 129) \
or every_gradient or edge_cases or (forward_backward_match_torch and 33 and dtype1))"
RACECHECK_K="cuda-cuda and ((layouts_and_sizes and 129 and contiguous-contiguous and (float16 or float32)) \
or (cross_entropy and half_precision and bfloat16 and none))"
BUILD=(env PYENGINE_CUDA=1 MAX_JOBS="$(nproc)" "$py" -m pip install -q --no-build-isolation --no-deps -e .)

selects() {  # selects NAME EXPR: pytest collects at least one test for EXPR
  local n
  n=$("$py" -m pytest tests -q --collect-only -p no:cacheprovider -k "$2" 2>/dev/null | grep -c "::")
  echo "  $1: $n tests"
  [ "$n" -gt 0 ]
}

if [ $dry = 1 ]; then
  ok=0
  bash -n "$0" || ok=1
  for s in ${steps//,/ }; do
    case "$s" in tests|memcheck|racecheck|bench) ;; *) echo "unknown step $s"; ok=1 ;; esac
  done
  selects tests "$TESTS_K" || ok=1
  selects memcheck "$MEMCHECK_K" || ok=1
  selects racecheck "$RACECHECK_K" || ok=1
  "$py" -m pip --version > /dev/null || { echo "pip is missing: ${BUILD[*]}"; ok=1; }
  [ -f setup.py ] && [ -f pyproject.toml ] || { echo "no setup.py/pyproject.toml to build"; ok=1; }
  "$py" -m pyengine bench --help > /dev/null || { echo "pyengine bench does not start"; ok=1; }
  echo "build: TORCH_CUDA_ARCH_LIST=<from the GPU> ${BUILD[*]}"
  [ $ok = 0 ] && echo "dry run: OK" || echo "dry run: FAILED"
  exit $ok
fi

mkdir -p "$out"
summary="$out/summary.txt"
: > "$summary"
status=0
note() { echo "$*" | tee -a "$summary"; }
step() { echo; echo "== $1 ($(date +%T))"; }
want() { [[ ",$steps," == *",$1,"* ]]; }

step "GPU and toolchain"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$py" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())"
} 2>&1 | tee -a "$summary"

step "build (CUDA kernels for this GPU only)"
arch=$("$py" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
start=$SECONDS
if ! TORCH_CUDA_ARCH_LIST=$arch timeout 150 "${BUILD[@]}" > "$out/build.log" 2>&1; then
  grep -E "error|Error" "$out/build.log" | head -40
  note "build for sm_${arch/./}: FAILED after $((SECONDS - start)) s (build.log)"
  exit 1
fi
note "build for sm_${arch/./}: $((SECONDS - start)) s"
"$py" -m pyengine info --check 2>&1 | tee -a "$summary" || status=1

if want tests; then
  step "CUDA tests, 8 processes"
  timeout 75 "$py" -m pytest tests -q -n 8 -k "$TESTS_K" -p no:cacheprovider > "$out/tests.log" 2>&1
  rc=$?
  tail -25 "$out/tests.log"
  note "tests: $(grep -E "passed|failed" "$out/tests.log" | tail -1) (exit $rc)"
  [ $rc = 0 ] || status=1
fi

sanitize() {  # sanitize TOOL SECONDS K_EXPR SHOWN: pytest's selection under compute-sanitizer --tool TOOL
  timeout "$2" compute-sanitizer --tool "$1" --error-exitcode 99 --print-limit 20 \
    "$py" -m pytest tests -q -k "$3" -p no:cacheprovider > "$out/$1.log" 2>&1
  local rc=$?
  grep -E "$4|passed|failed" "$out/$1.log" | tail -8
  note "$1: $(grep -E "SUMMARY" "$out/$1.log" | tail -1); $(grep -E "passed|failed" "$out/$1.log" | tail -1) (exit $rc)"
  [ $rc = 0 ] || status=1
}

if want memcheck; then
  step "compute-sanitizer memcheck (a subset reaching every kernel and dtype family)"
  sanitize memcheck 60 "$MEMCHECK_K" "ERROR SUMMARY|Invalid"
fi

if want racecheck; then
  step "compute-sanitizer racecheck (one GEMM in float16 and float32, one row reduction)"
  sanitize racecheck 30 "$RACECHECK_K" "SUMMARY|hazard"
fi

if want bench; then
  step "benchmark on cuda"
  bench_dir=$(mktemp -d)
  timeout 45 "$py" -m pyengine bench --device cuda --quick --out "$bench_dir" > "$out/bench.log" 2>&1 || status=1
  tail -40 "$out/bench.log"
  for f in results.md results.json; do [ -f "$bench_dir/$f" ] && cp "$bench_dir/$f" "$out/bench-$f"; done
  note "bench: $([ -f "$out/bench-results.md" ] && echo "bench-results.md, bench-results.json" || echo "no results")"
fi

step "summary"
cat "$summary"
exit $status
