"""``nn.EmbeddingBag`` / ``F.embedding_bag`` (``_embedding_bag``) of a paged weight larger than the
device tier (``embedding_bag_of_rows`` in ``pagedtensor/handlers/row_gathers.py``): only the pages
of the rows its indices name fault in; every result (output, ``offset2bag``, ``bag_size``,
``"max"``'s rows of the maxima) and the gradients (of the weight and of ``per_sample_weights``,
whose backward reads the named rows too) are the dense op's, bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagedtensor import PagedTensor
from tests.support import CPU_AND_CUDA
from tests.test_row_scatter import PAGE, make_pager, same_bits

DEVICE_PAGES = 8  # make_pager's
MODES = ("sum", "mean", "max")


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
    transposed=st.booleans(),
    mode=st.sampled_from(MODES),
    index_dtype=st.sampled_from([torch.int64, torch.int32]),
    include_last_offset=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_embedding_bag_past_the_tier_equals_dense(data, dtype, transposed, mode, index_dtype, include_last_offset, seed):
    """Random weights larger than the device tier, of either layout, indices with repeats, empty bags,
    a padding row (named by some indices or by none), per-sample weights in ``"sum"``: the four
    results of ``_embedding_bag`` equal the dense op's bit for bit, and the device tier's budget
    holds. (A transposed bf16 weight gave sums up to 2 ulp apart: torch's kernel accumulates
    otherwise for a weight whose rows are not contiguous, and the compact rows were.)"""
    cols = data.draw(st.sampled_from([8, 64, 300]), label="cols")
    rows = 2 * DEVICE_PAGES * PAGE // (cols * dtype.itemsize) + data.draw(st.integers(1, 40), label="extra rows")
    count = data.draw(st.integers(0, 24), label="indices")
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, rows, (count,), generator=generator).to(index_dtype)
    cuts = sorted(data.draw(st.lists(st.integers(0, count), min_size=1, max_size=6), label="bag starts"))
    offsets = torch.tensor([0, *cuts[1:]] + ([count] if include_last_offset else []), dtype=index_dtype)
    padding = data.draw(st.sampled_from([-1, int(indices[0]) if count else -1, rows - 1]), label="padding row")
    weights = torch.rand(count, generator=generator).to(dtype) if mode == "sum" and data.draw(st.booleans(), label="per sample") else None
    stored = (torch.randn(*((cols, rows) if transposed else (rows, cols)), generator=generator) * 3).to(dtype)
    weight = stored.t() if transposed else stored
    call = lambda w: torch.ops.aten._embedding_bag.default(w, indices, offsets, False, MODES.index(mode), False, weights,
                                                           include_last_offset, padding)  # fmt: skip
    with make_pager() as pager:
        paged = PagedTensor.wrap(stored.clone(), pager)
        paged = paged.t() if transposed else paged
        for got, expected in zip(call(paged), call(weight)):
            assert type(got) is torch.Tensor and same_bits(got, expected)
        assert pager.stats()["resident_bytes"]["device"] <= DEVICE_PAGES * PAGE
        assert same_bits(paged.materialize(), weight)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("mode", MODES)
def test_an_embedding_bag_faults_in_only_the_pages_of_its_rows_and_trains_as_dense(device, mode):
    """A 256 x 64 float weight (16 pages, the device tier 8), bags of rows 3, 130, 250 (one
    repeated): pages 0, 8 and 15 fault in (a weight past the tier raised), the output and, in
    training, the gradient equal the dense module's."""
    torch.manual_seed(0)
    dense = torch.nn.EmbeddingBag(256, 64, mode=mode, device=device)
    paged = copy.deepcopy(dense)
    with make_pager(device=device) as pager:
        paged.weight = torch.nn.Parameter(PagedTensor.wrap(dense.weight.detach().clone(), pager))
        bags = torch.tensor([[3, 130, 3], [250, 130, 250]], device=device)
        pager.evict_all()
        before = pager.stats()["faults"]
        got, expected = paged(bags), dense(bags)
        assert torch.equal(got, expected)
        assert pager.stats()["faults"] - before == 3
        assert {info.index for info in pager.page_table(paged.weight.allocation) if info.tier == "device"} == {0, 8, 15}
        got.square().sum().backward()
        expected.square().sum().backward()
        assert torch.equal(paged.weight.grad, dense.weight.grad)
        with torch.no_grad():  # _embedding_bag_forward_only
            assert torch.equal(paged(bags.flip(1)), dense(bags.flip(1)))


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("padding_idx", [None, 130, 7])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int16, torch.uint8], ids=str)
def test_per_sample_weights_train_past_the_tier_as_dense(device, padding_idx, index_dtype):
    """``nn.EmbeddingBag(mode="sum")`` with ``per_sample_weights`` that require grad, on a weight of
    16 pages (the device tier 8): the backward's ``_embedding_bag_per_sample_weights_backward``
    reads only the rows the indices name (it raised DeviceTierFullError), and both gradients are
    the dense module's bit for bit, with a padding row named by an index or by none, and indices
    of a dtype torch's kernel promotes with the offsets' (int16, uint8: past the tier they raised
    DeviceTierFullError)."""
    torch.manual_seed(0)
    dense = torch.nn.EmbeddingBag(256, 64, mode="sum", padding_idx=padding_idx, device=device)
    paged = copy.deepcopy(dense)
    indices = torch.tensor([3, 130, 3, 250, 130, 17, 255], device=device).to(index_dtype)
    offsets = torch.tensor([0, 3, 3, 5], device=device)
    sample_weights = torch.rand(7, device=device)
    with make_pager(device=device) as pager:
        paged.weight = torch.nn.Parameter(PagedTensor.wrap(dense.weight.detach().clone(), pager))
        pager.evict_all()
        results = []
        for module in (dense, paged):
            weights = sample_weights.clone().requires_grad_()
            out = module(indices, offsets, per_sample_weights=weights)
            (out * torch.arange(64.0, device=device)).sum().backward()
            results.append((out, weights.grad, module.weight.grad))
        for got, expected in zip(results[1], results[0]):
            assert type(got) is torch.Tensor and same_bits(got, expected)
        assert pager.stats()["resident_bytes"]["device"] <= DEVICE_PAGES * PAGE


