"""The handlers of gathers. Dim-0 row gathers (``index_select`` on dim 0, ``embedding``,
``index.Tensor`` with one index tensor on dim 0): only the pages holding the selected rows fault in,
run by run. Other gathers (``gather``, ``take``, ``index`` with several index tensors or a mask,
``index_select`` along another dim) run the generic way, and past the device tier by the rows their
indices name or a piece of rows at a time (:func:`gather_elements`), on a table whose dim 0 is not
the outermost in memory after ordering its dims outermost first (:func:`_gather_of_outermost_first`).
Their ``out=`` forms past the tier run the gather, then copy its result into ``out``
(:func:`gather_into_out`).
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Callable, Optional

import torch
from torch._ops import OpOverload
from torch._prims_common import make_contiguous_strides_for
from torch.utils._pytree import tree_leaves

from pagedtensor.dispatch import DISPATCHER, _OpTooLarge, _row_byte_spans, _Window, aten, has_no_strides, implements, refuse_internal_overlap, refuse_overlap_with_input, resize_refused
from pagedtensor.errors import OutOfPagesError
from pagedtensor.handlers.parts import _arguments_by_name, _larger_than_a_piece
from pagedtensor.pieces import broadcast_shape, one_element_stand_in, piece_elements_of
from pagedtensor.tensor import PagedTensor, element_span, meta_layout, meta_like, plain_copy


@implements([aten.index_select.default, aten.embedding.default, aten.index.Tensor])
def gather_rows(func: OpOverload, types: tuple, args: tuple, kwargs: dict) -> Any:
    """Select rows along dim 0: fault in only the pages holding the selected rows.

    The distinct rows are copied, one run of adjacent pages at a time, into a compact table; the op
    then runs on that table with the indices renumbered, so its result is bitwise the dense one.
    Any other form of the op (another dim, a mask, several index tensors) runs the generic way, or
    if its pages do not fit on the device tier at once, as :func:`gather_elements` says.

    Note:
        Reads the index tensor on the host (a sync when it lives on the GPU).
    """
    request = _row_request(func, args, kwargs)
    if request is None:
        return gather_elements(func, types, args, kwargs)
    table, index = request
    if func is aten.index_select.default and index.dim() > 1:  # torch's check, which its meta kernel lacks
        raise IndexError(f"PagedTensor: {func}: index_select(): Index is supposed to be a vector, got {index.dim()} dims")
    if index.dtype not in (torch.int64, torch.int32):
        # torch's own kernel raises torch's own error (an IndexError for aten.index; the meta
        # kernel raises a RuntimeError) or takes the dtype after all; past the tier, gather_elements
        # raises torch's error before the pager's.
        return gather_elements(func, types, args, kwargs)
    refusal = _kernel_dtype_refusal(func, table.dtype, table.device, index.dtype)
    if refusal is not None:  # the rows' bytes copied whole would run no kernel to refuse it
        raise NotImplementedError(refusal)
    if index.numel() == 0:
        return _gather_of_no_rows(func, table, index)
    flat = _positions_in_range(func, index, table.shape[0], table.shape[0])
    copied = _whole_rows_copied(func, table, index, flat)
    if copied is not None:
        return copied
    rows, inverse = torch.unique(flat, sorted=True, return_inverse=True)
    compact = _rows_compacted(table, rows)
    renumbered = inverse.reshape(index.shape).to(index.device if func is aten.index.Tensor else table.device)
    # The dense op lays its result out after the table's strides: the same layout, exactly.
    return _laid_out_as(_call_with_table(func, compact, renumbered), _result_layout_of_rows(func, table, index))


_EMBEDDING_BAG_MAX = 2
"""``_embedding_bag``'s ``mode`` for ``"max"``, whose fourth result holds rows of the weight."""


@implements([aten._embedding_bag.default, aten._embedding_bag_forward_only.default])
def embedding_bag_of_rows(func: OpOverload, types: tuple, args: tuple, kwargs: dict) -> Any:
    """``nn.EmbeddingBag`` / ``F.embedding_bag`` (``_embedding_bag``) of a paged weight larger than a
    piece: only the pages holding the rows its indices name fault in.

    The distinct rows are copied into a compact table (:func:`_rows_compacted`), and torch's own
    kernel runs on it with the indices renumbered (and ``padding_idx`` with them: the compact row of
    the padding row, or one past them where no index names it). Each bag takes its rows in the same order,
    so the output is bitwise the dense one; ``offset2bag`` and ``bag_size`` do not depend on the
    weight, and ``"max"``'s row of each maximum is renumbered back to the weight's (a bag with no
    row keeps the kernel's own value), so the backward, which autograd runs on these, gives the
    dense gradient. An index out of range raises torch's error (naming it) before any page
    faults in. A weight that fits in a piece, or another form (a PagedTensor index of the weight's
    pages, an index on another device), runs the generic way.

    Note:
        Reads the indices on the host (a sync when they live on the GPU), as a row gather does.
    """
    on_rows = _bag_on_rows(func, args, kwargs)
    if on_rows is None:
        return _bag_the_generic_way(func, types, args, kwargs)
    weight, compact, renumbered, options, rows = on_rows
    if weight.shape[1] > 1 and weight.stride(1) != 1:
        # A weight whose rows' elements are not adjacent (``t.T``): torch's CPU kernel takes its slow
        # path for it (by ``stride(1)``), which sums bf16 in another order and fills offset2bag where
        # the fast path leaves it empty; the compact rows get such a stride too.
        laid_out = torch.empty_strided(compact.shape, (1, max(compact.shape[0], 2)), dtype=compact.dtype, device=compact.device)
        compact = laid_out.copy_(compact)
    output, offset2bag, bag_size, max_indices = func(compact, renumbered, **options)
    if options["mode"] == _EMBEDDING_BAG_MAX and max_indices.numel() and rows.numel():
        found = (bag_size > 0).view(-1, *([1] * (max_indices.dim() - 1))).expand_as(max_indices)
        named = rows.to(weight.device)[max_indices.clamp(0, rows.numel() - 1).long()].to(max_indices.dtype)
        max_indices = torch.where(found, named, max_indices)
    return output, offset2bag, bag_size, max_indices


@implements([aten._embedding_bag_per_sample_weights_backward.default])
def embedding_bag_per_sample_weights_backward_of_rows(func: OpOverload, types: tuple, args: tuple, kwargs: dict) -> Any:
    """The gradient of ``nn.EmbeddingBag``'s ``per_sample_weights`` with a paged weight larger than a
    piece: each sample's is the dot product of its bag's output gradient with the row its index
    names, so only the pages of those rows fault in; torch's kernel runs on the compact rows with
    the indices (and ``padding_idx``) renumbered as for :func:`embedding_bag_of_rows`, bitwise the
    dense gradient. Other forms run the generic way."""
    on_rows = _bag_on_rows(func, args, kwargs)
    if on_rows is None:
        return _bag_the_generic_way(func, types, args, kwargs)
    _, compact, renumbered, options, _ = on_rows
    return func(weight=compact, indices=renumbered, **options)


