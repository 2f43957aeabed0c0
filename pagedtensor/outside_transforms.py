"""The pager's own tensors are made and moved outside any ``torch.func`` transform and dispatch mode.

Called inside ``torch.func.grad`` / ``jvp`` / ``vjp`` / ``vmap`` (a paged model's weights faulted in
under ``torch.func.functional_call``, ``PagedTensor.wrap`` or ``materialize`` in a transformed
function), torch's ops would wrap what the pager makes at the transform's level: a slab grown there
would be a ``TensorWrapper`` with no storage, kept by the pager for every later op, and a copy into
a page, a captured tensor, would be refused as a mutation. Under a dispatch mode (``FakeTensorMode``
for shape and memory estimation, ``CrossRefFakeMode``, a tracing mode) a slab grown there would be a
FakeTensor, and a fault-in's copy would be faked: the pages marked resident, their bytes never
copied. The pager's bytes are not values of the transform or the mode: its methods run with the
transforms' interpreter stack cleared and the dispatch modes off, as torch runs code below them.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator, TypeVar

import torch

Method = TypeVar("Method", bound=Callable)

_peek_interpreter_stack = torch._C._functorch.peek_interpreter_stack
_dispatch_modes = torch._C._len_torch_dispatch_stack


def in_a_transform_or_mode() -> bool:
    """Whether a ``torch.func`` transform or a dispatch mode is active on this thread."""
    return _peek_interpreter_stack() is not None or _dispatch_modes() != 0


@contextlib.contextmanager
def below_transforms_and_modes() -> Iterator[None]:
    """A stretch with no ``torch.func`` transform and no dispatch mode active."""
    with contextlib.ExitStack() as stack:
        if _peek_interpreter_stack() is not None:
            from torch._functorch.pyfunctorch import temporarily_clear_interpreter_stack

            stack.enter_context(temporarily_clear_interpreter_stack())
        if _dispatch_modes():
            stack.enter_context(torch.utils._python_dispatch._disable_current_modes())
        yield


def outside_transforms(method: Method) -> Method:
    """``method`` run with no ``torch.func`` transform and no dispatch mode active (two C calls more
    where none is)."""

    @functools.wraps(method)
    def run(*args, **kwargs):
        if not in_a_transform_or_mode():
            return method(*args, **kwargs)
        with below_transforms_and_modes():
            return method(*args, **kwargs)

    return run  # type: ignore[return-value]
