"""The interface every eviction policy implements."""

from __future__ import annotations

import abc
from typing import Callable, Generic, Hashable, Iterable, Optional, TypeVar

K = TypeVar("K", bound=Hashable)


class EvictionPolicy(abc.ABC, Generic[K]):
    """Orders the keys resident in one tier for eviction.

    ``capacity`` is the tier's size in pages; policies that split their queues (2Q) size them
    from it. A key is inserted once when it arrives in the tier and removed once when it leaves.
    """

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity: expected a positive number of pages, got {capacity!r}")
        self.capacity = capacity

    @abc.abstractmethod
    def insert(self, key: K) -> None:
        """``key`` arrived in the tier (it counts as used now)."""

    @abc.abstractmethod
    def touch(self, key: K) -> None:
        """``key``, already in the tier, was used."""

    def touch_all(self, keys: Iterable[K]) -> None:
        """Every key of ``keys``, each already in the tier, was used, in that order (one call for
        the pages of one op; subclasses replace the per-key method call with a tighter loop)."""
        for key in keys:
            self.touch(key)

    @abc.abstractmethod
    def demote_all(self, keys: Iterable[K]) -> None:
        """Every key of ``keys``, each already in the tier, was used, in that order, and will not be
        needed again before the other keys of its loop have been (a model's layer weights, used once
        a token in layer order). They go first in the eviction order, the last of them first: among
        keys used this way the most recently used leaves first, which keeps the rest of the loop
        resident instead of evicting each key just before its next use, as recency would."""

    @abc.abstractmethod
    def remove(self, key: K) -> None:
        """``key`` left the tier (evicted or freed)."""

    def forget(self, key: K) -> None:
        """``key`` left the tier because its page was freed: keep no history of it."""
        self.remove(key)

    @abc.abstractmethod
    def victim(self, evictable: Callable[[K], bool]) -> Optional[K]:
        """The key to evict next among those with ``evictable(key)``; ``None`` if there is none.

        Does not remove the key: the pager calls :meth:`remove` once it has moved the page.
        """

    def victims(self, count: int, evictable: Callable[[K], bool]) -> list[K]:
        """Up to ``count`` distinct keys to evict, in eviction order, each with ``evictable(key)``.

        Does not remove them. Subclasses override this with a single scan; this default asks
        :meth:`victim` repeatedly.
        """
        chosen: list[K] = []
        chosen_set: set[K] = set()
        while len(chosen) < count:
            key = self.victim(lambda k: k not in chosen_set and evictable(k))
            if key is None:
                break
            chosen.append(key)
            chosen_set.add(key)
        return chosen

    @abc.abstractmethod
    def __contains__(self, key: object) -> bool: ...

    @abc.abstractmethod
    def __len__(self) -> int: ...
