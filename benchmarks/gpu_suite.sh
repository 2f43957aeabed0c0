#!/usr/bin/env bash
# The GPU suite: installs the project on the device machine, runs every test marked `gpu` and the
# benchmarks, and writes logs and JSON under $OUT (default benchmarks/results/). One call, one run.
#
#   PAGEDLLM_COMMIT=$(git rev-parse HEAD) bash benchmarks/gpu_suite.sh [pytest args...]
#   BENCHES="pager_transfers paged_attention" bash benchmarks/gpu_suite.sh     (a subset)
#   TESTS=none SWEEPS=none bash benchmarks/gpu_suite.sh                         (benchmarks only)
#   TESTS=none BENCHES=none SWEEP_SHARDS=8 bash benchmarks/gpu_suite.sh         (the sweeps only)
#   TEST_SHARDS=3 SWEEPS=none BENCHES=none bash benchmarks/gpu_suite.sh          (the tests only, 3 at once)
#
# The device machine's copy of the tree may lack .git: pass the commit in PAGEDLLM_COMMIT.
# Each phase has a time limit, so one runaway phase cannot take the others' results with it.
set -uo pipefail
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -z "${PAGEDLLM_COMMIT:-}" ]; then  # "-dirty" where the tree has uncommitted changes
  PAGEDLLM_COMMIT="$(git rev-parse HEAD 2>/dev/null | head -1)"
  [ -n "$PAGEDLLM_COMMIT" ] && ! git diff --quiet HEAD -- 2>/dev/null && PAGEDLLM_COMMIT+=-dirty
fi
export PAGEDLLM_COMMIT="${PAGEDLLM_COMMIT:-unknown}"
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v -i "warning\|!!\|\*\*\*\|^ *$" | tail -2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
echo "commit $PAGEDLLM_COMMIT"
status=0
if [ "${TESTS:-all}" != "none" ]; then
  # TEST_SHARDS pytest processes at once (PAGEDLLM_TEST_SHARD=i/n, tests/conftest.py): the suite
  # takes about 5 minutes in one process, mostly host time and Triton compiles.
  test_shards="${TEST_SHARDS:-1}"
  test_dir="$(mktemp -d)"
  for ((shard = 0; shard < test_shards; shard++)); do
    PAGEDLLM_TEST_SHARD="$shard/$test_shards" timeout "${TEST_LIMIT_S:-300}" \
      python3 -m pytest "${@:-tests}" -m "gpu and not sweep" -q -p no:cacheprovider --durations=5 \
      > "$test_dir/$shard.log" 2>&1 &
  done
  wait
  for ((shard = 0; shard < test_shards; shard++)); do
    echo "== test shard $shard/$test_shards"
    cat "$test_dir/$shard.log"
    summary="$(tail -1 "$test_dir/$shard.log")"   # pytest's last line: "N passed, ... in Ts" or "N failed, ..."
    [[ "$summary" == *" passed"* && "$summary" != *failed* && "$summary" != *error* ]] || status=1
  done > "$OUT/gpu_tests.log"
  grep -h '^== \|passed\|failed\|error' "$OUT/gpu_tests.log" | tail -20
fi
if [ "${SWEEPS:-all}" != "none" ]; then
  # The CUDA sweeps of torch's OpInfo and ModuleInfo databases (torch.testing._internal needs
  # expecttest, which the GPU machine lacks: carry its wheel, see the device tool's README). They are
  # bound by host time, so each runs as SWEEP_SHARDS processes at once on the one GPU
  # (PAGEDLLM_SWEEP_SHARD=i/n), every process its own log, gathered into gpu_sweeps.log.
  shards="${SWEEP_SHARDS:-4}"
  shard_dir="$(mktemp -d)"
  for sweep in tests/test_torch_opinfo.py::test_gpu_every_op_matches_the_dense_op_on_cuda \
               tests/test_torch_opinfo.py::test_gpu_every_op_backward_matches_the_dense_op_on_cuda \
               tests/test_torch_opinfo.py::test_gpu_every_op_past_the_tier_matches_the_dense_op_on_cuda \
               tests/test_torch_opinfo.py::test_gpu_every_op_out_and_in_place_matches_the_dense_op_on_cuda \
               tests/test_torch_modules.py::test_gpu_every_module_with_paged_parameters_matches_the_dense_module_on_cuda; do
    for ((shard = 0; shard < shards; shard++)); do
      OMP_NUM_THREADS=1 PAGEDLLM_SWEEP_SHARD="$shard/$shards" timeout "${SWEEP_LIMIT_S:-540}" \
        python3 -m pytest "$sweep" -m "gpu and sweep" -s -q -p no:cacheprovider -p no:warnings \
        > "$shard_dir/${sweep##*::}_$shard.log" 2>&1 &
    done
  done
  wait
  for log in "$shard_dir"/*.log; do
    echo "== $(basename "$log" .log)"
    grep -v '^\s*$' "$log" | grep -v '^E  \|^\(tests\|[a-z_/.]*\.py\):[0-9]' | tail -60
    grep -q ' passed' "$log" || status=1
  done > "$OUT/gpu_sweeps.log"
  grep -h '^== \|passed\|failed\|sweep failure' "$OUT/gpu_sweeps.log" | tail -60
fi
[ "${BENCHES:-}" = none ] && exit $status
for bench in ${BENCHES:-pager_transfers paged_attention dispatch_overhead host_sum pieces paged_load long_context}; do
  echo "== bench_$bench"
  limit="${BENCH_LIMIT_S:-150}"
  [ "$bench" = long_context ] && limit="${LONG_CONTEXT_LIMIT_S:-600}"   # 8K, 32K, 64K with every baseline: ~6 min
  timeout "$limit" python3 -m "benchmarks.bench_$bench" --out "$OUT/$bench.json" 2>&1 \
    | tail -14 || status=1   # the JSON holds the results; the device returns at most 8 files
done
exit $status
