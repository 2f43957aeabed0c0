"""LRU and 2Q behind one interface: victims in the documented order; excluded keys never chosen."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pagedtensor.policies import DeferredTouches, LRUPolicy, TwoQPolicy, make_policy


def test_lru_evicts_least_recently_used():
    policy = LRUPolicy(4)
    for key in "abcd":
        policy.insert(key)
    policy.touch("a")
    assert policy.victim(lambda k: True) == "b"
    assert policy.victim(lambda k: k != "b") == "c"
    assert policy.victims(3, lambda k: k != "c") == ["b", "d", "a"]


def test_two_q_is_scan_resistant():
    policy = TwoQPolicy(8)  # a1in share 2, ghost share 4
    for key in "hot":
        policy.insert(key)
    for key in "hot":  # evicted once, remembered in a1out, so they come back hot
        policy.remove(key)
    for key in "hot":
        policy.insert(key)
    assert set(policy.am) == set("hot")
    for key in "scan":  # a one-pass scan fills a1in
        policy.insert(key)
    victims = policy.victims(4, lambda k: True)
    assert set(victims[:2]) <= set("scan"), f"a scan should be evicted before the hot set, got {victims}"


@pytest.mark.parametrize("name", ["lru", "2q"])
@given(ops=st.lists(st.tuples(st.sampled_from(["insert", "touch", "remove"]), st.integers(0, 9)), max_size=60), count=st.integers(0, 6), blocked=st.sets(st.integers(0, 9)))
def test_victims_respect_the_predicate_and_match_repeated_victim(name, ops, count, blocked):
    policy = make_policy(name, 8)
    resident: set[int] = set()
    for op, key in ops:
        if op == "insert" and key not in resident:
            policy.insert(key)
            resident.add(key)
        elif op == "touch" and key in resident:
            policy.touch(key)
        elif op == "remove" and key in resident:
            policy.remove(key)
            resident.discard(key)
    assert len(policy) == len(resident) and all(key in policy for key in resident)
    allowed = lambda key: key not in blocked  # noqa: E731
    victims = policy.victims(count, allowed)
    assert len(victims) == min(count, len(resident - blocked))
    assert len(set(victims)) == len(victims) and not set(victims) & blocked
    # The batched scan picks what one-at-a-time victim() + remove() would have picked.
    for expected in victims:
        assert policy.victim(allowed) == expected
        policy.remove(expected)


def test_unknown_policy_and_bad_capacity():
    with pytest.raises(ValueError, match="'fifo'"):
        make_policy("fifo", 4)
    with pytest.raises(ValueError, match="capacity"):
        LRUPolicy(0)


def test_double_insert_is_an_error():
    for policy in (LRUPolicy(2), TwoQPolicy(2)):
        policy.insert("x")
        with pytest.raises(KeyError):
            policy.insert("x")


@pytest.mark.parametrize("name", ["lru", "2q"])
@given(ops=st.lists(st.tuples(st.sampled_from(["insert", "touch_all", "remove"]), st.lists(st.integers(0, 9), max_size=6)), max_size=40))
def test_touch_all_equals_touching_each_key_in_order(name, ops):
    """The batched touch the pager uses for an op's pages leaves the same eviction order as one
    touch per key, and rejects a key that is not resident the same way."""
    batched, single = make_policy(name, 8), make_policy(name, 8)
    resident: set[int] = set()
    for op, keys in ops:
        if op == "insert":
            for key in keys:
                if key not in resident:
                    batched.insert(key), single.insert(key), resident.add(key)
        elif op == "remove":
            for key in keys:
                if key in resident:
                    batched.remove(key), single.remove(key), resident.discard(key)
        elif all(key in resident for key in keys):
            batched.touch_all(keys)
            for key in keys:
                single.touch(key)
        else:
            with pytest.raises(KeyError):
                batched.touch_all([key for key in keys if key not in resident][:1])
        assert batched.victims(10, lambda k: True) == single.victims(10, lambda k: True)


def _model_victims(own: list, block: list, anchor: int, evictable) -> list:
    """The eviction order with a loop block: ``own`` ((key, tick of last use) in the policy's own
    order, evictable keys only) outside the block up to its first key last used at ``anchor`` or
    later, then the block's evictable keys (the most recently used first), then the rest."""
    if not block:
        return [key for key, _ in own]
    outside = [(key, tick) for key, tick in own if key not in block]
    split = next((index for index, (_, tick) in enumerate(outside) if tick >= anchor), len(outside))
    return [key for key, _ in outside[:split]] + [key for key in block if evictable(key)] + [key for key, _ in outside[split:]]


