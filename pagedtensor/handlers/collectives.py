"""torch.distributed's collectives (the ``c10d`` and ``_c10d_functional`` ops) with PagedTensor
arguments: each runs on dense copies of the PagedTensors, and the copies it writes are written back
into the pages when the caller waits for it.

Why not a view of the slab, as other ops get: the ``c10d`` schemas mark no argument as written
(``allreduce_(Tensor[] tensors, ...)``), so the generic way wrote nothing back (a gathered window's
result was dropped, a clean page's reverted on eviction), and a collective is queued work that reads
and writes its tensors after the op returns, when the pager may have given their slots to other
pages (``isend`` sent another tensor's bytes).

Note:
    A collective that writes a PagedTensor is not waited for inside the op (a rank's ``irecv``
    waited for there, before its own ``isend`` was posted, hung both ranks of a
    ``batch_isend_irecv([irecv, isend])``). A ``c10d`` op returns, in place of torch's work, work
    that completes it: its first ``wait()`` (``synchronize()`` and ``block_current_stream()`` wait
    too) waits for torch's work, then copies each written dense copy into its PagedTensor, on the
    calling thread and the current stream (so, with NCCL, after the collective on that stream), once;
    ``is_completed()``, when torch's work reports complete, copies them in before it returns True;
    ``get_future()`` / ``get_future_result()`` and ``result()`` complete it first (they block), and
    give what torch's give, the PagedTensors in place of the copies (``None`` as the future's value
    of a gloo send's or recv's work, which has none); ``_source_rank()`` is torch's work's. Later
    waits return at once (torch's gloo recv work cannot be waited for twice). The synchronous
    callers (``async_op=False``, ``dist.recv``) wait for it before they return, so their
    PagedTensors hold the results then, as before. Until that wait the pages keep their old bytes:
    read before it (undefined in torch too), a PagedTensor shows what it held before the op, and a
    work never waited for (nor seen complete) never writes it. Such a work is kept alive, with its
    dense copies, until it completes (for good if it never does): a Python ``Work`` returned through
    the dispatcher whose Python object died would reach the caller as a bare ``Work``, whose
    ``wait`` never returns; once complete it is let go. A ``_c10d_functional`` op that writes a
    PagedTensor returns it, unwaited; ``wait_tensor`` of that PagedTensor waits for the op (for each
    such op not yet waited for, in order) and then copies in, as above (read before it, the pages
    hold their old bytes). One that only reads (``isend``) runs as torch's, on the copies, which its
    work keeps. What a ``c10d`` op writes: its tensor arguments but those named ``input*`` (and none
    of ``send``'s or a barrier's); a ``_c10d_functional`` op's: those its schema marks, and the
    receives of ``irecv`` and ``batch_p2p_ops``, whose schemas mark none.
"""

from __future__ import annotations

import functools
import threading
from typing import Any, Callable

import torch
from torch._ops import OpOverload
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.weak import WeakIdKeyDictionary

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
    own checks, a non-contiguous tensor's among them, see them); where it writes a PagedTensor, not
    waited for: its work returned as work whose wait copies each copy it writes into its
    PagedTensor (``c10d``), or those copies left for ``wait_tensor`` of their PagedTensors
    (``_c10d_functional``; see the module docstring). Results: the op's, a dense copy of an argument
    replaced by that argument (the in-place collectives return their tensors)."""
    if func.namespace == "_c10d_functional" and func.overloadpacket is torch.ops._c10d_functional.wait_tensor:
        waited = _wait_pending(args, kwargs)
        if waited is not None:
            return waited
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
    written = _written_leaves(func, bound)
    if written and _coalescing():
        # Coalesced (NCCL's batch_isend_irecv, a _coalescing_manager): torch hands back one work for
        # the batch, not this op's, so nothing would copy the results into the pages.
        raise NotImplementedError(
            f"PagedTensor: {func} writes a PagedTensor inside coalesced collectives (batch_isend_irecv on a backend that "
            "coalesces, such as NCCL, or torch.distributed's _coalescing_manager), whose one work for the batch would not "
            "copy its results into the pages: receive into a plain tensor and copy it in after the wait"
        )
    dense_args = tree_map(to_dense, tuple(args))
    dense_kwargs = tree_map(to_dense, dict(kwargs))
    out = func(*dense_args, **dense_kwargs)

    def to_original(value: Any) -> Any:
        return tree_map(lambda leaf: originals.get(id(leaf), leaf) if isinstance(leaf, torch.Tensor) else leaf, value)

    if written:
        copies = [(leaf, dense[id(leaf)]) for leaf in dict.fromkeys(written)]  # each once, in order
        if func.namespace == "_c10d_functional":
            # Waited for by wait_tensor of the PagedTensors the op returns (its work is registered
            # under the dense copies), which copies them in (_wait_pending).
            with _pending_lock:
                for leaf, copy in copies:
                    _pending.setdefault(leaf, []).append(copy)
        elif any(_is_work(leaf) for leaf in tree_leaves(out)):
            out = tree_map(lambda value: _deferred_work(func, torch.distributed.Work.unbox(value), copies, to_original) if _is_work(value) else value, out)
        else:  # no work to hand the wait to (none known): waited for here
            _wait(func, out)
            for leaf, copy in copies:
                leaf.copy_(copy)
    # (else the work reads the dense copies, which it keeps alive: not waited for, as torch's)
    return to_original(out)


def _coalescing() -> bool:
    """Whether some process group is gathering collectives to launch as one (``_coalescing_manager``)."""
    world = getattr(torch.distributed.distributed_c10d, "_world", None)
    return bool(getattr(world, "pg_coalesce_state", None))


def _is_work(value: Any) -> bool:
    """Whether ``value`` is a collective's ``Work`` (a ``ScriptObject`` inside the dispatcher)."""
    return not isinstance(value, torch.Tensor) and hasattr(value, "wait")


