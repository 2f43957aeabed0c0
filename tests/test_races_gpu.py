"""Stream and event ordering on a real CUDA device.

Each test makes one side of a possible race slow with ``torch.cuda._sleep`` (on the H2D or D2H side
stream, on the current stream, or on a user stream), so that a missing wait turns into a
deterministic wrong result, checked against a shadow copy. ``test_race_*`` tests are the races found
on reading the code (each failed before its fix); ``test_probe_*`` tests guard orderings that were
right already.
"""

from __future__ import annotations

import gc
import io
import threading
import weakref

import pytest
import torch

import pagedtensor
from pagedtensor import MemoryConfig, PagedTensor, Pager

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

MiB = 2**20
# About 0.25 s of GPU time on an H200 (~1.98 GHz): far longer than any host step between enqueueing
# the slow side and the racing side, far shorter than the file's time budget.
SLEEP = int(5e8)


def _pager(device_pages: int, page: int = MiB, host_pages: int = 64, **extra) -> Pager:
    return Pager(MemoryConfig(vram_limit=device_pages * page, host_memory=host_pages * page, page_size=page,
                              prefetch_strategy="none", device="cuda", **extra))  # fmt: skip


def _written(pager: Pager, nbytes: int):
    """A new allocation holding ``nbytes`` random bytes (written through ``pager``) and those bytes."""
    data = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device="cuda")
    allocation = pager.allocate(nbytes)
    pager.write(allocation, data)
    return allocation, data


def _quiet(pager: Pager) -> None:
    """Nothing in flight anywhere (so that only the race the test sets up is live)."""
    pager.synchronize()
    torch.cuda.synchronize()


