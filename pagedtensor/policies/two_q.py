"""2Q (Johnson & Shasha, VLDB 1994): scan-resistant LRU.

A page seen once enters ``a1in``, a FIFO of about a quarter of the tier. When ``a1in`` is over its
share, its oldest page is evicted first and its key remembered in ``a1out`` (a ghost queue of keys
only, half the tier). A page that comes back while remembered in ``a1out`` has proved it is reused
and enters ``am``, an LRU of hot pages. One scan over a large tensor therefore flushes ``a1in`` but
leaves the hot set in ``am`` alone.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Container, Iterable, Iterator

from pagedtensor.policies.base import EvictionPolicy, K

A1IN_SHARE = 0.25
A1OUT_SHARE = 0.5


class TwoQPolicy(EvictionPolicy[K]):
    """2Q with ``a1in`` (FIFO), ``a1out`` (ghost keys) and ``am`` (LRU)."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.a1in_limit = max(1, int(capacity * A1IN_SHARE))
        self.a1out_limit = max(1, int(capacity * A1OUT_SHARE))
        self.a1in: OrderedDict[K, int] = OrderedDict()  # key -> tick of its last use
        self.a1out: OrderedDict[K, None] = OrderedDict()
        self.am: OrderedDict[K, int] = OrderedDict()

    def insert(self, key: K) -> None:
        if key in self.a1in or key in self.am:
            raise KeyError(f"TwoQPolicy.insert: key {key!r} is already resident")
        self._clock += 1
        if key in self.a1out:
            del self.a1out[key]
            self.am[key] = self._inserted[key] = self._clock
        else:
            self.a1in[key] = self._inserted[key] = self._clock

    def touch(self, key: K) -> None:
        self.touch_all((key,))

    def touch_all(self, keys: Iterable[K]) -> None:
        am, a1in = self.am, self.a1in
        tick = self._tick()
        for key in keys:
            if key in am:
                am.move_to_end(key)
                am[key] = tick
            elif key in a1in:
                a1in[key] = tick  # a page in a1in stays where it is: one burst of uses is one use
            else:
                raise KeyError(f"TwoQPolicy.touch: key {key!r} is not resident")

    def remove(self, key: K) -> None:
        self._forget_key(key)
        if key in self.a1in:
            del self.a1in[key]
            self.a1out[key] = None
            while len(self.a1out) > self.a1out_limit:
                self.a1out.popitem(last=False)
        else:
            del self.am[key]

    def forget(self, key: K) -> None:
        """Drop every trace of ``key``, ghost and last use as a loop key included (the page was
        freed, not evicted)."""
        self._forget_key(key)
        self._forget_loop_use(key)
        self.a1in.pop(key, None)
        self.am.pop(key, None)
        self.a1out.pop(key, None)

    def remembered(self) -> list[K]:
        return list(self.a1out)

    def _eviction_order(self, evictable: Callable[[K], bool], skip: Container[K] = ()) -> Iterator[tuple[K, int]]:
        """The order repeated :meth:`victim` and :meth:`remove` calls would give: ``a1in`` first while
        it holds more than its share (counting the keys already given), ``am`` first otherwise. An
        evictable key of ``skip`` in ``a1in`` counts as given (the loop block takes it)."""
        a1in_left = len(self.a1in)
        a1in_keys = ((key, tick) for key, tick in self.a1in.items() if evictable(key))
        am_keys = ((key, tick) for key, tick in self.am.items() if key not in skip and evictable(key))
        while True:
            first, second = (a1in_keys, am_keys) if a1in_left > self.a1in_limit else (am_keys, a1in_keys)
            entry = next(first, None)
            from_a1in = first is a1in_keys
            if entry is None:
                entry = next(second, None)
                from_a1in = second is a1in_keys
            if entry is None:
                return
            if entry[0] not in skip:
                yield entry
            a1in_left -= from_a1in

    def _last_use(self, key: K) -> int:
        tick = self.a1in.get(key)
        return self.am[key] if tick is None else tick

    def __contains__(self, key: object) -> bool:
        return key in self.a1in or key in self.am

    def __len__(self) -> int:
        return len(self.a1in) + len(self.am)
