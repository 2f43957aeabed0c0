"""The handler of reductions whose result does not depend on the elements' order (``max``, ``min``,
``amax``/``amin``, ``aminmax``, ``argmax``/``argmin``, ``any``, ``all``, ``count_nonzero``, integer
and bool ``sum``), of every element or along dims, of a PagedTensor larger than a piece: part by part;
and the ``out=`` forms of these reductions (and of every ``sum``), whose source and outputs together
need not fit on the device tier at once.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch._ops import OpOverload
from torch._prims_common import make_contiguous_strides_for

from pagedtensor.dispatch import DISPATCHER, _OpTooLarge, aten, implements, resize_refused
from pagedtensor.handlers.parts import Narrowing, _copies_in_parts, _larger_than_a_piece, _narrowed, _parts, _plain_copy
from pagedtensor.errors import OutOfPagesError
from pagedtensor.pieces import _raise_torchs_error_on_stand_ins, piece_elements_of, refuse_without_room_for_new_pages, resize_out_as
from pagedtensor.tensor import PagedTensor, meta_like


# Reductions of all elements whose result does not depend on the order of the elements, so that
# the same op on parts of a tensor, combined, gives the dense op's result exactly.
_EXTREMA = (aten.max.default, aten.min.default, aten.amax.default, aten.amin.default)
_FIRST_EXTREME_INDEX = (aten.argmax.default, aten.argmin.default)
_LOGICAL = (aten.any.default, aten.all.default)
_COUNTS = (aten.sum.default, aten.sum.dim_IntList, aten.count_nonzero.default)
_WHOLE_TENSOR_REDUCTIONS = (*_EXTREMA, *_FIRST_EXTREME_INDEX, aten.aminmax.default, *_LOGICAL, *_COUNTS)
# Their forms along dims that have overloads of their own (``amax``, ``argmax``, ``aminmax``,
# ``sum.dim_IntList`` and ``count_nonzero.default`` take a ``dim`` too).
_EXTREMA_ALONG_A_DIM = (aten.max.dim, aten.min.dim)  # values and indices
_LOGICAL_ALONG_DIMS = (aten.any.dim, aten.any.dims, aten.all.dim, aten.all.dims)
_DIM_REDUCTIONS = (*_EXTREMA_ALONG_A_DIM, *_LOGICAL_ALONG_DIMS, aten.count_nonzero.dim_IntList)
_MAXIMA = (aten.max.default, aten.max.dim, aten.amax.default, aten.argmax.default)
_ANY = (aten.any.default, aten.any.dim, aten.any.dims)


@implements([*_WHOLE_TENSOR_REDUCTIONS, *_DIM_REDUCTIONS])
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
    bits. Everything else, indices included, is bitwise the dense op's.

    The same reductions along some dims (``max(dim)`` / ``min(dim)``, ``amax`` / ``amin`` over some
    dims, ``aminmax(dim=)``, ``argmax(dim)`` / ``argmin(dim)``, ``any`` / ``all`` over a dim or a
    list of dims, ``count_nonzero(dim)``, the integer ``sum(dim)``; ``keepdim`` too) run in parts by
    :func:`_reduce_along_dims`, with the same two exceptions (the NaN bits of ``max`` / ``min``
    along a dim, ``amax`` / ``amin`` and ``aminmax`` are their kernels' there: on CPU, 0x7FC00000 or
    all ones by the path, which depends on the shape). A float ``sum`` (``mean``, ``prod``, ...)
    along a dim is not run in parts: its bits depend on its kernel's configuration (on CUDA, on the
    number of result elements), so a part's rows need not add as the whole's."""
    source = args[0]
    if not _reduces_in_parts(func, args, kwargs):
        return DISPATCHER.run_paged(func, types, args, kwargs)
    _raise_torchs_error_on_stand_ins(func, args, kwargs)  # torch's errors in its kernel's words ("dim 0 appears multiple times")
    layout = func(meta_like(source), *args[1:], **kwargs)  # then the meta kernel's (a dim out of range)
    if func in (aten.any.dims, aten.all.dims):
        # torch's kernels lay the result out contiguous (ATen's reduction meta); the Python meta
        # kernel keeps the input's layout for no dim (dim=())
        layout = torch.empty(layout.shape, dtype=layout.dtype, device="meta")
    reduced = _reduced_dims(func, args, kwargs, source.dim())
    if reduced is not None:
        return _reduce_along_dims(func, source, reduced, kwargs, layout)
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
    """Whether ``func`` reduces a PagedTensor ``args[0]`` that is larger than a piece
    (:func:`_larger_than_a_piece`), not empty (an empty one spans no page: the dense op's answer or
    error), readable in parts (:func:`_copies_in_parts`), where any order of its elements gives the
    same result (:func:`_order_free`)."""
    source = args[0]
    return (  # the cheap tests first: every reduction of a PagedTensor passes here
        isinstance(source, PagedTensor)
        and source._inner is None
        and source.numel() > 0
        and _order_free(func, source.dtype, kwargs)
        and _larger_than_a_piece([source])
        and _copies_in_parts([source])
    )


