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
     Nothing faults in. The view-copy ops (``diagonal_copy``, ``select_copy``, ...) are the view
     then ``clone``: only the view's pages fault in.
   * ``_to_copy`` on the pager's device (``t.to(dtype)``, ``t.half()``, ``module.half()``): a new
     PagedTensor on the same pager, filled by ``copy_`` (a piece at a time where it must).
   * dim-0 row gathers (``index_select`` on dim 0, ``embedding``, ``_embedding_bag``, ``index.Tensor``
     with one index tensor on dim 0): only the pages holding the selected rows fault in, run by
     run; and dim-0 row scatters in place (``index_put_`` with one index tensor on dim 0,
     ``t[idx] = v``, with or without ``accumulate``; ``index_copy_``, ``index_add_``,
     ``index_reduce_``, ``index_fill_`` on dim 0; ``embedding_renorm_``, ``masked_scatter_``): only
     the pages holding the written rows fault in, run by run, each run the op on a narrowed view.
   * copies and comparisons of PagedTensors larger than a piece of the device tier: ``clone`` of
     any ``memory_format`` (``t.t().contiguous()``, ``t.t().reshape(-1)``), ``cat`` and ``stack``
     (a plain result of the dense op's layout and promoted dtype, each input copied into its slice),
     ``equal`` and ``allclose`` (the dense op on matching parts, copied to plain tensors): a part of
     pages at a time, whatever the layouts; and ``copy_`` into a plain tensor, the same where the
     elementwise pieces cannot follow the two layouts.
   * whole-tensor reductions whose result does not depend on the elements' order, of a PagedTensor
     larger than a piece: ``max``, ``min``, ``amax`` / ``amin`` over no or all dims, ``aminmax``,
     ``argmax`` / ``argmin`` without ``dim``, ``any``, ``all``, ``count_nonzero`` without ``dim``,
     integer and bool ``sum``: the op on each part of pages, the parts' results combined into the
     dense op's (``reduce_in_parts``). A float ``sum`` is not among them.
   * ``nonzero`` of a PagedTensor larger than a piece, dim 0 outermost: a piece of rows at a time;
     so do ``softmax`` / ``log_softmax`` over the last dim, ``layer_norm``, the scans along the last
     dim and the reflection / replication pads and nearest upsampling, whose kernels compute each
     row from that row alone (:mod:`pagedtensor.handlers.row_wise`).
   * out-of-place scatters (``index_put``, ``masked_scatter``, ``scatter``, ``put``, ...) of a
     PagedTensor larger than a piece: a copy in parts, then the in-place op on it, as torch's
     kernels do (:mod:`pagedtensor.handlers.scatter_copies`).
   * ``_grouped_mm`` over a paged stack of expert matrices (a mixture-of-experts layer): only the
     experts that have rows fault in.
   * ops that read only metadata (``new_*``, ``*_like``, ``is_same_size``,
     ``_has_compatible_shallow_copy_type``): nothing faults in.

2. **Fault in and run dense** (every other op): the pages each PagedTensor argument reaches (its
   byte span ``[storage_offset, last reachable element]``) fault in, once per allocation (where
   that window does not fit and the allocation's arguments lie apart, once per run of overlapping
   arguments: ``torch.dot(t[0], t[-1])`` reads two rows, not the table); the op
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
an op over lists of tensors (``torch._foreach_*``, the fused optimizer steps) runs an index at a time,
and one index a piece at a time where it is elementwise (:mod:`pagedtensor.list_ops`),
and so do ``clone``, ``cat``, ``stack``, ``equal``, ``allclose`` and the whole-tensor reductions above;
and a functional op whose dense kernel is composite (``rot90``, ``slice_scatter``, ``constant_pad_nd``,
...: a ``CompositeExplicitAutograd`` kernel and none of the device's backend) runs that kernel on the
PagedTensors, each op in it paged as above, the dense op's sequence of ops (:func:`_run_composite`).

The handlers of step 1 live in :mod:`pagedtensor.handlers`, one module per kind of op; this module
holds the dispatcher, the op table, windows of resident pages, spans and pages, and the argument
helpers the handlers share, and imports the handlers last, which registers them.

Outside the dispatcher, :func:`paged_linear` runs ``F.linear`` on a PagedTensor weight's pinned pages
directly (what a paged model's ``nn.Linear`` calls), and :func:`paged_conv1d` transformers'
``Conv1D`` (GPT-2's), falling back to the dispatcher where that would be wrong
(:mod:`pagedtensor.handlers.linear`, re-exported here).
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
import time
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Collection, Iterable, Optional, Sequence, Union

import torch
from torch._C import DispatchKey
from torch._ops import OpOverload, OpOverloadPacket
from torch.utils._python_dispatch import return_and_correct_aliasing
from torch.utils._pytree import tree_leaves, tree_map

from pagedtensor.config import normalize_device
from pagedtensor.errors import DeviceTierFullError, OutOfPagesError, PagerClosedError, SlabAllocationError, out_of_pages_for
from pagedtensor.interrupts import deferring, pager_call
from pagedtensor.list_ops import bump_written_versions, refuse_inference_writes, run_list_op
from pagedtensor.outside_transforms import below_transforms_and_modes, in_a_transform_or_mode
from pagedtensor.pager import Pager, PinnedByWaitingThreads, ResidentPages, WrittenPages
from pagedtensor.pieces import NoPieceBesidePins, _raise_torchs_error_on_stand_ins, is_elementwise, pages_reached, run_in_pieces, small_stand_in
from pagedtensor.tensor import (
    MATERIALIZE,
    PagedStorage,
    PagedTensor,
    byte_span,
    dense_and_non_overlapping,
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
# The namespaces of torch.distributed's collective ops (run by :mod:`pagedtensor.handlers.collectives`).
COLLECTIVE_NAMESPACES = frozenset({"c10d", "_c10d_functional"})

_RESIZING_OPS = frozenset({"_resize_output_", "resize_as_sparse_", "sparse_resize_", "sparse_resize_and_clear_"})

# Ops that write arguments their schema does not mark ``(a!)``: batch norm updates its running
# statistics in place in training (CPU: native_batch_norm; CUDA: cudnn_/miopen_batch_norm), and so
# do the composite batch_norm and instance_norm, which reach a PagedTensor whole under inference_mode.
_UNMARKED_WRITES: dict[str, frozenset[str]] = {
    name: frozenset({"running_mean", "running_var"})
    for name in ("native_batch_norm", "_batch_norm_impl_index", "cudnn_batch_norm", "miopen_batch_norm",
                 "batch_norm_update_stats", "batch_norm", "instance_norm")
}


# Ops whose quantized result's quantizer keeps tensor arguments (per-channel scales and zero points).
_KEEPING_QUANTIZERS = frozenset({"quantize_per_channel", "_make_per_channel_quantized_tensor", "_empty_per_channel_affine_quantized"})

# Namespaces of torch's own ops, whose kernels keep no argument beyond what their schemas and
# results show (no aten op returns an opaque object), and of the collectives (run on dense copies);
# an op of any other (``quantized::linear_prepack``'s packed params, a ``torch.library`` op of a
# user's that caches its argument) may keep one, so it runs on private copies (:attr:`OpInfo.keeps_arguments`).
_KEEPS_NO_ARGUMENTS = frozenset({"aten", "prims"}) | COLLECTIVE_NAMESPACES


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
    random: bool
    """The op draws random numbers (torch's ``nondeterministic_seeded`` tag: ``normal_``, ``uniform_``,
    ``bernoulli``, ...): in the order of the dense op's kernel over the whole tensor, which no run in
    pieces follows, so past the tier it raises, its message naming the way round."""
    decomposes: bool
    """The op's only kernel is ``CompositeImplicitAutograd`` (made of other ops), which it reaches us
    whole only below autograd (in inference mode, say). Its schema cannot say what aliases (``to``,
    ``contiguous``, ``reshape`` return a new tensor when they must; ``type_as``, ``dropout`` in eval
    return their input without an alias annotation): when a run on meta tensors returns an argument
    or a view of one, it runs that C++ kernel, as plain tensors do. Not ``OpOverload.decompose``,
    which prefers torch._decomp's Python versions (other bits, other aliasing), nor for ops with a
    backend kernel too (``silu_backward``), which plain tensors run."""
    implicit_composite: bool
    """The op has a ``CompositeImplicitAutograd`` kernel (autograd decomposes it; in inference mode it
    reaches us whole)."""
    foreach_written: frozenset[str]
    """The arguments a ``torch._foreach_*`` op writes, whose versions torch's kernels bump; empty for any other op."""
    collective: bool
    """One of torch.distributed's collectives (:mod:`pagedtensor.handlers.collectives`)."""
    keeps_arguments: bool
    """The op may keep its tensor arguments where no check for views of the device slab reaches: a
    per-channel quantized result (its quantizer keeps the scales and zero points), or any op outside
    torch's own namespaces (an opaque result, ``quantized::linear_prepack``'s packed params; a
    ``torch.library`` op that caches its argument). It runs on gathered copies of
    the PagedTensor arguments, which it may keep: a view of the slab would read other pages' bytes later."""

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
            random=torch.Tag.nondeterministic_seeded in func.tags,
            decomposes=_has_kernel(func, "CompositeImplicitAutograd")
            and not any(_has_kernel(func, key) for key in ("CPU", "CUDA", "CompositeExplicitAutograd")),
            implicit_composite=_has_kernel(func, "CompositeImplicitAutograd"),
            foreach_written=frozenset(name for _, name in written) if schema.name.startswith("aten::_foreach_") else frozenset(),
            collective=func.namespace in COLLECTIVE_NAMESPACES,
            keeps_arguments=func.overloadpacket.__name__ in _KEEPING_QUANTIZERS or func.namespace not in _KEEPS_NO_ARGUMENTS,
        )


def _has_kernel(func: OpOverload, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), key)


# Answers of _returns_an_input by op and argument layouts: a composite op in an inference loop
# meets the same layouts each call, and its meta run costs more than the op's own dispatch.
_RETURNS_AN_INPUT: dict[tuple, Optional[bool]] = {}
_RETURNS_AN_INPUT_LIMIT = 4096
_NOT_REMEMBERED = object()
_KEYABLE = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.memory_format, torch.layout)


def _returns_an_input(func: OpOverload, args: tuple, kwargs: dict) -> Optional[bool]:
    """Whether ``func`` returns one of its PagedTensor arguments or a view of one, remembered per op
    and argument layouts (:func:`_layout_key`); see :func:`_meta_run_returns_an_input`."""
    key = _layout_key(func, args, kwargs)
    if key is not None:
        # One lookup: another thread's op may clear the memory between two (hashing the key runs
        # Python, where threads switch).
        answer = _RETURNS_AN_INPUT.get(key, _NOT_REMEMBERED)
        if answer is not _NOT_REMEMBERED:
            return answer
    answer = _meta_run_returns_an_input(func, args, kwargs)
    if key is not None:
        if len(_RETURNS_AN_INPUT) >= _RETURNS_AN_INPUT_LIMIT:
            _RETURNS_AN_INPUT.clear()
        _RETURNS_AN_INPUT[key] = answer
    return answer


def has_no_strides(value: object) -> bool:
    """Whether ``value`` is a tensor without strides to stand in for (sparse, nested)."""
    return isinstance(value, torch.Tensor) and (value.layout != torch.strided or value.is_nested)


def _layout_key(func: OpOverload, args: tuple, kwargs: dict) -> Optional[tuple]:
    """What a meta run of ``func`` sees: each tensor's layout (and which PagedTensors share an
    allocation), every other value, in their lists; None if a value cannot be a key."""
    allocations: dict[int, int] = {}

    def part(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            if has_no_strides(value):  # (sparse, nested): no key
                raise _NotAKey
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
    run fails (it needed a value, such as narrow's tensor start) or an argument or result has no
    strides (a sparse or nested tensor: no storage to compare)."""
    if any(has_no_strides(t) for t in tree_leaves((args, kwargs))):
        return None
    meta_args, meta_kwargs = tree_map(meta_layout, (args, kwargs))
    try:
        out = func(*meta_args, **meta_kwargs)
    except Exception:  # noqa: BLE001 - e.g. a PagedTensor read as a number (narrow's tensor start)
        return None
    results = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
    if any(has_no_strides(t) for t in results):
        return None
    inputs = {meta_like(t).untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, PagedTensor)}
    return any(t.untyped_storage()._cdata in inputs for t in results)


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

    @deferring
    def dispatch(self, func: Any, types: tuple, args: tuple, kwargs: dict) -> Any:
        """Run ``func`` on arguments containing PagedTensors; see the module docstring for the order."""
        try:
            if not isinstance(func, OpOverload):
                raise NotImplementedError(f"PagedTensor: {func} is not an aten op and is not supported{_describe(args, kwargs)}")
            leaves = _paged_leaves(args, kwargs)
            if any(leaf._inner is not None for leaf in leaves):
                return self._forward_traced(func, leaves, args, kwargs)
            if torch._C._len_torch_dispatch_stack() and _graph_tracing():
                return self._run_on_constants(func, leaves, args, kwargs)
            handler = self.handlers.get(func)
            if handler is view_of_pages:
                return view_of_pages(func, types, args, kwargs, leaves)
            info = self.info(func)
            if info.foreach_written:
                refuse_inference_writes(func, info.foreach_written, args, kwargs)
            if handler is None:
                if info.collective:
                    return run_collective(func, args, kwargs)  # torch.distributed's: on dense copies
                if info.is_view and info.implicit_composite and torch.is_inference_mode_enabled():
                    # A view op autograd decomposes (reshape, flatten, movedim, mT) reaches here whole in
                    # inference mode: decomposed, its views are recorded as views (no arithmetic: the
                    # bits are the same either way), by the ops it is made of, or, where it has a
                    # view-recording kernel of its own (chunk), by that kernel as the op returns.
                    return _decompose(func, args, kwargs, record_views=not _has_kernel(func, "ADInplaceOrView"))
                if func in _CHOOSING_BY_REQUIRES_GRAD and torch.is_inference_mode_enabled() and _any_requires_grad(args):
                    # An op autograd decomposes whose kernel chooses by its operands' requires_grad (matmul
                    # folds a 3-D input only beside operands that do not require grad: other bits), of a
                    # tensor that requires grad (a weight), reaches here whole in inference mode: run dense
                    # on copies that do not, it would choose otherwise than torch. Its C++ kernel runs on
                    # the PagedTensors, as torch runs it on the weight. (Not every composite op: some take
                    # another path for a subclass, ``linalg.svdvals``, and run dense, as torch's results.)
                    return _decompose(func, args, kwargs, as_dense=True)
                result = self.run_generic(func, types, args, kwargs, leaves)
            else:
                try:
                    result = handler(func, types, args, kwargs)
                except _OpTooLarge as error:
                    raise _as_pagers_error(error, func, info, args, kwargs) from error.__cause__
            if info.foreach_written:
                bump_written_versions(func, info.foreach_written, args, kwargs)
            return result
        except PagerClosedError as error:
            if error.subject is not None and error.subject != MATERIALIZE:  # a nested op's, naming it
                raise
            # Which op met the closed pager (a handler's read of an operand whole, a broadcast row or
            # an index_add_ source, names the op, not the read's PagedTensor.materialize), and which pager.
            raise error.met_by(str(func)) from error
        except NoPieceBesidePins as error:  # a handler sizing its parts (cat, copy_): named here, once
            raise DeviceTierFullError(out_of_pages_for(f"{func}: its PagedTensor arguments", error)) from None

    def run_generic(self, func: OpOverload, types: tuple, args: tuple, kwargs: dict, leaves: Optional[list[PagedTensor]] = None) -> Any:
        """Step 2 (:meth:`run_paged`); where the pages do not fit at once, an elementwise op runs a
        piece of pages at a time (:func:`run_in_pieces`), an op over lists of tensors an index at a time
        (:func:`run_list_op`), an op whose dense kernel is composite runs
        that kernel (:func:`_run_composite`), and any other raises the pager's error
        (DeviceTierFullError where the device tier was the bound). What an op without a handler
        runs, and a handler for the forms it leaves to the generic way."""
        try:
            return self.run_paged(func, types, args, kwargs, leaves)
        except _OpTooLarge as error:
            out = run_in_pieces(func, args, kwargs, self.info(func))
            if out is NotImplemented:
                out = run_list_op(func, args, kwargs)
            if out is NotImplemented:
                out = _run_composite(func, args, kwargs)
            if out is NotImplemented and self.info(func).implicit_composite and torch.is_inference_mode_enabled():
                # An op autograd decomposes elsewhere (negative, T.contiguous(), a copying reshape) does
                # not fit whole: decomposed, as outside inference mode, each of its ops runs as any op.
                return _decompose(func, args, kwargs, as_dense=True)
            if out is NotImplemented:
                raise _as_pagers_error(error, func, self.info(func), args, kwargs) from error.__cause__
            return out

    def run_paged(self, func: OpOverload, types: tuple, args: tuple, kwargs: dict, leaves: Optional[list[PagedTensor]] = None) -> Any:
        """Step 2: fault in the pages the PagedTensor arguments reach, run ``func`` dense, write back."""
        info = self.info(func)
        if info.changes_metadata:
            if _resizes_to_own_size(func, args, kwargs) or _changes_no_metadata(func, args, kwargs):
                return args[0]  # torch's resize_ to the current size changes nothing (out= paths call it)
            if func is aten.resize_as_.default and not isinstance(args[0], PagedTensor):
                # A plain tensor takes a PagedTensor's shape (and, with a memory format, its layout):
                # only the template's metadata is read, so a meta stand-in of it serves, no page moves.
                return func(args[0], meta_like(args[1]), *args[2:], **kwargs)
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
        if func in _MATMUL_OUT_FORMS:
            _note_matmul_out(kwargs.get("out"))
        if leaves is None:
            leaves = _paged_leaves(args, kwargs)
        if not info.written and len(leaves) == 1 and not info.keeps_arguments:
            return _read_one(func, args, kwargs, leaves[0])
        written = _written_leaves(info, args, kwargs) if info.written else []

        # One window of resident pages per allocation, over the union of its arguments' spans.
        groups: dict[int, _Group] = {}
        for leaf in leaves:
            lo, hi = byte_span(leaf)
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
        if info.keeps_arguments:
            for group in groups.values():
                group.private = True
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
        written: list[PagedTensor], groups: dict[Any, "_Group"], discard: dict[int, list[int]],
        group_of_leaf: Optional[dict[int, "_Group"]] = None,
    ) -> Any:  # fmt: skip
        """The rest of :meth:`run_paged`: open one window per allocation, run ``func`` on dense views,
        write back what it wrote and release the windows. Where the windows do not fit together and
        an allocation's arguments reach bytes far apart (``torch.dot(t[0], t[-1])``), it runs again
        with one window per run of overlapping arguments (:func:`_groups_apart`; ``group_of_leaf``
        then maps each argument to its window's group)."""
        opened: list[_Group] = []
        # An overwritten allocation's window opens last: until its release the pages it overwrites
        # keep their host copies, which the other windows' faults then need not make room around.
        order = sorted(groups.values(), key=lambda group: id(group.storage) in discard) if discard else groups.values()
        try:
            if len(groups) > 1 and group_of_leaf is None:  # (windows apart may share a page, pinned once)
                _refuse_windows_past_the_tier(groups.values())
            _open_windows(order, discard, opened)
        except OutOfPagesError as error:
            _release_all(opened)
            if isinstance(error, PinnedByWaitingThreads) and opened:
                # A later window refused while other threads, each waiting for room, pin the tier
                # (hold-and-wait): every window again after a wait, or the refusal to raise (none open).
                # (``error``, not a name of its own: the handler's end drops it, no frame-traceback cycle.)
                failed = len(opened)
                opened.clear()
                error = _open_windows_after_waits(list(order), failed, discard, error, opened)
            if error is not None:
                if isinstance(error, SlabAllocationError):  # the machine's memory, not the op's size: raised as it is
                    raise error
                apart = None if discard or group_of_leaf is not None else _groups_apart(groups)
                if apart is not None:
                    apart_groups, group_of_leaf = apart
                    return self._run_in_windows(func, info, args, kwargs, leaves, written, apart_groups, discard, group_of_leaf)
                raise _too_many_pages(func, error) from error
        except BaseException:
            _release_all(opened)
            raise

        dense: dict[int, torch.Tensor] = {}
        # An op that may resize what it writes (addbmm_ resizes a self of the wrong shape) sees the
        # allocations it writes through views that cannot grow past their window into other tensors'
        # slots: every view of one allocation over one storage, so torch's overlap checks still see them.
        # So does an op with a sparse argument: torch's CPU kernel adding a coalesced sparse tensor into
        # a dense one counts the dense storage offset twice, which on a view of the slab lands in
        # another allocation's slot; a bounded view's offset counts from the window, as a plain tensor's.
        bounded = {id(leaf._paged) for leaf in written} if written and (not info.elementwise or _has_sparse_tensor(args, kwargs)) else ()
        try:
            for leaf in leaves:
                group = groups.get(id(leaf._paged)) if group_of_leaf is None else group_of_leaf.get(id(leaf))
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
                    raise resize_refused(func, leaf.shape, view.shape, args, kwargs)
                if view.is_conj() != leaf.is_conj() or view.is_neg() != leaf.is_neg():  # math_bits, inline: per written leaf
                    # The kernel flipped its output's conjugate or negative bit in place (linalg_lu_solve.out
                    # with left=False sets the conjugate bit of a complex out=): the bytes hold the values
                    # under the view's new bits, the PagedTensor keeps its own, so its bytes are rewritten.
                    values = view.resolve_conj().resolve_neg().clone()
                    with_math_bits(view, math_bits(leaf)).copy_(values)
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
                    group.window.write_back(*byte_span(leaf))
        except BaseException:  # a KeyboardInterrupt in a long write-back: the pages may hold part of it
            _release_all(opened, written_back=True)
            raise
        _release_windows(opened)
        return out

    def materialize(self, tensor: PagedTensor, device: Union[str, torch.device, None] = None) -> torch.Tensor:
        """A new dense tensor with ``tensor``'s values, size and strides; see :meth:`PagedTensor.materialize`.
        A traced tensor's (compiled, exported) is a copy of its inner tensor, an op of the trace
        (under its modes); a tensor of pages' is read by the pager (outside any mode or transform)."""
        if tensor._inner is not None:
            inner = tensor._inner
            return inner.clone() if device is None else inner.to(device, copy=True)
        return self._materialize_pages(tensor, device)

    @pager_call  # inside a torch.func transform: a constant of it, as a captured tensor is
    def _materialize_pages(self, tensor: PagedTensor, device: Union[str, torch.device, None] = None) -> torch.Tensor:
        """:meth:`materialize` of a tensor of pages."""
        target = normalize_device(tensor.device if device is None else torch.device(device))
        lo, hi = byte_span(tensor)
        if lo == hi:
            return torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device=target)
        storage = tensor._paged
        pager = storage.pager
        data = None
        first, stop = storage.allocation.page_range(lo, hi)
        if target == normalize_device(pager.device) and stop - first <= pager.device_tier.capacity_pages:
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
        # The values a conjugated or negated view reads (the pages hold the others): negated, then
        # conjugated, as clone() resolves them (NaNs' zeros differ the other way).
        if tensor.is_neg():
            values.neg_()
        if tensor.is_conj():
            values.conj_physical_()
        return values.as_strided(tensor.shape, tensor.stride(), 0)

    def _run_on_constants(self, func: OpOverload, leaves: list[PagedTensor], args: tuple, kwargs: dict) -> Any:
        """An op on PagedTensors a traced function captures (:func:`_graph_tracing`): run on dense
        copies of their values, made with the tracing modes off, so the graph records the op on
        those copies as constants, as it does for a captured plain tensor, and none of the pager's
        own ops (a fault-in's copy into a device slot, replayed later into another page's slot). A
        write to one raises: the graph would replay it into the copy, never the pages."""
        written = _written_leaves(self.info(func), args, kwargs)
        if written:
            raise NotImplementedError(
                f"PagedTensor: {func} writes a PagedTensor that a function traced (make_fx, torch.func.linearize, "
                f"export) captures; the graph holds a copy of its values, so the write would never reach the "
                f"pages. Pass it to the traced function as an input, or write outside it{_describe(args, kwargs)}"
            )
        with torch.utils._python_dispatch._disable_current_modes():
            constants = {id(leaf): leaf.materialize() for leaf in leaves}  # fresh copies of their layouts
        constant_args, constant_kwargs = _substitute(args, kwargs, constants)
        return func(*constant_args, **constant_kwargs)

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
        if func is aten._conj.default and not args[0].dtype.is_complex:
            # Dynamo making a fake of a real view with the negative bit (t.conj().imag) replays its
            # view ops on the input: view_as_real, then _conj of that real view, which fails inside
            # torch with an internal assert.
            raise NotImplementedError(
                "PagedTensor: a real view with the negative bit (t.conj().imag of a complex PagedTensor) cannot enter "
                "a compiled function: Dynamo replays its view ops as view_as_real then _conj, which torch refuses for "
                "a real tensor. Pass it as .resolve_neg() (a copy of its values), or the complex tensor itself"
            )
        inner = {id(leaf): leaf._inner if leaf._inner is not None else leaf._dense for leaf in leaves}
        inner_args, inner_kwargs = _substitute(args, kwargs, inner)
        out = func(*inner_args, **inner_kwargs)
        if info.is_view:
            out = _map_tensors(out, PagedTensor._from_inner)
            source = args[0]
            if isinstance(source, PagedTensor) and _is_functional(source._inner):
                # AOT autograd traces: remember the graph input a view views (see _check_returnable).
                root = source._view_root or (source.dtype, None, (tuple(source.shape), source.stride(), source.storage_offset()),
                                             math_bits(source))  # fmt: skip

                def note_root(view: PagedTensor) -> None:
                    changes = view.dtype != source.dtype or math_bits(view) != math_bits(source)
                    view._view_root = (root[0], func if changes else root[1], root[2], root[3])

                _map_tensors(out, note_root)
        return return_and_correct_aliasing(func, args, kwargs, out)


def _graph_tracing() -> bool:
    """Whether a graph is being traced (``make_fx``'s proxy mode is on the dispatch mode stack:
    ``torch.func.linearize``, ``make_fx``, export): a PagedTensor reaching ``__torch_dispatch__``
    then is one the traced function captures, not an input (the mode traces inputs itself)."""
    from torch.fx.experimental.proxy_tensor import ProxyTorchDispatchMode
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    return any(isinstance(mode, ProxyTorchDispatchMode) for mode in _get_current_dispatch_mode_stack())


def _is_functional(inner: Optional[torch.Tensor]) -> bool:
    """Whether a traced tensor's inner tensor is AOT autograd's (functionalized tracing)."""
    from torch._subclasses.functional_tensor import FunctionalTensor

    return isinstance(inner, FunctionalTensor)


def _read_one(func: OpOverload, args: tuple, kwargs: dict, leaf: PagedTensor) -> Any:
    """The common case of step 2, kept short: an op that reads one PagedTensor and writes none."""
    lo, hi = byte_span(leaf)
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


def _refuse_windows_past_the_tier(groups: Iterable[_Group]) -> None:
    """Raise the pager's DeviceTierFullError where the windows of ``groups`` hold more pages in all
    than their pager's device tier, before any opens: each may fit alone, and the first would be
    faulted in whole only to be let go when a later one cannot join it (the op then runs a piece at
    a time, reading it again)."""
    pages: dict[Pager, int] = {}
    for group in groups:
        pager = group.storage.pager
        size = pager.page_size
        pages[pager] = pages.get(pager, 0) + -(-group.hi // size) - group.lo // size  # its byte span's pages
    for pager, count in pages.items():
        if count > pager.device_tier.capacity_pages:
            raise pager.larger_than_the_device_tier(count)


def _groups_apart(groups: dict[Any, _Group]) -> Optional[tuple[dict[Any, _Group], dict[int, _Group]]]:
    """The groups of an op cut where an allocation's arguments reach bytes far apart: one group per
    run of arguments whose byte spans overlap (``t[:4]`` and ``t[-4:]`` two, ``t`` and ``t[2]`` one),
    each with the written arguments among its own; and the group of each argument. None where no
    allocation's arguments fall apart so, or the runs' windows would hold no fewer pages than the
    union's. Arguments whose bytes do not overlap cannot see each other's writes through memory, so
    the op's values are those of one window: a page two runs share is pinned by both windows, and a
    gathered window writes back only the bytes of its own written arguments."""
    apart: dict[Any, _Group] = {}
    group_of_leaf: dict[int, _Group] = {}
    cut = False
    for key, group in groups.items():
        spans = sorted(((*byte_span(leaf), index) for index, leaf in enumerate(group.leaves)), key=lambda span: span[:2])
        runs: list[_Group] = []
        for lo, hi, index in spans:
            leaf = group.leaves[index]
            if runs and lo < runs[-1].hi:
                runs[-1].add(lo, hi, leaf)
            else:
                runs.append(_Group(group.storage, lo, hi, leaf))
        page_size = group.storage.allocation.page_size
        # Pages the runs' windows hold in all, a page two runs share once (it takes one slot, pinned
        # by both: rows of 1 KiB side by side are runs of their own, four to a page).
        pages = len(set().union(*(range(run.lo // page_size, -(-run.hi // page_size)) for run in runs)))
        if len(runs) > 1 and pages < -(-group.hi // page_size) - group.lo // page_size:
            cut = True
        else:
            runs = [_Group(group.storage, group.lo, group.hi, group.leaves[0])]
            runs[0].leaves = list(group.leaves)
        for number, run in enumerate(runs):
            run.private = group.private
            run.written = [leaf for leaf in group.written if any(leaf is member for member in run.leaves)]
            apart[(key, number)] = run
            for leaf in run.leaves:
                group_of_leaf[id(leaf)] = run
    return (apart, group_of_leaf) if cut else None


class _Window:
    """Pages holding bytes ``[lo, hi)`` of an allocation, resident and pinned, as one uint8 tensor.

    When the pages sit in adjacent device slots (and the window is not ``private``) the window is
    zero-copy: :meth:`dense` views the slab itself and ``buf`` (made on first use) is a view of
    the slots. Otherwise ``buf`` is a temporary the runs are gathered into, and :meth:`write_back`
    scatters written bytes back; made with ``gather=False`` it has no ``buf``, and only
    :meth:`copy_into` reads it.
    """

    __slots__ = ("resident", "tier", "page_size", "first_byte", "nbytes", "runs", "gathered", "slab", "slab_byte", "slab_span", "_buf",
                 "_bounded", "_bounded_slab")  # fmt: skip

    def __init__(self, storage: PagedStorage, lo: int, hi: int, discard: Iterable[int] = (), private: bool = False,
                 gather: bool = True, prefetch: bool = True) -> None:
        allocation = storage.allocation
        self.page_size = page_size = allocation.page_size
        first, stop = lo // page_size, -(-hi // page_size)
        self.first_byte = first * page_size
        self.resident: ResidentPages = storage.pager.ensure_resident(allocation, first, stop, discard=discard, prefetch=prefetch)
        try:
            self.resident.wait()
            self.tier = tier = storage.pager.device_tier
            self.nbytes = self.resident.nbytes
            first_slot = self.resident.first_slot
            if first_slot is not None and not private:
                self.gathered = False
                self.slab, slot_in_slab = divmod(first_slot, tier.slab_pages)
                self.slab_byte = slot_in_slab * page_size  # where byte ``first_byte`` sits in the slab
                self.slab_span = self._of_the_open_pager(lambda: tier.slab_spans[self.slab])
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
            slab = self._of_the_open_pager(lambda: self.tier.slabs[self.slab])
            self._buf = slab[self.slab_byte : self.slab_byte + self.nbytes]
        return self._buf

    def _of_the_open_pager(self, read: Callable[[], Any]) -> Any:
        """``read()`` of the device tier's slab tables; where another thread closed the pager
        meanwhile (its slabs are gone: an IndexError), its PagerClosedError."""
        try:
            return read()
        except IndexError:
            self.resident.pager._check_open()
            raise

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
        if type(tensor) is not torch.Tensor and _is_fake(tensor):
            return False  # a FakeTensorMode's result (real inputs allowed): no memory, in no slab
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
        its conjugate and negative bits; see :meth:`_dense_view` for ``bounded``. An empty tensor
        reaches no byte: an empty tensor of its layout (its offset may lie outside the window,
        spanned by its allocation's other arguments: ``torch.cat([t[10:10], t[8000:8002]])``)."""
        if tensor.numel() == 0:
            return _empty_like_leaf(tensor)
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
        try:
            if bounded:
                slab = self.tier.slabs[self.slab]
                if self._bounded is None:
                    self._bounded = torch._C._construct_storage_from_data_pointer(slab.data_ptr() + self.slab_byte, slab.device, self.nbytes)
                    # That storage does not own its memory: the window keeps the slab alive while it lives
                    # (the pager closed by another thread drops its own reference).
                    self._bounded_slab = slab
                with below_transforms_and_modes() if in_a_transform_or_mode() else contextlib.nullcontext():
                    # A real view of the real slab, also under a dispatch mode (a FakeTensorMode's empty
                    # is a fake tensor on "meta", which set_ to the slab's storage refused).
                    view = torch.empty(0, dtype=tensor.dtype, device=slab.device)
                    return view.set_(self._bounded, tensor._offset - self.first_byte // itemsize, tensor.shape, tensor.stride())
            # Slabs and pages are whole multiples of every itemsize (a page is a power of two >= 4 KiB).
            typed = self.tier.typed_slab(self.slab, tensor.dtype)
        except IndexError:
            self.resident.pager._check_open()  # closed by another thread meanwhile: its slabs are gone
            raise
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


def _open_windows(order: Collection[_Group], discard: dict[int, list[int]], opened: list[_Group]) -> None:
    """Open (pin) each group's window in ``order``, appending each to ``opened`` as it opens (for the
    caller to release where a later one is refused). Only the last window prefetches: see
    :meth:`Pager.ensure_resident`'s ``prefetch``."""
    last = len(order) - 1
    for index, group in enumerate(order):
        group.window = _Window(group.storage, group.lo, group.hi, discard.get(id(group.storage), ()), group.private,
                               prefetch=index == last)  # fmt: skip
        opened.append(group)


def _open_windows_after_waits(
    order: list[_Group], failed: int, discard: dict[int, list[int]], error: PinnedByWaitingThreads, opened: list[_Group],
) -> Optional[OutOfPagesError]:  # fmt: skip
    """Open the windows of ``order`` (appending each to ``opened``) once more, after the first try
    opened them up to window ``failed``, which was refused with ``error``, and let them go.

    The refusal came because other threads pin the device tier, each waiting for room itself:
    thread 1 holding its op's first window and waiting for room for its second, thread 2 the same,
    each would wait for the other for ever (hold-and-wait), and the pager refused the last to come.
    Let go, the other thread's op goes on; this one waits for a release on the refused window's
    pager (:meth:`Pager.wait_to_pin_again`, at once where the windows fit now) and opens every
    window again, first among the requests of other threads until it has. Refused so again, it
    lets go and waits again, up to ``pin_wait_s`` after the first refusal in all.

    Returns None with every window open, else the refusal to raise, nothing open: where this
    thread's own pins leave the windows too little room, no other thread's pins may go, or the
    time is up (any other refusal of a window: that one)."""
    started = error.since
    try:
        while True:
            pager = order[failed].storage.pager
            ranges = [
                (group.storage.allocation.id, group.lo // group.storage.allocation.page_size,
                 -(-group.hi // group.storage.allocation.page_size))
                for group in order if group.storage.pager is pager
            ]  # fmt: skip
            deadline = started + pager.config.pin_wait_s
            try:
                if not pager.wait_to_pin_again(ranges, deadline):
                    if time.monotonic() >= deadline:
                        return DeviceTierFullError(f"{error}; waited {time.monotonic() - started:.3f} s for other threads' pins")
                    return error
                _open_windows(order, discard, opened)
                return None
            except PinnedByWaitingThreads as refused:  # another thread took the room meanwhile: let go, wait again
                _release_all(opened)
                failed = len(opened)
                opened.clear()
                error = refused
            except OutOfPagesError as refused:
                _release_all(opened)
                opened.clear()
                return refused
            except BaseException:
                _release_all(opened)
                opened.clear()
                raise
            finally:
                pager.done_pinning_again()
    finally:
        error = None  # noqa: F841 - returned or raised already: no frame-traceback cycle keeping the op's tensors


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


_COMPOSITE_KEYS = (DispatchKey.CompositeExplicitAutograd, DispatchKey.CompositeExplicitAutogradNonFunctional)


# Composite ops whose kernels choose by their operands' requires_grad (``at::matmul``'s fold of a 3-D
# input, which ``linear`` and the RNN layers' cells reach), and the RNN ops running them.
_CHOOSING_BY_REQUIRES_GRAD = frozenset({
    aten.linear.default, aten.matmul.default, aten.bilinear.default,
    aten.rnn_tanh.input, aten.rnn_tanh.data, aten.rnn_relu.input, aten.rnn_relu.data,
    aten.gru.input, aten.gru.data, aten.lstm.input, aten.lstm.data,
})  # fmt: skip


def _any_requires_grad(args: tuple) -> bool:
    """Whether a tensor among ``args`` (or in a list among them: an RNN's weights) requires grad."""
    for value in args:
        if isinstance(value, torch.Tensor):
            if value.requires_grad:
                return True
        elif type(value) in (list, tuple) and any(isinstance(item, torch.Tensor) and item.requires_grad for item in value):
            return True
    return False


def _decompose(func: OpOverload, args: tuple, kwargs: dict, record_views: bool = True, as_dense: bool = False) -> Any:
    """``func``'s composite kernel on the PagedTensors, as autograd runs it outside inference mode: each
    op in it dispatched from the top, through ADInplaceOrView (which records the views of normal
    tensors and bumps versions; torch's Python fallback turned it off for this call), unless not
    ``record_views`` (``func``'s own ADInplaceOrView kernel records its results as views as it
    returns: recorded twice, a view raised "already had autograd metadata").

    With ``as_dense`` (an op computing values), the kernel is torch's C++ one, which a dense tensor
    runs, not ``func.decompose()``'s choice of torch._decomp's Python decomposition where one is
    registered (``upsample_bilinear2d.vec``, ``lstm.input``: other arithmetic, other bits, other
    dropout masks). A view op takes ``func.decompose()``: no arithmetic, and its Python
    decompositions read index tensors through ops (``tensor_split``'s C++ kernel reads a CPU
    indices tensor by pointer, which a PagedTensor has not)."""
    decompose = functools.partial(func._op_dk, DispatchKey.CompositeImplicitAutograd) if as_dense else func.decompose
    if not record_views:
        return decompose(*args, **kwargs)
    with torch._C._SetExcludeDispatchKeyGuard(DispatchKey.ADInplaceOrView, False):
        return decompose(*args, **kwargs)


def _composite_kernel(func: OpOverload, device: torch.device) -> Optional[DispatchKey]:
    """The composite key whose kernel a dense tensor on ``device`` runs for ``func``: a functional op
    (no argument written) with a ``CompositeExplicitAutograd`` (or ``...NonFunctional``) kernel and no
    kernel of ``device``'s own backend, so the dense op is that kernel's sequence of ops; else None."""
    if func._schema.is_mutable or device.type not in ("cpu", "cuda"):
        return None
    name = func.name()
    if torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA" if device.type == "cuda" else "CPU"):
        return None
    return next((key for key in _COMPOSITE_KEYS if torch._C._dispatch_has_kernel_for_dispatch_key(name, key)), None)


def _run_composite(func: OpOverload, args: tuple, kwargs: dict) -> Any:
    """``func``, whose pages do not fit at once, as the dense op runs it where its kernel is composite
    (:func:`_composite_kernel`: ``rot90``, ``slice_scatter``, ``constant_pad_nd``, ...): that kernel on the
    PagedTensors, each op in it dispatched as any op on them (a piece at a time where it runs so),
    so the result has the dense op's bits. ``NotImplemented`` where no such kernel exists, an op in
    it does not fit either or is not supported on a PagedTensor, or a kernel in it reads a
    PagedTensor's memory itself (``convolution``'s backends: the caller raises the op's own error);
    torch's other errors from the kernel pass through."""
    leaves = _paged_leaves(args, kwargs)
    key = _composite_kernel(func, leaves[0].device) if leaves else None
    if key is None:
        return NotImplemented
    try:
        return func._op_dk(key, *args, **kwargs)
    except SlabAllocationError:
        raise
    except (OutOfPagesError, NotImplementedError):
        return NotImplemented
    except RuntimeError as error:
        if any(words in str(error) for words in _READ_A_PAGED_TENSORS_MEMORY):
            return NotImplemented  # a kernel in it read a PagedTensor's memory itself (convolution's backends)
        raise


# torch's errors where a kernel reads the memory of a tensor without storage (a PagedTensor), and
# Triton's (a custom op's kernel: its interpreter's, and PagedTensor.data_ptr's own on a GPU).
_READ_A_PAGED_TENSORS_MEMORY = ("data is not allocated", "doesn't have storage", "invalid python storage", "PagedTensor.data_ptr:")


_INTERNAL_OVERLAP = (
    "unsupported operation: more than one element of the written-to tensor refers to a single memory location. "
    "Please clone() the tensor before performing the operation."
)


def _is_fake(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a FakeTensor (its data pointer is no memory's: reading it warns)."""
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(tensor)


def overlaps_itself(tensor: torch.Tensor) -> bool:
    """Whether some elements of ``tensor`` share memory (a dim of stride 0: ``t.expand(2, n)``), as
    torch's kernels test a written tensor; read from the layout alone (no page)."""
    return torch._debug_has_internal_overlap(meta_like(tensor) if isinstance(tensor, PagedTensor) else tensor) == 1


def refuse_internal_overlap(func: OpOverload, written: torch.Tensor) -> None:
    """torch's error for a written tensor whose elements overlap each other, as torch's kernels raise it."""
    if overlaps_itself(written):
        raise RuntimeError(f"PagedTensor: {func}: {_INTERNAL_OVERLAP}")


OVERLAP_WITH_INPUT = (
    "unsupported operation: some elements of the input tensor and the written-to tensor refer to a single memory "
    "location. Please clone() the tensor before performing the operation."
)


def torchs_overlap_status(a: torch.Tensor, b: torch.Tensor) -> Optional[str]:
    """torch's ``at::get_overlap_status`` of two tensors, read from their layouts (no page):
    ``"full"`` for the very tensor, or the same bytes in the same strides; ``"partial"`` for bytes
    that meet otherwise; ``None`` where they share none, or where torch finds it too hard to tell and
    lets them be (one is empty, or not dense without overlap of its own). Memory is shared only
    within one storage (one allocation for PagedTensors)."""
    if a is b:
        return "full"
    if a.numel() == 0 or b.numel() == 0 or isinstance(a, PagedTensor) != isinstance(b, PagedTensor):
        return None
    if not (dense_and_non_overlapping(a.shape, a.stride()) and dense_and_non_overlapping(b.shape, b.stride())):
        return None
    if isinstance(a, PagedTensor):
        if a.allocation is None or a.allocation is not b.allocation:
            return None
        a_start, b_start = a._offset * a.dtype.itemsize, b._offset * b.dtype.itemsize
    else:
        if a.device != b.device or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
            return None
        a_start, b_start = a.data_ptr(), b.data_ptr()
    a_end, b_end = a_start + a.nbytes, b_start + b.nbytes
    if (a_start, a_end) == (b_start, b_end):
        return "full" if a.stride() == b.stride() else "partial"
    return "partial" if a_start < b_end and b_start < a_end else None


def refuse_overlap_with_input(func: OpOverload, written: torch.Tensor, read: Any) -> None:
    """torch's error for a written tensor sharing memory with an input (``at::assert_no_overlap``:
    a full or partial overlap, :func:`torchs_overlap_status`)."""
    if isinstance(read, torch.Tensor) and read.layout == torch.strided and torchs_overlap_status(written, read) is not None:
        raise RuntimeError(f"PagedTensor: {func}: {OVERLAP_WITH_INPUT}")


def _torchs_overlap_error(func: OpOverload, args: tuple, kwargs: dict, written: list[PagedTensor]) -> Optional[RuntimeError]:
    """torch's error for an op writing a PagedTensor whose elements overlap each other
    (``t.expand(2, n).add_(1)``), where the op's kernel raises it: found by running that kernel on
    stand-ins holding no memory (each tensor a zero-stride view of one element), as torch checks
    the written tensor before computing. None where the layouts overlap nowhere or the kernel raises
    no such error (``triu_`` and ``fill_`` write an expanded tensor as any other; they then compute
    on the one element, a cost paid on this error path only)."""
    if not any(map(overlaps_itself, written)):
        return None

    def stand_in(value: Any) -> Any:  # every tensor, so that nothing the op writes is a caller's
        if isinstance(value, torch.Tensor) and value.layout == torch.strided:
            return torch.empty((), dtype=value.dtype, device=value.device).expand(value.shape)
        return value

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            func(*(stand_in(value) for value in args), **{name: stand_in(value) for name, value in kwargs.items()})
    except RuntimeError as error:
        if "single memory location" in str(error):
            return RuntimeError(f"PagedTensor: {func}: {error}")
    except Exception:  # noqa: BLE001 - any other complaint of the stand-ins: the pager's error stands
        pass
    return None


_SCANS = frozenset({aten.cumsum, aten.cumsum_, aten.cumprod, aten.cumprod_, aten.cummax, aten.cummin, aten.logcumsumexp,
                    aten._logcumsumexp})  # fmt: skip
"""Scans, whose kernels refuse some dtypes (``cummax`` of a complex tensor, ``logcumsumexp`` of an int
one) and whose meta kernels do not: :func:`_torchs_dtype_error` checks them as it checks reductions."""


def _torchs_dtype_error(func: OpOverload, info: OpInfo, args: tuple, kwargs: dict) -> Optional[Exception]:
    """torch's error for an elementwise op, a reduction or a ``torch._foreach_*`` op that refuses its
    operands' dtypes (``gt`` or ``clamp`` of a complex tensor, ``gcd`` of a float one, a float result
    into an int ``out=`` or in place into an int tensor; ``mean`` or ``std`` of an int tensor, ``sum``
    of a float8 one, ``_foreach_max`` of a complex one, ``_foreach_powsum`` of an int one), which
    its kernel raises whatever the size: within the tier, or in pieces, the kernel raises it itself;
    where the pieces cannot follow the layout (a row wider than a piece) they stop before any kernel
    runs. Found by running that kernel on small stand-ins of each tensor (their dtypes, devices and
    dims, so every ``dim`` argument stands: :func:`~pagedtensor.pieces._raise_torchs_error_on_stand_ins`),
    on the error path only. None for any other op, a random one (it would draw from the caller's
    generator), or one the stand-ins run without complaint."""
    if info.random or not (info.elementwise or torch.Tag.reduction in func.tags or func._schema.name.startswith("aten::_foreach_")
                           or func.overloadpacket in _SCANS):  # fmt: skip
        return None
    try:
        _raise_torchs_error_on_stand_ins(func, args, kwargs)
    except Exception as error:  # noqa: BLE001 - torch's own complaint about the operands, for the caller
        return error
    return None


# Random ops whose argument checks a stand-in run finds (:func:`_torchs_random_argument_error`):
# fills of ``self`` alone, and ``multinomial`` (on one row).
_RANDOM_FILLS = frozenset(
    getattr(packet, name)
    for packet in (aten.uniform_, aten.normal_, aten.bernoulli_, aten.exponential_, aten.geometric_, aten.cauchy_,
                   aten.log_normal_, aten.random_)
    for name in packet.overloads()
)  # fmt: skip


def _draws_a_new_tensor_from_self(func: OpOverload) -> bool:
    """Whether ``func`` is a functional random op that takes a generator (``normal`` of a mean
    tensor, ``bernoulli``, ``poisson``, ``_standard_gamma``): it writes no argument, so its kernel is
    safe on a one-element stand-in of ``self`` (its result, one element, is dropped)."""
    schema = func._schema
    return not schema.is_mutable and any(argument.name == "generator" for argument in schema.arguments)


def _torchs_random_argument_error(func: OpOverload, args: tuple, kwargs: dict) -> Optional[Exception]:
    """torch's error for a random op's arguments (``uniform_(2, 1)``, ``bernoulli_(1.5)``,
    ``random_(5, 5)``, ``multinomial`` of a 3-D input or of more samples than categories), which its
    kernel checks before it draws (a dtype it has no kernel for too: ``normal`` or ``bernoulli`` of an
    int tensor): found by running that kernel on a small stand-in with a generator of its own, so
    that no number is drawn from the caller's. Only where the kernel is safe on it: a fill whose one
    tensor is ``self`` (filled as one element), a functional op whose one tensor is ``self``
    (:func:`_draws_a_new_tensor_from_self`, on one element) and ``multinomial`` (one row of ones over
    the input's categories, in as many dims).
    None where the kernel takes the arguments (the pager's error stands; a check of the values, as
    ``multinomial``'s of its probabilities, is not made) and for every other random op (a kernel
    that writes a tensor other than ``self``, as ``rrelu``'s noise, may assume it full-size)."""
    tensors = [value for value in tree_leaves((args, kwargs)) if isinstance(value, torch.Tensor)]
    if (func in _RANDOM_FILLS or _draws_a_new_tensor_from_self(func)) and len(tensors) == 1 and tensors[0] is args[0]:
        self = args[0]
        stand_in = torch.zeros((1,) * self.dim(), dtype=self.dtype, device=self.device)
    elif func is aten.multinomial.default and len(tensors) == 1 and tensors[0] is args[0] and args[0].layout == torch.strided:
        # One row of its categories: the kernel makes temporaries of its input's size.
        probabilities = args[0]
        shape = (*(1,) * (probabilities.dim() - 1), probabilities.shape[-1]) if probabilities.dim() else ()
        stand_in = torch.ones(shape, dtype=probabilities.dtype, device=probabilities.device)
    else:
        return None
    # A generator of its own, where the caller's would go (by position or by name).
    position = next(index for index, argument in enumerate(func._schema.arguments) if argument.name == "generator")
    stand_in_args, stand_in_kwargs = [stand_in, *args[1:]], dict(kwargs)
    if position < len(stand_in_args):
        stand_in_args[position] = torch.Generator(device=stand_in.device)
    else:
        stand_in_kwargs["generator"] = torch.Generator(device=stand_in.device)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            func(*stand_in_args, **stand_in_kwargs)
    except (RuntimeError, ValueError, NotImplementedError) as error:
        return type(error)(f"PagedTensor: {func}: {error}")
    except Exception:  # noqa: BLE001 - any other complaint of the stand-in: the pager's error stands
        pass
    return None


def _fresh_meta_stand_in(value: Any) -> Any:
    """A tensor as a new meta tensor of its shape, strides, dtype and math bits (its own storage, so
    an op that resizes or writes it touches no PagedTensor's cached meta view); anything else as it is."""
    if isinstance(value, torch.Tensor):
        return with_math_bits(torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta"), math_bits(value))
    return value


def _cpu_stand_in(value: Any) -> Any:
    """A tensor as a CPU tensor for :func:`torchs_argument_error`'s run of torch's kernel: a
    PagedTensor a zero of its dtype broadcast to its shape (``expand``: one element of memory, no
    page read), a plain tensor a CPU copy of its values (an index or ``offs`` may be checked by value;
    a copy, so that nothing the op writes is the caller's); anything else as it is."""
    if isinstance(value, PagedTensor):
        return with_math_bits(torch.zeros((), dtype=value.dtype).expand(value.shape), math_bits(value))
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    return value


def torchs_argument_error(op: Callable[..., Any], args: tuple, kwargs: dict, dtypes: bool = False) -> Optional[Exception]:
    """torch's own error where ``op`` refuses its arguments' shapes (``mm`` of ``3x30`` by
    ``32x512``, ``nonzero_static`` of a negative ``size``, ``split_copy`` into outputs of the wrong
    shape), for an op about to raise the pager's error past the tier: within the tier the kernel
    raises it on the dense views, past it no kernel runs, and the README promises torch's error for
    bad input. On the error path only, never a resident run's. ``op`` an aten op or a function of
    them (:func:`~pagedtensor.handlers.linear.paged_linear`'s ``F.linear``).

    1. ``op`` on new meta tensors of the arguments' layouts (:func:`_fresh_meta_stand_in`): torch's
       shape checks, no memory. A meta kernel that is missing, or needs values (``NotImplementedError``,
       or its message names meta tensors: ``item``, ``nonzero``), says nothing: None.
    2. Where the meta kernel raises, its wording is often not the kernel's (``a and b must have same
       reduction dim`` for ``mat1 and mat2 shapes cannot be multiplied``), so torch's CPU kernel runs
       on :func:`_cpu_stand_in` stand-ins (PagedTensors as zeros broadcast to their shapes: no page read) and
       its error is returned, unless it is about the stand-ins' broadcast layout rather than the
       caller's (:func:`_unless_the_stand_ins`). Where the CPU kernel
       takes them (a meta kernel stricter than it: ``_grouped_mm``'s bf16 check) the pager's error
       stands: None (that run computed the op on zeros, a cost paid on this error path only).
    3. With ``dtypes`` (an op taking no sizes, only tensors: ``mm``, ``F.linear``, whose meta
       kernels do not check dtypes), where the meta run passes: ``op`` on small stand-ins of the
       tensors' devices (at most two indices a dim: their shapes stay consistent), for torch's dtype
       errors (``expected m1 and m2 to have the same dtype``), in the wording of their device's kernel.

    Only for ops without side effects beyond their arguments: the caller leaves out random ops
    (they would draw from the caller's generator) and ops outside torch's own namespaces."""
    if any(has_no_strides(value) for value in tree_leaves((args, kwargs))):
        return None  # no strides to stand in for
    if isinstance(op, OpOverload) and _holds_a_wrapped_number(op, args, kwargs):
        return None  # a composite kernel's wrapped number, which the op refuses only as it reaches us
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            op(*tree_map(_fresh_meta_stand_in, args), **tree_map(_fresh_meta_stand_in, kwargs))
        except NotImplementedError:
            return None
        except Exception as meta_error:  # noqa: BLE001 - torch's check, in the meta kernel's words
            if "meta" in str(meta_error).lower():  # the meta kernel needs values it does not have
                return None
            try:
                op(*tree_map(_cpu_stand_in, args), **tree_map(_cpu_stand_in, kwargs))
            except Exception as error:  # noqa: BLE001 - torch's own error, for the caller
                return _unless_the_stand_ins(error, meta_error, args, kwargs)
            return None
        if not dtypes:
            return None
        try:
            if isinstance(op, OpOverload):
                _raise_torchs_error_on_stand_ins(op, args, kwargs)
            else:
                op(*tree_map(small_stand_in, args), **tree_map(small_stand_in, kwargs))
        except Exception as error:  # noqa: BLE001 - torch's own complaint about the dtypes, for the caller
            return error
    return None


def _holds_a_wrapped_number(func: OpOverload, args: tuple, kwargs: dict) -> bool:
    """Whether a Python number stands where ``func``'s schema types a Tensor (``bitwise_and.Scalar``'s
    composite kernel calls ``bitwise_and.Tensor`` with one, which reaches ``__torch_dispatch__`` as a
    number): the op called again with it refuses its type, an error torch never shows the caller
    (:func:`~pagedtensor.pieces._raise_torchs_error_on_stand_ins` makes it a tensor for the dtype checks)."""
    arguments = func._schema.arguments
    by_name = {argument.name: argument for argument in arguments}
    pairs = [*zip(arguments, args), *((by_name.get(name), value) for name, value in kwargs.items())]
    return any(argument is not None and isinstance(argument.type, torch.TensorType) and type(value) in (bool, int, float, complex)
               for argument, value in pairs)  # fmt: skip


def _unless_the_stand_ins(error: Exception, meta_error: Exception, args: tuple, kwargs: dict) -> Optional[Exception]:
    """``error``, the CPU kernel's on :func:`_cpu_stand_in` stand-ins, unless it is about the stand-ins'
    own layout rather than the caller's: a PagedTensor's stand-in is broadcast, every stride 0, which
    a kernel may refuse (overlapping elements of a written tensor; ``_grouped_mm``'s ``Invalid
    strides/sizes``) where the real tensor has none. Then the meta kernel's error (on the real
    layouts) stands where it names the same complaint, else None (the meta kernel refused something
    else, which the CPU kernel's checks may not: the pager's error stands)."""
    message = str(error)
    paged = [value for value in tree_leaves((args, kwargs)) if isinstance(value, PagedTensor)]
    if "single memory location" in message and not any(map(overlaps_itself, paged)):
        return meta_error if "single memory location" in str(meta_error) else None
    if "stride" in message.lower() and any(any(value.stride()) for value in paged):
        return meta_error if "stride" in str(meta_error).lower() else None
    return error


# Ops whose arguments are tensors alone, no sizes (matrix products): stand-ins of at most two
# indices a dim keep their shapes consistent, so a run on them finds the dtype errors that their
# meta kernels do not check (:func:`torchs_argument_error` with ``dtypes``).
_SIZELESS_PRODUCTS = frozenset(
    getattr(packet, name)
    for packet in (aten.mm, aten.addmm, aten.bmm, aten.baddbmm, aten.addbmm, aten.mv, aten.addmv, aten.dot,
                   aten.vdot, aten.addr, aten.linear)
    for name in packet.overloads()
)  # fmt: skip


def _torchs_noise_shape_error(func: OpOverload, args: tuple, kwargs: dict) -> Optional[Exception]:
    """torch's error for ``rrelu_with_noise`` (a random op) with a ``noise`` of another shape than
    ``self`` (``noise tensor shape must match self tensor shape``) or of a dtype it has no kernel for
    (an int ``self``), which its kernel checks before it draws or writes: the kernel run, with a
    generator of its own (so no number is drawn from the caller's), on stand-ins that hold nothing
    of the caller's: for shapes that differ, CPU zeros broadcast to each shape (no memory of their
    sizes); for shapes that match, one element each on the tensors' device (the kernel writes the
    noise). None where the kernel takes them (the pager's error stands)."""
    if func.overloadpacket not in (aten.rrelu_with_noise, aten.rrelu_with_noise_):
        return None
    names = [argument.name for argument in func._schema.arguments]
    bound = {**dict(zip(names, args)), **kwargs}
    self, noise = bound.get("self"), bound.get("noise")
    if not isinstance(self, torch.Tensor) or not isinstance(noise, torch.Tensor):
        return None
    shapes_match = self.shape == noise.shape
    device = self.device if shapes_match else torch.device("cpu")

    def stand_in(value: torch.Tensor) -> torch.Tensor:
        if shapes_match:
            return torch.zeros((1,) * value.dim(), dtype=value.dtype, device=device)
        return torch.zeros((), dtype=value.dtype).expand(value.shape)

    stand_ins = {name: stand_in(value) if isinstance(value, torch.Tensor) else value for name, value in bound.items()}
    stand_ins["generator"] = torch.Generator(device=device)
    if "out" in stand_ins:
        stand_ins["out"] = torch.empty(0, dtype=self.dtype, device=device)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            func(**stand_ins)
    except Exception as error:  # noqa: BLE001 - torch's own error, for the caller
        return error
    return None


def _as_pagers_error(error: "_OpTooLarge", func: OpOverload, info: OpInfo, args: tuple, kwargs: dict) -> Exception:
    """``error`` as the pager's error type that caused it (DeviceTierFullError where the device
    tier was the bound), for the caller, or torch's overlap error where the op writes a PagedTensor
    whose elements overlap each other and its kernel refuses that (within the tier it raises it, past
    it no view runs the kernel: :func:`_torchs_overlap_error`); its message says so where the op writes a PagedTensor
    that partly overlaps another of its arguments (:func:`torchs_overlap_status`), which torch's
    elementwise, copy and index kernels refuse on any tensor (``torch.add(t[1:], 1, out=t[:-1])``):
    within the tier the op runs on views of one storage and raises torch's own error; past it
    there is no such view to run it on, and the error names the overlap beside the tier. For a
    random op (``normal_``, ``uniform_``: :attr:`OpInfo.random`) it is torch's error where torch
    refuses the arguments (:func:`_torchs_random_argument_error`), else it names the way round: a
    plain tensor filled and copied in, or for one that writes no PagedTensor (``torch.bernoulli(t)``)
    the op on a plain copy. An elementwise op or a reduction whose operands' dtypes torch refuses
    gives torch's error (:func:`_torchs_dtype_error`), as it does within the tier; so does any other
    aten op whose shapes (or, for a matrix product, dtypes) torch refuses (:func:`torchs_argument_error`:
    ``mm`` of ``3x30`` by ``32x512``, ``nonzero_static`` of a negative size, ``split_copy`` into
    outputs of the wrong shape), and ``rrelu_with_noise`` of a noise of another shape
    (:func:`_torchs_noise_shape_error`), all checked on stand-ins on this error path only."""
    pagers_type = type(error.__cause__) if isinstance(error.__cause__, OutOfPagesError) else OutOfPagesError
    message = str(error)
    leaves = _paged_leaves(args, kwargs)
    written = _written_leaves(info, args, kwargs)
    refused = _torchs_random_argument_error(func, args, kwargs) if info.random else _torchs_overlap_error(func, args, kwargs, written)
    if refused is None and info.random:
        refused = _torchs_noise_shape_error(func, args, kwargs)
    if refused is None and not info.random and not info.collective and func.namespace in ("aten", "prims"):
        refused = torchs_argument_error(func, args, kwargs, dtypes=func in _SIZELESS_PRODUCTS)
    if refused is None:
        refused = _torchs_dtype_error(func, info, args, kwargs)
    if refused is not None:
        return refused
    overlapped = next(
        ((target, other) for target in written for other in leaves
         if other is not target and torchs_overlap_status(target, other) == "partial"),
        None,
    )  # fmt: skip
    if overlapped is not None:
        target, other = overlapped
        message += (
            f" (also, the tensor it writes, of shape {tuple(target.shape)}, partly overlaps another of its arguments, of "
            f"shape {tuple(other.shape)}, which torch refuses for most ops, dense tensors too: clone() that argument first)"
        )
    outgrown = _tier_outgrown(leaves)
    if outgrown is not None:
        arguments, reach, capacity = outgrown
        message += f" (its {arguments} PagedTensor arguments reach {reach} pages in all, where the device tier holds {capacity}"
        message += _FUSED_WAY_ROUND.get(func.overloadpacket, "") + ")"
    if info.random:
        message += " (a random op draws its numbers in its kernel's order over the whole tensor, which no run in pieces follows: " + (
            "fill a plain tensor of that shape, on the CPU if it does not fit on the device, and copy_ it into the "
            "PagedTensor, which runs a piece at a time)"
            if written
            else "run it on a plain copy, t.materialize())"
        )
    return pagers_type(message)


# torch's fused kernels over a module's weights at once, which its modules pick in eval mode under
# no_grad, and the switch that keeps them op by op (each op then needs its own weights only).
_MHA_FAST_PATH_OFF = (": torch's fused fast path of nn.MultiheadAttention and nn.TransformerEncoderLayer; "
                      "torch.backends.mha.set_fastpath_enabled(False) runs them op by op")
_FUSED_WAY_ROUND = {
    torch.ops.aten._transformer_encoder_layer_fwd: _MHA_FAST_PATH_OFF,
    torch.ops.aten._native_multi_head_attention: _MHA_FAST_PATH_OFF,
}


def _tier_outgrown(leaves: Sequence[PagedTensor]) -> Optional[tuple[int, int, int]]:
    """``(arguments, pages, capacity)`` where two or more PagedTensors ``leaves`` of one pager reach
    more pages in all than its device tier holds (a fused op over many weights that each fit, whose
    error otherwise names only the request that failed); ``None`` where they fit."""
    arguments: dict[Pager, int] = {}
    for leaf in leaves:
        if leaf.allocation is not None:
            arguments[leaf.pager] = arguments.get(leaf.pager, 0) + 1
    for pager, reached in pages_reached(leaves).items():
        if arguments[pager] > 1 and len(reached) > pager.device_tier.capacity_pages:  # one argument's own request says so
            return arguments[pager], len(reached), pager.device_tier.capacity_pages
    return None


def _too_many_pages(func: OpOverload, error: OutOfPagesError) -> OutOfPagesError:
    return _OpTooLarge(out_of_pages_for(f"{func}: its PagedTensor arguments", error))


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


def _row_byte_spans(table: PagedTensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each of ``rows`` (int64, on the host) of ``table`` begins in its allocation, and ends
    (one past its last byte reached), in bytes: the pages a row gather or scatter reads."""
    itemsize = table.dtype.itemsize
    row_reach = element_span(tuple(table.shape[1:]), table.stride()[1:], 0)[1]
    starts = (table._offset + rows * table.stride(0)) * itemsize
    return starts, starts + row_reach * itemsize


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
    lo, hi = byte_span(target)
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


def _has_sparse_tensor(args: tuple, kwargs: dict) -> bool:
    """Whether an argument (in a list too) is a tensor of a sparse layout. (Asked of every in-place
    elementwise op: a loop, not a pytree flatten.)"""
    for value in (*args, *kwargs.values()):
        for item in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(item, torch.Tensor) and item.layout != torch.strided:
                return True
    return False


def _changes_no_metadata(func: OpOverload, args: tuple, kwargs: dict) -> bool:
    """Whether the in-place metadata op ``func`` leaves its PagedTensor's sizes, strides and offset as
    they are (``transpose_(1, 1)``, ``squeeze_()`` without dims of one element, ``t_()`` of a vector,
    ``as_strided_`` to its own layout, ``detach_()``): seen on a fresh meta view of its layout, which
    also raises torch's errors for bad arguments."""
    self = args[0]
    if not isinstance(self, PagedTensor) or self._paged is None:
        return False
    if func.overloadpacket is aten.set_:
        # set_ to another storage keeps the layout it is given, which the meta view cannot tell apart
        # from its own (a.set_(b) of b's shape read a's old values): only a set_ to this very view is none.
        source = args[1] if len(args) > 1 else None
        return (
            func is aten.set_.source_Tensor and isinstance(source, PagedTensor) and source._paged is self._paged
            and source._offset == self._offset and source.shape == self.shape and source.stride() == self.stride()
            and math_bits(source) == math_bits(self)
        )  # fmt: skip
    if func.overloadpacket.__name__ in _RESIZING_OPS or func is aten._resize_output_.default:
        return False  # sparse resizes, and a resize to another device
    if func in _RESIZES:
        size = tuple(args[1].shape) if func is aten.resize_as_.default and isinstance(args[1], torch.Tensor) else tuple(args[1])
        if size != tuple(self.shape):
            return False  # a resize to another size (on the meta view it would grow the allocation's meta storage)
    meta = meta_like(self).as_strided(self.shape, self.stride(), self._offset)
    before = (tuple(meta.shape), meta.stride(), meta.storage_offset())
    meta_args, meta_kwargs = _substitute(args[1:], kwargs, {id(leaf): meta_like(leaf) for leaf in _paged_leaves(args[1:], kwargs)})
    try:
        func(meta, *meta_args, **meta_kwargs)
    except AssertionError:
        # a Python meta kernel's assert (CUDA's transpose_ of a dim out of range): torch's own error,
        # from the op on a CPU stand-in of the shape holding one element; else the refusal
        func(torch.empty((), dtype=self.dtype, device="cpu").expand(self.shape), *meta_args, **meta_kwargs)
        return False
    return (tuple(meta.shape), meta.stride(), meta.storage_offset()) == before


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


# The forms matmul(out=) writes its folded ``out`` with (``out.reshape(-1, n)``), then copies that
# reshape back onto ``out`` unless the two share a storage, which a wrapper subclass's views do not.
_MATMUL_OUT_FORMS = frozenset({aten.mm.out, aten.mv.out})
_last_matmul_out = threading.local()


def _note_matmul_out(out: Any) -> None:
    """Remember (weakly, per thread) the PagedTensor ``out`` of the latest mm/mv ``out=`` form: the
    one folded view whose copy onto its own bytes :func:`_same_data` lets through."""
    _last_matmul_out.ref = weakref.ref(out) if isinstance(out, PagedTensor) else None


def _same_data(target: Any, source: Any) -> bool:
    """Whether a copy between two PagedTensors would leave every byte as it is: views of the same
    bytes the same way (torch's copy_ returns early for those), or ``target`` with its leading dims
    folded into one, both contiguous, where ``source`` is what mm/mv ``out=`` last wrote in this
    thread (``matmul(out=)`` copies that reshape of ``out`` back onto ``out``: see
    :data:`_MATMUL_OUT_FORMS`). Any other view of the same bytes (``t.copy_(t.view(3, 4))``,
    ``t.copy_(t.view(-1, n))`` of a user) runs, and torch refuses it, as for plain tensors."""
    if not (isinstance(target, PagedTensor) and isinstance(source, PagedTensor)):
        return False
    if target._paged is None or target._paged is not source._paged or target._offset != source._offset or target.dtype != source.dtype:
        return False
    if math_bits(target) != math_bits(source):
        return False
    if target.shape == source.shape and target.stride() == source.stride():
        return True
    folded = 0 < source.dim() < target.dim() and source.shape[1:] == target.shape[target.dim() - source.dim() + 1 :]
    if not (folded and target.numel() == source.numel() and target.is_contiguous() and source.is_contiguous()):
        return False
    noted = getattr(_last_matmul_out, "ref", None)
    _last_matmul_out.ref = None
    return noted is not None and noted() is source


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




def resize_refused(func: OpOverload, shape: Sequence[int], result_shape: Sequence[int], args: tuple, kwargs: dict) -> NotImplementedError:
    """The error for an ``out=`` op that would resize its PagedTensor output (its pages are fixed)."""
    return NotImplementedError(
        f"PagedTensor: {func} would resize its PagedTensor output from {list(shape)} to "
        f"{list(result_shape)}; pass an out= tensor of the result's shape{_describe(args, kwargs)}"
    )


def _describe(args: tuple, kwargs: dict) -> str:
    def name(value: Any) -> str:
        if type(value) in (list, tuple):
            return f"{type(value).__name__}[{', '.join(name(item) for item in value)}]"
        return type(value).__name__

    parts = [name(value) for value in args] + [f"{key}={name(value)}" for key, value in kwargs.items()]
    return f" (argument types: {', '.join(parts)})"


# ---------------------------------------------------------------------- handlers

# Imported last: each module of pagedtensor.handlers imports what it needs from this one, and
# importing the package registers every handler with DISPATCHER (in the order of its __init__).
# The dispatcher calls view_of_pages itself: with the PagedTensor arguments it has found, and for
# view ops recognized by their schema (run_paged).
from pagedtensor.handlers import linear as _linear  # noqa: E402
from pagedtensor.handlers.collectives import run_collective  # noqa: E402
from pagedtensor.handlers.views import view_of_pages  # noqa: E402

# Documented at this path (README).
paged_linear = _linear.paged_linear
paged_conv1d = _linear.paged_conv1d
