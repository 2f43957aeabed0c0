"""Elementwise ops on PagedTensors larger than the device tier, run a piece of pages at a time.

The dispatcher runs an op on dense views of every page its PagedTensor arguments reach, resident at
once. An elementwise op (each result element made from the arguments' elements at the same index:
the ``pointwise`` tag, and ``copy_``/``fill_``/``zero_``/``_to_copy`` on its own device) gives the same bytes when it runs on
consecutive pieces of its tensors, so when its pages cannot fit at once it runs piece by piece:
each piece is an ordinary op on PagedTensor views of a run of pages, faulted in, run and written
back like any op, before the next piece's pages fault in.

It applies when every argument that is not a number or a 0-dim tensor has the same shape and
strides, or broadcasts to that shape (``paged + bias``, ``paged * scale[:, None]``, or an expanded
view read, ``bias.expand_as(paged)``: such an operand is read whole by every piece, a PagedTensor
one once, as a plain tensor, before the first piece; the pieces then go along the outer dim; with
it read, an op whose other pages fit runs at once; a PagedTensor read only through an expanded
view, ``paged.expand(2, n, m) * 2``, runs compacted, its result expanded, or an index at a time
along the expanded dims beside a plain operand of the whole shape), with no element reachable twice (so elements at the
same index lie at the same distance from each tensor's storage offset), and the op writes only its first argument (in-place), only
its ``out=`` (of the result's shape: one torch would resize is not run in pieces) or nothing (its
result a plain tensor filled piece by piece). The argument written may be a plain tensor, as in
``dense.copy_(paged)`` or ``torch.add(paged, 1, out=dense)``. Plain tensors may have strides of
their own (``torch.where(mask, paged.T, 0)``, ``paged.T + plain``: the result laid out as torch
lays it out), and so may PagedTensors whose outer dims in memory agree; the pieces then go
along that dim. Views of one allocation other than its first (``t[n:]`` in ``t[:n] + t[n:]``,
``t.T`` in ``t + t.T``) are read as plain copies of each piece: the dispatcher reads one allocation's
views through one window spanning them. An op reads no other view that may share a byte it writes
(the same elements excepted, as in ``x.mul_(x)``; ``t[:n].add_(t[n:])`` reads bytes apart, and
``t[:, :n].add_(t[:, n:])`` bytes between them: :func:`may_share_bytes`). Contiguous (row-major) tensors of one layout run in
1-D pieces of consecutive elements; others (transposed or permuted, a column ``t[:, 3]``, every
other row ``t[::2]``, a plain ``out`` of another layout) in pieces of consecutive indices along
the dim of the largest stride, each of the whole's layout (a kernel may round otherwise on 1-D
runs than on a transposed whole: CPU ``gelu``), when one index of it spans less than a piece;
where it does not, tensors whose elements fill their span still run in 1-D pieces.

Note:
    Stream order is each piece's op's (see :mod:`pagedtensor.dispatch`): the pieces run one after
    another on the current stream. An in-place op that fails part-way (the device tier filled by
    pins of another thread between pieces) leaves the pieces before the failing one written.
"""

from __future__ import annotations

import itertools
import warnings
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch
from torch._ops import OpOverload
from torch._prims_common import compute_elementwise_output_strides, make_contiguous_strides_for

from pagedtensor.errors import DeviceTierFullError, OutOfPagesError
from pagedtensor.tensor import PagedTensor, byte_span, dense_and_non_overlapping, element_span, math_bits, meta_layout

if TYPE_CHECKING:
    from pagedtensor.pager import Pager
    from pagedtensor.dispatch import OpInfo

aten = torch.ops.aten

# Elementwise ops without the ``pointwise`` tag.
# ``_to_copy`` (``t.to(dtype)``, what ``model.half()`` / ``model.to(torch.bfloat16)`` run on every
# parameter) converts element by element: an expert stack larger than the device tier converts in pieces.
# ``where`` (``torch.where(mask, a, b)``) picks each element from its arguments at the same index.
_ELEMENTWISE = frozenset({aten.copy_.default, aten.fill_.Scalar, aten.fill_.Tensor, aten.zero_.default, aten._to_copy.default,
                          aten.where.self, aten.where.self_out,
                          # elementwise, but without torch's pointwise tag
                          aten.rsub.Tensor, aten.fill.Scalar, aten.floor_divide.default, aten.floor_divide.Scalar,
                          aten.floor_divide_.Tensor, aten.floor_divide_.Scalar, aten.floor_divide.out, aten.floor_divide.Scalar_out,
                          aten.complex.default, aten.complex.out, aten.polar.default, aten.polar.out,
                          aten.masked_fill_.Scalar, aten.masked_fill_.Tensor, aten.masked_fill.Tensor,
                          aten.masked_fill.Scalar_out, aten.masked_fill.Tensor_out,
                          # the backward ops of tagged activations, which autograd runs past the tier after their forwards
                          aten.hardtanh_backward.default, aten.elu_backward.default, aten.leaky_relu_backward.default,
                          aten.softplus_backward.default, aten.hardsigmoid_backward.default, aten.hardswish_backward.default,
                          aten.mish_backward.default, aten.softshrink_backward.default, aten.hardshrink_backward.default,
                          aten.hardswish.default, aten.hardswish_.default,
                          # untagged in torch 2.11 (tagged pointwise later): what rrelu in eval mode runs
                          aten.leaky_relu.default, aten.leaky_relu_.default, aten.leaky_relu.out,
                          # prelu's kernel: its weight broadcast beside the input (untagged)
                          aten._prelu_kernel.default})  # fmt: skip


def same_strides(shape: Sequence[int], strides: Sequence[int], others: Sequence[int]) -> bool:
    """Whether two layouts of ``shape`` place every element alike: their strides agree but along dims
    of size 1, whose stride no element uses (``t.expand(...)``'s compacted view keeps a stride 0
    there, ``t[None].transpose(0, 1)`` the whole span)."""
    return all(size == 1 or a == b for size, a, b in zip(shape, strides, others))


