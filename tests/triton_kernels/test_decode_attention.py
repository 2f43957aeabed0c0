"""paged_decode_attention against the fp32 reference (Triton interpreter on the CPU, the H100 for `gpu`)."""

import math

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import given
from hypothesis import strategies as st

from pagedtensor.triton_kernels import decode_attention, paged_decode_attention
from pagedtensor.triton_kernels._common import kernel_device, programs_per_sm
from pagedtensor.triton_kernels.decode_attention import _paged_decode_attention_op
from pagedtensor.triton_kernels.reference import (
    LSE_TOLERANCE,
    decode_attention_reference,
    random_paged_kv,
    tolerance,
)

DEVICE = kernel_device()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def check_decode(kv, q, *, num_splits=None, scale=None, what=""):
    out, lse = paged_decode_attention(q, kv.k_pages, kv.v_pages, kv.block_table, kv.seq_lens,
                                      scale=scale, return_lse=True, num_splits=num_splits)  # fmt: skip
    ref_out, ref_lse = decode_attention_reference(q, kv.k_pages, kv.v_pages, kv.block_table, kv.seq_lens, scale=scale)
    assert out.dtype == q.dtype and out.shape == q.shape, f"{what}: out {out.dtype} {tuple(out.shape)}"
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:2], f"{what}: lse {lse.dtype} {tuple(lse.shape)}"
    torch.testing.assert_close(out.float(), ref_out, **tolerance(q.dtype), msg=lambda m: f"decode out, {what}: {m}")
    atol, rtol = LSE_TOLERANCE
    torch.testing.assert_close(lse, ref_lse, atol=atol, rtol=rtol, msg=lambda m: f"decode lse, {what}: {m}")
    return out, lse


