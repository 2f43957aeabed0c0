"""Pager: the control plane. Page table, residency, budgets, eviction, and the pin/unpin protocol.

An :class:`Allocation` is a run of fixed-size pages. Each :class:`Page` may have a copy on each
tier; the topmost copy (device over host over disk) is authoritative and every lower copy is a
clean cache of it. A page is *dirty* when its top copy is its only copy: evicting it must write it
back. Writing a page on the device drops its lower copies, so a stale copy never exists.

Budgets are hard: the device tier never holds more than ``vram_limit`` of slabs, the host tier
never more than ``host_memory``. Under pressure the policy chooses unpinned victims; the spill chain
is device → host → disk, and only dirty pages move (a clean page just drops its copy), but for a
host copy that is the only lower copy of a device page: it spills to a free disk slot rather than
go, so that no copy made is wasted (:meth:`Pager._make_host_room`). Clean copies are dropped for
room before a tier is found full, so pages fit whenever the tiers together hold them and one more
copy of the pages a fault brings at once (they keep their lower copies until they are filled).

An op on pages already resident takes no Python step per page in its bookkeeping: a pin is one
count per pinned range of the allocation (:attr:`Allocation.pins`), the policy's touch is one
deferred run (:class:`~pagedtensor.policies.DeferredTouches`), a release's fence is one entry for
its run of adjacent slots (:class:`~pagedtensor.fences.SlotFences`), and the pages' slots come from
the allocation's :class:`ResidentRun` while no page of the pager has moved since it was recorded.

Note:
    Stream and event ordering, on CUDA:

    * Host→device copies run on ``engine.h2d_stream``, write-backs on ``engine.d2h_stream``.
    * :meth:`Pager.ensure_resident` returns :class:`ResidentPages` holding the events of the copies
      that filled its pages and may still be running; the caller's stream waits on them
      (:meth:`ResidentPages.wait`). A copy seen finished (``Event.query``) is forgotten, so ops on
      pages that are long resident enqueue no wait.
    * :meth:`ResidentPages.release` records an event on the caller's stream: the page's device slot
      is not overwritten (by a later fault) nor read for write-back until that event completes.
      The side stream waits on it; the host never does.
    * A host slot remembers the last copy that read or wrote it. Copies wait on it on the GPU; the
      CPU synchronizes on it only before disk I/O touches that slot.

    On a machine without CUDA the device tier is CPU memory and every copy is synchronous.

Thread-safety: every public method takes the pager's lock; prefetches run on one worker thread.
"""

from __future__ import annotations

import concurrent.futures
import functools
import gc
import itertools
import logging
import operator
import os
import threading
import time
import weakref
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import torch

from pagedtensor.config import MemoryConfig, format_size, machine_memory_bytes
from pagedtensor.errors import DeviceTierFullError, OutOfPagesError, PagerClosedError
from pagedtensor.fences import SlotFences
from pagedtensor.metrics import TIERS, PagerMetrics
from pagedtensor.interrupts import deferring, install as install_interrupt_deferral, interruptible, pager_call
from pagedtensor.policies import DeferredTouches, make_policy
from pagedtensor.tiers import DeviceTier, DiskTier, HostTier
from pagedtensor.tiers.disk import FILE_SYSTEM_FULL_ERRNOS
from pagedtensor.transfer import Event, TransferEngine, coalesce_runs

log = logging.getLogger(__name__)

_NO_PAGES: frozenset[int] = frozenset()
_DEVICE_SLOT = operator.attrgetter("device_slot")
_READY = operator.attrgetter("ready")
_PAGE_ORDER = operator.attrgetter("allocation_id", "index")
_HOST_SLOT = operator.attrgetter("host_slot")
_DISK_SLOT = operator.attrgetter("disk_slot")
_D2H_FENCES = -1  # stream id of the device-slot fences of write-back copies (engine.d2h_stream)
_FILL_FENCES = -2  # stream id of the fences of fill copies whose slot was freed before they were seen done
_SLAB_FENCES = -3  # stream id of the fences of new device slabs (an event on the stream that allocated each)


PAGE_ENTRY_BYTES = 140
"""Host memory one page-table entry takes, about (the bound :meth:`Pager.allocate` checks)."""
UNKNOWN_MACHINE_MEMORY = 2**40
"""The memory :meth:`Pager.allocate` bounds a page table by where the system does not say."""


class WrittenPages(set):
    """Page numbers of a pinned range that the library itself found written (the dispatcher's):
    :meth:`ResidentPages.release` takes them with no check, where a caller's list is checked page
    by page."""

    __slots__ = ()


ACCESS_PATTERNS = ("normal", "loop")
"""How an allocation's pages are used (:meth:`Pager.advise`)."""


@dataclass(eq=False, slots=True)
class Page:
    """One entry of the page table. Compared and hashed by identity."""

    allocation_id: int
    index: int
    nbytes: int
    device_slot: Optional[int] = None
    host_slot: Optional[int] = None
    disk_slot: Optional[int] = None
    ready: Event = None  # the copy that filled ``device_slot``; None once it is known to have finished
    # The allocation's pinned page ranges, ``(start, stop) -> count`` (shared by its pages): pinning
    # a run of pages is one dict update, not one step per page.
    pins: dict[tuple[int, int], int] = field(default_factory=dict, repr=False)

    @property
    def pin_count(self) -> int:
        """How many pinned ranges hold this page (it may not leave the device tier while > 0)."""
        pins = self.pins
        if not pins:
            return 0
        index = self.index
        return sum(count for (start, stop), count in pins.items() if start <= index < stop)

    @property
    def tier(self) -> Optional[str]:
        """The tier of the authoritative copy; ``None`` for a page never written (reads as zeros)."""
        if self.device_slot is not None:
            return "device"
        if self.host_slot is not None:
            return "host"
        if self.disk_slot is not None:
            return "disk"
        return None

    @property
    def dirty(self) -> bool:
        """Whether the top copy is the only copy (evicting it from its tier means writing it back)."""
        copies = (self.device_slot is not None) + (self.host_slot is not None) + (self.disk_slot is not None)
        return copies == 1 and self.disk_slot is None


@dataclass(frozen=True)
class PageInfo:
    """A read-only snapshot of one page-table entry."""

    index: int
    tier: Optional[str]
    device_slot: Optional[int]
    host_slot: Optional[int]
    disk_slot: Optional[int]
    dirty: bool
    pin_count: int


@dataclass(frozen=True, eq=False, slots=True)
class ResidentRun:
    """Pages ``[start, stop)`` of an allocation as last found all resident with no copy in flight.

    Valid while none of the allocation's pages has lost its device slot since: the pager drops the
    record (``Allocation.resident_run = None``) whenever one does, or when a slot of the allocation
    gets a new copy. A page of the record gets a new slot, or a copy into its slot, only after
    losing the slot it had, so a current record's ``slots`` are the pages' slots and none of them
    waits on a copy. A page gains a host or disk copy only while it has no device slot or just
    before losing it, so while the record is current ``lower_copies`` False stays true (a write
    then has no lower copy to drop).
    """

    start: int
    stop: int
    pages: list[Page]
    slots: list[int]
    first_slot: Optional[int]  # ``slots[0]`` when the slots are one run of adjacent slots, else None
    lower_copies: bool  # whether any of the pages may have a host or disk copy


@dataclass(eq=False)
class Allocation:
    """A run of pages holding ``nbytes`` bytes. Created by :meth:`Pager.allocate`."""

    id: int
    nbytes: int
    page_size: int
    pages: list[Page] = field(repr=False)
    name: Optional[str] = None
    freed: bool = False
    version: int = 0  # bumped each time pages are released dirty (written); caches of the bytes compare it
    pins: dict[tuple[int, int], int] = field(default_factory=dict, repr=False)  # pinned ranges, shared with its pages
    resident_run: Optional[ResidentRun] = field(default=None, repr=False)  # the last range found resident
    loop: bool = False  # used once a pass over a fixed sequence of allocations: see Pager.advise
    collected_while_pinned: bool = False  # its owner collected while pages were pinned: freed as the last pin goes

    @property
    def num_pages(self) -> int:
        return len(self.pages)

    def page_range(self, byte_start: int, byte_stop: int) -> tuple[int, int]:
        """The pages ``[first, stop)`` that hold bytes ``[byte_start, byte_stop)``."""
        if not 0 <= byte_start <= byte_stop <= self.nbytes:
            raise IndexError(f"byte range [{byte_start}, {byte_stop}) is outside allocation {self.id} of {self.nbytes} bytes")
        if byte_start == byte_stop:
            return byte_start // self.page_size, byte_start // self.page_size
        return byte_start // self.page_size, -(-byte_stop // self.page_size)


class ResidentPages:
    """Pages ``[start, stop)`` of an allocation, resident and pinned on the device tier.

    Use as a context manager, or call :meth:`release` exactly once.

    Note:
        The pages' bytes are valid on a stream only after :meth:`wait` on that stream (it waits on
        the copy events). :meth:`release` records an event on the releasing stream that orders any
        later reuse of the slots after the work that stream has enqueued so far.
    """

    # Set in a forked child on the holders of the parent's other threads, whose pins the child
    # dropped (:meth:`Pager._drop_pins_of_other_threads`): their release there changes nothing.
    _let_go_at_fork = False

    def __init__(
        self, pager: "Pager", allocation: Allocation, start: int, stop: int, pages: list[Page], slots: list[int], events: list[Event],
        first_slot: Optional[int],
    ) -> None:  # fmt: skip
        self.pager = pager
        self.allocation = allocation
        self.start = start
        self.stop = stop
        self.pages = pages  # shared with the allocation's ResidentRun: read only
        self.slots = slots  # the pages' device slots (fixed while they are pinned; read only)
        self.events = events
        # ``slots[0]`` when the pages sit in adjacent device slots of one slab (one view covers
        # them all), else None.
        self.first_slot = first_slot
        self._dirty: set[int] = set()
        self.released = False
        # Pages ``ensure_resident(discard=...)`` gave zero-filled slots while their lower copies stay:
        # released without being marked dirty, they get their old bytes back.
        self.overwritten: list[Page] = []
        self._unpinned = False  # set by the pager once the release has let the pages go
        self.owner = threading.get_ident()  # the thread whose ensure_resident pinned them (counted in its pins)

    def wait(self, stream: Optional[torch.cuda.Stream] = None) -> None:
        """Make ``stream`` (default: the current stream) wait for the copies that filled the pages."""
        if self.events:
            stream = stream if stream is not None else self.pager.engine.current_stream()
            for event in self.events:
                stream.wait_event(event)

    def _check_held(self) -> None:
        """Raise where the pages were released: their slots may hold another allocation's pages since."""
        if self.released:
            raise RuntimeError(f"pages [{self.start}, {self.stop}) of allocation {self.allocation.id} were already released: "
                               "their device slots may hold other pages now; call ensure_resident again")  # fmt: skip

    def views(self) -> list[torch.Tensor]:
        """One uint8 device view per page (the last page of the allocation may be shorter)."""
        self.pager._check_open()
        self._check_held()
        tier = self.pager.device_tier
        try:
            return [tier.page(page.device_slot)[: page.nbytes] for page in self.pages]
        except IndexError:
            self.pager._check_open()  # closed by another thread meanwhile: its slabs are gone
            raise

    @property
    def nbytes(self) -> int:
        """The bytes the pages hold (the allocation's last page may be shorter)."""
        return (len(self.pages) - 1) * self.allocation.page_size + self.pages[-1].nbytes if self.pages else 0

    def runs(self) -> list[tuple[int, torch.Tensor]]:
        """Maximal runs of pages adjacent in device memory: ``(first page offset in range, view)``."""
        self.pager._check_open()
        self._check_held()
        try:
            return self._runs(self.pager.device_tier)
        except IndexError:
            self.pager._check_open()  # closed by another thread meanwhile: its slabs are gone
            raise

    def _runs(self, tier: DeviceTier) -> list[tuple[int, torch.Tensor]]:
        slots = self.slots
        first = self.first_slot
        if first is not None:  # the common case: one run, found without a Python step per page
            return [(0, tier.run(first, len(slots), self.nbytes))]
        runs: list[tuple[int, torch.Tensor]] = []
        run_start = 0
        for offset in range(1, len(slots) + 1):
            if offset == len(slots) or not tier.adjacent(slots[offset - 1], slots[offset]):
                nbytes = sum(page.nbytes for page in self.pages[run_start:offset])
                runs.append((run_start, tier.run(slots[run_start], offset - run_start, nbytes)))
                run_start = offset
        return runs

    def contiguous(self) -> Optional[torch.Tensor]:
        """One view over every page when their device slots are adjacent; otherwise ``None``."""
        runs = self.runs()
        return runs[0][1] if len(runs) == 1 else None

    def mark_dirty(self, indices: Optional[Iterable[int]] = None) -> None:
        """Record that the pages at ``indices`` (allocation page numbers; default: all) were written.

        Raises:
            ValueError: an index is not one of the pinned pages ``[start, stop)`` (nothing is marked).
            TypeError: an index is no page number (a bool, a float; nothing is marked).
            RuntimeError: the pages were released.
        """
        self._check_held()
        if indices is None:
            self._dirty.update(range(self.start, self.stop))
            return
        inside, outside = self._pinned_and_not(indices)
        if outside:
            raise self._not_pinned(outside)
        self._dirty.update(inside)

    def _pinned_and_not(self, indices: Iterable[int]) -> tuple[set[int], list]:
        """``indices`` split into the pinned page numbers (ints, numpy ints) and the other page
        numbers; :class:`WrittenPages` are taken as they are. A TypeError names an entry that is no
        page number (a bool, a float, a float tensor's element)."""
        if type(indices) is WrittenPages:
            return indices, []
        inside: set[int] = set()
        outside: list = []
        start, stop = self.start, self.stop
        for page in indices:
            if type(page) is not int:
                page = _int_argument(page, "dirty page")
            if start <= page < stop:
                inside.add(page)
            else:
                outside.append(page)
        return inside, outside

    def _not_pinned(self, outside: list) -> ValueError:
        return ValueError(f"dirty page {min(outside, key=repr)!r} is not one of the pinned pages [{self.start}, {self.stop}) of allocation {self.allocation.id}")

    @pager_call
    def release(
        self, *, dirty: Union[bool, Iterable[int]] = False, stream: Optional[torch.cuda.Stream] = None, event: Event = None
    ) -> None:
        """Unpin the pages; ``dirty`` (True or allocation page numbers; None: True) marks pages written.

        Raises:
            ValueError: ``dirty`` names a page outside ``[start, stop)``; the pages are released
                all the same, those of ``dirty`` inside the range marked written.
            TypeError: ``dirty`` is not page numbers; the pages are released all the same, every
                one marked written (no write is lost).

        Note:
            Records an event on ``stream`` (default: the current stream): the slots are reused only
            after the work enqueued on it so far. ``event``, when given, is one the caller has just
            recorded on ``stream`` after that work. Several releases at one point share an event
            through :meth:`Pager.release_together`, which records and registers it under the
            pager's lock: an event recorded earlier than another thread's release of the same
            slots on the same stream, and registered after it, would replace that release's fence.
        """
        if self.released:
            raise RuntimeError(f"pages [{self.start}, {self.stop}) of allocation {self.allocation.id} were already released")
        if self._let_go_at_fork:  # a parent thread's pin, dropped in this forked child
            self.released = self._unpinned = True
            return
        outside: list = []
        problem: Optional[Exception] = None
        if dirty is True or dirty is None:
            self.mark_dirty()
        elif dirty is not False:
            try:
                inside, outside = self._pinned_and_not(dirty)
            except TypeError as error:  # not page numbers: what was written is unknown, so every page was
                self.mark_dirty()
                problem = TypeError(f"dirty: expected True, False or page numbers, got {dirty!r} ({error}); every pinned page was marked written")
            else:
                self._dirty.update(inside)
        self.released = True
        interrupted: Optional[BaseException] = None
        while True:
            try:
                self.pager._release(self, self._dirty, stream, event)
                break
            except BaseException as error:
                if self._unpinned or isinstance(error, Exception):
                    raise
                # Ctrl-C while waiting for the pager's lock (another thread's disk read holds it): the
                # pages are still pinned, and no later call can let them go (this release counts as
                # done), so wait on and raise once they are unpinned.
                interrupted = error
        if self.allocation.collected_while_pinned and self.pager._deferred_frees:  # its last pin gone: freed now
            self.pager._drain_deferred_frees()
        if interrupted is not None:
            raise interrupted
        if problem is not None:  # released all the same: a pin kept for a bad argument would stay forever
            raise problem
        if outside:
            raise self._not_pinned(outside)

    def __enter__(self) -> "ResidentPages":
        return self

    def __exit__(self, *exc_info: object) -> None:
        if not self.released:
            self.release()