@pytest.mark.parametrize("name", ["lru", "2q"])
@given(ops=st.lists(st.tuples(st.sampled_from(["insert", "touch_all", "demote_all", "end_loop", "remove", "forget"]),
                              st.lists(st.integers(0, 9), max_size=6)), max_size=40))  # fmt: skip
# A loop key evicted and brought back: its demote before the eviction is its use before, so key 1
# (last used before it) is stale and leaves before the block.
@example(ops=[("insert", [0, 1]), ("demote_all", [0]), ("remove", [0]), ("insert", [0]), ("demote_all", [0])])
def test_keys_used_in_a_loop_leave_as_a_block_after_the_stale_keys(name, ops):
    """``demote_all`` (keys used in a loop) touches the keys in the policy's own order and makes
    them a block that leaves the most recently used first, after the stale keys and before every
    other key. Stale: last used before the use before the last of the loop key demoted last (about
    a pass of the loop ago; a key's insert is no use before, and a key removed and inserted again
    since its last demote counts that demote as its use before). ``end_loop``, ``remove`` and
    ``forget`` take keys out of the block; ``end_loop`` and ``forget`` (not ``remove``) also drop
    the key's last demote. LRU is checked against a model of its order and use
    ticks (one tick an insert, one a touch call); 2Q against its own order and ticks, with the
    block placed by the same rule."""
    policy = make_policy(name, 8)
    clock = 0
    recency: dict[int, int] = {}  # LRU's order, least recent first -> tick of the last use
    inserted: dict[int, int] = {}  # key -> tick of its insert
    block: list[int] = []  # the loop block, the most recently used first
    demoted: dict[int, int] = {}  # key -> tick of its last demote, kept while it is removed
    anchor = -1
    evictable = lambda key: key % 4 != 3  # noqa: E731 - some keys pinned
    for op, keys in ops:
        if op == "insert":
            for key in keys:
                if key not in recency:
                    clock += 1
                    policy.insert(key)
                    recency[key] = inserted[key] = clock
        elif op in ("remove", "forget"):
            for key in keys:
                if key in recency:
                    getattr(policy, op)(key)
                    del recency[key], inserted[key]
                    if key in block:
                        block.remove(key)
                elif op == "forget":
                    policy.forget(key)  # not resident: what the policy remembers of it goes all the same
                if op == "forget":
                    demoted.pop(key, None)
        elif op == "end_loop":
            policy.end_loop(keys)
            block = [key for key in block if key not in keys]
            for key in keys:
                demoted.pop(key, None)
        elif not all(key in recency for key in keys):
            with pytest.raises(KeyError):
                getattr(policy, op)([key for key in keys if key not in recency][:1])
            clock += op == "touch_all"  # a touch call takes its tick before it finds the key missing
        else:
            previous = {key: recency[key] for key in keys}
            before = {key: previous[key] if previous[key] != inserted[key] else demoted.get(key) for key in keys}
            getattr(policy, op)(keys)
            clock += 1
            for key in keys:
                if op == "demote_all":
                    if before[key] is not None:
                        anchor = before[key]
                    demoted[key] = clock
                    if key in block:
                        block.remove(key)
                    block.insert(0, key)
                del recency[key]
                recency[key] = clock
        assert len(policy) == len(recency)
        own = [(key, tick) for key, tick in recency.items() if evictable(key)] if name == "lru" else list(policy._eviction_order(evictable))
        expected = _model_victims(own, block, anchor, evictable)
        assert policy.victims(10, evictable) == expected
        assert policy.victim(evictable) == (expected or [None])[0]
        if name == "lru":
            assert policy.order() == list(recency)


