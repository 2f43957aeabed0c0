"""HostTier: page slots in host memory, pinned for DMA where CUDA exists.

Slabs are plain allocations registered with ``cudaHostRegister`` rather than ``pin_memory=True``
tensors: on the H100 host, ``torch.empty(n, pin_memory=True)`` costs 1.2–1.5 s per GiB and rounds
up to a power of two, while a plain allocation registered in place takes the exact size at about
3 GiB/s and copies at the same 51–54 GB/s. Every slab starts on a 4096-byte boundary, so each slot
is aligned for ``O_DIRECT`` disk I/O.

Making a slab is split in two, because ``cudaHostRegister`` holds up every other CUDA call of the
process while it runs (on the H200 host a copy issued beside the registration of a 4 GiB slab waited
the whole 0.66–1.25 s: results/host_slab_probe_bf37543_h200.json):

* :func:`populated_empty` allocates the slab, asks Linux for transparent huge pages and populates
  its pages (``MADV_POPULATE_WRITE``): no CUDA call, so it runs on a background thread. When the
  pool's grown slots run below half a slab, :class:`HostTier` starts making the next slab so.
* :meth:`HostTier._allocate` then only registers it, on the caller's thread, under the pager's lock.

On the H200 host a 4 GiB slab took 2.16 s to register as plain memory, and 0.59 s to populate with
huge pages plus 0.08 s to register after that (1 GiB: 0.61 s against 0.16 + 0.02 s).
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading
import time
import weakref
from typing import Optional

import torch

from pagedtensor.config import MemoryConfig
from pagedtensor.tiers.slab_pool import SlabPool

log = logging.getLogger(__name__)

HOST_ALIGNMENT = 4096
HUGE_PAGE_SIZE = 2 << 20
"""Linux's transparent huge page on x86-64 and (with 4 KiB base pages) arm64."""
_MADV_HUGEPAGE = 14
_MADV_POPULATE_WRITE = 23  # Linux 5.14 and later; older kernels answer EINVAL


def aligned_empty(nbytes: int, alignment: int = HOST_ALIGNMENT) -> torch.Tensor:
    """A CPU uint8 tensor of ``nbytes`` whose data starts on an ``alignment`` boundary.

    CPU tensors are only guaranteed 64-byte alignment: over-allocate and slice.
    """
    base = torch.empty(nbytes + alignment, dtype=torch.uint8, device="cpu")  # whatever the default device
    offset = (-base.data_ptr()) % alignment
    return base[offset : offset + nbytes]


def _madvise(tensor: torch.Tensor, advice: int) -> None:
    """Linux ``madvise(advice)`` over ``tensor``'s bytes, best effort (a refusal only costs speed).
    Through ctypes, which releases the GIL for the call."""
    if _libc is not None:
        _libc.madvise(tensor.data_ptr(), tensor.numel(), advice)


def _load_libc() -> Optional[ctypes.CDLL]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    except (OSError, AttributeError):
        return None
    return libc


_libc = _load_libc()


def populated_empty(nbytes: int) -> torch.Tensor:
    """:func:`aligned_empty` of ``nbytes`` with its pages already in memory: on Linux, slabs of a huge
    page or more start on a huge-page boundary and ask for transparent huge pages, then every page is
    populated. On the H200 host, registering such a slab with CUDA took 0.02–0.09 s for 1–4 GiB,
    against 0.5–2.2 s for one whose pages were never touched; writing to an unpinned one takes no
    page faults."""
    slab = aligned_empty(nbytes, HUGE_PAGE_SIZE if nbytes >= HUGE_PAGE_SIZE else HOST_ALIGNMENT)
    if nbytes >= HUGE_PAGE_SIZE:
        _madvise(slab, _MADV_HUGEPAGE)
    _madvise(slab, _MADV_POPULATE_WRITE)
    return slab


