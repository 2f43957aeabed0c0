"""Pager behaviour beyond the state machine: errors that lose nothing, corruption, granularity,
write-back of dirty pages only, prefetch, threads, metrics."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import errno
import gc
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import weakref
from typing import Callable, Optional

import numpy
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from pagedtensor import DeviceTierFullError, MemoryConfig, OutOfPagesError, PageCorruptionError, PagedTensor, Pager, SlabAllocationError
from pagedtensor.pager import Allocation, ResidentPages
from tests.support import CPU_AND_CUDA, ClosedWhileWaiting, collect_inside_first_eviction, run_in_threads

PAGE = 4096


def make_pager(nvme=None, device_pages=4, host_pages=4, **kwargs) -> Pager:
    defaults = dict(prefetch_strategy="none", device="cpu")
    return Pager(MemoryConfig(vram_limit=device_pages * PAGE, host_memory=host_pages * PAGE, page_size=PAGE, nvme_path=nvme, **{**defaults, **kwargs}))


def random_bytes(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_stats_has_every_counter_and_tier():
    with make_pager() as pager:
        stats = pager.stats()
        for key in ("faults", "hits", "evictions", "bytes_h2d", "bytes_d2h", "bytes_to_disk", "bytes_from_disk"):
            assert stats[key] == 0
        assert stats["resident_bytes"] == {"device": 0, "host": 0, "disk": 0}


def test_faults_only_the_requested_pages():
    with make_pager(device_pages=8) as pager:
        allocation = pager.allocate(8 * PAGE)
        with pager.ensure_resident(allocation, 2, 5):
            pass
        assert pager.stats()["faults"] == 3
        assert [info.tier for info in pager.page_table(allocation)] == [None, None, "device", "device", "device", None, None, None]
        with pager.ensure_resident(allocation, 3, 6):
            pass
        assert (pager.stats()["faults"], pager.stats()["hits"]) == (4, 2)


@pytest.mark.parametrize("eviction_policy", ["lru", "2q"])
def test_a_fault_from_a_full_host_tier_spills_another_page_than_the_one_it_brings_in(nvme_dir, eviction_policy):
    """Faulting in a page held in a full host tier, with the device tier full of pages that have no
    lower copy: the device page leaving needed a host slot, and the host policy's victim was the
    very page being brought in, which went to disk and was read straight back (two pages written
    to disk and one read, for a one-page fault). The host copies of the pages being brought in are
    kept where another page can make the room: one page written to disk, none read."""
    with make_pager(nvme_dir, device_pages=2, host_pages=2, slab_size=2 * PAGE, eviction_policy=eviction_policy) as pager:
        allocation = pager.allocate(6 * PAGE)
        data = random_bytes(6 * PAGE)
        pager.write(allocation, data)
        assert [info.tier for info in pager.page_table(allocation)] == ["disk", "disk", "host", "host", "device", "device"]
        before = pager.stats()
        with pager.ensure_resident(allocation, 2, 3):
            pass
        after = pager.stats()
        moved = {key: after[key] - before[key] for key in ("bytes_to_disk", "bytes_from_disk", "bytes_h2d", "bytes_d2h")}
        assert moved == {"bytes_to_disk": PAGE, "bytes_from_disk": 0, "bytes_h2d": PAGE, "bytes_d2h": PAGE}
        assert torch.equal(pager.read(allocation), data)
    # Where the pages brought in are the only ones that could make room, they still do.
    with make_pager(nvme_dir, device_pages=2, host_pages=2, slab_size=2 * PAGE, eviction_policy=eviction_policy) as pager:
        allocation = pager.allocate(4 * PAGE)
        data = random_bytes(4 * PAGE, seed=1)
        pager.write(allocation, data)
        assert [info.tier for info in pager.page_table(allocation)] == ["host", "host", "device", "device"]
        with pager.ensure_resident(allocation, 0, 2):
            pass
        assert [info.tier for info in pager.page_table(allocation)][:2] == ["device", "device"]
        assert torch.equal(pager.read(allocation), data)


def test_only_dirty_pages_are_written_back(nvme_dir):
    with make_pager(nvme_dir) as pager:
        allocation = pager.allocate(2 * PAGE)
        pager.write(allocation, random_bytes(2 * PAGE))
        pager.evict_all()
        assert pager.stats()["bytes_d2h"] == 2 * PAGE
        with pager.ensure_resident(allocation):  # read only: pages stay clean
            pass
        pager.evict_all()
        assert pager.stats()["bytes_d2h"] == 2 * PAGE, "a clean page was written back"
        with pager.ensure_resident(allocation) as pages:
            pages.mark_dirty([1])
        pager.evict_all()
        assert pager.stats()["bytes_d2h"] == 3 * PAGE, "exactly the dirty page is written back"


def test_pinning_more_than_the_device_holds_fails_and_loses_nothing():
    with make_pager(device_pages=4, host_pages=16) as pager:
        allocation = pager.allocate(6 * PAGE)
        data = random_bytes(6 * PAGE)
        pager.write(allocation, data)
        with pager.ensure_resident(allocation, 0, 3):
            with pytest.raises(DeviceTierFullError, match=r"device tier: 2 pages needed \(of a request for 3\), 0 free and only 0 evictable.*pinned"):
                pager.ensure_resident(allocation, 3, 6)
            assert all(info.pin_count == 1 for info in pager.page_table(allocation)[:3])
            assert all(info.pin_count == 0 for info in pager.page_table(allocation)[3:])
        assert torch.equal(pager.read(allocation), data)


def _written(pager: Pager, pages: int, seed: int) -> tuple[Allocation, torch.Tensor]:
    """An allocation of ``pages`` pages holding random bytes, evicted to the host tier."""
    allocation = pager.allocate(pages * PAGE)
    data = random_bytes(pages * PAGE, seed)
    pager.write(allocation, data)
    pager.evict_all()
    return allocation, data


def _wait_until(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


@pytest.mark.parametrize("pin_wait_s", [60.0, 1e10])
def test_a_request_waits_for_pages_another_thread_pins_and_runs_once_they_are_let_go(pin_wait_s):
    """The device tier full of another thread's pins: a request waits for them (it raised at once
    before), and gets its pages with their bytes once the other thread releases. A ``pin_wait_s``
    past ``threading.TIMEOUT_MAX`` waits too (the wait raised OverflowError)."""
    with make_pager(device_pages=4, host_pages=16, pin_wait_s=pin_wait_s) as pager:
        held, _ = _written(pager, 4, seed=1)
        wanted, data = _written(pager, 2, seed=2)
        pinned, release, got = threading.Event(), threading.Event(), []

        def holder() -> None:
            with pager.ensure_resident(held):
                pinned.set()
                release.wait(timeout=30)

        def requester() -> None:
            with pager.ensure_resident(wanted) as resident:
                got.append(torch.cat([view.clone() for view in resident.views()]))

        threads = [threading.Thread(target=holder), threading.Thread(target=requester)]
        threads[0].start()
        pinned.wait(timeout=30)
        threads[1].start()
        _wait_until(lambda: threads[1].ident in pager._pin_waiters, "the request to wait for the pins")
        assert not got, "the request ran while the other thread's pins filled the device tier"
        release.set()
        for thread in threads:
            thread.join(timeout=30)
        assert got and torch.equal(got[0], data)
        assert all(info.pin_count == 0 for allocation in (held, wanted) for info in pager.page_table(allocation))



def test_a_thread_that_pins_its_pages_twice_still_waits_for_other_threads_pins():
    """A thread's pins were counted per ``ensure_resident``: one holding the same pages twice (nested
    ranges, a range inside another) was taken to fill the tier with its own pins, and its request
    raised at once instead of waiting for another thread's, as it does holding them once."""
    with make_pager(device_pages=4, host_pages=16, pin_wait_s=60.0) as pager:
        mine, _ = _written(pager, 2, seed=1)
        held, _ = _written(pager, 2, seed=2)
        wanted, data = _written(pager, 1, seed=3)
        pinned, release, got, errors = threading.Event(), threading.Event(), [], []

        def holder() -> None:
            with pager.ensure_resident(held):
                pinned.set()
                release.wait(timeout=30)

        def requester() -> None:
            try:
                with pager.ensure_resident(mine), pager.ensure_resident(mine), pager.ensure_resident(mine, 1, 2):
                    with pager.ensure_resident(wanted) as resident:
                        got.append(torch.cat([view.clone() for view in resident.views()]))
            except Exception as error:  # noqa: BLE001 - checked below
                errors.append(error)

        threads = [threading.Thread(target=holder), threading.Thread(target=requester)]
        threads[0].start()
        pinned.wait(timeout=30)
        threads[1].start()
        _wait_until(lambda: threads[1].ident in pager._pin_waiters or not threads[1].is_alive(), "the request to wait or end")
        release.set()
        for thread in threads:
            thread.join(timeout=30)
        assert not errors and got and torch.equal(got[0], data)
        assert not pager._pinned_ranges


@given(st.dictionaries(st.tuples(st.integers(0, 3), st.integers(0, 12), st.integers(0, 12)).filter(lambda key: key[1] < key[2]),
                       st.integers(1, 3), max_size=8))  # fmt: skip
def test_distinct_pages_of_pinned_ranges_count_each_page_once(ranges):
    from pagedtensor.pager import _distinct_pages

    assert _distinct_pages(ranges) == len({(allocation, page) for allocation, start, stop in ranges for page in range(start, stop)})


def test_a_request_that_raises_after_pinning_wakes_the_threads_waiting_for_pins():
    """A request pins its range before it faults pages in; one that then raises (here: more pages than
    the tier) lets its pins go and, as a release does, wakes the threads waiting for pins. It did not:
    threads waiting on a cycle the raising request broke slept their whole pin_wait_s."""
    with make_pager(device_pages=4, host_pages=16) as pager:
        too_big, _ = _written(pager, 5, seed=1)
        waiting, woke = threading.Event(), []

        def waiter() -> None:  # a thread inside the pager's wait for pins, as _wait_for_other_threads_pins puts it
            with pager._lock:
                pager._pin_waiters.add(threading.get_ident())
                waiting.set()
                start = time.monotonic()
                pager._unpinned.wait(30)
                woke.append(time.monotonic() - start)

        thread = threading.Thread(target=waiter, daemon=True)
        thread.start()
        waiting.wait(30)
        with pager._lock:  # taken once the waiter's wait has let it go
            pass
        with pytest.raises(DeviceTierFullError, match="larger than the whole tier"):
            pager.ensure_resident(too_big)
        thread.join(30)
        assert woke and woke[0] < 10, "the waiting thread slept on after the pins went"


