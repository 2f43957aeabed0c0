"""The interface every eviction policy implements."""

from __future__ import annotations

import abc
from collections import OrderedDict
from typing import Callable, Container, Generic, Hashable, Iterable, Iterator, Optional, TypeVar

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
        # Keys used in a loop (demote_all), the most recently used first; ticks count uses (every
        # insert and every touch call takes the next one: only their order matters).
        self._loop: OrderedDict[K, None] = OrderedDict()
        self._clock = 0
        self._inserted: dict[K, int] = {}  # key -> the tick of its insert (its last use until touched)
        # The use before the last of the loop key used last (about a pass of the loop ago): keys
        # last used before it are stale, and leave before the loop block.
        self._pass_start: Optional[int] = None
        # Loop key -> the tick of its last use as one (demote_all), kept while the key is off the
        # tier (remove) and dropped only by forget and end_loop: a loop key evicted and brought back
        # (faulted or prefetched) still has its use before, a pass ago, to tell the pass start by.
        self._loop_uses: dict[K, int] = {}

    def _tick(self) -> int:
        """The next use's tick (a counter: only the order of ticks matters)."""
        self._clock += 1
        return self._clock

    def _forget_key(self, key: K) -> None:
        """Drop ``key`` from the loop block and the insert ticks (it left the tier)."""
        self._loop.pop(key, None)
        self._inserted.pop(key, None)

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
        recently used first, which keeps the rest of the loop resident.

        The block's place among the other keys: those last used before the loop key used last was
        used the time before (about a pass of the loop ago) are stale and leave before the block
        (pages written once and never used again); every other key leaves after it (a KV cache's
        pages, used once a pass too).

        A key's use before this one is its last use in the tier, or, if it arrived since (an insert
        is no use: a fault or a prefetch brought it back), its last use as a loop key before it
        left, which the policy remembers; a key with neither (used in a loop for the first time)
        has none to tell. Remembering matters: were only resident keys' uses counted, a loop that
        fits, pushed out by pages written after its last pass, would fault every key back in with
        no use before, so no key would ever count as stale, each faulted key would evict the one
        used just before it, and the loop would fault whole every pass while the stale pages kept
        their slots."""
        keys = list(keys)
        previous = list(map(self._last_use, keys))  # KeyError for a key not resident, before any change
        self.touch_all(keys)
        now = self._clock  # this use's tick (LRU's and 2Q's touch_all take one tick for all the keys)
        inserted = self._inserted
        uses = self._loop_uses
        for key, tick in zip(reversed(keys), reversed(previous)):  # the last key with a use before this one
            if inserted.get(key) != tick:  # a use before this one since it arrived, not its insert
                self._pass_start = tick
                break
            before = uses.get(key)  # arrived since: its last use as a loop key before it left
            if before is not None:
                self._pass_start = before
                break
        loop = self._loop
        move_to_end = loop.move_to_end
        for key in keys:
            loop[key] = None
            move_to_end(key, last=False)
        uses.update(dict.fromkeys(keys, now))  # in C, not a store a key in the loop above

    def end_loop(self, keys: Iterable[K]) -> None:
        """``keys`` are no longer used in a loop: they leave by the policy's own order again."""
        loop, uses = self._loop, self._loop_uses
        for key in keys:
            loop.pop(key, None)
            uses.pop(key, None)

    @abc.abstractmethod
    def remove(self, key: K) -> None:
        """``key`` left the tier (evicted or freed). Implementations also drop it from the loop block
        (not its last use as a loop key: :meth:`demote_all` reads it if the key comes back)."""

    def forget(self, key: K) -> None:
        """``key``'s page was freed or its bytes discarded: keep no history of it. The key may be
        resident (it leaves the tier) or not (a policy that remembers evicted keys drops it).
        Overrides drop its last use as a loop key too (:meth:`_forget_loop_use`)."""
        self._forget_loop_use(key)
        if key in self:
            self.remove(key)

    def _forget_loop_use(self, key: K) -> None:
        """Drop the last use as a loop key that :meth:`demote_all` remembers of ``key``."""
        self._loop_uses.pop(key, None)

    def remembered(self) -> list[K]:
        """The keys this policy remembers that are not resident (2Q's ghosts); none by default."""
        return []

    def _eviction_order(self, evictable: Callable[[K], bool], skip: Container[K] = ()) -> Iterator[tuple[K, int]]:
        """The resident keys with ``evictable(key)``, lazily, in the order this policy would evict
        them one after another, each with the tick of its last use, ignoring the loop block. Keys
        in ``skip`` (the block's) are left out but still count where the order depends on the keys
        given before (2Q's share of its first queue), as if given and passed over."""
        raise NotImplementedError(f"{type(self).__name__} implements neither _eviction_order nor victim")

    def _last_use(self, key: K) -> int:
        """The tick of ``key``'s last use (insert or touch); ``KeyError`` if it is not resident."""
        raise NotImplementedError(f"{type(self).__name__} must implement _last_use to take demote_all")

    def victim(self, evictable: Callable[[K], bool]) -> Optional[K]:
        """The key to evict next among those with ``evictable(key)``; ``None`` if there is none.

        Does not remove the key: the pager calls :meth:`remove` once it has moved the page.
        """
        chosen = self.victims(1, evictable)
        return chosen[0] if chosen else None

    def victims(self, count: int, evictable: Callable[[K], bool]) -> list[K]:
        """Up to ``count`` distinct keys to evict, in eviction order, each with ``evictable(key)``:
        the policy's own order, with the loop block (:meth:`demote_all`) after the stale keys.
        Does not remove them. (With a block, the keys of one call can differ from as many calls
        of :meth:`victim` and :meth:`remove`: the block's anchor moves as its keys leave. The
        pager takes its victims in one call.)"""
        if type(self)._eviction_order is EvictionPolicy._eviction_order:
            return self._victims_one_by_one(count, evictable)  # a policy written to implement victim()
        chosen: list[K] = []
        if count <= 0:
            return chosen
        loop = self._loop
        if not loop:
            order = self._eviction_order(evictable)
        else:
            # The block's keys are skipped by the order itself, where it can without asking
            # ``evictable`` (the order's front is full of them once a loop does not fit: asking
            # costs a pin count each).
            order = self._eviction_order(evictable, loop)
            anchor = self._pass_start if self._pass_start is not None else -1
            after = None
            for key, tick in order:  # the stale keys, before the block
                if tick >= anchor:
                    after = key
                    break
                chosen.append(key)
                if len(chosen) == count:
                    return chosen
            for key in loop:  # the block, the most recently used first
                if evictable(key):
                    chosen.append(key)
                    if len(chosen) == count:
                        return chosen
            if after is None:
                return chosen
            chosen.append(after)
            if len(chosen) == count:
                return chosen
        for key, _ in order:
            chosen.append(key)
            if len(chosen) == count:
                break
        return chosen

    def _victims_one_by_one(self, count: int, evictable: Callable[[K], bool]) -> list[K]:
        if type(self).victim is EvictionPolicy.victim:
            raise NotImplementedError(f"{type(self).__name__} implements neither _eviction_order nor victim")
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