RUNS = [(0, 1, 2), (2, 3), (4,), (1, 5, 6, 7), (8, 9), (3, 0)]


@pytest.mark.parametrize("name", ["lru", "2q"])
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("insert"), st.integers(0, 9)),
            st.tuples(st.just("remove"), st.integers(0, 9)),
            st.tuples(st.just("forget"), st.integers(0, 9)),
            st.tuples(st.just("touch_run"), st.integers(0, len(RUNS) - 1)),
            st.tuples(st.just("touch_run"), st.integers(0, len(RUNS) - 1)),  # likelier: runs between flushes
            st.tuples(st.just("touch_run"), st.integers(0, len(RUNS) - 1)),
            st.tuples(st.just("demote_all"), st.integers(0, len(RUNS) - 1)),
            st.tuples(st.just("touch"), st.integers(0, 9)),
            st.tuples(st.just("victims"), st.integers(1, 10)),
        ),
        max_size=60,
    ),
    max_pending=st.integers(1, 4),
)
@settings(max_examples=300)
def test_deferred_touches_give_the_eager_order(name, ops, max_pending):
    """Runs recorded by ``touch_run`` (deduplicated by run id, applied before any other call, a
    ``demote_all`` included) leave exactly the victims and order of touching every key at once,
    whatever falls between them."""
    lazy, eager = DeferredTouches(make_policy(name, 8), max_pending), make_policy(name, 8)
    for key in range(10):
        lazy.insert(key), eager.insert(key)
    resident = set(range(10))
    for op, arg in ops:
        if op == "insert" and arg not in resident:
            lazy.insert(arg), eager.insert(arg), resident.add(arg)
        elif op in ("remove", "forget") and arg in resident:
            getattr(lazy, op)(arg), getattr(eager, op)(arg), resident.discard(arg)
        elif op == "touch_run" and resident.issuperset(RUNS[arg]):
            lazy.touch_run(("run", arg), list(RUNS[arg]))
            eager.touch_all(RUNS[arg])
        elif op == "demote_all" and resident.issuperset(RUNS[arg]):  # applied at once, after the pending runs
            lazy.demote_all(list(RUNS[arg]))
            eager.demote_all(RUNS[arg])
        elif op == "touch" and arg in resident:
            lazy.touch(arg), eager.touch(arg)
        elif op == "victims":
            assert lazy.victims(arg, lambda k: k % 3 != 0) == eager.victims(arg, lambda k: k % 3 != 0)
        assert len(lazy) == len(eager) and all((key in lazy) == (key in eager) for key in range(10))
        assert len(lazy._pending) <= max_pending
    assert lazy.victims(10, lambda k: True) == eager.victims(10, lambda k: True)
    if name == "lru":
        assert lazy.order() == eager.order()


def test_deferred_touches_record_a_repeated_run_once():
    """The same op on the same pages again replaces its record: the pending work stays one run."""
    lazy = DeferredTouches(make_policy("lru", 4))
    for key in "abcd":
        lazy.insert(key)
    for _ in range(1000):
        lazy.touch_run("ab", ["a", "b"])
        lazy.touch_run("c", ["c"])
    assert list(lazy._pending) == ["ab", "c"]
    assert lazy.order() == ["d", "a", "b", "c"] and not lazy._pending
    with pytest.raises(ValueError, match="max_pending_runs.*0"):
        DeferredTouches(make_policy("lru", 4), 0)


