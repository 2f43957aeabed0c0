"""Paged decode attention: one query token per sequence against its paged keys and values.

Layout (vLLM-compatible): ``k_pages``/``v_pages`` ``[num_pages, page_tokens, num_kv_heads, head_dim]``,
``block_table`` ``[batch, max_pages]`` int32 (page indices in logical order), ``seq_lens`` ``[batch]``
int32, ``q`` ``[batch, num_heads, head_dim]``. Query head ``h`` reads KV head ``h // (num_heads //
num_kv_heads)`` (grouped-query attention, any ratio).

Kernel plan. One program takes one KV head of one sequence and the whole group of query heads that
read it, so each K/V byte is loaded once per group, and one slice ("split") of the context. The
number of splits grows until the grid is one wave of resident programs, as many as the compiled
kernel's registers and shared memory let every SM hold at once (a batch of one with 8 KV heads cannot
fill 132 SMs otherwise, and a grid a little over one wave runs its last programs on an idle GPU).
Each split writes its partial output, normalised, and its log-sum-exp; a second
small kernel merges the splits exactly, loading a head's log-sum-exps and partials in one round trip
(up to 64 splits), each program over a slice of at most 64 dimensions of a head. With one split
the first kernel writes the result itself.

Inside a program the context is walked ``BLOCK_N`` tokens at a time; each token finds its page
through the block table (so any page size works and a block may straddle pages), the page index is
widened to int64 before it is multiplied by the page stride. A step's block-table entries are loaded
one step ahead, the first step's bounded by the table rather than by ``seq_lens``, so that load and
the ``seq_lens`` load are in flight together: on the H200 this took 0.3-1.15 us off the 33-134 MB
shapes (results/decode_startup_variants_h200.json). Scores and the value sum use ``tl.dot``
with the query group padded to 16 rows (the GPU's minimum); on an H100 this beat an elementwise
product and sum in fp32 even for a group of one (MHA), and on the H200 the elementwise form was
1.7-5.4x slower at its best launch (results/decode_elementwise_sweep_h200.json, code at f05b26f).

``lse`` is the natural log of the sum over visible keys of ``exp(scale * q . k)``, in fp32,
``[batch, num_heads]``; a sequence with no keys, or whose every score is -inf, gets output 0 and lse
``-inf`` (keys scoring -inf weigh 0, as in softmax).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from pagedtensor.triton_kernels._common import (
    MAX_GRID_Y,
    call_kernel_directly,
    on_its_tensors_device,
    check_block_table,
    check_device,
    check_query,
    check_table_entries,
    dot_options,
    interpreting,
    kv_pool_strides,
    new_buffer,
    next_power_of_2,
    optional_int,
    programs_per_sm,
    resolve_scale,
    sm_count,
)

LOG2E = 1.4426950408889634


@dataclasses.dataclass(frozen=True)
class DecodeLaunch:
    """How the decode kernel is launched for one geometry."""

    block_n: int  # context tokens per loop step
    num_warps: int
    num_stages: int
    programs_per_sm: int  # resident programs per SM assumed where the compiled kernel does not report its own


def decode_launch_config(group: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> DecodeLaunch:
    """Launch parameters for a query group size, head size and dtype, tuned on an H200 (the split
    count is chosen per call by :func:`choose_num_splits`)."""
    if interpreting() or device.type != "cuda":
        return DecodeLaunch(block_n=16, num_warps=4, num_stages=1, programs_per_sm=1)
    # H200, fp16, 16-token pages, GPU time (bench_paged_attention.py --split-sweep;
    # results/decode_split_sweep_h200.json): 64 tokens a step with 4 warps and 2 stages was the fastest
    # step on every shape once the split count was right (32-token steps tie on the smallest); it
    # compiles to ~124 registers and 38 KiB of shared memory, 4 resident programs per SM. More
    # stages, 8 warps or 128-token steps were slower. A 64-token step of 256-byte rows is the largest
    # that leaves shared memory for two stages.
    block_n = 64 if head_dim * torch.finfo(dtype).bits // 8 <= 256 else 32
    return DecodeLaunch(block_n=block_n, num_warps=4, num_stages=2, programs_per_sm=4)


def choose_num_splits(batch: int, num_kv_heads: int, max_len: int, launch: DecodeLaunch, device: torch.device,
                      resident_per_sm: int | None = None) -> int:
    """Splits of the context per (sequence, KV head): as many as one wave of resident programs holds,
    never finer than one loop step.

    ``resident_per_sm`` is how many programs of the compiled kernel fit on an SM at once (default the
    launch's estimate). A grid just over a whole wave leaves a tail of programs that run after the
    rest with the SMs mostly idle: on the H200 Llama-2-7B at 128K ran at 76% of copy bandwidth with
    544 programs and 99-101% with 480, for 528 resident (results/decode_split_sweep*_h200.json).
    """  # fmt: skip
    slots = sm_count(device) * (resident_per_sm or launch.programs_per_sm)
    programs = batch * num_kv_heads
    if programs >= slots:
        return 1
    return max(1, min(slots // programs, triton.cdiv(max_len, launch.block_n)))


@triton.jit
def _split_program(q_ptr, seq_lens_ptr, num_kv_heads, tokens_per_split, stride_q_batch, stride_q_head,
                   QUERY_GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr):
    """The (sequence, KV head) and context slice of program ``(batch * num_kv_heads + kv_head, split)``,
    and the query rows of its group (``BLOCK_G`` rows, those past the group zero): returns ``batch``,
    ``kv_head`` (int64), ``split``, ``start``, ``end`` (tokens ``[start, end)``), ``heads``, ``mask_g``,
    ``offs_d`` and ``q``."""
    pid_seq_head = tl.program_id(0)
    split = tl.program_id(1)
    batch = (pid_seq_head // num_kv_heads).to(tl.int64)
    kv_head = (pid_seq_head % num_kv_heads).to(tl.int64)
    seq_len = tl.load(seq_lens_ptr + batch)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, seq_len)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_g = offs_g < QUERY_GROUP
    heads = kv_head * QUERY_GROUP + offs_g
    q = tl.load(q_ptr + batch * stride_q_batch + heads[:, None] * stride_q_head + offs_d[None, :], mask=mask_g[:, None],
                other=0.0)  # fmt: skip
    return batch, kv_head, split, start, end, heads, mask_g, offs_d, q


@triton.jit
def _empty_state(BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr):
    """A split's running state before its first block: maximum -inf, sum 0 and output 0 for each of
    ``BLOCK_G`` query rows (base 2, as :func:`_attend_block` keeps them)."""
    return (tl.full([BLOCK_G], float("-inf"), tl.float32), tl.zeros([BLOCK_G], tl.float32),
            tl.zeros([BLOCK_G, HEAD_DIM], tl.float32))  # fmt: skip


@triton.jit
def _load_kv_block(k_head_ptr, v_head_ptr, page, offs_n, mask_n, offs_d, stride_k_page, stride_k_token, stride_v_page,
                   stride_v_token, PAGE_TOKENS: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """The K and V rows of context tokens ``offs_n`` of one KV head, each in page ``page`` (its block-table
    entry, widened to int64 before the page stride multiplies it); rows where ``mask_n`` is false read
    nothing and are zero. fp32 when ``DOT_UPCAST``. (L2 eviction hints on these loads changed nothing
    on the H200: results/decode_kv_eviction_h200.json, code at 5b0d927.)"""
    page = page.to(tl.int64)
    slot = (offs_n % PAGE_TOKENS).to(tl.int64)
    k_offs = page * stride_k_page + slot * stride_k_token
    v_offs = page * stride_v_page + slot * stride_v_token
    k = tl.load(k_head_ptr + k_offs[:, None] + offs_d[None, :], mask=mask_n[:, None], other=0.0)
    v = tl.load(v_head_ptr + v_offs[:, None] + offs_d[None, :], mask=mask_n[:, None], other=0.0)
    if DOT_UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return k, v


@triton.jit
def _attend_block(q, k, v, mask_n, m_i, l_i, acc, qk_scale_log2, DOT_PRECISION: tl.constexpr,
                  MAY_BE_EMPTY: tl.constexpr):
    """One block of keys ``k`` and values ``v`` (rows where ``mask_n`` is false ignored) into the
    running maximum ``m_i`` and sum ``l_i`` (base 2) and the unnormalised output ``acc``; returns the
    three updated. With ``MAY_BE_EMPTY`` (the shipped kernel) a block with no visible key, or whose
    visible scores are all -inf (keys of -inf), leaves the state as it was: the shift is 0 while the
    maximum is still -inf, a select on one value per query row. Without it every block must hold a
    finite score in each row (else the output is NaN); only experiments use that."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
    s = tl.where(mask_n[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    if MAY_BE_EMPTY:
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_shift = m_new
    alpha = tl.exp2(m_i - m_shift)
    p = tl.exp2(s - m_shift[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _store_split(out_ptr, lse_ptr, acc, m_i, l_i, batch, split, heads, mask_g, offs_d, stride_out_batch,
                 stride_out_head, stride_out_split, stride_lse_batch, stride_lse_head, stride_lse_split):
    """A split's normalised output rows and natural-log lse (0 and -inf where it saw no key; NaN where
    a score was NaN, so the merge cannot mistake it for an empty split)."""
    has_keys = l_i != 0.0
    l_safe = tl.where(has_keys, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(has_keys, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    out_row_ptr = out_ptr + batch * stride_out_batch + split * stride_out_split
    tl.store(out_row_ptr + heads[:, None] * stride_out_head + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=mask_g[:, None])  # fmt: skip
    tl.store(lse_ptr + batch * stride_lse_batch + split * stride_lse_split + heads * stride_lse_head, lse, mask=mask_g)


@triton.jit
def _decode_split_kernel(
    q_ptr,
    k_pages_ptr,
    v_pages_ptr,
    block_table_ptr,
    seq_lens_ptr,
    out_ptr,
    lse_ptr,
    qk_scale_log2,
    num_kv_heads,
    tokens_per_split,
    max_pages,
    stride_q_batch: tl.int64,
    stride_q_head: tl.int64,
    stride_k_page: tl.int64,
    stride_k_token: tl.int64,
    stride_k_head: tl.int64,
    stride_v_page: tl.int64,
    stride_v_token: tl.int64,
    stride_v_head: tl.int64,
    stride_bt_batch: tl.int64,
    stride_out_batch: tl.int64,
    stride_out_head: tl.int64,
    stride_out_split: tl.int64,
    stride_lse_batch: tl.int64,
    stride_lse_head: tl.int64,
    stride_lse_split: tl.int64,
    QUERY_GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_TOKENS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    batch, kv_head, split, start, end, heads, mask_g, offs_d, q = _split_program(
        q_ptr, seq_lens_ptr, num_kv_heads, tokens_per_split, stride_q_batch, stride_q_head, QUERY_GROUP, BLOCK_G, HEAD_DIM
    )
    if DOT_UPCAST:
        q = q.to(tl.float32)
    end = tl.minimum(end, max_pages * PAGE_TOKENS)  # a seq_lens past the table is cut at it (never read past the row)

    m_i, l_i, acc = _empty_state(BLOCK_G, HEAD_DIM)

    block_table_row_ptr = block_table_ptr + batch * stride_bt_batch
    k_head_ptr = k_pages_ptr + kv_head * stride_k_head
    v_head_ptr = v_pages_ptr + kv_head * stride_v_head
    # Each step's block-table entries are loaded one step ahead and carried, the first step's here,
    # bounded by the split's end in the table (known without seq_lens), so this load is in flight
    # beside the seq_lens load instead of after it. Entries at or past seq_len are read, never used.
    table_end = tl.minimum(start + tokens_per_split, max_pages * PAGE_TOKENS)
    offs_next = start + tl.arange(0, BLOCK_N)
    pages_next = tl.load(block_table_row_ptr + offs_next // PAGE_TOKENS, mask=offs_next < table_end, other=0)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        page = pages_next
        offs_next = offs_n + BLOCK_N
        pages_next = tl.load(block_table_row_ptr + offs_next // PAGE_TOKENS, mask=offs_next < table_end, other=0)
        k, v = _load_kv_block(k_head_ptr, v_head_ptr, page, offs_n, mask_n, offs_d, stride_k_page, stride_k_token,
                              stride_v_page, stride_v_token, PAGE_TOKENS, DOT_UPCAST)  # fmt: skip
        m_i, l_i, acc = _attend_block(q, k, v, mask_n, m_i, l_i, acc, qk_scale_log2, DOT_PRECISION, True)

    _store_split(out_ptr, lse_ptr, acc, m_i, l_i, batch, split, heads, mask_g, offs_d, stride_out_batch, stride_out_head,
                 stride_out_split, stride_lse_batch, stride_lse_head, stride_lse_split)  # fmt: skip


@triton.jit
def _decode_merge_splits_kernel(
    part_out_ptr,
    part_lse_ptr,
    out_ptr,
    lse_ptr,
    num_heads,
    num_splits,
    stride_po_batch: tl.int64,
    stride_po_head: tl.int64,
    stride_po_split: tl.int64,
    stride_pl_batch: tl.int64,
    stride_pl_head: tl.int64,
    stride_out_batch: tl.int64,
    stride_out_head: tl.int64,
    stride_lse_batch: tl.int64,
    stride_lse_head: tl.int64,
    BLOCK_D: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr,
    CHUNK_SPLITS: tl.constexpr,
):
    # Program (batch * num_heads + head, d): dimensions [d * BLOCK_D, (d + 1) * BLOCK_D) of one head's
    # output; the program with d == 0 also writes the head's lse.
    pid = tl.program_id(0)
    pid_d = tl.program_id(1)
    batch = (pid // num_heads).to(tl.int64)
    head = (pid % num_heads).to(tl.int64)
    part_lse_row_ptr = part_lse_ptr + batch * stride_pl_batch + head * stride_pl_head
    part_out_row_ptr = part_out_ptr + batch * stride_po_batch + head * stride_po_head
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)

    offs_s = tl.arange(0, BLOCK_SPLITS)
    mask_s = offs_s < num_splits
    lse_all = tl.load(part_lse_row_ptr + offs_s, mask=mask_s, other=float("-inf"))
    if BLOCK_SPLITS <= CHUNK_SPLITS:  # the partial rows load beside the log-sum-exps: one round trip
        part = tl.load(part_out_row_ptr + offs_s[:, None] * stride_po_split + offs_d[None, :], mask=mask_s[:, None], other=0.0)
    m = tl.max(lse_all, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w_all = tl.exp(lse_all - m_safe)
    denom = tl.sum(w_all, axis=0)
    if BLOCK_SPLITS <= CHUNK_SPLITS:
        acc = tl.sum(w_all[:, None] * part, axis=0)
    else:  # many splits: the partials CHUNK_SPLITS rows at a time, after the maximum
        acc = tl.zeros([BLOCK_D], tl.float32)
        for s0 in range(0, num_splits, CHUNK_SPLITS):
            offs_c = s0 + tl.arange(0, CHUNK_SPLITS)
            mask_c = offs_c < num_splits
            w = tl.exp(tl.load(part_lse_row_ptr + offs_c, mask=mask_c, other=float("-inf")) - m_safe)
            part = tl.load(
                part_out_row_ptr + offs_c[:, None] * stride_po_split + offs_d[None, :], mask=mask_c[:, None], other=0.0
            )
            acc += tl.sum(w[:, None] * part, axis=0)

    has_keys = denom != 0.0  # NaN (a NaN or +inf lse) propagates
    out = acc / tl.where(has_keys, denom, 1.0)
    lse = tl.where(has_keys, m_safe + tl.log(tl.where(has_keys, denom, 1.0)), float("-inf"))
    tl.store(out_ptr + batch * stride_out_batch + head * stride_out_head + offs_d, out.to(out_ptr.dtype.element_ty))
    tl.store(lse_ptr + batch * stride_lse_batch + head * stride_lse_head, lse, mask=pid_d == 0)


MERGE_BLOCK_D = 64  # dimensions of a head one merge program covers
MERGE_CHUNK_SPLITS = 64  # splits merged in one round trip; more take a pass for the maximum first


def merge_launch(num_splits: int, head_dim: int) -> tuple[int, int, int]:
    """``(BLOCK_SPLITS, CHUNK_SPLITS, BLOCK_D)`` of the merge kernel: a program merges a slice of at
    most ``MERGE_BLOCK_D`` dimensions of one head, loading at most ``MERGE_CHUNK_SPLITS`` splits of it
    at once (16 KiB). On the H200, back to back on cold KV, slices of 64 beat whole heads of 128 on
    the short shapes (Llama-2-7B b1 8K, 16 splits: 0.4 us) and slices of 32 or 16 where there are 64
    splits (Llama-3-8B b1 32K: 0.2 us; results/decode_merge_elements_h200.json); one program a head
    merging 64 splits took ~4 us."""
    block_splits = next_power_of_2(num_splits)
    chunk_splits = min(block_splits, MERGE_CHUNK_SPLITS)
    block_d = min(head_dim, MERGE_BLOCK_D)
    return block_splits, chunk_splits, block_d


@on_its_tensors_device
def merge_splits(part_out: torch.Tensor, part_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Launch the merge of split partials ``part_out`` ``[batch, num_heads, num_splits, head_dim]`` (fp32)
    and ``part_lse`` ``[batch, num_heads, num_splits]`` into ``out`` ``[batch, num_heads, head_dim]`` and
    ``lse`` ``[batch, num_heads]``, on the current stream after the split kernel that wrote them."""
    batch, num_heads, num_splits, head_dim = part_out.shape
    block_splits, chunk_splits, block_d = merge_launch(num_splits, head_dim)
    _decode_merge_splits_kernel[(batch * num_heads, head_dim // block_d)](
        part_out_ptr=part_out,
        part_lse_ptr=part_lse,
        out_ptr=out,
        lse_ptr=lse,
        num_heads=num_heads,
        num_splits=num_splits,
        stride_po_batch=part_out.stride(0),
        stride_po_head=part_out.stride(1),
        stride_po_split=part_out.stride(2),
        stride_pl_batch=part_lse.stride(0),
        stride_pl_head=part_lse.stride(1),
        stride_out_batch=out.stride(0),
        stride_out_head=out.stride(1),
        stride_lse_batch=lse.stride(0),
        stride_lse_head=lse.stride(1),
        BLOCK_D=block_d,
        BLOCK_SPLITS=block_splits,
        CHUNK_SPLITS=chunk_splits,
        num_warps=4,
    )


def _split_kernel_args(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, block_table: torch.Tensor,
                       seq_lens: torch.Tensor, part_out: torch.Tensor, part_lse: torch.Tensor, scale: float,
                       tokens_per_split: int, split_strides: tuple[int, int], launch: DecodeLaunch) -> dict:
    """Every argument of ``_decode_split_kernel`` and its launch options, for ``part_out``/``part_lse``
    (the outputs themselves when unsplit, with ``split_strides`` 0)."""
    group = q.shape[1] // k_pages.shape[2]
    upcast, precision = dot_options(q.dtype)
    return dict(
        q_ptr=q, k_pages_ptr=k_pages, v_pages_ptr=v_pages, block_table_ptr=block_table, seq_lens_ptr=seq_lens,
        out_ptr=part_out, lse_ptr=part_lse, qk_scale_log2=scale * LOG2E, num_kv_heads=k_pages.shape[2],
        tokens_per_split=tokens_per_split, max_pages=block_table.shape[1], stride_q_batch=q.stride(0),
        stride_q_head=q.stride(1),
        **kv_pool_strides(k_pages, v_pages, block_table),
        stride_out_batch=part_out.stride(0), stride_out_head=part_out.stride(1), stride_out_split=split_strides[0],
        stride_lse_batch=part_lse.stride(0), stride_lse_head=part_lse.stride(1), stride_lse_split=split_strides[1],
        QUERY_GROUP=group, BLOCK_G=max(16, next_power_of_2(group)), HEAD_DIM=q.shape[2], PAGE_TOKENS=k_pages.shape[1],
        BLOCK_N=launch.block_n, DOT_UPCAST=upcast, DOT_PRECISION=precision,
        num_warps=launch.num_warps, num_stages=launch.num_stages,
    )  # fmt: skip


def _split_buffers(batch: int, num_heads: int, num_splits: int, head_dim: int, device: torch.device):
    """fp32 partial outputs ``[batch, num_heads, num_splits, head_dim]`` and log-sum-exps."""
    part_out = new_buffer((batch, num_heads, num_splits, head_dim), torch.float32, device)
    part_lse = new_buffer((batch, num_heads, num_splits), torch.float32, device)
    return part_out, part_lse


_RESIDENT_PER_SM: dict[tuple, int | None] = {}


def resident_programs_per_sm(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, block_table: torch.Tensor,
                             seq_lens: torch.Tensor, launch: DecodeLaunch) -> int | None:
    """Programs of the split kernel, as compiled for these inputs and ``launch``, that one SM holds at
    once (None off CUDA or where Triton does not report registers). Compiled without launching (no
    stream work, so safe during CUDA graph capture) once per geometry and cached."""
    if interpreting() or q.device.type != "cuda":
        return None
    key = (q.device, q.dtype, q.shape[1] // k_pages.shape[2], q.shape[2], k_pages.shape[1], launch)
    if key not in _RESIDENT_PER_SM:
        part_out, part_lse = _split_buffers(q.shape[0], q.shape[1], 2, q.shape[2], q.device)
        args = _split_kernel_args(q, k_pages, v_pages, block_table, seq_lens, part_out, part_lse, 1.0, launch.block_n,
                                  (part_out.stride(2), part_lse.stride(2)), launch)  # fmt: skip
        try:
            compiled = _decode_split_kernel.warmup(grid=(1, 1), **args)
        except RuntimeError:  # e.g. a CUDA API the capture of a graph forbids: use the estimate, ask again later
            return None
        _RESIDENT_PER_SM[key] = programs_per_sm(compiled, q.device)
    return _RESIDENT_PER_SM[key]


MAX_SPLITS = MAX_GRID_Y  # the splits are the grid's second dimension


def split_context(max_len: int, num_splits: int, block_n: int) -> tuple[int, int]:
    """Tokens per split for about ``num_splits`` splits of ``max_len`` tokens, in whole ``block_n``
    loop steps, and the split count that then covers the context."""
    tokens_per_split = triton.cdiv(triton.cdiv(max_len, num_splits), block_n) * block_n
    return tokens_per_split, triton.cdiv(max_len, tokens_per_split)


def decode_geometry(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, block_table: torch.Tensor,
                    seq_lens: torch.Tensor, num_splits: int = 0, launch: DecodeLaunch | None = None,
                    resident_per_sm: int | None = None) -> tuple[DecodeLaunch, int, int]:
    """The launch (default :func:`decode_launch_config`), tokens per split and split count of a decode
    call; ``num_splits`` 0 fills one wave of ``resident_per_sm`` programs per SM (default: as many as
    the compiled kernel holds)."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_pages.shape[2]
    launch = launch or decode_launch_config(num_heads // num_kv_heads, head_dim, q.dtype, q.device)
    max_len = block_table.shape[1] * k_pages.shape[1]
    if num_splits <= 0:
        resident = resident_per_sm or resident_programs_per_sm(q, k_pages, v_pages, block_table, seq_lens, launch)
        num_splits = choose_num_splits(batch, num_kv_heads, max_len, launch, q.device, resident)
    tokens_per_split, num_splits = split_context(max_len, min(num_splits, MAX_SPLITS), launch.block_n)
    return launch, tokens_per_split, num_splits


@on_its_tensors_device
def _launch_decode(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_splits: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_pages.shape[2]
    check_table_entries(block_table, k_pages.shape[0], k_pages.shape[1], seq_lens, lengths_fit=True)
    out = new_buffer((batch, num_heads, head_dim), q.dtype, q.device)
    lse = new_buffer((batch, num_heads), torch.float32, q.device)
    if batch == 0:
        return out, lse

    launch, tokens_per_split, num_splits = decode_geometry(q, k_pages, v_pages, block_table, seq_lens, num_splits)

    if num_splits == 1:
        part_out, part_lse, split_strides = out, lse, (0, 0)
    else:
        part_out, part_lse = _split_buffers(batch, num_heads, num_splits, head_dim, q.device)
        split_strides = (part_out.stride(2), part_lse.stride(2))
    _decode_split_kernel[(batch * num_kv_heads, num_splits)](
        **_split_kernel_args(q, k_pages, v_pages, block_table, seq_lens, part_out, part_lse, scale, tokens_per_split,
                             split_strides, launch)  # fmt: skip
    )
    if num_splits > 1:
        merge_splits(part_out, part_lse, out, lse)
    return out, lse


def _check_decode_args(q: object, k_pages: object, v_pages: object, block_table: object, seq_lens: object,
                       scale: float | None, num_splits: int | None) -> tuple:
    """The arguments of :func:`paged_decode_attention` checked (q of the pages' dtype and head_dim, its
    heads a multiple of the KV heads; an int32 block table and lengths of q's batch; one device; the
    scale; ``num_splits`` None or a positive int) and normalised: the arguments of
    :func:`_launch_decode`, q unit-stride in head_dim, the tables unit-stride, the scale resolved and
    ``num_splits`` 0 for "choose"."""
    q, k_pages, v_pages = check_query(q, k_pages, v_pages, 3)
    batch, _, head_dim = q.shape
    block_table, seq_lens = check_block_table(block_table, seq_lens, k_pages.shape[1], batch)
    check_device(k_pages.device, q=q, v_pages=v_pages, block_table=block_table, seq_lens=seq_lens)
    num_splits = optional_int("num_splits", num_splits, 1)
    if q.stride(-1) != 1:
        q = q.contiguous()
    return q, k_pages, v_pages, block_table, seq_lens, resolve_scale(scale, head_dim), num_splits or 0


@torch.library.custom_op("pagedllm::paged_decode_attention", mutates_args=())
def _paged_decode_attention_op(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_splits: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    # Called directly (torch.ops.pagedllm...), the arguments get the public function's checks and the
    # launch the unit strides it assumes; num_splits 0 chooses the split count, as None does there.
    return _launch_decode(*_check_decode_args(q, k_pages, v_pages, block_table, seq_lens, scale, num_splits or None))


@_paged_decode_attention_op.register_fake
def _paged_decode_attention_fake(q, k_pages, v_pages, block_table, seq_lens, scale, num_splits):
    batch, num_heads, head_dim = q.shape
    return q.new_empty((batch, num_heads, head_dim)), q.new_empty((batch, num_heads), dtype=torch.float32)


def paged_decode_attention(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float | None = None,
    return_lse: bool = False,
    num_splits: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of one query token per sequence over its paged keys and values.

    Args:
        q: ``[batch, num_heads, head_dim]``, fp16/bf16/fp32, the dtype of the pages.
        k_pages, v_pages: ``[num_pages, page_tokens, num_kv_heads, head_dim]``; ``num_heads`` must be a
            multiple of ``num_kv_heads``; head_dim a power of two from 16 to 256.
        block_table: ``[batch, max_pages]`` int32, the pages of each sequence in logical order, each
            in ``[0, num_pages)``. Entries of pages at or past ``seq_lens`` may hold anything: they may
            be read but are never followed.
        seq_lens: ``[batch]`` int32, keys per sequence (``<= max_pages * page_tokens``).

            Both are checked on the host (``ValueError`` naming the bad entry) for CPU tensors, and for
            CUDA tensors with ``PAGEDLLM_CHECK_INDICES=1`` (a host sync per call). Unchecked on CUDA, a
            longer sequence is cut at the table, and an entry outside the pool is followed outside it.
        scale: score scale, default ``head_dim ** -0.5``.
        return_lse: also return the log-sum-exp, for :func:`merge_attention_partials`.
        num_splits: context splits per (sequence, KV head), rounded to whole loop steps and capped at
            65535 (CUDA's grid limit); default chosen from the context bound ``max_pages * page_tokens``
            and the SM count (no host sync).

    Returns:
        ``out`` ``[batch, num_heads, head_dim]`` in q's dtype, and with ``return_lse`` the fp32 ``lse``
        ``[batch, num_heads]``: natural log of the sum of ``exp(scale * q . k)`` over the keys. A
        sequence of length 0, or whose every score is -inf, gives zeros and ``-inf``.
    """
    args = _check_decode_args(q, k_pages, v_pages, block_table, seq_lens, scale, num_splits)
    if call_kernel_directly(*args[:5]):
        out, lse = _launch_decode(*args)
    else:
        out, lse = _paged_decode_attention_op(*args)
    return (out, lse) if return_lse else out
