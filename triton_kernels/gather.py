"""Paged gather and scatter: move tokens between a page pool and a dense ``[batch, tokens, heads, dim]``.

``pages`` is ``[num_pages, page_tokens, num_heads, head_dim]`` (vLLM layout), ``block_table``
``[batch, max_pages]`` int32 lists each sequence's pages in logical order: token ``t`` of sequence
``b`` lies in page ``block_table[b, t // page_tokens]`` at slot ``t % page_tokens``.

One program copies ``BLOCK_T`` tokens of one sequence, a chunk of the ``num_heads * head_dim`` row
at a time; each token finds its page through the block table, and the page index is widened to
int64 before it meets the page stride.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedtensor.triton_kernels._common import (
    MAX_GRID_Y,
    call_kernel_directly,
    on_its_tensors_device,
    check_block_table,
    check_device,
    check_pages,
    check_position_values,
    check_positions,
    check_table_entries,
    check_tensor,
    interpreting,
    new_buffer,
    next_power_of_2,
    optional_int,
    refuse_internal_overlap,
    refuse_shared_memory,
)


def check_grid_batch(batch: int) -> None:
    """Refuse a batch past the kernels' grid: it is their second grid dimension (CUDA would fail the
    launch without naming it)."""
    if batch > MAX_GRID_Y:
        raise ValueError(f"batch must be <= {MAX_GRID_Y} (a grid dimension of the kernel), got {batch}; split the batch")


def _block_sizes(num_heads: int, head_dim: int) -> tuple[int, int]:
    """(tokens, row elements) per program step."""
    row = next_power_of_2(num_heads * head_dim)
    if interpreting():
        return 16, min(row, 4096)
    return 16, min(row, 1024)


@triton.jit
def _paged_gather_kernel(
    pages_ptr,
    block_table_ptr,
    seq_lens_ptr,
    out_ptr,
    max_len,
    max_pages,
    num_heads,
    stride_p_page: tl.int64,
    stride_p_token: tl.int64,
    stride_p_head: tl.int64,
    stride_bt_batch: tl.int64,
    stride_out_batch: tl.int64,
    stride_out_token: tl.int64,
    HEAD_DIM: tl.constexpr,
    PAGE_TOKENS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid_t = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    seq_len = tl.load(seq_lens_ptr + batch)
    in_out = offs_t < max_len
    logical_page = offs_t // PAGE_TOKENS
    valid = in_out & (offs_t < seq_len) & (logical_page < max_pages)
    page = tl.load(block_table_ptr + batch * stride_bt_batch + logical_page, mask=valid, other=0).to(tl.int64)
    src_row = page * stride_p_page + (offs_t % PAGE_TOKENS).to(tl.int64) * stride_p_token
    dst_row = batch * stride_out_batch + offs_t.to(tl.int64) * stride_out_token
    row_len = num_heads * HEAD_DIM
    for r0 in range(0, row_len, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < row_len
        src_col = (offs_r // HEAD_DIM).to(tl.int64) * stride_p_head + offs_r % HEAD_DIM
        x = tl.load(pages_ptr + src_row[:, None] + src_col[None, :], mask=valid[:, None] & mask_r[None, :], other=0.0)
        tl.store(out_ptr + dst_row[:, None] + offs_r[None, :], x, mask=in_out[:, None] & mask_r[None, :])


@triton.jit
def _paged_scatter_kernel(
    src_ptr,
    pages_ptr,
    block_table_ptr,
    start_pos_ptr,
    num_new,
    max_pages,
    num_heads,
    stride_src_batch: tl.int64,
    stride_src_token: tl.int64,
    stride_src_head: tl.int64,
    stride_p_page: tl.int64,
    stride_p_token: tl.int64,
    stride_p_head: tl.int64,
    stride_bt_batch: tl.int64,
    HEAD_DIM: tl.constexpr,
    PAGE_TOKENS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid_t = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    pos = tl.load(start_pos_ptr + batch) + offs_t
    logical_page = pos // PAGE_TOKENS
    valid = (offs_t < num_new) & (pos >= 0) & (logical_page < max_pages)
    page = tl.load(block_table_ptr + batch * stride_bt_batch + logical_page, mask=valid, other=0).to(tl.int64)
    dst_row = page * stride_p_page + (pos % PAGE_TOKENS).to(tl.int64) * stride_p_token
    src_row = batch * stride_src_batch + offs_t.to(tl.int64) * stride_src_token
    row_len = num_heads * HEAD_DIM
    for r0 in range(0, row_len, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask = valid[:, None] & (offs_r < row_len)[None, :]
        head = (offs_r // HEAD_DIM).to(tl.int64)
        dim = offs_r % HEAD_DIM
        x = tl.load(src_ptr + src_row[:, None] + (head * stride_src_head + dim)[None, :], mask=mask)
        tl.store(pages_ptr + dst_row[:, None] + (head * stride_p_head + dim)[None, :], x, mask=mask)


@on_its_tensors_device
def _launch_gather(pages: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor, max_len: int) -> torch.Tensor:
    _, page_tokens, num_heads, head_dim = pages.shape
    batch, max_pages = block_table.shape
    check_table_entries(block_table, pages.shape[0], page_tokens, seq_lens, limit=max_len, lengths_fit=True)
    out = new_buffer((batch, max_len, num_heads, head_dim), pages.dtype, pages.device)
    if batch == 0 or max_len == 0:
        return out
    block_t, block_r = _block_sizes(num_heads, head_dim)
    _paged_gather_kernel[(triton.cdiv(max_len, block_t), batch)](
        pages_ptr=pages,
        block_table_ptr=block_table,
        seq_lens_ptr=seq_lens,
        out_ptr=out,
        max_len=max_len,
        max_pages=max_pages,
        num_heads=num_heads,
        stride_p_page=pages.stride(0),
        stride_p_token=pages.stride(1),
        stride_p_head=pages.stride(2),
        stride_bt_batch=block_table.stride(0),
        stride_out_batch=out.stride(0),
        stride_out_token=out.stride(1),
        HEAD_DIM=head_dim,
        PAGE_TOKENS=page_tokens,
        BLOCK_T=block_t,
        BLOCK_R=block_r,
        num_warps=4,
    )
    return out


def _check_gather_args(pages: object, block_table: object, seq_lens: object,
                       max_len: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The arguments of :func:`paged_gather` checked (pages, an int32 block table and lengths of one
    batch, one device, a batch the grid holds, ``max_len`` None or an int ``>= 0``) and normalised:
    ``(pages, block_table, seq_lens, max_len)`` with unit-stride tables and ``max_len`` an int."""
    pages = check_pages("pages", pages)
    block_table, seq_lens = check_block_table(block_table, seq_lens, pages.shape[1])
    check_device(pages.device, block_table=block_table, seq_lens=seq_lens)
    max_len = optional_int("max_len", max_len, 0)
    if max_len is None:
        max_len = block_table.shape[1] * pages.shape[1]
    check_grid_batch(block_table.shape[0])
    return pages, block_table, seq_lens, max_len


