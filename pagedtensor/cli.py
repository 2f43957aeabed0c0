"""The ``pagedllm`` command.

    pagedllm ask      answer a real question with SmolLM2-135M-Instruct, paged and unpaged, under a
                      KV budget smaller than the cache needs; print the answer and the paging stats
    pagedllm demo     page a tensor several times larger than the device budget through all three
                      tiers, then check that every byte came back
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import logging
import os
import sys
import tempfile
import time
from typing import Optional, Sequence

import torch

from pagedtensor.cli_args import config_error, disk_full_error, negative_values_joined, size_type
from pagedtensor.config import MemoryConfig, format_size, machine_memory_bytes
from pagedtensor.errors import SlabAllocationError
from pagedtensor.ask import add_ask_arguments, ask_arguments_error, main_from_args
from pagedtensor.pager import Pager
from pagedtensor.report import print_rows, traffic_rows


def run_demo(
    size: int,
    vram_limit: int,
    host_memory: int,
    page_size: int,
    nvme_path: Optional[str] = None,
    compression: Optional[str] = None,
    device: Optional[str] = None,
    out=None,
) -> bool:
    """Write ``size`` random bytes through a pager with a small device and host budget, read them
    back page by page, and report the pager's counters. Returns whether every byte
    matched.

    Raises:
        MemoryError: the ``size`` bytes of demo data cannot be allocated in host memory.
    """
    out = out if out is not None else sys.stdout
    with tempfile.TemporaryDirectory(prefix="pagedllm-demo-") as scratch:
        config = MemoryConfig(
            vram_limit=vram_limit,
            host_memory=host_memory,
            page_size=page_size,
            nvme_path=nvme_path or scratch,
            compression=compression,
            device=device,
        )
        print(
            f"pagedllm demo: {format_size(size)} through device {config.device} ({format_size(config.vram_limit)}), "
            f"host {format_size(config.host_memory)}, disk {config.nvme_path}, pages of {format_size(config.page_size)}",
            file=out,
        )
        generator = torch.Generator().manual_seed(0)
        try:
            data = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=generator)
        except RuntimeError as error:  # torch's "DefaultCPUAllocator: can't allocate memory"
            raise MemoryError(f"size: cannot allocate {format_size(size)} ({size} bytes) of demo data in host memory: {error}") from None
        expected = hashlib.sha256(data.numpy()).hexdigest()  # hashes the tensor's memory, no copy
        with Pager(config) as pager:
            allocation = pager.allocate(size, name="demo")
            start = time.perf_counter()
            pager.write(allocation, data)
            pager.synchronize()
            write_s = time.perf_counter() - start
            after_write = pager.stats()
            # Read back one page at a time, in order: the sequential prefetcher runs ahead of the
            # reads, so most pages are already on the device when asked for (hits).
            digest = hashlib.sha256()
            start = time.perf_counter()
            for index in range(allocation.num_pages):
                offset = index * config.page_size
                digest.update(pager.read(allocation, offset, min(config.page_size, size - offset)).numpy().tobytes())
            read_s = time.perf_counter() - start
            got = digest.hexdigest()
            stats = pager.stats()
            engine = pager.disk_tier.engine_name if pager.disk_tier is not None else "none"
        ok = got == expected
        rows = [
            ("tensor", format_size(size), f"{size / config.vram_limit:.1f}x the device budget"),
            ("write", f"{write_s:.2f} s", f"{size / write_s / 1e6:.0f} MB/s"),
            ("read back, page by page", f"{read_s:.2f} s", f"{size / read_s / 1e6:.0f} MB/s"),
            ("faults while writing", str(after_write["faults"]), ""),
            *traffic_rows(stats, engine),
            ("every byte came back", "yes" if ok else "NO", f"sha256 {got[:16]}…"),
        ]
        print_rows(rows, out)
        return ok


def demo_size_error(size: int) -> Optional[str]:
    """Why ``pagedllm demo --size size`` cannot run, or ``None``: the demo holds all ``size`` bytes in
    host memory at once (the data it pages, to check against), so they must fit in the machine's
    memory."""
    total = machine_memory_bytes()
    if total is not None and total > 0 and size > total:
        return (f"argument --size: {format_size(size)} ({size} bytes) is more than this machine's memory "
                f"({format_size(total)}); the demo holds the whole tensor in host memory")  # fmt: skip
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The ``pagedllm`` command. A reader of its output that goes away (``pagedllm demo | head -1``)
    ends it quietly with status 1, as Python's documentation advises, not with a traceback."""
    try:
        status = run_command(argv)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at the interpreter's exit
        return status
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's last flush of stdout then writes nowhere
        return 1


def run_command(argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv`` and run its command; the status to exit with."""
    parser = argparse.ArgumentParser(prog="pagedllm", description="PagedLLM: paged memory for PyTorch inference.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="page a tensor larger than the device budget through all three tiers")
    demo.add_argument("--size", type=size_type("--size"), default="256MiB", help="bytes to page (default 256MiB)")
    demo.add_argument("--vram-limit", type=size_type("--vram-limit"), default="32MiB", help="device budget (default 32MiB)")
    demo.add_argument("--host-memory", type=size_type("--host-memory"), default="64MiB", help="host budget (default 64MiB)")
    demo.add_argument("--page-size", type=size_type("--page-size"), default="1MiB", help="page size (default 1MiB)")
    demo.add_argument("--nvme-path", default=None, help="folder for the disk tier (default: a temporary folder)")
    demo.add_argument("--compression", default=None, choices=["zstd"], help="compress pages on disk")
    demo.add_argument("--device", default=None, help="device tier (default: cuda if available, else cpu)")
    ask = commands.add_parser("ask", help="answer a question with paged weights and a paged KV cache (SmolLM2-135M-Instruct)")
    add_ask_arguments(ask)
    args = parser.parse_args(negative_values_joined(argv))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    if args.command == "demo":
        # The disk tier's folder is a temporary one unless given: check compression against a given one only.
        error = config_error(vram_limit=args.vram_limit, host_memory=args.host_memory, page_size=args.page_size,
                             nvme_path=args.nvme_path, compression=args.compression if args.nvme_path else None, device=args.device)  # fmt: skip
        if error is None and args.compression == "zstd" and importlib.util.find_spec("zstandard") is None:
            error = "--compression zstd needs the zstandard package: pip install 'pagedllm[zstd]'"
        if error is None:
            error = demo_size_error(args.size)
        if error is not None:
            demo.error(error)
        try:
            ok = run_demo(
                size=args.size,
                vram_limit=args.vram_limit,
                host_memory=args.host_memory,
                page_size=args.page_size,
                nvme_path=args.nvme_path,
                compression=args.compression,
                device=args.device,
            )
        except SlabAllocationError as error:  # a budget or page size larger than this machine's memory
            demo.error(str(error))
        except MemoryError as error:  # the demo data did not fit after all (memory in use)
            demo.error(f"argument --size: {str(error).removeprefix('size: ')}")
        except OSError as error:  # the disk tier's file system is full: it bounds the disk tier here
            message = disk_full_error(error, args.nvme_path, "demo", "a smaller --size")
            if message is None:
                raise
            demo.error(message)
        return 0 if ok else 1
    if args.command == "ask":
        error = ask_arguments_error(args)
        if error is not None:
            ask.error(error)
        return main_from_args(args, ask)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
