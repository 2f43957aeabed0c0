"""MemoryConfig: the budgets and policies of one pager, with size parsing and validation.

Sizes are ints (bytes) or strings with a unit. Decimal units count powers of ten and binary units
powers of two, as the SI and IEC define them:

    "512B", "4KB" = 4_000, "4KiB" = 4_096, "512MB" = 512 * 10**6, "512MiB" = 512 * 2**20,
    "24GB" = 24 * 10**9, "24GiB" = 24 * 2**30, "1TB", "1TiB".

Units are case-insensitive ("24gib" works); a bare number string ("4096") is bytes. Fractions are
allowed where the result is a whole number of bytes ("1.5GiB").
"""

from __future__ import annotations

import dataclasses
import decimal
import math
import numbers
import operator
import os
import re
from typing import Optional, Union

import torch

SizeLike = Union[int, str]
"""A size: an int of bytes (any integer type, e.g. ``numpy.int64``, but not bool) or a string with a unit."""

UNIT_BYTES: dict[str, int] = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
MIN_PAGE_SIZE = 4096
EVICTION_POLICIES = ("lru", "2q")
PREFETCH_STRATEGIES = ("none", "sequential")
COMPRESSIONS = (None, "zstd")

# Digits, an optional fraction, an optional exponent, an optional unit; neither the digit runs nor
# the runs of spaces can overlap (a failed match of a long string backtracks in linear time, not
# quadratic: the spaces before a unit belong to the unit's group, which is there only with a letter).
_SIZE_PATTERN = re.compile(r"^\s*(?P<number>(?:[0-9]+(?:\.[0-9]+)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)(?:\s*(?P<unit>[a-zA-Z]+))?\s*$")
MAX_SIZE = 2**63 - 1
"""The largest size in bytes (torch indexes memory with signed 64-bit ints)."""
# The arithmetic of parse_size, whatever decimal context the calling program has set: exact (any
# rounding traps) for numbers of up to a few hundred digits, and any exponent decimal can hold (one
# past it traps as InvalidOperation).
_EXACT = decimal.Context(
    prec=400, Emax=decimal.MAX_EMAX, Emin=decimal.MIN_EMIN, traps=[decimal.Inexact, decimal.Overflow, decimal.InvalidOperation]
)


def is_int(value: object) -> bool:
    """An integer of any type (``int``, ``numpy.int64``, ...) but not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def machine_memory_bytes() -> Optional[int]:
    """The machine's physical memory in bytes, or ``None`` where the system does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows), or the name is unknown
        return None


def parse_size(value: SizeLike, field: str = "size") -> int:
    """Return ``value`` in bytes; ``field`` names the setting in error messages.

    Raises:
        TypeError: ``value`` is neither an integer (``int``, ``numpy.int64``, ...) nor a str (bools
            are rejected too).
        ValueError: unknown unit, malformed number, negative, out of range, or not a whole number
            of bytes.
    """
    if not (is_int(value) or isinstance(value, str)):
        raise TypeError(f"{field}: expected an int or a size string like '24GiB', got {value!r}")
    if not isinstance(value, str):
        value = operator.index(value)  # a plain int from here on
        if value < 0:
            raise ValueError(f"{field}: size must not be negative, got {value!r}")
        if value > MAX_SIZE:
            raise ValueError(f"{field}: size {value!r} is larger than the largest size, 2**63 - 1 bytes")
        return value
    match = _SIZE_PATTERN.match(value)
    if match is None:
        magnitude = value.strip()[1:] if value.strip().startswith("-") else None
        negative = _SIZE_PATTERN.match(magnitude) if magnitude and not magnitude[0].isspace() else None  # "- 0" is no number
        if negative is not None:
            zero = set(negative.group("number").lower().split("e")[0]) <= {"0", "."}
            if zero and (negative.group("unit") or "b").lower() in UNIT_BYTES:
                return 0  # "-0", "-0KiB": zero, as int("-0") is
            raise ValueError(f"{field}: size must not be negative, got {value!r}")
        raise ValueError(f"{field}: cannot parse size {value!r}; use e.g. '512MB', '24GiB' or an int of bytes")
    unit = (match.group("unit") or "b").lower()
    if unit not in UNIT_BYTES:
        raise ValueError(
            f"{field}: unknown unit {match.group('unit')!r} in {value!r}; "
            f"known units: {', '.join(sorted(UNIT_BYTES, key=UNIT_BYTES.__getitem__))} (case-insensitive)"
        )
    try:  # no float rounding; an exponent past decimal's range is InvalidOperation, not a ValueError
        exact = _EXACT.multiply(_EXACT.create_decimal(match.group("number")), UNIT_BYTES[unit])
    except decimal.DecimalException:
        raise ValueError(f"{field}: size {value!r} has too many digits or an exponent out of range") from None
    if exact > MAX_SIZE:
        raise ValueError(f"{field}: size {value!r} is larger than the largest size, 2**63 - 1 bytes")
    if exact != exact.to_integral_value(context=_EXACT):
        raise ValueError(f"{field}: {value!r} is not a whole number of bytes")
    return int(exact)


