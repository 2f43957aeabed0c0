"""The handlers of ops that move a table's elements without computing on them: ``flip``, ``roll``,
``tril``, ``triu`` and ``repeat`` (``tile`` decomposes to ``repeat``). Each runs the generic way while
its pages fit on the device tier at once; past it, a piece of rows along dim 0 at a time
(:func:`~pagedtensor.handlers.row_gathers._rows_a_piece`), each piece torch's own kernel on a
PagedTensor view of those rows, so the result is bitwise the dense one:

- where result row ``r`` is made from table row ``r`` alone (``flip`` and ``roll`` along dims other
  than 0, ``tril``/``triu`` with the diagonal shifted by the piece's first row on a 2-D table,
  unshifted on a batch of matrices, ``repeat`` whose factor for dim 0 is 1), as
  :func:`~pagedtensor.handlers.row_gathers._run_in_row_pieces` runs them;
- where the op moves whole rows along dim 0 (``flip`` of dim 0, ``roll`` along dim 0, ``repeat``
  with a dim-0 factor above 1 or leading dims added), each piece's result rows are written to the
  one or more runs of result rows they land on (:func:`_run_moving_rows`): no more than a piece of
  the table is read at once.

A table whose dim 0 is not the outermost in memory (``t.T``, ``t.permute(2, 0, 1)``) runs the op
rewritten on its dims ordered outermost first (:func:`_moved_outermost_first`), a piece of the
outermost dim's indices at a time. torch's own errors (a bad dim, too few repeat factors, ``tril``
of a 1-D tensor) come first, before any page is read (:func:`_check_as_torch_does`); a result of no
elements (``repeat`` by 0) reads no page. The result has the dense op's dtype, shape and strides
(:func:`~pagedtensor.handlers.row_gathers._empty_laid_out_as` from the op on a small plain stand-in,
``roll``'s shifts as :func:`_stand_in_arguments` makes them, dims of one element as
:func:`_one_element_dims_as_dense` says). Other forms past the tier raise
:class:`~pagedtensor.errors.OutOfPagesError`: ``roll`` without dims of a non-contiguous table of
several dims (the flattened roll of a copy), a table whose outermost dim's indices each span more than a piece, or whose rows
do not advance (stride 0), conjugate or negative bits.

``tril_``/``triu_`` past the tier run in place a piece of rows at a time (:func:`triangle_in_place`),
on the table's dims ordered outermost first, each piece's diagonal shifted as ``tril``/``triu``'s
(:func:`_triangle_piece`). The ``out=`` forms of the five run the functional op past the tier, then
resize and copy into ``out`` as torch does (:func:`move_rows_into_out`, through
:func:`~pagedtensor.handlers.row_gathers.run_into_out`).

Note:
    Stream order is each piece's op's: the pieces run one after another on the current stream,
    each piece's pages faulted in, read and released before the next piece's.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import torch
from torch._ops import OpOverload

from pagedtensor.dispatch import DISPATCHER, _OpTooLarge, aten, implements, overlaps_itself
from pagedtensor.handlers.parts import _arguments_by_name
from pagedtensor.handlers.row_gathers import (
    RowPiece,
    _empty_laid_out_as,
    _inverse,
    _laid_out_as,
    _outermost_first,
    _rows_a_piece,
    _run_in_row_pieces,
    _stand_in_of_rows,
    run_into_out,
)
from pagedtensor.pieces import elements_apart, refuse_without_room_for_new_pages
from pagedtensor.tensor import PagedTensor, element_span, meta_like

RowMoves = Callable[[int, int], list[tuple[int, int, int]]]
"""``moves(start, stop)``: where the rows of a piece's result, made from table rows ``[start, stop)``,
go: ``(first, last, to)`` for each run, the piece's result rows ``[first, last)`` written to the
result's rows from ``to`` on (of the result's rows along its dim 0, leading dims flattened in)."""


@implements([aten.flip.default, aten.roll.default, aten.tril.default, aten.triu.default, aten.repeat.default])
def move_rows(func: OpOverload, types: tuple, args: tuple, kwargs: dict) -> Any:
    """``flip``, ``roll``, ``tril``, ``triu`` and ``repeat``: the generic way while their pages fit on
    the device tier at once; past it, torch's errors first (:func:`_check_as_torch_does`), then a
    piece of rows at a time (see the module docstring). Forms that do not run in pieces re-raise
    the :class:`~pagedtensor.errors.OutOfPagesError`."""
    try:
        return DISPATCHER.run_paged(func, types, args, kwargs)
    except _OpTooLarge:
        bound = _arguments_by_name(func, args, kwargs)
        table = bound["self"]
        if not isinstance(table, PagedTensor):
            raise
        rest = [bound[argument.name] for argument in func._schema.arguments[1:]]
        shape = _check_as_torch_does(func, table, rest)
        if table._inner is not None or table.dim() == 0 or table.is_conj() or table.is_neg():
            raise
        lead = len(shape) - table.dim()  # the dims repeat adds before the table's
        if math.prod(shape) == 0:  # no element to read
            outermost = _outermost_first(table)[0]
            moved = _empty_laid_out_as(_probe_of_outermost(func, table, rest), shape, lead + outermost)
        elif _runs_in_row_pieces(table):
            moved = _MOVES[func.overloadpacket](func, table, bound, func(_stand_in_of_rows(table, 2), *_stand_in_arguments(func, table, rest, 0)))
        else:
            moved = _moved_outermost_first(func, table, bound, rest, shape, lead)
        if moved is None:
            raise
    _one_element_dims_as_dense(table, _stand_in_of_outermost(table), lambda stand_in: _probe_of_outermost(func, table, rest, stand_in), [moved], lead)
    return moved


ONE_ELEMENT_MARK = 2**40 + 7
"""The stride a stand-in gives its dims of one element, to see whether the op keeps it (a stride no
layout computes)."""


def _stand_in_of_outermost(table: PagedTensor) -> torch.Tensor:
    """A plain stand-in (values unset) of ``table``'s shape and strides but for its outermost dim in
    memory, of two indices (as small as a layout the dense op reads alike allows)."""
    order = _outermost_first(table)
    return _stand_in_of_rows(table.permute(order), 2).permute(_inverse(order))


def _stand_in_arguments(func: OpOverload, table: PagedTensor, rest: list, shrunk: int) -> list:
    """``rest``, the op's arguments after the table, for the op on a stand-in of the table whose dim
    ``shrunk`` holds two indices: ``roll``'s shifts along that dim made 0 where a multiple of the
    table's size along it, else 1. torch's CPU ``roll`` along one dim clones the table (contiguous)
    for a shift that is a multiple of the dim's size, else concatenates its two parts (keeping a
    channels_last layout), and rolls along several dims one after another: the stand-in's result is
    laid out as the table's where each shift's is a multiple of the size on both or on neither."""
    size = table.shape[shrunk]
    if func.overloadpacket is not aten.roll or not rest[1] or size == 0:
        return rest  # without dims: a flattened roll, viewed back contiguous
    shifts, dims = rest
    along = [d % table.dim() == shrunk for d in dims]
    return [[int(shift % size != 0) if on else shift for shift, on in zip(shifts, along)], dims]


def _probe_of_outermost(func: OpOverload, table: PagedTensor, rest: list, stand_in: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The op on ``stand_in`` (by default :func:`_stand_in_of_outermost`, or one with its layout),
    its arguments as :func:`_stand_in_arguments` gives them: laid out as the dense op's result, but
    for the outermost dim's indices."""
    stand_in = _stand_in_of_outermost(table) if stand_in is None else stand_in
    return func(stand_in, *_stand_in_arguments(func, table, rest, _outermost_first(table)[0]))


