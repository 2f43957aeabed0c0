"""Ops whose dense kernel is composite (``rot90``, ``slice_scatter``, ``select_scatter``,
``diagonal_scatter``, ``as_strided_scatter``, ``constant_pad_nd``) on PagedTensors larger than the
device tier: ``_run_composite`` in ``pagedtensor/dispatch.py`` runs that kernel on the PagedTensors,
each op in it paged, so the result has the dense op's bits and layout; an op in it that does not fit
either leaves the op's own error. The four scatters, whose kernels clone the whole storage, run on the
allocation materialized (``strided_scatter_over_the_allocation`` in ``pagedtensor/handlers/views.py``)."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagedtensor import DeviceTierFullError, PagedTensor
from pagedtensor.dispatch import _composite_kernel
from tests.support import CPU_AND_CUDA
from tests.test_row_scatter import (
    PAGE,
    assert_plain_result_equals_dense,
    assert_raises_as_dense,
    make_pager,
    permuted_table,
    random_values,
    rows_tensor,
    same_bits,
)

aten = torch.ops.aten


def composite_call(op: str, shape: tuple[int, ...], dtype: torch.dtype, data, generator: torch.Generator, device: str = "cpu"):
    """The op ``op`` on a table of ``shape`` as a function of the table, its arguments drawn."""
    rank = len(shape)
    if op == "rot90":
        k = data.draw(st.integers(-2, 5), label="k")
        dims = data.draw(st.permutations(range(rank)), label="plane")[:2]
        return lambda t: torch.rot90(t, k, dims)
    dim = data.draw(st.integers(0, rank - 1), label="dim")
    if op == "slice_scatter":
        start = data.draw(st.integers(0, shape[dim] - 1), label="start")
        step = data.draw(st.integers(1, 3), label="step")
        size = len(range(start, shape[dim], step))
        src_shape = tuple(size if d == dim else s for d, s in enumerate(shape))
        src = random_values(src_shape, dtype, generator).to(device)
        return lambda t: torch.slice_scatter(t, src, dim, start, None, step)
    if op == "select_scatter":
        index = data.draw(st.integers(-shape[dim], shape[dim] - 1), label="index")
        src = random_values(tuple(s for d, s in enumerate(shape) if d != dim), dtype, generator).to(device)
        return lambda t: torch.select_scatter(t, src, dim, index)
    if op == "diagonal_scatter":
        offset = data.draw(st.integers(-3, 3), label="offset")
        dims = data.draw(st.permutations(range(rank)), label="plane")[:2]
        diagonal = torch.diagonal(torch.empty(shape, device="meta"), offset, *dims).shape
        src = random_values(tuple(diagonal), dtype, generator).to(device)
        return lambda t: torch.diagonal_scatter(t, src, offset, *dims)
    if op == "as_strided_scatter":  # the first row of dim 0's elements, as a contiguous table's would be
        src = random_values(shape[1:], dtype, generator).to(device)
        strides = [1] * (rank - 1)
        for d in range(rank - 3, -1, -1):
            strides[d] = strides[d + 1] * shape[d + 2]
        return lambda t: torch.as_strided_scatter(t, src, shape[1:], strides)
    pad = []
    for pair in range(data.draw(st.integers(1, rank), label="dims padded")):  # the last dim first, each side cutting less than half
        cut = min(2, (shape[rank - 1 - pair] - 1) // 2)
        pad += [data.draw(st.integers(-cut, 3), label="pad") for _ in range(2)]
    return lambda t: torch.nn.functional.pad(t, pad, value=-1.5)


OPS = ["rot90", "slice_scatter", "select_scatter", "diagonal_scatter", "as_strided_scatter", "constant_pad_nd"]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    op=st.sampled_from(OPS),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.int64, torch.bool]),
    three_dims=st.booleans(),
    permuted=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_composite_ops_past_the_tier_equal_dense(data, op, dtype, three_dims, permuted, seed):
    """Each op on a random table (rows, or transposed or permuted) of 2 to 6 times the device tier
    (they raised DeviceTierFullError): a plain tensor with the dense op's bits, shape and strides;
    the table keeps its bytes; the device tier's budget holds."""
    memory_shape, order, _ = permuted_table(data, dtype, three_dims)
    if not permuted:
        order = list(range(len(memory_shape)))
    generator = torch.Generator().manual_seed(seed)
    base = random_values(memory_shape, dtype, generator)
    assert_plain_result_equals_dense(base, order, composite_call(op, tuple(memory_shape[d] for d in order), dtype, data, generator))


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_composite_ops_of_a_transposed_table_past_the_tier_equal_dense(device):
    """On the transposed 256 x 64 view of a 16-page table (the tier 8): the dense op's bits and layout."""
    src = torch.arange(256 * 64, dtype=torch.float32, device=device).view(256, 64) / 7
    calls = [
        lambda t: torch.rot90(t),
        lambda t: torch.rot90(t, -1, [1, 0]),
        lambda t: torch.rot90(t, 2),
        lambda t: torch.slice_scatter(t, src[:, 10:20], 1, 10, 20),
        lambda t: torch.select_scatter(t, src[3], 0, -2),
        lambda t: torch.diagonal_scatter(t, src[0], 0),
        lambda t: torch.as_strided_scatter(t, src[0, :8], (8,), (1,)),
        lambda t: torch.nn.functional.pad(t, (1, -2, 3, 0), value=float("nan")),
    ]
    with make_pager(device=device) as pager:
        table = PagedTensor.wrap(rows_tensor().to(device), pager).t()
        for call in calls:
            expected = call(rows_tensor().to(device).t())
            result = call(table)
            assert result.stride() == expected.stride()
            assert same_bits(result, expected)
        assert same_bits(table.t().materialize(), rows_tensor().to(device))
        assert pager.stats()["resident_bytes"]["device"] <= 8 * PAGE


