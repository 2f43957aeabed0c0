"""PagedLLM: paged memory for PyTorch inference.

Tensors whose bytes live in fixed-size pages across GPU memory, pinned host memory and disk, moved
on demand or ahead of demand under hard budgets. The import package is ``pagedtensor``; the
distribution is ``pagedllm``.
"""

from __future__ import annotations

from pagedtensor.config import MemoryConfig, format_size, parse_size
from pagedtensor.errors import DeviceTierFullError, OutOfPagesError, PageCorruptionError, PagedLLMError, PagerClosedError, SlabAllocationError
from pagedtensor.pager import Allocation, PageInfo, Pager, ResidentPages
from pagedtensor.default_pager import get_default_pager, set_default_pager
from pagedtensor.tensor import PagedTensor

__version__ = "0.1.0"

__all__ = [
    "MemoryConfig",
    "Pager",
    "Allocation",
    "ResidentPages",
    "PageInfo",
    "PagedTensor",
    "get_default_pager",
    "set_default_pager",
    "parse_size",
    "format_size",
    "DeviceTierFullError",
    "OutOfPagesError",
    "PageCorruptionError",
    "SlabAllocationError",
    "PagedLLMError",
    "PagerClosedError",
    "enable_paging",
    "PagedModel",
    "PagedKVCache",
    "__version__",
]

_HF_EXPORTS = {"enable_paging", "PagedModel", "PagedKVCache"}


def __getattr__(name: str):
    # transformers is optional (the ``hf`` extra): import the integration on first use only.
    if name in _HF_EXPORTS:
        import pagedtensor.hf

        return getattr(pagedtensor.hf, name)
    raise AttributeError(f"module 'pagedtensor' has no attribute {name!r}")