def test_threads_that_would_wait_for_each_others_pins_do_not_deadlock():
    """Two threads each pin half the device tier, then each asks for more: waiting for each other
    would never end, so the second to ask raises DeviceTierFullError at once (whatever pin_wait_s);
    its pins go, and the first one's request then runs."""
    with make_pager(device_pages=4, host_pages=16, pin_wait_s=1e6) as pager:
        allocations = [_written(pager, 4, seed) for seed in range(2)]
        barrier = threading.Barrier(2)
        outcomes: list[object] = []

        def worker(index: int) -> None:
            allocation, data = allocations[index]
            with pager.ensure_resident(allocation, 0, 2):
                barrier.wait(timeout=30)
                try:
                    with pager.ensure_resident(allocation, 2, 4) as rest:
                        outcomes.append(torch.equal(torch.cat([view.clone() for view in rest.views()]), data[2 * PAGE :]))
                except DeviceTierFullError as error:
                    outcomes.append(error)

        threads = [threading.Thread(target=worker, args=(index,), daemon=True) for index in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert not any(thread.is_alive() for thread in threads), "deadlock: threads waiting for each other's pins"
        errors = [outcome for outcome in outcomes if isinstance(outcome, DeviceTierFullError)]
        assert len(errors) == 1 and outcomes.count(True) == 1, outcomes


def test_a_wait_for_pins_ends_at_pin_wait_s_and_pins_of_a_finished_thread_are_not_waited_for():
    """A request that another thread's pins keep out waits ``pin_wait_s`` (that thread idles holding
    them), then raises DeviceTierFullError saying it waited; pins left by a thread that has ended
    (it never released them) are never let go, so a request raises at once, without the note."""
    with make_pager(device_pages=4, host_pages=16, pin_wait_s=0.2) as pager:
        held, _ = _written(pager, 4, seed=1)
        wanted, _ = _written(pager, 1, seed=2)
        pinned, release = threading.Event(), threading.Event()

        def holder() -> None:
            with pager.ensure_resident(held):
                pinned.set()
                release.wait(timeout=30)

        thread = threading.Thread(target=holder)
        thread.start()
        pinned.wait(timeout=30)
        try:
            with pytest.raises(DeviceTierFullError, match=r"device tier: 1 pages needed .*; waited 0\.[2-9]\d* s for other threads' pins"):
                pager.ensure_resident(wanted)
        finally:
            release.set()
            thread.join(timeout=30)
        left: list[ResidentPages] = []
        ender = threading.Thread(target=lambda: left.append(pager.ensure_resident(held)))
        ender.start()
        ender.join(timeout=30)
        with pytest.raises(DeviceTierFullError) as raised:
            pager.ensure_resident(wanted)
        assert "waited" not in str(raised.value)
        left[0].release()
        with pager.ensure_resident(wanted):
            pass


def test_closing_the_pager_ends_a_wait_for_pins_with_the_closed_error():
    """A close() by another thread wakes a request waiting for pins, which raises the closed pager's error."""
    with make_pager(device_pages=4, host_pages=16) as pager:
        held, _ = _written(pager, 4, seed=1)
        wanted, _ = _written(pager, 1, seed=2)
        resident = pager.ensure_resident(held)
        errors: list[BaseException] = []

        def request() -> None:
            try:
                pager.ensure_resident(wanted)
            except BaseException as error:  # noqa: BLE001 - checked below
                errors.append(error)

        waiter = threading.Thread(target=request)
        waiter.start()
        _wait_until(lambda: bool(pager._pin_waiters), "the request to wait for the pins")
        pager.close()
        waiter.join(timeout=30)
        assert len(errors) == 1 and isinstance(errors[0], RuntimeError) and "closed" in str(errors[0]), errors
        resident.release()  # after close: a no-op


def test_a_request_that_waited_for_the_lock_while_another_thread_began_closing_the_pager_raises_closed():
    """close() marks the pager closed under the lock, then lets go of it (waiting for the prefetch
    thread) before releasing the tiers: an ensure_resident that got the lock in between went on (it
    pinned pages of a closed pager, or, where the device tier was full of other threads' pins,
    waited until pin_wait_s for releases that do nothing on a closed pager)."""
    pager = make_pager(device_pages=4, host_pages=16)
    wanted, _ = _written(pager, 1, seed=2)
    lock = pager._lock

    class ClosingWhileWaiting:
        """The pager's lock, taken by another thread's close() first: it marks the pager closed and
        lets go before releasing the tiers."""

        def __enter__(self) -> None:
            pager._lock = lock
            pager.closed = True
            lock.acquire()

        def __exit__(self, *exc_info: object) -> None:
            lock.release()

    pager._lock = ClosingWhileWaiting()
    with pytest.raises(RuntimeError, match="this Pager is closed"):
        pager.ensure_resident(wanted, 0, 1)  # a range in full: the path that skips the argument checks
    assert pager._lock is lock
    pager.close()  # the rest of the close: the tiers go


def test_pinned_pages_survive_evict_all():
    with make_pager() as pager:
        allocation = pager.allocate(3 * PAGE)
        pager.write(allocation, random_bytes(3 * PAGE))
        with pager.ensure_resident(allocation, 1, 2) as pinned:
            slot = pinned.pages[0].device_slot
            pager.evict_all()
            assert [info.tier for info in pager.page_table(allocation)] == ["host", "device", "host"]
            assert pinned.pages[0].device_slot == slot


def test_full_host_without_disk_raises_and_keeps_data():
    with make_pager(device_pages=2, host_pages=2) as pager:
        first = pager.allocate(3 * PAGE)  # 3 of the 4 slots: moving pages needs one free slot
        data = random_bytes(3 * PAGE)
        pager.write(first, data)
        second = pager.allocate(2 * PAGE)
        with pytest.raises(OutOfPagesError, match="nvme_path=None"):
            pager.write(second, random_bytes(2 * PAGE, seed=1))
        with pytest.raises(OutOfPagesError):
            pager.evict_all()
        pager.free(second)  # the failed write took nothing of the first allocation
        assert torch.equal(pager.read(first), data)
        assert torch.equal(pager.read(first), data)


def test_corrupted_disk_page_raises_never_returns_wrong_bytes(nvme_dir):
    with make_pager(nvme_dir, device_pages=2, host_pages=2) as pager:
        allocation = pager.allocate(8 * PAGE)
        data = random_bytes(8 * PAGE)
        pager.write(allocation, data)
        pager.evict_all()
        on_disk = [info for info in pager.page_table(allocation) if info.tier == "disk"]
        assert on_disk, "the test needs pages on the disk tier"
        victim = on_disk[0]
        with open(pager.disk_tier.fd_path, "r+b") as handle:
            handle.seek(victim.disk_slot * PAGE + 100)
            byte = handle.read(1)
            handle.seek(victim.disk_slot * PAGE + 100)
            handle.write(bytes([byte[0] ^ 0xFF]))
        with pytest.raises(PageCorruptionError):
            pager.read(allocation, victim.index * PAGE, PAGE)
        for info in on_disk[1:]:  # the other pages still read back right
            assert torch.equal(pager.read(allocation, info.index * PAGE, PAGE), data[info.index * PAGE : (info.index + 1) * PAGE])


def test_sequential_prefetch_brings_the_next_pages():
    with make_pager(device_pages=8, host_pages=8, prefetch_strategy="sequential", prefetch_pages=3) as pager:
        allocation = pager.allocate(8 * PAGE)
        pager.write(allocation, random_bytes(8 * PAGE))
        pager.evict_all()
        before = pager.stats()
        with pager.ensure_resident(allocation, 0, 2):
            pass
        pager.synchronize()
        assert [info.tier for info in pager.page_table(allocation)][:6] == ["device"] * 5 + ["host"]
        assert pager.stats()["prefetched_pages"] - before["prefetched_pages"] == 3
        with pager.ensure_resident(allocation, 2, 5):
            pass
        assert pager.stats()["hits"] - before["hits"] == 3


def test_a_sequential_prefetch_larger_than_the_tier_brings_as_many_pages_as_fit():
    """``prefetch_pages`` beyond what the device tier holds beside the faulted pages prefetches as
    many as fit (it prefetched none: the whole batch was refused, logged at INFO only)."""
    with make_pager(device_pages=8, host_pages=32, prefetch_strategy="sequential", prefetch_pages=20) as pager:
        allocation = pager.allocate(32 * PAGE)
        data = random_bytes(32 * PAGE)
        pager.write(allocation, data)
        pager.evict_all()
        before = pager.stats()["prefetched_pages"]
        with pager.ensure_resident(allocation, 0, 2):
            pass
        pager.synchronize()
        assert pager.stats()["prefetched_pages"] - before == 6
        assert [info.tier for info in pager.page_table(allocation)][:9] == ["device"] * 8 + ["host"]
        assert torch.equal(pager.read(allocation), data)


def test_a_prefetch_leaves_pages_never_written():
    """Pages never written read as zeros with no copy anywhere: a prefetch leaves them (a fault
    zero-fills them). Brought early, four zero-filled pages on a four-page device tier evicted the
    two written pages into the two-slot host tier (no disk tier), and became only copies that
    needed host slots to leave: faulting the written pages back in raised OutOfPagesError."""
    with make_pager(device_pages=4, host_pages=2, prefetch_strategy="sequential", prefetch_pages=4) as pager:
        written, fresh = pager.allocate(2 * PAGE), pager.allocate(4 * PAGE)
        pager.write(written, random_bytes(2 * PAGE, 1))
        assert pager.prefetch(fresh).result() == 0
        assert [info.tier for info in pager.page_table(fresh)] == [None] * 4
        assert torch.equal(pager.read(written), random_bytes(2 * PAGE, 1))
        with pager.ensure_resident(fresh, 0, 1):  # a fault; its sequential prefetch of pages 1-3 brings none
            pass
        assert [info.tier for info in pager.page_table(fresh)] == ["device", None, None, None]
        assert pager.stats()["prefetched_pages"] == 0
        pager.write(fresh, random_bytes(PAGE, 2), 3 * PAGE)  # page 3 written, then moved to the host tier
        pager.evict(fresh, 3, 4)
        assert pager.prefetch(fresh, 1, 4).result() == 1  # of pages 1-3, only the written one
        assert [info.tier for info in pager.page_table(fresh)] == ["device", None, None, "device"]
        assert torch.equal(pager.read(fresh, PAGE, 2 * PAGE), torch.zeros(2 * PAGE, dtype=torch.uint8))
        assert torch.equal(pager.read(fresh, 3 * PAGE), random_bytes(PAGE, 2))


def test_threads_share_one_pager(nvme_dir):
    # Each thread pins at most 3 pages at a time and the prefetcher at most 4: 16 pages never run out.
    with make_pager(nvme_dir, device_pages=16, host_pages=4, prefetch_strategy="sequential") as pager:

        def worker(seed: int) -> None:
            allocation = pager.allocate(2 * PAGE + 1 + seed)
            data = random_bytes(allocation.nbytes, seed)
            for _ in range(5):
                pager.write(allocation, data)
                assert torch.equal(pager.read(allocation), data)
                data = data.roll(1)
            pager.free(allocation)

        errors = run_in_threads(worker, 4)
        assert not errors, errors
        assert pager.stats()["resident_bytes"]["device"] <= 16 * PAGE


def test_prometheus_metrics_match_stats(nvme_dir):
    with make_pager(nvme_dir, device_pages=2, host_pages=2) as pager:
        allocation = pager.allocate(6 * PAGE)
        pager.write(allocation, random_bytes(6 * PAGE))
        pager.read(allocation)
        stats = pager.stats()
        samples = {
            (sample.name, sample.labels.get("tier")): sample.value
            for family in text_string_to_metric_families(pager.metrics.exposition().decode())
            for sample in family.samples
        }
        for key in ("faults", "hits", "evictions", "bytes_h2d", "bytes_d2h", "bytes_to_disk", "bytes_from_disk"):
            assert samples[(f"pagedllm_{key}_total", None)] == stats[key]
        for tier, nbytes in stats["resident_bytes"].items():
            assert samples[("pagedllm_resident_bytes", tier)] == nbytes


def test_metrics_are_read_at_scrape_time_and_names_stay_unique(nvme_dir):
    """Counters change without touching Prometheus; a scrape reads them. A second pager on the same
    registry is refused (its metric names would collide), as the client's own metrics are."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    config = MemoryConfig(vram_limit=2 * PAGE, host_memory=4 * PAGE, page_size=PAGE, device="cpu")
    with Pager(config, registry=registry) as pager:
        allocation = pager.allocate(3 * PAGE)
        pager.write(allocation, random_bytes(3 * PAGE))
        first = registry.get_sample_value("pagedllm_hits_total")
        pager.ensure_resident(allocation, 2, 3).release()
        assert registry.get_sample_value("pagedllm_hits_total") == first + 1 == pager.stats()["hits"]
        assert registry.get_sample_value("pagedllm_resident_bytes", {"tier": "device"}) == pager.stats()["resident_bytes"]["device"]
        open_files = len(os.listdir("/proc/self/fd"))
        with pytest.raises(ValueError, match=r"registry: already holds metrics named pagedllm_\* \(another pager's, not closed\?\); "
                                             r"one registry holds one pager's metrics: give each pager its own CollectorRegistry") as refused:
            Pager(dataclasses.replace(config, nvme_path=nvme_dir), registry=registry)
        # The refused pager's page file and I/O threads are closed at once, not when its frames
        # (held by the error's traceback here) are collected.
        assert refused.tb is not None and len(os.listdir("/proc/self/fd")) == open_files
    with Pager(config, registry=registry):  # the first one closed: its names are free again
        pass


def test_misuse_is_a_clear_error():
    with make_pager() as pager:
        with pytest.raises(ValueError, match="nbytes"):
            pager.allocate(0)
        with pytest.raises(TypeError, match="nbytes"):
            pager.allocate(1.5)
        allocation = pager.allocate(2 * PAGE)
        with pytest.raises(IndexError, match=r"\[1, 3\)"):
            pager.ensure_resident(allocation, 1, 3)
        resident = pager.ensure_resident(allocation)
        with pytest.raises(RuntimeError, match="pinned"):
            pager.free(allocation)
        resident.release()
        with pytest.raises(RuntimeError, match="already released"):
            resident.release()
        pager.free(allocation)
        with pytest.raises(ValueError, match="freed"):
            pager.read(allocation)
    with pytest.raises(RuntimeError, match="closed"):
        pager.allocate(PAGE)


def test_free_returns_every_slot(nvme_dir):
    with make_pager(nvme_dir, device_pages=2, host_pages=2) as pager:
        allocation = pager.allocate(8 * PAGE)
        pager.write(allocation, random_bytes(8 * PAGE))
        assert sum(pager.stats()["resident_bytes"].values()) >= 8 * PAGE
        pager.free(allocation)
        assert pager.stats()["resident_bytes"] == {"device": 0, "host": 0, "disk": 0}


@pytest.mark.parametrize("with_disk", [True, False])
def test_evicting_keeps_the_only_host_copy_of_clean_pages(tmp_path, with_disk):
    """Regression (found by weight paging under a tight budget): evicting a dirty page and a clean
    page in one chunk must not drop the clean page's host copy to make room for the dirty one."""
    with make_pager(str(tmp_path) if with_disk else None, device_pages=8, host_pages=4) as pager:
        allocations = [pager.allocate(PAGE) for _ in range(5)]
        for value, allocation in enumerate(allocations[:4], start=1):
            pager.write(allocation, torch.full((PAGE,), value, dtype=torch.uint8))
        pager.evict_all()  # pages 1-4 on the host only; the host is full
        pager.write(allocations[4], torch.full((PAGE,), 5, dtype=torch.uint8))  # dirty, oldest on the device
        for allocation in allocations[:4]:  # device copies beside clean host copies; the first is the host's LRU
            with pager.ensure_resident(allocation):
                pass
        if with_disk:
            pager.evict_all()  # one chunk holds page 5 (dirty) and page 1 (clean, its host copy its only other copy)
        else:
            with pytest.raises(OutOfPagesError):  # no room for page 5 anywhere: refused, nothing dropped
                pager.evict_all()
        assert [int(pager.read(allocation)[0]) for allocation in allocations] == [1, 2, 3, 4, 5]


def test_writes_to_a_remembered_resident_range_drop_every_stale_lower_copy():
    """An allocation's remembered resident range knows whether its pages still have host copies: a
    write to some of the pages leaves the others' copies (and the record) in place, so a later write
    to all of them still drops every copy that went stale, and eviction writes it back."""
    with make_pager(device_pages=4, host_pages=4) as pager:
        allocation = pager.allocate(2 * PAGE)
        pager.write(allocation, torch.full((2 * PAGE,), 1, dtype=torch.uint8))
        pager.evict_all()
        with pager.ensure_resident(allocation, 0, 2):  # clean device copies beside the host copies
            pass
        assert allocation.resident_run.lower_copies
        with pager.ensure_resident(allocation, 0, 2) as pages:  # the remembered range
            pages.views()[0].fill_(7)
            pages.mark_dirty([0])
        assert [info.host_slot is not None for info in pager.page_table(allocation)] == [False, True]
        assert allocation.resident_run.lower_copies, "page 1 still has its host copy"
        with pager.ensure_resident(allocation, 0, 2) as pages:
            for view in pages.views():
                view.fill_(9)
            pages.mark_dirty()
        assert [info.host_slot for info in pager.page_table(allocation)] == [None, None]
        assert not allocation.resident_run.lower_copies
        pager.evict_all()
        assert torch.equal(pager.read(allocation), torch.full((2 * PAGE,), 9, dtype=torch.uint8))


@pytest.mark.parametrize("shift", [0, PAGE, -PAGE, 100])
def test_a_write_from_a_paged_tensor_of_the_same_allocation_reads_it_first(shift):
    """``pager.write(t.allocation, t[...], offset)``: the source is the allocation's own bytes, read
    before any is written (as a copy between overlapping plain buffers, memmove). The pages the
    write covers whole were zero-filled for it before the source, off the device, was read from
    them: every byte came back 0."""
    values = random_bytes(8 * PAGE, seed=3)
    with make_pager(device_pages=4, host_pages=16) as pager:
        paged = PagedTensor.wrap(values.clone(), pager)
        pager.evict_all()
        source_start, target_start = max(0, -shift), max(0, shift)
        length = 8 * PAGE - abs(shift)
        pager.write(paged.allocation, paged[source_start : source_start + length], offset=target_start)
        expected = values.clone()
        expected[target_start : target_start + length] = values[source_start : source_start + length].clone()
        assert torch.equal(pager.read(paged.allocation), expected)
        pager.evict_all()
        assert torch.equal(pager.read(paged.allocation), expected)


# ---------------------------------------------------------------------- overwrites that fail


def test_a_write_that_fails_leaves_the_pages_it_covers_their_old_bytes(nvme_dir, monkeypatch):
    """A write covering page 1 whole and pages 0 and 2 in part must read pages 0 and 2 back from disk;
    when that read fails (an I/O error) page 1 keeps its old bytes, not a zero-filled slot."""
    with make_pager(nvme_dir, device_pages=6, host_pages=1) as pager:
        target = pager.allocate(3 * PAGE)
        pager.write(target, torch.full((3 * PAGE,), 0xAB, dtype=torch.uint8))
        pager.evict_all()
        pager.write(pager.allocate(PAGE), torch.ones(PAGE, dtype=torch.uint8))
        pager.evict_all()  # the target's pages are on disk only
        assert all(info.tier == "disk" for info in pager.page_table(target))
        real_read = pager.disk_tier.read_pages

        def failing_read(pages):
            raise OSError(errno.EIO, "injected read error")

        monkeypatch.setattr(pager.disk_tier, "read_pages", failing_read)
        with pytest.raises(OSError, match="injected read error"):
            pager.write(target, torch.full((3 * PAGE - 200,), 0xCD, dtype=torch.uint8), offset=100)
        monkeypatch.setattr(pager.disk_tier, "read_pages", real_read)
        assert torch.equal(pager.read(target), torch.full((3 * PAGE,), 0xAB, dtype=torch.uint8))


def test_a_full_file_system_under_the_disk_tier_raises_and_loses_no_page(nvme_dir, monkeypatch):
    """Without disk_limit only the file system bounds the disk tier. Here it holds 4 pages (a write
    from the 5th slot on fails with ENOSPC, as on a full tmpfs): what needs more disk room raises
    OSError naming the file system and disk_limit, every page keeps its bytes in the tier above, and
    once allocations are freed the others read back whole."""
    from pagedtensor.tiers.diskio import OP_WRITE

    with make_pager(nvme_dir, device_pages=2, host_pages=2) as pager:
        real_submit = pager.disk_tier._engine.submit

        def full_after_four_slots(requests):
            return [-errno.ENOSPC if request.op == OP_WRITE and request.offset >= 4 * PAGE else real_submit([request])[0]
                    for request in requests]  # fmt: skip

        monkeypatch.setattr(pager.disk_tier._engine, "submit", full_after_four_slots)
        allocations, contents = [], []
        with pytest.raises(OSError, match="No space left on device; its file system is full: .*disk_limit") as info:
            for seed in range(10):
                data = random_bytes(2 * PAGE, seed)
                allocation = pager.allocate(2 * PAGE)
                allocations.append(allocation)
                contents.append(data)
                pager.write(allocation, data)
        assert info.value.errno == errno.ENOSPC and len(allocations) < 10
        for allocation, data in zip(allocations[:-1], contents):  # the last write raised: its bytes may be unwritten
            try:  # a read that must evict another page to the disk needs room there
                assert torch.equal(pager.read(allocation), data)
            except OSError as error:
                assert error.errno == errno.ENOSPC
        pager.free(allocations[0])
        pager.free(allocations[1])
        for allocation, data in zip(allocations[2:-1], contents[2:]):
            assert torch.equal(pager.read(allocation), data)


def _disk_full_after(pager: Pager, slots: int, monkeypatch, code: int = errno.ENOSPC) -> None:
    """The disk tier's file system holds ``slots`` pages: a write from the next slot on fails with
    ``code`` (ENOSPC: a full file system, EDQUOT: a quota, EFBIG: a file-size limit)."""
    from pagedtensor.tiers.diskio import OP_WRITE

    real_submit = pager.disk_tier._engine.submit

    def full(requests):
        return [-code if request.op == OP_WRITE and request.offset >= slots * PAGE else real_submit([request])[0]
                for request in requests]  # fmt: skip

    monkeypatch.setattr(pager.disk_tier._engine, "submit", full)


def _two_pages_a_tier(nvme_dir: str, disk_limit: Optional[int], file_system_pages: int, monkeypatch) -> Pager:
    """A pager of 2 device and 2 host pages whose disk tier holds ``file_system_pages`` pages: by
    ``disk_limit`` of that size, or (``disk_limit`` None) a file system full past them."""
    pager = make_pager(nvme_dir, device_pages=2, host_pages=2, slab_size=2 * PAGE, disk_limit=disk_limit)
    if disk_limit is None:
        _disk_full_after(pager, file_system_pages, monkeypatch)
    return pager


@pytest.mark.parametrize("disk_limit", [None, 4 * PAGE])
def test_on_a_full_file_system_room_comes_from_clean_copies_as_under_disk_limit(nvme_dir, monkeypatch, disk_limit):
    """A file system of 4 pages under the disk tier, 2 device and 2 host pages, eight 1-page
    allocations, two freed: 6 pages for 8 slots. Every other one reads back whole, as it does with
    ``disk_limit`` of 4 pages: room is made by dropping copies that are clean caches of another (it
    spilled a host-only page to a slot past the file system's end, raising ENOSPC on every read,
    where a host or disk copy of a page also on the device could go). ``write_back`` on the full file
    system writes back what room allows and returns the count, as under ``disk_limit``."""
    with _two_pages_a_tier(nvme_dir, disk_limit, 4, monkeypatch) as pager:
        allocations = []
        for seed in range(9):
            allocation = pager.allocate(PAGE)
            try:
                pager.write(allocation, random_bytes(PAGE, seed))
                allocations.append((allocation, seed))
            except (OSError, OutOfPagesError):  # the 9th page has no room
                pager.free(allocation)
        assert len(allocations) == 8
        pager.free(allocations.pop(0)[0])
        pager.free(allocations.pop(0)[0])
        for _ in range(2):
            for allocation, seed in allocations:
                assert torch.equal(pager.read(allocation), random_bytes(PAGE, seed)), seed
        extra = pager.allocate(PAGE)
        pager.write(extra, random_bytes(PAGE, 99))
        assert pager.write_back(extra) in (0, 1)
        for allocation, seed in [*allocations, (extra, 99)]:
            assert torch.equal(pager.read(allocation), random_bytes(PAGE, seed)), seed


@pytest.mark.parametrize("disk_limit", [None, 2 * PAGE])
def test_a_batched_prefetch_on_a_full_file_system_brings_what_fits_as_under_disk_limit(nvme_dir, monkeypatch, disk_limit):
    """Every tier full of pages that are their only copies (2 device, 2 host, a file system of 2
    pages under the disk tier): ``prefetch_together`` of the two disk pages finds no room and
    returns 0, as under ``disk_limit`` (its future raised the file system's OSError, the one-by-one
    way round never tried), every page where it was."""
    with _two_pages_a_tier(nvme_dir, disk_limit, 2, monkeypatch) as pager:
        allocations = []
        for seed in range(6):
            allocation = pager.allocate(PAGE)
            pager.write(allocation, random_bytes(PAGE, seed))
            allocations.append(allocation)
        tiers = [info.tier for allocation in allocations for info in pager.page_table(allocation)]
        assert tiers == ["disk", "disk", "host", "host", "device", "device"]
        assert pager.prefetch_together(allocations[:2]).result() == 0
        assert [info.tier for allocation in allocations for info in pager.page_table(allocation)] == tiers
        for seed in (4, 5):  # (a page off the device has no room to come back: every tier is full of only copies)
            assert torch.equal(pager.read(allocations[seed]), random_bytes(PAGE, seed)), seed


def _five_allocations_of_six_pages_read_back_twice(pager: Pager) -> None:
    """Writes five 6-page allocations (30 pages) and reads each back whole, twice."""
    allocations = []
    for seed in range(5):
        allocation = pager.allocate(6 * PAGE)
        pager.write(allocation, random_bytes(6 * PAGE, seed))
        allocations.append((allocation, seed))
    for _ in range(2):
        for allocation, seed in allocations:
            assert torch.equal(pager.read(allocation), random_bytes(6 * PAGE, seed)), seed
    assert not pager._pinned_ranges


@pytest.mark.parametrize(("disk_limit", "code"), [(None, errno.ENOSPC), (None, errno.EDQUOT), (None, errno.EFBIG), (16 * PAGE, None)])
def test_allocations_larger_than_a_tier_read_back_from_a_full_file_system_as_under_disk_limit(nvme_dir, monkeypatch, disk_limit, code):
    """8 device and 8 host pages, a file system of 16 pages under the disk tier, five 6-page
    allocations (30 pages): each reads back whole, as with ``disk_limit`` of 16 pages. A read whose
    room the full file system refused raised its OSError, so the pager's way round a full lower tier
    (bring the pages half at a time, a swap at a time) never ran: four of the five raised ENOSPC. A
    quota (EDQUOT) and a file-size limit (EFBIG: ``ulimit -f``, FAT32's 4 GiB) end the page file as a
    full file system does (EFBIG was raised)."""
    with make_pager(nvme_dir, device_pages=8, host_pages=8, slab_size=8 * PAGE, disk_limit=disk_limit) as pager:
        if disk_limit is None:
            _disk_full_after(pager, 16, monkeypatch, code)
        _five_allocations_of_six_pages_read_back_twice(pager)


def test_a_real_file_size_limit_under_the_disk_tier_acts_as_disk_limit(nvme_dir):
    """As above under a real ``RLIMIT_FSIZE`` of 16 pages (``ulimit -f``), set in a child process:
    the page file's writes past it fail with EFBIG (Python ignores SIGXFSZ), and every allocation
    reads back whole."""
    script = textwrap.dedent(f"""
        import resource
        from tests.test_pager import PAGE, _five_allocations_of_six_pages_read_back_twice, make_pager
        pager = make_pager({nvme_dir!r}, device_pages=8, host_pages=8, slab_size=8 * PAGE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 * PAGE, resource.RLIM_INFINITY))
        _five_allocations_of_six_pages_read_back_twice(pager)
        print("read back")
    """)
    repository = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=repository)
    assert result.returncode == 0 and "read back" in result.stdout, result.stderr[-3000:]


