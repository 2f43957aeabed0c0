"""Eviction policies: which resident page leaves a tier first.

Policies are generic over the key type and know nothing about tiers or bytes. The pager tells a
policy when a key arrives (``insert``), is used (``touch``) and leaves (``remove``), and asks for a
``victim`` among the keys a predicate allows (pinned pages are never allowed).
"""

from __future__ import annotations

from pagedtensor.policies.base import EvictionPolicy
from pagedtensor.policies.deferred import DeferredTouches
from pagedtensor.policies.lru import LRUPolicy
from pagedtensor.policies.two_q import TwoQPolicy

POLICIES: dict[str, type[EvictionPolicy]] = {"lru": LRUPolicy, "2q": TwoQPolicy}


def make_policy(name: str, capacity: int) -> EvictionPolicy:
    """The policy called ``name`` (``"lru"`` or ``"2q"``) for a tier of ``capacity`` pages."""
    try:
        policy_class = POLICIES[name]
    except KeyError:
        raise ValueError(f"eviction_policy: unknown policy {name!r}; choose one of {tuple(POLICIES)}") from None
    return policy_class(capacity)


__all__ = ["DeferredTouches", "EvictionPolicy", "LRUPolicy", "TwoQPolicy", "POLICIES", "make_policy"]
