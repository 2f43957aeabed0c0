"""The handler of ops computed row by row: ``softmax`` and ``log_softmax`` over the last dim,
``layer_norm`` (``native_layer_norm``) over trailing dims, the scans ``cumsum``, ``cumprod``,
``logcumsumexp``, ``cummax`` and ``cummin`` along the last dim, the sorts and selections ``sort``,
``topk``, ``kthvalue``, ``median``, ``nanmedian`` and ``mode`` along the last dim (``argsort`` is
``sort``), and the ops that move elements within
trailing dims: the reflection and replication pads and nearest-neighbour upsampling (``F.pad`` with
``mode="reflect"`` or ``"replicate"``, ``F.interpolate`` with ``mode="nearest"`` or
``"nearest-exact"``). Each runs the generic way while its pages fit on the device tier at once; past
it, on a table whose dim 0 is its outermost in memory (and not a dim the op computes along), a piece
of rows along dim 0 at a time (:func:`~pagedtensor.handlers.row_gathers._rows_a_piece`), each piece
torch's own kernel on a PagedTensor view of those rows, copied into its rows of plain results laid
out as the dense op's (dims of one element as
:func:`~pagedtensor.handlers.row_moves._one_element_dims_as_dense` says).

Each result row of these kernels is computed from its input row alone, the same way whatever rows
are beside it: on the CPU a row's loop (the last dim's vectorized loop of ``softmax``, the row's
moments of ``layer_norm``, a scan's sequential loop), threads split by rows; on CUDA a warp or a
block per row (``softmax`` over the last dim, which is its ``inner_size == 1`` path, ``layer_norm``,
the scans' innermost-dim kernels), their vectorized variants chosen by the row length and the data's
alignment, which a piece of rows keeps where the rows are 16-byte multiples (and where they are not,
neither takes them); the pads and upsampling only move elements. So the results are bitwise the
dense op's (measured on the H200 for these, ``benchmarks/results/probe_rows_puts_e4f6b51_h200.txt``).
Not CUDA's float sum scans: ``cumsum`` and ``logcumsumexp`` of a piece of rows there differ from the
whole's, so on CUDA they (and ``cumprod``) run by rows only where any order is exact (integers), and
CUDA's ``median``, ``nanmedian`` and ``mode`` not at all (their index among equal values differed);
``cummax``/``cummin`` compare, exact in any order. A scan's pieces hold two rows or more (CUDA scans
a tensor of one row with cub). ``softmax`` over another dim is not among them: its CPU kernel vectorizes across the
outer rows (a piece of them rounds otherwise: 36 of 1,500 random shapes), and it raises
:class:`~pagedtensor.errors.OutOfPagesError` past the tier as before, as does any form not run by
rows here (a transposed table, a row larger than a piece, ``layer_norm`` over every dim, a scan
along another dim).

Note:
    Stream order is each piece's op's: the pieces run one after another on the current stream.
"""

from __future__ import annotations

from typing import Any

import torch
from torch._ops import OpOverload

from pagedtensor.dispatch import DISPATCHER, _OpTooLarge, aten, implements
from pagedtensor.handlers.parts import _arguments_by_name, _meta
from pagedtensor.handlers.row_gathers import _empty_laid_out_as, _rows_a_piece, _stand_in_of_rows
from pagedtensor.handlers.row_moves import _one_element_dims_as_dense, _runs_in_row_pieces
from pagedtensor.pieces import _stand_in
from pagedtensor.tensor import PagedTensor, plain_copy

