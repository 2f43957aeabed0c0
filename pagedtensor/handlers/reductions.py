"""The handler of whole-tensor reductions whose result does not depend on the elements' order
(``max``, ``min``, ``amax``/``amin``, ``aminmax``, ``argmax``/``argmin``, ``any``, ``all``,
``count_nonzero``, integer and bool ``sum``) of a PagedTensor larger than a piece: part by part.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch._ops import OpOverload
from torch._prims_common import make_contiguous_strides_for

from pagedtensor.dispatch import DISPATCHER, aten, implements
from pagedtensor.handlers.parts import Narrowing, _copies_in_parts, _larger_than_a_piece, _narrowed, _parts, _plain_copy
from pagedtensor.pieces import piece_elements_of
from pagedtensor.tensor import PagedTensor, meta_like


# Reductions of all elements whose result does not depend on the order of the elements, so that
# the same op on parts of a tensor, combined, gives the dense op's result exactly.
_EXTREMA = (aten.max.default, aten.min.default, aten.amax.default, aten.amin.default)
_FIRST_EXTREME_INDEX = (aten.argmax.default, aten.argmin.default)
_LOGICAL = (aten.any.default, aten.all.default)
_COUNTS = (aten.sum.default, aten.sum.dim_IntList, aten.count_nonzero.default)
_WHOLE_TENSOR_REDUCTIONS = (*_EXTREMA, *_FIRST_EXTREME_INDEX, aten.aminmax.default, *_LOGICAL, *_COUNTS)


@implements(_WHOLE_TENSOR_REDUCTIONS)
def reduce_in_parts(func: OpOverload, types: tuple, args: tuple, kwargs: dict) -> Any:
    """A reduction of every element of a PagedTensor larger than a piece, whose result does not
    depend on the elements' order: ``max``, ``min``, ``amax`` / ``amin`` over no or all dims,
    ``aminmax``, ``argmax`` / ``argmin`` without ``dim``, ``any``, ``all``, ``count_nonzero``
    without ``dim``, and ``sum`` over no or all dims of an integer or bool tensor into an integer
    dtype. The op runs on each part of the tensor's pages (:func:`_parts`, each at most a piece)
    and the parts' results are combined by the same reduction: the dense op's dtype, shape and
    value (NaN propagating; ``argmax``/``argmin`` the first extreme in the logical row-major
    order, a NaN first of all, as torch counts it). Integer sums wrap as the dense op's do (modulo
    the result dtype), so any order gives the same bits. A float ``sum`` depends on the order: it
    runs the generic way (and raises :class:`OutOfPagesError` when its pages do not fit).

    Two things are the kernel's and not the values': the sign of a zero extremum of a tensor holding
    both ``+0.0`` and ``-0.0`` (the CPU ``max`` and ``amax`` of one such tensor can differ), and the
    bits of a NaN ``max`` / ``min`` / ``aminmax`` (on CPU ``0x7FC00000``, or all ones from its
    vector path, by the tensor's size and threads; ``amax`` / ``amin`` give ``0x7FC00000``). The
    dense op's own vary with its kernel's path and order; here they are those of the parts' kernels
    and of the combining op: the dense op's value (NaN for NaN, a zero for a zero), not always its
    bits. Everything else, indices included, is bitwise the dense op's."""
    source = args[0]
    if not _reduces_in_parts(func, args, kwargs):
        return DISPATCHER.run_paged(func, types, args, kwargs)
    layout = func(meta_like(source), *args[1:], **kwargs)
    cuts = list(_parts(source, piece_elements_of([source]) or 1))
    if func in _FIRST_EXTREME_INDEX:
        return _first_extreme_index(func, source, cuts).reshape(layout.shape)
    parts = [_narrowed(source, narrowings) for narrowings in cuts]
    if func is aten.aminmax.default:
        minima, maxima = zip(*(func(part, *args[1:], **kwargs) for part in parts))
        return func(_flat(minima))[0].reshape(layout[0].shape), func(_flat(maxima))[1].reshape(layout[1].shape)
    partials = _flat([func(part, *args[1:], **kwargs) for part in parts])
    if func in _COUNTS:
        return aten.sum.default(partials, dtype=layout.dtype).reshape(layout.shape)
    return func(partials).reshape(layout.shape)  # the extremum of the parts' extrema, any/all of theirs


def _reduces_in_parts(func: OpOverload, args: tuple, kwargs: dict) -> bool:
    """Whether ``func`` reduces every element of a PagedTensor ``args[0]`` that is larger than a
    piece (:func:`_larger_than_a_piece`), not empty, readable in parts (:func:`_copies_in_parts`),
    where any order of its elements gives the same result (:func:`_order_free`)."""
    source = args[0]
    return (  # the cheap tests first: every reduction of a PagedTensor passes here
        isinstance(source, PagedTensor)
        and source._inner is None
        and source.numel() > 0
        and _reduces_every_element(func, args, kwargs, source.dim())
        and _order_free(func, source.dtype, kwargs)
        and _larger_than_a_piece([source])
        and _copies_in_parts([source])
    )


def _argument(args: tuple, kwargs: dict, position: int, name: str) -> Any:
    """An op's argument by position or keyword (``None`` when absent)."""
    return args[position] if len(args) > position else kwargs.get(name)


def _reduces_every_element(func: OpOverload, args: tuple, kwargs: dict, ndim: int) -> bool:
    """Whether the reduction's ``dim`` covers every element: absent (``None``), or for ``amax`` /
    ``amin`` / ``sum.dim_IntList`` an empty list or every dim."""
    if func in (aten.amax.default, aten.amin.default, aten.sum.dim_IntList):
        dims = _argument(args, kwargs, 1, "dim")
        return not dims or {d % max(ndim, 1) for d in dims} == set(range(ndim))
    if func in (aten.max.default, aten.min.default, *_LOGICAL, aten.sum.default):
        return True
    return _argument(args, kwargs, 1, "dim") is None  # argmax, argmin, aminmax (keyword dim), count_nonzero


def _order_free(func: OpOverload, dtype: torch.dtype, kwargs: dict) -> bool:
    """Whether any order of the elements gives the same result: true of every op here but a sum,
    exact only over integer or bool elements into an integer ``dtype`` (wrapping modulo it)."""
    if func not in (aten.sum.default, aten.sum.dim_IntList):
        return True
    result_dtype = kwargs.get("dtype")
    return _is_integral(dtype) and (result_dtype is None or (_is_integral(result_dtype) and result_dtype != torch.bool))


def _is_integral(dtype: torch.dtype) -> bool:
    return not dtype.is_floating_point and not dtype.is_complex


def _flat(partials: Sequence[torch.Tensor]) -> torch.Tensor:
    """The parts' results (each of one element) as one 1-D tensor."""
    return torch.cat([partial.reshape(1) for partial in partials])


def _first_extreme_index(func: OpOverload, source: PagedTensor, cuts: list[tuple[Narrowing, ...]]) -> torch.Tensor:
    """``argmax`` / ``argmin`` of ``source`` from its parts (``source`` narrowed by each of ``cuts``):
    each part, copied to a plain tensor, gives its first extreme and that element's logical flat
    index in ``source``; the result is the smallest index among the parts whose extreme is the
    extreme of all (NaN if any is NaN: the dense op's answer is then its first NaN). A part is a
    box of indices, its elements in the same order as in ``source``, so its first extreme is the
    first of its extremes there; ties between parts go to the smallest index."""
    values, indices = [], []
    for narrowings in cuts:
        plain = _plain_copy(_narrowed(source, narrowings))
        local = func(plain)
        values.append(torch.take(plain, local.reshape(1)))
        indices.append(_index_in_source(local, tuple(plain.shape), narrowings, tuple(source.shape)))
    values_flat, indices_flat = torch.cat(values), torch.stack(indices)
    extreme = (aten.max.default if func is aten.argmax.default else aten.min.default)(values_flat)
    is_extreme = torch.where(extreme.isnan(), values_flat.isnan(), values_flat == extreme)
    return torch.where(is_extreme, indices_flat, source.numel()).min()


def _index_in_source(local: torch.Tensor, part_shape: tuple[int, ...], narrowings: Sequence[Narrowing],
                     shape: tuple[int, ...]) -> torch.Tensor:  # fmt: skip
    """The logical (row-major) flat index in a tensor of ``shape`` of the element at logical flat
    index ``local`` (a 0-dim int64 tensor) of its part of ``part_shape`` narrowed by
    ``narrowings``: computed on the device, no host sync."""
    corner = [0] * len(shape)  # the part's first index along each dim
    for dim, start, _ in narrowings:
        corner[dim] += start
    strides = make_contiguous_strides_for(shape)
    index = torch.zeros((), dtype=torch.int64, device=local.device)
    remainder = local
    for dim in reversed(range(len(shape))):
        index = index + (remainder % part_shape[dim] + corner[dim]) * strides[dim]
        remainder = remainder // part_shape[dim]
    return index
