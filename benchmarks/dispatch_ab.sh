#!/usr/bin/env bash
# Dispatch overhead of two versions of the package on one host in one run, interleaved
# (base, head, base, head), so host speed cannot pass for a change of code.
#
#   git archive <base> pagedtensor | tar -x -C ab_base       (ab_base/ is git-ignored; carry it)
#   BASE_COMMIT=<base hash> PAGEDLLM_COMMIT=<head hash> bash benchmarks/dispatch_ab.sh [bench args...]
#
# Both runs use this tree's bench_dispatch_overhead.py; the base run imports ab_base/pagedtensor.
# Writes $OUT/dispatch_ab_{base,head}_{1,2}.json.
set -euo pipefail
OUT="${OUT:-benchmarks/results}"
BASE_DIR="${BASE_DIR:-ab_base}"
: "${BASE_COMMIT:?set BASE_COMMIT to the commit archived in $BASE_DIR}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
rm -rf "$BASE_DIR/benchmarks" && cp -r benchmarks "$BASE_DIR/benchmarks"
head_commit="${PAGEDLLM_COMMIT:-$(git rev-parse HEAD)}"
for round in 1 2; do
  (cd "$BASE_DIR" && PAGEDLLM_COMMIT="$BASE_COMMIT" python3 -m benchmarks.bench_dispatch_overhead "$@" \
    --out "$OUT/dispatch_ab_base_$round.json" | tail -18) || true
  PAGEDLLM_COMMIT="$head_commit" python3 -m benchmarks.bench_dispatch_overhead "$@" \
    --out "$OUT/dispatch_ab_head_$round.json" | tail -18 || true
done
