"""paged_prefill_attention against the fp32 reference (Triton interpreter on the CPU, the H100 for `gpu`)."""

import pytest
import torch

from pagedtensor.triton_kernels import paged_prefill_attention
from pagedtensor.triton_kernels._common import kernel_device
from pagedtensor.triton_kernels import prefill_attention
from pagedtensor.triton_kernels.prefill_attention import _paged_prefill_attention_op, kv_descriptors
from pagedtensor.triton_kernels.reference import LSE_TOLERANCE, attention_reference, random_paged_kv, tolerance

DEVICE = kernel_device()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True, params=["descriptors", "row-gather"])
def key_block_loads(request, monkeypatch):
    """Every test runs twice: key blocks read through tensor descriptors where the pools allow it, and
    gathered row by row; a test asserting which path ran can read the parameter."""
    monkeypatch.setattr(prefill_attention, "USE_TENSOR_DESCRIPTORS", request.param == "descriptors")
    return request.param


def check_prefill(kv, q, q_start, *, causal=True, scale=None, what=""):
    out, lse = paged_prefill_attention(q, kv.k_pages, kv.v_pages, kv.block_table, kv.seq_lens, q_start,
                                       scale=scale, causal=causal, return_lse=True)  # fmt: skip
    ref_out, ref_lse = attention_reference(q, kv.k_pages, kv.v_pages, kv.block_table, kv.seq_lens, q_start,
                                           scale=scale, causal=causal)  # fmt: skip
    assert out.dtype == q.dtype and out.shape == q.shape, f"{what}: out {out.dtype} {tuple(out.shape)}"
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3], f"{what}: lse {lse.dtype} {tuple(lse.shape)}"
    torch.testing.assert_close(out.float(), ref_out, **tolerance(q.dtype), msg=lambda m: f"prefill out, {what}: {m}")
    atol, rtol = LSE_TOLERANCE
    torch.testing.assert_close(lse, ref_lse, atol=atol, rtol=rtol, msg=lambda m: f"prefill lse, {what}: {m}")
    return out, lse


def make_case(seq_lens, q_len, *, num_heads, num_kv_heads, head_dim, page_tokens, dtype, seed, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    kv = random_paged_kv(seq_lens, page_tokens=page_tokens, num_kv_heads=num_kv_heads, head_dim=head_dim,
                         dtype=dtype, device=device, generator=gen)  # fmt: skip
    q = torch.randn((len(seq_lens), q_len, num_heads, head_dim), generator=gen).to(device=device, dtype=dtype)
    return kv, q


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group", [1, 4, 8])
def test_prefill_chunk_at_end_of_context(dtype, group):
    # chunks of 19 queries ending each sequence (the usual chunked prefill), one of them the whole prompt
    seq_lens = [53, 19, 40]
    kv, q = make_case(seq_lens, 19, num_heads=group, num_kv_heads=1, head_dim=32, page_tokens=16,
                      dtype=dtype, seed=group)  # fmt: skip
    q_start = torch.tensor([n - 19 for n in seq_lens], dtype=torch.int32, device=DEVICE)
    check_prefill(kv, q, q_start, what=f"{dtype} group={group}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prefill_non_causal_with_int_start(dtype):
    kv, q = make_case([37, 30], 7, num_heads=4, num_kv_heads=2, head_dim=64, page_tokens=16, dtype=dtype, seed=21)
    check_prefill(kv, q, 30, causal=False, what=f"non-causal {dtype}")
    check_prefill(kv, q, 30, causal=True, scale=0.2, what=f"causal int q_start {dtype}")


@pytest.mark.parametrize(
    "head_dim,page_tokens,dtype",
    [(128, 32, torch.float16), (256, 16, torch.bfloat16), (64, 256, torch.float16), (16, 24, torch.float32)],
    ids=["d128-p32", "d256-p16", "d64-p256", "d16-p24"],
)
def test_prefill_head_dims_and_page_sizes(head_dim, page_tokens, dtype):
    kv, q = make_case([45, 9], 9, num_heads=2, num_kv_heads=1, head_dim=head_dim, page_tokens=page_tokens,
                      dtype=dtype, seed=head_dim)  # fmt: skip
    check_prefill(kv, q, torch.tensor([36, 0], dtype=torch.int32, device=DEVICE), what=f"d{head_dim} p{page_tokens}")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # zero rows padding q: 0 * -inf
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "non-causal"])
def test_prefill_keys_scoring_minus_inf_weigh_nothing(causal):
    """Keys whose scores are all -inf in a key block the queries see in full (K = -inf for tokens
    0..15, q > 0) weigh 0, as in softmax, instead of making the output NaN; a query whose every
    visible score is -inf gets zeros and lse -inf, as the reference gives."""
    gen = torch.Generator().manual_seed(23)
    shape = (2, 16, 1, 16)  # two pages of 16 tokens, one KV head
    k, v = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    k[0] = float("-inf")
    q = torch.rand((2, 4, 2, 16), generator=gen) + 0.1  # positive: q . k is -inf, not NaN
    kv = type("KV", (), {})
    kv.k_pages, kv.v_pages = k.to(DEVICE), v.to(DEVICE)
    kv.block_table = torch.tensor([[0, 1], [0, 1]], dtype=torch.int32, device=DEVICE)
    kv.seq_lens = torch.tensor([32, 16], dtype=torch.int32, device=DEVICE)  # -inf then finite keys; -inf only
    q_start = torch.tensor([28, 12], dtype=torch.int32, device=DEVICE)
    out, lse = check_prefill(kv, q.to(DEVICE), q_start, causal=causal, what=f"-inf keys, causal={causal}")
    assert not out[0].isnan().any() and torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.isneginf(lse[1]).all(), f"every score -inf must give lse -inf, got {lse[1]}"