class SlabInProgress:
    """A slab of ``nbytes`` being made by :func:`populated_empty` on a daemon thread.

    Ordering: the thread sets ``_done`` after storing the slab (or the error), and :meth:`take`
    waits on it before reading them. The thread makes no CUDA call.
    """

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self._pid = os.getpid()
        self._done = threading.Event()
        self._slab: Optional[torch.Tensor] = None
        self._error: Optional[BaseException] = None
        threading.Thread(target=self._make, name="pagedllm-host-slab", daemon=True).start()

    def _make(self) -> None:
        start = time.perf_counter()
        try:
            self._slab = populated_empty(self.nbytes)
        except BaseException as error:  # MemoryError, RuntimeError: the caller makes the slab itself
            self._error = error
        finally:
            self._done.set()
        log.debug("host tier: made a slab of %d bytes in the background in %.3f s", self.nbytes, time.perf_counter() - start)

    def take(self) -> Optional[torch.Tensor]:
        """The slab, once made (waits for the thread); ``None`` when making it failed, or in a child
        process forked since it began (the thread did not come along)."""
        if os.getpid() != self._pid:
            return None
        self._done.wait()
        if self._error is not None:
            log.info("host tier: making a slab of %d bytes in the background failed (%s); trying again", self.nbytes, self._error)
        slab, self._slab = self._slab, None
        return slab


def _register(tensor: torch.Tensor) -> None:
    result = torch.cuda.cudart().cudaHostRegister(tensor.data_ptr(), tensor.numel(), 0)
    code = int(getattr(result, "value", result))
    if code != 0:
        raise RuntimeError(f"cudaHostRegister of {tensor.numel()} bytes failed with CUDA error {code}")


def _unregister(pointer: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(pointer)


class HostTier(SlabPool):
    """Slots in host memory; at most ``host_memory // page_size`` pages of slabs.

    Slabs are page-locked with ``cudaHostRegister`` when ``config.device`` is a CUDA device, so
    copies from and to them run asynchronously at full PCIe speed; otherwise they are plain memory.
    ``populate`` (default: when pinned, as page-locking populates every page anyway) makes each slab
    with :func:`populated_empty`, the next one on a background thread ahead of need; otherwise a
    slab is a plain allocation whose pages arrive when first written.
    """

    def __init__(self, config: MemoryConfig, populate: Optional[bool] = None) -> None:
        self.pinned = config.device.type == "cuda"
        self.populate = self.pinned if populate is None else populate
        self._registered: list[int] = []
        super().__init__(
            name="host",
            page_size=config.page_size,
            capacity_pages=config.host_pages,
            slab_pages=config.slab_size // config.page_size,
            allocate_slab=self._allocate,
            prepare_slab=self._prepare if self.populate else None,
        )
        self._next_slab: Optional[SlabInProgress] = None
        # The finalizer holds the slabs too, so their memory outlives its registration.
        self._pid = os.getpid()
        self._finalizer = weakref.finalize(self, HostTier._unregister_all, self._registered, self._pid, self.slabs)

    def _prepare(self, nbytes: int) -> None:
        """Start making the next slab, of ``nbytes``, on a background thread (one at a time)."""
        if self._next_slab is None:
            self._next_slab = SlabInProgress(nbytes)

    def _allocate(self, nbytes: int) -> torch.Tensor:
        """A slab of ``nbytes``: the one :meth:`_prepare` began when it has that size (waiting for it
        to be made), else one made now; registered here when pinned."""
        next_slab, self._next_slab = self._next_slab, None
        slab = next_slab.take() if next_slab is not None and next_slab.nbytes == nbytes else None
        if slab is None:
            slab = populated_empty(nbytes) if self.populate else aligned_empty(nbytes)
        if self.pinned:
            _register(slab)
            self._registered.append(slab.data_ptr())
            log.debug("host tier: registered a slab of %d bytes", nbytes)
        return slab

    @staticmethod
    def _unregister_all(pointers: list[int], pid: int, slabs: object = None) -> None:
        """Unregister the slabs at ``pointers`` with CUDA; in a forked child (not process ``pid``, the
        tier's maker's), which has no CUDA, only forget them (its memory is a copy the child frees)."""
        if os.getpid() != pid:
            pointers.clear()
            return
        while pointers:
            _unregister(pointers.pop())

    def close(self) -> None:
        """Unregister and drop every slab. Callers must have synchronized the copies that use them."""
        self._unregister_all(self._registered, self._pid)
        self._next_slab = None  # its thread finishes and drops it
        super().close()
