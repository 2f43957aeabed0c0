"""Least recently used: evict the page whose last use is oldest."""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Container, Iterable, Iterator

from pagedtensor.policies.base import EvictionPolicy, K


class LRUPolicy(EvictionPolicy[K]):
    """Keys in an ordered dict, least recently used first."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._order: OrderedDict[K, int] = OrderedDict()  # key -> tick of its last use, least recent first

    def insert(self, key: K) -> None:
        if key in self._order:
            raise KeyError(f"LRUPolicy.insert: key {key!r} is already resident")
        self._clock += 1
        self._order[key] = self._inserted[key] = self._clock

    def touch(self, key: K) -> None:
        self._order.move_to_end(key)
        self._clock += 1
        self._order[key] = self._clock

    def touch_all(self, keys: Iterable[K]) -> None:
        order = self._order
        move_to_end = order.move_to_end
        tick = self._tick()
        for key in keys:
            move_to_end(key)
            order[key] = tick

    def remove(self, key: K) -> None:
        del self._order[key]
        del self._inserted[key]
        if self._loop:
            self._loop.pop(key, None)

    def victims(self, count: int, evictable: Callable[[K], bool]) -> list[K]:
        if self._loop:
            return super().victims(count, evictable)
        chosen: list[K] = []  # no loop block: the order alone, in one tight loop
        if count <= 0:
            return chosen
        for key in self._order:
            if evictable(key):
                chosen.append(key)
                if len(chosen) == count:
                    break
        return chosen

    def _eviction_order(self, evictable: Callable[[K], bool], skip: Container[K] = ()) -> Iterator[tuple[K, int]]:
        return ((key, tick) for key, tick in self._order.items() if key not in skip and evictable(key))

    def _last_use(self, key: K) -> int:
        return self._order[key]

    def order(self) -> list[K]:
        """Resident keys, least recently used first, loop block or not (for tests and debugging)."""
        return list(self._order)

    def __contains__(self, key: object) -> bool:
        return key in self._order

    def __len__(self) -> int:
        return len(self._order)
