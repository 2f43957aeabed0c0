"""LRU and 2Q behind one interface: victims in the documented order; excluded keys never chosen."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pagedtensor.policies import LRUPolicy, TwoQPolicy, make_policy


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
