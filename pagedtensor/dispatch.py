"""The op table of :class:`~pagedtensor.tensor.PagedTensor` and the dispatcher every aten op goes through.

``PagedTensor.__torch_dispatch__`` is one line: ``DISPATCHER.dispatch(func, types, args, kwargs)``.
The dispatcher tries, in this order:

0. **Traced tensors forward.** A PagedTensor rebuilt by ``__tensor_unflatten__`` (only at a
   ``torch.compile`` boundary) holds a dense inner tensor; the op runs on it.
1. **A registered handler** for the op (``@implements([aten.op, ...])``; an op registers once):

   * view ops (``view``, ``as_strided``, ``slice``, ``select``, ``t``/``transpose``/``permute``,
     ``expand``, ``unsqueeze``/``squeeze``, ``alias``, ``detach``, ``_unsafe_view``, ``split``,
     ``unbind``, ``unfold``, ``diagonal``, ...): the op runs on a meta tensor with the same layout
     and the result is a PagedTensor over the same pages, with the conjugate and negative bits
     the view sets (``conj``, ``_neg_view``), which every dense view of its pages then carries.
     Nothing faults in.
   * ``_to_copy`` on the pager's device (``t.to(dtype)``, ``t.half()``, ``module.half()``): a new
     PagedTensor on the same pager, filled by ``copy_`` (a piece at a time where it must).
   * dim-0 row gathers (``index_select`` on dim 0, ``embedding``, ``index.Tensor`` with one index
     tensor on dim 0): only the pages holding the selected rows fault in, run by run; and dim-0 row
     scatters in place (``index_put_`` with one index tensor on dim 0, ``t[idx] = v``, with or
     without ``accumulate``; ``index_copy_``, ``index_add_``, ``index_fill_`` on dim 0): only the
     pages holding the written rows fault in, run by run, each run the op on a narrowed view.
   * copies and comparisons of PagedTensors larger than a piece of the device tier: ``clone`` of
     any ``memory_format`` (``t.t().contiguous()``, ``t.t().reshape(-1)``), ``cat`` and ``stack``
     (a plain result of the dense op's layout and promoted dtype, each input copied into its slice),
     ``equal`` and ``allclose`` (the dense op on matching parts, copied to plain tensors): a part of
     pages at a time, whatever the layouts.
   * whole-tensor reductions whose result does not depend on the elements' order, of a PagedTensor
     larger than a piece: ``max``, ``min``, ``amax`` / ``amin`` over no or all dims, ``aminmax``,
     ``argmax`` / ``argmin`` without ``dim``, ``any``, ``all``, ``count_nonzero`` without ``dim``,
     integer and bool ``sum``: the op on each part of pages, the parts' results combined into the
     dense op's (``reduce_in_parts``). A float ``sum`` is not among them.
   * ``_grouped_mm`` over a paged stack of expert matrices (a mixture-of-experts layer): only the
     experts that have rows fault in.
   * ops that read only metadata (``new_*``, ``*_like``, ``is_same_size``,
     ``_has_compatible_shallow_copy_type``): nothing faults in.

2. **Fault in and run dense** (every other op): the pages each PagedTensor argument reaches (its
   byte span ``[storage_offset, last reachable element]``) fault in, once per allocation; the op
   runs on dense views of them (zero-copy when the device slots are adjacent, else on a gathered
   temporary); arguments the op writes (in-place, ``out=``, per the op's schema) are written back
   and only the pages they touch are marked dirty; results are plain tensors, except that an
   in-place or ``out=`` op returns the PagedTensor it wrote. A view op without a handler is
   recognized by its schema and handled like step 1.
3. **NotImplementedError** naming the op and the argument types: ops that change a PagedTensor's
   shape, strides or storage in place (``resize_``, ``set_``, ``t_``, ... : the ``inplace_view``
   tag), ``out=`` that would resize a PagedTensor, and higher-order operators. Never a silently wrong result.

Note:
    Stream order, on CUDA: :meth:`ResidentPages.wait` makes the current stream wait for the copies
    that filled the pages; the op (and any gather / write-back copy) is enqueued on the current
    stream; :meth:`ResidentPages.release` then records an event on it, so a slot is reused only
    after the op. Results that could alias a device slot are cloned before the release. There is
    no host sync, except that a row gather or scatter reads its index tensor on the host and a
    grouped matmul of experts its ``offs``.

An op needs every page it touches resident at once: an op whose span does not fit in
``vram_limit`` beside the pinned pages raises :class:`~pagedtensor.errors.OutOfPagesError`, except
that row gathers and grouped matmuls of experts read a run of pages too large in chunks (as
:meth:`materialize` reads any size), row scatters write their rows a run of pages at a time,
an elementwise op over tensors of one layout runs a piece of pages at a time (:mod:`pagedtensor.pieces`),
and so do ``clone``, ``cat``, ``stack``, ``equal``, ``allclose`` and the whole-tensor reductions above.

Outside the dispatcher, :func:`paged_linear` runs ``F.linear`` on a PagedTensor weight's pinned pages
directly (what a paged model's ``nn.Linear`` calls), and :func:`paged_conv1d` transformers'
``Conv1D`` (GPT-2's), falling back to the dispatcher where that would be wrong.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
from torch._C import DispatchKey
from torch._ops import OpOverload, OpOverloadPacket
from torch._prims_common import make_contiguous_strides_for
from torch.utils._python_dispatch import return_and_correct_aliasing
from torch.utils._pytree import tree_leaves, tree_map

from pagedtensor.errors import OutOfPagesError, SlabAllocationError
from pagedtensor.pager import ResidentPages, WrittenPages
from pagedtensor.pieces import NOT_ONE_TARGET, is_elementwise, piece_elements_of, run_in_pieces, span_elements, written_target
from pagedtensor.tensor import (
    PagedStorage,
    PagedTensor,
    _pending_frees,
    dense_and_non_overlapping,
    drain_pending_frees,
    element_span,
    math_bits,
    meta_layout,
    meta_like,
    with_math_bits,
)

aten = torch.ops.aten

Handler = Callable[[OpOverload, tuple, tuple, dict], Any]
"""``handler(func, types, args, kwargs)``: the result of ``func`` on PagedTensor arguments."""

# Pages touched by a strided write are found by splitting it into blocks; above this many blocks
# the whole byte span counts as touched (a superset: extra dirty pages cost a write-back, no error).
_MAX_TOUCH_BLOCKS = 4096


# In-place resizers that the ``inplace_view`` tag does not mark.
_RESIZING_OPS = frozenset({"_resize_output_", "resize_as_sparse_", "sparse_resize_", "sparse_resize_and_clear_"})

# Ops that write arguments their schema does not mark ``(a!)``: batch norm updates its running
# statistics in place in training (CPU: native_batch_norm; CUDA: cudnn_/miopen_batch_norm).
_UNMARKED_WRITES: dict[str, frozenset[str]] = {
    name: frozenset({"running_mean", "running_var"})
    for name in ("native_batch_norm", "_batch_norm_impl_index", "cudnn_batch_norm", "miopen_batch_norm",
                 "batch_norm_update_stats")
}


@dataclass(frozen=True)
class OpInfo:
    """What an op's schema says about aliasing, read once per op."""

    written: tuple[tuple[int, str], ...]
    """``(position, name)`` of each argument the op writes (``Tensor(a!)``, or listed in ``_UNMARKED_WRITES``)."""
    out_names: frozenset[str]
    """The written arguments that are keyword-only (``out=``): torch may resize them."""
    is_view: bool
    """A result aliases an input without writing it."""
    changes_metadata: bool
    """The op changes its input's shape, strides or storage in place (the ``inplace_view`` tag)."""
    returns_written: bool
    """A result is a written argument (in-place and ``out=`` ops)."""
    elementwise: bool
    """Each result element comes from the arguments' elements at the same index (:func:`is_elementwise`):
    an in-place form never resizes its input."""
    decomposes: bool
    """The op's only kernel is ``CompositeImplicitAutograd`` (made of other ops), which it reaches us
    whole only below autograd (in inference mode, say). Its schema cannot say what aliases (``to``,
    ``contiguous``, ``reshape`` return a new tensor when they must; ``type_as``, ``dropout`` in eval
    return their input without an alias annotation): when a run on meta tensors returns an argument
    or a view of one, it runs that C++ kernel, as plain tensors do. Not ``OpOverload.decompose``,
    which prefers torch._decomp's Python versions (other bits, other aliasing), nor for ops with a
    backend kernel too (``silu_backward``), which plain tensors run."""

    @classmethod
    def of(cls, func: OpOverload) -> "OpInfo":
        schema = func._schema
        unmarked = _UNMARKED_WRITES.get(func.overloadpacket.__name__, frozenset())
        written = tuple(
            (position, argument.name)
            for position, argument in enumerate(schema.arguments)
            if (argument.alias_info is not None and argument.alias_info.is_write) or argument.name in unmarked
        )
        returns = [r.alias_info for r in schema.returns if r.alias_info is not None]
        return cls(
            written=written,
            out_names=frozenset(a.name for a in schema.arguments if a.kwarg_only and a.alias_info is not None and a.alias_info.is_write),
            is_view=any(not alias.is_write for alias in returns),
            changes_metadata=torch.Tag.inplace_view in func.tags or func.overloadpacket.__name__ in _RESIZING_OPS,
            returns_written=any(alias.is_write for alias in returns),
            elementwise=is_elementwise(func),
            decomposes=_has_kernel(func, "CompositeImplicitAutograd")
            and not any(_has_kernel(func, key) for key in ("CPU", "CUDA", "CompositeExplicitAutograd")),
        )


def _has_kernel(func: OpOverload, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), key)


# Answers of _returns_an_input by op and argument layouts: a composite op in an inference loop
# meets the same layouts each call, and its meta run costs more than the op's own dispatch.
_RETURNS_AN_INPUT: dict[tuple, Optional[bool]] = {}
_RETURNS_AN_INPUT_LIMIT = 4096
_KEYABLE = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.memory_format, torch.layout)


def _returns_an_input(func: OpOverload, args: tuple, kwargs: dict) -> Optional[bool]:
    """Whether ``func`` returns one of its PagedTensor arguments or a view of one, remembered per op
    and argument layouts (:func:`_layout_key`); see :func:`_meta_run_returns_an_input`."""
    key = _layout_key(func, args, kwargs)
    if key is not None and key in _RETURNS_AN_INPUT:
        return _RETURNS_AN_INPUT[key]
    answer = _meta_run_returns_an_input(func, args, kwargs)
    if key is not None:
        if len(_RETURNS_AN_INPUT) >= _RETURNS_AN_INPUT_LIMIT:
            _RETURNS_AN_INPUT.clear()
        _RETURNS_AN_INPUT[key] = answer
    return answer


def _layout_key(func: OpOverload, args: tuple, kwargs: dict) -> Optional[tuple]:
    """What a meta run of ``func`` sees: each tensor's layout (and which PagedTensors share an
    allocation), every other value, in their lists; None if a value cannot be a key."""
    allocations: dict[int, int] = {}

    def part(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            allocation = allocations.setdefault(id(value._paged), len(allocations)) if isinstance(value, PagedTensor) else -1
            return allocation, tuple(value.shape), value.stride(), value.storage_offset(), value.dtype, value.device
        if type(value) in (list, tuple):
            return type(value), tuple(part(item) for item in value)
        if isinstance(value, _KEYABLE):
            return type(value), value
        raise _NotAKey

    try:
        return func, tuple(part(value) for value in args), tuple((name, part(value)) for name, value in kwargs.items())
    except _NotAKey:
        return None


class _NotAKey(Exception):
    pass


def _meta_run_returns_an_input(func: OpOverload, args: tuple, kwargs: dict) -> Optional[bool]:
    """Whether ``func`` run on meta tensors of its arguments' layouts (a PagedTensor's over its
    allocation's meta base) returns a tensor sharing a PagedTensor argument's storage; None when that
    run fails (it needed a value, such as narrow's tensor start)."""
    meta_args, meta_kwargs = tree_map(meta_layout, (args, kwargs))
    try:
        out = func(*meta_args, **meta_kwargs)
    except Exception:  # noqa: BLE001 - e.g. a PagedTensor read as a number (narrow's tensor start)
        return None
    inputs = {meta_like(t).untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, PagedTensor)}
    return any(isinstance(t, torch.Tensor) and t.untyped_storage()._cdata in inputs for t in tree_leaves(out))


