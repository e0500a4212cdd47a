#!/bin/bash
# The check for the day a GPU is lent (under 10 minutes), from the repository root:
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine (a venv with jax[cuda13])
#   bash benchmarks/gpu_check.sh --dry      # here, on the CPU: every stage, tiny sizes
#
# 1. what JAX runs on (the run's first line) and nvidia-smi;
# 2. the fast tests on the GPU (make test-fast's selection, at most 150 s);
# 3. MBCliqueNet CIFAR-10 and CliqueNet k=36 train steps in float32 and bfloat16: measured
#    images/s and MFU beside the roofline estimate of the same program
#    (benchmarks/gpu_check.py);
# 4. the host benchmark (benchmarks/bench_host.py --quick).
# Results go to $OUT (default runs/gpu_check/); record them in benchmarks/README.md.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
OUT=${OUT:-runs/gpu_check}
DRY=0; [ "${1:-}" = "--dry" ] && DRY=1
mkdir -p "$OUT"
status=0
stage() { echo; echo "== $* ($(date -u +%H:%M:%S))"; }

stage "1. devices"
$PY -c 'from cliquejax import platform; info = platform.runtime()
print(platform.runtime_line(info)); print(platform.cpu_fallback(info) or "no CPU fallback")' \
  | tee "$OUT/devices.txt"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
  --format=csv | tee -a "$OUT/devices.txt"

stage "2. fast tests"
if [ $DRY = 1 ]; then tests="tests/test_hlo.py tests/test_targets.py"; else tests=tests; fi
timeout 150 $PY -m pytest -q -x -m "not slow" -p no:cacheprovider $tests \
  > "$OUT/tests.txt" 2>&1; rc=$?
tail -3 "$OUT/tests.txt"; [ $rc = 0 ] || { echo "tests: exit $rc (124: over 150 s)"; status=1; }

stage "3. steps: measured and roofline"
if [ $DRY = 1 ]; then
  # the code path only, one model (the other builds the same way)
  args="--models mbclique_cifar10 --batch 8 --steps 1 --warmup 0 --target h100"
else
  args="--steps 20 --warmup 5 --budget_s 20"
fi
timeout 330 $PY benchmarks/gpu_check.py $args --json "$OUT/steps.json" \
  | tee "$OUT/steps.txt" || status=1

stage "4. host"
if [ $DRY = 1 ]; then
  echo "skipped in --dry (bench_host.py --quick takes minutes on a shared CPU)"
else
  timeout 90 $PY benchmarks/bench_host.py --quick --out "$OUT/bench_host.json" \
    | tee "$OUT/host.txt" || status=1
fi
stage "done: $OUT (exit $status)"
exit $status