def _one_element_dims_as_dense(
    table: PagedTensor, stand_in: torch.Tensor, op: Callable[[torch.Tensor], Any], results: Sequence[torch.Tensor], lead: int = 0
) -> None:
    """Gives each dim of one element of each of ``results`` (the op's results past the tier, laid out
    from a stand-in of a few rows, which scales a large stride of such a dim with the rows) made from
    a dim of the table (``lead`` dims on) the stride the dense op gives it: the table's own where the
    op keeps the table's strides (``flip`` of a dense table, ``sort``: torch's ``empty_like``), seen
    by ``op`` (the op, its other arguments bound) on ``stand_in`` (a plain stand-in of the table, of
    fewer indices along a dim of more) with such dims given a stride of :data:`ONE_ELEMENT_MARK`; as
    it is otherwise. A dim of one element is never stepped along: its stride changes in place, no
    byte moves. A result of fewer dims (a reduction without ``keepdim``) is matched dim by dim from
    its first."""
    ones = [d for d in range(table.dim()) if table.shape[d] == 1]
    if not ones:
        return
    marked = op(stand_in.as_strided(stand_in.shape, [ONE_ELEMENT_MARK if size == 1 else s for size, s in zip(stand_in.shape, stand_in.stride())]))
    for result, probe in zip(results, marked if isinstance(marked, tuple) else (marked,)):
        strides = list(result.stride())
        for d in ones:
            if lead + d < probe.dim() and probe.stride(lead + d) == ONE_ELEMENT_MARK:
                strides[lead + d] = table.stride(d)
        if strides != list(result.stride()):
            result.as_strided_(result.shape, strides)