class PagedDispatcher:
    """Routes aten ops on PagedTensors: traced → registered handler → fault in and run dense → error."""

    def __init__(self) -> None:
        self.handlers: dict[OpOverload, Handler] = {}
        self._infos: dict[OpOverload, OpInfo] = {}

    # ------------------------------------------------------------------ the op table

    def implements(self, ops: Iterable[Union[OpOverload, OpOverloadPacket]]) -> Callable[[Handler], Handler]:
        """Register the decorated function as the handler of ``ops`` (a packet means all its overloads).

        Raises:
            ValueError: an op already has a handler.
        """
        overloads: list[OpOverload] = []
        for op in ops:
            if isinstance(op, OpOverloadPacket):
                overloads.extend(getattr(op, name) for name in op.overloads())
            elif isinstance(op, OpOverload):
                overloads.append(op)
            else:
                raise TypeError(f"implements: expected aten ops, got {op!r}")

        def register(handler: Handler) -> Handler:
            taken = [str(op) for op in overloads if op in self.handlers]
            if taken:
                raise ValueError(f"implements: {', '.join(taken)} already handled by {self.handlers[overloads[0]].__qualname__}")
            for op in overloads:
                self.handlers[op] = handler
            return handler

        return register

    def info(self, func: OpOverload) -> OpInfo:
        info = self._infos.get(func)
        if info is None:
            info = self._infos[func] = OpInfo.of(func)
        return info

    # ------------------------------------------------------------------ dispatch

    def dispatch(self, func: Any, types: tuple, args: tuple, kwargs: dict) -> Any:
        """Run ``func`` on arguments containing PagedTensors; see the module docstring for the order."""
        if not isinstance(func, OpOverload):
            raise NotImplementedError(f"PagedTensor: {func} is not an aten op and is not supported{_describe(args, kwargs)}")
        leaves = _paged_leaves(args, kwargs)
        if any(leaf._inner is not None for leaf in leaves):
            return self._forward_traced(func, leaves, args, kwargs)
        handler = self.handlers.get(func)
        if handler is view_of_pages:
            return view_of_pages(func, types, args, kwargs, leaves)
        try:
            if handler is not None:
                return handler(func, types, args, kwargs)
            return self.run_paged(func, types, args, kwargs, leaves)
        except _OpTooLarge as error:
            # An elementwise op runs a piece of pages at a time; any other raises.
            in_pieces = handler is None and not _reads_written_bytes_as_other_elements(self.info(func), args, kwargs)
            out = run_in_pieces(func, args, kwargs, self.info(func)) if in_pieces else NotImplemented
            if out is NotImplemented:
                raise OutOfPagesError(*error.args) from error.__cause__
            return out

    def run_paged(self, func: OpOverload, types: tuple, args: tuple, kwargs: dict, leaves: Optional[list[PagedTensor]] = None) -> Any:
        """Step 2: fault in the pages the PagedTensor arguments reach, run ``func`` dense, write back."""
        info = self.info(func)
        if info.changes_metadata:
            if _resizes_to_own_size(func, args, kwargs):
                return args[0]  # torch's resize_ to the current size changes nothing (out= paths call it)
            raise NotImplementedError(
                f"PagedTensor: {func} changes a tensor's shape, strides or storage in place, which a PagedTensor "
                f"does not support{_describe(args, kwargs)}"
            )
        if info.decomposes and func.overloadpacket is aten.to:
            # ``to`` reached whole (below autograd): its kernel returns the tensor itself, or calls
            # ``_to_copy``, whose handler keeps a conversion on the same device paged.
            return func._op_dk(DispatchKey.CompositeImplicitAutograd, *args, **kwargs)
        if info.decomposes:
            aliases = _returns_an_input(func, args, kwargs)
            if aliases is not False:
                # Reached whole below autograd, returning an argument or a view of one (or perhaps:
                # the meta run needed a PagedTensor's values): its C++ kernel, as plain tensors run
                # it, gives the PagedTensor or a view of it. (Any other result runs dense below, even
                # if its schema says it may alias: the kernel's own subclass paths, as in
                # linalg_svdvals, would give other bits.)
                try:
                    return func._op_dk(DispatchKey.CompositeImplicitAutograd, *args, **kwargs)
                except RuntimeError:
                    if aliases is not None:
                        raise
                    # The kernel read a PagedTensor's memory itself (tensor_split's indices): dense.
        elif info.is_view:
            return view_of_pages(func, types, args, kwargs, leaves)
        if func is aten.copy_.default and _same_data(args[0], args[1]):
            return args[0]  # torch's copy_ returns early for a view of the same data: nothing is written
        if leaves is None:
            leaves = _paged_leaves(args, kwargs)
        if _pending_frees:
            drain_pending_frees()
        if not info.written and len(leaves) == 1:
            return _read_one(func, args, kwargs, leaves[0])
        written = _written_leaves(info, args, kwargs) if info.written else []

        # One window of resident pages per allocation, over the union of its arguments' spans.
        groups: dict[int, _Group] = {}
        for leaf in leaves:
            lo, hi = _byte_span(leaf)
            if lo == hi:
                continue
            group = groups.get(id(leaf._paged))
            if group is None:
                groups[id(leaf._paged)] = _Group(leaf._paged, lo, hi, leaf)
            else:
                group.add(lo, hi, leaf)
        for leaf in written:
            group = groups.get(id(leaf._paged))
            if group is not None:
                group.written.append(leaf)
        if info.out_names:
            # torch resizes an out= tensor of the wrong shape: in a private copy that cannot reach
            # the device slab (the resize is then refused below, and nothing is written back).
            for name in info.out_names:
                for leaf in _paged_leaves((kwargs.get(name),), {}):
                    group = groups.get(id(leaf._paged))
                    if group is not None:
                        group.private = True
        discard = _overwritten_pages(func, args, written, groups) if func in _OVERWRITING else {}
        # Writers of one allocation take turns, from fault-in to write-back (a gathered window writes
        # back its whole span, which must not undo another thread's write).
        if not written:
            return self._run_in_windows(func, info, args, kwargs, leaves, written, groups, discard)
        locks = _write_locks(groups)
        if len(locks) == 1:  # the common case, without a call more
            with locks[0]:
                return self._run_in_windows(func, info, args, kwargs, leaves, written, groups, discard)
        return _holding(locks, functools.partial(self._run_in_windows, func, info, args, kwargs, leaves, written, groups, discard))

    def _run_in_windows(
        self, func: OpOverload, info: OpInfo, args: tuple, kwargs: dict, leaves: list[PagedTensor],
        written: list[PagedTensor], groups: dict[int, "_Group"], discard: dict[int, list[int]],
    ) -> Any:  # fmt: skip
        """The rest of :meth:`run_paged`: open one window per allocation, run ``func`` on dense views,
        write back what it wrote and release the windows."""
        opened: list[_Group] = []
        # An overwritten allocation's window opens last: until its release the pages it overwrites
        # keep their host copies, which the other windows' faults then need not make room around.
        order = sorted(groups.values(), key=lambda group: id(group.storage) in discard) if discard else groups.values()
        try:
            for group in order:
                group.window = _Window(group.storage, group.lo, group.hi, discard.get(id(group.storage), ()), group.private)
                opened.append(group)
        except OutOfPagesError as error:
            _release_all(opened)
            if isinstance(error, SlabAllocationError):  # the machine's memory, not the op's size: raised as it is
                raise
            raise _too_many_pages(func, error) from error
        except BaseException:
            _release_all(opened)
            raise

        dense: dict[int, torch.Tensor] = {}
        # An op that may resize what it writes (addbmm_ resizes a self of the wrong shape) sees the
        # allocations it writes through views that cannot grow past their window into other tensors'
        # slots: every view of one allocation over one storage, so torch's overlap checks still see them.
        bounded = {id(leaf._paged) for leaf in written} if written and not info.elementwise else ()
        try:
            for leaf in leaves:
                group = groups.get(id(leaf._paged))
                dense[id(leaf)] = group.window.dense(leaf, bounded=id(leaf._paged) in bounded) if group is not None else _empty_like_leaf(leaf)
            if len(leaves) == 1 and args and args[0] is leaves[0]:  # one PagedTensor, first: no search
                dense_args, dense_kwargs = (dense[id(leaves[0])], *args[1:]), kwargs
            else:
                dense_args, dense_kwargs = _substitute(args, kwargs, dense)
            try:
                out = func(*dense_args, **dense_kwargs)
            except RuntimeError as error:
                if bounded and "not resizable" in str(error):
                    raise NotImplementedError(
                        f"PagedTensor: {func} would resize a PagedTensor it writes, which a PagedTensor does not "
                        f"support; give it a tensor of the result's shape{_describe(args, kwargs)}"
                    ) from error
                raise
            for leaf in written:
                view = dense[id(leaf)]
                if view.shape != leaf.shape or view.stride() != leaf.stride():
                    raise NotImplementedError(
                        f"PagedTensor: {func} would resize its PagedTensor output from {list(leaf.shape)} to "
                        f"{list(view.shape)}; pass an out= tensor of the result's shape{_describe(args, kwargs)}"
                    )
            if info.returns_written and written:
                result_of = {id(dense[id(leaf)]): leaf for leaf in written}
                if isinstance(out, torch.Tensor):
                    out = result_of.get(id(out), out)
                else:
                    out = _map_tensors(out, lambda t: result_of.get(id(t), t))
            zero_copy = [group.window for group in opened if not group.window.gathered]
            if zero_copy:
                out = _map_tensors(out, lambda t: _unalias(t, zero_copy))
        except BaseException:
            _release_all(opened)
            raise
        try:
            for group in opened:
                for leaf in group.written:
                    group.window.write_back(*_byte_span(leaf))
        except BaseException:  # a KeyboardInterrupt in a long write-back: the pages may hold part of it
            _release_all(opened, written_back=True)
            raise
        _release_windows(opened)
        return out

    def materialize(self, tensor: PagedTensor, device: Union[str, torch.device, None] = None) -> torch.Tensor:
        """A new dense tensor with ``tensor``'s values, size and strides; see :meth:`PagedTensor.materialize`."""
        if tensor._inner is not None:
            inner = tensor._inner
            return inner.clone() if device is None else inner.to(device, copy=True)
        if _pending_frees:
            drain_pending_frees()
        target = _normalize_device(tensor.device if device is None else torch.device(device))
        lo, hi = _byte_span(tensor)
        if lo == hi:
            return torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device=target)
        storage = tensor._paged
        pager = storage.pager
        data = None
        first, stop = storage.allocation.page_range(lo, hi)
        if target == _normalize_device(pager.device) and stop - first <= pager.device_tier.capacity_pages:
            try:
                window = _Window(storage, lo, hi)
            except OutOfPagesError:
                window = None  # pinned pages leave no room: read in chunks below
            if window is not None:
                try:
                    data = window.bytes(lo, hi).clone()
                finally:
                    window.release()
        if data is None:
            data = pager.read(storage.allocation, lo, hi - lo).to(target)
        values = data.view(tensor.dtype)
        if tensor.is_conj():  # the values a conjugated view reads (the pages hold the unconjugated ones)
            values.conj_physical_()
        if tensor.is_neg():
            values.neg_()
        return values.as_strided(tensor.shape, tensor.stride(), 0)

    def _forward_traced(self, func: OpOverload, leaves: list[PagedTensor], args: tuple, kwargs: dict) -> Any:
        """Step 0: run on the inner tensors; views stay (traced) PagedTensors, like in eager mode.

        Under AOT tracing (``aot_eager``/``inductor``: the inner tensors are functional) an op that
        writes a PagedTensor input raises: the compiled graph would write the materialized copy,
        never the pages. Mutate PagedTensors outside compiled regions, or compile with ``eager``.
        """
        info = self.info(func)
        if info.written:
            from torch._subclasses.functional_tensor import FunctionalTensor

            for leaf in _written_leaves(info, args, kwargs):
                if isinstance(leaf._inner, FunctionalTensor):
                    raise NotImplementedError(
                        f"PagedTensor: {func} writes a PagedTensor input inside a compiled graph; the graph sees a "
                        f"materialized copy, so the write would never reach the pages. Write outside the compiled "
                        f"region or compile with backend='eager'{_describe(args, kwargs)}"
                    )
        inner = {id(leaf): leaf._inner if leaf._inner is not None else leaf._dense for leaf in leaves}
        inner_args, inner_kwargs = _substitute(args, kwargs, inner)
        out = func(*inner_args, **inner_kwargs)
        if info.is_view:
            out = _map_tensors(out, PagedTensor._from_inner)
            source = args[0]
            if isinstance(source, PagedTensor) and _is_functional(source._inner):
                # AOT autograd traces: remember the graph input a view views (see _check_returnable).
                root = source._view_root or (source.dtype, None, (tuple(source.shape), source.stride(), source.storage_offset()))

                def note_root(view: PagedTensor) -> None:
                    view._view_root = (root[0], func if view.dtype != source.dtype else root[1], root[2])

                _map_tensors(out, note_root)
        return return_and_correct_aliasing(func, args, kwargs, out)


