"""An elementwise op on a PagedTensor larger than the device tier: how fast does it run in pieces?

Question (the README's ``table.mul_(2)`` on a table larger than ``vram_limit``): a 4 GiB fp32
PagedTensor whose pages sit in the host tier, under a 1 GiB device budget; ``t.mul_(2)`` faults each
piece in, scales it and writes it back (``pagedtensor/pieces.py``). Against:

* ``manual``: what a user writes by hand for the same job, from a ``pin_memory=True`` host tensor:
  chunks of half the budget copied to the GPU, scaled and copied back, on one stream
  (``non_blocking`` copies), one synchronize at the end.
* ``link``: one pinned host-to-device copy and one device-to-host copy of the whole tensor, timed
  alike: the least any method can take to move the bytes both ways over PCIe.

Each run starts with every page in the host tier (``evict_all`` untimed) and ends with every written
page back there (``evict_all`` timed: the write-back is part of the job), then one synchronize; host
wall time, median of ``--repeat``. Both the paged and the manual tensor are checked bitwise against
the expected values after the runs (a multiply by 2 is exact).

``--device cpu`` runs the same code with the CPU as the device tier: a smoke check, not a measurement.

Usage: python benchmarks/bench_pieces.py [--gib 4] [--budget-gib 1] [--page-size 2MiB] [--repeat 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import add_device_argument, cuda_missing, positive_float, positive_int, print_table, write_results  # noqa: E402
from pagedtensor import MemoryConfig, PagedTensor, Pager, parse_size  # noqa: E402


def synchronize(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def timed(fn, cuda: bool) -> float:
    """Seconds from an idle GPU to the end of ``fn``'s work (host clock, one synchronize)."""
    synchronize(cuda)
    begin = time.perf_counter()
    fn()
    synchronize(cuda)
    return time.perf_counter() - begin


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=positive_float, default=4.0, help="tensor size in GiB (default 4)")
    parser.add_argument("--budget-gib", type=positive_float, default=1.0, help="the pager's device budget in GiB (default 1)")
    parser.add_argument("--page-size", default="2MiB")
    parser.add_argument("--repeat", type=positive_int, default=5, help="timed runs of each method (default 5)")
    add_device_argument(parser)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "pieces.json"))
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda_missing("bench_pieces", args.device):
        return 2
    page_size = parse_size(args.page_size, "--page-size")
    nbytes = int(args.gib * 2**30) // page_size * page_size
    budget = int(args.budget_gib * 2**30) // page_size * page_size
    for name, value, rounded in (("--gib", args.gib, nbytes), ("--budget-gib", args.budget_gib, budget)):
        if rounded == 0:
            parser.error(f"argument {name}: {value:g} GiB is less than one page (--page-size {args.page_size})")
    numel = nbytes // 4
    config = MemoryConfig(vram_limit=budget, host_memory=nbytes + 8 * page_size, page_size=page_size,
                          prefetch_strategy="none", device=args.device)  # fmt: skip

    source = torch.randn(numel, generator=torch.Generator().manual_seed(0))
    pager = Pager(config)
    paged = PagedTensor.wrap(source, pager)
    host = source.pin_memory() if cuda else source.clone()
    chunk = budget // 2 // 4
    scratch = torch.empty(chunk, device=args.device)

    def paged_job() -> None:
        paged.mul_(2)
        pager.evict_all()

    def manual_job() -> None:
        for start in range(0, numel, chunk):
            part = host[start : start + chunk]
            piece = scratch[: part.numel()]
            piece.copy_(part, non_blocking=True)
            piece.mul_(2)
            part.copy_(piece, non_blocking=True)

    whole = torch.empty(numel, device=args.device) if cuda else None

    def link_job() -> None:
        whole.copy_(host, non_blocking=True)
        host.copy_(whole, non_blocking=True)

    samples: dict[str, list[float]] = {"paged": [], "manual": [], "link": []}
    for attempt in range(args.repeat + 1):  # the first round warms up
        pager.evict_all()
        pager.synchronize()
        assert paged.residency()["device"] == 0, "pages still on the device before a timed run"
        runs = [("paged", paged_job), ("manual", manual_job)] + ([("link", link_job)] if cuda else [])
        for name, job in runs:
            seconds = timed(job, cuda)
            if attempt:
                samples[name].append(seconds)
    rounds = args.repeat + 1
    expected = source * 2.0**rounds
    paged_equal = bool(torch.equal(paged.materialize("cpu"), expected))
    manual_equal = bool(torch.equal(host.cpu(), expected))
    stats = pager.stats()

    rows = []
    for name, values in samples.items():
        if not values:
            continue
        seconds = statistics.median(values)
        rows.append({"method": name, "ms": seconds * 1e3, "GBps_each_way": nbytes / seconds / 1e9,
                     "samples_ms": [v * 1e3 for v in values]})  # fmt: skip
    by_name = {row["method"]: row for row in rows}
    ratio_manual = by_name["paged"]["ms"] / by_name["manual"]["ms"]
    ratio_link = by_name["paged"]["ms"] / by_name["link"]["ms"] if "link" in by_name else None
    print_table(rows, ["method", "ms", "GBps_each_way"])
    print(f"paged / manual {ratio_manual:.3f}" + (f", paged / link {ratio_link:.3f}" if ratio_link else "")
          + f"; bitwise equal: paged {paged_equal}, manual {manual_equal}")  # fmt: skip
    write_results(
        args.out,
        {
            "benchmark": "pieces",
            "device_tier": args.device,
            "question": "t.mul_(2) on a PagedTensor larger than the device budget (pages in the host tier, run in pieces), "
                        "against a hand-written chunked copy-scale-copy from pinned memory and the bare link",
            "pager": {"vram_limit": budget, "host_memory": config.host_memory, "page_size": page_size},
            "bytes": nbytes,
            "rows": rows,
            "paged_over_manual": ratio_manual,
            "paged_over_link": ratio_link,
            "paged_bitwise_equal": paged_equal,
            "manual_bitwise_equal": manual_equal,
            "pager_stats": {key: stats[key] for key in ("faults", "evictions", "bytes_h2d", "bytes_d2h")},
        },
    )
    return 0 if paged_equal and manual_equal else 1


if __name__ == "__main__":
    sys.exit(main())