def _check_as_torch_does(func: OpOverload, table: PagedTensor, rest: list) -> tuple[int, ...]:
    """torch's own error for ``func`` on ``table`` with the other arguments ``rest``, no page read:
    ``func`` on a meta stand-in with the table's layout; where that raises, torch's own kernel on a
    stand-in of the table's shape holding one element (expanded) on its device, for torch's own text
    (the meta kernels word some errors otherwise), else the meta kernel's error. Returns the
    result's shape."""
    try:
        return tuple(func(meta_like(table), *rest).shape)
    except Exception:
        func(torch.zeros((), dtype=table.dtype, device=table.device).expand(table.shape), *rest)
        raise


def _runs_in_row_pieces(table: PagedTensor) -> bool:
    """Whether ``table`` (of at least one dim, not traced) runs a piece of rows along dim 0 at a
    time: some elements, rows that advance, more than one piece of rows and a row within a piece."""
    if table.numel() == 0 or table.stride(0) <= 0:
        return False
    return 0 < _rows_a_piece(table) < table.shape[0]


def _moved_outermost_first(func: OpOverload, table: PagedTensor, bound: dict, rest: list, shape: tuple[int, ...], lead: int) -> Optional[torch.Tensor]:
    """The op on a table whose dim 0 is not the outermost in memory (``t.T``): rewritten on
    ``table.permute(order)``, its dims ordered outermost first (a view of the same pages, which runs
    a piece of rows at a time), its result's dims put back and laid out as the dense op's (a copy
    where they differ). ``flip``/``roll`` of the permuted dims, ``repeat`` of the permuted factors,
    ``tril``/``triu`` a piece of the outermost dim at a time (:func:`_triangle_along`). ``None`` for
    ``roll`` without dims, or where the permuted table does not run in pieces either."""
    order = _outermost_first(table)
    permuted = table.permute(order)
    if order[0] == 0 or not _runs_in_row_pieces(permuted):
        return None
    rank = table.dim()
    moved_dims = lambda dims: [order.index(d % rank) for d in dims]
    packet = func.overloadpacket
    if packet is aten.flip:
        got = func(permuted, moved_dims(bound["dims"]))
    elif packet is aten.roll:
        if not bound["dims"]:
            return None
        got = func(permuted, list(bound["shifts"]), moved_dims(bound["dims"]))
    elif packet is aten.repeat:
        factors = list(bound["repeats"])
        got = func(permuted, [*factors[:lead], *(factors[lead + d] for d in order)])
    else:
        got = _triangle_along(func, permuted, order, bound["diagonal"])
    put_back = [*range(lead), *(lead + d for d in _inverse(order))]
    probe = _probe_of_outermost(func, table, rest)
    return _laid_out_as(got.permute(put_back), _empty_laid_out_as(probe, shape, lead + order[0]))


def _normalized_dims(dims: list[int], rank: int) -> list[int]:
    """``dims`` counted from 0 (already checked to be in range by :func:`_check_as_torch_does`)."""
    return [d % rank for d in dims]


def _flip(func: OpOverload, table: PagedTensor, bound: dict, probe: torch.Tensor) -> Optional[torch.Tensor]:
    """``flip(table, dims)``: along dims other than 0 a piece of rows at a time in place; with dim 0,
    table rows ``[a, b)`` flipped make result rows ``[n - b, n - a)``."""
    dims = list(bound["dims"])
    n = table.shape[0]
    piece: RowPiece = lambda rows, a, b: func(rows, dims)
    if 0 not in _normalized_dims(dims, table.dim()):
        return _run_in_row_pieces(table, n, _rows_a_piece(table), piece)
    return _run_moving_rows(table, probe, tuple(table.shape), piece, lambda a, b: [(0, b - a, n - b)])


