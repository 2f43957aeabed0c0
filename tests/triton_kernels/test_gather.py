"""paged_gather / paged_scatter against the plain-torch references (Triton interpreter on the CPU)."""

import pytest
import torch

from pagedtensor.triton_kernels import _common, paged_gather, paged_scatter
from pagedtensor.triton_kernels._common import kernel_device
from pagedtensor.triton_kernels.gather import _paged_gather_op, _paged_scatter_op
from pagedtensor.triton_kernels.reference import gather_reference, random_paged_kv, scatter_reference

DEVICE = kernel_device()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def assert_same(actual, expected, what):
    torch.testing.assert_close(actual, expected, atol=0, rtol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "page_tokens,num_heads,head_dim", [(16, 2, 64), (32, 3, 16), (256, 1, 32)], ids=["p16", "p32-h3", "p256"]
)
def test_gather_matches_reference(dtype, page_tokens, num_heads, head_dim):
    gen = torch.Generator().manual_seed(1)
    seq_lens = [page_tokens * 2 + 5, 1, page_tokens, 0]  # mid-page end, one token, full page, empty
    kv = random_paged_kv(seq_lens, page_tokens=page_tokens, num_kv_heads=num_heads, head_dim=head_dim,
                         dtype=dtype, device=DEVICE, generator=gen)  # fmt: skip
    out = paged_gather(kv.k_pages, kv.block_table, kv.seq_lens)
    expected = gather_reference(kv.k_pages, kv.block_table, kv.seq_lens)
    assert out.shape == (4, kv.block_table.shape[1] * page_tokens, num_heads, head_dim)
    assert not out.isnan().any(), "gather read a poisoned slot or left an output element unwritten"
    assert_same(out, expected, f"gather {dtype} page_tokens={page_tokens}")


def test_gather_max_len_truncates_and_pads():
    gen = torch.Generator().manual_seed(2)
    kv = random_paged_kv([40, 7], page_tokens=16, num_kv_heads=1, head_dim=16, dtype=torch.float16,
                         device=DEVICE, generator=gen)  # fmt: skip
    for max_len in (5, 40, 70):
        out = paged_gather(kv.k_pages, kv.block_table, kv.seq_lens, max_len=max_len)
        assert_same(out, gather_reference(kv.k_pages, kv.block_table, kv.seq_lens, max_len), f"max_len={max_len}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scatter_matches_reference(dtype):
    gen = torch.Generator().manual_seed(3)
    kv = random_paged_kv([45, 20, 33], page_tokens=16, num_kv_heads=2, head_dim=32, dtype=dtype,
                         device=DEVICE, generator=gen)  # fmt: skip
    src = torch.randn((3, 9, 2, 32), generator=gen).to(device=DEVICE, dtype=dtype)
    start_pos = torch.tensor([30, 11, 0], dtype=torch.int32, device=DEVICE)  # crosses pages, starts mid-page
    expected = scatter_reference(src, kv.k_pages, kv.block_table, start_pos)
    paged_scatter(src, kv.k_pages, kv.block_table, start_pos)
    assert_same(kv.k_pages, expected, f"scatter {dtype}")


def test_scatter_int_start_drops_tokens_past_the_block_table():
    gen = torch.Generator().manual_seed(4)
    kv = random_paged_kv([32, 32], page_tokens=16, num_kv_heads=1, head_dim=16, dtype=torch.float32,
                         device=DEVICE, generator=gen)  # fmt: skip
    src = torch.randn((2, 6, 1, 16), generator=gen).to(DEVICE)
    expected = scatter_reference(src, kv.k_pages, kv.block_table, 29)  # positions 29..34; 32.. are dropped
    paged_scatter(src, kv.k_pages, kv.block_table, 29)
    assert_same(kv.k_pages, expected, "scatter past the end of the block table")


@pytest.mark.parametrize("host_checks", [True, False], ids=["checked", "unchecked"])
def test_scatter_tensor_start_drops_tokens_at_negative_positions(monkeypatch, host_checks):
    """A negative start_pos entry (a left-padded row) drops the tokens before position 0 and writes
    the rest, as scatter_reference does; "unchecked" runs the kernel alone, as CUDA does by default.
    The host check refused it, naming seq_lens (an argument scatter does not have)."""
    monkeypatch.setattr(_common, "host_checks_indices", lambda device: host_checks)
    gen = torch.Generator().manual_seed(6)
    kv = random_paged_kv([32, 32, 32, 32], page_tokens=16, num_kv_heads=1, head_dim=16, dtype=torch.float32,
                         device=DEVICE, generator=gen)  # fmt: skip
    src = torch.randn((4, 20, 1, 16), generator=gen).to(DEVICE)
    # partly before 0, wholly before 0, far before 0, and a plain row
    start_pos = torch.tensor([-3, -25, -(2**31), 5], dtype=torch.int32, device=DEVICE)
    expected = scatter_reference(src, kv.k_pages, kv.block_table, start_pos)
    paged_scatter(src, kv.k_pages, kv.block_table, start_pos)
    assert_same(kv.k_pages, expected, f"scatter with negative start_pos ({'checked' if host_checks else 'unchecked'})")


def test_scatter_negative_start_checks_only_the_entries_it_writes():
    pages = torch.zeros((4, 16, 1, 16), device=DEVICE)
    src = torch.ones((1, 4, 1, 16), device=DEVICE)
    block_table = torch.tensor([[-1, 1]], dtype=torch.int32, device=DEVICE)
    paged_scatter(src, pages, block_table, torch.tensor([-10], dtype=torch.int32, device=DEVICE))  # all dropped
    assert not pages.any()
    with pytest.raises(ValueError, match=r"block_table\[0, 0\] = -1 is not a page of the pool"):
        paged_scatter(src, pages, block_table, torch.tensor([-2], dtype=torch.int32, device=DEVICE))


def test_gather_refuses_a_length_past_the_block_table():
    """As the attention kernels do: the gather cut seq_lens = 300 at the table's 32 tokens silently."""
    pages = torch.zeros((4, 16, 1, 16), device=DEVICE)
    block_table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32, device=DEVICE)
    seq_lens = torch.tensor([32, 300], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match=r"seq_lens\[1\] = 300 exceeds the block table's capacity of 32 tokens"):
        paged_gather(pages, block_table, seq_lens)
    with pytest.raises(ValueError, match=r"seq_lens\[1\] = 300 exceeds the block table's capacity of 32 tokens"):
        paged_gather(pages, block_table, seq_lens, max_len=8)