_SOFTMAXES = (aten._softmax.default, aten._log_softmax.default)
_SCANS = (aten.cumsum.default, aten.cumprod.default, aten.logcumsumexp.default, aten.cummax.default, aten.cummin.default)
# Ops that sort or select within each slice along ``dim``: their values and indices are the slice's alone.
_SELECTIONS = (
    aten.sort.default, aten.sort.stable, aten.topk.default, aten.kthvalue.default,
    aten.median.dim, aten.nanmedian.dim, aten.mode.default,
)  # fmt: skip
# Selections whose CUDA kernels name any index among equal values: ``median``'s index of a piece of
# rows differed from the whole's there (H100, every dtype), so on CUDA they raise past the tier as before.
_ANY_INDEX_ON_CUDA = (aten.median.dim, aten.nanmedian.dim, aten.mode.default)
# Ops whose pieces hold two rows or more (CUDA runs a tensor of one row otherwise: cub's scans, topk's
# multi-block selection).
_TWO_ROWS_A_PIECE = (*_SCANS, *_SELECTIONS)
# Ops computing along their ``dim`` argument.
_ALONG_A_DIM = (*_SOFTMAXES, *_SCANS, *_SELECTIONS)
# Ops that move elements within trailing dims (never dim 0: their inputs have a batch or channel dim first).
_MOVES_WITHIN_ROWS = (
    aten.reflection_pad1d.default, aten.reflection_pad2d.default, aten.reflection_pad3d.default,
    aten.replication_pad1d.default, aten.replication_pad2d.default, aten.replication_pad3d.default,
    aten.upsample_nearest1d.default, aten.upsample_nearest2d.default, aten.upsample_nearest3d.default,
    aten._upsample_nearest_exact1d.default, aten._upsample_nearest_exact2d.default, aten._upsample_nearest_exact3d.default,
)  # fmt: skip


@implements([*_SOFTMAXES, aten.native_layer_norm.default, *_SCANS, *_SELECTIONS, *_MOVES_WITHIN_ROWS])
def run_by_rows(func: OpOverload, types: tuple, args: tuple, kwargs: dict) -> Any:
    """The ops of this module: the generic way while the pages fit; past the tier, torch's errors
    first (:func:`_probe`), then a piece of rows at a time (see the module docstring) into plain
    results laid out as the op lays out its result on a plain table of two rows (its dtypes too:
    the CPU ``layer_norm`` of halves gives mean and rstd in halves, CUDA's in floats).
    ``layer_norm``'s weight and bias are read once, as plain tensors, where they are paged. Forms
    not run by rows re-raise the :class:`~pagedtensor.errors.OutOfPagesError`."""
    try:
        return DISPATCHER.run_paged(func, types, args, kwargs)
    except _OpTooLarge:
        bound = _arguments_by_name(func, args, kwargs)
        table = bound[func._schema.arguments[0].name]
        if not isinstance(table, PagedTensor) or table._inner is not None or table.dim() < 2 or table.is_conj() or table.is_neg():
            raise
        rest = [plain_copy(bound[argument.name]) for argument in func._schema.arguments[1:] if not argument.kwarg_only]  # a paged weight or bias read once
        options = {argument.name: bound[argument.name] for argument in func._schema.arguments if argument.kwarg_only}
        if func is aten.native_layer_norm.default and len(rest[0]) >= table.dim():
            func(*_meta([table, *rest]))  # over every dim: torch's checks (the meta kernel's), else the pager's error
            raise
        dim = bound.get("dim")
        if func in _ALONG_A_DIM and type(dim) is int and -table.dim() <= dim < table.dim() and dim % table.dim() == 0:
            # Along dim 0, which the stand-in of two rows shrinks (its checks would not be the table's:
            # topk(3, 0)): torch's checks on the meta kernel of the whole, else the pager's error.
            func(*_meta([table, *rest]), **options)
            raise
        probes = _probe(func, table, rest, options)
        count = _rows_a_piece(table)
        if not _by_rows(func, table, bound, rest) or (func in _TWO_ROWS_A_PIECE and count < 3):
            raise
    rows = table.shape[0]
    results = [_empty_laid_out_as(probe, (rows, *probe.shape[1:])) for probe in probes]
    _one_element_dims_as_dense(table, _stand_in_of_rows(table, 2), lambda stand_in: func(stand_in, *rest, **options), results)
    for start, stop in _row_ranges(rows, count, at_least=2 if func in _TWO_ROWS_A_PIECE else 1):
        pieces = func(table[start:stop], *rest, **options)
        for result, piece in zip(results, pieces if isinstance(pieces, tuple) else (pieces,)):
            result[start:stop].copy_(piece)
    return tuple(results) if len(results) > 1 else results[0]