def make_case(seq_lens, *, num_heads, num_kv_heads, head_dim, page_tokens, dtype, seed, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    kv = random_paged_kv(seq_lens, page_tokens=page_tokens, num_kv_heads=num_kv_heads, head_dim=head_dim,
                         dtype=dtype, device=device, generator=gen)  # fmt: skip
    q = torch.randn((len(seq_lens), num_heads, head_dim), generator=gen).to(device=device, dtype=dtype)
    return kv, q


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("num_splits", [None, 3], ids=["one-split", "split-k"])
def test_decode_matches_reference(dtype, group, num_splits):
    # lengths end mid-page, on a page boundary, and at one token; the block table is shuffled
    kv, q = make_case([37, 1, 16, 50], num_heads=2 * group, num_kv_heads=2, head_dim=64, page_tokens=16,
                      dtype=dtype, seed=group)  # fmt: skip
    check_decode(kv, q, num_splits=num_splits, what=f"{dtype} group={group} splits={num_splits}")


@pytest.mark.parametrize(
    "head_dim,page_tokens,group,dtype",
    [(128, 32, 4, torch.float16), (256, 16, 2, torch.bfloat16), (32, 256, 1, torch.float32), (64, 48, 3, torch.float16)],
    ids=["d128-p32", "d256-p16", "d32-p256", "d64-p48-g3"],
)
def test_decode_head_dims_and_page_sizes(head_dim, page_tokens, group, dtype):
    kv, q = make_case([page_tokens + 9, 3], num_heads=group, num_kv_heads=1, head_dim=head_dim,
                      page_tokens=page_tokens, dtype=dtype, seed=head_dim)  # fmt: skip
    check_decode(kv, q, num_splits=2, what=f"d{head_dim} p{page_tokens} g{group} {dtype}")


def test_decode_many_splits_some_empty_and_custom_scale():
    # more splits than blocks of the shortest sequence: empty splits must merge as nothing
    kv, q = make_case([90, 2, 33], num_heads=4, num_kv_heads=4, head_dim=16, page_tokens=16,
                      dtype=torch.float32, seed=11)  # fmt: skip
    check_decode(kv, q, num_splits=6, scale=0.3, what="6 splits, scale 0.3")


@pytest.mark.parametrize(
    "head_dim,seq_lens,num_splits",
    [(64, [1100, 300], 100), (256, [250, 40], 16), (128, [1100, 300], 100)],
    ids=["over-64-splits-two-passes", "head-dim-sliced-one-pass", "head-dim-sliced-two-passes"],
)
def test_decode_merge_paths(head_dim, seq_lens, num_splits):
    """The merge of more splits than one round trip takes (a pass for the maximum, then chunks), and the
    merge of a head by several programs, each over a slice of head_dim (the shorter sequence leaves
    many splits empty)."""
    kv, q = make_case(seq_lens, num_heads=2, num_kv_heads=1, head_dim=head_dim, page_tokens=16,
                      dtype=torch.float16, seed=head_dim)  # fmt: skip
    _, _, splits = decode_attention.decode_geometry(q, kv.k_pages, kv.v_pages, kv.block_table, kv.seq_lens, num_splits)
    block_splits, chunk_splits, block_d = decode_attention.merge_launch(splits, head_dim)
    assert (block_splits > chunk_splits) == (num_splits > 64), f"{splits} splits, {chunk_splits} a round trip"
    assert (block_d < head_dim) == (head_dim > 64), f"head_dim {head_dim} merged {block_d} dimensions a program"
    check_decode(kv, q, num_splits=num_splits, what=f"{splits} splits, head_dim {head_dim}")


@given(num_splits=st.integers(2, 1 << 14), head_dim=st.sampled_from([16, 32, 64, 128, 256]))
def test_merge_launch_bounds_what_one_program_loads(num_splits, head_dim):
    """Each merge program covers whole splits in chunks of at most MERGE_CHUNK_SPLITS and a power-of-two
    slice of head_dim, of at most MERGE_BLOCK_D dimensions, that divides it."""
    block_splits, chunk_splits, block_d = decode_attention.merge_launch(num_splits, head_dim)
    assert block_splits >= num_splits and block_splits & (block_splits - 1) == 0
    assert chunk_splits == min(block_splits, decode_attention.MERGE_CHUNK_SPLITS)
    assert head_dim % block_d == 0 and block_d & (block_d - 1) == 0
    assert block_d == min(head_dim, decode_attention.MERGE_BLOCK_D)


@triton.jit
def _attend_blocks_kernel(q_ptr, k_ptr, v_ptr, visible_ptr, out_ptr, num_blocks, BLOCK_N: tl.constexpr,
                          HEAD_DIM: tl.constexpr, MAY_BE_EMPTY: tl.constexpr):
    """16 query rows against ``num_blocks`` blocks of ``BLOCK_N`` keys through ``_attend_block``, keys
    where ``visible`` is 0 masked; writes the normalised output."""
    rows = tl.arange(0, 16)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + rows[:, None] * HEAD_DIM + offs_d[None, :])
    m_i, l_i, acc = decode_attention._empty_state(16, HEAD_DIM)
    for block in range(num_blocks):
        keys = block * BLOCK_N + offs_n
        k = tl.load(k_ptr + keys[:, None] * HEAD_DIM + offs_d[None, :])
        v = tl.load(v_ptr + keys[:, None] * HEAD_DIM + offs_d[None, :])
        mask_n = tl.load(visible_ptr + keys) != 0
        m_i, l_i, acc = decode_attention._attend_block(q, k, v, mask_n, m_i, l_i, acc, 1.0, "ieee", MAY_BE_EMPTY)
    tl.store(out_ptr + rows[:, None] * HEAD_DIM + offs_d[None, :], acc / l_i[:, None])


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the NaN case, on purpose
def test_attend_block_may_be_empty_takes_blocks_with_no_visible_key():
    """The block step with ``MAY_BE_EMPTY`` (the shipped kernel's, and the experiments' loops bounded
    by the host) gives softmax attention over the visible keys when whole blocks, the first among
    them, have none; the step without it, which only experiments use, gives NaN on a leading empty
    block."""
    gen = torch.Generator().manual_seed(21)
    block_n, head_dim, num_blocks = 16, 16, 4
    q, k, v = (torch.randn((rows, head_dim), generator=gen) for rows in (16, block_n * num_blocks, block_n * num_blocks))
    visible = torch.zeros(block_n * num_blocks, dtype=torch.int32)
    visible[block_n + 3 : 2 * block_n] = 1  # block 0 and block 3 empty, block 2 part visible
    visible[2 * block_n : 2 * block_n + 5] = 1
    scores = (q @ k.T) * math.log(2.0)  # the step weighs a key by 2 ** (q . k) at a scale of 1
    scores[:, visible == 0] = float("-inf")
    expected = torch.softmax(scores, dim=1) @ v
    q, k, v, visible = (t.to(DEVICE) for t in (q, k, v, visible))
    for may_be_empty in (True, False):
        out = torch.empty((16, head_dim), device=DEVICE)
        _attend_blocks_kernel[(1,)](q, k, v, visible, out, num_blocks, BLOCK_N=block_n, HEAD_DIM=head_dim,
                                    MAY_BE_EMPTY=may_be_empty)  # fmt: skip
        if may_be_empty:
            torch.testing.assert_close(out.cpu(), expected, atol=1e-5, rtol=1e-5)
        else:
            assert out.isnan().all(), "the shipped step is expected to need a visible key in each block"


