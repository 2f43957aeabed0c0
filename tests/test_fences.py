"""SlotFences: a copy into a device slot gets the newest fence of that slot on every stream.

The store holds events and hands them back without calling them, so plain objects stand for CUDA
events here; the GPU test of the pager (tests/test_pager_gpu.py) covers real events."""

from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from pagedtensor.fences import SlotFences

SLOTS = 24
STREAMS = st.sampled_from([0, 1, 7, -1, -2])
SLOT_SETS = st.lists(st.integers(0, SLOTS - 1), min_size=1, max_size=8, unique=True)


class SlotFencesMachine(RuleBasedStateMachine):
    """Against a model that keeps, per (stream, slot), the newest event recorded for it."""

    def __init__(self) -> None:
        super().__init__()
        self.fences = SlotFences()
        self.fences.MAX_RUNS = 3  # fold often
        self.newest: dict[tuple[int, int], object] = {}
        self.events: list[object] = []  # every event recorded, kept alive so that ids stay unique
        self.recorded: set[int] = set()

    def _event(self) -> object:
        event = object()
        self.events.append(event)
        self.recorded.add(id(event))
        return event

    @rule(stream=STREAMS, first=st.integers(0, SLOTS - 1), count=st.integers(1, 8))
    def record_run(self, stream: int, first: int, count: int) -> None:
        count = min(count, SLOTS - first)
        event = self._event()
        self.fences.record_run(stream, first, count, event)
        for slot in range(first, first + count):
            self.newest[(stream, slot)] = event

    @rule(stream=STREAMS, slots=SLOT_SETS)
    def record_slots(self, stream: int, slots: list[int]) -> None:
        event = self._event()
        self.fences.record_slots(stream, slots, event)
        for slot in slots:
            self.newest[(stream, slot)] = event

    @rule(slots=SLOT_SETS)
    def take(self, slots: list[int]) -> None:
        got = self.fences.take(slots)
        got_ids = {id(event) for event in got}
        assert got_ids <= self.recorded, "take returned an event nobody recorded"
        for (stream, slot), event in list(self.newest.items()):
            if slot in slots:
                assert id(event) in got_ids, f"slot {slot} lost its newest fence on stream {stream}"
                del self.newest[(stream, slot)]

    @rule()
    def take_all(self) -> None:
        got = self.fences.take_all()
        got_ids = [id(event) for event in got]
        assert len(got_ids) == len(set(got_ids)), "take_all returned an event twice"
        assert set(got_ids) <= self.recorded, "take_all returned an event nobody recorded"
        assert {id(event) for event in self.newest.values()} <= set(got_ids), "take_all lost a newest fence"
        assert len(self.fences) == 0 and self.fences.take(list(range(SLOTS))) == []
        self.newest.clear()

    @rule()
    def take_nothing(self) -> None:
        assert self.fences.take([]) == []

    @invariant()
    def untaken_fences_stay_and_memory_is_bounded(self) -> None:
        streams = 5
        assert len(self.fences) <= SLOTS * streams + self.fences.MAX_RUNS * streams
        if not self.newest:
            return
        # A dry check that every remaining newest fence is still held: take from a copy.
        probe = SlotFences()
        probe._slots = {stream: dict(fences) for stream, fences in self.fences._slots.items()}
        probe._runs = {stream: dict(runs) for stream, runs in self.fences._runs.items()}
        held = {id(event) for event in probe.take(sorted({slot for _, slot in self.newest}))}
        assert all(id(event) in held for event in self.newest.values())


TestSlotFences = SlotFencesMachine.TestCase
TestSlotFences.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)


def test_a_run_taken_in_part_keeps_fencing_its_other_slots():
    fences = SlotFences()
    read = object()
    fences.record_run(3, 10, 8, read)  # slots 10..17
    assert fences.take([12, 13]) == [read]
    assert fences.take([17]) == [read], "the run's untaken slots keep its fence"
    assert fences.take([12]) == [], "a taken slot has no fence left"
    later = object()
    fences.record_slots(3, [11], later)
    assert fences.take([11]) == [later], "a newer fence of the same stream replaces the run's"


def test_the_same_range_again_replaces_its_run_fence():
    fences = SlotFences()
    for _ in range(1000):
        fences.record_run(0, 0, 128, object())
    assert len(fences) == 1