def _run_threads(*targets):
    """Run ``targets`` each on its own thread; re-raise the first error any of them raised."""
    errors: list[BaseException] = []

    def wrapped(target):
        try:
            target()
        except BaseException as error:  # noqa: BLE001
            errors.append(error)

    threads = [threading.Thread(target=wrapped, args=(target,)) for target in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
        assert not thread.is_alive(), "a test thread hung"
    if errors:
        raise errors[0]


def _zeroed_blocks_until(address: int, nbytes: int, tries: int = 64) -> tuple[list[torch.Tensor], bool]:
    """Ask the allocator (current stream) for blocks of ``nbytes`` and zero each, until one holds
    ``address`` (memory just given back) or ``tries`` run out; the blocks, and whether one held it.
    The allocator hands out the smallest free block that fits first, and blocks of 1 to 10 MiB
    share 20 MiB segments, so free blocks that earlier tests left in the process's segments may
    come first (8 tries ran out once, in a shard of the GPU suite)."""
    blocks = []
    for _ in range(tries):
        block = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        block.fill_(0)
        blocks.append(block)
        if block.data_ptr() <= address < block.data_ptr() + block.numel():
            return blocks, True
    return blocks, False


def _slow_gathered_write_back(monkeypatch) -> None:
    """Make every write-back of a gathered window start ~0.25 s late on the current stream (as a long
    write-back would): everything the host enqueues meanwhile on other streams runs first unless it
    waits on an event recorded after the write-back."""
    from pagedtensor import dispatch

    original = dispatch._Window.write_back

    def slow(self, lo, hi):
        if self.gathered:
            torch.cuda._sleep(SLEEP)
        return original(self, lo, hi)

    monkeypatch.setattr(dispatch._Window, "write_back", slow)


# ============================================================================ suspected races


def test_race_out_op_write_back_after_release_event_loses_the_write(monkeypatch):
    """dispatch.py _run_in_windows: a multi-allocation op records ONE release event
    (_shared_release_event) before the gathered windows' write_back copies are enqueued, and releases
    the written pages dirty behind that event. An eviction right after the op then copies the slot to
    the host (D2H stream, waiting only on that event) before the write-back lands: the write is lost.

    ``out=`` makes the written window private (gathered), so any out= op with another paged input hits it.
    """
    with _pager(4) as pager:
        xd = torch.randn(MiB // 4, device="cuda")
        x = PagedTensor.wrap(xd, pager)
        z = PagedTensor.wrap(torch.zeros_like(xd), pager)
        expected = xd * xd
        _quiet(pager)
        _slow_gathered_write_back(monkeypatch)
        torch.mul(x, x, out=z)
        pager.evict_all()  # z is dirty: written back to the host on the D2H stream
        monkeypatch.undo()
        torch.cuda.synchronize()
        # Occupy every slot, so z faults back from its host copy into another slot.
        filler = pager.allocate(4 * MiB)
        pager.write(filler, torch.full((4 * MiB,), 7, dtype=torch.uint8, device="cuda"))
        got = z.materialize()
        torch.cuda.synchronize()
        assert torch.equal(got, expected), "the out= write was lost: its host copy was taken before the write-back copy ran"


def test_race_out_op_write_back_after_release_event_clobbers_a_reused_slot(monkeypatch):
    """Same root cause as above, other symptom: the slot of the written allocation is evicted and
    handed to another allocation (its H2D fill waits only on the early release event), then the late
    write-back lands on top of the other allocation's bytes."""
    with _pager(2) as pager:
        w, wd = _written(pager, MiB)  # ends up on the host when x and z take both slots
        xd = torch.randn(MiB // 4, device="cuda")
        x = PagedTensor.wrap(xd, pager)
        z = PagedTensor.wrap(torch.zeros_like(xd), pager)
        assert pager.page_table(w)[0].tier == "host"
        _quiet(pager)
        _slow_gathered_write_back(monkeypatch)
        torch.mul(x, x, out=z)
        pager.evict(z.allocation)  # frees z's slot; w faults into it next
        got = pager.read(w)
        monkeypatch.undo()
        torch.cuda.synchronize()
        assert torch.equal(got, wd.cpu()), "a late write-back of z overwrote the slot after w was faulted into it"


def test_race_two_threads_on_one_stream_release_fences_out_of_order():
    """pager.py _release recorded the release event BEFORE taking the pager lock, and SlotFences keeps
    a stream's newest fence by the order of registration. Two threads on one stream (the default
    stream is every thread's) releasing the same pages: A records eA; B enqueues a slow read, records
    eB and registers it; A registers eA last, which replaces eB. A fill of the slots from the host
    (on the H2D stream) then waits on eA only and overwrites them before B's read runs.

    The interleaving is forced by holding thread A between its event record and its registration."""
    with _pager(8) as pager:
        allocation, data = _written(pager, 8 * MiB)
        other, _ = _written(pager, 8 * MiB)  # takes every slot: the allocation goes to the host
        pager.evict_all()
        with pager.ensure_resident(allocation) as resident:  # back in every slot; `other` stays on the host
            resident.wait()
        _quiet(pager)
        a_recorded, b_released = threading.Event(), threading.Event()
        thread_a: list[int] = []
        original_record = pager.engine.record

        def record(stream=None):
            event = original_record(stream)
            if thread_a and threading.get_ident() == thread_a[0] and not a_recorded.is_set():
                a_recorded.set()  # A has recorded its release event but not registered it yet
                # B runs its read and release now, unless the pager's lock (held while the event is
                # recorded and registered) keeps it out: then B goes after A, as it must.
                b_released.wait(2)
            return event

        pager.engine.record = record
        seen = {}

        shared = torch.cuda.Stream()  # one stream for both threads (not the legacy default stream)

        def run_a():
            thread_a.append(threading.get_ident())
            with torch.cuda.stream(shared):
                resident = pager.ensure_resident(allocation)
                resident.wait()
                resident.release()

        def run_b():
            assert a_recorded.wait(30)
            with torch.cuda.stream(shared):
                resident = pager.ensure_resident(allocation)
                resident.wait()
                torch.cuda._sleep(SLEEP)  # B's read runs late
                seen["b"] = torch.cat(resident.views())
                resident.release()
            b_released.set()

        try:
            _run_threads(run_a, run_b)
        finally:
            pager.engine.record = original_record
        with pager.ensure_resident(other) as resident:  # H2D copies into every slot, behind the fences only
            resident.wait()
        torch.cuda.synchronize()
        assert torch.equal(seen["b"], data), "thread B's read saw the slots refilled: its release fence was dropped"


def test_race_release_events_are_recorded_under_the_pager_lock(monkeypatch):
    """The ordering the test above needs, checked directly: every release event (one range's, and
    the one several windows of an op share) is recorded while the pager's lock is held, so the
    order fences are registered in is the order their events were recorded in."""
    with _pager(8) as pager:
        xd = torch.randn(MiB // 4, device="cuda")
        x = PagedTensor.wrap(xd, pager)
        z = PagedTensor.wrap(torch.zeros_like(xd), pager)
        allocation, _ = _written(pager, MiB)
        _quiet(pager)
        original_record = pager.engine.record
        outside_lock = []

        def record(stream=None):
            if not pager._lock._is_owned():
                outside_lock.append(stream)
            return original_record(stream)

        monkeypatch.setattr(pager.engine, "record", record)
        with pager.ensure_resident(allocation):
            pass
        torch.mul(x, x, out=z)  # two windows, one shared event
        _ = x + 1.0
        monkeypatch.undo()
        torch.cuda.synchronize()
        assert outside_lock == [], f"{len(outside_lock)} release event(s) recorded outside the pager's lock"
        assert torch.equal(z.materialize(), xd * xd)


def test_race_write_from_pinned_source_reads_it_after_return():
    """pager.py write: ``view.copy_(source, non_blocking=True)``. From a page-locked CPU tensor that copy
    is asynchronous, so Pager.write returns before it has read ``data``: a caller that reuses its
    buffer (a pinned staging buffer, a DataLoader batch) changes what was stored."""
    with _pager(8) as pager:
        source = torch.randint(0, 256, (4 * MiB,), dtype=torch.uint8).pin_memory()
        expected = source.clone()
        allocation = pager.allocate(4 * MiB)
        _quiet(pager)
        torch.cuda._sleep(SLEEP)  # the current stream is busy: the copy is queued, not run
        pager.write(allocation, source)
        source.zero_()  # the caller reuses its buffer once write() has returned
        torch.cuda.synchronize()
        assert torch.equal(pager.read(allocation), expected), "Pager.write stored bytes changed after it returned"


def test_race_wrap_of_pinned_tensor_is_not_a_snapshot():
    """PagedTensor.wrap says ``t`` is copied; from pinned memory the copy is still queued when wrap
    returns (same line as above), so a later in-place change of ``t`` leaks into the PagedTensor."""
    with _pager(8) as pager:
        t = torch.randn(MiB // 4).pin_memory()
        expected = t.clone()
        _quiet(pager)
        torch.cuda._sleep(SLEEP)
        p = PagedTensor.wrap(t, pager)
        t.fill_(0)
        torch.cuda.synchronize()
        assert torch.equal(p.materialize().cpu(), expected), "the PagedTensor changed with the pinned tensor it wrapped"


def test_race_kv_block_table_read_before_pin_under_concurrent_prefetch(monkeypatch):
    """hf/cache.py _single_resident_slab builds the block table from ``page.device_slot`` BEFORE pinning
    the pages. The weight prefetch of enable_paging(page_weights=True) runs on the pager's worker
    thread meanwhile; if it evicts the KV pages in that window (they are unpinned, and often the LRU
    victims), ensure_resident faults them back into other slots and the kernel reads the stale slots
    (another allocation's bytes). The worker is scheduled into that window by running a prefetch from
    the first ensure_resident call that key_pieces makes."""
    pytest.importorskip("transformers")
    from pagedtensor.hf.cache import PagedKVCache

    page = 64 * 1024
    with _pager(8, page=page, host_pages=64) as pager:
        weights = pager.allocate(8 * page)  # stands in for the next layer's weights, on the host
        pager.write(weights, torch.randint(0, 256, (8 * page,), dtype=torch.uint8, device="cuda"))
        pager.evict_all()
        cache = PagedKVCache(pager=pager, num_layers=1, sink_pages=0, hot_fraction=0.0)
        keys = torch.randn(1, 2, 300, 64, dtype=torch.float16, device="cuda")  # 128 tokens a page: 3 pages
        cache.update(keys, keys.clone(), 0)
        _quiet(pager)
        seq = cache.layers[0].seqs[0]
        assert all(cache._page(seq, p).device_slot is not None for p in range(3))

        original = pager.ensure_resident
        fired = []

        def ensure_resident(*args, **kwargs):
            if not fired:
                fired.append(True)
                # The worker thread runs the layer-ahead prefetch now: it takes every unpinned slot...
                pager.prefetch(weights).result()
                # ...and those weights are then read (the LRU keeps them; the last three go first).
                original(weights, 0, 5).release()
            return original(*args, **kwargs)

        monkeypatch.setattr(pager, "ensure_resident", ensure_resident)
        pieces = cache.key_pieces(0)
        try:
            piece = next(pieces)
            actual = [cache.slot_location(cache._page(seq, p).device_slot) for p in range(3)]
            table = [(piece.slab, local) for local in piece.block_table[0][:3]]
            assert table == actual, f"the block table names slots {table} but the pinned pages sit in {actual}"
        finally:
            pieces.close()
            monkeypatch.undo()
            cache.close()


def test_race_close_frees_slabs_under_user_stream_kernels():
    """pager.py close: synchronizes only the H2D/D2H side streams, then drops the device slabs back to the
    caching allocator (on the stream that grew them). A kernel still queued on a user stream that
    reads pages is not waited for: the freed slab is handed out again on the default stream and
    overwritten before that kernel runs."""
    pager = _pager(8)
    allocation, data = _written(pager, 8 * MiB)  # grows the slab on the default stream
    _quiet(pager)
    slab = pager.device_tier.slabs[0]
    slab_ptr, slab_bytes = slab.data_ptr(), slab.numel()
    del slab
    user = torch.cuda.Stream()
    with torch.cuda.stream(user):
        resident = pager.ensure_resident(allocation)
        resident.wait()
        torch.cuda._sleep(SLEEP)
        seen = resident.contiguous().clone()
        resident.release()
    pager.close()
    junk, _ = _zeroed_blocks_until(slab_ptr, slab_bytes)  # kept until the check, as the scribbled memory
    torch.cuda.synchronize()
    assert torch.equal(seen, data), "a user-stream read ran after close() had given its slab back"


def test_race_a_new_slab_on_memory_a_queued_kernel_still_writes():
    """slab_pool.py _grow: a device slab is a ``torch.empty`` on the current stream, and torch's
    caching allocator hands a block freed on a stream straight back to it while kernels queued there
    before still write it. The first fill of a slot of the new slab ran on the H2D stream at once,
    and the queued write landed on top of the page. (Found as a paged generate under GPU contention
    from other processes: ~15% of beam searches, half the runs with every page resident, returned
    other tokens; none with the pager's copies on the compute stream.)"""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # the scratch block below is then the only free one of its size
    slab_bytes = 34 * MiB
    with _pager(68, slab_size=slab_bytes) as pager:  # two slabs of 34 pages
        allocation, data = _written(pager, 4 * MiB)  # grows slab 0
        pager.evict(allocation)
        filler = pager.allocate(slab_bytes)
        held = pager.ensure_resident(filler, discard=range(34))  # slab 0 full and pinned
        _quiet(pager)
        assert all(page.tier == "host" for page in pager.page_table(allocation))
        scratch = torch.empty(slab_bytes, dtype=torch.uint8, device="cuda")
        scratch_ptr = scratch.data_ptr()
        torch.cuda._sleep(SLEEP)
        scratch.fill_(0xAB)  # queued behind the sleep
        del scratch  # its block is free for the current stream at once
        resident = pager.ensure_resident(allocation)  # grows slab 1 and fills it from the host copies
        try:
            assert pager.device_tier.slabs[1].data_ptr() == scratch_ptr, "the allocator gave slab 1 other memory: nothing raced"
            resident.wait()
            got = resident.contiguous().clone()
        finally:
            resident.release()
            held.release()
        torch.cuda.synchronize()
        assert torch.equal(got, data), "a write queued on the current stream before slab 1 was allocated overwrote its first fill"


def test_race_a_pager_collected_unclosed_frees_slabs_under_user_stream_kernels():
    """pager.py: a pager dropped without close() (a model and its pager going out of scope) gave
    its slabs back to the caching allocator while a kernel queued on a user stream still read its
    pages: the memory went to a new tensor on the stream that grew the slabs and was overwritten
    before that kernel ran. (No host slab here: unregistering one at collection synchronizes the
    device, which hides the race for copies from the host tier, but not for a pager that never
    evicted.)"""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    pager = _pager(8)
    allocation, data = _written(pager, 8 * MiB)  # grows the slab on the current stream
    _quiet(pager)
    assert not pager.host_tier.slabs, "a host slab was registered: unregistering it synchronizes the device, nothing races"
    slab_ptr, slab_bytes = pager.device_tier.slabs[0].data_ptr(), pager.device_tier.slabs[0].numel()
    user = torch.cuda.Stream()
    with torch.cuda.stream(user):
        resident = pager.ensure_resident(allocation)
        resident.wait()
        torch.cuda._sleep(SLEEP)
        seen = resident.contiguous().clone()  # queued behind the sleep
        resident.release()
    collected = weakref.ref(pager)
    del pager, allocation, resident
    gc.collect()
    assert collected() is None, "the pager was not collected: nothing raced"
    junk, found = _zeroed_blocks_until(slab_ptr, slab_bytes)
    assert found, f"the allocator never gave the slab's memory again in {len(junk)} blocks: nothing raced"
    torch.cuda.synchronize()
    assert torch.equal(seen, data), "a user-stream read ran after the collected pager's slab was handed out again"


# ============================================================================ probes (expected to pass)


def test_probe_user_stream_op_waits_for_fill_event():
    """An op under torch.cuda.stream(s) on pages whose H2D fill is still queued waits on s."""
    with _pager(8) as pager:
        xd = torch.randn(MiB, device="cuda")  # 4 pages
        x = PagedTensor.wrap(xd, pager)
        pager.evict_all()
        _quiet(pager)
        with torch.cuda.stream(pager.engine.h2d_stream):
            torch.cuda._sleep(SLEEP)
        user = torch.cuda.Stream()
        with torch.cuda.stream(user):
            y = x * 1.0
        user.synchronize()
        assert torch.equal(y, xd)


def test_probe_user_stream_op_then_slot_reuse_from_default_stream():
    """An op on a user stream still queued (behind a sleep on that stream) keeps its slots until it ran,
    even when the slots are reused from the default stream."""
    with _pager(4) as pager:
        xd = torch.randn(MiB, device="cuda")  # 4 pages: every slot
        x = PagedTensor.wrap(xd, pager)
        _quiet(pager)
        user = torch.cuda.Stream()
        with torch.cuda.stream(user):
            torch.cuda._sleep(SLEEP)
            y = x * 1.0
            z = x.sum()
        other = PagedTensor.wrap(torch.zeros(MiB, device="cuda"), pager)  # evicts x, refills its slots
        torch.cuda.synchronize()
        assert torch.equal(y, xd) and torch.equal(z, xd.sum())
        assert torch.equal(x.materialize(), xd) and torch.equal(other.materialize(), torch.zeros_like(xd))


def test_probe_gathered_read_on_user_stream_then_reuse():
    """A window gathered from non-adjacent slots (gather copies on the user stream), then slot reuse
    from the default stream while the op is still queued."""
    with _pager(4) as pager:
        a, _ = _written(pager, MiB)  # slot 0
        b, bd = _written(pager, MiB)  # slot 1
        c, _ = _written(pager, MiB)  # slot 2
        _written(pager, MiB)  # slot 3: no two free slots are adjacent once a and c go
        pager.free(a)
        pager.free(c)
        xd = torch.randn(MiB // 2, device="cuda")
        x = PagedTensor.wrap(xd, pager)  # 2 pages into slots 0 and 2: not adjacent
        slots = [info.device_slot for info in pager.page_table(x.allocation)]
        assert slots[1] != slots[0] + 1, f"the probe needs non-adjacent slots, got {slots}"
        _quiet(pager)
        user = torch.cuda.Stream()
        with torch.cuda.stream(user):
            torch.cuda._sleep(SLEEP)
            y = x + 0.0
        filler = pager.allocate(4 * MiB)
        pager.write(filler, torch.full((4 * MiB,), 3, dtype=torch.uint8, device="cuda"))
        torch.cuda.synchronize()
        assert torch.equal(y, xd)
        assert torch.equal(pager.read(b).cuda(), bd)


def test_probe_prefetch_in_flight_then_free_then_reuse():
    """free() of an allocation whose prefetch copy is still queued: the next fill of the slot waits for it."""
    with _pager(4) as pager:
        a, _ = _written(pager, 4 * MiB)
        pager.evict_all()
        _quiet(pager)
        with torch.cuda.stream(pager.engine.h2d_stream):
            torch.cuda._sleep(SLEEP)
        pager.prefetch(a).result()  # H2D into every slot, queued behind the sleep
        pager.free(a)
        b, bd = _written(pager, 4 * MiB)  # same slots
        torch.cuda.synchronize()
        assert torch.equal(pager.read(b).cuda(), bd)


def test_probe_write_back_in_flight_then_slot_reuse_and_host_read():
    """A D2H write-back still queued (behind a sleep on the D2H stream): the slot's next fill waits for
    it, and reading the evicted bytes back (pager.read, torch.save) waits for it too."""
    with _pager(4) as pager:
        xd = torch.randn(MiB, device="cuda")
        x = PagedTensor.wrap(xd, pager)
        _quiet(pager)
        with torch.cuda.stream(pager.engine.d2h_stream):
            torch.cuda._sleep(SLEEP)
        pager.evict_all()  # D2H behind the sleep
        b, bd = _written(pager, 4 * MiB)  # every slot refilled
        assert torch.equal(pager.read(b).cuda(), bd)
        buffer = io.BytesIO()
        torch.save(x, buffer)  # reads x's pages through the pager: from its host copy
        torch.cuda.synchronize()
        assert torch.equal(x.materialize(), xd)
        buffer.seek(0)
        previous = pagedtensor.set_default_pager(pager)  # the loaded bytes land in this small pager
        try:
            loaded = torch.load(buffer, weights_only=False)
            assert torch.equal(loaded.materialize(), xd)
        finally:
            pagedtensor.set_default_pager(previous)


def test_probe_spill_to_disk_waits_for_write_back(tmp_path):
    """Host pages written back to disk by the CPU are read only after their D2H copies finished."""
    with _pager(4, host_pages=4, nvme_path=str(tmp_path)) as pager:
        a, ad = _written(pager, 4 * MiB)
        _quiet(pager)
        with torch.cuda.stream(pager.engine.d2h_stream):
            torch.cuda._sleep(SLEEP)
        pager.evict_all()  # a: device -> host, behind the sleep
        b, bd = _written(pager, 4 * MiB)
        pager.evict_all()  # b needs the host slots: a spills to disk (the CPU reads a's host slots)
        assert all(info.tier == "disk" for info in pager.page_table(a))
        assert torch.equal(pager.read(a).cuda(), ad)
        assert torch.equal(pager.read(b).cuda(), bd)


def test_probe_free_with_write_back_in_flight_then_host_slot_reuse():
    """free() while its D2H write-back is queued: the host slots' next D2H waits for it."""
    with _pager(4, host_pages=4) as pager:
        a, _ = _written(pager, 4 * MiB)
        _quiet(pager)
        with torch.cuda.stream(pager.engine.d2h_stream):
            torch.cuda._sleep(SLEEP)
        pager.evict_all()
        pager.free(a)
        b, bd = _written(pager, 4 * MiB)
        pager.evict_all()  # into the same host slots
        torch.cuda.synchronize()
        assert torch.equal(pager.read(b).cuda(), bd)


def test_probe_next_layer_prefetch_evicting_the_layer_still_computing():
    """Layer-ahead prefetch (worker thread) evicting weights whose kernels are still queued."""
    with _pager(4) as pager:
        nd = torch.randn(MiB, device="cuda")
        upcoming = PagedTensor.wrap(nd, pager)
        cd = torch.randn(MiB, device="cuda")
        current = PagedTensor.wrap(cd, pager)  # evicts `upcoming` to the host
        _quiet(pager)
        torch.cuda._sleep(SLEEP)
        out = current * 2.0  # queued behind the sleep, pages released
        pager.prefetch(upcoming.allocation).result()  # evicts `current`, fills its slots
        torch.cuda.synchronize()
        assert torch.equal(out, cd * 2.0)
        assert torch.equal(upcoming.materialize(), nd)


def test_probe_two_threads_two_streams_share_one_pager():
    """Two threads, each on its own stream, reading and writing paged tensors of one small pager
    (constant eviction), against dense shadows."""
    with _pager(6) as pager:
        shadows = [torch.randn(MiB // 2, device="cuda") for _ in range(4)]  # 2 pages each
        tensors = [PagedTensor.wrap(s, pager) for s in shadows]
        _quiet(pager)
        results: dict[int, list] = {0: [], 1: []}

        def worker(index: int):
            stream = torch.cuda.Stream()
            mine = tensors[2 * index : 2 * index + 2]
            with torch.cuda.stream(stream):
                for step in range(20):
                    if step % 5 == 0:
                        torch.cuda._sleep(SLEEP // 20)
                    mine[0].mul_(1.0)  # a write: dirty pages that must be written back right
                    results[index].append(mine[1] + 0.0)
            stream.synchronize()

        _run_threads(lambda: worker(0), lambda: worker(1))
        torch.cuda.synchronize()
        for index in (0, 1):
            for got in results[index]:
                assert torch.equal(got, shadows[2 * index + 1])
        for tensor, shadow in zip(tensors, shadows):
            assert torch.equal(tensor.materialize(), shadow)



_FORKED_CHILD_OF_A_CUDA_PAGER = """
import os, sys
import torch
from pagedtensor import MemoryConfig, PagedTensor, Pager

PAGE = 64 * 1024
pager = Pager(MemoryConfig(page_size=PAGE, vram_limit=8 * PAGE, host_memory=64 * PAGE, slab_size=8 * PAGE,
                           prefetch_strategy="none", device="cuda"))
x = torch.randn(16 * PAGE // 4)
t = PagedTensor.wrap(x, pager)  # 16 pages: the host tier holds some, in registered (pinned) slabs
pager.evict_all()
pager.synchronize()
assert pager.stats()["host_slab_bytes"] > 0
for close in (True, False):
    pid = os.fork()
    if pid == 0:  # the child: no CUDA here; a normal exit runs the finalizers
        if close:
            pager.close()
        sys.exit(0)
    _, status = os.waitpid(pid, 0)
    print("child", "closed" if close else "exited", os.waitstatus_to_exitcode(status), flush=True)
assert torch.equal(t.materialize().cpu(), x), "the parent's pages are intact"
pager.close()
print("parent done")
"""


def test_race_a_forked_child_of_a_cuda_pager_closes_and_exits_quietly():
    """A forked child has no CUDA (torch refuses to initialize it again). ``Pager.close()`` there
    and the child's exit (the host tier's finalizer) make no CUDA call: they raised or printed
    "Cannot re-initialize CUDA in forked subprocess". The parent's pages are untouched."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _FORKED_CHILD_OF_A_CUDA_PAGER], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:3] == ["child closed 0", "child exited 0", "parent done"], done.stdout + done.stderr
    assert "CUDA" not in done.stderr and "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr


# Last: a CUDA-graph capture error could disturb the tests after it.
def test_race_cuda_graph_capture_of_a_paged_op_is_refused():
    """A CUDA graph captured over a PagedTensor op would bake in the pages' device slots, which the
    pager reuses as soon as the op releases them: a replay would read other bytes. Capture is refused."""
    with _pager(4) as pager:
        xd = torch.randn(MiB // 2, device="cuda")  # 2 pages
        x = PagedTensor.wrap(xd, pager)
        _quiet(pager)
        _ = x * 2.0
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
            with torch.cuda.graph(graph):
                x * 2.0
        torch.cuda.synchronize()
        assert torch.equal(x * 2.0, xd * 2.0), "the pager works after the refused capture"
        assert all(info.pin_count == 0 for info in pager.page_table(x.allocation))


def test_race_cuda_graph_capture_of_a_kv_cache_update_or_paged_attention_is_refused():
    """``PagedKVCache.update`` and the paged attention call the pager directly, not through an op's
    dispatch: under capture they too raise, before the cache's pages or lengths change, and the cache
    works after the refused capture. So does ``Pager.write``."""
    from pagedtensor.hf.attention import paged_attention
    from pagedtensor.hf.cache import PagedKVCache

    g = torch.Generator().manual_seed(0)
    keys, values = (torch.randn(1, 2, 40, 64, generator=g).to("cuda", torch.float16) for _ in range(2))
    new_keys, new_values = (torch.randn(1, 2, 1, 64, generator=g).to("cuda", torch.float16) for _ in range(2))
    query = torch.randn(1, 4, 1, 64, generator=g).to("cuda", torch.float16)
    with _pager(16, page=64 * 1024) as pager, torch.no_grad():
        cache = PagedKVCache(pager=pager, num_layers=1)
        cache.update(keys, values, 0)
        torch.cuda.synchronize()
        for captured in (lambda: cache.update(new_keys, new_values, 0), lambda: paged_attention(cache, 0, query),
                         lambda: pager.write(cache.layers[0].seqs[0].owners[0], torch.zeros(8, dtype=torch.uint8, device="cuda"))):  # fmt: skip
            graph = torch.cuda.CUDAGraph()
            with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
                with torch.cuda.graph(graph):
                    captured()
            torch.cuda.synchronize()
            assert cache.get_seq_length(0) == 40
            dense_keys, dense_values = cache.dense_kv(0)
            assert torch.equal(dense_keys, keys) and torch.equal(dense_values, values)
        cache.update(new_keys, new_values, 0)
        dense_keys, _ = cache.dense_kv(0)
        assert torch.equal(dense_keys, torch.cat([keys, new_keys], 2))
        cache.close()
