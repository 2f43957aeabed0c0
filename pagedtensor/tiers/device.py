"""DeviceTier: page slots in device memory, carved from slabs grown up to ``vram_limit``.

On a machine without CUDA the same code runs with CPU memory as the device tier, so every pager
path runs in CI.
"""

from __future__ import annotations

import torch

from pagedtensor.config import MemoryConfig
from pagedtensor.tiers.slab_pool import SlabPool


class DeviceTier(SlabPool):
    """Slots in ``config.device`` memory; at most ``vram_limit // page_size`` pages of slabs."""

    def __init__(self, config: MemoryConfig) -> None:
        self.device = config.device
        super().__init__(
            name="device",
            page_size=config.page_size,
            capacity_pages=config.device_pages,
            slab_pages=config.slab_size // config.page_size,
            allocate_slab=self._allocate,
        )

    def _allocate(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)
