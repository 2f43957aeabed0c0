"""Handlers of copies and comparisons of PagedTensors larger than a piece of the device tier:
``clone``, ``cat``, ``stack``, ``equal`` and ``allclose``, a part of pages at a time; and ``copy_``
between layouts the elementwise pieces cannot follow.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Iterator, Optional

import torch
from torch._ops import OpOverload
from torch._prims_common import suggest_memory_format

from pagedtensor.config import normalize_device
from pagedtensor.dispatch import DISPATCHER, aten, implements, refuse_internal_overlap, refuse_overlap_with_input, resize_refused
from pagedtensor.errors import DeviceTierFullError
from pagedtensor.handlers.parts import (
    _arguments_by_name,
    _copies_in_parts,
    _cut_in_parts,
    _larger_than_a_piece,
    _narrowed,
    _parts,
    _plain_copy,
    copy_in_parts,
)
from pagedtensor.pieces import broadcast_shape, elements_apart, piece_elements_of, refuse_without_room_for_new_pages, resize_out_as
from pagedtensor.tensor import PagedTensor, meta_layout, meta_like


@implements([aten.clone.default])
def clone_in_pieces(func: OpOverload, types: tuple, args: tuple, kwargs: dict) -> Any:
    """``t.clone()`` of any ``memory_format`` (what ``t.t().contiguous()`` and ``t.t().reshape(-1)``
    run) of a PagedTensor larger than a piece: a plain tensor of the dense op's layout (its meta
    kernel's) filled a piece of pages at a time (:func:`copy_in_parts`). A conjugate or negative view
    is copied resolved, as ``clone`` resolves it (what torch's conjugate fallback runs before an op
    on such a view: ``t.conj() * 2``). A smaller one, or one that cannot be copied so
    (:func:`_copies_in_parts`), runs the generic way."""
    source = args[0]
    if not isinstance(source, PagedTensor) or not _copies_in_parts([source], resolving=True) or not _larger_than_a_piece([source]):
        return DISPATCHER.run_paged(func, types, args, kwargs)
    layout = func(meta_like(source), *args[1:], **kwargs)
    result = torch.empty_strided(layout.shape, layout.stride(), dtype=layout.dtype, device=source.device)
    copy_in_parts(result, source)
    return result


@implements([aten.copy_.default])
def copy_in_parts_of_any_layouts(func: OpOverload, types: tuple, args: tuple, kwargs: dict) -> Any:
    """``target.copy_(source)``: the generic way, a piece at a time where its pages do not fit
    (:mod:`pagedtensor.pieces`); where the pieces cannot follow the layouts (one index of the outer
    dim spans more than a piece: a plain ``target`` of another layout than a transposed ``source``,
    what ``F.pad`` of such a table copies into its result; a channels-last paged conv weight
    ``load_state_dict`` fills from a contiguous checkpoint, or ``t.to(memory_format=...)`` of one) and
    the device tier was the bound, it runs a part at a time whatever the layouts: a plain ``target``
    takes ``source`` (broadcast to it) a part of its pages at a time (:func:`copy_in_parts`); a paged
    ``target`` is written a part of its pages at a time, each part from the same elements of
    ``source``, a paged one read into a plain buffer first (a part at a time of its own pages). The
    same elements converted alike. A ``source`` sharing the target's pages keeps the error (a part
    written could be read later as the source)."""
    try:
        return DISPATCHER.run_generic(func, types, args, kwargs)
    except DeviceTierFullError:
        # Parts help only where they cut something: a copy no larger than a piece that does not fit
        # (other threads' pins fill the tier) keeps the error; cut again, it came back whole and
        # recursed without end.
        target, source = args[0], args[1]
        if not isinstance(source, torch.Tensor) or broadcast_shape([source, target]) != tuple(target.shape):
            raise  # copy_'s rule: the source broadcasts to the target
        refuse_internal_overlap(func, target)  # (parts of an expanded target would each be written whole)
        if not isinstance(target, PagedTensor):
            if not isinstance(source, PagedTensor) or not _copies_in_parts([target, source]) or not _cut_in_parts(source):
                raise
            copy_in_parts(target, source.expand(target.shape))
            return target
        if isinstance(source, PagedTensor):  # read into plain buffers a part at a time, even for a target of one part
            readable = _copies_in_parts([source], resolving=True) and source._paged is not target._paged
        else:
            readable = source.layout == torch.strided and _cut_in_parts(target)  # on any device: each part's copy_ moves it
        if not readable or not _copies_in_parts([target]) or not elements_apart(tuple(target.shape), target.stride()):
            raise  # (a target reaching an element twice: torch's overlap error, from the dense op)
        refuse_without_room_for_new_pages(func, [target])  # before the first part
        _copy_into_paged_in_parts(target, source.expand(target.shape))
        return target


def _copy_into_paged_in_parts(target: PagedTensor, source: torch.Tensor) -> None:
    """``target.copy_(source)`` (same shape, no page shared), a part of ``target``'s pages at a time;
    a paged ``source``'s part is first copied into a plain buffer a part of its own pages at a time.
    That buffer has the target part's dtype and strides (it spans no more than the part, at most a
    piece), so the conversion runs between the source's layout and the target's, as the dense
    ``copy_`` runs it: torch's CPU kernels write some values (a NaN converted to bfloat16) with
    other bits on a loop over two contiguous layouts than on a strided one. The buffer then goes
    into the part as it is, a copy of one dtype.

    Stream order: each part's copies run on the current stream, one part after another."""
    piece = piece_elements_of([target]) or 1
    for narrowings in _parts(target, piece):
        source_part, target_part = _narrowed(source, narrowings), _narrowed(target, narrowings)
        if isinstance(source_part, PagedTensor):
            plain = torch.empty_strided(target_part.shape, target_part.stride(), dtype=target_part.dtype, device=target_part.device)
            copy_in_parts(plain, source_part)  # converts; resolves a conjugate or negative bit, as copy_ does
            source_part = plain
        target_part.copy_(source_part)


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
    if paged:
        _raise_if_on_devices_apart(func, tensors, dim)
    if not paged or not _copies_in_parts(tensors) or not _larger_than_a_piece(paged):
        return DISPATCHER.run_paged(func, types, args, kwargs)
    layout = _concatenated_layout(func, tensors, dim)
    result = torch.empty_strided(layout.shape, layout.stride(), dtype=layout.dtype, device=paged[0].device)
    slices = _stacked_slices(result, tensors, dim) if func is aten.stack.default else _concatenated_slices(result, tensors, dim)
    for target, source in slices:
        copy_in_parts(target, source)
    return result


