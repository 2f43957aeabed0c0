"""``softmax`` / ``log_softmax`` over the last dim and ``layer_norm`` of PagedTensors larger than the
device tier (``run_by_rows`` in ``pagedtensor/handlers/row_wise.py``): a piece of rows at a time,
the dense op's bits and layout, torch's errors first; other forms raise the pager's error."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pagedtensor import MemoryConfig, OutOfPagesError, PagedTensor, Pager
from tests.support import CPU_AND_CUDA
from tests.test_row_scatter import PAGE, assert_raises_as_dense, make_pager, rows_tensor, same_bits


def row_wise_call(op: str, shape: tuple[int, ...], dtype: torch.dtype, data, generator: torch.Generator, pager, device: str = "cpu"):
    """The op as a function of a table of ``shape``; ``layer_norm``'s trailing dims, weight and bias
    drawn (the weight paged or not)."""
    if op in ("softmax", "log_softmax"):
        dim = data.draw(st.sampled_from([-1, len(shape) - 1]), label="dim")
        return lambda t: getattr(torch, op)(t, dim)
    if op in SCANS:
        dim = data.draw(st.sampled_from([-1, len(shape) - 1]), label="dim")
        if op == "cumsum into float64":
            return lambda t: torch.cumsum(t, dim, dtype=torch.float64)
        return lambda t: getattr(torch, op)(t, dim)
    if op in SELECTIONS:
        dim = data.draw(st.sampled_from([-1, len(shape) - 1]), label="dim")
        last = shape[-1]
        if op == "sort":
            descending, stable = data.draw(st.booleans(), label="descending"), data.draw(st.sampled_from([None, False, True]), label="stable")
            return lambda t: torch.sort(t, dim=dim, descending=descending, stable=stable)
        if op == "argsort":
            return lambda t: torch.argsort(t, dim, descending=True)
        if op == "topk":
            k, largest, ordered = data.draw(st.integers(1, last), label="k"), data.draw(st.booleans(), label="largest"), data.draw(st.booleans(), label="sorted")
            return lambda t: torch.topk(t, k, dim, largest, ordered)
        keepdim = data.draw(st.booleans(), label="keepdim")
        if op == "kthvalue":
            k = data.draw(st.integers(1, last), label="k")
            return lambda t: torch.kthvalue(t, k, dim, keepdim)
        return lambda t: getattr(torch, op)(t, dim, keepdim)
    if op.endswith("pad"):
        trailing = min(len(shape) - 1, data.draw(st.integers(1, 2), label="padded dims"))
        pad = [data.draw(st.integers(0, min(3, shape[len(shape) - 1 - k // 2] - 1)), label="pad") for k in range(2 * trailing)]
        return lambda t: F.pad(t, pad, mode=op.split()[0])
    if op.startswith("nearest"):
        size = data.draw(st.integers(1, 3 * shape[-1]), label="size")
        return lambda t: F.interpolate(t if t.dim() == 3 else t[:, None], size=size, mode=op)
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


SCANS = ["cumsum", "cumprod", "logcumsumexp", "cummax", "cummin", "cumsum into float64"]
SELECTIONS = ["sort", "argsort", "topk", "kthvalue", "median", "nanmedian", "mode"]
OPS = ["softmax", "log_softmax", "layer_norm", *SCANS, *SELECTIONS, "reflect pad", "replicate pad", "nearest", "nearest-exact"]


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    op=st.sampled_from(OPS),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64]),
    three_dims=st.booleans(),
    view=st.sampled_from(["whole", "rows from the second", "columns from the third"]),
    seed=st.integers(0, 2**16),
)
def test_row_wise_ops_past_the_tier_equal_dense(data, op, dtype, three_dims, view, seed):
    """Each op on a random table of 2 to 6 times the device tier (they raised DeviceTierFullError),
    rows of 3 to 2,100 elements (a softmax's warp and block kernels on CUDA), the whole table or a
    view of it: the dense op's bits, dtypes and strides (``layer_norm``'s mean and rstd, ``cummax``'s
    indices too); the table keeps its bytes; the device tier's budget holds. Integers for the scans
    but ``logcumsumexp`` only (torch's CPU kernels of the others refuse them)."""
    assume(dtype != torch.int64 or (op in SCANS and op != "logcumsumexp"))
    last = data.draw(st.sampled_from([3, 17, 64, 300, 1024, 1500, 2100]), label="last dim")
    inner = (data.draw(st.integers(2, 5), label="middle"), last) if three_dims else (last,)
    row_bytes = dtype.itemsize * inner[0] * (inner[1] if three_dims else 1)
    assume(row_bytes <= (2 if op in SCANS or op in SELECTIONS else 4) * PAGE)  # a row within a piece, a scan's three (else it raises: test_forms_not_run_by_rows_...)
    rows = data.draw(st.integers(2 * 8 * PAGE // row_bytes + 2, 6 * 8 * PAGE // row_bytes + 2), label="rows")
    generator = torch.Generator().manual_seed(seed)
    if dtype == torch.int64:
        base = torch.randint(-3, 4, (rows, *inner), generator=generator)
    else:
        base = (torch.randn((rows, *inner), generator=generator) * (0.3 if op == "cumprod" else 4)).to(dtype)
        if op in SELECTIONS:  # ties and NaNs: which index the op names among equal values is the dense op's too
            base = base.round()
            base[torch.rand(base.shape, generator=generator) < 0.01] = float("nan")
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
    vector): ``softmax``, ``log_softmax``, ``F.layer_norm`` with a weight and bias, the scans
    ``cumsum``, ``logcumsumexp`` and ``cummax``, a reflection pad and nearest upsampling, and on
    CUDA ``softmax`` of halves into floats: the dense op's bits. On CUDA the float ``cumsum`` and
    ``logcumsumexp`` raise instead: by rows they differed from the dense op on the H200."""
    generator = torch.Generator().manual_seed(2)
    for cols in (256, 1000, 2048, 4096):
        rows = 2 * 8 * PAGE // (cols * dtype.itemsize) + 3
        x = (torch.randn(rows, cols, generator=generator) * 4).to(dtype).to(device)
        weight = torch.randn(cols, generator=generator).to(dtype).to(device)
        bias = torch.randn(cols, generator=generator).to(dtype).to(device)
        calls = [lambda t: t.softmax(-1), lambda t: F.log_softmax(t, 1), lambda t: F.layer_norm(t, (cols,), weight, bias),
                 lambda t: F.pad(t, (5, 3), mode="reflect"), lambda t: F.interpolate(t[:, None], scale_factor=0.75)]  # fmt: skip
        sums = []
        if cols * dtype.itemsize <= 2 * PAGE:  # three rows a piece
            calls.append(lambda t: torch.cummax(t, -1)[1])
            sums = [lambda t: t.cumsum(-1), lambda t: torch.logcumsumexp(t, 1)]
            if device == "cpu":
                calls += sums
        if device == "cuda" and dtype == torch.float16:
            calls.append(lambda t: torch.ops.aten._softmax(t, 1, True))
        with make_pager(device=device) as pager:
            table = PagedTensor.wrap(x.clone(), pager)
            for call in calls:
                expected, result = call(x), call(table)
                assert result.stride() == expected.stride()
                assert same_bits(result, expected), cols
            if device == "cuda":  # a piece of rows of CUDA's float sum scans adds otherwise: refused
                for call in sums:
                    with pytest.raises(OutOfPagesError):
                        call(table)
            assert pager.stats()["resident_bytes"]["device"] <= 8 * PAGE


ONE_ELEMENT_DIM_CALLS = {
    "sort": lambda t: torch.sort(t, -1), "argsort": lambda t: torch.argsort(t, -1), "topk": lambda t: t.topk(1, -1),
    "kthvalue": lambda t: t.kthvalue(1, -1, keepdim=True), "median": lambda t: t.median(-1), "cumsum": lambda t: t.cumsum(-1),
    "cummax": lambda t: t.cummax(-1), "softmax": lambda t: t.softmax(-1), "layer_norm": lambda t: F.layer_norm(t, t.shape[-1:]),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(ONE_ELEMENT_DIM_CALLS))
@pytest.mark.parametrize("order", [(1, 2, 0), (1, 0, 2), (0, 2, 1)])
def test_dims_of_one_element_past_the_tier_keep_the_dense_strides(name, order):
    """A 1 x 128 x 150 table (75 KiB, the tier 32) with its dim of one element moved last or into
    the middle (a stride larger than a row's, which the stand-in of two rows would scale by the
    rows), or 128 x 1 x 150 with its last dims swapped: the dense op's values and strides, the
    one-element dim's stride included."""
    shape = (1, 128, 150) if order != (0, 2, 1) else (128, 150, 1)
    base = torch.randn(shape, generator=torch.Generator().manual_seed(4)).round()
    call, dense = ONE_ELEMENT_DIM_CALLS[name], base.permute(order)
    with make_pager() as pager:
        table = PagedTensor.wrap(base.clone(), pager).permute(order)
        result, expected = call(table), call(dense)
        for got, want in zip(result if isinstance(result, tuple) else (result,), expected if isinstance(expected, tuple) else (expected,)):
            assert type(got) is torch.Tensor and got.stride() == want.stride(), (name, got.stride(), want.stride())
            assert same_bits(got, want), name
        assert pager.stats()["resident_bytes"]["device"] <= 8 * PAGE


BAD_CALLS = {  # on a 64 x 256 table (rows_tensor): torch's checks
    "softmax along a dim out of range": lambda t: t.softmax(2),
    "cumsum along a dim out of range": lambda t: t.cumsum(-3),
    "a reflection pad as wide as the row": lambda t: F.pad(t, (256, 0), mode="reflect"),
    "upsampling to no element": lambda t: torch.ops.aten.upsample_nearest1d(t[:, None], [0]),
    # errors naming the result's shape, rows included
    "a replication pad to a negative width": lambda t: F.pad(t.view(16, 4, 16, 16), (-25, 1, 1, 1), mode="replicate"),
    "a 3-D reflection pad to a negative width": lambda t: F.pad(t.view(16, 4, 4, 4, 16), (-25, 1, 1, 1, 1, 1), mode="reflect"),
    "a 2-D reflection pad to a negative width": lambda t: F.pad(t.view(16, 4, 16, 16), (-25, 1, 1, 1), mode="reflect"),
    "layer_norm of another normalized shape": lambda t: F.layer_norm(t, (255,)),
    "layer_norm with a weight of another shape": lambda t: F.layer_norm(t, (256,), torch.ones(4)),
    "layer_norm with a bias of another dtype": lambda t: torch.native_layer_norm(t, [256], None, torch.ones(256, dtype=torch.float64), 1e-5),
    "topk of more elements than a row has": lambda t: t.topk(257),
    "kthvalue past a row's end": lambda t: t.kthvalue(0),
    "sort along a dim out of range": lambda t: t.sort(2),
}


@pytest.mark.parametrize("name", sorted(BAD_CALLS))
def test_bad_row_wise_ops_raise_torchs_error_before_any_page_moves(name):
    assert_raises_as_dense(BAD_CALLS[name])


def test_forms_not_run_by_rows_still_raise_the_pagers_error():
    """``softmax`` over dim 0 or over the outermost dim of a transposed table, ``layer_norm`` over
    every dim, a table each of whose rows spans more than a piece, ``cumsum`` along dim 0 or of a
    table whose piece holds fewer than three rows, ``sort``, ``topk`` and ``kthvalue`` along dim 0: OutOfPagesError
    naming the op, the table unchanged."""
    with make_pager() as pager:
        table = PagedTensor.wrap(rows_tensor(), pager)
        wide = PagedTensor.wrap(rows_tensor(2, 8 * 1024), pager)  # rows of 8 pages
        three_pages = PagedTensor.wrap(rows_tensor(6, 3 * 1024), pager)  # a piece holds two rows: a scan needs three
        for call, name in ((lambda t: t.softmax(0), "_softmax"), (lambda t: t.t().softmax(-1), "_softmax"),
                           (lambda t: F.layer_norm(t, (64, 256)), "native_layer_norm"),
                           (lambda t: wide.log_softmax(-1), "_log_softmax"), (lambda t: t.cumsum(0), "cumsum"),
                           (lambda t: three_pages.cumsum(1), "cumsum"), (lambda t: t.msort(), "sort"),
                           (lambda t: three_pages.sort(), "sort"), (lambda t: t.topk(2, 0), "topk"),
                           # more than two along dim 0: torch's checks were run on a stand-in of two rows,
                           # raising "selected index k out of range" where torch runs
                           (lambda t: t.topk(3, 0), "topk"), (lambda t: t.kthvalue(5, 0), "kthvalue")):  # fmt: skip
            with pytest.raises(OutOfPagesError, match=name):
                call(table)
        with pytest.raises(RuntimeError, match="k not in range for dimension"):  # torch's check, in its meta kernel's words
            table.topk(65, 0)
        assert same_bits(table.materialize(), rows_tensor())


def test_a_scans_pieces_hold_two_rows_or_more():
    """CUDA scans a tensor of one row with cub, others row by row: the last piece takes a row from
    the one before where it would hold one."""
    from pagedtensor.handlers.row_wise import _row_ranges

    assert _row_ranges(10, 3, at_least=2) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert _row_ranges(9, 3, at_least=2) == [(0, 3), (3, 6), (6, 9)]
    assert _row_ranges(10, 3, at_least=1) == [(0, 3), (3, 6), (6, 9), (9, 10)]


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64])
def test_sorts_and_selections_of_rows_past_the_tier_equal_dense(device, dtype):
    """``sort`` (stable or not, either order), ``argsort``, ``topk`` (sorted or not), ``kthvalue``,
    ``median``, ``nanmedian`` and ``mode`` along the last dim of tables past the tier, with many ties
    (and NaNs in floats): the dense op's values and indices. The shapes take CUDA's different kernels
    on the whole table and on a piece of it where its choice depends on the slice count: 4,100 rows
    of 400 (``topk``'s multi-block selection on the whole, its one-block one on a piece of 20 rows),
    rows of 2,000 (the sorts' in-place kernel) and of 4,096 halves or 1,024 longs (the segmented sort).
    On CUDA ``median``, ``nanmedian`` and ``mode`` raise instead: ``median``'s index among equal
    values differed between a piece of rows and the whole on the H100."""
    generator = torch.Generator().manual_seed(3)
    tables = [(4100, 400)] if dtype == torch.float16 else []
    tables += [(3 * 8 * PAGE // (cols * dtype.itemsize) + 3, cols) for cols in (2000, 2 * PAGE // dtype.itemsize) if cols * dtype.itemsize <= 2 * PAGE]
    calls = [lambda t: torch.sort(t, -1), lambda t: torch.sort(t, dim=1, descending=True, stable=True),
             lambda t: torch.argsort(t, -1, descending=True), lambda t: t.topk(9, -1), lambda t: t.topk(300, 1, largest=False, sorted=False),
             lambda t: t.kthvalue(5, -1)]
    any_index = [lambda t: t.median(-1), lambda t: t.nanmedian(1, keepdim=True), lambda t: t.mode(-1)]
    if device == "cpu":
        calls += any_index
    for rows, cols in tables:
        x = torch.randint(-20, 21, (rows, cols), generator=generator).to(dtype)
        if dtype.is_floating_point:
            x[torch.rand(x.shape, generator=generator) < 0.01] = float("nan")
        x = x.to(device)
        with Pager(MemoryConfig(vram_limit=8 * PAGE, host_memory=1024 * PAGE, page_size=PAGE, slab_size=1024 * PAGE,
                                prefetch_strategy="none", device=device)) as pager:  # fmt: skip
            table = PagedTensor.wrap(x.clone(), pager)
            for number, call in enumerate(calls):
                expected, result = call(x), call(table)
                for got, want in zip(result if isinstance(result, tuple) else (result,), expected if isinstance(expected, tuple) else (expected,)):
                    assert type(got) is torch.Tensor and got.stride() == want.stride(), (number, rows, cols)
                    assert same_bits(got, want), (number, rows, cols)
            if device == "cuda":
                for call in any_index:
                    with pytest.raises(OutOfPagesError):
                        call(table)
            assert same_bits(table.materialize(), x)
            assert pager.stats()["resident_bytes"]["device"] <= 8 * PAGE
