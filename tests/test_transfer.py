"""Coalescing of page copies into runs, and the slab pools they run between."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pagedtensor.errors import OutOfPagesError
from pagedtensor.tiers.slab_pool import SlabPool
from pagedtensor.transfer import TransferEngine, coalesce_runs


def pool(capacity: int, slab_pages: int, page: int = 8) -> SlabPool:
    return SlabPool("test", page, capacity, slab_pages, lambda n: torch.zeros(n, dtype=torch.uint8))


def test_adjacent_pairs_become_one_run_but_not_across_slabs():
    src, dst = pool(16, 4), pool(16, 8)
    runs = coalesce_runs([(0, 0), (1, 1), (2, 2), (3, 3), (4, 4), (6, 5)], src, dst)
    # src slot 4 starts a new slab; 6 does not follow 4.
    assert [(r.src_slot, r.dst_slot, r.count) for r in runs] == [(0, 0, 4), (4, 4, 1), (6, 5, 1)]


@given(capacity=st.integers(1, 40), slab=st.integers(1, 12), data=st.data())
def test_coalesced_copy_equals_page_by_page_copy(capacity, slab, data):
    src, dst = pool(capacity, slab), pool(capacity, max(1, slab // 2 + 1))
    count = data.draw(st.integers(0, capacity))
    src_slots = src.allocate(count)
    dst_slots = data.draw(st.permutations(dst.allocate(count)))
    for slot in src_slots:
        src.page(slot).copy_(torch.randint(0, 256, (8,), dtype=torch.uint8))
    pairs = list(zip(src_slots, dst_slots))
    runs = coalesce_runs(pairs, src, dst)
    assert sum(run.count for run in runs) == count
    TransferEngine(torch.device("cpu")).copy(None, runs, src, dst)
    for src_slot, dst_slot in pairs:
        assert torch.equal(dst.page(dst_slot), src.page(src_slot))


def test_slab_pool_grows_lazily_and_respects_capacity():
    allocated = []
    slabs = SlabPool("test", 8, 10, 4, lambda n: allocated.append(n) or torch.zeros(n, dtype=torch.uint8))
    assert slabs.slab_bytes == 0
    assert slabs.allocate(3) == [0, 1, 2] and allocated == [32]
    assert slabs.allocate(5) == [3, 4, 5, 6, 7] and allocated == [32, 32]
    assert slabs.allocate(2) == [8, 9] and allocated == [32, 32, 16]  # last slab: what is left
    with pytest.raises(OutOfPagesError, match="1 page slots requested, 0 free of 10"):
        slabs.allocate(1)
    slabs.free([4, 2])
    assert slabs.allocate(2) == [2, 4]  # lowest first
    assert slabs.adjacent(2, 3) and not slabs.adjacent(3, 4)
    with pytest.raises(ValueError, match="crosses a slab boundary"):
        slabs.run(3, 2)


CONSECUTIVE_SLOTS = st.builds(lambda first, count: list(range(first, first + count)), st.integers(0, 20), st.integers(1, 6))


@given(slab=st.integers(1, 6), slots=st.one_of(st.lists(st.integers(0, 23), max_size=8), CONSECUTIVE_SLOTS))
def test_first_of_run_is_the_page_by_page_adjacency(slab, slots):
    """``first_of_run`` (one list compare) agrees with ``adjacent`` asked of every neighbouring pair."""
    tier = pool(24, slab)
    one_run = bool(slots) and all(tier.adjacent(a, b) for a, b in zip(slots, slots[1:]))
    assert tier.first_of_run(slots) == (slots[0] if one_run else None)
