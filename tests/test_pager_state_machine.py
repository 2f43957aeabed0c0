"""Stateful property tests of the pager: random allocate / write / read / prefetch / pin / evict / free.

Budgets are a few pages on every tier, so pages spill device → host → disk and come back all the
time. The model keeps the bytes of every allocation and, for LRU, the order the device tier should
hold, so the test checks:

* every read returns the bytes last written (zeros where never written);
* device and host never hold more than their budgets;
* the device tier holds exactly the pages the LRU model predicts, so every victim was the least
  recently used unpinned page;
* pinned pages stay on the device, in the same slot, until released;
* (``scan``) reading everything in a drawn order returns every byte, whatever mix of dirty and clean
  copies the reads leave on the device for the next eviction;
* the page table is coherent: a dirty page has exactly one copy; the counters add up;
* (``advise``) pages of an allocation advised ``"loop"`` leave as a block once used, the most
  recently used first, after the stale pages (last used before the use before the last of the
  loop page used last) and before the others, and the pages that leave beside the victims are
  only the rest of the loop allocations among them; advised ``"normal"`` they leave by recency
  again;
* (``prefetch_together``) whole allocations prefetched as one batch, or each on its own when the
  batch does not fit, leave the device tier as the model predicts;
* (``prefetch``) a prefetch brings only pages with bytes somewhere: pages never written stay where
  they are (nowhere), so they take no device slot;
* (``pin`` with ``overwrite``) pages pinned to be overwritten whole (``discard``) read as zeros until
  released; released written they hold what was written, released unwritten their old bytes;
* (``write_back``) resident pages given host copies stay where they are, and every read after
  (later writes, evictions and spills included) still returns the bytes last written; room for
  the copies never costs another device page its lower copy (that copy would be made twice).
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, precondition, rule

from pagedtensor import MemoryConfig, Pager

PAGE = 4096
DEVICE_PAGES = 4
HOST_PAGES = 3


class PagerMachine(RuleBasedStateMachine):
    policy = "lru"
    compression = None
    device = "cpu"
    device_pages = DEVICE_PAGES
    host_pages = HOST_PAGES

    allocations = Bundle("allocations")

    def __init__(self) -> None:
        super().__init__()
        self.nvme = tempfile.mkdtemp(prefix="pager-sm-")
        config = MemoryConfig(
            vram_limit=self.device_pages * PAGE,
            host_memory=self.host_pages * PAGE,
            nvme_path=self.nvme,
            page_size=PAGE,
            eviction_policy=self.policy,
            prefetch_strategy="none",
            compression=self.compression,
            device=self.device,
        )
        self.pager = Pager(config)
        self.data: dict[int, torch.Tensor] = {}  # allocation id -> expected bytes
        self.live: dict[int, object] = {}
        # Device-resident (allocation id, page), least recently used first -> the tick of its last use
        # (one tick a page inserted, one a touch of several pages: only their order matters).
        self.lru: dict[tuple[int, int], int] = {}
        self.clock = 0
        # Pages with a copy on some tier: every page the device tier has held, until freed (a page
        # leaving the device is written back); a prefetch brings no other page.
        self.with_bytes: set[tuple[int, int]] = set()
        self.loop: set[int] = set()  # allocations advised "loop"
        self.inserted: dict[tuple[int, int], int] = {}  # page -> the tick of its insert
        self.block: list[tuple[int, int]] = []  # their pages used since, the most recently used first
        self.pass_start = -1  # the use before the last of the loop page used last
        # Page -> the tick of its last use in a loop, kept while it is off the device (until freed or
        # advised "normal"): a loop page faulted back has it as its use before.
        self.demoted: dict[tuple[int, int], int] = {}
        # The pages the pager sent off with each eviction's victims as the rest of their loop
        # allocations, in order: which of them may go depends on the host tier's room and the
        # pages' lower copies, which the model does not follow; it checks they are allowed.
        self.rest_taken: list[list[tuple[int, int]]] = []
        rest_of = self.pager._rest_of_loop_allocations

        def record_rest(victims):
            rest = rest_of(victims)
            self.rest_taken.append([(page.allocation_id, page.index) for page in rest])
            return rest

        self.pager._rest_of_loop_allocations = record_rest
        self.pinned: list[tuple[object, dict[tuple[int, int], int]]] = []  # (ResidentPages, slots at pin)
        # Pages pinned zero-filled for an overwrite while a lower copy holds their bytes: key -> those
        # bytes, until a release marks the page written or its own release gives them back.
        self.overwriting: dict[tuple[int, int], torch.Tensor] = {}

    def teardown(self) -> None:
        for resident, _ in self.pinned:
            resident.release()
        self.pager.close()
        shutil.rmtree(self.nvme, ignore_errors=True)

    # ------------------------------------------------------------------ the LRU model

    def _pinned_keys(self) -> set[tuple[int, int]]:
        return {key for _, slots in self.pinned for key in slots}

    def _model_fault(self, allocation_id: int, start: int, stop: int, use: bool = True) -> None:
        """What ``ensure_resident`` (``use``) or a prefetch does to the device policy: the pages
        resident are touched (not a loop allocation's), room is made by the victims, the missing
        pages are inserted one by one, and pages used in a loop are demoted."""
        keys = [(allocation_id, index) for index in range(start, stop)]
        missing = [key for key in keys if key not in self.lru and (use or key in self.with_bytes)]
        loop = allocation_id in self.loop
        if not loop:  # a loop allocation's pages are not touched: a use demotes them, a prefetch is none
            self._model_touch([key for key in keys if key in self.lru])
        shortfall = len(missing) - (self.device_pages - len(self.lru))
        protected = self._pinned_keys() | set(keys)
        self._model_make_room(shortfall, protected)
        for key in missing:
            self.clock += 1
            self.lru[key] = self.inserted[key] = self.clock
        self.with_bytes.update(missing)
        if use and loop:  # a block of its own, the last page used first, after the stale pages
            previous = {key: self.lru[key] for key in keys}
            before = {key: previous[key] if previous[key] != self.inserted[key] else self.demoted.get(key) for key in keys}
            self._model_touch(keys)
            for key in keys:
                if before[key] is not None:
                    self.pass_start = before[key]
                self.demoted[key] = self.clock
                if key in self.block:
                    self.block.remove(key)
                self.block.insert(0, key)

    def _model_make_room(self, shortfall: int, protected: set) -> None:
        """Drop the first ``shortfall`` victims, and those other unpinned resident pages of the loop
        allocations among them that the pager sent off too (a loop allocation leaves whole as far
        as the host's room allows): each must be one of them."""
        if shortfall <= 0:
            return
        victims = self._model_victims(protected)[:shortfall]
        if self.policy != "lru":  # the model follows LRU only: what is resident is not checked
            self.rest_taken.clear()
            for key in victims:
                self._model_drop(key)
            return
        whole = {key[0] for key in victims if key[0] in self.loop}
        allowed = {key for key in self.lru if key[0] in whole and key not in protected and key not in victims}
        rest = self.rest_taken.pop(0)
        assert set(rest) <= allowed, f"pages {sorted(set(rest) - allowed)} left as the rest of a loop allocation; allowed {sorted(allowed)}"
        for key in victims + rest:
            self._model_drop(key)

    def _model_fits(self, keys: list, protected: set) -> bool:
        missing = sum(key not in self.lru for key in keys)
        return missing <= self.device_pages - len(self.lru) + len(self._model_victims(protected))

    def _model_touch(self, keys: list) -> None:
        self.clock += 1
        for key in keys:
            del self.lru[key]
            self.lru[key] = self.clock

    def _model_victims(self, protected: set) -> list[tuple[int, int]]:
        """LRU's order with the loop block after the stale pages (last used before ``pass_start``)."""
        outside = [(key, tick) for key, tick in self.lru.items() if key not in protected and key not in self.block]
        if not self.block:
            return [key for key, _ in outside]
        split = next((index for index, (_, tick) in enumerate(outside) if tick >= self.pass_start), len(outside))
        block = [key for key in self.block if key not in protected]
        return [key for key, _ in outside[:split]] + block + [key for key, _ in outside[split:]]

    def _model_drop(self, key: tuple[int, int]) -> None:
        del self.lru[key], self.inserted[key]
        if key in self.block:
            self.block.remove(key)

    def _model_chunks(self, allocation_id: int, first: int, stop: int) -> None:
        size = max(1, self.device_pages // 2)
        for start in range(first, stop, size):
            self._model_fault(allocation_id, start, min(stop, start + size))

    # ------------------------------------------------------------------ rules

    @rule(target=allocations, pages=st.integers(1, 4), tail=st.integers(0, PAGE - 1))
    def allocate(self, pages: int, tail: int):
        nbytes = (pages - 1) * PAGE + max(1, tail)
        allocation = self.pager.allocate(nbytes)
        self.data[allocation.id] = torch.zeros(nbytes, dtype=torch.uint8)
        self.live[allocation.id] = allocation
        return allocation

    @rule(allocation=allocations, data=st.data())
    def write(self, allocation, data):
        if allocation.id not in self.live:
            return
        nbytes = allocation.nbytes
        offset = data.draw(st.integers(0, nbytes - 1), label="offset")
        length = data.draw(st.integers(1, nbytes - offset), label="length")
        seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
        payload = torch.randint(0, 256, (length,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
        self.pager.write(allocation, payload, offset)
        self.data[allocation.id][offset : offset + length] = payload
        first, stop = allocation.page_range(offset, offset + length)
        self._model_chunks(allocation.id, first, stop)
        for index in range(first, stop):  # written: an overwrite in flight on them is done
            self.overwriting.pop((allocation.id, index), None)

    @rule(allocation=allocations, data=st.data())
    def read(self, allocation, data):
        if allocation.id not in self.live:
            return
        offset = data.draw(st.integers(0, allocation.nbytes - 1), label="offset")
        length = data.draw(st.integers(1, allocation.nbytes - offset), label="length")
        got = self.pager.read(allocation, offset, length)
        expected = self.data[allocation.id][offset : offset + length]
        assert torch.equal(got, expected), f"allocation {allocation.id} bytes [{offset}, {offset + length}) differ"
        self._model_chunks(allocation.id, *allocation.page_range(offset, offset + length))

    @rule(data=st.data())
    def scan(self, data):
        """Every live allocation read in full, in a drawn order: many clean device copies at once,
        in any order relative to the dirty pages already there."""
        order = data.draw(st.permutations(sorted(self.live)), label="order")
        for allocation_id in order:
            got = self.pager.read(self.live[allocation_id])
            assert torch.equal(got, self.data[allocation_id]), f"allocation {allocation_id} differs on a full read"
            self._model_chunks(allocation_id, 0, self.live[allocation_id].num_pages)

    @rule(allocation=allocations, data=st.data())
    def prefetch(self, allocation, data):
        if allocation.id not in self.live:
            return
        start = data.draw(st.integers(0, allocation.num_pages - 1), label="start")
        stop = data.draw(st.integers(start + 1, min(allocation.num_pages, start + 2)), label="stop")
        self.pager.prefetch(allocation, start, stop).result()
        self._model_fault(allocation.id, start, stop, use=False)

    @rule(data=st.data())
    def prefetch_together(self, data):
        """Whole allocations prefetched as one batch; if they do not fit beside the pinned pages
        together, each is prefetched on its own as far as it fits."""
        if not self.live:
            return
        ids = data.draw(st.lists(st.sampled_from(sorted(self.live)), min_size=1, max_size=3, unique=True), label="together")
        self.pager.prefetch_together([self.live[i] for i in ids]).result()
        keys = [(i, index) for i in ids for index in range(self.live[i].num_pages) if (i, index) in self.with_bytes]
        if any(i not in self.loop for i in ids):  # one touch of the resident pages of those not in a loop
            self._model_touch([key for key in keys if key in self.lru and key[0] not in self.loop])
        pinned = self._pinned_keys()
        whole = {(i, index) for i in ids for index in range(self.live[i].num_pages)}  # pinned while prefetched
        if self._model_fits(keys, pinned | whole):
            self._model_make_room(sum(key not in self.lru for key in keys) - (self.device_pages - len(self.lru)), pinned | whole)
            for key in keys:
                if key not in self.lru:
                    self.clock += 1
                    self.lru[key] = self.inserted[key] = self.clock
            return
        for i in ids:  # one at a time
            own = [(i, index) for index in range(self.live[i].num_pages)]
            if self._model_fits([key for key in own if key in self.with_bytes], pinned | set(own)):
                self._model_fault(i, 0, len(own), use=False)
            elif i not in self.loop:  # touched before the room it could not get
                self._model_touch([key for key in own if key in self.lru])

    @rule(allocation=allocations, loop=st.booleans())
    def advise(self, allocation, loop: bool):
        if allocation.id not in self.live:
            return
        self.pager.advise(allocation, "loop" if loop else "normal")
        (self.loop.add if loop else self.loop.discard)(allocation.id)
        if not loop:
            self.block = [key for key in self.block if key[0] != allocation.id]
            self.demoted = {key: tick for key, tick in self.demoted.items() if key[0] != allocation.id}

    @precondition(lambda self: len(self.pinned) < 2)
    @rule(allocation=allocations, overwrite=st.booleans(), data=st.data())
    def pin(self, allocation, overwrite: bool, data):
        """Pin one or two pages; two pins may overlap or repeat a range, holding at most two pages
        between them (reads fault two pages at a time into the rest of the device tier). With
        ``overwrite`` some of them are named to be overwritten whole (``discard``)."""
        if allocation.id not in self.live:
            return
        start = data.draw(st.integers(0, allocation.num_pages - 1), label="start")
        stop = data.draw(st.integers(start + 1, min(allocation.num_pages, start + 2)), label="stop")
        if len(self._pinned_keys() | {(allocation.id, index) for index in range(start, stop)}) > 2:
            return
        discard = data.draw(st.lists(st.sampled_from(range(start, stop)), unique=True), label="discard") if overwrite else []
        bytes_of = self.data[allocation.id]
        zero_filled = [index for index in discard if allocation.pages[index].device_slot is None]
        for index in zero_filled:
            page = allocation.pages[index]
            key = (allocation.id, index)
            if page.host_slot is not None or page.disk_slot is not None:
                self.overwriting[key] = bytes_of[index * PAGE : index * PAGE + page.nbytes].clone()
            bytes_of[index * PAGE : index * PAGE + page.nbytes] = 0  # the slot reads as zeros until released
        resident = self.pager.ensure_resident(allocation, start, stop, discard=discard)
        self._model_fault(allocation.id, start, stop)
        slots = {(allocation.id, page.index): page.device_slot for page in resident.pages}
        self.pinned.append((resident, slots))

    @precondition(lambda self: bool(self.pinned))
    @rule(write=st.booleans(), value=st.integers(0, 255), data=st.data())
    def unpin(self, write: bool, value: int, data):
        """Release a pin, after writing all of its pages (``dirty=True``) or some of them (``dirty``
        names the pages written) or none."""
        resident, slots = self.pinned.pop(data.draw(st.integers(0, len(self.pinned) - 1), label="which"))
        dirty: object = False
        if write:
            indices = [index for _, index in slots]
            written = data.draw(st.one_of(st.just(indices), st.lists(st.sampled_from(indices), unique=True)), label="written")
            dirty = True if written == indices else written
            resident.wait()
            for page, view in zip(resident.pages, resident.views()):
                if page.index in written:
                    view.fill_(value)
                    self.data[page.allocation_id][page.index * PAGE : page.index * PAGE + page.nbytes] = value
        resident.release(dirty=dirty)
        written_keys = {key for key in slots if dirty is True or (dirty and key[1] in dirty)}
        for key in written_keys:
            self.overwriting.pop(key, None)
        still_pinned = self._pinned_keys()
        for page in resident.overwritten:  # released unwritten: the old bytes are back
            key = (page.allocation_id, page.index)
            old = self.overwriting.pop(key, None)
            if old is None:
                continue
            self.data[key[0]][key[1] * PAGE : key[1] * PAGE + page.nbytes] = old
            if key not in still_pinned:  # the zero-filled slot is dropped; a pinned one is refilled
                self._model_drop(key)
                # (forgotten by the policy, as a page whose bytes were to go: its last use as a loop
                # page with it)
                self.demoted.pop(key, None)

    @rule(allocation=allocations, data=st.data())
    def write_back(self, allocation, data):
        """Resident pages of a range get host copies and stay where they are: no page moves on the
        device tier (the LRU model is unchanged), one D2H copy a page written back, and no other
        page loses the lower copy of its device copy (that copy would have been wasted: its
        eviction copies it again). Each unpinned resident page of the range then has a lower copy,
        unless the host tier had no such room left: then it holds only the range's pages and host
        copies that are the only lower copy of a device page (other host pages spill to the
        unlimited disk tier)."""
        if allocation.id not in self.live:
            return
        start = data.draw(st.integers(0, allocation.num_pages - 1), label="start")
        stop = data.draw(st.integers(start + 1, allocation.num_pages), label="stop")
        resident_before = [page.device_slot for page in allocation.pages]
        pages = [page for live in self.live.values() for page in live.pages]
        clean_before = [page for page in pages if page.device_slot is not None and (page.host_slot is not None or page.disk_slot is not None)]
        d2h = self.pager.stats()["bytes_d2h"]
        written = self.pager.write_back(allocation, start, stop)
        assert self.pager.stats()["bytes_d2h"] - d2h == written * PAGE
        for page in clean_before:
            assert page.host_slot is not None or page.disk_slot is not None, f"write_back dropped the lower copy of {page}"
        in_range = set(allocation.pages[start:stop])
        left = [page for page in in_range if page.device_slot is not None and page.pin_count == 0 and page.host_slot is None and page.disk_slot is None]
        if left:
            host = [page for page in pages if page.host_slot is not None]
            assert len(host) == self.host_pages, (left, host)
            assert all(page in in_range or (page.device_slot is not None and page.disk_slot is None) for page in host), host
        assert [page.device_slot for page in allocation.pages] == resident_before

    @rule()
    def evict_all(self):
        self.pager.evict_all()
        pinned = self._pinned_keys()
        self.lru = {key: tick for key, tick in self.lru.items() if key in pinned}
        self.inserted = {key: tick for key, tick in self.inserted.items() if key in pinned}
        self.block = [key for key in self.block if key in pinned]
        assert self.pager.stats()["resident_bytes"]["device"] == len(pinned) * PAGE

    @rule(allocation=consumes(allocations))
    def free(self, allocation):
        if allocation.id not in self.live or allocation.id in {a for a, _ in self._pinned_keys()}:
            return
        self.pager.free(allocation)
        del self.live[allocation.id]
        self.lru = {key: tick for key, tick in self.lru.items() if key[0] != allocation.id}
        self.with_bytes = {key for key in self.with_bytes if key[0] != allocation.id}
        self.inserted = {key: tick for key, tick in self.inserted.items() if key[0] != allocation.id}
        self.block = [key for key in self.block if key[0] != allocation.id]
        self.demoted = {key: tick for key, tick in self.demoted.items() if key[0] != allocation.id}

    # ------------------------------------------------------------------ invariants

    @invariant()
    def budgets_hold(self):
        stats = self.pager.stats()
        assert stats["resident_bytes"]["device"] <= self.device_pages * PAGE
        assert stats["resident_bytes"]["host"] <= self.host_pages * PAGE
        assert stats["device_slab_bytes"] <= self.device_pages * PAGE
        assert stats["host_slab_bytes"] <= self.host_pages * PAGE

    @invariant()
    def page_table_is_coherent(self):
        device = host = disk = 0
        for allocation in self.live.values():
            for info in self.pager.page_table(allocation):
                copies = sum(slot is not None for slot in (info.device_slot, info.host_slot, info.disk_slot))
                if info.dirty:
                    assert copies == 1 and info.disk_slot is None, info
                device += info.device_slot is not None
                host += info.host_slot is not None
                disk += info.disk_slot is not None
        resident = self.pager.stats()["resident_bytes"]
        assert resident == {"device": device * PAGE, "host": host * PAGE, "disk": disk * PAGE}

    @invariant()
    def pages_never_held_have_no_copy(self):
        for allocation in self.live.values():
            for info in self.pager.page_table(allocation):
                if (allocation.id, info.index) not in self.with_bytes:
                    assert info.tier is None, (allocation.id, info)

    @invariant()
    def policies_remember_only_live_pages(self):
        """What a policy remembers of pages it evicted (2Q's ghosts) is of live pages with bytes: a
        freed or discarded page is forgotten."""
        for policy in (self.pager.device_policy, self.pager.host_policy):
            for page in policy.remembered():
                assert page.allocation_id in self.live and (page.allocation_id, page.index) in self.with_bytes, page

    @invariant()
    def pinned_pages_stay(self):
        for resident, slots in self.pinned:
            for (allocation_id, index), slot in slots.items():
                page = resident.allocation.pages[index]
                assert page.device_slot == slot and page.pin_count > 0, (allocation_id, index, page)

    @invariant()
    def pin_counts_are_the_held_pins(self):
        """Each page's pin count is the number of unreleased pins covering it; no pin outlives its release."""
        for allocation in self.live.values():
            expected = [
                sum(resident.allocation is allocation and resident.start <= index < resident.stop for resident, _ in self.pinned)
                for index in range(allocation.num_pages)
            ]
            assert [info.pin_count for info in self.pager.page_table(allocation)] == expected, (allocation.id, allocation.pins)

    @invariant()
    def current_resident_runs_are_true(self):
        """A resident run the pager keeps (it would use it for the same range) names the pages'
        present slots, with no copy in flight into them."""
        for allocation in self.live.values():
            run = allocation.resident_run
            if run is None:
                continue
            pages = allocation.pages[run.start : run.stop]
            assert [page.device_slot for page in pages] == run.slots, (allocation.id, run)
            assert all(page.ready is None for page in pages), (allocation.id, run)
            assert run.first_slot == self.pager.device_tier.first_of_run(run.slots), (allocation.id, run)
            if not run.lower_copies:
                assert all(page.host_slot is None and page.disk_slot is None for page in pages), (allocation.id, run)

    @invariant()
    def device_holds_what_the_model_predicts(self):
        if self.policy != "lru":
            return
        actual = {
            (allocation.id, info.index)
            for allocation in self.live.values()
            for info in self.pager.page_table(allocation)
            if info.device_slot is not None
        }
        assert actual == set(self.lru), f"device holds {sorted(actual)}, LRU model predicts {sorted(self.lru)}"
        assert self.pager.device_policy.order() == [
            self.live[allocation_id].pages[index] for allocation_id, index in self.lru
        ], "device LRU order differs from the model"


class TwoQPagerMachine(PagerMachine):
    policy = "2q"


class CompressedPagerMachine(PagerMachine):
    compression = "zstd"


class WideHostPagerMachine(PagerMachine):
    """A device tier twice the host tier: evictions move two pages per chunk (half the host tier),
    so one chunk can hold a dirty page and a clean page whose host copy is its only other copy.
    Making host room for the dirty page must not drop that copy (with ``scan`` this machine finds
    the pager bug that lost it)."""

    device_pages = 8
    host_pages = 4


class SmallHostPagerMachine(PagerMachine):
    """A host tier of a third of the device tier: it fills with host copies of pages still on the
    device (faults from host, write-backs), so a write-back of other pages finds no free slot.
    Making room by dropping one of those copies (with ``write_back`` this machine finds the pager
    bug that did) wastes the copy: that page's eviction copies it again."""

    device_pages = 6
    host_pages = 2


TestPagerLRU = PagerMachine.TestCase
TestPagerLRU.settings = settings(max_examples=300, stateful_step_count=50, deadline=None)
TestPager2Q = TwoQPagerMachine.TestCase
TestPager2Q.settings = settings(max_examples=150, stateful_step_count=50, deadline=None)
TestPagerWideHost = WideHostPagerMachine.TestCase
TestPagerWideHost.settings = settings(max_examples=200, stateful_step_count=50, deadline=None)
TestPagerSmallHost = SmallHostPagerMachine.TestCase
TestPagerSmallHost.settings = settings(max_examples=200, stateful_step_count=50, deadline=None)
TestPagerZstd = pytest.mark.skipif(importlib.util.find_spec("zstandard") is None, reason="zstandard is not installed")(
    CompressedPagerMachine.TestCase
)
TestPagerZstd.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
