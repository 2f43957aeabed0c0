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
    assert slabs.allocate(2) == [2, 4]  # no run of two free: the lowest pieces (both of length one)
    assert slabs.adjacent(2, 3) and not slabs.adjacent(3, 4)
    with pytest.raises(ValueError, match="name a slot twice"):
        slabs.free([0, 5, 5])  # nothing is freed
    slabs.free([0])
    with pytest.raises(ValueError, match="slot 0 is not in use"):
        slabs.free([1, 0])  # 0 is free already: nothing is freed
    assert slabs.free_pages == 1 and slabs.allocate(1) == [0]
    with pytest.raises(ValueError, match="crosses a slab boundary"):
        slabs.run(3, 2)


def test_slab_grown_is_told_each_new_slab_before_its_slots_are_handed_out():
    grown: list[tuple[int, int, int]] = []  # (first slot, pages, slots in use then)
    slabs = SlabPool("test", 8, 10, 4, lambda n: torch.zeros(n, dtype=torch.uint8),
                     slab_grown=lambda first, pages: grown.append((first, pages, slabs.used_pages)))  # fmt: skip
    assert slabs.allocate(3) == [0, 1, 2] and grown == [(0, 4, 0)]
    assert slabs.allocate(3) == [4, 5, 6] and grown == [(0, 4, 0), (4, 4, 3)]
    slabs.allocate(4)  # the last slab is short: the budget's rest
    assert grown[-1] == (8, 2, 6) and len(grown) == 3


def _used(slabs: SlabPool, used: set[int]) -> None:
    """Make exactly ``used`` the allocated slots of a fresh ``slabs`` (grown in full)."""
    everything = slabs.allocate(slabs.capacity_pages)
    slabs.free(slot for slot in everything if slot not in used)


def test_a_request_takes_the_first_run_that_holds_it_whole():
    slabs = pool(16, 16)
    _used(slabs, {0, 3, 4, 7, 8, 9})  # free runs: 1-2, 5-6, 10-15
    assert slabs.allocate(2) == [1, 2]  # the first run long enough, not the longest
    assert slabs.allocate(3) == [10, 11, 12]
    assert slabs.allocate(1) == [5]
    assert slabs.free_pages == 16 - 12


def test_without_a_run_for_all_each_group_gets_a_run_of_its_own():
    slabs = pool(16, 16)
    _used(slabs, {0, 4, 5, 9, 10})  # free runs: 1-3, 6-8, 11-15
    # 3 + 5 + 3 = 11 = every free slot: no run holds all; the group of 5 (largest first) takes 11-15,
    # the groups of 3 the runs 1-3 and 6-8, in the order they were asked for.
    assert slabs.allocate(11, groups=[3, 5, 3]) == [1, 2, 3, 11, 12, 13, 14, 15, 6, 7, 8]
    assert slabs.free_pages == 0


def test_a_group_no_run_holds_takes_the_lowest_free_slots():
    slabs = pool(16, 16)
    _used(slabs, {2, 3, 4, 7, 13, 14, 15})  # free runs: 0-1, 5-6, 8-12
    assert slabs.allocate(7) == [0, 1, 5, 6, 8, 9, 10]
    with pytest.raises(ValueError, match="groups \\[1, 2\\] do not split 2 slots"):
        slabs.allocate(2, groups=[1, 2])
    assert slabs.free_pages == 2


def test_runs_never_cross_a_slab_boundary():
    slabs = pool(10, 4)  # slabs: 0-3, 4-7, 8-9 (the last one short)
    _used(slabs, {0, 1, 6, 7})  # free: 2-3 | 4-5 | 8-9: adjacent in numbers, in three slabs
    assert slabs.allocate(3) == [2, 3, 4]  # two pieces (2-3 and 4): no run of three in one slab
    assert slabs.allocate(2) == [8, 9]


def _free_runs_model(free: set[int], slab_pages: int) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for slot in sorted(free):
        if runs and runs[-1][0] + runs[-1][1] == slot and slot % slab_pages:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((slot, 1))
    return runs


@given(capacity=st.integers(1, 40), slab=st.integers(1, 12), data=st.data())
def test_allocations_and_frees_keep_the_free_slots_exact(capacity, slab, data):
    """Random requests (with groups) and frees: no slot is handed out twice or lost; a request that a
    run of free slots holds whole gets the first such run; every group that finds a run of its size
    when its turn comes (largest first) gets one; the others get the lowest free slots."""
    slabs = pool(capacity, slab)
    used: set[int] = set()
    for _ in range(data.draw(st.integers(1, 12), label="steps")):
        free_now = set(range(capacity)) - used
        if used and data.draw(st.booleans(), label="free?"):
            gone = data.draw(st.lists(st.sampled_from(sorted(used)), unique=True, min_size=1), label="freed")
            slabs.free(gone)
            used -= set(gone)
        else:
            count = data.draw(st.integers(0, capacity), label="count")
            sizes = data.draw(st.lists(st.integers(1, 4), max_size=6), label="sizes")
            groups = [size for size in sizes if size]
            groups = groups[: next((i for i in range(len(groups) + 1) if sum(groups[:i]) >= count), len(groups))]
            groups = (groups + [count - sum(groups)]) if groups and sum(groups) < count else groups
            groups = groups if groups and sum(groups) == count and count else None
            if count > len(free_now):
                with pytest.raises(OutOfPagesError):
                    slabs.allocate(count, groups)
                continue
            got = slabs.allocate(count, groups)
            assert len(got) == len(set(got)) == count and not set(got) & used, (got, used)
            assert set(got) <= free_now
            grown = slabs.slab_bytes // 8  # runs are looked for in the slabs grown (only when too few slots were free)
            whole = [first for first, length in _free_runs_model(free_now & set(range(grown)), slabs.slab_pages) if length >= count]
            if count and whole:
                assert got == list(range(whole[0], whole[0] + count)), (got, whole)
            elif count:  # group by group, largest first: the first run of its size; the rest the lowest free slots
                sizes = groups or [count]
                model_free = free_now & set(range(grown))
                expected: dict[int, list[int]] = {}
                for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]) if len(sizes) > 1 else []:
                    fitting = [first for first, length in _free_runs_model(model_free, slabs.slab_pages) if length >= sizes[i]]
                    if sizes[i] > 1 and fitting:
                        expected[i] = list(range(fitting[0], fitting[0] + sizes[i]))
                        model_free -= set(expected[i])
                lowest = sorted(model_free)
                for i in range(len(sizes)):
                    if i not in expected:
                        expected[i], lowest = lowest[: sizes[i]], lowest[sizes[i] :]
                assert got == [slot for i in range(len(sizes)) for slot in expected[i]], (sizes, got, expected)
            used |= set(got)
        assert slabs.free_pages == capacity - len(used) == slabs.capacity_pages - slabs.used_pages


CONSECUTIVE_SLOTS = st.builds(lambda first, count: list(range(first, first + count)), st.integers(0, 20), st.integers(1, 6))


@given(slab=st.integers(1, 6), slots=st.one_of(st.lists(st.integers(0, 23), max_size=8), CONSECUTIVE_SLOTS))
def test_first_of_run_is_the_page_by_page_adjacency(slab, slots):
    """``first_of_run`` (one list compare) agrees with ``adjacent`` asked of every neighbouring pair."""
    tier = pool(24, slab)
    one_run = bool(slots) and all(tier.adjacent(a, b) for a, b in zip(slots, slots[1:]))
    assert tier.first_of_run(slots) == (slots[0] if one_run else None)