def test_decode_empty_sequence_gives_zeros_and_minus_inf():
    kv, q = make_case([0, 20], num_heads=2, num_kv_heads=1, head_dim=16, page_tokens=16, dtype=torch.float16, seed=12)
    for splits in (None, 2):
        out, lse = check_decode(kv, q, num_splits=splits, what=f"empty sequence, splits={splits}")
        assert torch.equal(out[0], torch.zeros_like(out[0])), "an empty sequence must give zeros"
        assert torch.isneginf(lse[0]).all(), f"an empty sequence must give lse -inf, got {lse[0]}"


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # zero rows padding q: 0 * -inf
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")
@pytest.mark.parametrize("num_splits", [None, 2], ids=["one-split", "split-k"])
def test_decode_keys_scoring_minus_inf_weigh_nothing(num_splits):
    """Keys whose scores are all -inf at the start of a split (K = -inf for tokens 0..15, q > 0) weigh
    0, as in softmax, instead of making the output NaN; a sequence whose every score is -inf gets
    zeros and lse -inf, as the reference gives."""
    gen = torch.Generator().manual_seed(22)
    shape = (2, 16, 1, 16)  # two pages of 16 tokens, one KV head
    k, v = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    k[0] = float("-inf")
    q = torch.rand((2, 2, 16), generator=gen) + 0.1  # positive: q . k is -inf, not NaN
    block_table = torch.tensor([[0, 1], [0, 1]], dtype=torch.int32)
    seq_lens = torch.tensor([32, 16], dtype=torch.int32)  # -inf then finite keys; -inf keys only
    kv = type("KV", (), dict(k_pages=k, v_pages=v, block_table=block_table, seq_lens=seq_lens))
    for name in ("k_pages", "v_pages", "block_table", "seq_lens"):
        setattr(kv, name, getattr(kv, name).to(DEVICE))
    out, lse = check_decode(kv, q.to(DEVICE), num_splits=num_splits, what=f"-inf keys, splits={num_splits}")
    assert not out[0].isnan().any() and torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.isneginf(lse[1]).all(), f"every score -inf must give lse -inf, got {lse[1]}"


