"""The handler of random ops called in forms that draw no number: ``rrelu`` in eval mode
(``aten.rrelu_with_noise`` with ``training=False``, ``nn.RReLU`` after ``model.eval()``) is
``leaky_relu`` with the slope ``(lower + upper) / 2``, and ``native_dropout`` with ``train=False``
is a clone and a mask of ones, as torch's kernels compute them. Past the device tier those run a
piece of pages at a time, as any elementwise op; a random op that draws raises the pager's error
there, since no run in pieces draws its numbers in the kernel's order.
"""

from __future__ import annotations

from typing import Any

import torch
from torch._ops import OpOverload

from pagedtensor.dispatch import DISPATCHER, aten, implements
from pagedtensor.handlers.parts import _arguments_by_name


@implements([aten.rrelu_with_noise.default, aten.rrelu_with_noise_.default, aten.native_dropout.default])
def random_op_drawing_nothing(func: OpOverload, types: tuple, args: tuple, kwargs: dict) -> Any:
    """A form that draws nothing as the ops torch's kernel runs for it, each a piece at a time past
    the tier (and within it the same bits as the kernel):

    - ``rrelu_with_noise(self, noise, lower, upper, training=False)``: ``leaky_relu``, made
      contiguous (torch's result is an ``empty_like`` of the legacy contiguous format), or in place
      for ``rrelu_with_noise_``;
    - ``native_dropout(input, p, train=False)``: ``input.clone()`` and a bool mask of ones; of an
      empty ``input`` on the CPU, whatever ``train``, ``input`` itself and an ``empty_like`` of it.

    A form that draws (``training=True``, ``train`` True or None), or a ``noise`` of another shape
    than ``self`` (torch's error within the tier), goes the generic way: past the tier it raises the
    pager's error."""
    bound = _arguments_by_name(func, args, kwargs)
    if func is aten.native_dropout.default:
        source = bound["input"]
        if source.numel() == 0 and source.device.type == "cpu":  # torch's CPU kernel, whatever ``train``
            return source, torch.empty_like(source)
        if bound["train"] is not False:
            return DISPATCHER.run_generic(func, types, args, kwargs)
        return source.clone(), torch.ones_like(source, dtype=torch.bool)
    if bound["training"] or tuple(bound["noise"].shape) != tuple(bound["self"].shape):
        return DISPATCHER.run_generic(func, types, args, kwargs)
    # As torch computes the slope: the two scalars added and halved as tensors, read back.
    slope = ((torch.scalar_tensor(bound["lower"], dtype=torch.float64) + bound["upper"]) / 2).item()
    source = bound["self"]
    if func is aten.rrelu_with_noise_.default:
        return aten.leaky_relu_.default(source, slope)
    result = aten.leaky_relu.default(source, slope)  # in the source's layout
    return result if result.is_contiguous() else result.contiguous()