def _argument(args: tuple, kwargs: dict, position: int, name: str) -> Any:
    """An op's argument by position or keyword (``None`` when absent)."""
    return args[position] if len(args) > position else kwargs.get(name)


def _reduced_dims(func: OpOverload, args: tuple, kwargs: dict, ndim: int) -> Optional[frozenset[int]]:
    """The dims (``0 <= d < ndim``) the reduction reduces, or ``None`` for a whole-tensor form
    (:func:`reduce_in_parts` combines those itself): ``dim`` absent, or for ``amax`` / ``amin`` /
    ``sum.dim_IntList`` an empty list or every dim. ``any.dims`` / ``all.dims`` reduce every dim for
    ``None`` and none for ``[]``; ``count_nonzero.dim_IntList`` every dim for ``[]``. Run after the
    op's meta kernel has checked the dims."""
    if func in (aten.max.default, aten.min.default, *_LOGICAL, aten.sum.default):
        return None
    dims = _argument(args, kwargs, 1, "dim")
    if func in (aten.any.dims, aten.all.dims):
        return frozenset(range(ndim)) if dims is None else frozenset(d % ndim for d in dims)
    if func is aten.count_nonzero.dim_IntList:
        return frozenset(d % ndim for d in dims) if dims else frozenset(range(ndim))
    if func in (*_EXTREMA_ALONG_A_DIM, aten.any.dim, aten.all.dim, aten.count_nonzero.default, *_FIRST_EXTREME_INDEX, aten.aminmax.default):
        return None if dims is None else frozenset({dims % ndim})  # one int dim, required by the first four
    if not dims or {d % ndim for d in dims} == set(range(ndim)):  # amax, amin, sum.dim_IntList
        return None
    return frozenset(d % ndim for d in dims)


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


