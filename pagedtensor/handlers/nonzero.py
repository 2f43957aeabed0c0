"""The handler of ``nonzero`` (``torch.nonzero``, ``torch.argwhere``, ``torch.where(cond)``) of a
PagedTensor larger than a piece of the device tier: a piece of rows along dim 0 at a time.
"""

from __future__ import annotations

from typing import Any

import torch
from torch._ops import OpOverload

from pagedtensor.dispatch import DISPATCHER, aten, implements
from pagedtensor.handlers.parts import _larger_than_a_piece
from pagedtensor.handlers.row_gathers import _empty_laid_out_as, _rows_a_piece, _rows_can_be_copied
from pagedtensor.pieces import resize_out_as
from pagedtensor.tensor import PagedTensor


@implements([aten.nonzero.default])
def nonzero_in_row_pieces(func: OpOverload, types: tuple, args: tuple, kwargs: dict) -> Any:
    """``nonzero`` of a PagedTensor larger than a piece whose rows along dim 0 advance in memory
    (dim 0 outermost): the indices of the nonzero elements in row-major order, so the op on each
    piece of rows in turn (only its pages faulted in, torch's own kernel), each piece's first
    column shifted by its first row, gives the dense op's rows in the dense op's order; the result
    is laid out as the dense op lays it (its kernel run on a stand-in of two elements a dim). A table
    that fits in a piece, or whose dim 0 is not outermost (a transposed table: one row spans the
    table), runs the generic way; a contiguous table whose rows are each wider than a piece runs
    flat, its indices then turned into coordinates.

    Note:
        Each piece's count of nonzero elements is read on the host (on a GPU a sync a piece, as the
        dense op syncs once).
    """
    table = args[0]
    if not isinstance(table, PagedTensor) or kwargs or table.dim() == 0 or not _rows_can_be_copied(table) or not _larger_than_a_piece([table]):
        return DISPATCHER.run_paged(func, types, args, kwargs)
    count = _rows_a_piece(table)
    rows = table.shape[0]
    if count == 0 and table.dim() > 1 and table.is_contiguous():
        # Rows wider than a piece: the table flat, a piece of elements at a time, each flat index
        # then its coordinates (row-major, as the flat order is).
        flat = nonzero_in_row_pieces(func, types, (table.view(-1),), {})[:, 0]
        parts = [torch.stack(torch.unravel_index(flat, tuple(table.shape)), dim=1)]
    elif not 0 < count < rows:
        return DISPATCHER.run_paged(func, types, args, kwargs)
    else:
        parts = []
        for start in range(0, rows, count):
            part = DISPATCHER.run_paged(func, types, (table.narrow(0, start, min(count, rows - start)),), {})
            part[:, 0] += start
            parts.append(part)
    result = _empty_laid_out_as(func(_stand_in(table)), (sum(part.shape[0] for part in parts), table.dim()))
    place = 0
    for part in parts:
        result[place : place + part.shape[0]] = part
        place += part.shape[0]
    return result


def _stand_in(table: PagedTensor) -> torch.Tensor:
    """A plain tensor of ``table``'s dims, dtype and device, two elements along dim 0 and one along
    each other, all nonzero: the kernel's result on it, two rows of coordinates, shows how the kernel
    lays out its indices (two along every dim took 2**dims elements: 3.6 GB at 24 dims)."""
    return torch.ones((2,) + (1,) * (table.dim() - 1) if table.dim() else (), dtype=table.dtype, device=table.device)


@implements([aten.nonzero.out])
def nonzero_into_out(func: OpOverload, types: tuple, args: tuple, kwargs: dict) -> Any:
    """``torch.nonzero(t, out=o)`` of a PagedTensor larger than a piece: :func:`nonzero_in_row_pieces`,
    then ``o``, where its shape is not the result's, resized as torch's kernel resizes it (with its
    warning where it has elements), and written; an ``o`` of another dtype or device raises torch's error first. Any
    other call runs the generic way."""
    table, out = args[0], kwargs.get("out")
    if (not isinstance(table, PagedTensor) or isinstance(out, PagedTensor) or not isinstance(out, torch.Tensor)
            or len(args) != 1 or set(kwargs) != {"out"} or not _larger_than_a_piece([table])):  # fmt: skip
        return DISPATCHER.run_paged(func, types, args, kwargs)
    # The kernel on a stand-in: torch's error for an ``out`` of another dtype or device, before anything
    # is read; else how it lays out an out= (the CPU's: column-major).
    probe = torch.empty(0, dtype=out.dtype, device=out.device)
    func(_stand_in(table), out=probe)
    result = nonzero_in_row_pieces(aten.nonzero.default, types, (table,), {})
    resize_out_as(out, _empty_laid_out_as(probe, tuple(result.shape)))  # (one of the result's shape: as it is)
    return out.copy_(result)
