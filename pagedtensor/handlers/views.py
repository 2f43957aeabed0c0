"""Handlers of view ops: the op runs on a meta tensor of the same layout and the result is a
PagedTensor over the same pages (nothing faults in); of the view-copy ops (``diagonal_copy``, ...):
the view, then a copy of only its pages; and of ``as_strided_scatter``, which places elements by
offset in the allocation.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch._ops import OpOverload

from pagedtensor.dispatch import DISPATCHER, _describe, _map_tensors, _paged_leaves, _substitute, aten, implements, resize_refused
from pagedtensor.handlers.row_gathers import _resize_output
from pagedtensor.tensor import PagedTensor, element_span, math_bits, meta_like, plain_copy


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
    if func.overloadpacket.__name__.startswith("_nested"):
        # A nested (jagged) tensor's values or offsets: its view cannot be a PagedTensor, which is strided
        raise NotImplementedError(
            f"PagedTensor: {func} makes a nested (jagged) tensor, whose values and offsets cannot be "
            f"PagedTensors; pass t.materialize(){_describe(args, kwargs)}"
        )
    if leaves is None:
        leaves = _paged_leaves(args, kwargs)
    if not isinstance(source, PagedTensor):
        # The view is of a plain argument (``slice_inverse(plain, paged_src, ...)``): the PagedTensors
        # beside it, only read, as plain copies. (The generic way sent a view op back here: no end.)
        dense_args, dense_kwargs = _substitute(args, kwargs, {id(leaf): plain_copy(leaf) for leaf in leaves})
        return func(*dense_args, **dense_kwargs)
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
        if func is aten.view.dtype:
            # Not a view autograd tracks: torch's kernel makes a fresh tensor, an inference tensor
            # exactly where it is made in inference mode, whatever the source.
            return PagedTensor._make(*layout)
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


# The view-copy ops (``torch.diag`` of a matrix runs ``diagonal_copy``) and the view each copies.
_VIEW_OF_COPY = {
    aten.alias_copy: aten.alias, aten.as_strided_copy: aten.as_strided, aten.detach_copy: aten.detach,
    aten.diagonal_copy: aten.diagonal, aten.expand_copy: aten.expand, aten.lift_fresh_copy: aten.lift_fresh,
    aten.narrow_copy: aten.narrow, aten.permute_copy: aten.permute, aten.select_copy: aten.select,
    aten.slice_copy: aten.slice, aten.split_copy: aten.split, aten.split_with_sizes_copy: aten.split_with_sizes,
    aten.squeeze_copy: aten.squeeze, aten.t_copy: aten.t, aten.transpose_copy: aten.transpose,
    aten.unbind_copy: aten.unbind, aten.unfold_copy: aten.unfold, aten.unsqueeze_copy: aten.unsqueeze,
    aten.view_copy: aten.view, aten.view_as_real_copy: aten.view_as_real,
    aten.view_as_complex_copy: aten.view_as_complex, aten._reshape_alias_copy: aten._reshape_alias,
    aten._conj_copy: aten._conj, aten._neg_view_copy: aten._neg_view,
}  # fmt: skip


def _functional_overload(func: OpOverload) -> OpOverload:
    """The overload of ``func``'s packet without ``out``: ``default`` for ``out``, ``int`` for ``int_out``."""
    name = func._overloadname
    if name == "out":
        name = "default"
    elif name.endswith("_out"):
        name = name[: -len("_out")]
    return getattr(func.overloadpacket, name)


@implements(list(_VIEW_OF_COPY))
def copy_of_a_view(func: OpOverload, types: tuple, args: tuple, kwargs: dict) -> Any:
    """A view-copy op (``diagonal_copy``, ``select_copy``, ``as_strided_copy``, ...) of a PagedTensor:
    the view (a PagedTensor over the same pages, nothing faulted in), then ``clone`` in the
    contiguous format (``view_copy`` to a shape no view of the layout takes: the clone, then the
    shape, as torch's ``reshape`` then copy), as torch's own kernels run them: only the view's pages
    fault in, a piece at a time where they are more than a piece
    (:func:`~pagedtensor.handlers.copies.clone_in_pieces`). ``torch.diag(t)`` of a matrix larger
    than the device tier runs so. A view op that returns a list
    (``split_copy``, ``unbind_copy``) gives a list of copies. The result is plain.

    ``as_strided_copy`` places elements by storage offset, which for a PagedTensor counts from the
    start of its allocation (its storage), not from the device slab its pages sit in: its view is
    bounds-checked against the allocation (:func:`view_of_pages`).

    The ``out=`` forms run as torch's do: the functional op, then ``out`` written by
    :func:`_copy_into_out`; those of a list of outputs run the generic way. A view-copy op of a plain
    tensor (a PagedTensor ``out`` only) runs the generic way.
    """
    source = args[0] if args else kwargs.get("self")
    functional = _functional_overload(func)
    if not isinstance(source, PagedTensor) or (func is not functional and not isinstance(kwargs.get("out"), torch.Tensor)):
        return DISPATCHER.run_paged(func, types, args, kwargs)
    if func is not functional:
        return _copy_into_out(func, types, args, kwargs, copy_of_a_view)
    clone = lambda tensor: aten.clone.default(tensor, memory_format=torch.contiguous_format)
    if func is aten.view_copy.default and not _can_view(source, args[1]):
        # torch's ``view_copy`` is ``reshape`` then a copy where no view of the layout takes the shape
        shape = meta_like(source).reshape(args[1]).shape  # torch's error for a size of another numel
        return aten._unsafe_view.default(clone(source), shape)
    view_op = getattr(_VIEW_OF_COPY[func.overloadpacket], func._overloadname)
    view = view_op(*args, **kwargs)
    return clone(view) if isinstance(view, torch.Tensor) else [clone(tensor) for tensor in view]


