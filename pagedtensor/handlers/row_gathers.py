"""The handler of dim-0 row gathers (``index_select`` on dim 0, ``embedding``, ``index.Tensor`` with
one index tensor on dim 0): only the pages holding the selected rows fault in, run by run.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch._ops import OpOverload
from torch._prims_common import make_contiguous_strides_for

from pagedtensor.dispatch import DISPATCHER, _row_byte_spans, _Window, aten, implements
from pagedtensor.errors import OutOfPagesError
from pagedtensor.tensor import PagedTensor, _pending_frees, drain_pending_frees, element_span, meta_like


@implements([aten.index_select.default, aten.embedding.default, aten.index.Tensor])
def gather_rows(func: OpOverload, types: tuple, args: tuple, kwargs: dict) -> Any:
    """Select rows along dim 0: fault in only the pages holding the selected rows.

    The distinct rows are copied, one run of adjacent pages at a time, into a compact table; the op
    then runs on that table with the indices renumbered, so its result is bitwise the dense one.
    Any other form of the op (another dim, a mask, several index tensors) runs the generic way.

    Note:
        Reads the index tensor on the host (a sync when it lives on the GPU).
    """
    request = _row_request(func, args, kwargs)
    if request is None:
        return DISPATCHER.run_paged(func, types, args, kwargs)
    table, index = request
    if func is aten.index_select.default and index.dim() > 1:  # torch's check, which its meta kernel lacks
        raise IndexError(f"PagedTensor: {func}: index_select(): Index is supposed to be a vector, got {index.dim()} dims")
    if index.dtype not in (torch.int64, torch.int32):
        # torch's own kernel raises torch's own error (an IndexError for aten.index; the meta
        # kernel raises a RuntimeError) or takes the dtype after all.
        return DISPATCHER.run_paged(func, types, args, kwargs)
    if index.numel() == 0:
        return _gather_of_no_rows(func, table, index)
    rows_total = table.shape[0]
    flat = index.reshape(-1).to("cpu", torch.int64)
    if func is aten.index.Tensor:
        flat = torch.where(flat < 0, flat + rows_total, flat)
    bad = flat[(flat < 0) | (flat >= rows_total)]
    if bad.numel():  # checked here, before any page faults in (and before a CUDA kernel could assert)
        raise IndexError(f"PagedTensor: {func}: index {int(bad[0])} is out of bounds for dimension 0 with size {rows_total}")
    copied = _whole_rows_copied(func, table, index, flat)
    if copied is not None:
        return copied
    rows, inverse = torch.unique(flat, sorted=True, return_inverse=True)
    itemsize, page_size = table.dtype.itemsize, table._paged.allocation.page_size
    row_size, row_stride = tuple(table.shape[1:]), table.stride()[1:]
    step = table.stride(0)
    starts, ends = _row_byte_spans(table, rows)
    first_pages, last_pages = starts // page_size, (ends - 1) // page_size
    breaks = (torch.nonzero(first_pages[1:] > last_pages[:-1] + 1).flatten() + 1).tolist()
    bounds = [0, *breaks, rows.numel()]
    if _pending_frees:
        drain_pending_frees()
    device = table.device
    parts = []
    for a, b in zip(bounds, bounds[1:]):
        run_rows = rows[a:b]
        first_row = int(run_rows[0])
        try:
            window = _Window(table._paged, int(starts[a]), int(ends[b - 1]))
        except OutOfPagesError:  # a run larger than the device tier beside the pinned pages: read in chunks
            block = DISPATCHER.materialize(table[first_row : int(run_rows[-1]) + 1])
            parts.append(block.index_select(0, (run_rows - first_row).to(device)))
            continue
        try:
            typed = window.typed(table.dtype)
            block = typed.as_strided(
                (int(run_rows[-1]) - first_row + 1, *row_size),
                (step, *row_stride),
                typed.storage_offset() + table._offset + first_row * step - window.first_byte // itemsize,
            )
            parts.append(block.index_select(0, (run_rows - first_row).to(device)))
        finally:
            window.release()
    compact = parts[0] if len(parts) == 1 else torch.cat(parts)
    renumbered = inverse.reshape(index.shape).to(index.device if func is aten.index.Tensor else device)
    result = _call_with_table(func, compact, renumbered)
    # The dense op lays its result out after the table's strides: the same layout, exactly.
    layout = _result_layout_of_rows(func, table, index)
    if result.stride() != layout.stride():
        result = torch.empty_strided(layout.shape, layout.stride(), dtype=result.dtype, device=result.device).copy_(result)
    return result


def _gather_of_no_rows(func: OpOverload, table: PagedTensor, index: torch.Tensor) -> torch.Tensor:
    """The result of a row gather by an empty index, no page read: torch's own kernel run on a
    stand-in table of no rows and no bytes with the table's strides. (The meta kernel of
    ``aten.index`` lays such a result out otherwise than the CPU/CUDA kernels: ``t[empty]`` of a
    ``(5, 1, 3)`` table has strides ``(3, 0, 1)`` on the CPU, ``(3, 3, 1)`` on meta, and a
    channels-last table's differ in every dim.)"""
    stand_in = torch.empty(0, dtype=table.dtype, device=table.device).as_strided((0, *table.shape[1:]), table.stride())
    return _call_with_table(func, stand_in, index)