def test_decode_int64_page_offsets():
    """Pages referenced beyond 2**31 elements of a lazily allocated pool (only they are written)."""
    page_tokens, num_kv_heads, head_dim = 16, 1, 64
    num_pages = 2**31 // (page_tokens * num_kv_heads * head_dim) + 16
    shape = (num_pages, page_tokens, num_kv_heads, head_dim)
    k_pages = torch.empty(shape, dtype=torch.float16, device=DEVICE)
    v_pages = torch.empty(shape, dtype=torch.float16, device=DEVICE)
    used = [num_pages - 1, 5, num_pages - 9]
    assert used[0] * k_pages.stride(0) > 2**31
    gen = torch.Generator().manual_seed(13)
    for page in used:
        k_pages[page] = torch.randn(shape[1:], generator=gen).to(device=DEVICE, dtype=torch.float16)
        v_pages[page] = torch.randn(shape[1:], generator=gen).to(device=DEVICE, dtype=torch.float16)
    block_table = torch.tensor([used], dtype=torch.int32, device=DEVICE)
    seq_lens = torch.tensor([41], dtype=torch.int32, device=DEVICE)
    q = torch.randn((1, 4, head_dim), generator=gen).to(device=DEVICE, dtype=torch.float16)
    kv = type("KV", (), dict(k_pages=k_pages, v_pages=v_pages, block_table=block_table, seq_lens=seq_lens))
    check_decode(kv, q, num_splits=2, what="pages past 2**31 elements")


def check_block_table_past_each_sequence_is_never_followed(device, splits):
    """Block-table entries past each sequence's pages hold -1, int32 max and an index past the pool:
    the kernel reads them (a step ahead) but must never address memory through them."""
    kv, q = make_case([70, 1, 16, 0], num_heads=4, num_kv_heads=2, head_dim=32, page_tokens=16,
                      dtype=torch.float16, seed=14, device=device)  # fmt: skip
    garbage = torch.tensor([-1, 2**31 - 1, kv.k_pages.shape[0] + 7], dtype=torch.int32, device=device)
    pages_used = (kv.seq_lens + 15) // 16
    past = torch.arange(kv.block_table.shape[1], device=device)[None, :] >= pages_used[:, None]
    assert past.any(), "the case must have entries past some sequence's pages"
    kv.block_table[past] = garbage[torch.arange(int(past.sum()), device=device) % 3]
    for num_splits in splits:
        check_decode(kv, q, num_splits=num_splits, what=f"garbage past seq_lens, splits={num_splits}")


def test_decode_never_follows_block_table_entries_past_a_sequence():
    check_block_table_past_each_sequence_is_never_followed(DEVICE, (None, 1, 3))


def test_decode_op_passes_opcheck_and_compiles():
    kv, q = make_case([20, 5], num_heads=4, num_kv_heads=2, head_dim=16, page_tokens=16, dtype=torch.float16, seed=14)
    pages = (kv.k_pages.nan_to_num(), kv.v_pages.nan_to_num())
    torch.library.opcheck(_paged_decode_attention_op, (q, *pages, kv.block_table, kv.seq_lens, 0.25, 2))

    def attend(q, k_pages, v_pages, block_table, seq_lens):
        return paged_decode_attention(q, k_pages, v_pages, block_table, seq_lens, return_lse=True)

    compiled = torch.compile(attend, backend="aot_eager", fullgraph=True)
    out, lse = compiled(q, *pages, kv.block_table, kv.seq_lens)
    ref_out, ref_lse = attend(q, *pages, kv.block_table, kv.seq_lens)
    torch.testing.assert_close(out, ref_out, atol=0, rtol=0, msg=lambda m: f"compiled decode: {m}")
    torch.testing.assert_close(lse, ref_lse, atol=0, rtol=0, msg=lambda m: f"compiled decode lse: {m}")


def test_decode_compiles_with_a_scale_computed_from_a_dynamic_shape():
    """``scale=1 / x.shape[0]`` under ``dynamic=True`` is a symbolic float: the scale's check
    (``math.isfinite``) stopped a fullgraph trace."""
    kv, q = make_case([20, 5], num_heads=4, num_kv_heads=2, head_dim=16, page_tokens=16, dtype=torch.float32, seed=16)
    pages = (kv.k_pages.nan_to_num(), kv.v_pages.nan_to_num())

    def attend(q, divisor):
        return paged_decode_attention(q, *pages, kv.block_table, kv.seq_lens, scale=1.0 / divisor.shape[0])

    compiled = torch.compile(attend, backend="eager", dynamic=True, fullgraph=True)
    for size in (8, 5):
        divisor = torch.zeros(size)
        torch.testing.assert_close(compiled(q, divisor), attend(q, divisor), atol=0, rtol=0, msg=lambda m: f"scale 1/{size}: {m}")