@settings(max_examples=25, deadline=None)
@given(full_file_system=st.booleans(), tiers=st.tuples(st.integers(2, 4), st.integers(1, 3), st.integers(2, 6)),
       steps=st.lists(st.tuples(st.sampled_from(["allocate", "write", "read", "free", "evict_all", "prefetch"]),
                                st.integers(0, 2**31)), min_size=20, max_size=80))  # fmt: skip
def test_a_full_disk_tier_loses_no_byte_and_frees_read_back(full_file_system, tiers, steps):
    """Random allocations, writes, reads, frees, evictions and prefetches on a pager whose disk tier
    is bounded, by ``disk_limit`` or by a full file system (ENOSPC past the last slot it holds):
    a read never returns wrong bytes (an op may raise for want of room: a write that raises leaves
    its bytes unknown until read), no pin leaks, and once allocations are freed down to two pages
    fewer than the tiers hold, every other one reads back. (On the full file system 15 of 40 such runs got
    stuck, every read raising ENOSPC, where the same with ``disk_limit`` read back.)"""
    device_pages, host_pages, disk_pages = tiers
    with tempfile.TemporaryDirectory() as nvme:
        pager = make_pager(nvme, device_pages=device_pages, host_pages=host_pages, slab_size=PAGE,
                           disk_limit=None if full_file_system else disk_pages * PAGE)  # fmt: skip
        with pager:
            if full_file_system:
                from pagedtensor.tiers.diskio import OP_WRITE

                real_submit = pager.disk_tier._engine.submit
                pager.disk_tier._engine.submit = lambda requests: [
                    -errno.ENOSPC if request.op == OP_WRITE and request.offset >= disk_pages * PAGE else real_submit([request])[0]
                    for request in requests]  # fmt: skip
            held: dict[int, tuple[Allocation, torch.Tensor | None]] = {}  # id -> (allocation, bytes or None: unknown)
            for number, (action, seed) in enumerate(steps):
                generator = torch.Generator().manual_seed(seed)
                keys = sorted(held)
                key = keys[seed % len(keys)] if keys else None
                try:
                    if action == "allocate" or key is None:
                        size = 1 + seed % (3 * PAGE - 1)
                        held[number] = (pager.allocate(size), torch.zeros(size, dtype=torch.uint8))
                    elif action == "write":
                        allocation, expected = held[key]
                        offset = seed % allocation.nbytes
                        data = torch.randint(0, 256, (1 + seed % (allocation.nbytes - offset),), dtype=torch.uint8, generator=generator)
                        held[key] = (allocation, None)
                        pager.write(allocation, data, offset)
                        if expected is not None:
                            expected[offset:offset + data.numel()] = data
                            held[key] = (allocation, expected)
                    elif action == "read":
                        allocation, expected = held[key]
                        got = pager.read(allocation)
                        assert expected is None or torch.equal(got, expected), (number, key)
                        held[key] = (allocation, got.clone())
                    elif action == "free":
                        pager.free(held.pop(key)[0])
                    elif action == "evict_all":
                        pager.evict_all()
                    else:
                        pager.prefetch(held[key][0])
                except (OSError, OutOfPagesError) as error:
                    assert not isinstance(error, OSError) or error.errno == errno.ENOSPC, error
                assert not pager._pinned_ranges
            pager.synchronize()
            by_size = sorted(held, key=lambda k: held[k][0].num_pages)
            while sum(held[k][0].num_pages for k in by_size) > device_pages + host_pages + disk_pages - 2:
                pager.free(held.pop(by_size.pop())[0])
            for key in by_size:
                allocation, expected = held[key]
                got = pager.read(allocation)
                assert expected is None or torch.equal(got, expected), key


def test_a_write_that_meets_a_corrupt_page_keeps_the_healthy_page_it_covers(nvme_dir):
    pager = Pager(MemoryConfig(vram_limit=4 * PAGE, host_memory=PAGE, page_size=PAGE, device="cpu", slab_size=PAGE,
                               nvme_path=nvme_dir, prefetch_strategy="none"))  # fmt: skip
    with pager:
        target = pager.allocate(2 * PAGE)
        pager.write(target, torch.full((2 * PAGE,), 0xAB, dtype=torch.uint8))
        pager.evict_all()
        filler = pager.allocate(PAGE)
        pager.write(filler, torch.ones(PAGE, dtype=torch.uint8))
        pager.evict_all()
        table = pager.page_table(target)
        assert table[0].host_slot is None and table[1].disk_slot is not None
        with open(pager.disk_tier.fd_path, "r+b") as handle:  # page 1's disk copy goes bad
            handle.seek(table[1].disk_slot * PAGE + 10)
            handle.write(b"\x00\x01\x02")
        with pytest.raises(PageCorruptionError):
            pager.write(target, torch.full((PAGE + 100,), 0xCD, dtype=torch.uint8), offset=0)
        assert torch.equal(pager.read(target, 0, PAGE), torch.full((PAGE,), 0xAB, dtype=torch.uint8))


def test_a_write_whose_source_fails_part_way_reads_the_same_after_eviction(nvme_dir):
    """The source (a PagedTensor of another pager) has a corrupt page: the write fails after it
    overwrote the target's first page on the device. That page had a clean host copy of its old
    bytes, which must go: it read the new bytes before eviction and the old ones after."""
    target_pager = make_pager(device_pages=4, host_pages=4, slab_size=PAGE)  # one page per slab: one copy per page
    source_pager = make_pager(nvme_dir, device_pages=2, host_pages=1, slab_size=PAGE)
    with target_pager, source_pager:
        target = target_pager.allocate(2 * PAGE)
        target_pager.write(target, torch.full((2 * PAGE,), 1, dtype=torch.uint8))
        target_pager.evict_all()
        target_pager.read(target)  # on the device again; the host copies stay as clean caches
        source = PagedTensor.wrap(torch.full((2 * PAGE,), 2, dtype=torch.uint8), source_pager)
        source_pager.evict_all()
        source_pager.read(source.allocation, 0, 1)
        source_pager.evict_all()  # page 0 on the host, page 1 on disk only
        slot = source_pager.page_table(source.allocation)[1].disk_slot
        assert slot is not None
        with open(source_pager.disk_tier.fd_path, "r+b") as handle:
            handle.seek(slot * PAGE)
            handle.write(b"\xff" * 16)
        with pytest.raises(PageCorruptionError):
            target_pager.write(target, source)
        before = target_pager.read(target)
        target_pager.evict_all()
        assert torch.equal(target_pager.read(target), before)
        assert torch.equal(before[PAGE:], torch.ones(PAGE, dtype=torch.uint8))  # the page the write never reached


def test_an_interrupted_eviction_keeps_its_host_slots_usable(monkeypatch):
    """A KeyboardInterrupt landing at the end of the device-to-host copy of ``evict_all``: the pages
    stay on the device with their bytes, and the host slots taken for them are free again."""
    with make_pager(device_pages=4, host_pages=4) as pager:
        allocation = pager.allocate(4 * PAGE)
        data = random_bytes(4 * PAGE, seed=5)
        pager.write(allocation, data)
        real_copy = pager.engine.copy

        def interrupted_copy(*args, **kwargs):
            real_copy(*args, **kwargs)
            raise KeyboardInterrupt

        monkeypatch.setattr(pager.engine, "copy", interrupted_copy)
        with pytest.raises(KeyboardInterrupt):
            pager.evict_all()
        monkeypatch.setattr(pager.engine, "copy", real_copy)
        assert pager.host_tier.used_pages == 0
        assert pager.stats()["resident_bytes"]["host"] == 0
        assert torch.equal(pager.read(allocation), data)
        pager.evict_all()  # all four host slots free for the four pages
        assert [info.tier for info in pager.page_table(allocation)] == ["host"] * 4
        assert torch.equal(pager.read(allocation), data)


@pytest.mark.parametrize("with_disk", [False, True], ids=["host", "disk"])
def test_an_overwrite_released_unwritten_gets_its_old_bytes_back(tmp_path, with_disk):
    old = random_bytes(2 * PAGE, seed=3)
    with make_pager(str(tmp_path) if with_disk else None, host_pages=2) as pager:
        allocation = pager.allocate(2 * PAGE)
        pager.write(allocation, old)
        pager.evict_all()
        if with_disk:  # push the host copies down to disk
            pager.write(pager.allocate(2 * PAGE), random_bytes(2 * PAGE, seed=4))
            pager.evict_all()
        resident = pager.ensure_resident(allocation, discard=[0, 1])
        assert torch.equal(resident.contiguous(), torch.zeros(2 * PAGE, dtype=torch.uint8)), "discarded pages are zero-filled"
        resident.release()  # the overwrite failed: nothing was written
        assert torch.equal(pager.read(allocation), old)
        with pager.ensure_resident(allocation, discard=[1]) as pages:
            pages.views()[1].fill_(7)
            pages.mark_dirty([1])
        assert torch.equal(pager.read(allocation), torch.cat([old[:PAGE], torch.full((PAGE,), 7, dtype=torch.uint8)]))
        pager.evict_all()
        assert torch.equal(pager.read(allocation, PAGE, PAGE), torch.full((PAGE,), 7, dtype=torch.uint8)), "the old copy came back"


