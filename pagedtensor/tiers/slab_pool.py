"""SlabPool: fixed-size page slots carved from a few large slabs, grown on demand up to a budget.

Slot ``s`` lives in slab ``s // slab_pages`` at byte offset ``(s % slab_pages) * page_size``, so
slots ``s`` and ``s + 1`` are adjacent in memory exactly when they share a slab. A request for
several slots gets the first run of adjacent free slots long enough for all of them when one exists
(so their transfers coalesce into one copy and an op over them needs no gather), else the lowest
free slots.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence

import torch

from pagedtensor.config import format_size
from pagedtensor.errors import OutOfPagesError, SlabAllocationError
from pagedtensor.outside_transforms import outside_transforms

SlabAllocator = Callable[[int], torch.Tensor]
"""Returns a contiguous uint8 tensor of exactly the requested number of bytes."""


class SlabPool:
    """Page slots in slabs from ``allocate_slab``; never more than ``capacity_pages`` pages of slabs.

    When ``prepare_slab`` is given, :meth:`allocate` calls it with the next slab's size in bytes
    each time it leaves fewer than half a slab of grown slots free while the budget has room for
    another slab, so the owner can start making that slab before :meth:`_grow` asks
    ``allocate_slab`` for it. When ``slab_grown`` is given, :meth:`_grow` calls it with the new
    slab's first slot and page count once the slab is added (before any of its slots is handed out).

    Not thread-safe: the pager serializes calls under its lock.
    """

    def __init__(
        self,
        name: str,
        page_size: int,
        capacity_pages: int,
        slab_pages: int,
        allocate_slab: SlabAllocator,
        prepare_slab: Optional[Callable[[int], None]] = None,
        slab_grown: Optional[Callable[[int, int], None]] = None,
    ) -> None:
        if capacity_pages <= 0:
            raise ValueError(f"{name}: capacity must be at least one page, got {capacity_pages!r}")
        self.name = name
        self.page_size = page_size
        self.capacity_pages = capacity_pages
        self.slab_pages = max(1, min(slab_pages, capacity_pages))
        self._allocate_slab = allocate_slab
        self._prepare_slab = prepare_slab
        self._slab_grown = slab_grown
        self.slabs: list[torch.Tensor] = []
        self.slab_spans: list[tuple[int, int]] = []  # addresses [first, end) of each slab's memory
        self._typed_slabs: dict[tuple[int, torch.dtype], torch.Tensor] = {}
        self._free_map = bytearray()  # one byte per slot of the grown slabs: 1 when free
        self._grown_pages = 0
        self.used_pages = 0

    @property
    def free_pages(self) -> int:
        """Slots that :meth:`allocate` can hand out now, growing slabs as needed."""
        return self.capacity_pages - self.used_pages

    @property
    def slab_bytes(self) -> int:
        """Bytes held in slabs (what this tier takes from its memory)."""
        return sum(slab.numel() for slab in self.slabs)

    def allocate(self, count: int, groups: Optional[Sequence[int]] = None) -> list[int]:
        """``count`` free slots, for pages that are used in ``groups`` (sizes in order, summing to
        ``count``; default one group): adjacent slots for as many groups as possible.

        The pool grows a slab only when fewer than ``count`` of its slots are free; then all
        ``count`` take the first run of that many adjacent free slots in one slab when there is
        one. Otherwise each group, largest first, takes the first free run of its size, and the groups
        that find none take the lowest free slots (in address order). Slots come back in group order.

        Raises:
            OutOfPagesError: fewer than ``count`` slots are free; nothing is allocated.
            ValueError: ``count`` is negative or ``groups`` are not positive sizes summing to it.
        """
        if count < 0:
            raise ValueError(f"{self.name} tier: cannot allocate {count} page slots")
        sizes = ([count] if count else []) if groups is None else list(groups)
        if sum(sizes) != count or any(size <= 0 for size in sizes):
            raise ValueError(f"{self.name} tier: groups {sizes} do not split {count} slots")
        if count > self.free_pages:
            raise OutOfPagesError(
                f"{self.name} tier: {count} page slots requested, {self.free_pages} free of {self.capacity_pages}"
            )
        if not count:
            return []
        while self._grown_pages - self.used_pages < count:
            self._grow()
        slots = self._place(count, sizes)
        if (
            self._prepare_slab is not None
            and 2 * (self._grown_pages - self.used_pages) < self.slab_pages
            and self._grown_pages < self.capacity_pages
        ):
            self._prepare_slab(self._next_slab_pages() * self.page_size)
        return slots

    def _place(self, count: int, sizes: list[int]) -> list[int]:
        """Take ``count`` of the grown free slots for groups of ``sizes`` as :meth:`allocate` describes."""
        if count == 1:
            slot = self._free_map.find(1)
            self._take(slot, 1)
            return [slot]
        first = self._first_run(count)
        if first >= 0:
            self._take(first, count)
            return list(range(first, first + count))
        placed: list[Optional[list[int]]] = [None] * len(sizes)
        if len(sizes) > 1:  # (one group: its run was just looked for)
            for group in sorted(range(len(sizes)), key=lambda group: -sizes[group]):
                size = sizes[group]
                first = self._first_run(size) if size > 1 else -1
                if first >= 0:
                    self._take(first, size)
                    placed[group] = list(range(first, first + size))
        find = self._free_map.find
        slot = 0
        for group, size in enumerate(sizes):
            if placed[group] is None:  # no run of its size is free: the lowest free slots
                slots = placed[group] = []
                for _ in range(size):
                    slot = find(1, slot)
                    slots.append(slot)
                    self._take(slot, 1)
        return [slot for group in placed for slot in group]

    def _take(self, first: int, count: int) -> None:
        """Mark the ``count`` free slots from ``first`` on used."""
        self._free_map[first : first + count] = bytes(count)
        self.used_pages += count

    def _first_run(self, count: int) -> int:
        """The first slot of the lowest run of ``count`` adjacent free slots inside one slab, or -1."""
        wanted = b"\x01" * count
        find = self._free_map.find
        slab_pages = self.slab_pages
        first = find(wanted)
        while first >= 0 and first // slab_pages != (first + count - 1) // slab_pages:
            first = find(wanted, (first // slab_pages + 1) * slab_pages)  # the run crosses a slab: look from the next
        return first

    def free(self, slots: Iterable[int]) -> None:
        """Return ``slots`` to the pool.

        Raises:
            ValueError: a slot is not in use (freed twice, or never handed out); nothing is freed.
        """
        free_map = self._free_map
        slots = list(slots)
        for slot in slots:
            if not 0 <= slot < len(free_map) or free_map[slot]:
                raise ValueError(f"{self.name} tier: slot {slot!r} is not in use (freed twice, or never allocated)")
        if len(set(slots)) != len(slots):
            raise ValueError(f"{self.name} tier: slots {sorted(slots)} name a slot twice")
        for slot in slots:
            free_map[slot] = 1
        self.used_pages -= len(slots)

    def page(self, slot: int) -> torch.Tensor:
        """The uint8 view of one slot."""
        slab, index = divmod(slot, self.slab_pages)
        start = index * self.page_size
        return self.slabs[slab][start : start + self.page_size]

    def run(self, slot: int, count: int, nbytes: Optional[int] = None) -> torch.Tensor:
        """One uint8 view of ``count`` adjacent slots starting at ``slot`` (all in one slab), cut to
        its first ``nbytes`` bytes when given."""
        slab, index = divmod(slot, self.slab_pages)
        if index + count > self.slab_pages:
            raise ValueError(f"{self.name} tier: run of {count} slots from {slot} crosses a slab boundary")
        if nbytes is not None and not 0 <= nbytes <= count * self.page_size:
            raise ValueError(f"{self.name} tier: {nbytes} bytes do not fit a run of {count} slots")
        start = index * self.page_size
        return self.slabs[slab][start : start + (count * self.page_size if nbytes is None else nbytes)]

    def typed_slab(self, slab: int, dtype: torch.dtype) -> torch.Tensor:
        """Slab number ``slab`` as one flat tensor of ``dtype`` (made once per slab and dtype, outside
        any ``torch.func`` transform; the page size is a power of two of at least 4 KiB, so every
        slab holds whole elements)."""
        typed = self._typed_slabs.get((slab, dtype))
        if typed is None:
            typed = self._typed_slabs[(slab, dtype)] = self._typed_view(slab, dtype)
        return typed

    @outside_transforms
    def _typed_view(self, slab: int, dtype: torch.dtype) -> torch.Tensor:
        return self.slabs[slab].view(dtype)

    def first_of_run(self, slots: list[int]) -> Optional[int]:
        """``slots[0]`` when ``slots`` are adjacent slots of one slab, in order (one view covers them
        all), found with one list compare; ``None`` otherwise (or when ``slots`` is empty)."""
        if not slots:
            return None
        first = slots[0]
        count = len(slots)
        if count > 1:
            if first // self.slab_pages != (first + count - 1) // self.slab_pages:
                return None
            if slots != list(range(first, first + count)):
                return None
        return first

    def adjacent(self, slot: int, next_slot: int) -> bool:
        """Whether ``next_slot`` directly follows ``slot`` in memory."""
        return next_slot == slot + 1 and next_slot % self.slab_pages != 0

    def close(self) -> None:
        """Drop every slab (the memory returns to its allocator)."""
        self.slabs.clear()
        self.slab_spans.clear()
        self._typed_slabs.clear()
        self._free_map = bytearray()
        self._grown_pages = 0
        self.used_pages = 0

    def _next_slab_pages(self) -> int:
        """Pages of the next slab :meth:`_grow` adds: a full slab, or the budget's rest when smaller (0 when fully grown)."""
        return min(self.slab_pages, self.capacity_pages - self._grown_pages)

    @outside_transforms
    def _grow(self) -> None:
        """Add one slab (``slab_pages`` pages, fewer when the budget's rest is smaller).

        Raises:
            OutOfPagesError: the budget is fully grown.
            SlabAllocationError: the allocator could not give the slab (the message names its size).
        """
        pages = self._next_slab_pages()
        if pages <= 0:
            raise OutOfPagesError(f"{self.name} tier: budget of {self.capacity_pages} pages is fully grown")
        # A slab outlives the call that grew it: never an inference tensor (one grown under
        # torch.inference_mode() could not be written outside it).
        nbytes = pages * self.page_size
        with torch.inference_mode(False):
            try:
                slab = self._allocate_slab(nbytes)
            except (RuntimeError, MemoryError) as error:  # torch.OutOfMemoryError, "can't allocate memory", cudaHostRegister
                raise SlabAllocationError(
                    f"{self.name} tier: cannot allocate a slab of {format_size(nbytes)} ({nbytes} bytes, {pages} page{'s' if pages != 1 else ''} of "
                    f"{format_size(self.page_size)}; {self._grown_pages} of the budget's {self.capacity_pages} pages grown already): {error}. "
                    f"Lower slab_size, page_size or the tier's budget (vram_limit, host_memory) to what this machine has"
                ) from error
        if slab.dtype != torch.uint8 or slab.numel() != nbytes or not slab.is_contiguous():
            raise RuntimeError(f"{self.name} tier: slab allocator returned {slab.dtype} x {slab.numel()}, expected uint8 x {nbytes}")
        self.slabs.append(slab)
        self.slab_spans.append((slab.data_ptr(), slab.data_ptr() + slab.numel()))
        first = self._grown_pages
        self._free_map += b"\x01" * pages  # byte s is slot s: only the last slab can be short
        self._grown_pages += pages
        if self._slab_grown is not None:
            self._slab_grown(first, pages)
