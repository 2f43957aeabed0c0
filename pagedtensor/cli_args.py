"""Argument types and checks of the ``pagedllm`` command: a bad value is a usage error naming it.

argparse reports an ``ArgumentTypeError`` raised by a ``type`` function as
``pagedllm demo: error: argument --size: <message>`` and exits with status 2, instead of a traceback.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from typing import Callable, Optional, Sequence

import torch

from pagedtensor.config import MemoryConfig, format_size, machine_memory_bytes, parse_size
from pagedtensor.tiers.disk import FILE_SYSTEM_FULL_ERRNOS, make_folder


NUMBER_OPTIONS = ("--size", "--vram-limit", "--host-memory", "--page-size", "--max-new-tokens")
"""The options of ``pagedllm`` that take a size or a count."""

_NEGATIVE_WORD = re.compile(r"-[0-9.]")


def negative_values_joined(argv: Optional[Sequence[str]]) -> list[str]:
    """``argv`` (``sys.argv[1:]`` for None) with a value that starts with ``-`` and a digit joined to
    its option (``--size -1GiB`` as ``--size=-1GiB``). argparse takes such a word, unless it is a
    plain number, for an option of its own and says ``expected one argument``; joined, the option's
    check names the bad value."""
    words = list(sys.argv[1:] if argv is None else argv)
    joined: list[str] = []
    index = 0
    while index < len(words):
        word = words[index]
        if word in NUMBER_OPTIONS and index + 1 < len(words) and _NEGATIVE_WORD.match(words[index + 1]):
            joined.append(f"{word}={words[index + 1]}")
            index += 2
        else:
            joined.append(word)
            index += 1
    return joined


def size_type(option: str) -> Callable[[str], int]:
    """An argparse ``type`` for a positive size (``'256MiB'``, ``'4KiB'``, an int of bytes)."""

    def size(text: str) -> int:
        try:
            value = parse_size(text, option)
        except ValueError as error:  # argparse puts "argument <option>: " before the message
            raise argparse.ArgumentTypeError(str(error).removeprefix(f"{option}: ")) from None
        if value == 0:
            raise argparse.ArgumentTypeError(f"expected a positive size, got {text!r}")
        return value

    return size


def positive_int(text: str) -> int:
    """An argparse ``type`` for an int of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {value}")
    return value


def page_size_error(config: MemoryConfig) -> Optional[str]:
    """Why ``config``'s pages can never be held, or ``None``: every tier holds whole pages, so a page
    larger than this machine's memory, or than the CUDA device's, fails at the first slab. (Budgets
    larger than the machine are fine: tiers grow slabs on demand.)"""
    limits = [("this machine's memory", machine_memory_bytes())]
    if config.device.type == "cuda" and torch.cuda.is_available():
        limits.append((f"the memory of {config.device}", torch.cuda.get_device_properties(config.device).total_memory))
    for what, total in limits:
        if total is not None and 0 < total < config.page_size:
            return f"page_size: a page of {format_size(config.page_size)} is more than {what} ({format_size(total)}); every tier holds whole pages"
    return None


def config_error(**settings: object) -> Optional[str]:
    """Why ``MemoryConfig(**settings)`` would be refused (budget under a page, page size, device, disk
    path) or could never hold a page (:func:`page_size_error`), or ``None``; checked before any work starts, so the command fails as a usage error. The
    disk folder is created here (the command is about to use it), so a path that cannot be one fails
    here too."""
    try:
        config = MemoryConfig(**settings)
    except (ValueError, TypeError) as error:
        return str(error)
    error = page_size_error(config)
    if error is not None:
        return error
    if config.nvme_path is not None:
        try:
            make_folder(config.nvme_path)
        except OSError as error:
            return f"nvme_path: cannot create the folder {config.nvme_path!r}: {error.strerror or error}"
        try:  # an existing folder may still refuse files (permissions, a read-only file system)
            with tempfile.TemporaryFile(dir=config.nvme_path):
                pass
        except OSError as error:
            return f"nvme_path: cannot create files in {config.nvme_path!r}: {error.strerror or error}"
    return None


def disk_full_error(error: OSError, nvme_path: Optional[str], command: str, smaller: str) -> Optional[str]:
    """The usage error of a full file system under the disk tier (``ENOSPC``, ``EDQUOT``, ``EFBIG`` from its
    writes, whose errors begin ``"disk tier:"``), naming ``--nvme-path`` and what to change
    (``smaller``: the option that spills less); None for any other ``OSError`` (raised as it is: a
    full stdout is no fault of ``--nvme-path``). The pager's own advice,
    ``MemoryConfig(disk_limit=...)``, is no option of the command line."""
    if error.errno not in FILE_SYSTEM_FULL_ERRNOS or not str(error.strerror or "").startswith("disk tier:"):
        return None
    folder = nvme_path if nvme_path else f"{tempfile.gettempdir()} (the {command}'s temporary folder)"
    return (f"argument --nvme-path: the file system under {folder} has no room for the pages the {command} spills "
            f"there ({os.strerror(error.errno)}): choose a folder with more free space, or {smaller}")  # fmt: skip