_LIVE_PAGERS: "weakref.WeakSet[Pager]" = weakref.WeakSet()


class PinnedByWaitingThreads(DeviceTierFullError):
    """:meth:`Pager.ensure_resident`'s DeviceTierFullError where the pages that would make room are
    pinned by other threads that each wait for pins themselves, so it did not wait for them. An op
    that pinned other windows before this request (a hold-and-wait: each thread holding one window
    and waiting for room for the next) lets go of them, waits for a release and pins them all again
    (:meth:`Pager.wait_to_pin_again`). ``since``: when the request was first refused
    (``time.monotonic()``), from which such retries wait up to ``pin_wait_s`` in all."""

    def __init__(self, message: str, since: float) -> None:
        super().__init__(message)
        self.since = since


# The threads waiting for pins, on any pager, by the pager each waits on (each also in that
# pager's ``_pin_waiters``): a thread whose request waits on one pager's pins may hold pins on
# another (:func:`_may_let_pins_go`). Changed under the lock of the pager waited on (dict operations,
# atomic under the GIL).
_THREADS_WAITING_FOR_PINS: dict[int, "Pager"] = {}


def _may_let_pins_go(owner: int, asker: int, alive: set[int], seen: set[int]) -> bool:
    """Whether thread ``owner``, holding pins, may let some go while thread ``asker`` waits: it
    waits for no pins, or it waits on a pager where another holder (not ``asker``, which will be
    waiting, nor one ``seen`` on the way) may. Threads waiting on each other's pins, across pagers
    too (an op adding a tensor of pager B into one of A beside another thread's op the other way
    round), never let go: a wait for them cannot end. Reads the other pagers' pin tables without
    their locks (a copy of a dict's keys, atomic under the GIL): a stale answer errs as one taken a
    moment earlier would."""
    pager = _THREADS_WAITING_FOR_PINS.get(owner)
    if pager is None:
        return True
    seen.add(owner)
    holders = {key[0] for key in list(pager._pinned_ranges)} - seen - {asker}
    return any(_may_let_pins_go(holder, asker, alive, seen) for holder in holders if holder in alive)


def _after_fork_in_child() -> None:
    """A forked child gets a copy of every pager: give each a fresh lock and no prefetch thread
    (threads do not survive a fork), and drop the pins of the parent's other threads (none of them
    runs in the child to release them: the pages they pinned could never leave its device tier).
    Their disk tiers refuse I/O in the child: the page file is the parent's.

    A pager another thread was inside at the fork (holding its lock: halfway through moving pages,
    a slot taken and its copy not made) is closed in the child: its calls raise ``RuntimeError``
    saying so, where they read a slot's stale bytes."""
    me = threading.get_ident()
    _THREADS_WAITING_FOR_PINS.clear()
    for pager in list(_LIVE_PAGERS):
        lock = pager._lock
        inside = lock.acquire(blocking=False)  # fails where another thread held it at the fork
        if inside:
            lock.release()
        pager._lock = threading.RLock()
        pager._unpinned = threading.Condition(pager._lock)
        pager._pin_waiters = set()
        pager._woken = set()
        pager._held_back = 0
        pager._no_priority = set()
        pager._waiting_requests = {}
        pager._prefetcher = None
        if not inside or pager._filling:
            pager.closed = True
            pager._closed_because = (" in this forked child: another thread of the parent was inside it at the fork, moving pages; "
                                     "fork with no thread using the pager, or use the spawn start method")  # fmt: skip
        else:
            pager._drop_pins_of_other_threads(me)


os.register_at_fork(after_in_child=_after_fork_in_child)


def _slab_fencer(engine: TransferEngine, fences: SlotFences) -> Callable[[int, int], None]:
    """The device tier's ``slab_grown`` hook: fence a new slab's slots (first slot, pages) behind an
    event recorded on the current stream right after the slab was allocated on it.

    Stream order: torch's caching allocator hands a block freed on a stream straight back to that
    stream, so the slab's memory may still be read or written by kernels enqueued there before. The
    first copy into each of its slots, on a side stream, takes this fence (:meth:`SlotFences.take`)
    and waits for the event, so it lands after them; work on the allocating stream follows them
    already. Holds the engine and the fences, not the pager (no reference cycle)."""

    def fence_slab(first: int, pages: int) -> None:
        event = engine.record()
        if event is not None:  # a CPU device tier: copies are synchronous
            fences.record_run(_SLAB_FENCES, first, pages, event)

    return fence_slab


def _finish_device_work(engine: TransferEngine, fences: SlotFences, pid: int) -> None:
    """Before a pager's slabs go back to torch's allocator (at :meth:`Pager.close`, or at the
    collection of a pager never closed): wait for its side streams' copies and for every fenced use
    of a device slot, since kernels still queued on other streams may use the slabs and the
    allocator could hand the memory out at once. Nothing in another process than ``pid``, the
    pager's maker's: a forked child has no CUDA (and never hands the memory out again)."""
    if os.getpid() != pid:
        return
    engine.synchronize()
    for event in fences.take_all():
        if event is not None:  # a CPU pager's copies carry none
            event.synchronize()


