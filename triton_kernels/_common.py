"""Shared pieces of the paged kernels: argument checks, launch geometry and output allocation.

The kernels run on CUDA tensors, or on CPU tensors under the Triton interpreter
(``TRITON_INTERPRET=1`` when the package is imported: Triton reads it as it builds the kernels). Every check raises a
``TypeError`` (wrong type or dtype) or a ``ValueError`` (wrong shape, value or device) that names
the argument and the value it got.
"""

from __future__ import annotations

import functools
import math
import numbers
import os
from typing import Any, Callable, TypeVar

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction

from pagedtensor.dispatch import overlaps_itself
from pagedtensor.tensor import dense_and_non_overlapping

T = TypeVar("T")

KV_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIMS = (16, 32, 64, 128, 256)

# Value every kernel output and workspace is filled with before a launch, or None for torch.empty.
# Tests set it to NaN so that an element a kernel forgot to write fails the comparison.
POISON: float | None = None


MAX_GRID_Y = 65535  # CUDA caps a launch grid's second (and third) dimension here


@triton.jit
def _how_triton_builds_kernels() -> None:
    """Decorated as every kernel of the package is, as the package is imported: whether Triton made
    it an interpreted function tells how it built them all."""


_INTERPRETED = isinstance(_how_triton_builds_kernels, InterpretedFunction)


def interpreting() -> bool:
    """Whether the package's Triton kernels run under the CPU interpreter: what Triton decided as it
    built them, when ``pagedtensor.triton_kernels`` was imported (``TRITON_INTERPRET=1`` then, in
    Triton's reading of the value: ``true`` and ``on`` too, ``false`` and ``off`` not)."""
    return _INTERPRETED


def _interpret_set_now() -> bool:
    """Whether ``TRITON_INTERPRET`` now asks for the interpreter, as Triton reads it (``1``, ``true``,
    ``on``, ``yes``, ``y``, any case; read here from ``os.environ``, which ``torch.compile`` traces)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes", "y")


def _set_too_late(wanted: bool) -> str:
    """A hint where ``TRITON_INTERPRET`` was changed after the kernels were built."""
    if _interpret_set_now() != wanted:
        return ""
    return (
        f" (TRITON_INTERPRET now {'asks for' if wanted else 'turns off'} the interpreter, but it was "
        f"{'unset' if wanted else 'set'} when pagedtensor.triton_kernels was imported: Triton builds the kernels "
        "then; set it before that import)"
    )


def kernel_device() -> torch.device:
    """The device the kernels run on here: CUDA when compiled, CPU under the interpreter."""
    return torch.device("cpu") if interpreting() or not torch.cuda.is_available() else torch.device("cuda")


def kv_pool_strides(k_pages: torch.Tensor, v_pages: torch.Tensor, block_table: torch.Tensor) -> dict[str, int]:
    """The stride keywords every attention kernel takes for its K/V page pools and block table."""
    return {
        "stride_k_page": k_pages.stride(0),
        "stride_k_token": k_pages.stride(1),
        "stride_k_head": k_pages.stride(2),
        "stride_v_page": v_pages.stride(0),
        "stride_v_token": v_pages.stride(1),
        "stride_v_head": v_pages.stride(2),
        "stride_bt_batch": block_table.stride(0),
    }


def new_buffer(shape: tuple[int, ...] | list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An output or workspace tensor: uninitialised, or filled with ``POISON`` when set."""
    if POISON is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.full(shape, POISON, dtype=dtype, device=device)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def programs_per_sm(compiled: object, device: torch.device) -> int | None:
    """How many programs of a compiled Triton kernel one SM of ``device`` holds at once, the least of
    what its registers, shared memory and thread slots allow; None if the kernel does not report its
    registers (the launch then falls back to its tuned estimate)."""
    try:
        compiled._init_handles()  # Triton loads the binary, and learns its registers, on first use
        registers, shared, warps = compiled.n_regs, compiled.metadata.shared, compiled.metadata.num_warps
    except (AttributeError, RuntimeError):
        return None
    if not registers:
        return None
    props = torch.cuda.get_device_properties(device)
    threads = 32 * warps
    by_registers = getattr(props, "regs_per_multiprocessor", 65536) // (math.ceil(registers / 8) * 8 * threads)
    by_shared = getattr(props, "shared_memory_per_multiprocessor", 233472) // (shared + 1024)  # 1 KiB reserved a block
    by_threads = getattr(props, "max_threads_per_multi_processor", 2048) // threads
    return max(1, min(by_registers, by_shared, by_threads, 32))


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 for the interpreter (keeps grids small)."""
    if device.type != "cuda" or interpreting():
        return 1
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def on_its_tensors_device(launch: Callable[..., T]) -> Callable[..., T]:
    """``launch`` (a function that launches kernels on tensors of one device, its first argument's)
    run with that device current. Triton launches on the current CUDA device and its current
    stream: a tensor on ``cuda:1`` while ``cuda:0`` is current (a model moved with ``.to("cuda:1")``)
    would be launched on the wrong device, outside the stream order of its producers and of the
    pager's fences. Plain torch ops run on their tensors' device whatever is current; so does this.
    Costs one device query where the device is already current (the common case)."""

    @functools.wraps(launch)
    def on_the_device(first: torch.Tensor, *args: Any, **kwargs: Any) -> T:
        device = first.device
        if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
            with torch.cuda.device(device):
                return launch(first, *args, **kwargs)
        return launch(first, *args, **kwargs)

    return on_the_device


def call_kernel_directly(*tensors: torch.Tensor) -> bool:
    """Whether a public function may launch its kernel without going through its custom op.

    The op's dispatch costs host time on every call (tens of microseconds, comparable to a decode
    kernel). Plain eager calls on plain tensors skip it; under ``torch.compile`` / export tracing, with
    tensor subclasses (e.g. ``PagedTensor``, fake tensors) or with a dispatch mode active, the op is
    called so that tracing, ``__torch_dispatch__`` and modes see it; and where an input requires grad
    (grad mode on), so that autograd sees it: the ops have no backward, and a backward through one
    raises rather than the output being silently cut off from the graph; and under a ``torch.func``
    transform (vmap runs the op item by item, functionalize rewrites its mutation).
    """
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return False  # vmap / grad / functionalize: their wrapped tensors have no storage to launch on
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False  # the op records itself, so a backward through it raises instead of a silent detach
    return all(type(t) is torch.Tensor for t in tensors)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def check_tensor(name: str, value: object, ndim: int, dtypes: tuple[torch.dtype, ...]) -> torch.Tensor:
    """``value`` is a tensor of ``ndim`` dimensions with one of ``dtypes``."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    if value.dtype not in dtypes:
        allowed = ", ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype {allowed}; got {value.dtype}")
    return value


