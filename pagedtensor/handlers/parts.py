"""A PagedTensor read a part of its pages at a time, each part at most a piece of the device tier
(:func:`~pagedtensor.pieces.piece_elements_of`), whatever its layout: the helpers the copies, the
whole-tensor reductions and the row scatters share; and an op's arguments by name and as meta tensors.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch
from torch._ops import OpOverload

from pagedtensor.config import normalize_device
from pagedtensor.dispatch import aten, refuse_internal_overlap
from pagedtensor.pieces import pages_reached, piece_elements_of, span_elements
from pagedtensor.tensor import PagedTensor, meta_layout


def _arguments_by_name(func: OpOverload, args: tuple, kwargs: dict) -> dict:
    """``func``'s arguments by their schema names, defaults filled in."""
    bound = {argument.name: argument.default_value for argument in func._schema.arguments if argument.has_default_value()}
    bound.update(zip((argument.name for argument in func._schema.arguments), args))
    bound.update(kwargs)
    return bound


def _meta(value: Any) -> Any:
    """``value`` with every tensor in it, in lists and tuples too, as a meta tensor of its layout
    (:func:`~pagedtensor.tensor.meta_layout`): an op's arguments for its meta kernel."""
    if isinstance(value, dict):
        return {name: _meta(item) for name, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_meta(item) for item in value)
    return meta_layout(value)


def _copies_in_parts(tensors: Sequence[Any], resolving: bool = False) -> bool:
    """Whether ``tensors`` (at least one a PagedTensor) can be read part by part into plain tensors:
    strided, on one device, without conjugate or negative bits (``copy_`` would resolve them) unless
    ``resolving`` (the op resolves them itself, as ``clone`` does), and no PagedTensor traced (``_inner``)."""
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return False
    paged = [t for t in tensors if isinstance(t, PagedTensor)]
    return (
        bool(paged)
        and all(t._inner is None for t in paged)
        and all(t.layout == torch.strided and (resolving or not (t.is_conj() or t.is_neg())) for t in tensors)
        and len({normalize_device(t.device) for t in tensors}) == 1
    )


def _larger_than_a_piece(paged: list[PagedTensor]) -> bool:
    """Whether the bytes ``paged`` reach are more than one piece (:func:`piece_elements_of`) holds, or
    the pages they reach in all more than the device tier holds (rows of a table, a few bytes on
    each of many pages), so that the op goes a part at a time; a smaller op runs at once, the
    generic way, as does any op where the device tier holds no piece (fewer than two pages)."""
    piece = piece_elements_of(paged)
    if piece is None:  # too many allocations for a piece of each at once: one at a time, if that fits
        return piece_elements_of(paged[:1]) is not None
    widest = max(t.dtype.itemsize for t in paged)
    if sum(span_elements(t) * t.dtype.itemsize for t in paged) > piece * widest:
        return True
    return len(paged) > 1 and any(len(pages) > pager.device_tier.capacity_pages for pager, pages in pages_reached(paged).items())


def _cut_in_parts(tensor: PagedTensor) -> bool:
    """Whether :func:`_parts` cuts ``tensor`` (it spans more than a piece): a copy a part at a time of
    one it does not cut is the one copy itself."""
    return next(_parts(tensor, piece_elements_of([tensor]) or 1)) != ()


def copy_in_parts(target: torch.Tensor, source: torch.Tensor) -> None:
    """``target.copy_(source)`` (same shape), a part of ``source``'s pages at a time: each part spans
    at most a piece (:func:`_parts`), whatever the two layouts are. A ``target`` whose elements share
    memory (an expanded view) raises torch's error first, as ``copy_`` does: a part of one index
    along the expanded dim overlaps nothing, and the parts would write the shared elements in turn."""
    if not isinstance(source, PagedTensor):
        target.copy_(source)
        return
    refuse_internal_overlap(aten.copy_.default, target)
    for narrowings in _parts(source, piece_elements_of([source]) or 1):
        _narrowed(target, narrowings).copy_(_narrowed(source, narrowings))


Narrowing = tuple[int, int, int]
"""``(dim, start, length)``: indices ``[start, start + length)`` of ``dim``."""


def _parts(tensor: torch.Tensor, piece: int, narrowings: tuple[Narrowing, ...] = ()) -> Iterator[tuple[Narrowing, ...]]:
    """Narrowings cutting ``tensor`` (already narrowed by ``narrowings``) into parts spanning at most
    ``piece`` elements each (or one element): runs of indices along its dim of the largest stride,
    each index cut again along the next dim where one index spans more than a piece."""
    view = _narrowed(tensor, narrowings)
    dims = [d for d in range(view.dim()) if view.shape[d] > 1 and view.stride(d) > 0]
    if span_elements(view) <= piece or not dims:
        yield narrowings
        return
    dim = max(dims, key=view.stride)
    one = span_elements(view.narrow(dim, 0, 1))
    count = max(1, (piece - one) // view.stride(dim) + 1) if one <= piece else 1
    for start in range(0, view.shape[dim], count):
        yield from _parts(tensor, piece, (*narrowings, (dim, start, min(count, view.shape[dim] - start))))


def _narrowed(tensor: torch.Tensor, narrowings: Sequence[Narrowing]) -> torch.Tensor:
    for dim, start, length in narrowings:
        tensor = tensor.narrow(dim, start, length)
    return tensor


def _plain_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A plain contiguous copy of a PagedTensor (a part at a time); a plain tensor as it is."""
    if not isinstance(tensor, PagedTensor):
        return tensor
    copy = torch.empty(tensor.shape, dtype=tensor.dtype, device=tensor.device)
    copy_in_parts(copy, tensor)
    return copy