MAX_ROWS_COPIED_ONE_BY_ONE = 64
"""A row gather of at most this many rows, each a page or more, copies each row on its own."""


def _whole_rows_copied(func: OpOverload, table: PagedTensor, index: torch.Tensor, flat: torch.Tensor) -> Optional[torch.Tensor]:
    """The result of a row gather of large rows (a page or more each: a stack of expert matrices
    indexed by the experts a token is routed to), built by copying each selected row's bytes from
    its pages straight into the result: one copy a row, where the general way copies a row up to
    four times (a gather of scattered slots, the selection, the concatenation of runs, the op);
    a row selected again is copied from its first place. A row larger than the device tier beside
    the pinned pages is read in chunks. ``None`` where this does not apply: an index that is not
    1-D or selects more than :data:`MAX_ROWS_COPIED_ONE_BY_ONE` rows, rows smaller than a page or
    not dense in memory, or a result whose layout is not contiguous.

    Note:
        The copies run on the current stream, each row's pages pinned until its copy is enqueued.
    """
    count = flat.numel()
    if index.dim() != 1 or count > MAX_ROWS_COPIED_ONE_BY_ONE:
        return None
    row_size, row_stride = tuple(table.shape[1:]), table.stride()[1:]
    row_bytes = math.prod(row_size) * table.dtype.itemsize
    if row_bytes < table._paged.allocation.page_size or tuple(row_stride) != tuple(make_contiguous_strides_for(row_size)):
        return None
    layout = _result_layout_of_rows(func, table, index)
    if not layout.is_contiguous():
        return None
    result = torch.empty(layout.shape, dtype=table.dtype, device=table.device)
    rows = result.view(-1).view(torch.uint8).view(count, row_bytes)
    if _pending_frees:
        drain_pending_frees()
    first_place: dict[int, int] = {}
    for place, row in enumerate(flat.tolist()):
        if row in first_place:
            rows[place].copy_(rows[first_place[row]])
            continue
        first_place[row] = place
        lo = (table._offset + row * table.stride(0)) * table.dtype.itemsize
        try:
            window = _Window(table._paged, lo, lo + row_bytes, gather=False)
        except OutOfPagesError:  # a row larger than the device tier beside the pinned pages: read in chunks
            rows[place].copy_(DISPATCHER.materialize(table[row]).reshape(-1).view(torch.uint8))
            continue
        try:
            window.copy_into(lo, lo + row_bytes, rows[place])
        finally:
            window.release()
    return result


def _result_layout_of_rows(func: OpOverload, table: PagedTensor, index: torch.Tensor) -> torch.Tensor:
    """A tensor with the layout the dense op gives its result. The meta kernel of ``aten.index``
    lays a result out contiguously where the CPU/CUDA kernels follow a non-contiguous index's
    strides (``t[idx.T]``): for such an index the real kernel runs on a one-row stand-in with the
    table's row layout and a zero index with the index's layout (its result is as large as the op's)."""
    if func is not aten.index.Tensor or index.is_contiguous():
        return _call_with_table(func, meta_like(table), index.to("meta"))
    row_size, row_stride = tuple(table.shape[1:]), table.stride()[1:]
    row_reach = element_span(row_size, row_stride, 0)[1]
    stand_in = torch.empty(max(1, row_reach), dtype=table.dtype, device=table.device).as_strided((1, *row_size), (1, *row_stride))
    index_reach = element_span(tuple(index.shape), index.stride(), 0)[1]
    zeros = torch.zeros(max(1, index_reach), dtype=index.dtype, device=index.device).as_strided(index.shape, index.stride())
    return _call_with_table(func, stand_in, zeros)


def _call_with_table(func: OpOverload, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    if func is aten.index_select.default:
        return func(table, 0, index)
    if func is aten.embedding.default:
        return func(table, index)
    return func(table, [index])


def _row_request(func: OpOverload, args: tuple, kwargs: dict) -> Optional[tuple[PagedTensor, torch.Tensor]]:
    """``(table, index)`` when ``func`` selects whole rows of a PagedTensor along dim 0, else ``None``."""
    if kwargs:
        return None
    table = args[0]
    if func is aten.index_select.default:
        dim, index = args[1], args[2]
        if not isinstance(table, PagedTensor) or table.dim() == 0 or dim not in (0, -table.dim()):
            return None
        if not isinstance(index, torch.Tensor) or index.device != table.device:
            return None
    elif func is aten.embedding.default:
        index = args[1]
        if not isinstance(table, PagedTensor) or table.dim() != 2 or not isinstance(index, torch.Tensor):
            return None
        if index.device != table.device:
            return None
    else:
        indices = args[1]
        if not isinstance(table, PagedTensor) or table.dim() == 0 or not indices or not isinstance(indices[0], torch.Tensor):
            return None
        if any(item is not None for item in indices[1:]):
            return None
        index = indices[0]
    if table._inner is not None or table.numel() == 0 or table.stride(0) == 0 or table.is_conj() or table.is_neg():
        return None
    if isinstance(index, PagedTensor):
        index = index.materialize()
    if func is aten.index.Tensor and index.dtype in (torch.bool, torch.uint8):
        return None  # a mask, not row numbers
    return table, index