def check_device(device: torch.device, **tensors: torch.Tensor) -> None:
    """All ``tensors`` lie on ``device``, and the kernels can run there."""
    for name, tensor in tensors.items():
        if tensor.device != device:
            raise ValueError(f"{name} is on {tensor.device}, expected {device} (the device of the pages)")
    if device.type == "cuda":
        if interpreting():
            raise ValueError(f"tensors are on {device} but TRITON_INTERPRET=1 runs kernels on the CPU{_set_too_late(False)}")
    elif device.type == "cpu":
        if not interpreting():
            raise ValueError(f"tensors are on cpu: the Triton kernels need a CUDA device, or TRITON_INTERPRET=1{_set_too_late(True)}")
        if not _interpret_set_now():  # Triton's interpreter reads the variable again as it runs a kernel
            raise ValueError(
                "tensors are on cpu and the kernels were built for the interpreter, but TRITON_INTERPRET no longer asks "
                "for it: set TRITON_INTERPRET=1 again (Triton reads it when a kernel runs too)"
            )
    else:
        raise ValueError(f"tensors are on {device}: only cuda (or cpu under TRITON_INTERPRET=1) is supported")


def check_pages(name: str, pages: object) -> torch.Tensor:
    """A page pool ``[num_pages, page_tokens, num_kv_heads, head_dim]`` with a unit last stride."""
    pages = check_tensor(name, pages, 4, KV_DTYPES)
    num_pages, page_tokens, num_heads, head_dim = pages.shape
    if num_pages < 1 or page_tokens < 1 or num_heads < 1:
        raise ValueError(f"{name} must be [num_pages, page_tokens, num_kv_heads, head_dim], got {tuple(pages.shape)}")
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"{name} head_dim must be one of {HEAD_DIMS}, got {head_dim}")
    if pages.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in head_dim, got strides {tuple(pages.stride())}")
    return pages


