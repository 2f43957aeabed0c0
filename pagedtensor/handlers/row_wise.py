"""The handler of ops computed row by row: ``softmax`` and ``log_softmax`` over the last dim and
``layer_norm`` (``native_layer_norm``) over trailing dims. Each runs the generic way while its pages
fit on the device tier at once; past it, on a table whose dim 0 is its outermost in memory (and not a
dim the op computes along), a piece of rows along dim 0 at a time
(:func:`~pagedtensor.handlers.row_gathers._rows_a_piece`), each piece torch's own kernel on a
PagedTensor view of those rows, copied into its rows of plain results laid out as the dense op's.

Each result row of these kernels is computed from its input row alone, the same way whatever rows
are beside it: on the CPU a row's loop (the last dim's vectorized loop of ``softmax``, the row's
moments of ``layer_norm``), threads split by rows; on CUDA a warp or a block per row (``softmax``
over the last dim, which is its ``inner_size == 1`` path) and a block per row (``layer_norm``),
their vectorized variants chosen by the row length and the data's alignment, which a piece of rows
keeps where the rows are 16-byte multiples (and where they are not, neither takes them). So the
results are bitwise the dense op's. ``softmax`` over another dim is not among them: its CPU kernel
vectorizes across the outer rows (a piece of them rounds otherwise: 36 of 1,500 random shapes), and
it raises :class:`~pagedtensor.errors.OutOfPagesError` past the tier as before, as does any form not
run by rows here (a transposed table, a row larger than a piece, ``layer_norm`` over every dim).

Note:
    Stream order is each piece's op's: the pieces run one after another on the current stream.
"""

from __future__ import annotations

from typing import Any

import torch
from torch._ops import OpOverload

from pagedtensor.dispatch import DISPATCHER, _OpTooLarge, aten, implements
from pagedtensor.handlers.parts import _arguments_by_name, _meta
from pagedtensor.handlers.row_gathers import _dense, _empty_laid_out_as, _rows_a_piece, _stand_in_of_rows
from pagedtensor.handlers.row_moves import _runs_in_row_pieces
from pagedtensor.tensor import PagedTensor

_SOFTMAXES = (aten._softmax.default, aten._log_softmax.default)


@implements([*_SOFTMAXES, aten.native_layer_norm.default])
def run_by_rows(func: OpOverload, types: tuple, args: tuple, kwargs: dict) -> Any:
    """``softmax`` / ``log_softmax`` over the last dim and ``layer_norm`` over trailing dims: the
    generic way while the pages fit; past the tier, torch's errors first (:func:`_probe`), then a
    piece of rows at a time (see the module docstring) into plain results laid out as the op lays
    out its result on a plain table of two rows (its dtypes too: the CPU ``layer_norm`` of halves
    gives mean and rstd in halves, CUDA's in floats). ``layer_norm``'s weight and bias are read
    once, as plain tensors, where they are paged. Forms not run by rows re-raise the
    :class:`~pagedtensor.errors.OutOfPagesError`."""
    try:
        return DISPATCHER.run_paged(func, types, args, kwargs)
    except _OpTooLarge:
        bound = _arguments_by_name(func, args, kwargs)
        table = bound["self"] if func in _SOFTMAXES else bound["input"]
        if not isinstance(table, PagedTensor) or table._inner is not None or table.dim() < 2 or table.is_conj() or table.is_neg():
            raise
        rest = [_dense(bound[argument.name]) for argument in func._schema.arguments[1:]]  # a paged weight or bias read once
        if func is aten.native_layer_norm.default and len(rest[0]) >= table.dim():
            func(*_meta([table, *rest]))  # over every dim: torch's checks (the meta kernel's), else the pager's error
            raise
        probes = _probe(func, table, rest)
        if not _by_rows(func, table, rest):
            raise
    rows = table.shape[0]
    results = [_empty_laid_out_as(probe, (rows, *probe.shape[1:])) for probe in probes]
    count = _rows_a_piece(table)
    for start in range(0, rows, count):
        stop = min(rows, start + count)
        pieces = func(table[start:stop], *rest)
        for result, piece in zip(results, pieces if isinstance(pieces, tuple) else (pieces,)):
            result[start:stop].copy_(piece)
    return tuple(results) if func is aten.native_layer_norm.default else results[0]


def _probe(func: OpOverload, table: PagedTensor, rest: list) -> list[torch.Tensor]:
    """The op's results on a plain stand-in of two of the table's rows (values unset, no page read):
    torch's own checks and errors (the stand-in's shape in a message named as the table's: the op
    computes along dims other than dim 0, so its checks are the table's), and the dtypes and layouts
    of the dense op's results, but for their row count."""
    stand_in = _stand_in_of_rows(table, 2)
    try:
        probe = func(stand_in, *rest)
    except Exception as error:
        raise type(error)(str(error).replace(str(list(stand_in.shape)), str(list(table.shape)))) from None
    return list(probe) if isinstance(probe, tuple) else [probe]


def _by_rows(func: OpOverload, table: PagedTensor, rest: list) -> bool:
    """Whether the op (its arguments checked) runs a piece of rows at a time: some elements, dim 0
    outermost in memory with rows that advance and several pieces of rows each within a piece
    (:func:`~pagedtensor.handlers.row_moves._runs_in_row_pieces`), the op computing along the
    last dim (``softmax``) or trailing dims short of dim 0 (``layer_norm``)."""
    if not _runs_in_row_pieces(table):
        return False
    if func in _SOFTMAXES:
        return rest[0] % table.dim() == table.dim() - 1
    return 0 < len(rest[0]) < table.dim()
