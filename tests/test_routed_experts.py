"""``torch._grouped_mm`` over a paged stack of expert matrices (a mixture-of-experts layer) faults in
only the experts that have rows, and gives the dense op's bits. CPU pagers with 4 KiB pages; the
``cuda`` cases run the same on the GPU (torch's CUTLASS grouped GEMM for bf16)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagedtensor import MemoryConfig, PagedTensor, Pager
from tests.support import CPU_AND_CUDA

PAGE = 4096


def make_pager(device_pages: int, device: str = "cpu") -> Pager:
    return Pager(MemoryConfig(
        page_size=PAGE, vram_limit=device_pages * PAGE, host_memory=512 * PAGE, slab_size=512 * PAGE,
        prefetch_strategy="none", device=device,
    ))  # fmt: skip


def routed_rows(counts: list[int]) -> torch.Tensor:
    """``offs`` of ``_grouped_mm``: each expert's row end (int32)."""
    return torch.tensor(counts, dtype=torch.int32).cumsum(0, dtype=torch.int32)


def grouped(a: torch.Tensor, stack: torch.Tensor, offs: torch.Tensor, transposed: bool) -> torch.Tensor:
    """What transformers' experts run: ``stack`` holds ``[experts, out, in]`` and is read transposed."""
    return torch._grouped_mm(a, stack.transpose(-2, -1) if transposed else stack, offs=offs)


