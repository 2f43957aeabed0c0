"""Block tables, lengths and positions that the kernels cannot honour, and NaN keys.

On the host (CPU tensors, or ``PAGEDLLM_CHECK_INDICES=1``) a length past the table or a used entry
outside the pool is a ``ValueError`` naming it. Unchecked (CUDA by default), a length past the table
is cut at the table by every kernel and every split count alike. A NaN score gives a NaN output and
lse, never the ``-inf`` of "no keys" that a merge would drop.
"""

import numpy as np
import pytest
import torch

from pagedtensor.triton_kernels import (
    _common,
    merge_attention_partials,
    paged_decode_attention,
    paged_gather,
    paged_prefill_attention,
    paged_scatter,
)
from pagedtensor.triton_kernels._common import host_checks_indices, kernel_device
from pagedtensor.triton_kernels.reference import decode_attention_reference, prefill_attention_reference

DEVICE = kernel_device()
PAGE_TOKENS, HEADS, DIM = 16, 2, 16


def pools(num_pages: int = 4, seed: int = 0, poison_page: int | None = 0):
    """K and V pools of ``num_pages`` pages; ``poison_page`` (no sequence's) is NaN."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn((num_pages, PAGE_TOKENS, HEADS, DIM), generator=gen)
    v = torch.randn((num_pages, PAGE_TOKENS, HEADS, DIM), generator=gen)
    if poison_page is not None:
        k[poison_page] = float("nan")
        v[poison_page] = float("nan")
    return k.to(DEVICE), v.to(DEVICE)


def table(*rows):
    return torch.tensor(rows, dtype=torch.int32, device=DEVICE)


def lengths(*values):
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


def query(batch=1, q_len=None, seed=1):
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, HEADS, DIM) if q_len is None else (batch, q_len, HEADS, DIM)
    return torch.randn(shape, generator=gen).to(DEVICE)


def test_host_checks_indices_on_cpu_always_and_on_cuda_when_asked(monkeypatch):
    monkeypatch.delenv("PAGEDLLM_CHECK_INDICES", raising=False)
    assert host_checks_indices(torch.device("cpu"))
    assert not host_checks_indices(torch.device("cuda", 0))
    monkeypatch.setenv("PAGEDLLM_CHECK_INDICES", "0")
    assert not host_checks_indices(torch.device("cuda", 0))
    monkeypatch.setenv("PAGEDLLM_CHECK_INDICES", "1")
    assert host_checks_indices(torch.device("cuda", 0))


def test_a_length_past_the_table_is_named():
    k, v = pools()
    with pytest.raises(ValueError, match=r"seq_lens\[1\] = 49 exceeds the block table's capacity of 48 tokens"):
        paged_decode_attention(query(2), k, v, table([1, 2, 3], [3, 2, 1]), lengths(48, 49))
    with pytest.raises(ValueError, match=r"seq_lens\[0\] = 40 exceeds the block table's capacity of 32 tokens"):
        paged_prefill_attention(query(1, 4), k, v, table([1, 2]), lengths(40), 36)


def test_a_used_entry_outside_the_pool_is_named():
    k, v = pools()
    q = query(2)
    with pytest.raises(ValueError, match=r"block_table\[1, 1\] = 4 is not a page of the pool: .* \[0, 4\)"):
        paged_decode_attention(q, k, v, table([1, 2], [3, 4]), lengths(32, 17))
    with pytest.raises(ValueError, match=r"block_table\[0, 0\] = -1 is not a page of the pool"):
        paged_decode_attention(q, k, v, table([-1, 2], [3, 1]), lengths(5, 17))
    with pytest.raises(ValueError, match=r"block_table\[0, 1\] = 9 is not a page of the pool"):
        paged_prefill_attention(query(1, 2), k, v, table([1, 9]), lengths(18), 16)
    with pytest.raises(ValueError, match=r"block_table\[0, 1\] = 7 is not a page of the pool"):
        paged_gather(k, table([1, 7]), lengths(20))
    src = torch.ones((1, 3, HEADS, DIM), device=DEVICE)
    before = k.clone()
    with pytest.raises(ValueError, match=r"block_table\[0, 1\] = 5 is not a page of the pool"):
        paged_scatter(src, k, table([1, 5]), 15)  # positions 15..17 use pages 0 and 1 of the row
    assert torch.equal(k.nan_to_num(), before.nan_to_num()), "a refused scatter wrote to the pool"


def test_entries_no_token_uses_may_hold_anything():
    k, v = pools()
    q = query(1)
    # a row's entries past its length, and before a scatter's first position, are never followed
    out = paged_decode_attention(q, k, v, table([1, -7, 99]), lengths(16))
    ref, _ = decode_attention_reference(q, k, v, table([1, 1, 1]), lengths(16))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    gathered = paged_gather(k, table([2, 1000]), lengths(16), max_len=16)
    assert torch.equal(gathered[0], k[2])
    paged_scatter(torch.zeros((1, 2, HEADS, DIM), device=DEVICE), k, table([-3, 3]), 16)
    assert torch.equal(k[3, :2], torch.zeros_like(k[3, :2]))


@pytest.mark.parametrize("num_splits", [1, 2, 3])
def test_unchecked_a_length_past_the_table_is_cut_at_the_table(monkeypatch, num_splits):
    """What the CUDA kernels do without host checks: every split count reads the table's keys only
    (page 0, NaN, is in no row: a split that ran past the row would read it through a zero entry)."""
    k, v = pools()
    q = query(1)
    monkeypatch.setattr(_common, "host_checks_indices", lambda device: False)
    out, lse = paged_decode_attention(q, k, v, table([1, 2, 3]), lengths(60), return_lse=True, num_splits=num_splits)
    ref_out, ref_lse = decode_attention_reference(q, k, v, table([1, 2, 3]), lengths(48))
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


def test_unchecked_prefill_cuts_a_length_past_the_table(monkeypatch):
    k, v = pools(num_pages=5)
    q = query(1, 4)
    monkeypatch.setattr(_common, "host_checks_indices", lambda device: False)
    # row [1, 2] in a table of 3 columns: the third column (page 0, NaN) lies past the row's capacity
    wide = table([1, 2, 0])
    out = paged_prefill_attention(q, k, v, wide[:, :2], lengths(40), 28, causal=False)
    ref, _ = prefill_attention_reference(q, k, v, table([1, 2]), lengths(32), 28, causal=False)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_splits", [1, 2])
def test_a_nan_key_gives_nan_out_and_lse_not_an_empty_partial(num_splits):
    k, v = pools(num_pages=3, poison_page=None)
    k[1, 3, :, 5] = float("nan")
    q = query(1)
    out, lse = paged_decode_attention(q, k, v, table([1, 2]), lengths(32), return_lse=True, num_splits=num_splits)
    assert out.isnan().all() and lse.isnan().all(), f"out {out.flatten()[:4]}, lse {lse}"
    q_chunk = query(1, 2)
    out, lse = paged_prefill_attention(q_chunk, k, v, table([1, 2]), lengths(32), 30, return_lse=True)
    assert out.isnan().all() and lse.isnan().all(), f"prefill lse {lse}"
    clean, clean_lse = paged_decode_attention(q, k, v, table([2]), lengths(16), return_lse=True)
    corrupt, corrupt_lse = paged_decode_attention(q, k, v, table([1]), lengths(16), return_lse=True)
    merged, merged_lse = merge_attention_partials([corrupt, clean], [corrupt_lse, clean_lse])
    assert merged.isnan().all() and merged_lse.isnan().all(), "the merge dropped a NaN partial"


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_merge_propagates_a_nan_or_infinite_lse(bad):
    outs = [torch.ones((1, 2, 4)), torch.full((1, 2, 4), 2.0)]
    lses = [torch.full((1, 2), 0.5), torch.full((1, 2), bad)]
    out, lse = merge_attention_partials(outs, lses)
    assert out.isnan().all() and lse.isnan().all()
    empty = [torch.zeros((1, 2, 4)), torch.full((1, 2), float("-inf"))]
    out, lse = merge_attention_partials([outs[0], empty[0]], [lses[0], empty[1]])
    assert torch.equal(out, outs[0]) and torch.equal(lse, lses[0]), "an empty partial must weigh nothing"


def test_merge_refuses_integer_outputs():
    with pytest.raises(TypeError, match=r"outs\[0\] must be a floating tensor, got torch.int64"):
        merge_attention_partials([torch.ones(2, 3, dtype=torch.long)], [torch.zeros(2)])


def test_positions_take_any_integer_and_name_an_out_of_range_one():
    k, v = pools(poison_page=None)
    q = query(1, 2)
    expected = paged_prefill_attention(q, k, v, table([1, 2]), lengths(20), 18)
    assert torch.equal(paged_prefill_attention(q, k, v, table([1, 2]), lengths(20), np.int64(18)), expected)
    with pytest.raises(ValueError, match=r"q_start \+ 2 tokens must be < 2\*\*31 \(int32 positions\), got q_start = 2147483648"):
        paged_prefill_attention(q, k, v, table([1, 2]), lengths(20), 2**31)
    with pytest.raises(ValueError, match=r"start_pos \+ 1 tokens must be < 2\*\*31 \(int32 positions\), got start_pos = 2147483648"):
        paged_scatter(torch.zeros((1, 1, HEADS, DIM), device=DEVICE), k, table([1]), 2**31)


def test_positions_whose_tokens_pass_int32_are_refused():
    """The queries of a prefill at q_start span q_len positions, which the kernel computes in int32:
    a q_start that fits with a last query past 2**31 - 1 gave every query of its block wrong results."""
    k, v = pools(poison_page=None)
    with pytest.raises(ValueError, match=r"q_start \+ 1 tokens must be < 2\*\*31"):
        paged_prefill_attention(query(1, 1), k, v, table([1, 2]), lengths(20), 2**31 - 1)
    with pytest.raises(ValueError, match=r"q_start\[0\] = 2147483646: q_start \+ 4 tokens must be < 2\*\*31"):
        paged_prefill_attention(query(1, 4), k, v, table([1, 2]), lengths(20), torch.tensor([2**31 - 2], dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match=r"seq_lens\[0\] = -5 is negative"):
        paged_decode_attention(query(1), k, v, table([1, 2]), torch.tensor([-5], dtype=torch.int32, device=DEVICE))


def test_the_registered_ops_called_directly_take_any_strides():
    """torch.ops.pagedllm.* (what a compiled graph calls) make the inputs the kernels read by unit
    stride contiguous, as the public functions do."""
    k, v = pools(poison_page=None)
    block_table = table([1, 2])
    q = query(1)
    expected = paged_decode_attention(q, k, v, block_table, lengths(20))
    wide = torch.zeros(q.shape[:-1] + (2 * q.shape[-1],), dtype=q.dtype, device=DEVICE)
    wide[..., ::2] = q
    got, _ = torch.ops.pagedllm.paged_decode_attention(wide[..., ::2], k, v, block_table, lengths(20), q.shape[-1] ** -0.5, 1)
    assert torch.equal(got, expected)
    transposed = block_table.t().contiguous().t()
    assert torch.equal(torch.ops.pagedllm.paged_gather(k, transposed, lengths(20), 20), paged_gather(k, block_table, lengths(20))[:, :20])


def _op_scatter_head_dim_past_the_pages():
    """src of head_dim 32 into pages of head_dim 16, a guard region after the pages (what an unchecked
    scatter wrote into)."""
    buffer = torch.zeros(2 * PAGE_TOKENS * 1 * DIM + 64, device=DEVICE)
    pages = buffer[: 2 * PAGE_TOKENS * DIM].view(2, PAGE_TOKENS, 1, DIM)
    torch.ops.pagedllm.paged_scatter(torch.ones((1, 1, 1, 2 * DIM), device=DEVICE), pages, table([1]), lengths(15))


def _op_decode_batch_past_the_table():
    """q of batch 2 against a block table and lengths of one row (views of two-row tensors, so an
    unchecked kernel read past them inside memory)."""
    k, v = pools(poison_page=None)
    torch.ops.pagedllm.paged_decode_attention(query(2), k, v, table([1, 2], [1, 2])[:1], lengths(20, 20)[:1], 0.25, 1)


def _op_gather_float_block_table():
    k, _ = pools(poison_page=None)
    torch.ops.pagedllm.paged_gather(k, table([1, 2]).float(), lengths(20), 20)


def _op_prefill_lengths_of_another_batch():
    k, v = pools(poison_page=None)
    torch.ops.pagedllm.paged_prefill_attention(query(1, 2), k, v, table([1, 2]), lengths(20, 20), lengths(18), 0.25, True)


def _op_decode_negative_scale():
    k, v = pools(poison_page=None)
    torch.ops.pagedllm.paged_decode_attention(query(1), k, v, table([1, 2]), lengths(20), -1.0, 1)


@pytest.mark.parametrize(
    "call,error,message",
    [
        (_op_scatter_head_dim_past_the_pages, ValueError, r"src .* does not match pages heads and dim"),
        (_op_decode_batch_past_the_table, ValueError, r"block_table must have 2 rows \(the batch\)"),
        (_op_gather_float_block_table, TypeError, r"block_table must have dtype torch.int32"),
        (_op_prefill_lengths_of_another_batch, ValueError, r"seq_lens must have 1 entries \(the batch\)"),
        (_op_decode_negative_scale, ValueError, r"scale must be a positive finite float, got -1.0"),
    ],
    ids=["scatter-head-dim", "decode-batch", "gather-float-table", "prefill-seq-lens", "decode-scale"],
)
def test_the_registered_ops_called_directly_check_their_arguments(call, error, message):
    """torch.ops.pagedllm.* called directly check shapes, dtypes, batch and heads as the public
    functions do, raising the same error: unchecked, a scatter of a wider head wrote past the pages,
    and a decode of a larger batch than the table read past the table and the lengths."""
    with pytest.raises(error, match=message):
        call()


def test_an_input_that_requires_grad_is_not_silently_detached():
    k, v = pools(poison_page=None)
    q = query(1).requires_grad_()
    out = paged_decode_attention(q, k, v, table([1, 2]), lengths(20))
    with pytest.raises(RuntimeError, match="autograd"):
        out.sum().backward()
    with torch.no_grad():
        assert not paged_decode_attention(q, k, v, table([1, 2]), lengths(20)).requires_grad


def test_paged_scatter_refuses_tensors_that_require_grad_and_writes_under_no_grad():
    """paged_scatter writes pages in place where autograd cannot see: with grad mode on and src or
    pages requiring grad it raises (src got no gradient and the overwritten slots kept theirs,
    silently); under no_grad it writes, the pool unchanged otherwise."""
    k, _ = pools(poison_page=None)
    src = torch.randn((1, 3, HEADS, DIM), device=DEVICE)
    for source, pool in ((src.clone().requires_grad_(), k.clone()), (src, k.clone().requires_grad_()),
                         (src, k.clone().requires_grad_() * 1)):  # fmt: skip
        before = pool.detach().clone()
        with pytest.raises(RuntimeError, match="paged_scatter has no autograd formula: src or pages requires grad"):
            paged_scatter(source, pool, table([2, 0]), 0)
        assert torch.equal(pool.detach(), before)  # refused before any write
    pool = k.clone().requires_grad_()
    with torch.no_grad():
        paged_scatter(src.clone().requires_grad_(), pool, table([2, 0]), 0)
    expected = k.clone()
    expected[2, :3] = src[0]
    assert torch.equal(pool.detach(), expected)


def test_paged_scatter_bumps_the_version_of_pages():
    """The direct launch writes pages in place: it bumps their version counter, as an in-place torch
    op does, so a backward through a tensor saved before the write raises instead of silently using
    the new values (it gave w a gradient of 1 where pages held 0)."""
    pages = torch.zeros((2, PAGE_TOKENS, 1, DIM), device=DEVICE)
    weight = torch.ones_like(pages, requires_grad=True)
    saved = (pages * weight).sum()  # saves pages (all zero) for the gradient of weight
    version = pages._version
    paged_scatter(torch.ones((1, 1, 1, DIM), device=DEVICE), pages, table([0]), 0)
    assert pages._version > version
    assert pages[0, 0].eq(1).all()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.backward()


def test_paged_scatter_into_an_inference_tensor_outside_inference_mode_raises_as_torch():
    """Pages made under ``torch.inference_mode()`` cannot be written in place outside it: torch's
    in-place ops raise, and paged_scatter (its direct launch and its op) wrote them. It raises torch's
    error before any write; inside inference mode it writes."""
    with torch.inference_mode():
        pages = torch.zeros((2, PAGE_TOKENS, 1, DIM), device=DEVICE)
    src = torch.ones((1, 1, 1, DIM), device=DEVICE)
    with pytest.raises(RuntimeError, match="Inplace update to inference tensor outside InferenceMode"):
        torch.inference_mode()(torch.zeros)(1).add_(1)  # torch's own refusal
    for scatter in (lambda: paged_scatter(src, pages, table([0]), 0),
                    lambda: torch.ops.pagedllm.paged_scatter(src, pages, table([0]), torch.zeros(1, dtype=torch.int32, device=DEVICE))):  # fmt: skip
        with pytest.raises(RuntimeError, match="Inplace update to inference tensor outside InferenceMode is not allowed.*pages"):
            scatter()
        assert pages.eq(0).all()
    with torch.inference_mode():
        paged_scatter(src, pages, table([0]), 0)
    assert pages[0, 0].eq(1).all() and pages.sum() == DIM


def test_gather_and_scatter_refuse_a_batch_past_the_grid():
    """The batch is the gather and scatter kernels' second grid dimension, which CUDA caps at 65535: a
    larger batch is refused naming it (CUDA's launch would fail without saying why), before any write."""
    k, _ = pools(poison_page=None)
    batch = 65536
    block_table = torch.zeros((batch, 1), dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="batch must be <= 65535 .* got 65536"):
        paged_gather(k, block_table, torch.zeros(batch, dtype=torch.int32, device=DEVICE))
    before = k.clone()
    with pytest.raises(ValueError, match="batch must be <= 65535 .* got 65536"):
        paged_scatter(torch.zeros((batch, 1, HEADS, DIM), device=DEVICE), k, block_table, 0)
    assert torch.equal(k, before)


def test_the_references_follow_the_kernels_conventions(monkeypatch):
    """The plain-torch references the tests trust: a causal prefill cuts a length past the table at
    the table, as the unchecked kernels and the non-causal reference do (it raised a shape error);
    a +inf score gives NaN as torch's softmax and the kernels do (it gave +-inf); positions take a
    NumPy integer as the kernels do (it was indexed); a negative entry a sequence uses is refused
    (Python indexing followed it to the last page)."""
    from pagedtensor.triton_kernels.reference import scatter_reference

    k, v = pools(num_pages=5)
    q = query(1, 4)
    wide = table([1, 2, 0])
    ref, ref_lse = prefill_attention_reference(q, k, v, table([1, 2]), lengths(40), 28)
    capped, capped_lse = prefill_attention_reference(q, k, v, table([1, 2]), lengths(32), 28)
    assert torch.equal(ref, capped) and torch.equal(ref_lse, capped_lse)
    monkeypatch.setattr(_common, "host_checks_indices", lambda device: False)
    out = paged_prefill_attention(q, k, v, wide[:, :2], lengths(40), 28)
    torch.testing.assert_close(out, ref.to(out.dtype), atol=1e-5, rtol=1e-5)
    monkeypatch.undo()

    infinite = k.clone()
    infinite[1, 3] = float("inf")
    positive = query(1).abs() + 0.1
    ref, ref_lse = decode_attention_reference(positive, infinite, v, table([1, 2]), lengths(32))
    out, lse = paged_decode_attention(positive, infinite, v, table([1, 2]), lengths(32), return_lse=True)
    assert ref.isnan().all() and out.isnan().all(), f"reference {ref.flatten()[:4]}, kernel {out.flatten()[:4]}"

    clean, _ = pools(num_pages=5, poison_page=None)
    assert torch.equal(prefill_attention_reference(q, clean, v, table([1, 2]), lengths(32), np.int64(28))[0],
                       prefill_attention_reference(q, clean, v, table([1, 2]), lengths(32), 28)[0])  # fmt: skip
    src = torch.ones((1, 2, HEADS, DIM), device=DEVICE)
    assert torch.equal(scatter_reference(src, clean, table([1, 2]), np.int64(15)), scatter_reference(src, clean, table([1, 2]), 15))
    with pytest.raises(ValueError, match=r"block_table\[0, 1\] = -1"):
        decode_attention_reference(query(1), clean, v, table([1, -1]), lengths(20))