def test_descriptors_are_used_exactly_where_the_pools_allow(key_block_loads):
    kv, _ = make_case([40], 1, num_heads=2, num_kv_heads=2, head_dim=32, page_tokens=32, dtype=torch.float16, seed=3)
    described = kv_descriptors(kv.k_pages, kv.v_pages, 16)
    if key_block_loads == "row-gather" or (DEVICE.type == "cuda" and torch.cuda.get_device_capability()[0] < 9):
        assert described is None
        return
    k_desc, v_desc, rows_per_page = described
    assert rows_per_page == 32 and k_desc.shape == [kv.k_pages.shape[0] * 32, 64] and k_desc.block_shape == [16, 32]
    assert kv_descriptors(kv.k_pages, kv.v_pages, 64) is None  # a 64-token block would straddle 32-token pages
    # keys and values interleaved in one pool, as the KV cache lays out a page: [K rows, V rows] per page
    pool = torch.zeros((kv.k_pages.shape[0], 2, 32, 2, 32), dtype=torch.float16, device=DEVICE)
    k_pages, v_pages = pool[:, 0], pool[:, 1]
    _, _, rows_per_page = kv_descriptors(k_pages, v_pages, 16)
    assert rows_per_page == 64
    assert kv_descriptors(k_pages, v_pages.contiguous(), 16) is None  # value strides differ from key strides
    odd = torch.zeros((4, 32, 1, 13), dtype=torch.float16, device=DEVICE)[..., :8]  # 26-byte rows: not 16-byte aligned
    assert kv_descriptors(odd, odd, 16) is None