def format_size(nbytes: int) -> str:
    """Human-readable binary size, e.g. ``format_size(3 * 2**30) == '3.00 GiB'``.

    Raises:
        TypeError: ``nbytes`` is not an integer (``int``, ``numpy.int64``, ...; bools are rejected).
        ValueError: ``nbytes`` is negative.
    """
    if not is_int(nbytes):
        raise TypeError(f"format_size: expected an int of bytes, got {nbytes!r}")
    nbytes = operator.index(nbytes)
    if nbytes < 0:
        raise ValueError(f"format_size: a size must not be negative, got {nbytes!r}")
    if nbytes < 2**10:
        return f"{nbytes} B"
    for unit, scale in (("KiB", 2**10), ("MiB", 2**20), ("GiB", 2**30)):
        if round(nbytes / scale, 2) < 1024:  # rounded as printed: 2**30 - 1 is 1.00 GiB, not 1024.00 MiB
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes / 2**40:.2f} TiB"


def default_device() -> torch.device:
    """``cuda`` (the current CUDA device) when one is available, else ``cpu``."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def normalize_device(device: torch.device) -> torch.device:
    """``device`` as a pager's device is: a CUDA device without an index is the current one, and a CPU
    device has no index (torch drops it: ``torch.zeros(1, device="cpu:0").device`` is ``cpu``)."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    if device.type == "cpu" and device.index is not None:
        return torch.device("cpu")
    return device


