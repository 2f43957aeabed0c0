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
    (``async_op=True`` and ``irecv`` return work that is already complete, and that tells what
    torch's tells: its future's value and ``result()`` with the PagedTensors in place of the copies,
    a receive's source rank), on the calling thread, and its results are then copied in. One that
    only reads (``isend``) runs as torch's, on the copies, which its work keeps. What a ``c10d`` op
    writes: its tensor arguments but those named ``input*`` (and none of ``send``'s or a barrier's);
    a ``_c10d_functional`` op's: those its schema marks, and the receives of ``irecv`` and
    ``batch_p2p_ops``, whose schemas mark none.
"""

from __future__ import annotations

import functools
import threading
from typing import Any, Callable

import torch
from torch._ops import OpOverload
from torch.utils._pytree import tree_leaves, tree_map

from pagedtensor.list_ops import _written_names as _schema_written_names
from pagedtensor.tensor import PagedTensor

_READ_ONLY_OPS = frozenset({"c10d::send", "c10d::barrier", "c10d::monitored_barrier_"})


@functools.cache
def _written_names(func: OpOverload) -> frozenset[str]:
    """The arguments of the collective ``func`` that it writes (see the module docstring; for
    ``batch_p2p_ops``, :func:`_written_leaves` picks its received tensors)."""
    schema = func._schema
    if schema.name == "_c10d_functional::irecv":  # writes its tensor in place, unmarked in its schema
        return frozenset({"tensor"})
    if func.namespace == "_c10d_functional":
        return _schema_written_names(func)
    if schema.name in _READ_ONLY_OPS:
        return frozenset()
    return frozenset(a.name for a in schema.arguments if "Tensor" in str(a.type) and not a.name.startswith("input"))


def _written_leaves(func: OpOverload, bound: dict[str, Any]) -> list[PagedTensor]:
    """The PagedTensors the collective ``func`` called with the arguments ``bound`` writes."""
    if func._schema.name == "_c10d_functional::batch_p2p_ops":  # the tensors of its "irecv"s, unmarked in its schema
        received = [t for op, t in zip(bound["op_list"], bound["tensors"]) if op == "irecv"]
        return [t for t in received if isinstance(t, PagedTensor)]
    written_names = _written_names(func)
    return [leaf for name, value in bound.items() if name in written_names for leaf in tree_leaves(value) if isinstance(leaf, PagedTensor)]


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
    written = _written_leaves(func, bound)

    def to_original(value: Any) -> Any:
        return tree_map(lambda leaf: originals.get(id(leaf), leaf) if isinstance(leaf, torch.Tensor) else leaf, value)

    if written:
        # Waited for here, its results copied in; the caller gets work already complete (a gloo
        # send's or recv's own work cannot be waited for twice).
        _wait(func, out)
        for leaf in written:
            leaf.copy_(dense[id(leaf)])
        out = tree_map(lambda value: _completed_work(func, torch.distributed.Work.unbox(value), to_original) if _is_work(value) else value, out)
    # (else the work reads the dense copies, which it keeps alive: not waited for, as torch's)
    return to_original(out)


def _is_work(value: Any) -> bool:
    """Whether ``value`` is a collective's ``Work`` (a ``ScriptObject`` inside the dispatcher)."""
    return not isinstance(value, torch.Tensor) and hasattr(value, "wait")


def _completed_work(func: OpOverload, work: Any, to_original: Callable[[Any], Any]) -> Any:
    """A ``Work`` that is already complete, in place of ``func``'s ``work`` (waited for), boxed as
    the dispatcher passes one. It answers as ``work`` does: its future's value and ``result()`` (the
    dense copies in them given as their PagedTensors by ``to_original``), or, for a receive from any
    source, the sender's rank."""
    if func._schema.name == "c10d::recv_any_source_":
        return _source_rank_work(work._source_rank())
    future: torch.futures.Future = torch.futures.Future()
    try:
        future.set_result(to_original(work.get_future().value()))
    except RuntimeError:  # no future (a gloo send's or recv's work): as before, none to give
        future.set_result(None)
    return torch._C._distributed_c10d._create_work_from_future(future).boxed()


def _source_rank_work(source_rank: int) -> Any:
    """A complete ``Work`` (boxed) whose ``_source_rank()`` is ``source_rank``: a Python subclass of
    ``Work``, the one way to answer it (torch's own complete work, made from a future, raises there).
    Its Python object must outlive the dispatcher's return, or the caller would get a bare ``Work``
    of it (whose ``wait`` never returns): the thread keeps the last one until its next."""
    work = _source_rank_work_class()(source_rank)
    _kept.source_rank_work = work
    return work.boxed()


_kept = threading.local()


@functools.cache
def _source_rank_work_class() -> type:
    """The class of :func:`_source_rank_work` (made on first use: torch.distributed may be absent)."""

    class SourceRankWork(torch.distributed.Work):
        """A receive's work after its wait, which tells the rank it received from."""

        def __init__(self, source_rank: int) -> None:
            super().__init__()
            self.source_rank = source_rank

        def wait(self, timeout: Any = None) -> bool:
            return True

        def is_completed(self) -> bool:
            return True

        def is_success(self) -> bool:
            return True

        def _source_rank(self) -> int:
            return self.source_rank

    return SourceRankWork


def _wait(func: OpOverload, out: Any) -> None:
    """Wait for the work of the collective ``func`` that returned ``out``: its ``Work`` objects
    (``c10d``), or each tensor it returned (``_c10d_functional``: ``wait_tensor``)."""
    for leaf in tree_leaves(out):
        if isinstance(leaf, torch.Tensor):
            if func.namespace == "_c10d_functional" and func.overloadpacket is not torch.ops._c10d_functional.wait_tensor:
                torch.ops._c10d_functional.wait_tensor(leaf)
        elif _is_work(leaf):
            leaf.wait()
