#!/usr/bin/env bash
# The GPU suite: installs the project on the device machine, runs every test marked `gpu` and the
# benchmarks, and writes logs and JSON under $OUT (default benchmarks/results/). One call, one run.
#
#   PAGEDLLM_COMMIT=$(git rev-parse HEAD) bash benchmarks/gpu_suite.sh [pytest args...]
#   BENCHES="pager_transfers paged_attention" bash benchmarks/gpu_suite.sh     (a subset)
#   TESTS=none SWEEPS=none bash benchmarks/gpu_suite.sh                         (benchmarks only)
#
# The device machine's copy of the tree may lack .git: pass the commit in PAGEDLLM_COMMIT.
# Each phase has a time limit, so one runaway phase cannot take the others' results with it.
set -uo pipefail
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PAGEDLLM_COMMIT="${PAGEDLLM_COMMIT:-$(git rev-parse HEAD 2>/dev/null | head -1)}"
: "${PAGEDLLM_COMMIT:=unknown}"
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v -i "warning\|!!\|\*\*\*\|^ *$" | tail -2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
echo "commit $PAGEDLLM_COMMIT"
status=0
if [ "${TESTS:-all}" != "none" ]; then
  timeout "${TEST_LIMIT_S:-300}" python3 -m pytest "${@:-tests}" -m "gpu and not sweep" -q -p no:cacheprovider 2>&1 \
    | tee "$OUT/gpu_tests.log" | tail -8 || status=1
fi
if [ "${SWEEPS:-all}" != "none" ]; then
  # The CUDA sweeps of torch's OpInfo and ModuleInfo databases (torch.testing._internal needs
  # expecttest, which the GPU machine lacks: carry its wheel, see the device tool's README).
  timeout "${SWEEP_LIMIT_S:-540}" python3 -m pytest tests/test_torch_opinfo.py tests/test_torch_modules.py -m "gpu and sweep" \
    -q -p no:cacheprovider 2>&1 | tee "$OUT/gpu_sweeps.log" | tail -8 || status=1
fi
for bench in ${BENCHES:-pager_transfers paged_attention dispatch_overhead host_sum pieces long_context}; do
  echo "== bench_$bench"
  limit="${BENCH_LIMIT_S:-150}"
  [ "$bench" = long_context ] && limit="${LONG_CONTEXT_LIMIT_S:-600}"   # 8K, 32K, 64K with every baseline: ~6 min
  timeout "$limit" python3 -m "benchmarks.bench_$bench" --out "$OUT/$bench.json" 2>&1 \
    | tail -14 || status=1   # the JSON holds the results; the device returns at most 8 files
done
exit $status
