"""Least recently used: evict the page whose last use is oldest."""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Iterable, Iterator

from pagedtensor.policies.base import EvictionPolicy, K


class LRUPolicy(EvictionPolicy[K]):
    """Keys in an ordered dict, least recently used first."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._order: OrderedDict[K, int] = OrderedDict()  # key -> tick of its last use, least recent first

    def insert(self, key: K) -> None:
        if key in self._order:
            raise KeyError(f"LRUPolicy.insert: key {key!r} is already resident")
        self._order[key] = self._tick_insert(key)

    def touch(self, key: K) -> None:
        self._order.move_to_end(key)
        self._order[key] = self._tick()

    def touch_all(self, keys: Iterable[K]) -> None:
        order = self._order
        move_to_end = order.move_to_end
        tick = self._tick()
        for key in keys:
            move_to_end(key)
            order[key] = tick

    def remove(self, key: K) -> None:
        del self._order[key]
        self._forget_key(key)

    def _eviction_order(self, evictable: Callable[[K], bool]) -> Iterator[tuple[K, int]]:
        return ((key, tick) for key, tick in self._order.items() if evictable(key))

    def _last_use(self, key: K) -> int:
        return self._order[key]

    def order(self) -> list[K]:
        """Resident keys, least recently used first, loop block or not (for tests and debugging)."""
        return list(self._order)

    def __contains__(self, key: object) -> bool:
        return key in self._order

    def __len__(self) -> int:
        return len(self._order)
