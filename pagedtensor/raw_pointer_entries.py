"""torch entry points that launch kernels on tensors' raw device pointers, bypassing dispatch.

A PagedTensor's bytes live in pager pages; the wrapper itself holds no memory, and
``__torch_dispatch__`` never sees a call that does not go through torch's dispatcher. torch's
jiterator (``torch.cuda.jiterator._create_jit_fn``, which its OpInfo database tests) hands its
tensors' data pointers straight to a compiled kernel: given a PagedTensor, the kernel read an
invalid address, an illegal memory access that ends the process's CUDA context (found by the CUDA
sweep of ``tests/test_torch_opinfo.py``). :func:`install` wraps that entry so PagedTensor arguments
are materialized first, as the dispatcher's generic path does for an op: the kernel reads dense
copies of the pages and returns plain tensors, the dense call's bits.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch


def _dense_arguments(call: Callable[..., Any]) -> Callable[..., Any]:
    """``call(self, *tensors, **kwargs)`` with each PagedTensor among ``tensors`` materialized."""

    @functools.wraps(call)
    def with_dense_tensors(self: object, *tensors: Any, **kwargs: Any) -> Any:
        from pagedtensor.tensor import PagedTensor

        if any(isinstance(tensor, PagedTensor) for tensor in tensors):
            tensors = tuple(tensor.materialize() if isinstance(tensor, PagedTensor) else tensor for tensor in tensors)
        return call(self, *tensors, **kwargs)

    with_dense_tensors.__pagedllm_wrapped__ = True
    return with_dense_tensors


def install() -> None:
    """Wrap torch's jiterator call once (idempotent; a torch without jiterator is left alone)."""
    jiterator = getattr(torch.cuda, "jiterator", None)
    function_class = getattr(jiterator, "_JittedFunction", None)
    if function_class is None or getattr(function_class.__call__, "__pagedllm_wrapped__", False):
        return
    function_class.__call__ = _dense_arguments(function_class.__call__)