@torch.library.custom_op("pagedllm::paged_gather", mutates_args=())
def _paged_gather_op(pages: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor, max_len: int) -> torch.Tensor:
    # Called directly (torch.ops.pagedllm...), the arguments get the public function's checks and the
    # launch the unit strides it assumes.
    return _launch_gather(*_check_gather_args(pages, block_table, seq_lens, max_len))


@_paged_gather_op.register_fake
def _paged_gather_fake(pages, block_table, seq_lens, max_len):
    return pages.new_empty((block_table.shape[0], max_len, pages.shape[2], pages.shape[3]))


def paged_gather(
    pages: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor, *, max_len: int | None = None
) -> torch.Tensor:
    """Copy each sequence's tokens out of the page pool into a dense, zero-padded tensor.

    Args:
        pages: ``[num_pages, page_tokens, num_heads, head_dim]``.
        block_table: ``[batch, max_pages]`` int32; only entries of pages below ``seq_lens`` are read,
            and each must be in ``[0, num_pages)``: checked on the host for CPU tensors, and for CUDA
            tensors with ``PAGEDLLM_CHECK_INDICES=1`` (a host sync per call; unchecked, an entry outside
            the pool is followed outside it).
        seq_lens: ``[batch]`` int32 tokens per sequence, each in ``[0, max_pages * page_tokens]``
            (checked where the block table is; unchecked, a length past the table is cut at it).
        max_len: tokens in the output; default ``max_pages * page_tokens`` (known without a host sync).

    Returns:
        ``[batch, max_len, num_heads, head_dim]`` in the pages' dtype; token ``t >= seq_lens[b]`` is zero.
    """
    pages, block_table, seq_lens, max_len = _check_gather_args(pages, block_table, seq_lens, max_len)
    if call_kernel_directly(pages, block_table, seq_lens):
        return _launch_gather(pages, block_table, seq_lens, max_len)
    return _paged_gather_op(pages, block_table, seq_lens, max_len)


