"""merge_attention_partials: partials over disjoint page sets merge into attention over their union."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedtensor.triton_kernels import merge_attention_partials, paged_decode_attention, paged_prefill_attention
from pagedtensor.triton_kernels._common import kernel_device
from pagedtensor.triton_kernels.reference import (
    LSE_TOLERANCE,
    attention_reference,
    decode_attention_reference,
    random_paged_kv,
    tolerance,
)

DEVICE = kernel_device()


def split_pages(kv, resident_pages):
    """Two disjoint page sets per sequence: its first ``resident_pages[b]`` pages and the rest."""
    page_tokens = kv.k_pages.shape[1]
    lens = kv.seq_lens.tolist()
    first_lens = [min(n, p * page_tokens) for n, p in zip(lens, resident_pages)]
    rest_lens = [n - f for n, f in zip(lens, first_lens)]
    first_table = kv.block_table.clone()
    rest_table = torch.full_like(kv.block_table, kv.poison_page)
    for b, p in enumerate(resident_pages):
        rest_table[b, : kv.block_table.shape[1] - p] = kv.block_table[b, p:]
    as_tensor = lambda x: torch.tensor(x, dtype=torch.int32, device=DEVICE)  # noqa: E731
    return (first_table, as_tensor(first_lens)), (rest_table, as_tensor(rest_lens))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_merge_of_two_page_sets_equals_decode_over_union(dtype):
    gen = torch.Generator().manual_seed(31)
    # the third sequence has all its pages in the first set: its second partial is empty (lse -inf)
    kv = random_paged_kv([70, 33, 20], page_tokens=16, num_kv_heads=2, head_dim=32, dtype=dtype,
                         device=DEVICE, generator=gen)  # fmt: skip
    q = torch.randn((3, 8, 32), generator=gen).to(device=DEVICE, dtype=dtype)
    partials = []
    for table, lens in split_pages(kv, [2, 1, 2]):
        partials.append(paged_decode_attention(q, kv.k_pages, kv.v_pages, table, lens, return_lse=True))
    assert torch.isneginf(partials[1][1][2]).all(), "the empty partial must have lse -inf"
    out, lse = merge_attention_partials([p[0] for p in partials], [p[1] for p in partials])
    ref_out, ref_lse = decode_attention_reference(q, kv.k_pages, kv.v_pages, kv.block_table, kv.seq_lens)
    assert out.dtype == dtype and not out.isnan().any()
    torch.testing.assert_close(out.float(), ref_out, **tolerance(dtype), msg=lambda m: f"merged out {dtype}: {m}")
    atol, rtol = LSE_TOLERANCE
    torch.testing.assert_close(lse, ref_lse, atol=atol, rtol=rtol, msg=lambda m: f"merged lse {dtype}: {m}")


def test_merge_of_prefill_partials_equals_non_causal_prefill():
    gen = torch.Generator().manual_seed(32)
    kv = random_paged_kv([50, 40], page_tokens=16, num_kv_heads=1, head_dim=16, dtype=torch.float16,
                         device=DEVICE, generator=gen)  # fmt: skip
    q = torch.randn((2, 6, 2, 16), generator=gen).to(device=DEVICE, dtype=torch.float16)
    partials = [
        paged_prefill_attention(q, kv.k_pages, kv.v_pages, table, lens, 0, causal=False, return_lse=True)
        for table, lens in split_pages(kv, [1, 2])
    ]
    out, lse = merge_attention_partials([p[0] for p in partials], [p[1] for p in partials])
    ref_out, ref_lse = attention_reference(q, kv.k_pages, kv.v_pages, kv.block_table, kv.seq_lens, 0, causal=False)
    torch.testing.assert_close(out.float(), ref_out, **tolerance(torch.float16), msg=lambda m: f"merged prefill: {m}")
    torch.testing.assert_close(lse, ref_lse, atol=LSE_TOLERANCE[0], rtol=LSE_TOLERANCE[1])


def test_merge_all_empty_gives_zeros_and_minus_inf_without_nan():
    outs = [torch.full((2, 3, 4), math.nan), torch.zeros((2, 3, 4))]  # an empty partial's output is ignored
    lses = [torch.full((2, 3), -math.inf), torch.full((2, 3), -math.inf)]
    out, lse = merge_attention_partials(outs, lses)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.isneginf(lse).all()


@settings(max_examples=40, deadline=None)
@given(
    num_keys=st.integers(min_value=1, max_value=40),
    num_parts=st.integers(min_value=1, max_value=5),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_merge_of_any_partition_equals_softmax_over_all_keys(num_keys, num_parts, seed):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn((3, num_keys), generator=gen, dtype=torch.float64) * 4
    values = torch.randn((num_keys, 8), generator=gen, dtype=torch.float64)
    owner = torch.randint(0, num_parts, (num_keys,), generator=gen)  # parts may be empty
    outs, lses = [], []
    for part in range(num_parts):
        keys = owner == part
        part_scores = scores[:, keys]
        lse = torch.logsumexp(part_scores, dim=-1) if keys.any() else torch.full((3,), -math.inf, dtype=torch.float64)
        probs = torch.softmax(part_scores, dim=-1) if keys.any() else torch.zeros((3, 0), dtype=torch.float64)
        outs.append((probs @ values[keys]).float())
        lses.append(lse.float())
    out, lse = merge_attention_partials(outs, lses)
    torch.testing.assert_close(out, (torch.softmax(scores, -1) @ values).float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1).float(), atol=1e-5, rtol=1e-5)


def test_merge_bad_arguments():
    out, lse = torch.zeros((2, 3, 4)), torch.zeros((2, 3))
    with pytest.raises(ValueError, match="at least one partial"):
        merge_attention_partials([], [])
    with pytest.raises(ValueError, match="outs has 2 partials but lses has 1"):
        merge_attention_partials([out, out], [lse])
    with pytest.raises(ValueError, match=r"lses\[0\] shape \(2,\) must be"):
        merge_attention_partials([out], [lse[:, 0]])
    with pytest.raises(ValueError, match=r"outs\[1\] is \(2, 3, 5\)"):
        merge_attention_partials([out, torch.zeros((2, 3, 5))], [lse, lse])
    with pytest.raises(TypeError, match="sequences of tensors"):
        merge_attention_partials(out, lse)


def test_merge_names_a_wrong_device_rank_or_sequence():
    out, lse = torch.zeros((2, 3, 4)), torch.zeros((2, 3))
    with pytest.raises(ValueError, match=r"outs\[1\] is on meta, expected cpu \(the device of outs\[0\]\)"):
        merge_attention_partials([out, out.to("meta")], [lse, lse])
    with pytest.raises(ValueError, match=r"lses\[0\] is on meta, expected cpu"):
        merge_attention_partials([out], [lse.to("meta")])
    # a 0-d out has no head_dim: it came back as shape (1,)
    with pytest.raises(ValueError, match=r"outs\[0\] must be \[\.\.\., head_dim\], at least 1 dimension, got shape \(\)"):
        merge_attention_partials([torch.tensor(1.0)], [torch.tensor(0.0)])
    with pytest.raises(TypeError, match="outs must be a sequence of tensors .* got NoneType"):
        merge_attention_partials(None, None)
    with pytest.raises(TypeError, match="lses must be a sequence of tensors .* got int"):
        merge_attention_partials([out], 3)
    merged, merged_lse = merge_attention_partials(iter([torch.ones(4)]), (torch.tensor(0.0),))  # 1-d out is fine
    assert merged.shape == (4,) and merged_lse.shape == ()