def _reduce_along_dims(func: OpOverload, source: PagedTensor, reduced: frozenset[int], kwargs: dict, layout: Any) -> Any:
    """``func`` reducing ``source`` along the dims ``reduced`` (not every dim, or an overload along
    dims), a part at a time: the parts of :func:`_parts` (each spanning at most a piece, cut along
    the dims of the largest strides, whatever they are), each reduced by the op itself with
    ``keepdim`` (:func:`_reduce_part`) into the slice of the result its indices along the kept dims
    give. A part that holds every index of the reduced dims (rows narrower than a piece cut along
    kept dims) gives its slice exactly, for any op; parts cut along a reduced dim are combined by
    :func:`_combine` (the extremum of extrema, the first index of the extreme, or, and, integer
    sums), exact for these order-free reductions. The result: plain tensors on ``source``'s device
    with the dtype, shape and strides of the dense op's (``layout``, its meta result); indices in
    ``source``'s logical coordinates.

    The first part to reach an element of the result is the one holding index 0 of every reduced
    dim there (:func:`_parts` goes through each dim it cuts in increasing order, one index range
    after the other), so that part writes the element and later ones combine with it."""
    kept_shape = [1 if dim in reduced else size for dim, size in enumerate(source.shape)]
    layouts = layout if isinstance(layout, tuple) else (layout,)
    dtypes = [result.dtype for result in layouts]
    if func in _FIRST_EXTREME_INDEX:
        dtypes = [source.dtype, *dtypes]  # the extremes found so far, to combine the indices by
    results = [torch.empty(kept_shape, dtype=dtype, device=source.device) for dtype in dtypes]
    for narrowings in _parts(source, piece_elements_of([source]) or 1):
        partials = _reduce_part(func, _narrowed(source, narrowings), reduced, narrowings, kwargs)
        slices = [_narrowed(result, [cut for cut in narrowings if cut[0] not in reduced]) for result in results]
        if all(start == 0 for dim, start, _ in narrowings if dim in reduced):
            for target, partial in zip(slices, partials):
                target.copy_(partial)
        else:
            _combine(func, slices, partials)
    if func in _FIRST_EXTREME_INDEX:
        results = results[1:]
    outs = [torch.empty_strided(want.shape, want.stride(), dtype=want.dtype, device=source.device).copy_(result.reshape(want.shape))
            for want, result in zip(layouts, results)]  # fmt: skip
    return tuple(outs) if isinstance(layout, tuple) else outs[0]


def _reduce_part(func: OpOverload, part: PagedTensor, reduced: frozenset[int], narrowings: Sequence[Narrowing],
                 kwargs: dict) -> list[torch.Tensor]:  # fmt: skip
    """The op's result on one part (at most a piece: it runs the generic way), along ``reduced``,
    with ``keepdim`` (the part's shape, 1 along each reduced dim): values and indices for ``max`` /
    ``min`` along a dim, the extremes and their indices for ``argmax`` / ``argmin`` (read from a
    plain copy of the part), indices along the dim counted from its index 0 in ``source``."""
    dims = sorted(reduced)
    shape = [1 if dim in reduced else size for dim, size in enumerate(part.shape)]
    if func in _EXTREMA_ALONG_A_DIM or func in _FIRST_EXTREME_INDEX:
        (dim,) = dims
        if func in _FIRST_EXTREME_INDEX:
            plain = _plain_copy(part)
            indices = func(plain, dim, True)
            values = plain.gather(dim, indices)
        else:
            values, indices = func(part, dim, True)
        start = sum(first for cut, first, _ in narrowings if cut == dim)
        return [values, indices + start if start else indices]
    if func is aten.aminmax.default:
        return list(func(part, dim=dims[0], keepdim=True))
    if func in (aten.count_nonzero.default, aten.count_nonzero.dim_IntList):
        return [aten.count_nonzero.dim_IntList(part, dims).reshape(shape)]
    if func in (aten.any.dim, aten.all.dim):
        return [func(part, dims[0], True)]
    if func is aten.sum.dim_IntList:
        return [func(part, dims, True, dtype=kwargs.get("dtype"))]
    return [func(part, dims, True)]  # amax, amin, any.dims, all.dims


