"""The handler of the out-of-place scatters (``index_put``, ``index_copy``, ``index_add``,
``index_fill``, ``index_reduce``, ``masked_scatter``, ``put``, ``scatter``, ``scatter_add``,
``scatter_reduce``) of a PagedTensor larger than a piece: torch runs each as a copy of ``self``
and the in-place op on the copy, and so does this, the copy read a part of the pages at a time.
"""

from __future__ import annotations

from typing import Any

import torch
from torch._ops import OpOverload

from pagedtensor.dispatch import DISPATCHER, aten, implements
from pagedtensor.handlers.parts import _arguments_by_name, _copies_in_parts, _larger_than_a_piece, _meta, copy_in_parts
from pagedtensor.handlers.row_scatters import _overlapping_stand_in
from pagedtensor.pieces import functional_form
from pagedtensor.tensor import PagedTensor, plain_copy

_IN_PLACE_SCATTERS = (
    aten.index_put_.default, aten.index_copy_.default, aten.index_add_.default, aten.index_fill_.int_Scalar, aten.index_fill_.int_Tensor,
    aten.index_reduce_.default, aten.masked_scatter_.default, aten.put_.default, aten.scatter_.src, aten.scatter_.value,
    aten.scatter_.reduce, aten.scatter_.value_reduce, aten.scatter_add_.default, aten.scatter_reduce_.two,
)  # fmt: skip
_IN_PLACE_FORM_OF = {functional_form(in_place): in_place for in_place in _IN_PLACE_SCATTERS}


@implements(list(_IN_PLACE_FORM_OF))
def scatter_into_a_copy(func: OpOverload, types: tuple, args: tuple, kwargs: dict) -> Any:
    """``t.index_put(indices, values)``, ``t.masked_scatter(mask, source)``, ``t.scatter(dim, index,
    src)`` and the other out-of-place scatters of a PagedTensor ``t`` larger than a piece: torch's
    checks and errors first, from the in-place op on
    :func:`~pagedtensor.handlers.row_scatters._overlapping_stand_in` (no page read); then a plain
    result laid out as the dense op lays it out (its meta kernel's result), ``t`` (broadcast to it,
    for ``masked_scatter``) copied in a part of its pages at a time
    (:func:`~pagedtensor.handlers.parts.copy_in_parts`), and the in-place op on the result, with the
    other arguments as given. torch's kernels of these ops are that copy and that in-place op, so
    the result has the dense op's bits; ``t`` is only read. A table that fits in one piece, or of a
    form not read in parts (a traced one, the conjugate or negative bit), runs the generic way.

    Stream order: the copies and the op run one after another on the current stream."""
    table = args[0] if args else kwargs.get("self")
    if not isinstance(table, PagedTensor) or table._inner is not None or not _copies_in_parts([table]) or not _larger_than_a_piece([table]):
        return DISPATCHER.run_generic(func, types, args, kwargs)
    in_place = _IN_PLACE_FORM_OF[func]
    rest = {name: value for name, value in kwargs.items() if name != "self"}
    shape = table.shape
    if func is aten.masked_scatter.default:  # self broadcast with the mask, as torch's expand_outplace does (its error too)
        shape = torch._C._infer_size(_arguments_by_name(func, args, kwargs)["mask"].shape, table.shape)
    # The other PagedTensor arguments (a source, an index, a mask) as plain copies, as the result is
    # one: the in-place op on a plain tensor would take them the generic way, all their pages at once.
    others, rest = _read_whole(args[1:]), dict(zip(rest, _read_whole(tuple(rest.values()))))
    in_place(_overlapping_stand_in(table, shape), *others, **rest)  # torch's checks and errors; no page of the table read
    layout = func(*_meta(args), **_meta(kwargs))  # the dense result's layout
    result = torch.empty_strided(layout.shape, layout.stride(), dtype=layout.dtype, device=table.device)
    copy_in_parts(result, table.expand(layout.shape))
    return in_place(result, *others, **rest)


def _read_whole(values: tuple) -> tuple:
    """``values`` with each PagedTensor, also in a list or tuple (``index_put``'s indices), as a plain copy."""
    return tuple(type(value)(_read_whole(tuple(value))) if type(value) in (list, tuple) else plain_copy(value) for value in values)