def check_kv_pages(k_pages: object, v_pages: object) -> tuple[torch.Tensor, torch.Tensor]:
    k_pages = check_pages("k_pages", k_pages)
    v_pages = check_pages("v_pages", v_pages)
    if v_pages.shape != k_pages.shape:
        raise ValueError(f"v_pages shape {tuple(v_pages.shape)} differs from k_pages shape {tuple(k_pages.shape)}")
    if v_pages.dtype != k_pages.dtype:
        raise TypeError(f"v_pages dtype {v_pages.dtype} differs from k_pages dtype {k_pages.dtype}")
    return k_pages, v_pages


def check_query(q: object, k_pages: object, v_pages: object, ndim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q`` of ``ndim`` dims (heads and head_dim last) in the pages' dtype and head_dim, its heads a
    multiple of the KV heads, and the pages (:func:`check_kv_pages`): ``(q, k_pages, v_pages)``."""
    q = check_tensor("q", q, ndim, (torch.float16, torch.bfloat16, torch.float32))
    k_pages, v_pages = check_kv_pages(k_pages, v_pages)
    num_heads, head_dim = q.shape[-2], q.shape[-1]
    num_kv_heads = k_pages.shape[2]
    if q.dtype != k_pages.dtype:
        raise TypeError(f"q dtype {q.dtype} differs from k_pages dtype {k_pages.dtype}")
    if head_dim != k_pages.shape[3]:
        raise ValueError(f"q head_dim {head_dim} differs from k_pages head_dim {k_pages.shape[3]}")
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"q num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    return q, k_pages, v_pages


def check_block_table(block_table: object, seq_lens: object, page_tokens: int,
                      batch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``block_table`` ``[batch, max_pages]`` int32 and ``seq_lens`` ``[batch]`` int32, with every token
    position the table can address (``max_pages * page_tokens``) an int32, as the kernels compute them."""
    block_table = check_tensor("block_table", block_table, 2, (torch.int32,))
    seq_lens = check_tensor("seq_lens", seq_lens, 1, (torch.int32,))
    if batch is not None and block_table.shape[0] != batch:
        raise ValueError(f"block_table must have {batch} rows (the batch), got shape {tuple(block_table.shape)}")
    if seq_lens.shape[0] != block_table.shape[0]:
        raise ValueError(f"seq_lens must have {block_table.shape[0]} entries (the batch), got shape {tuple(seq_lens.shape)}")
    if block_table.shape[1] < 1:
        raise ValueError(f"block_table must have at least one column, got shape {tuple(block_table.shape)}")
    if block_table.shape[1] * page_tokens > 2**31 - 1:
        raise ValueError(f"block_table has {block_table.shape[1]} pages of {page_tokens} tokens a row, "
                         f"{block_table.shape[1] * page_tokens} token positions; at most 2**31 - 1 fit the int32 positions")  # fmt: skip
    if block_table.stride(-1) != 1:
        block_table = block_table.contiguous()
    if seq_lens.stride(0) != 1:
        seq_lens = seq_lens.contiguous()
    return block_table, seq_lens


CHECK_INDICES_VARIABLE = "PAGEDLLM_CHECK_INDICES"


def host_checks_indices(device: torch.device) -> bool:
    """Whether block-table entries and sequence lengths are checked on the host before a launch.

    Always for CPU tensors (the interpreter: the check costs no transfer). For CUDA tensors only when
    the environment variable ``PAGEDLLM_CHECK_INDICES`` is set to a value other than ``0``: the check
    reads the tables back, a host sync per call, and cannot run while a CUDA graph is captured. Without
    it the CUDA kernels trust the entries, as vLLM's and FlashAttention's do: a length past the table
    is cut at the table, but an entry outside the pool is followed outside it.
    """
    if device.type == "cpu":
        return True
    return os.environ.get(CHECK_INDICES_VARIABLE, "0") not in ("", "0")


def check_table_entries(block_table: torch.Tensor, num_pages: int, page_tokens: int, end: torch.Tensor,
                        first: torch.Tensor | None = None, *, extra: int = 0, limit: int | None = None,
                        lengths_fit: bool = False, lengths: str | None = "seq_lens") -> None:
    """Every entry of ``block_table`` that the tokens ``[first[b], min(end[b] + extra, limit))`` of row
    ``b`` use (``first`` 0 by default; clipped to the table) names a page of the pool,
    ``0 <= entry < num_pages``. ``end`` holds the sequence lengths of the argument named ``lengths``,
    each ``>= 0``, or with ``lengths=None`` positions, which may be negative (a scatter drops the
    tokens before position 0); with ``lengths_fit`` also every ``end[b] <= max_pages * page_tokens``:
    the keys must lie in the table. Checked where :func:`host_checks_indices` says so (nothing is
    computed otherwise); raises ``ValueError`` naming the first bad length or entry."""
    if not host_checks_indices(block_table.device) or block_table.numel() == 0:
        return
    table = block_table.cpu()
    max_pages = table.shape[1]
    capacity = max_pages * page_tokens
    end = end.cpu().long()
    negative = (end < 0).nonzero()
    if lengths is not None and negative.numel():
        b = int(negative[0, 0])
        raise ValueError(f"{lengths}[{b}] = {int(end[b])} is negative")
    if lengths_fit:
        over = (end > capacity).nonzero()
        if over.numel():
            b = int(over[0, 0])
            raise ValueError(f"{lengths}[{b}] = {int(end[b])} exceeds the block table's capacity of {capacity} tokens "
                             f"(max_pages * page_tokens)")  # fmt: skip
    end = (end + extra).clamp(max=capacity if limit is None else min(limit, capacity))
    first = torch.zeros_like(end) if first is None else first.cpu().long().clamp(min=0)
    columns = torch.arange(max_pages)
    used = ((columns[None, :] >= (first // page_tokens)[:, None]) & (columns[None, :] * page_tokens < end[:, None])
            & (end > first)[:, None])  # fmt: skip
    bad = (used & ((table < 0) | (table >= num_pages))).nonzero()
    if bad.numel():
        b, j = int(bad[0, 0]), int(bad[0, 1])
        raise ValueError(f"block_table[{b}, {j}] = {int(table[b, j])} is not a page of the pool: an entry that a "
                         f"sequence uses must be in [0, {num_pages})")  # fmt: skip


def optional_int(name: str, value: object, minimum: int) -> int | None:
    """``value`` None or an integer (a NumPy one too, as torch takes) of at least ``minimum``, as an int:
    ``TypeError`` for another type (a float, a string, a bool), ``ValueError`` for one too small."""
    if value is None:
        return None
    kind = "positive" if minimum == 1 else "non-negative"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a {kind} int or None, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be a {kind} int or None, got {value!r}")
    return int(value)


def _has_storage_to_check(tensor: torch.Tensor) -> bool:
    """Whether ``tensor``'s memory can be checked for overlap here: a plain tensor outside tracing,
    not wrapped by a ``torch.func`` transform (a vmap-batched tensor's type is ``torch.Tensor`` but it
    has no storage; the op then sees the dense items, or torch refuses the op naming it)."""
    return (
        type(tensor) is torch.Tensor
        and not torch.compiler.is_compiling()
        and not torch._C._functorch.is_functorch_wrapped_tensor(tensor)
    )


def refuse_internal_overlap(written: torch.Tensor, name: str) -> None:
    """Raise torch's in-place error where elements of ``written`` share memory (``expand``: programs
    writing different elements would write the same bytes; on a GPU, a race), as torch's kernels
    refuse such a written tensor. Plain tensors only: a PagedTensor's op runs this on its dense one."""
    if _has_storage_to_check(written) and overlaps_itself(written):
        raise RuntimeError(
            f"unsupported operation: more than one element of {name} refers to a single memory location "
            f"(strides {written.stride()} of shape {tuple(written.shape)}). Please clone() the tensor before performing the operation."
        )


def refuse_shared_memory(written: torch.Tensor, read: torch.Tensor, written_name: str, read_name: str) -> None:
    """Raise torch's in-place error where ``read`` shares memory with ``written`` (a kernel would read
    elements other programs already wrote; on a GPU, a race), as torch's ``assert_no_overlap`` does:
    only for two non-empty tensors that are each non-overlapping and dense (others it cannot tell)."""
    if not (_has_storage_to_check(written) and _has_storage_to_check(read)):
        return  # subclasses, fake and functorch-wrapped tensors: their ops run this on the dense tensors
    if written.numel() == 0 or read.numel() == 0:
        return
    if not (dense_and_non_overlapping(written.shape, written.stride()) and dense_and_non_overlapping(read.shape, read.stride())):
        return
    if written.device != read.device:
        return
    written_start, read_start = written.data_ptr(), read.data_ptr()
    written_end = written_start + written.numel() * written.element_size()
    read_end = read_start + read.numel() * read.element_size()
    if written_start < read_end and read_start < written_end:
        raise RuntimeError(
            f"unsupported operation: some elements of {read_name} and {written_name} refer to a single memory "
            f"location. Please clone() {read_name} before the call"
        )


def check_positions(name: str, value: object, batch: int, device: torch.device, span: int = 0) -> torch.Tensor:
    """An integer or an int32 ``[batch]`` tensor of token positions, as an int32 ``[batch]`` tensor.

    Each position and the ``span`` tokens from it (a prefill's queries, a scatter's new tokens) must
    be int32 positions, as the kernels compute them: checked here for an integer, and for a tensor by
    :func:`check_position_values` inside the op (where :func:`host_checks_indices` says so)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or an int32 tensor, got bool {value}")
    if isinstance(value, numbers.Integral):
        value = int(value)
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
        if value + span >= 2**31:
            raise ValueError(f"{name} + {span} tokens must be < 2**31 (int32 positions), got {name} = {value}")
        return torch.full((batch,), value, dtype=torch.int32, device=device)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be an int or an int32 tensor, got {type(value).__name__}")
    value = check_tensor(name, value, 1, (torch.int32,))
    if value.shape[0] != batch:
        raise ValueError(f"{name} must have {batch} entries (the batch), got shape {tuple(value.shape)}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device}, expected {device} (the device of the pages)")
    return value.contiguous()


def check_position_values(name: str, positions: torch.Tensor, span: int) -> None:
    """Every entry of ``positions``, with the ``span`` tokens from it, stays below 2**31 (int32
    positions); checked where :func:`host_checks_indices` says so (inside the op: a compiled graph
    cannot read the values); raises ``ValueError`` naming the first bad entry. (A negative entry is
    allowed: a left-padded row's chunk starts before its first token, whose earlier positions see no
    key, or are dropped by a scatter.)"""
    if not host_checks_indices(positions.device) or positions.numel() == 0:
        return
    values = positions.cpu().long()
    bad = (values + span >= 2**31).nonzero()
    if bad.numel():
        b = int(bad[0, 0])
        raise ValueError(f"{name}[{b}] = {int(values[b])}: {name} + {span} tokens must be < 2**31 (int32 positions)")


_LOG2_E = math.log2(math.e)
_FP32_MAX = torch.finfo(torch.float32).max


def resolve_scale(scale: float | None, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):  # NumPy scalars too, as torch takes
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    try:
        value = float(scale)
    except OverflowError:  # an int past every float
        value = math.inf if scale > 0 else -math.inf
    if value > 0 and value * _LOG2_E > _FP32_MAX:
        # the kernels take scale * log2(e) as an fp32 argument: past the fp32 range it is inf, the output NaN
        raise ValueError(f"scale must be at most {_FP32_MAX / _LOG2_E:.6g} "
                         f"(scale * log2(e) must fit fp32, as the kernels compute it), got {scale}")  # fmt: skip
    if not 0 < value < math.inf:  # NaN too; comparisons (not math.isfinite) also trace a symbolic scale (1 / x.shape[0])
        raise ValueError(f"scale must be a positive finite float, got {scale}")
    return value


def dot_options(dtype: torch.dtype) -> tuple[bool, str]:
    """(upcast dot operands to fp32, dot input precision) for a KV dtype.

    The interpreter computes bf16 ``tl.dot`` wrongly (triton issue 11584): operands are upcast to fp32
    there. fp32 inputs use exact ("ieee") dots instead of tf32 on the GPU.
    """
    upcast = interpreting() and dtype == torch.bfloat16
    precision = "ieee" if dtype == torch.float32 else "tf32"
    return upcast, precision