def test_decode_bad_arguments_name_the_argument():
    kv, q = make_case([20], num_heads=4, num_kv_heads=2, head_dim=16, page_tokens=16, dtype=torch.float16, seed=15)
    args = (kv.k_pages, kv.v_pages, kv.block_table, kv.seq_lens)
    with pytest.raises(TypeError, match="q dtype torch.float32 differs from k_pages dtype torch.float16"):
        paged_decode_attention(q.float(), *args)
    with pytest.raises(ValueError, match="q must have 3 dimensions"):
        paged_decode_attention(q[None], *args)
    with pytest.raises(ValueError, match="num_heads 3 is not a multiple of num_kv_heads 2"):
        paged_decode_attention(q[:, :3], *args)
    with pytest.raises(ValueError, match="q head_dim 8 differs"):
        paged_decode_attention(q[..., :8], *args)
    with pytest.raises(ValueError, match="v_pages shape"):
        paged_decode_attention(q, kv.k_pages, kv.v_pages[:-1], kv.block_table, kv.seq_lens)
    with pytest.raises(ValueError, match="block_table must have 1 rows"):
        paged_decode_attention(q, kv.k_pages, kv.v_pages, kv.block_table.repeat(2, 1), kv.seq_lens)
    with pytest.raises(TypeError, match="block_table must have dtype torch.int32"):
        paged_decode_attention(q, kv.k_pages, kv.v_pages, kv.block_table.long(), kv.seq_lens)
    with pytest.raises(ValueError, match="scale must be a positive finite float, got -1.0"):
        paged_decode_attention(q, *args, scale=-1.0)
    big_pages = torch.zeros((1, 256, 2, 16), dtype=torch.float16, device=DEVICE)  # 2**23 pages of 256 tokens a row
    wide_table = torch.zeros((1, 2**23), dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="block_table has 8388608 pages of 256 tokens a row, 2147483648 token positions"):
        paged_decode_attention(q, big_pages, big_pages, wide_table, kv.seq_lens)
    with pytest.raises(ValueError, match="num_splits must be a positive int or None, got 0"):
        paged_decode_attention(q, *args, num_splits=0)
    with pytest.raises(TypeError, match="q must be a torch.Tensor, got list"):
        paged_decode_attention([1.0], *args)


def test_decode_takes_numpy_scalars():
    np = pytest.importorskip("numpy")
    kv, q = make_case([20], num_heads=4, num_kv_heads=2, head_dim=16, page_tokens=16, dtype=torch.float32, seed=15)
    args = (kv.k_pages, kv.v_pages, kv.block_table, kv.seq_lens)
    expected = paged_decode_attention(q, *args, scale=0.25, num_splits=2)
    assert torch.equal(paged_decode_attention(q, *args, scale=np.float32(0.25), num_splits=np.int64(2)), expected)
    with pytest.raises(ValueError, match=r"num_splits must be a positive int or None, got np.int64\(0\)"):
        paged_decode_attention(q, *args, num_splits=np.int64(0))
    with pytest.raises(TypeError, match="num_splits must be a positive int or None, got float 2.0"):  # a wrong type: TypeError
        paged_decode_attention(q, *args, num_splits=2.0)
    with pytest.raises(TypeError, match="scale must be a float or None, got str"):
        paged_decode_attention(q, *args, scale="0.25")