def _combine(func: OpOverload, current: list[torch.Tensor], partials: list[torch.Tensor]) -> None:
    """Combine a part's results ``partials`` into the results so far ``current`` (views of the
    result, written in place), as the op would over both: the greater (``max``-like) or smaller
    extreme, NaN over any number; of equal extremes (NaN or not) the smaller index; or, and; sums
    (integer: wrapping as the dense op's do)."""
    if func in _LOGICAL or func in _LOGICAL_ALONG_DIMS:
        current[0].copy_(current[0] | partials[0] if func in _ANY else current[0] & partials[0])  # 0 / 1, bool or uint8
    elif func in _COUNTS or func is aten.count_nonzero.dim_IntList:
        current[0].add_(partials[0])
    elif func is aten.aminmax.default:
        current[0].copy_(torch.where(_beats(partials[0], current[0], larger=False), partials[0], current[0]))
        current[1].copy_(torch.where(_beats(partials[1], current[1], larger=True), partials[1], current[1]))
    elif len(current) == 1:  # amax, amin
        current[0].copy_(torch.where(_beats(partials[0], current[0], larger=func in _MAXIMA), partials[0], current[0]))
    else:  # values and indices: max.dim, min.dim, argmax, argmin
        (values, indices), (new_values, new_indices) = current, partials
        both_nan = new_values.isnan() & values.isnan()
        tie = ((new_values == values) | both_nan) & (new_indices < indices)
        take = _beats(new_values, values, larger=func in _MAXIMA) | tie
        values.copy_(torch.where(take, new_values, values))
        indices.copy_(torch.where(take, new_indices, indices))


def _beats(new: torch.Tensor, old: torch.Tensor, larger: bool) -> torch.Tensor:
    """Where ``new`` is the more extreme: greater (``larger``) or smaller, or NaN where ``old`` is not."""
    return (new > old if larger else new < old) | (new.isnan() & ~old.isnan())


# The out= forms of the reductions above, each with its functional form (``sum`` of any dtype: its
# functional form runs in parts where it is order-free, the generic way otherwise).
_OUT_FORMS: dict[OpOverload, OpOverload] = {
    aten.max.unary_out: aten.max.default,
    aten.min.unary_out: aten.min.default,
    aten.max.dim_max: aten.max.dim,
    aten.min.dim_min: aten.min.dim,
    aten.amax.out: aten.amax.default,
    aten.amin.out: aten.amin.default,
    aten.argmax.out: aten.argmax.default,
    aten.argmin.out: aten.argmin.default,
    aten.aminmax.out: aten.aminmax.default,
    aten.any.all_out: aten.any.default,
    aten.any.out: aten.any.dim,
    aten.any.dims_out: aten.any.dims,
    aten.all.all_out: aten.all.default,
    aten.all.out: aten.all.dim,
    aten.all.dims_out: aten.all.dims,
    aten.sum.out: aten.sum.default,
    aten.sum.IntList_out: aten.sum.dim_IntList,
    aten.count_nonzero.out: aten.count_nonzero.default,
    aten.count_nonzero.dim_IntList_out: aten.count_nonzero.dim_IntList,
}


