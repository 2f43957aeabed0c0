"""Helpers shared by test modules."""

from __future__ import annotations

import os
import threading
from typing import Callable

import pytest

CPU_AND_CUDA = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
"""``@pytest.mark.parametrize("device", CPU_AND_CUDA)``: a test on the CPU pager, and on a CUDA one (a ``gpu`` test)."""


class ClosedWhileWaiting:
    """Stands in for ``pager._lock``: entering it plays another thread that takes the lock first and
    closes the pager, then takes the real lock (put back on the pager) for the caller. Deterministic
    stand-in for a close() that lands while a call waits for the lock."""

    def __init__(self, pager: object) -> None:
        self.pager = pager
        self.lock = pager._lock

    def __enter__(self) -> None:
        self.pager._lock = self.lock
        self.pager.close()
        self.lock.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.lock.release()


def run_in_threads(worker: Callable[[int], None], count: int) -> list[BaseException]:
    """Run ``worker(i)`` for ``i`` in ``range(count)`` on as many threads; return what they raised."""
    errors: list[BaseException] = []

    def guarded(index: int) -> None:
        try:
            worker(index)
        except BaseException as error:  # noqa: BLE001 - handed back to the test
            errors.append(error)

    threads = [threading.Thread(target=guarded, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def exit_zero_if_paged_and_equal(tensor: object, expected: object) -> None:
    """A spawned process's target: exit 0 when ``tensor`` arrived a PagedTensor equal to ``expected``."""
    import sys

    import torch

    from pagedtensor import PagedTensor

    sys.exit(0 if isinstance(tensor, PagedTensor) and torch.equal(tensor.materialize().cpu(), expected.cpu()) else 3)


def shard_from_env(variable: str) -> slice:
    """The share of a list this process takes: all of it, or with ``variable=i/n`` in the environment
    every n-th item from the i-th (0-based), so n processes on one GPU share the work."""
    shard = os.environ.get(variable, "0/1")
    index, _, count = shard.partition("/")
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise ValueError(f"{variable} must be i/n with 0 <= i < n, got {shard!r}")
    return slice(int(index), None, int(count))


def collect_inside_first_eviction(pager, monkeypatch) -> list:
    """Make ``pager``'s first move of device pages to the host run a garbage collection first, as a
    collection may land anywhere inside a pager call (any allocation can start one). Returns a list
    that holds True once it ran."""
    import gc

    copy, collected = pager._copy_device_to_host, []

    def copy_after_a_collection(*args, **kwargs):
        if not collected:
            collected.append(True)
            gc.collect()
        return copy(*args, **kwargs)

    monkeypatch.setattr(pager, "_copy_device_to_host", copy_after_a_collection)
    return collected
