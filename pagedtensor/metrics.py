"""Pager counters, kept as plain ints and mirrored as Prometheus metrics in a registry per pager.

``PagerMetrics.count`` is the one place a counter changes, so ``Pager.stats()`` and a Prometheus
scrape of ``metrics.registry`` always agree. The pager counts per batch of pages, never per page.
"""

from __future__ import annotations

from typing import Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

COUNTER_HELP: dict[str, str] = {
    "faults": "Pages requested on the device tier that were not resident there",
    "hits": "Pages requested on the device tier that were already resident",
    "evictions": "Pages moved off the device tier to make room or by evict_all",
    "host_evictions": "Pages moved off the host tier to make room",
    "prefetched_pages": "Pages brought to the device tier by prefetch",
    "bytes_h2d": "Bytes copied host tier to device tier",
    "bytes_d2h": "Bytes copied device tier to host tier (write-back of dirty pages)",
    "bytes_to_disk": "Bytes written to the disk tier's files",
    "bytes_from_disk": "Bytes read from the disk tier's files",
}
TIERS = ("device", "host", "disk")


class PagerMetrics:
    """The counters of one pager and their Prometheus twins in ``registry``."""

    def __init__(self, registry: Optional[CollectorRegistry] = None, namespace: str = "pagedllm") -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.values: dict[str, int] = dict.fromkeys(COUNTER_HELP, 0)
        self._counters = {
            name: Counter(f"{namespace}_{name}", help_text, registry=self.registry) for name, help_text in COUNTER_HELP.items()
        }
        self._resident = Gauge(f"{namespace}_resident_bytes", "Bytes of pages held per tier", ["tier"], registry=self.registry)
        for tier in TIERS:
            self._resident.labels(tier=tier).set(0)

    def count(self, name: str, amount: int = 1) -> None:
        """Add ``amount`` to counter ``name``."""
        if amount:
            self.values[name] += amount
            self._counters[name].inc(amount)

    def set_resident(self, tier: str, nbytes: int) -> None:
        """Record that ``tier`` holds ``nbytes`` of pages now."""
        self._resident.labels(tier=tier).set(nbytes)

    def exposition(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)