@implements([aten.cat.out, aten.stack.out])
def concatenate_into_out_in_pieces(func: OpOverload, types: tuple, args: tuple, kwargs: dict) -> Any:
    """``torch.cat(tensors, out=out)`` / ``torch.stack``: the generic way; where the device tier was
    the bound, each input is copied into its slice of ``out`` a part of pages at a time (``copy_``
    converts to ``out``'s dtype, as the dense op does), after torch's checks on the layouts (its
    errors, the casts it refuses) and before any page is read. A plain ``out`` of another shape is
    resized and restrided as torch does (:func:`_concatenated_memory_format`); a PagedTensor one
    raises (its pages are fixed). An ``out`` reaching an element twice, or sharing memory with an
    input as torch's checks see it, raises torch's error; any other sharing an allocation with an
    input keeps the pager's error (a slice written could be read later as an input)."""
    try:
        return DISPATCHER.run_generic(func, types, args, kwargs)
    except DeviceTierFullError:
        bound = _arguments_by_name(func, args, kwargs)
        tensors, dim, out = list(bound["tensors"]), bound["dim"], bound["out"]
        _raise_if_on_devices_apart(func, tensors, dim, out)
        # torch's overlap checks of out, before a slice is written that a later slice would read
        refuse_internal_overlap(func, out)
        for tensor in tensors:
            refuse_overlap_with_input(func, out, tensor)
        if not _copies_in_parts([*tensors, out]) or (
            isinstance(out, PagedTensor) and any(isinstance(t, PagedTensor) and t._paged is out._paged for t in tensors)
        ):
            raise
        _refuse_unreadable([*tensors, out])
        layout = _concatenated_layout(func, tensors, dim, out)
        if layout.shape != out.shape:
            if isinstance(out, PagedTensor):
                raise resize_refused(func, out.shape, layout.shape, args, kwargs) from None
            # a plain out= resized as torch resizes it (its warning's text too), and restrided to the
            # inputs' one memory format (the meta kernel does not restride)
            memory_format = _concatenated_memory_format(func, tensors, dim)
            resize_out_as(out, torch.empty(layout.shape, device="meta", memory_format=memory_format))
        refuse_without_room_for_new_pages(func, [out])  # each slice is a copy of its own: before the first
        slices = _stacked_slices(out, tensors, dim) if func is aten.stack.out else _concatenated_slices(out, tensors, dim)
        for target, source in slices:
            copy_in_parts(target, source)
        return out