def test_scatter_then_gather_round_trip_non_contiguous_src():
    gen = torch.Generator().manual_seed(5)
    kv = random_paged_kv([48], page_tokens=16, num_kv_heads=2, head_dim=16, dtype=torch.bfloat16,
                         device=DEVICE, generator=gen)  # fmt: skip
    src = torch.randn((1, 2, 48, 16), generator=gen).to(device=DEVICE, dtype=torch.bfloat16).transpose(1, 2)
    paged_scatter(src, kv.k_pages, kv.block_table, 0)
    assert_same(paged_gather(kv.k_pages, kv.block_table, kv.seq_lens), src, "round trip")


def test_int64_page_offsets():
    """A pool of more than 2**31 elements: the pages referenced lie past int32 element offsets.

    ``torch.empty`` reserves the pool without touching it; only the referenced pages are written.
    """
    page_tokens, num_heads, head_dim = 16, 2, 64
    page_elems = page_tokens * num_heads * head_dim
    num_pages = 2**31 // page_elems + 64
    pages = torch.empty((num_pages, page_tokens, num_heads, head_dim), dtype=torch.float16, device=DEVICE)
    high = [num_pages - 1, num_pages - 50, 7]  # the first two start beyond 2**31 elements
    assert high[1] * pages.stride(0) > 2**31
    block_table = torch.tensor([high], dtype=torch.int32, device=DEVICE)
    seq_lens = torch.tensor([40], dtype=torch.int32, device=DEVICE)
    gen = torch.Generator().manual_seed(6)
    for page in high:
        pages[page] = torch.randn((page_tokens, num_heads, head_dim), generator=gen).to(device=DEVICE, dtype=pages.dtype)
    assert_same(paged_gather(pages, block_table, seq_lens), gather_reference(pages, block_table, seq_lens), "gather")
    src = torch.randn((1, 20, num_heads, head_dim), generator=gen).to(device=DEVICE, dtype=pages.dtype)
    paged_scatter(src, pages, block_table, 10)
    assert_same(pages[high[0], 10:16], src[0, :6], "scatter into the first page")
    assert_same(pages[high[1], :14], src[0, 6:], "scatter into a page beyond 2**31 elements")


