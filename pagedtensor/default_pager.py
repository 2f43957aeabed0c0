"""The process-wide default pager that :meth:`PagedTensor.wrap` uses when it is given none.

The default pager is created on first use from a default :class:`~pagedtensor.config.MemoryConfig`
(its tiers take memory only as pages arrive). Replace it with :func:`set_default_pager`.
"""

from __future__ import annotations

import os
import threading
from typing import Optional

from pagedtensor.config import MemoryConfig
from pagedtensor.pager import Pager

_lock = threading.Lock()
_default: Optional[Pager] = None


def _after_fork_in_child() -> None:
    """A fork while another thread was inside :func:`get_default_pager` (making the default pager)
    left the child's lock held for good, by a thread the child has not: its first wrap hung. The
    child gets a free lock; a default pager made before the fork is the child's copy, as any pager
    (:mod:`pagedtensor.pager`'s fork handler decides whether the child may use it)."""
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def get_default_pager() -> Pager:
    """The default pager; created from ``MemoryConfig()`` on first use (or again after it was closed)."""
    global _default
    with _lock:
        if _default is None or _default.closed:
            _default = Pager(MemoryConfig())
        return _default


def set_default_pager(pager: Optional[Pager]) -> Optional[Pager]:
    """Make ``pager`` the default; ``None`` returns to a lazily created ``MemoryConfig()`` pager.

    Returns the previous default (``None`` if none was created yet, or if it was closed since:
    passing the returned value back restores the state found). The previous pager is not closed:
    tensors wrapped on it keep working.

    Raises:
        TypeError: ``pager`` is neither a :class:`Pager` nor ``None``.
        ValueError: ``pager`` is closed (it could hold no page).
    """
    global _default
    if pager is not None and not isinstance(pager, Pager):
        raise TypeError(f"set_default_pager: expected a Pager or None, got {type(pager).__name__}")
    if pager is not None and pager.closed:
        raise ValueError(f"set_default_pager: {pager!r} is closed; pass an open Pager, or None for a new default one")
    with _lock:
        previous, _default = _default, pager
        # A closed previous default comes back as None, so `set_default_pager(previous)` restores
        # the state it found (a fresh default pager next), as the usual save-and-restore code does.
        return None if previous is not None and previous.closed else previous
