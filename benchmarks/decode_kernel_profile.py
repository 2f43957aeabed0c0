"""Why does the decode split kernel read slower than a plain reader of the same paged rows? An
experiment, not a product path, on Llama-3-8B batch 1 at 32K (134 MB of KV).

The shipped split kernel alone takes ~37.3 us back to back on cold KV there (``graph_us``: do_bench of a
graph of 8 calls), the paged-rows reader of ``decode_read_ceiling.py`` (the same addressing, summing
instead of attending; its fastest launch: 32-token steps, 8 warps, 2 stages, 4 programs an SM)
~33.5 us. Nsight Compute with unlocked clocks reported the two at about the same SM cycles (66.6 and
67.0 thousand) but different average SM clocks (1.80 and 1.96 GHz), which raised the question of
clocks; with base clocks it reported 54.1 and 51.9 thousand cycles (results/decode_kernel_ncu_h200.json).
In ``--mode clocks`` nvidia-smi read 1980 MHz throughout for every call (results/decode_kernel_clocks_h200.json),
so the clock is not the difference; that run also showed every call faster replayed back to back for
seconds than in ``graph_us``, whose L2 flush and graph launch fall inside each graph of 8 calls.
Two modes:

* ``--mode launch``: launch each kernel ``--calls`` times, for a profiler, e.g.
  ``ncu --kernel-name _decode_split_kernel --launch-skip 1 --launch-count 1 --clock-control base ...``.
* ``--mode clocks``: each of the shipped call, its split kernel alone, the reader and ``torch.sum`` of
  a buffer of the same size, as one CUDA graph of calls back to back (rotating among input copies
  that exceed twice the L2) replayed for ``--seconds``, while ``nvidia-smi`` samples the SM clock and
  the power every 20 ms; writes the per-call time and the clock and power seen during the replays.

Run: ``python3 benchmarks/decode_kernel_profile.py --mode clocks --out PATH`` on a CUDA machine.
(results/decode_kernel_clocks_h200.json is from 998cd20, which built the graph here and timed it with
``bench_paged_attention.per_step_back_to_back_us``; since the review after it the calls go through
``bench_paged_attention.sustained_us``, which builds the same graph, not rerun on a GPU. The result
of 70012e7, which captured and timed its own graph, agreed within 0.8 us a call and is in git history.)
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_paged_attention import copy_bandwidth_gbs, gb_per_s, sustained_us  # noqa: E402
from benchmarks.common import write_results  # noqa: E402
from benchmarks.decode_read_ceiling import decode_input_sets, paged_rows_reader, shipped_split_only  # noqa: E402

from pagedtensor.triton_kernels import decode_attention as da  # noqa: E402

MODEL, BATCH, CONTEXT = "llama3-8b", 1, 32768
BACK_TO_BACK_CALLS = 8


def kernels(sets: list[tuple], kv_bytes: int) -> dict[str, list[Callable[[], object]]]:
    """The calls compared, one per input copy."""
    sms = da.sm_count(sets[0][0].device)
    flats = [torch.randn(kv_bytes // 2, dtype=torch.float16, device=sets[0][0].device) for _ in range(max(2, len(sets)))]
    return {
        "shipped": [lambda s=s: da.paged_decode_attention(*s) for s in sets],
        "shipped_split_only": [shipped_split_only(s) for s in sets],
        "paged_rows_reader": [paged_rows_reader(s, CONTEXT, 4 * sms, 32, 8, 2) for s in sets],
        "torch_sum": [lambda f=f: f.sum() for f in flats],
    }


def _parse_samples(text: str, start: float, stop: float) -> list[tuple[float, float]]:
    """``(sm_mhz, watts)`` of the nvidia-smi lines stamped inside ``[start, stop]`` (host epoch seconds)."""
    samples = []
    for line in text.splitlines():
        parts = [part.strip() for part in line.split(",")]
        if len(parts) != 3:
            continue
        try:
            stamp = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
            samples.append((stamp, float(parts[1]), float(parts[2])))
        except ValueError:
            continue
    return [(mhz, watts) for stamp, mhz, watts in samples if start <= stamp <= stop]


def sustained(calls: list[Callable[[], object]], seconds: float, device_index: int) -> dict:
    """The calls timed by ``bench_paged_attention.sustained_us`` (one graph of them replayed back to
    back for about ``seconds``) while nvidia-smi samples the SM clock and power every 20 ms."""
    sampler = subprocess.Popen(
        ["nvidia-smi", "-i", str(device_index), "--query-gpu=timestamp,clocks.sm,power.draw", "--format=csv,noheader,nounits",
         "-lms", "20"], stdout=subprocess.PIPE, text=True)  # fmt: skip
    time.sleep(1.0)  # the sampler starts up
    begin = time.time()
    per_call_us = sustained_us(calls, max(BACK_TO_BACK_CALLS, len(calls)), seconds, repeats=1)
    finish = time.time()
    time.sleep(0.1)
    sampler.terminate()
    text, _ = sampler.communicate()
    # the first 200 ms of the window (warm-up and calibration replays): the clock settles under the load
    samples = _parse_samples(text, begin + 0.2, finish)
    return {
        "per_call_us": round(per_call_us, 2),
        "samples": len(samples),
        "sm_mhz_median": statistics.median(m for m, _ in samples) if samples else None,
        "sm_mhz_min": min(m for m, _ in samples) if samples else None,
        "sm_mhz_max": max(m for m, _ in samples) if samples else None,
        "power_w_median": statistics.median(w for _, w in samples) if samples else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("launch", "clocks"), default="launch")
    parser.add_argument("--calls", type=int, default=3, help="launch mode: launches of each kernel")
    parser.add_argument("--seconds", type=float, default=2.0, help="clocks mode: replay time of each call")
    parser.add_argument("--rounds", type=int, default=2, help="clocks mode: interleaved rounds")
    parser.add_argument("--out", help="clocks mode: the JSON to write")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    kv_bytes, sets = decode_input_sets(MODEL, BATCH, CONTEXT, torch.float16)
    if args.mode == "launch":
        inputs = sets[0]
        split = shipped_split_only(inputs)
        reader = paged_rows_reader(inputs, CONTEXT, 4 * da.sm_count(inputs[0].device), 32, 8, 2)
        for call in [split] * args.calls + [reader] * args.calls:
            call()
        torch.cuda.synchronize()
        launch, tokens, splits = da.decode_geometry(*inputs)
        print(f"split kernel: {launch}, {splits} splits of {tokens} tokens; reader: 32-token steps, 8 warps, 2 stages")
        return 0
    copy_gbs = copy_bandwidth_gbs()
    timed = kernels(sets, kv_bytes)
    index = torch.cuda.current_device()
    report = {"benchmark": "decode_kernel_profile", "model": MODEL, "batch": BATCH, "context": CONTEXT,
              "kv_bytes": kv_bytes, "copy_bandwidth_gbs": copy_gbs,
              "timing": f"one CUDA graph of {BACK_TO_BACK_CALLS} calls back to back on cold inputs replayed for about "
                        f"{args.seconds} s; nvidia-smi samples (20 ms) of the SM clock and power inside the replays, "
                        f"the first 200 ms left out; rounds interleaved",
              "calls": {name: [] for name in timed}}  # fmt: skip
    for _ in range(args.rounds):
        for name, calls in timed.items():
            row = sustained(calls, args.seconds, index)
            row["frac_of_copy"] = round(gb_per_s(kv_bytes, row["per_call_us"] / 1e3) / copy_gbs, 4)
            report["calls"][name].append(row)
            print(name, row, flush=True)
            if args.out:
                write_results(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
