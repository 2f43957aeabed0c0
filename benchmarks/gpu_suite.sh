#!/usr/bin/env bash
# The GPU suite: installs the project on the device machine, runs every test marked `gpu` and the
# benchmarks, and writes logs and JSON under $OUT (default benchmarks/results/). One call, one run.
#
# Usage: bash benchmarks/gpu_suite.sh [pytest paths...]     (default: tests)
set -uo pipefail
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PAGEDLLM_COMMIT="${PAGEDLLM_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
status=0
tests=("${@:-tests}")
python3 -m pytest "${tests[@]}" -m gpu -q -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -15 || status=1
for bench in ${BENCHES:-pager_transfers}; do
  echo "== bench_$bench"
  python3 -m "benchmarks.bench_$bench" --out "$OUT/$bench.json" 2>&1 | tee "$OUT/bench_$bench.log" | tail -20 || status=1
done
exit $status