def test_decode_under_vmap_is_the_loop_of_its_items():
    """vmap over the queries goes through the custom op (torch's per-item fallback): the kernel
    launched on functorch's batched tensors crashed reading their storage."""
    kv, q = make_case([20, 5], num_heads=4, num_kv_heads=2, head_dim=16, page_tokens=16, dtype=torch.float32, seed=16)
    queries = torch.stack([q, q.flip(0).contiguous(), q * 2])
    args = (kv.k_pages, kv.v_pages, kv.block_table, kv.seq_lens)
    out = torch.func.vmap(lambda x: paged_decode_attention(x, *args))(queries)
    for i in range(queries.shape[0]):
        assert torch.equal(out[i], paged_decode_attention(queries[i], *args)), f"vmap item {i}"


def test_decode_refuses_a_scale_past_fp32():
    """The kernels take scale * log2(e) in fp32: a finite Python scale past it gave a NaN output."""
    kv, q = make_case([20], num_heads=4, num_kv_heads=2, head_dim=16, page_tokens=16, dtype=torch.float16, seed=15)
    args = (kv.k_pages, kv.v_pages, kv.block_table, kv.seq_lens)
    for scale, shown in ((1e39, r"1e\+39"), (3e38, r"3e\+38")):  # 3e38 fits fp32, but not times log2(e)
        with pytest.raises(ValueError, match=rf"scale must be at most 2\.3586\d*e\+38 .* got {shown}"):
            paged_decode_attention(q, *args, scale=scale)
    out = paged_decode_attention(q, *args, scale=1e30)
    assert not out.isnan().any()
    # an int past every float: the same error, not OverflowError from the conversion
    with pytest.raises(ValueError, match=r"scale must be at most 2\.3586\d*e\+38 .* got 1000000000"):
        paged_decode_attention(q, *args, scale=10**400)
    with pytest.raises(ValueError, match="scale must be a positive finite float, got -1000000000"):
        paged_decode_attention(q, *args, scale=-(10**400))
    assert torch.equal(paged_decode_attention(q, *args, scale=2), paged_decode_attention(q, *args, scale=2.0))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_dim,page_tokens",
    [(32, 32, 128, 16), (32, 8, 128, 16), (32, 4, 64, 256), (16, 2, 256, 32), (8, 1, 128, 64)],
    ids=["llama2", "llama3", "g8-d64-p256", "g8-d256-p32", "mqa-p64"],
)
def test_gpu_decode_matches_reference(dtype, num_heads, num_kv_heads, head_dim, page_tokens):
    kv, q = make_case([4133, 1, 700, 2 * page_tokens], num_heads=num_heads, num_kv_heads=num_kv_heads,
                      head_dim=head_dim, page_tokens=page_tokens, dtype=dtype, seed=16, device="cuda")  # fmt: skip
    what = f"gpu {dtype} {num_heads}/{num_kv_heads} heads d{head_dim} p{page_tokens}"
    check_decode(kv, q, what=what)  # default (SM-count) split
    check_decode(kv, q, num_splits=1, what=what + " one split")
    check_decode(kv, q, num_splits=7, what=what + " 7 splits")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_decode_never_follows_block_table_entries_past_a_sequence():
    check_block_table_past_each_sequence_is_never_followed("cuda", (None, 1, 3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_decode_fp32_and_cuda_graph():
    kv, q = make_case([3000, 17], num_heads=8, num_kv_heads=2, head_dim=128, page_tokens=16,
                      dtype=torch.float32, seed=17, device="cuda")  # fmt: skip
    check_decode(kv, q, what="gpu fp32")
    args = (q, kv.k_pages, kv.v_pages, kv.block_table, kv.seq_lens)
    expected = paged_decode_attention(*args)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        paged_decode_attention(*args)
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        out = paged_decode_attention(*args)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, expected), "decode under a CUDA graph differs from eager"
    assert math.isfinite(out.float().abs().max().item())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_decode_first_call_inside_graph_capture_matches_eager():
    """A geometry first met while a CUDA graph is captured (kernel not compiled yet, its occupancy not
    yet known) splits the context as eager calls do: the replay equals the eager result bit for bit."""
    decode_attention._RESIDENT_PER_SM.clear()
    kv, q = make_case([5000, 40], num_heads=12, num_kv_heads=3, head_dim=64, page_tokens=32,
                      dtype=torch.float16, seed=19, device="cuda")  # fmt: skip
    args = (q, kv.k_pages, kv.v_pages, kv.block_table, kv.seq_lens)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_decode_attention(*args)
    graph.replay()
    torch.cuda.synchronize()
    assert decode_attention._RESIDENT_PER_SM, "the occupancy was not learned during capture"
    assert torch.equal(out, paged_decode_attention(*args)), "first call under capture split differently from eager"
    check_decode(kv, q, what="gpu first call under capture")


def test_decode_goes_through_the_custom_op_under_a_dispatch_mode():
    """Eager calls on plain tensors launch directly; a dispatch mode (or a tensor subclass) sees the op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class RecordOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    kv, q = make_case([20], num_heads=2, num_kv_heads=1, head_dim=16, page_tokens=16, dtype=torch.float16, seed=18)
    args = (q, kv.k_pages, kv.v_pages, kv.block_table, kv.seq_lens)
    with RecordOps() as mode:
        out = paged_decode_attention(*args)
    assert any("pagedllm.paged_decode_attention" in op for op in mode.ops), mode.ops
    torch.testing.assert_close(out, paged_decode_attention(*args), atol=0, rtol=0)


@given(
    batch=st.integers(1, 64),
    num_kv_heads=st.integers(1, 64),
    max_len=st.integers(1, 1 << 20),
    sms=st.integers(1, 200),
    resident=st.one_of(st.none(), st.integers(1, 32)),
    block_n=st.sampled_from([16, 32, 64]),
)
def test_split_count_fills_at_most_one_wave(batch, num_kv_heads, max_len, sms, resident, block_n):
    """The chosen split count, after the launch rounds each split to whole steps, never makes the grid
    exceed one wave of resident programs unless one split alone does, and never splits finer than a step."""
    launch = decode_attention.DecodeLaunch(block_n=block_n, num_warps=4, num_stages=2, programs_per_sm=3)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(decode_attention, "sm_count", lambda device: sms)
        splits = decode_attention.choose_num_splits(batch, num_kv_heads, max_len, launch, torch.device("cuda"), resident)
    tokens_per_split = math.ceil(math.ceil(max_len / splits) / block_n) * block_n
    launched = math.ceil(max_len / tokens_per_split)
    slots = sms * (resident or launch.programs_per_sm)
    assert 1 <= launched <= splits <= max(1, math.ceil(max_len / block_n))
    if batch * num_kv_heads < slots:
        assert batch * num_kv_heads * launched <= slots
        assert splits == min(slots // (batch * num_kv_heads), math.ceil(max_len / block_n))
    else:
        assert splits == 1


def test_programs_per_sm_is_the_tightest_resource(monkeypatch):
    """Registers, shared memory and threads each bound the resident programs; a kernel that does not
    report its registers gives None."""
    import types

    props = types.SimpleNamespace(regs_per_multiprocessor=65536, shared_memory_per_multiprocessor=233472,
                                  max_threads_per_multi_processor=2048)  # fmt: skip
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)

    def compiled(registers, shared, warps):
        metadata = types.SimpleNamespace(shared=shared, num_warps=warps)
        return types.SimpleNamespace(_init_handles=lambda: None, n_regs=registers, metadata=metadata)

    cuda = torch.device("cuda")
    assert programs_per_sm(compiled(124, 38912, 4), cuda) == 4  # registers: 65536 // (128 * 128)
    assert programs_per_sm(compiled(64, 73728, 4), cuda) == 3  # shared memory: 233472 // (73728 + 1024)
    assert programs_per_sm(compiled(16, 1024, 8), cuda) == 8  # threads: 2048 // 256
    assert programs_per_sm(compiled(255, 0, 8), cuda) == 1  # never below one
    assert programs_per_sm(compiled(None, 1024, 4), cuda) is None
    assert programs_per_sm(object(), cuda) is None
