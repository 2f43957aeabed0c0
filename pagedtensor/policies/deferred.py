"""Deferred touches: an op's batched touch costs O(1) until the policy's order is next needed."""

from __future__ import annotations

from typing import Callable, Container, Hashable, Iterable, Iterator, Optional, Sequence

from pagedtensor.policies.base import EvictionPolicy, K

MAX_PENDING_RUNS = 64


class DeferredTouches(EvictionPolicy[K]):
    """Wraps a policy; :meth:`touch_run` records a run of touches instead of applying it.

    Recorded runs are applied to the wrapped policy, oldest first, before any other call reaches
    it, so every answer (victims, order) is exactly the one eager touches give. A run recorded
    again under the same ``run_id`` replaces its earlier record: only a key's last touch decides
    its place in the order (between two flushes no key arrives or leaves, so the earlier touches
    of those keys are overtaken). An op repeated on the same pages therefore costs one dict update
    instead of one policy step per page, while the pages stay resident.

    At most ``max_pending_runs`` runs wait; recording one more applies them all.
    """

    def __init__(self, policy: EvictionPolicy[K], max_pending_runs: int = MAX_PENDING_RUNS) -> None:
        super().__init__(policy.capacity)
        if isinstance(max_pending_runs, bool) or not isinstance(max_pending_runs, int) or max_pending_runs < 1:
            raise ValueError(f"max_pending_runs: expected a positive int, got {max_pending_runs!r}")
        self.policy = policy
        self.max_pending_runs = max_pending_runs
        self._pending: dict[Hashable, Sequence[K]] = {}

    def touch_run(self, run_id: Hashable, keys: Sequence[K]) -> None:
        """``keys`` (all resident) were used in that order. ``run_id`` names this exact sequence:
        the same id must always come with the same keys (a key not resident raises ``KeyError``
        when the run is applied)."""
        if self._pending.pop(run_id, None) is None and len(self._pending) >= self.max_pending_runs:
            self.flush()
        self._pending[run_id] = keys

    def flush(self) -> None:
        """Apply the recorded runs to the wrapped policy, oldest first."""
        pending, self._pending = self._pending, {}
        touch_all = self.policy.touch_all
        for keys in pending.values():
            touch_all(keys)

    def _applied(self) -> EvictionPolicy[K]:
        """The wrapped policy with every recorded run applied (what any other call must see)."""
        if self._pending:
            self.flush()
        return self.policy

    def insert(self, key: K) -> None:
        self._applied().insert(key)

    def touch(self, key: K) -> None:
        self._applied().touch(key)

    def touch_all(self, keys: Iterable[K]) -> None:
        self._applied().touch_all(keys)

    def demote_all(self, keys: Iterable[K]) -> None:
        """Applied at once, after the recorded runs (a demote records the key's use before this
        one, which a deferred touch would have moved)."""
        self._applied().demote_all(keys)

    def end_loop(self, keys: Iterable[K]) -> None:
        self._applied().end_loop(keys)

    def _eviction_order(self, evictable: Callable[[K], bool], skip: Container[K] = ()) -> Iterator[tuple[K, int]]:
        return self._applied()._eviction_order(evictable, skip)

    def _last_use(self, key: K) -> int:
        return self._applied()._last_use(key)

    def remove(self, key: K) -> None:
        self._applied().remove(key)

    def forget(self, key: K) -> None:
        self._applied().forget(key)

    def remembered(self) -> list[K]:
        return self.policy.remembered()  # touches never change what is remembered

    def victim(self, evictable: Callable[[K], bool]) -> Optional[K]:
        return self._applied().victim(evictable)

    def victims(self, count: int, evictable: Callable[[K], bool]) -> list[K]:
        return self._applied().victims(count, evictable)

    def order(self) -> list[K]:
        """The wrapped policy's eviction order, with every recorded run applied."""
        return self._applied().order()  # type: ignore[attr-defined] - the policies that have one

    def __contains__(self, key: object) -> bool:  # touches never change who is resident
        return key in self.policy

    def __len__(self) -> int:
        return len(self.policy)
