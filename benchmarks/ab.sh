#!/usr/bin/env bash
# One benchmark for two versions of the package on one host in one run, interleaved
# (base, head, base, head), so the host's speed cannot pass for a change of code.
#
#   rm -rf ab_base && mkdir ab_base && git archive <base> pagedtensor triton_kernels compile_backend | tar -x -C ab_base
#   mv ab_base/triton_kernels ab_base/compile_backend ab_base/pagedtensor/     (ab_base/ is git-ignored; carry it)
#   BASE_COMMIT=<base hash> PAGEDLLM_COMMIT=<head hash> bash benchmarks/ab.sh <bench> [bench args...]
#
# <bench> names benchmarks/bench_<bench>.py. Both runs use this tree's benchmark script; the base run
# imports ab_base/pagedtensor (with its kernels inside), the head run the installed package.
# Writes $OUT/${AB_NAME:-<bench>_ab}_{base,head}_{1,2}.json.
set -euo pipefail
bench="${1:?name the benchmark, e.g. paged_attention}"
shift
OUT="${OUT:-benchmarks/results}"
BASE_DIR="${BASE_DIR:-ab_base}"
NAME="${AB_NAME:-${bench}_ab}"
: "${BASE_COMMIT:?set BASE_COMMIT to the commit archived in $BASE_DIR}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
rm -rf "$BASE_DIR/benchmarks" && cp -r benchmarks "$BASE_DIR/benchmarks"
# The head's commit, "-dirty" where the tree has uncommitted changes (the device's copy lacks .git:
# pass it in PAGEDLLM_COMMIT there).
head_commit="${PAGEDLLM_COMMIT:-$(git rev-parse HEAD)$(git diff --quiet HEAD -- || echo -dirty)}"
failed=0
for round in 1 2; do
  # A round that fails leaves no file behind from an earlier A/B of the same name; every round
  # runs, and the script exits 1 once they are done if any failed.
  rm -f "$OUT/${NAME}_base_$round.json" "$OUT/${NAME}_head_$round.json"
  (cd "$BASE_DIR" && PAGEDLLM_COMMIT="$BASE_COMMIT" python3 -m "benchmarks.bench_$bench" "$@" \
    --out "$OUT/${NAME}_base_$round.json" | tail -18) || { echo "ab.sh: base round $round failed" >&2; failed=1; }
  PAGEDLLM_COMMIT="$head_commit" python3 -m "benchmarks.bench_$bench" "$@" \
    --out "$OUT/${NAME}_head_$round.json" | tail -18 || { echo "ab.sh: head round $round failed" >&2; failed=1; }
done
exit $failed
