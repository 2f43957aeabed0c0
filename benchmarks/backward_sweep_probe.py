"""CUDA probe of the backward sweep's 4 failing cases: dense run to run, forwarding and paged gradients."""
import sys, torch
sys.path.insert(0, ".")
from torch.testing._internal.common_methods_invocations import op_db
import tests.test_torch_opinfo as T
from pagedtensor import Pager, MemoryConfig, PagedTensor
pager = Pager(MemoryConfig(device="cuda", page_size=T.PAGE, vram_limit=T.DEVICE_PAGES*T.PAGE, host_memory=4*T.DEVICE_PAGES*T.PAGE, slab_size=4*T.DEVICE_PAGES*T.PAGE, prefetch_strategy="none"))
torch.use_deterministic_algorithms(True, warn_only=True)
for name, dtype, want in [("linalg.vander", torch.float32, 2), ("linalg.vander", torch.complex64, 2), ("grid_sampler_2d", torch.float32, 0), ("nn.functional.grid_sample", torch.float32, 2)]:
    op = next(o for o in op_db if T._name(o) == name)
    samples = list(op.sample_inputs("cuda", dtype, requires_grad=True))[:3]
    s = samples[want]
    d = T._gradients(op, s, want, T._dense_leaf)
    runs = [T._mismatch(T._gradients(op, s, want, T._dense_leaf), d, bitwise=True) for _ in range(5)]
    f = T._gradients(op, s, want, T._Forwarding)
    p = T._gradients(op, s, want, lambda v: PagedTensor.wrap(v, pager))
    print(name, dtype, want, "| dense reruns:", runs, "| fwd vs dense:", T._mismatch(f, d, bitwise=True), "| paged vs fwd:", T._mismatch(p, f, bitwise=True), "| paged vs dense:", T._mismatch(p, d, bitwise=True), "| paged vs dense accuracy:", T._mismatch(p, d, bitwise=False), flush=True)
