"""Pager transfer bandwidth on one GPU: fault-in from the host tier, eviction to it, and overlap.

Questions (issue 2):
  1. Fault-in of a 4 GiB allocation whose pages sit in the host tier: at least 90% of one plain
     pinned ``copy_`` of the same bytes host→device, measured in the same run.
  2. Eviction (device→host write-back of dirty pages) likewise, against one pinned device→host copy.
  3. Overlap: a prefetch on the H2D stream beside a compute kernel on another stream finishes the
     pair in at most 1.1× the longer of the two.

Every pager figure is wall-clock time on the host from the call until the transfers have finished
(the pager's Python bookkeeping included); the baselines are timed the same way. Each timed fault-in
really moves bytes: between repetitions the pages are released dirty, which drops their host copies,
and evicted again. The bytes are checked after every fault-in.

Usage: python benchmarks/bench_pager_transfers.py [--gib 4] [--page-sizes 2MiB,4MiB] [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import positive_float, positive_int, print_table, write_results
from pagedtensor import MemoryConfig, Pager, format_size, parse_size

GiB = 2**30


def timed(fn, repeat: int) -> list[float]:
    """Seconds per call of ``fn`` (which must leave the GPU idle), after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def plain_copies(nbytes: int, repeat: int) -> dict[str, float]:
    """Bandwidth of one pinned host→device and one device→host ``copy_`` of ``nbytes``."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    device = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    host.random_(0, 256)

    def h2d():
        device.copy_(host, non_blocking=True)
        torch.cuda.synchronize()

    def d2h():
        host.copy_(device, non_blocking=True)
        torch.cuda.synchronize()

    h2d_s = statistics.median(timed(h2d, repeat))
    d2h_s = statistics.median(timed(d2h, repeat))
    del host, device
    torch.cuda.empty_cache()
    return {"h2d_GBps": nbytes / h2d_s / 1e9, "d2h_GBps": nbytes / d2h_s / 1e9}


def pager_transfers(nbytes: int, page_size: int, repeat: int) -> dict[str, float]:
    """Fault-in and eviction bandwidth of one ``nbytes`` allocation through the pager."""
    config = MemoryConfig(
        vram_limit=nbytes + 2 * page_size, host_memory=nbytes + 2 * page_size, page_size=page_size, prefetch_strategy="none", device="cuda"
    )
    pager = Pager(config)
    allocation = pager.allocate(nbytes)
    source = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device="cuda")
    expected = int(source.sum(dtype=torch.int64))
    pager.write(allocation, source)
    del source
    pager.evict_all()
    pager.synchronize()
    fault_times, evict_times, runs = [], [], []
    for attempt in range(repeat + 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        resident = pager.ensure_resident(allocation)
        resident.wait()
        torch.cuda.current_stream().synchronize()
        fault_s = time.perf_counter() - start
        runs.append(len(resident.runs()))
        got = sum(int(view.sum(dtype=torch.int64)) for _, view in resident.runs())
        if got != expected:
            raise AssertionError(f"fault-in returned wrong bytes: checksum {got} != {expected}")
        resident.release(dirty=True)  # drops the host copies, so the next eviction writes back
        torch.cuda.synchronize()
        start = time.perf_counter()
        pager.evict_all()
        pager.synchronize()
        evict_s = time.perf_counter() - start
        if attempt:  # the first round is the warm-up
            fault_times.append(fault_s)
            evict_times.append(evict_s)
    stats = pager.stats()
    pager.close()
    torch.cuda.empty_cache()
    return {
        "fault_in_GBps": nbytes / statistics.median(fault_times) / 1e9,
        "evict_GBps": nbytes / statistics.median(evict_times) / 1e9,
        "copy_runs_per_fault": statistics.median(runs),
        "bytes_h2d": stats["bytes_h2d"],
        "bytes_d2h": stats["bytes_d2h"],
    }


def overlap(nbytes: int, page_size: int, repeat: int) -> dict[str, float]:
    """Time of a prefetch alone, a compute kernel alone, and both on different streams."""
    config = MemoryConfig(vram_limit=nbytes + 2 * page_size, host_memory=nbytes + 2 * page_size, page_size=page_size, prefetch_strategy="none", device="cuda")
    pager = Pager(config)
    allocation = pager.allocate(nbytes)
    pager.write(allocation, torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device="cuda"))
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    compute_stream = torch.cuda.Stream()

    def reset():
        with pager.ensure_resident(allocation) as resident:
            resident.release(dirty=True)
        pager.evict_all()
        pager.synchronize()

    def compute(iterations: int):
        with torch.cuda.stream(compute_stream):
            for _ in range(iterations):
                torch.mm(a, b)

    def prefetch():
        pager.prefetch(allocation).result()

    # Size the compute to about as long as the transfer: the hardest case for overlap.
    reset()
    compute(3)  # warm-up: cuBLAS handle and kernel selection
    torch.cuda.synchronize()
    start = time.perf_counter()
    compute(10)
    torch.cuda.synchronize()
    per_mm = (time.perf_counter() - start) / 10
    start = time.perf_counter()
    prefetch()
    pager.synchronize()
    transfer_s = time.perf_counter() - start
    iterations = max(1, round(transfer_s / per_mm))

    alone_prefetch, alone_compute, both = [], [], []
    for _ in range(repeat):
        reset()
        torch.cuda.synchronize()
        start = time.perf_counter()
        prefetch()
        pager.synchronize()
        alone_prefetch.append(time.perf_counter() - start)
        torch.cuda.synchronize()
        start = time.perf_counter()
        compute(iterations)
        torch.cuda.synchronize()
        alone_compute.append(time.perf_counter() - start)
        reset()
        torch.cuda.synchronize()
        start = time.perf_counter()
        compute(iterations)
        prefetch()
        pager.synchronize()
        torch.cuda.synchronize()
        both.append(time.perf_counter() - start)
    pager.close()
    prefetch_s, compute_s, both_s = (statistics.median(x) for x in (alone_prefetch, alone_compute, both))
    return {
        "prefetch_s": prefetch_s,
        "compute_s": compute_s,
        "both_s": both_s,
        "matmuls": iterations,
        "ratio_to_longer": both_s / max(prefetch_s, compute_s),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=positive_float, default=4.0, help="allocation size in GiB (default 4)")
    parser.add_argument("--page-sizes", default="2MiB,4MiB,1MiB", help="comma-separated page sizes")
    parser.add_argument("--repeat", type=positive_int, default=5, help="timed runs of each transfer (default 5)")
    parser.add_argument("--out", default="benchmarks/results/pager_transfers_h100.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA device")
    nbytes = int(args.gib * GiB)
    baseline = plain_copies(nbytes, args.repeat)
    rows = []
    for size in args.page_sizes.split(","):
        page_size = parse_size(size, "page_size")
        result = pager_transfers(nbytes, page_size, args.repeat)
        result["page_size"] = format_size(page_size)
        result["fault_in_vs_pinned_copy"] = result["fault_in_GBps"] / baseline["h2d_GBps"]
        result["evict_vs_pinned_copy"] = result["evict_GBps"] / baseline["d2h_GBps"]
        result["fault_in_target_met"] = result["fault_in_vs_pinned_copy"] >= 0.9
        result["evict_target_met"] = result["evict_vs_pinned_copy"] >= 0.9
        rows.append(result)
    over = overlap(GiB, parse_size(args.page_sizes.split(",")[0]), args.repeat)
    over["target_met"] = over["ratio_to_longer"] <= 1.1
    write_results(
        args.out,
        {
            "bytes": nbytes,
            "baseline_plain_pinned_copy": baseline,
            "pager": rows,
            "overlap": over,
            "targets": {"fault_in_vs_pinned_copy": ">= 0.90", "evict_vs_pinned_copy": ">= 0.90", "overlap_ratio_to_longer": "<= 1.10"},
        },
    )
    print(f"plain pinned copy of {format_size(nbytes)}: H2D {baseline['h2d_GBps']:.1f} GB/s, D2H {baseline['d2h_GBps']:.1f} GB/s")
    print_table(rows, ["page_size", "fault_in_GBps", "fault_in_vs_pinned_copy", "evict_GBps", "evict_vs_pinned_copy", "copy_runs_per_fault"])
    print(
        f"overlap: prefetch {over['prefetch_s'] * 1e3:.1f} ms, compute {over['compute_s'] * 1e3:.1f} ms, "
        f"both {over['both_s'] * 1e3:.1f} ms -> {over['ratio_to_longer']:.3f}x the longer"
    )


if __name__ == "__main__":
    main()
