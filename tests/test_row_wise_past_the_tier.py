"""``softmax`` / ``log_softmax`` over the last dim and ``layer_norm`` of PagedTensors larger than the
device tier (``run_by_rows`` in ``pagedtensor/handlers/row_wise.py``): a piece of rows at a time,
the dense op's bits and layout, torch's errors first; other forms raise the pager's error."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pagedtensor import OutOfPagesError, PagedTensor
from tests.support import CPU_AND_CUDA
from tests.test_row_scatter import PAGE, make_pager, rows_tensor, same_bits


def row_wise_call(op: str, shape: tuple[int, ...], dtype: torch.dtype, data, generator: torch.Generator, pager, device: str = "cpu"):
    """The op as a function of a table of ``shape``; ``layer_norm``'s trailing dims, weight and bias
    drawn (the weight paged or not)."""
    if op in ("softmax", "log_softmax"):
        dim = data.draw(st.sampled_from([-1, len(shape) - 1]), label="dim")
        return lambda t: getattr(torch, op)(t, dim)
    trailing = data.draw(st.integers(1, len(shape) - 1), label="normalized dims")
    normalized = shape[len(shape) - trailing :]
    weight = bias = None
    if data.draw(st.booleans(), label="weight"):
        weight = torch.randn(normalized, generator=generator).to(dtype).to(device)
        if data.draw(st.booleans(), label="paged weight"):
            weight = PagedTensor.wrap(weight, pager)
    if data.draw(st.booleans(), label="bias"):
        bias = torch.randn(normalized, generator=generator).to(dtype).to(device)
    eps = data.draw(st.sampled_from([1e-5, 1e-3]), label="eps")
    return lambda t: torch.native_layer_norm(t, normalized, weight, bias, eps)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    op=st.sampled_from(["softmax", "log_softmax", "layer_norm"]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
    three_dims=st.booleans(),
    view=st.sampled_from(["whole", "rows from the second", "columns from the third"]),
    seed=st.integers(0, 2**16),
)
def test_row_wise_ops_past_the_tier_equal_dense(data, op, dtype, three_dims, view, seed):
    """Each op on a random table of 2 to 6 times the device tier (they raised DeviceTierFullError),
    rows of 3 to 2,100 elements (a softmax's warp and block kernels on CUDA), the whole table or a
    view of it: the dense op's bits, dtypes and strides (``layer_norm``'s mean and rstd too); the
    table keeps its bytes; the device tier's budget holds."""
    last = data.draw(st.sampled_from([3, 17, 64, 300, 1024, 1500, 2100]), label="last dim")
    inner = (data.draw(st.integers(2, 5), label="middle"), last) if three_dims else (last,)
    row_bytes = dtype.itemsize * inner[0] * (inner[1] if three_dims else 1)
    assume(row_bytes <= 4 * PAGE)  # a row within a piece (a larger one raises: test_forms_not_run_by_rows_...)
    rows = data.draw(st.integers(2 * 8 * PAGE // row_bytes + 2, 6 * 8 * PAGE // row_bytes + 2), label="rows")
    generator = torch.Generator().manual_seed(seed)
    base = (torch.randn((rows, *inner), generator=generator) * 4).to(dtype)
    view_of = {"whole": lambda t: t, "rows from the second": lambda t: t[1:], "columns from the third": lambda t: t[..., 2:]}[view]
    with make_pager() as pager:
        call = row_wise_call(op, tuple(view_of(base).shape), dtype, data, generator, pager)
        expected = call(view_of(base.clone()))
        table = view_of(PagedTensor.wrap(base.clone(), pager))
        result = call(table)
        for got, want in zip(result if isinstance(result, tuple) else (result,), expected if isinstance(expected, tuple) else (expected,)):
            assert type(got) is torch.Tensor
            assert got.stride() == want.stride(), (op, got.shape)
            assert same_bits(got, want), op
        assert same_bits(table.materialize(), view_of(base))
        assert pager.stats()["resident_bytes"]["device"] <= 8 * PAGE


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_softmax_and_layer_norm_of_rows_past_the_tier_equal_dense(device, dtype):
    """Tables of 16 pages or more (the tier 8) with rows of 256, 2,048 and 4,096 elements (CUDA's
    warp softmax, its block softmax with and without shared memory) and 1,000 (not a multiple of a
    vector): ``softmax``, ``log_softmax``, ``F.layer_norm`` with a weight and bias, and on CUDA
    ``softmax`` of halves into floats: the dense op's bits."""
    generator = torch.Generator().manual_seed(2)
    for cols in (256, 1000, 2048, 4096):
        rows = 2 * 8 * PAGE // (cols * dtype.itemsize) + 3
        x = (torch.randn(rows, cols, generator=generator) * 4).to(dtype).to(device)
        weight = torch.randn(cols, generator=generator).to(dtype).to(device)
        bias = torch.randn(cols, generator=generator).to(dtype).to(device)
        calls = [lambda t: t.softmax(-1), lambda t: F.log_softmax(t, 1), lambda t: F.layer_norm(t, (cols,), weight, bias)]
        if device == "cuda" and dtype == torch.float16:
            calls.append(lambda t: torch.ops.aten._softmax(t, 1, True))
        with make_pager(device=device) as pager:
            table = PagedTensor.wrap(x.clone(), pager)
            for call in calls:
                expected, result = call(x), call(table)
                assert result.stride() == expected.stride()
                assert same_bits(result, expected), cols
            assert pager.stats()["resident_bytes"]["device"] <= 8 * PAGE


BAD_CALLS = {  # on a 64 x 256 table (rows_tensor): torch's checks
    "softmax along a dim out of range": lambda t: t.softmax(2),
    "layer_norm of another normalized shape": lambda t: F.layer_norm(t, (255,)),
    "layer_norm with a weight of another shape": lambda t: F.layer_norm(t, (256,), torch.ones(4)),
    "layer_norm with a bias of another dtype": lambda t: torch.native_layer_norm(t, [256], None, torch.ones(256, dtype=torch.float64), 1e-5),
}


@pytest.mark.parametrize("name", sorted(BAD_CALLS))
def test_bad_row_wise_ops_raise_torchs_error_before_any_page_moves(name):
    bad = BAD_CALLS[name]
    with pytest.raises(Exception) as dense_error:
        bad(rows_tensor())
    with make_pager() as pager:
        table = PagedTensor.wrap(rows_tensor(), pager)
        pager.evict_all()
        faults = pager.stats()["faults"]
        with pytest.raises(dense_error.type, match=re.escape(str(dense_error.value))):
            bad(table)
        assert pager.stats()["faults"] == faults


def test_forms_not_run_by_rows_still_raise_the_pagers_error():
    """``softmax`` over dim 0 or over the outermost dim of a transposed table, ``layer_norm`` over
    every dim, a table each of whose rows spans more than a piece: OutOfPagesError naming the op,
    the table unchanged."""
    with make_pager() as pager:
        table = PagedTensor.wrap(rows_tensor(), pager)
        wide = PagedTensor.wrap(rows_tensor(2, 8 * 1024), pager)  # rows of 8 pages
        for call, name in ((lambda t: t.softmax(0), "_softmax"), (lambda t: t.t().softmax(-1), "_softmax"),
                           (lambda t: F.layer_norm(t, (64, 256)), "native_layer_norm"),
                           (lambda t: wide.log_softmax(-1), "_log_softmax")):  # fmt: skip
            with pytest.raises(OutOfPagesError, match=name):
                call(table)
        assert same_bits(table.materialize(), rows_tensor())