@pytest.mark.parametrize("page_tokens", [32, 128])
def test_prefill_interleaved_pool_like_the_cache(page_tokens):
    # one pool holding per page the keys then the values of its tokens: the cache's layout
    gen = torch.Generator().manual_seed(31)
    num_pages, heads, head_dim = 6, 2, 32
    pool = torch.full((num_pages, 2, page_tokens, heads, head_dim), float("nan"), dtype=torch.float16)
    seq_len = page_tokens * 9 // 2 + 6  # ends mid-page: the tail of the last page stays NaN and must not leak
    table = [4, 0, 5, 2, 1]
    tokens = torch.randn((2, seq_len, heads, head_dim), generator=gen).half()
    for logical, page in enumerate(table):
        chunk = tokens[:, logical * page_tokens : (logical + 1) * page_tokens]
        pool[page, :, : chunk.shape[1]] = chunk
    pool = pool.to(DEVICE)
    kv = type("KV", (), dict(k_pages=pool[:, 0], v_pages=pool[:, 1],
                             block_table=torch.tensor([table], dtype=torch.int32, device=DEVICE),
                             seq_lens=torch.tensor([seq_len], dtype=torch.int32, device=DEVICE)))  # fmt: skip
    q = torch.randn((1, 40, 4, head_dim), generator=gen).half().to(DEVICE)
    check_prefill(kv, q, seq_len - 40, what="interleaved pool")
    check_prefill(kv, q, seq_len - 40, causal=False, what="interleaved pool, non-causal")


def test_prefill_queries_without_keys_give_zeros_and_minus_inf():
    kv, q = make_case([0, 12], 5, num_heads=2, num_kv_heads=2, head_dim=16, page_tokens=16,
                      dtype=torch.float16, seed=22)  # fmt: skip
    out, lse = check_prefill(kv, q, torch.tensor([0, 7], dtype=torch.int32, device=DEVICE), what="empty sequence")
    assert torch.equal(out[0], torch.zeros_like(out[0])), "queries of an empty sequence must give zeros"
    assert torch.isneginf(lse[0]).all(), f"queries of an empty sequence must give lse -inf, got {lse[0]}"


def test_prefill_in_chunks_equals_whole_prompt():
    kv, q = make_case([41], 41, num_heads=4, num_kv_heads=1, head_dim=32, page_tokens=16,
                      dtype=torch.float32, seed=23)  # fmt: skip
    args = (kv.k_pages, kv.v_pages, kv.block_table)
    whole = paged_prefill_attention(q, *args, kv.seq_lens, 0)
    parts = []
    for start, stop in ((0, 16), (16, 30), (30, 41)):
        lens = torch.tensor([stop], dtype=torch.int32, device=DEVICE)  # keys written so far
        parts.append(paged_prefill_attention(q[:, start:stop], *args, lens, start))
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, atol=1e-5, rtol=1e-5,
                               msg=lambda m: f"chunked prefill vs whole prompt: {m}")  # fmt: skip


def test_prefill_int64_page_offsets():
    page_tokens, head_dim = 16, 64
    num_pages = 2**31 // (page_tokens * head_dim) + 8
    shape = (num_pages, page_tokens, 1, head_dim)
    k_pages = torch.empty(shape, dtype=torch.float16, device=DEVICE)
    v_pages = torch.empty(shape, dtype=torch.float16, device=DEVICE)
    used = [3, num_pages - 1, num_pages - 5]
    assert used[1] * k_pages.stride(0) > 2**31
    gen = torch.Generator().manual_seed(24)
    for page in used:
        k_pages[page] = torch.randn(shape[1:], generator=gen).to(device=DEVICE, dtype=torch.float16)
        v_pages[page] = torch.randn(shape[1:], generator=gen).to(device=DEVICE, dtype=torch.float16)
    kv = type("KV", (), dict(k_pages=k_pages, v_pages=v_pages,
                             block_table=torch.tensor([used], dtype=torch.int32, device=DEVICE),
                             seq_lens=torch.tensor([44], dtype=torch.int32, device=DEVICE)))  # fmt: skip
    q = torch.randn((1, 20, 2, head_dim), generator=gen).to(device=DEVICE, dtype=torch.float16)
    check_prefill(kv, q, 24, what="pages past 2**31 elements")


