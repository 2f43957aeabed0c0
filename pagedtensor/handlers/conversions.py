"""The handler of ``_to_copy`` (``t.to(dtype)``, ``t.half()``, ``module.half()``): a conversion on the
pager's device gives a new PagedTensor on the same pager.
"""

from __future__ import annotations

from typing import Any

import torch
from torch._ops import OpOverload

from pagedtensor.config import normalize_device
from pagedtensor.dispatch import DISPATCHER, _OpTooLarge, aten, implements
from pagedtensor.errors import DeviceTierFullError
from pagedtensor.tensor import PagedStorage, PagedTensor, element_span, meta_like


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
        DeviceTierFullError: the copy neither fits at once nor runs in pieces (a view whose elements
            do not fill its span, converted to another layout). Nothing is left allocated.
        OutOfPagesError: the host tier (and disk tier, if any) has no room for the result.
    """
    source = args[0]
    device = kwargs.get("device")
    if (
        not isinstance(source, PagedTensor)
        or (device is not None and normalize_device(torch.device(device)) != normalize_device(source.device))
        or kwargs.get("layout") not in (None, torch.strided)
        or kwargs.get("pin_memory")
        or _inside_autocast()
    ):  # fmt: skip
        return _convert_into_plain_tensor(func, types, args, kwargs)
    layout = _meta_layout(func, source, kwargs)
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
    except DeviceTierFullError:
        # The two do not fit at once and cannot run in pieces (an expanded view converted into a
        # result many times its span): the dense conversion, as any op runs, then paged through
        # the pager in chunks (PagedTensor.wrap). A full host or disk tier, or the machine's memory
        # (SlabAllocationError), is raised as it is: the dense conversion would need the same room.
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


def _convert_into_plain_tensor(func: OpOverload, types: tuple, args: tuple, kwargs: dict) -> Any:
    """The conversions that give a plain tensor (another device, layout or pinned memory, or inside
    ``torch.autocast``): the dense op where the pages fit on the device tier at once; past it, a
    strided result laid out as the dense op lays it out, written by ``copy_`` a piece of pages at a
    time (on a CUDA pager, each piece's copy is ordered on the current stream like the dense op's). A
    conversion to ``meta`` reads no page: only the layout is made."""
    source = args[0]
    if not isinstance(source, PagedTensor):
        return DISPATCHER.run_paged(func, types, args, kwargs)
    device = kwargs.get("device")
    if device is not None and torch.device(device).type == "meta":
        return func(meta_like(source), **kwargs)
    try:
        return DISPATCHER.run_paged(func, types, args, kwargs)
    except _OpTooLarge:
        if kwargs.get("layout") not in (None, torch.strided):
            raise
    layout = _meta_layout(func, source, kwargs)
    result = torch.empty_strided(layout.shape, layout.stride(), dtype=layout.dtype, device=device if device is not None else source.device,
                                 pin_memory=bool(kwargs.get("pin_memory")))  # fmt: skip
    return result.copy_(source, non_blocking=bool(kwargs.get("non_blocking", False)))


def _meta_layout(func: OpOverload, source: PagedTensor, kwargs: dict) -> torch.Tensor:
    """The conversion's result as the meta kernel lays it out (shape, strides, dtype), device aside.
    Where the meta kernel is missing (a quantized dtype: ``QuantizedMeta`` has no ``empty_strided``),
    torch's own error, from its kernel on an empty tensor of the source's dtype (no page read), is
    raised instead; where that kernel takes it, the meta kernel's error stands."""
    layout_kwargs = {name: value for name, value in kwargs.items() if name not in ("device", "pin_memory")}
    try:
        return func(meta_like(source), **layout_kwargs)
    except NotImplementedError:
        func(torch.empty(0, dtype=source.dtype), **layout_kwargs)  # torch's error, if its kernel refuses too
        raise


def _inside_autocast() -> bool:
    """Whether this thread runs inside a ``torch.autocast`` region, enabled or not. (Inside autocast's
    own kernels, which cast matmul operands, ``torch.is_autocast_enabled`` reads False: they exclude
    its key, as a region entered with ``enabled=False`` does, so the two cannot be told apart.
    The nesting count ``torch.autocast`` keeps is read by raising and restoring it, which has no
    other effect: the Python context manager clears its cache when it reaches 0.)"""
    level = torch.autocast_increment_nesting()
    torch.autocast_decrement_nesting()
    return level > 1


@implements([aten.dequantize.self])
def dequantize_of_pages(func: OpOverload, types: tuple, args: tuple, kwargs: dict) -> Any:
    """``t.dequantize()`` of a PagedTensor (never a quantized one): torch's kernel of a tensor not
    quantized, ``t.to(torch.float32)``: the tensor itself where it is float32, so writes through the
    result reach its pages (the schema names no alias, so the generic way returned a dense copy),
    else its conversion (:func:`convert_into_pages`)."""
    return args[0].to(torch.float32)