@on_its_tensors_device
def _launch_scatter(src: torch.Tensor, pages: torch.Tensor, block_table: torch.Tensor, start_pos: torch.Tensor) -> None:
    batch, num_new, num_heads, head_dim = src.shape
    check_position_values("start_pos", start_pos, num_new)
    check_table_entries(block_table, pages.shape[0], pages.shape[1], start_pos, start_pos, extra=num_new, lengths=None)
    if batch == 0 or num_new == 0:
        return
    block_t, block_r = _block_sizes(num_heads, head_dim)
    _paged_scatter_kernel[(triton.cdiv(num_new, block_t), batch)](
        src_ptr=src,
        pages_ptr=pages,
        block_table_ptr=block_table,
        start_pos_ptr=start_pos,
        num_new=num_new,
        max_pages=block_table.shape[1],
        num_heads=num_heads,
        stride_src_batch=src.stride(0),
        stride_src_token=src.stride(1),
        stride_src_head=src.stride(2),
        stride_p_page=pages.stride(0),
        stride_p_token=pages.stride(1),
        stride_p_head=pages.stride(2),
        stride_bt_batch=block_table.stride(0),
        HEAD_DIM=head_dim,
        PAGE_TOKENS=pages.shape[1],
        BLOCK_T=block_t,
        BLOCK_R=block_r,
        num_warps=4,
    )