@implements(list(_OUT_FORMS))
def reduce_into_out(func: OpOverload, types: tuple, args: tuple, kwargs: dict) -> Any:
    """A reduction with ``out=`` (``torch.sum(t, 0, out=o)``, ``torch.max(t, 0, out=(v, i))``): the
    generic way while the source's and the outputs' pages fit on the device tier at once. Past it,
    torch's errors first (its kernel on a one-element stand-in of the source into empty outputs: a
    dtype it refuses, a dim out of range); then, where
    an output is a PagedTensor, the op itself into plain tensors laid out as the outputs (only the
    source's pages at once: the same kernel, so a float sum gives the same bits), copied into the
    outputs a piece of pages at a time. Where only the source is too large (plain outputs), its
    functional form (:data:`_OUT_FORMS`; a ``sum`` with ``dtype`` the output's, the dtype torch's
    kernel computes in) reduces it part by part (:func:`reduce_in_parts`), copied into the outputs:
    the values the ``out=`` kernel writes, for the order-free reductions. A plain output of another
    shape is resized as torch resizes it (with its warning); a PagedTensor output of another shape
    raises ``NotImplementedError`` (its pages are fixed). Where an output shares the source's pages
    or lies on another device, or the source's pages do not fit and its reduction is not order-free
    (a float sum), the pager's error is raised. Results: the outputs themselves."""
    try:
        return DISPATCHER.run_paged(func, types, args, kwargs)
    except _OpTooLarge as too_large:
        source = args[0]
        names = [name for _, name in DISPATCHER.info(func).written]  # the outputs, in the schema's order
        outs = [kwargs[name] for name in names]
        if not isinstance(source, torch.Tensor) or any(_shares_pages(out, source) or out.device != source.device for out in outs):
            raise
        rest = {key: value for key, value in kwargs.items() if key not in names}
        # torch's errors (a dtype the kernel refuses, a dim out of range), from its own kernel on a
        # stand-in of one element of the source's dims into empty outputs; then the outputs' shapes.
        stand_in = torch.zeros([1] * source.dim(), dtype=source.dtype, device=source.device)
        func(stand_in, *args[1:], **rest, **{name: torch.empty(0, dtype=out.dtype, device=out.device) for name, out in zip(names, outs)})
        # The outputs' shapes from the meta kernel into empty outputs (resized silently: a C++ resize
        # warning of a call made here would reach the caller on top of the one below); an output of
        # that shape keeps its own strides, as torch's kernel keeps them.
        metas = [torch.empty(0, dtype=out.dtype, device="meta") for out in outs]
        meta_source = meta_like(source) if isinstance(source, PagedTensor) else source.to("meta")
        try:
            func(meta_source, *args[1:], **rest, **dict(zip(names, metas)))
        except RuntimeError:
            if len(outs) != 1:
                raise
            # The meta kernel refuses a cast the device's kernel makes (any/all of uint8 into a bool
            # out=, which the stand-in above passed): the shape from a meta output of the source's dtype.
            metas = [torch.empty(0, dtype=source.dtype, device="meta")]
            func(meta_source, *args[1:], **rest, **dict(zip(names, metas)))
            metas = [torch.empty(metas[0].shape, dtype=outs[0].dtype, device="meta")]
        metas = [torch.empty_strided(out.shape, out.stride(), dtype=out.dtype, device="meta") if out.shape == meta.shape else meta
                 for out, meta in zip(outs, metas)]  # fmt: skip
        for out, meta in zip(outs, metas):
            if isinstance(out, PagedTensor) and out.shape != meta.shape:
                raise resize_refused(func, out.shape, meta.shape, args, kwargs) from None
        if any(isinstance(out, PagedTensor) for out in outs):
            values = [torch.empty_strided(meta.shape, meta.stride(), dtype=meta.dtype, device=source.device) for meta in metas]
            func(source, *args[1:], **rest, **dict(zip(names, values)))  # plain outputs: only the source's pages
        else:
            if func.overloadpacket is aten.sum and rest.get("dtype") is None:
                rest["dtype"] = outs[0].dtype
            reduced = source
            if func.overloadpacket in (aten.any, aten.all) and outs[0].dtype == torch.uint8 and source.dtype != torch.uint8:
                reduced = source.to(torch.uint8)  # torch's uint8 out= kernel reduces the source cast to uint8 (0.25 is 0)
            try:
                values = _OUT_FORMS[func](reduced, *args[1:], **rest)
            except OutOfPagesError:
                values = None  # not order-free (a float sum): the op's own error, its pager's type
            if values is None:
                raise too_large
            values = values if isinstance(values, tuple) else (values,)
        refuse_without_room_for_new_pages(func, outs)  # each output is a copy of its own: before the first
        for out, meta, value in zip(outs, metas, values):
            resize_out_as(out, meta)  # torch's resize of an out= tensor of another shape, with its warning's text
            out.copy_(value)
        return tuple(outs) if len(outs) > 1 else outs[0]


def _shares_pages(out: torch.Tensor, source: torch.Tensor) -> bool:
    """Whether ``out`` and ``source`` are PagedTensors of one allocation (torch's overlap checks
    then decide, which the generic way keeps)."""
    return isinstance(out, PagedTensor) and isinstance(source, PagedTensor) and out._paged is source._paged