def test_a_policy_written_to_implement_victim_still_gives_victims():
    """A policy subclass that implements ``victim`` (and not ``_eviction_order``) still answers
    ``victims`` by asking ``victim`` repeatedly; one that implements neither says so."""
    from pagedtensor.policies import EvictionPolicy

    class Fifo(EvictionPolicy):
        def __init__(self, capacity):
            super().__init__(capacity)
            self.keys = []

        def insert(self, key):
            self.keys.append(key)

        def touch(self, key):
            pass

        def remove(self, key):
            self.keys.remove(key)

        def victim(self, evictable):
            return next((key for key in self.keys if evictable(key)), None)

        def __contains__(self, key):
            return key in self.keys

        def __len__(self):
            return len(self.keys)

    fifo = Fifo(4)
    for key in "abcd":
        fifo.insert(key)
    assert fifo.victims(3, lambda key: key != "b") == ["a", "c", "d"]

    class Nothing(Fifo):
        victim = EvictionPolicy.victim

    with pytest.raises(NotImplementedError, match="Nothing implements neither _eviction_order nor victim"):
        Nothing(4).victims(1, lambda key: True)


def test_two_q_counts_the_loop_blocks_keys_in_its_first_queues_share():
    """2Q takes its first queue (a1in) first only while a1in holds more than its share, counting the
    keys already given: the loop block's keys taken from a1in count too, so once the block has left
    a1in under its share the next victim comes from am, as repeated victim() and remove() give."""
    policy = TwoQPolicy(8)  # a1in's share: 2
    policy.insert("M")
    policy.remove("M")
    policy.insert("M")  # back from a1out: in am
    for key in ("L1", "L2", "L3", "A"):
        policy.insert(key)  # a1in: L1 L2 L3 A, over its share
    policy.demote_all(["L1", "L2", "L3"])
    assert policy.victims(5, lambda key: True) == ["L3", "L2", "L1", "M", "A"]
    one_by_one = []
    while len(policy):
        one_by_one.append(policy.victim(lambda key: True))
        policy.remove(one_by_one[-1])
    assert one_by_one == ["L3", "L2", "L1", "M", "A"]


@pytest.mark.parametrize("name", ["lru", "2q"])
def test_forget_drops_a_resident_or_remembered_key_and_ignores_an_unknown_one(name):
    policy = make_policy(name, 8)
    for key in "abc":
        policy.insert(key)
    policy.remove("a")  # evicted: 2Q remembers it
    policy.forget("a")
    policy.forget("b")  # resident
    policy.forget("z")  # never seen
    assert "b" not in policy and len(policy) == 1 and policy.remembered() == []
    policy.insert("a")  # back as a page never seen: 2Q's first queue, not its hot one
    assert getattr(policy, "am", {}) == {}


@pytest.mark.parametrize("how", ["free", "discard"])
def test_a_freed_or_discarded_page_leaves_no_ghost_in_two_q(how):
    """2Q remembers evicted pages (``a1out``) so that one coming back counts as hot. A page freed or
    discarded while off the device must be forgotten: kept, the dead key pushed a live one out of
    ``a1out`` (a reused page then fell to a scan), and a discarded page written again came back hot."""
    import torch

    from pagedtensor import MemoryConfig, Pager

    page = 4096
    pager = Pager(MemoryConfig(page_size=page, vram_limit=4 * page, host_memory=64 * page, slab_size=64 * page,
                               prefetch_strategy="none", eviction_policy="2q", device="cpu"))  # fmt: skip
    names = ["d1", "d2", "x", "a", "c", "s1", "s2", "s3", "s4"]
    allocations = {name: pager.allocate(page) for name in names}
    for allocation in allocations.values():
        pager.write(allocation, torch.ones(page, dtype=torch.uint8))
    pager.evict_all()

    def use(name):
        with pager.ensure_resident(allocations[name], 0, 1):
            pass

    for name in ["d1", "d2", "x", "a"]:  # each used, then evicted: a1out holds x and a (its limit 2)
        use(name)
        pager.evict(allocations[name])
    getattr(pager, how)(allocations["a"])
    dead = allocations["a"].pages[0]
    assert dead not in pager.device_policy.remembered() and dead not in pager.host_policy.remembered()
    use("c")
    pager.evict(allocations["c"])  # a1out: x and c
    use("x")  # remembered: comes back hot
    for name in ["s1", "s2", "s3", "s4"]:  # a scan of pages used once
        use(name)
    assert pager.page_table(allocations["x"])[0].tier == "device", "the reused page fell to a scan"
    if how == "discard":
        pager.write(allocations["a"], torch.ones(page, dtype=torch.uint8))
        assert dead in pager.device_policy.policy.a1in, "a discarded page written again came back hot"
    pager.close()