def test_custom_ops_pass_opcheck():
    kv = random_paged_kv([20, 3], page_tokens=16, num_kv_heads=1, head_dim=16, dtype=torch.float16,
                         device=DEVICE, generator=torch.Generator().manual_seed(7))  # fmt: skip
    torch.library.opcheck(_paged_gather_op, (kv.k_pages, kv.block_table, kv.seq_lens, 32))
    src = torch.randn((2, 3, 1, 16), dtype=torch.float16, device=DEVICE)
    start = torch.tensor([1, 0], dtype=torch.int32, device=DEVICE)
    torch.library.opcheck(_paged_scatter_op, (src, kv.k_pages.nan_to_num(), kv.block_table, start))


def test_gather_and_scatter_compile():
    kv = random_paged_kv([20, 9], page_tokens=16, num_kv_heads=1, head_dim=16, dtype=torch.float16,
                         device=DEVICE, generator=torch.Generator().manual_seed(8))  # fmt: skip
    src = torch.randn((2, 4, 1, 16), dtype=torch.float16, device=DEVICE)

    def step(src, pages, block_table, seq_lens):
        paged_scatter(src, pages, block_table, 5)
        return paged_gather(pages, block_table, seq_lens)

    pages = kv.k_pages.clone()
    expected = step(src, kv.k_pages.clone(), kv.block_table, kv.seq_lens)
    out = torch.compile(step, backend="aot_eager", fullgraph=True)(src, pages, kv.block_table, kv.seq_lens)
    assert_same(out, expected, "compiled gather")
    assert_same(pages, scatter_reference(src, kv.k_pages, kv.block_table, 5), "compiled scatter")


def test_bad_arguments_name_the_argument():
    kv = random_paged_kv([20], page_tokens=16, num_kv_heads=1, head_dim=16, dtype=torch.float16, device=DEVICE)
    with pytest.raises(TypeError, match="block_table.*int64"):
        paged_gather(kv.k_pages, kv.block_table.long(), kv.seq_lens)
    with pytest.raises(TypeError, match="seq_lens"):
        paged_gather(kv.k_pages, kv.block_table, kv.seq_lens.float())
    with pytest.raises(ValueError, match="pages must have 4 dimensions"):
        paged_gather(kv.k_pages[0], kv.block_table, kv.seq_lens)
    with pytest.raises(ValueError, match="head_dim must be one of .* got 24"):
        paged_gather(torch.zeros((2, 16, 1, 24), dtype=torch.float16, device=DEVICE), kv.block_table, kv.seq_lens)
    with pytest.raises(TypeError, match="pages must have dtype"):
        paged_gather(kv.k_pages.to(torch.int8), kv.block_table, kv.seq_lens)
    with pytest.raises(ValueError, match="max_len .* -1"):
        paged_gather(kv.k_pages, kv.block_table, kv.seq_lens, max_len=-1)
    with pytest.raises(ValueError, match="seq_lens must have 1 entries"):
        paged_gather(kv.k_pages, kv.block_table, kv.seq_lens.repeat(2))
    src = torch.zeros((1, 2, 1, 16), dtype=torch.float16, device=DEVICE)
    with pytest.raises(TypeError, match="src must have dtype"):
        paged_scatter(src.float(), kv.k_pages, kv.block_table, 0)
    with pytest.raises(ValueError, match="start_pos must be >= 0, got -3"):
        paged_scatter(src, kv.k_pages, kv.block_table, -3)
    with pytest.raises(ValueError, match="src .* does not match"):
        paged_scatter(torch.zeros((1, 2, 2, 16), dtype=torch.float16, device=DEVICE), kv.k_pages, kv.block_table, 0)
    with pytest.raises(TypeError, match="start_pos"):
        paged_scatter(src, kv.k_pages, kv.block_table, 1.5)




@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("page_tokens", [16, 256])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_gather_scatter(dtype, page_tokens):
    gen = torch.Generator().manual_seed(9)
    kv = random_paged_kv([5000, 300, 777, 4096], page_tokens=page_tokens, num_kv_heads=8, head_dim=128,
                         dtype=dtype, device="cuda", generator=gen)  # fmt: skip
    out = paged_gather(kv.k_pages, kv.block_table, kv.seq_lens)
    assert_same(out, gather_reference(kv.k_pages, kv.block_table, kv.seq_lens), f"gpu gather {dtype}")
    src = torch.randn((4, 300, 8, 128), generator=gen).to(device="cuda", dtype=dtype)
    start = torch.tensor([4700, 0, 400, 3000], dtype=torch.int32, device="cuda")
    expected = scatter_reference(src, kv.k_pages, kv.block_table, start)
    paged_scatter(src, kv.k_pages, kv.block_table, start)
    assert_same(kv.k_pages, expected, f"gpu scatter {dtype}")


