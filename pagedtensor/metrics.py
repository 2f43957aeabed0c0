"""Pager counters, kept as plain ints and read by Prometheus at scrape time.

``PagerMetrics.count`` is the one place a counter changes, so ``Pager.stats()`` and a Prometheus
scrape of ``metrics.registry`` always agree. The pager counts per batch of pages, never per page,
under its lock. A count is one dict update: the Prometheus families are built only when the
registry is collected (``PagerCollector``), so the fault-in path never takes the client's locks.
"""

from __future__ import annotations

import threading
from typing import Callable, Iterator, Optional

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

COUNTER_HELP: dict[str, str] = {
    "faults": "Pages requested on the device tier that were not resident there",
    "hits": "Pages requested on the device tier that were already resident",
    "evictions": "Pages that left the device tier to make room or by evict_all (copied to the host first only when dirty)",
    "host_evictions": "Pages that left the host tier to make room (written to disk first only when they had no other copy)",
    "prefetched_pages": "Pages brought to the device tier by prefetch",
    "bytes_h2d": "Bytes copied host tier to device tier",
    "bytes_d2h": "Bytes copied device tier to host tier (write-back of dirty pages)",
    "bytes_to_disk": "Bytes written to the disk tier's files",
    "bytes_from_disk": "Bytes read from the disk tier's files",
}
TIERS = ("device", "host", "disk")
RESIDENT_HELP = "Bytes of pages held per tier"

ResidentBytes = Callable[[], dict[str, int]]
"""Returns the bytes of pages each tier holds now (keys: ``TIERS``)."""


class PagerMetrics:
    """The counters of one pager, exposed in ``registry`` as ``<namespace>_<name>_total`` counters
    and a ``<namespace>_resident_bytes{tier=...}`` gauge read from ``resident_bytes`` at scrape time.

    Raises:
        ValueError: ``registry`` already holds metrics of these names (another pager's, say).
    """

    def __init__(
        self, registry: Optional[CollectorRegistry] = None, namespace: str = "pagedllm", resident_bytes: Optional[ResidentBytes] = None
    ) -> None:
        if registry is not None and (isinstance(registry, type)  # the class, not a registry: its methods are plain functions
                                     or not (callable(getattr(registry, "register", None)) and callable(getattr(registry, "unregister", None)))):  # fmt: skip
            got = f"the class {registry.__name__} (pass an instance)" if isinstance(registry, type) else type(registry).__name__
            raise TypeError(f"registry: expected a prometheus_client CollectorRegistry or None, got {got}")
        self.registry = registry if registry is not None else CollectorRegistry()
        self.values: dict[str, int] = dict.fromkeys(COUNTER_HELP, 0)
        self.namespace = namespace
        self._resident_bytes = resident_bytes if resident_bytes is not None else (lambda: dict.fromkeys(TIERS, 0))
        collector = PagerCollector(self)
        try:
            self.registry.register(collector)
        except ValueError as error:  # prometheus_client's DuplicateTimeseries lists every sample name
            raise ValueError(
                f"registry: already holds metrics named {namespace}_* (another pager's, not closed?); one registry holds "
                f"one pager's metrics: give each pager its own CollectorRegistry, or close the other pager first ({error})"
            ) from error
        self._collector: Optional[PagerCollector] = collector

    def close(self, wait: bool = True) -> None:
        """Take this pager's metrics out of the registry (a closed pager's names are free again).

        Args:
            wait: unregister now, waiting for a call of the registry on another thread (a scrape):
                :meth:`Pager.close`. False for the pager's finalizer, which a garbage collection may
                run on a thread inside a call of the registry (``register``, a scrape) holding its
                lock, which is not reentrant: ``unregister`` there would wait for ever. So where the
                lock is held then, a thread of its own unregisters once it is free (the names are
                free again a moment later, never while the registry's call is still running).
        """
        collector, self._collector = self._collector, None
        if collector is None:
            return
        lock = getattr(self.registry, "_lock", None)  # prometheus_client's CollectorRegistry's
        if wait or lock is None or not hasattr(lock, "acquire"):
            self.registry.unregister(collector)
            return
        if lock.acquire(blocking=False):
            lock.release()
            self.registry.unregister(collector)  # may wait for another thread's call, never on this thread
            return
        try:
            threading.Thread(target=_unregister, args=(self.registry, collector), name="pagedllm-metrics-unregister", daemon=True).start()
        except RuntimeError:  # no new threads at interpreter shutdown: the registry goes with it
            pass

    def count(self, name: str, amount: int = 1) -> None:
        """Add ``amount`` to counter ``name`` (the caller holds the pager's lock)."""
        self.values[name] += amount

    def resident_bytes(self) -> dict[str, int]:
        """Bytes of pages each tier holds now."""
        return self._resident_bytes()

    def exposition(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)


def _unregister(registry: CollectorRegistry, collector: "PagerCollector") -> None:
    """``registry.unregister(collector)``, on a thread of its own: waits for the registry's lock."""
    try:
        registry.unregister(collector)
    except KeyError:  # unregistered by someone else meanwhile
        pass


class PagerCollector:
    """A Prometheus collector that builds the families of one :class:`PagerMetrics` when scraped."""

    def __init__(self, metrics: PagerMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterator[Metric]:
        """The families without samples (the registry checks names against its other collectors)."""
        prefix = self.metrics.namespace
        for name, help_text in COUNTER_HELP.items():
            yield CounterMetricFamily(f"{prefix}_{name}", help_text)
        yield GaugeMetricFamily(f"{prefix}_resident_bytes", RESIDENT_HELP, labels=["tier"])

    def collect(self) -> Iterator[Metric]:
        prefix = self.metrics.namespace
        values = dict(self.metrics.values)  # one snapshot: counters never tear across families
        for name, help_text in COUNTER_HELP.items():
            yield CounterMetricFamily(f"{prefix}_{name}", help_text, value=values[name])
        resident = GaugeMetricFamily(f"{prefix}_resident_bytes", RESIDENT_HELP, labels=["tier"])
        for tier, nbytes in self.metrics.resident_bytes().items():
            resident.add_metric([tier], nbytes)
        yield resident