# The dense copies a ``_c10d_functional`` op writes, by the PagedTensor each is copied into when
# ``wait_tensor`` of it waits for the op, in the order of the ops (see the module docstring).
_pending: WeakIdKeyDictionary = WeakIdKeyDictionary()
_pending_lock = threading.Lock()


def _wait_pending(args: tuple, kwargs: dict) -> PagedTensor | None:
    """``wait_tensor`` of a PagedTensor that ``_c10d_functional`` ops not yet waited for write: each
    op waited for (``wait_tensor`` of its dense copy) and its copy copied in, in order; the
    PagedTensor returned. ``None`` where it is no such PagedTensor."""
    tensor = args[0] if args else kwargs.get("tensor")
    if not isinstance(tensor, PagedTensor):
        return None
    with _pending_lock:
        copies = _pending.pop(tensor, None)
    if not copies:
        return None
    for index, copy in enumerate(copies):
        try:
            torch.ops._c10d_functional.wait_tensor(copy)
            tensor.copy_(copy)
        except BaseException:
            with _pending_lock:  # those not yet copied in stay for the next wait
                _pending[tensor] = copies[index:] + _pending.get(tensor, [])
            raise
    return tensor


# The deferred works not yet complete (see _deferred_work_class): their Python objects kept alive.
_outstanding: set = set()
_outstanding_lock = threading.Lock()


def _deferred_work(func: OpOverload, work: Any, copies: list[tuple[PagedTensor, torch.Tensor]], to_original: Callable[[Any], Any]) -> Any:
    """``func``'s ``work``, not waited for, as work whose completion (its first wait) copies each
    dense copy of ``copies`` into its PagedTensor (see the module docstring), boxed as the
    dispatcher passes one. Its Python object is kept until then: one that died would reach the
    caller as a bare ``Work`` (whose ``wait`` never returns)."""
    deferred = _deferred_work_class()(work, copies, to_original)
    with _outstanding_lock:
        _outstanding.add(deferred)
    return deferred.boxed()


@functools.cache
def _deferred_work_class() -> type:
    """The class of :func:`_deferred_work` (made on first use: torch.distributed may be absent)."""

    class DeferredWork(torch.distributed.Work):
        """A collective's work that writes PagedTensors: complete once torch's work is and the dense
        copies it wrote are copied into them."""

        def __init__(self, work: Any, copies: list[tuple[PagedTensor, torch.Tensor]], to_original: Callable[[Any], Any]) -> None:
            super().__init__()
            self._work = work
            self._copies = copies
            self._to_original = to_original
            self._lock = threading.RLock()
            self._waited = False  # torch's work waited for (or seen complete): never again (gloo's p2p)
            self._complete = False  # and the copies copied in
            self._value: Any = None  # its future's value, the PagedTensors in place of the copies

        def _finish(self, wait: Callable[[], Any] | None) -> Any:
            """Wait for torch's work with ``wait`` (``None``: it is complete), once; then copy the
            copies in, once; then let it go."""
            result: Any = True
            with self._lock:
                if self._complete:
                    return True
                if not self._waited:
                    if wait is not None:
                        result = wait()
                        if result is False:  # not complete (a timeout torch's work reports so): nothing copied
                            return False
                    self._waited = True
                try:
                    self._value = self._to_original(self._work.get_future().value())
                except RuntimeError:  # no future (a gloo send's or recv's work): as before, none to give
                    self._value = None
                for leaf, copy in self._copies:
                    leaf.copy_(copy)
                self._copies = []
                self._complete = True
            with _outstanding_lock:
                _outstanding.discard(self)
            return True if result is None else result

        def wait(self, timeout: Any = None) -> bool:
            work = self._work
            return self._finish(work.wait if timeout is None else functools.partial(work.wait, timeout))

        def synchronize(self) -> None:
            self._finish(self._work.wait)

        def block_current_stream(self) -> None:
            self._finish(self._work.wait)

        def is_completed(self) -> bool:
            if self._complete:
                return True
            if not self._work.is_completed():
                return False
            self._finish(None)
            return True

        def is_success(self) -> bool:
            return self._work.is_success()

        def exception(self) -> Any:
            return self._work.exception()

        def get_future(self) -> torch.futures.Future:
            self.wait()
            future: torch.futures.Future = torch.futures.Future()
            future.set_result(self._value)
            return future

        def get_future_result(self) -> Any:
            self.wait()
            return self._work.get_future_result()

        def result(self) -> list[torch.Tensor]:
            self.wait()
            return self._to_original(self._work.result())

        def source_rank(self) -> int:
            return self._work.source_rank()

        def _source_rank(self) -> int:
            return self._work._source_rank()

        def _get_op_type(self) -> Any:
            return self._work._get_op_type()

        def _get_duration(self) -> float:
            return self._work._get_duration()

    return DeferredWork


def _wait(func: OpOverload, out: Any) -> None:
    """Wait for the work of the collective ``func`` that returned ``out``: its ``Work`` objects
    (``c10d``), or each tensor it returned (``_c10d_functional``: ``wait_tensor``)."""
    for leaf in tree_leaves(out):
        if isinstance(leaf, torch.Tensor):
            if func.namespace == "_c10d_functional" and func.overloadpacket is not torch.ops._c10d_functional.wait_tensor:
                torch.ops._c10d_functional.wait_tensor(leaf)
        elif _is_work(leaf):
            leaf.wait()