@implements([aten.equal.default, aten.allclose.default])
def compare_in_pieces(func: OpOverload, types: tuple, args: tuple, kwargs: dict) -> bool:
    """``torch.equal`` / ``torch.allclose`` of a PagedTensor larger than a piece: the dense op on
    matching parts of the two (each copied to a plain tensor a piece of pages at a time), ``True``
    only if every part gives ``True``, stopping at the first that does not. Both ops are an AND over
    elements (``allclose`` is ``isclose(...).all()``), so this is the dense op's answer: dtypes
    compared as it compares them, its errors (from the first part), NaN unequal to itself unless
    ``equal_nan``. (``isclose``, made of elementwise ops, runs in pieces only where the two share one
    layout.) ``equal`` of other shapes is ``False``; ``allclose`` of other shapes compares the two
    broadcast to one shape (as ``isclose`` does), and raises torch's error where they do not broadcast,
    from zero-stride stand-ins, before any page is read."""
    a, b = args[0], args[1]
    if not _copies_in_parts([a, b]) or not _larger_than_a_piece([t for t in (a, b) if isinstance(t, PagedTensor)]):
        return DISPATCHER.run_paged(func, types, args, kwargs)
    if a.shape != b.shape:
        if func is aten.equal.default:
            return False
        shape = broadcast_shape([a, b])
        if shape is None:
            stand_ins = [torch.empty((), dtype=t.dtype, device=t.device).expand(t.shape) for t in (a, b)]
            return func(*stand_ins, *args[2:], **kwargs)  # raises torch's error
        a, b = a.expand(shape), b.expand(shape)
    return all(func(_plain_copy(part_a), _plain_copy(part_b), *args[2:], **kwargs) for part_a, part_b in _matching_parts(a, b))


def _refuse_unreadable(tensors: list[torch.Tensor]) -> None:
    """The error of a PagedTensor on a closed pager, or whose allocation was freed, before ``out``
    is resized or a slice of it written (each input is copied in turn: a later one's pages are met
    after the earlier ones' slices are written)."""
    for tensor in tensors:
        if isinstance(tensor, PagedTensor) and tensor._paged.allocation is not None:
            tensor._paged.pager._check_allocation(tensor._paged.allocation)


def _concatenated_layout(func: OpOverload, tensors: list[torch.Tensor], dim: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The result of ``cat`` / ``stack`` run on meta tensors of the inputs' layouts (and of ``out``'s,
    the ``out=`` form, returning that meta ``out`` as the kernel left it). Where that raises, the op
    raises torch's own error on zero-stride stand-ins of the inputs and ``out`` (its checks come
    before its result is allocated or written), nothing allocated. The dtypes are first promoted as
    the dense op promotes them, raising its error where torch refuses (uint16/32/64 with other ints,
    float8 with anything else), which the meta kernel does not."""
    functools.reduce(torch.promote_types, (t.dtype for t in tensors))
    outs = {} if out is None else {"out": meta_layout(out)}
    try:
        with warnings.catch_warnings():  # torch's warning that it resizes an out= of another shape: refused instead
            warnings.simplefilter("ignore")
            return func([meta_layout(t) for t in tensors], dim, **outs)
    except (RuntimeError, IndexError, ValueError, TypeError) as error:
        _run_on_stand_ins(func, tensors, dim, out)
        raise error


def _concatenated_memory_format(func: OpOverload, tensors: list[torch.Tensor], dim: int) -> torch.memory_format:
    """The memory format torch's ``cat`` gives an ``out`` it resizes: the one its inputs suggest, else
    contiguous (where they suggest several); ``stack`` is ``cat`` of its inputs unsqueezed at ``dim``."""
    layouts = [meta_layout(t) for t in tensors]
    if func is aten.stack.out:
        layouts = [t.unsqueeze(dim) for t in layouts]
    formats = {suggest_memory_format(t) for t in layouts}
    return formats.pop() if len(formats) == 1 else torch.contiguous_format


def _run_on_stand_ins(func: OpOverload, tensors: list[torch.Tensor], dim: int, out: Optional[torch.Tensor] = None) -> None:
    """``cat`` / ``stack`` on zero-stride stand-ins of ``tensors`` (and ``out``), each of its tensor's
    dtype and device, no memory of their sizes: torch's own error where it refuses the arguments
    (its checks come before its result is allocated or written), nothing where it takes them."""
    stand_ins = [torch.empty((), dtype=t.dtype, device=t.device).expand(t.shape) for t in tensors]
    outs = {} if out is None else {"out": torch.empty((), dtype=out.dtype, device=out.device).expand(out.shape)}
    func(stand_ins, dim, **outs)


def _raise_if_on_devices_apart(func: OpOverload, tensors: list[torch.Tensor], dim: int, out: Optional[torch.Tensor] = None) -> None:
    """torch's device error (from :func:`_run_on_stand_ins`) where ``tensors`` and ``out`` are not
    all on one device, before any page is reached (the pager's tier error would come first)."""
    if len({normalize_device(t.device) for t in (*tensors, *([] if out is None else [out])) if isinstance(t, torch.Tensor)}) > 1:
        _run_on_stand_ins(func, tensors, dim, out)


def _matching_parts(a: torch.Tensor, b: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The same parts of ``a`` and ``b`` (one shape), cut by the layout of the first that is paged."""
    reference = a if isinstance(a, PagedTensor) else b
    for narrowings in _parts(reference, piece_elements_of([reference]) or 1):
        yield _narrowed(a, narrowings), _narrowed(b, narrowings)


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