def _is_functional(inner: Optional[torch.Tensor]) -> bool:
    """Whether a traced tensor's inner tensor is AOT autograd's (functionalized tracing)."""
    from torch._subclasses.functional_tensor import FunctionalTensor

    return isinstance(inner, FunctionalTensor)


def _read_one(func: OpOverload, args: tuple, kwargs: dict, leaf: PagedTensor) -> Any:
    """The common case of step 2, kept short: an op that reads one PagedTensor and writes none."""
    lo, hi = _byte_span(leaf)
    if lo == hi:
        dense_args, dense_kwargs = _substitute(args, kwargs, {id(leaf): _empty_like_leaf(leaf)})
        return func(*dense_args, **dense_kwargs)
    try:
        window = _Window(leaf._paged, lo, hi)
    except SlabAllocationError:  # the machine's memory, not the op's size: raised as it is
        raise
    except OutOfPagesError as error:
        raise _too_many_pages(func, error) from error
    try:
        view = window.dense(leaf)
        if args and args[0] is leaf:  # the only PagedTensor argument, first: no search
            out = func(view, *args[1:], **kwargs)
        else:
            dense_args, dense_kwargs = _substitute(args, kwargs, {id(leaf): view})
            out = func(*dense_args, **dense_kwargs)
        if not window.gathered:
            if isinstance(out, torch.Tensor):
                if window.shares_slab(out):
                    out = _unalias(out, (window,))
            else:
                out = _map_tensors(out, lambda t: _unalias(t, (window,)))
    finally:
        window.release()
    return out