def _roll(func: OpOverload, table: PagedTensor, bound: dict, probe: torch.Tensor) -> Optional[torch.Tensor]:
    """``roll(table, shifts, dims)``: along dims other than 0 a piece of rows at a time in place;
    along dim 0 by ``k`` (the shifts along it summed, modulo the rows), each piece rolled along the
    other dims, table row ``i`` moved to result row ``(i + k) % n``: a piece's rows land in one run
    of result rows, or two where they wrap. Without dims (the flattened roll) a contiguous table's
    roll is its flat view's along dim 0, viewed back, as torch runs it; ``None`` for another layout
    (torch rolls a flattened copy)."""
    shifts, dims = list(bound["shifts"]), list(bound["dims"])
    if not dims and table.dim() > 1:
        if not table.is_contiguous():
            return None  # torch rolls a flattened copy
        # torch rolls the flattened view along its one dim and views the result back (contiguous)
        flat = table.view(-1)
        rolled = _roll(func, flat, {"shifts": shifts, "dims": [0]}, func(_stand_in_of_rows(flat, 2), *_stand_in_arguments(func, flat, [shifts, [0]], 0)))
        return None if rolled is None else rolled.view(table.shape)
    if not dims:
        dims = [0]  # a 1-D table's flattened roll is its roll along dim 0
    n = table.shape[0]
    along = _normalized_dims(dims, table.dim())
    k = sum(shift for shift, d in zip(shifts, along) if d == 0) % n
    others = [(shift, d) for shift, d in zip(shifts, dims) if d % table.dim() != 0]
    other_shifts, other_dims = [shift for shift, _ in others] or [0], [d for _, d in others] or [0]
    piece: RowPiece = lambda rows, a, b: func(rows, other_shifts, other_dims)
    if 0 not in along:
        return _run_in_row_pieces(table, n, _rows_a_piece(table), piece)

    def moves(a: int, b: int) -> list[tuple[int, int, int]]:
        split = min(max(n - k - a, 0), b - a)  # rows before it move down by k, those after wrap to the top
        runs = [(0, split, a + k), (split, b - a, a + split + k - n)]
        return [run for run in runs if run[1] > run[0]]

    return _run_moving_rows(table, probe, tuple(table.shape), piece, moves)


def _triangle(func: OpOverload, table: PagedTensor, bound: dict, probe: torch.Tensor) -> Optional[torch.Tensor]:
    """``tril``/``triu(table, diagonal)`` a piece of rows at a time: on a 2-D table, the element in
    row ``r`` and column ``c`` is kept by ``c - r`` against the diagonal, so a piece from row ``a``
    runs with the diagonal shifted by ``a``; on a batch of matrices dim 0 is the batch's."""
    piece = _triangle_piece(func, list(range(table.dim())), bound["diagonal"])
    return _run_in_row_pieces(table, table.shape[0], _rows_a_piece(table), piece)


def _triangle_along(func: OpOverload, permuted: PagedTensor, order: list[int], diagonal: int) -> torch.Tensor:
    """``tril``/``triu`` of ``permuted.permute(inverse of order)``, in ``permuted``'s dims, a piece
    of ``permuted``'s rows (indices of the table's dim ``order[0]``) at a time
    (:func:`_triangle_piece`)."""
    piece = _triangle_piece(func, order, diagonal)
    return _run_in_row_pieces(permuted, permuted.shape[0], _rows_a_piece(permuted), piece)


def _triangle_piece(func: OpOverload, order: list[int], diagonal: int) -> RowPiece:
    """``tril``/``triu`` (or ``tril_``/``triu_``) on a piece of rows of ``table.permute(order)``
    (indices ``[a, b)`` of the table's dim ``order[0]``), in the permuted dims: the element in row
    ``r`` and column ``c`` of a matrix is kept by ``c - r`` against the diagonal, so a piece from
    index ``a`` of the matrices' rows runs with the diagonal shifted by ``a``, of their columns by
    ``-a``, of a batch dim unshifted."""
    rank, outermost, inverse = len(order), order[0], _inverse(order)
    shift = 1 if outermost == rank - 2 else -1 if outermost == rank - 1 else 0
    return lambda rows, a, b: func(rows.permute(inverse), diagonal + shift * a).permute(order)


