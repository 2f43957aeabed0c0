"""Least recently used: evict the page whose last use is oldest."""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Iterable, Optional

from pagedtensor.policies.base import EvictionPolicy, K


class LRUPolicy(EvictionPolicy[K]):
    """Keys in an ordered dict, least recently used first."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._order: OrderedDict[K, None] = OrderedDict()

    def insert(self, key: K) -> None:
        if key in self._order:
            raise KeyError(f"LRUPolicy.insert: key {key!r} is already resident")
        self._order[key] = None

    def touch(self, key: K) -> None:
        self._order.move_to_end(key)

    def touch_all(self, keys: Iterable[K]) -> None:
        move_to_end = self._order.move_to_end
        for key in keys:
            move_to_end(key)

    def demote_all(self, keys: Iterable[K]) -> None:
        move_to_end = self._order.move_to_end
        for key in keys:
            move_to_end(key, last=False)

    def remove(self, key: K) -> None:
        del self._order[key]

    def victim(self, evictable: Callable[[K], bool]) -> Optional[K]:
        for key in self._order:
            if evictable(key):
                return key
        return None

    def victims(self, count: int, evictable: Callable[[K], bool]) -> list[K]:
        chosen: list[K] = []
        for key in self._order:
            if len(chosen) == count:
                break
            if evictable(key):
                chosen.append(key)
        return chosen

    def order(self) -> list[K]:
        """Resident keys, least recently used first (for tests and debugging)."""
        return list(self._order)

    def __contains__(self, key: object) -> bool:
        return key in self._order

    def __len__(self) -> int:
        return len(self._order)
