#!/usr/bin/env bash
# On a CUDA machine: the GPU property tests (hypothesis: the CUDA pager's state machines and tier
# properties, random programs of ops on CUDA PagedTensors) again and again under fresh seeds,
# FUZZ_PROCS pytest processes at once on the one GPU, until FUZZ_SECONDS have passed. Each run is
# the suite's own tests (tests/conftest.py keeps the hypothesis tests with PAGEDLLM_PROPERTY_TESTS_ONLY=1),
# so a seed that fails here fails `pytest --hypothesis-seed=SEED` anywhere with a CUDA device.
#
#   FUZZ_SECONDS=400 FUZZ_PROCS=4 PAGEDLLM_COMMIT=$(git rev-parse HEAD) OUT=$OUT bash benchmarks/gpu_fuzz.sh
#
# Writes $OUT/gpu_fuzz.log: the commit, then one line a run (process, seed, exit status, pytest's
# last line; a run the time limit cut short says so and counts as neither), then the whole output of
# every failing run. Exits 1 if any run failed.
set -uo pipefail
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PAGEDLLM_PROPERTY_TESTS_ONLY=1
export PAGEDLLM_COMMIT="${PAGEDLLM_COMMIT:-$(git rev-parse HEAD 2>/dev/null | head -1)}"
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v -i "warning\|!!\|\*\*\*\|^ *$" | tail -2
procs="${FUZZ_PROCS:-4}"
end=$(($(date +%s) + ${FUZZ_SECONDS:-400}))
first_seed="${FUZZ_FIRST_SEED:-$(date +%s)}"
work="$(mktemp -d)"

fuzz_process() {  # one process's runs, seeds first_seed + process, + procs, ... until the end
  local process=$1 run=0 seed left rc log
  while left=$((end - $(date +%s))); ((left > 30)); do
    seed=$((first_seed + process + run * procs))
    log="$work/run_${process}_${run}.log"
    timeout "$left" python3 -m pytest tests -m "gpu and not sweep" -q -x -p no:cacheprovider \
      --hypothesis-seed="$seed" > "$log" 2>&1
    rc=$?
    if ((rc == 124)); then
      echo "process $process seed $seed cut at the time limit" >> "$work/summary_$process.txt"
      rm "$log"
    else
      echo "process $process seed $seed rc $rc: $(tail -1 "$log")" >> "$work/summary_$process.txt"
      ((rc == 0)) && rm "$log"
    fi
    run=$((run + 1))
  done
}

for ((process = 0; process < procs; process++)); do
  fuzz_process "$process" &
done
wait
{
  echo "commit $PAGEDLLM_COMMIT, first seed $first_seed, $procs processes, ${FUZZ_SECONDS:-400} s"
  cat "$work"/summary_*.txt
  for log in "$work"/run_*.log; do
    [ -e "$log" ] || continue
    echo "== failing run $(basename "$log" .log)"
    cat "$log"
  done
} > "$OUT/gpu_fuzz.log"
cat "$OUT/gpu_fuzz.log" | head -60
! grep -q '^== failing run' "$OUT/gpu_fuzz.log"