def test_an_overwrite_keeps_the_old_bytes_while_the_host_is_squeezed(nvme_dir):
    """While pages are pinned zero-filled for an overwrite, their host copy is their only good one:
    host pressure must spill it to disk, not drop it as a clean cache of the device copy."""
    old = random_bytes(PAGE, seed=5)
    with make_pager(nvme_dir, device_pages=4, host_pages=1) as pager:
        target = pager.allocate(PAGE)
        pager.write(target, old)
        pager.evict_all()
        assert pager.page_table(target)[0].tier == "host" and pager.page_table(target)[0].disk_slot is None
        resident = pager.ensure_resident(target, discard=[0])
        squeeze = pager.allocate(2 * PAGE)  # its dirty pages need the one host slot on eviction
        pager.write(squeeze, random_bytes(2 * PAGE, seed=6))
        pager.evict(squeeze)
        resident.release()
        assert torch.equal(pager.read(target), old)


def test_an_overwrite_released_unwritten_while_another_holder_pins_the_page(nvme_dir):
    old = random_bytes(PAGE, seed=7)
    with make_pager(nvme_dir) as pager:
        allocation = pager.allocate(PAGE)
        pager.write(allocation, old)
        pager.evict_all()
        overwrite = pager.ensure_resident(allocation, discard=[0])
        reader = pager.ensure_resident(allocation)  # sees the zero-filled slot, and keeps it pinned
        slot = reader.slots[0]
        overwrite.release()
        reader.wait()
        assert reader.pages[0].device_slot == slot, "a pinned page lost its slot"
        assert torch.equal(reader.contiguous(), old), "the pinned slot was not refilled with the old bytes"
        reader.release()
        assert torch.equal(pager.read(allocation), old)


def test_a_full_disk_tier_drops_clean_disk_copies_to_make_room(nvme_dir):
    """Data that fits the budgets stays readable: reads leave pages with a disk copy under a device or
    host copy, and a spill to a full disk tier frees those duplicates instead of failing."""
    page = 65536
    pager = Pager(MemoryConfig(vram_limit=2 * page, host_memory=2 * page, disk_limit=8 * page, page_size=page, slab_size=2 * page,
                               nvme_path=nvme_dir, device="cpu", prefetch_strategy="none"))  # fmt: skip
    with pager:
        allocation = pager.allocate(10 * page)
        data = random_bytes(10 * page, seed=8)
        pager.write(allocation, data)
        for _ in range(2):
            assert torch.equal(pager.read(allocation), data)
            assert torch.equal(pager.read(allocation, page, 2 * page), data[page : 3 * page])


def test_slabs_grown_under_inference_mode_take_writes_outside_it():
    """A slab outlives the call that grew it, so it is never an inference tensor."""
    with make_pager() as pager:
        allocation = pager.allocate(2 * PAGE)
        with torch.inference_mode():
            pager.write(allocation, random_bytes(2 * PAGE))
        other = pager.allocate(PAGE)
        pager.write(other, random_bytes(PAGE, seed=1))  # zero-fills and writes a slot of a slab grown inside
        pager.write(allocation, random_bytes(2 * PAGE, seed=2))
        assert torch.equal(pager.read(allocation), random_bytes(2 * PAGE, seed=2))
        assert torch.equal(pager.read(other), random_bytes(PAGE, seed=1))


def test_a_slab_the_allocator_refuses_raises_naming_it_and_keeps_every_page(monkeypatch):
    """The device tier grows a slab per two pages here; when the allocator cannot give the second
    (the machine has less memory than ``vram_limit``), the fault raises ``SlabAllocationError``
    naming the slab and the settings to lower. The pages written before stay readable, the failed
    request takes no slot, and once memory is there again the same request succeeds."""
    with make_pager(device_pages=4, slab_size=2 * PAGE) as pager:
        first = pager.allocate(2 * PAGE)
        pager.write(first, random_bytes(2 * PAGE, seed=1))
        allocate_slab = pager.device_tier._allocate_slab

        def out_of_memory(nbytes: int) -> torch.Tensor:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {nbytes} bytes")

        monkeypatch.setattr(pager.device_tier, "_allocate_slab", out_of_memory)
        second = pager.allocate(2 * PAGE)
        with pytest.raises(SlabAllocationError, match=rf"device tier: cannot allocate a slab of 8.00 KiB \({2 * PAGE} bytes, 2 pages") as raised:
            pager.write(second, random_bytes(2 * PAGE, seed=2))
        assert isinstance(raised.value, OutOfPagesError) and "Lower slab_size" in str(raised.value)
        assert pager.device_tier.used_pages == 2 and len(pager.device_tier.slabs) == 1
        assert torch.equal(pager.read(first), random_bytes(2 * PAGE, seed=1))
        monkeypatch.setattr(pager.device_tier, "_allocate_slab", allocate_slab)
        pager.write(second, random_bytes(2 * PAGE, seed=2))
        assert torch.equal(pager.read(second), random_bytes(2 * PAGE, seed=2))
        assert torch.equal(pager.read(first), random_bytes(2 * PAGE, seed=1))