def expert_pages(stack: torch.Tensor, experts: list[int]) -> set[int]:
    """Pages of the allocation holding ``experts``' bytes (a contiguous stack)."""
    size = stack[0].numel() * stack.element_size()
    return {page for e in experts for page in range(e * size // PAGE, -(-(e + 1) * size // PAGE))}


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transposed", [True, False])
def test_only_the_experts_with_rows_fault_in(device, dtype, transposed):
    # Six experts of 32 x 32 fp32 elements (or 32 x 64 bf16): one page each.
    inner = 32 if dtype == torch.float32 else 64
    stack = torch.randn(6, 32, inner, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    counts = [3, 0, 0, 6, 0, 3]
    a = torch.randn(sum(counts), inner if transposed else 32, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    offs = routed_rows(counts).to(device)
    with make_pager(4, device) as pager:  # the stack (6 pages) does not fit: the three routed ones do
        paged = PagedTensor.wrap(stack, pager)
        pager.evict_all()
        before = pager.stats()
        got = grouped(a, paged, offs, transposed)
        assert pager.stats()["faults"] - before["faults"] == 3
        assert {info.index for info in pager.page_table(paged.allocation) if info.tier == "device"} == {0, 3, 5}
        assert torch.equal(got, grouped(a, stack, offs, transposed))


@pytest.mark.gpu
@pytest.mark.parametrize("counts", [[200, 0, 0, 200, 0, 200, 0, 0], [700, 1, 0, 0, 0, 0, 0, 399], [40] * 8])
def test_the_gpu_kernel_sees_the_dense_ops_shapes(counts):
    """torch's CUTLASS grouped GEMM takes its tile from the rows per group (rows / experts): 600 rows
    over 8 experts is 75 a group, over the 3 routed ones 200, another tile. Each expert's op keeps
    the dense op's shapes, so the bits stay the dense op's."""
    generator = torch.Generator().manual_seed(7)
    stack = torch.randn(8, 256, 128, generator=generator).to("cuda", torch.bfloat16)
    a = torch.randn(sum(counts) + 5, 128, generator=generator).to("cuda", torch.bfloat16)
    offs = routed_rows(counts).cuda()
    end = sum(counts)
    with make_pager(64, "cuda") as pager:
        got = grouped(a, PagedTensor.wrap(stack, pager), offs, True)
        assert torch.equal(got[:end], grouped(a, stack, offs, True)[:end])


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_a_stack_every_expert_reads_runs_even_when_it_does_not_fit(device):
    stack = torch.randn(6, 32, 32, generator=torch.Generator().manual_seed(2)).to(device)  # a page each
    a = torch.randn(12, 32, generator=torch.Generator().manual_seed(3)).to(device)
    offs = routed_rows([2] * 6).to(device)
    with make_pager(6, device) as roomy, make_pager(2, device) as tight:
        for pager in (roomy, tight):
            assert torch.equal(grouped(a, PagedTensor.wrap(stack, pager), offs, True), grouped(a, stack, offs, True))


def test_no_rows_at_all_faults_nothing():
    stack = torch.randn(4, 64, 32)
    a = torch.randn(3, 32)
    with make_pager(2) as pager:
        paged = PagedTensor.wrap(stack, pager)
        pager.evict_all()
        before = pager.stats()
        out = grouped(a, paged, torch.zeros(4, dtype=torch.int32), True)
        assert out.shape == (3, 64) and out.dtype == torch.float32
        assert pager.stats()["faults"] == before["faults"]


def test_other_forms_of_the_op_run_the_generic_way():
    # A 3-D mat_a (a batched matmul, no offs) reads every expert; the result is still the dense one.
    stack = torch.randn(3, 16, 8)
    a = torch.randn(3, 5, 16)
    with make_pager(8) as pager:
        assert torch.equal(torch._grouped_mm(a, PagedTensor.wrap(stack, pager)), torch._grouped_mm(a, stack))
        with pytest.raises(RuntimeError, match="Bias not supported"):  # torch's own error, the generic way
            torch._grouped_mm(torch.randn(4, 16), PagedTensor.wrap(stack, pager), offs=routed_rows([4, 0, 0]), bias=torch.zeros(3, 8))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    experts=st.integers(1, 7),
    rows=st.integers(1, 3).map(lambda k: 8 * k),  # the CPU kernel needs 16-byte strides
    cols=st.integers(1, 3).map(lambda k: 8 * k),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    transposed=st.booleans(),
    data=st.data(),
)
def test_grouped_mm_on_a_paged_stack_is_the_dense_op(experts, rows, cols, dtype, transposed, data):
    """Any routing (experts without rows, all of them, none) under budgets from one page up: the rows
    of every group bitwise the dense op's, and no page faults in that holds only unrouted experts."""
    counts = data.draw(st.lists(st.integers(0, 3), min_size=experts, max_size=experts), label="counts")
    trailing = data.draw(st.integers(0, 2), label="rows in no group")
    device_pages = data.draw(st.integers(1, 8), label="device pages")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    generator = torch.Generator().manual_seed(seed)
    stack = torch.randn(experts, cols, rows, generator=generator).to(dtype) * 4
    width = rows if transposed else cols
    wider = data.draw(st.sampled_from([0, 8]), label="mat_a a column slice of a wider matrix")  # a row stride past its width
    a = torch.randn(sum(counts) + trailing, width + wider, generator=generator).to(dtype)[:, :width]
    offs = routed_rows(counts)
    end = int(offs[-1])
    expected = grouped(a, stack, offs, transposed)[:end]
    routed = [e for e, count in enumerate(counts) if count]
    with make_pager(device_pages) as pager:
        paged = PagedTensor.wrap(stack, pager)
        pager.evict_all()
        read = record_reads(pager, paged)
        assert torch.equal(grouped(a, paged, offs, transposed)[:end], expected)
        if len(routed) < experts:
            assert read <= expert_pages(stack, routed), (read, routed)


def record_reads(pager: Pager, paged: PagedTensor) -> set[int]:
    """The pages of ``paged`` that the pager brings to the device or reads from here on (filled as
    ops run)."""
    pages: set[int] = set()
    allocation = paged.allocation
    ensure_resident, read = pager.ensure_resident, pager.read

    def recording_ensure_resident(target, first, stop, *args, **kwargs):
        if target is allocation:
            pages.update(range(first, stop))
        return ensure_resident(target, first, stop, *args, **kwargs)

    def recording_read(target, offset, nbytes, *args, **kwargs):
        if target is allocation:
            pages.update(range(offset // PAGE, -(-(offset + nbytes) // PAGE)))
        return read(target, offset, nbytes, *args, **kwargs)

    pager.ensure_resident, pager.read = recording_ensure_resident, recording_read
    return pages


def test_an_unaligned_mat_a_keeps_the_dense_ops_bits():
    # torch's CPU kernel takes another path for a mat_a not on a 16-byte boundary: an expert's rows
    # moved first are copied to a buffer at the same offset from a boundary.
    g = torch.Generator().manual_seed(0)
    stack = torch.randn(6, 32, 32, generator=g)
    a = torch.randn(12 * 32 + 1, generator=g)[1:].view(12, 32)
    assert a.data_ptr() % 16 == 4
    offs = routed_rows([2, 0, 3, 0, 4, 3])
    with make_pager(64) as pager:
        assert torch.equal(grouped(a, PagedTensor.wrap(stack, pager), offs, True), grouped(a, stack, offs, True))


@pytest.mark.parametrize("offs, error, mat_a, bias", [
    (torch.tensor([2, 4, 6, 8, 10, 12]), "int32", None, None),  # int64
    (routed_rows([2, 2, 2, 2, 4]), "batch sizes have to match", None, None),  # one per expert but one
    (routed_rows([2, 2, 2, 2, 2, 2]), "Bias not supported", None, torch.zeros(6, 32)),
    (routed_rows([2, 2, 2, 2, 2, 2]), "Invalid strides/sizes", torch.randn(1, 32).expand(12, 32), None),  # rows sharing memory
])  # fmt: skip
def test_arguments_torch_refuses_raise_its_error_before_any_page_is_read(offs, error, mat_a, bias):
    """Past the tier, a bias or an expanded ``mat_a`` took the generic way, which reads the whole
    stack first: DeviceTierFullError instead of torch's error."""
    stack = torch.randn(6, 32, 32)
    with make_pager(2) as pager:  # the stack (6 pages) cannot be resident at once
        paged = PagedTensor.wrap(stack, pager)
        pager.evict_all()
        before = pager.stats()["faults"]
        with pytest.raises(RuntimeError, match=error):
            torch._grouped_mm(torch.randn(12, 32) if mat_a is None else mat_a, paged.transpose(-2, -1), offs=offs, bias=bias)
        assert pager.stats()["faults"] == before


@pytest.mark.parametrize("offs", [[8, 4, 12], [4, 8, 20], [8, 4, 6], [20, 2, 5], [12, 0, 12]])
def test_offs_out_of_order_or_past_mat_a_past_the_tier_give_torchs_cpu_result(offs):
    """torch's CPU kernel takes ``offs`` out of order or past ``mat_a`` (each group a clamped slice of
    rows, written in order): past the tier so does the paged stack, the rows of some group the
    dense op's bits (it raised DeviceTierFullError)."""
    stack, a = torch.randn(3, 64, 128), torch.randn(12, 64)
    o = torch.tensor(offs, dtype=torch.int32)
    with make_pager(2) as pager:  # one expert is 8 pages
        got = torch._grouped_mm(a, PagedTensor.wrap(stack, pager), offs=o)
    expected = torch._grouped_mm(a, stack, offs=o)
    starts = [0, *offs[:-1]]
    covered = sorted({row for start, end in zip(starts, offs) for row in range(min(start, 12), min(max(end, start), 12))})
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert torch.equal(got[covered], expected[covered])