def test_prefill_op_passes_opcheck_and_compiles():
    kv, q = make_case([20, 9], 4, num_heads=2, num_kv_heads=1, head_dim=16, page_tokens=16,
                      dtype=torch.float16, seed=25)  # fmt: skip
    pages = (kv.k_pages.nan_to_num(), kv.v_pages.nan_to_num())
    start = torch.tensor([16, 5], dtype=torch.int32, device=DEVICE)
    torch.library.opcheck(_paged_prefill_attention_op, (q, *pages, kv.block_table, kv.seq_lens, start, 0.25, True))

    def attend(q, k_pages, v_pages, block_table, seq_lens, q_start):
        return paged_prefill_attention(q, k_pages, v_pages, block_table, seq_lens, q_start)

    compiled = torch.compile(attend, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, *pages, kv.block_table, kv.seq_lens, start),
                               attend(q, *pages, kv.block_table, kv.seq_lens, start), atol=0, rtol=0)  # fmt: skip


def test_prefill_bad_arguments_name_the_argument():
    kv, q = make_case([20], 4, num_heads=2, num_kv_heads=1, head_dim=16, page_tokens=16, dtype=torch.float16, seed=26)
    args = (kv.k_pages, kv.v_pages, kv.block_table, kv.seq_lens)
    with pytest.raises(ValueError, match="q must have 4 dimensions"):
        paged_prefill_attention(q[0], *args, 0)
    with pytest.raises(ValueError, match="q_start must be >= 0, got -1"):
        paged_prefill_attention(q, *args, -1)
    with pytest.raises(TypeError, match="q_start must have dtype torch.int32"):
        paged_prefill_attention(q, *args, torch.tensor([0]))
    with pytest.raises(ValueError, match="q_start must have 1 entries"):
        paged_prefill_attention(q, *args, torch.tensor([0, 1], dtype=torch.int32, device=DEVICE))
    with pytest.raises(TypeError, match="causal must be a bool"):
        paged_prefill_attention(q, *args, 0, causal=1)
    with pytest.raises(TypeError, match="q dtype torch.bfloat16 differs"):
        paged_prefill_attention(q.bfloat16(), *args, 0)


def test_prefill_refuses_a_scale_past_fp32():
    """The kernels take scale * log2(e) in fp32: a finite Python scale past it gave a NaN output."""
    kv, q = make_case([20], 4, num_heads=2, num_kv_heads=1, head_dim=16, page_tokens=16, dtype=torch.float16, seed=26)
    args = (kv.k_pages, kv.v_pages, kv.block_table, kv.seq_lens)
    for scale, shown in ((1e39, r"1e\+39"), (3e38, r"3e\+38")):  # 3e38 fits fp32, but not times log2(e)
        with pytest.raises(ValueError, match=rf"scale must be at most 2\.3586\d*e\+38 .* got {shown}"):
            paged_prefill_attention(q, *args, 0, scale=scale)
    out = paged_prefill_attention(q, *args, 0, scale=1e30)
    assert not out.isnan().any()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_dim,page_tokens",
    [(32, 32, 128, 16), (32, 8, 128, 16), (32, 32, 128, 256), (32, 8, 128, 128), (8, 1, 64, 256), (8, 2, 256, 32)],
    ids=["llama2", "llama3", "llama2-p256", "llama3-p128", "mqa-d64-p256", "d256-p32"],
)
def test_gpu_prefill_matches_reference(dtype, num_heads, num_kv_heads, head_dim, page_tokens):
    seq_lens = [1100, 300, 517]
    kv, q = make_case(seq_lens, 300, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                      page_tokens=page_tokens, dtype=dtype, seed=27, device="cuda")  # fmt: skip
    q_start = torch.tensor([n - 300 for n in seq_lens], dtype=torch.int32, device="cuda")
    what = f"gpu {dtype} {num_heads}/{num_kv_heads} heads d{head_dim} p{page_tokens}"
    check_prefill(kv, q, q_start, what=what)
    check_prefill(kv, q, q_start, causal=False, what=what + " non-causal")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_prefill_fp32():
    kv, q = make_case([700, 129], 129, num_heads=4, num_kv_heads=2, head_dim=128, page_tokens=16,
                      dtype=torch.float32, seed=28, device="cuda")  # fmt: skip
    check_prefill(kv, q, torch.tensor([571, 0], dtype=torch.int32, device="cuda"), what="gpu fp32")