@dataclasses.dataclass(frozen=True)
class MemoryConfig:
    """Budgets and policies of one :class:`~pagedtensor.pager.Pager`.

    Attributes:
        vram_limit: bytes of device memory the pager may hold (its device-tier slabs).
        host_memory: bytes of (pinned, where CUDA exists) host memory the pager may hold.
        nvme_path: folder for the disk tier's page files (a leading ``~`` is the user's home, and
            the folder is created if missing); ``None`` means no disk tier.
        disk_limit: bytes the disk tier may hold (needs ``nvme_path``); ``None`` means only the
            file system limits it.
        page_size: bytes per page: a power of two, at least 4 KiB.
        eviction_policy: ``"lru"`` or ``"2q"``.
        prefetch_strategy: ``"none"`` or ``"sequential"`` (a fault also prefetches the pages that
            follow, ``prefetch_pages`` of them).
        prefetch_pages: how many pages ``"sequential"`` prefetches after a fault (at most as many as
            the device tier holds beside the faulted pages).
        compression: ``None`` or ``"zstd"`` (pages are compressed on the disk tier only).
        device: the device tier's device; default ``cuda`` if available, else ``cpu`` (the CPU then
            plays the device tier, so the whole pager runs on machines without a GPU).
        slab_size: bytes per slab that the device and host tiers grow by (rounded to pages).
        pin_wait_s: seconds a request for device pages may wait for pages other threads pin to be
            let go, when only their pins keep the device tier from holding it (``0``: never wait);
            then it raises :class:`~pagedtensor.errors.DeviceTierFullError`.

    Sizes accept ints or strings such as ``"24GB"`` (10**9) and ``"24GiB"`` (2**30). The instance
    holds normalized values: sizes as ints, ``device`` as a ``torch.device``.
    """

    vram_limit: SizeLike = "8GiB"
    host_memory: SizeLike = "16GiB"
    nvme_path: Optional[str] = None
    disk_limit: Optional[SizeLike] = None
    page_size: SizeLike = "2MiB"
    eviction_policy: str = "lru"
    prefetch_strategy: str = "sequential"
    prefetch_pages: int = 4
    compression: Optional[str] = None
    device: Union[str, torch.device, None] = None
    slab_size: SizeLike = "1GiB"
    pin_wait_s: float = 60.0

    def __post_init__(self) -> None:
        set_field = object.__setattr__  # frozen dataclass: normalize once, here
        for field in ("vram_limit", "host_memory", "page_size", "slab_size"):
            set_field(self, field, parse_size(getattr(self, field), field))
        if self.disk_limit is not None:
            set_field(self, "disk_limit", parse_size(self.disk_limit, "disk_limit"))
        for field in ("vram_limit", "host_memory", "slab_size") + (("disk_limit",) if self.disk_limit is not None else ()):
            if getattr(self, field) == 0:
                raise ValueError(f"{field}: budget must be greater than zero, got {getattr(self, field)!r}")
        page_size = self.page_size
        if page_size < MIN_PAGE_SIZE or page_size & (page_size - 1):
            raise ValueError(f"page_size: must be a power of two of at least 4 KiB (4096), got {page_size!r}")
        for field in ("vram_limit", "host_memory") + (("disk_limit",) if self.disk_limit is not None else ()):
            if getattr(self, field) < page_size:
                raise ValueError(f"{field}: budget {getattr(self, field)!r} is smaller than one page ({page_size} bytes)")
        if not isinstance(self.eviction_policy, str) or self.eviction_policy.lower() not in EVICTION_POLICIES:
            raise ValueError(f"eviction_policy: unknown policy {self.eviction_policy!r}; choose one of {EVICTION_POLICIES}")
        set_field(self, "eviction_policy", self.eviction_policy.lower())
        if not isinstance(self.prefetch_strategy, str) or self.prefetch_strategy.lower() not in PREFETCH_STRATEGIES:
            raise ValueError(
                f"prefetch_strategy: unknown strategy {self.prefetch_strategy!r}; choose one of {PREFETCH_STRATEGIES}"
            )
        set_field(self, "prefetch_strategy", self.prefetch_strategy.lower())
        if not is_int(self.prefetch_pages) or self.prefetch_pages < 0:
            raise ValueError(f"prefetch_pages: expected a non-negative int, got {self.prefetch_pages!r}")
        set_field(self, "prefetch_pages", operator.index(self.prefetch_pages))
        if self.compression not in COMPRESSIONS:
            raise ValueError(f"compression: unknown codec {self.compression!r}; choose one of {COMPRESSIONS}")
        if self.nvme_path is not None and not isinstance(self.nvme_path, (str, bytes)) and not hasattr(self.nvme_path, "__fspath__"):
            raise TypeError(f"nvme_path: expected a path or None, got {self.nvme_path!r}")
        if self.nvme_path is not None:

            path = os.path.expanduser(os.fsdecode(os.fspath(self.nvme_path)))
            if not path:
                raise ValueError("nvme_path: expected a folder path (or None for no disk tier), got ''")
            if "\0" in path:
                raise ValueError(f"nvme_path: a path cannot contain a NUL byte, got {path!r}")
            named = path.rstrip(os.sep) or os.sep  # "file/": os.path.exists says False (not a directory)
            if os.path.exists(named) and not os.path.isdir(named):
                raise ValueError(f"nvme_path: {path!r} exists and is not a directory")
            ancestor = os.path.dirname(os.path.abspath(path))
            while not os.path.exists(ancestor):
                ancestor = os.path.dirname(ancestor)
            if not os.path.isdir(ancestor):
                raise ValueError(f"nvme_path: cannot create {path!r}: {ancestor!r} is not a directory")
            set_field(self, "nvme_path", path)
        if self.compression is not None and self.nvme_path is None:
            raise ValueError(f"compression: {self.compression!r} applies to the disk tier, but nvme_path is None")
        if self.disk_limit is not None and self.nvme_path is None:
            raise ValueError(f"disk_limit: {self.disk_limit} bytes limits the disk tier, but nvme_path is None (no disk tier)")
        wait = self.pin_wait_s
        try:  # a finite int too large for a float (10**400) fails float() alone
            seconds = None if isinstance(wait, bool) or not isinstance(wait, numbers.Real) else float(wait)
        except OverflowError:
            seconds = None
        if seconds is None or not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"pin_wait_s: expected a non-negative number of seconds, got {wait!r}")
        set_field(self, "pin_wait_s", seconds)
        set_field(self, "device", _parse_device(self.device))
        # Slabs hold whole pages.
        set_field(self, "slab_size", max(page_size, self.slab_size - self.slab_size % page_size))

    @property
    def device_pages(self) -> int:
        """Pages the device tier may hold."""
        return self.vram_limit // self.page_size

    @property
    def host_pages(self) -> int:
        """Pages the host tier may hold."""
        return self.host_memory // self.page_size

    @property
    def disk_pages(self) -> Optional[int]:
        """Pages the disk tier may hold (``None``: unlimited)."""
        return None if self.disk_limit is None else self.disk_limit // self.page_size


def _parse_device(device: Union[str, torch.device, None]) -> torch.device:
    if device is None:
        return default_device()
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device: cannot parse {device!r}: {error}") from None
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"device: only 'cpu' and 'cuda' devices are supported, got {device!r}")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {device!r} requested but CUDA is not available on this machine")
        parsed = normalize_device(parsed)
        if parsed.index >= torch.cuda.device_count():
            raise ValueError(f"device: {device!r} does not exist; this machine has {torch.cuda.device_count()} CUDA devices")
    return normalize_device(parsed)


def check_memory_config(memory_config: object) -> None:
    """``memory_config`` is a :class:`MemoryConfig` or ``None``; else a ``TypeError`` naming what it is
    (checked before any work, e.g. before a model loads)."""
    if memory_config is not None and not isinstance(memory_config, MemoryConfig):
        raise TypeError(f"memory_config: expected a MemoryConfig (e.g. MemoryConfig(vram_limit='8GiB')), "
                        f"got {type(memory_config).__name__}")  # fmt: skip
