"""torch entry points that launch kernels on tensors' raw device pointers, bypassing dispatch.

A PagedTensor's bytes live in pager pages; the wrapper itself holds no memory, and
``__torch_dispatch__`` never sees a call that does not go through torch's dispatcher. torch's
jiterator (``torch.cuda.jiterator._create_jit_fn``, which its OpInfo database tests) hands its
tensors' data pointers straight to a compiled kernel: given a PagedTensor, the kernel read an
invalid address, an illegal memory access that ends the process's CUDA context (found by the CUDA
sweep of ``tests/test_torch_opinfo.py``). :func:`install` wraps that entry so PagedTensor arguments
are materialized first, as the dispatcher's generic path does for an op: the kernel reads dense
copies of the pages and returns plain tensors, the dense call's bits.

DLPack export (``torch.utils.dlpack.to_dlpack``, ``torch.to_dlpack``: torch's C function, which never
calls ``__dlpack__``) took the wrapper's storage, which holds no memory, and gave a capsule over a null
pointer that segfaulted its reader; given a PagedTensor it now raises the ``BufferError`` of
:meth:`PagedTensor.__dlpack__`, as ``torch.from_dlpack(t)`` does.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
import torch.utils.dlpack


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


def _refusing_paged_tensors(export: Callable[..., Any]) -> Callable[..., Any]:
    """``export(tensor, ...)`` that raises :meth:`PagedTensor.__dlpack__`'s error for a PagedTensor."""

    @functools.wraps(export)
    def to_dlpack(tensor: Any, *args: Any, **kwargs: Any) -> Any:
        from pagedtensor.tensor import PagedTensor

        if isinstance(tensor, PagedTensor):
            return tensor.__dlpack__()  # raises
        return export(tensor, *args, **kwargs)

    to_dlpack.__pagedllm_wrapped__ = True
    return to_dlpack


def install() -> None:
    """Wrap torch's DLPack export functions and jiterator call once (idempotent; a torch without
    one of them is left alone)."""
    for module in (torch.utils.dlpack, torch):
        export = getattr(module, "to_dlpack", None)
        if export is not None and not getattr(export, "__pagedllm_wrapped__", False):
            module.to_dlpack = _refusing_paged_tensors(export)
    jiterator = getattr(torch.cuda, "jiterator", None)
    function_class = getattr(jiterator, "_JittedFunction", None)
    if function_class is None or getattr(function_class.__call__, "__pagedllm_wrapped__", False):
        return
    function_class.__call__ = _dense_arguments(function_class.__call__)
