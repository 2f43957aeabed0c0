"""The handler of ``_grouped_mm`` over a paged stack of expert matrices (a mixture-of-experts layer):
only the experts that have rows fault in, one at a time.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch._ops import OpOverload

from pagedtensor.dispatch import DISPATCHER, _Window, aten, implements
from pagedtensor.errors import OutOfPagesError
from pagedtensor.tensor import PagedTensor, byte_span, meta_like


@implements([aten._grouped_mm.default])
def grouped_mm_of_routed_experts(func: OpOverload, types: tuple, args: tuple, kwargs: dict) -> Any:
    """``_grouped_mm(mat_a, mat_b, offs)`` with a 2-D ``mat_a`` and a paged 3-D ``mat_b``, a stack of
    expert matrices (a mixture-of-experts layer: group ``e`` is rows ``offs[e - 1]:offs[e]`` of
    ``mat_a`` times ``mat_b[e]``): fault in only the experts that have rows, one at a time.

    Each expert with rows runs as its own ``_grouped_mm`` of the dense op's shapes: ``mat_a`` of
    as many rows, the expert's rows first (a copy, unless they are first already); ``mat_b`` the
    expert's resident pages (zero-copy where its slots are adjacent) repeated over all the experts
    with a stride of 0; ``offs`` giving every group but the expert's no rows. torch picks a GEMM's
    kernel from those shapes (its tile from the rows per group), and no group's product depends on
    another's, so each expert's rows come out with the dense op's bits; they are copied into one
    result of the dense op's layout (rows past ``offs[-1]`` are unspecified, as in the dense op).
    An expert needs only its own pages resident at once; one larger than the device tier is read
    in chunks, as :meth:`PagedTensor.materialize` reads. Any other form of the op (a 2-D ``mat_b``,
    a 3-D ``mat_a``, no ``offs``, a ``bias``) runs the generic way.

    Note:
        Reads ``offs`` on the host (a sync when it lives on the GPU), as a row gather reads its
        index. Everything is enqueued on the current stream: each expert's op, then the copy of its
        rows; its pages are released after its op.
    """
    routed = _routed_experts(args, kwargs)
    if routed is None:
        return DISPATCHER.run_paged(func, types, args, kwargs)
    mat_a, mat_b, offs, starts, ends = routed
    out_dtype = args[4] if len(args) > 4 else kwargs.get("out_dtype")
    experts = mat_b.shape[0]
    routed_experts = [expert for expert in range(experts) if ends[expert] > starts[expert]]
    if not routed_experts:  # no row at all: the dense op's layout, its values unspecified, no page read
        return func(mat_a, _unread_stack(mat_b), torch.zeros_like(offs), out_dtype=out_dtype)
    # Per routed expert, the group ends that give every group but the expert's no rows (one copy).
    group_ends = torch.tensor([[0] * expert + [ends[expert] - starts[expert]] * (experts - expert) for expert in routed_experts],
                              dtype=torch.int32, device=offs.device)  # fmt: skip
    # An expert's rows go first in a buffer of mat_a's layout and of its address's alignment
    # (torch's kernel depends on both: the CPU kernel takes another path for an unaligned mat_a).
    rows_first = _buffer_like(mat_a) if any(starts[expert] for expert in routed_experts) else None
    if rows_first is not None and rows_first.stride() != mat_a.stride():
        _check_as_torch(args, kwargs)  # an expanded mat_a: torch's error, before the whole stack is read
        return DISPATCHER.run_paged(func, types, args, kwargs)  # elements shared, torch accepts it: the generic way
    result = None
    for run, expert in enumerate(routed_experts):
        start, rows = starts[expert], ends[expert] - starts[expert]
        expert_a = mat_a
        if start:
            expert_a = rows_first
            expert_a[:rows].copy_(mat_a[start : start + rows])
        out = _one_expert(func, expert_a, mat_b, expert, group_ends[run], out_dtype)
        if result is None:
            result = torch.empty_like(out)
        result[start : start + rows].copy_(out[:rows])
    return result


def _buffer_like(mat_a: torch.Tensor, alignment: int = 64) -> torch.Tensor:
    """An empty tensor of ``mat_a``'s sizes and strides (where no two of its elements share memory:
    a column slice keeps its row stride; else ``empty_like``'s) whose data pointer has ``mat_a``'s
    offset from an ``alignment``-byte boundary."""
    buffer = torch.empty_like(mat_a)
    if buffer.stride() != mat_a.stride() and _elements_apart(mat_a):
        buffer = torch.empty_strided(mat_a.shape, mat_a.stride(), dtype=mat_a.dtype, device=mat_a.device)
    shift = mat_a.data_ptr() % alignment
    if shift == 0 or shift % mat_a.element_size():
        return buffer
    shift //= mat_a.element_size()
    flat = torch.empty(buffer.untyped_storage().nbytes() // mat_a.element_size() + shift, dtype=mat_a.dtype, device=mat_a.device)
    return flat.as_strided(buffer.shape, buffer.stride(), shift)


def _elements_apart(tensor: torch.Tensor) -> bool:
    """Whether no two elements of ``tensor`` share memory: along its dims of more than one element,
    by increasing stride, each stride passes the farthest element the smaller ones reach."""
    reach = 0
    for stride, size in sorted((stride, size) for stride, size in zip(tensor.stride(), tensor.shape) if size > 1):
        if stride <= reach:
            return False
        reach += (size - 1) * stride
    return True


def _one_expert(func: OpOverload, mat_a: torch.Tensor, mat_b: PagedTensor, expert: int, group_ends: torch.Tensor,
                out_dtype: Optional[torch.dtype]) -> torch.Tensor:
    """``func(mat_a, mat_b, group_ends)`` where only ``expert``'s group has rows: its pages resident for
    the call, repeated over ``mat_b``'s experts (stride 0)."""
    matrix = mat_b[expert]
    lo, hi = byte_span(matrix)
    try:
        window = _Window(matrix._paged, lo, hi)
    except OutOfPagesError:  # an expert larger than the device tier beside the pinned pages
        dense = DISPATCHER.materialize(matrix)
        return func(mat_a, dense.expand(mat_b.shape), group_ends, out_dtype=out_dtype)
    try:
        return func(mat_a, window.dense(matrix).expand(mat_b.shape), group_ends, out_dtype=out_dtype)
    finally:
        window.release()


