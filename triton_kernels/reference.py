"""Plain-torch references for the paged kernels, and random paged test cases.

The references gather pages through the block table, then compute in fp32; they are slow and meant
for tests and benchmark checks. Attention references return ``(out, lse)`` in fp32 with the kernels'
conventions: ``lse`` is the natural log of the sum of ``exp(scale * q . k)`` over visible keys, and
a query that sees no key gets zeros and ``-inf``.
"""

from __future__ import annotations

import dataclasses
import math

import torch

# (atol, rtol) of a kernel output against the fp32 reference, per dtype of the kernel's inputs.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (3e-3, 3e-3),
    torch.bfloat16: (2e-2, 2e-2),
}
# (atol, rtol) of a kernel's fp32 log-sum-exp: scores accumulate in fp32 for every dtype.
LSE_TOLERANCE: tuple[float, float] = (5e-4, 1e-4)


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """``atol``/``rtol`` keywords for ``torch.testing.assert_close`` of an output of ``dtype``."""
    atol, rtol = TOLERANCES[dtype]
    return {"atol": atol, "rtol": rtol}


def gather_reference(
    pages: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor, max_len: int | None = None
) -> torch.Tensor:
    """``[batch, max_len, heads, dim]``: each sequence's tokens in order, zero after ``seq_lens``."""
    num_pages, page_tokens, num_heads, head_dim = pages.shape
    batch, max_pages = block_table.shape
    if max_len is None:
        max_len = max_pages * page_tokens
    out = torch.zeros((batch, max_len, num_heads, head_dim), dtype=pages.dtype, device=pages.device)
    for b in range(batch):
        length = min(int(seq_lens[b]), max_len, max_pages * page_tokens)
        if length <= 0:
            continue
        used = block_table[b, : math.ceil(length / page_tokens)].long()
        if (used < 0).any():  # Python indexing would follow it to the last page
            j = int((used < 0).nonzero()[0])
            raise ValueError(f"block_table[{b}, {j}] = {int(used[j])}: a page index the sequence uses must be >= 0")
        out[b, :length] = pages[used].reshape(-1, num_heads, head_dim)[:length]
    return out


def scatter_reference(
    src: torch.Tensor, pages: torch.Tensor, block_table: torch.Tensor, start_pos: int | torch.Tensor
) -> torch.Tensor:
    """A copy of ``pages`` with ``src[b, i]`` written at position ``start_pos[b] + i`` of sequence ``b``."""
    pages = pages.clone()
    page_tokens = pages.shape[1]
    batch, num_new = src.shape[:2]
    max_pages = block_table.shape[1]
    for b in range(batch):
        start = int(start_pos[b]) if isinstance(start_pos, torch.Tensor) else int(start_pos)
        for i in range(num_new):
            pos = start + i
            if 0 <= pos < max_pages * page_tokens:
                pages[int(block_table[b, pos // page_tokens]), pos % page_tokens] = src[b, i]
    return pages


def attention_reference(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    q_start: int | torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked-prefill attention in fp32: ``q`` ``[batch, q_len, heads, dim]`` at positions ``q_start + i``.

    Returns ``out`` ``[batch, q_len, heads, dim]`` and ``lse`` ``[batch, q_len, heads]``, both fp32.
    """
    batch, q_len, num_heads, head_dim = q.shape
    num_kv_heads = k_pages.shape[2]
    group = num_heads // num_kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    keys = gather_reference(k_pages, block_table, seq_lens).float()
    values = gather_reference(v_pages, block_table, seq_lens).float()
    out = torch.zeros((batch, q_len, num_heads, head_dim), dtype=torch.float32, device=q.device)
    lse = torch.full((batch, q_len, num_heads), float("-inf"), dtype=torch.float32, device=q.device)
    max_tokens = block_table.shape[1] * k_pages.shape[1]
    for b in range(batch):
        length = min(int(seq_lens[b]), max_tokens)  # cut at the table, as the unchecked kernels do
        start = int(q_start[b]) if isinstance(q_start, torch.Tensor) else int(q_start)
        if length <= 0:
            continue
        k = keys[b, :length].repeat_interleave(group, dim=1)  # [L, H, D]
        v = values[b, :length].repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[b].float(), k) * scale  # [H, Lq, L]
        if causal:
            q_pos = start + torch.arange(q_len, device=q.device)
            k_pos = torch.arange(length, device=q.device)
            scores = scores.masked_fill(k_pos[None, None, :] > q_pos[None, :, None], float("-inf"))
        row_lse = torch.logsumexp(scores, dim=-1)  # [H, Lq]; -inf where no key is visible
        seen = row_lse != float("-inf")  # a +inf score gives NaN, as softmax does
        probs = torch.exp(scores - torch.where(seen, row_lse, 0.0)[..., None])
        out[b] = torch.einsum("hqk,khd->qhd", probs, v)
        lse[b] = row_lse.transpose(0, 1)
    return out, lse


def decode_attention_reference(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention in fp32: ``q`` ``[batch, heads, dim]`` sees every key below ``seq_lens``.

    Returns ``out`` ``[batch, heads, dim]`` and ``lse`` ``[batch, heads]``, both fp32.
    """
    out, lse = attention_reference(
        q[:, None], k_pages, v_pages, block_table, seq_lens, 0, scale=scale, causal=False
    )
    return out[:, 0], lse[:, 0]


prefill_attention_reference = attention_reference


@dataclasses.dataclass
class PagedKV:
    """A random paged KV cache: pools, a shuffled block table and the lengths."""

    k_pages: torch.Tensor
    v_pages: torch.Tensor
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    poison_page: int  # the page unused block-table entries point to (NaN when poisoned)


def random_paged_kv(
    seq_lens: list[int],
    *,
    page_tokens: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    spare_pages: int = 3,
    poison: bool = True,
    generator: torch.Generator | None = None,
) -> PagedKV:
    """Pools holding ``seq_lens`` tokens in randomly ordered, non-contiguous pages.

    With ``poison`` every slot that no sequence owns (tails of last pages, spare pages) is NaN and
    every block-table entry past a sequence's pages points to a NaN page, so a kernel that reads a
    byte it should not read produces NaN.
    """
    pages_per_seq = [max(1, math.ceil(length / page_tokens)) for length in seq_lens]
    max_pages = max(pages_per_seq)
    num_pages = sum(pages_per_seq) + spare_pages + 1
    # draw on the generator's device (CPU by default) so a seed gives the same case everywhere
    draw_device = generator.device if generator is not None else device
    order = torch.randperm(num_pages, generator=generator, device=draw_device).to(device)
    poison_page = int(order[-1])
    shape = (num_pages, page_tokens, num_kv_heads, head_dim)
    k_pages = torch.randn(shape, generator=generator, dtype=dtype, device=draw_device).to(device)
    v_pages = torch.randn(shape, generator=generator, dtype=dtype, device=draw_device).to(device)
    block_table = torch.full((len(seq_lens), max_pages), poison_page, dtype=torch.int32, device=device)
    owned = torch.zeros((num_pages, page_tokens), dtype=torch.bool, device=device)
    next_page = 0
    for b, (length, count) in enumerate(zip(seq_lens, pages_per_seq)):
        pages = order[next_page : next_page + count]
        next_page += count
        block_table[b, :count] = pages.to(torch.int32)
        slots = torch.arange(count * page_tokens, device=device) < length
        owned[pages] = slots.view(count, page_tokens)
    if poison:
        k_pages[~owned] = float("nan")
        v_pages[~owned] = float("nan")
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    return PagedKV(k_pages, v_pages, block_table, lens, poison_page)