def _bag_the_generic_way(func: OpOverload, types: tuple, args: tuple, kwargs: dict) -> Any:
    """An embedding bag op the generic way; past the tier, torch's own error where its kernel
    refuses the arguments (indices and offsets whose common dtype is not int64 or int32,
    :func:`_raise_the_dense_error`) before the pager's."""
    try:
        return DISPATCHER.run_paged(func, types, args, kwargs)
    except _OpTooLarge:
        weight = _arguments_by_name(func, args, kwargs)["weight"]
        if isinstance(weight, PagedTensor):
            _raise_the_dense_error(func, args, kwargs, weight, whole=True)
        raise


def _bag_on_rows(func: OpOverload, args: tuple, kwargs: dict) -> Optional[tuple]:
    """``(weight, compact, renumbered, options, rows)`` for an embedding bag op whose weight and
    indices it runs on the rows they name (:func:`_bag_reads_rows`): the compact rows and renumbered
    indices of :func:`_bag_rows_compacted`, and the op's other arguments by name (plain tensors,
    ``padding_idx`` renumbered); else None."""
    bound = _arguments_by_name(func, args, kwargs)
    weight, indices = bound["weight"], bound["indices"]
    if not _bag_reads_rows(weight, indices, bound["offsets"]):
        return None
    compact, renumbered, compact_padding, rows = _bag_rows_compacted(func, weight, indices, bound["mode"], bound["padding_idx"])
    options = {**{name: plain_copy(value) for name, value in bound.items() if name not in ("weight", "indices")}, "padding_idx": compact_padding}
    return weight, compact, renumbered, options, rows


def _bag_reads_rows(weight: Any, indices: Any, offsets: Any) -> bool:
    """Whether an embedding bag op of ``weight``, ``indices`` and ``offsets`` runs on the rows they
    name (:func:`_bag_rows_compacted`): a paged 2-D weight larger than a piece whose rows can be
    copied, 1-D indices on its device that are not its own pages, of a dtype torch's kernel takes
    (:func:`_bag_index_dtypes_taken`)."""
    return (isinstance(weight, PagedTensor) and weight.dim() == 2 and _rows_can_be_copied(weight)
            and isinstance(indices, torch.Tensor) and indices.dim() == 1 and _bag_index_dtypes_taken(indices, offsets)
            and indices.device == weight.device and not (isinstance(indices, PagedTensor) and indices._paged is weight._paged)
            and _larger_than_a_piece([weight]))  # fmt: skip


def _bag_index_dtypes_taken(indices: torch.Tensor, offsets: Any) -> bool:
    """Whether torch's embedding bag kernel takes ``indices`` with ``offsets``: it promotes both to
    their common dtype (int16, int8, uint8 or bool indices with int64 or int32 offsets), which must
    be int64 or int32 (else its own error: int16 with int16, a float, uint16 with anything)."""
    dtypes = [indices.dtype, *([offsets.dtype] if isinstance(offsets, torch.Tensor) else [])]
    if any(dtype.is_floating_point or dtype.is_complex or dtype in (torch.uint16, torch.uint32, torch.uint64) for dtype in dtypes):
        return False
    return torch.promote_types(*dtypes) in (torch.int64, torch.int32) if len(dtypes) == 2 else dtypes[0] in (torch.int64, torch.int32)


def _bag_rows_compacted(func: OpOverload, weight: PagedTensor, indices: torch.Tensor, mode: int, padding: int) -> tuple:
    """``(compact, renumbered, compact_padding, rows)``: the distinct ``rows`` the ``indices`` name,
    copied into a compact table (:func:`_rows_compacted`, only their pages fault in), the indices
    renumbered into it (on the weight's device, of the indices' dtype) and ``padding_idx`` with them
    (the compact row of the padding row, or one past them where no index names it: the kernel lays
    ``offset2bag`` out by whether there is one). An index out of range raises torch's error (in the
    words of ``mode``) before any page faults in."""
    indices = plain_copy(indices)
    given = indices.to("cpu", torch.int64)
    bad = ((given < 0) | (given >= weight.shape[0])).nonzero().flatten()
    if bad.numel():  # torch's words, which differ by mode
        at, value = int(bad[0]), int(given[bad[0]])
        if mode == _EMBEDDING_BAG_MAX:
            raise RuntimeError(f"PagedTensor: {func}: embedding_bag: Expected idx >= 0 && idx < num_embeddings but found idx to be {value}")
        raise RuntimeError(f"PagedTensor: {func}: Index {at} of input takes value {value} which is not in the valid range [0, {weight.shape[0]})")
    rows, inverse = torch.unique(given, sorted=True, return_inverse=True)
    padding_row = (rows == padding).nonzero().flatten()
    compact_padding = -1 if padding < 0 else int(padding_row[0]) if padding_row.numel() else rows.numel()
    return _rows_compacted(weight, rows), inverse.to(weight.device, indices.dtype), compact_padding, rows


