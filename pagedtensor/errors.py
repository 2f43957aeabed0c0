"""Exceptions raised by the pager and its tiers."""

from __future__ import annotations


class PagedLLMError(RuntimeError):
    """Base class of PagedLLM's runtime errors."""


class PageCorruptionError(PagedLLMError):
    """A page read back from the disk tier does not match the checksum recorded when it was written.

    The pager never returns the bytes of such a page: the read raises instead.
    """


class OutOfPagesError(PagedLLMError, MemoryError):
    """A request needs more pages than the budgets of every tier can hold, counting only pages that
    may be evicted (pinned pages never are)."""


class SlabAllocationError(OutOfPagesError):
    """A tier's allocator could not give it a slab: the machine lacks the memory that the tier's
    budget (``vram_limit``, ``host_memory``) or its ``slab_size`` asks for. Pages already held are
    untouched; the request that needed the slab gets nothing."""
