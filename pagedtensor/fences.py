"""Device-slot fences: what a copy into a device slot must wait for.

Each use of a device slot (an op reading or writing a pinned page, a copy out of it) ends with an
event recorded on the stream that used it; a later copy into the slot waits on that event, on the
GPU. Events recorded on one stream complete in the order they were recorded, so for each stream
only the newest fence of a slot matters. A new slab starts fenced too, behind an event on the
stream that allocated it (the caching allocator may have handed it memory that stream's queued
kernels still use).

An op on a resident range of adjacent slots (the common case) records one fence for the whole run
in O(1), not one per slot; :meth:`SlotFences.take` finds the runs a set of slots falls in. A run
whose slots are taken only in part hands its fence to its other slots, one by one, so they stay
fenced. Run fences are keyed by ``(first slot, count)``: an op on the same range again replaces its
fence, and past :data:`SlotFences.MAX_RUNS` distinct runs on a stream they are folded into per-slot
fences, so memory stays bounded by the number of slots.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from typing import Any

Fence = tuple[int, Any]  # (sequence number: larger is newer, event)


class SlotFences:
    """Per stream, the newest event after which each device slot may be overwritten.

    Streams are keyed by id (any int; the pager uses negative ids for its own copies). Events are
    stored and handed back, never called. Not thread-safe: the pager calls it under its lock.
    """

    MAX_RUNS = 64  # run fences kept per stream before they are folded into per-slot fences

    def __init__(self) -> None:
        self._sequence = itertools.count()
        self._slots: dict[int, dict[int, Fence]] = {}  # stream -> slot -> fence
        self._runs: dict[int, dict[tuple[int, int], Fence]] = {}  # stream -> (first slot, count) -> fence

    def record_run(self, stream_id: int, first: int, count: int, event: Any) -> None:
        """Fence slots ``[first, first + count)`` behind ``event`` (recorded on ``stream_id`` after their use)."""
        if count <= 0:
            return
        runs = self._runs.get(stream_id)
        if runs is None:
            runs = self._runs[stream_id] = {}
        runs[(first, count)] = (next(self._sequence), event)
        if len(runs) > self.MAX_RUNS:
            del self._runs[stream_id]
            for (run_first, run_count), fence in runs.items():
                self._keep_newest(stream_id, range(run_first, run_first + run_count), fence)

    def record_slots(self, stream_id: int, slots: Iterable[int], event: Any) -> None:
        """Fence each of ``slots`` behind ``event`` (recorded on ``stream_id`` after their use)."""
        fences = self._slots.get(stream_id)
        if fences is None:
            fences = self._slots[stream_id] = {}
        fences.update(dict.fromkeys(slots, (next(self._sequence), event)))

    def take(self, slots: Sequence[int]) -> list[Any]:
        """Remove and return the fences of ``slots`` (every stream's), before a copy into them.

        Returns every event that is the newest fence of one of ``slots`` on some stream (and perhaps
        older ones of the same stream, which complete first). The slots of a run not in ``slots``
        keep its fence."""
        events: list[Any] = []
        if not slots:
            return events
        for stream_id, fences in list(self._slots.items()):
            for slot in slots:
                fence = fences.pop(slot, None)
                if fence is not None:
                    events.append(fence[1])
            if not fences:
                del self._slots[stream_id]
        if self._runs:
            wanted = set(slots)
            low, high = min(wanted), max(wanted)
            for stream_id, runs in list(self._runs.items()):
                hit = [(first, count) for first, count in runs
                       if first <= high and low < first + count and any(first <= slot < first + count for slot in wanted)]  # fmt: skip
                for first, count in hit:
                    fence = runs.pop((first, count))
                    events.append(fence[1])
                    self._keep_newest(stream_id, (slot for slot in range(first, first + count) if slot not in wanted), fence)
                if not runs:
                    del self._runs[stream_id]
        return events

    def take_all(self) -> list[Any]:
        """Remove and return every fence's event (each event once)."""
        fences = [fence for per_stream in self._slots.values() for fence in per_stream.values()]
        fences += [fence for runs in self._runs.values() for fence in runs.values()]
        self._slots.clear()
        self._runs.clear()
        return list({id(event): event for _, event in fences}.values())

    def __len__(self) -> int:
        """Fences held: per-slot ones plus run ones."""
        return sum(map(len, self._slots.values())) + sum(map(len, self._runs.values()))

    def _keep_newest(self, stream_id: int, slots: Iterable[int], fence: Fence) -> None:
        """Fence each of ``slots`` on ``stream_id`` per slot with ``fence`` unless a newer per-slot fence is there."""
        fences = self._slots.get(stream_id)
        for slot in slots:
            if fences is None:
                fences = self._slots[stream_id] = {}
            current = fences.get(slot)
            if current is None or current[0] < fence[0]:
                fences[slot] = fence