class Pager:
    """Moves fixed-size pages between device memory, host memory and disk under hard budgets."""

    def __init__(self, config: Optional[MemoryConfig] = None, *, registry: object = None) -> None:
        if config is not None and not isinstance(config, MemoryConfig):
            raise TypeError(f"config: expected a MemoryConfig (e.g. MemoryConfig(vram_limit='8GiB')), got {type(config).__name__}")
        self.config = config if config is not None else MemoryConfig()
        install_interrupt_deferral()  # Ctrl-C inside pager calls and ops raised as they return
        self.device = self.config.device
        self.page_size = self.config.page_size
        self.engine = TransferEngine(self.device)
        # Per stream id, the event after that stream's last use of each device slot (a run of adjacent
        # slots at once); _D2H_FENCES are the write-back copies of evicted pages, _FILL_FENCES the
        # copies that filled slots since freed, _SLAB_FENCES the allocations of new slabs.
        self._device_fences = SlotFences()
        self.device_tier = DeviceTier(self.config, slab_grown=_slab_fencer(self.engine, self._device_fences))
        self.host_tier = HostTier(self.config)
        self.disk_tier: Optional[DiskTier] = None
        if self.config.nvme_path is not None:
            self.disk_tier = DiskTier(self.config.nvme_path, self.page_size, self.config.disk_pages, self.config.compression)
        # An op on resident pages records its touch as one run (applied before the order is read).
        self.device_policy = DeferredTouches(make_policy(self.config.eviction_policy, self.device_tier.capacity_pages))
        self.host_policy = make_policy(self.config.eviction_policy, self.host_tier.capacity_pages)
        self._lock = threading.RLock()
        # Pins and the threads that wait for them (see _wait_for_other_threads_pins): the ranges
        # unreleased ensure_resident calls pin, ``(thread ident, allocation id, start, stop)`` -> count
        # (one flat dict: a pin and its release touch one key); the threads waiting now; and the
        # condition they wait on, notified whenever pins are let go (or pages freed) while one waits.
        self._pinned_ranges: dict[tuple[int, int, int, int], int] = {}
        self._pin_waiters: set[int] = set()
        self._unpinned = threading.Condition(self._lock)
        # Threads woken by a release that have not yet tried again, and how many requests of other
        # threads wait for them to (see _let_woken_waiters_go_first).
        self._woken: set[int] = set()
        self._held_back = 0
        # Waiting threads whose try after a wake failed: they are woken as before but not let go
        # first again (the pins let go were not room enough: holding other requests back would
        # only slow them, a thread switch per release, for the whole wait).
        self._no_priority: set[int] = set()
        # Allocations with a request that let go of its pin to wait for room, by id: how many.
        # Not freed meanwhile (the request faults their pages in after its wait).
        self._waiting_requests: dict[int, int] = {}
        try:
            self.metrics = PagerMetrics(registry, resident_bytes=_weak_resident_bytes(self))
        except BaseException:  # a registry refused: the page file and its I/O threads go now, not at collection
            if self.disk_tier is not None:
                self.disk_tier.close()
            raise
        # A pager dropped without close(): its metrics leave the registry (which would otherwise keep
        # reporting it, and refuse another pager's metrics of the same names).
        weakref.finalize(self, self.metrics.close, wait=False)  # a collection may run it inside a registry call
        # And its slabs go back to torch's allocator only once its copies and every fenced use of a
        # slot have run (as at close()): the allocator could hand the memory to another stream at once.
        self._pid = os.getpid()  # a forked child, which has no CUDA, makes no CUDA call for this pager
        weakref.finalize(self, _finish_device_work, self.engine, self._device_fences, self._pid).atexit = False
        self._allocations: dict[int, Allocation] = {}
        self._ids = itertools.count()
        self._host_fences: dict[int, Event] = {}  # slot -> last copy touching it
        # Allocations whose PagedTensors were collected while this thread was inside a pager call
        # (free_when_unlocked), and a collected cache's pins and allocations (release_and_free_when_unlocked):
        # released and freed at the pager's next call from outside one, as (pins, allocations).
        self._deferred_frees: list[tuple[tuple[ResidentPages, ...], tuple[Allocation, ...]]] = []
        # Pages whose device slot was zero-filled for an overwrite (``ensure_resident(discard=...)``)
        # while their host or disk copy still holds their bytes: that copy stays authoritative until
        # a release marks the page dirty (the write is done) or gives the bytes back (it failed).
        # Another thread's request for them waits for that release (_wait_for_other_threads_overwrites).
        self._overwriting: set[Page] = set()
        # Pages _bring_to_device has given device slots it has not filled yet: that slot is no copy.
        self._filling: set[Page] = set()
        self._prefetcher: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._prefetch_thread: Optional[int] = None  # the prefetch thread's ident, once it runs
        self.closed = False
        self._closed_because = ""  # why, where it was not closed by close() (a fork amid another thread's call)
        self._released = False  # close() has released the tiers (``closed`` is set first)
        _LIVE_PAGERS.add(self)

    # ------------------------------------------------------------------ allocations

    def allocate(self, nbytes: int, *, name: Optional[str] = None) -> Allocation:
        """A new allocation of ``nbytes`` (its pages read as zeros until written). Takes no tier memory
        yet (a page takes some once written, or read: it is then zero-filled on the device tier and
        kept as any page), only its page table: one entry (about 140 bytes of host memory) per page, made now, so
        size pages for the allocation (2 MiB pages: 512 entries a GiB; 4 KiB pages: 262144)."""
        nbytes = _int_argument(nbytes, "nbytes")
        if nbytes <= 0:
            raise ValueError(f"nbytes: expected a positive size, got {nbytes!r}")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name: expected a str or None, got {name!r}")
        with self._lock:
            self._check_open()
            count = -(-nbytes // self.page_size)
            memory = machine_memory_bytes() or UNKNOWN_MACHINE_MEMORY
            if count * PAGE_ENTRY_BYTES > memory:
                raise ValueError(
                    f"nbytes: {nbytes} bytes is {count} pages of {format_size(self.page_size)}, whose page table "
                    f"(about {PAGE_ENTRY_BYTES} bytes a page) would not fit in this machine's memory ({format_size(memory)}); "
                    f"allocate less, or use larger pages"
                )
            allocation_id = next(self._ids)
            last = nbytes - (count - 1) * self.page_size
            pins: dict[tuple[int, int], int] = {}
            pages = [Page(allocation_id, index, self.page_size, pins=pins) for index in range(count)]
            pages[-1].nbytes = last
            allocation = Allocation(allocation_id, nbytes, self.page_size, pages, name, pins=pins)
            self._allocations[allocation_id] = allocation
        if self._deferred_frees:  # tensors collected while the page table was built (a collection it set off)
            self._drain_deferred_frees()
        return allocation

    def free_when_unlocked(self, allocation: Allocation) -> None:
        """Free ``allocation`` now, or, where this thread is inside a pager call (a garbage collection
        runs finalizers anywhere, halfway through one too), at the pager's next call from outside one
        (``ensure_resident``, ``allocate``, ``free``, ``stats``). What a collected PagedTensor's
        finalizer calls; never raises (a failure is logged). :meth:`release_and_free_when_unlocked`
        with no pins."""
        if not allocation.freed:
            self.release_and_free_when_unlocked((), (allocation,))

    @deferring
    def release_and_free_when_unlocked(self, pins: Sequence[ResidentPages], allocations: Sequence[Allocation]) -> None:
        """Release ``pins`` (not marked written), then free ``allocations``, now or, where this thread
        is inside a pager call, at the pager's next call from outside one, as
        :meth:`free_when_unlocked`. What a collected ``PagedKVCache``'s finalizer calls: run halfway
        through an eviction, its frees took slots from pages being moved. Never raises (a failure
        is logged)."""
        if self.closed:
            return
        if self._inside_a_call():
            self._deferred_frees.append((tuple(pins), tuple(allocations)))
            if pins and self._pin_waiters:
                self._wake_pin_waiters()  # a thread waiting for room lets these pins go as it wakes
            return
        self._release_and_free_quietly(pins, allocations)

    def _release_and_free_quietly(self, pins: Sequence[ResidentPages], allocations: Sequence[Allocation]) -> None:
        for resident in pins:
            try:
                if not resident.released and not self.closed:
                    resident.release()
            except Exception as error:  # noqa: BLE001 - a finalizer must not raise
                log.warning("could not release pages of allocation %d of a collected cache: %s", resident.allocation.id, error)
        for allocation in allocations:
            self._free_quietly(allocation)

    def _free_once_unpinned(self, allocation: Allocation) -> None:
        """Under the lock, after a pin of ``allocation`` went: where it was its last and the
        allocation's owner was collected meanwhile, its free is deferred to the next pager call from
        outside one (:meth:`ResidentPages.release` makes it at once)."""
        if allocation.collected_while_pinned and not allocation.pins and allocation.id not in self._waiting_requests:
            self._deferred_frees.append(((), (allocation,)))

    def _inside_a_call(self) -> bool:
        """Whether this thread holds the pager's lock (is inside a pager call)."""
        return getattr(self._lock, "_is_owned", lambda: False)()

    def _drain_deferred_frees(self, at_a_wait: bool = False) -> None:
        """Free the allocations :meth:`free_when_unlocked` deferred (and release the pins
        :meth:`release_and_free_when_unlocked` deferred), unless this thread is inside a pager call
        (then a later call does); ``at_a_wait``: inside one, at a wait for room, where nothing is
        half done (its own pin let go)."""
        if self._inside_a_call() and not at_a_wait:
            return
        while True:  # one after another, not each inside the last's free (hundreds collected at once)
            try:
                entry = self._deferred_frees.pop()
            except IndexError:  # emptied (by another thread draining too)
                return
            self._release_and_free_quietly(*entry)

    def _free_quietly(self, allocation: Allocation) -> None:
        """Free ``allocation`` for a finalizer: never raises (a failure is logged). One whose pages are
        pinned (code holding them, ``ensure_resident`` on the allocation of a tensor it let go) is
        freed as its last pin goes (:meth:`_free_once_unpinned`)."""
        try:
            if not self.closed and not allocation.freed:
                with self._lock:
                    if allocation.pins or allocation.id in self._waiting_requests:
                        allocation.collected_while_pinned = True
                        return
                    self._free(allocation)
        except Exception as error:  # a finalizer must not raise
            if self.closed:
                return  # closed by another thread since the test above: the allocation went with it
            log.warning("could not free allocation %d of a collected PagedTensor: %s", allocation.id, error)

    @pager_call
    def free(self, allocation: Allocation) -> None:
        """Release every copy of every page of ``allocation``. Its pages must not be pinned.

        Called inside one of this thread's pager calls (by a finalizer a garbage collection ran
        there, halfway through moving pages), the free is deferred to the pager's next call from
        outside one, as :meth:`free_when_unlocked` defers it (an error is then logged)."""
        if self._inside_a_call():
            self.free_when_unlocked(allocation)
            return
        if self._deferred_frees:
            self._drain_deferred_frees()
        self._free(allocation)

    def _free(self, allocation: Allocation) -> None:
        """:meth:`free`, the deferred frees left to the caller."""
        with self._lock:
            self._check_allocation(allocation)
            pinned = [page.index for page in allocation.pages if page.pin_count] if allocation.pins else []
            if pinned:
                raise RuntimeError(f"free: allocation {allocation.id} has pinned pages {pinned[:8]}; release them first")
            if allocation.id in self._waiting_requests:
                raise RuntimeError(f"free: allocation {allocation.id} has pages a request of another thread waits to pin "
                                   f"(ensure_resident, waiting for room); free it once that request is done")
            self._forget_pages(allocation.pages)
            allocation.freed = True
            del self._allocations[allocation.id]
            if self._pin_waiters:
                self._wake_pin_waiters()  # its device slots are free

    @pager_call
    def discard(self, allocation: Allocation, start: int = 0, stop: Optional[int] = None) -> None:
        """Drop every copy of pages ``[start, stop)`` of ``allocation``: they take no tier memory and
        read as zeros again, as pages never written (the allocation stays). For a client that stops
        using some pages of an allocation it keeps (a KV cache's pages no sequence refers to any
        more). The pages must not be pinned."""
        with self._lock:
            start, stop = self._check_range(allocation, start, stop)
            pages = allocation.pages[start:stop]
            pinned = [page.index for page in pages if page.pin_count] if allocation.pins else []
            if pinned:
                raise RuntimeError(f"discard: pages {pinned[:8]} of allocation {allocation.id} are pinned; release them first")
            dropped = any(page.tier is not None for page in pages)
            self._forget_pages(pages)
            if dropped:
                allocation.version += 1  # caches of the bytes (read as zeros now) are stale

    def advise(self, allocation: Allocation, access: str) -> None:
        """Say how ``allocation``'s pages are used, so the device tier keeps the right ones.

        ``access="loop"``: the allocation is used once a pass over a fixed sequence of allocations,
        pass after pass (a model's layer weights, used once a token in layer order). Recency evicts
        each such page just before its next use once the loop does not fit. Pages of loop
        allocations used by :meth:`ensure_resident` leave the device tier as a block instead, the
        most recently used first (:meth:`EvictionPolicy.demote_all`), so the rest of the loop stays
        resident and only the part that does not fit moves each pass. Pages not used for about a
        pass of the loop (last used before the loop page used last was used the time before) are
        stale and leave before the block; every other page after it (a KV cache's, used once a pass
        too). A prefetch is no use: pages prefetched and not yet used keep their place, and a
        loop allocation's resident pages are not touched by a prefetch or a fault.
        ``access="normal"`` (every allocation's default): the configured policy's order.
        """
        if access not in ACCESS_PATTERNS:
            raise ValueError(f"access: expected one of {ACCESS_PATTERNS}, got {access!r}")
        with self._lock:
            self._check_allocation(allocation)
            allocation.loop = access == "loop"
            if not allocation.loop:
                self.device_policy.end_loop(allocation.pages)

    # ------------------------------------------------------------------ residency

    @pager_call
    def release_together(self, releases: Sequence[tuple[ResidentPages, Iterable[int]]], stream: Optional[torch.cuda.Stream] = None) -> None:
        """Release several pinned ranges of this pager at one point of ``stream`` (default: the
        current stream): ``(resident, dirty page numbers)`` each, as :meth:`ResidentPages.release`.

        Stream order: one event, recorded on ``stream`` after the work enqueued on it so far and
        registered for every range under the pager's lock, orders any later reuse of their slots.
        """
        if type(releases) is not list:  # read twice below: a generator would be empty the second time
            releases = list(releases)
        try:  # each entry checked only where one is malformed (a CUDA op's windows come here every op)
            foreign = [resident for resident, _ in releases if resident.pager is not self]
        except (TypeError, ValueError, AttributeError):
            malformed = [entry for entry in releases if not (type(entry) in (tuple, list) and len(entry) == 2 and isinstance(entry[0], ResidentPages))]
            if not malformed:
                raise
            raise TypeError(f"release_together: expected (ResidentPages, dirty page numbers) pairs, got {malformed[0]!r}") from None
        if foreign:
            raise ValueError(f"release_together: pages of allocation {foreign[0].allocation.id} belong to another pager")
        errors: list[Exception] = []
        try:
            with self._lock:
                event = self.engine.record(stream) if self.engine.is_cuda and not self.closed else None
                for resident, dirty in releases:  # every range, whatever one of them raises
                    try:
                        resident.release(dirty=dirty, stream=stream, event=event)
                    except Exception as error:  # noqa: BLE001 - raised below, after every range
                        errors.append(error)
        except BaseException:
            # Ctrl-C while waiting for the lock (or as a range's release finished): the ranges not
            # released yet would stay pinned for good. Each is released on its own (waiting on for
            # the lock, its own event recorded), then the interrupt is raised.
            for resident, dirty in releases:
                if not resident.released:
                    try:
                        resident.release(dirty=dirty, stream=stream)
                    except BaseException:  # noqa: BLE001 - the first interrupt is the one raised
                        pass
            raise
        if errors:
            raise errors[0]

    # A Ctrl-C raised as it returns lets go of the pages it pinned (dropped with the interrupt, they
    # would stay pinned for good). Stream order: the release's event follows the copies enqueued.
    @functools.partial(pager_call, undo=ResidentPages.release)
    def ensure_resident(
        self, allocation: Allocation, start: int = 0, stop: Optional[int] = None, *, discard: Iterable[int] = (),
        prefetch: bool = True,
    ) -> ResidentPages:
        """Bring pages ``[start, stop)`` to the device tier and pin them there.

        ``discard`` names pages (allocation page numbers) the caller overwrites completely: a
        missing one gets a zero-filled slot instead of its old bytes. Its host or disk copy stays
        until the release: marked dirty there, the page holds what the caller wrote and the old copy
        is dropped; not marked dirty (the write failed), the page gets its old bytes back. So a
        failed overwrite loses nothing. Any iterable of ints (a list, a numpy or tensor array) serves;
        it is read only when pages of the range are missing (then a value that is not a page number
        raises ``TypeError`` naming it), so an op on resident pages pays nothing for it.

        Enqueues the copies and returns at once; the returned pages are usable on a stream after
        :meth:`ResidentPages.wait`. With ``prefetch_strategy="sequential"`` a fault that read pages
        also schedules a prefetch of the ``prefetch_pages`` pages that follow (as many of them as the
        device tier holds beside the pages pinned here); not one whose missing pages were all in
        ``discard`` (an overwrite, whose next pages are overwritten too: their old bytes are not
        needed), nor with ``prefetch=False`` (the caller pins more pages next, which would take back
        the room the prefetched ones took: an op's windows before its last).

        Where only pages other threads pin keep the device tier from holding them, it waits (the
        pager's lock let go) for those threads to let go of pins, up to ``config.pin_wait_s``
        seconds; not where every such thread waits too, or this thread's own pins fill the tier.

        A Ctrl-C inside it (deferred to its return, see :mod:`pagedtensor.interrupts`) releases the
        pages, not marked written, before ``KeyboardInterrupt`` is raised.

        Raises:
            OutOfPagesError: the pages do not fit on the device tier beside the pinned pages
                (:class:`DeviceTierFullError`; after any wait), or a lower tier is full.
        """
        self.refuse_cuda_graph_capture()
        if self._deferred_frees:  # collected tensors' pages go before these need room
            self._drain_deferred_frees()
        with self._lock:
            if self.closed:  # closed by another thread while this one waited for the lock
                self._check_open()
            if (stop is None or type(start) is not int or type(stop) is not int or type(allocation) is not Allocation
                    or self._allocations.get(allocation.id) is not allocation or type(prefetch) is not bool):  # fmt: skip
                start, stop = self._check_range(allocation, start, stop)  # raises naming what is wrong
                if type(prefetch) is not bool:
                    raise TypeError(f"prefetch: expected a bool, got {prefetch!r}")
            elif not 0 <= start <= stop <= len(allocation.pages):
                self._check_range(allocation, start, stop)
            if self._woken:  # threads a release woke have not tried again yet: they go first
                self._let_woken_waiters_go_first()
            # After that wait (it lets go of the lock, in which another thread may begin an overwrite):
            if self._overwriting:  # another thread's overwrite in progress: its pages' slots are not their bytes yet
                self._wait_for_other_threads_overwrites(allocation, start, stop)
            pins = allocation.pins
            run = self._current_run(allocation, start, stop)
            # From the pin on, an error or a KeyboardInterrupt (Ctrl-C lands after any call) before
            # the caller holds the pages unpins them: a pin the caller never got would stay forever.
            if run is not None:  # the same pages as last time and nothing has moved since: no step per page
                _pin(pins, start, stop)
                self._count_pins(threading.get_ident(), allocation, start, stop, 1)
                try:
                    self._note_use(allocation, start, stop, run.pages)
                    self.metrics.count("hits", stop - start)
                    return ResidentPages(self, allocation, start, stop, run.pages, run.slots, [], run.first_slot)
                except BaseException:
                    self._abandon_pin(allocation, start, stop, ())
                    raise
            pages = allocation.pages[start:stop]
            slots = list(map(_DEVICE_SLOT, pages))
            # ``discard`` matters only for missing pages: read (and checked) only then, before the pin.
            discard = _page_numbers(discard, "discard") if None in slots else _NO_PAGES
            _pin(pins, start, stop)
            self._count_pins(threading.get_ident(), allocation, start, stop, 1)
            missing = overwritten = ()
            try:
                if None in slots:
                    missing = self._fault_in(pages, discard, touch=not allocation.loop, pinned=(allocation, start, stop))
                    overwritten = [page for page in missing if page in self._overwriting] if discard else []
                    slots = list(map(_DEVICE_SLOT, pages))
                    if allocation.loop:
                        self.device_policy.demote_all(pages)
                else:  # all resident, the common case: ``discard`` only concerns missing pages
                    self._note_use(allocation, start, stop, pages)
                self.metrics.count("hits", len(pages) - len(missing))
                events = self._unfinished_copies(pages)
                first_slot = self.device_tier.first_of_run(slots)
                resident = ResidentPages(self, allocation, start, stop, pages, slots, events, first_slot)
                if overwritten:
                    resident.overwritten = overwritten
                if not events:
                    allocation.resident_run = ResidentRun(start, stop, pages, slots, first_slot,
                                                          _has_lower_copies(pages))  # fmt: skip
            except BaseException:
                self._abandon_pin(allocation, start, stop, missing if discard else ())
                raise
        if missing and prefetch and self.config.prefetch_strategy == "sequential" and self.config.prefetch_pages and len(overwritten) < len(missing):
            # As many as the device tier holds beside the pages just pinned (more asked for prefetched
            # none: the whole batch was refused).
            room = self.device_tier.capacity_pages - (stop - start)
            ahead = min(allocation.num_pages, stop + min(self.config.prefetch_pages, room))
            if ahead > stop:
                try:
                    self.prefetch(allocation, stop, ahead)
                except BaseException:  # Ctrl-C waiting for the lock (the prefetch thread's disk I/O holds it)
                    resident.release()  # unpinned, and pages zero-filled for an overwrite get their bytes back
                    raise
        return resident

    def _note_use(self, allocation: Allocation, start: int, stop: int, pages: Sequence[Page]) -> None:
        """Tell the device policy that the resident pages ``[start, stop)`` are used: a loop
        allocation's are demoted (:meth:`advise`), any other's touched as one deferred run."""
        if allocation.loop:
            self.device_policy.demote_all(pages)
        else:
            self.device_policy.touch_run((allocation.id, start, stop), pages)

    def _abandon_pin(self, allocation: Allocation, start: int, stop: int, faulted: Sequence[Page]) -> None:
        """Undo the pin of an :meth:`ensure_resident` that raised before returning: unpin ``[start, stop)``,
        and the pages of ``faulted`` it zero-filled for an overwrite get their old bytes back (after
        the unpin: a page no other holder pins drops its device slot)."""
        _unpin(allocation.pins, start, stop)
        self._count_pins(threading.get_ident(), allocation, start, stop, -1)
        self._free_once_unpinned(allocation)
        overwritten = [page for page in faulted if page in self._overwriting]
        if overwritten:
            self._restore_overwritten(overwritten)

    def _unfinished_copies(self, pages: Sequence[Page]) -> list[Event]:
        """The distinct events of the copies that filled ``pages`` and may still be running.

        A copy found finished is forgotten (``page.ready = None``): a stream reading the page needs
        no wait, and a later copy into the slot no fence. So an op on pages that faulted in long ago
        enqueues no wait at all. During CUDA graph capture the events are not queried (a query is
        not allowed then) and all of them are returned.
        """
        readies = list(map(_READY, pages))
        if readies.count(None) == len(readies):  # all finished long ago, the common case
            return []
        events: dict[int, torch.cuda.Event] = {}
        for event in readies:
            if event is not None and id(event) not in events:
                events[id(event)] = event
        if not events or torch.cuda.is_current_stream_capturing():
            return list(events.values())
        finished = {key for key, event in events.items() if event.query()}
        if finished:
            for page in pages:
                if page.ready is not None and id(page.ready) in finished:
                    page.ready = None
        return [event for key, event in events.items() if key not in finished]

    @pager_call
    def prefetch(self, allocation: Allocation, start: int = 0, stop: Optional[int] = None) -> concurrent.futures.Future:
        """Bring pages ``[start, stop)`` to the device tier in the background, without pinning them.

        Returns once the copies are enqueued, with a done future, when it needs no disk I/O (no
        page to bring is only on disk, and making room cannot spill the host tier to disk):
        enqueueing copies is a few steps per page of host work, which a thread would contend for
        with the caller (the interpreter lock and the pager's) at a higher cost than doing it. A
        prefetch that needs disk I/O returns at once and runs on the prefetch thread, whose disk
        I/O overlaps the caller's work; its future completes when the copies are enqueued. Either
        way the copies run asynchronously (a later :meth:`ensure_resident` of these pages returns
        their copy events), and a prefetch that cannot fit is logged and its future carries the
        error; it never fails the caller. Pages never written are not brought (a fault zero-fills
        them on the device, with no copy to wait for).
        """
        with self._lock:
            start, stop = self._check_range(allocation, start, stop)
            return self._run_prefetch(allocation.pages[start:stop], self._prefetch_now, [(allocation, start, stop)])

    @pager_call
    def prefetch_together(self, allocations: Sequence[Allocation]) -> concurrent.futures.Future:
        """Bring every page of ``allocations`` to the device tier in the background, as one batch.

        One eviction pass, one request for slots (adjacent ones when a run of that many is free)
        and one coalesced copy with one event: the weights of a decoder layer prefetched together
        land in one run of slots, so each is one view for its op (no gather) and their host copies,
        adjacent since they first left the device, cross in few large copies. If the batch does
        not fit beside the pinned pages, each allocation is prefetched on its own, as far as it fits.

        Runs on the calling thread or the prefetch thread as :meth:`prefetch` does (the latter
        when it needs disk I/O); a prefetch that cannot fit is logged and never fails the caller.
        """
        with self._lock:
            self._check_open()
            if isinstance(allocations, (Allocation, str, bytes)) or not isinstance(allocations, Iterable):
                raise TypeError(f"allocations: expected a sequence of Allocations, got {type(allocations).__name__}")
            batch = list(dict.fromkeys(allocations))  # each once (allocations compare by identity)
            for allocation in batch:
                self._check_allocation(allocation)
            return self._run_prefetch([page for allocation in batch for page in allocation.pages], self._prefetch_together_now, batch)

    def _run_prefetch(self, pages: Sequence[Page], work: Callable[..., int], *args: Any) -> concurrent.futures.Future:
        """``work(*args)`` now, as a done future, when it needs no disk I/O: no page of ``pages``
        missing from the device must be read from disk, and the pages written back to make room
        cannot spill the host tier to disk (there is no disk tier, or the host tier has a free slot
        for every missing page that a prefetch brings: never-written ones stay); else submitted to
        the prefetch thread. Call holding the lock."""
        missing = [page for page in pages if page.device_slot is None and (page.host_slot is not None or page.disk_slot is not None)]
        if self.disk_tier is not None and (self.host_tier.free_pages < len(missing)
                                           or any(page.host_slot is None and page.disk_slot is not None for page in missing)):  # fmt: skip
            if self._prefetcher is None:
                self._prefetcher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pagedllm-prefetch",
                                                                         initializer=_note_prefetch_thread, initargs=(weakref.ref(self),))  # fmt: skip
            return self._prefetcher.submit(work, *args)
        future: concurrent.futures.Future = concurrent.futures.Future()
        try:
            future.set_result(work(*args))
        except Exception as error:  # noqa: BLE001 - carried by the future, as on the thread (logged there)
            future.set_exception(error)
        try:
            return future
        finally:
            # The error's traceback holds this frame and its callers' (an op's, with its tensors): were
            # the frame to hold the future too, a future the caller drops would keep them all alive
            # in a cycle until the garbage collector ran (concurrent.futures' worker drops its own alike).
            del future

    @pager_call
    def evict_all(self) -> None:
        """Move every unpinned page off the device tier (host overflow goes to disk).

        Prefetches queued before the call finish first, so none of them lands after it (so a
        prefetch future's done-callback, which runs on the prefetch thread, cannot call it: RuntimeError).
        """
        self._drain_prefetches("evict_all")
        with self._lock:
            self._check_open()
            victims = self.device_policy.victims(self.device_tier.used_pages, self._device_evictable)
            self._evict_from_device(victims)

    @pager_call
    def evict(self, allocation: Allocation, start: int = 0, stop: Optional[int] = None) -> int:
        """Move the unpinned device-resident pages of ``[start, stop)`` off the device tier.

        Dirty pages are written back to the host tier (on the D2H stream, without a host sync); clean
        ones just drop their device copy. Pinned pages stay. Returns the number of pages evicted.
        Clients that know their own access order (a KV cache streaming pages through a few free
        slots) use this to choose victims instead of the policy.
        """
        with self._lock:
            start, stop = self._check_range(allocation, start, stop)
            victims = [page for page in allocation.pages[start:stop] if page.device_slot is not None and page.pin_count == 0]
            if victims:
                self._evict_from_device(victims)
            return len(victims)

    @pager_call
    def write_back(self, allocation: Allocation, start: int = 0, stop: Optional[int] = None) -> int:
        """Give each unpinned device-resident page of ``[start, stop)`` that has no copy in a lower
        tier a host copy, and leave it resident: it is clean, so evicting it later costs no copy
        and takes no host slot then (for bytes that will not change, such as weights: the host
        tier grows now, not in the middle of later work). Returns the number of pages written back.

        The copies run on the D2H stream after the pages' last uses (no host sync); later copies
        into their device slots wait for them. Where the host tier is full, room is made only where
        it costs no page a copy made before: host copies of pages that keep a disk copy go, and the
        other host copies (not the range's) spill to free disk slots. A host copy that
        is the only lower copy of a page also on the device is never dropped here (that page's
        eviction would copy it back, the copy made for it wasted), nor is a disk copy. Pages are
        written back in order while such room lasts; the rest stay as they are (written back when
        evicted, as any page).
        """
        with self._lock:
            start, stop = self._check_range(allocation, start, stop)
            pages = [page for page in allocation.pages[start:stop]
                     if page.device_slot is not None and page.host_slot is None and page.disk_slot is None and page.pin_count == 0
                     and page not in self._filling and page not in self._overwriting]  # fmt: skip
            if pages:
                # A resident range remembered with no lower copies (a write needs none dropped) is stale now.
                allocation.resident_run = None
            keep = frozenset(allocation.pages[start:stop])  # room is never made by dropping a host copy of the range
            written = 0
            for chunk in _chunked(pages, max(1, self.host_tier.capacity_pages // 2)):
                room = self._make_host_room(len(chunk), keep, spare_copies=True, partial=True)
                if room:
                    self._copy_device_to_host(list(chunk[:room]), keep=keep)
                    written += room
                if room < len(chunk):
                    break
            return written

    @pager_call
    def synchronize(self) -> None:
        """Block until every enqueued transfer has finished (prefetches included; so a prefetch
        future's done-callback, which runs on the prefetch thread, cannot call it: RuntimeError)."""
        self._drain_prefetches("synchronize")
        self.engine.synchronize()

    def _drain_prefetches(self, caller: str = "synchronize") -> None:
        """Wait until the prefetches queued so far have run (never call it holding the lock); on
        the prefetch thread, a RuntimeError naming ``caller``."""
        with self._lock:
            prefetcher = self._prefetcher
        if prefetcher is not None:
            self._refuse_on_the_prefetch_thread(caller)
            try:
                drained = prefetcher.submit(lambda: None)
            except RuntimeError:  # another thread's close() shut it down meanwhile, after its prefetches
                return
            drained.result()

    def _refuse_on_the_prefetch_thread(self, caller: str) -> None:
        """Raise naming ``Pager.<caller>()`` where this thread is the pager's prefetch thread (a
        prefetch future's done-callback runs there): waiting for the prefetches, or for the thread's
        end, it would wait for itself for ever."""
        if threading.get_ident() == self._prefetch_thread:
            raise RuntimeError(
                f"Pager.{caller}() called on the pager's prefetch thread (from a prefetch future's done-callback): "
                f"it waits for that thread's prefetches, so it would wait for itself; call it from another thread"
            )

    def refuse_cuda_graph_capture(self) -> None:
        """Raise ``RuntimeError`` where this CUDA pager is used while the current stream captures a
        CUDA graph: a replay would read and write the device slots the pages held during capture,
        which the pager gives other pages once the call is done, and would repeat none of the
        pager's own work (faults, the KV cache's page table and lengths). Called before any state
        changes, so a refused call leaves the pager and its pages as they were."""
        if self.engine.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "PagedTensor ops cannot be captured in a CUDA graph, nor PagedKVCache updates and paged attention: "
                "a replay would read the device slots the pages held during capture, which the pager reuses once "
                "the call is done; capture dense tensors instead (PagedTensor.materialize(), a transformers "
                "StaticCache)"
            )

    # ------------------------------------------------------------------ bytes in and out

    @pager_call
    def write(self, allocation: Allocation, data: torch.Tensor, offset: int = 0) -> None:
        """Copy ``data``'s bytes into ``allocation`` at byte ``offset`` (blocking the current stream's order);
        ``data`` may be a PagedTensor of ``allocation`` itself (its bytes are read first).

        Pages the write covers completely are not faulted in first: their old bytes are discarded.
        The write goes in chunks of at most half the device tier, and at most its pages the calling
        thread does not pin when it starts; if one fails (``OutOfPagesError``, a disk error reading a page it covers in
        part, an error reading ``data``), the chunks before it hold
        the new bytes and the chunks after it their old bytes. In the failed chunk, covered pages
        that were off the device keep their old bytes; every other page of it may hold part of the
        new bytes, and counts as written (its lower copies go), so it reads the same after eviction.
        """
        self._check_allocation(allocation)
        offset = _int_argument(offset, "offset")
        source = _as_bytes(data)
        if getattr(source, "allocation", None) is allocation:
            # The allocation's own bytes (a PagedTensor of it): read whole first, as a copy between
            # overlapping buffers reads them; the chunks below would zero-fill or overwrite pages
            # before reading them as the source.
            source = source.materialize()
        first, stop = allocation.page_range(offset, offset + source.numel())
        # From pinned host memory the copies run on the GPU's schedule, not the host's: the write
        # returns (or raises) only once they have read ``data``, which the caller may change next.
        pinned_source = self.engine.is_cuda and source.device.type == "cpu" and source.is_pinned()
        try:
            for chunk_start, chunk_stop in self._chunks(first, stop):
                chunk_begin = max(offset, chunk_start * self.page_size)
                chunk_end = min(offset + source.numel(), chunk_stop * self.page_size, allocation.nbytes)
                covered = [
                    index
                    for index in range(chunk_start, chunk_stop)
                    if chunk_begin <= index * self.page_size and index * self.page_size + allocation.pages[index].nbytes <= chunk_end
                ]
                written = False
                resident = self.ensure_resident(allocation, chunk_start, chunk_stop, discard=covered)
                try:  # nothing between the pin and here a Ctrl-C could interrupt
                    resident.wait()
                    for run_offset, view in resident.runs():
                        run_begin = (chunk_start + run_offset) * self.page_size
                        lo, hi = max(run_begin, chunk_begin), min(run_begin + view.numel(), chunk_end)
                        if lo < hi:
                            view[lo - run_begin : hi - run_begin].copy_(source[lo - offset : hi - offset], non_blocking=True)
                    written = True
                finally:
                    # A failed copy gives the covered pages faulted in zero-filled their old bytes back
                    # (``release`` restores them); any other page of the chunk may have been written.
                    restored = {page.index for page in resident.overwritten}
                    resident.release(dirty=True if written else set(range(chunk_start, chunk_stop)).difference(restored))
        finally:
            if pinned_source:
                self.engine.record().synchronize()

    @pager_call
    def read(self, allocation: Allocation, offset: int = 0, nbytes: Optional[int] = None) -> torch.Tensor:
        """A CPU uint8 copy of ``nbytes`` (default: to the end) of ``allocation`` from byte ``offset``."""
        self._check_allocation(allocation)
        offset = _int_argument(offset, "offset")
        nbytes = allocation.nbytes - offset if nbytes is None else _int_argument(nbytes, "nbytes")
        first, stop = allocation.page_range(offset, offset + nbytes)
        out = torch.empty(nbytes, dtype=torch.uint8, device="cpu")  # not the default device: a CPU copy
        for chunk_start, chunk_stop in self._chunks(first, stop):
            with self.ensure_resident(allocation, chunk_start, chunk_stop) as resident:
                resident.wait()
                for run_offset, view in resident.runs():
                    run_begin = (chunk_start + run_offset) * self.page_size
                    lo, hi = max(run_begin, offset), min(run_begin + view.numel(), offset + nbytes)
                    if lo < hi:
                        out[lo - offset : hi - offset].copy_(view[lo - run_begin : hi - run_begin])
        return out

    # ------------------------------------------------------------------ inspection

    def stats(self) -> dict:
        """Counters since creation, plus ``resident_bytes`` per tier (``device``, ``host``, ``disk``)."""
        if self._deferred_frees:
            self._drain_deferred_frees()
        with self._lock:
            stats: dict = dict(self.metrics.values)
            stats["resident_bytes"] = self._resident_bytes()
            stats["device_slab_bytes"] = self.device_tier.slab_bytes
            stats["host_slab_bytes"] = self.host_tier.slab_bytes
            stats["allocations"] = len(self._allocations)
            return stats

    def page_table(self, allocation: Allocation) -> list[PageInfo]:
        """A snapshot of ``allocation``'s page-table entries."""
        with self._lock:
            self._check_allocation(allocation)
            return [
                PageInfo(p.index, p.tier, p.device_slot, p.host_slot, p.disk_slot, p.dirty, p.pin_count) for p in allocation.pages
            ]

    def close(self) -> None:
        """Finish pending transfers and release every tier. The pager cannot be used afterwards.

        Idempotent. It waits for the prefetch thread, so a prefetch future's done-callback (which runs
        there) cannot call it (RuntimeError; the pager stays open). A close interrupted while it waits (Ctrl-C while the prefetch thread finishes a
        disk read, or while copies finish) leaves the pager closed, and the next call releases the tiers.
        """
        with self._lock:
            if self._released:
                return
            if self._prefetcher is not None:
                self._refuse_on_the_prefetch_thread("close")
            self.closed = True
            prefetcher, self._prefetcher = self._prefetcher, None
            self._wake_pin_waiters()  # they find the pager closed
        if prefetcher is not None:
            prefetcher.shutdown(wait=True)
        with self._lock:
            if self._released:
                return
            _finish_device_work(self.engine, self._device_fences, self._pid)
            for allocation in list(self._allocations.values()):
                allocation.freed = True
            self._allocations.clear()
            self.device_tier.close()
            self.host_tier.close()
            if self.disk_tier is not None:
                self.disk_tier.close()
            self.metrics.close()
            self._released = True

    def __repr__(self) -> str:
        c = self.config
        state = ", closed" if getattr(self, "closed", False) else ""
        return (f"Pager(device={self.device}, page_size={c.page_size}, vram_limit={c.vram_limit}, host_memory={c.host_memory}, "
                f"nvme_path={c.nvme_path!r}{state})")

    def __reduce_ex__(self, protocol: int):  # noqa: ANN204
        raise TypeError(
            "a Pager cannot be pickled or copied: it holds device slabs, pinned host memory and an open page file "
            "(PagedTensors pickle their data, not their pager)"
        )

    def __enter__(self) -> "Pager":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ internals: faults

    def _bring_to_device(
        self, pages: Sequence[Page], discard: frozenset[int] = frozenset(), *, counter: str, touch: bool = True,
        tally: Optional[list[int]] = None,
    ) -> list[Page]:
        """Give every page of ``pages`` (all pinned by the caller) a filled device slot.

        Pages whose index is in ``discard`` will be overwritten whole by the caller: their slot is
        zero-filled instead, and those with a host or disk copy join ``_overwriting`` (the copy stays
        authoritative until the caller's release). Returns the pages that were missing, and counts
        those that stay filled in the metric ``counter`` (on error too). On error, pages not yet
        filled keep no device slot. The pages resident already are touched unless ``touch`` is
        False (pages of a loop allocation: their use is a demote, which reads their last use first).
        With ``tally`` (a one-element list) the count is added there instead, for the caller to count
        once it knows which pages stay.
        """
        missing = [page for page in pages if page.device_slot is None]
        if not missing:  # all resident, the common case: one batched touch, no per-page test
            if touch:
                self.device_policy.touch_all(pages)
            return missing
        if touch:
            self.device_policy.touch_all([page for page in pages if page.device_slot is not None])
        # The host copies of the pages brought in stay where the device pages leaving can make
        # room without them: spilled to disk, one would be read straight back.
        try:
            self._make_device_room(len(missing), len(pages), spare=frozenset(page for page in missing if page.host_slot is not None))
        except DeviceTierFullError:
            raise
        except (OutOfPagesError, OSError) as error:  # nothing moved for the pages that failed
            if len(missing) == 1 or not _lower_tier_full(error):
                raise
            # The host tier is full and its pages cannot spill (no disk tier, or a full one): the
            # device pages leaving for it need as many host slots at once. Half the pages at a time:
            # once a half is on the device, the host copies of its pages are copies of resident
            # pages, which the next half's room may drop (its pages dirty again), so a single free
            # slot in either tier is enough to bring any number in, a swap at a time.
            half = len(missing) // 2
            first_half_kept = [0]
            try:
                brought = self._bring_to_device(missing[:half], discard, counter=counter, touch=False, tally=first_half_kept)
                try:
                    return brought + self._bring_to_device(missing[half:], discard, counter=counter, touch=False, tally=tally)
                except BaseException:  # as the request whole would fail: the first half's pages to overwrite go
                    for page in brought:  # (zero-filled: their lower copies are their bytes); the others stay
                        if page.index in discard:
                            self.device_policy.remove(page)
                            self._overwriting.discard(page)
                            self._free_device_slot(page)
                            first_half_kept[0] -= 1
                    raise
            finally:
                self._count_filled(counter, first_half_kept[0], tally)
        for page, slot in zip(missing, self.device_tier.allocate(len(missing), _page_runs(missing))):
            page.device_slot = slot
        self._filling.update(missing)
        copied = missing
        if discard:
            copied = [page for page in missing if page.index not in discard]
            self._overwriting.update(page for page in missing if page.index in discard and _has_lower_copies((page,)))
        filled: set[Page] = set()
        succeeded = False
        try:
            from_host = [page for page in copied if page.host_slot is not None]
            from_disk = [page for page in copied if page.host_slot is None and page.disk_slot is not None]
            # Pages that hold host copies go first: staging disk pages may evict those copies.
            self._copy_host_to_device(from_host)
            filled.update(from_host)
            zeros = [page for page in missing if (page.host_slot is None and page.disk_slot is None) or page.index in discard]
            self._zero_on_device(zeros)
            filled.update(zeros)
            for chunk in _chunked(from_disk, max(1, self.host_tier.capacity_pages // 2)):
                staged = self._stage_from_disk(chunk)
                self._copy_host_to_device(chunk[:staged])
                self._upload_from_disk(chunk[staged:])
                filled.update(chunk)
            succeeded = True
        finally:
            self._filling.difference_update(missing)
            kept = 0
            for page in missing:  # in request order, so the policy sees the order of use
                if page in filled and (succeeded or page.index not in discard):
                    self.device_policy.insert(page)
                    kept += 1
                else:  # on error a zero-filled page to overwrite goes too: its lower copy is its bytes
                    self._overwriting.discard(page)
                    self._free_device_slot(page)
            self._count_filled(counter, kept, tally)
        return missing

    def _count_filled(self, counter: str, pages: int, tally: Optional[list[int]]) -> None:
        """Counts ``pages`` filled device pages in the metric ``counter``, or in ``tally`` where given."""
        if tally is None:
            self.metrics.count(counter, pages)
        else:
            tally[0] += pages

    def _copy_host_to_device(self, pages: Sequence[Page]) -> None:
        if not pages:
            return
        pairs = [(page.host_slot, page.device_slot) for page in pages]
        runs = coalesce_runs(pairs, self.host_tier, self.device_tier)
        wait_for = [self._host_fences.get(host_slot) for host_slot, _ in pairs]
        wait_for += self._device_fences.take([device_slot for _, device_slot in pairs])
        event = self.engine.copy(self.engine.h2d_stream, runs, self.host_tier, self.device_tier, wait_for)
        for page in pages:
            page.ready = event
            self._host_fences[page.host_slot] = event
        self.host_policy.touch_all(pages)
        self.metrics.count("bytes_h2d", len(pages) * self.page_size)

    def _zero_on_device(self, pages: Sequence[Page]) -> None:
        """Pages never written (or fully overwritten next) get zero-filled device slots."""
        if not pages:
            return
        slots = [page.device_slot for page in pages]
        wait_for = self._device_fences.take(slots)
        event = self.engine.zero(slots, self.device_tier, wait_for)
        for page in pages:
            page.ready = event

    def _stage_from_disk(self, pages: Sequence[Page]) -> int:
        """Read the first of ``pages`` (no host copy, a disk copy) from disk into new host slots, as
        many as the host tier makes room for (:meth:`_make_host_room`); returns how many. Blocks on
        disk I/O."""
        count = self._make_host_room(len(pages), partial=True)
        if not count:
            return 0
        pages = pages[:count]
        host_slots = self.host_tier.allocate(count)
        try:
            self._sync_host_slots(host_slots)
            moved = self.disk_tier.read_pages([(page.disk_slot, self.host_tier.page(slot)) for page, slot in zip(pages, host_slots)])
        except BaseException:
            self.host_tier.free(host_slots)
            raise
        for page, slot in zip(pages, host_slots):
            page.host_slot = slot
            self.host_policy.insert(page)
        self.metrics.count("bytes_from_disk", moved)
        return count

    def _upload_from_disk(self, pages: Sequence[Page]) -> None:
        """Fill the device slots of ``pages`` (each with a disk copy) straight from disk, through
        transient buffers outside the host tier's budget: for pages the host tier has no room to
        stage (all its copies are the only ones of their pages, and the disk has no slot to spill
        them to), and refills that must not fail for want of a host slot. The disk copies stay.
        Blocks on disk I/O; the copies run on the H2D stream after the slots' fences (the buffers
        are read before :meth:`TransferEngine.upload` returns)."""
        if not pages:
            return
        buffers = [torch.empty(self.page_size, dtype=torch.uint8, device="cpu") for _ in pages]
        moved = self.disk_tier.read_pages([(page.disk_slot, buffer) for page, buffer in zip(pages, buffers)])
        slots = [page.device_slot for page in pages]
        event = self.engine.upload(buffers, slots, self.device_tier, self._device_fences.take(slots))
        for page in pages:
            page.ready = event
        self.metrics.count("bytes_from_disk", moved)
        self.metrics.count("bytes_h2d", len(pages) * self.page_size)

    def _prefetch_now(self, ranges: Sequence[tuple[Allocation, int, int]]) -> int:
        """Bring the pages of ``ranges`` (``(allocation, start, stop)``) to the device tier as one
        batch, unpinned; the number brought. Raises (and logs) OutOfPagesError if they do not fit.

        A prefetch is no use: the resident pages of allocations used in a loop are not touched
        (their use demotes them), those of any other are, in one call, before room is made.

        Pages never written are not brought: a fault zero-fills them on the device with no copy,
        while a zero-filled slot taken early would evict a page for nothing and, as the page's only
        copy, need a host slot of its own when it leaves (on a small host tier with no disk tier,
        an ``OutOfPagesError`` that depended on when the prefetch ran)."""
        with self._lock:
            if self.closed:
                return 0
            ranges = [(allocation, start, stop) for allocation, start, stop in ranges if not allocation.freed]
            for allocation, start, stop in ranges:
                _pin(allocation.pins, start, stop)
            try:
                if any(not allocation.loop for allocation, _, _ in ranges):
                    self.device_policy.touch_all([page for allocation, start, stop in ranges if not allocation.loop
                                                  for page in allocation.pages[start:stop] if page.device_slot is not None])  # fmt: skip
                pages = [page for allocation, start, stop in ranges for page in allocation.pages[start:stop]]
                if None in map(_DEVICE_SLOT, pages):  # pages never written stay: a fault zero-fills them
                    pages = [page for page in pages if page.device_slot is not None or page.host_slot is not None or page.disk_slot is not None]
                return len(self._bring_to_device(pages, counter="prefetched_pages", touch=False))
            except (OutOfPagesError, OSError) as error:
                if _lower_tier_full(error):  # (a full file system under the disk tier as disk_limit)
                    log.info("prefetch of pages %s skipped: %s", [(allocation.id, start, stop) for allocation, start, stop in ranges], error)
                raise
            finally:
                for allocation, start, stop in ranges:
                    _unpin(allocation.pins, start, stop)
                    self._free_once_unpinned(allocation)

    def _prefetch_together_now(self, allocations: list[Allocation]) -> int:
        """:meth:`_prefetch_now` of every allocation whole; if they do not fit together (a lower
        tier full, by its limit or its file system), of each on its own, as far as each fits."""
        ranges = [(allocation, 0, allocation.num_pages) for allocation in allocations]
        with self._lock:
            try:
                return self._prefetch_now(ranges)
            except (OutOfPagesError, OSError) as error:
                if not _lower_tier_full(error):
                    raise
            brought = 0
            for one in ranges:
                try:
                    brought += self._prefetch_now([one])
                except (OutOfPagesError, OSError) as error:
                    if not _lower_tier_full(error):
                        raise  # (the tiers' room is logged by _prefetch_now)
            return brought

    # ------------------------------------------------------------------ internals: eviction

    def _fault_in(self, pages: Sequence[Page], discard: frozenset[int], *, touch: bool, pinned: tuple[Allocation, int, int]) -> list[Page]:
        """:meth:`_bring_to_device` for :meth:`ensure_resident` (counted as faults); where the device
        tier is full of pages other threads pin, it waits for them (:meth:`_wait_for_other_threads_pins`)
        and tries again. Called under the lock, which a wait lets go; ``pages`` are pinned by the
        caller (its pin of ``pinned``: allocation, start, stop), so none of them leaves the device
        during a try; while it waits that pin is let go (waiting requests that kept their resident
        pages pinned kept each other from room), and each try takes the pages missing then."""
        started: Optional[float] = None
        waited = False
        try:
            while True:
                try:
                    return self._bring_to_device(pages, discard, counter="faults", touch=touch)
                except DeviceTierFullError as error:
                    started = time.monotonic() if started is None else started
                    if waited:  # a try after a wake failed: woken again, but not let go first
                        self._no_priority.add(threading.get_ident())
                    outcome = self._wait_for_other_threads_pins(started + self.config.pin_wait_s, letting_go=pinned)
                    if outcome:
                        waited = True
                        continue
                    message = f"{error}; waited {time.monotonic() - started:.3f} s for other threads' pins" if waited else str(error)
                    if outcome is None:  # every holder waits itself: a caller holding other pins may let them go and retry
                        raise PinnedByWaitingThreads(message, started) from None
                    if not waited:
                        raise
                    raise DeviceTierFullError(message) from None
        finally:
            if waited:
                self._no_priority.discard(threading.get_ident())

    def _wait_for_other_threads_pins(
        self, deadline: float, letting_go: Optional[tuple[Allocation, int, int]] = None, keep_priority: bool = False,
    ) -> Optional[bool]:  # fmt: skip
        """Wait (under the lock, which the wait lets go) until a thread lets pins go, the pager
        frees pages or closes, or ``deadline`` (``time.monotonic()``) passes; True after the wait.
        False without waiting where no wait can help: this thread pins more pages than the tier
        holds, no other living thread pins pages, or the deadline has passed; None where every
        such thread waits too (all waiting on each other's pins would never end: this one raises,
        and its caller's pins go: :class:`PinnedByWaitingThreads`). Raises if the pager was closed
        meanwhile. ``letting_go`` (allocation, start, stop): a pin of this thread's request let go
        for the wait and taken again after it (also where it raises). ``keep_priority``: woken by
        a release, this thread stays among those other requests let go first until it calls
        :meth:`done_pinning_again` (it pins several windows next, not one request under the lock).

        Stream order: none; a wait is on the host."""
        self._check_open()
        me = threading.get_ident()
        held = self._pinned_ranges
        if _distinct_pages([key[1:] for key in held if key[0] == me]) > self.device_tier.capacity_pages:
            return False
        others = list({key[0] for key in held if key[0] != me})
        # Announced before looking: two threads looking at once, each under another pager's lock,
        # each see the other waiting (both raise), where neither might (both waiting for nothing).
        _THREADS_WAITING_FOR_PINS[me] = self
        held_by_waiters = False
        if others:
            alive = {thread.ident for thread in threading.enumerate()}
            others = [owner for owner in others if owner in alive]
            # A holder that waits for pins itself, on this pager or another, lets go only if a
            # holder it waits for may (:func:`_may_let_pins_go`).
            seen = {me}
            held_by_waiters = bool(others)
            others = [owner for owner in others if _may_let_pins_go(owner, me, alive, seen)]
        remaining = deadline - time.monotonic()
        if not others or remaining <= 0:
            _THREADS_WAITING_FOR_PINS.pop(me, None)
            return None if held_by_waiters and remaining > 0 else False
        if letting_go is not None:
            allocation, start, stop = letting_go
            waiting = self._waiting_requests
            waiting[allocation.id] = waiting.get(allocation.id, 0) + 1
            _unpin(allocation.pins, start, stop)
            # Not waking the other waiters: each let go of its own for its wait (woken, they would
            # wake each other in turn until the deadline); a release wakes them all.
            self._count_pins(me, allocation, start, stop, -1, wake=False)
        self._give_up_priority(me)
        self._pin_waiters.add(me)
        try:
            with interruptible():  # Ctrl-C raises at once here (a wait of up to pin_wait_s)
                self._unpinned.wait(min(remaining, threading.TIMEOUT_MAX))  # a longer timeout overflows: the caller waits again
            if self._deferred_frees:  # a collected cache's pins, let go at a call's end that woke this wait
                self._drain_deferred_frees(at_a_wait=True)
            if letting_go is not None and self._overwriting:
                # Its pages, unpinned meanwhile, may have been taken for another thread's overwrite
                # (a zero-filled slot until that holder's release): waited for, as before the pin.
                self._wait_for_other_threads_overwrites(allocation, start, stop)
        finally:
            if keep_priority:  # waits no more, but stays woken until done_pinning_again
                self._pin_waiters.discard(me)
                _THREADS_WAITING_FOR_PINS.pop(me, None)
            else:
                self._done_waiting(me)
            if letting_go is not None:
                _pin(allocation.pins, start, stop)
                self._count_pins(me, allocation, start, stop, 1)
                count = waiting.pop(allocation.id) - 1
                if count:
                    waiting[allocation.id] = count
        self._check_open()
        return True

    def _wait_for_other_threads_overwrites(self, allocation: Allocation, start: int, stop: int) -> None:
        """Wait (under the lock, which the wait lets go) while a page of ``[start, stop)`` is being
        overwritten whole by another thread's holder (``ensure_resident(discard=...)``): its device
        slot holds zeros or part of the new bytes until that holder's release, its bytes being its
        lower copy. A page this thread pins is not waited for (its own overwrite, or a page it
        already holds). Waits up to ``config.pin_wait_s`` seconds.

        Stream order: none; a wait is on the host.

        Raises:
            RuntimeError: the overwrite is not released within ``pin_wait_s``, or the pager closed.
        """
        me = threading.get_ident()
        deadline: Optional[float] = None
        while True:
            busy = [page for page in allocation.pages[start:stop] if page in self._overwriting]
            if not busy:
                return
            mine = [(key[2], key[3]) for key in self._pinned_ranges if key[0] == me and key[1] == allocation.id]
            if any(lo <= page.index < hi for page in busy for lo, hi in mine):
                return
            now = time.monotonic()
            deadline = now + self.config.pin_wait_s if deadline is None else deadline
            if now >= deadline:
                raise RuntimeError(f"pages {busy[0].index}..{busy[-1].index} of allocation {allocation.id} are being overwritten "
                                   f"by another thread, whose holder was not released within pin_wait_s={self.config.pin_wait_s} s")
            self._give_up_priority(me)
            self._pin_waiters.add(me)  # a release wakes the waiters
            _THREADS_WAITING_FOR_PINS[me] = self
            try:
                with interruptible():  # Ctrl-C raises at once here (a wait of up to pin_wait_s); nothing is pinned yet
                    self._unpinned.wait(min(deadline - now, threading.TIMEOUT_MAX))
            finally:
                self._done_waiting(me)
            self._check_open()

    def _wake_pin_waiters(self) -> None:
        """Wake every thread waiting for pins (under the lock); they count as waiting no more until
        they wait again, so a thread that finds the tier full meanwhile does not take them for stuck,
        and as woken until they try again (:meth:`_let_woken_waiters_go_first`)."""
        no_priority = self._no_priority
        self._woken.update(waiter for waiter in self._pin_waiters if waiter not in no_priority)
        for waiter in self._pin_waiters:
            _THREADS_WAITING_FOR_PINS.pop(waiter, None)
        self._pin_waiters.clear()
        self._unpinned.notify_all()

    def _done_waiting(self, me: int) -> None:
        """After this thread's wait for pins (under the lock, held on through its next try): it waits
        no more, and once the last thread woken has its turn, the requests held back for them go on."""
        self._pin_waiters.discard(me)
        _THREADS_WAITING_FOR_PINS.pop(me, None)
        woken = self._woken
        if me in woken:
            woken.discard(me)
            if not woken and self._held_back:
                self._unpinned.notify_all()

    def _give_up_priority(self, me: int) -> None:
        """Before this thread waits (under the lock): where it is still among the woken threads that
        other requests let go first (:meth:`wait_to_pin_again` keeps it there while it pins its
        windows), it is no more, and the requests held back for it go on. Held back, they could
        hold the pins this wait is for."""
        woken = self._woken
        if woken and me in woken:
            woken.discard(me)
            if not woken and self._held_back:
                self._unpinned.notify_all()

    @pager_call
    def wait_to_pin_again(self, ranges: Sequence[tuple[int, int, int]], deadline: float) -> bool:
        """For an op that let go of the windows it had pinned because a later one was refused with
        :class:`PinnedByWaitingThreads`: wait (the lock let go) until another thread lets pins go,
        or ``deadline`` (``time.monotonic()``) passes, before it pins ``ranges`` (``(allocation id,
        start, stop)``: its windows' pages on this pager) again. Each op holding one window and
        waiting for room for the next, the threads would wait on each other for ever; let go, the
        other thread's op goes on, and its release wakes this one. No wait where the ranges fit
        beside every thread's pins now. Woken by a release, this thread is let go first by other
        threads' requests (:meth:`_let_woken_waiters_go_first`) until it calls
        :meth:`done_pinning_again`, which it must (in a ``finally``): so they do not take the room
        back between its windows.

        Returns False where no wait can help, for the caller to raise its refusal: this thread's
        own pins leave too little room for the ranges, no other living thread holds pins that it
        may let go, or the deadline has passed.

        Raises:
            PagerClosedError: the pager is closed (also by another thread during the wait).
        """
        with self._lock:
            self._check_open()
            me = threading.get_ident()
            capacity = self.device_tier.capacity_pages
            pinned = [key[1:] for key in self._pinned_ranges]
            if _distinct_pages([key[1:] for key in self._pinned_ranges if key[0] == me] + list(ranges)) > capacity:
                return False
            if _distinct_pages(pinned + list(ranges)) <= capacity:
                return True  # room beside every pin now (a holder let go meanwhile): no wait
            return bool(self._wait_for_other_threads_pins(deadline, keep_priority=True))

    @pager_call
    def done_pinning_again(self) -> None:
        """After :meth:`wait_to_pin_again` (whatever it returned, and whether the windows were
        pinned or not): other threads' requests no longer let this one go first."""
        with self._lock:
            self._done_waiting(threading.get_ident())

    def _let_woken_waiters_go_first(self) -> None:
        """Wait (under the lock, which the wait lets go) until the threads a release of pins woke have
        tried again, or ``config.pin_wait_s`` passes. Without it a thread that lets its pins go and
        takes them again at once (an op after op on its pages) took them back before a woken thread
        ran (the interpreter switches threads every few milliseconds): the waiting request found the
        tier pinned full each time and raised after ``pin_wait_s``. A woken thread tries once under
        the lock and waits again or goes on; this request then goes on either way.

        Stream order: none; a wait is on the host."""
        deadline = time.monotonic() + self.config.pin_wait_s
        self._held_back += 1
        try:
            with interruptible():  # Ctrl-C raises at once here
                while self._woken and threading.get_ident() not in self._woken:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._unpinned.wait(min(remaining, threading.TIMEOUT_MAX))
        finally:
            self._held_back -= 1
        self._check_open()

    def _count_pins(self, owner: int, allocation: Allocation, start: int, stop: int, change: int, wake: bool = True) -> None:
        """Count one more (``change`` 1) or one fewer (-1) pin of pages ``[start, stop)`` of ``allocation``
        by thread ``owner`` (under the lock; an empty range pins nothing); pins let go, by a release or
        by a request that raised after pinning, wake the threads waiting for pins (not with ``wake``
        False: a waiting request's own pin, let go for its wait)."""
        if start != stop:
            held = self._pinned_ranges
            key = (owner, allocation.id, start, stop)
            count = held.get(key, 0) + change
            if count:
                held[key] = count
            else:
                del held[key]
        if change < 0 and wake and self._pin_waiters:
            self._wake_pin_waiters()

    def _device_evictable(self, page: Page) -> bool:
        return page.pin_count == 0

    def larger_than_the_device_tier(self, requested: int) -> DeviceTierFullError:
        """The error for ``requested`` pages wanted on the device tier at once, more than it holds."""
        tier = f"vram_limit={self.config.vram_limit} bytes = {self.device_tier.capacity_pages} pages of {self.page_size}"
        return DeviceTierFullError(f"device tier: a request for {requested} pages at once is larger than the whole tier ({tier})")

    def _make_device_room(self, count: int, requested: int, spare: frozenset = frozenset()) -> None:
        """Free ``count`` device slots for the missing pages of a request of ``requested`` pages
        (the others resident and pinned by it), evicting by the policy; raises
        :class:`DeviceTierFullError` naming both counts when too few pages may leave. ``spare``:
        host copies to keep where the pages leaving can make host room without them."""
        shortfall = count - self.device_tier.free_pages
        if shortfall <= 0:
            return
        victims = self.device_policy.victims(shortfall, self._device_evictable)
        if len(victims) < shortfall:
            capacity = self.device_tier.capacity_pages
            tier = f"vram_limit={self.config.vram_limit} bytes = {capacity} pages of {self.page_size}"
            if requested > capacity:
                raise self.larger_than_the_device_tier(requested)
            raise DeviceTierFullError(
                f"device tier: {count} pages needed (of a request for {requested}), {self.device_tier.free_pages} free and only "
                f"{len(victims)} evictable ({tier}; the rest are pinned, by this request's pages or by other holders of pages)"
            )
        self._evict_from_device(victims, spare)
        rest = self._rest_of_loop_allocations(victims)  # judged once the victims are gone
        if rest:
            self._evict_from_device(rest, spare)

    def _rest_of_loop_allocations(self, victims: list[Page]) -> list[Page]:
        """For each loop allocation (:meth:`advise`) among ``victims`` (just evicted), its other
        unpinned device-resident pages: a loop allocation leaves whole. One left in part would be
        faulted in part at its next use, into slots away from the rest (a gather for every op on
        it), and the slots it leaves would be too few for the next whole one; the pages taken in
        excess are the ones the policy would take next, so they leave room for the next request.

        A page whose only lower copy would be in host memory once it leaves (one to write back, or,
        without a disk tier, one whose host copy could otherwise be dropped for room) goes only
        while the host tier keeps a free slot for every device page beside it: the request never
        spills the host tier to disk, and no later write-back finds the host full for want of the
        slots it took."""
        allocations = self._allocations
        rest: list[Page] = []
        host_room = self.host_tier.free_pages - self.device_tier.capacity_pages
        droppable_host_copies = self.disk_tier is None
        seen: set[int] = set()
        for page in victims:
            if page.allocation_id in seen:
                continue
            seen.add(page.allocation_id)
            allocation = allocations.get(page.allocation_id)
            if allocation is None or not allocation.loop:
                continue
            for other in allocation.pages:
                if other.device_slot is None or not self._device_evictable(other):
                    continue
                if other.disk_slot is None and (other.host_slot is None or droppable_host_copies):  # takes a host slot for good
                    if host_room <= 0:
                        continue
                    host_room -= 1
                rest.append(other)
        return rest

    def _evict_from_device(self, victims: Sequence[Page], spare: frozenset = frozenset()) -> None:
        """Move ``victims`` (unpinned, device-resident) off the device; dirty ones are written back
        to host (``spare``: as :meth:`_copy_device_to_host`)."""
        for chunk in _chunked(victims, max(1, self.host_tier.capacity_pages // 2)):
            dirty = [page for page in chunk if page.host_slot is None and page.disk_slot is None]
            if dirty:
                # The chunk's clean pages keep their host copies: those become their only copies.
                self._copy_device_to_host(dirty, keep=frozenset(chunk), spare=spare)
            for page in chunk:
                self._drop_device_copy(page)
            self.metrics.count("evictions", len(chunk))

    def _copy_device_to_host(self, pages: list[Page], keep: frozenset, spare: frozenset = frozenset()) -> None:
        """Give ``pages`` (device-resident, with no lower copy) host copies: host slots (made room
        for, keeping the host copies of ``keep``, and those of ``spare`` where the room can be made
        without them), and a D2H copy of each on the D2H stream, after
        the slots' last uses. The device slots are fenced behind the copy, so nothing refills them
        before it has read them. Sorts ``pages``."""
        # In page order, so the host slots (taken in increasing order) follow each allocation's
        # pages and its later fault-ins coalesce into few copies, whatever order the policy
        # chose the victims in (a loop block leaves most recently used first: backwards).
        pages.sort(key=_PAGE_ORDER)
        try:
            self._make_host_room(len(pages), keep=keep | spare)
        except (OutOfPagesError, OSError) as error:  # nothing moved: the spare copies make the room
            if not spare or not _lower_tier_full(error):
                raise
            self._make_host_room(len(pages), keep=keep)
        host_slots = self.host_tier.allocate(len(pages))
        pairs = [(page.device_slot, slot) for page, slot in zip(pages, host_slots)]
        runs = coalesce_runs(pairs, self.device_tier, self.host_tier)
        wait_for = [page.ready for page in pages]
        # The D2H copy waits for the slots' last uses and stands in for them afterwards.
        wait_for += self._device_fences.take([page.device_slot for page in pages])
        wait_for += [self._host_fences.get(slot) for slot in host_slots]
        try:
            event = self.engine.copy(self.engine.d2h_stream, runs, self.device_tier, self.host_tier, wait_for)
        except BaseException:  # a KeyboardInterrupt in a long copy: the pages keep their device copies
            # The slots' fences were taken: wait for them on the host, and for any copy enqueued
            # before the error, so that neither slot is written or read once freed or reused.
            for fence in wait_for:
                if fence is not None:
                    fence.synchronize()
            self.engine.synchronize()
            self.host_tier.free(host_slots)
            raise
        for page, slot in zip(pages, host_slots):
            page.host_slot = slot
            self._host_fences[slot] = event
            self.host_policy.insert(page)
        self._device_fences.record_slots(_D2H_FENCES, (page.device_slot for page in pages), event)
        self.metrics.count("bytes_d2h", len(pages) * self.page_size)

    def _make_host_room(self, count: int, keep: frozenset = frozenset(), *, spare_copies: bool = False, partial: bool = False,
                        disk_room: Optional[int] = None) -> int:  # fmt: skip
        """Free ``count`` host slots; returns how many are free for the caller (``count``, or fewer
        with ``partial``). Blocks on disk I/O.

        Victims are taken in the host policy's order in two passes. First the ways that cost no
        copy made before: host copies of pages that keep a disk copy are dropped, and the other host
        copies spill to free disk slots (a page also on the device stays clean, with a disk copy).
        Then, if that is not room enough, host copies that are the only lower copy of a device copy
        are dropped (the page is dirty again: its eviction will copy it back), and host-only pages
        also spill to disk slots freed by dropping disk copies that are clean caches of a copy that
        stays (:meth:`_disk_caches`). A host-only page that cannot spill stays. The host copies of
        the pages in ``keep`` stay (pages leaving the device right after), and so do their disk
        copies where they have no host copy (they may become their only copies). With
        ``spare_copies`` (:meth:`write_back`) only the first pass runs.

        The disk tier has room for ``disk_limit``'s free slots, or, without a limit, for every spill;
        where a spill then meets a full file system (ENOSPC, EDQUOT, EFBIG) the call runs again with room
        ``disk_room``: the free slots below the first that failed, the file already reaching past
        them (where that is not room enough, the write's OSError is raised). So the full file system
        is a limit as ``disk_limit`` is, met afresh by each call (space freed there is used again).

        Raises:
            OutOfPagesError: fewer than ``count`` slots can be freed (not with ``partial``: then the
                slots that can be are freed, and their number returned); nothing has moved then.
        """
        shortfall = count - self.host_tier.free_pages
        if shortfall <= 0:
            return count
        overwriting = self._overwriting
        disk = self.disk_tier

        def only_lower_copy(page: Page) -> bool:
            """Whether the page's host copy is the only lower copy of its device copy (not of one
            being overwritten, whose device slot is no copy)."""
            return page.device_slot is not None and page not in overwriting and page.disk_slot is None

        if disk is None:
            known_room = 0
        elif disk_room is not None:
            known_room = disk_room
        else:
            known_room = None if disk.capacity_pages is None else disk.capacity_pages - disk.used_pages
        free_disk = shortfall if known_room is None else known_room
        caches: list[Page] = []  # disk copies to drop for room (second pass)
        victims: list[Page] = []
        to_disk: list[Page] = []
        chosen: set[Page] = set()
        stuck = 0  # pages with no disk slot to spill to (in the last pass)
        for costly in (False,) if spare_copies else (False, True):
            if costly and disk is not None and len(to_disk) == free_disk:
                caches = self._disk_caches(keep)
                free_disk += len(caches)
            # As many candidates as are missing, then, if some of them could not go, all of them.
            for limit in (shortfall - len(victims), self.host_tier.used_pages):
                stuck = 0
                for page in self.host_policy.victims(limit, lambda page: page not in keep and page not in chosen):
                    if len(victims) == shortfall:
                        break
                    if page.disk_slot is None and not (costly and only_lower_copy(page)):  # spilled, not dropped
                        if len(to_disk) == free_disk:
                            stuck += 1
                            continue
                        to_disk.append(page)
                    victims.append(page)
                    chosen.add(page)
                if len(victims) == shortfall or not stuck:
                    break
            if len(victims) == shortfall:
                break
        if len(victims) < shortfall and not partial:
            missing = shortfall - len(victims)
            if stuck and disk is None:
                raise OutOfPagesError(
                    f"host tier full (host_memory={self.config.host_memory} bytes) and no disk tier (nvme_path=None): "
                    f"{missing} more host page(s) needed, and none of the {stuck} pages that could make room can spill. "
                    f"Without a disk tier, moving pages between device and host needs a free slot in one of them: "
                    f"free an allocation, raise host_memory, or set nvme_path"
                )
            if stuck:
                raise OutOfPagesError(
                    f"disk tier full (disk_limit={self.config.disk_limit} bytes): {missing} more host page(s) needed, "
                    f"and none of the {stuck} pages that could make room can spill to disk"
                )
            raise OutOfPagesError(f"host tier: {count} pages needed, {self.host_tier.free_pages} free of {self.host_tier.capacity_pages}")
        if to_disk:
            dropped = len(to_disk) - known_room if known_room is not None else 0
            for page in caches[: max(0, dropped)]:
                self._drop_disk_copy(page)
            self._sync_host_slots([page.host_slot for page in to_disk])
            disk_slots = [disk.allocate_slot() for _ in to_disk]
            try:
                moved = disk.write_pages([(slot, self.host_tier.page(page.host_slot)) for page, slot in zip(to_disk, disk_slots)])
            except OSError as error:
                for slot in disk_slots:
                    disk.free_slot(slot)
                failed = getattr(error, "failed_slots", ())
                if known_room is None and failed and error.errno in FILE_SYSTEM_FULL_ERRNOS:
                    # The file system is full: room only below the first slot it could not hold. Where
                    # that is not room enough, the file system's error says why.
                    try:
                        return self._make_host_room(count, keep, spare_copies=spare_copies, partial=partial,
                                                    disk_room=disk.free_slots_below(min(failed)))  # fmt: skip
                    except OutOfPagesError:
                        error.lower_tier_full = True  # nothing moved: the callers' ways round a full tier apply
                        raise error from None
                raise
            except BaseException:
                for slot in disk_slots:
                    disk.free_slot(slot)
                raise
            for page, slot in zip(to_disk, disk_slots):
                page.disk_slot = slot
            self.metrics.count("bytes_to_disk", moved)
        for page in victims:
            self._drop_host_copy(page)
        self.metrics.count("host_evictions", len(victims))
        return count - shortfall + len(victims)

    def _disk_caches(self, keep: frozenset) -> list[Page]:
        """The disk copies that are clean caches of a copy that stays (for :meth:`_make_host_room`):
        those of device-resident pages not in ``keep`` (leaving the device: their disk copy may
        become their only copy), and those of the pages in ``keep`` that have a host copy (it stays);
        never those of pages being overwritten or filled (their device slot does not hold their
        bytes). Dropping one loses no byte. One pass over the page table: called only when the disk
        tier is full."""
        return [page for allocation in self._allocations.values() for page in allocation.pages
                if page.disk_slot is not None and page not in self._overwriting and page not in self._filling
                and (page.host_slot is not None if page in keep else page.device_slot is not None)]  # fmt: skip

    def _sync_host_slots(self, slots: Iterable[int]) -> None:
        """Block the host until the copies touching these host slots are done (before CPU I/O on them)."""
        for slot in slots:
            event = self._host_fences.pop(slot, None)
            if event is not None:
                event.synchronize()

    # ------------------------------------------------------------------ internals: dropping copies

    def _forget_pages(self, pages: Sequence[Page]) -> None:
        """Drop every copy of ``pages`` (freed, or their bytes discarded) and every trace of them in
        the policies, what a policy remembers of pages it evicted before included (2Q's ghosts: kept,
        a dead page would push a live one out, and a discarded page written again would come back hot)."""
        for page in pages:
            self.device_policy.forget(page)  # resident or remembered: one call each
            self.host_policy.forget(page)
            self._free_device_slot(page)
            self._free_host_slot(page)
            self._drop_disk_copy(page)

    def _drop_device_copy(self, page: Page, forget: bool = False) -> None:
        if page.device_slot is None:
            return
        if forget:
            self.device_policy.forget(page)
        else:
            self.device_policy.remove(page)
        self._free_device_slot(page)

    def _free_device_slot(self, page: Page) -> None:
        if page.device_slot is None:
            return
        if page.ready is not None:
            # A later copy into this slot must not overtake the one that filled it.
            self._device_fences.record_slots(_FILL_FENCES, (page.device_slot,), page.ready)
        self.device_tier.free([page.device_slot])
        self._allocations[page.allocation_id].resident_run = None  # it named this slot
        page.device_slot = None
        page.ready = None

    def _drop_host_copy(self, page: Page, forget: bool = False) -> None:
        if page.host_slot is None:
            return
        if forget:
            self.host_policy.forget(page)
        else:
            self.host_policy.remove(page)
        self._free_host_slot(page)

    def _free_host_slot(self, page: Page) -> None:
        if page.host_slot is not None:
            self.host_tier.free([page.host_slot])
            page.host_slot = None

    def _drop_disk_copy(self, page: Page) -> None:
        if page.disk_slot is not None:
            self.disk_tier.free_slot(page.disk_slot)
            page.disk_slot = None

    # ------------------------------------------------------------------ internals: release

    def _release(self, resident: ResidentPages, dirty: set[int], stream: Optional[torch.cuda.Stream], event: Event = None) -> None:
        if self.closed:  # close() dropped every tier: nothing is pinned any more
            resident._unpinned = True
            return
        stream_id = 0
        if self.engine.is_cuda:
            stream = stream if stream is not None else self.engine.current_stream()
            stream_id = stream.stream_id
        with self._lock:
            if self.closed:  # closed by another thread while this one waited for the lock: its tiers are gone
                resident._unpinned = True
                return
            # Recorded under the lock: fences registered in the order their events were recorded,
            # so another thread's later release on the same stream is never replaced by this one.
            if event is None and self.engine.is_cuda:
                event = self.engine.record(stream)
            if event is not None:
                if resident.first_slot is not None:  # adjacent slots: one fence for the run
                    self._device_fences.record_run(stream_id, resident.first_slot, len(resident.slots), event)
                else:
                    self._device_fences.record_slots(stream_id, resident.slots, event)
            if dirty:
                self._take_written(resident, dirty)
            # ``_unpin`` inlined, with the flag set among its steps: no call, so a Ctrl-C cannot land
            # between the unpin and the flag (a release retried after it would unpin twice).
            pins, key = resident.allocation.pins, (resident.start, resident.stop)
            count = pins[key] - 1
            resident._unpinned = True
            if count:
                pins[key] = count
            else:
                del pins[key]
            self._count_pins(resident.owner, resident.allocation, resident.start, resident.stop, -1)
            if not count and resident.allocation.collected_while_pinned:
                self._free_once_unpinned(resident.allocation)
            if resident.overwritten:
                self._restore_overwritten(resident.overwritten)
            if self._overwriting:  # pages whose refill failed while this holder pinned them: no holder is left to write them
                orphans = [page for page in resident.pages if page in self._overwriting and not page.pin_count]
                if orphans:
                    self._restore_overwritten(orphans)

    def _take_written(self, resident: ResidentPages, dirty: set[int]) -> None:
        """Under the lock: the device copies of ``resident``'s pages numbered in ``dirty`` are those
        pages' bytes now (an overwrite of them is done; their host and disk copies go)."""
        allocation = resident.allocation
        allocation.version += 1
        if self._overwriting:  # an overwrite is done: the device copy is the page's bytes now
            self._overwriting.difference_update(page for page in resident.pages if page.index in dirty)
        run = self._current_run(allocation, resident.start, resident.stop)
        if run is None or run.lower_copies:
            for page in resident.pages:
                if page.index in dirty:
                    self._drop_host_copy(page, forget=True)
                    self._drop_disk_copy(page)
            if run is not None and dirty.issuperset(range(run.start, run.stop)):  # every lower copy is gone
                allocation.resident_run = replace(run, lower_copies=False)

    def _restore_overwritten(self, pages: Sequence[Page]) -> None:
        """Give pages whose overwrite was released without a write (it failed) their old bytes back:
        the zero-filled device slot goes, and the host or disk copy is the page again. A page another
        holder still pins keeps its slot, refilled from that copy (on the H2D stream, after the
        slot's fences). Pages since written by another holder (no longer in ``_overwriting``) stay."""
        pages = [page for page in pages if page in self._overwriting]
        self._overwriting.difference_update(pages)
        refill = [page for page in pages if page.pin_count]
        for page in pages:
            if not page.pin_count:
                self._drop_device_copy(page, forget=True)
        if refill:
            for page in refill:  # the slots get new copies: a recorded resident range is stale
                self._allocations[page.allocation_id].resident_run = None
            from_host = [page for page in refill if page.host_slot is not None]
            from_disk = [page for page in refill if page.host_slot is None]
            try:
                self._copy_host_to_device(from_host)
                from_host = []
                # Straight from disk: staging through the host tier could need a spill to a full
                # disk, and this refill must not fail (the slot is pinned).
                self._upload_from_disk(from_disk)
            except BaseException:
                # A refill that failed (a disk error, Ctrl-C) left zeros in the slots, not the pages'
                # bytes: their lower copies stay the pages until the last holder lets go, which
                # drops the slots (``_release``). Taken for written, the zeros would be read (and
                # kept by the next partial write) in place of the bytes.
                self._overwriting.update(from_host + from_disk)
                raise

    def _current_run(self, allocation: Allocation, start: int, stop: int) -> Optional[ResidentRun]:
        """The allocation's remembered resident range when it is ``[start, stop)`` and still current."""
        run = allocation.resident_run
        if run is not None and run.start == start and run.stop == stop:
            return run
        return None

    # ------------------------------------------------------------------ internals: checks

    def _drop_pins_of_other_threads(self, me: int) -> None:
        """In a forked child: let go of the pins of every thread but ``me`` (they do not run here),
        and give pages those threads were overwriting whole their old bytes back (as a release of
        a failed write does: the bytes written so far are not taken for the page). Their holders'
        releases in the child change nothing."""
        dropped = False
        for key, count in list(self._pinned_ranges.items()):
            owner, allocation_id, start, stop = key
            if owner == me:
                continue
            dropped = True
            del self._pinned_ranges[key]
            allocation = self._allocations.get(allocation_id)
            if allocation is not None:
                for _ in range(count):
                    _unpin(allocation.pins, start, stop)
        if dropped:
            # Their holders' objects live on in the child (a cache's pins a worker thread took): a
            # release of one there would let go of a pin a second time, perhaps the forking thread's.
            # What such a holder may have written stays, as a plain tensor's bytes at the fork: its
            # pages' device copies are their bytes (an op marks its writes only as it releases),
            # but for pages it was overwriting whole and had not marked, which get their old bytes
            # back below. (Its slots were filled: a fault halfway closes the child's pager.)
            for holder in gc.get_objects():
                if type(holder) is ResidentPages and holder.pager is self and holder.owner != me and not holder.released:
                    holder._let_go_at_fork = True
                    overwriting = {page.index for page in holder.pages if page in self._overwriting} - holder._dirty
                    written = set(range(holder.start, holder.stop)) - overwriting
                    if written and holder.allocation.id in self._allocations:
                        self._take_written(holder, written)
        orphans = [page for page in self._overwriting if not page.pin_count]
        if orphans:
            self._restore_overwritten(orphans)

    def _check_open(self) -> None:
        if self.closed:
            raise PagerClosedError.of(repr(self), self._closed_because)

    def _check_allocation(self, allocation: Allocation) -> None:
        self._check_open()
        if not isinstance(allocation, Allocation):
            raise TypeError(f"allocation: expected an Allocation, got {type(allocation).__name__}")
        if allocation.freed or self._allocations.get(allocation.id) is not allocation:
            raise ValueError(f"allocation {allocation.id} is freed or belongs to another pager")

    def _check_range(self, allocation: Allocation, start: int, stop: Optional[int]) -> tuple[int, int]:
        self._check_allocation(allocation)
        start = _int_argument(start, "start")
        stop = allocation.num_pages if stop is None else _int_argument(stop, "stop")
        if not 0 <= start <= stop <= allocation.num_pages:
            raise IndexError(f"page range [{start}, {stop}) is outside allocation {allocation.id} of {allocation.num_pages} pages")
        return start, stop

    def _chunks(self, first: int, stop: int) -> Iterator[tuple[int, int]]:
        """Split pages ``[first, stop)`` into ranges that fit on the device tier at once beside the
        pages the calling thread pins when it starts (:meth:`pinned_pages`): half the tier at most,
        the pages it does not pin at most, one page at least."""
        size = max(1, min(self.device_tier.capacity_pages // 2, self.device_tier.capacity_pages - self.pinned_pages()[0]))
        for start in range(first, stop, size):
            yield start, min(stop, start + size)

    def any_pinned(self) -> bool:
        """Whether any thread holds pinned pages now (a snapshot; one step, no lock)."""
        return bool(self._pinned_ranges)

    def pinned_pages(self, within: Sequence[tuple[int, int, int]] = ()) -> tuple[int, int]:
        """``(pinned, inside)``: how many pages of the device tier the calling thread's unreleased
        ``ensure_resident`` calls pin now (its own ``ensure_resident`` context, a KV cache's hot pins
        it took), each page once however many pins hold it, and how many of those lie in the page
        ranges ``within`` (``(allocation id, start, stop)``). Other threads' pins are left out: they
        are let go as their ops end, and a request that needs their room waits for that (up to
        ``pin_wait_s``); this thread's stay until it lets them go. No pins: ``(0, 0)`` at once."""
        if not self._pinned_ranges:
            return 0, 0
        me = threading.get_ident()
        with self._lock:
            ranges = [key[1:] for key in self._pinned_ranges if key[0] == me]
        wanted: dict[int, list[tuple[int, int]]] = {}
        for allocation_id, lo, hi in within:
            wanted.setdefault(allocation_id, []).append((lo, hi))
        inside = [
            (allocation_id, max(start, lo), min(stop, hi))
            for allocation_id, start, stop in ranges
            if allocation_id in wanted
            for lo, hi in wanted[allocation_id]
            if start < hi and lo < stop
        ]
        return _distinct_pages(ranges), _distinct_pages(inside)

    def room_for_new_pages(self, wanted: int) -> Optional[int]:
        """How many pages that hold no copy now (never written, or discarded) the tiers can still take
        once written, ``wanted`` or more where at least that many: their capacities in pages less
        the pages holding a copy in some tier, each page once (a page with copies in two tiers needs
        only one). None where the disk tier has no limit. The page table is walked only where the
        free slots alone are fewer than ``wanted``. A snapshot, as :meth:`pinned_pages`; the pages of
        collected tensors whose free is deferred still count as held."""
        disk = self.disk_tier
        if disk is not None and disk.capacity_pages is None:
            return None
        with self._lock:
            disk_capacity = 0 if disk is None else disk.capacity_pages
            free = self.device_tier.free_pages + self.host_tier.free_pages + (0 if disk is None else disk_capacity - disk.used_pages)
            if free >= wanted:
                return free
            held = 0
            for allocation in self._allocations.values():
                pages = allocation.pages
                copies = zip(map(_DEVICE_SLOT, pages), map(_HOST_SLOT, pages), map(_DISK_SLOT, pages))
                held += len(pages) - list(copies).count((None, None, None))
            return self.device_tier.capacity_pages + self.host_tier.capacity_pages + disk_capacity - held

    def _resident_bytes(self) -> dict[str, int]:
        return {
            "device": self.device_tier.used_pages * self.page_size,
            "host": self.host_tier.used_pages * self.page_size,
            "disk": 0 if self.disk_tier is None else self.disk_tier.used_pages * self.page_size,
        }

    def _locked_resident_bytes(self) -> dict[str, int]:
        with self._lock:
            return self._resident_bytes()


def _distinct_pages(ranges: Iterable[tuple[int, int, int]]) -> int:
    """How many pages the pinned ranges ``(allocation id, start, stop)`` cover, each page once (a thread
    may pin one page in several ranges: nested ``ensure_resident`` calls)."""
    pages = 0
    last: tuple[int, int] = (-1, 0)  # (allocation id, the end of the pages counted so far)
    for allocation_id, start, stop in sorted(ranges):
        if allocation_id == last[0]:
            start = max(start, last[1])
            if stop <= last[1]:
                continue
        pages += stop - start
        last = (allocation_id, stop)
    return pages


def _pin(pins: dict[tuple[int, int], int], start: int, stop: int) -> None:
    """Pin pages ``[start, stop)`` once more (``pins``: their allocation's pinned ranges)."""
    key = (start, stop)
    pins[key] = pins.get(key, 0) + 1


def _unpin(pins: dict[tuple[int, int], int], start: int, stop: int) -> None:
    """Undo one :func:`_pin` of ``[start, stop)``."""
    key = (start, stop)
    count = pins[key] - 1
    if count:
        pins[key] = count
    else:
        del pins[key]


def _has_lower_copies(pages: Sequence[Page]) -> bool:
    """Whether any of ``pages`` has a host or a disk copy (two C-level scans, no Python step per page)."""
    count = len(pages)
    return list(map(_HOST_SLOT, pages)).count(None) != count or list(map(_DISK_SLOT, pages)).count(None) != count


def _page_runs(pages: Sequence[Page]) -> list[int]:
    """The lengths of the runs of consecutive pages of one allocation in ``pages``, in order: the
    groups that gain from adjacent slots (one view for an op, one copy)."""
    runs: list[int] = []
    previous = None
    for page in pages:
        if previous is not None and page.allocation_id == previous.allocation_id and page.index == previous.index + 1:
            runs[-1] += 1
        else:
            runs.append(1)
        previous = page
    return runs


def _chunked(items: Sequence[Page], size: int) -> Iterator[Sequence[Page]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _as_bytes(data: torch.Tensor) -> torch.Tensor:
    """``data``'s bytes as a flat contiguous uint8 tensor (a view when ``data`` is contiguous)."""
    if not isinstance(data, torch.Tensor):
        raise TypeError(f"data: expected a torch.Tensor, got {type(data).__name__}")
    reason = unpageable_reason(data)
    if reason is not None:
        raise ValueError(f"data: {reason}")
    flat = data.detach().contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    return flat.view(torch.uint8) if flat.numel() else flat.to(torch.uint8)


def unpageable_reason(t: torch.Tensor) -> Optional[str]:
    """Why the bytes of tensor ``t`` cannot be paged as they are, or None."""
    if t.layout != torch.strided:
        return f"only strided tensors can be paged, got layout {t.layout}"
    if t.is_nested:
        return "nested tensors cannot be paged"
    if t.is_quantized:
        return f"unsupported dtype {t.dtype}"
    if t.device.type == "meta":
        return "a meta tensor has no data to page"
    if t.is_conj() or t.is_neg():
        return "resolve the conjugate/negative bit first (t.resolve_conj().resolve_neg())"
    return None


def _lower_tier_full(error: BaseException) -> bool:
    """Whether ``error`` says a lower tier had no room, nothing moved: an OutOfPagesError, or the
    OSError of a full file system under the disk tier that room-making met (``lower_tier_full``, set
    by :meth:`Pager._make_host_room`, which raises it for the caller to see the file system's error)."""
    return isinstance(error, OutOfPagesError) or getattr(error, "lower_tier_full", False)


def _page_numbers(pages: Iterable[int], name: str) -> frozenset[int]:
    """``pages`` (page numbers: a list, range, set, numpy or tensor array of ints) as a frozenset of
    plain ints, else a TypeError naming ``name`` (a 0-d tensor in a frozenset would match no page)."""
    if type(pages) in (list, tuple, range, set, frozenset) and all(type(page) is int for page in pages):
        return frozenset(pages) if pages else _NO_PAGES
    try:
        return frozenset(_int_argument(page, name) for page in pages)
    except TypeError as error:
        if str(error).startswith(f"{name}:"):
            raise
        raise TypeError(f"{name}: expected page numbers, got {pages!r}") from None


def _int_argument(value: object, name: str) -> int:
    """``value`` as a plain int (anything ``operator.index`` takes: numpy ints, 0-d integer
    tensors; not a bool, nor a bool or many-element tensor), else a TypeError naming ``name``."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and (value.dim() != 0 or value.dtype == torch.bool)):
        raise TypeError(f"{name}: expected an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name}: expected an int, got {value!r}") from None


def _note_prefetch_thread(pager_ref: "weakref.ref[Pager]") -> None:
    """The prefetch thread's first step: its ident, for the pager's waits to refuse to run on it
    (through a weak reference: the thread must not keep a dropped pager alive)."""
    pager = pager_ref()
    if pager is not None:
        pager._prefetch_thread = threading.get_ident()


def _weak_resident_bytes(pager: Pager) -> Callable[[], dict[str, int]]:
    """``pager``'s resident bytes per tier, read without keeping the pager alive: a registry holds
    its metrics, and a reference from them would keep a dropped pager's slabs and page file."""
    pager_ref = weakref.ref(pager)

    def resident_bytes() -> dict[str, int]:
        live = pager_ref()
        return live._locked_resident_bytes() if live is not None else dict.fromkeys(TIERS, 0)

    return resident_bytes