@implements([aten.gather.default, aten.take.default])
def gather_elements(func: OpOverload, types: tuple, args: tuple, kwargs: dict) -> Any:
    """``gather`` and ``take``, and ``index`` in forms other than one row index (a mask, several
    index tensors): the generic way while their pages fit on the device tier at once; past it, when
    the elements read lie in rows along dim 0 that the indices name (``gather`` along dim 0,
    ``take``, ``index`` whose first index is a tensor or a mask), the distinct rows are copied into a
    compact table (:func:`_rows_compacted`, only their pages fault in) and the op runs on it with
    the indices renumbered: a copy of the same elements, bitwise the dense result. Where each row
    of the result is read from the same row of the table (``gather`` or ``index_select`` along
    another dim, ``t[:, i]``), the op runs on a piece of rows at a time (:func:`_row_pieces`).
    On a table whose dim 0 is not the outermost in memory (``t.T``), the op runs on the table's dims
    ordered outermost first (:func:`_gather_of_outermost_first`). Other forms raise
    :class:`OutOfPagesError` past the tier.

    ``gather`` and ``take`` by an empty index read no page: they run on a stand-in of the table's
    shape that holds one element (their result's layout follows the index alone).

    Note:
        Past the tier, reads the indices on the host (a sync when they live on the GPU).
    """
    if _reads_no_element(func, args):
        table = args[0]
        return func(torch.zeros((), dtype=table.dtype, device=table.device).expand(table.shape), *args[1:], **kwargs)
    try:
        return DISPATCHER.run_paged(func, types, args, kwargs)
    except _OpTooLarge:
        if any(has_no_strides(value) for value in tree_leaves((args, kwargs))):
            raise  # a nested or sparse index: no rows to name past the tier, the pager's error
        _check_index_select_bounds(func, args, kwargs)  # torch's error before the pager's
        _check_form_as_dense(func, args, kwargs)
        permuted = _gather_of_outermost_first(func, args, kwargs)
        if permuted is not None:
            return permuted
        in_pieces = _row_pieces(func, args, kwargs)
        if in_pieces is not None:
            return _run_in_row_pieces(*in_pieces)
        by_rows = _elements_by_rows(func, args, kwargs)
        if by_rows is None:
            _raise_the_dense_error(func, args, kwargs, args[0])
            raise
    table, row_index, bound, run = by_rows
    flat = _positions_in_range(func, row_index, bound, table.shape[0])
    row_elements = table.numel() // table.shape[0] if func is aten.take.default else 1
    rows, inverse = torch.unique(flat // row_elements, sorted=True, return_inverse=True)
    renumbered = inverse if row_elements == 1 else inverse * row_elements + flat % row_elements
    result = run(_rows_compacted(table, rows), renumbered.reshape(row_index.shape).to(row_index.device))
    return _laid_out_as(result, run(_stand_in_of_rows(table), _zeros_laid_out_as(row_index)))


def _check_form_as_dense(func: OpOverload, args: tuple, kwargs: dict) -> None:
    """torch's own error for a gather past the tier whose index the dense op refuses by its dtype,
    rank or shape (an int16 index, a float one, a ``gather`` index of another rank or larger than
    the table, index tensors that do not broadcast, a mask of another shape), before any page
    moves and with no memory of the table's size: the op on meta stand-ins (the table's layout,
    the indices', a mask as the positions it holds), and where that raises, torch's CPU kernel on
    the stand-ins of :func:`_dense_stand_ins` for its words (the meta kernel's differ; the CPU
    kernel raises them before it reads an element). A form the meta kernel lacks (``masked_select``)
    or takes (``index_select`` of an int16 index) is left to its path, which ends in
    :func:`_raise_the_dense_error` where it cannot run."""
    table = args[0]
    if not isinstance(table, PagedTensor):
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (a uint8 mask warns; the op itself warns once)
            func(*_meta_stand_ins(func, table, args), **kwargs)
    except NotImplementedError:
        return
    except (RuntimeError, IndexError, ValueError, TypeError):
        _raise_the_dense_error(func, args, kwargs, table, whole=True)


def _meta_stand_ins(func: OpOverload, table: PagedTensor, args: tuple) -> list:
    """``args`` as meta tensors of their layouts; ``aten.index``'s masks as the positions they
    hold (the meta kernel lacks masks), a mask of another shape than the dims it covers raising
    ``ValueError`` (torch's error for it comes from the CPU kernel)."""
    stand_ins = [meta_layout(value) for value in args]
    if func is aten.index.Tensor and isinstance(args[1], (list, tuple)):
        indices, start = [], 0
        for item in args[1]:
            if isinstance(item, torch.Tensor) and item.dtype in (torch.bool, torch.uint8):
                if tuple(item.shape) != tuple(table.shape[start : start + item.dim()]):
                    raise ValueError("a mask of another shape")
                count = int(plain_copy(item).count_nonzero())
                indices += [torch.empty(count, dtype=torch.int64, device="meta")] * item.dim()
                start += item.dim()
                continue
            indices.append(meta_layout(item))
            start += 1
        stand_ins[1] = indices
    return stand_ins


def _raise_the_dense_error(func: OpOverload, args: tuple, kwargs: dict, table: PagedTensor, whole: bool = False) -> None:
    """torch's own error where the dense op refuses ``args`` (an index dtype, rank or shape, an
    index out of range), for a gather (or embedding bag) of ``table`` about to raise the pager's
    error past the tier: the op itself, torch's CPU kernel, run on :func:`_dense_stand_ins` (the
    indices' values, the table a zero broadcast to its shape: no page read, no memory of its
    size). Returns where the op takes them. Called on the way to the pager's error alone."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        func(*_dense_stand_ins(func, args, table, whole), **{key: _dense_stand_in(value, table, None) for key, value in kwargs.items()})


def _dense_stand_ins(func: OpOverload, args: tuple, table: PagedTensor, whole: bool) -> list:
    """``args`` on the CPU for :func:`_raise_the_dense_error`: ``table`` a zero broadcast to its
    shape, the other tensors (indices, masks, offsets) their values. Unless ``whole``, the table's
    dims whose size the result takes but no index reads are of one element (``index``'s dims no
    index tensor names, ``index_select``'s other dims, ``embedding``'s row), so the result is as
    small as the indices: torch's checks of their values see the same sizes."""
    shape = list(table.shape)
    if not whole and func is aten.index.Tensor and isinstance(args[1], (list, tuple)):
        named, start = set(), 0
        for item in args[1]:
            width = item.dim() if isinstance(item, torch.Tensor) and item.dtype in (torch.bool, torch.uint8) else 1
            if item is not None:
                named.update(range(start, start + width))
            start += width
        shape = [size if d in named else min(size, 1) for d, size in enumerate(shape)]
    elif not whole and func is aten.index_select.default and isinstance(args[1], int) and -len(shape) <= args[1] < len(shape):
        shape = [size if d == args[1] % len(shape) else min(size, 1) for d, size in enumerate(shape)]
    elif not whole and func is aten.embedding.default and len(shape) == 2:
        shape[1] = min(shape[1], 1)
    return [_dense_stand_in(value, table, shape) for value in args]


def _dense_stand_in(value: Any, table: PagedTensor, shape: Optional[list[int]]) -> Any:
    if value is table:
        return torch.zeros((), dtype=table.dtype).expand(shape)
    if isinstance(value, torch.Tensor):
        return plain_copy(value).to("cpu")
    if type(value) in (list, tuple):
        return type(value)(_dense_stand_in(item, table, shape) for item in value)
    return value


def _reads_no_element(func: OpOverload, args: tuple) -> bool:
    """Whether ``func`` is ``gather`` or ``take`` of a PagedTensor table by an empty index tensor."""
    if not isinstance(args[0], PagedTensor):
        return False
    index = args[2] if func is aten.gather.default and len(args) > 2 else args[1] if func is aten.take.default else None
    return isinstance(index, torch.Tensor) and index.numel() == 0


def _check_index_select_bounds(func: OpOverload, args: tuple, kwargs: dict) -> None:
    """For ``index_select`` along any dim by an integer index: the dense op's error for an index out
    of range (:func:`_positions_in_range`), no page read; any other call is left to its path."""
    if func is not aten.index_select.default or kwargs or len(args) != 3:
        return
    table, dim, index = args
    if not isinstance(dim, int) or not -table.dim() <= dim < table.dim() or not isinstance(index, torch.Tensor):
        return
    if index.dtype in (torch.int64, torch.int32) and index.dim() <= 1:
        dim %= table.dim()
        _positions_in_range(func, plain_copy(index), table.shape[dim], table.shape[dim], dim, table.dim())


def _positions_in_range(func: OpOverload, index: torch.Tensor, bound: int, size: int, dim: int = 0, table_dims: int = 1) -> torch.Tensor:
    """``index``'s values as int64 on the CPU, those below 0 counted from ``bound`` where ``func``
    counts so (``index``, ``take``; not ``gather``, ``index_select``, ``embedding``), after checking
    each is in ``[0, bound)``: else the error the dense op raises (on the CPU), naming the value as
    given and dim ``dim`` of ``size`` elements of a table of ``table_dims`` dims, before any page
    faults in (and before a CUDA kernel could assert)."""
    given = index.reshape(-1).to("cpu", torch.int64)
    counts_from_end = func is aten.index.Tensor or func is aten.take.default
    flat = torch.where(given < 0, given + bound, given) if counts_from_end else given
    bad = given[(flat < 0) | (flat >= bound)]
    if bad.numel():
        if func is aten.take.default:
            raise IndexError(f"PagedTensor: {func}: out of range: tried to access index {int(bad[0])} on a tensor of {bound} elements.")
        if func is aten.index_select.default and table_dims >= 2 and dim == 1:  # torch's CPU kernel along dim 1 of any table
            raise RuntimeError(f"PagedTensor: {func}: INDICES element is out of DATA bounds, id={int(bad[0])} axis_dim={size}")
        if func is aten.index_select.default or func is aten.embedding.default:
            raise IndexError(f"PagedTensor: {func}: index out of range in self")
        error = RuntimeError if func is aten.gather.default else IndexError
        raise error(f"PagedTensor: {func}: index {int(bad[0])} is out of bounds for dimension {dim} with size {size}")
    return flat


def _laid_out_as(result: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
    """``result`` with ``layout``'s strides (a copy where they differ)."""
    if result.stride() == layout.stride():
        return result
    return torch.empty_strided(layout.shape, layout.stride(), dtype=result.dtype, device=result.device).copy_(result)


def _zeros_laid_out_as(index: torch.Tensor) -> torch.Tensor:
    """Zeros with ``index``'s shape, dtype, device and strides (overlapping ones included)."""
    reach = element_span(tuple(index.shape), index.stride(), 0)[1]
    return torch.zeros(max(1, reach), dtype=index.dtype, device=index.device).as_strided(index.shape, index.stride())


RowPiece = Callable[[torch.Tensor, int, int], torch.Tensor]
"""``piece(rows_of_table, start, stop)``: the op's result rows ``[start, stop)`` from the table's."""


def _row_pieces(func: OpOverload, args: tuple, kwargs: dict) -> Optional[tuple[PagedTensor, int, int, RowPiece, int]]:
    """``(table, rows, rows_a_piece, piece, row_dim)`` when row ``r`` along ``row_dim`` of ``func``'s
    result (of ``rows`` rows) is read from row ``r`` of its PagedTensor table alone (a piece of
    ``rows_a_piece`` table rows at a time, :func:`_rows_a_piece`): ``gather`` or ``index_select``
    along a dim other than 0, ``index`` whose first index is ``None`` (``t[:, i]``, along dim 0;
    ``t[:, i, :, j]``, whose index tensors stand apart, along the dim after the indices' broadcast
    dims, which torch puts first). ``None`` for any other form."""
    table = args[0]
    if not isinstance(table, PagedTensor) or table.dim() < 2 or table.numel() == 0 or table._inner is not None:
        return None
    count = _rows_a_piece(table)
    if not 0 < count < table.shape[0]:
        return None  # one row spans more than a piece (dim 0 is not the outermost), or all of them fit in one
    if func is aten.gather.default:
        dim, index = args[1], args[2]
        if dim in (0, -table.dim()) or not isinstance(index, torch.Tensor) or index.dim() != table.dim():
            return None
        index = plain_copy(index)
        sparse_grad = kwargs.get("sparse_grad", args[3] if len(args) > 3 else False)
        if index.shape[0] > table.shape[0]:
            return None  # torch's size error, from the generic way
        return table, index.shape[0], count, lambda rows, a, b: func(rows, dim, index[a:b], sparse_grad=sparse_grad), 0
    if func is aten.index_select.default:
        dim, index = args[1], args[2]
        if kwargs or dim in (0, -table.dim()) or not isinstance(index, torch.Tensor):
            return None
        index = plain_copy(index)
        return table, table.shape[0], count, lambda rows, a, b: func(rows, dim, index), 0
    if func is not aten.index.Tensor or kwargs or not args[1] or args[1][0] is not None:
        return None
    indices = [plain_copy(item) if isinstance(item, torch.Tensor) else item for item in args[1]]
    places = [place for place, item in enumerate(indices) if item is not None]
    if not places:
        return None
    row_dim = 0
    if places != list(range(places[0], places[-1] + 1)):  # the broadcast dims first: a mask's positions are 1-D
        row_dim = max(1 if item.dtype in (torch.bool, torch.uint8) else item.dim() for item in indices if item is not None)
    return table, table.shape[0], count, lambda rows, a, b: func(rows, indices), row_dim


def _run_in_row_pieces(table: PagedTensor, rows: int, count: int, piece: RowPiece, row_dim: int = 0) -> torch.Tensor:
    """The op's result, its rows along ``row_dim`` computed a piece of the table's rows at a time
    (each piece spans at most :func:`~pagedtensor.pieces.piece_elements_of` elements: ``count``
    rows), laid out as the dense op lays it (the op run on a plain stand-in of two rows with the
    table's strides)."""
    if rows == 0:
        return piece(_stand_in_of_rows(table, 0), 0, 0)
    probe = piece(_stand_in_of_rows(table, min(rows, 2)), 0, min(rows, 2))
    shape = list(probe.shape)
    shape[row_dim] = rows
    result = _empty_laid_out_as(probe, tuple(shape), row_dim)
    for start in range(0, rows, count):
        stop = min(rows, start + count)
        result.narrow(row_dim, start, stop - start).copy_(piece(table[start:stop], start, stop))
    return result


def _empty_laid_out_as(probe: torch.Tensor, shape: tuple[int, ...], row_dim: int = 0) -> torch.Tensor:
    """An empty tensor of ``shape`` laid out as the dense op lays it, from ``probe`` (with its dtype
    and device): the op's result on a stand-in of a few rows, of ``shape`` but in ``row_dim``.
    The strides of the dims that lie outside ``row_dim`` in memory scale with the rows, the others
    (a dim of one element among them, whatever its stride) stay as they are. A probe of no
    elements gives its order of dims in memory only."""
    probe_rows, unit = probe.shape[row_dim], probe.stride(row_dim)
    if probe.numel() == 0 or unit == 0:
        order = sorted(range(probe.dim()), key=lambda d: -probe.stride(d))
        return torch.empty_permuted(shape, order, dtype=probe.dtype, device=probe.device)
    rows = shape[row_dim]
    strides = [s if d == row_dim or s < probe_rows * unit else s // probe_rows * rows for d, s in enumerate(probe.stride())]
    return torch.empty_strided(shape, strides, dtype=probe.dtype, device=probe.device)


def _rows_a_piece(table: PagedTensor) -> int:
    """How many rows along dim 0 a piece of ``table`` holds (:func:`~pagedtensor.pieces.piece_elements_of`
    elements from a row's first to the last row's last); the table's row count where the rows do not
    advance (stride 0), 0 where one row spans more than a piece."""
    one_row = element_span(tuple(table.shape[1:]), table.stride()[1:], 0)[1]
    budget = piece_elements_of([table]) or 0
    if one_row > budget:
        return 0
    step = table.stride(0)
    return table.shape[0] if step <= 0 else (budget - one_row) // step + 1


def _elements_by_rows(func: OpOverload, args: tuple, kwargs: dict) -> Optional[tuple]:
    """``(table, row_index, bound, run)`` when the elements ``func`` reads lie in rows along dim 0
    named by ``row_index``, whose values count up to ``bound`` (the rows, or for ``take`` the
    elements); ``run(compact, renumbered)`` is the op on a table of the rows read, ``row_index``
    renumbered. ``None`` for any other form."""
    table = args[0]
    if not isinstance(table, PagedTensor) or table.dim() == 0 or not _rows_can_be_copied(table):
        return None
    if func is aten.take.default:
        index = args[1]
        if kwargs or not isinstance(index, torch.Tensor) or index.dtype != torch.int64:
            return None
        return table, plain_copy(index), table.numel(), lambda compact, renumbered: func(compact, renumbered)
    if func is aten.gather.default:
        dim, index = args[1], args[2]
        if dim not in (0, -table.dim()) or not isinstance(index, torch.Tensor) or index.dtype not in (torch.int64, torch.int32):
            return None
        sparse_grad = kwargs.get("sparse_grad", args[3] if len(args) > 3 else False)
        return table, plain_copy(index), table.shape[0], lambda compact, renumbered: func(compact, 0, renumbered, sparse_grad=sparse_grad)
    if func is not aten.index.Tensor or kwargs or not args[1] or not isinstance(args[1][0], torch.Tensor):
        return None
    indices = [plain_copy(item) if isinstance(item, torch.Tensor) else item for item in args[1]]
    first = indices[0]
    if first.dtype in (torch.bool, torch.uint8):  # a mask over the leading dims: its positions, as torch takes them
        if first.dim() > table.dim() or tuple(first.shape) != tuple(table.shape[: first.dim()]):
            mismatch = next((d for d in range(min(first.dim(), table.dim())) if first.shape[d] != table.shape[d]), 0)
            raise IndexError(
                f"PagedTensor: {func}: The shape of the mask {list(first.shape)} at index {mismatch} does not match "
                f"the shape of the indexed tensor {list(table.shape)} at index {mismatch}"
            )
        indices = [*(position.contiguous() for position in first.nonzero().unbind(1)), *indices[1:]]
        first = indices[0]
    elif first.dtype not in (torch.int64, torch.int32):
        return None
    rest = indices[1:]
    return table, first, table.shape[0], lambda compact, renumbered: func(compact, [renumbered, *rest])


def _rows_can_be_copied(table: PagedTensor) -> bool:
    """Whether :func:`_rows_compacted` can copy rows of ``table`` (of at least one dim): some
    elements, rows that advance along dim 0, no conjugate or negative bit, not traced."""
    return table._inner is None and table.numel() > 0 and table.stride(0) != 0 and not table.is_conj() and not table.is_neg()


def _gather_of_outermost_first(func: OpOverload, args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """The op past the device tier on a PagedTensor table whose dim 0 is not the outermost in memory
    (``t.T``, ``t.permute(2, 0, 1)``): rewritten on ``table.permute(order)``, its dims ordered
    outermost first (a view sharing the pages), so that it runs by rows or a piece of rows at a time,
    its result permuted back and laid out as the dense op lays it. ``gather``, ``index_select``,
    ``take`` and ``index`` (index tensors, masks, ``None``); ``None`` for any other form, or a table
    whose dim 0 is already the outermost. Bad indices raise the dense op's error before pages move."""
    table = args[0]
    if not isinstance(table, PagedTensor) or table.dim() < 2 or table.numel() == 0 or table._inner is not None:
        return None
    order = _outermost_first(table)
    if order[0] == 0:
        return None
    if func is aten.gather.default:
        return _gather_permuted(func, table, order, args, kwargs)
    if func is aten.index_select.default and not kwargs:
        return _index_select_permuted(func, table, order, args[1], args[2])
    if func is aten.take.default and not kwargs:
        return _take_permuted(func, table, order, args[1])
    if func is aten.index.Tensor and not kwargs:
        return _index_permuted(func, table, order, args[1])
    return None


def _outermost_first(table: torch.Tensor) -> list[int]:
    """``table``'s dims by stride, largest first (dims of one element last; ties keep their order)."""
    return sorted(range(table.dim()), key=lambda d: -table.stride(d) if table.shape[d] > 1 else 0)


def _inverse(order: list[int]) -> list[int]:
    return sorted(range(len(order)), key=order.__getitem__)


def _gather_permuted(func: OpOverload, table: PagedTensor, order: list[int], args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """``gather(table, dim, index)`` as ``gather(table.permute(order), order.index(dim), index.permute(order))``
    permuted back: gather reads each result element at its own position, in every dim but ``dim``."""
    dim, index = args[1], args[2]
    if not isinstance(dim, int) or not -table.dim() <= dim < table.dim() or not isinstance(index, torch.Tensor):
        return None
    index = plain_copy(index)
    dim %= table.dim()
    if index.dtype not in (torch.int64, torch.int32) or index.dim() != table.dim():
        return None
    if any(index.shape[d] > table.shape[d] for d in range(table.dim()) if d != dim):
        return None
    _positions_in_range(func, index, table.shape[dim], table.shape[dim], dim)
    sparse_grad = kwargs.get("sparse_grad", args[3] if len(args) > 3 else False)
    got = func(table.permute(order), order.index(dim), index.permute(order), sparse_grad=sparse_grad)
    layout = func(meta_like(table), dim, index.to("meta"), sparse_grad=sparse_grad)
    return _laid_out_as(got.permute(_inverse(order)), layout)


def _index_select_permuted(func: OpOverload, table: PagedTensor, order: list[int], dim: Any, index: Any) -> Optional[torch.Tensor]:
    """``index_select(table, dim, index)`` on ``table.permute(order)`` along ``order.index(dim)``, permuted back."""
    if not isinstance(dim, int) or not -table.dim() <= dim < table.dim() or not isinstance(index, torch.Tensor):
        return None
    index = plain_copy(index)
    dim %= table.dim()
    if index.dtype not in (torch.int64, torch.int32) or index.dim() > 1 or index.device != table.device:
        return None
    # (its indices' bounds: checked by gather_elements, _check_index_select_bounds, before it came here)
    got = func(table.permute(order), order.index(dim), index)
    return _laid_out_as(got.permute(_inverse(order)), func(meta_like(table), dim, index.to("meta")))


def _take_permuted(func: OpOverload, table: PagedTensor, order: list[int], index: Any) -> Optional[torch.Tensor]:
    """``take(table, index)`` on ``table.permute(order)``, each flat position (row-major over the
    table's dims) moved to the same element's flat position over the permuted dims."""
    if not isinstance(index, torch.Tensor):
        return None
    index = plain_copy(index)
    if index.dtype != torch.int64:
        return None
    flat = _positions_in_range(func, index, table.numel(), table.shape[0])
    coordinates = torch.stack(torch.unravel_index(flat, tuple(table.shape)))
    permuted = torch.zeros_like(flat)
    for d in order:
        permuted = permuted * table.shape[d] + coordinates[d]
    got = func(table.permute(order), permuted.reshape(index.shape).to(index.device))
    return _laid_out_as(got, func(meta_like(table), index.to("meta")))


def _index_permuted(func: OpOverload, table: PagedTensor, order: list[int], indices: Any) -> Optional[torch.Tensor]:
    """``table[indices]`` on ``table.permute(order)`` with the indices permuted alike (masks first
    turned into the index tensors of their positions, as torch does), its result's dims then put
    back: each dim not indexed where the dense op puts it, and the indexed dims' broadcast shape
    where the index tensors stand side by side, else first (in both results alike)."""
    expanded = _indices_expanded(func, table, indices)
    if expanded is None:
        return None
    for named_dim, (d, index) in enumerate((d, index) for d, index in enumerate(expanded) if index is not None):
        _positions_in_range(func, index, table.shape[d], table.shape[d], named_dim)
    permuted = [expanded[d] for d in order]
    while permuted[-1] is None:
        permuted.pop()
    got = func(table.permute(order), permuted)
    result_dims, permuted_dims = _index_result_dims(expanded), _index_result_dims([expanded[d] for d in order], order)
    got = got.permute([permuted_dims.index(label) for label in result_dims])
    return _laid_out_as(got, _index_layout(func, table, order, expanded))


def _indices_expanded(func: OpOverload, table: PagedTensor, indices: Any) -> Optional[list[Optional[torch.Tensor]]]:
    """``indices`` as one entry a dim of ``table``: ``None`` or an int64/int32 tensor, a mask turned
    into the index tensors of its positions (the dense error for a mask of another shape); ``None``
    for a form this does not take (index tensors that do not broadcast, too many of them, no tensor)."""
    if not isinstance(indices, (list, tuple)):
        return None
    expanded: list[Optional[torch.Tensor]] = []
    for item in indices:
        if item is None:
            expanded.append(None)
            continue
        if not isinstance(item, torch.Tensor):
            return None
        item = plain_copy(item)
        if item.dtype in (torch.bool, torch.uint8):
            start = len(expanded)
            if start + item.dim() > table.dim():
                return None
            for j in range(item.dim()):
                if item.shape[j] != table.shape[start + j]:
                    raise IndexError(
                        f"PagedTensor: {func}: The shape of the mask {list(item.shape)} at index {j} does not match "
                        f"the shape of the indexed tensor {list(table.shape)} at index {start + j}"
                    )
            expanded.extend(position.contiguous() for position in item.nonzero().unbind(1))
        elif item.dtype in (torch.int64, torch.int32):
            expanded.append(item)
        else:
            return None
    tensors = [item for item in expanded if item is not None]
    if not tensors or len(expanded) > table.dim():
        return None
    try:
        torch.broadcast_shapes(*(item.shape for item in tensors))
    except RuntimeError:
        return None
    return expanded + [None] * (table.dim() - len(expanded))


def _index_result_dims(indices: list[Optional[torch.Tensor]], dims: Optional[list[int]] = None) -> list[tuple[str, int]]:
    """The dims of ``table[indices]`` (one entry a table dim), each labelled ``("dim", d)`` by the
    table dim ``dims[i]`` it spans or ``("index", j)`` by its place in the index tensors' broadcast shape."""
    dims = list(range(len(indices))) if dims is None else dims
    places = [place for place, item in enumerate(indices) if item is not None]
    width = len(torch.broadcast_shapes(*(indices[place].shape for place in places)))
    indexed = [("index", j) for j in range(width)]
    kept = [("dim", dims[place]) for place, item in enumerate(indices) if item is None]
    if places != list(range(places[0], places[-1] + 1)):
        return indexed + kept
    before = sum(1 for place in range(places[0]) if indices[place] is None)
    return kept[:before] + indexed + kept[before:]


def _index_layout(func: OpOverload, table: PagedTensor, order: list[int], indices: list[Optional[torch.Tensor]]) -> torch.Tensor:
    """A tensor with the layout ``table[indices]`` has dense: the real kernel on a plain stand-in
    with the table's strides, its outermost dim of one row and a zero index where indexed, else of
    two rows, the strides of the result's dims outside that dim then scaled to the table's rows.
    (The meta kernel lays some results out otherwise than the CPU/CUDA kernels: for a non-contiguous
    index, and for ``t[:, i]`` of ``t.T.unsqueeze(0)``, strides ``(1, 1, 3)`` where they give
    ``(192, 64, 1)``.)"""
    if any(item is not None and item.numel() == 0 for item in indices):
        return _index_layout_of_no_elements(func, table, indices)
    outer = order[0]
    stand_in_rows = 1 if indices[outer] is not None else 2
    stand_in = _stand_in_of_rows(table.permute(order), stand_in_rows).permute(_inverse(order))
    probe_indices = [_zeros_laid_out_as(item) if d == outer and item is not None else item for d, item in enumerate(indices)]
    probe = func(stand_in, [item if item is None else item.to(table.device) for item in probe_indices])
    if indices[outer] is not None:
        return probe
    place = _index_result_dims(indices).index(("dim", outer))
    unit, rows = probe.stride(place), table.shape[outer]
    strides = [s if d == place or s < 2 * unit else s // 2 * rows for d, s in enumerate(probe.stride())]
    shape = [rows if d == place else size for d, size in enumerate(probe.shape)]
    return torch.empty_strided(shape, strides, dtype=table.dtype, device="meta")


def _index_layout_of_no_elements(func: OpOverload, table: PagedTensor, indices: list[Optional[torch.Tensor]]) -> torch.Tensor:
    """The layout of ``table[indices]`` for index tensors of no elements, which the meta kernel
    lays out otherwise than the CPU/CUDA kernels (:func:`_gather_of_no_rows`): the real kernel on a
    stand-in of no bytes with the table's strides, its indexed dims of no elements."""
    shape = [0 if item is not None else size for item, size in zip(indices, table.shape)]
    stand_in = torch.empty(0, dtype=table.dtype, device=table.device).as_strided(shape, table.stride())
    return func(stand_in, [item if item is None else item.to(table.device) for item in indices])


def _stand_in_of_rows(table: PagedTensor, rows: int = 1) -> torch.Tensor:
    """A plain table of ``rows`` rows (values unset) with ``table``'s row sizes and strides: the dense
    op run on it lays its result out as on ``table`` (of one row: row 0 of any zero index)."""
    row_size, row_stride = tuple(table.shape[1:]), table.stride()[1:]
    row_reach = element_span(row_size, row_stride, 0)[1]
    step = table.stride(0) if rows > 1 else 1
    reach = (rows - 1) * step + row_reach if rows else 0
    return torch.empty(max(1, reach), dtype=table.dtype, device=table.device).as_strided((rows, *row_size), (step, *row_stride))


def _rows_compacted(table: PagedTensor, rows: torch.Tensor) -> torch.Tensor:
    """``table[rows]`` as a plain tensor on the table's device, for ``rows`` sorted, distinct, in range
    (int64 on the CPU): copied one run of adjacent pages at a time, so only the pages holding those
    rows fault in (a run larger than the device tier beside the pinned pages is read in chunks).

    Note:
        The copies run on the current stream, each run's pages pinned until its copy is enqueued.
    """
    row_size, row_stride = tuple(table.shape[1:]), table.stride()[1:]
    if rows.numel() == 0:
        return torch.empty((0, *row_size), dtype=table.dtype, device=table.device)
    itemsize, page_size = table.dtype.itemsize, table._paged.allocation.page_size
    step = table.stride(0)
    starts, ends = _row_byte_spans(table, rows)
    first_pages, last_pages = starts // page_size, (ends - 1) // page_size
    breaks = (torch.nonzero(first_pages[1:] > last_pages[:-1] + 1).flatten() + 1).tolist()
    bounds = [0, *breaks, rows.numel()]
    device = table.device
    parts = []
    for a, b in zip(bounds, bounds[1:]):
        run_rows = rows[a:b]
        first_row = int(run_rows[0])
        try:
            window = _Window(table._paged, int(starts[a]), int(ends[b - 1]))
        except OutOfPagesError:  # a run larger than the device tier beside the pinned pages: read in chunks
            block = DISPATCHER.materialize(table[first_row : int(run_rows[-1]) + 1])
            parts.append(_select_rows(block, (run_rows - first_row).to(device)))
            continue
        try:
            typed = window.typed(table.dtype)
            block = typed.as_strided(
                (int(run_rows[-1]) - first_row + 1, *row_size),
                (step, *row_stride),
                typed.storage_offset() + table._offset + first_row * step - window.first_byte // itemsize,
            )
            parts.append(_select_rows(block, (run_rows - first_row).to(device)))
        finally:
            window.release()
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _select_rows(block: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``block.index_select(0, positions)``; a 1-D block as a column (torch's CPU kernel lacks the
    unsigned 16 to 64-bit dtypes for 1-D tensors, and has them for 2-D ones: the same elements)."""
    if block.dim() == 1:
        return block.unsqueeze(1).index_select(0, positions).squeeze(1)
    return block.index_select(0, positions)


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
    return _call_with_table(func, _stand_in_of_rows(table), _zeros_laid_out_as(index))


def _call_with_table(func: OpOverload, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    if func is aten.index_select.default:
        return func(table, 0, index)
    if func is aten.embedding.default:
        return func(table, index)
    return func(table, [index])


@functools.cache
def _kernel_dtype_refusal(func: OpOverload, dtype: torch.dtype, device: torch.device, index_dtype: torch.dtype) -> Optional[str]:
    """torch's message where its kernel of the row gather ``func`` has no implementation for a
    table of ``dtype`` (``"index_cpu" not implemented for 'Float4_e2m1fn_x2'``, word for word), found once for each
    op, dtype and device by the op on a one-row stand-in; None where it takes the dtype."""
    table = torch.zeros((1, 1), dtype=torch.uint8, device=device).view(dtype) if dtype.itemsize == 1 else torch.zeros((1, 1), dtype=dtype, device=device)
    index = torch.zeros(1, dtype=index_dtype, device=device)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if func is aten.index_select.default:
                func(table, 0, index)
            elif func is aten.embedding.default:
                func(table, index)
            else:
                func(table, [index])
    except NotImplementedError as error:
        return str(error)  # torch's words, as the dense op raises them (no "PagedTensor:" prefix)
    except Exception:  # noqa: BLE001 - any other complaint is not about the dtype: the gather's own path decides
        return None
    return None


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
    if has_no_strides(index):
        return None  # a nested or sparse index: no rows to renumber in its shape
    if not _rows_can_be_copied(table):
        return None
    if isinstance(index, PagedTensor):
        index = index.materialize()
    if func is aten.index.Tensor and index.dtype in (torch.bool, torch.uint8):
        return None  # a mask, not row numbers
    return table, index


@implements([aten.masked_select.default])
def masked_select(func: OpOverload, types: tuple, args: tuple, kwargs: dict) -> Any:
    """``masked_select``: the generic way while its pages fit on the device tier at once; past it,
    by a bool mask on the table's device of its shape or broadcast to it (expanded), as
    ``table[mask]`` (the same elements in the same row-major order, a 1-D result:
    :func:`gather_elements`). Other forms (a table broadcast against a larger mask) raise
    :class:`OutOfPagesError` past the tier. A dtype torch's kernel lacks (uint16/32/64 on the CPU,
    which ``aten.index`` has) raises torch's error, from the dense op on a one-element stand-in,
    where the mask selects an element (the dense op raises only then)."""
    try:
        return DISPATCHER.run_paged(func, types, args, kwargs)
    except _OpTooLarge:
        table, mask = args[0], args[1]
        if kwargs or not isinstance(table, PagedTensor) or not isinstance(mask, torch.Tensor):
            raise
        if mask.dtype != torch.bool or mask.device != table.device or broadcast_shape([mask, table]) != tuple(table.shape):
            # torch's error (a uint8 mask, shapes that do not broadcast); the mask's values no check
            # reads: all False, the stand-in selects nothing (a mask broadcast past the table would
            # otherwise select as many elements as the refused op)
            no_elements = torch.zeros((), dtype=mask.dtype).expand(mask.shape)
            _raise_the_dense_error(func, (table, no_elements), kwargs, table)
            raise
    mask = plain_copy(mask)
    try:  # torch's checks of the dtype: the dense op on a one-element stand-in selecting its element
        func(torch.empty(1, dtype=table.dtype, device=table.device), torch.ones(1, dtype=torch.bool, device=table.device))
    except (NotImplementedError, RuntimeError):
        if table.numel() and mask.any():
            raise
    return aten.index.Tensor(table, [mask.expand(table.shape)])


_FUNCTIONAL_OF_OUT = {
    aten.gather.out: aten.gather.default,
    aten.take.out: aten.take.default,
    aten.index_select.out: aten.index_select.default,
    aten.index.Tensor_out: aten.index.Tensor,
    aten.embedding.out: aten.embedding.default,
    aten.masked_select.out: aten.masked_select.default,
}


@implements(list(_FUNCTIONAL_OF_OUT))
def gather_into_out(func: OpOverload, types: tuple, args: tuple, kwargs: dict) -> Any:
    """The ``out=`` forms of the gathers: the generic way while their pages (``out``'s among them)
    fit on the device tier at once; past it, :func:`run_into_out` with the gather itself
    (:func:`gather_rows`, :func:`gather_elements`: only the rows read fault in, or a piece of rows
    at a time), ``out`` resized to :func:`_resized_layout`, and ``out`` checked against the table's
    elements but for ``embedding`` (which torch runs into a temporary). Returns ``out``.

    Note:
        Stream order is that of the gather, then of the copy, both on the current stream. Nothing
        is written to ``out`` before the gather has run (bad indices leave it untouched).
    """
    try:
        return DISPATCHER.run_paged(func, types, args, kwargs)
    except _OpTooLarge:
        pass
    resized = lambda result: _resized_layout(func, args, result)
    return run_into_out(func, args, kwargs, _FUNCTIONAL_OF_OUT[func], resized, checks_table_overlap=func is not aten.embedding.out)


OutLayout = Callable[[torch.Tensor], torch.Tensor]
"""``layout(result)``: a tensor with the shape and strides torch gives an ``out`` it resizes to hold
``result`` (the functional op's)."""


def run_into_out(
    func: OpOverload, args: tuple, kwargs: dict, functional: OpOverload, resized_layout: OutLayout, checks_table_overlap: bool
) -> torch.Tensor:
    """``func`` (an ``out=`` form) past the device tier as ``functional`` then a copy: torch's checks
    of ``out`` that need no page (its dtype and device, :func:`_check_out_dtype_and_device`), then
    ``functional`` on the other arguments (which runs past the tier its own way), then ``out``
    resized as torch resizes it (a plain ``out`` of another shape to ``resized_layout(result)``,
    with torch's warning; a PagedTensor ``out`` of another shape raises, as on the generic path),
    checked for the overlaps torch refuses (:func:`_check_out_overlaps`; with the table's elements
    where ``checks_table_overlap``) and written with ``copy_`` (a PagedTensor ``out`` larger than
    the tier a piece at a time). Returns ``out``.

    Note:
        Stream order is that of ``functional``, then of the copy, both on the current stream.
        Nothing is written to ``out`` before ``functional`` has run.
    """
    out = kwargs["out"]
    functional_kwargs = {key: value for key, value in kwargs.items() if key != "out"}
    _check_out_dtype_and_device(func, args, functional_kwargs, out)
    result = functional(*args, **functional_kwargs)
    if out.shape != result.shape:
        if isinstance(out, PagedTensor):
            raise resize_refused(func, out.shape, result.shape, args, kwargs)
        _resize_output(out, resized_layout(result))
    _check_out_overlaps(func, out, args[0], checks_table_overlap)
    if checks_table_overlap:  # and with the index, as torch's gathers check it (index_select's ``x[40, :8]`` into ``x[40:48]``)
        for index in (item for arg in args[1:] for item in (arg if isinstance(arg, (list, tuple)) else (arg,))):
            _check_out_overlaps(func, out, index)
    if isinstance(out, PagedTensor) and result.stride() != out.stride():
        # copy_ into a PagedTensor runs in pieces of one layout (pieces of another would need the
        # whole of an outer index of out at once): the result in out's layout first.
        result = _laid_out_as(result, out)
    return aten.copy_.default(out, result)


def _resized_layout(func: OpOverload, args: tuple, result: torch.Tensor) -> torch.Tensor:
    """A tensor with the layout torch gives an ``out`` it resizes: ``take``'s that of ``empty_like``
    of its index, the other gathers' that of their functional result."""
    if func is not aten.take.out:
        return result
    index = args[1]
    return torch.empty_like(meta_like(index) if isinstance(index, PagedTensor) else index, device="meta")


def _resize_output(out: torch.Tensor, layout: torch.Tensor) -> None:
    """Resize a plain ``out`` to ``layout``'s shape and strides, with the warning of torch's
    ``resize_output`` when ``out`` had elements."""
    if out.numel() != 0:
        warnings.warn(
            f"An output with one or more elements was resized since it had shape {list(out.shape)}, which does not "
            f"match the required output shape {list(layout.shape)}. This behavior is deprecated, and in a future "
            "PyTorch release outputs will not be resized unless they have zero elements. You can explicitly reuse "
            "an out tensor t by resizing it, inplace, to zero elements with t.resize_(0).",
            stacklevel=5,
        )
    out.resize_(layout.shape)
    if out.stride() != layout.stride():
        out.as_strided_(layout.shape, layout.stride())


def _check_out_dtype_and_device(func: OpOverload, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
    """torch's own errors for an ``out`` of the wrong dtype or device (and for arguments of the
    wrong dtype or rank), raised by ``func`` itself run on one-element zero stand-ins of its tensor
    arguments into an empty tensor of ``out``'s dtype and device. No page is read."""
    with warnings.catch_warnings():  # the gather itself warns as torch does (a uint8 mask, say), once
        warnings.simplefilter("ignore")
        func(*map(one_element_stand_in, args), **kwargs, out=torch.empty(0, dtype=out.dtype, device=out.device))


def _check_out_overlaps(func: OpOverload, out: torch.Tensor, table: Any, checks_table_overlap: bool = True) -> None:
    """torch's errors for an ``out`` whose elements overlap each other (a dim of stride 0) or, where
    ``checks_table_overlap`` (not for ops torch runs into a temporary, such as ``embedding``), the
    table's elements (:func:`~pagedtensor.dispatch.refuse_overlap_with_input`)."""
    refuse_internal_overlap(func, out)
    if checks_table_overlap:
        refuse_overlap_with_input(func, out, table)
