"""The host tier makes its next slab ahead of need, on a background thread, and the pool asks for it
at the right moment with the right size."""

from __future__ import annotations

import functools
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pagedtensor.pager
import pagedtensor.tiers.host as host
from pagedtensor.config import MemoryConfig
from pagedtensor.errors import OutOfPagesError
from pagedtensor.pager import Pager
from pagedtensor.tiers.host import HostTier, SlabInProgress, populated_empty
from pagedtensor.tiers.slab_pool import SlabPool

PAGE = 4096


@settings(max_examples=60, deadline=None)
@given(capacity=st.integers(1, 40), slab=st.integers(1, 12), data=st.data())
def test_the_pool_asks_for_the_next_slab_once_less_than_half_a_slab_is_free(capacity, slab, data):
    """After each allocation the pool asks for the next slab exactly when fewer than half a slab of
    its grown slots are free and the budget has room, with the size of the slab it grows next."""
    asked: list[int] = []
    grown: list[int] = []
    pool = SlabPool(
        "test", 8, capacity, slab,
        allocate_slab=lambda n: grown.append(n) or torch.zeros(n, dtype=torch.uint8),
        prepare_slab=asked.append,
    )  # fmt: skip
    used: list[int] = []
    for _ in range(data.draw(st.integers(1, 12), label="steps")):
        if used and data.draw(st.booleans(), label="free?"):
            pool.free([used.pop()])
            continue
        count = data.draw(st.integers(1, max(1, capacity)), label="count")
        before = len(asked)
        if count > pool.free_pages:
            with pytest.raises(OutOfPagesError):
                pool.allocate(count)
            assert len(asked) == before
            continue
        used += pool.allocate(count)
        grown_pages = sum(grown) // 8
        should_ask = 2 * (grown_pages - len(used)) < pool.slab_pages and grown_pages < capacity
        assert len(asked) == before + should_ask
        if should_ask:
            assert asked[-1] == 8 * min(pool.slab_pages, capacity - grown_pages)
            extra = pool.allocate(grown_pages - len(used) + 1)  # grows exactly the next slab
            assert grown[-1] == asked[-1]
            pool.free(extra)


def make_host_tier(host_pages: int, slab_pages: int) -> HostTier:
    config = MemoryConfig(device="cpu", vram_limit=PAGE, host_memory=host_pages * PAGE, page_size=PAGE, slab_size=slab_pages * PAGE)
    return HostTier(config, populate=True)


def test_the_host_tier_grows_the_slab_it_made_in_the_background():
    """Once less than half a slab is free, the next slab is made on a background thread; growing
    takes that very slab, and bytes written to its slots read back."""
    tier = make_host_tier(host_pages=12, slab_pages=4)
    first = tier.allocate(2)
    assert tier._next_slab is None  # half of the first slab is free
    second = tier.allocate(1)
    assert tier._next_slab is not None and tier._next_slab.nbytes == 4 * PAGE
    made = tier._next_slab
    made._done.wait(timeout=10)
    pointer = made._slab.data_ptr()
    slots = tier.allocate(3)  # grows the second slab
    assert tier._next_slab is None and tier.slabs[1].data_ptr() == pointer
    for index, slot in enumerate(first + second + slots):
        tier.page(slot).fill_(index + 1)
    for index, slot in enumerate(first + second + slots):
        assert bool((tier.page(slot) == index + 1).all())
    tier.close()


def test_the_last_slab_made_ahead_is_the_budget_s_rest():
    tier = make_host_tier(host_pages=6, slab_pages=4)
    tier.allocate(3)
    assert tier._next_slab is not None and tier._next_slab.nbytes == 2 * PAGE
    tier.allocate(3)
    assert tier._next_slab is None and [slab.numel() for slab in tier.slabs] == [4 * PAGE, 2 * PAGE]
    tier.allocate(0)
    with pytest.raises(OutOfPagesError):
        tier.allocate(1)
    tier.close()


def test_a_slab_the_background_failed_to_make_is_made_by_the_grow(monkeypatch):
    """Making the slab in the background fails (memory was short then): growing makes it itself."""
    calls: list[str] = []
    real = host.populated_empty

    def failing_in_the_background(nbytes: int) -> torch.Tensor:
        calls.append(threading.current_thread().name)
        if threading.current_thread().name == "pagedllm-host-slab":
            raise MemoryError("no memory just now")
        return real(nbytes)

    monkeypatch.setattr(host, "populated_empty", failing_in_the_background)
    here = threading.current_thread().name
    tier = make_host_tier(host_pages=8, slab_pages=4)
    tier.allocate(3)  # the first slab, made here; the second begins in the background and fails
    assert tier._next_slab._done.wait(timeout=10)
    assert calls == [here, "pagedllm-host-slab"]
    slots = tier.allocate(3)
    assert len(tier.slabs) == 2 and len(slots) == 3 and calls == [here, "pagedllm-host-slab", here]
    tier.close()


