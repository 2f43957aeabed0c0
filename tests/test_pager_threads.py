"""Several threads share one pager: each runs random operations on its own allocations while the
others run theirs, and no byte is lost, no call fails that may not, and nothing deadlocks.

Hypothesis draws the pager (tier sizes, slab size, eviction policy, disk tier or not, zstd
compression or not, prefetch strategy) and, for each of 3-4 threads, a plan of operations on two
allocations only that thread uses: allocate, write at random offsets, read and compare, evict,
prefetch and prefetch_together (waiting on the future), write back, pin and read the pinned views
(and write some pages through them, released dirty), pin a page of each allocation and release both
together, overwrite pinned pages whole (or give up the overwrite), discard, advise, free; and a few
that concern the whole pager: ``evict_all``, ``stats``, ``page_table``. The threads start together
(a barrier) so their operations interleave as much as the interpreter lets them. Afterwards every
allocation reads back its bytes, nothing is pinned, and the bytes each tier holds are the slots
the page tables name.

A second test has one thread close the pager partway through its plan: the others' ops then either
complete as they would have or raise the closed pager's RuntimeError, only once it is closed.

The tiers are sized so that no call may fail (see :func:`pager_shapes`), except on a drawn *tight*
device tier, where an op that pins pages may find the other threads' pins in the way: it waits for
them to go, and raises DeviceTierFullError (the device tier's OutOfPagesError), having changed
nothing, only where the threads holding them wait too (a prefetch does not wait). The errors of full lower tiers are
``test_a_tight_disk_tier_never_loses_bytes``'s and ``test_tiers_that_hold_the_bytes_together_never_fail``'s
(``tests/test_pager.py``).

For hunting races by hand: ``PAGER_THREADS_EXAMPLES`` runs more examples, and
``PAGER_THREADS_SWITCH_INTERVAL`` (seconds, e.g. ``1e-6``) makes the interpreter switch threads far
more often while the threads run, e.g.::

    for s in $(seq 1 20); do PAGER_THREADS_SWITCH_INTERVAL=1e-6 PAGER_THREADS_EXAMPLES=500 \
        python -m pytest -q tests/test_pager_threads.py --hypothesis-seed=$s || break; done
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Iterator, Optional

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

from pagedtensor import DeviceTierFullError, MemoryConfig, Pager
from pagedtensor.pager import Allocation, ResidentPages
from tests.support import CPU_AND_CUDA
from tests.test_pager import random_bytes

PAGE = 4096
MAX_ALLOCATION_PAGES = 3
"""The largest allocation a thread makes; a thread pins at most this many pages at once."""
SLOTS_PER_THREAD = 2
"""Allocations a thread holds at once, at most."""
JOIN_TIMEOUT_S = float(os.environ.get("PAGER_THREADS_JOIN_TIMEOUT", "60"))
"""How long the threads may take, together, before the test calls it a deadlock (``PAGER_THREADS_JOIN_TIMEOUT``)."""
PIN_HOLD_S = 0.002
"""How long a pin op holds its pages (so that other threads' ops meet them pinned)."""
HAS_ZSTD = importlib.util.find_spec("zstandard") is not None
SWITCH_INTERVAL = float(os.environ.get("PAGER_THREADS_SWITCH_INTERVAL", "0"))
EXAMPLES = int(os.environ.get("PAGER_THREADS_EXAMPLES", "100"))

OP_KINDS = ("allocate", "write", "read", "evict", "prefetch", "prefetch_together", "write_back", "pin_read", "pin_write",
            "pin_two", "overwrite", "discard", "advise", "free", "evict_all", "stats", "page_table")  # fmt: skip


@dataclass(frozen=True)
class PagerShape:
    """The configuration of the pager the threads share (sizes in pages)."""

    threads: int
    tight: bool  # fewer device pages than the threads may pin at once (see pager_shapes)
    device_pages: int
    host_pages: int
    disk_pages: Optional[int]  # None: no disk tier
    eviction_policy: str
    compression: Optional[str]
    prefetch_strategy: str
    prefetch_pages: int
    slab_pages: Optional[int]  # pages per slab of the device and host tiers (None: the default, one slab)

    def config(self, nvme: str, device: str) -> MemoryConfig:
        """The MemoryConfig of this shape on ``device``, its disk tier (if any) under ``nvme``."""
        slabs = dict(slab_size=self.slab_pages * PAGE) if self.slab_pages else {}
        disk = dict(nvme_path=nvme, disk_limit=self.disk_pages * PAGE, compression=self.compression) if self.disk_pages else {}
        return MemoryConfig(vram_limit=self.device_pages * PAGE, host_memory=self.host_pages * PAGE, page_size=PAGE, device=device,
                            eviction_policy=self.eviction_policy, prefetch_strategy=self.prefetch_strategy,
                            prefetch_pages=self.prefetch_pages, **disk, **slabs)  # fmt: skip


@dataclass(frozen=True)
class Op:
    """One step of a thread's plan. ``slot`` names one of the thread's allocations; ``a`` and ``b``
    pick sizes, offsets and page ranges inside it (taken modulo what fits); ``seed`` the bytes."""

    kind: str
    slot: int
    a: int
    b: int
    seed: int


@st.composite
def pager_shapes(draw: st.DrawFn) -> PagerShape:
    """A pager where what the threads pin at once always fits, and the lower tiers hold every byte.

    Device: each thread pins at most ``MAX_ALLOCATION_PAGES`` pages at once (a read or write is one
    chunk, since the chunk is half the device tier and that is more than an allocation; a pinned
    range lies inside one allocation), and a prefetch pins at most ``MAX_ALLOCATION_PAGES`` more
    while it runs (the prefetch thread's or a caller's, never two at once: a prefetch holds the
    pager's lock throughout). So ``threads * 3 + 3`` device pages never run out of unpinned ones.
    A ``prefetch_together`` of a thread's two allocations may not fit: it then prefetches each on
    its own, as far as it fits, and never fails. A pin of two pages, one of each allocation
    (``pin_two``), stays within the 3 pages a thread pins.

    A *tight* device tier has fewer pages than that (at least twice an allocation, so that a read or
    a write is still one chunk, all or nothing): a pin, read or write may then find the other
    threads' pins in the way, wait for them, and where those threads wait too raise
    DeviceTierFullError, having changed nothing (as ``test_pinning_more_than_the_device_holds_fails_and_loses_nothing`` says); a
    prefetch's future may carry it. Nothing else may raise it.

    Host and disk: the threads hold at most ``threads * SLOTS_PER_THREAD * 3`` pages of bytes. The
    lower tiers hold all of them plus a copy of every device page (a pinned overwrite keeps the
    zero-filled slot and the old copy; a fault keeps the lower copy of what it brings), so an
    eviction, a write-back or a fault never finds them full. Without a disk tier the host tier holds
    that alone; with one the host tier is small (pages spill to disk and are staged back) and the
    disk holds the rest.
    """
    threads = draw(st.integers(3, 4), label="threads")
    pinned = threads * MAX_ALLOCATION_PAGES + MAX_ALLOCATION_PAGES
    tight = draw(st.booleans(), label="tight device tier")
    least = 2 * MAX_ALLOCATION_PAGES if tight else pinned
    device_pages = draw(st.integers(least, least + (2 if tight else 4)), label="device_pages")
    bytes_pages = threads * SLOTS_PER_THREAD * MAX_ALLOCATION_PAGES
    lower = bytes_pages + device_pages
    if draw(st.booleans(), label="disk tier"):
        host_pages = draw(st.integers(1, 6), label="host_pages")
        disk_pages: Optional[int] = lower - host_pages + draw(st.integers(0, 4), label="spare disk pages")
        compression = draw(st.sampled_from([None, "zstd"] if HAS_ZSTD else [None]), label="compression")
    else:
        host_pages, disk_pages, compression = lower + draw(st.integers(0, 4), label="spare host pages"), None, None
    return PagerShape(
        threads=threads,
        tight=tight,
        device_pages=device_pages,
        host_pages=host_pages,
        disk_pages=disk_pages,
        eviction_policy=draw(st.sampled_from(["lru", "2q"]), label="eviction_policy"),
        compression=compression,
        prefetch_strategy=draw(st.sampled_from(["none", "sequential"]), label="prefetch_strategy"),
        prefetch_pages=draw(st.integers(1, MAX_ALLOCATION_PAGES), label="prefetch_pages"),
        slab_pages=draw(st.sampled_from([None, 1, 2, 3, 5]), label="slab_pages"),
    )


OPS = st.builds(Op, st.sampled_from(OP_KINDS), st.integers(0, SLOTS_PER_THREAD - 1), st.integers(0, 2**16), st.integers(0, 2**16),
                st.integers(0, 2**31 - 1))  # fmt: skip


@st.composite
def thread_plans(draw: st.DrawFn) -> list[Op]:
    """A thread's plan: allocate each of its slots (of drawn sizes), then random ops."""
    size = st.tuples(st.integers(0, MAX_ALLOCATION_PAGES - 1), st.integers(0, PAGE - 1))  # (pages - 1, bytes short): allocation_size
    sizes = draw(st.lists(size, min_size=SLOTS_PER_THREAD, max_size=SLOTS_PER_THREAD), label="sizes")
    first = [Op("allocate", slot, pages, short, 0) for slot, (pages, short) in enumerate(sizes)]
    return first + draw(st.lists(OPS, min_size=10, max_size=40), label="ops")


@dataclass
class ThreadState:
    """What one thread owns: its allocations (by slot) and the bytes each must hold."""

    name: str
    allocations: dict[int, Allocation] = field(default_factory=dict)
    expected: dict[int, torch.Tensor] = field(default_factory=dict)
    step: int = -1  # the index of the op running now (reported on a deadlock or a failure)
    device_full: int = 0  # ops that found too few unpinned device pages (a tight device tier only)
    found_closed: bool = False  # an op found the pager closed by another thread (and the thread stopped)
    op: Optional[Op] = None


def allocation_size(op: Op) -> int:
    """The bytes of the allocation an ``allocate`` op makes: ``1 + op.a % 3`` pages, the last one
    ``op.b % PAGE`` bytes short."""
    return (1 + op.a % MAX_ALLOCATION_PAGES) * PAGE - op.b % PAGE


def page_range(allocation: Allocation, op: Op) -> tuple[int, int]:
    """A non-empty page range ``[start, stop)`` of ``allocation`` chosen by ``op`` (``a`` pages in
    from the start, ``b`` pages short of the end: small values, which hypothesis favours, give
    the whole allocation, the most pages pinned at once)."""
    start = op.a % allocation.num_pages
    return start, allocation.num_pages - op.b % (allocation.num_pages - start)


def byte_range(allocation: Allocation, op: Op) -> tuple[int, int]:
    """A non-empty byte range ``(offset, length)`` of ``allocation`` chosen by ``op``, as
    :func:`page_range` chooses pages."""
    offset = op.a % allocation.nbytes
    return offset, allocation.nbytes - offset - op.b % (allocation.nbytes - offset)


def pinned_bytes(views: list[torch.Tensor]) -> torch.Tensor:
    """The bytes of a pinned range, its pages' views joined, on the CPU."""
    return torch.cat([view.cpu() for view in views])


def page_bytes(allocation: Allocation, index: int) -> slice:
    """The bytes of page ``index`` of ``allocation``."""
    return slice(index * PAGE, min((index + 1) * PAGE, allocation.nbytes))


MAY_FIND_THE_DEVICE_PINNED = frozenset({"write", "read", "prefetch", "pin_read", "pin_write", "pin_two", "overwrite"})
"""The ops that pin pages (or prefetch them), which on a tight device tier may find too few unpinned."""


def run_op_allowing_a_full_device(pager: Pager, state: ThreadState, op: Op, shape: PagerShape) -> None:
    """:func:`run_op`, where on a tight device tier an op that pins pages may raise DeviceTierFullError
    for the device tier: it then changed nothing (``state.expected`` is left as it was)."""
    try:
        run_op(pager, state, op, shape)
    except DeviceTierFullError:
        if not (shape.tight and op.kind in MAY_FIND_THE_DEVICE_PINNED):
            raise
        state.device_full += 1


def run_op(pager: Pager, state: ThreadState, op: Op, shape: PagerShape) -> None:
    """Run one op of a thread's plan, checking what it reads against ``state.expected``."""
    if op.kind in ("evict_all", "stats"):
        run_pager_wide_op(pager, op, shape)
    elif op.kind == "allocate":
        if op.slot in state.allocations:
            pager.free(state.allocations.pop(op.slot))
        allocation = pager.allocate(allocation_size(op), name=f"{state.name}/{op.slot}")
        state.allocations[op.slot] = allocation
        state.expected[op.slot] = torch.zeros(allocation.nbytes, dtype=torch.uint8)
    elif op.kind == "prefetch_together":
        error = pager.prefetch_together(list(state.allocations.values())).exception(timeout=JOIN_TIMEOUT_S)
        assert error is None, f"prefetch_together failed: {error!r}"
    elif op.kind == "pin_two":
        if len(state.allocations) == SLOTS_PER_THREAD:
            pin_two_and_release_together(pager, state, op)
    elif op.slot in state.allocations:
        run_allocation_op(pager, state, op, shape)


def run_allocation_op(pager: Pager, state: ThreadState, op: Op, shape: PagerShape) -> None:
    """Run an op on the thread's allocation ``op.slot``."""
    allocation, expected = state.allocations[op.slot], state.expected[op.slot]
    start, stop = page_range(allocation, op)
    if op.kind == "write":
        offset, length = byte_range(allocation, op)
        payload = random_bytes(length, op.seed)
        pager.write(allocation, payload, offset)
        expected[offset : offset + length] = payload
    elif op.kind == "read":
        offset, length = byte_range(allocation, op)
        assert torch.equal(pager.read(allocation, offset, length), expected[offset : offset + length]), f"read [{offset}, +{length})"
    elif op.kind == "evict":
        pager.evict(allocation, start, stop)
    elif op.kind == "prefetch":
        error = pager.prefetch(allocation, start, stop).exception(timeout=JOIN_TIMEOUT_S)
        if error is not None:
            raise error
    elif op.kind == "write_back":
        pager.write_back(allocation, start, stop)
    elif op.kind in ("pin_read", "pin_write"):
        pin_and_check(pager, allocation, expected, start, stop, write_seed=op.seed if op.kind == "pin_write" else None)
    elif op.kind == "overwrite":
        overwrite_pinned(pager, allocation, expected, start, stop, op.seed)
    elif op.kind == "discard":
        pager.discard(allocation, start, stop)
        expected[start * PAGE : stop * PAGE] = 0
    elif op.kind == "advise":
        pager.advise(allocation, "loop" if op.seed % 2 else "normal")
    elif op.kind == "page_table":
        check_page_table(pager, allocation, shape)
    elif op.kind == "free":
        pager.free(state.allocations.pop(op.slot))
        del state.expected[op.slot]


def run_pager_wide_op(pager: Pager, op: Op, shape: PagerShape) -> None:
    """``evict_all`` or ``stats`` (whose budgets hold whatever the other threads are doing)."""
    if op.kind == "evict_all":
        pager.evict_all()
        return
    assert_within_budgets(pager.stats()["resident_bytes"], shape)


def assert_within_budgets(resident: dict[str, int], shape: PagerShape) -> None:
    """The bytes each tier holds (``stats()["resident_bytes"]``) are within its budget."""
    assert resident["device"] <= shape.device_pages * PAGE, resident
    assert resident["host"] <= shape.host_pages * PAGE, resident
    assert resident["disk"] <= (shape.disk_pages or 0) * PAGE, resident


def write_pages(resident: ResidentPages, expected: torch.Tensor, indices: set[int], seed: int) -> None:
    """Write random bytes through the pinned views into pages ``indices`` (allocation page numbers),
    and into ``expected``."""
    for page, view in zip(resident.pages, resident.views()):
        if page.index in indices:
            payload = random_bytes(view.numel(), seed + page.index)
            view.copy_(payload)
            expected[page_bytes(resident.allocation, page.index)] = payload


def pin_and_check(pager: Pager, allocation: Allocation, expected: torch.Tensor, start: int, stop: int, write_seed: Optional[int]) -> None:
    """Pin pages ``[start, stop)``, check their bytes through the pinned views and, with
    ``write_seed``, write new bytes into some of them (its bits choose which) and release those dirty."""
    with pager.ensure_resident(allocation, start, stop) as resident:
        resident.wait()
        assert torch.equal(pinned_bytes(resident.views()), expected[start * PAGE : stop * PAGE]), f"pinned pages [{start}, {stop})"
        time.sleep(PIN_HOLD_S)  # the other threads run while these pages are pinned
        if write_seed is None:
            return
        written = {index for index in range(start, stop) if write_seed >> (index - start) & 1}
        write_pages(resident, expected, written, write_seed)
        resident.release(dirty=written)


def overwrite_pinned(pager: Pager, allocation: Allocation, expected: torch.Tensor, start: int, stop: int, seed: int) -> None:
    """Pin pages ``[start, stop)`` to be overwritten whole (``discard``); on an even seed write them
    and release them dirty, on an odd one give up (release clean: they keep their old bytes)."""
    resident = pager.ensure_resident(allocation, start, stop, discard=range(start, stop))
    try:
        resident.wait()
        if seed % 2 == 0:
            write_pages(resident, expected, set(range(start, stop)), seed)
            resident.release(dirty=True)
    finally:
        if not resident.released:
            resident.release()


def pin_two_and_release_together(pager: Pager, state: ThreadState, op: Op) -> None:
    """Pin one page of each of the thread's two allocations, check both, write the first on an
    even seed, and release both at once (:meth:`Pager.release_together`)."""
    pins: list[tuple[ResidentPages, torch.Tensor]] = []
    try:
        for slot, choice in zip(sorted(state.allocations), (op.a, op.b)):
            allocation = state.allocations[slot]
            index = choice % allocation.num_pages
            pins.append((pager.ensure_resident(allocation, index, index + 1), state.expected[slot]))
        for resident, expected in pins:
            resident.wait()
            assert torch.equal(pinned_bytes(resident.views()), expected[page_bytes(resident.allocation, resident.start)]), "pinned page"
        written = {pins[0][0].start} if op.seed % 2 == 0 else set()
        write_pages(pins[0][0], pins[0][1], written, op.seed)
        pager.release_together([(pins[0][0], written), (pins[1][0], ())])
    finally:
        for resident, _ in pins:
            if not resident.released:
                resident.release()


def check_page_table(pager: Pager, allocation: Allocation, shape: PagerShape) -> None:
    """The allocation's page table is coherent: no page of this thread is pinned (it pins nothing
    now), a page is dirty exactly when its one copy is above the disk, and its slots are in range."""
    for info in pager.page_table(allocation):
        copies = [slot for slot in (info.device_slot, info.host_slot, info.disk_slot) if slot is not None]
        assert info.pin_count == 0, info
        assert info.dirty == (len(copies) == 1 and info.disk_slot is None), info
        assert info.device_slot is None or 0 <= info.device_slot < shape.device_pages, info
        assert info.host_slot is None or 0 <= info.host_slot < shape.host_pages, info


def run_plan(pager: Pager, state: ThreadState, plan: list[Op], shape: PagerShape) -> None:
    """Every op of ``plan`` in order, recording which one runs (for the failure message)."""
    for state.step, state.op in enumerate(plan):
        run_op_allowing_a_full_device(pager, state, state.op, shape)
    state.op = None


def run_plan_until_closed(pager: Pager, state: ThreadState, plan: list[Op], shape: PagerShape, close_at: Optional[int]) -> None:
    """:func:`run_plan`, but the thread closes the pager in place of op ``close_at`` (None: never;
    ``len(plan)``: after its last op), and stops at the first op that raises the closed pager's RuntimeError ("closed"), which no op
    may raise before the pager is closed."""
    for state.step, state.op in enumerate(plan):
        if state.step == close_at:
            break
        try:
            run_op_allowing_a_full_device(pager, state, state.op, shape)
        except RuntimeError as error:
            if isinstance(error, DeviceTierFullError) or not (pager.closed and "closed" in str(error)):
                raise
            state.found_closed = True
            break
    state.op = None
    if close_at is not None:
        pager.close()


class ThreadsStuck(AssertionError):
    """Threads of the test did not finish in ``JOIN_TIMEOUT_S``: a deadlock (or a livelock)."""


def thread_stacks(threads: list[threading.Thread]) -> str:
    """The current stack of each of ``threads`` still alive (and the prefetch thread's)."""
    frames = sys._current_frames()
    wanted = {thread.ident: thread.name for thread in threads if thread.is_alive()}
    wanted.update({thread.ident: thread.name for thread in threading.enumerate() if thread.name.startswith("pagedllm-prefetch")})
    return "\n".join(f"--- {name}\n{''.join(traceback.format_stack(frames[ident]))}" for ident, name in wanted.items() if ident in frames)


def run_threads_together(pager: Pager, plans: list[list[Op]], shape: PagerShape, closer: Optional[tuple[int, int]] = None) -> list[ThreadState]:
    """Run each plan on its own thread, all released at once by a barrier; raise on the first
    thread's error (naming its op) or on a deadlock (naming the threads still running, with stacks).
    ``closer``: ``(thread, step)``: that thread closes the pager in place of that step of its plan,
    and every thread stops at the first op that finds the pager closed (:func:`run_plan_until_closed`)."""
    states = [ThreadState(f"thread-{index}") for index in range(len(plans))]
    barrier = threading.Barrier(len(plans))
    errors: list[tuple[ThreadState, BaseException]] = []

    def worker(index: int, state: ThreadState, plan: list[Op]) -> None:
        try:
            barrier.wait(timeout=JOIN_TIMEOUT_S)
            if closer is None:
                run_plan(pager, state, plan, shape)
            else:
                run_plan_until_closed(pager, state, plan, shape, closer[1] if index == closer[0] else None)
        except BaseException as error:  # noqa: BLE001 - reported by the test
            errors.append((state, error))

    threads = [
        threading.Thread(target=worker, args=(index, state, plan), name=state.name, daemon=True)
        for index, (state, plan) in enumerate(zip(states, plans))
    ]  # fmt: skip
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    stuck = [f"{state.name} at op {state.step} {state.op}" for state, thread in zip(states, threads) if thread.is_alive()]
    if stuck:
        report = f"deadlock: threads still running after {JOIN_TIMEOUT_S} s: {stuck}\n{thread_stacks(threads)}"
        # Written now: a prefetch thread stuck on the pager's lock keeps the interpreter from exiting
        # (concurrent.futures joins its workers at exit), so the test's report may never be printed.
        print(report, file=sys.__stderr__, flush=True)
        raise ThreadsStuck(report)
    if errors:
        state, error = errors[0]
        raise AssertionError(f"{state.name} failed at op {state.step} {state.op}: {error!r}") from error
    return states


def check_final_state(pager: Pager, states: list[ThreadState], shape: PagerShape) -> None:
    """After the threads: every allocation reads back its bytes, nothing is pinned, every tier is
    within its budget, and the bytes each tier holds are the slots the page tables name."""
    pager.synchronize()  # queued prefetches land first: their slots are then in the page tables
    tables = [pager.page_table(allocation) for state in states for allocation in state.allocations.values()]
    resident = pager.stats()["resident_bytes"]
    counted = {
        "device": sum(info.device_slot is not None for table in tables for info in table) * PAGE,
        "host": sum(info.host_slot is not None for table in tables for info in table) * PAGE,
        "disk": sum(info.disk_slot is not None for table in tables for info in table) * PAGE,
    }
    assert resident == counted, f"resident bytes by tier {resident} differ from the page tables' slots {counted}"
    assert_within_budgets(resident, shape)
    assert pager.stats()["allocations"] == sum(len(state.allocations) for state in states)
    for state in states:
        for slot, allocation in state.allocations.items():
            check_page_table(pager, allocation, shape)
            assert torch.equal(pager.read(allocation), state.expected[slot]), f"{state.name}'s allocation {slot} lost bytes"


@contextlib.contextmanager
def switch_interval(seconds: float) -> Iterator[None]:
    """Make the interpreter switch threads every ``seconds`` (0: leave it as it is) while inside."""
    if not seconds:
        yield
        return
    previous = sys.getswitchinterval()
    sys.setswitchinterval(seconds)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@settings(max_examples=EXAMPLES, deadline=None)
@given(data=st.data())
def test_threads_on_their_own_allocations_lose_nothing(device: str, data: st.DataObject) -> None:
    """3-4 threads run random plans on their own allocations of one pager, all at once: no call
    fails, no read returns a wrong byte, nothing deadlocks, and afterwards every allocation reads
    back whole and the pager's accounting matches its page tables."""
    shape = data.draw(pager_shapes(), label="shape")
    plans = data.draw(st.lists(thread_plans(), min_size=shape.threads, max_size=shape.threads), label="plans")
    nvme = tempfile.mkdtemp(prefix="pager-threads-")
    pager = Pager(shape.config(nvme, device))
    try:
        with switch_interval(SWITCH_INTERVAL):
            states = run_threads_together(pager, plans, shape)
        event(f"tight device tier: {shape.tight}; ops that found it full: {'some' if any(state.device_full for state in states) else 'none'}")
        check_final_state(pager, states, shape)
    except ThreadsStuck:
        raise  # a stuck thread may hold the pager's lock: closing it would hang the test too
    except BaseException:
        pager.close()
        raise
    else:
        pager.close()
    finally:
        shutil.rmtree(nvme, ignore_errors=True)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@settings(max_examples=max(1, EXAMPLES // 2), deadline=None)
@given(data=st.data())
def test_a_close_amid_the_threads_ops_stops_them_cleanly(device: str, data: st.DataObject) -> None:
    """One of 3-4 threads closes the pager partway through its plan while the others run theirs:
    every op either completes as it would have (its reads right) or raises the closed pager's
    RuntimeError, and only once the pager is closed; nothing else fails, nothing deadlocks, and
    afterwards the closed pager holds no bytes on any tier."""
    shape = data.draw(pager_shapes(), label="shape")
    plans = data.draw(st.lists(thread_plans(), min_size=shape.threads, max_size=shape.threads), label="plans")
    closer = data.draw(st.integers(0, shape.threads - 1), label="closing thread")
    close_at = data.draw(st.integers(SLOTS_PER_THREAD, len(plans[closer])), label="closing step")  # after its allocations
    nvme = tempfile.mkdtemp(prefix="pager-threads-")
    pager = Pager(shape.config(nvme, device))
    try:
        with switch_interval(SWITCH_INTERVAL):
            states = run_threads_together(pager, plans, shape, closer=(closer, close_at))
        event(f"threads that found the pager closed: {sum(state.found_closed for state in states)}")
        assert pager.closed
        assert pager.stats()["resident_bytes"] == {"device": 0, "host": 0, "disk": 0}
    except ThreadsStuck:
        raise  # a stuck thread may hold the pager's lock: closing it would hang the test too
    finally:
        pager.close()
        shutil.rmtree(nvme, ignore_errors=True)


def _overwriting_pager(device: str) -> tuple[Pager, Allocation, torch.Tensor]:
    """A pager whose allocation of 4 pages holds ``old`` on the host tier only (evicted)."""
    pager = Pager(MemoryConfig(page_size=PAGE, vram_limit=8 * PAGE, host_memory=16 * PAGE, slab_size=16 * PAGE,
                               prefetch_strategy="none", device=device))  # fmt: skip
    allocation = pager.allocate(4 * PAGE)
    old = torch.full((4 * PAGE,), 7, dtype=torch.uint8)
    pager.write(allocation, old)
    pager.evict(allocation)
    return pager, allocation, old


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("written", [True, False])
def test_a_reader_waits_for_another_threads_overwrite(device: str, written: bool) -> None:
    """A thread pins pages off the device to overwrite them whole (``discard``): they get zero-filled
    device slots, the host copy staying their bytes until the release. Another thread reading them
    meanwhile took the resident slots as hits and read zeros, bytes the pages never held (a reader
    of a tensor another thread ``copy_``-ed into saw 0.0). It now waits for the overwrite's release
    and reads the new bytes, or the old ones where the overwrite was given up (released clean)."""
    pager, allocation, old = _overwriting_pager(device)
    new = torch.full((4 * PAGE,), 9, dtype=torch.uint8)
    with pager:
        resident = pager.ensure_resident(allocation, 0, 4, discard=range(4))
        got: list[torch.Tensor] = []
        reader = threading.Thread(target=lambda: got.append(pager.read(allocation)), daemon=True)
        reader.start()
        reader.join(0.3)
        assert reader.is_alive(), "the reader did not wait for the overwrite"
        if written:
            for _, view in resident.runs():
                view.copy_(new[: view.numel()].to(view.device))
        resident.release(dirty=written)
        reader.join(30)
        assert not reader.is_alive()
        assert torch.equal(got[0], new if written else old)


def test_a_reader_held_back_for_woken_threads_waits_for_an_overwrite_begun_meanwhile(monkeypatch) -> None:
    """A request held back while threads a release woke go first (the wait lets go of the pager's
    lock) finds, once it goes on, another thread's whole-page overwrite of its pages begun
    meanwhile: it waits for that overwrite and reads the new bytes. It checked for overwrites only
    before that wait, and read the overwrite's zero-filled slots (0 where the pages held 7 or 9)."""
    pager, allocation, old = _overwriting_pager("cpu")
    new = torch.full((4 * PAGE,), 9, dtype=torch.uint8)
    begun, overwrites = threading.Event(), []
    real = pager._let_woken_waiters_go_first

    def overwriter() -> None:
        resident = pager.ensure_resident(allocation, 0, 4, discard=range(4))
        begun.set()
        time.sleep(0.3)
        for _, view in resident.runs():
            view.copy_(new[: view.numel()])
        resident.release(dirty=True)

    def held_back() -> None:  # another thread takes the lock while this one is held back, and begins an overwrite
        pager._woken.clear()
        thread = threading.Thread(target=overwriter, daemon=True)
        overwrites.append(thread)
        thread.start()
        while not begun.is_set():
            pager._unpinned.wait(0.01)  # lets go of the lock as the real wait does
        real()

    with pager:
        monkeypatch.setattr(pager, "_let_woken_waiters_go_first", held_back)
        pager._woken.add(-1)  # a woken thread (none real) that has not tried again yet
        got = pager.read(allocation)
        overwrites[0].join(JOIN_TIMEOUT_S)
        assert torch.equal(got, new), got.unique()
        assert not pager._pinned_ranges


def test_a_thread_reading_pages_it_overwrites_itself_does_not_wait() -> None:
    """The overwriting thread's own pin of those pages (a nested request, as an op reading what it
    writes) does not wait for itself (a wait would last ``pin_wait_s``, 60 s, then raise)."""
    pager, allocation, _ = _overwriting_pager("cpu")
    with pager:
        resident = pager.ensure_resident(allocation, 0, 4, discard=range(4))
        started = time.monotonic()
        with pager.ensure_resident(allocation, 1, 3):
            pass
        assert time.monotonic() - started < 5
        resident.release(dirty=False)


def test_requests_waiting_for_room_do_not_keep_each_other_from_it(nvme_dir) -> None:
    """Three threads each ask for the 4 pages of their own allocation on a 5-page device tier whose
    other pages the main thread pins; each has a page resident. A waiting request kept its resident
    page pinned while it waited, so once the main thread let go the waiters still kept each other
    from room, and one raised DeviceTierFullError. A waiting request now lets go of its pin while it
    waits: each runs in turn."""
    config = MemoryConfig(page_size=PAGE, vram_limit=5 * PAGE, host_memory=32 * PAGE, slab_size=32 * PAGE, prefetch_strategy="none",
                          device="cpu", nvme_path=nvme_dir, pin_wait_s=20)  # fmt: skip
    with Pager(config) as pager:
        allocations = [pager.allocate(4 * PAGE) for _ in range(3)]
        for number, allocation in enumerate(allocations):
            pager.write(allocation, torch.full((4 * PAGE,), number, dtype=torch.uint8))
        held_range = pager.allocate(2 * PAGE)
        pager.evict_all()
        for allocation in allocations:
            pager.ensure_resident(allocation, 0, 1).release()
        held = pager.ensure_resident(held_range)  # the tier: a0 b0 c0 and the two pages held
        errors: list[str] = []

        def worker(number: int) -> None:
            try:
                with pager.ensure_resident(allocations[number]) as resident:
                    assert all(bool((view == number).all()) for view in resident.views())
                    time.sleep(0.05)
            except Exception as error:  # noqa: BLE001 - reported below
                errors.append(f"{type(error).__name__}: {error}")

        threads = [threading.Thread(target=worker, args=(number,)) for number in range(3)]
        for thread in threads:
            thread.start()
            time.sleep(0.2)  # each waits for room before the next starts
        held.release()
        for thread in threads:
            thread.join(JOIN_TIMEOUT_S)
        assert not any(thread.is_alive() for thread in threads), "deadlock"
        assert not errors, errors
        assert not any(allocation.pins for allocation in allocations)


def test_a_request_waiting_for_room_gets_it_from_a_thread_that_takes_its_pins_back_at_once() -> None:
    """A thread pins 3 pages of a 4-page device tier, works briefly and lets them go, over and over;
    another thread's request for 3 other pages waits for room. Woken by each release, the waiting
    thread ran only after the first had pinned its pages again (the interpreter switches threads
    every few milliseconds), and raised DeviceTierFullError after pin_wait_s although the pages were
    let go thousands of times. Requests now let the threads a release woke try first."""
    config = MemoryConfig(page_size=PAGE, vram_limit=4 * PAGE, host_memory=32 * PAGE, slab_size=32 * PAGE, prefetch_strategy="none",
                          device="cpu", pin_wait_s=5)  # fmt: skip
    with Pager(config) as pager:
        busy, waiting = pager.allocate(3 * PAGE), pager.allocate(3 * PAGE)
        pager.write(waiting, torch.full((3 * PAGE,), 5, dtype=torch.uint8))
        done = threading.Event()
        errors: list[str] = []

        def holder() -> None:
            while not done.is_set():
                with pager.ensure_resident(busy):
                    time.sleep(0.0005)  # work on the pages (a kernel, I/O): the interpreter lock is free

        def requester() -> None:
            try:
                time.sleep(0.05)
                started = time.monotonic()
                with pager.ensure_resident(waiting) as resident:
                    assert all(bool((view == 5).all()) for view in resident.views())
                assert time.monotonic() - started < 2.5, "waited for most of pin_wait_s"
            except Exception as error:  # noqa: BLE001 - reported below
                errors.append(f"{type(error).__name__}: {error}")
            finally:
                done.set()

        threads = [threading.Thread(target=holder), threading.Thread(target=requester)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(JOIN_TIMEOUT_S)
        assert not any(thread.is_alive() for thread in threads), "deadlock"
        assert not errors, errors


def test_an_allocation_a_request_waits_for_is_not_freed_meanwhile() -> None:
    """A request waiting for room lets go of its pin meanwhile; ``free`` of its allocation from
    another thread then succeeded, and the request faulted the freed allocation's pages in: device
    slots held by no live allocation, for good. ``free`` raises as for pinned pages."""
    config = MemoryConfig(page_size=PAGE, vram_limit=4 * PAGE, host_memory=8 * PAGE, slab_size=8 * PAGE, prefetch_strategy="none",
                          device="cpu", pin_wait_s=10)  # fmt: skip
    with Pager(config) as pager:
        waited_for, holding = pager.allocate(3 * PAGE), pager.allocate(3 * PAGE)
        held, done = threading.Event(), threading.Event()
        errors: list[str] = []

        def holder() -> None:
            with pager.ensure_resident(holding):
                held.set()
                done.wait(JOIN_TIMEOUT_S)

        def requester() -> None:
            try:
                with pager.ensure_resident(waited_for):
                    pass
            except Exception as error:  # noqa: BLE001 - reported below
                errors.append(f"{type(error).__name__}: {error}")

        threads = [threading.Thread(target=holder), threading.Thread(target=requester)]
        threads[0].start()
        held.wait()
        threads[1].start()
        deadline = time.monotonic() + 10
        while not pager._waiting_requests and time.monotonic() < deadline:
            time.sleep(0.01)
        try:
            with pytest.raises(RuntimeError, match=f"free: allocation {waited_for.id} has pages a request of another thread waits to pin"):
                pager.free(waited_for)
        finally:
            done.set()
            for thread in threads:
                thread.join(JOIN_TIMEOUT_S)
        assert not errors, errors
        pager.free(waited_for)
        pager.free(holding)
        assert pager.device_tier.used_pages == 0


@pytest.mark.parametrize("resident_before", [True, False])
def test_a_request_that_waited_for_room_waits_for_another_threads_overwrite_of_its_pages(resident_before: bool) -> None:
    """While a request waits for room (its pin let go), another thread starts a whole-page overwrite
    (``discard=``) of one of its pages, whose slot holds zeros until that holder's release. Woken,
    the request took the zero-filled slot for the page (neither its old bytes nor the new ones). It
    now waits for that overwrite, as a request does before its pin."""
    config = MemoryConfig(page_size=PAGE, vram_limit=4 * PAGE, host_memory=64 * PAGE, slab_size=4 * PAGE, prefetch_strategy="none",
                          device="cpu", pin_wait_s=10)  # fmt: skip
    with Pager(config) as pager:
        wanted, other = pager.allocate(2 * PAGE), pager.allocate(3 * PAGE)
        pager.write(wanted, torch.full((2 * PAGE,), 0xAA, dtype=torch.uint8))
        pager.write(other, torch.full((3 * PAGE,), 0x11, dtype=torch.uint8))
        pager.evict(wanted)
        if resident_before:
            pager.read(wanted, 0, PAGE)  # page 0 resident: the request pins it, then lets it go to wait
        holding = pager.ensure_resident(other)  # 3 of the 4 slots
        seen: list[int] = []

        def requester() -> None:
            with pager.ensure_resident(wanted) as resident:
                resident.wait()
                seen.extend(int(view[0]) for view in resident.views())

        thread = threading.Thread(target=requester)
        thread.start()
        deadline = time.monotonic() + 10
        while not pager._pin_waiters and time.monotonic() < deadline:
            time.sleep(0.001)
        page = 0 if resident_before else 1
        pager.evict(wanted, page, page + 1)
        overwrite = pager.ensure_resident(wanted, page, page + 1, discard=[page])
        holding.release()  # room: the request goes on while the overwrite is open
        time.sleep(0.2)
        overwrite.views()[0].fill_(0xBB)
        overwrite.release(dirty=True)
        thread.join(JOIN_TIMEOUT_S)
        assert seen and all(value in (0xAA, 0xBB) for value in seen), seen
        assert seen[page] == 0xBB


def test_a_collected_caches_pins_let_go_inside_a_call_reach_a_thread_waiting_for_room() -> None:
    """A cache collected inside one of its thread's pager calls defers the release of its pins to the
    pager's next call; a thread already waiting for the room they hold was not woken, and where the
    first thread made no further call, it waited out ``pin_wait_s`` and raised. The deferral wakes
    it, and it lets the pins go as it wakes."""
    config = MemoryConfig(page_size=PAGE, vram_limit=4 * PAGE, host_memory=64 * PAGE, slab_size=4 * PAGE, prefetch_strategy="none",
                          device="cpu", pin_wait_s=20)  # fmt: skip
    with Pager(config) as pager:
        cache_pages, wanted = pager.allocate(3 * PAGE), pager.allocate(2 * PAGE)
        pager.write(wanted, torch.full((2 * PAGE,), 4, dtype=torch.uint8))
        pager.evict_all()
        hot = pager.ensure_resident(cache_pages)  # a cache's pins: 3 of the 4 slots
        outcome: list[str] = []

        def requester() -> None:
            try:
                with pager.ensure_resident(wanted) as resident:
                    outcome.append("ok" if all(bool((view == 4).all()) for view in resident.views()) else "wrong bytes")
            except Exception as error:  # noqa: BLE001 - reported below
                outcome.append(f"{type(error).__name__}: {error}")

        thread = threading.Thread(target=requester)
        thread.start()
        deadline = time.monotonic() + 10
        while not pager._pin_waiters and time.monotonic() < deadline:
            time.sleep(0.001)
        started = time.monotonic()
        with pager._lock:  # inside a pager call of this thread, as a collection there finds it
            pager.release_and_free_when_unlocked([hot], [cache_pages])
        thread.join(JOIN_TIMEOUT_S)
        assert outcome == ["ok"] and time.monotonic() - started < 10
        assert cache_pages.freed and not pager._deferred_frees


def test_an_ops_remembered_answer_cleared_by_another_thread_is_worked_out_again(monkeypatch) -> None:
    """The dispatcher remembers, per op and argument layouts, whether an op returns one of its
    PagedTensors (shared by every thread, cleared when full). It read an answer after checking it
    was there, two lookups each hashing the key in Python: another thread's op could clear the
    memory between them (a serving loop meeting 4,096 layouts), and the first op raised KeyError
    (found by a helper's probe, a thread held inside the hash). Here every membership test is
    followed by another thread's clear."""
    import pagedtensor.dispatch as dispatch
    from pagedtensor import PagedTensor

    class ClearedByAnotherThread(dict):
        def __contains__(self, key: object) -> bool:
            found = super().__contains__(key)
            self.clear()
            return found

    pager = Pager(MemoryConfig(page_size=4096, vram_limit=16 * 4096, host_memory=64 * 4096, slab_size=16 * 4096,
                               prefetch_strategy="none", device="cpu"))  # fmt: skip
    dense = torch.randn(4, 4)
    paged = PagedTensor.wrap(dense.clone(), pager)
    with torch.inference_mode():
        assert torch.equal(paged @ paged, dense @ dense)
        monkeypatch.setattr(dispatch, "_RETURNS_AN_INPUT", ClearedByAnotherThread(dispatch._RETURNS_AN_INPUT))
        for _ in range(2):
            assert torch.equal(paged @ paged, dense @ dense)
    pager.close()


def test_threads_waiting_on_each_others_pins_across_two_pagers_do_not_wait_for_nothing() -> None:
    """Thread 1 adds tensors of pager B into one of pager A, thread 2 of A into one of B, op after
    op: each op pins its first operand, a whole device tier, and needs the other's, which the other
    thread may pin. Each pager counted only its own waiters, so it took the other thread, waiting on
    the other pager, for a holder that may let go: both waited the whole pin_wait_s (found by a
    helper's probe). As on one pager, the last to come is refused at once and the other goes on (the
    refused op lets go of its first window, waits for a release and tries again); every op that went
    through added its operand (one that raised partway, its first pieces)."""
    from pagedtensor import PagedTensor

    wait_s, run_s = 6.0, 2.0

    def tight_pager() -> Pager:
        return Pager(MemoryConfig(page_size=4096, vram_limit=4 * 4096, host_memory=64 * 4096, slab_size=64 * 4096,
                                  prefetch_strategy="none", device="cpu", pin_wait_s=wait_s))  # fmt: skip

    a_pager, b_pager = tight_pager(), tight_pager()
    a1, a2 = (PagedTensor.wrap(torch.full((4096,), value), a_pager) for value in (0.0, 1.0))  # 4 pages each: a whole tier
    b1, b2 = (PagedTensor.wrap(torch.full((4096,), value), b_pager) for value in (1.0, 0.0))
    barrier = threading.Barrier(2)
    worst, done, tried = [0.0, 0.0], [0, 0], [0, 0]

    def work(index: int) -> None:
        target, source = (a1, b1) if index == 0 else (b2, a2)
        barrier.wait()
        started = time.monotonic()
        while time.monotonic() - started < run_s:
            began = time.monotonic()
            tried[index] += 1
            try:
                target.add_(source)
                done[index] += 1
            except DeviceTierFullError:
                pass
            worst[index] = max(worst[index], time.monotonic() - began)

    threads = [threading.Thread(target=work, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert max(worst) < wait_s / 2, f"an op waited {max(worst):.2f} s on the other thread (pin_wait_s={wait_s})"
    assert sum(done), "no op went through"
    for target, index in ((a1, 0), (b2, 1)):  # an op that raised in pieces keeps the pieces it wrote (README)
        values = target.materialize()
        assert values.min() >= done[index] and values.max() <= tried[index] and torch.equal(values, values.round())
    for pager in (a_pager, b_pager):
        assert not pager._pinned_ranges
        pager.close()


def test_a_request_waits_for_a_holder_that_waits_on_another_pager_for_a_working_thread() -> None:
    """Thread C holds pager 2's whole tier, working; thread B holds 3 of pager 1's 4 slots and
    waits on pager 2 for C; the main thread then asks pager 1 for 2 pages. B's wait ends when C lets
    go, and B's pins with it, so the request waits and goes on. The review found this session's
    first cross-pager rule taking any thread waiting on another pager for one that never lets go:
    the request raised at once."""
    def pager() -> Pager:
        return Pager(MemoryConfig(page_size=4096, vram_limit=4 * 4096, host_memory=64 * 4096, slab_size=64 * 4096,
                                  prefetch_strategy="none", device="cpu", pin_wait_s=30.0))  # fmt: skip

    first, second = pager(), pager()
    a, b = first.allocate(4 * 4096), first.allocate(4 * 4096)
    c, d = second.allocate(4 * 4096), second.allocate(4 * 4096)
    c_pinned, b_pinned = threading.Event(), threading.Event()

    def thread_c() -> None:
        with second.ensure_resident(c, 0, 4):
            c_pinned.set()
            time.sleep(0.5)

    def thread_b() -> None:
        c_pinned.wait()
        with first.ensure_resident(b, 0, 3):
            b_pinned.set()
            with second.ensure_resident(d, 0, 2):
                pass

    threads = [threading.Thread(target=thread_c), threading.Thread(target=thread_b)]
    for thread in threads:
        thread.start()
    b_pinned.wait()
    deadline = time.monotonic() + 10
    while threads[1].ident not in second._pin_waiters and time.monotonic() < deadline:
        time.sleep(0.01)  # until B waits on the second pager
    with first.ensure_resident(a, 0, 2):
        pass
    for thread in threads:
        thread.join()
    for each in (first, second):
        assert not each._pinned_ranges
        each.close()


@pytest.mark.parametrize("op", ["add_", "mul_"])
def test_two_operand_ops_past_the_tier_in_two_threads_both_finish(op: str) -> None:
    """Two threads each run an in-place op of two operands past the device tier (``a.add_(b)``,
    ``a.mul_(b)``) on their own tensors of one pager. Each piece opens one window per operand in
    turn: thread 1 held a piece of ``a`` and waited for room for ``b``, thread 2 held one of ``c``
    and waited for ``d``; the pager found each waiting on the other and the last raised
    DeviceTierFullError at once, often after writing its first pieces (hold-and-wait). An op whose
    later window is refused so now lets go of those it opened, waits for a release and opens them
    all again: both threads finish, with plain torch's values."""
    from pagedtensor import PagedTensor

    config = MemoryConfig(page_size=PAGE, vram_limit=16 * PAGE, host_memory=512 * PAGE, slab_size=512 * PAGE, prefetch_strategy="none",
                          device="cpu", pin_wait_s=10.0)  # fmt: skip
    with Pager(config) as pager:
        g = torch.Generator().manual_seed(0)
        plain = [(torch.randn(640, 64, generator=g), torch.randn(640, 64, generator=g)) for _ in range(2)]  # 40 pages each
        paged = [(PagedTensor.wrap(a.clone(), pager), PagedTensor.wrap(b.clone(), pager)) for a, b in plain]
        barrier = threading.Barrier(2)
        errors: list[str] = []

        def work(index: int) -> None:
            (a, b), (pa, pb) = plain[index], paged[index]
            barrier.wait()
            for round in range(10):
                try:
                    getattr(pa, op)(pb)
                except Exception as error:  # noqa: BLE001 - reported below
                    errors.append(f"thread {index}, round {round}: {type(error).__name__}: {error}")
                    return
                getattr(a, op)(b)

        threads = [threading.Thread(target=work, args=(index,), daemon=True) for index in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(JOIN_TIMEOUT_S)
        assert not any(thread.is_alive() for thread in threads), "deadlock:\n" + thread_stacks(threads)
        assert not errors, errors
        for (a, b), (pa, pb) in zip(plain, paged):
            assert torch.equal(pa.materialize(), a) and torch.equal(pb.materialize(), b)
        assert not pager._pinned_ranges and not pager._woken and not pager._pin_waiters
