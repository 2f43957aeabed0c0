"""The handler of factories written into a PagedTensor ``out=`` (``torch.zeros``, ``torch.ones``,
``torch.full``, ``torch.eye``; ``nn.init.eye_`` runs ``eye.m_out``): torch's own decomposition of
each, ``out.zero_()`` / ``out.fill_(value)`` and for ``eye`` the diagonal's ``fill_(1)``, so past the
device tier they run a piece of pages at a time as those ops do. And of ``fill_`` by a tensor value
(:func:`fill_by_a_tensor`): its value read first, as torch's kernel reads it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch._ops import OpOverload

from pagedtensor.dispatch import DISPATCHER, aten, implements
from pagedtensor.handlers.parts import _arguments_by_name
from pagedtensor.pieces import one_element_stand_in
from pagedtensor.tensor import PagedTensor, plain_copy


def _result_shape(func: OpOverload, args: tuple) -> tuple[int, ...]:
    """The shape ``func`` gives: ``eye(n)`` is ``(n, n)``, ``eye(n, m)`` ``(n, m)``, the others their size."""
    if func is aten.eye.out:
        return (args[0], args[0])
    if func is aten.eye.m_out:
        return (args[0], args[1])
    return tuple(args[0])


@implements([aten.zeros.out, aten.ones.out, aten.full.out, aten.eye.out, aten.eye.m_out])
def factory_into_paged_out(func: OpOverload, types: tuple, args: tuple, kwargs: dict) -> Any:
    """``torch.zeros(size, out=t)``, ``ones``, ``full(size, value)``, ``eye(n[, m])`` into a PagedTensor
    ``t`` of the result's shape: ``zero_``, ``fill_`` (and for ``eye`` the diagonal's ``fill_(1)``),
    as torch's own ``*_out`` kernels run after resizing ``out`` (which is then a no-op). Each of those
    runs on its pages, a piece at a time past the device tier. ``eye`` raises torch's errors
    (:func:`_check_eye`). Any other ``out`` (of another shape, which torch would resize) runs the
    generic way."""
    out = kwargs.get("out")
    eye = func in (aten.eye.out, aten.eye.m_out)
    if not isinstance(out, PagedTensor) or tuple(out.shape) != _result_shape(func, args):
        if eye and isinstance(out, PagedTensor):
            _check_eye(func, args, out)  # before the generic way faults ``out`` in
        return DISPATCHER.run_generic(func, types, args, kwargs)
    if func is aten.full.out:
        return out.fill_(args[1])
    if func is aten.ones.out:
        return out.fill_(1)
    out.zero_()
    if eye:
        _check_eye(func, args, out)  # torch's kernel zeroes ``out``, then refuses its dtype
        if out.numel():
            torch.diagonal(out).fill_(1)
    return out


def _check_eye(func: OpOverload, args: tuple, out: PagedTensor) -> None:
    """torch's errors of ``eye`` into ``out``: a negative ``n`` or ``m``, a dtype its kernel on
    ``out``'s device refuses (``uint16``, ``complex32`` on the CPU). From torch's own kernel, into an
    empty tensor of ``out``'s dtype and device (the sizes clamped to at most 0: nothing is made)."""
    func(*(min(size, 0) for size in args), out=torch.empty(0, dtype=out.dtype, device=out.device))


@implements([aten.fill_.Tensor])
def fill_by_a_tensor(func: OpOverload, types: tuple, args: tuple, kwargs: dict) -> Any:
    """``t.fill_(value)`` with ``value`` a tensor: torch's check of its dims first, then a 0-dim
    PagedTensor value read into a plain one, and the op the generic way (a piece of pages at a
    time past the device tier).

    torch's kernel refuses a value of one or more dims before anything ("fill_ only supports
    0-dimension value tensor"), and fills by a copy of the value where it is a view of ``t``
    (``t.fill_(t[0, 0])``): the value is read before any element is written. Read here first, the
    value is no view of the pages written, so the pieces run (they refuse a view that may share a
    byte they write, and the whole table at once does not fit). The check runs on one-element
    stand-ins of the dtypes, devices and dims (no page read); the generic way of a strided view
    (``t[:, 0].fill_(torch.tensor([[3.0]]))``, ``t.diagonal()``) raised the pager's error before
    torch's.
    """
    bound = _arguments_by_name(func, args, kwargs)
    table, value = bound["self"], bound["value"]
    if isinstance(value, torch.Tensor) and value.dim() != 0:
        func(torch.empty((), dtype=table.dtype, device=table.device), one_element_stand_in(value))  # torch's error
    if isinstance(value, PagedTensor):  # (0-dim: one number)
        value = plain_copy(value)
        if not isinstance(table, PagedTensor):
            return func(table, value)  # a plain table: torch's own op
        args, kwargs = (table, value), {}
    return DISPATCHER.run_generic(func, types, args, kwargs)