def run_in_pieces(func: OpOverload, args: tuple, kwargs: dict, info: "OpInfo") -> Any:
    """Run the elementwise ``func`` piece by piece (see the module docstring); ``NotImplemented``
    when it is not such an op, its tensors' layouts differ, or its tensors are no larger than a piece.
    ``info``: what the dispatcher read from ``func``'s schema."""
    if not info.elementwise:
        return NotImplemented
    target_name = written_target(info, args)
    if target_name is NOT_ONE_TARGET:
        return NotImplemented  # it writes several arguments, or one that is not its first or out=
    target = None if target_name is None else (args[0] if target_name == 0 else kwargs.get(target_name))
    if func is aten._to_copy.default and (
        kwargs.get("device") not in (None, args[0].device) or kwargs.get("layout") not in (None, torch.strided) or kwargs.get("pin_memory")
    ):  # fmt: skip
        return NotImplemented  # pieces run on the PagedTensor's device, as dense strided tensors
    if any(type(value) in (list, tuple) for value in (*args, *kwargs.values())):
        return NotImplemented
    _refuse_per_channel_quantized(func, (*args, *kwargs.values()))
    if target is not None and (not isinstance(target, torch.Tensor) or target.layout != torch.strided):
        return NotImplemented
    if target_name not in (None, 0) and target is not None and _out_of_another_shape(target, args, kwargs):
        if isinstance(target, PagedTensor):
            from pagedtensor.dispatch import resize_refused  # the dispatcher imports this module

            raise resize_refused(func, target.shape, broadcast_shape(_shaped_operands(target, args, kwargs)), args, kwargs)
        if not _resize_as_torch(func, args, kwargs, target):
            return NotImplemented
    if target is not None:
        _refuse_a_target_overlapping_itself(func, args, kwargs, target)
    if target is not None and target.dim() == 0:
        return NotImplemented  # the shaped arguments would be written into one element: torch's error, or a resize
    # A tensor read through an expanded view (``t.expand(...)``: a dim of stride 0) is a broadcast
    # operand: its view with one index along those dims, read whole once like ``bias``. (The
    # result's layout is then the meta kernel's for the broadcast operand, which is the CPU kernel's
    # for the expanded one: given the expanded operand, the meta kernel lays some results out
    # otherwise, float16 ``maximum(row.expand(n, m), t.t())`` with strides ``(m, 1)`` where the
    # CPU's are ``(1, n)``.)
    given_args, given_kwargs = args, kwargs
    given_shape = broadcast_shape([value for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor)])
    args = tuple(_compacted_if_expanded(value, target) for value in args)
    kwargs = {name: _compacted_if_expanded(value, target) for name, value in kwargs.items()}
    tensors = [value for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor)]
    shaped = [t for t in tensors if t.dim() > 0]
    shape = broadcast_shape(shaped)
    if target is None and given_shape is not None and shape != given_shape:
        # Every operand of the result's shape is an expanded view (``t.expand(2, n, m) * 2``): the op
        # on the compacted operands, then its result expanded back along those dims.
        return _run_compacted_then_expand(func, given_args, given_kwargs, args, kwargs)
    if not shaped or not any(isinstance(t, PagedTensor) for t in shaped) or any(t.layout != torch.strided for t in shaped):
        return NotImplemented
    # Tensors may have layouts of their own (``torch.add(paged.t(), 1, out=dense)``,
    # ``paged_contiguous.copy_(paged[:, 3])``, ``torch.where(mask, paged.t(), 0)``): the pieces then
    # go along the outer dim, where a piece of any layout is a narrowed view, and a result is laid
    # out as the op's meta kernel lays out the whole's.
    # Operands broadcast to the result's shape (``paged + bias``, ``paged * scale[:, None]``) are read
    # whole by every piece: they run expanded, a PagedTensor one read once (it must fit in a piece).
    if shape is None:
        _raise_torchs_error(func, args, kwargs)  # shapes that do not broadcast: torch's error, not the pager's
    reference = next((t for t in shaped if isinstance(t, PagedTensor) and tuple(t.shape) == shape), None)
    if reference is None:
        compacted = zip((*given_args, *given_kwargs.values()), (*args, *kwargs.values()))
        if target is None and any(isinstance(given, PagedTensor) and given is not value for given, value in compacted):
            # A PagedTensor of the result's shape read only through an expanded view beside a plain
            # operand of that shape (``torch.where(t.expand(2, n, m) > 0, ...)``): an op an index at a time
            # along the dims it is expanded along.
            return _run_along_expanded_dims(func, given_args, given_kwargs, shape)
        return NotImplemented  # no PagedTensor of the result's shape (or shapes that do not broadcast)
    stride = reference.stride()
    broadcast = [t for t in shaped if tuple(t.shape) != shape]
    if any(t is target for t in broadcast):
        if target_name == 0:  # torch writes in place into a tensor of the result's shape only: its kernel's error
            _raise_torchs_error_on_stand_ins(func, given_args, given_kwargs)
        return NotImplemented  # (and into an out= of it, resized above)
    # Tensors of one layout whose elements fill their span run in 1-D pieces of consecutive elements
    # where the layout is row-major (the kernel's own loop over the whole is then one run of
    # consecutive elements too). Of another such layout (transposed, permuted) a kernel may take
    # another path than on 1-D runs (CPU ``gelu`` of a transposed tensor rounds some elements
    # otherwise than of the same values contiguous): its pieces go along the outer dim, each of the
    # whole's layout, and in 1-D runs only where one index of that dim spans more than a piece.
    fills_span = not broadcast and dense_and_non_overlapping(shape, stride) and all(same_strides(shape, t.stride(), stride) for t in shaped)
    row_major = fills_span and same_strides(shape, stride, make_contiguous_strides_for(shape))
    # A plain tensor written (``dense.copy_(paged)``, what ``load_state_dict`` of a loaded paged
    # checkpoint into a plain model runs, or ``torch.add(paged, 1, out=dense)``) shares no page with
    # the PagedTensors it reads: each piece writes its own elements of it directly.
    if isinstance(target, PagedTensor) and any(
        isinstance(t, PagedTensor) and t._paged is target._paged and not same_view(t, target) and may_share_bytes(t, target)
        for t in tensors
    ):
        # Another view of the written bytes that may share some: a piece could read elements an
        # earlier piece wrote (torch refuses a partial overlap, which no one piece need show). A
        # view whose bytes lie apart from them, or between them without sharing one, is read as a
        # copy of each piece (``copied`` below).
        return NotImplemented
    if target is not None and not isinstance(target, PagedTensor) and any(
        t is not target and not isinstance(t, PagedTensor) and t.untyped_storage().data_ptr() == target.untyped_storage().data_ptr()
        for t in tensors
    ):
        return NotImplemented  # the same, for another view of a plain target
    # A 0-dim PagedTensor is read whole by every piece: read it once, so that no piece's window
    # needs its page too.
    args = tuple(_read_if_zero_dim(value) for value in args)
    kwargs = {name: _read_if_zero_dim(value) for name, value in kwargs.items()}
    tensors = [value for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor)]
    result_layout = None
    if target is None:
        result_layout = _result_layout(func, args, kwargs)
        if result_layout is None:
            _raise_torchs_error_on_stand_ins(func, args, kwargs)  # (where of an int condition), not the pager's
        if result_layout is None or tuple(result_layout.shape) != shape or (row_major and not same_strides(shape, result_layout.stride(), stride)):
            return NotImplemented
    read_whole = any(isinstance(t, PagedTensor) for t in broadcast)
    given: dict[int, torch.Tensor] = {}  # each expanded operand's id: the tensor it expands, whose tiles the pieces take
    if broadcast:
        if any(isinstance(t, PagedTensor) and span_elements(t) > (piece_elements_of([t]) or 0) for t in broadcast):
            return NotImplemented  # it could not be read whole
        if target is not None:
            # before the operands are expanded (fill_ of a 1-D value): the kernel's check on stand-ins
            # (a meta kernel may refuse what the kernel takes: int64 ``<<=`` a bool row)
            _raise_torchs_error_on_stand_ins(func, given_args, given_kwargs)
            if func is aten.fill_.Tensor:  # (torch 2.11's meta kernel lets a 1-D value through): its own kernel's check
                torch.empty((), dtype=target.dtype, device=target.device).fill_(args[1])
        # (an operand given expanded, compacted above, runs expanded, as torch ran it: not recorded in ``given``)
        compacted = {id(value) for value, as_given in zip((*args, *kwargs.values()), (*given_args, *given_kwargs.values())) if value is not as_given}
        args = tuple(_expanded_if_broadcast(value, shape, None if id(value) in compacted else given) for value in args)
        kwargs = {name: _expanded_if_broadcast(value, shape, None if id(value) in compacted else given) for name, value in kwargs.items()}
        tensors = [value for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor)]
    piece_elements = piece_elements_of(tensors)
    if piece_elements is None:
        return NotImplemented
    refuse_without_room_for_new_pages(func, [target])
    piece_elements = _overwrites_fitting_host_room(func, target, piece_elements)
    # One allocation's views are read through one window spanning them, which pieces of views lying
    # apart (``t[:n] + t[n:]``) would fill: each piece reads the views other than its allocation's
    # first (the written one first) as plain copies of the piece.
    copied = _other_views(tensors, target)
    if not row_major:
        # Pieces along the outer dim of the layouts of the PagedTensors larger than a piece (one dim for
        # all of them), as many indices as the tightest allows.
        splits = {
            _outer_split(shape, t.stride(), piece_elements)
            for t in tensors
            if isinstance(t, PagedTensor) and t.dim() > 0 and span_elements(t) > piece_elements
        }
        if not splits and (read_whole or copied):  # with those read whole or copied, the rest fits at once: one piece
            out = _run_in_tiles(func, args, kwargs, result_layout, reference.device, shape, {}, copied, given)
            return target if target is not None else out
        counts = _tile_plan(splits)
        if counts is not None:
            out = _run_in_tiles(func, args, kwargs, result_layout, reference.device, shape, counts, copied, given)
            return target if target is not None else out
        if not fills_span or (result_layout is not None and not same_strides(shape, result_layout.stride(), stride)):
            return NotImplemented
    # 1-D pieces (on a CPU a kernel's vectorized loop then ends where each piece does, the one case
    # where bits may differ from the whole's: see the README)
    numel = reference.numel()
    if piece_elements >= numel and not copied:
        return NotImplemented  # one piece of everything: the op's own pages would fit at once

    # laid out as the meta kernel lays out the whole (the reference's strides but along dims of size
    # 1, where torch's CPU kernels themselves disagree: ``mul`` keeps the input's, ``abs`` not), of the
    # dtype the kernel gives the first piece (see _result_like)
    out = flat_out = None
    start = 0
    while start < numel:
        stop = min(numel, start + piece_elements)
        piece_args = tuple(flat_piece(value, start, stop, id(value) in copied) for value in args)
        piece_kwargs = {name: flat_piece(value, start, stop, id(value) in copied) for name, value in kwargs.items()}
        result = func(*piece_args, **piece_kwargs)
        if result_layout is not None:
            if out is None:
                out = _result_like(result_layout, result, reference.device)
                flat_out = out.as_strided((numel,), (1,), 0)
            flat_out[start:stop].copy_(result)
        start = stop
    if result_layout is not None and out is None:  # no piece ran (no elements)
        out = torch.empty_strided(shape, result_layout.stride(), dtype=result_layout.dtype, device=reference.device)
    return target if target is not None else out