def test_an_index_out_of_range_raises_before_any_page_faults_in():
    """With torch's words for the bag's mode (sum and mean name the index's position and the range;
    it gave every mode max's words)."""
    weight = torch.randn(256, 64)
    with make_pager() as pager:
        paged = PagedTensor.wrap(weight.clone(), pager)
        pager.evict_all()
        before = pager.stats()["faults"]
        for mode in ("sum", "mean", "max"):
            for bad in (256, -1):
                with pytest.raises(RuntimeError) as dense:
                    F.embedding_bag(torch.tensor([1, bad]), weight, torch.tensor([0]), mode=mode)
                with pytest.raises(RuntimeError) as got:
                    F.embedding_bag(torch.tensor([1, bad]), paged, torch.tensor([0]), mode=mode)
                assert str(got.value).endswith(str(dense.value)), (mode, bad)
        assert pager.stats()["faults"] == before


@pytest.mark.parametrize("index_dtype", [torch.int16, torch.int8, torch.uint8, torch.bool, torch.uint16, torch.float32], ids=str)
@pytest.mark.parametrize("offsets_dtype", [torch.int64, torch.int32, "the indices'"], ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("transposed", [False, True])
def test_an_embedding_bag_past_the_tier_takes_the_index_dtypes_torch_takes(index_dtype, offsets_dtype, mode, transposed):
    """torch's CPU kernel promotes the indices and offsets to their common dtype and takes it where it
    is int64 or int32: int16, int8, uint8 or bool indices with int64 or int32 offsets. Past the tier
    such indices raised DeviceTierFullError (a weight that fits ran them); now the dense op's four
    results bit for bit (``per_sample_weights`` in ``"sum"``, a padding row), only the pages of the
    named rows faulting in. Indices and offsets torch refuses (int16 with int16, uint16, float) raise
    torch's error."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 256, generator=generator)  # 16 pages, the device tier 8
    stored = weight.t().contiguous() if transposed else weight
    indices = torch.tensor([1, 5, 7, 1, 0, 63, 5, 1]).to(index_dtype)
    offsets = torch.tensor([0, 2, 2, 5]).to(index_dtype if offsets_dtype == "the indices'" else offsets_dtype)
    weights = torch.rand(8, generator=generator) if mode == "sum" else None
    call = lambda w: torch.ops.aten._embedding_bag.default(w, indices, offsets, False, MODES.index(mode), False, weights, False, 5)
    with make_pager() as pager:
        paged = PagedTensor.wrap(stored.clone(), pager)
        paged = paged.t() if transposed else paged
        try:
            expected, expected_error = call(weight), None
        except RuntimeError as error:
            expected, expected_error = None, error
        pager.evict_all()
        before = pager.stats()["faults"]
        if expected_error is not None:
            with pytest.raises(RuntimeError) as got_error:
                call(paged)
            assert str(expected_error).splitlines()[0] in str(got_error.value)
            assert pager.stats()["faults"] == before
            return
        for got, want in zip(call(paged), expected):
            assert type(got) is torch.Tensor and same_bits(got, want)
        assert pager.stats()["resident_bytes"]["device"] <= DEVICE_PAGES * PAGE
