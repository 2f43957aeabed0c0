"""How long does growing a pinned host slab take, and can it run beside the GPU work (an experiment).

The host tier grows its slabs on demand (``tiers/host.py``): a plain allocation page-locked with
``cudaHostRegister``. On the H200 host a 7 GiB slab took 2.2-6.4 s, and a slab grown inside a
``generate`` stalled it that long (results/moe_probe_ab_base_feb466f_h200.json). This probe times,
per slab size:

* the ways to make a slab: register as shipped; with transparent huge pages asked for
  (``madvise(MADV_HUGEPAGE)`` on a 2 MiB-aligned allocation); with the pages populated first
  (``MADV_POPULATE_WRITE``) and then registered; and ``torch.empty(pin_memory=True)``;
* whether a slab registered on a background thread stalls the main thread: the main thread copies
  64 MiB from an already pinned buffer to the GPU and synchronizes, over and over, and counts
  Python loop turns, before and while a background thread registers a slab through torch's
  ``cudart`` binding and through ``ctypes`` (which releases the GIL for the call), and while it
  only populates the slab's pages (what the host tier does there), the registration timed after.

    python -m benchmarks.host_slab_probe --sizes 1GiB,4GiB --out /tmp/host_slab_probe.json
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import threading
import time
from typing import Any, Callable, Optional

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import write_results  # noqa: E402
from pagedtensor.config import parse_size  # noqa: E402
from pagedtensor.tiers import host  # noqa: E402
from pagedtensor.tiers.host import HOST_ALIGNMENT, HUGE_PAGE_SIZE, aligned_empty  # noqa: E402



def _madvise(tensor: torch.Tensor, advice: int) -> int:
    """0, or the errno of ``madvise`` (the host tier's own call does not report it)."""
    if host._libc is None or host._libc.madvise(tensor.data_ptr(), tensor.numel(), advice) != 0:
        return ctypes.get_errno() if host._libc is not None else -1
    return 0


_libcuda: Optional[ctypes.CDLL] = None


def _register_ctypes(tensor: torch.Tensor) -> None:
    """``cuMemHostRegister_v2`` through ctypes: the GIL is released for the call. The calling thread
    must have the primary context current (``torch.cuda.set_device`` on it does that)."""
    global _libcuda
    if _libcuda is None:
        _libcuda = ctypes.CDLL("libcuda.so.1")
        _libcuda.cuMemHostRegister_v2.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
    code = _libcuda.cuMemHostRegister_v2(tensor.data_ptr(), tensor.numel(), 0)
    if code != 0:
        raise RuntimeError(f"cuMemHostRegister_v2 failed: {code}")


def _timed(step: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    value = step()
    return value, time.perf_counter() - start


def make_slab(nbytes: int, way: str) -> dict[str, Any]:
    """Make one pinned slab ``way`` and time its steps (seconds); the slab is unregistered and dropped."""
    row: dict[str, Any] = {"way": way, "bytes": nbytes}
    if way == "pin_memory":
        _, row["total_s"] = _timed(lambda: torch.empty(nbytes, dtype=torch.uint8, pin_memory=True))
        return row
    huge = way.startswith("thp")
    slab, row["allocate_s"] = _timed(lambda: aligned_empty(nbytes, HUGE_PAGE_SIZE if huge else HOST_ALIGNMENT))
    if huge:
        row["madvise_hugepage_errno"], row["madvise_s"] = _timed(lambda: _madvise(slab, host._MADV_HUGEPAGE))
    if way.endswith("populate"):
        row["populate_errno"], row["populate_s"] = _timed(lambda: _madvise(slab, host._MADV_POPULATE_WRITE))
    _, row["register_s"] = _timed(lambda: host._register(slab))
    row["total_s"] = sum(value for key, value in row.items() if key.endswith("_s"))
    host._unregister(slab.data_ptr())
    return row


def _main_thread_load(stop: threading.Event, source: torch.Tensor, target: torch.Tensor) -> dict[str, Any]:
    """Copy ``source`` to ``target`` and synchronize until ``stop``; the copies' latencies and the
    loop turns per second."""
    latencies: list[float] = []
    turns = 0
    start = time.perf_counter()
    while not stop.is_set():
        begin = time.perf_counter()
        target.copy_(source, non_blocking=True)
        torch.cuda.synchronize()
        latencies.append(time.perf_counter() - begin)
        turns += 1
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {
        "copies": len(latencies),
        "copy_ms_median": 1e3 * statistics.median(latencies),
        "copy_ms_p99": 1e3 * latencies[int(0.99 * (len(latencies) - 1))],
        "copy_ms_max": 1e3 * latencies[-1],
        "gb_per_s": len(latencies) * source.numel() / elapsed / 1e9,
        "seconds": elapsed,
    }


def beside_copies(nbytes: int, register: str, huge: bool) -> dict[str, Any]:
    """The main thread's copies for 1 s alone, then while a background thread makes a slab of
    ``nbytes`` (``register``: ``torch`` or ``ctypes``, the binding it registers with; or
    ``populate``: it only populates the pages, and the slab is registered afterwards, timed)."""
    source = torch.empty(64 << 20, dtype=torch.uint8, pin_memory=True)
    target = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
    result: dict[str, Any] = {"bytes": nbytes, "register": register, "thp": huge}
    stop = threading.Event()
    timer = threading.Timer(1.0, stop.set)
    timer.start()
    result["alone"] = _main_thread_load(stop, source, target)
    background: dict[str, Any] = {}

    def grow() -> None:
        torch.cuda.set_device(0)
        start = time.perf_counter()
        slab = aligned_empty(nbytes, HUGE_PAGE_SIZE if huge else HOST_ALIGNMENT)
        if huge:
            _madvise(slab, host._MADV_HUGEPAGE)
        if register == "populate":  # what the host tier does on its background thread: no CUDA call
            _madvise(slab, host._MADV_POPULATE_WRITE)
        else:
            (host._register if register == "torch" else _register_ctypes)(slab)
        background["grow_s"] = time.perf_counter() - start
        background["slab"] = slab
        stop.set()

    stop = threading.Event()
    thread = threading.Thread(target=grow)
    thread.start()
    result["beside"] = _main_thread_load(stop, source, target)
    thread.join()
    result["background_grow_s"] = background["grow_s"]
    slab = background.pop("slab")
    if register == "populate":
        _, result["register_after_s"] = _timed(lambda: host._register(slab))
    host._unregister(slab.data_ptr())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1GiB,4GiB")
    parser.add_argument("--ways", default="register,thp,populate,thp_populate,pin_memory")
    parser.add_argument("--beside", default="torch,ctypes,populate", help="how the background thread makes its slab")
    parser.add_argument("--out", default="benchmarks/results/host_slab_probe.json")
    args = parser.parse_args()
    sizes = [parse_size(size) for size in args.sizes.split(",")]
    torch.cuda.init()
    thp = {}
    for name in ("enabled", "defrag"):
        try:
            with open(f"/sys/kernel/mm/transparent_hugepage/{name}") as handle:
                thp[name] = handle.read().strip()
        except OSError as error:
            thp[name] = str(error)
    print("transparent huge pages:", thp, flush=True)
    rows = []
    for nbytes in sizes:
        for way in args.ways.split(","):
            row = make_slab(nbytes, way)
            print(row, flush=True)
            rows.append(row)
    beside = []
    for register in args.beside.split(","):
        for huge in (False, True):
            row = beside_copies(sizes[-1], register, huge)
            print(row, flush=True)
            beside.append(row)
    write_results(args.out, {"transparent_hugepage": thp, "make_slab": rows, "beside_copies": beside})


if __name__ == "__main__":
    main()