def _repeat(func: OpOverload, table: PagedTensor, bound: dict, probe: torch.Tensor) -> Optional[torch.Tensor]:
    """``repeat(table, factors)``: each piece of rows repeated along the other dims, its result rows
    written to each copy of the table's rows along dim 0 (``factors[0]`` of them) and along each
    leading dim the factors add. With a dim-0 factor of 1 and no leading dims, a piece of rows at a
    time in place. The result has no elements for a factor of 0: nothing is read."""
    factors = list(bound["repeats"])
    lead = len(factors) - table.dim()
    inner = [1, *factors[lead + 1 :]]
    piece: RowPiece = lambda rows, a, b: func(rows, inner)
    n, copies = table.shape[0], math.prod(factors[: lead + 1])
    if copies == 1 and lead == 0:
        return _run_in_row_pieces(table, n, _rows_a_piece(table), piece)
    shape = (*factors[:lead], factors[lead] * n, *(f * size for f, size in zip(factors[lead + 1 :], table.shape[1:])))
    moves: RowMoves = lambda a, b: [(0, b - a, copy * n + a) for copy in range(copies)]
    return _run_moving_rows(table, probe, shape, piece, moves, lead)


_MOVES: dict[Any, Callable[[OpOverload, PagedTensor, dict, torch.Tensor], Optional[torch.Tensor]]] = {
    aten.flip: _flip,
    aten.roll: _roll,
    aten.tril: _triangle,
    aten.triu: _triangle,
    aten.repeat: _repeat,
}
"""The past-the-tier form of each op, by its overload packet: ``form(func, table, arguments by name,
probe)``, ``probe`` the op's result on a plain stand-in of two rows with the table's strides."""


def _run_moving_rows(
    table: PagedTensor, probe: torch.Tensor, shape: tuple[int, ...], piece: RowPiece, moves: RowMoves, lead: int = 0
) -> Optional[torch.Tensor]:
    """The op's result of ``shape``, made a piece of the table's rows at a time (``piece`` on table
    rows ``[a, b)``, run once), each piece's result rows written where ``moves(a, b)`` says, laid out
    as ``probe`` (the op on a plain stand-in of two rows with the table's strides). ``lead``: the dims
    the result has before the one made from the table's dim 0, flattened into it to number the
    result's rows (``None`` where its layout does not let them flatten)."""
    result = _empty_laid_out_as(probe, shape, lead)
    try:
        rows = result.view(-1, *shape[lead + 1 :]) if lead else result
    except RuntimeError:
        return None
    n, count = table.shape[0], _rows_a_piece(table)
    for start in range(0, n, count):
        stop = min(n, start + count)
        got = piece(table[start:stop], start, stop)
        for first, last, to in moves(start, stop):
            rows[to : to + last - first] = got[first:last]
    return result


@implements([aten.tril_.default, aten.triu_.default])
def triangle_in_place(func: OpOverload, types: tuple, args: tuple, kwargs: dict) -> Any:
    """``tril_``/``triu_``: the generic way while the table's pages fit on the device tier at once;
    past it, torch's errors first (:func:`_check_as_torch_does`: a table of fewer than 2 dims, no
    page read), then a piece of rows at a time in place (:func:`_triangle_in_pieces`), only each
    piece's pages faulted in and written back. Returns the table. Forms that do not run in pieces
    re-raise the :class:`~pagedtensor.errors.OutOfPagesError`.

    Note:
        Stream order is each piece's op's: the pieces run one after another on the current stream.
    """
    try:
        return DISPATCHER.run_paged(func, types, args, kwargs)
    except _OpTooLarge:
        bound = _arguments_by_name(func, args, kwargs)
        table = bound["self"]
        if not isinstance(table, PagedTensor):
            raise
        _check_as_torch_does(func, table, [bound["diagonal"]])
        if table._inner is not None or table.is_conj() or table.is_neg() or not _triangle_in_pieces(func, table, bound["diagonal"]):
            raise
    return table


