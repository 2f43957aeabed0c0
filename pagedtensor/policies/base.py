"""The interface every eviction policy implements."""

from __future__ import annotations

import abc
from collections import OrderedDict
from typing import Callable, Generic, Hashable, Iterable, Iterator, Optional, TypeVar

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
        self._loop: OrderedDict[K, None] = OrderedDict()  # keys used in a loop, the most recently used first

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

    def demote_all(self, keys: Iterable[K]) -> None:
        """Every key of ``keys``, each already in the tier, was used, in that order, in a loop: it
        will not be needed again before the other keys of its loop have been (a model's layer
        weights, used once a token in layer order). Recency would evict each such key just before
        its next use once the loop does not fit. These keys leave as a block instead, the most
        recently used first, which keeps the rest of the loop resident. The block sits in the
        policy's own eviction order where its least recently used key sits: keys that have not been
        used since then (stale ones) still leave before it, keys used since leave after it."""
        keys = list(keys)
        self.touch_all(keys)  # its place in the policy's own order (which anchors the block)
        loop = self._loop
        for key in keys:
            loop[key] = None
            loop.move_to_end(key, last=False)

    def end_loop(self, keys: Iterable[K]) -> None:
        """``keys`` are no longer used in a loop: they leave by the policy's own order again."""
        loop = self._loop
        for key in keys:
            loop.pop(key, None)

    @abc.abstractmethod
    def remove(self, key: K) -> None:
        """``key`` left the tier (evicted or freed). Implementations also drop it from the loop block."""

    def forget(self, key: K) -> None:
        """``key`` left the tier because its page was freed: keep no history of it."""
        self.remove(key)

    def _eviction_order(self, evictable: Callable[[K], bool]) -> Iterator[K]:
        """The resident keys with ``evictable(key)``, lazily, in the order this policy would evict
        them one after another, ignoring the loop block. Every policy implements it (the base
        class's :meth:`victims` and :meth:`victim` read it)."""
        raise NotImplementedError(f"{type(self).__name__} must implement _eviction_order (the order victims() reads)")

    def victim(self, evictable: Callable[[K], bool]) -> Optional[K]:
        """The key to evict next among those with ``evictable(key)``; ``None`` if there is none.

        Does not remove the key: the pager calls :meth:`remove` once it has moved the page.
        """
        chosen = self.victims(1, evictable)
        return chosen[0] if chosen else None

    def victims(self, count: int, evictable: Callable[[K], bool]) -> list[K]:
        """Up to ``count`` distinct keys to evict, in eviction order, each with ``evictable(key)``:
        the policy's own order, with the loop block (:meth:`demote_all`) in the place of its least
        recently used key. Does not remove them."""
        chosen: list[K] = []
        if count <= 0:
            return chosen
        order = self._eviction_order(evictable)
        loop = self._loop
        if loop:
            for key in order:  # the keys before the block's anchor
                if key in loop:
                    break
                chosen.append(key)
                if len(chosen) == count:
                    return chosen
            else:
                return chosen
            for key in loop:  # the block, the most recently used first
                if evictable(key):
                    chosen.append(key)
                    if len(chosen) == count:
                        return chosen
            order = (key for key in order if key not in loop)
        for key in order:
            chosen.append(key)
            if len(chosen) == count:
                break
        return chosen

    @abc.abstractmethod
    def __contains__(self, key: object) -> bool: ...

    @abc.abstractmethod
    def __len__(self) -> int: ...