def _loop_beside_stale_faults(policy: str, loop_pages: int, device_pages: int, stale_pages: int, warm_passes: int,
                              advise_first: bool, passes: int) -> tuple[list[int], list[int], int]:  # fmt: skip
    """A real pager (CPU tiers, no prefetch): ``loop_pages`` one-page allocations advised "loop" (before
    or after they are written), used ``warm_passes`` times, then ``stale_pages`` one-page allocations
    written once and never used again; then ``passes`` passes over the loop. The faults of each warm
    pass and of each pass after the stale writes, and how many stale pages are still on the device."""
    import torch

    from pagedtensor import MemoryConfig, Pager

    page = 4096
    pager = Pager(MemoryConfig(page_size=page, vram_limit=device_pages * page, host_memory=256 * page, slab_size=256 * page,
                               prefetch_strategy="none", eviction_policy=policy, device="cpu"))  # fmt: skip
    loop = [pager.allocate(page) for _ in range(loop_pages)]
    for index, allocation in enumerate(loop):
        if advise_first:
            pager.advise(allocation, "loop")
        pager.write(allocation, torch.full((page,), index, dtype=torch.uint8))
    if not advise_first:
        for allocation in loop:
            pager.advise(allocation, "loop")

    def one_pass() -> int:
        before = pager.stats()["faults"]
        for allocation in loop:
            with pager.ensure_resident(allocation):
                pass
        return pager.stats()["faults"] - before

    warm = [one_pass() for _ in range(warm_passes)]
    stale = [pager.allocate(page) for _ in range(stale_pages)]
    for allocation in stale:
        pager.write(allocation, torch.full((page,), 200, dtype=torch.uint8))
    faults = [one_pass() for _ in range(passes)]
    stale_left = sum(pager.page_table(allocation)[0].tier == "device" for allocation in stale)
    for index, allocation in enumerate(loop):
        assert torch.equal(pager.read(allocation), torch.full((page,), index, dtype=torch.uint8))
    pager.close()
    return warm, faults, stale_left


@pytest.mark.parametrize("policy", ["lru", "2q"])
@pytest.mark.parametrize("warm_passes", [0, 2])
def test_a_loop_that_fits_stops_faulting_when_stale_pages_filled_the_tier_after_it(policy, warm_passes):
    """Four one-page allocations advised "loop" on an eight-page device tier, then eight pages written
    once and never used again, which push the loop out. By recency the loop faults once and then stays
    resident. Advised, a faulted loop page's use before (a pass ago, before it was evicted) must count
    too: when only a resident loop page's did, no loop page was ever found used a pass ago, no page
    ever counted as stale, and each faulted loop page evicted the one used just before it: 4 faults
    every pass, forever, while 7 stale pages kept their slots."""
    _, faults, stale_left = _loop_beside_stale_faults(policy, 4, 8, 8, warm_passes, True, 5)
    assert faults[2:] == [0, 0, 0], faults
    assert stale_left == 4


@pytest.mark.parametrize("policy", ["lru", "2q"])
@given(loop_pages=st.integers(1, 6), spare=st.integers(0, 4), stale_pages=st.integers(0, 20), warm_passes=st.integers(0, 2),
       advise_first=st.booleans())  # fmt: skip
@settings(max_examples=40, deadline=None)
def test_a_loop_that_fits_beside_any_number_of_stale_pages_stops_faulting(policy, loop_pages, spare, stale_pages, warm_passes, advise_first):
    """A loop of L one-page allocations on a device tier of L pages or more, beside any number
    of pages written once and never used again after the loop's writes and passes: it faults in at
    most its first two passes after them, then never again (as by recency)."""
    _, faults, _ = _loop_beside_stale_faults(policy, loop_pages, loop_pages + spare, stale_pages, warm_passes, advise_first, 5)
    assert faults[2:] == [0, 0, 0], faults