def _can_view(source: PagedTensor, size: list[int]) -> bool:
    """Whether a view of ``source``'s layout takes the shape ``size`` (torch's ``view`` runs on it)."""
    try:
        meta_like(source).view(size)
    except RuntimeError:
        return False
    return True


@implements([aten.as_strided_scatter, aten.select_scatter, aten.slice_scatter, aten.diagonal_scatter])
def strided_scatter_over_the_allocation(func: OpOverload, types: tuple, args: tuple, kwargs: dict) -> torch.Tensor:
    """``as_strided_scatter`` places elements by storage offset, which for a PagedTensor counts from
    the start of its allocation (its storage), not from the device slab its pages sit in (run dense
    on the slab, it read and wrote other tensors' slots). It runs on the allocation materialized
    whole, as torch runs it on a clone of the whole storage, and returns a plain tensor; its
    ``out=`` form copies that result into ``out`` (:func:`_copy_into_out`), as torch's does.
    ``select_scatter``, ``slice_scatter`` and ``diagonal_scatter`` clone the whole storage too
    (``clone_preserve_strides``): run dense on the slab, their result's storage was a copy of the
    whole slab, other tensors' bytes with it, at the slab's offset."""
    source = args[0]
    if not isinstance(source, PagedTensor):  # a PagedTensor ``src`` or ``out`` only: the storage is a plain one
        return DISPATCHER.run_paged(func, types, args, kwargs)
    if "out" in kwargs:
        return _copy_into_out(func, types, args, kwargs, strided_scatter_over_the_allocation)
    if source.requires_grad and func.overloadpacket is aten.as_strided_scatter and not source.is_contiguous():
        # torch's check of the input (its autograd supports contiguous ones only), which the
        # materialized copy, requiring no grad, would pass: on a stand-in of its layout that does
        stand_in = torch.empty_strided(source.shape, source.stride(), dtype=source.dtype, device="meta").requires_grad_()
        src = args[1]
        func(stand_in, torch.empty(src.shape, dtype=src.dtype, device="meta") if isinstance(src, torch.Tensor) else src, *args[2:], **kwargs)
    whole = PagedTensor._make(source._paged, 0, (source._paged.nbytes // source.dtype.itemsize,), (1,), source.dtype)
    dense = whole.materialize().as_strided(source.shape, source.stride(), source._offset)
    return func(dense, *args[1:], **kwargs)


def _copy_into_out(func: OpOverload, types: tuple, args: tuple, kwargs: dict, handler: Any) -> torch.Tensor:
    """The ``out=`` form ``func`` of a view-copy or scatter op, as torch's generated kernels run
    them: ``handler`` runs the functional op (nothing written yet), then ``out`` is resized to the
    result's shape, contiguous (a plain ``out`` that had elements with torch's warning; a PagedTensor ``out`` of
    another shape raises, its pages are fixed) and written with ``copy_`` (a PagedTensor ``out``
    larger than the tier a piece at a time). An ``out`` of another dtype or device raises torch's
    error, as its kernels check them before writing (``narrow_copy``'s before its range). Returns
    ``out``."""
    out = kwargs["out"]
    source = args[0] if args else kwargs["self"]
    if func.overloadpacket is aten.narrow_copy and source.dim() > 0:  # its kernel checks the dtype before the range
        _check_out_dtype_and_device(func, out, source)
    functional_kwargs = {key: value for key, value in kwargs.items() if key != "out"}
    result = handler(_functional_overload(func), types, args, functional_kwargs)
    if out.shape != result.shape:
        if isinstance(out, PagedTensor):
            raise resize_refused(func, out.shape, result.shape, args, kwargs)
        _resize_output(out, torch.empty(result.shape, device="meta"))  # torch resizes to the shape alone: contiguous
    _check_out_dtype_and_device(func, out, result)
    return aten.copy_.default(out, result)


def _check_out_dtype_and_device(func: OpOverload, out: torch.Tensor, result: torch.Tensor) -> None:
    """torch's error where ``out``'s dtype or device is not ``result``'s, in its words for ``func``'s
    kind of kernel (from that kind of kernel on one element into an empty output)."""
    if out.dtype == result.dtype and out.device == result.device:
        return
    if func.overloadpacket is aten.narrow_copy and out.dtype != result.dtype:
        # its CPU kernel's words (CUDA has no narrow_copy.out kernel; the dtype is checked first)
        aten.narrow_copy.out(torch.empty(1, dtype=result.dtype, device="cpu"), 0, 0, 1, out=torch.empty(0, dtype=out.dtype, device="cpu"))
    aten.alias_copy.out(torch.empty(1, dtype=result.dtype, device=result.device), out=torch.empty(0, dtype=out.dtype, device=out.device))