def test_scatter_refuses_a_src_that_shares_memory_with_the_pages():
    """A src that is a view of the pool itself would be read after earlier programs overwrote it (on
    a GPU, a race): refused with torch's in-place words, as index_put_ refuses it. Views of the pool
    that share no memory with what is written, or are too strided for torch to tell, still run."""
    pool = torch.arange(2 * 32 * 1 * 16, dtype=torch.float32, device=DEVICE).view(2, 32, 1, 16)
    table = torch.tensor([[0]], dtype=torch.int32, device=DEVICE)
    before = pool.clone()
    with pytest.raises(RuntimeError, match="src and pages refer to a single memory location.*clone"):
        paged_scatter(pool[:1, :31], pool, table, 1)
    assert torch.equal(pool, before), "a refused scatter wrote"
    with pytest.raises(RuntimeError, match="refer to a single memory location"):
        torch.ops.pagedllm.paged_scatter(pool[:1, :31], pool, table, torch.ones(1, dtype=torch.int32, device=DEVICE))
    disjoint = pool[1:2, :4]  # page 1's tokens into page 0 of a view of page 0 alone: no shared memory
    expected = scatter_reference(disjoint.clone(), pool[:1].clone(), table, 3)
    target = pool[:1]
    paged_scatter(disjoint, target, table, 3)
    assert_same(target, expected, "scatter from a disjoint view of the pool")


def test_gather_and_scatter_take_numpy_integers():
    np = pytest.importorskip("numpy")
    kv = random_paged_kv([20], page_tokens=16, num_kv_heads=1, head_dim=16, dtype=torch.float16, device=DEVICE)
    assert_same(paged_gather(kv.k_pages, kv.block_table, kv.seq_lens, max_len=np.int64(3)),
                paged_gather(kv.k_pages, kv.block_table, kv.seq_lens, max_len=3), "max_len=np.int64(3)")  # fmt: skip
    with pytest.raises(ValueError, match=r"max_len must be a non-negative int or None, got np.int64\(-1\)"):
        paged_gather(kv.k_pages, kv.block_table, kv.seq_lens, max_len=np.int64(-1))
    for wrong in (3.0, "3", True):  # a wrong type is a TypeError, as torch's (and the other arguments') are
        with pytest.raises(TypeError, match=f"max_len must be a non-negative int or None, got {type(wrong).__name__} {wrong!r}"):
            paged_gather(kv.k_pages, kv.block_table, kv.seq_lens, max_len=wrong)
    with pytest.raises(TypeError, match="start_pos must be an int or an int32 tensor, got float"):
        paged_scatter(kv.k_pages[:1, :2], kv.k_pages.clone(), kv.block_table, 1.5)


def test_gather_and_scatter_under_torch_func_transforms():
    """The public functions under vmap / functionalize go through their custom ops (the kernel
    launched on functorch's wrapped tensors crashed reading their storage)."""
    gen = torch.Generator().manual_seed(12)
    kv = random_paged_kv([20, 7], page_tokens=16, num_kv_heads=1, head_dim=16, dtype=torch.float32,
                         device=DEVICE, generator=gen)  # fmt: skip
    pools = torch.stack([kv.k_pages, kv.v_pages])
    out = torch.func.vmap(lambda pages: paged_gather(pages, kv.block_table, kv.seq_lens))(pools)
    for i in range(2):
        assert_same(out[i], gather_reference(pools[i], kv.block_table, kv.seq_lens), f"vmap gather item {i}")
    gathered = torch.func.functionalize(lambda pages: paged_gather(pages, kv.block_table, kv.seq_lens))(kv.k_pages)
    assert_same(gathered, gather_reference(kv.k_pages, kv.block_table, kv.seq_lens), "functionalized gather")
    src = torch.randn((2, 3, 1, 16), generator=gen).to(DEVICE)

    def write(pages):
        paged_scatter(src, pages, kv.block_table, 2)
        return pages

    # torch functionalizes no custom op that mutates an argument: its words, naming the op
    with pytest.raises(RuntimeError, match="pagedllm::paged_scatter"):
        torch.func.functionalize(write)(kv.k_pages.clone())