# Ops the dispatcher may run as overwrites of their target's pages (not faulted in: see
# ``ensure_resident``'s ``discard``), whose old host copies stay until the op's release.
_OVERWRITES = frozenset({aten.copy_.default, aten.fill_.Scalar, aten.fill_.Tensor, aten.zero_.default})


def _overwrites_fitting_host_room(func: OpOverload, target: Any, piece_elements: int) -> int:
    """``piece_elements``, fewer where ``func`` may overwrite the PagedTensor ``target``'s pages whole
    (``copy_``, ``fill_``, ``zero_``) on a pager without a disk tier: such a piece's pages keep their
    host copies until it is done (a failed write gives them back), so the device pages leaving to
    make room for it need free host slots beside those copies, where a read-modify-write's pages
    read in leave copies that room may drop. Such a piece then spans at most the free slots of both
    tiers at the op's start, less one (a piece straddles a page more), one page at least; unchanged
    where those slots are more."""
    if func not in _OVERWRITES or not isinstance(target, PagedTensor) or target.pager.disk_tier is not None:
        return piece_elements
    pager = target.pager
    pages = max(1, pager.device_tier.free_pages + pager.host_tier.free_pages - 1)
    return min(piece_elements, max(1, pages * pager.page_size // target.dtype.itemsize))


def refuse_without_room_for_new_pages(func: OpOverload, written: Sequence[Any]) -> None:
    """Raise :class:`OutOfPagesError` before anything is written where ``func`` writes pages of the
    PagedTensors among ``written`` (the views it writes: its target, each index's tensors of a list
    op, a row scatter's runs of rows) that hold no bytes in any tier (never written, or discarded:
    they read as zeros) and a pager's tiers lack room for all of them once written
    (:meth:`Pager.room_for_new_pages`): a piece, part or index would fail part-way, those before it
    written. Every path that writes in pieces or parts calls this one check first: the elementwise
    pieces, list ops, row and mask scatters, copies in parts. Each page counts once however many
    views reach it; a view of a closed pager or a freed allocation is left to the op's own error.
    Pages other threads write meanwhile may still fill the tiers. One step per page the views reach,
    no more than a piece's fault."""
    from pagedtensor.dispatch import touched_pages  # the dispatcher imports this module

    new: dict[int, tuple["Pager", set[tuple[int, int]]]] = {}  # per pager: (allocation id, page) of the pages holding no bytes
    for t in written:
        if not isinstance(t, PagedTensor) or t.allocation is None or t.pager.closed or t.allocation.freed:
            continue
        pager, allocation = t.pager, t.allocation
        pages = allocation.pages
        reached = touched_pages(tuple(t.shape), t.stride(), t._offset, t.dtype.itemsize, pager.page_size)
        pager_new = new.setdefault(id(pager), (pager, set()))[1]
        pager_new.update(
            (allocation.id, index)
            for index in reached
            if pages[index].device_slot is None and pages[index].host_slot is None and pages[index].disk_slot is None
        )
    for pager, pages_new in new.values():
        if not pages_new:
            continue
        room = pager.room_for_new_pages(len(pages_new))
        if room is not None and len(pages_new) > room:
            config = pager.config
            raise OutOfPagesError(
                f"{func}: it writes {len(pages_new)} pages of its PagedTensors that hold no bytes yet (never written, or discarded), "
                f"but the tiers have room for {room} more pages (vram_limit={config.vram_limit} + host_memory={config.host_memory} "
                f"bytes{'' if pager.disk_tier is None else ' + the disk tier'}, in pages of {pager.page_size}); nothing was written. "
                f"Free an allocation, raise host_memory{'' if pager.disk_tier is not None else ', or set nvme_path'}"
            )


def fits_beside_pins(pager: "Pager", pages: set[tuple[int, int]]) -> bool:
    """Whether ``pages`` (``(allocation id, page)`` pairs on ``pager``, each once: :func:`pages_reached`)
    fit on its device tier at once beside the pages the calling thread pins now (its unreleased
    ``ensure_resident`` calls, a KV cache's hot pins: :meth:`Pager.pinned_pages`), those pinned among
    them needing no room of their own. The thread's pins stay until it lets them go, so an op on
    pages that do not fit beside them cannot run; other threads' pins are let go as their ops end
    (as :func:`piece_elements_of` counts them)."""
    capacity = pager.device_tier.capacity_pages
    if not pager.any_pinned():
        return len(pages) <= capacity
    runs: list[tuple[int, int, int]] = []  # (allocation id, start, stop): the pages as runs of consecutive ones
    for allocation_id, page in sorted(pages):
        if runs and runs[-1][0] == allocation_id and runs[-1][2] == page:
            runs[-1] = (allocation_id, runs[-1][1], page + 1)
        else:
            runs.append((allocation_id, page, page + 1))
    pinned, inside = pager.pinned_pages(runs)
    return len(pages) - inside <= capacity - pinned


def _refuse_a_target_overlapping_itself(func: OpOverload, args: tuple, kwargs: dict, target: torch.Tensor) -> None:
    """Raise torch's error for a written ``target`` whose elements share memory (an expanded view:
    ``acc.expand(n, m).add_(t)``, ``torch.add(t, 1, out=row.expand(n, m))``), where the op's kernel
    refuses it, before anything is written: a piece of one index along the expanded dim overlaps
    nothing, so no piece would raise it, and the pieces would write the shared elements in turn (a
    sum of the rows). Ops whose kernel writes such a tensor (``fill_``, ``zero_``) run on."""
    from pagedtensor.dispatch import _torchs_overlap_error, overlaps_itself  # the dispatcher imports this module

    if overlaps_itself(target):
        refused = _torchs_overlap_error(func, args, kwargs, [target])
        if refused is not None:
            raise refused


def _shaped_operands(out: torch.Tensor, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensors of one or more dims among ``args`` and ``kwargs`` but the keyword ``out``: an
    ``out=`` that is also an operand (``torch.add(t, bias, out=t)``) counts as that operand."""
    operands = (*args, *(value for value in kwargs.values() if value is not out))
    return [value for value in operands if isinstance(value, torch.Tensor) and value.dim() > 0]


def _out_of_another_shape(out: torch.Tensor, args: tuple, kwargs: dict) -> bool:
    """Whether ``out=`` has another shape than the one its operands broadcast to (torch resizes it)."""
    shape = broadcast_shape(_shaped_operands(out, args, kwargs))
    return shape is not None and len(shape) > 0 and tuple(out.shape) != shape


def _resize_as_torch(func: OpOverload, args: tuple, kwargs: dict, out: torch.Tensor) -> bool:
    """Resize the plain ``out`` as ``func``'s kernel resizes it: to the shape and strides of the
    functional form's result (the kernel lays a resized output out as it lays out a new one: the
    inputs' layout where they share one; the ``out=`` meta kernels resize contiguously), with
    torch's warning for a non-empty ``out``; the pieces then write it as one of the result's shape.
    False where there is no functional form or its meta kernel does not run (the pieces leave the op)."""
    functional = _functional_of_out(func) or functional_form(func)
    if functional is None:
        return False
    result = _result_layout(functional, args, {name: value for name, value in kwargs.items() if value is not out})
    if result is None:
        return False
    resize_out_as(out, result)
    return True


def resize_out_as(out: torch.Tensor, result: torch.Tensor) -> None:
    """Resize the plain ``out`` to ``result``'s shape and strides, as a dense kernel's
    ``resize_output`` does, with its warning where ``out`` has elements; an ``out`` of ``result``'s
    shape is left as it is (its strides too: a view of a larger buffer is written where it lies)."""
    if out.shape == result.shape:
        return
    if out.numel():  # the dense kernel's resize_output warns so (a C++ warning; this one is Python's)
        warnings.warn(
            f"An output with one or more elements was resized since it had shape {list(out.shape)}, which does not match the "
            f"required output shape {list(result.shape)}. This behavior is deprecated, and in a future PyTorch release outputs "
            "will not be resized unless they have zero elements. You can explicitly reuse an out tensor t by resizing it, "
            "inplace, to zero elements with t.resize_(0).",
            UserWarning,
            stacklevel=3,
        )
    out.resize_(result.shape)
    if out.stride() != result.stride():
        out.as_strided_(result.shape, result.stride())


def _functional_of_out(func: OpOverload) -> Optional[OpOverload]:
    """The functional overload whose arguments are ``func``'s but its ``out=`` (``add.out``:
    ``add.Tensor``, where :func:`functional_form`'s naming gives ``add.default``, of two numbers);
    else None."""
    packet = getattr(aten, func._schema.name.split("::")[-1], None)
    if not isinstance(packet, torch._ops.OpOverloadPacket):
        return None
    wanted = [(argument.name, str(argument.type)) for argument in func._schema.arguments if not argument.is_out]
    for overload in packet.overloads():
        candidate = getattr(packet, overload)
        if not candidate._schema.is_mutable and [(a.name, str(a.type)) for a in candidate._schema.arguments] == wanted:
            return candidate
    return None


def broadcast_shape(tensors: list[torch.Tensor]) -> Optional[tuple[int, ...]]:
    """The shape ``tensors`` broadcast to, or None where they do not."""
    try:
        return tuple(torch.broadcast_shapes(*(t.shape for t in tensors)))
    except RuntimeError:
        return None


def _run_compacted_then_expand(func: OpOverload, given_args: tuple, given_kwargs: dict, args: tuple, kwargs: dict) -> Any:
    """The result of the elementwise ``func`` on ``given_args``/``given_kwargs``, whose operands of the
    result's shape are all expanded views, from ``func`` on ``args``/``kwargs``, the same operands
    compacted (one index along each expanded dim): an element of the result is ``func`` of the
    operands' elements at its index, the same along an expanded dim, so the small result expanded
    along those dims holds the whole's values; it is copied into the layout torch gives the whole.
    ``NotImplemented`` where the op's result is not one tensor."""
    layout = _result_layout(func, given_args, given_kwargs)
    if layout is None:
        return NotImplemented
    small = func(*args, **kwargs)  # dispatched as any op: in pieces where its pages do not fit at once
    if not isinstance(small, torch.Tensor):
        return NotImplemented
    out = _result_like(layout, small, small.device)  # the kernel's dtype, where the meta kernel infers another
    return out.copy_(small.expand(layout.shape))


def _run_along_expanded_dims(func: OpOverload, args: tuple, kwargs: dict, shape: tuple[int, ...]) -> Any:
    """The result of the elementwise ``func`` of result shape ``shape``, whose PagedTensor operands are
    all expanded along some dims of it (stride 0, or size 1 there): for each index along those dims,
    the op on every operand's slice there (its index 0 where it has size 1), each an op as any other
    (in pieces where its pages do not fit at once), written into the result's slice, laid out as
    torch lays out the whole. ``NotImplemented`` where there is no such dim or the result is not
    one tensor."""
    layout = _result_layout(func, args, kwargs)
    tensors = [value for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor) and value.dim() > 0]
    paged = [t for t in tensors if isinstance(t, PagedTensor)]
    ndim = len(shape)

    def expanded_along(t: torch.Tensor, dim: int) -> bool:
        own = dim - (ndim - t.dim())
        return own < 0 or t.shape[own] == 1 or t.stride(own) == 0

    dims = [d for d in range(ndim) if shape[d] > 1 and all(expanded_along(t, d) for t in paged)]
    if layout is None or not dims:
        return NotImplemented
    out: Optional[torch.Tensor] = None

    def sliced(value: Any, index: tuple[int, ...]) -> Any:
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            return value
        for dim, i in sorted(zip(dims, index), reverse=True):  # the last dims first: the earlier keep their numbers
            own = dim - (ndim - value.dim())
            if own >= 0:
                value = value.select(own, i if value.shape[own] > 1 else 0)
        return value

    for index in itertools.product(*(range(shape[d]) for d in dims)):
        part = func(*(sliced(value, index) for value in args), **{name: sliced(value, index) for name, value in kwargs.items()})
        if out is None:  # of the dtype the kernel gives, where the meta kernel infers another
            out = _result_like(layout, part, paged[0].device)
        sliced(out, index).copy_(part)
    return out


def _compacted_if_expanded(value: Any, target: Any) -> Any:
    """A tensor the op reads (not its ``target``) with a dim of stride 0 and more than one index (an
    expanded view, paged or plain): its view with one index along each such dim, which the op then
    takes as an operand broadcast to the result's shape; anything else as it is."""
    if not isinstance(value, torch.Tensor) or value is target or value.dim() == 0 or value.layout != torch.strided:
        return value
    shape = tuple(1 if step == 0 else size for size, step in zip(value.shape, value.stride()))
    if shape == tuple(value.shape):
        return value
    if isinstance(value, PagedTensor):
        return PagedTensor._make(value._paged, value._offset, shape, value.stride(), value.dtype, bits=math_bits(value))
    return value.as_strided(shape, value.stride(), value.storage_offset())


def _expanded_if_broadcast(value: Any, shape: tuple[int, ...], given: Optional[dict[int, torch.Tensor]]) -> Any:
    """A shaped tensor of another shape than ``shape`` expanded to it (a PagedTensor one read once,
    as a plain tensor: every piece reads it whole), the tensor it expands recorded in ``given`` (where
    not None) by the expanded view's id (the pieces' tiles of it: :func:`_tile_of_broadcast`);
    anything else as it is."""
    if not isinstance(value, torch.Tensor) or value.dim() == 0 or tuple(value.shape) == shape:
        return value
    if isinstance(value, PagedTensor):
        value = value.materialize()
    expanded = value.expand(shape)
    if given is not None:
        given[id(expanded)] = value
    return expanded


def _tile_of_broadcast(value: torch.Tensor, ndim: int, cuts: Sequence[tuple[int, int, int]]) -> torch.Tensor:
    """The tile ``cuts`` (of a result of ``ndim`` dims) of the operand ``value`` broadcast to the
    result, as an operand that still broadcasts: narrowed along the cut dims it has with more than
    one index, its own shape elsewhere. The op's kernel then broadcasts it as it does for the whole:
    on the CPU an operand expanded to the tile's shape may take another loop (``atan2`` of a float32
    table by an int32 row rounded some elements otherwise)."""
    lead = ndim - value.dim()
    for dim, start, length in cuts:
        own = dim - lead
        if own >= 0 and value.shape[own] != 1:
            value = value.narrow(own, start, length)
    return value


def _outer_split(shape: tuple[int, ...], stride: tuple[int, ...], piece_elements: int) -> Optional[tuple[int, int]]:
    """``(dim, count)``: pieces of ``count`` consecutive indices along ``dim``, the dim of the
    largest stride, each spanning at most ``piece_elements`` elements; None when the layout may
    reach an element twice, one index of ``dim`` spans more than that, or one piece is all."""
    dims = sorted((d for d in range(len(shape)) if shape[d] != 1), key=lambda d: stride[d])
    if not dims or not elements_apart(shape, stride):
        return None
    outer = dims[-1]
    inner = 1 + sum((shape[d] - 1) * stride[d] for d in dims[:-1])  # the span of one index of ``outer``
    if inner > piece_elements:
        return None
    count = (piece_elements - inner) // stride[outer] + 1
    return (outer, count) if count < shape[outer] else None


def elements_apart(shape: Sequence[int], stride: Sequence[int]) -> bool:
    """Whether no two elements of a layout share memory, told by its strides ordered: each dim's
    stride beyond the reach of the dims of smaller strides (dims of one element aside; a layout
    whose elements are apart in a way this does not see counts as overlapping)."""
    reach = 0
    for size, step in sorted((pair for pair in zip(shape, stride) if pair[0] != 1), key=lambda pair: pair[1]):
        if step <= reach:
            return False
        reach += (size - 1) * step
    return True


def _tile_plan(splits: set[Optional[tuple[int, int]]]) -> Optional[dict[int, int]]:
    """``{dim: count}``: the tiles of the result, ``count`` consecutive indices along each ``dim``
    that is the outer dim of a PagedTensor larger than a piece (``splits``: each such tensor's
    :func:`_outer_split`), as many as its tightest tensor allows; None where a tensor has no such
    split or there is none.

    One dim: pieces of whole outer indices. Several (``a.T + b``, ``a.copy_(b.T)``): tiles narrowed
    along each, so every PagedTensor spans at most a piece in any tile. Either way a tile is the
    whole's layout narrowed, and no tile cuts the dim a kernel's vectorized inner loop runs along
    where every operand is contiguous along it (an outer dim of a tensor with two or more dims of
    more than one index is not contiguous in it)."""
    if not splits or None in splits:
        return None
    counts: dict[int, int] = {}
    for dim, count in splits:
        counts[dim] = min(count, counts.get(dim, count))
    return counts


def _other_views(tensors: list[torch.Tensor], target: Any) -> frozenset[int]:
    """The ids of the shaped PagedTensors to read as plain copies of each piece or tile: the views of
    an allocation other than its first (the written one first, then in argument order), such as
    ``t.T`` in ``t + t.T`` or ``t[n:]`` in ``t[:n] + t[n:]``. The dispatcher reads one allocation's
    views through one window spanning them, which a piece of each would fill where they lie apart
    or have other outer dims. (An in-place op reaches here only where those views' bytes lie apart
    from the ones it writes, so no piece reads bytes an earlier piece wrote.)"""
    first: dict[int, PagedTensor] = {}
    copied = set()
    for t in sorted(tensors, key=lambda t: t is not target):
        if isinstance(t, PagedTensor) and t.dim() > 0:
            if not same_view(t, first.setdefault(id(t._paged), t)):
                copied.add(id(t))
    return frozenset(copied)


def same_view(a: PagedTensor, b: PagedTensor) -> bool:
    """Whether two PagedTensors of one allocation view the same bytes the same way (in dtypes of one
    size: ``t.add_(t.view(torch.int32))`` reads at each index the bytes it writes there)."""
    return a._offset == b._offset and a.dtype.itemsize == b.dtype.itemsize and a.shape == b.shape and a.stride() == b.stride()


def may_share_bytes(a: PagedTensor, b: PagedTensor) -> bool:
    """Whether two PagedTensors of one allocation may share a byte: their byte spans meet, and they
    are not two views of one layout (shape, strides, item size) whose elements interleave without
    sharing one (``t[:, :n]`` and ``t[:, n:]``, ``t[:, ::2]`` and ``t[:, 1::2]``)."""
    (a_lo, a_hi), (b_lo, b_hi) = byte_span(a), byte_span(b)
    if not (a_lo < a_hi and b_lo < b_hi and a_lo < b_hi and b_lo < a_hi):
        return False
    if a.dtype.itemsize != b.dtype.itemsize or a.shape != b.shape or a.stride() != b.stride() or not elements_apart(a.shape, a.stride()):
        return True
    dims = sorted(((size, step) for size, step in zip(a.shape, a.stride()) if size > 1), key=lambda pair: pair[1], reverse=True)
    return _a_difference_of_elements(abs(b._offset - a._offset), dims)


def _a_difference_of_elements(delta: int, dims: Sequence[tuple[int, int]]) -> bool:
    """Whether ``delta`` is the distance between two elements of a layout of ``(size, stride)``
    dims, largest stride first, each stride beyond the reach of the dims after it
    (:func:`elements_apart`): ``delta == sum(d_k * stride_k)`` with ``|d_k| < size_k``. The digit of
    each dim leaves a rest the dims after it must reach, so at most three digits a dim are tried."""
    if not dims:
        return delta == 0
    (size, step), rest = dims[0], dims[1:]
    reach = sum((n - 1) * s for n, s in rest)
    low, high = max(-(size - 1), -((reach - delta) // step)), min(size - 1, (delta + reach) // step)
    return any(_a_difference_of_elements(abs(delta - digit * step), rest) for digit in range(low, high + 1))


def _run_in_tiles(func: OpOverload, args: tuple, kwargs: dict, result_layout: Optional[torch.Tensor], device: torch.device,
                  shape: tuple[int, ...], counts: dict[int, int], copied: frozenset[int] = frozenset(),
                  given: Optional[dict[int, torch.Tensor]] = None) -> Any:  # fmt: skip
    """``func`` run on tiles of every shaped tensor argument: ``counts[dim]`` consecutive indices
    along each ``dim`` of ``counts`` (of ``shape``), the tiles in row-major order of their dims, one
    tile of everything where ``counts`` is empty, the PagedTensors whose ids ``copied`` holds read as
    a plain copy of their tile (its layout) first, an operand expanded to ``shape`` whose id
    ``given`` holds as its tile of the tensor it expands (:func:`_tile_of_broadcast`); with
    ``result_layout``, a plain tensor on ``device`` of its layout filled by the tiles, else ``None``
    (the op wrote an argument)."""
    out = None
    dims = sorted(counts)
    given = given or {}
    for spans in itertools.product(*(_tile_spans(shape[dim], counts[dim]) for dim in dims)):
        cuts = [(dim, start, length) for dim, (start, length) in zip(dims, spans)]

        def tile(value: Any) -> Any:
            if id(value) in given:
                return _tile_of_broadcast(given[id(value)], len(shape), cuts)
            return _narrow(value, cuts).materialize() if id(value) in copied else _narrow(value, cuts)

        result = func(*(tile(value) for value in args), **{name: tile(value) for name, value in kwargs.items()})
        if result_layout is not None:
            if out is None:
                out = _result_like(result_layout, result, device)
            _narrow(out, cuts).copy_(result)
    return out


def _tile_spans(size: int, count: int) -> list[tuple[int, int]]:
    """``(start, length)`` of tiles of at most ``count`` consecutive indices of a dim of ``size``, in
    order. No tile is one index where tiles of two or more fit: such a tile drops the dim, and on
    the CPU a tensor then contiguous runs torch's vectorized loop, whose rounding of some functions
    (``gelu``) differs from the strided loop the whole runs (a transposed 41-row table's last row
    came out otherwise). The last two tiles then share the remainder: ``count - 1`` and 2."""
    spans = [(start, min(count, size - start)) for start in range(0, size, count)]
    if count > 2 and len(spans) > 1 and spans[-1][1] == 1:
        start = spans[-2][0]
        spans[-2:] = [(start, count - 1), (start + count - 1, 2)]
    return spans


def _result_like(result_layout: torch.Tensor, first: Any, device: torch.device) -> torch.Tensor:
    """The whole result of an op run in pieces: ``result_layout``'s shape and strides (its meta
    kernel's), of the dtype the op's own kernel gave its first piece ``first``, where a meta kernel
    infers another (``ldexp`` of int8 by a 0-dim bfloat16: float32 on meta, bfloat16 on the CPU;
    ``bool_t ** True``: int64 against bool)."""
    dtype = first.dtype if isinstance(first, torch.Tensor) else result_layout.dtype
    return torch.empty_strided(result_layout.shape, result_layout.stride(), dtype=dtype, device=device)


def _narrow(value: Any, cuts: Sequence[tuple[int, int, int]]) -> Any:
    """A tensor narrowed to indices ``[start, start + length)`` of ``dim`` for each ``(dim, start,
    length)`` of ``cuts`` (a 0-dim tensor and a number stay as they are)."""
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return value
    if isinstance(value, PagedTensor):
        shape, offset = list(value.shape), value._offset
        for dim, start, length in cuts:
            shape[dim] = length
            offset += start * value.stride(dim)
        return PagedTensor._make(value._paged, offset, tuple(shape), value.stride(), value.dtype, bits=math_bits(value))
    for dim, start, length in cuts:
        value = value.narrow(dim, start, length)
    return value


NOT_ONE_TARGET = object()


def written_target(info: "OpInfo", args: tuple) -> Any:
    """What an op writes: ``None`` (nothing), ``0`` (its first argument, in place), the name of its
    ``out=`` argument, or :data:`NOT_ONE_TARGET` (several arguments, or another one)."""
    if not info.written:
        return None
    if len(info.written) != 1:
        return NOT_ONE_TARGET
    position, name = info.written[0]
    if position == 0:
        return 0
    if name in info.out_names and position >= len(args):
        return name
    return NOT_ONE_TARGET


def is_elementwise(func: OpOverload) -> bool:
    """Whether each result element of ``func`` is made from its arguments' elements at the same index
    only (the ``pointwise`` tag, not seeded by a generator; ``copy_``, ``fill_``, ``zero_``; an
    in-place or ``out=`` form of a tagged op, which torch leaves untagged for some: ``abs_``,
    ``eq_``, ``gelu_``, ``relu.out``, ``isnan.out``)."""
    if func in _ELEMENTWISE or _tagged_pointwise(func):
        return True
    functional = functional_form(func)
    return functional is not None and _tagged_pointwise(functional)


def _tagged_pointwise(func: OpOverload) -> bool:
    return torch.Tag.pointwise in func.tags and torch.Tag.nondeterministic_seeded not in func.tags


def functional_form(func: OpOverload) -> Optional[OpOverload]:
    """The functional overload of an in-place overload (``abs_.default``: ``abs.default``) or an
    ``out=`` one (``relu.out``: ``relu.default``; ``bitwise_and.Scalar_Tensor_out``:
    ``bitwise_and.Scalar_Tensor``; the operator ``__irshift__.Scalar``: ``__rshift__.Scalar``), where
    aten has it; else None."""
    name, overload = func._schema.name.split("::")[-1], func._overloadname
    if name.endswith("_") and not name.endswith("__") and func._schema.is_mutable:
        name = name[:-1]
    elif name.startswith("__i") and name.endswith("__") and func._schema.is_mutable:  # t >>= k
        name = "__" + name[len("__i") :]
    elif overload == "out":
        overload = "default"
    elif overload.endswith("_out"):
        overload = overload[: -len("_out")]
    else:
        return None
    packet = getattr(aten, name, None)
    if not isinstance(packet, torch._ops.OpOverloadPacket) or overload not in packet.overloads():
        return None
    return getattr(packet, overload)


def _on_meta(func: OpOverload, args: tuple, kwargs: dict) -> Any:
    """``func`` run on meta tensors of its arguments' layouts."""
    return func(*(meta_layout(value) for value in args), **{name: meta_layout(value) for name, value in kwargs.items()})


def _stand_in(value: Any) -> Any:
    """A tensor as a zero-stride view of one element of its dtype and device, of its shape; anything
    else as it is."""
    if not isinstance(value, torch.Tensor):
        return value
    return torch.empty((), dtype=value.dtype, device=value.device).expand(value.shape)


_FLOAT8 = frozenset(dtype for dtype in vars(torch).values() if isinstance(dtype, torch.dtype) and "float8" in str(dtype))


# Ops whose kernels lay their result out contiguously whatever the inputs' layouts (``pow.Scalar``'s
# structured meta function sets its output with no strides; ``float_power.Scalar`` calls it), where
# torch's Python meta kernels keep the exponent's: ``2 ** t.T``. ``angle`` of a complex tensor joins
# them (:func:`_contiguous_result`): its one kernel for every device computes a complex result, then
# resizes an empty real one to its shape (contiguous) and copies it in; the meta kernel keeps the
# input's layout.
_CONTIGUOUS_RESULTS = frozenset({aten.pow.Scalar, aten.float_power.Scalar})

# Ops whose kernel is one TensorIterator over their tensor operands in their order, on every device
# (a structured meta function deriving TensorIteratorBase, which the CPU and CUDA kernels share, or one
# native function for both, ATen/ops/*_native.h listing no CUDA one: ``floor_divide``, and the logical
# ops through ``comparison_op``), where torch's Python meta kernel is
# a decomposition into several prims whose result takes the layout of an intermediate: xlogy's and
# xlog1py's last ``where(isnan(other), nan, ...)`` is laid out as ``other`` rather than ``self``, and
# an intermediate of a 0-dim operand expanded to the result's shape (``signbit(other)`` in copysign,
# ``ne(other, 0)`` in floor division) comes out contiguous and then decides the layout, where
# TensorIterator gives a 0-dim operand stride 0 in every dim, so that it decides nothing. Their result
# is laid out by TensorIterator's rule (:func:`_tensor_iterator_layout`). Left to the meta kernel: ops
# whose kernel puts its operands in another order (``threshold_backward`` reads ``self`` before
# ``grad_output``), is another composite (``ldexp``: ``self * 2 ** other``, the power contiguous), or
# differs on CUDA (``native_dropout_backward``).
_TENSOR_ITERATOR_RESULTS = frozenset(
    {
        aten.xlogy.Tensor,
        aten.special_xlog1py.default,
        aten.copysign.Tensor,
        aten.div.Tensor_mode,
        aten.floor_divide.default,
        aten.heaviside.default,
        aten.logaddexp.default,
        aten.logaddexp2.default,
        aten.logit_backward.default,
        aten.logical_and.default,
        aten.logical_or.default,
        aten.logical_xor.default,
    }
)


def _contiguous_result(func: OpOverload, args: tuple) -> bool:
    """Whether ``func``'s kernel lays its result out contiguously whatever its operands' layouts."""
    return func in _CONTIGUOUS_RESULTS or (func is aten.angle.default and args[0].is_complex())


def _tensor_iterator_layout(result: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    """``result`` (a meta tensor) laid out as TensorIterator lays out a new output: ordered as the
    tensor operands' strides order the dims, in their order, each broadcast to the result's shape
    (stride 0 along a broadcast dim, which orders nothing)."""
    operands = [meta_layout(value).expand(result.shape) for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor)]
    strides = compute_elementwise_output_strides(*operands) if operands else make_contiguous_strides_for(result.shape)
    return torch.empty_strided(result.shape, strides, dtype=result.dtype, device="meta")


def _as_float32_if_float8(value: Any) -> Any:
    """A float8 tensor as a float32 meta tensor of its layout; any other value as it is."""
    if isinstance(value, torch.Tensor) and value.dtype in _FLOAT8:
        return torch.empty_strided(value.shape, value.stride(), dtype=torch.float32, device="meta")
    return value


# Operators whose Python meta kernel refuses what their kernel takes (``bool_t << 1``: "Expected input
# tensor to have an integral dtype"), beside the op of the same kernel (the shift stub, one
# TensorIterator over the same operands) whose meta kernel takes it: the layout is read from that one.
_SAME_KERNEL_WITH_A_META = {
    aten.__lshift__.Tensor: aten.bitwise_left_shift.Tensor, aten.__lshift__.Scalar: aten.bitwise_left_shift.Tensor_Scalar,
    aten.__rshift__.Tensor: aten.bitwise_right_shift.Tensor, aten.__rshift__.Scalar: aten.bitwise_right_shift.Tensor_Scalar,
}  # fmt: skip


def _result_layout(func: OpOverload, args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """The op's result on meta tensors of its arguments' layouts (None if not one tensor). Where the
    meta kernel's promotion table lacks a pair (float8 with complex: a KeyError), the layout with the
    float8 operands as float32: the result's dtype is the op's own kernel's (:func:`_result_like`),
    which raises torch's error where torch refuses the promotion. A Python meta kernel's own
    complaint (``torch._refs``' ValueError for ``leaky_relu`` of an int tensor, where the kernel
    raises NotImplementedError) is not torch's error: None, and the kernel's check decides."""
    try:
        result = _on_meta(_SAME_KERNEL_WITH_A_META.get(func, func), args, kwargs)
    except (NotImplementedError, RuntimeError, ValueError, TypeError, AssertionError, OverflowError):  # (meta_complex's assert; int() of inf)
        return None
    except KeyError:
        try:
            result = _on_meta(func, tuple(map(_as_float32_if_float8, args)), {name: _as_float32_if_float8(value) for name, value in kwargs.items()})
        except (NotImplementedError, RuntimeError, KeyError):
            return None
    if not isinstance(result, torch.Tensor):
        return None
    if _contiguous_result(func, args):
        return torch.empty(result.shape, dtype=result.dtype, device="meta")
    if func in _TENSOR_ITERATOR_RESULTS:
        return _tensor_iterator_layout(result, args, kwargs)
    return result


def _raise_torchs_error(func: OpOverload, args: tuple, kwargs: dict) -> None:
    """Raise the error torch raises for ``func``'s arguments (shapes that do not broadcast), before
    any page is read: an op that writes none of them runs on zero-stride stand-ins of each on its own
    device, no memory of their sizes (the dense op's message: "The size of tensor a (256) must match
    ..."); one that writes one (a stand-in would overlap itself) on meta tensors of their layouts,
    if that raises an error other than a missing meta kernel's."""
    if not func._schema.is_mutable:
        func(*(_stand_in(value) for value in args), **{name: _stand_in(value) for name, value in kwargs.items()})
    else:
        _raise_the_functional_forms_shape_error(func, args, kwargs)
    try:
        _on_meta(func, args, kwargs)
    except (NotImplementedError, KeyError):  # KeyError: a pair the meta promotion table lacks (float8 with complex)
        return


def _raise_the_functional_forms_shape_error(func: OpOverload, args: tuple, kwargs: dict) -> None:
    """For an op that writes an argument in place or ``out=``, whose operands' shapes do not
    broadcast: the error its functional form raises on zero-stride stand-ins of them, where it is
    TensorIterator's shape error, the words the in-place kernel uses too ("The size of tensor a (256)
    must match the size of tensor b (3) at non-singleton dimension 1", where the meta kernel says
    "Attempting to broadcast a dimension of length 3"); nothing otherwise (nor where the operands but
    ``out=`` broadcast: the functional form would compute their whole result)."""
    functional = _functional_of_out(func) or functional_form(func)
    if functional is None:
        return
    outs = {argument.name for argument in func._schema.arguments if argument.is_out}
    kwargs = {name: value for name, value in kwargs.items() if name not in outs}
    if broadcast_shape([value for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor)]) is not None:
        return
    try:
        functional(*(_stand_in(value) for value in args), **{name: _stand_in(value) for name, value in kwargs.items()})
    except RuntimeError as error:
        if str(error).startswith("The size of tensor "):
            raise
    except Exception:  # noqa: BLE001 - any other complaint: the meta kernel's check decides
        pass


def _raise_torchs_error_on_stand_ins(func: OpOverload, args: tuple, kwargs: dict) -> None:
    """Raise the error torch raises for ``func``'s operands as they are, not their sizes (a dtype it
    refuses: ``gt`` of a complex tensor, ``gcd`` of a float one, ``mean`` of an int one, a float
    result into an int ``out=`` or in place into an int tensor), before any page is read: ``func`` on
    small stand-ins (:func:`small_stand_in`), no memory of the tensors' sizes. Every stand-in is a
    tensor of its own, so the op may write it: an ``out=`` one is empty (resized as torch resizes
    it, silently). A number the schema types as a Tensor (a composite kernel's wrapped number:
    ``bitwise_and.Scalar`` calls ``bitwise_and.Tensor`` with it, which reaches ``__torch_dispatch__``
    as a Python number, where the op itself refuses one) stands as a 0-dim tensor of its kind.

    The stand-ins keep two indices of each dim of more than one, so that a reduction over them
    warns as the whole would, not as torch warns on one element (``var``'s "degrees of freedom is
    <= 0"): a C++ warning of an op called inside ``__torch_dispatch__`` goes to the outer op's
    warning handler, surfacing after it returns, which ``warnings.catch_warnings`` here does not
    reach (torch offers no Python way to silence it). They keep each dim of size 0 or 1, so they
    broadcast as the tensors do: the kernel's error for a tensor written in place of another shape
    than the operands broadcast to names the real shapes (:func:`_in_real_shapes`). Where no stand-in
    can be made (a quantized dtype) nothing is raised."""
    arguments = func._schema.arguments
    by_name = {argument.name: argument for argument in arguments}

    def stand_in(argument: Any, value: Any) -> Any:
        if argument is not None and argument.is_out and isinstance(value, torch.Tensor):
            return torch.empty(0, dtype=value.dtype, device=value.device)
        if argument is not None and isinstance(argument.type, torch.TensorType) and type(value) in (bool, int, float, complex):
            # (an int past int64's range, up to 2**64 - 1, as torch takes it: a uint64)
            return torch.tensor(value, dtype=torch.uint64 if type(value) is int and value > 2**63 - 1 else None)
        return small_stand_in(value)

    try:
        stand_in_args = tuple(stand_in(arguments[i] if i < len(arguments) else None, value) for i, value in enumerate(args))
        stand_in_kwargs = {name: stand_in(by_name.get(name), value) for name, value in kwargs.items()}
    except Exception:  # noqa: BLE001 - no stand-in of such a dtype (a quantized one): nothing found
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            func(*stand_in_args, **stand_in_kwargs)
        except RuntimeError as error:
            real = _in_real_shapes(error, func, args, kwargs)
            if real is None:
                raise
            raise real from None


def _in_real_shapes(error: RuntimeError, func: OpOverload, args: tuple, kwargs: dict) -> Optional[RuntimeError]:
    """TensorIterator's error for a tensor written in place (``func``'s first argument) of another
    shape than its operands broadcast to, raised by the kernel on stand-ins (``output with shape [2,
    2] doesn't match the broadcast shape [2, 2, 2]``), naming the real shapes as torch does (``[64,
    256]``, ``[2, 64, 256]``); None for any other error. The stand-ins keep each dim of size 0 or 1
    (:func:`small_stand_in`), so they broadcast as the real tensors do."""
    first = func._schema.arguments[0] if func._schema.arguments else None
    if not (str(error).startswith("output with shape ") and args and isinstance(args[0], torch.Tensor)
            and first.alias_info is not None and first.alias_info.is_write):  # fmt: skip
        return None
    shape = broadcast_shape([value for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor)])
    if shape is None:
        return None
    return type(error)(f"output with shape {list(args[0].shape)} doesn't match the broadcast shape {list(shape)}")


def small_stand_in(value: Any) -> Any:
    """A tensor as a tensor of ones (zeros for a dtype torch cannot fill: ``bits8``, ``uint4``) of
    its dtype, device and dims with at most two indices along each (in lists and tuples too: tensors
    that broadcast together still do, and ones of one shape keep one), for torch's checks of dtypes,
    devices and ranks without memory of its size; anything else as it is. Ones, not zeros: an int
    divisor of zeros makes the kernel raise ``ZeroDivisionError``, which the real one need not."""
    if isinstance(value, torch.Tensor):
        shape = tuple(min(size, 2) for size in value.shape)
        try:
            return torch.ones(shape, dtype=value.dtype, device=value.device)
        except (RuntimeError, NotImplementedError):  # a dtype with no fill kernel: zeros
            return torch.zeros(shape, dtype=value.dtype, device=value.device)
    if type(value) in (list, tuple):
        return type(value)(small_stand_in(item) for item in value)
    return value


def one_element_stand_in(value: Any) -> Any:
    """A tensor as a zero tensor of one element of its dtype, device and dims (in lists and tuples
    too), for torch's checks of dtypes, devices and ranks without memory of its size; anything else
    as it is."""
    if isinstance(value, torch.Tensor):
        return torch.zeros((1,) * value.dim(), dtype=value.dtype, device=value.device)
    if type(value) in (list, tuple):
        return type(value)(one_element_stand_in(item) for item in value)
    return value


def piece_elements_of(tensors: list[torch.Tensor]) -> Optional[int]:
    """Elements a piece holds: as many pages of the widest paged dtype as the device tier holds for
    each allocation the op reaches at once beside the pages the calling thread pins now (an
    ``ensure_resident`` it holds, a KV cache's hot pins it took: :meth:`Pager.pinned_pages`), less
    one (a piece not starting on a page boundary straddles one more); None when the device tier
    cannot hold two pages of each. Where pages are pinned but the tensors' pages fit at once beside
    them (their own pinned pages need no room), a piece holds all of them. So every piece fits
    beside the thread's pins; other threads' pins are let go as their ops end, and a piece that
    needs their room waits for that (``pin_wait_s``).

    Where the pins leave room for two pages of one allocation but not of each, there is no piece
    (None), as on a tier of that room without pins: a caller may then go an allocation at a time
    (``cat`` of two tensors, :func:`~pagedtensor.handlers.parts._larger_than_a_piece`).

    Raises:
        DeviceTierFullError: the tier could hold pieces, but the thread's pinned pages leave room for fewer
            than two pages, and the tensors' pages do not fit at once beside them: nothing has been
            written, and no piece would fit, not even of one allocation (:class:`NoPieceBesidePins`,
            which the dispatcher names the op in).
    """
    paged = [t for t in tensors if isinstance(t, PagedTensor)]
    allocations: dict[int, set[int]] = {}  # per pager
    for t in paged:
        allocations.setdefault(id(t.pager), set()).add(id(t._paged))
    pagers = {id(t.pager): t.pager for t in paged}
    piece_bytes = min(_piece_bytes(pager, len(allocations[key]), [t for t in paged if t.pager is pager], paged) for key, pager in pagers.items())
    if piece_bytes < 1:
        return None
    return max(1, piece_bytes // max(t.dtype.itemsize for t in paged))


class NoPieceBesidePins(DeviceTierFullError):
    """:func:`piece_elements_of`'s error where the thread's pinned pages leave no piece room, raised
    without an op's name (the pieces, list ops and handlers sizing their parts call it alike): the
    dispatcher names the op it ran."""


def _piece_bytes(pager: "Pager", allocations: int, paged: list[PagedTensor], every: list[PagedTensor]) -> int:
    """Bytes of a piece on ``pager`` of ``paged`` (the op's PagedTensors there, of ``allocations``
    allocations), as :func:`piece_elements_of` says; ``every``: all the op's PagedTensors (a piece
    of all of them where those on ``pager`` fit at once beside its pins). Without pins no step
    beyond the tier's size."""
    capacity, page_size = pager.device_tier.capacity_pages, pager.page_size
    unpinned_piece = (capacity // allocations - 1) * page_size
    if not pager.any_pinned():
        return unpinned_piece
    spans: dict[int, tuple[int, int]] = {}  # allocation id: pages from its views' first to their last (a window's)
    for t in paged:
        if t.allocation is not None:
            first, stop = t.page_range()
            lo, hi = spans.get(t.allocation.id, (first, stop))
            spans[t.allocation.id] = (min(lo, first), max(hi, stop))
    pinned, inside = pager.pinned_pages([(key, lo, hi) for key, (lo, hi) in spans.items()])
    reached = sum(hi - lo for lo, hi in spans.values())
    if reached - inside <= capacity - pinned:
        whole = sum(span_elements(t) * t.dtype.itemsize for t in every)  # elements enough for each, in any dtype
        return max(unpinned_piece, whole * max(t.dtype.itemsize for t in every))
    pages = (capacity - pinned) // allocations - 1
    if pages < 1 and capacity - pinned - 1 >= 1:
        # Room for a piece of one allocation, not of each at once: no piece, as on a tier of that
        # room without pins (a caller may go an allocation at a time: cat, stack).
        return 0
    if pages < 1 <= unpinned_piece:
        raise NoPieceBesidePins(
            f"device tier: {pinned} of its {capacity} pages are pinned by this thread (its unreleased ensure_resident calls), leaving "
            f"room for {capacity - pinned}: a piece of the op needs 2 pages of each of its {allocations} allocations at once, and "
            f"its {reached} pages ({inside} of them pinned) do not fit at once; nothing was written. Release pins first, or raise "
            f"vram_limit ({pager.config.vram_limit} bytes = {capacity} pages of {page_size})"
        )
    return pages * page_size


def pages_reached(paged: Sequence[PagedTensor]) -> dict["Pager", set[tuple[int, int]]]:
    """The pages ``paged`` reach in all, per pager: ``(allocation id, page)`` pairs, each page once
    however many of the tensors reach it (the pages an op on all of them at once pins)."""
    pages: dict["Pager", set[tuple[int, int]]] = {}
    for t in paged:
        if t.allocation is not None:
            first, stop = t.page_range()
            pages.setdefault(t.pager, set()).update((t.allocation.id, page) for page in range(first, stop))
    return pages


def span_elements(t: torch.Tensor) -> int:
    """Elements from the first to one past the last element ``t`` reaches."""
    lo, hi = element_span(tuple(t.shape), t.stride(), 0)
    return hi - lo


def _read_if_zero_dim(value: Any) -> Any:
    return value.materialize() if isinstance(value, PagedTensor) and value.dim() == 0 else value


def _refuse_per_channel_quantized(func: OpOverload, values: Sequence[Any]) -> None:
    """Raise for a plain quantized operand whose quantizer is not per tensor: a run in pieces takes
    flat views of each operand, which torch refuses for such a quantizer (and its channels would not
    follow a flat piece)."""
    for value in values:
        if isinstance(value, torch.Tensor) and value.is_quantized and value.qscheme() not in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            raise NotImplementedError(
                f"{func}: a per-channel quantized operand ({value.qscheme()}, shape {tuple(value.shape)}) cannot run a piece "
                f"at a time beside a PagedTensor larger than the device tier; pass t.materialize() (a plain copy) for the PagedTensor"
            )


def flat_piece(value: Any, start: int, stop: int, copy: bool = False) -> Any:
    """Elements ``[start, stop)`` of a tensor's span as a 1-D view, a plain copy of it where ``copy``
    (a 0-dim tensor and a number stay as they are)."""
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return value
    if isinstance(value, PagedTensor):
        piece = PagedTensor._make(value._paged, value._offset + start, (stop - start,), (1,), value.dtype, bits=math_bits(value))
        return piece.materialize() if copy else piece
    return value.as_strided((stop - start,), (1,), value.storage_offset() + start)
