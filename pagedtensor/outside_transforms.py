"""The pager's own tensors are made and moved outside any ``torch.func`` transform.

Called inside ``torch.func.grad`` / ``jvp`` / ``vjp`` / ``vmap`` (a paged model's weights faulted in
under ``torch.func.functional_call``, ``PagedTensor.wrap`` or ``materialize`` in a transformed
function), torch's ops would wrap what the pager makes at the transform's level: a slab grown there
would be a ``TensorWrapper`` with no storage, kept by the pager for every later op, and a copy into
a page, a captured tensor, would be refused as a mutation. The pager's bytes are not values of the
transform: its methods run with the transforms' interpreter stack cleared, as torch runs code below them.
"""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

import torch

Method = TypeVar("Method", bound=Callable)


def in_a_transform() -> bool:
    """Whether a ``torch.func`` transform is active on this thread."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def outside_transforms(method: Method) -> Method:
    """``method`` run with no ``torch.func`` transform active (one C call more where none is)."""

    @functools.wraps(method)
    def run(*args, **kwargs):
        if torch._C._functorch.peek_interpreter_stack() is None:
            return method(*args, **kwargs)
        from torch._functorch.pyfunctorch import temporarily_clear_interpreter_stack

        with temporarily_clear_interpreter_stack():
            return method(*args, **kwargs)

    return run  # type: ignore[return-value]
