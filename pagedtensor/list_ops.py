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

torch's checks of the arguments (lists of one length, a ``scalars`` of one number an index, operands
that broadcast to the tensors written) run first, on meta stand-ins, and a one-element argument
sharing a byte with a tensor the op writes is first shown to torch's kernel on small stand-ins: an op
torch refuses raises torch's error and writes nothing.

An op that writes (in place, ``out=``) writes nothing where an index is refused whatever runs before
it, found before any index runs (:func:`_refused_indices`): a PagedTensor of a closed pager or a freed
allocation, pages more than the device tier holds that cannot run in pieces (operands of other
layouts, a strided view), torch's error for a one-element operand sharing a byte with the tensor
written. That index runs first and raises the error it raised in its turn.

Note:
    Stream order is each call's (see :mod:`pagedtensor.dispatch`): the indices and the pieces run one
    after another on the current stream. An in-place op that fails at an index or a piece for what
    no check before the run can know (another thread's pins leaving too little of the device tier, a
    lower tier full, a Ctrl-C, a page failing its checksum, an error of torch's kernel on the values)
    leaves the indices and pieces before it written, as :func:`~pagedtensor.pieces.run_in_pieces` does.
"""

from __future__ import annotations

import functools
import itertools
import warnings
from contextvars import ContextVar
from typing import Any, Callable, Iterator, NamedTuple, Optional

import torch
from torch._ops import OpOverload

from pagedtensor.pieces import (
    fits_beside_pins,
    flat_piece,
    may_share_bytes,
    pages_reached,
    piece_elements_of,
    refuse_without_room_for_new_pages,
    same_view,
)
from pagedtensor.tensor import PagedTensor, dense_and_non_overlapping

_FUSED_STEPS = frozenset({"_fused_adam", "_fused_adamw", "_fused_sgd", "_fused_adagrad", "_amp_foreach_non_finite_check_and_unscale"})
# List ops whose result at an index is not made elementwise from that index's tensors.
_NOT_ELEMENTWISE = frozenset({"_foreach_norm", "_foreach_max", "_foreach_powsum", "_foreach_mm"})
# A ``Tensor`` argument holding one number per index (``_foreach_addcmul_.Tensor``'s ``scalars``).
_PER_INDEX_TENSORS = frozenset({"scalars"})
# True while :func:`_run_by_index` runs an index's op: the list's op bumps the versions of the tensors
# written at every index, once (:func:`bump_written_versions`), not the index's op besides.
_RUNNING_AN_INDEX: ContextVar[bool] = ContextVar("_RUNNING_AN_INDEX", default=False)


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
    amsgrad); None where they differ (where the op has no meta kernel to raise torch's error:
    :func:`_meta_result`) or none is given."""
    lengths = {len(value) for value in _per_index_lists(func, args, kwargs) if isinstance(value, (list, tuple)) and value}
    return lengths.pop() if len(lengths) == 1 else None


def run_list_op(func: OpOverload, args: tuple, kwargs: dict) -> Any:
    """Run the list op ``func``, whose pages do not fit at once, an index at a time, and one index's
    tensors a piece at a time (see the module docstring); ``NotImplemented`` when it is not such
    an op, or its one index cannot run in pieces (the caller raises the pager's error)."""
    if not is_list_op(func):
        return NotImplemented
    meta = _meta_result(func, args, kwargs)
    count = _index_count(func, args, kwargs)
    if count is None:
        return NotImplemented
    if count > 1:
        if _written_at_another_index(func, args, kwargs, count):
            return NotImplemented
        return _run_by_index(func, args, kwargs, count)
    return _run_one_index_in_pieces(func, args, kwargs, meta)


def _meta_result(func: OpOverload, args: tuple, kwargs: dict) -> Any:
    """``func`` run on meta stand-ins of its tensors (new ones, of their layouts; the per-index
    ``scalars`` as they are, whose numbers torch reads on the CPU), raising torch's own error for the
    arguments (lists of other lengths, a ``scalars`` of the wrong length or dimension, an operand that
    does not broadcast to the tensor written) before any index or piece runs, as torch checks them
    before it writes; the op's meta results, None where it returns none or has no meta kernel."""

    def stand_in(name: str, value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return type(value)(stand_in(name, item) for item in value)
        if not isinstance(value, torch.Tensor):
            return value
        if name in _PER_INDEX_TENSORS:
            return value.materialize() if isinstance(value, PagedTensor) else value
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")

    meta_args, meta_kwargs = _map_all(func, args, kwargs, stand_in)
    try:
        return func(*meta_args, **meta_kwargs)
    except NotImplementedError:  # no meta kernel (``_fused_adam_.tensor_lr``): the run finds what torch would
        return None


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
    """Bump the version of each tensor a ``torch._foreach_*`` op wrote (its arguments ``names``),
    PagedTensors and plain tensors beside them, as torch's kernels bump each tensor they write (the
    CPU's per-tensor in-place ops, CUDA's multi-tensor kernels increment them): the op of a
    PagedTensor runs none of them (a plain tensor's kernel runs here below autograd's keys), and a
    backward that saved one would silently read the new values (after an optimizer step with
    ``foreach=True``). Inference tensors keep none. Once for the list's op: not for the op of each
    index that :func:`_run_by_index` runs."""
    if _RUNNING_AN_INDEX.get():
        return
    for item in _written_tensors(func, names, args, kwargs):
        if not item.is_inference():
            torch.autograd.graph.increment_version(item)


INFERENCE_WRITE_ERROR = (
    "Inplace update to inference tensor outside InferenceMode is not allowed.You can make a clone to get a normal tensor "
    "before doing inplace update.See https://github.com/pytorch/rfcs/pull/17 for more details."
)
"""torch's error for an in-place write of an inference tensor outside inference mode (its words)."""


def refuse_inference_writes(func: OpOverload, names: frozenset[str], args: tuple, kwargs: dict) -> None:
    """Raise torch's error where a ``torch._foreach_*`` op would write an inference tensor (its
    arguments ``names``) outside inference mode, before any index is written. torch's kernels raise
    it from each written tensor's version bump (after the tensors before it are written); the op of
    a PagedTensor runs below autograd's keys, where nothing checks."""
    if _RUNNING_AN_INDEX.get() or torch.is_inference_mode_enabled():
        return
    if any(item.is_inference() for item in _written_tensors(func, names, args, kwargs)):
        raise RuntimeError(INFERENCE_WRITE_ERROR)


def _written_tensors(func: OpOverload, names: frozenset[str], args: tuple, kwargs: dict) -> Iterator[torch.Tensor]:
    """The tensors of ``func``'s arguments ``names``, in order."""
    from pagedtensor.handlers.parts import _arguments_by_name  # the handlers import after dispatch, which imports this module

    for name, value in _arguments_by_name(func, args, kwargs).items():
        if name in names:
            yield from _tensors_in(value)


@functools.cache
def _written_names(func: OpOverload) -> frozenset[str]:
    """The names of the arguments ``func`` writes (``self`` of an in-place op, ``out``, ``found_inf``, ...)."""
    return frozenset(argument.name for argument in func._schema.arguments if argument.alias_info is not None and argument.alias_info.is_write)


def _run_by_index(func: OpOverload, args: tuple, kwargs: dict, count: int) -> Any:
    """``func`` called on each index's one-element lists in turn (each dispatched as any op); the
    results that are lists joined back into the dense op's lists, and one that is a tensor (the
    functional unscale's ``found_inf_out``) the value of its argument (``found_inf``) at the next
    index, as the in-place op updates that argument index by index: the last index's is the list's.

    An op that writes (in place, ``out=``) runs first the indices :func:`_refused_indices` finds refused
    whatever runs before them, lowest first: the first raises its error (the one it raised in its turn)
    before any index is written. (Should one run after all, it has run once, before the others: the
    indices are independent.) Then, before the first other index, the tiers' room for the pages the
    op writes that hold no bytes yet, at every index (:func:`~pagedtensor.pieces.refuse_without_room_for_new_pages`):
    an index past that room would raise after the indices before it were written."""
    returns = func._schema.returns
    carried = {position: r.name.removesuffix("_out") for position, r in enumerate(returns) if not isinstance(r.type, torch.ListType)}
    refused: list[int] = []
    written: list[torch.Tensor] = []
    if not carried and _written_names(func):  # (no op that writes carries a result: each returns nothing)
        refused = _refused_indices(func, args, kwargs, count)
        written = list(_written_tensors(func, _written_names(func), args, kwargs))
    first = set(refused)
    order = refused + [index for index in range(count) if index not in first]
    results: list[tuple] = [()] * count
    running = _RUNNING_AN_INDEX.set(True)
    try:
        for step, index in enumerate(order):
            if step == len(refused):  # the refused indices have raised their errors: nothing written yet
                refuse_without_room_for_new_pages(func, written)
            index_args, index_kwargs = _map_per_index(func, args, kwargs, functools.partial(_at_index, index=index))
            result = func(*index_args, **index_kwargs)
            results[index] = result if len(returns) > 1 else (result,)
            if carried:
                following = {name: result[position] for position, name in carried.items()}
                args, kwargs = _map_all(func, args, kwargs, lambda name, value: following.get(name, value))
    finally:
        _RUNNING_AN_INDEX.reset(running)
    if not returns:
        return None
    joined = tuple(
        results[-1][position] if position in carried else [tensor for result in results for tensor in result[position]]
        for position in range(len(returns))
    )
    return joined if len(returns) > 1 else joined[0]


def _at_index(name: str, value: Any, index: int) -> Any:
    """A per-index argument's ``value`` at ``index``: a list's one-element list, the per-index
    ``scalars``' one number. ``name``: unused (:func:`_map_per_index` passes it)."""
    if isinstance(value, (list, tuple)):
        return type(value)(value[index : index + 1])
    if isinstance(value, torch.Tensor):  # ``scalars``: one number per index
        return value[index : index + 1]
    return value


def _refused_indices(func: OpOverload, args: tuple, kwargs: dict, count: int) -> list[int]:
    """The indices, in order, whose op is refused whatever the indices before it do, found without
    running any: one reaching a PagedTensor of a closed pager (``PagerClosedError``) or of a freed
    allocation (the pager's ``ValueError``), and one whose pages are more than a device tier holds at
    once beside the pages the calling thread pins (its ``ensure_resident``, which outlasts the op:
    :func:`~pagedtensor.pieces.fits_beside_pins`) and that cannot run in pieces (``DeviceTierFullError``:
    operands of other layouts, a strided view, a reduction; :func:`_plan_pieces`). Raises torch's error where an index that runs in pieces
    has a one-element operand sharing a byte with a tensor it writes that torch refuses
    (:func:`_check_overlaps_on_stand_ins`). Reads no page but such an operand's."""
    refused = []
    for index in range(count):
        index_args, index_kwargs = _map_per_index(func, args, kwargs, functools.partial(_at_index, index=index))
        leaves = [t for value in (*index_args, *index_kwargs.values()) for t in _tensors_in(value) if isinstance(t, PagedTensor)]
        if any(leaf.pager.closed or (leaf.allocation is not None and leaf.allocation.freed) for leaf in leaves):
            refused.append(index)
        elif any(not fits_beside_pins(pager, pages) for pager, pages in pages_reached(leaves).items()):
            meta = _meta_result(func, index_args, index_kwargs) if func._schema.returns else None
            if _plan_pieces(func, index_args, index_kwargs, meta) is None:
                refused.append(index)
    return refused


class _Pieces(NamedTuple):
    """How one index runs in pieces (:func:`_plan_pieces`)."""

    shaped: list[torch.Tensor]
    """The index's tensors of more than one element: one shape, one dense layout."""
    piece_elements: int
    """Elements of each tensor a piece holds (fewer than they have)."""
    out_overload: Optional[OpOverload]
    """A functional op's ``out=`` overload, which fills its results piece by piece; None for one that writes."""


def _plan_pieces(func: OpOverload, args: tuple, kwargs: dict, meta: Any) -> Optional[_Pieces]:
    """How ``func`` runs on one index a piece of consecutive elements of its tensors' spans at a time
    (tensors of one shape and one dense layout: row-major, channels-last, transposed); None where it
    is not elementwise or its tensors do not allow pieces. Reads no page and writes nothing; raises
    torch's error for a one-element operand sharing a byte with a tensor written that torch refuses.
    ``meta``: its results on meta stand-ins (:func:`_meta_result`)."""
    from pagedtensor.handlers.parts import _arguments_by_name  # the handlers import after dispatch, which imports this module

    if _base_name(func) in _NOT_ELEMENTWISE:
        return None
    returns = func._schema.returns
    out_overload = None
    if returns:  # functional: its results filled piece by piece through the out= overload
        out_overload = _out_overload(func)
        if out_overload is None or len(returns) != 1 or meta is None:
            return None
    tensors = [item for value in _per_index_lists(func, args, kwargs) if isinstance(value, (list, tuple)) for item in _tensors_in(value)]
    shaped = [t for t in tensors if t.numel() > 1]
    if not shaped or not any(isinstance(t, PagedTensor) for t in shaped):
        return None
    shape, order = shaped[0].shape, _memory_order(shaped[0])
    if any(t.shape != shape or t.layout != torch.strided or _memory_order(t) != order or not dense_and_non_overlapping(t.shape, t.stride()) for t in shaped):
        return None
    first_view: dict[int, PagedTensor] = {}
    for t in shaped:
        if isinstance(t, PagedTensor) and not same_view(t, first_view.setdefault(id(t._paged), t)):
            return None  # two views of one allocation: a piece could read bytes another wrote
    piece_elements = piece_elements_of(shaped)
    if piece_elements is None or piece_elements >= shaped[0].numel():
        return None
    # A PagedTensor of one element that every piece reads whole (a paged step count, ``lr``) is read
    # once, as a plain tensor, so that no piece's window needs its page; one the op writes
    # (``found_inf``) is left to the pager's error, and one sharing a byte with a tensor the op writes
    # is first shown to torch's kernel.
    by_name = _arguments_by_name(func, args, kwargs)
    written = [t for name, value in by_name.items() if name in _written_names(func) for t in _tensors_in(value)]
    if any(_whole_paged(t) for t in written):
        return None
    overlapping = [
        t for value in by_name.values() for t in _tensors_in(value)
        if _whole_paged(t) and any(isinstance(w, PagedTensor) and w._paged is t._paged and may_share_bytes(w, t) for w in written)
    ]  # fmt: skip
    if overlapping and not _check_overlaps_on_stand_ins(func, args, kwargs, shaped, overlapping):
        return None
    if out_overload is not None and any(tuple(m.shape) != tuple(shape) or _memory_order(m) != order for m in meta):
        return None
    return _Pieces(shaped, piece_elements, out_overload)


def _run_one_index_in_pieces(func: OpOverload, args: tuple, kwargs: dict, meta: Any) -> Any:
    """``func`` on one index a piece at a time as :func:`_plan_pieces` plans it; ``NotImplemented``
    where it plans none. ``meta``: its results on meta stand-ins (:func:`_meta_result`). Where the
    tiers lack room for the pages it writes that hold no bytes yet, OutOfPagesError before the first
    piece (:func:`~pagedtensor.pieces.refuse_without_room_for_new_pages`)."""
    plan = _plan_pieces(func, args, kwargs, meta)
    if plan is None:
        return NotImplemented
    # no room in the tiers for the pages it writes that hold no bytes yet: refused before the first piece
    refuse_without_room_for_new_pages(func, list(_written_tensors(func, _written_names(func), args, kwargs)))
    args, kwargs = _map_all(func, args, kwargs, lambda name, value: _read_whole(value))
    results = None
    if plan.out_overload is not None:
        device = next(t for t in plan.shaped if isinstance(t, PagedTensor)).device
        results = [torch.empty_strided(m.shape, m.stride(), dtype=m.dtype, device=device) for m in meta]
    numel = plan.shaped[0].numel()
    for start in range(0, numel, plan.piece_elements):
        stop = min(numel, start + plan.piece_elements)
        piece_args, piece_kwargs = _map_per_index(func, args, kwargs, functools.partial(_piece_of, start=start, stop=stop))
        if results is None:
            func(*piece_args, **piece_kwargs)
        else:
            plan.out_overload(*piece_args, **piece_kwargs, out=[flat_piece(result, start, stop) for result in results])
    return results


def _piece_of(name: str, value: Any, start: int, stop: int) -> Any:
    """A per-index argument's ``value`` as a piece reads it: a list's entries elements ``[start, stop)``
    of the span of each tensor of the index's shape, as a 1-D view, and a one-element tensor of dims as
    one of one dim (``(1, 1)`` broadcasts over a 1-D piece as over the index's shape; one of no dim
    stays so, as type promotion tells them apart); any other value (``scalars``) as it is. ``name``:
    unused (:func:`_map_per_index` passes it)."""
    if not isinstance(value, (list, tuple)):
        return value

    def entry(item: Any) -> Any:
        if not isinstance(item, torch.Tensor):
            return item
        if item.numel() > 1:
            return flat_piece(item, start, stop)
        return item.reshape(1) if item.numel() == 1 and item.dim() > 1 else item

    return type(value)(entry(item) for item in value)


def _check_overlaps_on_stand_ins(
    func: OpOverload, args: tuple, kwargs: dict, shaped: list[torch.Tensor], overlapping: list[PagedTensor]
) -> bool:
    """Raise torch's error where the op refuses to read one of ``overlapping``, one-element PagedTensors
    sharing a byte with a PagedTensor it writes (``torch._foreach_mul_([t], t[i, j])``: "some elements
    of the input tensor and the written-to tensor refer to a single memory location", from the CPU's
    per-tensor kernels; CUDA's multi-tensor kernels, and a kernel that reads the number once, as of a
    ``scalars``, take it), before any piece is written: found by running the op on a piece of small
    plain stand-ins on the tensors' devices, each tensor of the index's shape two elements (one pair
    for each allocation, of its view in ``shaped``), each of ``overlapping`` the second element of its
    allocation's pair, and every other tensor a copy (nothing the op writes is a caller's). False where
    a stand-in cannot share its pair's bytes (a view of another item size): the pager's error stands."""
    pairs = {id(t._paged): torch.ones(2, dtype=t.dtype, device=t.device) for t in shaped if isinstance(t, PagedTensor)}
    if any(id(t._paged) not in pairs or pairs[id(t._paged)].dtype.itemsize != t.dtype.itemsize for t in overlapping):
        return False

    def stand_in(name: str, value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return type(value)(stand_in(name, item) for item in value)
        if not isinstance(value, torch.Tensor):
            return value
        if any(value is t for t in overlapping):
            return pairs[id(value._paged)][1:].view(value.dtype).reshape(value.shape)
        if value.numel() > 1:
            return pairs[id(value._paged)] if isinstance(value, PagedTensor) else torch.ones(2, dtype=value.dtype, device=value.device)
        return value.materialize() if isinstance(value, PagedTensor) else value.clone()

    stand_in_args, stand_in_kwargs = _map_all(func, args, kwargs, stand_in)
    piece_args, piece_kwargs = _map_per_index(func, stand_in_args, stand_in_kwargs, functools.partial(_piece_of, start=0, stop=2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the pieces warn as the op does
        func(*piece_args, **piece_kwargs)
    return True


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


def _tensors_in(value: Any) -> list[torch.Tensor]:
    """The tensors ``value`` is or, as a list, holds."""
    return [item for item in (value if isinstance(value, (list, tuple)) else (value,)) if isinstance(item, torch.Tensor)]


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
