"""The handler of dim-0 row scatters in place (``index_put_`` with index tensors on the leading
dims or a bool mask over them, ``masked_fill_``, ``index_copy_``, ``index_add_``, ``index_reduce_``,
``index_fill_``): only the pages holding the written rows fault in, a run of pages at a time.
``index_put_`` after leading slices (``t[:, pos] = v``) and ``index_copy_``, ``index_add_``,
``index_reduce_``, ``index_fill_`` along another dim run a
piece of rows at a time; ``scatter_``, ``scatter_add_`` and ``scatter_reduce_`` run torch's own
kernel on the rows they write (:func:`scatter_elements`); so do ``embedding_renorm_``
(:func:`renorm_rows`) and ``masked_scatter_`` (:func:`masked_scatter_rows`); ``put_`` writes its
elements by their coordinates (:func:`put_elements`). On a table whose dim 0 is not its outermost
in memory (``t.T``) they run on its view of dims outermost first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence

import torch
from torch._ops import OpOverload

from pagedtensor.dispatch import DISPATCHER, _row_byte_spans, aten, implements, refuse_internal_overlap
from pagedtensor.handlers.parts import _arguments_by_name, _larger_than_a_piece
from pagedtensor.handlers.row_gathers import (
    _outermost_first,
    _rows_a_piece,
    _rows_can_be_copied,
    _rows_compacted,
)
from pagedtensor.pieces import one_element_stand_in, piece_elements_of, refuse_without_room_for_new_pages
from pagedtensor.tensor import PagedTensor, dense_and_non_overlapping, plain_copy


_ROW_SCATTERS = [aten.index_put_.default, aten.index_copy_.default, aten.index_add_.default, aten.index_reduce_.default,
                 aten.index_fill_.int_Scalar, aten.index_fill_.int_Tensor]  # fmt: skip

# Row scatters that count a negative index from the end of dim 0 (index_copy_, index_add_, index_reduce_ refuse one).
_WRAPS_NEGATIVE_INDICES = frozenset({aten.index_put_.default, aten.index_fill_.int_Scalar, aten.index_fill_.int_Tensor})


@dataclass(frozen=True)
class _RowScatter:
    """An in-place row scatter on dim 0 of a PagedTensor, its arguments read by name."""

    func: OpOverload
    table: PagedTensor
    index: torch.Tensor
    """The index as given, a plain tensor: positions on dim 0 or (index_put_) a bool mask over it."""
    source: Any
    """``values`` (index_put_), ``source`` (index_copy_, index_add_, index_reduce_) or ``value`` (index_fill_)."""
    options: dict
    """The other arguments by name (``accumulate``, ``alpha``, ``reduce`` and ``include_self``)."""
    rest: tuple = ()
    """``index_put_``'s indices on dims 1, 2, ... (``t[i, j] = v``): plain index tensors on the table's
    device, or ``None`` for a dim taken whole (``t[i, :, j] = v``)."""

    def arguments(self, table: torch.Tensor, index: torch.Tensor, source: Any, rest: Optional[tuple] = None) -> tuple:
        """``func``'s positional arguments for ``table``, ``index`` (positions on dim 0), ``source``
        and (``index_put_``) the index tensors of the next dims (``self.rest`` where not given)."""
        if self.func is aten.index_put_.default:
            return table, [index, *(self.rest if rest is None else rest)], source
        return table, 0, index, source

    def call(self, table: torch.Tensor, index: torch.Tensor, source: Any) -> Any:
        """``func`` on plain tensors: ``table``, ``index`` and ``source``, with the options."""
        return self.func(*self.arguments(table, index, source), **self.options)


@implements(_ROW_SCATTERS)
def scatter_rows(func: OpOverload, types: tuple, args: tuple, kwargs: dict) -> Any:
    """Write rows along dim 0 in place (``t[idx] = v`` and ``index_put_`` with or without
    ``accumulate``, ``index_copy_``, ``index_add_``, ``index_reduce_``, ``index_fill_``): fault in
    only the pages holding the written rows.

    The written rows (sorted, distinct) are grouped into runs of adjacent pages, each spanning at
    most a piece of the device tier (its capacity less one page). The op runs once per run, the
    generic way, on the table's rows ``[lo, hi)`` (a narrowed view: only its pages fault in, and
    only they are written back and marked dirty), with the run's index positions renumbered by
    ``-lo`` in their order in the index and the matching rows of the source (a source broadcast
    along dim 0 is passed as it is). A row is written by one run only, in the index's order, so the
    table ends bitwise as after the dense op. torch's own checks run first, with torch's errors and
    before any page faults in: shapes and dtypes on a stand-in table with as many rows as are
    written (no page read), index bounds on the index's values. An empty index faults nothing in.

    ``index_put_`` (``t[i, j] = v``) may take index tensors on the next dims too, broadcast with
    the first, and dims taken whole between them (``t[i, :, j] = v``: ``None`` in its indices): each
    run takes the places of its rows from all of them. A bool mask over several leading dims
    (``t[t > 0] = 0``) or among other indices (``t[mask, j] = v``) is taken as the index tensors of
    its positions, row-major, as torch takes it.

    ``t[:, pos] = v`` and the ops along another dim run a piece of rows at a time
    (:func:`_put_a_piece_of_rows_at_a_time`, :func:`_index_op_a_piece_of_rows_at_a_time`). On a
    table whose dim 0 is not the outermost in memory (``t.T``), the index ops and ``t.T[i] = v`` run
    on the table's view of dims outermost first (:func:`_index_op_of_outermost_first`), and so does
    every other ``index_put_`` there (``accumulate``, several index tensors, masks: by the written
    elements' coordinates, :func:`_put_by_coordinates`).
    A table that fits in one piece runs the generic way, and so does any other form of the op
    (a byte mask, a table with the conjugate or negative bit, a source that is a view of the table's
    pages, an index or source on another device).

    Note:
        Reads the index tensor on the host (a sync when it lives on the GPU), as a row gather does.
        A run that fails (the device tier filled by pins of another thread) leaves the runs before it
        written.
    """
    _check_index_count(func, args, kwargs)
    args, kwargs = _index_fill_value_read(func, args, kwargs)
    fill = _torchs_masked_fill(func, args, kwargs)
    if fill is not None:
        # torch's kernel runs masked_fill_(mask, value.item()). A mask of some of the table's dims
        # (t[:, cols] = v) is that, in pieces; one of all of them, or of the leading ones, goes on as a put, the value cast
        # to the table's dtype as masked_fill_ casts it (its overflow errors too) on a one-element
        # stand-in (only the rows the mask marks fault in).
        table, indices, mask, value = fill
        # (a 0-dim mask, t[torch.tensor(True)] = v, marks no dim: every element, or none, by the mask broadcast)
        rows = mask.dtype == torch.bool and indices[0] is not None and indices[0].dim() > 0 and all(index is None for index in indices[1:])
        if (mask.shape != table.shape and not rows) or mask.dtype != torch.bool:
            return table.masked_fill_(mask, value.item())
        # A mask of the leading dims (t[row_mask] = v) goes on as a put of its rows, as one of all dims,
        # of the value read (a view of the table itself overlapped what is written).
        if value.dtype != table.dtype or value.dim() > 0:  # (a value of shape [1, 1] put by a mask: one number)
            stand_in = torch.zeros(1, dtype=table.dtype, device=table.device)
            stand_in.masked_fill_(torch.ones(1, dtype=torch.bool, device=table.device), value.item())
            value = stand_in[0]
        args, kwargs = (table, indices, value), {}
    permuted = _index_op_of_outermost_first(func, args, kwargs)
    if permuted is not None:
        return permuted
    request = _row_scatter_request(func, args, kwargs)
    if request is None:
        by_rows = (_put_a_piece_of_rows_at_a_time if func is aten.index_put_.default else _index_op_a_piece_of_rows_at_a_time)(func, args, kwargs)
        if by_rows is not NotImplemented:
            return by_rows
    if request is None or not _larger_than_a_piece([request.table]):
        return DISPATCHER.run_paged(func, types, args, kwargs)
    request = _mask_as_positions(request)
    given = _index_values(request)
    if given is None or any(index is not None and index.dtype not in (torch.int64, torch.int32) for index in request.rest):
        if request.index.dtype not in (torch.bool, torch.uint8):
            _check_on_a_stand_in(request, request.index, 1)  # torch's error for an index's dtype
        return DISPATCHER.run_paged(func, types, args, kwargs)
    rows_total = request.table.shape[0]
    positions = torch.where(given < 0, given + rows_total, given) if func in _WRAPS_NEGATIVE_INDICES else given
    in_bounds = (positions >= 0) & (positions < rows_total)
    rows, renumbered = torch.unique(torch.where(in_bounds, positions, 0), sorted=True, return_inverse=True)
    index_dtype = torch.int64 if request.index.dtype == torch.bool else request.index.dtype
    _check_on_a_stand_in(request, renumbered.to(request.table.device, index_dtype), rows.numel())  # torch's shape and dtype checks
    if not bool(in_bounds.all()):
        raise _index_out_of_bounds(func, int(given[~in_bounds][0]), rows_total, request.table.dim(), request.options.get("alpha", 1))
    # Several index tensors (index_put_) broadcast together: one place per element of their shape.
    places_shape = torch.broadcast_shapes(positions.shape, *(index.shape for index in request.rest if index is not None))
    if math.prod(places_shape) == 0:
        return request.table
    run_sources = _source_by_position(request, places_shape)
    runs = _runs_of_rows(request.table, rows)
    if run_sources is _NOT_BY_POSITION or runs is None:  # nothing written yet
        fill = _as_a_masked_fill(func, args, kwargs) if runs is None else None
        if fill is not None:  # a transposed table's rows each span the table: in pieces of memory
            return DISPATCHER.run_generic(aten.masked_fill_.Tensor, types, fill, {})
        return DISPATCHER.run_paged(func, types, args, kwargs)
    source, by_place = run_sources
    flat = positions.expand(places_shape).reshape(-1)
    rest = [None if index is None else index.expand(places_shape).reshape(-1) for index in request.rest]
    order = torch.argsort(flat, stable=True)  # index places by row, each row's in the index's order
    by_row = flat[order]
    refuse_without_room_for_new_pages(func, [request.table.narrow(0, lo, hi - lo) for lo, hi in runs])  # before the first run
    for lo, hi in runs:
        first, stop = torch.searchsorted(by_row, torch.tensor([lo, hi], device=by_row.device)).tolist()
        places = order[first:stop].sort().values  # the run's places, in the index's order
        run_source = source.index_select(0, places.to(source.device)) if by_place else source
        run_index = (flat[places] - lo).to(request.table.device)
        run_rest = tuple(None if index is None else index.index_select(0, places.to(index.device)) for index in rest)
        run_args = request.arguments(request.table.narrow(0, lo, hi - lo), run_index, run_source, run_rest)
        DISPATCHER.run_paged(func, types, run_args, dict(request.options))
    return request.table


def _torchs_masked_fill(func: OpOverload, args: tuple, kwargs: dict) -> Optional[tuple]:
    """``(table, indices, mask, value)`` where torch's ``index_put_`` kernel runs ``t.masked_fill_(mask, values.item())``
    instead (``canDispatchToMaskedFill`` in ATen's TensorAdvancedIndexing.cpp): without
    ``accumulate``, one value on the CPU, and one bool or uint8 index tensor on ``t``'s device (the
    others ``None``) whose sizes match the dims it indexes, given a trailing dim of one for each dim
    after them; else ``None``. ``masked_fill_`` casts the value to ``t``'s dtype
    (``t[t > 0] = torch.tensor(0)`` into a float table), where ``index_put_`` refuses another dtype."""
    if func is not aten.index_put_.default:
        return None
    bound = _arguments_by_name(func, args, kwargs)
    table, indices, values = bound["self"], bound["indices"], bound["values"]
    if bound["accumulate"] or not isinstance(values, torch.Tensor) or values.numel() != 1 or values.device.type != "cpu":
        return None
    values = plain_copy(values)  # one number, read
    mask, dims = None, 0
    for index in indices:
        if index is None:
            dims += 1
            continue
        if not isinstance(index, torch.Tensor) or index.dtype not in (torch.bool, torch.uint8) or index.device != table.device or mask is not None:
            return None
        if dims + index.dim() > table.dim() or any(index.shape[j] != table.shape[dims + j] for j in range(index.dim())):
            return None  # torch's own error, from the generic way
        mask, dims = index, dims + index.dim()
    # (sizes as one tuple: a 0-dim mask of a 0-dim table would call reshape() with none)
    return None if mask is None else (table, indices, mask.reshape((*mask.shape, *([1] * (table.dim() - dims)))), values)


def _check_index_count(func: OpOverload, args: tuple, kwargs: dict) -> None:
    """torch's IndexError for an ``index_put_`` of more indices than the table has dims ("too many
    indices for tensor of dimension 2 (got 3)"), its kernel's first check: from the kernel itself,
    on one-element stand-ins of the table, the indices and the values (their dtypes, devices and
    dims; no page read). The paths by rows leave such a call to the generic way, which faults in
    every page first (DeviceTierFullError past the tier); the masked fill's would reshape a mask
    past the table's dims. (A meta stand-in runs another check first: ``item()`` of its values.)"""
    if func is not aten.index_put_.default:
        return
    bound = _arguments_by_name(func, args, kwargs)
    table, indices = bound["self"], bound["indices"]
    if not isinstance(table, torch.Tensor) or len(indices) <= table.dim():
        return
    func(*map(one_element_stand_in, (table, list(indices), bound["values"])), bound["accumulate"])


def _index_fill_value_read(func: OpOverload, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of ``index_fill_`` by a 0-dim PagedTensor value with the value read into a
    plain tensor, positionally; any other call's as they are. torch's kernel fills by
    ``value.item()``, read before any row is written; a value that views the table's own pages
    (``t.index_fill_(0, i, t[0, 0])``) would keep the op off the paths by rows (the generic way:
    the whole table at once, DeviceTierFullError past the tier), as it does ``masked_fill_``'s
    (:func:`masked_fill_rows` reads it first too)."""
    if func is not aten.index_fill_.int_Tensor:
        return args, kwargs
    bound = _arguments_by_name(func, args, kwargs)
    value = bound["value"]
    if not (isinstance(value, PagedTensor) and value.dim() == 0):
        return args, kwargs
    return (bound["self"], bound["dim"], bound["index"], plain_copy(value)), {}


def _as_a_masked_fill(func: OpOverload, args: tuple, kwargs: dict) -> Optional[tuple]:
    """``index_put_(t, [mask], v)`` without ``accumulate``, by one bool mask of ``t``'s whole shape
    and one value of ``t``'s dtype on its device (``t[mask] = 0``), as ``masked_fill_``'s arguments
    ``(t, mask, v)`` with ``v`` 0-dim: the same writes, by an elementwise op that runs in pieces of
    memory; else ``None``. Call after torch's checks of the ``index_put_``."""
    if func is not aten.index_put_.default:
        return None
    bound = _arguments_by_name(func, args, kwargs)
    table, indices, values = bound["self"], bound["indices"], bound["values"]
    if bound["accumulate"] or len(indices) != 1:
        return None
    mask = indices[0]
    if type(mask) is not torch.Tensor or mask.dtype != torch.bool or mask.shape != table.shape or mask.device != table.device:
        return None
    if type(values) is not torch.Tensor or values.numel() != 1 or values.dtype != table.dtype or values.device != table.device:
        return None
    return table, _mask_in_the_layout_of(table, mask), values.reshape(())


def _mask_in_the_layout_of(table: PagedTensor, mask: torch.Tensor) -> torch.Tensor:
    """``mask`` (of ``table``'s shape) with ``table``'s strides where the table's elements fill their
    span (a transposed or permuted table; else ``mask`` as it is): an elementwise op runs in pieces
    of memory only on operands of one layout (:mod:`pagedtensor.pieces`)."""
    if mask.stride() == table.stride() or not dense_and_non_overlapping(table.shape, table.stride()):
        return mask
    return torch.empty_strided(table.shape, table.stride(), dtype=mask.dtype, device=mask.device).copy_(mask)


@implements([aten.masked_fill_.Scalar, aten.masked_fill_.Tensor])
def masked_fill_rows(func: OpOverload, types: tuple, args: tuple, kwargs: dict) -> Any:
    """``t.masked_fill_(mask, value)`` with a bool mask of ``t``'s own shape, or of its leading dims and
    size 1 after them (:func:`_put_mask`): the ``index_put_`` of that mask (:func:`scatter_rows`), so only the pages of the rows the mask marks fault in (a
    transposed table, whose rows each span the table, runs in pieces of memory there:
    :func:`_as_a_masked_fill`). From torch 2.15 ``t[mask] = value`` with such a mask and a scalar
    runs this op, no longer ``index_put_``: every page faulted in.

    torch's checks and its conversion of ``value`` to ``t``'s dtype run first, on a one-element
    stand-in, with torch's errors and before any page faults in; the value written is the
    stand-in's element, as the dense op writes it. Other forms run the generic way (in pieces of
    the table past the device tier, every page faulted in): a table that fits in one piece, a mask
    broadcast to ``t``, not bool, on another device or paged, a paged value of more than 0 dims (a 0-dim one
    is read first), a table with a dim of
    stride 0 or the conjugate or negative bit (as :func:`scatter_rows` takes them), and a plain
    table (here for a PagedTensor mask or value; it has no pages and no piece).
    """
    bound = _arguments_by_name(func, args, kwargs)
    table, mask, value = bound["self"], bound["mask"], bound["value"]
    if isinstance(value, PagedTensor) and value.dim() == 0:  # one number, read first as torch reads it (a view of
        value = plain_copy(value)  # the table itself overlapped what is written)
        args, kwargs = (table, mask, value), {}
    marks = _put_mask(table, mask)
    if not (isinstance(table, PagedTensor) and marks is not None and table.dim() >= 1 and not isinstance(value, PagedTensor)
            and not table.is_conj() and not table.is_neg()
            and all(stride != 0 for size, stride in zip(table.shape, table.stride()) if size > 1)
            and _larger_than_a_piece([table])):  # fmt: skip
        return DISPATCHER.run_generic(func, types, args, kwargs)
    stand_in = torch.zeros(1, dtype=table.dtype, device=table.device)
    func(stand_in, torch.ones(1, dtype=torch.bool, device=table.device), value)
    scatter_rows(aten.index_put_.default, types, (table, [marks], stand_in[0]), {})
    return table


def _put_mask(table: torch.Tensor, mask: Any) -> Optional[torch.Tensor]:
    """``mask`` as the mask of an ``index_put_`` on ``table``: a plain bool mask on the table's device
    of its shape as it is; one of size 1 after some leading dims of the table's sizes (what
    ``t[row_mask] = v`` runs from torch 2.15: ``masked_fill_(row_mask.unsqueeze(-1), v)``) as a
    mask of those dims; else ``None``."""
    if not (type(mask) is torch.Tensor and mask.dtype == torch.bool and mask.device == table.device and mask.dim() == table.dim()):
        return None
    if mask.shape == table.shape:
        return mask
    lead = mask.dim()
    while lead > 0 and mask.shape[lead - 1] == 1:
        lead -= 1
    if lead < 1 or tuple(mask.shape[:lead]) != tuple(table.shape[:lead]):
        return None
    return mask.reshape(mask.shape[:lead])


def _masks_as_positions(table: torch.Tensor, first_dim: int, indices: list) -> Optional[list]:
    """``indices`` (from ``table``'s dim ``first_dim`` on) with each bool mask as the positions of its
    marks, an index per dim it spans (``t[:, mask] = v`` is ``t[:, *mask.nonzero().unbind(1)] = v``:
    torch reads a mask so); ``None`` where a mask's shape is not that of the dims it spans (torch's
    error, from the generic way)."""
    converted, dim = [], first_dim
    for index in indices:
        if isinstance(index, torch.Tensor) and index.dtype == torch.bool:
            if tuple(index.shape) != tuple(table.shape[dim : dim + index.dim()]) or index.dim() == 0:
                return None
            converted.extend(plain_copy(index).nonzero().unbind(1))
            dim += index.dim()
        else:
            converted.append(index)
            dim += 1
    return converted


def _put_a_piece_of_rows_at_a_time(func: OpOverload, args: tuple, kwargs: dict) -> Any:
    """``index_put_`` without ``accumulate`` whose indices start with ``None`` (``t[:, pos] = v``, the
    write of a KV cache's new positions), on a PagedTensor larger than a piece: row ``r`` of the table is written
    from row ``r`` of the values alone, so the op runs on a piece of rows at a time (narrowed views
    of the table, and of the values where they have a row per table row), torch's own kernel on
    each. torch's errors come first, before any write: a value of the wrong shape (torch's text),
    then the op on a one-row stand-in of the table (no page read) for the indices' and values'
    dtypes, shapes and bounds. ``NotImplemented`` for any other form (masks, index tensors apart
    or on another device, values that are a view of the table's pages) and where a row spans
    more than a piece."""
    if not _a_table_of_several_pieces(args[0] if args else kwargs.get("self")):
        return NotImplemented  # (checked first: a table that fits takes the generic way at once)
    bound = _arguments_by_name(func, args, kwargs)
    table, indices, values = bound["self"], bound["indices"], bound["values"]
    if bound["accumulate"]:
        # torch's CPU kernel sums repeated positions in an order that depends on the whole
        # tensor's size (t[:, [0] * 6] += v of 1093 rows differs from the same rows a piece at a time)
        return NotImplemented
    lead = next((place for place, index in enumerate(indices) if index is not None), len(indices))
    if lead == 0:
        return NotImplemented
    rest = _masks_as_positions(table, lead, list(indices[lead:]))
    if rest is None:  # a mask of another shape than the dims it spans: torch's error, on a one-row stand-in
        stand_in = torch.empty((1, *table.shape[1:]), dtype=table.dtype, device=table.device)
        func(stand_in, [plain_copy(index) if isinstance(index, torch.Tensor) else index for index in indices], plain_copy(values))
        return NotImplemented
    if not rest or lead + len(rest) > table.dim():
        return NotImplemented
    indices = [*indices[:lead], *rest]
    if any(isinstance(index, torch.Tensor) and index.dtype.is_floating_point for index in rest):
        func(torch.empty((1, *table.shape[1:]), dtype=table.dtype, device=table.device), list(indices), values)
        return NotImplemented  # (torch's error for the index dtype is raised above)
    if any(not isinstance(index, torch.Tensor) or index.dtype not in (torch.int64, torch.int32) or _apart_from(index, table)
           or index.device != table.device for index in rest):  # fmt: skip
        return NotImplemented
    if not isinstance(values, torch.Tensor) or (isinstance(values, PagedTensor) and values._paged is table._paged):
        return NotImplemented
    count = _rows_a_piece(table)
    if not 0 < count < table.shape[0]:
        return NotImplemented
    rest = [plain_copy(index) for index in rest]
    indices = [*indices[:lead], *rest]
    values = plain_copy(values)
    stand_in = torch.empty((1, *table.shape[1:]), dtype=table.dtype, device=table.device)
    try:
        places = list(torch.broadcast_shapes(*(index.shape for index in rest)))
    except RuntimeError:
        func(stand_in, indices, values)  # torch's error for indices that do not broadcast
        return NotImplemented
    rows = table.shape[0]
    result_shape = [rows, *table.shape[1:lead], *places, *table.shape[lead + len(rest):]]
    try:
        fits = list(torch.broadcast_shapes(values.shape, result_shape)) == result_shape
    except RuntimeError:
        fits = False
    if not fits:
        raise RuntimeError(f"shape mismatch: value tensor of shape {list(values.shape)} cannot be broadcast to indexing "
                           f"result of shape {result_shape}")  # fmt: skip
    by_row = values.dim() == len(result_shape) and values.shape[0] == rows != 1
    func(stand_in, indices, values[:1] if by_row else values)  # dtypes, bounds: torch's errors, no page read
    refuse_without_room_for_new_pages(func, [table])  # every piece of rows is written: before the first
    for lo in range(0, rows, count):
        hi = min(rows, lo + count)
        func(table[lo:hi], indices, values[lo:hi] if by_row else values)
    return table


def _of_another_outermost_dim(table: Any) -> bool:
    """Whether ``table`` is a PagedTensor of two dims or more, larger than a piece, whose dim 0 is not its
    outermost in memory (``t.T``), without the conjugate or negative bit."""
    return (isinstance(table, PagedTensor) and table._inner is None and table.dim() >= 2 and table.numel() > 0
            and _outermost_first(table)[0] != 0 and not table.is_conj() and not table.is_neg() and _larger_than_a_piece([table]))  # fmt: skip


def _a_table_of_several_pieces(table: Any) -> bool:
    """Whether ``table`` is a PagedTensor of two or more dims, larger than a piece, whose rows along
    dim 0 can be narrowed to (the tables the piece-of-rows paths take)."""
    return isinstance(table, PagedTensor) and table.dim() >= 2 and _rows_can_be_copied(table) and _larger_than_a_piece([table])


def _apart_from(tensor: Any, table: PagedTensor) -> bool:
    """Whether an index op's operand ``tensor`` keeps it off the paths by rows: a tensor of one or
    more dims on another device than ``table``, or a PagedTensor viewing ``table``'s pages (torch's
    overlap checks then decide, the generic way)."""
    return isinstance(tensor, torch.Tensor) and (
        (tensor.dim() > 0 and tensor.device != table.device) or (isinstance(tensor, PagedTensor) and tensor._paged is table._paged)
    )


def _index_op_a_piece_of_rows_at_a_time(func: OpOverload, args: tuple, kwargs: dict) -> Any:
    """``index_copy_``, ``index_add_``, ``index_reduce_`` and ``index_fill_`` along a dim other than
    0 on a PagedTensor larger than a piece: row ``r`` of the table is written from row ``r`` of the
    source alone (each element of ``index_add_`` and ``index_reduce_`` takes its operands in the
    index's order, as in the dense op), so the op
    runs on a piece of rows at a time, torch's own kernel on each. torch's errors come first,
    before any write, from the op on :func:`_overlapping_stand_in` (the table's shape, no memory of
    its size, no page read: every check of torch's, with its text; the meta kernels' texts and
    exception types differ). ``NotImplemented`` for any other form (an index or source on another
    device or a view of the table's pages, a source of another row count) and where a row spans
    more than a piece."""
    if not _a_table_of_several_pieces(args[0] if args else kwargs.get("self")):
        return NotImplemented
    bound = _arguments_by_name(func, args, kwargs)
    table, dim, index = bound["self"], bound["dim"], bound["index"]
    if not isinstance(index, torch.Tensor) or index.device != table.device or _apart_from(index, table):
        return NotImplemented
    filling = "value" in bound
    source = bound["value"] if filling else bound["source"]
    if _apart_from(source, table):
        return NotImplemented
    if isinstance(dim, int) and -table.dim() <= dim < table.dim() and dim % table.dim() == 0:
        return NotImplemented  # along dim 0: the row scatter's own path, where its conditions hold
    count = _rows_a_piece(table)
    if not 0 < count < table.shape[0]:
        return NotImplemented
    index = plain_copy(index)
    source = plain_copy(source)
    options = _options_of(func, bound)
    func(_overlapping_stand_in(table), dim, index, source, **options)  # torch's checks and errors; no page read
    if not filling and (source.dim() != table.dim() or source.shape[0] != table.shape[0]):
        return NotImplemented
    refuse_without_room_for_new_pages(func, [table])  # every piece of rows is written: before the first
    rows = table.shape[0]
    for lo in range(0, rows, count):
        hi = min(rows, lo + count)
        DISPATCHER.run_paged(func, (PagedTensor,), (table[lo:hi], dim, index, source if filling else source[lo:hi]), options)
    return table


def _index_op_of_outermost_first(func: OpOverload, args: tuple, kwargs: dict) -> Any:
    """``index_copy_``, ``index_add_``, ``index_reduce_`` or ``index_fill_`` on a PagedTensor larger
    than a piece whose dim 0 is not the outermost in memory (``t.T.index_copy_(0, i, s)``: each row
    of ``t.T`` spans the table): torch's checks and errors first, on :func:`_overlapping_stand_in`
    (no page read), then the op on ``table.permute(order)``, its dims ordered outermost first (a
    view sharing the pages), along the dim ``dim`` became, a source tensor permuted alike. The same
    elements take the same operands in the same order (the index's), so the table ends bitwise as
    after the dense op; the permuted op runs by rows, or a piece of rows at a time. Returns the
    table; ``None`` for another form (an index or source on another device, or a view of the table's
    pages) or a table whose dim 0 is already the outermost. ``index_put_`` (``t.T[i] = v``,
    ``t.T[mask] = v``, ``t.T[i, j] += v``): :func:`_index_put_of_outermost_first`."""
    table = args[0] if args else kwargs.get("self")
    if not _of_another_outermost_dim(table):
        return None
    order = _outermost_first(table)
    bound = _arguments_by_name(func, args, kwargs)
    if func is aten.index_put_.default:
        return _index_put_of_outermost_first(table, order, bound)
    dim, index = bound["dim"], bound["index"]
    filling = "value" in bound
    source = bound["value"] if filling else bound["source"]
    if not isinstance(dim, int) or not isinstance(index, torch.Tensor) or _apart_from(index, table) or _apart_from(source, table):
        return None
    index, source = plain_copy(index), plain_copy(source)
    options = _options_of(func, bound)
    func(_overlapping_stand_in(table), dim, index, source, **options)  # torch's checks and errors; no page read
    if not filling:
        source = source.permute(order)  # of the table's dims: checked above
    func(table.permute(order), order.index(dim % table.dim()), index, source, **options)
    return table


def _index_put_of_outermost_first(table: PagedTensor, order: list[int], bound: dict) -> Any:
    """``index_put_`` on a table whose dim 0 is not its outermost in memory (``t.T[i] = v``,
    ``t.T[i, j] += v``, ``t.T[mask] = v``): torch's checks and errors first, on
    :func:`_overlapping_stand_in` (no page read); then the same writes on ``table.permute(order)``,
    whose dim 0 is the outermost, by rows there. By one integer index without ``accumulate``, indexed
    at dim 0's place after dims taken whole (``p[:, i] = v'``, a piece of rows at a time), the values
    broadcast to the indexed region and permuted alike; any other form (``accumulate``, several index
    tensors, bool masks) by each written element's coordinates (:func:`_put_by_coordinates`).
    Returns the table; ``None`` for a masked fill (:func:`_as_a_masked_fill`: the row scatter runs
    it in pieces of memory), an index or values on another device, a PagedTensor viewing the table's
    pages, or an index of another dtype than int64, int32 or bool, which take the generic way."""
    indices, values, accumulate = bound["indices"], bound["values"], bound["accumulate"]
    if not indices or not isinstance(values, torch.Tensor) or _apart_from(values, table):
        return None
    if _as_a_masked_fill(aten.index_put_.default, (table, indices, values, accumulate), {}) is not None:
        return None  # t.T[mask] = 0: a masked fill in pieces of memory (scatter_rows), no coordinates
    if any(index is not None and (not isinstance(index, torch.Tensor) or index.dtype not in (torch.int64, torch.int32, torch.bool)
                                  or index.device != table.device or _apart_from(index, table)) for index in indices):  # fmt: skip
        return None
    indices = [None if index is None else plain_copy(index) for index in indices]
    values = plain_copy(values)
    aten.index_put_.default(_overlapping_stand_in(table), indices, values, accumulate)  # torch's checks and errors; no page read
    if accumulate or len(indices) != 1 or indices[0].dtype == torch.bool:
        return table if _put_by_coordinates(table.permute(order), order, indices, values, accumulate) else None
    (index,) = indices
    count = index.dim()
    try:
        spread = values.expand((*index.shape, *table.shape[1:]))  # the indexed region: the index's dims, then dims 1, 2, ...
    except RuntimeError:
        return None  # a broadcast torch allows and expand does not: the generic way
    at = order.index(0)  # dim 0's place in the permuted view
    region_order = [count + order[k] - 1 for k in range(at)] + list(range(count)) + [count + order[k] - 1 for k in range(at + 1, table.dim())]
    aten.index_put_.default(table.permute(order), [None] * at + [index], spread.permute(region_order))
    return table


def _put_by_coordinates(permuted: PagedTensor, order: list[int], indices: list[Optional[torch.Tensor]], values: torch.Tensor,
                        accumulate: bool) -> bool:  # fmt: skip
    """``index_put_(table, indices, values, accumulate)`` (checked by torch already) written into
    ``permuted`` (``table.permute(order)``) by coordinates: each bool mask becomes the index tensors
    of its positions (row-major, as torch takes it), the dims taken whole become ranges, and all of
    them, broadcast to the indexed region as torch lays it out (the index tensors' shape where they
    are adjacent, after the whole dims before them; first where they are apart), give every written
    element's coordinate along each of the table's dims. ``permuted`` takes them in its own dim
    order, with the values broadcast to the region: each element gets the same values in the same
    order (a repeated element's, the order of the region, row-major), written a run of
    ``permuted``'s rows at a time by the row scatter. The coordinates take 8 bytes per written
    element and dim (torch's own masks take as much). False, with nothing written, for values that
    torch broadcasts and ``expand`` does not, and for float sums into an element named more than
    once: the dense op adds them in another order than these runs (CUDA's in its sort's: a row added
    ``1e8``, ``1``, ``-1e8`` came out 1 apart on the H200; the CPU's not one after another either:
    six halves added into a row of a permuted fp32 table differed in the last bit, found by
    hypothesis)."""
    table_shape = [permuted.shape[order.index(d)] for d in range(permuted.dim())]
    per_dim: list[Optional[torch.Tensor]] = []
    for index in indices:
        if index is None:
            per_dim.append(None)
        elif index.dtype == torch.bool:
            per_dim.extend(index.nonzero().unbind(1))
        else:
            per_dim.append(index.to(torch.int64))
    per_dim += [None] * (len(table_shape) - len(per_dim))
    indexed = [d for d, index in enumerate(per_dim) if index is not None]
    places = tuple(torch.broadcast_shapes(*(per_dim[d].shape for d in indexed)))
    adjacent = indexed[-1] - indexed[0] + 1 == len(indexed)
    before = list(range(indexed[0])) if adjacent else []
    after = [d for d, index in enumerate(per_dim) if index is None and d not in before]
    region = (*(table_shape[d] for d in before), *places, *(table_shape[d] for d in after))
    coordinates = []
    for d, index in enumerate(per_dim):
        if index is not None:
            coordinate = index.expand(places)[(None,) * len(before) + (...,) + (None,) * len(after)]
        else:
            axis = before.index(d) if d in before else len(before) + len(places) + after.index(d)
            shape = [1] * len(region)
            shape[axis] = table_shape[d]
            coordinate = torch.arange(table_shape[d], device=permuted.device).view(shape)
        coordinates.append(coordinate.expand(region))
    try:
        spread = values.expand(region)
    except RuntimeError:
        return False
    if accumulate and (permuted.dtype.is_floating_point or permuted.dtype.is_complex) and _repeats(coordinates, table_shape):
        return False  # the dense op's sums of repeated places take another order than these runs' (CUDA's sort on the H200; the CPU's too)
    aten.index_put_.default(permuted, [coordinates[d] for d in order], spread, accumulate)
    return True


def _repeats(coordinates: list[torch.Tensor], shape: Sequence[int]) -> bool:
    """Whether the written elements' ``coordinates`` (one tensor per dim of a table of ``shape``, all
    of one shape) name some element twice."""
    flat = torch.zeros((), dtype=torch.int64, device=coordinates[0].device)
    for coordinate, size in zip(coordinates, shape):
        flat = flat * size + coordinate % size
    flat = flat.reshape(-1)
    return torch.unique(flat).numel() < flat.numel()


def _overlapping_stand_in(table: PagedTensor, shape: Optional[Sequence[int]] = None) -> torch.Tensor:
    """A plain tensor of ``table``'s shape (or ``shape``), dtype and device whose elements overlap
    (every stride 1: as many elements of memory as the sizes' sum): an in-place op on it runs
    torch's own checks, with the table's shape in their messages, without memory of the table's
    size. (A stride of 0 would be refused as internal overlap; overlap of strides 1 is too hard for
    torch to tell, so its kernels run on it, writing elements that mean nothing.)"""
    shape = tuple(table.shape if shape is None else shape)
    span = 1 + sum(max(size - 1, 0) for size in shape)
    return torch.empty(span, dtype=table.dtype, device=table.device).as_strided(shape, (1,) * len(shape))


def _row_scatter_request(func: OpOverload, args: tuple, kwargs: dict) -> Optional[_RowScatter]:
    """The row scatter ``func`` asks for, when it writes whole rows of a PagedTensor along dim 0 by
    one plain index on its device; else ``None``. A PagedTensor index or source is read dense."""
    bound = _arguments_by_name(func, args, kwargs)
    table = bound["self"]
    if not isinstance(table, PagedTensor) or table._inner is not None or table.dim() == 0 or table.numel() == 0:
        return None
    if table.stride(0) == 0 or table.is_conj() or table.is_neg():
        return None
    rest: tuple = ()
    if func is aten.index_put_.default:
        indices = bound["indices"]
        if not indices or not isinstance(indices[0], torch.Tensor) or len(indices) > table.dim():
            return None
        if any(_apart_from(index, table) for index in indices):
            return None  # an index read from the pages written: torch's overlap checks, the generic way
        if not all(index is None or isinstance(index, torch.Tensor) for index in indices[1:]):
            return None
        if len(indices) > 1 and any(index is not None and (index.dtype == torch.uint8 or index.device != table.device) for index in indices):
            return None  # byte masks among several indices, or an index on another device: the generic way
        rest = tuple(plain_copy(index) for index in indices[1:])
        index, source, options = indices[0], bound["values"], {"accumulate": bound["accumulate"]}
    else:
        if bound["dim"] not in (0, -table.dim()):
            return None
        index = bound["index"]
        source = bound["value"] if "value" in bound else bound["source"]
        options = _options_of(func, bound)
    if not isinstance(index, torch.Tensor) or index.device != table.device or _apart_from(index, table):
        return None  # (an index read from the pages written: torch's overlap checks, the generic way)
    if isinstance(source, torch.Tensor) and source.dim() > 0 and source.device != table.device:
        return None
    if isinstance(source, PagedTensor):
        if source._paged is table._paged:
            return None  # another view of the table's pages: torch's overlap checks, the generic way
        source = source.materialize()
    if isinstance(index, PagedTensor):
        index = index.materialize()
    return _RowScatter(func, table, index, source, options, rest)


def _options_of(func: OpOverload, bound: dict) -> dict:
    """The arguments of an index op (``index_copy_``, ``index_add_``, ``index_reduce_``,
    ``index_fill_``) past ``self``, ``dim``, ``index`` and its source, by name."""
    if func is aten.index_add_.default:
        return {"alpha": bound["alpha"]}
    if func is aten.index_reduce_.default:
        return {"reduce": bound["reduce"], "include_self": bound["include_self"]}
    return {}


def _piece_pages(table: PagedTensor) -> int:
    """Pages a run of a row scatter may span: a piece's (:func:`piece_elements_of`), at least one."""
    return max(1, (piece_elements_of([table]) or 1) * table.dtype.itemsize // table._paged.allocation.page_size)


def _index_values(request: _RowScatter) -> Optional[torch.Tensor]:
    """The index's row numbers on the host (int64; negative ones as given), in the index's shape; a
    bool mask over dim 0 as the positions it selects. ``None`` for an index of another dtype or a
    mask of several dims (raises torch's IndexError for a mask of the wrong length)."""
    index = request.index
    if index.dtype in (torch.int64, torch.int32):
        return index.to("cpu", torch.int64)
    if index.dtype != torch.bool or request.func is not aten.index_put_.default or index.dim() != 1:
        return None
    rows_total = request.table.shape[0]
    if index.shape[0] != rows_total:
        raise IndexError(f"The shape of the mask [{index.shape[0]}] at index 0 does not match the shape of the indexed tensor "
                         f"{list(request.table.shape)} at index 0")  # fmt: skip
    return torch.nonzero(index.to("cpu")).flatten()


def _mask_as_positions(request: _RowScatter) -> _RowScatter:
    """``index_put_`` by bool masks (over two or more leading dims, ``t[t > 0] = 0``, or among other
    indices, ``t[mask, j] = v``, ``t[i, mask] = v``) with each mask replaced by the index tensors of
    its positions, as torch takes it (row-major, one per dim it covers); torch's IndexError for a
    mask of another shape than the dims it covers. A 0-dim mask covers no dim and gives no index
    tensor, as in torch's own expansion (its ``nonzero()`` has no columns); where then no index
    tensor is left, torch's kernel's error (an internal assert in torch 2.13) from a one-row stand-in,
    and where the first is a dim taken whole, the request as it is (the generic way). A 1-D mask
    alone (its positions are read by :func:`_index_values`) and any other request as it is."""
    items = [request.index, *request.rest]
    if request.func is not aten.index_put_.default or not any(item is not None and item.dtype == torch.bool for item in items):
        return request
    if len(items) == 1 and request.index.dim() == 1:
        return request
    table = request.table
    expanded: list[Optional[torch.Tensor]] = []
    dim = 0  # the table's dim the next item indexes
    for item in items:
        if item is None or item.dtype != torch.bool:
            expanded.append(item)
            dim += 1
            continue
        if dim + item.dim() > table.dim():
            return request  # torch's own error, the generic way
        if item.dim() == 0:
            continue
        for d in range(item.dim()):
            if item.shape[d] != table.shape[dim + d]:
                raise IndexError(f"The shape of the mask {list(item.shape)} at index {d} does not match the shape of the "
                                 f"indexed tensor {list(table.shape)} at index {dim + d}")  # fmt: skip
        expanded += [column.to(table.device) for column in item.nonzero().unbind(1)]
        dim += item.dim()
    if all(item is None for item in expanded):
        _check_on_a_stand_in(request, request.index, 1)
    if not expanded or expanded[0] is None:
        return request
    return replace(request, index=expanded[0], rest=tuple(expanded[1:]))


def _check_on_a_stand_in(request: _RowScatter, index: torch.Tensor, rows: int) -> None:
    """Run the scatter on an uninitialized plain table of the table's dtype, device and row shape
    with ``rows`` rows (``index`` renumbered to them), raising torch's own error for a wrong shape or
    dtype without reading a page; a message naming the stand-in's shape (``self.shape = [...]``,
    index_add_'s) names the table's."""
    stand_in = torch.empty((rows, *request.table.shape[1:]), dtype=request.table.dtype, device=request.table.device)
    try:
        request.call(stand_in, index, request.source)
    except (RuntimeError, IndexError, TypeError, ValueError) as error:
        stand_in_shape, table_shape = f"self.shape = {list(stand_in.shape)}", f"self.shape = {list(request.table.shape)}"
        if stand_in_shape not in str(error):
            raise
        raise type(error)(str(error).replace(stand_in_shape, table_shape)) from None


def _index_out_of_bounds(func: OpOverload, index: int, rows_total: int, table_dims: int, alpha: Any = 1) -> Exception:
    """The error torch's CPU kernel of ``func`` raises for ``index`` out of dim 0's bounds of a table
    of ``table_dims`` dims (for ``index_add_``, with ``alpha``)."""
    message = f"index {index} is out of bounds for dimension 0 with size {rows_total}"
    if func is aten.index_copy_.default:
        return IndexError(f"index_copy_(): {message}")
    if func is aten.index_add_.default and table_dims > 1 and alpha == 1:
        return RuntimeError(message)
    if func in (aten.index_reduce_.default, aten.index_add_.default):  # a 1-D table's index_add_, or alpha not 1, too
        return IndexError("index out of range in self")
    return IndexError(message)


_NOT_BY_POSITION = object()


def _source_by_position(request: _RowScatter, places_shape: Sequence[int]) -> Any:
    """``(source, by_place)``: the source as one row per index place (flattened over
    ``places_shape``, the shape of the index tensors broadcast, or for a 1-D mask its count) with
    ``by_place`` true, each run taking its places' rows; or with ``by_place`` false a source every
    run takes as it is (a value, or a source broadcast along the places, kept to one leading dim of
    one row); or :data:`_NOT_BY_POSITION` for a source of a form not handled here. Called after
    torch's checks passed."""
    source = request.source
    if not isinstance(source, torch.Tensor) or source.dim() == 0 or request.func.overloadpacket is aten.index_fill_:
        return source, False  # a value filled into every row
    if request.func is not aten.index_put_.default:
        return (source, True) if source.dim() == request.table.dim() else _NOT_BY_POSITION
    # index_put_: values broadcast to the indexing result, (*index places, *shape of the dims not indexed).
    lead = len(places_shape)
    indexed_dims = lead + request.table.dim() - 1 - sum(index is not None for index in request.rest)
    if source.dim() > indexed_dims:
        return _NOT_BY_POSITION
    padded = source[(None,) * (indexed_dims - source.dim())]
    if lead == 0:
        return request.source, False  # one place: the source as it is
    if all(size == 1 for size in padded.shape[:lead]):
        return padded.flatten(0, lead - 1), False  # one row, broadcast to every place of a run
    return padded.expand(*places_shape, *padded.shape[lead:]).flatten(0, lead - 1), True


def _runs_of_rows(table: PagedTensor, rows: torch.Tensor) -> Optional[list[tuple[int, int]]]:
    """Rows ``[lo, hi)`` of each run of the sorted distinct ``rows``: rows on adjacent pages (no page
    between them that no row touches), the run spanning at most :func:`_piece_pages` pages; ``None``
    when one row alone spans more (a transposed table's row reaches across the table)."""
    page_size = table._paged.allocation.page_size
    starts, ends = _row_byte_spans(table, rows)
    first_pages = (starts // page_size).tolist()
    last_pages = ((ends - 1) // page_size).tolist()
    limit = _piece_pages(table)
    if any(last - first + 1 > limit for first, last in zip(first_pages, last_pages)):
        return None
    row_numbers = rows.tolist()
    runs: list[tuple[int, int]] = []
    run_start = 0
    for place in range(1, len(row_numbers) + 1):
        ends_run = place == len(row_numbers) or first_pages[place] > last_pages[place - 1] + 1 \
            or last_pages[place] - first_pages[run_start] + 1 > limit  # fmt: skip
        if ends_run:
            runs.append((row_numbers[run_start], row_numbers[place - 1] + 1))
            run_start = place
    return runs


@implements([aten.embedding_renorm_.default])
def renorm_rows(func: OpOverload, types: tuple, args: tuple, kwargs: dict) -> Any:
    """``embedding_renorm_`` (what ``nn.Embedding(max_norm=...)`` runs on its weight before each
    lookup) of a PagedTensor larger than a piece: only the pages of the rows its indices name fault
    in, a run of them at a time (:func:`_runs_of_rows`), torch's own kernel on each run's rows.

    torch's kernel takes the distinct index values in sorted order and scales each one's row (a
    negative value counts from the end, so ``-1`` and the last row's number are two values, and that
    row is scaled twice); rows are independent, so each run gets its own values renumbered to its
    rows (a negative value to the same negative distance from the run's end), in the same order, and
    the table ends bitwise as after the dense op. torch's checks first, with its errors, on a
    one-row stand-in (no page read): the table's dims, the index dtype, and a table dtype ``norm``
    refuses. An index out of range raises torch's error before any row is written (the dense op
    scales the rows sorted before it first). A table that fits in a piece, or of another form,
    runs the generic way.

    Note:
        Reads the index tensor on the host (a sync when it lives on the GPU), as a row gather does.
    """
    bound = _arguments_by_name(func, args, kwargs)
    table, indices = bound["self"], bound["indices"]
    if (not isinstance(table, PagedTensor) or table.dim() != 2 or not _rows_can_be_copied(table) or not isinstance(indices, torch.Tensor)
            or indices.device != table.device or (isinstance(indices, PagedTensor) and indices._paged is table._paged)
            or not _larger_than_a_piece([table])):  # fmt: skip
        return DISPATCHER.run_paged(func, types, args, kwargs)
    options = (bound["max_norm"], bound["norm_type"])
    given = plain_copy(indices)
    stand_in = torch.zeros((1, table.shape[1]), dtype=table.dtype, device=table.device)
    func(stand_in, given.reshape(-1)[:1].clamp(0, 0) if given.dtype in (torch.int64, torch.int32) else given, *options)
    values = torch.unique(given.reshape(-1).cpu(), sorted=True)  # the kernel's distinct sorted values
    rows_total = table.shape[0]
    out_of_range = values[(values < -rows_total) | (values >= rows_total)]
    if out_of_range.numel():
        raise IndexError(f"select(): index {int(out_of_range[0])} out of range for tensor of size {list(table.shape)} at dimension 0")
    rows = torch.where(values < 0, values + rows_total, values)
    runs = _runs_of_rows(table, torch.unique(rows))
    if runs is None:
        return DISPATCHER.run_paged(func, types, args, kwargs)
    refuse_without_room_for_new_pages(func, [table.narrow(0, lo, hi - lo) for lo, hi in runs])  # before the first run
    for lo, hi in runs:
        in_run = (rows >= lo) & (rows < hi)
        local = torch.where(values[in_run] < 0, values[in_run] + rows_total - hi, values[in_run] - lo)
        DISPATCHER.run_paged(func, types, (table.narrow(0, lo, hi - lo), local.to(table.device, given.dtype), *options), {})
    return table


@implements([aten.masked_scatter_.default])
def masked_scatter_rows(func: OpOverload, types: tuple, args: tuple, kwargs: dict) -> Any:
    """``t.masked_scatter_(mask, source)`` of a PagedTensor larger than a piece whose rows along dim 0
    advance in memory: only the pages of the rows the mask marks fault in, a run of them at a time
    (:func:`_runs_of_rows`). The op writes ``source``'s elements in order into the marked places in
    row-major order, so each run takes the run of source elements that its rows' marks begin at
    (counted on the host from the marks of the rows before), torch's own kernel on each: the table
    ends bitwise as after the dense op. torch's errors come first, before any page faults in: a mask
    that is not bool or does not broadcast to the table, a source of another dtype, a source with
    fewer elements than the marks. On a table whose dim 0 is not its outermost in memory (``t.T``:
    one row spans the table) the op is ``t[marks] = source[:count]``, the same writes, which
    :func:`scatter_rows` runs by coordinates on the table's view of dims outermost first. A table
    that fits in a piece, or of another form, runs the generic way.

    Note:
        Reads the mask's marks per row on the host (a sync when it lives on the GPU).
    """
    bound = _arguments_by_name(func, args, kwargs)
    table, mask, source = bound["self"], bound["mask"], bound["source"]
    if (isinstance(table, PagedTensor) and table.dim() == 1 and isinstance(mask, torch.Tensor) and mask.dim() <= 1
            and mask.numel() in (1, table.numel())):  # fmt: skip
        # A vector: as a column, whose rows are its elements, marked in the same order.
        func(table.unsqueeze(1), mask.expand(table.shape).unsqueeze(1), source)
        return table
    if (not isinstance(table, PagedTensor) or not isinstance(mask, torch.Tensor) or not isinstance(source, torch.Tensor)
            or mask.device != table.device or source.device != table.device
            or not (_a_table_of_several_pieces(table) or _of_another_outermost_dim(table))
            or any(isinstance(t, PagedTensor) and t._paged is table._paged for t in (mask, source))):  # fmt: skip
        return DISPATCHER.run_paged(func, types, args, kwargs)
    refuse_internal_overlap(func, table)
    mask, source = plain_copy(mask), plain_copy(source)
    one = torch.empty(1, dtype=table.dtype, device=table.device)
    func(one, torch.zeros(1, dtype=mask.dtype, device=mask.device), source.reshape(-1)[:1])  # mask and source dtypes: torch's errors
    marks = mask.expand(table.shape)  # torch's error for a mask that does not broadcast
    per_row = marks.sum(dim=tuple(range(1, table.dim()))).cpu()  # (a table of several pieces has 2 dims or more)
    if int(per_row.sum()) > source.numel():
        raise RuntimeError("Number of elements of source < number of ones in mask")
    if _of_another_outermost_dim(table):  # t.T.masked_scatter_(m, s): the marks' places by coordinates
        aten.index_put_.default(table, [marks], source.reshape(-1)[: int(per_row.sum())])
        return table
    rows = per_row.nonzero().flatten()
    runs = _runs_of_rows(table, rows)
    if runs is None:
        return DISPATCHER.run_paged(func, types, args, kwargs)
    starts = torch.cumsum(per_row, 0) - per_row  # the source element each row's marks begin at
    flat = source.reshape(-1)
    refuse_without_room_for_new_pages(func, [table.narrow(0, lo, hi - lo) for lo, hi in runs])  # before the first run
    for lo, hi in runs:
        begin, end = int(starts[lo]), int(starts[hi - 1] + per_row[hi - 1])
        DISPATCHER.run_paged(func, types, (table.narrow(0, lo, hi - lo), marks.narrow(0, lo, hi - lo), flat[begin:end]), {})
    return table


@implements([aten.put_.default])
def put_elements(func: OpOverload, types: tuple, args: tuple, kwargs: dict) -> Any:
    """``t.put_(index, source, accumulate)`` into a PagedTensor larger than a piece: the elements at
    the flat (row-major) positions ``index`` names, as ``t[coordinates] = source`` (``index_put_`` by
    each position's coordinates, :func:`scatter_rows`: only the pages of their rows fault in, a run
    at a time; on a table whose dim 0 is not its outermost, by rows of its view of dims outermost
    first). torch's checks and errors come first, on :func:`_overlapping_stand_in` (no page read):
    dtypes, the source's element count, positions out of range. Each element gets the same
    values in the same order as torch's CPU kernel gives it (repeated positions with
    ``accumulate``: in the index's order); CUDA's ``put_`` adds repeated positions by atomics, in
    no fixed order, where this adds them in the index's. A table that fits in a piece, or an index
    or source on another device or viewing the table's pages, runs the generic way."""
    bound = _arguments_by_name(func, args, kwargs)
    table, index, source, accumulate = bound["self"], bound["index"], bound["source"], bound["accumulate"]
    if (not isinstance(table, PagedTensor) or table._inner is not None or table.dim() == 0 or table.numel() == 0
            or table.is_conj() or table.is_neg() or not isinstance(index, torch.Tensor) or not isinstance(source, torch.Tensor)
            or index.device != table.device or _apart_from(index, table) or _apart_from(source, table)
            or not _larger_than_a_piece([table])):  # fmt: skip
        return DISPATCHER.run_paged(func, types, args, kwargs)
    refuse_internal_overlap(func, table)  # the stand-in has no stride 0
    index, source = plain_copy(index), plain_copy(source)
    func(_overlapping_stand_in(table), index, source, accumulate)  # torch's checks and errors; no page read
    positions = index.reshape(-1)
    positions = torch.where(positions < 0, positions + table.numel(), positions)
    coordinates = torch.unravel_index(positions, table.shape)
    aten.index_put_.default(table, list(coordinates), source.reshape(-1), accumulate)
    return table


@implements([aten.scatter_.src, aten.scatter_.value, aten.scatter_add_.default, aten.scatter_reduce_.two, aten.scatter_.reduce,
             aten.scatter_.value_reduce])  # fmt: skip
def scatter_elements(func: OpOverload, types: tuple, args: tuple, kwargs: dict) -> Any:
    """``scatter_`` (of a source or a value), ``scatter_add_`` and the reductions ``scatter_reduce_``
    (``sum``, ``prod``, ``mean``, ``amax``, ``amin``, with or without ``include_self``) and
    ``scatter_(..., reduce=...)`` into a PagedTensor: the generic way
    while it fits in one piece; past that, torch's own kernel on parts of the table, so each element
    written gets the dense op's values, in its order and its arithmetic (``scatter_add_`` of
    half-precision floats on the CPU sums in float and rounds once; ``index_put_`` would not):

    - along dim 0, the distinct rows the index names are copied into a compact table (plain
      memory, as large as those rows; only their pages fault in), the op runs on it with the index
      renumbered, and the rows are copied back (``index_copy_``: only their pages are written);
    - along another dim, row ``r`` of the index writes row ``r`` of the table alone: the op runs on
      a piece of rows at a time (the table's, the index's and the source's), each a narrowed view.

    torch's checks run first, with torch's errors and before any page moves: shapes and dtypes by
    ``func`` itself on stand-ins of the same shapes that hold one element (no page read), bounds on
    the index's values. Which value an element written twice by ``scatter_`` keeps is left undefined
    by torch. A table whose rows (dim 0) each span more than a piece raises :class:`OutOfPagesError`.

    Note:
        Reads the index on the host (a sync when it lives on the GPU).
    """
    table = args[0]
    if len(args) < 4 or not isinstance(table, PagedTensor) or table.dim() == 0 or not _larger_than_a_piece([table]):
        return DISPATCHER.run_paged(func, types, args, kwargs)
    dim, index, source = args[1], args[2], args[3]
    if not isinstance(dim, int) or not isinstance(index, torch.Tensor) or not _rows_can_be_copied(table):
        return DISPATCHER.run_paged(func, types, args, kwargs)
    if _apart_from(source, table) or _apart_from(index, table):
        return DISPATCHER.run_paged(func, types, args, kwargs)  # a view of the table's own pages: torch's overlap checks
    reduction = args[4:]  # scatter_reduce_'s reduce (its include_self, and scatter_'s reduce, are in kwargs)
    _check_scatter_on_stand_ins(func, table, dim, index, source, reduction, kwargs)
    index = plain_copy(index)
    source = plain_copy(source)
    if index.numel() == 0:
        return table
    dim %= table.dim()
    given = index.reshape(-1).to("cpu", torch.int64)
    bad = given[(given < 0) | (given >= table.shape[dim])]
    if bad.numel():
        raise RuntimeError(f"index {int(bad[0])} is out of bounds for dimension {dim} with size {table.shape[dim]}")
    count = _rows_a_piece(table)
    if count == 0:  # a row spans more than a piece: OutOfPagesError, naming func (not the write-back's index_copy_)
        return DISPATCHER.run_paged(func, types, args, kwargs)
    if dim == 0:
        rows, renumbered = torch.unique(given, sorted=True, return_inverse=True)
        runs = _runs_of_rows(table, rows)  # the runs the write-back's index_copy_ writes: checked before the rows are read
        refuse_without_room_for_new_pages(func, [table] if runs is None else [table.narrow(0, lo, hi - lo) for lo, hi in runs])
        with table._paged.write_lock:  # from the read of the rows to their write-back: writers take turns
            compact = _rows_compacted(table, rows)
            func(compact, 0, renumbered.reshape(index.shape).to(index.device), source, *reduction, **kwargs)
            aten.index_copy_.default(table, 0, rows.to(table.device), compact)
        return table
    refuse_without_room_for_new_pages(func, [table.narrow(0, 0, index.shape[0])])  # its pieces of rows: before the first
    for lo in range(0, index.shape[0], count):
        hi = min(index.shape[0], lo + count)
        piece_source = source[lo:hi] if isinstance(source, torch.Tensor) and source.dim() > 0 else source
        func(table[lo:hi], dim, index[lo:hi], piece_source, *reduction, **kwargs)
    return table


def _check_scatter_on_stand_ins(func: OpOverload, table: PagedTensor, dim: int, index: torch.Tensor, source: Any,
                                reduction: tuple = (), options: Optional[dict] = None) -> None:  # fmt: skip
    """torch's errors for the shapes, dims, dtypes and options of a scatter, from ``func`` run on
    stand-ins: of the table, :func:`_overlapping_stand_in` (its shape, no memory of its size: every
    check of torch's runs, then its kernel, on elements that mean nothing), of the index, zeros of
    its shape on its own device, of a source, one element expanded to its shape. No page is read."""
    source_stand_in = torch.zeros((), dtype=source.dtype, device=source.device).expand(source.shape) if isinstance(source, torch.Tensor) else source
    index_stand_in = torch.zeros(index.shape, dtype=index.dtype, device=index.device)
    func(_overlapping_stand_in(table), dim, index_stand_in, source_stand_in, *reduction, **(options or {}))
