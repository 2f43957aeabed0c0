"""Plain-text reports of a pager's counters, for the ``pagedllm`` commands."""

from __future__ import annotations

from typing import Iterable, TextIO

from pagedtensor.config import format_size

Row = tuple[str, str, str]


def traffic_rows(stats: dict, disk_engine: str = "") -> list[Row]:
    """Faults, evictions and bytes moved between each pair of tiers, from ``Pager.stats()``."""
    return [
        ("faults", str(stats["faults"]), f"hits {stats['hits']}, prefetched {stats['prefetched_pages']}"),
        # Pages that left a tier: a page with no copy below is copied down first (the bytes rows).
        ("pages evicted from device", str(stats["evictions"]), f"from host {stats['host_evictions']}"),
        ("bytes host→device", format_size(stats["bytes_h2d"]), ""),
        ("bytes device→host", format_size(stats["bytes_d2h"]), ""),
        ("bytes host→disk", format_size(stats["bytes_to_disk"]), f"disk engine: {disk_engine}" if disk_engine else ""),
        ("bytes disk→host", format_size(stats["bytes_from_disk"]), ""),
        ("resident at end", ", ".join(f"{tier} {format_size(n)}" for tier, n in stats["resident_bytes"].items()), ""),
    ]


def print_rows(rows: Iterable[Row], out: TextIO) -> None:
    """One indented line per ``(name, value, note)``, names and values aligned."""
    rows = list(rows)
    width = max((len(name) for name, _, _ in rows), default=0)
    for name, value, note in rows:
        print(f"  {name.ljust(width)}  {value:>14}  {note}".rstrip(), file=out)
