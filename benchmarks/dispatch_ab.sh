#!/usr/bin/env bash
# Dispatch overhead of two versions of the package, interleaved on one host: benchmarks/ab.sh for
# bench_dispatch_overhead.py, writing $OUT/dispatch_ab_{base,head}_{1,2}.json.
#
#   BASE_COMMIT=<base hash> PAGEDLLM_COMMIT=<head hash> bash benchmarks/dispatch_ab.sh [bench args...]
#
# (ab_base/ prepared as benchmarks/ab.sh says.)
set -euo pipefail
AB_NAME=dispatch_ab exec bash "$(dirname "$0")/ab.sh" dispatch_overhead "$@"
