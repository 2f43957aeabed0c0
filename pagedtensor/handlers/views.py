"""Handlers of view ops: the op runs on a meta tensor of the same layout and the result is a
PagedTensor over the same pages (nothing faults in); and ``as_strided_copy`` / ``as_strided_scatter``,
which place elements by offset in the allocation.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch._ops import OpOverload

from pagedtensor.dispatch import DISPATCHER, _describe, _map_tensors, _paged_leaves, _substitute, aten, implements
from pagedtensor.tensor import PagedTensor, element_span, math_bits, meta_like


_VIEW_OPS = [
    aten.view, aten._unsafe_view, aten._reshape_alias, aten.as_strided, aten.slice, aten.select, aten.narrow.default,
    aten.t, aten.transpose, aten.permute, aten.expand, aten.unsqueeze, aten.squeeze, aten.alias, aten.detach,
    aten.split, aten.split_with_sizes, aten.unbind, aten.unfold, aten.diagonal, aten.view_as_real,
    aten.view_as_complex, aten.lift_fresh,
    # (narrow.Tensor, whose start is a tensor, decomposes: its start may be a PagedTensor)
    # views whose schema carries no alias annotation (torch returns views, without autograd's checks)
    aten.unsafe_split, aten.unsafe_split_with_sizes,
]


@implements(_VIEW_OPS)
def view_of_pages(func: OpOverload, types: tuple, args: tuple, kwargs: dict, leaves: Optional[list[PagedTensor]] = None) -> Any:
    """A view op: run it on a meta tensor of the same layout; the results are PagedTensors over the
    same pages (nothing faults in). ``leaves``: the PagedTensor arguments, when the caller has them."""
    source = args[0]
    if not isinstance(source, PagedTensor):  # the view is of a plain argument
        return DISPATCHER.run_paged(func, types, args, kwargs)
    if leaves is None:
        leaves = _paged_leaves(args, kwargs)
    try:
        if len(leaves) == 1:  # the source is the only PagedTensor argument: the common case
            out = func(meta_like(source), *args[1:], **kwargs)
        else:
            meta_args, meta_kwargs = _substitute(args, kwargs, {id(leaf): meta_like(leaf) for leaf in leaves})
            out = func(*meta_args, **meta_kwargs)
    except NotImplementedError as error:
        raise NotImplementedError(f"PagedTensor: view op {func} has no meta kernel{_describe(args, kwargs)}: {error}") from error

    def to_paged(meta: torch.Tensor) -> PagedTensor:
        if func is aten.as_strided.default:  # the only view op that can reach past the storage (meta checks nothing)
            lo, hi = element_span(tuple(meta.shape), meta.stride(), meta.storage_offset())
            if hi > lo and hi * meta.dtype.itemsize > source._paged.nbytes:
                raise RuntimeError(
                    f"setStorage: sizes {list(meta.shape)}, strides {list(meta.stride())}, storage offset "
                    f"{meta.storage_offset()}, and itemsize {meta.dtype.itemsize} requiring a storage size of "
                    f"{hi * meta.dtype.itemsize} are out of bounds for storage of size {source._paged.nbytes}"
                )
        layout = (source._paged, meta.storage_offset(), tuple(meta.shape), meta.stride(), meta.dtype, False, math_bits(meta))
        if torch.is_inference_mode_enabled() and not source.is_inference():
            # A view of a normal tensor is a normal tensor, in inference mode too (it shares the
            # base's version counter, which an inference tensor cannot).
            with torch.inference_mode(False):
                return PagedTensor._make(*layout)
        if source.is_inference() and not torch.is_inference_mode_enabled():
            # And a view of an inference tensor is an inference tensor outside inference mode too, as
            # torch's are: else torch let it be saved for backward and written in place, where an
            # inference tensor is refused (it has no version counter to catch a later write).
            with torch.inference_mode():
                return PagedTensor._make(*layout)
        return PagedTensor._make(*layout)

    return to_paged(out) if isinstance(out, torch.Tensor) else _map_tensors(out, to_paged)


@implements([aten.as_strided_copy, aten.as_strided_scatter])
def strided_over_the_allocation(func: OpOverload, types: tuple, args: tuple, kwargs: dict) -> torch.Tensor:
    """``as_strided_copy`` and ``as_strided_scatter`` place elements by storage offset, which for a
    PagedTensor counts from the start of its allocation (its storage), not from the device slab its
    pages sit in (run dense on the slab, they read and wrote other tensors' slots).

    ``as_strided_copy`` is the paged view (bounds-checked against the allocation) copied out, only its
    pages faulting in; ``as_strided_scatter`` runs on the allocation materialized whole, as torch runs
    it on a clone of the whole storage. Both return plain tensors; their ``out=`` forms copy that
    result into ``out``, as torch's do."""
    source = args[0]
    if not isinstance(source, PagedTensor):  # a PagedTensor ``src`` or ``out`` only: the storage is a plain one
        return DISPATCHER.run_paged(func, types, args, kwargs)
    if "out" in kwargs:
        out = kwargs["out"]
        functional = getattr(func.overloadpacket, "default")
        result = strided_over_the_allocation(functional, types, args, {k: v for k, v in kwargs.items() if k != "out"})
        if out.shape != result.shape:
            aten.resize_.default(out, result.shape)
        return aten.copy_.default(out, result)
    if func is aten.as_strided_copy.default:
        view = aten.as_strided.default(source, *args[1:], **kwargs)
        return aten.clone.default(view, memory_format=torch.contiguous_format)
    whole = PagedTensor._make(source._paged, 0, (source._paged.nbytes // source.dtype.itemsize,), (1,), source.dtype)
    dense = whole.materialize().as_strided(source.shape, source.stride(), source._offset)
    return func(dense, *args[1:], **kwargs)
