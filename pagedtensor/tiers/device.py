"""DeviceTier: page slots in device memory, carved from slabs grown up to ``vram_limit``.

On a machine without CUDA the same code runs with CPU memory as the device tier, so every pager
path runs in CI.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from pagedtensor.config import MemoryConfig
from pagedtensor.tiers.slab_pool import SlabPool


class DeviceTier(SlabPool):
    """Slots in ``config.device`` memory; at most ``vram_limit // page_size`` pages of slabs.

    A slab is a ``torch.empty`` on the current stream: torch's caching allocator may hand it memory
    that kernels enqueued earlier on that stream still use (a block freed on a stream is reused on
    it at once). ``slab_grown`` (first slot, pages) is called right after, on the same stream, so
    the owner can fence the slab before another stream copies into it.
    """

    def __init__(self, config: MemoryConfig, slab_grown: Optional[Callable[[int, int], None]] = None) -> None:
        self.device = config.device
        super().__init__(
            name="device",
            page_size=config.page_size,
            capacity_pages=config.device_pages,
            slab_pages=config.slab_size // config.page_size,
            allocate_slab=self._allocate,
            slab_grown=slab_grown,
        )

    def _allocate(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)
