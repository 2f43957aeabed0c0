"""Ops over lists of tensors whose PagedTensors do not fit on the device tier at once: an index at a
time, and a piece of one index's pages at a time.

The ops: ``torch._foreach_*`` (``torch._foreach_mul_(tensors, 2)``), the fused optimizer steps
(``_fused_adam_``, ``_fused_adamw_``, ``_fused_sgd_``, ``_fused_adagrad_`` and their functional forms)
and ``_amp_foreach_non_finite_check_and_unscale_`` (``GradScaler.unscale_``). They are what
``torch.optim`` runs with ``foreach=True`` or ``fused=True``. Each index of such an op reads and
writes that index's tensors only (a fused Adam step updates each parameter from its own gradient and
state; the arguments that are not lists, a tensor ``lr`` or a scalar tensor ``other``, are read alike
by every index, and ``found_inf`` is set by any index holding an inf): the op on a list is the op on
each index's one-element lists in turn, which is also how the CPU kernels loop.

So where an op's pages do not fit at once, it runs index by index, each index a call of the same op
on one-element lists, dispatched as any op (on the PagedTensors of that index only). An index whose
own pages do not fit runs a piece at a time where the op is elementwise (all of them but the
reductions ``_foreach_norm``, ``_foreach_max``, ``_foreach_powsum`` and the matmul ``_foreach_mm``)
and the index's tensors are of one shape and one layout that fills their spans (row-major,
channels-last, transposed: what a parameter, its gradient and its ``zeros_like`` state share), or of
one element (a step count, read whole by every piece; a paged one read once, as a plain tensor, and
a paged one the op writes left to the pager's error), with no two views of one allocation but the
same view: each piece is the op on 1-D views of the same run of each one's span (the elements in
memory order, as the kernels walk them), as :mod:`pagedtensor.pieces` runs a single elementwise op
(on a CPU a vectorized loop then ends where each piece does; see the README). A functional form
(``_foreach_sqrt``) fills plain results of the dense op's dtype and layout piece by piece through its
``out=`` overload.

Note:
    Stream order is each call's (see :mod:`pagedtensor.dispatch`): the indices and the pieces run one
    after another on the current stream. An in-place op that fails at an index or a piece (one
    whose pages do not fit, and cannot run in pieces) leaves the indices and pieces before it
    written, as :func:`~pagedtensor.pieces.run_in_pieces` does.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any, Callable, Optional

import torch
from torch._ops import OpOverload

from pagedtensor.pieces import flat_piece, may_share_bytes, piece_elements_of, same_view
from pagedtensor.tensor import PagedTensor, dense_and_non_overlapping

_FUSED_STEPS = frozenset({"_fused_adam", "_fused_adamw", "_fused_sgd", "_fused_adagrad", "_amp_foreach_non_finite_check_and_unscale"})
# List ops whose result at an index is not made elementwise from that index's tensors.
_NOT_ELEMENTWISE = frozenset({"_foreach_norm", "_foreach_max", "_foreach_powsum", "_foreach_mm"})
# A ``Tensor`` argument holding one number per index (``_foreach_addcmul_.Tensor``'s ``scalars``).
_PER_INDEX_TENSORS = frozenset({"scalars"})


def _base_name(func: OpOverload) -> str:
    """``_foreach_add`` for ``aten::_foreach_add_.List``."""
    return func._schema.name.split("::")[-1].rstrip("_")


def is_list_op(func: OpOverload) -> bool:
    """Whether ``func`` is one of this module's ops: each index of its lists independent of the others."""
    name = _base_name(func)
    return name.startswith("_foreach_") or name in _FUSED_STEPS


@functools.cache
def _per_index_names(func: OpOverload) -> frozenset[str]:
    """The arguments of ``func`` that hold one entry per index: its lists (``Tensor[]``, ``Scalar[]``)
    and the per-index ``scalars`` tensor."""
    return frozenset(
        argument.name
        for argument in func._schema.arguments
        if isinstance(argument.type, torch.ListType)
        or (argument.name in _PER_INDEX_TENSORS and isinstance(argument.type, torch.TensorType))
    )


def _map_per_index(func: OpOverload, args: tuple, kwargs: dict, fn: Callable[[str, Any], Any]) -> tuple[tuple, dict]:
    """``args`` and ``kwargs`` with each per-index argument's value replaced by ``fn(name, value)``."""
    names = _per_index_names(func)
    return _map_all(func, args, kwargs, lambda name, value: fn(name, value) if name in names else value)


def _per_index_lists(func: OpOverload, args: tuple, kwargs: dict) -> list[Any]:
    """The values given for ``func``'s per-index lists (:func:`_per_index_names`)."""
    names = _per_index_names(func)
    return [value for name, value in zip((argument.name for argument in func._schema.arguments), args) if name in names] + [
        value for name, value in kwargs.items() if name in names
    ]


