"""PagedLLM: paged memory for PyTorch inference.

Tensors whose bytes live in fixed-size pages across GPU memory, pinned host memory and disk, moved
on demand or ahead of demand under hard budgets. The import package is ``pagedtensor``; the
distribution is ``pagedllm``.
"""

from __future__ import annotations

from pagedtensor.config import MemoryConfig, format_size, parse_size
from pagedtensor.errors import OutOfPagesError, PageCorruptionError, PagedLLMError
from pagedtensor.pager import Allocation, PageInfo, Pager, ResidentPages

__version__ = "0.1.0"

__all__ = [
    "MemoryConfig",
    "Pager",
    "Allocation",
    "ResidentPages",
    "PageInfo",
    "parse_size",
    "format_size",
    "OutOfPagesError",
    "PageCorruptionError",
    "PagedLLMError",
    "__version__",
]
