"""The tiers of the data plane: device memory, host memory, disk.

Device and host tiers are :class:`~pagedtensor.tiers.slab_pool.SlabPool` s (page slots carved from a
few large slabs); the disk tier keeps page slots in a file.
"""

from __future__ import annotations

from pagedtensor.tiers.device import DeviceTier
from pagedtensor.tiers.disk import DiskTier
from pagedtensor.tiers.host import HostTier
from pagedtensor.tiers.slab_pool import SlabPool

TIER_NAMES = ("device", "host", "disk")

__all__ = ["DeviceTier", "HostTier", "DiskTier", "SlabPool", "TIER_NAMES"]