def _row_ranges(rows: int, count: int, at_least: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of each piece of ``count`` rows (``count`` > ``at_least``), the last two
    evened out where the last would hold fewer than ``at_least`` rows."""
    ranges = [(start, min(rows, start + count)) for start in range(0, rows, count)]
    if len(ranges) > 1 and ranges[-1][1] - ranges[-1][0] < at_least:
        (first, _), (_, stop) = ranges[-2], ranges[-1]
        middle = stop - at_least
        ranges[-2:] = [(first, middle), (middle, stop)]
    return ranges


def _probe(func: OpOverload, table: PagedTensor, rest: list, options: dict) -> list[torch.Tensor]:
    """The op's results on a plain stand-in of two of the table's rows (values unset, no page read):
    torch's own checks (the op computes along dims other than dim 0, so its checks are the table's),
    and the dtypes and layouts of the dense op's results, but for their row count. Where the
    stand-in fails (but for a dtype the kernel lacks), torch's own kernel on a stand-in of the table's
    shape holding one element (expanded) on its device raises torch's own error, whose text names
    the table's shape and the result's (``F.pad`` to a negative width), no page read; should it not
    fail, the stand-in's error, its shape named as the table's."""
    stand_in = _stand_in_of_rows(table, 2)
    try:
        probe = func(stand_in, *rest, **options)
    except Exception as error:
        failed = error
    else:
        return list(probe) if isinstance(probe, tuple) else [probe]
    if "not implemented for" in str(failed):
        raise failed  # a dtype the kernel lacks, whatever the shape: no run of the table's size to find it
    func(_stand_in(table), *rest, **options)
    raise type(failed)(str(failed).replace(str(list(stand_in.shape)), str(list(table.shape)))) from None


def _exact_in_any_order(table: PagedTensor, bound: dict) -> bool:
    """Whether a sum or product scan of ``table`` (its arguments by name in ``bound``) is exact in any
    order: integer or bool elements into an integer result (wrapping as the dense op's)."""
    result = bound.get("dtype") or table.dtype
    return not table.dtype.is_floating_point and not table.dtype.is_complex and not result.is_floating_point and not result.is_complex


def _by_rows(func: OpOverload, table: PagedTensor, bound: dict, rest: list) -> bool:
    """Whether the op (its arguments checked) runs a piece of rows at a time: some elements, dim 0
    outermost in memory with rows that advance and several pieces of rows each within a piece
    (:func:`~pagedtensor.handlers.row_moves._runs_in_row_pieces`), the op computing along the
    last dim (``softmax``, the scans, the sorts and selections), trailing dims short of dim 0 (``layer_norm``) or moving
    elements within trailing dims (the pads and upsampling). On CUDA, ``cumsum``, ``cumprod`` and
    ``logcumsumexp`` only where any order is exact (integers): its float scans of a piece of rows
    differ from the whole's (``cumsum`` and ``logcumsumexp`` of 256 to 4,096 elements a row, fp32,
    fp16 and bf16, on the H200); ``cummax`` and ``cummin`` compare, and run by rows there too. Nor,
    on CUDA, ``median``, ``nanmedian`` and ``mode``, whose kernels name any index among equal values
    (``median``'s differed between a piece of rows and the whole on the H100)."""
    if not _runs_in_row_pieces(table):
        return False
    if func in _SCANS and table.device.type == "cuda" and func not in (aten.cummax.default, aten.cummin.default) and not _exact_in_any_order(table, bound):
        return False  # CUDA's float scans of a piece of rows add otherwise than of all of them (measured on the H200)
    if func in _ANY_INDEX_ON_CUDA and table.device.type == "cuda":
        return False  # which of equal values its index names differed between a piece of rows and the whole (H100)
    if func in _ALONG_A_DIM:
        return bound["dim"] % table.dim() == table.dim() - 1
    if func is aten.native_layer_norm.default:
        return 0 < len(rest[0]) < table.dim()
    return True