def _index_count(func: OpOverload, args: tuple, kwargs: dict) -> Optional[int]:
    """The length of ``func``'s non-empty per-index lists (``max_exp_avg_sqs`` is empty without
    amsgrad); None where they differ (torch's error, raised by the caller) or none is given."""
    lengths = {len(value) for value in _per_index_lists(func, args, kwargs) if isinstance(value, (list, tuple)) and value}
    return lengths.pop() if len(lengths) == 1 else None


def run_list_op(func: OpOverload, args: tuple, kwargs: dict) -> Any:
    """Run the list op ``func``, whose pages do not fit at once, an index at a time, and one index's
    tensors a piece at a time (see the module docstring); ``NotImplemented`` when it is not such
    an op, or its one index cannot run in pieces (the caller raises the pager's error)."""
    if not is_list_op(func):
        return NotImplemented
    count = _index_count(func, args, kwargs)
    if count is None:
        return NotImplemented
    if count > 1:
        if _written_at_another_index(func, args, kwargs, count):
            return NotImplemented
        return _run_by_index(func, args, kwargs, count)
    return _run_one_index_in_pieces(func, args, kwargs)


def _written_at_another_index(func: OpOverload, args: tuple, kwargs: dict, count: int) -> bool:
    """Whether a PagedTensor the op writes at one index may share a byte with a PagedTensor at another
    (``torch._foreach_add_([a, b], [b, a])``): the CPU kernels run such a list index by index, as
    here, but CUDA's multi-tensor kernels run all the indices at once, so the dense op's result is
    the device's; the op keeps the pager's error. Views of one allocation that share no byte (the
    pieces of ``flat.split(n)``) run."""
    from pagedtensor.handlers.parts import _arguments_by_name  # the handlers import after dispatch, which imports this module

    written = _written_names(func)
    by_allocation: dict[int, list[tuple[int, bool, PagedTensor]]] = {}
    for name, value in _arguments_by_name(func, args, kwargs).items():
        if isinstance(value, (list, tuple)) and len(value) == count:
            for index, item in enumerate(value):
                if isinstance(item, PagedTensor):
                    by_allocation.setdefault(id(item._paged), []).append((index, name in written, item))
    return any(
        index != other_index and (writes or other_writes) and may_share_bytes(tensor, other)
        for entries in by_allocation.values()
        for (index, writes, tensor), (other_index, other_writes, other) in itertools.combinations(entries, 2)
    )


def bump_written_versions(func: OpOverload, names: frozenset[str], args: tuple, kwargs: dict) -> None:
    """Bump the version of each PagedTensor a ``torch._foreach_*`` op wrote (its arguments ``names``),
    as torch's kernels bump each tensor they write (the CPU's per-tensor in-place ops, CUDA's
    multi-tensor kernels increment them): the op of a PagedTensor runs none of them on it, and a
    backward that saved one would silently read the new values (after an optimizer step with
    ``foreach=True``). Inference tensors keep none."""
    from pagedtensor.handlers.parts import _arguments_by_name  # the handlers import after dispatch, which imports this module

    for name, value in _arguments_by_name(func, args, kwargs).items():
        if name in names:
            for item in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(item, PagedTensor) and not item.is_inference():
                    torch.autograd.graph.increment_version(item)


@functools.cache
def _written_names(func: OpOverload) -> frozenset[str]:
    """The names of the arguments ``func`` writes (``self`` of an in-place op, ``out``, ``found_inf``, ...)."""
    return frozenset(argument.name for argument in func._schema.arguments if argument.alias_info is not None and argument.alias_info.is_write)


def _run_by_index(func: OpOverload, args: tuple, kwargs: dict, count: int) -> Any:
    """``func`` called on each index's one-element lists in turn (each dispatched as any op); the
    results, lists of tensors, joined back into the dense op's lists."""

    def at(index: int) -> Callable[[str, Any], Any]:
        def select(name: str, value: Any) -> Any:
            if isinstance(value, (list, tuple)):
                return type(value)(value[index : index + 1])
            if isinstance(value, torch.Tensor):  # ``scalars``: one number per index
                return value[index : index + 1]
            return value

        return select

    results = [func(*index_args, **index_kwargs) for index_args, index_kwargs in (_map_per_index(func, args, kwargs, at(i)) for i in range(count))]
    returns = func._schema.returns
    if not returns:
        return None
    if len(returns) == 1:
        return [tensor for result in results for tensor in result]
    return tuple([tensor for result in results for tensor in result[position]] for position in range(len(returns)))


