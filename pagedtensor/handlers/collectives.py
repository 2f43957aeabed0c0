"""torch.distributed's collectives (the ``c10d`` and ``_c10d_functional`` ops) with PagedTensor
arguments: each runs on dense copies of the PagedTensors; one that writes a PagedTensor is waited
for, and the copies it writes are written back into the pages.

Why not a view of the slab, as other ops get: the ``c10d`` schemas mark no argument as written
(``allreduce_(Tensor[] tensors, ...)``), so the generic way wrote nothing back (a gathered window's
result was dropped, a clean page's reverted on eviction), and a collective is queued work that reads
and writes its tensors after the op returns, when the pager may have given their slots to other
pages (``isend`` sent another tensor's bytes).

Note:
    A collective that writes a PagedTensor is synchronous: its work is waited for before it returns
    (``async_op=True`` and ``irecv`` return work that is already complete), on the calling thread,
    and its results are then copied in. One that only reads (``isend``) runs as torch's, on the
    copies, which its work keeps. What a ``c10d`` op writes: its tensor arguments but those named
    ``input*`` (and none of ``send``'s or a barrier's); a ``_c10d_functional`` op's: those its
    schema marks.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch._ops import OpOverload
from torch.utils._pytree import tree_leaves, tree_map

from pagedtensor.list_ops import _written_names as _schema_written_names
from pagedtensor.tensor import PagedTensor

_READ_ONLY_OPS = frozenset({"c10d::send", "c10d::barrier", "c10d::monitored_barrier_"})


@functools.cache
def _written_names(func: OpOverload) -> frozenset[str]:
    """The arguments of the collective ``func`` that it writes (see the module docstring)."""
    schema = func._schema
    if func.namespace == "_c10d_functional":
        return _schema_written_names(func)
    if schema.name in _READ_ONLY_OPS:
        return frozenset()
    return frozenset(a.name for a in schema.arguments if "Tensor" in str(a.type) and not a.name.startswith("input"))


def run_collective(func: OpOverload, args: tuple, kwargs: dict) -> Any:
    """``func`` on dense copies of its PagedTensor arguments (their values, sizes and strides: torch's
    own checks, a non-contiguous tensor's among them, see them); where it writes a PagedTensor, its
    work waited for, then each copy it writes copied into its PagedTensor, and its work returned as
    work already complete. Results: the op's, a dense copy of an argument replaced by that argument
    (the in-place collectives return their tensors)."""
    dense: dict[int, torch.Tensor] = {}
    originals: dict[int, PagedTensor] = {}

    def to_dense(value: Any) -> Any:
        if isinstance(value, PagedTensor):
            copy = dense.get(id(value))
            if copy is None:
                copy = dense[id(value)] = value.materialize()
                originals[id(copy)] = value
            return copy
        return value

    names = [argument.name for argument in func._schema.arguments]
    bound = dict(zip(names, args))
    bound.update(kwargs)
    dense_args = tree_map(to_dense, tuple(args))
    dense_kwargs = tree_map(to_dense, dict(kwargs))
    out = func(*dense_args, **dense_kwargs)
    written_names = _written_names(func)
    written = [leaf for name, value in bound.items() if name in written_names for leaf in tree_leaves(value) if isinstance(leaf, PagedTensor)]
    if written:
        # Waited for here, its results copied in; the caller gets work already complete (a gloo
        # send's or recv's own work cannot be waited for twice).
        _wait(func, out)
        for leaf in written:
            leaf.copy_(dense[id(leaf)])
        out = tree_map(lambda value: _completed_work() if _is_work(value) else value, out)
    # (else the work reads the dense copies, which it keeps alive: not waited for, as torch's)
    return tree_map(lambda value: originals.get(id(value), value) if isinstance(value, torch.Tensor) else value, out)


def _is_work(value: Any) -> bool:
    """Whether ``value`` is a collective's ``Work`` (a ``ScriptObject`` inside the dispatcher)."""
    return not isinstance(value, torch.Tensor) and hasattr(value, "wait")


def _completed_work() -> Any:
    """A ``Work`` that is already complete (boxed, as the dispatcher passes one)."""
    future: torch.futures.Future = torch.futures.Future()
    future.set_result(None)
    return torch._C._distributed_c10d._create_work_from_future(future).boxed()


def _wait(func: OpOverload, out: Any) -> None:
    """Wait for the work of the collective ``func`` that returned ``out``: its ``Work`` objects
    (``c10d``), or each tensor it returned (``_c10d_functional``: ``wait_tensor``)."""
    for leaf in tree_leaves(out):
        if isinstance(leaf, torch.Tensor):
            if func.namespace == "_c10d_functional" and func.overloadpacket is not torch.ops._c10d_functional.wait_tensor:
                torch.ops._c10d_functional.wait_tensor(leaf)
        elif _is_work(leaf):
            leaf.wait()
