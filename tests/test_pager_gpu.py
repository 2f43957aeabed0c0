"""The pager on a real CUDA device: side streams, events, pinned host slabs.

The same state machine as on the CPU, with ``device="cuda"``: every copy is asynchronous, so a
missing wait or a slot reused before its last reader finished shows up as wrong bytes. Plus checks of
the stream protocol at sizes where copies take long enough for races to bite.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import settings

from pagedtensor import MemoryConfig, Pager
from tests.test_pager_state_machine import PagerMachine, SmallHostPagerMachine, TwoQPagerMachine, WideHostPagerMachine

pytestmark = pytest.mark.gpu


def cuda_test_case(machine: type[PagerMachine], max_examples: int) -> type:
    """``machine``'s hypothesis test case with ``device="cuda"``, marked ``gpu``."""
    on_cuda = type(f"Cuda{machine.__name__}", (machine,), {"device": "cuda"})
    test_case = pytest.mark.gpu(on_cuda.TestCase)
    test_case.settings = settings(max_examples=max_examples, stateful_step_count=50, deadline=None)
    return test_case


TestCudaPagerLRU = cuda_test_case(PagerMachine, 150)
TestCudaPager2Q = cuda_test_case(TwoQPagerMachine, 60)
TestCudaPagerWideHost = cuda_test_case(WideHostPagerMachine, 60)
TestCudaPagerSmallHost = cuda_test_case(SmallHostPagerMachine, 60)


def test_fault_from_host_is_asynchronous():
    """A fault queued behind a busy H2D stream returns at once: the host slabs are page-locked.

    (``Tensor.is_pinned`` only knows the caching host allocator, not ``cudaHostRegister``.)
    """
    import time

    with Pager(MemoryConfig(vram_limit="64MiB", host_memory="64MiB", page_size="1MiB", prefetch_strategy="none", device="cuda")) as pager:
        allocation = pager.allocate(32 * 2**20)
        data = torch.randint(0, 256, (32 * 2**20,), dtype=torch.uint8, device="cuda")
        pager.write(allocation, data)
        pager.evict_all()
        pager.synchronize()
        with torch.cuda.stream(pager.engine.h2d_stream):
            torch.cuda._sleep(int(2e9))  # about a second of GPU time ahead of the fault's copies
        start = time.perf_counter()
        resident = pager.ensure_resident(allocation)
        enqueue_s = time.perf_counter() - start
        assert resident.events, "a fault from host must hand back the copy's event"
        assert not resident.events[0].query(), "the copy cannot have finished behind the sleep"
        assert enqueue_s < 0.2, f"ensure_resident blocked the host for {enqueue_s:.3f} s"
        resident.wait()
        assert torch.equal(torch.cat(resident.views()), data)
        resident.release()


