#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU and a CUDA build of torch, build pyengine for this GPU, run the
# CUDA tests, run them again under compute-sanitizer memcheck, and benchmark on cuda; a short table comes last.
# Meant to finish within 8 minutes. Results (and logs) go to ${OUT:-gpu-check}/.
#   bash benchmarks/gpu_check.sh            (PYTHON=... to pick the interpreter that has torch)
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
out=${OUT:-gpu-check}
mkdir -p "$out"
status=0
step() { echo; echo "== $1 ($(date +%T))"; }

step "GPU and toolchain"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$py -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())"

step "build (CUDA kernels for this GPU)"
export PYENGINE_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
if ! timeout 300 $py setup.py build_ext --inplace > "$out/build.log" 2>&1; then
  grep -E "error|Error" "$out/build.log" | head -40; echo "build failed: see $out/build.log"; exit 1
fi
grep -iE "spill|warning" "$out/build.log" | grep -v "torch/include" | head -20
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
$py -m pyengine info | tee "$out/info.txt"

step "CUDA tests"
timeout 240 $py -m pytest tests -q -x -k "cuda" -p no:cacheprovider 2>&1 | tee "$out/tests.log" | tail -25
[ "${PIPESTATUS[0]}" = 0 ] || status=1

step "CUDA tests under compute-sanitizer memcheck"
if command -v compute-sanitizer > /dev/null; then
  timeout 300 compute-sanitizer --tool memcheck --error-exitcode 99 --print-limit 20 \
    $py -m pytest tests -q -x -k "cuda-cuda and not gradcheck" -p no:cacheprovider > "$out/memcheck.log" 2>&1
  rc=$?
  grep -E "ERROR SUMMARY|Invalid|passed|failed" "$out/memcheck.log" | tail -8
  [ $rc = 0 ] || { status=1; echo "memcheck exit code $rc: see $out/memcheck.log"; }
else
  echo "compute-sanitizer not found: skipped"
fi

step "benchmark on cuda"
timeout 240 $py -m pyengine bench --device cuda --quick --out "$out/bench" > "$out/bench.log" 2>&1 || status=1
tail -60 "$out/bench.log"

step "summary"
grep -E "passed|failed" "$out/tests.log" | tail -1
grep -E "ERROR SUMMARY" "$out/memcheck.log" 2>/dev/null | tail -1
[ -f "$out/bench/results.md" ] && cat "$out/bench/results.md" | head -60
exit $status