def paged_linear(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``torch.nn.functional.linear(input, weight, bias)``, the same bits, where ``weight`` may be a
    PagedTensor: its pages are pinned resident for the call and ``linear`` runs on a dense view of
    them, with none of the dispatch a PagedTensor weight otherwise takes (``linear`` reaches
    ``__torch_dispatch__`` as a ``t`` view, a new PagedTensor, then ``mm``/``addmm``).

    Anything else goes through ``linear`` as usual: a weight that is not a PagedTensor (or is a
    traced one), an input or bias that is not a plain tensor (a PagedTensor, a fake or functional
    tensor, an FX proxy), autograd recording (grad enabled and any argument requiring grad: the
    saved weight must stay the PagedTensor, not a view of slots the pager reuses), tracing
    (``torch.compile``, ``torch.jit.trace``) and active torch-function or torch-dispatch modes
    (they would see the slots' view in place of the PagedTensor).

    Stream order, on CUDA: as any op on a PagedTensor (module docstring): the current stream waits
    for the copies that filled the pages, ``linear`` runs on it, and the release records an event
    on it after ``linear``, so a slot is reused only after the read.

    Raises:
        OutOfPagesError: the weight does not fit on the device tier beside the pinned pages.
    """
    return _with_resident_weight(torch.nn.functional.linear, input, weight, bias)


def conv1d(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """transformers' ``Conv1D.forward`` (GPT-2's linear layer, its weight stored transposed as
    ``(in_features, out_features)``) as a function: ``addmm(bias, input.view(-1, in), weight)``
    viewed back to ``input``'s leading dims, the same ops, so the same bits."""
    return torch.addmm(bias, input.view(-1, input.size(-1)), weight).view(*input.shape[:-1], weight.size(-1))


def paged_conv1d(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """:func:`conv1d` (transformers' ``Conv1D``), the same bits, where ``weight`` may be a
    PagedTensor: read from its pinned pages as :func:`paged_linear` reads a linear's weight, with
    the same fallbacks, stream order and errors."""
    return _with_resident_weight(conv1d, input, weight, bias)


def _with_resident_weight(op: Callable[..., torch.Tensor], input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``op(input, weight, bias)`` with a PagedTensor ``weight``'s pages pinned resident and read as
    one dense view (:func:`paged_linear` says when ``op`` gets the PagedTensor itself instead)."""
    if (
        torch.compiler.is_compiling()
        or type(weight) is not PagedTensor
        or weight._inner is not None
        or weight.is_conj()
        or weight.is_neg()
        or type(input) is not torch.Tensor
        or not (bias is None or type(bias) is torch.Tensor or type(bias) is torch.nn.Parameter)
        or (torch.is_grad_enabled() and (input.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)))
        or torch.jit.is_tracing()
        or torch._C._is_torch_function_mode_enabled()
        or torch._C._len_torch_dispatch_stack()
    ):  # fmt: skip
        return op(input, weight, bias)
    lo, hi = _byte_span(weight)
    if lo == hi:
        return op(input, _empty_like_leaf(weight), bias)
    if _pending_frees:
        drain_pending_frees()
    try:
        window = _Window(weight._paged, lo, hi)
    except SlabAllocationError:  # the machine's memory, not the weight's size: raised as it is
        raise
    except OutOfPagesError as error:
        raise OutOfPagesError(f"{op.__name__}: its PagedTensor weight needs more pages at once than the device tier can hold: {error}") from error
    try:
        return op(input, window.dense(weight), bias)  # a new tensor: never a view of the slots
    finally:
        window.release()


DISPATCHER = PagedDispatcher()
implements = DISPATCHER.implements


# ---------------------------------------------------------------------- windows of resident pages


class _Group:
    """The PagedTensor arguments of one op that share an allocation, and their union byte span."""

    __slots__ = ("storage", "lo", "hi", "leaves", "written", "private", "window")

    def __init__(self, storage: PagedStorage, lo: int, hi: int, leaf: PagedTensor) -> None:
        self.storage = storage
        self.lo, self.hi = lo, hi
        self.leaves = [leaf]
        self.written: list[PagedTensor] = []
        self.private = False  # run on a gathered copy even when the slots are adjacent
        self.window: Optional[_Window] = None  # set once its pages are resident and pinned

    def add(self, lo: int, hi: int, leaf: PagedTensor) -> None:
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        self.leaves.append(leaf)


class _Window:
    """Pages holding bytes ``[lo, hi)`` of an allocation, resident and pinned, as one uint8 tensor.

    When the pages sit in adjacent device slots (and the window is not ``private``) the window is
    zero-copy: :meth:`dense` views the slab itself and ``buf`` (made on first use) is a view of
    the slots. Otherwise ``buf`` is a temporary the runs are gathered into, and :meth:`write_back`
    scatters written bytes back; made with ``gather=False`` it has no ``buf``, and only
    :meth:`copy_into` reads it.
    """

    __slots__ = ("resident", "tier", "page_size", "first_byte", "nbytes", "runs", "gathered", "slab", "slab_byte", "slab_span", "_buf",
                 "_bounded")  # fmt: skip

    def __init__(self, storage: PagedStorage, lo: int, hi: int, discard: Iterable[int] = (), private: bool = False,
                 gather: bool = True) -> None:
        allocation = storage.allocation
        self.page_size = page_size = allocation.page_size
        first, stop = lo // page_size, -(-hi // page_size)
        self.first_byte = first * page_size
        if storage.pager.engine.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "PagedTensor ops cannot be captured in a CUDA graph: a replay would read the device slots the pages "
                "held during capture, which the pager reuses once the op is done; capture dense tensors instead "
                "(PagedTensor.materialize())"
            )
        self.resident: ResidentPages = storage.pager.ensure_resident(allocation, first, stop, discard=discard)
        try:
            self.resident.wait()
            self.tier = tier = storage.pager.device_tier
            self.nbytes = self.resident.nbytes
            first_slot = self.resident.first_slot
            if first_slot is not None and not private:
                self.gathered = False
                self.slab, slot_in_slab = divmod(first_slot, tier.slab_pages)
                self.slab_byte = slot_in_slab * page_size  # where byte ``first_byte`` sits in the slab
                self.slab_span = tier.slab_spans[self.slab]
                self.runs: Optional[list[tuple[int, torch.Tensor]]] = None
                self._buf: Optional[torch.Tensor] = None
                self._bounded: Optional[torch.UntypedStorage] = None
            else:
                self.runs = self.resident.runs()
                self.gathered = True
                self.slab_span = (0, 0)
                self._buf = None
                if gather:  # else only copy_into reads the runs
                    self._buf = buf = torch.empty(self.nbytes, dtype=torch.uint8, device=self.runs[0][1].device)
                    for page_offset, view in self.runs:
                        start = page_offset * page_size
                        buf[start : start + view.numel()].copy_(view)
        except BaseException:
            self.resident.release()
            raise

    @property
    def buf(self) -> torch.Tensor:
        """The window's bytes as one uint8 tensor: a view of the slots, or the gathered copy."""
        if self._buf is None:
            if self.gathered:
                raise RuntimeError("a window made with gather=False has no buffer: read it with copy_into")
            self._buf = self.tier.slabs[self.slab][self.slab_byte : self.slab_byte + self.nbytes]
        return self._buf

    def copy_into(self, lo: int, hi: int, target: torch.Tensor) -> None:
        """Copy bytes ``[lo, hi)`` of the allocation into the uint8 tensor ``target`` (current
        stream): from the slab where the slots are adjacent, else straight from each run of
        slots, never through a gathered ``buf``."""
        if self.runs is None:
            target.copy_(self.bytes(lo, hi))
            return
        for page_offset, view in self.runs:
            start = self.first_byte + page_offset * self.page_size
            a, b = max(lo, start), min(hi, start + view.numel())
            if a < b:
                target[a - lo : b - lo].copy_(view[a - start : b - start])

    def shares_slab(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` lies in the device slab this window views (never when gathered). A
        result of another layout (sparse: no single data pointer) counts as sharing it."""
        if tensor.layout != torch.strided:
            return True
        lo, hi = self.slab_span
        return lo <= tensor.data_ptr() < hi

    def bytes(self, lo: int, hi: int) -> torch.Tensor:
        """Bytes ``[lo, hi)`` of the allocation (a view of ``buf``)."""
        return self.buf[lo - self.first_byte : hi - self.first_byte]

    def typed(self, dtype: torch.dtype) -> torch.Tensor:
        """``buf`` as a flat tensor of ``dtype`` (trailing bytes short of an element dropped)."""
        buf = self.buf
        tail = buf.numel() % dtype.itemsize
        return (buf[: buf.numel() - tail] if tail else buf).view(dtype)

    def dense(self, tensor: PagedTensor, bounded: bool = False) -> torch.Tensor:
        """``tensor`` as a dense strided view of the slab (zero-copy) or of the gathered ``buf``, with
        its conjugate and negative bits; see :meth:`_dense_view` for ``bounded``."""
        view = self._dense_view(tensor, bounded)
        return with_math_bits(view, math_bits(tensor)) if tensor.is_conj() or tensor.is_neg() else view

    def _dense_view(self, tensor: PagedTensor, bounded: bool = False) -> torch.Tensor:
        """``tensor`` as a dense strided view of the slab (zero-copy) or of the gathered ``buf``.

        ``bounded``: a zero-copy view over a storage of the window's bytes only (one for every such
        view of the window), which torch cannot resize in place: a resize past it raises instead of
        growing into the next slots."""
        itemsize = tensor.dtype.itemsize
        if self.gathered:
            return self.typed(tensor.dtype).as_strided(tensor.shape, tensor.stride(), tensor._offset - self.first_byte // itemsize)
        if bounded:
            slab = self.tier.slabs[self.slab]
            if self._bounded is None:
                self._bounded = torch._C._construct_storage_from_data_pointer(slab.data_ptr() + self.slab_byte, slab.device, self.nbytes)
            view = torch.empty(0, dtype=tensor.dtype, device=slab.device)
            return view.set_(self._bounded, tensor._offset - self.first_byte // itemsize, tensor.shape, tensor.stride())
        # Slabs and pages are whole multiples of every itemsize (a page is a power of two >= 4 KiB).
        typed = self.tier.typed_slab(self.slab, tensor.dtype)
        return typed.as_strided(tensor.shape, tensor.stride(), tensor._offset + (self.slab_byte - self.first_byte) // itemsize)

    def write_back(self, lo: int, hi: int) -> None:
        """Copy bytes ``[lo, hi)`` of a gathered ``buf`` back into the device slots (current stream)."""
        if not self.gathered:
            return
        for page_offset, view in self.runs:
            start = self.first_byte + page_offset * self.page_size
            a, b = max(lo, start), min(hi, start + view.numel())
            if a < b:
                view[a - start : b - start].copy_(self.buf[a - self.first_byte : b - self.first_byte])

    def release(self, dirty: Iterable[int] = ()) -> None:
        """Unpin the pages (``dirty``: the pages written); see :meth:`ResidentPages.release`."""
        self.resident.release(dirty=dirty if dirty else False)


def _release_windows(groups: Sequence[_Group]) -> None:
    """Unpin every window of an op after its write-backs, the written pages dirty.

    Stream order: the release event is recorded on the current stream after the op and its
    write-back copies. Windows of one CUDA pager share one event, recorded and registered under
    the pager's lock (:meth:`Pager.release_together`)."""
    releases = [(group.window.resident, _dirty_pages(group.written, group.window.page_size)) for group in groups]
    pager = groups[0].storage.pager if groups else None
    if len(groups) > 1 and pager.engine.is_cuda and all(group.storage.pager is pager for group in groups):
        pager.release_together(releases)
        return
    error: Optional[BaseException] = None
    for resident, dirty in releases:  # every window, whatever one of them raises (Ctrl-C waiting for the lock)
        try:
            resident.release(dirty=dirty)
        except BaseException as raised:  # noqa: BLE001 - raised below, after every window
            error = error if error is not None else raised
    if error is not None:
        raise error


class _OpTooLarge(OutOfPagesError):
    """The pages an op reaches do not fit on the device tier at once (raised to users as an
    :class:`OutOfPagesError` when the op cannot run in pieces)."""


def _too_many_pages(func: OpOverload, error: OutOfPagesError) -> OutOfPagesError:
    return _OpTooLarge(f"{func}: its PagedTensor arguments need more pages at once than the device tier can hold: {error}")


def _release_all(groups: Sequence[_Group], written_back: bool = False) -> None:
    """Release after an error: pages an op may have written count as dirty (conservative): those of
    zero-copy windows, and with ``written_back`` (an error during the write-back) those of gathered
    ones too; except pages faulted in zero-filled for an overwrite (``copy_``/``fill_``/``zero_``):
    those get their old bytes back from the pager."""
    for group in groups:
        window = group.window
        if window.resident.released:
            continue
        may_be_written = group.written and (written_back or not window.gathered)
        dirty = _dirty_pages(group.written, window.page_size) if may_be_written else set()
        if dirty and window.resident.overwritten:
            dirty.difference_update(page.index for page in window.resident.overwritten)
        window.release(dirty)


# ---------------------------------------------------------------------- spans and pages


def _byte_span(tensor: PagedTensor) -> tuple[int, int]:
    """Bytes ``[lo, hi)`` of the allocation that ``tensor`` can reach (empty when it has no elements).

    Computed once per tensor: a PagedTensor's size, strides and offset never change.
    """
    span = tensor._span
    if span is None:
        lo, hi = element_span(tensor.shape, tensor.stride(), tensor._offset)
        itemsize = tensor.dtype.itemsize
        span = tensor._span = (lo * itemsize, hi * itemsize)
    return span


def touched_pages(size: Sequence[int], stride: Sequence[int], offset: int, itemsize: int, page_size: int) -> list[int]:
    """Pages (allocation page numbers) holding at least one element of a strided view, in order.

    A view with gaps of a page or more (every other row of a wide matrix, a column block) is split
    into blocks along its largest strides, so the pages in its gaps are left out. Above
    ``_MAX_TOUCH_BLOCKS`` blocks the whole span is returned (a superset).
    """
    lo, hi = element_span(size, stride, offset)
    if lo == hi:
        return []
    if hi - lo <= math.prod(size):  # no gaps: every page of the span (a superset when elements overlap)
        return list(range(lo * itemsize // page_size, (hi * itemsize - 1) // page_size + 1))
    dims = sorted(((s, n) for n, s in zip(size, stride) if n > 1), reverse=True)
    starts = [lo]
    level = 0
    while level < len(dims):
        step, count = dims[level]
        inner_reach = sum((n - 1) * s for s, n in dims[level + 1 :])
        if (step - inner_reach - 1) * itemsize < page_size or len(starts) * count > _MAX_TOUCH_BLOCKS:
            break  # gaps at this level are shorter than a page (or too many blocks): no page is skipped
        starts = [start + i * step for start in starts for i in range(count)]
        level += 1
    reach = sum((n - 1) * s for s, n in dims[level:]) + 1
    pages: list[int] = []
    for start in starts:
        first, last = start * itemsize // page_size, ((start + reach) * itemsize - 1) // page_size
        if pages and first <= pages[-1]:
            first = pages[-1] + 1
        pages.extend(range(first, last + 1))
    return pages


def _dirty_pages(written: Iterable[PagedTensor], page_size: int) -> WrittenPages:
    """The pages the written tensors reach (inside their windows' pinned ranges)."""
    dirty = WrittenPages()
    for leaf in written:
        dirty.update(touched_pages(leaf.shape, leaf.stride(), leaf._offset, leaf.dtype.itemsize, page_size))
    return dirty


_OVERWRITING = frozenset({aten.copy_.default, aten.fill_.Scalar, aten.fill_.Tensor, aten.zero_.default})


def _overwritten_pages(func: OpOverload, args: tuple, written: list[PagedTensor], groups: dict[int, _Group]) -> dict[int, list[int]]:
    """Pages an op overwrites whole (``copy_``/``fill_``/``zero_`` of a dense target): not faulted in.

    Only when nothing else in the op reads that allocation and the op cannot fail after its checks
    (a failing op must leave the old bytes).
    """
    if func not in _OVERWRITING or len(written) != 1 or args[0] is not written[0]:
        return {}
    target = written[0]
    group = groups.get(id(target._paged))
    if group is None or len(group.leaves) != 1:
        return {}
    if not dense_and_non_overlapping(target.shape, target.stride()):
        return {}  # gaps or overlaps (they can cancel out in the span's length): not every byte is written
    lo, hi = _byte_span(target)
    if func is aten.copy_.default:
        source = args[1]
        if not isinstance(source, torch.Tensor) or source.dim() > target.dim():
            return {}
        try:
            if torch.broadcast_shapes(source.shape, target.shape) != target.shape:
                return {}
        except RuntimeError:
            return {}
    elif func is aten.fill_.Tensor and (not isinstance(args[1], torch.Tensor) or args[1].dim() != 0):
        return {}
    allocation = group.storage.allocation
    page_size = allocation.page_size
    first, stop = allocation.page_range(lo, hi)
    covered = [
        index
        for index in range(first, stop)
        if lo <= index * page_size and index * page_size + allocation.pages[index].nbytes <= hi
    ]
    return {id(group.storage): covered}


_RESIZES = frozenset({aten.resize_.default, aten.resize_as_.default, aten._resize_output_.default})


def _resizes_to_own_size(func: OpOverload, args: tuple, kwargs: dict) -> bool:
    """Whether ``func`` resizes a PagedTensor to the size it has, without a memory format: a no-op."""
    if func not in _RESIZES or not isinstance(args[0], PagedTensor) or kwargs.get("memory_format") is not None:
        return False
    if func is aten.resize_as_.default:
        return isinstance(args[1], torch.Tensor) and tuple(args[1].shape) == tuple(args[0].shape)
    if func is aten._resize_output_.default and torch.device(args[2]) != args[0].device:
        return False
    return tuple(args[1]) == tuple(args[0].shape)


def _write_locks(groups: dict[int, "_Group"]) -> Sequence[Any]:
    """The write locks of the allocations an op writes, in one fixed order (by id: two ops writing the
    same two allocations cannot deadlock)."""
    written = [group.storage for group in groups.values() if group.written]
    if len(written) == 1:
        return (written[0].write_lock,)
    return [storage.write_lock for storage in sorted(written, key=id)]


def _holding(locks: Sequence[Any], run: Callable[[], Any]) -> Any:
    """``run()`` holding every lock of ``locks``, taken in order. Each is taken by a ``with``
    statement: a Ctrl-C landing as a contended lock is granted is raised inside the block, which
    releases it (a ``lock.acquire()`` call checks for pending signals as it returns, outside any ``try``)."""
    if not locks:
        return run()
    with locks[0]:
        return _holding(locks[1:], run)


def _reads_written_bytes_as_other_elements(info: OpInfo, args: tuple, kwargs: dict) -> bool:
    """Whether an op writing one PagedTensor (its first argument, or its ``out=``) reads a view of that
    allocation whose elements are other bytes than the written ones at the same index: another byte
    offset, or the same element offset in a dtype of another size (``t[o:].add_(t.view(torch.uint8)[o:])``).
    Run in pieces, an earlier piece would write bytes a later piece reads (torch refuses such a partial
    overlap, which no one piece need show); :func:`run_in_pieces` compares element offsets only."""
    name = written_target(info, args)
    if name is None or name is NOT_ONE_TARGET:
        return False
    target = args[0] if name == 0 else kwargs.get(name)
    if not isinstance(target, PagedTensor) or target._paged is None:
        return False
    itemsize = target.dtype.itemsize
    read = (args[1:], kwargs) if name == 0 else (args, {key: value for key, value in kwargs.items() if key != name})
    return any(
        leaf._paged is target._paged
        and (leaf.dtype.itemsize != itemsize or leaf._offset != target._offset)
        for leaf in _paged_leaves(*read)
    )


def _same_data(target: Any, source: Any) -> bool:
    """Whether a copy between two PagedTensors would leave every byte as it is: views of the same
    bytes the same way (torch's copy_ returns early for those), or ``target`` with its leading dims
    folded into one, both contiguous (``matmul(out=)`` copies such a reshape of ``out`` back onto
    ``out`` unless the two share a storage, which a wrapper subclass's views do not). Any other view
    of the same bytes (``t.copy_(t.view(3, 4))``) runs, and torch refuses it, as for plain tensors."""
    if not (isinstance(target, PagedTensor) and isinstance(source, PagedTensor)):
        return False
    if target._paged is None or target._paged is not source._paged or target._offset != source._offset or target.dtype != source.dtype:
        return False
    if math_bits(target) != math_bits(source):
        return False
    if target.shape == source.shape and target.stride() == source.stride():
        return True
    folded = 0 < source.dim() < target.dim() and source.shape[1:] == target.shape[target.dim() - source.dim() + 1 :]
    return folded and target.numel() == source.numel() and target.is_contiguous() and source.is_contiguous()


# ---------------------------------------------------------------------- arguments


def _paged_leaves(args: tuple, kwargs: dict) -> list[PagedTensor]:
    """The PagedTensors among the arguments (top level and inside lists/tuples)."""
    leaves = []
    for value in (*args, *kwargs.values()):
        if isinstance(value, PagedTensor):
            leaves.append(value)
        elif type(value) in (list, tuple):
            leaves.extend(item for item in value if isinstance(item, PagedTensor))
    return leaves


def _written_leaves(info: OpInfo, args: tuple, kwargs: dict) -> list[PagedTensor]:
    written = []
    for position, name in info.written:
        value = args[position] if position < len(args) else kwargs.get(name)
        if isinstance(value, PagedTensor):
            written.append(value)
        elif type(value) in (list, tuple):
            written.extend(item for item in value if isinstance(item, PagedTensor))
    return written


def _substitute(args: tuple, kwargs: dict, replacement: dict[int, torch.Tensor]) -> tuple[tuple, dict]:
    """``args``/``kwargs`` with each PagedTensor replaced by ``replacement[id(it)]``."""

    def swap(value: Any) -> Any:
        if isinstance(value, PagedTensor):
            return replacement[id(value)]
        if type(value) in (list, tuple) and any(isinstance(item, PagedTensor) for item in value):
            return type(value)(replacement[id(item)] if isinstance(item, PagedTensor) else item for item in value)
        return value

    return tuple(swap(value) for value in args), {name: swap(value) for name, value in kwargs.items()}


def _map_tensors(out: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    if isinstance(out, torch.Tensor):
        return fn(out)
    if type(out) in (list, tuple):
        return type(out)(_map_tensors(item, fn) for item in out)
    return out


def _unalias(tensor: torch.Tensor, windows: Sequence[_Window]) -> torch.Tensor:
    """A result that shares a device slab (an op whose schema hides an alias) must not outlive the
    pin: it is copied out."""
    if isinstance(tensor, PagedTensor) or not any(window.shares_slab(tensor) for window in windows):
        return tensor
    if tensor.layout != torch.strided or not dense_and_non_overlapping(tensor.shape, tensor.stride()):
        return tensor.clone()
    copy = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device=tensor.device)
    return copy.copy_(tensor)


def _empty_like_leaf(leaf: PagedTensor) -> torch.Tensor:
    empty = torch.empty_strided(leaf.shape, leaf.stride(), dtype=leaf.dtype, device=leaf.device)
    return with_math_bits(empty, math_bits(leaf))




def _normalize_device(device: torch.device) -> torch.device:
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _describe(args: tuple, kwargs: dict) -> str:
    def name(value: Any) -> str:
        if type(value) in (list, tuple):
            return f"{type(value).__name__}[{', '.join(name(item) for item in value)}]"
        return type(value).__name__

    parts = [name(value) for value in args] + [f"{key}={name(value)}" for key, value in kwargs.items()]
    return f" (argument types: {', '.join(parts)})"


# ---------------------------------------------------------------------- handlers: views


_VIEW_OPS = [
    aten.view, aten._unsafe_view, aten._reshape_alias, aten.as_strided, aten.slice, aten.select, aten.narrow.default,
    aten.t, aten.transpose, aten.permute, aten.expand, aten.unsqueeze, aten.squeeze, aten.alias, aten.detach,
    aten.split, aten.split_with_sizes, aten.unbind, aten.unfold, aten.diagonal, aten.view_as_real,
    aten.view_as_complex, aten.lift_fresh,
    # (narrow.Tensor, whose start is a tensor, decomposes: its start may be a PagedTensor)
    # views whose schema carries no alias annotation (torch returns views, without autograd's checks)
    aten.unsafe_split, aten.unsafe_split_with_sizes,
]


@implements(_VIEW_OPS)
def view_of_pages(func: OpOverload, types: tuple, args: tuple, kwargs: dict, leaves: Optional[list[PagedTensor]] = None) -> Any:
    """A view op: run it on a meta tensor of the same layout; the results are PagedTensors over the
    same pages (nothing faults in). ``leaves``: the PagedTensor arguments, when the caller has them."""
    source = args[0]
    if not isinstance(source, PagedTensor):  # the view is of a plain argument
        return DISPATCHER.run_paged(func, types, args, kwargs)
    if leaves is None:
        leaves = _paged_leaves(args, kwargs)
    try:
        if len(leaves) == 1:  # the source is the only PagedTensor argument: the common case
            out = func(meta_like(source), *args[1:], **kwargs)
        else:
            meta_args, meta_kwargs = _substitute(args, kwargs, {id(leaf): meta_like(leaf) for leaf in leaves})
            out = func(*meta_args, **meta_kwargs)
    except NotImplementedError as error:
        raise NotImplementedError(f"PagedTensor: view op {func} has no meta kernel{_describe(args, kwargs)}: {error}") from error

    def to_paged(meta: torch.Tensor) -> PagedTensor:
        if func is aten.as_strided.default:  # the only view op that can reach past the storage (meta checks nothing)
            lo, hi = element_span(tuple(meta.shape), meta.stride(), meta.storage_offset())
            if hi > lo and hi * meta.dtype.itemsize > source._paged.nbytes:
                raise RuntimeError(
                    f"setStorage: sizes {list(meta.shape)}, strides {list(meta.stride())}, storage offset "
                    f"{meta.storage_offset()}, and itemsize {meta.dtype.itemsize} requiring a storage size of "
                    f"{hi * meta.dtype.itemsize} are out of bounds for storage of size {source._paged.nbytes}"
                )
        layout = (source._paged, meta.storage_offset(), tuple(meta.shape), meta.stride(), meta.dtype, False, math_bits(meta))
        if torch.is_inference_mode_enabled() and not source.is_inference():
            # A view of a normal tensor is a normal tensor, in inference mode too (it shares the
            # base's version counter, which an inference tensor cannot).
            with torch.inference_mode(False):
                return PagedTensor._make(*layout)
        if source.is_inference() and not torch.is_inference_mode_enabled():
            # And a view of an inference tensor is an inference tensor outside inference mode too, as
            # torch's are: else torch let it be saved for backward and written in place, where an
            # inference tensor is refused (it has no version counter to catch a later write).
            with torch.inference_mode():
                return PagedTensor._make(*layout)
        return PagedTensor._make(*layout)

    return to_paged(out) if isinstance(out, torch.Tensor) else _map_tensors(out, to_paged)


@implements([aten.as_strided_copy, aten.as_strided_scatter])
def strided_over_the_allocation(func: OpOverload, types: tuple, args: tuple, kwargs: dict) -> torch.Tensor:
    """``as_strided_copy`` and ``as_strided_scatter`` place elements by storage offset, which for a
    PagedTensor counts from the start of its allocation (its storage), not from the device slab its
    pages sit in (run dense on the slab, they read and wrote other tensors' slots).

    ``as_strided_copy`` is the paged view (bounds-checked against the allocation) copied out, only its
    pages faulting in; ``as_strided_scatter`` runs on the allocation materialized whole, as torch runs
    it on a clone of the whole storage. Both return plain tensors; their ``out=`` forms copy that
    result into ``out``, as torch's do."""
    source = args[0]
    if not isinstance(source, PagedTensor):  # a PagedTensor ``src`` or ``out`` only: the storage is a plain one
        return DISPATCHER.run_paged(func, types, args, kwargs)
    if "out" in kwargs:
        out = kwargs["out"]
        functional = getattr(func.overloadpacket, "default")
        result = strided_over_the_allocation(functional, types, args, {k: v for k, v in kwargs.items() if k != "out"})
        if out.shape != result.shape:
            aten.resize_.default(out, result.shape)
        return aten.copy_.default(out, result)
    if func is aten.as_strided_copy.default:
        view = aten.as_strided.default(source, *args[1:], **kwargs)
        return aten.clone.default(view, memory_format=torch.contiguous_format)
    whole = PagedTensor._make(source._paged, 0, (source._paged.nbytes // source.dtype.itemsize,), (1,), source.dtype)
    dense = whole.materialize().as_strided(source.shape, source.stride(), source._offset)
    return func(dense, *args[1:], **kwargs)


# ---------------------------------------------------------------------- handlers: conversions


@implements([aten._to_copy.default])
def convert_into_pages(func: OpOverload, types: tuple, args: tuple, kwargs: dict) -> Any:
    """``t.to(dtype)``, ``t.half()``, ``t.float()``, ``t.to(copy=True)``, ``t.to(memory_format=...)``
    of a PagedTensor on its own device: a new PagedTensor on the same pager, of the layout the dense op
    gives (its meta kernel's), filled by ``copy_`` (the dense op's own kernel, ``empty`` then
    ``copy_``), which runs a piece of pages at a time when the two do not fit on the device tier at
    once: no more than a piece is dense at once, so ``module.half()`` keeps paged buffers and
    parameters paged, and a tensor larger than the device tier converts. The pages are advised as
    the source's were (:meth:`Pager.advise`). A conversion to another device, layout or pinned
    memory gives a plain tensor, as every op does, and so does any conversion inside a
    ``torch.autocast`` region: autocast converts the operands of every matmul it runs (a paged copy
    per op would cost an allocation and a write each).

    Raises:
        OutOfPagesError: the copy neither fits at once nor runs in pieces (a view whose elements do
            not fill its span, converted to another layout). Nothing is left allocated.
    """
    source = args[0]
    device = kwargs.get("device")
    if (
        not isinstance(source, PagedTensor)
        or (device is not None and _normalize_device(torch.device(device)) != _normalize_device(source.device))
        or kwargs.get("layout") not in (None, torch.strided)
        or kwargs.get("pin_memory")
        or _inside_autocast()
    ):  # fmt: skip
        return DISPATCHER.run_paged(func, types, args, kwargs)
    layout = func(meta_like(source), **{name: value for name, value in kwargs.items() if name != "device"})
    pager = source.pager
    nbytes = element_span(tuple(layout.shape), layout.stride(), 0)[1] * layout.dtype.itemsize
    source_allocation = source.allocation
    allocation = pager.allocate(nbytes, name=getattr(source_allocation, "name", None)) if nbytes else None
    storage = PagedStorage(pager, allocation)
    if allocation is not None and source_allocation is not None and source_allocation.loop:
        pager.advise(allocation, "loop")
    result = PagedTensor._make(storage, 0, tuple(layout.shape), layout.stride(), layout.dtype)
    try:
        aten.copy_.default(result, source, non_blocking=bool(kwargs.get("non_blocking", False)))
    except OutOfPagesError as error:
        if isinstance(error, SlabAllocationError):
            raise
        # The two do not fit at once and cannot run in pieces (an expanded view converted into a
        # result many times its span): the dense conversion, as any op runs, then paged through
        # the pager in chunks (PagedTensor.wrap).
        pager.free(allocation)
        dense = DISPATCHER.run_paged(func, types, args, kwargs)
        flat = dense.as_strided((dense.numel(),), (1,)).view(torch.uint8)  # a dense result fills its span
        storage = PagedStorage.filled(pager, flat.numel(), lambda target: pager.write(target, flat), name=getattr(source_allocation, "name", None))
        if source_allocation is not None and source_allocation.loop:
            pager.advise(storage.allocation, "loop")
        result = PagedTensor._make(storage, 0, tuple(dense.shape), dense.stride(), dense.dtype)
    except BaseException:
        if allocation is not None and not allocation.freed:
            pager.free(allocation)
        raise
    return result


def _inside_autocast() -> bool:
    """Whether this thread runs inside a ``torch.autocast`` region. (Inside autocast's own kernels,
    which cast matmul operands, ``torch.is_autocast_enabled`` reads False: they exclude its key.
    The nesting count ``torch.autocast`` keeps is read by raising and restoring it, which has no
    other effect: the Python context manager clears its cache when it reaches 0.)"""
    level = torch.autocast_increment_nesting()
    torch.autocast_decrement_nesting()
    return level > 1


# ---------------------------------------------------------------------- handlers: copies and comparisons


@implements([aten.clone.default])
def clone_in_pieces(func: OpOverload, types: tuple, args: tuple, kwargs: dict) -> Any:
    """``t.clone()`` of any ``memory_format`` (what ``t.t().contiguous()`` and ``t.t().reshape(-1)``
    run) of a PagedTensor larger than a piece: a plain tensor of the dense op's layout (its meta
    kernel's) filled a piece of pages at a time (:func:`copy_in_parts`). A smaller one, or one that
    cannot be copied so (:func:`_copies_in_parts`), runs the generic way."""
    source = args[0]
    if not isinstance(source, PagedTensor) or not _copies_in_parts([source]) or not _larger_than_a_piece([source]):
        return DISPATCHER.run_paged(func, types, args, kwargs)
    layout = func(meta_like(source), *args[1:], **kwargs)
    result = torch.empty_strided(layout.shape, layout.stride(), dtype=layout.dtype, device=source.device)
    copy_in_parts(result, source)
    return result


@implements([aten.cat.default, aten.stack.default])
def concatenate_in_pieces(func: OpOverload, types: tuple, args: tuple, kwargs: dict) -> Any:
    """``torch.cat`` / ``torch.stack`` of tensors, at least one a PagedTensor, larger together than a
    piece: the op runs on meta tensors first (torch's errors, its type promotion and layout, before
    anything is allocated), then each input is copied into its slice of a plain result a piece of
    pages at a time (``copy_`` converts to the promoted dtype, as the dense op does). 1-D empty
    inputs are skipped by ``cat``, as torch's legacy rule says. Otherwise the generic way."""
    tensors = list(args[0])
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    paged = [t for t in tensors if isinstance(t, PagedTensor)]
    if not paged or not _copies_in_parts(tensors) or not _larger_than_a_piece(paged):
        return DISPATCHER.run_paged(func, types, args, kwargs)
    layout = _concatenated_layout(func, tensors, dim)
    result = torch.empty_strided(layout.shape, layout.stride(), dtype=layout.dtype, device=paged[0].device)
    slices = _stacked_slices(result, tensors, dim) if func is aten.stack.default else _concatenated_slices(result, tensors, dim)
    for target, source in slices:
        copy_in_parts(target, source)
    return result


@implements([aten.equal.default, aten.allclose.default])
def compare_in_pieces(func: OpOverload, types: tuple, args: tuple, kwargs: dict) -> bool:
    """``torch.equal`` / ``torch.allclose`` of a PagedTensor larger than a piece: the dense op on
    matching parts of the two (each copied to a plain tensor a piece of pages at a time), ``True``
    only if every part gives ``True``, stopping at the first that does not. Both ops are an AND over
    elements (``allclose`` is ``isclose(...).all()``), so this is the dense op's answer: dtypes
    compared as it compares them, its errors (from the first part), NaN unequal to itself unless
    ``equal_nan``. (``isclose``, made of elementwise ops, runs in pieces only where the two share one
    layout.) ``equal`` of other shapes is ``False``; ``allclose`` of other shapes (a broadcast) runs
    the generic way."""
    a, b = args[0], args[1]
    if not _copies_in_parts([a, b]) or not _larger_than_a_piece([t for t in (a, b) if isinstance(t, PagedTensor)]):
        return DISPATCHER.run_paged(func, types, args, kwargs)
    if a.shape != b.shape:
        if func is aten.equal.default:
            return False
        return DISPATCHER.run_paged(func, types, args, kwargs)
    return all(func(_plain_copy(part_a), _plain_copy(part_b), *args[2:], **kwargs) for part_a, part_b in _matching_parts(a, b))


def _concatenated_layout(func: OpOverload, tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
    """The result of ``cat`` / ``stack`` run on meta tensors of the inputs' layouts. Where that raises,
    the op raises torch's own error on zero-stride stand-ins of the inputs (its checks come before
    its result is allocated), nothing allocated."""
    try:
        return func([meta_layout(t) for t in tensors], dim)
    except (RuntimeError, IndexError, ValueError, TypeError) as error:
        stand_ins = [torch.empty((), dtype=t.dtype, device=t.device).expand(t.shape) for t in tensors]
        func(stand_ins, dim)
        raise error


def _copies_in_parts(tensors: Sequence[Any]) -> bool:
    """Whether ``tensors`` (at least one a PagedTensor) can be read part by part into plain tensors:
    strided, on one device, without conjugate or negative bits (``copy_`` would resolve them), and
    no PagedTensor traced (``_inner``)."""
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return False
    paged = [t for t in tensors if isinstance(t, PagedTensor)]
    return (
        bool(paged)
        and all(t._inner is None for t in paged)
        and all(t.layout == torch.strided and not t.is_conj() and not t.is_neg() for t in tensors)
        and len({_normalize_device(t.device) for t in tensors}) == 1
    )


def _larger_than_a_piece(paged: list[PagedTensor]) -> bool:
    """Whether the bytes ``paged`` reach are more than one piece (:func:`piece_elements_of`) holds, so
    that the op goes a part at a time; a smaller op runs at once, the generic way, as does any op
    where the device tier holds no piece (fewer than two pages)."""
    piece = piece_elements_of(paged)
    if piece is None:  # too many allocations for a piece of each at once: one at a time, if that fits
        return piece_elements_of(paged[:1]) is not None
    widest = max(t.dtype.itemsize for t in paged)
    return sum(span_elements(t) * t.dtype.itemsize for t in paged) > piece * widest


def copy_in_parts(target: torch.Tensor, source: torch.Tensor) -> None:
    """``target.copy_(source)`` (same shape), a part of ``source``'s pages at a time: each part spans
    at most a piece (:func:`_parts`), whatever the two layouts are."""
    if not isinstance(source, PagedTensor):
        target.copy_(source)
        return
    for narrowings in _parts(source, piece_elements_of([source]) or 1):
        _narrowed(target, narrowings).copy_(_narrowed(source, narrowings))


Narrowing = tuple[int, int, int]
"""``(dim, start, length)``: indices ``[start, start + length)`` of ``dim``."""


def _parts(tensor: torch.Tensor, piece: int, narrowings: tuple[Narrowing, ...] = ()) -> Iterator[tuple[Narrowing, ...]]:
    """Narrowings cutting ``tensor`` (already narrowed by ``narrowings``) into parts spanning at most
    ``piece`` elements each (or one element): runs of indices along its dim of the largest stride,
    each index cut again along the next dim where one index spans more than a piece."""
    view = _narrowed(tensor, narrowings)
    dims = [d for d in range(view.dim()) if view.shape[d] > 1 and view.stride(d) > 0]
    if span_elements(view) <= piece or not dims:
        yield narrowings
        return
    dim = max(dims, key=view.stride)
    one = span_elements(view.narrow(dim, 0, 1))
    count = max(1, (piece - one) // view.stride(dim) + 1) if one <= piece else 1
    for start in range(0, view.shape[dim], count):
        yield from _parts(tensor, piece, (*narrowings, (dim, start, min(count, view.shape[dim] - start))))


def _narrowed(tensor: torch.Tensor, narrowings: Sequence[Narrowing]) -> torch.Tensor:
    for dim, start, length in narrowings:
        tensor = tensor.narrow(dim, start, length)
    return tensor


def _matching_parts(a: torch.Tensor, b: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The same parts of ``a`` and ``b`` (one shape), cut by the layout of the first that is paged."""
    reference = a if isinstance(a, PagedTensor) else b
    for narrowings in _parts(reference, piece_elements_of([reference]) or 1):
        yield _narrowed(a, narrowings), _narrowed(b, narrowings)


def _plain_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A plain contiguous copy of a PagedTensor (a part at a time); a plain tensor as it is."""
    if not isinstance(tensor, PagedTensor):
        return tensor
    copy = torch.empty(tensor.shape, dtype=tensor.dtype, device=tensor.device)
    copy_in_parts(copy, tensor)
    return copy


def _concatenated_slices(result: torch.Tensor, tensors: list[torch.Tensor], dim: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(slice of result, input)`` for each input of ``cat`` along ``dim`` (negative too); a 1-D
    empty input is skipped (torch's legacy rule), as is one with no index along ``dim``."""
    dim = dim % result.dim()
    slices, start = [], 0
    for t in tensors:
        if (t.dim() == 1 and t.shape[0] == 0) or t.shape[dim] == 0:
            continue
        slices.append((result.narrow(dim, start, t.shape[dim]), t))
        start += t.shape[dim]
    return slices


def _stacked_slices(result: torch.Tensor, tensors: list[torch.Tensor], dim: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(slice of result, input)`` for each input of ``stack`` along ``dim`` (negative too)."""
    dim = dim % result.dim()
    return [(result.select(dim, i), t) for i, t in enumerate(tensors)]


# ---------------------------------------------------------------------- handlers: whole-tensor reductions

# Reductions of all elements whose result does not depend on the order of the elements, so that
# the same op on parts of a tensor, combined, gives the dense op's result exactly.
_EXTREMA = (aten.max.default, aten.min.default, aten.amax.default, aten.amin.default)
_FIRST_EXTREME_INDEX = (aten.argmax.default, aten.argmin.default)
_LOGICAL = (aten.any.default, aten.all.default)
_COUNTS = (aten.sum.default, aten.sum.dim_IntList, aten.count_nonzero.default)
_WHOLE_TENSOR_REDUCTIONS = (*_EXTREMA, *_FIRST_EXTREME_INDEX, aten.aminmax.default, *_LOGICAL, *_COUNTS)


@implements(_WHOLE_TENSOR_REDUCTIONS)
def reduce_in_parts(func: OpOverload, types: tuple, args: tuple, kwargs: dict) -> Any:
    """A reduction of every element of a PagedTensor larger than a piece, whose result does not
    depend on the elements' order: ``max``, ``min``, ``amax`` / ``amin`` over no or all dims,
    ``aminmax``, ``argmax`` / ``argmin`` without ``dim``, ``any``, ``all``, ``count_nonzero``
    without ``dim``, and ``sum`` over no or all dims of an integer or bool tensor into an integer
    dtype. The op runs on each part of the tensor's pages (:func:`_parts`, each at most a piece)
    and the parts' results are combined by the same reduction: the dense op's dtype, shape and
    value (NaN propagating; ``argmax``/``argmin`` the first extreme in the logical row-major
    order, a NaN first of all, as torch counts it). Integer sums wrap as the dense op's do (modulo
    the result dtype), so any order gives the same bits. A float ``sum`` depends on the order: it
    runs the generic way (and raises :class:`OutOfPagesError` when its pages do not fit).

    Two things are the kernel's and not the values': the sign of a zero extremum of a tensor holding
    both ``+0.0`` and ``-0.0`` (the CPU ``max`` and ``amax`` of one such tensor can differ), and the
    bits of a NaN ``max`` / ``min`` / ``aminmax`` (on CPU ``0x7FC00000``, or all ones from its
    vector path, by the tensor's size and threads; ``amax`` / ``amin`` give ``0x7FC00000``). The
    dense op's own vary with its kernel's path and order; here they are those of the parts' kernels
    and of the combining op: the dense op's value (NaN for NaN, a zero for a zero), not always its
    bits. Everything else, indices included, is bitwise the dense op's."""
    source = args[0]
    if not _reduces_in_parts(func, args, kwargs):
        return DISPATCHER.run_paged(func, types, args, kwargs)
    layout = func(meta_like(source), *args[1:], **kwargs)
    cuts = list(_parts(source, piece_elements_of([source]) or 1))
    if func in _FIRST_EXTREME_INDEX:
        return _first_extreme_index(func, source, cuts).reshape(layout.shape)
    parts = [_narrowed(source, narrowings) for narrowings in cuts]
    if func is aten.aminmax.default:
        minima, maxima = zip(*(func(part, *args[1:], **kwargs) for part in parts))
        return func(_flat(minima))[0].reshape(layout[0].shape), func(_flat(maxima))[1].reshape(layout[1].shape)
    partials = _flat([func(part, *args[1:], **kwargs) for part in parts])
    if func in _COUNTS:
        return aten.sum.default(partials, dtype=layout.dtype).reshape(layout.shape)
    return func(partials).reshape(layout.shape)  # the extremum of the parts' extrema, any/all of theirs


def _reduces_in_parts(func: OpOverload, args: tuple, kwargs: dict) -> bool:
    """Whether ``func`` reduces every element of a PagedTensor ``args[0]`` that is larger than a
    piece (:func:`_larger_than_a_piece`), not empty, readable in parts (:func:`_copies_in_parts`),
    where any order of its elements gives the same result (:func:`_order_free`)."""
    source = args[0]
    return (  # the cheap tests first: every reduction of a PagedTensor passes here
        isinstance(source, PagedTensor)
        and source._inner is None
        and source.numel() > 0
        and _reduces_every_element(func, args, kwargs, source.dim())
        and _order_free(func, source.dtype, kwargs)
        and _larger_than_a_piece([source])
        and _copies_in_parts([source])
    )


def _argument(args: tuple, kwargs: dict, position: int, name: str) -> Any:
    """An op's argument by position or keyword (``None`` when absent)."""
    return args[position] if len(args) > position else kwargs.get(name)


def _reduces_every_element(func: OpOverload, args: tuple, kwargs: dict, ndim: int) -> bool:
    """Whether the reduction's ``dim`` covers every element: absent (``None``), or for ``amax`` /
    ``amin`` / ``sum.dim_IntList`` an empty list or every dim."""
    if func in (aten.amax.default, aten.amin.default, aten.sum.dim_IntList):
        dims = _argument(args, kwargs, 1, "dim")
        return not dims or {d % max(ndim, 1) for d in dims} == set(range(ndim))
    if func in (aten.max.default, aten.min.default, *_LOGICAL, aten.sum.default):
        return True
    return _argument(args, kwargs, 1, "dim") is None  # argmax, argmin, aminmax (keyword dim), count_nonzero


def _order_free(func: OpOverload, dtype: torch.dtype, kwargs: dict) -> bool:
    """Whether any order of the elements gives the same result: true of every op here but a sum,
    exact only over integer or bool elements into an integer ``dtype`` (wrapping modulo it)."""
    if func not in (aten.sum.default, aten.sum.dim_IntList):
        return True
    result_dtype = kwargs.get("dtype")
    return _is_integral(dtype) and (result_dtype is None or (_is_integral(result_dtype) and result_dtype != torch.bool))


def _is_integral(dtype: torch.dtype) -> bool:
    return not dtype.is_floating_point and not dtype.is_complex


def _flat(partials: Sequence[torch.Tensor]) -> torch.Tensor:
    """The parts' results (each of one element) as one 1-D tensor."""
    return torch.cat([partial.reshape(1) for partial in partials])


def _first_extreme_index(func: OpOverload, source: PagedTensor, cuts: list[tuple[Narrowing, ...]]) -> torch.Tensor:
    """``argmax`` / ``argmin`` of ``source`` from its parts (``source`` narrowed by each of ``cuts``):
    each part, copied to a plain tensor, gives its first extreme and that element's logical flat
    index in ``source``; the result is the smallest index among the parts whose extreme is the
    extreme of all (NaN if any is NaN: the dense op's answer is then its first NaN). A part is a
    box of indices, its elements in the same order as in ``source``, so its first extreme is the
    first of its extremes there; ties between parts go to the smallest index."""
    values, indices = [], []
    for narrowings in cuts:
        plain = _plain_copy(_narrowed(source, narrowings))
        local = func(plain)
        values.append(torch.take(plain, local.reshape(1)))
        indices.append(_index_in_source(local, tuple(plain.shape), narrowings, tuple(source.shape)))
    values_flat, indices_flat = torch.cat(values), torch.stack(indices)
    extreme = (aten.max.default if func is aten.argmax.default else aten.min.default)(values_flat)
    is_extreme = torch.where(extreme.isnan(), values_flat.isnan(), values_flat == extreme)
    return torch.where(is_extreme, indices_flat, source.numel()).min()


def _index_in_source(local: torch.Tensor, part_shape: tuple[int, ...], narrowings: Sequence[Narrowing],
                     shape: tuple[int, ...]) -> torch.Tensor:  # fmt: skip
    """The logical (row-major) flat index in a tensor of ``shape`` of the element at logical flat
    index ``local`` (a 0-dim int64 tensor) of its part of ``part_shape`` narrowed by
    ``narrowings``: computed on the device, no host sync."""
    corner = [0] * len(shape)  # the part's first index along each dim
    for dim, start, _ in narrowings:
        corner[dim] += start
    strides = make_contiguous_strides_for(shape)
    index = torch.zeros((), dtype=torch.int64, device=local.device)
    remainder = local
    for dim in reversed(range(len(shape))):
        index = index + (remainder % part_shape[dim] + corner[dim]) * strides[dim]
        remainder = remainder // part_shape[dim]
    return index


# ---------------------------------------------------------------------- handlers: metadata only


@implements([aten.new_empty, aten.new_empty_strided, aten.new_zeros, aten.new_ones, aten.new_full])
def new_from_metadata(func: OpOverload, types: tuple, args: tuple, kwargs: dict) -> Any:
    """``new_*`` reads only the dtype and device of ``self``."""
    source = args[0]
    stand_in = torch.empty(0, dtype=source.dtype, device=source.device)
    return func(stand_in, *args[1:], **kwargs)


@implements([aten.empty_like, aten.zeros_like, aten.ones_like, aten.full_like, aten.rand_like, aten.randn_like, aten.randint_like])
def like_from_metadata(func: OpOverload, types: tuple, args: tuple, kwargs: dict) -> Any:
    """``*_like`` reads only the size, strides, dtype and device of ``self``: an uninitialized stand-in."""
    source = args[0]
    if not isinstance(source, PagedTensor):
        return DISPATCHER.run_paged(func, types, args, kwargs)
    stand_in = torch.empty_strided(source.shape, source.stride(), dtype=source.dtype, device=source.device)
    return func(stand_in, *args[1:], **kwargs)


@implements([aten._has_compatible_shallow_copy_type.default])
def has_compatible_shallow_copy_type(func: OpOverload, types: tuple, args: tuple, kwargs: dict) -> bool:
    """Whether ``t.data = other`` may keep ``t``'s tensor type (what ``Module._apply`` asks, in
    inference mode too, before a parameter conversion): torch compares the two tensors' dispatch
    keys, which a PagedTensor and a plain tensor do not share. No page is read."""
    self, other = args[0], args[1]
    both_paged = isinstance(self, PagedTensor) == isinstance(other, PagedTensor)
    return both_paged and self.device.type == other.device.type and self.layout == other.layout


@implements([aten.is_same_size.default])
def is_same_size(func: OpOverload, types: tuple, args: tuple, kwargs: dict) -> bool:
    return args[0].shape == args[1].shape


# ---------------------------------------------------------------------- handlers: row gathers


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


def _row_byte_spans(table: PagedTensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each of ``rows`` (int64, on the host) of ``table`` begins in its allocation, and ends
    (one past its last byte reached), in bytes: the pages a row gather or scatter reads."""
    itemsize = table.dtype.itemsize
    row_reach = element_span(tuple(table.shape[1:]), table.stride()[1:], 0)[1]
    starts = (table._offset + rows * table.stride(0)) * itemsize
    return starts, starts + row_reach * itemsize


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


# ---------------------------------------------------------------------- handlers: row scatters


_ROW_SCATTERS = [aten.index_put_.default, aten.index_copy_.default, aten.index_add_.default, aten.index_fill_.int_Scalar,
                 aten.index_fill_.int_Tensor]  # fmt: skip

# Row scatters that count a negative index from the end of dim 0 (index_copy_ and index_add_ refuse one).
_WRAPS_NEGATIVE_INDICES = frozenset({aten.index_put_.default, aten.index_fill_.int_Scalar, aten.index_fill_.int_Tensor})


@dataclass(frozen=True)
class _RowScatter:
    """An in-place row scatter on dim 0 of a PagedTensor, its arguments read by name."""

    func: OpOverload
    table: PagedTensor
    index: torch.Tensor
    """The index as given, a plain tensor: positions on dim 0 or (index_put_) a bool mask over it."""
    source: Any
    """``values`` (index_put_), ``source`` (index_copy_, index_add_) or ``value`` (index_fill_)."""
    options: dict
    """The other arguments by name (``accumulate``, ``alpha``)."""

    def arguments(self, table: torch.Tensor, index: torch.Tensor, source: Any) -> tuple:
        """``func``'s positional arguments for ``table``, ``index`` (positions on dim 0) and ``source``."""
        if self.func is aten.index_put_.default:
            return table, [index], source
        return table, 0, index, source

    def call(self, table: torch.Tensor, index: torch.Tensor, source: Any) -> Any:
        """``func`` on plain tensors: ``table``, ``index`` and ``source``, with the options."""
        return self.func(*self.arguments(table, index, source), **self.options)


@implements(_ROW_SCATTERS)
def scatter_rows(func: OpOverload, types: tuple, args: tuple, kwargs: dict) -> Any:
    """Write rows along dim 0 in place (``t[idx] = v`` and ``index_put_`` with or without
    ``accumulate``, ``index_copy_``, ``index_add_``, ``index_fill_``): fault in only the pages
    holding the written rows.

    The written rows (sorted, distinct) are grouped into runs of adjacent pages, each spanning at
    most a piece of the device tier (its capacity less one page). The op runs once per run, the
    generic way, on the table's rows ``[lo, hi)`` (a narrowed view: only its pages fault in, and
    only they are written back and marked dirty), with the run's index positions renumbered by
    ``-lo`` in their order in the index and the matching rows of the source (a source broadcast
    along dim 0 is passed as it is). A row is written by one run only, in the index's order, so the
    table ends bitwise as after the dense op. torch's own checks run first, with torch's errors and
    before any page faults in: shapes and dtypes on a stand-in table with as many rows as are
    written (no page read), index bounds on the index's values. An empty index faults nothing in.

    A table that fits in one piece runs the generic way, and so does any other form of the op
    (another dim, several index tensors, a byte or multi-dim mask, a table with the conjugate or
    negative bit, a source that is a view of the table's pages, an index or source on another device).

    Note:
        Reads the index tensor on the host (a sync when it lives on the GPU), as a row gather does.
        A run that fails (the device tier filled by pins of another thread) leaves the runs before it
        written.
    """
    request = _row_scatter_request(func, args, kwargs)
    if request is None or not _larger_than_a_piece([request.table]):
        return DISPATCHER.run_paged(func, types, args, kwargs)
    given = _index_values(request)
    if given is None:
        _check_on_a_stand_in(request, request.index, 1)  # torch's error for the index dtype
        return DISPATCHER.run_paged(func, types, args, kwargs)
    rows_total = request.table.shape[0]
    positions = torch.where(given < 0, given + rows_total, given) if func in _WRAPS_NEGATIVE_INDICES else given
    in_bounds = (positions >= 0) & (positions < rows_total)
    rows, renumbered = torch.unique(torch.where(in_bounds, positions, 0), sorted=True, return_inverse=True)
    index_dtype = torch.int64 if request.index.dtype == torch.bool else request.index.dtype
    _check_on_a_stand_in(request, renumbered.to(request.table.device, index_dtype), rows.numel())  # torch's shape and dtype checks
    if not bool(in_bounds.all()):
        raise _index_out_of_bounds(func, int(given[~in_bounds][0]), rows_total)
    if positions.numel() == 0:
        return request.table
    source_rows = _source_by_position(request, positions.numel())
    runs = _runs_of_rows(request.table, rows)
    if source_rows is _NOT_BY_POSITION or runs is None:
        return DISPATCHER.run_paged(func, types, args, kwargs)  # nothing written yet
    flat = positions.reshape(-1)
    order = torch.argsort(flat, stable=True)  # index places by row, each row's in the index's order
    by_row = flat[order]
    for lo, hi in runs:
        first, stop = torch.searchsorted(by_row, torch.tensor([lo, hi])).tolist()
        places = order[first:stop].sort().values  # the run's places, in the index's order
        run_source = request.source if source_rows is None else source_rows.index_select(0, places.to(source_rows.device))
        run_index = (flat[places] - lo).to(request.table.device)
        run_args = request.arguments(request.table.narrow(0, lo, hi - lo), run_index, run_source)
        DISPATCHER.run_paged(func, types, run_args, dict(request.options))
    return request.table


def _row_scatter_request(func: OpOverload, args: tuple, kwargs: dict) -> Optional[_RowScatter]:
    """The row scatter ``func`` asks for, when it writes whole rows of a PagedTensor along dim 0 by
    one plain index on its device; else ``None``. A PagedTensor index or source is read dense."""
    bound = {argument.name: argument.default_value for argument in func._schema.arguments if argument.has_default_value()}
    bound.update(zip((argument.name for argument in func._schema.arguments), args))
    bound.update(kwargs)
    table = bound["self"]
    if not isinstance(table, PagedTensor) or table._inner is not None or table.dim() == 0 or table.numel() == 0:
        return None
    if table.stride(0) == 0 or table.is_conj() or table.is_neg():
        return None
    if func is aten.index_put_.default:
        indices = bound["indices"]
        if len(indices) != 1 or not isinstance(indices[0], torch.Tensor):
            return None
        index, source, options = indices[0], bound["values"], {"accumulate": bound["accumulate"]}
    else:
        if bound["dim"] not in (0, -table.dim()):
            return None
        index = bound["index"]
        source = bound["value"] if "value" in bound else bound["source"]
        options = {"alpha": bound["alpha"]} if func is aten.index_add_.default else {}
    if not isinstance(index, torch.Tensor) or index.device != table.device:
        return None
    if isinstance(source, torch.Tensor) and source.dim() > 0 and source.device != table.device:
        return None
    if isinstance(source, PagedTensor):
        if source._paged is table._paged:
            return None  # another view of the table's pages: torch's overlap checks, the generic way
        source = source.materialize()
    if isinstance(index, PagedTensor):
        index = index.materialize()
    return _RowScatter(func, table, index, source, options)


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


def _index_out_of_bounds(func: OpOverload, index: int, rows_total: int) -> Exception:
    """The error torch's CPU kernel of ``func`` raises for ``index`` out of dim 0's bounds."""
    message = f"index {index} is out of bounds for dimension 0 with size {rows_total}"
    if func is aten.index_copy_.default:
        return IndexError(f"index_copy_(): {message}")
    if func is aten.index_add_.default:
        return RuntimeError(message)
    return IndexError(message)


_NOT_BY_POSITION = object()


def _source_by_position(request: _RowScatter, count: int) -> Any:
    """The source as one row per index position (flattened, ``count`` rows), ``None`` where the
    source is broadcast along dim 0 (each run takes it as it is), or :data:`_NOT_BY_POSITION` for a
    source of a form not handled here. Called after torch's checks passed."""
    source = request.source
    if not isinstance(source, torch.Tensor) or source.dim() == 0 or request.func.overloadpacket is aten.index_fill_:
        return None  # a value filled into every row
    if request.func is not aten.index_put_.default:
        return source if source.dim() == request.table.dim() else _NOT_BY_POSITION
    # index_put_: values broadcast to the indexing result, (*index positions, *row shape).
    lead = 1 if request.index.dtype == torch.bool else request.index.dim()
    indexed_dims = lead + request.table.dim() - 1
    if source.dim() > indexed_dims:
        return _NOT_BY_POSITION
    padded = source[(None,) * (indexed_dims - source.dim())]
    if all(size == 1 for size in padded.shape[:lead]):
        return None
    index_shape = (count,) if request.index.dtype == torch.bool else tuple(request.index.shape)
    return padded.expand(*index_shape, *padded.shape[lead:]).flatten(0, lead - 1)


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


# ---------------------------------------------------------------------- handlers: grouped matmul


@implements([aten._grouped_mm.default])
def grouped_mm_of_routed_experts(func: OpOverload, types: tuple, args: tuple, kwargs: dict) -> Any:
    """``_grouped_mm(mat_a, mat_b, offs)`` with a 2-D ``mat_a`` and a paged 3-D ``mat_b``, a stack of
    expert matrices (a mixture-of-experts layer: group ``e`` is rows ``offs[e - 1]:offs[e]`` of
    ``mat_a`` times ``mat_b[e]``): fault in only the experts that have rows, one at a time.

    Each expert with rows runs as its own ``_grouped_mm`` of the dense op's shapes: ``mat_a`` of
    as many rows, the expert's rows first (a copy, unless they are first already); ``mat_b`` the
    expert's resident pages (zero-copy where its slots are adjacent) repeated over all the experts
    with a stride of 0; ``offs`` giving every group but the expert's no rows. torch picks a GEMM's
    kernel from those shapes (its tile from the rows per group), and no group's product depends on
    another's, so each expert's rows come out with the dense op's bits; they are copied into one
    result of the dense op's layout (rows past ``offs[-1]`` are unspecified, as in the dense op).
    An expert needs only its own pages resident at once; one larger than the device tier is read
    in chunks, as :meth:`PagedTensor.materialize` reads. Any other form of the op (a 2-D ``mat_b``,
    a 3-D ``mat_a``, no ``offs``, a ``bias``) runs the generic way.

    Note:
        Reads ``offs`` on the host (a sync when it lives on the GPU), as a row gather reads its
        index. Everything is enqueued on the current stream: each expert's op, then the copy of its
        rows; its pages are released after its op.
    """
    routed = _routed_experts(args, kwargs)
    if routed is None:
        return DISPATCHER.run_paged(func, types, args, kwargs)
    mat_a, mat_b, offs, ends = routed
    out_dtype = args[4] if len(args) > 4 else kwargs.get("out_dtype")
    experts = mat_b.shape[0]
    starts = [0, *ends[:-1]]
    routed_experts = [expert for expert in range(experts) if ends[expert] > starts[expert]]
    if not routed_experts:  # no row at all: the dense op's layout, its values unspecified, no page read
        return func(mat_a, _unread_stack(mat_b), torch.zeros_like(offs), out_dtype=out_dtype)
    # Per routed expert, the group ends that give every group but the expert's no rows (one copy).
    group_ends = torch.tensor([[0] * expert + [ends[expert] - starts[expert]] * (experts - expert) for expert in routed_experts],
                              dtype=torch.int32).to(offs.device)  # fmt: skip
    # An expert's rows go first in a buffer of mat_a's layout and of its address's alignment
    # (torch's kernel depends on both: the CPU kernel takes another path for an unaligned mat_a).
    rows_first = _buffer_like(mat_a) if any(starts[expert] for expert in routed_experts) else None
    if rows_first is not None and rows_first.stride() != mat_a.stride():
        return DISPATCHER.run_paged(func, types, args, kwargs)  # mat_a not dense in itself: the generic way
    if _pending_frees:
        drain_pending_frees()
    result = None
    for run, expert in enumerate(routed_experts):
        start, rows = starts[expert], ends[expert] - starts[expert]
        expert_a = mat_a
        if start:
            expert_a = rows_first
            expert_a[:rows].copy_(mat_a[start : start + rows])
        out = _one_expert(func, expert_a, mat_b, expert, group_ends[run], out_dtype)
        if result is None:
            result = torch.empty_like(out)
        result[start : start + rows].copy_(out[:rows])
    return result


def _buffer_like(mat_a: torch.Tensor, alignment: int = 64) -> torch.Tensor:
    """``torch.empty_like(mat_a)`` whose data pointer has ``mat_a``'s offset from an ``alignment``-byte boundary."""
    buffer = torch.empty_like(mat_a)
    shift = mat_a.data_ptr() % alignment
    if shift == 0 or shift % mat_a.element_size():
        return buffer
    shift //= mat_a.element_size()
    flat = torch.empty(buffer.untyped_storage().nbytes() // mat_a.element_size() + shift, dtype=mat_a.dtype, device=mat_a.device)
    return flat.as_strided(buffer.shape, buffer.stride(), shift)


def _one_expert(func: OpOverload, mat_a: torch.Tensor, mat_b: PagedTensor, expert: int, group_ends: torch.Tensor,
                out_dtype: Optional[torch.dtype]) -> torch.Tensor:
    """``func(mat_a, mat_b, group_ends)`` where only ``expert``'s group has rows: its pages resident for
    the call, repeated over ``mat_b``'s experts (stride 0)."""
    matrix = mat_b[expert]
    lo, hi = _byte_span(matrix)
    try:
        window = _Window(matrix._paged, lo, hi)
    except OutOfPagesError:  # an expert larger than the device tier beside the pinned pages
        dense = DISPATCHER.materialize(matrix)
        return func(mat_a, dense.expand(mat_b.shape), group_ends, out_dtype=out_dtype)
    try:
        return func(mat_a, window.dense(matrix).expand(mat_b.shape), group_ends, out_dtype=out_dtype)
    finally:
        window.release()


def _unread_stack(mat_b: PagedTensor) -> torch.Tensor:
    """A stand-in for ``mat_b`` with its layout and no page read: one uninitialized expert repeated
    with a stride of 0, for an op that reads none of it (no rows) or only checks its arguments."""
    return torch.empty_like(meta_like(mat_b)[0], device=mat_b.device).expand(mat_b.shape)


def _routed_experts(args: tuple, kwargs: dict) -> Optional[tuple[torch.Tensor, PagedTensor, torch.Tensor, list[int]]]:
    """``(mat_a, mat_b, offs, offs as a list)`` when ``_grouped_mm``'s ``mat_b`` is a paged stack of
    expert matrices and ``offs`` their groups' row ends (int32, one per expert), else ``None``."""
    mat_a, mat_b = args[0], args[1]
    offs = args[2] if len(args) > 2 else kwargs.get("offs")
    if not isinstance(mat_b, PagedTensor) or mat_b._inner is not None or mat_b.dim() != 3 or mat_b.numel() == 0 or mat_b.is_conj():
        return None
    if not isinstance(mat_a, torch.Tensor) or isinstance(mat_a, PagedTensor) or mat_a.dim() != 2:
        return None
    if not isinstance(offs, torch.Tensor) or isinstance(offs, PagedTensor):
        return None
    if offs.dim() != 1 or offs.numel() != mat_b.shape[0] or offs.dtype != torch.int32:
        # torch's own checks and error, before any page is read (the generic way would materialize
        # the whole stack first: OutOfPagesError where it does not fit the device tier)
        out_dtype = args[4] if len(args) > 4 else kwargs.get("out_dtype")
        torch.ops.aten._grouped_mm.default(mat_a, _unread_stack(mat_b), offs, out_dtype=out_dtype)
        return None  # torch accepted it after all: the generic way
    bias = args[3] if len(args) > 3 else kwargs.get("bias")
    if bias is not None:
        return None  # a bias per expert (torch has no kernel for it yet): the generic way
    ends = offs.tolist()
    starts = [0, *ends[:-1]]
    if any(end < start for start, end in zip(starts, ends)) or ends[-1] > mat_a.shape[0]:
        return None  # offs out of order or past mat_a: torch's own behaviour, the generic way
    return mat_a, mat_b, offs, ends


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
