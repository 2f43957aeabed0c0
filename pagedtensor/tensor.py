"""PagedTensor: a tensor whose bytes live in a pager's pages and fault in when an op touches them.

``PagedTensor.wrap(t)`` moves ``t``'s bytes into a :class:`~pagedtensor.pager.Pager` and returns a
wrapper subclass with ``t``'s shape, dtype and strides on the pager's compute device. Every aten op
on it goes through ``__torch_dispatch__`` into :data:`pagedtensor.dispatch.DISPATCHER`, which faults
in only the pages the op reads or writes, runs the op on dense data, and writes back what it wrote.

A PagedTensor is one of two kinds:

* **paged** (every tensor users make): it holds a :class:`PagedStorage` (the pager and one
  ``Allocation``, shared by all views) and its own ``storage_offset`` in elements. Views of it
  are PagedTensors over the same pages.
* **traced** (made only by ``__tensor_unflatten__`` at a ``torch.compile`` boundary): it holds a
  dense inner tensor and forwards every op to it.

The compile contract: ``__tensor_flatten__`` names one inner tensor, ``_dense``, and no metadata (it
is static: Dynamo guards on it, so residency never goes in it). For a paged tensor ``_dense`` is its
materialized dense copy, cached until the allocation is next written (``Allocation.version``): a
compiled graph sees a PagedTensor as a dense tensor at its boundary, and Dynamo's guards and AOT's
runtime unwrapping, which read ``_dense`` on every call, reuse one copy. The copy stays alive as long
as the PagedTensor or until it is written; :meth:`PagedTensor.drop_materialized` frees it early.
The copy has the PagedTensor's storage offset (torch rebuilds returned views from it), so for a view
at a nonzero offset it holds the allocation's elements from the first to the view's last.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
import multiprocessing.context
import multiprocessing.reduction
import pickle
import sys
import threading
import warnings
import weakref
from typing import Any, Callable, ClassVar, Iterator, Optional, Sequence, Union

import torch
from torch._ops import OpOverload

from pagedtensor.default_pager import get_default_pager
from pagedtensor.interrupts import deferring, pager_call, runs_whole
from pagedtensor.outside_transforms import in_a_transform_or_mode, outside_transforms
from pagedtensor.pager import Allocation, Pager, unpageable_reason
from pagedtensor.errors import PagerClosedError

log = logging.getLogger(__name__)

TIER_NAMES = ("device", "host", "disk", "unwritten")
"""Keys of :meth:`PagedTensor.residency`: the tier of each page's authoritative copy; ``unwritten``
counts pages never written (they read as zeros)."""

# Dtypes with no storage of their own (sub-byte placeholders, raw bit containers): wrap rejects them.
_UNSUPPORTED_DTYPES = frozenset(
    getattr(torch, name)
    for name in (
        "bits1x8", "bits2x4", "bits4x2", "bits8", "bits16",
        "uint1", "uint2", "uint3", "uint4", "uint5", "uint6", "uint7",
        "int1", "int2", "int3", "int4", "int5", "int6", "int7",
    )
    if hasattr(torch, name)
)
# A strided source whose byte span is larger than this many times its elements (a sparse view of a
# big storage) is stored compacted (contiguous) instead of with its strides.
_MAX_SPAN_RATIO = 2


class PagedStorage:
    """The pages behind a PagedTensor and all of its views: one allocation of one pager.

    ``allocation`` is ``None`` for a tensor of zero bytes. The allocation is freed when the last
    PagedTensor over it is garbage collected.
    """

    __slots__ = ("pager", "allocation", "_meta_bases", "write_lock", "__weakref__")

    def __init__(self, pager: Pager, allocation: Optional[Allocation]) -> None:
        self.pager = pager
        self.allocation = allocation
        self._meta_bases: dict[torch.dtype, torch.Tensor] = {}
        # Held by an op that writes these pages, from its fault-in to its write-back: an op on a
        # gathered copy writes back its whole span, which must not undo another thread's write. A
        # handler that reads pages, then writes them back in another op, holds it across both (it is
        # reentrant for that write).
        self.write_lock = threading.RLock()
        if allocation is not None:
            # Not weakref.finalize: its __call__ runs Python code before the callback, where a Ctrl-C
            # lost the free for good; a partial is called with no Python frame before it.
            _STORAGE_REFS.add(weakref.ref(self, functools.partial(_free_allocation, pager, allocation)))

    @property
    def nbytes(self) -> int:
        return 0 if self.allocation is None else self.allocation.nbytes

    @classmethod
    def filled(cls, pager: Pager, nbytes: int, fill: Callable[[Allocation], None], name: Optional[str] = None) -> "PagedStorage":
        """A new allocation of ``nbytes`` (none for zero bytes) that ``fill(allocation)`` writes; freed
        again if ``fill`` raises, so a failed fill leaves nothing allocated."""
        if nbytes == 0:
            return cls(pager, None)
        storage = _new_storage(cls, pager, nbytes, name)  # from here on, dropping it frees the allocation
        try:
            fill(storage.allocation)
        except BaseException:
            pager.free(storage.allocation)  # at once (its finalizer then finds it freed)
            raise
        return storage

    def copy(self, start: int = 0, stop: Optional[int] = None, pager: Optional[Pager] = None, name: Optional[str] = None) -> "PagedStorage":
        """A new allocation of ``pager`` (default: this storage's own) holding these bytes, or those of
        ``[start, stop)``, named ``name`` (default: this allocation's name); copied through the pagers
        in chunks of a quarter of the new allocation's device tier (whole pages of it), so any size fits."""
        source_pager, source = self.pager, self.allocation
        pager = source_pager if pager is None else pager
        stop = self.nbytes if stop is None else stop
        if source is None or stop <= start:
            return PagedStorage(pager, None)
        chunk = max(pager.page_size, pager.device_tier.capacity_pages // 4 * pager.page_size)

        def fill(target: Allocation) -> None:
            for offset in range(start, stop, chunk):
                pager.write(target, source_pager.read(source, offset, min(chunk, stop - offset)), offset - start)

        return PagedStorage.filled(pager, stop - start, fill, name=source.name if name is None else name)

    def meta_base(self, dtype: torch.dtype) -> torch.Tensor:
        """A flat meta tensor of ``dtype`` as long as the allocation: the base that view ops run on."""
        base = self._meta_bases.get(dtype)
        if base is None:
            base = self._meta_bases[dtype] = torch.empty((self.nbytes // dtype.itemsize,), dtype=dtype, device="meta")
        return base

    @property
    def version(self) -> int:
        """Changes whenever pages of the allocation are written (released dirty)."""
        return 0 if self.allocation is None else self.allocation.version

    def __reduce_ex__(self, protocol: int):  # noqa: ANN204
        # The allocation's bytes, read to the CPU, never the pager. Pickle saves this object once
        # however many views refer to it, so views saved together load sharing one allocation, as
        # torch's views share one storage.
        data = None if self.allocation is None else self.pager.read(self.allocation)
        popen = multiprocessing.context.get_spawning_popen()
        if popen is not None and data is not None:
            # Pickled as an argument of a process being started (spawn, forkserver): torch hands
            # the child ``data``'s shared memory by fd number, which the child opens only once it
            # runs. The starting process object keeps ``data`` (and so the fd) alive until then.
            kept = popen.__dict__.setdefault("_pagedllm_pickled", [])
            kept.append(data)
        return _rebuild_paged_storage, (data,)


@deferring
def _new_storage(cls: type[PagedStorage], pager: Pager, nbytes: int, name: Optional[str]) -> PagedStorage:
    """A PagedStorage of a new allocation of ``nbytes``: allocated and given its finalizer in one
    deferring call, so a Ctrl-C between the two cannot keep the allocation for good (raised as this
    returns, the storage dropped frees it)."""
    return cls(pager, pager.allocate(nbytes, name=name))


# The weak reference of each live PagedStorage with an allocation, whose callback frees it.
_STORAGE_REFS: set[weakref.ref] = set()


def _write_locks_after_fork_in_child() -> None:
    """A forked child gets each storage's write lock as it was at the fork: held for good where
    another thread of the parent was inside an op writing it (that thread does not run in the
    child), so the child's first write to the tensor waited forever. Each such storage gets a fresh
    lock: its pages are as that op left them at the fork, as a plain tensor's bytes would be (the
    pager drops that thread's pins in the child, :func:`pagedtensor.pager._after_fork_in_child`). A
    lock this thread holds (a fork from inside an op) stays."""
    for storage_ref in list(_STORAGE_REFS):
        storage = storage_ref()
        if storage is None:
            continue
        if storage.write_lock.acquire(blocking=False):  # free, or held by this thread: it stays
            storage.write_lock.release()
        else:
            storage.write_lock = threading.RLock()


os.register_at_fork(after_in_child=_write_locks_after_fork_in_child)


@runs_whole
def _free_allocation(pager: Pager, allocation: Allocation, storage_ref: weakref.ref) -> None:
    """Finalizer of a PagedStorage (its weak reference's callback): free its allocation, or have the
    pager free it at its next call when this thread is inside one (a garbage collection may run
    anywhere, including halfway through a pager method): :meth:`Pager.free_when_unlocked`. Run whole:
    a Ctrl-C landing in it is dropped (:func:`~pagedtensor.interrupts.runs_whole`)."""
    _STORAGE_REFS.discard(storage_ref)
    pager.free_when_unlocked(allocation)


def byte_span(tensor: "PagedTensor") -> tuple[int, int]:
    """Bytes ``[lo, hi)`` of the allocation that ``tensor`` can reach (empty when it has no elements).

    Computed once per tensor: a PagedTensor's size, strides and offset never change.
    """
    span = tensor._span
    if span is None:
        lo, hi = element_span(tensor.shape, tensor.stride(), tensor._offset)
        itemsize = tensor.dtype.itemsize
        span = tensor._span = (lo * itemsize, hi * itemsize)
    return span


def element_span(size: tuple[int, ...], stride: tuple[int, ...], offset: int) -> tuple[int, int]:
    """Elements ``[lo, hi)`` of the storage that a ``size``/``stride`` view at ``offset`` can reach.

    Empty (``lo == hi``) when the view has no elements. Strides are never negative in torch.
    """
    reach = 0
    for n, s in zip(size, stride):
        if n == 0:
            return offset, offset
        reach += (n - 1) * s
    return offset, offset + reach + 1


def dense_and_non_overlapping(size: Sequence[int], stride: Sequence[int]) -> bool:
    """Whether a layout's elements fill its span exactly once each: its strides, ordered, are the
    contiguous strides of some permutation of its dims (dims of size 1 ignored)."""
    expected = 1
    for length, step in sorted(((s, t) for s, t in zip(size, stride) if s != 1), key=lambda pair: pair[1]):
        if step != expected:
            return False
        expected *= length
    return True


def run_outside_compile(fn: Callable) -> Callable:
    """``fn`` run eagerly, never traced, when ``torch.compile`` reaches it.

    Dynamo cannot trace the making of a PagedTensor (``_make_wrapper_subclass``, the pager): it broke
    the graph there and went on tracing the rest of :meth:`PagedTensor._make` with the new tensor half
    made, which failed inside Dynamo (``InternalTorchDynamoError: ... no attribute '_view_root'``) even
    with graph breaks allowed. Under compilation the call goes through torch's lazy
    ``torch._dynamo.disable`` (a function Dynamo skips: a graph break, then ``fn`` runs eagerly with
    Dynamo off); outside it, ``fn`` is called directly (no import of ``torch._dynamo``). The paged KV
    cache's ``update`` and the ``"pagedllm"`` attention (:mod:`pagedtensor.hf`) run so too: the
    pager's work is Python (locks, streams, page tables), which Dynamo broke at wherever it met it."""
    from torch._compile import _disable_dynamo

    disabled = _disable_dynamo(fn)

    @functools.wraps(fn)
    def run(*args: object, **kwargs: object) -> object:
        if torch.compiler.is_compiling() or _dynamo_frame_hook() is not None:
            return disabled(*args, **kwargs)
        return fn(*args, **kwargs)

    _skip_frame(run.__code__)
    return run


def _skip_frame(code: Any) -> None:
    """Frames of ``code`` run as they are under torch.compile's frame hook, never compiled (the frames
    they call are, unless skipped too). A graph break at a call of a :func:`run_outside_compile`
    function sends its wrapper's frame to the hook, which compiled it into a graph of nothing with
    guards on its arguments' count and shapes: an entry each for every function and shape it ran
    for, toward Dynamo's ``recompile_limit``. Skipped, the wrapper finds the hook on and calls the
    function with it off. (On a torch without the setting the frames are compiled as before.)"""
    eval_frame = torch._C._dynamo.eval_frame
    if hasattr(eval_frame, "set_code_exec_strategy"):
        skip, default = eval_frame._FrameAction.SKIP, eval_frame._FrameAction.DEFAULT
        eval_frame.set_code_exec_strategy(code, eval_frame._FrameExecStrategy(skip, default))


# What a closed pager met by PagedTensor.materialize names; the dispatcher names the op instead where
# a handler's read met it.
MATERIALIZE = "PagedTensor.materialize"


@contextlib.contextmanager
def _naming_closed_pager(subject: str) -> Iterator[None]:
    """A :class:`PagerClosedError` raised inside names ``subject`` (a method of PagedTensor), where
    no op it ran named itself first."""
    try:
        yield
    except PagerClosedError as error:
        if error.subject is not None:
            raise
        raise error.met_by(subject) from error


def plain_copy(value: Any) -> Any:
    """A PagedTensor's values as a plain tensor, its bytes read (anything else as it is): for kernels
    that read their arguments' memory directly or keep them, and for arguments read whole."""
    return value.materialize() if isinstance(value, PagedTensor) else value


def _refuse_traced(tensor: "PagedTensor") -> None:
    """Raise torch's data-dependent-output error for a traced PagedTensor (a compile-time stand-in,
    with no pages). Dynamo puts a wrapper subclass's own methods into its graph as method calls and
    runs them on that stand-in for their value: ``page_range()`` and ``residency()`` gave the
    stand-in's empty counts, baked into the graph as constants. This error makes Dynamo break the
    graph there instead, and the call runs eagerly on the real tensor."""
    if tensor._paged is None:
        from torch._subclasses.fake_tensor import DataDependentOutputException

        class TracedPagesError(DataDependentOutputException):
            def __str__(self) -> str:
                return (
                    "PagedTensor.page_range() / residency() of a traced PagedTensor (a stand-in while torch.compile, "
                    "make_fx or export traces, with no pages): call it outside the traced function"
                )

        raise TracedPagesError(torch.ops.aten.item.default)  # "depends on the data": Dynamo breaks the graph


_dynamo_frame_hook = getattr(torch._C._dynamo.eval_frame, "get_eval_frame_callback", lambda: None)  # None unless torch.compile's hook is on
_tracing_state = torch._C._get_tracing_state  # None unless torch.jit.trace records


def _traced_op_refused(func: OpOverload) -> NotImplementedError:
    """The error for an op that reaches a PagedTensor while ``torch.jit.trace`` records: the ops its
    tracer records by hand (``copy_``, ``resize_``, ``resize_as_``, ``detach``), under another name
    (``convolution``) or not at all (those giving Python values: ``_local_scalar_dense``, ``equal``)
    come here with the tracer on, where the pager's own ops would be recorded too (and leave its
    state broken for later traces: an INTERNAL ASSERT, a crash). Every other op is recorded above
    and reaches here with the tracer off."""
    return NotImplementedError(
        f"{func}: torch.jit.trace cannot record this op over a PagedTensor (its tracer hands it to the subclass "
        f"while recording); trace with plain tensors (t.materialize()) and call the traced function with "
        f"PagedTensors, or use torch.jit.script or torch.compile"
    )


@functools.lru_cache(maxsize=1)
def _dispatch_without_dynamo() -> Callable:
    """:meth:`PagedTensor.__torch_dispatch__` run with torch.compile's frame hook off for it and every
    call it makes (it then finds the hook off and dispatches)."""
    from torch._compile import _disable_dynamo

    return _disable_dynamo(lambda func, types, args, kwargs: PagedTensor.__torch_dispatch__(func, types, args, kwargs), recursive=True)


@functools.lru_cache(maxsize=1)
def _dense_without_dynamo() -> Callable:
    """:meth:`PagedTensor._dense_of_pages` run with torch.compile's frame hook off for it and every call it makes."""
    from torch._compile import _disable_dynamo

    return _disable_dynamo(lambda tensor: tensor._dense_of_pages(), recursive=True)


# The wrapper storages of the PagedTensors whose dense data (``_dense``: for one with a storage
# offset, the elements from the allocation's start, so that the inner tensor has the outer one's
# offset) a compiled graph may be running on, by that data's storage. The storage, not the tensor:
# a weak reference to a tensor makes ``torch.utils.swap_tensors`` refuse it, which ``module.half()``
# of a compiled module's paged parameters runs.
_DENSE_OWNERS: dict[int, torch.UntypedStorage] = {}


def _register_dense_owner(dense: torch.Tensor, owner: "PagedTensor") -> None:
    """Note that ``dense`` is the dense data of ``owner``, until ``dense`` is collected.

    Why: a compiled graph (aot_eager, inductor) that returns a view of an input is followed by
    AOT autograd's ``gen_alias_from_base`` (torch/_functorch/_aot_autograd/functional_utils.py),
    which rebuilds the view as ``input.as_strided(size, stride, offset)`` with the offset of the
    graph's output, an absolute one here (the inner tensor's). From torch 2.14 it adds the input's
    own offset when the output's ``untyped_storage()`` is not the input's (meant for an input that
    inductor cloned to align it), which counted the offset twice: ``compile(lambda t: t[1:3])(p[4:8])``
    returned rows 8-9, not 5-6. The output built around a view of this dense data answers
    ``untyped_storage()`` with ``owner``'s, so torch keeps the offset as it is (as torch 2.13 and
    older always did)."""
    key = dense.untyped_storage()._cdata
    _DENSE_OWNERS[key] = torch.Tensor.untyped_storage(owner)  # the wrapper's: no bytes
    # The storage outlives ``dense`` only in views of it; its address is not reused before it is freed.
    weakref.finalize(dense, _DENSE_OWNERS.pop, key, None)


def _dense_owner_storage(inner: torch.Tensor) -> Optional[torch.UntypedStorage]:
    """The wrapper storage of the PagedTensor whose dense data ``inner`` views (:func:`_register_dense_owner`), if any."""
    if type(inner) is not torch.Tensor:  # a fake or functional tensor while tracing: no data
        return None
    return _DENSE_OWNERS.get(inner.untyped_storage()._cdata)


class PagedTensor(torch.Tensor):
    """A tensor whose bytes live in a :class:`~pagedtensor.pager.Pager`; see the module docstring.

    Make one with :meth:`wrap`. Every torch op works on it and gives exactly the result it gives on
    the dense tensor: views are PagedTensors sharing its pages, other results are plain tensors.
    """

    # The traceable-subclass contract, declared once: the inner tensors and the static attributes
    # that __tensor_flatten__ / __tensor_unflatten__ carry.
    _inner_tensor_names: ClassVar[tuple[str, ...]] = ("_dense",)
    _static_attribute_names: ClassVar[tuple[str, ...]] = ()

    _paged: Optional[PagedStorage]
    _offset: int
    _inner: Optional[torch.Tensor]
    _materialized: Optional[tuple[int, torch.Tensor]]
    _span: Optional[tuple[int, int]]  # bytes [lo, hi) of the allocation it reaches, set on first use
    _meta: Optional[torch.Tensor]  # a meta tensor of the same layout, set on the first view op
    # Traced views made while AOT autograd traces (functional inner tensors): the dtype of the graph
    # input they view, the view op that last changed the dtype or math bits, the input's (size,
    # stride, storage offset) and its (conjugate, negative) bits (see _check_returnable).
    _view_root: Optional[tuple[torch.dtype, Optional[object], tuple, tuple[bool, bool]]]

    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, *args: object, **kwargs: object) -> "PagedTensor":
        raise TypeError("PagedTensor cannot be constructed directly; use PagedTensor.wrap(tensor, pager=None)")

    # ------------------------------------------------------------------ construction

    @classmethod
    @run_outside_compile
    @pager_call  # inside a torch.func transform: made below it, a constant of it (its own tensors refused below)
    def wrap(cls, t: torch.Tensor, pager: Optional[Pager] = None, *, name: Optional[str] = None) -> "PagedTensor":
        """Move ``t``'s bytes into ``pager`` (default: :func:`~pagedtensor.get_default_pager`).

        Returns a PagedTensor with ``t``'s shape, dtype, strides and ``requires_grad`` on the
        pager's device. ``t`` is not changed; its bytes are copied. A PagedTensor on the same pager
        is returned as is (unless it has a lazy bit, below); one on another pager is copied over (from pager to pager, a chunk of
        pages at a time, where it has no conjugate or negative bit and is not a sparse view).

        Strides are kept exactly (expanded and overlapping views included, stored by their byte
        span), except for a sparse view whose span exceeds twice its elements: that one is stored
        compacted and gets contiguous strides. A view with torch's lazy conjugate or negative bit
        (``A.mH``, ``x.conj().imag``) gives its values with the bits resolved, as ``t.clone()``
        does.

        Note:
            The bytes go through :meth:`Pager.write`: into device pages, chunked by the device budget
            (pages spill to host as the budget fills). A CPU source bound for the host tier thus
            crosses to the device and back; fine for now, slow for tensors far above ``vram_limit``.

            To page a module's weight, replace the parameter (``module.weight =
            nn.Parameter(PagedTensor.wrap(module.weight.detach()))``); never assign the result to a
            plain tensor's ``.data``: torch lets any wrapper subclass through there and leaves the
            plain tensor over no memory, so its next op raises or crashes the process.

        Raises:
            TypeError: ``t`` is not a tensor, is a tensor subclass of another kind, or ``pager`` is
                not a Pager.
            ValueError: ``t``'s dtype, layout or device cannot be paged (sub-byte or quantized
                dtypes, sparse or nested layouts, meta tensors).
        """
        if pager is None:
            pager = get_default_pager()
        elif not isinstance(pager, Pager):
            raise TypeError(f"PagedTensor.wrap: pager must be a Pager or None, got {type(pager).__name__}")
        with _naming_closed_pager("PagedTensor.wrap"):
            pager._check_open()
        if isinstance(t, PagedTensor):
            if t._paged is not None and t._paged.pager is pager and math_bits(t) == (False, False):
                return t
            if t._paged is not None and t.numel() and math_bits(t) == (False, False):
                lo, hi = byte_span(t)
                if hi - lo <= _MAX_SPAN_RATIO * t.numel() * t.element_size():
                    # The bytes it reaches, from pager to pager a chunk at a time: no dense copy of the
                    # whole tensor (on its compute device, outside either pager's budget).
                    storage = t._paged.copy(lo, hi, pager=pager, name=name)
                    return cls._make(storage, t._offset - lo // t.element_size(), tuple(t.shape), t.stride(), t.dtype,
                                     requires_grad=t.requires_grad)  # fmt: skip
            data = t.materialize()
            return cls.wrap(data.requires_grad_() if t.requires_grad else data, pager, name=name)  # float or complex
        bits = math_bits(t) if isinstance(t, torch.Tensor) else (False, False)
        # A view with torch's lazy conjugate or negative bit (``A.mH``, ``x.conj().imag``): its
        # memory is paged, then resolved in the pages (below).
        data = with_math_bits(t.detach(), (False, False)) if bits != (False, False) else t
        _check_wrappable(data)
        data = data.detach()
        lo, hi = element_span(tuple(data.shape), data.stride(), data.storage_offset())
        if hi - lo > _MAX_SPAN_RATIO * data.numel():
            data = data.contiguous()
            lo, hi = element_span(tuple(data.shape), data.stride(), data.storage_offset())
        span = data.as_strided((hi - lo,), (1,), lo)
        storage = PagedStorage.filled(pager, span.nbytes, lambda allocation: pager.write(allocation, span), name=name)
        if bits != (False, False):
            # The values the view reads, as t.clone() gives them: resolved over the whole span, in
            # place, a piece of pages at a time (exact: a sign flip). Kept lazy, the bits would reach
            # kernels that read a conjugate view's raw bits under a subclass (linalg.pinv's).
            flat = cls._make(storage, 0, (hi - lo,), (1,), data.dtype)
            if bits[1]:  # negated, then conjugated, as clone() resolves them (NaNs' zeros differ the other way)
                flat.neg_()
            if bits[0]:
                flat.conj_physical_()
        return cls._make(storage, 0, tuple(data.shape), data.stride(), data.dtype, requires_grad=t.requires_grad)

    @classmethod
    def _make(
        cls,
        storage: PagedStorage,
        offset: int,
        size: tuple[int, ...],
        stride: tuple[int, ...],
        dtype: torch.dtype,
        requires_grad: bool = False,
        bits: tuple[bool, bool] = (False, False),
    ) -> "PagedTensor":
        """A paged PagedTensor viewing ``storage`` at element ``offset`` (in units of ``dtype``), with
        the conjugate and negative bits ``bits`` (see :func:`math_bits`).

        Its wrapper storage (no data) is as large as the allocation, whatever the view reaches, as a
        torch view's storage is its base's: sized to the view's reach, an empty view's was 0 bytes,
        which Dynamo's fake-tensor conversion takes for a storage resized to zero (and fails on)."""
        out = torch.Tensor._make_wrapper_subclass(
            cls, size, strides=stride, storage_offset=offset, dtype=dtype, device=storage.pager.device, requires_grad=requires_grad,
            storage_size=storage.nbytes,
        )
        out._paged = storage
        out._offset = offset
        out._inner = None
        out._materialized = None
        out._span = None
        out._meta = None
        out._view_root = None
        out._owner_storage = None
        if bits != (False, False):
            with_math_bits(out, bits)
        return out

    @classmethod
    def _from_inner(
        cls, inner: torch.Tensor, size: Optional[tuple[int, ...]] = None, stride: Optional[tuple[int, ...]] = None
    ) -> "PagedTensor":
        """A traced PagedTensor forwarding every op to the dense ``inner`` (compile boundary only)."""
        out = torch.Tensor._make_wrapper_subclass(
            cls,
            inner.shape if size is None else size,
            strides=inner.stride() if stride is None else stride,
            storage_offset=inner.storage_offset(),
            dtype=inner.dtype,
            device=inner.device,
            layout=inner.layout,
            requires_grad=inner.requires_grad,
        )
        out._paged = None
        out._offset = inner.storage_offset()
        out._inner = inner
        out._materialized = None
        out._span = None
        out._meta = None
        out._view_root = None
        out._owner_storage = _dense_owner_storage(inner) if _DENSE_OWNERS else None
        if inner.is_conj() or inner.is_neg():  # a traced t.conj(): the wrapper carries the inner's bits, as a paged view does
            with_math_bits(out, math_bits(inner))
        return out

    # ------------------------------------------------------------------ the traceable-subclass contract

    def __tensor_flatten__(self) -> tuple[list[str], tuple]:
        if self._view_root is not None:
            self._check_returnable()
        return list(self._inner_tensor_names), tuple(getattr(self, name) for name in self._static_attribute_names)

    def _check_returnable(self) -> None:
        """Refuse to flatten (return from a graph AOT autograd traces) a view of a graph input whose
        elements have another size than the input's. AOT autograd rebuilds a returned view of an input
        from the input itself; for a wrapper subclass it cannot replay the view ops (it has no view
        metadata for one) and falls back to ``input.as_strided(size, stride, offset).view(dtype)``
        with the view's size, strides and offset, counted in the view's elements but applied in the
        input's (torch/_functorch/_aot_autograd/functional_utils.py, ``gen_alias_from_base``): the
        result has the wrong shape and offset, and writes through it land elsewhere. torch's own
        TwoTensor gives the same wrong results. Only a graph's outputs are flattened, so such a view
        used inside the graph (``t.view(torch.int16).sum()``) is unaffected.

        A complex view of a real input is rebuilt from ``torch.view_as_complex(input)``, which torch
        allows only for an input whose last dim is 2 with stride 1 (other strides and the offset even):
        for any other input (``torch.view_as_complex(t.view(n, -1, 2))`` of a 2-D ``t``) it fails
        with torch's "Tensor must have a last dimension of size 2" after compiling; refused here.

        A view with other conjugate or negative bits than its input (``t.conj()``) is rebuilt with
        ``as_strided``, which drops them: its values came back unconjugated. Refused too."""
        root, op, (size, stride, offset), bits = self._view_root
        if math_bits(self) != bits:
            raise NotImplementedError(
                f"PagedTensor: a compiled graph returns a view of a PagedTensor input with other conjugate or negative "
                f"bits than the input ({op}: conjugate, negative {bits} -> {math_bits(self)}); torch's aot_eager/inductor "
                f"rebuild a returned view of a tensor subclass input with as_strided (gen_alias_from_base), which drops "
                f"the bits, so its values would come back unconjugated. Return .resolve_conj()/.resolve_neg() (a copy), "
                f"take the view outside the compiled function, or compile with backend='eager'"
            )
        unit = root.itemsize
        if root.is_complex and not self.dtype.is_complex:  # torch views a complex base as real first
            unit //= 2
        elif self.dtype.is_complex and not root.is_complex:  # and a real base as complex
            unit *= 2
            viewable = (
                len(size) >= 1 and size[-1] == 2 and stride[-1] == 1 and offset % 2 == 0 and all(s % 2 == 0 for s in stride[:-1])
            )
            if not viewable:
                raise NotImplementedError(
                    f"PagedTensor: a compiled graph returns a complex view of a real PagedTensor input ({op}: {root} -> "
                    f"{self.dtype}) of size {list(size)} and strides {list(stride)}; torch's aot_eager/inductor rebuild "
                    f"it from torch.view_as_complex(input) (gen_alias_from_base), which needs an input whose last dim "
                    f"is 2 with stride 1. Return a copy (.clone()), pass the input viewed as (..., 2), or compile with "
                    f"backend='eager'"
                )
        if unit != self.dtype.itemsize:
            raise NotImplementedError(
                f"PagedTensor: a compiled graph returns a view of a PagedTensor input in a dtype of another item "
                f"size ({op}: {root} -> {self.dtype}); torch's aot_eager/inductor rebuild a returned view of a "
                f"tensor subclass input from the input in the input's element units (gen_alias_from_base), which "
                f"gives the wrong shape and offset for such a view. Return a copy (.clone()) or make the dtype "
                f"view outside the compiled function, or compile with backend='eager'"
            )

    @staticmethod
    def __tensor_unflatten__(
        inner_tensors: dict[str, torch.Tensor], metadata: tuple, outer_size: tuple[int, ...], outer_stride: tuple[int, ...]
    ) -> "PagedTensor":
        if len(metadata) != len(PagedTensor._static_attribute_names):
            raise ValueError(f"PagedTensor.__tensor_unflatten__: expected {len(PagedTensor._static_attribute_names)} attributes, got {metadata!r}")
        out = PagedTensor._from_inner(inner_tensors[PagedTensor._inner_tensor_names[0]], outer_size, outer_stride)
        for name, value in zip(PagedTensor._static_attribute_names, metadata):
            setattr(out, name, value)
        return out

    @property
    def _dense(self) -> torch.Tensor:
        """The inner tensor of the compile contract: the dense data with this tensor's size and strides.

        Read by the guards of a frame torch.compile recompiled, with its frame hook on: it runs with
        the hook off (compiled, this frame's own guards read it again, without end)."""
        if self._inner is not None:
            return self._inner
        if _dynamo_frame_hook() is not None:
            return _dense_without_dynamo()(self)
        return self._dense_of_pages()

    def _dense_of_pages(self) -> torch.Tensor:
        """:attr:`_dense` of a tensor of pages (no inner tensor)."""
        version = self._paged.version
        cached = self._materialized
        if cached is not None and cached[0] == version:
            allocation = self._paged.allocation  # (None for an empty tensor: no pages to lose)
            if not (self._paged.pager.closed or (allocation is not None and allocation.freed)):
                return cached[1]
            self._materialized = None  # the pages are gone: the copy too, and materialize() below names why
        if in_a_transform_or_mode():
            # Read by Dynamo inside a torch.func transform (``torch.func.grad`` of this tensor in a
            # compiled function): made there, the data came back wrapped at the transform's level,
            # with no storage to note; read by ``FakeTensorMode.from_tensor`` inside the mode, it
            # would be sliced from the slab under the mode. The dense data is the pages' bytes,
            # whatever the transforms and modes.
            return outside_transforms(PagedTensor._dense_of_pages)(self)
        dense = self.materialize() if self._offset == 0 else self._materialize_from_start()
        _register_dense_owner(dense, self)
        self._materialized = (version, dense)
        return dense

    def _materialize_from_start(self) -> torch.Tensor:
        """The dense data at this tensor's storage offset: the allocation's elements from the start
        to the last one this tensor reaches, viewed with its size, strides and offset. Dynamo and
        AOT autograd take the inner tensor's offset for the outer one's (they rebuild returned views
        with it), so the two must agree; the cost is materializing the elements before the view. The
        values are this tensor's, its conjugate and negative bits resolved (as :meth:`materialize`
        gives them at offset 0; they were the raw bytes)."""
        lo, hi = element_span(tuple(self.shape), self.stride(), self._offset)
        if lo == hi:
            return torch.empty(0, dtype=self.dtype, device=self.device).as_strided(self.shape, self.stride(), self._offset)
        flat = PagedTensor._make(self._paged, 0, (hi,), (1,), self.dtype, bits=math_bits(self)).materialize()
        # set_, not as_strided: a view of ``flat`` would make Dynamo trace ``flat`` as its base.
        return torch.empty(0, dtype=self.dtype, device=flat.device).set_(flat.untyped_storage(), self._offset, self.shape, self.stride())

    def _stable_hash_for_caching(self) -> str:
        """AOT autograd's cache key for this subclass: its static layout (the metadata is empty), after
        a revision number bumped whenever tracing a PagedTensor changes, so that a graph compiled by an
        earlier version is not reused (revision 2: a graph returning a view of an input in a dtype of
        another item size is refused, see :meth:`_check_returnable`; revision 3: so is one returning a
        complex view of a real input torch cannot view as complex; revision 4: so is one returning a
        view with other conjugate or negative bits than its input)."""
        return f"PagedTensor/4:{self.dtype}:{tuple(self.shape)}:{self.stride()}:{self.device}:{self.requires_grad}"

    def drop_materialized(self) -> None:
        """Free the dense copy a ``torch.compile`` boundary cached (it is rebuilt when needed)."""
        self._materialized = None

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN206 - torch's protocol
        kwargs = kwargs or {}
        if _tracing_state() is not None:
            raise _traced_op_refused(func)
        if _dynamo_frame_hook() is not None:
            # An op run eagerly while torch.compile's frame hook is on (at a graph break, ``a[a > 0]``):
            # the hook would compile the dispatcher's and pager's own frames (dozens a call, failing
            # inside them under dynamic shapes); they run with it off.
            return _dispatch_without_dynamo()(func, types, args, kwargs)
        if func.overloadpacket in _FFTS or _has_complex_tensor(args, kwargs):
            # torch enters ``__torch_dispatch__`` with the dispatch keys above Python excluded, the
            # conjugate and negative views' fallbacks among them; a kernel run here that makes such a
            # view itself (linalg_lstsq's residuals, linalg_pinv: ``x.mul_(x.conj())``) would then read
            # its raw bits, a silently wrong result. Those views are complex only: of a complex
            # argument, or of a complex result an FFT of real input makes (``fft_hfftn`` under
            # inference mode, reaching here whole, was off by up to 3.8).
            with _conjugate_fallback_on(), _negative_fallback_on():
                return _DISPATCHER.dispatch(func, types, args, kwargs)
        return _DISPATCHER.dispatch(func, types, args, kwargs)

    # ------------------------------------------------------------------ inspection

    @property
    def pager(self) -> Optional[Pager]:
        """The pager holding the pages (``None`` for a traced tensor)."""
        return None if self._paged is None else self._paged.pager

    @property
    def allocation(self) -> Optional[Allocation]:
        """The pager allocation holding the pages (shared by all views; ``None`` if zero bytes or traced)."""
        return None if self._paged is None else self._paged.allocation

    def page_range(self) -> tuple[int, int]:
        """Allocation pages ``[first, stop)`` holding the bytes this tensor (view) can reach."""
        _refuse_traced(self)
        allocation = self.allocation
        if allocation is None:
            return 0, 0
        lo, hi = element_span(tuple(self.shape), self.stride(), self._offset)
        es = self.element_size()
        return allocation.page_range(lo * es, hi * es)

    def residency(self) -> dict[str, int]:
        """Page counts per tier (``device``, ``host``, ``disk``, ``unwritten``) of this tensor's pages.

        Only the pages this tensor (view) reaches are counted.
        """
        _refuse_traced(self)
        counts = dict.fromkeys(TIER_NAMES, 0)
        if self.allocation is None:
            return counts
        first, stop = self.page_range()
        with _naming_closed_pager("PagedTensor.residency"):
            table = self.pager.page_table(self.allocation)
        for info in table[first:stop]:
            counts[info.tier or "unwritten"] += 1
        return counts

    def materialize(self, device: Union[str, torch.device, None] = None) -> torch.Tensor:
        """A new dense tensor with this tensor's values, size and strides (storage offset 0).

        On ``device`` (default: the compute device). When the pages fit on the device tier at once
        they fault in there and are copied; otherwise (or for another device) they are read through
        the pager in chunks, so any size works. Inside a ``torch.func`` transform it is a constant of
        the transform, as a tensor captured from outside is.
        """
        with _naming_closed_pager(MATERIALIZE):
            return _DISPATCHER.materialize(self, device)

    @run_outside_compile
    def __format__(self, format_spec: str) -> str:
        # torch.Tensor.__format__ formats a 0-dim tensor's item() only when type(self) is Tensor.
        if self.dim() == 0 and self._paged is not None:
            return self.item().__format__(format_spec)
        return object.__format__(self, format_spec)

    @run_outside_compile
    def tolist(self) -> list:  # Tensor.tolist reads the data pointer directly
        return self.materialize("cpu").tolist()

    @run_outside_compile
    def apply_(self, callable: Callable[[Any], Any]) -> "PagedTensor":  # noqa: A002 - torch's argument name
        """torch's ``Tensor.apply_``: ``callable`` on each element in order, its results written in place.

        torch's own reads the data pointer (a PagedTensor has none). This runs torch's on a dense copy of
        the bytes this tensor reaches, viewed with its size, strides and math bits (an expanded view's
        element gets the callable once per index, as in torch), then writes the elements back through
        the pager (their pages only turn dirty). A callable that raises leaves every page as it was.

        Raises:
            TypeError: a tensor on another device than the CPU (as torch's).
            RuntimeError: the tensor requires grad (as torch's).
        """
        return self._per_element("apply_", lambda view: view.apply_(callable))

    @run_outside_compile
    def map_(self, tensor: torch.Tensor, callable: Callable[[Any, Any], Any]) -> "PagedTensor":  # noqa: A002
        """torch's ``Tensor.map_``: ``callable(a, b)`` on each element ``a`` and ``tensor``'s element ``b``
        (broadcast), its results written in place, as :meth:`apply_` runs (torch's own refuses a
        subclass; a PagedTensor ``tensor`` is read into a plain copy)."""
        return self._per_element("map_", lambda view: view.map_(plain_copy(tensor), callable))

    @run_outside_compile
    def map2_(self, x: torch.Tensor, y: torch.Tensor, callable: Callable[[Any, Any, Any], Any]) -> "PagedTensor":  # noqa: A002
        """torch's ``Tensor.map2_``: ``callable(a, b, c)`` with ``x``'s and ``y``'s elements, as :meth:`map_`
        (torch's own read a PagedTensor self's data pointer and crashed the interpreter)."""
        return self._per_element("map2_", lambda view: view.map2_(plain_copy(x), plain_copy(y), callable))

    def _per_element(self, name: str, run: Callable[[torch.Tensor], Any]) -> "PagedTensor":
        """``run(view)`` of torch's per-element method ``name`` on a dense copy of the bytes this tensor
        reaches (``view``: that copy with this tensor's size, strides and math bits), then the elements
        written back through the pager; nothing is written where ``run`` raises."""
        if self._paged is None:
            raise RuntimeError(f"PagedTensor.{name}: a traced PagedTensor (inside torch.compile) cannot run a Python callable per element")
        if self.requires_grad:  # torch checks this first
            raise RuntimeError(f"Can't call {name}() on Variable that requires grad. Use var.detach().{name}() instead.")
        if self.device.type != "cpu":
            raise TypeError(f"{name} is only implemented on CPU tensors")
        lo, hi = element_span(tuple(self.shape), self.stride(), self._offset)
        if lo == hi:
            return self
        span = PagedTensor._make(self._paged, lo, (hi - lo,), (1,), self.dtype)
        values = span.materialize()
        view = with_math_bits(values.as_strided(self.shape, self.stride(), self._offset - lo), math_bits(self))
        run(view)
        with torch.no_grad():
            if torch._debug_has_internal_overlap(view) == 0:
                self.copy_(view)  # the elements only: bytes between them are not rewritten
            else:  # elements sharing bytes (an expanded view): torch's copy_ refuses such a target
                span.copy_(values)
        return self

    def numpy(self, *, force: bool = False):  # noqa: ANN201 - numpy is optional
        """A read-only NumPy copy of the values. An array cannot share a PagedTensor's pages (torch's
        ``numpy()`` shares a CPU tensor's memory), so a write to it raises instead of being lost."""
        return self._numpy_copy(writeable=False, force=force)

    def __array__(self, dtype=None, copy=None):  # noqa: ANN001, ANN204
        """NumPy's array protocol (``np.asarray(t)``, ``np.array(t)``), as torch's ``Tensor.__array__``
        (which refuses a tensor that requires grad) with NumPy 2's ``copy``: ``None`` gives the read-only
        copy :meth:`numpy` gives, ``True`` a writable copy of the caller's own, and ``False`` raises
        ``ValueError``, as NumPy does for any copy it cannot avoid: an array cannot share the pages."""
        if copy is False:
            raise ValueError(
                "PagedTensor.__array__: copy=False, but a PagedTensor's bytes live in pager pages, which an array "
                "cannot share: making one always copies them; pass copy=None (np.asarray) or copy=True"
            )
        array = self._numpy_copy(writeable=bool(copy))
        return array if dtype is None else array.astype(dtype, copy=False)

    def _numpy_copy(self, writeable: bool, force: bool = False):  # noqa: ANN202
        """The values as an array, refused as torch's ``numpy()`` refuses (unless ``force``): a tensor
        off the CPU, one that requires grad while grad mode is on, a conjugate or negative view. The
        array has the view's strides, as torch's shares them (forced, a conjugate or negative view's
        or one off the CPU: those of torch's copy, laid out as ``empty_like``); a ``writeable`` one
        (NumPy's copy) is then laid out as NumPy copies such an array, so no two of its elements share
        memory."""
        if not force:
            if self.device.type != "cpu":
                raise TypeError(f"can't convert {self.device} device type tensor to numpy. Use Tensor.cpu() to copy the tensor to host memory first.")
            if self.requires_grad and torch.is_grad_enabled():
                raise RuntimeError("Can't call numpy() on Tensor that requires grad. Use tensor.detach().numpy() instead.")
            if self.is_conj():
                raise RuntimeError("Can't call numpy() on Tensor that has conjugate bit set. Use tensor.resolve_conj().numpy() instead.")
            if self.is_neg():
                raise RuntimeError("Can't call numpy() on Tensor that has negative bit set. Use tensor.resolve_neg().numpy() instead.")
        dense = self.materialize("cpu").detach()
        if self.device.type != "cpu" or self.is_conj() or self.is_neg():
            # (force) torch's cpu() copy and its resolving of the bits are laid out as empty_like's
            dense = dense.clone()
        array = dense.numpy()
        if not writeable:
            array.flags.writeable = False
        elif not (array.flags.c_contiguous or array.flags.f_contiguous):  # stride 0, overlapping or strided
            array = array.copy(order="K")
        return array

    def untyped_storage(self) -> torch.UntypedStorage:
        """The wrapper's storage (no bytes): torch itself reads it, e.g. torch.compile's metadata
        checks; writing through it is unsupported. A compiled graph's output that views the dense
        data of an offset input answers with that input's storage (see :func:`_register_dense_owner`)."""
        owner_storage = getattr(self, "_owner_storage", None)
        return torch.Tensor.untyped_storage(self) if owner_storage is None else owner_storage

    # The wrapper's own storage is empty (no bytes, a null pointer): these would reach it and crash or
    # export garbage, so each raises, naming what to use instead.
    # ``storage()`` raises NotImplementedError (a RuntimeError): safetensors takes it for a storage with
    # no pointer (as a meta one), so ``load_model`` of a model with paged parameters finds none shared
    # and loads through ``load_state_dict``; its ``save_file`` goes on to ``data_ptr()``, which raises.
    def storage(self) -> torch.TypedStorage:
        raise NotImplementedError(
            "PagedTensor.storage: a PagedTensor's bytes live in pager pages, not in a torch storage; "
            "use t.materialize() for a dense copy"
        )

    def data_ptr(self) -> int:
        raise RuntimeError(
            "PagedTensor.data_ptr: a PagedTensor's bytes live in pager pages, not at one address (code that "
            "reads memory at it, such as safetensors' save_file, would read none of them, and code that keys "
            "tensors by it, such as torch.autograd.graph.allow_mutation_on_saved_tensors, cannot tell them "
            "apart); use t.materialize() for a dense copy"
        )

    def share_memory_(self) -> "PagedTensor":
        raise NotImplementedError(
            "PagedTensor.share_memory_: pages live in this process's pager and cannot be shared with other "
            "processes; share t.materialize() instead"
        )

    def __dlpack__(self, *args: object, **kwargs: object) -> object:
        raise BufferError(
            "PagedTensor.__dlpack__: a PagedTensor's bytes live in pager pages, so there is no memory to export "
            "without a copy; export t.materialize() instead"
        )

    # ``t.data = value`` (what ``nn.Module.half()``, ``.double()`` and ``.to(dtype)`` do to each
    # parameter) would change the wrapper's shape and dtype while it kept reading its old pages.
    @property
    def data(self) -> torch.Tensor:
        """The tensor detached from autograd (a PagedTensor over the same pages)."""
        return torch._C.TensorBase.data.__get__(self)

    @data.setter
    @deferring  # a Ctrl-C between torch's set_data and the pages following it left old pages read as the new dtype
    def data(self, value: torch.Tensor) -> None:
        """``t.data = value``: ``t`` takes ``value``'s shape, strides, dtype and values, and stays paged.

        A PagedTensor on the same pager is shared (its pages, as torch shares storage); any other
        tensor is copied into this tensor's pager (a PagedTensor cannot share a plain tensor's memory),
        into pages advised as this tensor's were (:meth:`Pager.advise`: model weights stay ``"loop"``
        through ``model.half()``). Whole or not at all: a Ctrl-C is raised as it returns.

        Raises:
            TypeError: ``value`` is not a tensor.
            ValueError: ``value`` is on another device than this tensor's pager computes on.
        """
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"PagedTensor.data: expected a tensor, got {type(value).__name__}")
        if self._paged is None:
            raise NotImplementedError("PagedTensor.data: cannot assign to a traced PagedTensor (inside torch.compile)")
        if value.device != self.device:
            raise ValueError(f"PagedTensor.data: the value is on {value.device}, but this tensor's pager computes on "
                             f"{self.device}; move the value there, or wrap it on a pager of that device")  # fmt: skip
        shared = isinstance(value, PagedTensor) and value.pager is self.pager
        source = value if shared else PagedTensor.wrap(value.detach(), self.pager)
        previous = self.allocation
        if not shared and previous is not None and previous.loop and source.allocation is not None:
            self.pager.advise(source.allocation, "loop")  # used as the pages it replaces were (Pager.advise)
        torch._C.TensorBase.data.__set__(self, source)  # shape, strides, offset and dtype
        self._paged = source._paged
        self._offset = source._offset
        self._materialized = None
        self._span = None
        self._meta = None

    def __repr__(self, *, tensor_contents: object = None) -> str:
        head = f"PagedTensor(shape={list(self.shape)}, dtype={self.dtype}, device={self.device}"
        if self._paged is None:
            return f"{head}, traced)"
        if self.allocation is None:
            return f"{head}, pages=0)"
        if self.pager.closed:
            return f"{head}, pager closed)"
        if self.allocation.freed:  # (``pager.free(t.allocation)``)
            return f"{head}, allocation freed)"
        first, stop = self.page_range()
        residency = ", ".join(f"{tier}={count}" for tier, count in self.residency().items() if count or tier != "unwritten")
        grad = ", requires_grad=True" if self.requires_grad else ""
        return f"{head}, pages={stop - first} of {self.pager.page_size} B, residency({residency}){grad})"

    # ------------------------------------------------------------------ serialization and copies

    @run_outside_compile
    def __reduce_ex__(self, protocol: int):  # noqa: ANN204
        # The data is saved (materialized on the CPU), never the pager: loading wraps it again on
        # the default pager of the loading process. The compute device is recorded too: compile
        # caches pickle example inputs to key compiled graphs, and a CUDA tensor must never key
        # like a CPU one. A traced tensor (fake, at a compile boundary) pickles its inner tensor.
        # Views saved together share their PagedStorage (pickled once), as torch views share a
        # storage; like torch, saving a view saves its whole allocation.
        # The user's Python attributes travel along, as torch's tensors carry theirs.
        is_param = bool(getattr(self, "_is_param", False))
        attributes = _user_attributes(self)
        if self._inner is not None:
            return _rebuild_paged_tensor, (self._inner, self.requires_grad, is_param, str(self._inner.device), attributes)
        layout = (self._offset, tuple(self.shape), tuple(self.stride()), self.dtype, *((math_bits(self),) if self.is_conj() or self.is_neg() else ()))
        return _rebuild_paged_view, (self._paged, layout, self.requires_grad, is_param, str(self.device), attributes)

    @run_outside_compile
    def __deepcopy__(self, memo: dict) -> "PagedTensor":
        """A PagedTensor with copies of this one's pages, on the same pager, as torch deep-copies a
        tensor: views copied together share their copied pages (one copy per allocation in
        ``memo``) but a view with a conjugate or negative bit, copied with its values resolved on
        its own, as torch copies it; ``.grad`` and Python attributes are deep-copied, and a non-leaf is refused. A
        parameter is copied as ``nn.Parameter`` copies one: its data and ``requires_grad`` only (no
        ``.grad``, so a copied model's first step does not add the original's gradients), its data
        a clone of its own: the bytes it reaches, shared with no other copy (two parameters viewing
        one allocation are copied apart, as torch's are)."""
        if id(self) in memo:
            return memo[id(self)]
        is_param = bool(getattr(self, "_is_param", False))
        if not self.is_leaf:
            raise RuntimeError(
                "Only Tensors created explicitly by the user (graph leaves) support the deepcopy protocol at the moment"
            )
        if self._paged is None:  # traced: a dense inner tensor
            copied = PagedTensor._from_inner(self._inner.clone(), tuple(self.shape), self.stride())
        elif math_bits(self) != (False, False) or (is_param and not dense_and_non_overlapping(self.shape, self.stride())):
            # A copy of its own, as torch's: the values with the bits resolved, in clone's layout.
            copied = PagedTensor.wrap(self.detach().clone(memory_format=torch.preserve_format), self._paged.pager)
        elif is_param:  # a clone of the bytes it reaches
            lo, hi = byte_span(self)
            copied = PagedTensor._make(self._paged.copy(lo, hi), self._offset - lo // self.dtype.itemsize, tuple(self.shape), self.stride(), self.dtype)
        else:
            key = ("PagedStorage", id(self._paged))
            storage = memo.get(key)
            if storage is None:
                storage = memo[key] = self._paged.copy()
            copied = PagedTensor._make(storage, self._offset, tuple(self.shape), self.stride(), self.dtype)
        if self.requires_grad:
            copied.requires_grad_(True)
        if is_param:
            copied = torch.nn.Parameter(copied, requires_grad=self.requires_grad)
        memo[id(self)] = copied
        if is_param:
            return copied
        if self.grad is not None:
            copied.grad = copy.deepcopy(self.grad, memo)
        for name, value in self.__dict__.items():
            if name not in _OWN_ATTRIBUTES:
                setattr(copied, name, copy.deepcopy(value, memo))
        return copied


# Frames torch.compile's frame hook meets at run time, outside any graph, that it must not compile:
# ``__torch_dispatch__`` of an op run eagerly at a graph break (``a[a > 0]``): compiled, it and its
# resume functions were a dozen frames guarded on the op and its arguments, recompiled for new
# PagedTensors of the same shapes (a warmed-up function failed under ``set_stance("fail_on_recompile")``);
# and the numpy conversions Dynamo calls for a graph's numpy outputs (``a.numpy()`` returned): compiled,
# they were traced on a tensor with no pages ("numpy() is not supported for tensor subclasses").
for _method in (PagedTensor.__torch_dispatch__, PagedTensor.numpy, PagedTensor.__array__, PagedTensor._numpy_copy):
    _skip_frame(getattr(_method, "__func__", _method).__code__)
del _method


# Attributes PagedTensor itself keeps in ``__dict__`` (a deep copy rebuilds them; the rest are users').
_OWN_ATTRIBUTES = frozenset({"_paged", "_offset", "_inner", "_materialized", "_span", "_meta", "_view_root", "_owner_storage", "_is_param"})


# The FFT ops (``torch.fft``): of real input, their composite kernels make complex intermediates.
_FFTS = frozenset(getattr(torch.ops.aten, name) for name in dir(torch.ops.aten) if name.startswith("fft_"))


def _has_complex_tensor(args: tuple, kwargs: dict) -> bool:
    """Whether a tensor among ``args`` and ``kwargs`` (top level and inside lists/tuples) is complex."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            if value.is_complex():
                return True
        elif type(value) in (list, tuple) and any(isinstance(item, torch.Tensor) and item.is_complex() for item in value):
            return True
    return False


def _conjugate_fallback_on() -> torch._C._SetExcludeDispatchKeyGuard:
    """A guard under which ops honour a tensor's conjugate bit (torch's conjugate fallback runs)."""
    return torch._C._SetExcludeDispatchKeyGuard(torch._C.DispatchKey.Conjugate, False)


def _negative_fallback_on() -> torch._C._SetExcludeDispatchKeyGuard:
    """A guard under which ops honour a tensor's negative bit (torch's negative fallback runs)."""
    return torch._C._SetExcludeDispatchKeyGuard(torch._C.DispatchKey.Negative, False)


def math_bits(tensor: torch.Tensor) -> tuple[bool, bool]:
    """``(conjugate, negative)``: the bits of a lazily conjugated or negated view (``t.conj()`` of a
    complex tensor; ``t.conj().imag``). A PagedTensor carries them as torch's views do: its pages
    hold the unconjugated values, and every dense view made of them carries the bits too."""
    return tensor.is_conj(), tensor.is_neg()


def with_math_bits(tensor: torch.Tensor, bits: tuple[bool, bool]) -> torch.Tensor:
    """``tensor`` with the conjugate and negative bits ``bits`` (a view of it where they change)."""
    if math_bits(tensor) == bits:
        return tensor
    if not isinstance(tensor, PagedTensor):
        tensor = torch.ops.aten.alias.default(tensor)  # a view, strides kept: a dense tensor's own bits are left as they are
    torch._C._set_conj(tensor, bits[0])
    torch._C._set_neg(tensor, bits[1])
    return tensor


def meta_like(tensor: PagedTensor) -> torch.Tensor:
    """A meta tensor with ``tensor``'s layout over a storage as large as its allocation.

    Made once per PagedTensor (its layout never changes) from one meta base per allocation and dtype.
    """
    meta = tensor._meta
    if meta is None:
        meta = tensor._paged.meta_base(tensor.dtype).as_strided(tensor.shape, tensor.stride(), tensor._offset)
        meta = tensor._meta = with_math_bits(meta, math_bits(tensor))
    return meta


def meta_layout(value: object) -> object:
    """``value`` as a meta tensor of its layout (a PagedTensor's over its allocation's meta base, so
    views of one allocation share a storage there too); any other value as it is."""
    if isinstance(value, PagedTensor):
        return meta_like(value)
    if isinstance(value, torch.Tensor):
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")
    return value


@run_outside_compile  # unpickled by torch.load inside a compiled function: a frame Dynamo would trace
def _rebuild_paged_storage(data: Optional[torch.Tensor]) -> Union[PagedStorage, torch.Tensor]:
    """Unpickle a PagedStorage: a new allocation of the default pager holding the saved bytes.

    Where the bytes cannot be paged yet, ``data`` itself comes back and the views over it load as
    plain tensors: ``map_location="meta"`` (no bytes), and torch's legacy (non-zip) format, whose
    loader fills each tensor's bytes only after the whole object is rebuilt.
    """
    if data is None:
        return PagedStorage(get_default_pager(), None)
    if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8 or data.dim() != 1:
        raise ValueError(f"PagedStorage: expected the saved bytes as a 1-D uint8 tensor, got {type(data).__name__} {getattr(data, 'dtype', '')}")
    if not _bytes_are_loaded(data):
        return data
    pager = get_default_pager()
    return PagedStorage.filled(pager, data.numel(), lambda allocation: pager.write(allocation, data))


@run_outside_compile  # unpickled by torch.load inside a compiled function: a frame Dynamo would trace
def _rebuild_paged_view(
    storage: Union[PagedStorage, torch.Tensor],
    layout: tuple,
    requires_grad: bool,
    is_param: bool = False,
    saved_from: str = "",
    attributes: Optional[dict] = None,
) -> torch.Tensor:
    """Unpickle a PagedTensor saved by pages: ``layout`` is (element offset, size, stride, dtype)
    over ``storage``; ``attributes`` are the user's Python attributes (``saved_from``, the device it
    was computed on when saved, is informational). Over plain saved bytes (see
    :func:`_rebuild_paged_storage`) the view is a plain tensor sharing them."""
    offset, size, stride, dtype, *bits = layout  # bits: (conjugate, negative), saved where set
    size, stride = tuple(size), tuple(stride)
    if not isinstance(storage, (PagedStorage, torch.Tensor)):
        raise ValueError(f"PagedTensor: expected a PagedStorage to rebuild from, got {type(storage).__name__}")
    nbytes = storage.nbytes if isinstance(storage, PagedStorage) else storage.numel()
    lo, hi = element_span(size, stride, offset)
    if hi > lo and (lo < 0 or hi * dtype.itemsize > nbytes):
        raise ValueError(
            f"PagedTensor: saved view (offset {offset}, size {size}, stride {stride}, {dtype}) reaches past its {nbytes}-byte storage"
        )
    if isinstance(storage, PagedStorage):
        tensor = PagedTensor._make(storage, offset, size, stride, dtype, bits=tuple(bits[0]) if bits else (False, False))
    else:
        tensor = torch.empty(0, dtype=dtype, device=storage.device).set_(storage.untyped_storage(), offset, size, stride)
        if bits:
            tensor = with_math_bits(tensor, tuple(bits[0]))
    return _as_saved(tensor, requires_grad, is_param, attributes)


@run_outside_compile  # unpickled by torch.load inside a compiled function: a frame Dynamo would trace
def _rebuild_paged_tensor(
    data: torch.Tensor, requires_grad: bool, is_param: bool = False, saved_from: str = "", attributes: Optional[dict] = None
) -> torch.Tensor:
    """Unpickle a PagedTensor saved as dense data (a traced tensor, or a file of an earlier release):
    wrap the data on the default pager (``saved_from`` is informational). Data that cannot be paged
    yet (see :func:`_rebuild_paged_storage`) loads as the plain tensor it is."""
    tensor = PagedTensor.wrap(data) if _bytes_are_loaded(data) else data
    return _as_saved(tensor, requires_grad, is_param, attributes)


def _reduce_for_another_process(tensor: "PagedTensor"):  # noqa: ANN202
    """How torch.multiprocessing's pickler (queues, pipes, a process's arguments) sends a
    PagedTensor: as pickle does, but a non-leaf that requires grad is refused in torch's words, as
    torch refuses a plain one (autograd does not cross processes)."""
    if tensor.requires_grad and not tensor.is_leaf:
        raise RuntimeError(
            "Cowardly refusing to serialize non-leaf tensor which requires_grad, since autograd does not support "
            "crossing process boundaries.  If you just want to transfer the data, call detach() on the tensor "
            "before serializing (e.g., putting it on the queue)."
        )
    return tensor.__reduce_ex__(pickle.DEFAULT_PROTOCOL)


def _as_saved(tensor: torch.Tensor, requires_grad: bool, is_param: bool, attributes: Optional[dict] = None) -> torch.Tensor:
    if requires_grad:
        tensor.requires_grad_(True)
    if is_param:
        tensor = torch.nn.Parameter(tensor, requires_grad=requires_grad)
    for name, value in (attributes or {}).items():
        setattr(tensor, name, value)
    return tensor


def _user_attributes(tensor: torch.Tensor) -> Optional[dict]:
    """The Python attributes a user set on ``tensor`` (saved and copied with it), or ``None``."""
    attributes = {name: value for name, value in tensor.__dict__.items() if name not in _OWN_ATTRIBUTES}
    return attributes or None


def _bytes_are_loaded(data: torch.Tensor) -> bool:
    """Whether ``data``, handed to a rebuild function by ``torch.load``, holds its bytes already: not
    on the meta device, not a tensor subclass (a FakeTensor, loading under ``FakeTensorMode``: paging
    it would make the pager's slabs fake), and not inside torch's legacy (non-zip) loader, which
    fills storages only after unpickling (a PagedTensor would page uninitialized memory)."""
    if data.device.type == "meta" or type(data) is not torch.Tensor:
        return False
    legacy_load = getattr(getattr(torch.serialization, "_legacy_load", None), "__code__", None)
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is legacy_load:
            warnings.warn(
                "torch.load: a PagedTensor in a legacy-format (non-zip) file loads as a plain tensor, because that "
                "format fills tensor bytes only after unpickling; PagedTensor.wrap it, or re-save in the default format",
                stacklevel=2,
            )
            return False
        frame = frame.f_back
    return True


# torch.load(weights_only=True) (the default) accepts only allowlisted globals.
torch.serialization.add_safe_globals([_rebuild_paged_tensor, _rebuild_paged_view, _rebuild_paged_storage])


def _check_wrappable(t: object) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"PagedTensor.wrap: expected a torch.Tensor, got {type(t).__name__}")
    if type(t) not in (torch.Tensor, torch.nn.Parameter):
        raise TypeError(
            f"PagedTensor.wrap: cannot page a tensor subclass of another kind ({type(t).__module__}.{type(t).__qualname__}); "
            "pass a plain tensor"
        )
    if torch._C._functorch.is_functorch_wrapped_tensor(t):
        raise TypeError(
            "PagedTensor.wrap: the tensor belongs to a torch.func transform (grad, jvp, vjp or vmap: an input of "
            "the transformed function, or made from one), whose values the pages would hold cut off from the "
            "transform; wrap the tensor outside the transform and pass the PagedTensor in"
        )
    reason = unpageable_reason(t)
    if reason is None and t.dtype in _UNSUPPORTED_DTYPES:
        reason = f"unsupported dtype {t.dtype}"
    if reason is not None:
        raise ValueError(f"PagedTensor.wrap: {reason}")


# Bound last: dispatch.py imports PagedTensor from this module.
multiprocessing.reduction.ForkingPickler.register(PagedTensor, _reduce_for_another_process)

from pagedtensor.dispatch import DISPATCHER as _DISPATCHER  # noqa: E402
from pagedtensor import raw_pointer_entries as _raw_pointer_entries  # noqa: E402

_raw_pointer_entries.install()