def test_scatter_under_vmap_writes_each_item_into_its_pool():
    """vmap of a scatter over pools (and over their new tokens, or the same tokens into each pool)
    writes each item as a loop of calls does; one pool under batched tokens is refused with torch's
    in-place vmap words. It raised naming an internal aten op (the overlap check on vmap's wrapped
    tensors), then torch's 'Batching rule not implemented for pagedllm::paged_scatter'."""
    gen = torch.Generator().manual_seed(13)
    pools = torch.randn((3, 4, 16, 1, 16), generator=gen).to(DEVICE)
    table = torch.tensor([[2, 0], [1, 3]], dtype=torch.int32, device=DEVICE)
    start = torch.tensor([14, 0], dtype=torch.int32, device=DEVICE)
    srcs = torch.randn((3, 2, 5, 1, 16), generator=gen).to(DEVICE)

    def write(pages, src):
        paged_scatter(src, pages, table, start)
        return pages

    for in_dims in ((0, 0), (0, None)):
        written = pools.clone()
        out = torch.func.vmap(write, in_dims=in_dims)(written, srcs if in_dims[1] == 0 else srcs[0])
        for i in range(3):
            expected = pools[i].clone()
            paged_scatter(srcs[i] if in_dims[1] == 0 else srcs[0], expected, table, start)
            assert_same(written[i], expected, f"vmap scatter in_dims {in_dims} item {i}")
            assert_same(out[i], expected, f"vmap scatter in_dims {in_dims} result {i}")
    one_pool = pools[0].clone()
    with pytest.raises(RuntimeError, match="vmap.*paged_scatter.*pages"):
        torch.func.vmap(write, in_dims=(None, 0))(one_pool, srcs)
    assert torch.equal(one_pool, pools[0]), "a refused scatter wrote"


def test_scatter_refuses_pages_whose_elements_share_memory():
    """A pool whose elements share memory (heads expanded from one) would have one head's keys
    overwrite the other's (on a GPU, a race): refused with torch's in-place words, as copy_ into it
    is, nothing written."""
    pool = torch.zeros(4, 16, 1, 16, dtype=torch.float32, device=DEVICE)
    expanded = pool.expand(4, 16, 2, 16)
    table = torch.tensor([[0, 1]], dtype=torch.int32, device=DEVICE)
    src = torch.randn(1, 3, 2, 16, device=DEVICE)
    with pytest.raises(RuntimeError, match=r"more than one element of pages refers to a single memory location.*clone"):
        paged_scatter(src, expanded, table, 0)
    assert not pool.any(), "a refused scatter wrote"


def test_kernels_on_a_paged_pool_past_the_device_tier_raise_the_tier_error():
    """A PagedTensor pool larger than the device tier: paged_gather and paged_decode_attention raise
    the pager's DeviceTierFullError naming the op, as paged_scatter does (the interpreter's "invalid
    python storage" came through, and on a GPU PagedTensor.data_ptr's error would have); a pool that
    fits gives the plain pool's results."""
    from pagedtensor import DeviceTierFullError, MemoryConfig, PagedTensor, Pager
    from pagedtensor.triton_kernels import paged_decode_attention

    page = 4096
    config = MemoryConfig(page_size=page, vram_limit=8 * page, host_memory=256 * page, slab_size=256 * page, prefetch_strategy="none",
                          device=DEVICE)  # fmt: skip
    generator = torch.Generator().manual_seed(4)
    k, v = (torch.randn(16, 16, 2, 32, generator=generator).to(DEVICE) for _ in range(2))  # 16 pages each
    table = torch.tensor([[3, 15, 7]], dtype=torch.int32, device=DEVICE)
    lengths = torch.tensor([40], dtype=torch.int32, device=DEVICE)
    q = torch.randn(1, 4, 32, generator=generator).to(DEVICE)
    with Pager(config) as pager:
        paged_k, paged_v = PagedTensor.wrap(k, pager), PagedTensor.wrap(v, pager)
        with pytest.raises(DeviceTierFullError, match="paged_gather"):
            paged_gather(paged_k, table, lengths)
        with pytest.raises(DeviceTierFullError, match="paged_decode_attention"):
            paged_decode_attention(q, paged_k, paged_v, table, lengths)
        small = PagedTensor.wrap(k[:4].clone(), pager)  # 4 pages: fits
        small_table = torch.tensor([[3, 0, 2]], dtype=torch.int32, device=DEVICE)
        assert_same(paged_gather(small, small_table, lengths), paged_gather(k[:4].clone(), small_table, lengths), "gather of a pool that fits")
