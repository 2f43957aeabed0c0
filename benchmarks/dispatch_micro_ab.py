"""Per-op wall time of PagedTensor ops on a resident CUDA pager (min of 7 reps of 1000 calls), for an A/B of
two versions run alternately in separate processes: the version imported is the one next to the
script (ab_base/micro.py imports ab_base/pagedtensor) or the installed one (a copy in /tmp).
Prints one line: the label, the package folder, and microseconds per call of each op; the last two
are controls (a CUDA capture query and an event record) that show how fast the host is."""
import sys, time, torch, pagedtensor
from pagedtensor import MemoryConfig, Pager, PagedTensor
pager = Pager(MemoryConfig(device="cuda", vram_limit="64MiB", host_memory="64MiB", page_size="64KiB"))
x = PagedTensor.wrap(torch.randn(1024, 256, device="cuda"), pager); y = PagedTensor.wrap(torch.randn(1024, 256, device="cuda"), pager)
xd = x.materialize()
ops = {"plain_sum": lambda: xd.sum(), "sum": lambda: x.sum(), "mul": lambda: x * 2, "add": lambda: x + y, "add_": lambda: x.add_(0),
       "slice_sum": lambda: x[100:900].sum(), "capturing": torch.cuda.is_current_stream_capturing, "record": pager.engine.record}
res = {}
for name, f in ops.items():
    for _ in range(300): f()
    torch.cuda.synchronize()
    best = 1e9
    for rep in range(7):
        t = time.perf_counter()
        for _ in range(1000): f()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t) / 1000 * 1e6)
    res[name] = best
print(f"{sys.argv[1]:5}", pagedtensor.__file__.split("/")[-3], " ".join(f"{k}={v:.2f}" for k, v in res.items()), flush=True)
