"""Exceptions raised by the pager and its tiers."""

from __future__ import annotations

from typing import Optional


class PagedLLMError(RuntimeError):
    """Base class of PagedLLM's runtime errors."""


class PagerClosedError(PagedLLMError):
    """A call reached a :class:`~pagedtensor.Pager` after its ``close()`` (or one closed in a forked
    child): its pages are gone. The message names the pager and, for an op on a PagedTensor, the op."""

    pager_description: str = "a Pager"
    why: str = ""
    subject: Optional[str] = None

    @classmethod
    def of(cls, pager_description: str, why: str = "", subject: Optional[str] = None) -> "PagerClosedError":
        """The error for the pager ``pager_description`` (its repr), closed ``why`` (a clause, or
        ``""`` for ``close()``), met by ``subject`` (an op or method; ``None``: the pager's own API)."""
        if subject is None:
            error = cls(f"this Pager is closed{why}: {pager_description}")
        else:
            error = cls(f"{subject}: the pager is closed{why}: {pager_description}")
        error.pager_description, error.why, error.subject = pager_description, why, subject
        return error

    def met_by(self, subject: str) -> "PagerClosedError":
        """This error as ``subject`` (the op or method that reached the pager) raises it."""
        return PagerClosedError.of(self.pager_description, self.why, subject)


class PageCorruptionError(PagedLLMError):
    """A page read back from the disk tier does not match the checksum recorded when it was written.

    The pager never returns the bytes of such a page: the read raises instead.
    """


class OutOfPagesError(PagedLLMError, MemoryError):
    """A request needs more pages than the budgets of every tier can hold, counting only pages that
    may be evicted (pinned pages never are)."""


class DeviceTierFullError(OutOfPagesError):
    """The device tier cannot take a request's pages at once: too few of its pages are free or
    evictable beside the pinned ones (``vram_limit`` is the bound). An :class:`OutOfPagesError` that
    is not this one came from a lower tier (a host or disk tier full while making device room)."""


def out_of_pages_for(subject: str, error: OutOfPagesError, plural: bool = True) -> str:
    """The message of an op whose pages could not be on the device tier at once: ``subject`` (e.g.
    ``"aten.sum.default: its PagedTensor arguments"``) needs more pages at once than the device tier
    can hold, or, where a lower tier was the bound, could not be brought there; ``error``'s text after."""
    if isinstance(error, DeviceTierFullError):
        return f"{subject} {'need' if plural else 'needs'} more pages at once than the device tier can hold: {error}"
    return f"{subject} could not be brought onto the device tier, a lower tier being full: {error}"


class SlabAllocationError(OutOfPagesError):
    """A tier's allocator could not give it a slab: the machine lacks the memory that the tier's
    budget (``vram_limit``, ``host_memory``) or its ``slab_size`` asks for. Pages already held are
    untouched; the request that needed the slab gets nothing."""
