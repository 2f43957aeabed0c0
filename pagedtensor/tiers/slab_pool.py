"""SlabPool: fixed-size page slots carved from a few large slabs, grown on demand up to a budget.

Slot ``s`` lives in slab ``s // slab_pages`` at byte offset ``(s % slab_pages) * page_size``, so
slots ``s`` and ``s + 1`` are adjacent in memory exactly when they share a slab. Free slots are
handed out lowest first, so pages allocated together in a fresh or freshly emptied pool get adjacent
slots and their transfers coalesce into few large copies.
"""

from __future__ import annotations

import heapq
from typing import Callable, Iterable, Optional

import torch

from pagedtensor.errors import OutOfPagesError

SlabAllocator = Callable[[int], torch.Tensor]
"""Returns a contiguous uint8 tensor of exactly the requested number of bytes."""


class SlabPool:
    """Page slots in slabs from ``allocate_slab``; never more than ``capacity_pages`` pages of slabs.

    Not thread-safe: the pager serializes calls under its lock.
    """

    def __init__(self, name: str, page_size: int, capacity_pages: int, slab_pages: int, allocate_slab: SlabAllocator) -> None:
        if capacity_pages <= 0:
            raise ValueError(f"{name}: capacity must be at least one page, got {capacity_pages!r}")
        self.name = name
        self.page_size = page_size
        self.capacity_pages = capacity_pages
        self.slab_pages = max(1, min(slab_pages, capacity_pages))
        self._allocate_slab = allocate_slab
        self.slabs: list[torch.Tensor] = []
        self.slab_spans: list[tuple[int, int]] = []  # addresses [first, end) of each slab's memory
        self._typed_slabs: dict[tuple[int, torch.dtype], torch.Tensor] = {}
        self._free: list[int] = []  # heap of free slots inside grown slabs
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

    def allocate(self, count: int) -> list[int]:
        """``count`` free slots, lowest first, in increasing order.

        Raises:
            OutOfPagesError: fewer than ``count`` slots are free; nothing is allocated.
        """
        if count > self.free_pages:
            raise OutOfPagesError(
                f"{self.name} tier: {count} page slots requested, {self.free_pages} free of {self.capacity_pages}"
            )
        while len(self._free) < count:
            self._grow()
        slots = [heapq.heappop(self._free) for _ in range(count)]
        self.used_pages += count
        return slots

    def free(self, slots: Iterable[int]) -> None:
        """Return ``slots`` to the pool."""
        for slot in slots:
            heapq.heappush(self._free, slot)
            self.used_pages -= 1

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
        """Slab number ``slab`` as one flat tensor of ``dtype`` (made once per slab and dtype; the
        page size is a power of two of at least 4 KiB, so every slab holds whole elements)."""
        typed = self._typed_slabs.get((slab, dtype))
        if typed is None:
            typed = self._typed_slabs[(slab, dtype)] = self.slabs[slab].view(dtype)
        return typed

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
        self._free.clear()
        self._grown_pages = 0
        self.used_pages = 0

    def _grow(self) -> None:
        pages = min(self.slab_pages, self.capacity_pages - self._grown_pages)
        if pages <= 0:
            raise OutOfPagesError(f"{self.name} tier: budget of {self.capacity_pages} pages is fully grown")
        # A slab outlives the call that grew it: never an inference tensor (one grown under
        # torch.inference_mode() could not be written outside it).
        with torch.inference_mode(False):
            slab = self._allocate_slab(pages * self.page_size)
        if slab.dtype != torch.uint8 or slab.numel() != pages * self.page_size or not slab.is_contiguous():
            raise RuntimeError(f"{self.name} tier: slab allocator returned {slab.dtype} x {slab.numel()}, expected uint8 x {pages * self.page_size}")
        first = len(self.slabs) * self.slab_pages
        self.slabs.append(slab)
        self.slab_spans.append((slab.data_ptr(), slab.data_ptr() + slab.numel()))
        for slot in range(first, first + pages):
            heapq.heappush(self._free, slot)
        self._grown_pages += pages