def _check_scatter_args(src: object, pages: object, block_table: object,
                        start_pos: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The arguments of :func:`paged_scatter` checked (pages; src of their dtype, heads and head_dim;
    an int32 block table of src's batch; positions; one device; a batch the grid holds) and
    normalised: ``(src, pages, block_table, start_pos)``, src unit-stride in head_dim, the table
    contiguous and ``start_pos`` an int32 ``[batch]`` tensor. Pages made under inference mode are
    written only inside it, as torch's in-place ops refuse them outside. (Grad mode is the public
    function's check: the op records itself for autograd.)"""
    pages = check_pages("pages", pages)
    if not torch.compiler.is_compiling() and pages.is_inference() and not torch.is_inference_mode_enabled():
        raise RuntimeError(  # torch's own words for an in-place op on such a tensor, and which one
            "Inplace update to inference tensor outside InferenceMode is not allowed: paged_scatter's pages "
            "were made under torch.inference_mode(); write them inside it, or clone them first"
        )
    src = check_tensor("src", src, 4, (pages.dtype,))
    block_table = check_tensor("block_table", block_table, 2, (torch.int32,))
    batch = src.shape[0]
    if src.shape[2:] != pages.shape[2:]:
        raise ValueError(
            f"src [batch, num_new, num_heads, head_dim] {tuple(src.shape)} does not match pages heads and dim "
            f"{tuple(pages.shape[2:])}"
        )
    if block_table.shape[0] != batch:
        raise ValueError(f"block_table must have {batch} rows (the batch of src), got shape {tuple(block_table.shape)}")
    check_grid_batch(batch)
    start_pos = check_positions("start_pos", start_pos, batch, pages.device, span=src.shape[1])
    check_device(pages.device, src=src, block_table=block_table)
    refuse_internal_overlap(pages, "pages")
    refuse_shared_memory(pages, src, "pages", "src")
    if src.stride(-1) != 1:
        src = src.contiguous()
    return src, pages, block_table.contiguous(), start_pos


@torch.library.custom_op("pagedllm::paged_scatter", mutates_args=("pages",))
def _paged_scatter_op(src: torch.Tensor, pages: torch.Tensor, block_table: torch.Tensor, start_pos: torch.Tensor) -> None:
    # Called directly (torch.ops.pagedllm...), the arguments get the public function's checks and the
    # launch the unit strides it assumes.
    _launch_scatter(*_check_scatter_args(src, pages, block_table, start_pos))


@_paged_scatter_op.register_fake
def _paged_scatter_fake(src, pages, block_table, start_pos):
    return None


def _paged_scatter_vmap(info, in_dims, src, pages, block_table, start_pos):
    """vmap of the scatter: each item written into its own pool, as a loop of calls would.

    ``pages`` must be batched where any other argument is (as torch's in-place ops under vmap
    require of the tensor they write): items writing different tokens into one pool would race for
    its slots.
    """
    if in_dims[1] is None:
        batched = [name for name, dim in zip(("src", "pages", "block_table", "start_pos"), in_dims) if dim is not None]
        raise RuntimeError(
            f"vmap: paged_scatter writes pages in place, but pages is not batched while {', '.join(batched)} is: "
            "every item would write the one pool. Batch pages too (one pool an item), or run the items as a loop"
        )

    def item(value, dim, index):
        return value if dim is None else value.select(dim, index)

    for index in range(info.batch_size):
        _paged_scatter_op(*(item(value, dim, index) for value, dim in zip((src, pages, block_table, start_pos), in_dims)))
    return None, None


_paged_scatter_op.register_vmap(_paged_scatter_vmap)


def paged_scatter(
    src: torch.Tensor, pages: torch.Tensor, block_table: torch.Tensor, start_pos: int | torch.Tensor
) -> None:
    """Write new tokens into their pages, in place.

    Token ``i`` of ``src[b]`` goes to logical position ``start_pos[b] + i`` of sequence ``b``: page
    ``block_table[b, pos // page_tokens]``, slot ``pos % page_tokens``. Negative positions (from
    a negative ``start_pos`` entry) and positions past the block table
    (``pos >= max_pages * page_tokens``) are dropped; the caller allocates pages first. Every
    written position must map to its own slot (two positions sharing a page slot race).

    Args:
        src: ``[batch, num_new, num_heads, head_dim]`` in the pages' dtype.
        pages: ``[num_pages, page_tokens, num_heads, head_dim]``, written in place.
        block_table: ``[batch, max_pages]`` int32; each entry a written position uses must be in
            ``[0, num_pages)``, checked as in :func:`paged_gather` (unchecked, an entry outside the pool
            is written outside it).
        start_pos: an int ``>= 0``, or an int32 ``[batch]`` tensor (an entry may be negative): position
            of ``src[b, 0]``.

    Raises:
        RuntimeError: grad mode is on and ``src`` or ``pages`` requires grad (the write has no
            autograd formula); ``pages`` is an inference tensor and inference mode is off (torch's
            in-place ops refuse it alike).
    """
    src, pages, block_table, start_pos = _check_scatter_args(src, pages, block_table, start_pos)
    if torch.is_grad_enabled() and (src.requires_grad or pages.requires_grad):
        # An in-place write autograd cannot see: src would get no gradient and the overwritten slots
        # of pages would keep theirs, silently.
        raise RuntimeError(
            "paged_scatter has no autograd formula: src or pages requires grad; run it under torch.no_grad() "
            "(the paged KV cache writes detached keys and values) or pass detached tensors"
        )
    if call_kernel_directly(src, pages, block_table, start_pos):
        _launch_scatter(src, pages, block_table, start_pos)
        # The kernel wrote through a pointer: tell autograd, as an in-place torch op would, so that a
        # backward through a tensor saved before the write raises (the op path's dispatch bumps it).
        torch.autograd.graph.increment_version(pages)
    else:
        _paged_scatter_op(src, pages, block_table, start_pos)