@pytest.mark.parametrize("op", ["sum", "add", "cat", "linear"])
def test_a_slab_the_allocator_refuses_in_an_op_raises_slab_allocation_error(monkeypatch, op):
    """Slabs grow on demand, so a slab the allocator refuses (memory in use elsewhere) is met in the
    middle of an op: the op raises the SlabAllocationError as it is (what ``pagedllm ask`` reports
    as a usage error), not an OutOfPagesError saying the op's pages do not fit the device tier.
    The pages stay readable once memory is there again."""
    from pagedtensor.handlers.linear import paged_linear

    with make_pager(device_pages=8, host_pages=16, slab_size=PAGE) as pager:
        x = torch.randn(6 * PAGE // 4)
        t = PagedTensor.wrap(x, pager)  # 6 slabs grown
        other = pager.allocate(PAGE)
        pager.evict_all()
        allocate_slab = pager.device_tier._allocate_slab

        def out_of_memory(nbytes: int) -> torch.Tensor:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {nbytes} bytes")

        monkeypatch.setattr(pager.device_tier, "_allocate_slab", out_of_memory)
        pinned = pager.ensure_resident(other)  # one grown slot held: the op needs a seventh slab
        try:
            run = {
                "sum": lambda: t.sum(),
                "add": lambda: t + 1,
                "cat": lambda: torch.cat((t, t)),
                "linear": lambda: paged_linear(torch.randn(2, PAGE // 4), t.view(6, PAGE // 4), None),
            }[op]
            with pytest.raises(SlabAllocationError, match="device tier: cannot allocate a slab of 4.00 KiB") as raised:
                run()
            assert "need" not in str(raised.value).split("device tier:")[0], str(raised.value)
        finally:
            pinned.release()
        monkeypatch.setattr(pager.device_tier, "_allocate_slab", allocate_slab)
        assert torch.equal(t.materialize(), x)


def test_a_fault_from_a_full_disk_drops_a_clean_host_copy_rather_than_spill(nvme_dir):
    """Host copies given to resident pages (``write_back``, as ``page_weights=True`` does for every
    weight) fill the host tier with clean caches. A fault from disk that needs a host slot while the
    disk tier is full drops such a copy (the page keeps its device copy) instead of failing to spill
    the least recently used host-only page: device, host and disk hold 5 pages here, 3 are used. (A
    model whose weights fit device and host at c757c12 failed its first generate with 'disk tier
    full' once its weights were written back.)"""
    with make_pager(nvme_dir, device_pages=2, host_pages=2, disk_limit=PAGE) as pager:
        z, x, y = (pager.allocate(PAGE) for _ in range(3))
        for seed, allocation in enumerate((z, x, y)):
            pager.write(allocation, random_bytes(PAGE, seed=seed))  # z goes to host
        pager.evict(x)  # the host tier is full of host-only pages: z, x
        assert pager.write_back(y) == 1  # z spills to the disk tier, now full; y gets a host copy
        assert [pager.page_table(allocation)[0].tier for allocation in (z, x, y)] == ["disk", "host", "device"]
        assert torch.equal(pager.read(z), random_bytes(PAGE, seed=0))  # staged through the slot of y's host copy
        assert pager.page_table(y)[0].host_slot is None and pager.page_table(y)[0].tier == "device"
        for seed, allocation in enumerate((z, x, y)):
            assert torch.equal(pager.read(allocation), random_bytes(PAGE, seed=seed))


@pytest.mark.parametrize("with_disk", [True, False])
def test_write_back_makes_no_room_by_dropping_another_resident_pages_copy(with_disk, nvme_dir):
    """Weights are written back one after another as they are paged. Once the host tier is full of
    the host copies of pages still on the device, a write-back used to make room by dropping one
    (that page dirty again: its D2H copy wasted, and its eviction copying it once more). Now such
    a copy spills to a free disk slot (the page stays clean), or, without one, the write-back
    stops there: no page crosses D2H twice, and evicting the pages written back copies nothing."""
    with make_pager(nvme_dir if with_disk else None, device_pages=4, host_pages=2) as pager:
        weights = [pager.allocate(PAGE) for _ in range(3)]
        written = []
        for seed, allocation in enumerate(weights):
            pager.write(allocation, random_bytes(PAGE, seed))
            written.append(pager.write_back(allocation))
        assert written == ([1, 1, 1] if with_disk else [1, 1, 0])
        tables = [pager.page_table(allocation)[0] for allocation in weights]
        assert [info.tier for info in tables] == ["device"] * 3
        assert [info.dirty for info in tables] == [False, False, not with_disk], tables
        assert pager.stats()["bytes_d2h"] == sum(written) * PAGE
        for allocation in weights[:2]:
            pager.evict(allocation)
        assert pager.stats()["bytes_d2h"] == sum(written) * PAGE  # clean: evicted with no copy
        for seed, allocation in enumerate(weights):
            assert torch.equal(pager.read(allocation), random_bytes(PAGE, seed))


def test_write_back_gives_resident_pages_host_copies_and_leaves_them_resident():
    """``write_back`` copies the resident pages with no lower copy to the host tier (the host grows
    now) and leaves them on the device: evicting them later copies nothing, a write makes them
    dirty again (its host copy goes), and every read returns the bytes last written. Pinned pages
    are left as they are."""
    with make_pager(device_pages=4, host_pages=4) as pager:
        allocation = pager.allocate(3 * PAGE)
        pager.write(allocation, random_bytes(3 * PAGE, seed=1))
        pinned = pager.ensure_resident(allocation, 2, 3)
        slots = [info.device_slot for info in pager.page_table(allocation)]
        before = pager.stats()
        assert pager.write_back(allocation) == 2  # the pinned page stays as it is
        after = pager.stats()
        assert after["bytes_d2h"] - before["bytes_d2h"] == 2 * PAGE and after["host_slab_bytes"] >= 2 * PAGE
        assert [info.device_slot for info in pager.page_table(allocation)] == slots
        assert [info.dirty for info in pager.page_table(allocation)] == [False, False, True]
        pinned.release()
        assert pager.write_back(allocation, 0, 2) == 0  # nothing left to copy there
        pager.evict(allocation, 0, 2)
        assert pager.stats()["bytes_d2h"] == after["bytes_d2h"]  # clean: evicted without a copy
        assert torch.equal(pager.read(allocation), random_bytes(3 * PAGE, seed=1))
        pager.write(allocation, random_bytes(PAGE, seed=2), offset=0)
        assert pager.page_table(allocation)[0].dirty and pager.page_table(allocation)[0].host_slot is None
        pager.evict_all()
        expected = random_bytes(3 * PAGE, seed=1)
        expected[:PAGE] = random_bytes(PAGE, seed=2)
        assert torch.equal(pager.read(allocation), expected)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_a_page_staged_from_a_full_disk_keeps_its_disk_copy(tmp_path, device):
    """Staging a disk-only page needs a host slot, and the host page that makes way would have to
    spill to a full disk: the unfilled device slot given to the staged page is no copy of it, so
    its disk copy is never dropped as a duplicate. The page comes straight from disk instead
    (three pages in four slots fit: before, the fault failed with 'disk tier full'), keeps its
    disk copy, and every byte survives."""
    with make_pager(nvme=str(tmp_path), device_pages=1, host_pages=1, disk_limit=2 * PAGE, device=device) as pager:
        a, b, c = (pager.allocate(PAGE) for _ in range(3))
        for seed, allocation in enumerate((a, b, c)):
            pager.write(allocation, random_bytes(PAGE, seed))
        assert pager.page_table(a)[0].tier == "disk"
        assert torch.equal(pager.read(a), random_bytes(PAGE, 0))
        assert pager.page_table(a)[0].disk_slot is not None
        for seed, allocation in enumerate((a, b, c)):
            assert torch.equal(pager.read(allocation), random_bytes(PAGE, seed))


def test_release_after_close_is_a_no_op_and_views_name_the_closed_pager():
    pager = make_pager()
    allocation = pager.allocate(2 * PAGE)
    pager.write(allocation, random_bytes(2 * PAGE))
    pager.evict_all()
    resident = pager.ensure_resident(allocation, 0, 2)
    pager.close()
    resident.release(dirty=True)
    assert pager.stats()["resident_bytes"] == {"device": 0, "host": 0, "disk": 0}
    with pytest.raises(RuntimeError, match="closed"):
        resident.views()
    with pytest.raises(RuntimeError, match="closed"):
        resident.runs()


def test_release_together_unpins_every_range_and_marks_only_their_dirty_pages():
    with make_pager(device_pages=4, host_pages=8) as pager, make_pager() as other:
        first, second = pager.allocate(2 * PAGE), pager.allocate(2 * PAGE)
        for allocation, seed in ((first, 1), (second, 2)):
            pager.write(allocation, random_bytes(2 * PAGE, seed))
        pager.evict_all()
        a, b = pager.ensure_resident(first), pager.ensure_resident(second)
        foreign = other.ensure_resident(other.allocate(PAGE))
        with pytest.raises(ValueError, match="another pager"):
            pager.release_together([(a, ()), (foreign, ())])
        pager.release_together(resident for resident in ())  # an iterable, read once: nothing to release
        for bad in (a, ("x", ()), (a,), (a, (), ()), None):  # not pairs: named, not an unpacking error
            with pytest.raises(TypeError, match=r"release_together: expected \(ResidentPages, dirty page numbers\) pairs, got"):
                pager.release_together([(b, ()), bad])
        assert not (a.released or b.released or foreign.released), "a refused call released something"
        a.views()[1].fill_(7)
        pager.release_together((resident, dirty) for resident, dirty in ((a, {1}), (b, ())))  # a generator: read once
        foreign.release()
        assert a.released and b.released
        assert [info.pin_count for info in pager.page_table(first) + pager.page_table(second)] == [0, 0, 0, 0]
        assert [info.dirty for info in pager.page_table(first) + pager.page_table(second)] == [False, True, False, False]
        pager.evict_all()
        expected = random_bytes(2 * PAGE, 1)
        expected[PAGE:] = 7
        assert torch.equal(pager.read(first), expected) and torch.equal(pager.read(second), random_bytes(2 * PAGE, 2))


@pytest.mark.parametrize("make_pages", [numpy.array, torch.tensor, list], ids=["numpy", "tensor", "list"])
def test_page_numbers_given_as_arrays_mark_and_discard_as_lists_do(make_pages):
    """``release_together`` tested ``dirty`` for truth: page 0 as a numpy or tensor array was taken
    for clean (its write lost at the next eviction), two pages raised before the range was released
    (pinned for good), and ``None`` meant clean where ``ResidentPages.release`` takes it for all.
    ``ensure_resident(discard=<array>)`` raised the same way, and again while undoing its pin."""
    with make_pager(device_pages=4, host_pages=8) as pager:
        for dirty, written in ((make_pages([0]), [7, 0]), (make_pages([0, 1]), [7, 7]), (None, [7, 7])):
            allocation = pager.allocate(2 * PAGE)
            pager.write(allocation, torch.zeros(2 * PAGE, dtype=torch.uint8))
            pager.write_back(allocation)  # clean host copies: a page released clean is dropped on eviction
            resident = pager.ensure_resident(allocation)
            for view in resident.views():
                view.fill_(7)
            pager.release_together([(resident, dirty)])
            assert resident.released and [info.pin_count for info in pager.page_table(allocation)] == [0, 0]
            pager.evict_all()
            assert pager.read(allocation).view(2, PAGE)[:, 0].tolist() == written, dirty
            pager.free(allocation)
        allocation = pager.allocate(2 * PAGE)
        pager.write(allocation, torch.full((2 * PAGE,), 3, dtype=torch.uint8))
        pager.evict_all()
        with pager.ensure_resident(allocation, discard=make_pages([1])) as resident:
            resident.views()[1].fill_(5)
            resident.mark_dirty()
        assert [info.pin_count for info in pager.page_table(allocation)] == [0, 0]
        assert pager.read(allocation).view(2, PAGE)[:, 0].tolist() == [3, 5]
        pager.evict_all()  # discard is read where pages are missing
        with pytest.raises(TypeError, match="discard: expected an int, got 0.5"):
            pager.ensure_resident(allocation, discard=[0.5])
        assert [info.pin_count for info in pager.page_table(allocation)] == [0, 0]
        pager.free(allocation)


def test_pager_methods_name_their_bad_arguments():
    with make_pager() as pager:
        allocation = pager.allocate(2 * PAGE)
        with pytest.raises(TypeError, match="config: expected a MemoryConfig .*got dict"):
            Pager({"device": "cpu"})
        for call in (lambda: pager.write(None, torch.zeros(4, dtype=torch.uint8)), lambda: pager.read(7)):
            with pytest.raises(TypeError, match="allocation: expected an Allocation"):
                call()
        cases = [
            (lambda: pager.read(allocation, 1.5, 4), "offset: expected an int, got 1.5"),
            (lambda: pager.read(allocation, 0, 1.5), "nbytes: expected an int, got 1.5"),
            (lambda: pager.read(allocation, "4"), "offset: expected an int, got '4'"),
            (lambda: pager.write(allocation, torch.zeros(4, dtype=torch.uint8), True), "offset: expected an int, got True"),
            (lambda: pager.ensure_resident(allocation, 0.5, 1), "start: expected an int, got 0.5"),
            (lambda: pager.ensure_resident(allocation, "0", 1), "start: expected an int, got '0'"),
            (lambda: pager.evict(allocation, 0, 1.5), "stop: expected an int, got 1.5"),
            (lambda: pager.prefetch(allocation, 0.5, 1), "start: expected an int, got 0.5"),  # not left to the future
            (lambda: pager.ensure_resident(allocation, 0, 1, prefetch="x"), "prefetch: expected a bool, got 'x'"),
            (lambda: pager.ensure_resident(allocation, prefetch=None), "prefetch: expected a bool, got None"),
            (lambda: pager.allocate(PAGE, name=5), "name: expected a str or None, got 5"),
        ]
        for call, message in cases:
            with pytest.raises(TypeError, match=message):
                call()
        with pager.ensure_resident(allocation, torch.tensor(0).numpy() + 0, 1):  # integers of any kind
            pass
        assert all(info.pin_count == 0 for info in pager.page_table(allocation))
        for size in (numpy.int64(PAGE + 1), torch.tensor(PAGE + 1)):  # allocate's size too (it refused them)
            assert pager.allocate(size).nbytes == PAGE + 1 and type(pager.allocate(size).nbytes) is int
        for size, message in ((1.5, "nbytes: expected an int, got 1.5"), (True, "nbytes: expected an int, got True"),
                              (torch.tensor([4]), "nbytes: expected an int, got tensor")):  # fmt: skip
            with pytest.raises(TypeError, match=message):
                pager.allocate(size)


def test_write_refuses_data_whose_bytes_are_not_its_values():
    """A quantized tensor's bytes crashed the process inside torch (a segfault); meta, sparse and
    conjugate-bit data failed with torch's messages, which do not name ``data``."""
    with make_pager() as pager:
        allocation = pager.allocate(PAGE)
        cases = [
            (torch.quantize_per_tensor(torch.ones(4), 0.1, 0, torch.quint8), "data: unsupported dtype torch.quint8"),
            (torch.empty(4, device="meta"), "data: a meta tensor has no data"),
            (torch.eye(2).to_sparse(), "data: only strided tensors"),
            (torch.ones(2, dtype=torch.complex64).conj(), "data: resolve the conjugate"),
        ]
        for data, message in cases:
            with pytest.raises(ValueError, match=message):
                pager.write(allocation, data)
        assert torch.equal(pager.read(allocation), torch.zeros(PAGE, dtype=torch.uint8))


def test_an_allocation_whose_page_table_cannot_fit_in_memory_is_refused():
    """allocate(2**70) built a page table of 2**58 entries until memory ran out. An allocation larger
    than the tiers is fine otherwise: pages take tier memory only once written (a KV cache reserves
    segments it may never fill)."""
    with make_pager() as pager:
        with pytest.raises(ValueError, match=r"nbytes: 1180591620717411303424 bytes is 288230376151711744 pages of 4\.00 KiB, whose page table"):
            pager.allocate(2**70)
        sparse = pager.allocate(64 * PAGE)  # eight times the tiers together
        pager.write(sparse, random_bytes(PAGE), 40 * PAGE)
        assert torch.equal(pager.read(sparse, 40 * PAGE, PAGE), random_bytes(PAGE))
        assert torch.equal(pager.read(sparse, 0, PAGE), torch.zeros(PAGE, dtype=torch.uint8))


def test_positions_of_any_integer_kind_are_taken():
    with make_pager() as pager:
        allocation = pager.allocate(2 * PAGE)
        pager.write(allocation, random_bytes(PAGE), torch.tensor(PAGE))
        assert torch.equal(pager.read(allocation, numpy.int64(PAGE), torch.tensor(PAGE, dtype=torch.int32)), random_bytes(PAGE))
        with pager.ensure_resident(allocation, torch.tensor(1), numpy.int32(2)):
            pass
        for value in (torch.tensor(True), torch.tensor([PAGE]), torch.tensor(1.0)):
            with pytest.raises(TypeError, match="offset: expected an int"):
                pager.read(allocation, value, 4)


def test_without_the_machines_memory_a_fixed_bound_keeps_huge_page_tables_out(monkeypatch):
    """Where the system does not say how much memory it has (no os.sysconf), allocate(2**70) built
    its page table until memory ran out."""
    monkeypatch.setattr("pagedtensor.pager.machine_memory_bytes", lambda: None)
    with make_pager() as pager:
        with pytest.raises(ValueError, match="page table"):
            pager.allocate(2**70)
        pager.allocate(2**30)


def test_a_fault_that_fails_part_way_counts_the_pages_it_brought_in(nvme_dir):
    """Pages copied in before a corrupt disk page stay resident; they were counted nowhere, so
    faults + prefetched pages fell short of the device slots filled."""
    with make_pager(nvme_dir, device_pages=8, host_pages=2) as pager:
        allocation = pager.allocate(4 * PAGE)
        pager.write(allocation, random_bytes(4 * PAGE))
        pager.evict_all()  # two pages on the host, two on disk
        on_disk = [info for info in pager.page_table(allocation) if info.tier == "disk"]
        with open(pager.disk_tier.fd_path, "r+b") as page_file:
            page_file.seek(on_disk[0].disk_slot * PAGE)
            page_file.write(b"\xff" * 16)
        before = pager.stats()
        with pytest.raises(PageCorruptionError):
            pager.ensure_resident(allocation)
        after = pager.stats()
        resident = sum(info.tier == "device" for info in pager.page_table(allocation))
        assert resident > 0
        assert after["faults"] - before["faults"] == resident


def test_a_write_that_fails_after_half_its_pages_counts_only_the_pages_that_stay():
    """No disk tier, the host tier full of only copies, one free device slot: a 2-page write brings
    its pages half at a time, the second half finds no room, and the first half's page (to be
    overwritten: zero-filled) goes again. It was counted a fault all the same, so faults less
    evictions no longer matched the device pages filled."""
    with make_pager(device_pages=4, host_pages=2, slab_size=4 * PAGE) as pager:
        spilled, full, target = pager.allocate(2 * PAGE), pager.allocate(4 * PAGE), pager.allocate(2 * PAGE)
        pager.write(spilled, random_bytes(2 * PAGE, 1))
        pager.write(full, random_bytes(4 * PAGE, 2))  # spilled's pages go to the host tier: it is full
        pager.discard(full, 0, 1)  # one free device slot
        before, used_before = pager.stats(), pager.device_tier.used_pages
        with pytest.raises(OutOfPagesError):
            pager.write(target, random_bytes(2 * PAGE, 3))
        after = pager.stats()
        assert [info.tier for info in pager.page_table(target)] == [None, None]
        assert after["faults"] - before["faults"] - (after["evictions"] - before["evictions"]) == pager.device_tier.used_pages - used_before
        assert torch.equal(pager.read(spilled), random_bytes(2 * PAGE, 1))


def test_a_closed_pager_reports_no_resident_bytes_on_any_tier(nvme_dir):
    pager = make_pager(nvme_dir, device_pages=2, host_pages=2)
    allocation = pager.allocate(6 * PAGE)
    pager.write(allocation, random_bytes(6 * PAGE))
    pager.evict_all()
    assert pager.stats()["resident_bytes"]["disk"] > 0
    pager.close()
    assert pager.stats()["resident_bytes"] == {"device": 0, "host": 0, "disk": 0}
    pager.synchronize()  # close finished every transfer: nothing is left to wait for (README)
    pager.close()


def test_views_of_pages_whose_pager_another_thread_closes_name_the_closed_pager(monkeypatch):
    """close() from another thread between the open check and the slab lookup gave an IndexError."""
    pager = make_pager()
    allocation = pager.allocate(2 * PAGE)
    resident = pager.ensure_resident(allocation)
    check_open = pager._check_open
    calls = []

    def close_after_the_first_check():
        calls.append(1)
        if len(calls) == 1:
            pager.close()  # as another thread would, just after this check passed
            return
        check_open()

    monkeypatch.setattr(pager, "_check_open", close_after_the_first_check)
    with pytest.raises(RuntimeError, match="closed"):
        resident.views()
    calls.clear()
    with pytest.raises(RuntimeError, match="closed"):
        resident.runs()


@pytest.mark.parametrize("op", [lambda t: t.add_(1), lambda t: t.materialize(), lambda t: t.tolist(), lambda t: t[3:5].sum()])
def test_an_op_whose_pager_another_thread_closes_once_its_pages_are_resident_names_the_closed_pager(monkeypatch, op):
    """close() from another thread just after an op's pages were made resident, before the op read
    the device tier's slab tables: the op raised a bare IndexError (8 in 1,500 rounds of a reader
    looping ``add_`` while another thread closed); now PagerClosedError."""
    from pagedtensor.errors import PagerClosedError
    from pagedtensor.pager import ResidentPages

    pager = make_pager(device_pages=8)
    tensor = PagedTensor.wrap(torch.randn(8, 256), pager)
    wait = ResidentPages.wait

    def closed_by_another_thread(self, *args, **kwargs):
        monkeypatch.setattr(ResidentPages, "wait", wait)
        closer = threading.Thread(target=pager.close)
        closer.start()
        closer.join()
        return wait(self, *args, **kwargs)

    monkeypatch.setattr(ResidentPages, "wait", closed_by_another_thread)
    with pytest.raises(PagerClosedError):
        op(tensor)


def test_a_release_that_waited_for_the_lock_while_another_thread_closed_the_pager_is_a_no_op(nvme_dir):
    """A release checked ``closed`` before taking the pager's lock: a close() by another thread while it
    waited for the lock released the tiers, and the release then freed the page's host copy in a closed
    tier (ValueError: host tier: slot 0 is not in use) instead of doing nothing, as after a close."""
    pager = make_pager(nvme_dir, device_pages=2, host_pages=2)
    allocation = pager.allocate(PAGE)
    pager.write(allocation, random_bytes(PAGE))
    pager.evict_all()
    resident = pager.ensure_resident(allocation)  # a device copy and a host copy, which a dirty release drops
    lock = pager._lock
    pager._lock = ClosedWhileWaiting(pager)
    resident.release(dirty=True)
    assert pager.closed and pager._lock is lock
    with pytest.raises(RuntimeError, match="closed"):
        pager.read(allocation)


@pytest.mark.parametrize("method", ["evict_all", "synchronize"])
def test_waiting_for_the_prefetches_while_another_thread_closes_the_pager_names_the_closed_pager(nvme_dir, method: str):
    """evict_all() and synchronize() take the prefetch thread under the lock and queue a marker on it
    after letting go: a close() by another thread in between shut the thread down, and they raised
    concurrent.futures' "cannot schedule new futures after shutdown" instead of "this Pager is closed"
    (evict_all) or returning (synchronize: close waited for the prefetches)."""
    pager = make_pager(nvme_dir, device_pages=2, host_pages=1)
    allocation = pager.allocate(4 * PAGE)
    pager.write(allocation, random_bytes(4 * PAGE))
    pager.prefetch(allocation, 0, 1).result()  # a page only on disk: the prefetch thread runs it
    assert pager._prefetcher is not None
    lock = pager._lock

    class ClosedOnceLetGo:
        """The pager's lock; another thread takes it and closes the pager as soon as this one lets go."""

        def __enter__(self) -> None:
            lock.acquire()

        def __exit__(self, *exc_info: object) -> None:
            lock.release()
            pager._lock = lock
            pager.close()

    pager._lock = ClosedOnceLetGo()
    if method == "evict_all":
        with pytest.raises(RuntimeError, match="this Pager is closed"):
            pager.evict_all()
    else:
        pager.synchronize()
    assert pager.closed and pager._lock is lock


@pytest.mark.parametrize("method", ["synchronize", "evict_all", "close"])
def test_a_prefetch_callback_that_waits_for_the_prefetches_is_refused_by_name(nvme_dir, method: str):
    """A done-callback of a prefetch that read from disk runs on the pager's prefetch thread, whose
    prefetches synchronize() and evict_all() wait for, as close() waits for the thread: called there,
    synchronize() and evict_all() waited for ever on their own thread (and every later wait with
    them, interpreter exit too), close() raised "cannot join current thread" and left the pager half
    closed. Each now raises a RuntimeError naming the call and the thread, and the pager works on."""
    pager = make_pager(nvme_dir, device_pages=2, host_pages=1)
    allocation = pager.allocate(4 * PAGE)
    data = random_bytes(4 * PAGE)
    pager.write(allocation, data)
    pager.evict_all()
    outcome: concurrent.futures.Future = concurrent.futures.Future()

    def call_it(_: concurrent.futures.Future) -> None:
        try:
            getattr(pager, method)()
            outcome.set_result(None)
        except BaseException as error:  # noqa: BLE001 - handed to the test's thread
            outcome.set_exception(error)

    future = pager.prefetch(allocation, 0, 1)  # its page is only on disk: the prefetch thread runs it
    future.add_done_callback(call_it)
    with pytest.raises(RuntimeError, match=rf"Pager.{method}\(\) called on the pager's prefetch thread .*would wait for itself"):
        outcome.result(timeout=20)
    assert not pager.closed
    assert torch.equal(pager.read(allocation), data)
    getattr(pager, method)()  # from this thread, as ever
    if method != "close":
        pager.close()


def test_a_dropped_pager_is_freed_at_once_and_leaves_a_shared_registry(nvme_dir):
    """A pager dropped without close() stayed alive through its metrics (a cycle through the resident
    bytes reader): until a garbage collection with its own registry, for good on a shared one, which
    also refused the next pager's metrics."""
    registry = CollectorRegistry()
    config = MemoryConfig(vram_limit=4 * PAGE, host_memory=4 * PAGE, page_size=PAGE, nvme_path=nvme_dir, device="cpu", prefetch_strategy="none")
    gc.disable()
    try:
        pager = Pager(config, registry=registry)
        allocation = pager.allocate(8 * PAGE)
        pager.write(allocation, random_bytes(8 * PAGE))  # pages on every tier
        dropped = weakref.ref(pager)
        del pager, allocation
        assert dropped() is None, "the pager outlived its last reference"
    finally:
        gc.enable()
    Pager(config, registry=registry).close()  # the names are free again



def test_a_failed_prefetch_dropped_by_its_caller_keeps_nothing_of_the_caller_alive():
    """A prefetch that cannot fit returns a done future carrying its error. The future's frame held
    the future while the error's traceback held that frame and its callers': a caller dropping the
    future kept itself, the future and every object of its callers' frames (an op's tensors) alive in a cycle
    until a garbage collection ran."""

    class Marker:
        pass

    config = MemoryConfig(vram_limit=2 * PAGE, host_memory=8 * PAGE, page_size=PAGE, device="cpu", prefetch_strategy="none")
    with Pager(config) as pager:
        allocation = pager.allocate(4 * PAGE)
        pager.write(allocation, random_bytes(4 * PAGE))

        def caller(marker: Marker) -> None:
            with pager.ensure_resident(allocation, 0, 2):  # the tier pinned full: no room for the prefetch
                pager.prefetch(allocation, 2, 4)

        gc.disable()
        try:
            marker = Marker()
            kept = weakref.ref(marker)
            caller(marker)
            del marker
            assert kept() is None, "the caller's frame outlived the call"
        finally:
            gc.enable()



def test_an_empty_page_range_pins_nothing_and_releases():
    """``ensure_resident(a, k, k)`` (and ``ensure_resident(a, a.num_pages)``) holds no page: it raised
    a bare KeyError (a thread's pin count of 0 removed where there was none) and left a pin entry,
    and beside another pin of the thread its release raised the same."""
    with make_pager() as pager:
        allocation = pager.allocate(3 * PAGE)
        pager.write(allocation, random_bytes(3 * PAGE))
        for start, stop in ((1, 1), (3, None)):
            with pager.ensure_resident(allocation, start, stop) as empty:
                assert empty.nbytes == 0 and empty.views() == [] and empty.runs() == []
        held = pager.ensure_resident(allocation, 0, 1)
        empty = pager.ensure_resident(allocation, 2, 2)
        held.release()
        empty.release()
        assert not allocation.pins and not pager._pinned_ranges


def test_released_pages_refuse_their_views_and_marks():
    """After ``release()`` the pages' slots may hold another allocation's pages: ``views()``, ``runs()``,
    ``contiguous()`` and ``mark_dirty()`` raise naming the release (``contiguous()`` gave a view of
    the other allocation's bytes, and a write through it changed them)."""
    with make_pager(device_pages=1, host_pages=4) as pager:
        a, b = pager.allocate(PAGE), pager.allocate(PAGE)
        pager.write(a, torch.full((PAGE,), 1, dtype=torch.uint8))
        pages = pager.ensure_resident(a)
        pages.release()
        pager.write(b, torch.full((PAGE,), 2, dtype=torch.uint8))  # b takes a's device slot
        for call in (pages.views, pages.runs, pages.contiguous, pages.mark_dirty):
            with pytest.raises(RuntimeError, match=r"pages \[0, 1\) of allocation \d+ were already released"):
                call()
        assert torch.equal(pager.read(b), torch.full((PAGE,), 2, dtype=torch.uint8))
        assert torch.equal(pager.read(a), torch.full((PAGE,), 1, dtype=torch.uint8))


def test_empty_reads_and_writes_check_the_allocation():
    with make_pager() as pager:
        allocation = pager.allocate(PAGE)
        pager.free(allocation)
        with pytest.raises(ValueError, match="freed"):
            pager.read(allocation, 0, 0)
        with pytest.raises(ValueError, match="freed"):
            pager.write(allocation, torch.empty(0, dtype=torch.uint8))


def test_evicting_a_page_whose_other_copy_is_on_a_full_disk_keeps_that_copy(tmp_path):
    """A clean page whose only other copy is on disk leaves the device in the same chunk as dirty
    pages; making host room for the dirty ones must not free that disk copy as a duplicate of the
    device copy about to go (it did: the page then had no copy and read back as zeros)."""
    with make_pager(nvme=str(tmp_path), device_pages=6, host_pages=4, disk_limit=7 * PAGE, eviction_policy="lru") as pager:
        expected = {}
        for value, pages in ((1, 2), (2, 4), (3, 2), (4, 4)):
            allocation = pager.allocate(pages * PAGE)
            expected[allocation] = torch.full((pages * PAGE,), value, dtype=torch.uint8)
            pager.write(allocation, expected[allocation])
        pager.read(next(iter(expected)))
        with pytest.raises(OutOfPagesError, match="disk tier full"):
            pager.evict_all()  # 12 pages of bytes cannot fit in 4 host and 7 disk slots
        allocations = list(expected)
        for allocation in allocations:
            assert all(info.tier is not None for info in pager.page_table(allocation)), f"allocation {allocation.id}"
        for allocation in allocations[1:]:  # the tiers are full: make room to read the first back
            pager.free(allocation)
        assert torch.equal(pager.read(allocations[0]), expected[allocations[0]])


_OPS = st.lists(st.tuples(st.sampled_from(["write", "read", "evict_all"]), st.integers(0, 3), st.integers(0, 2**31 - 1)), min_size=1, max_size=30)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@given(ops=_OPS, device_pages=st.integers(1, 3), host_pages=st.integers(1, 3), disk_pages=st.integers(1, 5))
def test_a_tight_disk_tier_never_loses_bytes(device, ops, device_pages, host_pages, disk_pages):
    """With every tier small, an operation either does its job or raises OutOfPagesError and changes
    nothing: a read returns the last bytes written, and once other allocations are freed every
    remaining one reads back whole. (One-page writes: a write is one chunk, so it is all or nothing.)"""
    nvme = tempfile.mkdtemp(prefix="pager-tight-")
    try:
        with make_pager(nvme=nvme, device_pages=device_pages, host_pages=host_pages, disk_limit=disk_pages * PAGE, device=device) as pager:
            allocations = [pager.allocate(PAGE) for _ in range(4)]
            expected = [torch.zeros(PAGE, dtype=torch.uint8) for _ in allocations]
            for op, index, seed in ops:
                try:
                    if op == "write":
                        payload = random_bytes(PAGE, seed)
                        pager.write(allocations[index], payload)
                        expected[index] = payload
                    elif op == "read":
                        assert torch.equal(pager.read(allocations[index]), expected[index]), f"allocation {index}"
                    else:
                        pager.evict_all()
                except OutOfPagesError:
                    pass
            for index in range(len(allocations) - 1):  # free one at a time; the last must read back
                pager.free(allocations[index])
                for later in range(index + 1, len(allocations)):
                    try:
                        assert torch.equal(pager.read(allocations[later]), expected[later]), f"allocation {later}"
                    except OutOfPagesError:
                        pass
            assert torch.equal(pager.read(allocations[-1]), expected[-1])
    finally:
        shutil.rmtree(nvme, ignore_errors=True)


_FIT_OPS = st.lists(
    st.tuples(st.sampled_from(["write", "read", "evict", "evict_all", "write_back", "prefetch"]), st.integers(0, 7), st.integers(0, 2**31 - 1)),
    min_size=1, max_size=40,
)  # fmt: skip


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@settings(max_examples=300, deadline=None)
@given(ops=_FIT_OPS, device_pages=st.integers(2, 6), host_pages=st.integers(1, 6), disk_pages=st.integers(0, 12),
       sizes=st.lists(st.integers(1, 3), min_size=1, max_size=8), data=st.data())  # fmt: skip
def test_tiers_that_hold_the_bytes_together_never_fail(device, ops, device_pages, host_pages, disk_pages, sizes, data):
    """Allocations whose pages the three tiers hold together (each page in one tier), with room
    for one more copy of the pages a fault brings at once (they keep their lower copies until
    their device slots are filled: :func:`pagedtensor.hf.model.check_tiers_hold_weights`), are
    written, written back (as ``page_weights=True`` does), prefetched and read in any order: no
    step fails, and every read returns the bytes last written. An eviction asked for may find the
    lower tiers full (OutOfPagesError, nothing lost). (A device tier of 0.3x the bytes, a host of
    0.1x and a disk of 0.8x failed with 'disk tier full': clean copies of device pages filled the
    lower tiers, and staging a disk page needed a host slot no page could give up.)"""
    # As many allocations as fit with a fault's pages (half the device tier at most) copied twice.
    total, twice = device_pages + host_pages + disk_pages, min(device_pages // 2, max(sizes))
    sizes = [size for size, end in zip(sizes, itertools.accumulate(sizes)) if end + twice <= total] or [1]
    nvme = tempfile.mkdtemp(prefix="pager-fit-")
    disk = dict(nvme=nvme, disk_limit=disk_pages * PAGE) if disk_pages else {}
    try:
        with make_pager(device_pages=device_pages, host_pages=host_pages, device=device, **disk) as pager:
            allocations = [pager.allocate(size * PAGE) for size in sizes]
            expected = [torch.zeros(size * PAGE, dtype=torch.uint8) for size in sizes]
            for op, index, seed in ops:
                index %= len(allocations)
                allocation = allocations[index]
                if op == "write":
                    offset = data.draw(st.integers(0, allocation.nbytes - 1), label="offset")
                    payload = random_bytes(data.draw(st.integers(1, allocation.nbytes - offset), label="length"), seed)
                    pager.write(allocation, payload, offset)
                    expected[index][offset : offset + payload.numel()] = payload
                elif op == "read":
                    assert torch.equal(pager.read(allocation), expected[index]), f"allocation {index}"
                elif op in ("evict", "evict_all"):
                    tables = [pager.page_table(each) for each in allocations]
                    below = sum(info.tier in ("host", "disk") for table in tables for info in table)
                    leaving = sum(info.tier == "device" for table in (tables if op == "evict_all" else [tables[index]]) for info in table)
                    try:
                        if op == "evict":
                            pager.evict(allocation)
                        else:
                            pager.evict_all()
                    except OutOfPagesError:  # only where the lower tiers cannot hold a copy of each page off the device after it
                        assert below + leaving > host_pages + disk_pages, (below, leaving, host_pages, disk_pages)
                elif op == "write_back":
                    pager.write_back(allocation)
                else:
                    pager.prefetch(allocation, 0, min(allocation.num_pages, max(1, device_pages // 2))).exception()
            for index, allocation in enumerate(allocations):
                assert torch.equal(pager.read(allocation), expected[index]), f"allocation {index}"
    finally:
        shutil.rmtree(nvme, ignore_errors=True)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_an_unwritten_overwrite_refills_a_pinned_page_from_a_full_disk(tmp_path, device):
    """The refill of a page another holder pins reads its disk copy straight into the slot: staging it
    through a full host tier would spill to a full disk tier, which could only fail (or, dropping the
    page's own disk copy as a duplicate of its zero-filled slot, lose it)."""
    with make_pager(nvme=str(tmp_path), device_pages=2, host_pages=1, disk_limit=2 * PAGE, device=device) as pager:
        a, b, c = (pager.allocate(PAGE) for _ in range(3))
        for seed, allocation in enumerate((a, b, c)):
            pager.write(allocation, random_bytes(PAGE, seed))
        pager.evict_all()
        tiers = {name: pager.page_table(allocation)[0].tier for name, allocation in zip("abc", (a, b, c))}
        assert sorted(tiers.values()) == ["disk", "disk", "host"], tiers
        target = next(allocation for name, allocation in zip("abc", (a, b, c)) if tiers[name] == "disk")
        overwrite = pager.ensure_resident(target, discard=[0])
        reader = pager.ensure_resident(target)  # pins the zero-filled slot
        overwrite.release()  # the overwrite failed: the pinned slot gets the old bytes back
        reader.wait()
        assert torch.equal(reader.contiguous().cpu(), random_bytes(PAGE, (a, b, c).index(target)))
        reader.release()
        for seed, allocation in enumerate((a, b, c)):
            assert torch.equal(pager.read(allocation), random_bytes(PAGE, seed))


@pytest.mark.parametrize("source", ["host", "disk"])
def test_an_unwritten_overwrite_whose_refill_fails_keeps_the_old_bytes(tmp_path, monkeypatch, source: str):
    """The refill of a page another holder pins failed (a disk error, or Ctrl-C in the copy): the page
    kept its zero-filled slot as its only authoritative copy, with its old bytes taken for a clean
    cache of it, and read back as zeros (a later partial write would have kept them for good). The
    old copy stays the page until the last holder lets go, which drops the slot."""
    with make_pager(nvme=str(tmp_path), device_pages=2, host_pages=2) as pager:
        allocation = pager.allocate(PAGE)
        pager.write(allocation, random_bytes(PAGE, 1))
        pager.evict_all()
        if source == "disk":
            other = pager.allocate(2 * PAGE)
            pager.write(other, random_bytes(2 * PAGE, 2))
            pager.evict_all()  # the host tier is full of the other pages: the page is on disk only
        assert pager.page_table(allocation)[0].tier == source
        overwrite = pager.ensure_resident(allocation, discard=[0])
        reader = pager.ensure_resident(allocation)  # pins the zero-filled slot
        if source == "disk":
            failing = (pager.disk_tier, "read_pages")
        else:
            failing = (pager, "_copy_host_to_device")

        def fail(*args, **kwargs):
            raise OSError(errno.EIO, "injected")

        monkeypatch.setattr(*failing, fail)
        with pytest.raises(OSError, match="injected"):
            overwrite.release()  # the overwrite failed, and so does the refill of the pinned slot
        monkeypatch.undo()
        reader.release()
        assert not pager._overwriting
        assert pager.page_table(allocation)[0].device_slot is None
        assert torch.equal(pager.read(allocation), random_bytes(PAGE, 1))
        pager.write(allocation, random_bytes(16, 3), 8)  # a partial write keeps the rest of the old bytes
        expected = random_bytes(PAGE, 1)
        expected[8:24] = random_bytes(16, 3)
        assert torch.equal(pager.read(allocation), expected)


def test_a_forked_child_cannot_use_the_disk_tier_and_leaves_the_page_file(tmp_path):
    """A forked child has copies of the pager: pages in memory read fine, a page on disk raises a
    RuntimeError naming the fork (the page file and I/O ring are the parent's; using them hung or
    could overwrite the parent's slots), and closing the child's copy keeps the parent's file."""
    import os

    pager = make_pager(nvme=str(tmp_path), device_pages=2, host_pages=2)
    allocations = [pager.allocate(PAGE) for _ in range(6)]
    for seed, allocation in enumerate(allocations):
        pager.write(allocation, random_bytes(PAGE, seed))
    on_disk = next(index for index, allocation in enumerate(allocations) if pager.page_table(allocation)[0].tier == "disk")
    in_memory = next(index for index, allocation in enumerate(allocations) if pager.page_table(allocation)[0].tier == "device")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report through the pipe, never return into pytest
        code = 1
        try:
            assert torch.equal(pager.read(allocations[in_memory]), random_bytes(PAGE, in_memory))
            try:
                pager.read(allocations[on_disk])
            except RuntimeError as error:
                code = 0 if "forked child" in str(error) else 2
            pager.close()
        finally:
            os.write(write_end, bytes([code]))
            os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    assert os.read(read_end, 1) == bytes([0])
    os.close(read_end)
    assert os.path.exists(pager.disk_tier.fd_path)  # the child's close left the parent's file open
    for seed, allocation in enumerate(allocations):
        assert torch.equal(pager.read(allocation), random_bytes(PAGE, seed))
    pager.close()


def test_a_pager_finalized_inside_a_registry_call_does_not_hang_it():
    """A pager dropped without close() in a reference cycle is finalized by whichever garbage
    collection runs next. One that ran inside a call of the pager's registry (``register`` of a new
    pager's metrics, a scrape) holds the registry's lock, which is not reentrant: the finalizer's
    ``unregister`` waited on it for ever, and ``Pager(...)`` never returned."""
    registry = CollectorRegistry()
    config = MemoryConfig(vram_limit=4 * PAGE, host_memory=4 * PAGE, page_size=PAGE, device="cpu", prefetch_strategy="none")

    class CollectsGarbageWhenDescribed:
        """A collector whose ``describe`` (run by ``register`` under the registry's lock) collects garbage."""

        def describe(self):
            gc.collect()
            return []

        def collect(self):
            return []

    def register_while_a_dropped_pager_is_collected() -> None:
        gc.disable()
        try:
            pager = Pager(config, registry=registry)
            pager.itself = pager  # a cycle: only a garbage collection frees it
            dropped.append(weakref.ref(pager))
            del pager
        finally:
            gc.enable()
        registry.register(CollectsGarbageWhenDescribed())

    dropped: list = []
    worker = threading.Thread(target=register_while_a_dropped_pager_is_collected, daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "register() hung: the dropped pager's finalizer waited on the registry's lock"
    assert dropped[0]() is None
    deadline = time.monotonic() + 10  # its names leave the registry once the lock is free
    while True:
        try:
            Pager(config, registry=registry).close()
            break
        except ValueError:
            assert time.monotonic() < deadline, "the dropped pager's metrics stayed in the registry"
            time.sleep(0.01)


def test_a_closed_pager_frees_its_metric_names_and_a_bad_registry_is_named():
    from prometheus_client import CollectorRegistry

    config = MemoryConfig(vram_limit=4 * PAGE, host_memory=4 * PAGE, page_size=PAGE, device="cpu")
    registry = CollectorRegistry()
    with Pager(config, registry=registry):
        with pytest.raises(ValueError):
            Pager(config, registry=registry)  # a second live pager on one registry
    with Pager(config, registry=registry) as pager:  # the closed one's names are free again
        assert pager.metrics.registry is registry
    with pytest.raises(TypeError, match="registry"):
        Pager(config, registry="x")
    # The class, not an instance: its register is a plain function, which raised prometheus_client's
    # "missing 1 required positional argument" naming neither the argument nor the value.
    with pytest.raises(TypeError, match=r"registry: expected a prometheus_client CollectorRegistry or None, got the class CollectorRegistry"):
        Pager(config, registry=CollectorRegistry)


@pytest.mark.parametrize("allocations", ["one", None, 3, "text"])
def test_prefetch_together_names_an_argument_that_is_not_a_sequence_of_allocations(allocations):
    """An Allocation, None or an int raised a bare "'Allocation' object is not iterable"."""
    config = MemoryConfig(vram_limit=4 * PAGE, host_memory=4 * PAGE, page_size=PAGE, device="cpu")
    with Pager(config) as pager:
        value = pager.allocate(PAGE) if allocations == "one" else allocations
        with pytest.raises(TypeError, match=r"allocations: expected a sequence of Allocations, got (Allocation|NoneType|int|str)"):
            pager.prefetch_together(value)


def _faults_per_pass(pager: Pager, allocations: list, passes: int) -> list[int]:
    """Use every allocation in turn, ``passes`` times; the device faults of each pass."""
    counts = []
    for _ in range(passes):
        before = pager.stats()["faults"]
        for allocation in allocations:
            with pager.ensure_resident(allocation):
                pass
        counts.append(pager.stats()["faults"] - before)
    return counts


@pytest.mark.parametrize("policy", ["lru", "2q"])
def test_a_loop_that_does_not_fit_keeps_most_of_itself_resident(policy):
    """Eight one-page allocations used in a loop on a six-page device tier: by recency (LRU) each
    page is evicted just before its next use, so every use faults; advised ``"loop"`` the page just used
    leaves first, so after the first pass at most N - C + 1 = 3 of the 8 uses fault (MRU on a loop),
    the bytes are intact, and advised ``"normal"`` again the loop faults everywhere again."""
    pager = make_pager(device_pages=6, host_pages=8, eviction_policy=policy, prefetch_strategy="none")
    allocations = [pager.allocate(PAGE) for _ in range(8)]
    for index, allocation in enumerate(allocations):
        pager.write(allocation, random_bytes(PAGE, seed=index))
    recency = _faults_per_pass(pager, allocations, 3)[1:]
    assert recency == [8, 8] if policy == "lru" else min(recency) > 3, recency  # 2Q keeps a page or two in am
    for allocation in allocations:
        pager.advise(allocation, "loop")
    looped = _faults_per_pass(pager, allocations, 6)[1:]
    assert max(looped) <= 3, looped
    for index, allocation in enumerate(allocations):
        assert torch.equal(pager.read(allocation), random_bytes(PAGE, seed=index))
        pager.advise(allocation, "normal")
    if policy == "lru":
        assert _faults_per_pass(pager, allocations, 3)[1:] == [8, 8]


def test_advise_names_a_bad_access_pattern_or_allocation():
    pager = make_pager()
    allocation = pager.allocate(PAGE)
    with pytest.raises(ValueError, match="access: expected one of .*'sequential'"):
        pager.advise(allocation, "sequential")
    pager.free(allocation)
    with pytest.raises(ValueError, match="freed"):
        pager.advise(allocation, "loop")


def test_a_loop_that_fits_beside_stale_pages_stops_faulting():
    """A six-page loop and four pages written once and never used again, on an eight-page device
    tier: the stale pages are older than the loop's oldest use, so they leave first and the loop
    ends up resident (no faults a pass), as under recency. (When used loop pages left before every
    other page, the stale pages kept their slots and the loop faulted 2 to 4 pages every pass.)"""
    pager = make_pager(device_pages=8, host_pages=16, prefetch_strategy="none")
    layers = [pager.allocate(2 * PAGE) for _ in range(3)]
    stale = pager.allocate(4 * PAGE)
    pager.write(stale, random_bytes(4 * PAGE, seed=9))
    for index, allocation in enumerate(layers):
        pager.advise(allocation, "loop")
        pager.write(allocation, random_bytes(2 * PAGE, seed=index))
    faults = _faults_per_pass(pager, layers, 5)
    assert faults[2:] == [0, 0, 0], faults
    assert torch.equal(pager.read(stale), random_bytes(4 * PAGE, seed=9))


def _kv_faults_per_pass(pager: Pager, layer_pages: int, layers: int, passes: int, prefetch: bool) -> list[int]:
    """``layers`` loop-advised layers of ``layer_pages`` pages, each followed by a one-page KV-like
    allocation used and written once a pass (with ``prefetch``, each layer's use is preceded by the
    layer-ahead prefetch of the next); the KV pages that fault, pass by pass."""
    weights = [pager.allocate(layer_pages * PAGE) for _ in range(layers)]
    kv = [pager.allocate(PAGE) for _ in range(layers)]
    for allocation in weights:
        pager.advise(allocation, "loop")
    counts = []
    for _ in range(passes):
        faults = 0
        for index, (layer, cache) in enumerate(zip(weights, kv)):
            if prefetch:
                pager.prefetch(weights[(index + 1) % layers]).result()
            pager.ensure_resident(layer).release()
            faults += cache.pages[0].device_slot is None
            pager.ensure_resident(cache).release(dirty=True)
        counts.append(faults)
    return counts


def test_pages_used_once_a_pass_between_the_loops_layers_stay_resident():
    """Four one-page layers advised "loop" and four one-page KV-like allocations used (and written)
    right after their layer, on a six-page device tier: the KV pages were last used within the last
    pass, so they are not stale and stay; only the layers move (two or three a pass, none of the
    KV pages, no write-backs). When the loop block sat after every key older than its least recently
    used key, the KV pages of the layers not yet reached counted as stale: two KV faults and two
    write-backs every other pass."""
    kv_faults = _kv_faults_per_pass(make_pager(device_pages=6, host_pages=16), 1, 4, 6, prefetch=False)
    assert kv_faults[0] == 4 and kv_faults[2:] == [0, 0, 0, 0], kv_faults


def test_a_partly_resident_loop_weight_leaves_pages_used_since_its_last_pass_alone():
    """Eight three-page layers advised "loop", each followed by a one-page KV-like allocation used
    once a pass and written, on a twenty-page device tier. When a loop allocation could leave in
    part, the layer at the edge of the resident part was split every pass, and faulting its
    missing pages must not count its resident pages' own use as the loop's last pass (they were
    touched before the demote read them), which made every KV page stale: 7-8 KV faults and
    write-backs a pass. (Loop allocations now leave whole.) No KV page faults once warm."""
    kv_faults = _kv_faults_per_pass(make_pager(device_pages=20, host_pages=64), 3, 8, 8, prefetch=True)
    assert kv_faults[3:] == [0] * 5, kv_faults


def _slots(allocation) -> list:
    return [page.device_slot for page in allocation.pages]


def _adjacent(slots: list) -> bool:
    return None not in slots and slots == list(range(slots[0], slots[0] + len(slots)))


def test_prefetch_together_lands_a_batch_in_adjacent_slots_with_one_copy(monkeypatch):
    """Three allocations prefetched together into a device tier whose free slots are scattered
    (every other slot pinned), but hold a run of their size further on: they land in that run,
    in order, in one copy (their host slots are adjacent too), and read back intact."""
    pager = make_pager(device_pages=16, host_pages=16)
    parts = [pager.allocate(pages * PAGE) for pages in (3, 2, 1)]
    for index, allocation in enumerate(parts):
        pager.write(allocation, random_bytes(allocation.nbytes, index))
    pager.evict_all()
    assert [page.host_slot for allocation in parts for page in allocation.pages] == list(range(6))
    blockers = [pager.allocate(PAGE) for _ in range(4)]
    held = [pager.ensure_resident(blocker) for blocker in blockers]  # device slots 0-3
    copies = []
    real_copy = pager.engine.copy
    monkeypatch.setattr(pager.engine, "copy", lambda stream, runs, *rest: copies.append(len(runs)) or real_copy(stream, runs, *rest))
    future = pager.prefetch_together(parts)
    assert future.done() and future.result() == 6  # all in host memory: enqueued on the calling thread
    slots = [slot for allocation in parts for slot in _slots(allocation)]
    assert _adjacent(slots), slots
    assert copies == [1]
    for resident in held:
        resident.release()
    for index, allocation in enumerate(parts):
        assert torch.equal(pager.read(allocation), random_bytes(allocation.nbytes, index))


def test_prefetch_together_that_does_not_fit_brings_each_allocation_as_far_as_it_fits():
    """Two three-page allocations on a five-page device tier with one page pinned: together they
    do not fit, so each is prefetched on its own (the second evicts two pages of the first, the
    least recently used); nothing stays pinned and the bytes are intact."""
    pager = make_pager(device_pages=5, host_pages=16)
    first, second, blocker = pager.allocate(3 * PAGE), pager.allocate(3 * PAGE), pager.allocate(PAGE)
    pager.write(first, random_bytes(3 * PAGE, 1))
    pager.write(second, random_bytes(3 * PAGE, 2))
    pager.evict_all()
    with pager.ensure_resident(blocker):
        assert pager.prefetch_together([first, second]).result() == 6
        assert None not in _slots(second) and _slots(first) == [None, None, _slots(first)[2]] != [None] * 3
        assert all(page.pin_count == 0 for allocation in (first, second) for page in allocation.pages)
    assert torch.equal(pager.read(first), random_bytes(3 * PAGE, 1))
    assert torch.equal(pager.read(second), random_bytes(3 * PAGE, 2))
    with pytest.raises(TypeError):
        pager.prefetch_together([first, "not an allocation"])
    pager.evict_all()
    assert pager.prefetch_together([first, first, second, first]).result() == 6  # each once
    assert pager.device_tier.used_pages == 5  # as before: together they do not fit, each alone does
    pager.free(first)
    pager.free(second)
    assert pager.device_tier.used_pages == 0  # no slot lost


def test_a_prefetch_that_reads_from_disk_runs_on_the_prefetch_thread(nvme_dir, monkeypatch):
    """Pages in host memory are prefetched on the calling thread; pages that must be read from disk
    on the prefetch thread, whose reads overlap the caller's work."""
    import threading

    pager = make_pager(nvme_dir, device_pages=4, host_pages=6)
    far, filler, near = pager.allocate(2 * PAGE), pager.allocate(4 * PAGE), pager.allocate(2 * PAGE)
    for index, allocation in enumerate((far, filler, near)):
        pager.write(allocation, random_bytes(allocation.nbytes, index + 1))
        pager.evict_all()  # the host's six slots fill: far's pages go on to disk
    pager.free(filler)  # room on the host: making room on the device spills nothing
    assert all(page.host_slot is not None for page in near.pages)
    assert all(page.host_slot is None and page.disk_slot is not None for page in far.pages)
    threads = []
    real = pager._prefetch_now
    monkeypatch.setattr(pager, "_prefetch_now", lambda *args: threads.append(threading.current_thread().name) or real(*args))
    pager.prefetch(near).result()
    pager.prefetch(far).result()
    assert threads[0] == threading.current_thread().name and threads[1].startswith("pagedllm-prefetch"), threads
    assert torch.equal(pager.read(far), random_bytes(2 * PAGE, 1))
    assert torch.equal(pager.read(near), random_bytes(2 * PAGE, 3))


def test_a_loop_allocation_leaves_the_device_whole():
    """A four-page allocation advised "loop" and used, then a six-page fault on an eight-page device
    tier: the policy names two of its pages, and the other two leave with them (one left in part
    would fault in part at its next use, into slots away from the rest). A normal allocation
    leaves only the pages named."""
    for advice, left in (("loop", 4), ("normal", 2)):
        pager = make_pager(device_pages=8, host_pages=16)
        used, incoming = pager.allocate(4 * PAGE), pager.allocate(6 * PAGE)
        pager.write(used, random_bytes(4 * PAGE, 1))
        pager.advise(used, advice)
        pager.ensure_resident(used).release()
        pager.ensure_resident(incoming).release()
        assert sum(slot is None for slot in _slots(used)) == left, (advice, _slots(used))
        assert torch.equal(pager.read(used), random_bytes(4 * PAGE, 1))


def test_a_loop_allocation_leaving_whole_takes_no_host_room_the_victims_do_not_need():
    """The host keeps room to take every device page back: the rest of a loop allocation that would
    need writing back stays on the device rather than fill the host (a one-page fault evicting a
    six-page one whole filled the host, and without a disk tier the next read found no room to
    write anything back)."""
    pager = make_pager(device_pages=8, host_pages=4)
    loop, kv, extra = pager.allocate(6 * PAGE), pager.allocate(2 * PAGE), pager.allocate(PAGE)
    pager.advise(loop, "loop")
    pager.write(loop, random_bytes(6 * PAGE, 1))  # six dirty device pages
    pager.ensure_resident(loop).release()
    pager.write(kv, random_bytes(2 * PAGE, 2))  # the device is full
    pager.ensure_resident(extra).release()
    assert pager.host_tier.used_pages == 1
    assert torch.equal(pager.read(loop), random_bytes(6 * PAGE, 1))
    assert torch.equal(pager.read(kv), random_bytes(2 * PAGE, 2))


@pytest.mark.parametrize("policy", ["lru", "2q"])
def test_without_a_disk_tier_the_rest_of_a_loop_allocation_keeps_the_hosts_droppable_copies(policy):
    """Without a disk tier, the host may drop its copy of a page that is also on the device to make
    room: a clean page leaving the device with its loop allocation turns that copy into its only
    one. On a two-page device and a three-page host, a four-page loop allocation read twice and
    then one page overwritten: the rest stays (it went, and the host had nowhere to put the page
    written back: OutOfPagesError, and later reads failing too)."""
    pager = make_pager(device_pages=2, host_pages=3, eviction_policy=policy)
    allocation = pager.allocate(4 * PAGE)
    pager.advise(allocation, "loop")
    pager.write(allocation, random_bytes(4 * PAGE, 1))
    pager.read(allocation)
    pager.read(allocation)
    with pager.ensure_resident(allocation, 1, 2, discard=[1]) as resident:
        resident.views()[0].fill_(7)
        resident.mark_dirty()
    expected = random_bytes(4 * PAGE, 1)
    expected[PAGE : 2 * PAGE] = 7
    for _ in range(3):
        assert torch.equal(pager.read(allocation), expected)


def test_a_prefetch_whose_room_spills_the_host_to_disk_runs_on_the_prefetch_thread(nvme_dir, monkeypatch):
    """Pages all in host memory, but making room writes dirty device pages back into a full host
    tier, which spills to disk: the disk writes go on the prefetch thread, not the caller's."""
    import threading

    pager = make_pager(nvme_dir, device_pages=4, host_pages=4)
    cold, hot = pager.allocate(4 * PAGE), pager.allocate(4 * PAGE)
    pager.write(cold, random_bytes(4 * PAGE, 1))
    pager.evict_all()  # cold: the host tier's four slots
    pager.write(hot, random_bytes(4 * PAGE, 2))  # four dirty device pages
    writers = []
    real = pager.disk_tier.write_pages
    monkeypatch.setattr(pager.disk_tier, "write_pages", lambda *a, **k: writers.append(threading.current_thread().name) or real(*a, **k))
    pager.prefetch(cold).result()
    assert writers and all(name.startswith("pagedllm-prefetch") for name in writers), writers
    assert torch.equal(pager.read(cold), random_bytes(4 * PAGE, 1))
    assert torch.equal(pager.read(hot), random_bytes(4 * PAGE, 2))


def test_pages_written_back_take_host_slots_in_page_order():
    """A loop allocation's pages leave most recently used first, which for one weight is backwards:
    written back, they still take host slots in page order, so its later fault-ins are one copy."""
    pager = make_pager(device_pages=4, host_pages=16)
    weight, other = pager.allocate(4 * PAGE), pager.allocate(4 * PAGE)
    pager.write(weight, random_bytes(4 * PAGE, 1))  # only on the device: dirty
    pager.advise(weight, "loop")
    pager.ensure_resident(weight).release()
    pager.ensure_resident(other).release()  # the weight leaves, written back
    host_slots = [page.host_slot for page in weight.pages]
    assert host_slots == list(range(host_slots[0], host_slots[0] + 4)), host_slots
    assert torch.equal(pager.read(weight), random_bytes(4 * PAGE, 1))


def test_discard_drops_every_copy_and_reads_zeros(tmp_path):
    """Pager.discard (for a KV cache's pages no sequence refers to): pages on every tier lose their
    copies and read as zeros, the allocation stays; a pinned page is refused, naming it."""
    page = 4096
    pager = Pager(MemoryConfig(vram_limit=2 * page, host_memory=2 * page, page_size=page, nvme_path=str(tmp_path), device="cpu",
                               slab_size=page, prefetch_strategy="none"))  # fmt: skip
    with pager:
        allocation = pager.allocate(6 * page)
        data = torch.randint(1, 256, (6 * page,), dtype=torch.uint8)
        pager.write(allocation, data)
        assert {info.tier for info in pager.page_table(allocation)} == {"device", "host", "disk"}
        version = allocation.version
        pager.discard(allocation, 1, 5)
        assert [info.tier for info in pager.page_table(allocation)][1:5] == [None] * 4
        assert allocation.version > version
        expected = data.clone()
        expected[page : 5 * page] = 0
        assert torch.equal(pager.read(allocation), expected)
        with pager.ensure_resident(allocation, 0, 1):
            with pytest.raises(RuntimeError, match=r"discard: pages \[0\]"):
                pager.discard(allocation, 0, 2)
        pager.free(allocation)
        assert pager.stats()["allocations"] == 0


def test_a_full_host_tier_names_the_pages_needed_and_those_that_cannot_spill():
    """Two pages on the device, eight on the host, no disk tier: a one-page allocation names one more
    host page needed and the eight that cannot spill (it said "cannot spill 8 pages", as if 8 were needed)."""
    with make_pager(device_pages=2, host_pages=8) as pager:
        pager.write(pager.allocate(10 * PAGE), torch.zeros(10 * PAGE, dtype=torch.uint8))
        with pytest.raises(OutOfPagesError, match=r"host tier full .*: 1 more host page\(s\) needed, and none of the 8 pages"):
            pager.write(pager.allocate(PAGE), torch.zeros(PAGE, dtype=torch.uint8))



def test_free_called_by_a_finalizer_inside_a_pager_call_waits_for_the_next_call(monkeypatch):
    """``weakref.finalize(obj, pager.free, allocation)`` run by a garbage collection landing inside an
    eviction of this thread: the free took slots from pages being moved (TypeError, host slots
    leaked). It is deferred to the pager's next call from outside one."""
    import gc

    pager = make_pager(device_pages=4, host_pages=8, slab_size=8 * PAGE)
    dropped = pager.allocate(4 * PAGE)
    pager.write(dropped, random_bytes(4 * PAGE))

    class Owner:
        pass

    gc.disable()
    try:
        owner = Owner()
        owner.cycle = owner
        weakref.finalize(owner, pager.free, dropped)
        del owner
        collected = collect_inside_first_eviction(pager, monkeypatch)
        kept = pager.allocate(4 * PAGE)
        data = random_bytes(4 * PAGE, seed=3)
        pager.write(kept, data)  # the whole device tier: evicts the dropped allocation's pages
        assert collected
    finally:
        gc.enable()
    assert torch.equal(pager.read(kept), data)
    assert dropped.freed and list(pager._allocations) == [kept.id]
    assert pager.host_tier.used_pages == sum(page.host_slot is not None for page in kept.pages)
    pager.close()


def _in_a_forked_child(check: Callable[[], int], then: Callable[[], object] = lambda: None) -> int:
    """The code ``check()`` returns in a forked child (run there, reported through a pipe; 9 where it
    raised, -1 where the child ended with none: a signal killed it); ``then()`` runs in the parent
    once the child is done, whatever happened."""
    import os

    try:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never return into pytest
            code = 9
            try:
                code = check()
            finally:
                os.write(write_end, bytes([code]))
                os._exit(0)
        os.close(write_end)
        os.waitpid(pid, 0)
        reported = os.read(read_end, 1)
        os.close(read_end)
        return reported[0] if reported else -1
    finally:
        then()


def test_a_forked_child_lets_go_of_the_pins_of_the_parents_other_threads():
    """A fork while another thread holds pages pinned: the child kept that pin for good (its thread
    does not run there), and reading a host page raised DeviceTierFullError."""
    pager = make_pager(device_pages=4, host_pages=16, slab_size=16 * PAGE)
    held_allocation, read_allocation = pager.allocate(3 * PAGE), pager.allocate(2 * PAGE)
    pager.write(read_allocation, random_bytes(2 * PAGE, 4))
    pager.evict_all()
    held, done = threading.Event(), threading.Event()

    def holder() -> None:
        with pager.ensure_resident(held_allocation):
            held.set()
            done.wait(30)

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait()
    code = _in_a_forked_child(lambda: 0 if torch.equal(pager.read(read_allocation), random_bytes(2 * PAGE, 4)) and not held_allocation.pins else 3,
                              then=lambda: (done.set(), thread.join()))  # fmt: skip
    assert code == 0
    assert torch.equal(pager.read(read_allocation), random_bytes(2 * PAGE, 4))
    pager.close()


def test_a_child_forked_while_another_thread_writes_a_paged_tensor_can_write_it():
    """A fork while another thread is inside an op writing a PagedTensor (past its fault-in, not in
    the pager): the child's copy of the storage's write lock stayed held by a thread that does not
    run there, and the child's first write to the tensor waited for good (11 of 30 forks of a worker
    looping ``x[r].add_(0)``). The child now writes it, as it would a plain tensor."""
    import signal

    pager = make_pager(device_pages=8)
    values = torch.randn(8, 256)
    tensor = PagedTensor.wrap(values.clone(), pager)
    inside, done = threading.Event(), threading.Event()

    def writer() -> None:  # holds the write lock as an op writing the tensor does, from fault-in to write-back
        with tensor._paged.write_lock:
            inside.set()
            done.wait(30)

    def in_the_child() -> int:
        signal.alarm(30)  # a child that waits for good ends, and its code is never written
        tensor.add_(1)
        return 0 if torch.equal(tensor.materialize(), values + 1) else 3

    thread = threading.Thread(target=writer)
    thread.start()
    inside.wait()
    assert _in_a_forked_child(in_the_child, then=lambda: (done.set(), thread.join())) == 0
    assert torch.equal(tensor.materialize(), values)
    pager.close()


@pytest.mark.parametrize("marked", [True, False], ids=["marked_dirty", "written_not_yet_marked"])
def test_a_child_forked_while_another_thread_holds_written_pages_keeps_their_bytes(marked):
    """A fork while another thread has written pinned pages (marked dirty or not: an op marks them
    as it releases them) and not released them: the child read the new bytes while the pages stayed
    on the device tier, then the old ones, its clean host copies, once they were evicted (found by
    a helper's probe: 46 of 100 forks beside a thread looping ``w.add_(1)``). The child keeps the
    bytes as the fork left them, as a plain tensor's."""
    pager = make_pager(device_pages=8, host_pages=16, slab_size=16 * PAGE)
    allocation = pager.allocate(4 * PAGE)
    pager.write(allocation, torch.zeros(4 * PAGE, dtype=torch.uint8))
    pager.evict_all()  # its pages have host copies
    written, done = threading.Event(), threading.Event()

    def writer() -> None:
        with pager.ensure_resident(allocation) as resident:
            for view in resident.views():
                view.fill_(1)
            if marked:
                resident.mark_dirty()
            written.set()
            done.wait(30)

    def in_the_child() -> int:
        before = pager.read(allocation)
        pager.evict_all()
        after = pager.read(allocation)
        return 0 if bool((before == 1).all()) and torch.equal(after, before) else 3

    thread = threading.Thread(target=writer)
    thread.start()
    written.wait(30)
    assert _in_a_forked_child(in_the_child, then=lambda: (done.set(), thread.join())) == 0
    pager.close()


def test_a_child_forked_while_another_thread_moves_pages_refuses_the_pager(monkeypatch):
    """A fork while another thread is inside a fault (a page given a device slot, its copy not made
    yet): the child read that page from the unfilled slot (another tensor's bytes), silently. Its
    copy of that pager now raises RuntimeError naming the fork; the parent's is untouched."""
    pager = make_pager(device_pages=4, host_pages=16, slab_size=16 * PAGE)
    allocation = pager.allocate(2 * PAGE)
    pager.write(allocation, random_bytes(2 * PAGE, 5))
    pager.evict_all()
    other = pager.allocate(4 * PAGE)
    pager.write(other, torch.full((4 * PAGE,), 7, dtype=torch.uint8))  # the device slots now hold other bytes
    pager.evict_all()
    in_fault, go_on = threading.Event(), threading.Event()
    copy = pager._copy_host_to_device

    def paused_copy(pages):  # the other thread paused inside its fault: slots taken, bytes not copied
        in_fault.set()
        go_on.wait(30)
        return copy(pages)

    monkeypatch.setattr(pager, "_copy_host_to_device", paused_copy)
    reader = threading.Thread(target=lambda: pager.read(allocation))
    reader.start()
    in_fault.wait(30)

    def child() -> int:
        try:
            pager.read(allocation)
        except RuntimeError as error:
            return 0 if "forked child" in str(error) else 2
        return 3

    code = _in_a_forked_child(child, then=lambda: (go_on.set(), reader.join()))
    assert code == 0
    assert torch.equal(pager.read(allocation), random_bytes(2 * PAGE, 5))
    pager.close()


def test_a_forked_childs_release_of_a_pin_of_the_parents_other_thread_changes_nothing():
    """The child drops the pins of the parent's other threads, but their holders live on there (a
    cache's pins a worker thread took): releasing one unpinned the range a second time, taking the
    forking thread's own pin of the same pages (they could leave the device while it held them,
    and its own release raised KeyError)."""
    pager = make_pager(device_pages=4, host_pages=64, slab_size=4 * PAGE)
    allocation = pager.allocate(2 * PAGE)
    pager.write(allocation, torch.full((2 * PAGE,), 7, dtype=torch.uint8))
    holders: dict[str, ResidentPages] = {}
    pinned, go = threading.Event(), threading.Event()

    def worker() -> None:
        holders["worker"] = pager.ensure_resident(allocation)
        pinned.set()
        go.wait(30)
        holders["worker"].release()

    thread = threading.Thread(target=worker)
    thread.start()
    pinned.wait()
    mine = pager.ensure_resident(allocation)  # the forking thread pins the same pages

    def child() -> int:
        holders["worker"].release()
        if not allocation.pages[0].pin_count:
            return 3  # the forking thread's own pin went
        filler = pager.allocate(4 * PAGE)
        try:
            pager.write(filler, torch.full((4 * PAGE,), 9, dtype=torch.uint8))
        except OutOfPagesError:
            pass  # the held pages stay: no room for four more
        for view in mine.views():
            view.fill_(1)
        mine.release(dirty=True)
        return 0 if bool((pager.read(allocation) == 1).all()) else 4

    code = _in_a_forked_child(child, then=lambda: (go.set(), thread.join()))
    mine.release()
    assert code == 0
    pager.close()


def test_a_child_forked_while_another_thread_makes_the_default_pager_gets_one(monkeypatch):
    """A fork while another thread was inside ``get_default_pager`` (making the default pager on a
    first wrap) left the module's lock held in the child by a thread it has not: the child's first
    ``PagedTensor.wrap`` without a pager hung for good."""
    import signal

    from pagedtensor import PagedTensor, default_pager

    monkeypatch.setattr(default_pager, "_default", None)
    inside, go_on = threading.Event(), threading.Event()
    made = []

    def slow_pager(config):  # the other thread pauses inside, holding the lock
        if threading.current_thread().name == "maker":
            inside.set()
            go_on.wait(30)
        made.append(Pager(config))
        return made[-1]

    monkeypatch.setattr(default_pager, "Pager", slow_pager)
    maker = threading.Thread(target=default_pager.get_default_pager, name="maker")
    maker.start()
    inside.wait(30)

    def child() -> int:
        def hung(signum, frame):
            raise TimeoutError("the default pager's lock stayed held")

        torch.set_num_threads(1)  # OpenMP's threads do not survive a fork: a parallel op there would hang
        signal.signal(signal.SIGALRM, hung)
        signal.alarm(20)
        try:
            values = torch.arange(4.0)
            return 0 if torch.equal(PagedTensor.wrap(values).materialize(), values) else 2
        except TimeoutError:
            return 4

    code = _in_a_forked_child(child, then=lambda: (go_on.set(), maker.join()))
    for pager in made:
        pager.close()
    assert code == 0


@settings(max_examples=120, deadline=None)
@given(data=st.data(), device_pages=st.integers(2, 6), host_pages=st.integers(1, 8), disk_pages=st.sampled_from([None, 1, 3]),
       policy=st.sampled_from(["lru", "2q"]))  # fmt: skip
def test_without_room_to_spill_one_free_slot_is_room_enough_for_any_request(data, device_pages, host_pages, disk_pages, policy):
    """With no disk tier (or a full one), pages the device tier takes in must find host slots for the
    pages they replace: all at once, a request failed while several slots were free (13 pages in 8
    device and 8 host slots could not be read back at all). Brought in a half at a time, each half's
    host copies make room for the next, so one free slot in any tier is enough for any request.
    A whole-page overwrite may not fit (the old bytes stay until it is done); one that fails leaves
    the old bytes readable (its first half's zero-filled pages stayed "being overwritten" for good)."""
    total = data.draw(st.integers(1, device_pages + host_pages + (disk_pages or 0) - 1), label="pages")
    folder = tempfile.mkdtemp() if disk_pages else None
    disk = dict(nvme=folder, disk_limit=disk_pages * PAGE) if disk_pages else {}
    with make_pager(device_pages=device_pages, host_pages=host_pages, slab_size=PAGE, eviction_policy=policy, pin_wait_s=1.0, **disk) as pager:
        allocation = pager.allocate(total * PAGE)
        expected = random_bytes(total * PAGE, total)
        pager.write(allocation, expected)
        for step in range(data.draw(st.integers(1, 6), label="requests")):
            start = data.draw(st.integers(0, total - 1), label="start")
            stop = data.draw(st.integers(start + 1, min(total, start + device_pages)), label="stop")
            if data.draw(st.booleans(), label="overwrite whole"):
                try:
                    with pager.ensure_resident(allocation, start, stop, discard=range(start, stop)) as resident:
                        for view in resident.views():
                            view.fill_(100 + step)
                        resident.mark_dirty()
                except OutOfPagesError:
                    continue
                expected[start * PAGE : stop * PAGE] = 100 + step
                continue
            with pager.ensure_resident(allocation, start, stop) as resident:
                assert torch.equal(torch.cat(resident.views()), expected[start * PAGE : stop * PAGE])
                if data.draw(st.booleans(), label="write"):
                    for view in resident.views():
                        view.fill_(step)
                    expected[start * PAGE : stop * PAGE] = step
                    resident.mark_dirty()
        assert torch.equal(pager.read(allocation), expected)
        stats = pager.stats()["resident_bytes"]
        assert stats["device"] <= device_pages * PAGE and stats["host"] <= host_pages * PAGE
        assert not pager._overwriting and all(info.pin_count == 0 for info in pager.page_table(allocation))
    if folder is not None:
        shutil.rmtree(folder)
