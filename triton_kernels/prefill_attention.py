"""Paged prefill attention: a chunk of queries against all paged keys before them (chunked prefill).

``q`` ``[batch, q_len, num_heads, head_dim]``; query ``i`` of sequence ``b`` sits at absolute position
``q_start[b] + i`` and sees the keys at positions ``< seq_lens[b]`` and, when ``causal``, ``<= its own
position``. The chunk's own keys are expected in the pages already (``paged_scatter`` first), so
normally ``seq_lens[b] == q_start[b] + q_len``. Pages use the vLLM layout of ``decode_attention``.

Kernel plan, after FlashAttention-2: one program takes ``BLOCK_M`` queries of one head and walks the
keys ``BLOCK_N`` at a time with an online softmax (base 2, fp32 statistics). Key blocks that every
query of the program sees in full run without masks; only the blocks on the causal diagonal and the
last, partial block pay for masking. Each key finds its page through the block table; the page index
is widened to int64 before it meets the page stride. Heavy (late) query blocks are launched first.

Two ways to load a key block. When a block never straddles a page (``page_tokens`` a multiple of
``BLOCK_N``) and the pools allow it (see :func:`kv_descriptors`), the pools are read through Hopper
tensor-memory-accelerator descriptors: the pool is a 2D array of token rows, one block is one
``[BLOCK_N, head_dim]`` box at ``(page * rows_per_page + offset, kv_head * head_stride)``, so a block
costs one block-table entry and one bulk copy. Otherwise (and on GPUs before Hopper) each key row
is gathered with its own address.

``lse`` is ``[batch, q_len, num_heads]`` fp32, the natural log of the sum of ``exp(scale * q . k)``
over the visible keys; a query that sees no key, or whose every visible score is -inf, gets output 0
and lse ``-inf`` (keys scoring -inf weigh 0, as in softmax).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # Triton without host-side tensor descriptors: every launch gathers rows
    TensorDescriptor = None

from pagedtensor.triton_kernels._common import (
    MAX_GRID_Y,
    call_kernel_directly,
    on_its_tensors_device,
    check_block_table,
    check_device,
    check_query,
    check_position_values,
    check_positions,
    check_table_entries,
    dot_options,
    interpreting,
    kv_pool_strides,
    new_buffer,
    resolve_scale,
)

LOG2E = 1.4426950408889634


# Read whole key blocks through tensor descriptors where the pools allow it (tests switch it off to
# cover the row-gather path on the same shapes).
USE_TENSOR_DESCRIPTORS = True


@dataclasses.dataclass(frozen=True)
class PrefillLaunch:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def prefill_launch_config(head_dim: int, dtype: torch.dtype, device: torch.device) -> PrefillLaunch:
    """Block sizes for a head size and dtype (tuned on an H100; on an H200 the same blocks are the best
    swept with tensor descriptors, results/prefill_tune_h200.json)."""
    if interpreting() or device.type != "cuda":
        return PrefillLaunch(block_m=16, block_n=16, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return PrefillLaunch(block_m=64, block_n=32, num_warps=4, num_stages=2)
    if head_dim >= 256:
        return PrefillLaunch(block_m=64, block_n=32, num_warps=4, num_stages=2)
    # H100, fp16, head_dim 128, 16K causal: 440 TFLOP/s (4 warps, 4 stages); 8 warps 362, BLOCK_N 128 208
    return PrefillLaunch(block_m=128, block_n=64, num_warps=4, num_stages=4)


def tensor_descriptors_supported(device: torch.device) -> bool:
    """Whether key blocks can be read through tensor descriptors on ``device`` (Hopper and later, or
    the interpreter)."""
    if not USE_TENSOR_DESCRIPTORS or TensorDescriptor is None:
        return False
    if interpreting():
        return True
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def kv_descriptors(k_pages: torch.Tensor, v_pages: torch.Tensor, block_n: int):
    """``(k_descriptor, v_descriptor, rows_per_page)`` reading ``[block_n, head_dim]`` key/value boxes
    of the pools seen as 2D arrays of token rows, or None when the pools do not allow it.

    Needs: ``page_tokens`` a multiple of ``block_n`` (a box never leaves its page), the same page and
    token strides for keys and values, a page stride that is a whole number of token rows, unit
    stride along ``head_dim``, 16-byte aligned bases and row strides (the copy engine's rule), and row
    and column coordinates below 2**31.
    """
    if not tensor_descriptors_supported(k_pages.device):
        return None
    num_pages, page_tokens, num_kv_heads, head_dim = k_pages.shape
    if num_pages == 0 or page_tokens % block_n:
        return None
    page_stride, row_stride, head_stride, unit = k_pages.stride()
    if v_pages.stride() != k_pages.stride() or unit != 1 or row_stride <= 0 or page_stride % row_stride:
        return None
    item = k_pages.element_size()
    if (row_stride * item) % 16 or k_pages.data_ptr() % 16 or v_pages.data_ptr() % 16:
        return None
    rows_per_page = page_stride // row_stride
    rows = (num_pages - 1) * rows_per_page + page_tokens
    columns = (num_kv_heads - 1) * head_stride + head_dim
    if rows >= 2**31 or columns >= 2**31 or head_stride < 0:
        return None
    descriptors = tuple(
        TensorDescriptor(pool, [rows, columns], [row_stride, 1], [block_n, head_dim]) for pool in (k_pages, v_pages)
    )
    return descriptors[0], descriptors[1], rows_per_page


@triton.jit
def _gather_block(offs_n, mask_n, block_table_row_ptr, k_head_ptr, v_head_ptr, stride_k_page, stride_k_token,
                  stride_v_page, stride_v_token, HEAD_DIM: tl.constexpr, PAGE_TOKENS: tl.constexpr, MASKED: tl.constexpr):
    """Keys and values of tokens ``offs_n``, each row found through the block table (any page size)."""
    offs_d = tl.arange(0, HEAD_DIM)
    if MASKED:
        page = tl.load(block_table_row_ptr + offs_n // PAGE_TOKENS, mask=mask_n, other=0).to(tl.int64)
    else:
        page = tl.load(block_table_row_ptr + offs_n // PAGE_TOKENS).to(tl.int64)
    slot = (offs_n % PAGE_TOKENS).to(tl.int64)
    k_ptrs = k_head_ptr + (page * stride_k_page + slot * stride_k_token)[:, None] + offs_d[None, :]
    v_ptrs = v_head_ptr + (page * stride_v_page + slot * stride_v_token)[:, None] + offs_d[None, :]
    if MASKED:
        k = tl.load(k_ptrs, mask=mask_n[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=mask_n[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    return k, v


@triton.jit
def _described_block(n0, block_table_row_ptr, k_desc, v_desc, rows_per_page, column, PAGE_TOKENS: tl.constexpr):
    """Keys and values of the block starting at token ``n0``, one box per pool (the block lies in one page)."""
    page = tl.load(block_table_row_ptr + n0 // PAGE_TOKENS)
    row = page * rows_per_page + n0 % PAGE_TOKENS
    return k_desc.load([row, column]), v_desc.load([row, column])


@triton.jit
def _prefill_block(
    q,
    acc,
    m_i,
    l_i,
    q_pos,
    n0,
    seq_len,
    block_table_row_ptr,
    k_head_ptr,
    v_head_ptr,
    k_desc,
    v_desc,
    rows_per_page,
    column,
    qk_scale_log2,
    stride_k_page,
    stride_k_token,
    stride_v_page,
    stride_v_token,
    HEAD_DIM: tl.constexpr,
    PAGE_TOKENS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_DESCRIPTORS: tl.constexpr,
):
    """One key block of the online softmax: load it, then scores, running max and sum, accumulator."""
    if USE_DESCRIPTORS:
        k, v = _described_block(n0, block_table_row_ptr, k_desc, v_desc, rows_per_page, column, PAGE_TOKENS)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < seq_len
        if MASKED:
            # rows past the sequence hold whatever the page held: keep them out of the value sum
            v = tl.where(mask_n[:, None], v, tl.zeros_like(v))
    else:
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < seq_len
        k, v = _gather_block(offs_n, mask_n, block_table_row_ptr, k_head_ptr, v_head_ptr, stride_k_page, stride_k_token,
                             stride_v_page, stride_v_token, HEAD_DIM, PAGE_TOKENS, MASKED)  # fmt: skip
    visible = mask_n[None, :]
    if CAUSAL:
        visible = visible & (offs_n[None, :] <= q_pos[:, None])
    if DOT_UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
    if MASKED:
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # a row that has seen no key yet, or only keys scoring -inf (keys of -inf, in any block), keeps
    # m = -inf: subtract 0 instead so exp2 gives 0, not NaN
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_sub)
    p = tl.exp2(s - m_sub[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _prefill_kernel(
    q_ptr,
    k_pages_ptr,
    v_pages_ptr,
    block_table_ptr,
    seq_lens_ptr,
    q_start_ptr,
    out_ptr,
    lse_ptr,
    qk_scale_log2,
    q_len,
    num_heads,
    max_pages,
    stride_q_batch: tl.int64,
    stride_q_token: tl.int64,
    stride_q_head: tl.int64,
    stride_k_page: tl.int64,
    stride_k_token: tl.int64,
    stride_k_head: tl.int64,
    stride_v_page: tl.int64,
    stride_v_token: tl.int64,
    stride_v_head: tl.int64,
    stride_bt_batch: tl.int64,
    stride_out_batch: tl.int64,
    stride_out_token: tl.int64,
    stride_out_head: tl.int64,
    stride_lse_batch: tl.int64,
    stride_lse_token: tl.int64,
    stride_lse_head: tl.int64,
    k_desc,
    v_desc,
    rows_per_page,
    QUERY_GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_TOKENS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_DESCRIPTORS: tl.constexpr,
):
    m_block = tl.num_programs(0) - 1 - tl.program_id(0)  # heavy causal blocks first
    pid_seq_head = tl.program_id(1)
    batch = (pid_seq_head // num_heads).to(tl.int64)
    head = (pid_seq_head % num_heads).to(tl.int64)
    kv_head = head // QUERY_GROUP

    seq_len = tl.minimum(tl.load(seq_lens_ptr + batch), max_pages * PAGE_TOKENS)  # cut at the table
    q_first = tl.load(q_start_ptr + batch)
    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = offs_m < q_len
    q_pos = q_first + offs_m
    q = tl.load(
        q_ptr + batch * stride_q_batch + head * stride_q_head + offs_m.to(tl.int64)[:, None] * stride_q_token
        + offs_d[None, :],
        mask=mask_m[:, None],
        other=0.0,
    )
    if DOT_UPCAST:
        q = q.to(tl.float32)

    if CAUSAL:
        last_q = q_first + tl.minimum(m_block * BLOCK_M + BLOCK_M, q_len) - 1
        kv_end = tl.minimum(seq_len, last_q + 1)
        full_end = tl.minimum(seq_len, q_first + m_block * BLOCK_M + 1)
    else:
        kv_end = seq_len
        full_end = seq_len
    full_end = tl.maximum(full_end, 0) // BLOCK_N * BLOCK_N
    kv_end = tl.maximum(kv_end, 0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    block_table_row_ptr = block_table_ptr + batch * stride_bt_batch
    k_head_ptr = k_pages_ptr + kv_head * stride_k_head
    v_head_ptr = v_pages_ptr + kv_head * stride_v_head
    column = (kv_head * stride_k_head).to(tl.int32)  # the head's first column in a descriptor's token row

    for n0 in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _prefill_block(
            q, acc, m_i, l_i, q_pos, n0, seq_len, block_table_row_ptr, k_head_ptr, v_head_ptr, k_desc, v_desc,
            rows_per_page, column, qk_scale_log2, stride_k_page, stride_k_token, stride_v_page, stride_v_token,
            HEAD_DIM, PAGE_TOKENS, BLOCK_N, False, CAUSAL, DOT_UPCAST, DOT_PRECISION, USE_DESCRIPTORS,
        )  # fmt: skip
    for n0 in range(full_end, kv_end, BLOCK_N):
        acc, m_i, l_i = _prefill_block(
            q, acc, m_i, l_i, q_pos, n0, seq_len, block_table_row_ptr, k_head_ptr, v_head_ptr, k_desc, v_desc,
            rows_per_page, column, qk_scale_log2, stride_k_page, stride_k_token, stride_v_page, stride_v_token,
            HEAD_DIM, PAGE_TOKENS, BLOCK_N, True, CAUSAL, DOT_UPCAST, DOT_PRECISION, USE_DESCRIPTORS,
        )  # fmt: skip

    has_keys = l_i != 0.0  # a NaN score gives NaN, not the -inf of a query that saw no key
    l_safe = tl.where(has_keys, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(has_keys, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    offs_m64 = offs_m.to(tl.int64)
    tl.store(
        out_ptr + batch * stride_out_batch + head * stride_out_head + offs_m64[:, None] * stride_out_token
        + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=mask_m[:, None],
    )
    tl.store(
        lse_ptr + batch * stride_lse_batch + head * stride_lse_head + offs_m64 * stride_lse_token, lse, mask=mask_m
    )


@on_its_tensors_device
def _launch_prefill(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    q_start: torch.Tensor,
    scale: float,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, q_len, num_heads, head_dim = q.shape
    _, page_tokens, num_kv_heads, _ = k_pages.shape
    check_table_entries(block_table, k_pages.shape[0], page_tokens, seq_lens, lengths_fit=True)
    check_position_values("q_start", q_start, q_len)
    out = new_buffer((batch, q_len, num_heads, head_dim), q.dtype, q.device)
    lse = new_buffer((batch, q_len, num_heads), torch.float32, q.device)
    if batch == 0 or q_len == 0:
        return out, lse
    launch = prefill_launch_config(head_dim, q.dtype, q.device)
    upcast, precision = dot_options(q.dtype)
    descriptors = kv_descriptors(k_pages, v_pages, launch.block_n)
    k_desc, v_desc, rows_per_page = descriptors if descriptors is not None else (None, None, 0)
    _prefill_kernel[(triton.cdiv(q_len, launch.block_m), batch * num_heads)](
        q_ptr=q,
        k_pages_ptr=k_pages,
        v_pages_ptr=v_pages,
        block_table_ptr=block_table,
        seq_lens_ptr=seq_lens,
        q_start_ptr=q_start,
        out_ptr=out,
        lse_ptr=lse,
        qk_scale_log2=scale * LOG2E,
        q_len=q_len,
        num_heads=num_heads,
        max_pages=block_table.shape[1],
        stride_q_batch=q.stride(0),
        stride_q_token=q.stride(1),
        stride_q_head=q.stride(2),
        **kv_pool_strides(k_pages, v_pages, block_table),
        stride_out_batch=out.stride(0),
        stride_out_token=out.stride(1),
        stride_out_head=out.stride(2),
        stride_lse_batch=lse.stride(0),
        stride_lse_token=lse.stride(1),
        stride_lse_head=lse.stride(2),
        k_desc=k_desc,
        v_desc=v_desc,
        rows_per_page=rows_per_page,
        QUERY_GROUP=num_heads // num_kv_heads,
        HEAD_DIM=head_dim,
        PAGE_TOKENS=page_tokens,
        BLOCK_M=launch.block_m,
        BLOCK_N=launch.block_n,
        CAUSAL=causal,
        DOT_UPCAST=upcast,
        DOT_PRECISION=precision,
        USE_DESCRIPTORS=descriptors is not None,
        num_warps=launch.num_warps,
        num_stages=launch.num_stages,
    )
    return out, lse


def _check_prefill_args(q: object, k_pages: object, v_pages: object, block_table: object, seq_lens: object,
                        q_start: object, scale: float | None, causal: object) -> tuple:
    """The arguments of :func:`paged_prefill_attention` checked (q of the pages' dtype and head_dim,
    its heads a multiple of the KV heads, ``batch * num_heads`` within the grid; an int32 block table,
    lengths and positions of q's batch; one device; the scale; ``causal`` a bool) and normalised: the
    arguments of :func:`_launch_prefill`, q unit-stride in head_dim, the tables and positions
    unit-stride and the scale resolved."""
    q, k_pages, v_pages = check_query(q, k_pages, v_pages, 4)
    batch, _, num_heads, head_dim = q.shape
    if batch * num_heads > MAX_GRID_Y:
        raise ValueError(f"batch * num_heads must be <= {MAX_GRID_Y} (a grid dimension), got {batch} * {num_heads}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    block_table, seq_lens = check_block_table(block_table, seq_lens, k_pages.shape[1], batch)
    q_start = check_positions("q_start", q_start, batch, k_pages.device, span=q.shape[1])
    check_device(k_pages.device, q=q, v_pages=v_pages, block_table=block_table, seq_lens=seq_lens)
    if q.stride(-1) != 1:
        q = q.contiguous()
    return q, k_pages, v_pages, block_table, seq_lens, q_start, resolve_scale(scale, head_dim), causal


@torch.library.custom_op("pagedllm::paged_prefill_attention", mutates_args=())
def _paged_prefill_attention_op(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    q_start: torch.Tensor,
    scale: float,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    # Called directly (torch.ops.pagedllm...), the arguments get the public function's checks and the
    # launch the unit strides it assumes.
    return _launch_prefill(*_check_prefill_args(q, k_pages, v_pages, block_table, seq_lens, q_start, scale, causal))


@_paged_prefill_attention_op.register_fake
def _paged_prefill_attention_fake(q, k_pages, v_pages, block_table, seq_lens, q_start, scale, causal):
    batch, q_len, num_heads, head_dim = q.shape
    return q.new_empty((batch, q_len, num_heads, head_dim)), q.new_empty((batch, q_len, num_heads), dtype=torch.float32)


def paged_prefill_attention(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    q_start: int | torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = True,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of a chunk of queries over the paged keys before them.

    Args:
        q: ``[batch, q_len, num_heads, head_dim]``, the pages' dtype; ``num_heads`` a multiple of
            ``num_kv_heads``.
        k_pages, v_pages: ``[num_pages, page_tokens, num_kv_heads, head_dim]``.
        block_table: ``[batch, max_pages]`` int32; only entries of pages below ``seq_lens`` are read,
            and each must be in ``[0, num_pages)``.
        seq_lens: ``[batch]`` int32 keys per sequence, the chunk's own keys included
            (``<= max_pages * page_tokens``). Both are checked as in :func:`paged_decode_attention`.
        q_start: an int or an int32 ``[batch]`` tensor: absolute position of ``q[b, 0]``.
        scale: score scale, default ``head_dim ** -0.5``.
        causal: query at position ``p`` sees keys ``<= p`` only; else every key ``< seq_lens[b]``.
        return_lse: also return ``lse`` ``[batch, q_len, num_heads]`` fp32 for
            :func:`merge_attention_partials`.

    Returns:
        ``out`` ``[batch, q_len, num_heads, head_dim]`` in q's dtype (and ``lse``). A query that sees no
        key, or whose every visible score is -inf, gets zeros and lse ``-inf``.
    """
    args = _check_prefill_args(q, k_pages, v_pages, block_table, seq_lens, q_start, scale, causal)
    if call_kernel_directly(*args[:6]):
        out, lse = _launch_prefill(*args)
    else:
        out, lse = _paged_prefill_attention_op(*args)
    return (out, lse) if return_lse else out
