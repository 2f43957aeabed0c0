"""Dispatch overhead of PagedTensor on a fully resident tensor, per op, against the same op on a plain tensor.

Question (PagedTensor issue): for 4 KiB, 1 MiB and 256 MiB fp32 tensors whose pages all sit on the
GPU, how many µs does an op take on the PagedTensor and on a plain CUDA tensor, measured in the same
run? Target: at 1 MiB and above the paged op costs at most 1.05x the plain one.

Three timings per op, all medians:

* ``device_us``: CUDA events around each call, with every call enqueued behind a long
  ``torch.cuda._sleep`` so the GPU is still busy when the host has issued them all: the time the op
  occupies the stream (the pager's copies and waits included), with no time in which the GPU waited
  for the host.
* ``wall_us``: host wall-clock per op over back-to-back calls, then one sync, and ``host_us``, the
  host time to issue them. Where ``host_us`` exceeds the device time the op is bound by its host
  cost (the Python ``__torch_dispatch__`` path): for small tensors this is the dispatch overhead as
  a program of such ops sees it.
* ``gpu_us``: ``triton.testing.do_bench`` (CUDA events around each call, a 256 MB L2 flush before
  each), the figure of earlier result files. It mixes the two above: once a call's host time exceeds
  the flush's ~67 µs of device time, the GPU waits for the host inside the timed interval
  (``--gap-probe`` shows it: results/dispatch_gap_probe_c22af56_h200.json).

The target is checked on the first two: ``pass`` when, at 1 MiB and above, the results are bitwise
equal and the paged op is within 1.05x of the plain one both in device time (``device_ok``) and by
wall (``wall_ok``).

A third column, ``floor``, times the same op on :class:`ForwardingTensor`: the least any Python
``__torch_dispatch__`` subclass costs (it unwraps one held tensor and calls the op; views stay
subclass instances, as a PagedTensor's do). What a paged op costs above it is the pager's own work.

Each size gets a fresh pager (default page size, 2 MiB), so the pages of a tensor sit in adjacent
device slots and ops run zero-copy on them, as they do for a tensor faulted in as a whole. Paged
results are checked bitwise against the plain ones before timing.

``--device cpu`` runs the same code with the CPU as the device tier (``gpu_us`` and ``device_us`` are then wall time):
a smoke check of the script, not a measurement.

The sizes are labelled in binary units (4KiB = 4096 bytes, 1MiB = 2**20, 256MiB, 1GiB = 2**30); result
files written before the relabelling say 4KB, 1MB, 256MB and 1GB for the same sizes, and
``--sizes`` / ``--profile-size`` still accept those spellings (read as the binary labels).

Usage: python benchmarks/bench_dispatch_overhead.py [--page-size 2MiB] [--sizes 4KiB,1MiB,256MiB,1GiB] [--out FILE]
       python benchmarks/bench_dispatch_overhead.py --gap-probe mul_scalar,sum [--profile-size 1MiB] --out FILE
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import add_device_argument, cuda_missing, kernel_profile, name_list, print_table, write_results  # noqa: E402
from pagedtensor import MemoryConfig, PagedTensor, Pager, parse_size  # noqa: E402

SIZES = {"4KiB": 4 * 1024, "1MiB": 2**20, "256MiB": 256 * 2**20, "1GiB": 2**30}
SIZE_ALIASES = {"4KB": "4KiB", "1MB": "1MiB", "256MB": "256MiB", "1GB": "1GiB"}
"""The labels of results written before the relabelling (the same sizes), still accepted by ``--sizes``."""
TARGET_RATIO = 1.05
TARGET_FROM_BYTES = 2**20

OPS = {
    "sum": lambda x, y: x.sum(),
    "mul_scalar": lambda x, y: x * 2.0,
    "add": lambda x, y: x + y,
    "add_inplace": lambda x, y: x.add_(1.0),
    "slice_sum": lambda x, y: x[1:].sum(),
}


class ForwardingTensor(torch.Tensor):
    """The floor of a ``__torch_dispatch__`` wrapper subclass: every op runs on the held tensor.

    View results are wrapped again and in-place ops return their (wrapped) input, as for a
    PagedTensor; nothing else happens per op.
    """

    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, inner: torch.Tensor) -> "ForwardingTensor":
        out = torch.Tensor._make_wrapper_subclass(
            cls, inner.shape, strides=inner.stride(), storage_offset=inner.storage_offset(), dtype=inner.dtype, device=inner.device
        )
        out.inner = inner
        return out

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN206 - torch's protocol
        out = func(*(a.inner if isinstance(a, ForwardingTensor) else a for a in args), **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            if args and isinstance(args[0], ForwardingTensor) and out is args[0].inner:
                return args[0]
            if func.is_view:
                return ForwardingTensor(out)
        return out


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def gpu_median_us(fn, device: str) -> float:
    if device == "cpu":
        return wall_median_us(fn, 20)[0]
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def device_median_us(fn, device: str, calls: int) -> float:
    """``fn``'s device time per call with no GPU idle time in it (:func:`queued_behind_us`); on a CPU
    device tier, its wall time."""
    if device == "cpu":
        return wall_median_us(fn, 20)[0]
    return queued_behind_us(fn, calls)


def queued_behind_us(fn, calls: int = 200) -> float:
    """Median device time between CUDA events around each of ``calls`` calls of ``fn``, all enqueued
    behind a ~50 ms ``torch.cuda._sleep``: the GPU is still busy when the host has issued them all,
    so no interval holds time in which the GPU waited for the host (``do_bench``'s can).

    Raises:
        RuntimeError: the sleep ended before the host had issued every call.
    """
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(calls)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(calls)]
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(100_000_000)  # ~50 ms at 1.98 GHz
    slept = torch.cuda.Event()
    slept.record()
    for start, end in zip(starts, ends):
        start.record()
        fn()
        end.record()
    caught_up = slept.query()
    torch.cuda.synchronize()
    if caught_up:
        raise RuntimeError(f"queued_behind_us: the GPU caught up with the host within {calls} calls; lengthen the sleep")
    return statistics.median(start.elapsed_time(end) * 1e3 for start, end in zip(starts, ends))


def wall_median_us(fn, calls: int, repeats: int = 5) -> tuple[float, float]:
    """Per call: the wall time of ``calls`` calls then a synchronize, and the host time to issue them
    (before the synchronize); medians of ``repeats``. Where the host time is the larger, the op is
    bound by its host cost, not by the GPU."""
    for _ in range(10):
        fn()
    synchronize()
    walls, hosts = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        issued = time.perf_counter()
        synchronize()
        walls.append((time.perf_counter() - start) / calls * 1e6)
        hosts.append((issued - start) / calls * 1e6)
    return statistics.median(walls), statistics.median(hosts)


def resident_pager(nbytes: int, page_size: int, device: str) -> Pager:
    """A fresh pager with room for two fully resident tensors of ``nbytes`` (pages in adjacent device
    slots) and no prefetching: the pager every measurement here runs its ops on."""
    pages = -(-nbytes // page_size)
    slots = max(4, 2 * pages + 4)
    return Pager(MemoryConfig(vram_limit=slots * page_size, host_memory=slots * page_size, page_size=page_size,
                              prefetch_strategy="none", device=device))  # fmt: skip


def measure_size(label: str, nbytes: int, page_size: int, device: str) -> list[dict]:
    numel = nbytes // 4
    pages = -(-nbytes // page_size)
    rows = []
    with resident_pager(nbytes, page_size, device) as pager:
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(numel, device=device, generator=g)
        y = torch.randn(numel, device=device, generator=g)
        px, py = PagedTensor.wrap(x, pager), PagedTensor.wrap(y, pager)
        assert px.residency()["device"] == pages and py.residency()["device"] == pages, "not fully resident"
        fx, fy = ForwardingTensor(x.clone()), ForwardingTensor(y.clone())
        calls = (2000 if nbytes <= 2**20 else 200) if device != "cpu" else 20
        queued_calls = 200 if nbytes <= 2**20 else 50
        for name, op in OPS.items():
            x.copy_(px.materialize())  # timed in-place ops change both sides differently: start equal
            got, expected = op(px, py), op(x, y)
            got = got.materialize() if isinstance(got, PagedTensor) else got
            bitwise = bool(torch.equal(got, expected))
            plain_gpu = gpu_median_us(lambda: op(x, y), device)
            paged_gpu = gpu_median_us(lambda: op(px, py), device)
            plain_device = device_median_us(lambda: op(x, y), device, queued_calls)
            paged_device = device_median_us(lambda: op(px, py), device, queued_calls)
            plain_wall, plain_host = wall_median_us(lambda: op(x, y), calls)
            paged_wall, paged_host = wall_median_us(lambda: op(px, py), calls)
            floor_gpu = gpu_median_us(lambda: op(fx, fy), device)
            floor_device = device_median_us(lambda: op(fx, fy), device, queued_calls)
            floor_wall, floor_host = wall_median_us(lambda: op(fx, fy), calls)
            checked = nbytes >= TARGET_FROM_BYTES
            gpu_ratio = paged_gpu / plain_gpu
            device_ratio = paged_device / plain_device
            wall_ratio = paged_wall / plain_wall
            rows.append(
                {
                    "size": label,
                    "bytes": nbytes,
                    "pages": pages,
                    "op": name,
                    "plain_gpu_us": plain_gpu,
                    "paged_gpu_us": paged_gpu,
                    "gpu_ratio": gpu_ratio,
                    "plain_device_us": plain_device,
                    "paged_device_us": paged_device,
                    "device_ratio": device_ratio,
                    "floor_device_us": floor_device,
                    "plain_wall_us": plain_wall,
                    "paged_wall_us": paged_wall,
                    "wall_ratio": wall_ratio,
                    "wall_overhead_us": paged_wall - plain_wall,
                    "plain_host_us": plain_host,
                    "paged_host_us": paged_host,
                    "floor_host_us": floor_host,
                    "floor_gpu_us": floor_gpu,
                    "floor_wall_us": floor_wall,
                    "floor_wall_ratio": floor_wall / plain_wall,
                    "pager_wall_us": paged_wall - floor_wall,
                    "bitwise_equal": bitwise,
                    "target": f"<= {TARGET_RATIO}x" if checked else "report only",
                    "pass": (device_ratio <= TARGET_RATIO and wall_ratio <= TARGET_RATIO and bitwise) if checked else bitwise,
                    "device_ok": device_ratio <= TARGET_RATIO if checked else None,
                    "wall_ok": wall_ratio <= TARGET_RATIO if checked else None,
                }
            )
        stats = pager.stats()
        assert stats["evictions"] == 0, "a page left the device during the benchmark"
    if device != "cpu":
        torch.cuda.empty_cache()
    return rows


def profile_ops(nbytes: int, page_size: int, ops: list[str], device: str, calls: int = 200) -> list[dict]:
    """Where the extra device time of a paged op on a resident tensor comes from: ``calls`` calls of
    each op, paged and plain, through :func:`benchmarks.common.kernel_profile` (device kernels and
    copies, every CUDA runtime call), and the synchronising calls ``torch.cuda.set_sync_debug_mode``
    reports for one call."""
    import warnings

    numel = nbytes // 4
    report = []
    with resident_pager(nbytes, page_size, device) as pager:
        x, y = torch.randn(numel, device=device), torch.randn(numel, device=device)
        px, py = PagedTensor.wrap(x.clone(), pager), PagedTensor.wrap(y.clone(), pager)
        for name in ops:
            for kind, args in (("plain", (x, y)), ("paged", (px, py))):
                op = OPS[name]
                for _ in range(10):
                    op(*args)
                synchronize()
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    if device == "cuda":
                        torch.cuda.set_sync_debug_mode("warn")
                    try:
                        op(*args)
                    finally:
                        if device == "cuda":
                            torch.cuda.set_sync_debug_mode("default")
                profile = kernel_profile(lambda: [op(*args) for _ in range(calls)])
                report.append({
                    "op": name, "kind": kind, "bytes": nbytes, "calls": calls,
                    "device_us_per_op": {row["name"][:120]: round(row["device_ms"] * 1e3 / calls, 2) for row in profile["top"]},
                    "cuda_runtime_per_op": {key: {"calls": round(row["calls"] / calls, 2), "host_us": round(row["host_ms"] * 1e3 / calls, 2)}
                                            for key, row in profile["cuda_runtime_calls"].items()},
                    "sync_debug_warnings": [str(w.message)[:300] for w in caught],
                })  # fmt: skip
                print(f"  profile {name} {kind}: {json.dumps(report[-1])[:1500]}", flush=True)
    return report


def host_profile_ops(nbytes: int, page_size: int, ops: list[str], device: str, calls: int = 2000, top: int = 25) -> list[dict]:
    """Where the host time of a paged op goes: ``cProfile`` over ``calls`` calls of each op on a
    resident tensor; the ``top`` functions by own time, in µs per op (cProfile adds its own cost
    per Python call, so the figures are relative, not absolute)."""
    import cProfile
    import pstats

    numel = nbytes // 4
    report = []
    with resident_pager(nbytes, page_size, device) as pager:
        px = PagedTensor.wrap(torch.randn(numel, device=device), pager)
        py = PagedTensor.wrap(torch.randn(numel, device=device), pager)
        for name in ops:
            op = OPS[name]
            for _ in range(50):
                op(px, py)
            synchronize()
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(calls):
                op(px, py)
            profiler.disable()
            synchronize()
            stats = pstats.Stats(profiler).stats  # {(file, line, function): (calls, primitive, own s, cumulative s, callers)}
            rows = sorted(stats.items(), key=lambda item: -item[1][2])[:top]
            report.append({
                "op": name, "bytes": nbytes, "calls": calls,
                "top_own_us_per_op": [
                    {"function": f"{os.path.basename(key[0])}:{key[1]}({key[2]})", "calls_per_op": round(value[0] / calls, 2),
                     "own_us": round(value[2] * 1e6 / calls, 2), "cumulative_us": round(value[3] * 1e6 / calls, 2)}
                    for key, value in rows
                ],
            })  # fmt: skip
            print(f"  host profile {name}: " + ", ".join(f"{r['function']} {r['own_us']}" for r in report[-1]["top_own_us_per_op"][:8]), flush=True)
    return report


def _busy_wait_us(us: float) -> None:
    end = time.perf_counter() + us * 1e-6
    while time.perf_counter() < end:
        pass


def gap_probe(nbytes: int, page_size: int, ops: list[str]) -> dict:
    """Where the extra ``gpu_us`` (``do_bench``) of a paged op on a resident tensor comes from.

    For each op, ``do_bench`` medians of: the plain op; the plain op followed by recording a new
    ``torch.cuda.Event`` (what a paged op's release does); the plain op after the host busy-waits
    15, 30 and 45 us (host time alone, no device work); the ``ForwardingTensor`` floor; the paged op.
    Beside each, the same call timed with the GPU kept behind the host (:func:`queued_behind_us`),
    and the host time of one call. Also the device time of ``do_bench``'s 256 MB L2 flush. If the
    paged op's ``do_bench`` time follows the host-wait rows while its queued-behind time equals the
    plain op's, the extra time is the GPU waiting for the host, not device work.
    """
    import triton.testing

    numel = nbytes // 4
    cache = torch.empty(256 * 2**20 // 4, dtype=torch.int, device="cuda")
    flush_ms = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        cache.zero_()
        end.record()
        end.synchronize()
        flush_ms.append(start.elapsed_time(end))
    del cache
    report: dict = {"flush_256MB_device_us": statistics.median(flush_ms) * 1e3, "ops": {}}
    with resident_pager(nbytes, page_size, "cuda") as pager:
        x, y = torch.randn(numel, device="cuda"), torch.randn(numel, device="cuda")
        px, py = PagedTensor.wrap(x.clone(), pager), PagedTensor.wrap(y.clone(), pager)
        fx, fy = ForwardingTensor(x.clone()), ForwardingTensor(y.clone())
        for name in ops:
            op = OPS[name]
            x.copy_(px.materialize())
            variants = {
                "plain": lambda: op(x, y),
                "plain_then_event": lambda: (op(x, y), torch.cuda.Event().record()),
                **{f"plain_after_host_wait_{us}us": (lambda us=us: (_busy_wait_us(us), op(x, y))) for us in (15, 30, 45)},
                "floor": lambda: op(fx, fy),
                "paged": lambda: op(px, py),
            }
            rows = {}
            for _ in range(2):  # two interleaved rounds
                for variant, fn in variants.items():
                    row = rows.setdefault(variant, {"do_bench_us": [], "queued_behind_us": [], "host_us": []})
                    row["do_bench_us"].append(round(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3, 2))
                    row["queued_behind_us"].append(round(queued_behind_us(fn), 2))
                    row["host_us"].append(round(wall_median_us(fn, 500)[1], 2))
            report["ops"][name] = rows
            print(f"  gap probe {name}: " + json.dumps(rows), flush=True)
    return report


def size_label(text: str) -> str:
    """argparse ``type=`` of ``--profile-size``: one label of :data:`SIZES` (or an old spelling of one)."""
    labels = name_list(SIZES, SIZE_ALIASES)(text)
    if len(labels) != 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not one size; choose from {', '.join(SIZES)}")
    return labels[0]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (``argv``, default ``sys.argv[1:]``): sizes and ops checked against
    :data:`SIZES` and :data:`OPS` before any pager is built; ``--sizes`` and the op lists as lists."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--page-size", default="2MiB", help="pager page size (default 2MiB, MemoryConfig's default)")
    parser.add_argument("--sizes", type=name_list(SIZES, SIZE_ALIASES), default=",".join(SIZES),
                        help=f"comma-separated subset of {','.join(SIZES)} (4KB, 1MB, 256MB, 1GB: the same sizes)")
    add_device_argument(parser)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "dispatch_overhead.json"))
    ops = name_list(OPS)
    parser.add_argument("--profile", type=ops, default="",
                        help=f"comma-separated ops ({','.join(OPS)}) to profile at --profile-size instead of the timing run (e.g. mul_scalar,add)")
    parser.add_argument("--host-profile", type=ops, default="", help="comma-separated ops whose Python host time to profile (cProfile) instead")
    parser.add_argument("--profile-size", type=size_label, default="1MiB", help="tensor size of --profile / --host-profile / --gap-probe (default 1MiB)")
    parser.add_argument("--gap-probe", type=ops, default="", help="comma-separated ops: explain their extra do_bench time instead (CUDA only)")
    args = parser.parse_args(argv)
    if not args.sizes:
        parser.error(f"argument --sizes: no size in {','.join(SIZES)} given")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if cuda_missing("bench_dispatch_overhead", args.device):
        return 2
    page_size = parse_size(args.page_size, "--page-size")
    if args.host_profile:
        write_results(args.out, {"benchmark": "dispatch_overhead_host_profile", "page_size": page_size,
                                 "profiles": host_profile_ops(SIZES[args.profile_size], page_size, args.host_profile, args.device)})  # fmt: skip
        return 0
    if args.gap_probe:
        write_results(args.out, {"benchmark": "dispatch_overhead_gap_probe", "page_size": page_size, "bytes": SIZES[args.profile_size],
                                 **gap_probe(SIZES[args.profile_size], page_size, args.gap_probe)})  # fmt: skip
        return 0
    if args.profile:
        write_results(args.out, {"benchmark": "dispatch_overhead_profile", "page_size": page_size,
                                 "profiles": profile_ops(SIZES[args.profile_size], page_size, args.profile, args.device)})  # fmt: skip
        return 0
    rows = []
    for label in args.sizes:
        rows.extend(measure_size(label, SIZES[label], page_size, args.device))
    passed = all(row["pass"] for row in rows)
    write_results(
        args.out,
        {
            "benchmark": "dispatch_overhead",
            "device_tier": args.device,
            "page_size": page_size,
            "target": f"paged op <= {TARGET_RATIO}x plain op in device time (device_us) and by wall (wall_us) for tensors of 1 MiB and above",
            "pass": passed,
            "device_ok": all(row["device_ok"] is not False for row in rows),
            "wall_ok": all(row["wall_ok"] is not False for row in rows),
            "rows": rows,
        },
    )
    print_table(rows, ["size", "op", "plain_device_us", "paged_device_us", "device_ratio", "plain_wall_us", "paged_wall_us", "wall_ratio",
                       "floor_wall_ratio", "gpu_ratio", "bitwise_equal", "pass"])  # fmt: skip
    print(f"pass: {passed}  (results in {args.out})")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