def _unread_stack(mat_b: PagedTensor) -> torch.Tensor:
    """A stand-in for ``mat_b`` with its layout and no page read: one uninitialized expert repeated
    with a stride of 0, for an op that reads none of it (no rows) or only checks its arguments."""
    return torch.empty_like(meta_like(mat_b)[0], device=mat_b.device).expand(mat_b.shape)


def _check_as_torch(args: tuple, kwargs: dict) -> None:
    """Run ``_grouped_mm`` on the arguments with the paged stack ``args[1]`` replaced by a stand-in
    whose pages are not read (:func:`_unread_stack`): torch's own checks and errors, before any page
    is read (the generic way reads the whole stack first: OutOfPagesError where it does not fit)."""
    torch.ops.aten._grouped_mm.default(args[0], _unread_stack(args[1]), *args[2:], **kwargs)


def _routed_experts(args: tuple, kwargs: dict) -> Optional[tuple[torch.Tensor, PagedTensor, torch.Tensor, list[int], list[int]]]:
    """``(mat_a, mat_b, offs, starts, ends)`` when ``_grouped_mm``'s ``mat_b`` is a paged stack of
    expert matrices and ``offs`` their groups' row ends (int32, one per expert), each expert's rows
    ``starts[e]:ends[e]`` of ``mat_a``, else ``None``.

    ``offs`` out of order or past ``mat_a``'s rows: torch's CPU kernel (``_grouped_mm_fallback``)
    takes them, each group ``e`` the rows ``mat_a[offs[e - 1]:offs[e]]`` as a slice clamps them
    (none where the end comes first, none past the last row), the groups written in order (a later
    group's rows over an earlier's); on the CPU so do these. Elsewhere (CUDA's kernels assume ordered
    ``offs``) and for a negative ``offs``, the generic way: torch's own behaviour within the tier."""
    mat_a, mat_b = args[0], args[1]
    offs = args[2] if len(args) > 2 else kwargs.get("offs")
    if not isinstance(mat_b, PagedTensor) or mat_b._inner is not None or mat_b.dim() != 3 or mat_b.numel() == 0 or mat_b.is_conj():
        return None
    if not isinstance(mat_a, torch.Tensor) or isinstance(mat_a, PagedTensor) or mat_a.dim() != 2:
        return None
    if not isinstance(offs, torch.Tensor) or isinstance(offs, PagedTensor):
        return None
    bias = args[3] if len(args) > 3 else kwargs.get("bias")
    if offs.dim() != 1 or offs.numel() != mat_b.shape[0] or offs.dtype != torch.int32 or bias is not None:
        _check_as_torch(args, kwargs)  # torch's errors for these (a bias: it has no kernel for one yet)
        return None  # torch accepted it after all: the generic way
    ends = offs.tolist()
    starts = [0, *ends[:-1]]
    if any(end < start for start, end in zip(starts, ends)) or ends[-1] > mat_a.shape[0]:
        if offs.device.type != "cpu" or mat_a.device.type != "cpu" or min(ends) < 0:
            return None  # torch's own behaviour, the generic way
        rows = mat_a.shape[0]
        starts = [min(start, rows) for start in starts]  # as the CPU kernel's slices clamp them
        ends = [max(min(end, rows), start) for start, end in zip(starts, ends)]
    return mat_a, mat_b, offs, starts, ends