def test_compute_right_after_fault_sees_the_bytes():
    """No host sync between the fault and the compute: only the event orders them."""
    page = 2**20
    with Pager(MemoryConfig(vram_limit=48 * page, host_memory=256 * page, page_size=page, prefetch_strategy="none", device="cuda")) as pager:
        tensors = [torch.randn(16 * page // 4, device="cuda") for _ in range(8)]
        allocations = []
        for tensor in tensors:
            allocation = pager.allocate(tensor.numel() * 4)
            pager.write(allocation, tensor)
            allocations.append(allocation)
        for round_ in range(3):
            for tensor, allocation in zip(tensors, allocations):
                with pager.ensure_resident(allocation) as resident:
                    resident.wait()
                    got = torch.cat([view.view(torch.float32) for view in resident.views()])
                    scale = float(round_ + 2)
                    for view in resident.views():
                        view.view(torch.float32).mul_(scale)
                    resident.mark_dirty()
                    assert torch.equal(got, tensor), f"round {round_}: fault returned stale bytes"
                tensor.mul_(scale)
            pager.evict_all()
        assert pager.stats()["bytes_d2h"] > 0 and pager.stats()["bytes_h2d"] > 0


def test_prefetch_overlaps_with_fault_of_same_pages():
    page = 2**20
    with Pager(MemoryConfig(vram_limit=64 * page, host_memory=128 * page, page_size=page, prefetch_strategy="sequential", prefetch_pages=8, device="cuda")) as pager:
        data = torch.randint(0, 256, (64 * page,), dtype=torch.uint8, device="cuda")
        allocation = pager.allocate(data.numel())
        pager.write(allocation, data)
        pager.evict_all()
        for start in range(0, 64, 8):
            with pager.ensure_resident(allocation, start, start + 8) as resident:
                resident.wait()
                got = torch.cat(resident.views())
                assert torch.equal(got, data[start * page : (start + 8) * page])
        pager.synchronize()
        assert pager.stats()["prefetched_pages"] > 0


def _pager_of_mib_pages(device_pages: int) -> Pager:
    """A CUDA pager of 1 MiB pages: ``device_pages`` on the device, 32 on the host, no prefetch."""
    page = 2**20
    return Pager(MemoryConfig(vram_limit=device_pages * page, host_memory=32 * page, page_size=page,
                              prefetch_strategy="none", device="cuda"))  # fmt: skip


def _written(pager: Pager, nbytes: int):
    """A new allocation of ``nbytes`` random bytes, written through ``pager``, and those bytes."""
    data = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device="cuda")
    allocation = pager.allocate(nbytes)
    pager.write(allocation, data)
    return allocation, data


def test_a_finished_copy_is_forgotten():
    """Pages whose fault-in copy has finished hand back no event: an op on them enqueues no wait.

    A copy still running (behind a sleep on the H2D stream) is handed back; once it has finished, the
    next ``ensure_resident`` of the same pages returns no event and clears ``page.ready``, and the
    bytes stay right when the slot is reused afterwards.
    """
    page = 2**20
    with _pager_of_mib_pages(device_pages=8) as pager:
        allocation, data = _written(pager, 4 * page)
        pager.evict_all()
        pager.synchronize()
        with torch.cuda.stream(pager.engine.h2d_stream):
            torch.cuda._sleep(int(2e8))
        with pager.ensure_resident(allocation) as resident:
            assert resident.events, "a copy behind the sleep must be waited on"
            resident.wait()
            assert torch.equal(torch.cat(resident.views()), data)
        pager.synchronize()
        with pager.ensure_resident(allocation) as resident:
            assert resident.events == [], "a finished copy must not be waited on again"
            assert all(page.ready is None for page in resident.pages)
            resident.wait()
            assert torch.equal(torch.cat(resident.views()), data)
        other = pager.allocate(8 * page)  # reuses every slot: the fences still order it after the reads
        pager.write(other, torch.zeros(8 * page, dtype=torch.uint8, device="cuda"))
        assert torch.equal(pager.read(allocation).to("cuda"), data)


def test_slot_reuse_waits_for_a_read_of_the_run_still_queued():
    """An op on a run of adjacent slots leaves one fence for the run (pagedtensor.fences); a fault
    that reuses every slot while that op is still queued (behind a sleep on the current stream)
    zero-fills them on the H2D stream only after it, so the op reads the old bytes."""
    page = 2**20
    with _pager_of_mib_pages(device_pages=8) as pager:
        allocation, data = _written(pager, 8 * page)
        pager.synchronize()
        torch.cuda.synchronize()
        resident = pager.ensure_resident(allocation)
        assert resident.first_slot is not None, "the test needs a run of adjacent slots"
        resident.wait()
        torch.cuda._sleep(int(4e8))  # the read below runs well after the host has moved on
        seen = resident.contiguous().clone()
        resident.release()
        other = pager.allocate(8 * page)
        pager.write(other, torch.zeros(8 * page, dtype=torch.uint8, device="cuda"))  # evicts the run, zero-fills its slots
        torch.cuda.synchronize()
        assert torch.equal(seen, data), "a slot was overwritten before the op that read it ran"
        assert torch.equal(pager.read(allocation).to("cuda"), data)