def _triangle_in_pieces(func: OpOverload, table: PagedTensor, diagonal: int) -> bool:
    """``tril_``/``triu_(table, diagonal)`` in place, a piece of rows of ``table.permute(order)`` (its
    dims ordered outermost first in memory: the table itself where dim 0 is) at a time, each piece's
    diagonal as :func:`_triangle_piece` shifts it. ``False``, nothing written, where the table's
    elements may overlap (a piece would write another's) or it does not run in pieces."""
    order = _outermost_first(table)
    permuted = table.permute(order)
    if not elements_apart(table.shape, table.stride()) or not _runs_in_row_pieces(permuted):
        return False
    piece = _triangle_piece(func, order, diagonal)
    refuse_without_room_for_new_pages(func, [table])  # every piece of rows is written: before the first
    n, count = permuted.shape[0], _rows_a_piece(permuted)
    for start in range(0, n, count):
        stop = min(n, start + count)
        piece(permuted[start:stop], start, stop)
    return True


_FUNCTIONAL_OF_MOVE_OUT = {
    aten.flip.out: aten.flip.default,
    aten.roll.out: aten.roll.default,
    aten.tril.out: aten.tril.default,
    aten.triu.out: aten.triu.default,
    aten.repeat.out: aten.repeat.default,
}
"""The functional op of each ``out=`` form of the moves."""


@implements(list(_FUNCTIONAL_OF_MOVE_OUT))
def move_rows_into_out(func: OpOverload, types: tuple, args: tuple, kwargs: dict) -> Any:
    """The ``out=`` forms of ``flip``, ``roll``, ``tril``, ``triu`` and ``repeat``: the generic way
    while their pages (``out``'s among them) fit on the device tier at once; past it,
    :func:`~pagedtensor.handlers.row_gathers.run_into_out` with the functional op (:func:`move_rows`,
    a piece of rows at a time), as torch runs them: a plain ``out`` of another shape resized
    contiguous (with torch's warning), ``out`` overlapping the table no error (torch computes the
    result before writing ``out``, or for ``tril``/``triu`` into the table itself, runs in place),
    ``out`` overlapping itself torch's error, but for ``tril``/``triu``, whose kernels write such an
    ``out`` unchecked: those, and ``tril``/``triu`` into memory of the table other than the table
    itself (torch's kernel reads rows it has written), re-raise the
    :class:`~pagedtensor.errors.OutOfPagesError`. Returns ``out``.

    Note:
        Stream order is that of the functional op's pieces, then of the copy, all on the current
        stream. Nothing is written to ``out`` before the functional op has run.
    """
    try:
        return DISPATCHER.run_paged(func, types, args, kwargs)
    except _OpTooLarge:
        if func.overloadpacket in (aten.tril, aten.triu) and _triangle_out_overlaps(kwargs["out"], args[0]):
            raise
    return run_into_out(func, args, kwargs, _FUNCTIONAL_OF_MOVE_OUT[func], _contiguous_layout, checks_table_overlap=False)


def _contiguous_layout(result: torch.Tensor) -> torch.Tensor:
    """The layout torch gives an ``out`` of the moves it resizes: contiguous, of the result's shape
    (``resize_`` to the shape alone)."""
    return torch.empty(result.shape, device="meta")


def _triangle_out_overlaps(out: torch.Tensor, table: Any) -> bool:
    """Whether ``tril.out``/``triu.out`` of ``table`` into ``out`` writes memory it reads or writes
    again, otherwise than in place: ``out``'s elements overlapping each other (a dim of stride 0),
    or ``out`` a PagedTensor of the table's allocation whose elements meet the table's without
    being the table's very view."""
    if overlaps_itself(out):
        return True
    if not isinstance(out, PagedTensor) or not isinstance(table, PagedTensor) or out.allocation is None:
        return False
    if out.allocation is not table.allocation:
        return False
    same_view = (out._offset, out.shape, out.stride(), out.dtype) == (table._offset, table.shape, table.stride(), table.dtype)
    out_lo, out_hi = (bound * out.dtype.itemsize for bound in element_span(tuple(out.shape), out.stride(), out._offset))
    table_lo, table_hi = (bound * table.dtype.itemsize for bound in element_span(tuple(table.shape), table.stride(), table._offset))
    return not same_view and out_lo < table_hi and table_lo < out_hi
