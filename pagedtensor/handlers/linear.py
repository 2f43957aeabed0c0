"""Outside the dispatcher: :func:`paged_linear` runs ``F.linear`` on a PagedTensor weight's pinned pages
directly (what a paged model's ``nn.Linear`` calls), and :func:`paged_conv1d` transformers' ``Conv1D``
(GPT-2's), falling back to the dispatcher where that would be wrong. Both are re-exported by
:mod:`pagedtensor.dispatch`.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.autograd import forward_ad

from pagedtensor.dispatch import _empty_like_leaf, _Window, torchs_argument_error
from pagedtensor.errors import OutOfPagesError, SlabAllocationError, out_of_pages_for
from pagedtensor.interrupts import deferring
from pagedtensor.tensor import PagedTensor, byte_span


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
    (they would see the slots' view in place of the PagedTensor), and ``torch.func`` transforms
    (``grad``, ``jvp``, ``vmap``: their autograd would save the view of slots the pager reuses).

    Stream order, on CUDA: as any op on a PagedTensor (:mod:`pagedtensor.dispatch`): the current stream waits
    for the copies that filled the pages, ``linear`` runs on it, and the release records an event
    on it after ``linear``, so a slot is reused only after the read.

    Raises:
        RuntimeError: torch's own error where ``linear`` refuses the arguments (shapes, dtypes), also
            where the weight does not fit, as within the tier.
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
        or torch._C._functorch.peek_interpreter_stack() is not None
        or forward_ad._current_level >= 0  # a dual's tangent: torch carries it on the PagedTensor, not on a view of its pages
    ):  # fmt: skip
        return op(input, weight, bias)
    return _on_the_weights_pages(op, input, weight, bias)


@deferring
def _on_the_weights_pages(op: Callable[..., torch.Tensor], input: torch.Tensor, weight: PagedTensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The rest of :func:`_with_resident_weight`: ``op`` on a dense view of the weight's pinned pages
    (never traced by Dynamo: the compile check comes first)."""
    lo, hi = byte_span(weight)
    if lo == hi:
        return op(input, _empty_like_leaf(weight), bias)
    try:
        window = _Window(weight._paged, lo, hi)
    except SlabAllocationError:  # the machine's memory, not the weight's size: raised as it is
        raise
    except OutOfPagesError as error:
        # The weight does not fit: where torch refuses the arguments (an input of another inner dim
        # or dtype), its own error, as within the tier, before the pager's (checked on stand-ins,
        # no page read: torchs_argument_error).
        refused = torchs_argument_error(op, (input, weight, bias), {}, dtypes=True)
        if refused is not None:
            raise refused from None
        raise type(error)(out_of_pages_for(f"{op.__name__}: its PagedTensor weight", error, plural=False)) from error
    try:
        return op(input, window.dense(weight), bias)  # a new tensor: never a view of the slots
    finally:
        window.release()