BAD_CALLS = {  # on a 64 x 256 table (rows_tensor): torch's own errors from the composite kernel
    "rot90 in a plane of one dim": lambda t: torch.rot90(t, 1, [0, 0]),
    "rot90 of one dim": lambda t: torch.rot90(t, 1, [0]),
    "slice_scatter of another size": lambda t: torch.slice_scatter(t, torch.ones(64, 3), 1, 0, 2),
    "select_scatter of another size": lambda t: torch.select_scatter(t, torch.ones(4), 0, 1),
    "diagonal_scatter of another size": lambda t: torch.diagonal_scatter(t, torch.ones(2)),
}


@pytest.mark.parametrize("name", sorted(BAD_CALLS))
def test_bad_composite_ops_raise_torchs_error(name):
    """torch's own error from the composite kernel, the table unchanged (the generic way's attempt
    faulted pages in first, and slice_scatter's kernel copies the table before its check)."""
    assert_raises_as_dense(BAD_CALLS[name], before_any_fault=False)


def test_a_composite_whose_ops_do_not_fit_raises_the_ops_own_error():
    """``logsumexp``'s composite kernel runs ``logsumexp.out`` on the table, which does not fit
    either, and ``convolution``'s calls a backend that reads the table's memory itself (it raised
    "data is not allocated"): the error of the op itself, as before."""
    with make_pager() as pager:
        table = PagedTensor.wrap(rows_tensor(), pager)
        with pytest.raises(DeviceTierFullError, match=re.escape("aten.logsumexp.default: its PagedTensor arguments")):
            torch.logsumexp(table, 1)
        with pytest.raises(DeviceTierFullError, match=re.escape("aten.convolution.default: its PagedTensor arguments")):
            torch.nn.functional.conv1d(table[None], torch.ones(2, 32, 3), torch.ones(2), groups=2)  # grouped: a backend reads memory


def test_only_functional_ops_whose_dense_kernel_is_composite_take_it():
    """Ops with a kernel of the device's backend (``mean.dim``, ``_softmax``: their dense op does not
    run the composite), in-place ops and composite-only ones, on the CPU."""
    cpu = torch.device("cpu")
    assert _composite_kernel(aten.rot90.default, cpu) == torch._C.DispatchKey.CompositeExplicitAutograd
    assert _composite_kernel(aten.slice_scatter.default, cpu) == torch._C.DispatchKey.CompositeExplicitAutogradNonFunctional
    for func in (aten.mean.dim, aten._softmax.default, aten.add_.Tensor, aten.index_select.default):
        assert _composite_kernel(func, cpu) is None, func
    assert _composite_kernel(aten.rot90.default, torch.device("meta")) is None


@pytest.mark.parametrize("mode", ["linear", "bilinear", "bicubic", "lstm"])
def test_an_op_decomposed_under_inference_mode_gives_the_dense_ops_bits_or_refuses(mode):
    """Past the tier under ``torch.inference_mode()`` an op autograd would decompose is decomposed by
    the pager. It took torch._decomp's Python decomposition where one is registered
    (``upsample_bilinear2d.vec``, ``lstm.input``), not the C++ kernel a dense tensor runs: other bits
    (4e-7 off), other dropout masks (0.035 off), where outside inference mode the op refuses.
    It now runs the C++ kernel: the dense op's bits, or the same refusal as outside inference mode."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    if mode == "lstm":
        x = torch.randn(6, 4, 16)
        lstm = torch.nn.LSTM(16, 32, num_layers=3, dropout=0.5).train()
        weights = [p.detach().clone() for p in lstm.parameters()]

        def run(tensors):
            torch.manual_seed(1)
            return torch._VF.lstm(x, (torch.zeros(3, 4, 32), torch.zeros(3, 4, 32)), tensors, True, 3, 0.5, True, False, False)[0]
    else:
        x = torch.randn(8, 4, 16, 16) if mode != "linear" else torch.randn(64, 16, 64)
        weights = [x]

        def run(tensors):
            return F.interpolate(tensors[0], scale_factor=2, mode=mode)

    with make_pager(device_pages=6) as pager:
        paged = [PagedTensor.wrap(w.clone(), pager) for w in weights]
        outcomes = []
        for context in (torch.no_grad, torch.inference_mode):
            with context():
                expected = run(weights)
                try:
                    got = run(paged)
                except DeviceTierFullError:
                    outcomes.append("refused")
                else:
                    outcomes.append("ran")
                    assert same_bits(got.materialize() if isinstance(got, PagedTensor) else got, expected), context
        assert outcomes[0] == outcomes[1], outcomes