def _run_one_index_in_pieces(func: OpOverload, args: tuple, kwargs: dict) -> Any:
    """``func`` on one index, a piece of consecutive elements of its tensors' spans at a time (tensors of
    one shape and one dense layout: row-major, channels-last, transposed); ``NotImplemented`` where
    it is not elementwise or its tensors do not allow pieces."""
    from pagedtensor.handlers.parts import _arguments_by_name, _meta  # the handlers import after dispatch, which imports this module

    if _base_name(func) in _NOT_ELEMENTWISE:
        return NotImplemented
    returns = func._schema.returns
    out_overload = None
    if returns:  # functional: its results filled piece by piece through the out= overload
        out_overload = _out_overload(func)
        if out_overload is None or len(returns) != 1:
            return NotImplemented
    tensors = [item for value in _per_index_lists(func, args, kwargs) if isinstance(value, (list, tuple)) for item in value if isinstance(item, torch.Tensor)]
    shaped = [t for t in tensors if t.numel() > 1]
    if not shaped or not any(isinstance(t, PagedTensor) for t in shaped):
        return NotImplemented
    shape, order = shaped[0].shape, _memory_order(shaped[0])
    if any(t.shape != shape or t.layout != torch.strided or _memory_order(t) != order or not dense_and_non_overlapping(t.shape, t.stride()) for t in shaped):
        return NotImplemented
    # A PagedTensor of one element that every piece reads whole (a paged step count, ``lr``) is read
    # once, as a plain tensor, so that no piece's window needs its page; one the op writes
    # (``found_inf``) is left to the pager's error.
    written = _written_names(func)
    if any(_whole_paged(value) for name, value in _arguments_by_name(func, args, kwargs).items() if name in written):
        return NotImplemented
    args, kwargs = _map_all(func, args, kwargs, lambda name, value: _read_whole(value))
    first_view: dict[int, PagedTensor] = {}
    for t in shaped:
        if isinstance(t, PagedTensor) and not same_view(t, first_view.setdefault(id(t._paged), t)):
            return NotImplemented  # two views of one allocation: a piece could read bytes another wrote
    piece_elements = piece_elements_of(shaped)
    numel = shaped[0].numel()
    if piece_elements is None or piece_elements >= numel:
        return NotImplemented
    results = None
    if out_overload is not None:
        try:
            meta = func(*_meta(args), **_meta(kwargs))
        except (NotImplementedError, RuntimeError):
            return NotImplemented
        device = next(t for t in shaped if isinstance(t, PagedTensor)).device
        if any(tuple(m.shape) != tuple(shape) or _memory_order(m) != order for m in meta):
            return NotImplemented
        results = [torch.empty_strided(m.shape, m.stride(), dtype=m.dtype, device=device) for m in meta]

    def cut(start: int, stop: int) -> Callable[[str, Any], Any]:
        def select(name: str, value: Any) -> Any:
            if isinstance(value, (list, tuple)):
                return type(value)(flat_piece(item, start, stop) if isinstance(item, torch.Tensor) and item.numel() > 1 else item for item in value)
            return value

        return select

    for start in range(0, numel, piece_elements):
        stop = min(numel, start + piece_elements)
        piece_args, piece_kwargs = _map_per_index(func, args, kwargs, cut(start, stop))
        if results is None:
            func(*piece_args, **piece_kwargs)
        else:
            out_overload(*piece_args, **piece_kwargs, out=[flat_piece(result, start, stop) for result in results])
    return results


def _memory_order(t: torch.Tensor) -> tuple[int, ...]:
    """The strides of ``t``'s dims longer than one: tensors of one shape whose elements fill their spans
    (:func:`dense_and_non_overlapping`) and agree on these lay out each index at the same distance
    from their first element, so the same run of their spans holds the same indices."""
    return tuple(step for length, step in zip(t.shape, t.stride()) if length != 1)


def _map_all(func: OpOverload, args: tuple, kwargs: dict, fn: Callable[[str, Any], Any]) -> tuple[tuple, dict]:
    """``args`` and ``kwargs`` with each argument's value replaced by ``fn(name, value)``."""
    names = [argument.name for argument in func._schema.arguments]
    return tuple(fn(name, value) for name, value in zip(names, args)), {name: fn(name, value) for name, value in kwargs.items()}


def _whole_paged(value: Any) -> bool:
    """Whether ``value`` is, or is a list holding, a PagedTensor of at most one element."""
    if isinstance(value, (list, tuple)):
        return any(_whole_paged(item) for item in value)
    return isinstance(value, PagedTensor) and value.numel() <= 1


def _read_whole(value: Any) -> Any:
    """``value`` with each PagedTensor of at most one element, also inside a list, read as a plain tensor."""
    if isinstance(value, (list, tuple)):
        return type(value)(_read_whole(item) for item in value)
    return value.materialize() if _whole_paged(value) else value


def _out_overload(func: OpOverload) -> Optional[OpOverload]:
    """The ``out=`` overload of a functional list op (``_foreach_sqrt.default``: ``_foreach_sqrt.out``;
    ``_foreach_add.Scalar``: ``_foreach_add.Scalar_out``), with a list ``out``; else None."""
    overload = "out" if func._overloadname == "default" else f"{func._overloadname}_out"
    packet = func.overloadpacket
    if overload not in packet.overloads():
        return None
    candidate = getattr(packet, overload)
    out = next((a for a in candidate._schema.arguments if a.name == "out"), None)
    return candidate if out is not None and isinstance(out.type, torch.ListType) else None