def test_a_slab_begun_before_a_fork_is_not_waited_for_in_the_child(monkeypatch):
    """The thread making the slab does not come along into a forked child: the child makes its own."""
    tier = make_host_tier(host_pages=8, slab_pages=4)
    tier.allocate(3)
    made = tier._next_slab
    monkeypatch.setattr(host.os, "getpid", lambda: -1)  # as a child sees it: another process id
    never = threading.Event()
    monkeypatch.setattr(made, "_done", never)  # the thread is gone: waiting would hang
    assert made.take() is None
    slots = tier.allocate(3)
    assert len(tier.slabs) == 2 and len(slots) == 3
    tier.close()


def test_closing_with_a_slab_in_the_making_drops_it():
    tier = make_host_tier(host_pages=8, slab_pages=4)
    tier.allocate(3)
    made = tier._next_slab
    tier.close()
    assert tier._next_slab is None and tier.slabs == []
    assert made._done.wait(timeout=10)


@pytest.mark.parametrize("nbytes", [PAGE, host.HUGE_PAGE_SIZE, host.HUGE_PAGE_SIZE + 3 * PAGE])
def test_populated_empty_is_aligned_and_exact(nbytes):
    slab = populated_empty(nbytes)
    assert slab.dtype == torch.uint8 and slab.numel() == nbytes and slab.is_contiguous()
    assert slab.data_ptr() % (host.HUGE_PAGE_SIZE if nbytes >= host.HUGE_PAGE_SIZE else host.HOST_ALIGNMENT) == 0
    slab.fill_(7)
    assert int(slab.sum()) == 7 * nbytes


def test_slab_in_progress_gives_its_slab_once():
    made = SlabInProgress(3 * PAGE)
    slab = made.take()
    assert slab is not None and slab.numel() == 3 * PAGE
    assert made.take() is None


def test_a_pager_whose_host_tier_makes_slabs_ahead_keeps_every_byte(monkeypatch):
    """Pages written through the pager, evicted to a host tier growing slab after slab ahead of
    need, read back as written."""
    monkeypatch.setattr(pagedtensor.pager, "HostTier", functools.partial(HostTier, populate=True))
    config = MemoryConfig(device="cpu", vram_limit=2 * PAGE, host_memory=24 * PAGE, page_size=PAGE, slab_size=4 * PAGE)
    with Pager(config) as pager:
        assert pager.host_tier.populate
        allocations = []
        for index in range(10):
            allocation = pager.allocate(2 * PAGE)
            pager.write(allocation, torch.full((2 * PAGE,), index, dtype=torch.uint8))
            allocations.append(allocation)
        assert len(pager.host_tier.slabs) >= 4
        for index, allocation in enumerate(allocations):
            assert bool((pager.read(allocation) == index).all())


@pytest.mark.gpu
def test_pinned_slabs_made_in_the_background_are_registered_and_copy_both_ways():
    """On a CUDA machine the slab made ahead is page-locked when grown: copies between its slots and
    the GPU run asynchronously and give the bytes back."""
    config = MemoryConfig(device="cuda", vram_limit=PAGE, host_memory=8 * PAGE, page_size=PAGE, slab_size=4 * PAGE)
    tier = HostTier(config)
    assert tier.pinned and tier.populate
    tier.allocate(3)
    assert tier._next_slab is not None
    slots = tier.allocate(4)  # grows the slab made in the background
    assert len(tier.slabs) == 2 and len(tier._registered) == 2
    stream = torch.cuda.Stream()
    for index, slot in enumerate(slots):
        with torch.cuda.stream(stream):  # the source filled on the stream that copies it (else a race)
            source = torch.full((PAGE,), index + 1, dtype=torch.uint8, device="cuda")
            tier.page(slot).copy_(source, non_blocking=True)
            back = tier.page(slot).to("cuda", non_blocking=True)
        stream.synchronize()
        assert bool((back == index + 1).all()) and bool((tier.page(slot) == index + 1).all())
    tier.close()
    assert tier._registered == []
