"""Gathers of a PagedTensor larger than the device tier: ``gather``, ``take``, ``index_select`` and
indexing with several index tensors, masks or a leading ``:`` give the dense op's values, dtype,
shape and strides bit for bit with the device tier never over its budget. Where the elements read
lie in rows named by the indices (``gather`` along dim 0, ``take``, ``t[i, j]``, ``t[mask]``) only
the pages of those rows fault in; where each result row is read from the same table row
(``gather``/``index_select`` along another dim, ``t[:, i]``) the op runs a piece of rows at a time.
A table whose dim 0 is not the outermost in memory (``t.T``, ``t.permute(2, 0, 1)``) runs the op
on its dims ordered outermost first. Bad indices raise the dense op's error before any page moves."""

from __future__ import annotations

import re

from typing import Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagedtensor import MemoryConfig, OutOfPagesError, PagedTensor, Pager
from tests.support import CPU_AND_CUDA
from tests.test_copy_ops_in_pieces import PAGE, TIER_BYTES, same_bits, within_tier
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

Gather = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def make_pager(device: str = "cpu") -> Pager:
    return Pager(MemoryConfig(vram_limit=TIER_BYTES, host_memory=1024 * PAGE, page_size=PAGE, slab_size=1024 * PAGE,
                              prefetch_strategy="none", device=device))  # fmt: skip


def _rows(t: torch.Tensor, count: int, generator: torch.Generator, negative: bool = False) -> torch.Tensor:
    rows = torch.randint(0, t.shape[0], (count,), generator=generator)
    return rows - t.shape[0] if negative else rows


def _positions(t: torch.Tensor, dim: int, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, t.shape[dim], shape, generator=generator)


# name: the op on a table of at least 2 dims, drawing its indices from the generator. Each index is
# on the CPU: ``to(t.device)`` where the op needs it beside the table.
GATHERS: dict[str, Gather] = {
    "gather along dim 0": lambda t, g: torch.gather(t, 0, _positions(t, 0, (5, *t.shape[1:]), g).to(t.device)),
    "gather along dim 0, an index wider than the table": lambda t, g: torch.gather(
        t, 0, _positions(t, 0, (t.shape[0] + 3, *(1 for _ in t.shape[1:])), g).to(t.device)),
    "gather along dim 0, a transposed index": lambda t, g: torch.gather(
        t, 0, _positions(t, 0, (*t.shape[1:], 4), g).movedim(-1, 0).to(t.device)),
    "gather along the last dim": lambda t, g: torch.gather(
        t, -1, _positions(t, -1, (*t.shape[:-1], 3), g).to(t.device)),
    "take": lambda t, g: torch.take(t, torch.randint(-t.numel(), t.numel(), (3, 4), generator=g).to(t.device)),
    "index_select along dim 1": lambda t, g: torch.index_select(t, 1, _positions(t, 1, (4,), g).to(t.device)),
    "t[i, j]": lambda t, g: t[_rows(t, 6, g, negative=True), _positions(t, 1, (6,), g)],
    "t[i, j] broadcast": lambda t, g: t[_rows(t, 3, g).view(3, 1), _positions(t, 1, (1, 2), g)],
    "t[i.T, j.T]": lambda t, g: t[_rows(t, 6, g).view(2, 3).T, _positions(t, 1, (2, 3), g).T],
    "t[i, :, j]": lambda t, g: t[_rows(t, 4, g), :, _positions(t, 2, (4,), g)] if t.dim() > 2 else t[_rows(t, 4, g)],
    "t[mask]": lambda t, g: t[torch.rand(t.shape[0], generator=g) < 0.2],
    "masked_select": lambda t, g: torch.masked_select(t, (torch.rand(t.shape, generator=g) < 0.05).to(t.device)),
    "masked_select by a mask broadcast along dim 0": lambda t, g: torch.masked_select(t, (torch.rand(t.shape[1:], generator=g) < 0.3).to(t.device)),
    "masked_select by a mask broadcast along the last dims": lambda t, g: torch.masked_select(
        t, (torch.rand((t.shape[0], *(1 for _ in t.shape[1:])), generator=g) < 0.05).to(t.device)),
    "t[mask of two dims]": lambda t, g: t[torch.rand(t.shape[:2], generator=g) < 0.1],
    "t[mask, j]": lambda t, g: t[torch.rand(t.shape[0], generator=g) < 0.2, _positions(t, 1, (1,), g)],
    "t[:, i]": lambda t, g: t[:, _positions(t, 1, (3,), g)],
    "t[:, i.T]": lambda t, g: t[:, _positions(t, 1, (2, 3), g).T],
    "t[:, mask]": lambda t, g: t[:, torch.rand(t.shape[1], generator=g) < 0.5],
    "t[:, i, j]": lambda t, g: t[:, _positions(t, 1, (2,), g), _positions(t, 2, (2,), g)] if t.dim() > 2 else t[:, _positions(t, 1, (2,), g)],
}


MEMORY_ORDERS: dict[str, tuple[int, ...]] = {
    "first dims swapped": (1, 0, 2), "dims rotated": (2, 0, 1), "dims rotated back": (1, 2, 0), "dims reversed": (2, 1, 0),
}
"""Layouts whose dim 0 is not the outermost in memory: the table's dims in the order they lie in
memory, outermost first (a 2-D table's is ``(1, 0)``, ``t.T``, for each)."""

LAYOUTS = ("contiguous", "last dims swapped", "column slice", *MEMORY_ORDERS)


@st.composite
def tables(draw) -> tuple[torch.Tensor, str]:
    """A table of 2 to 6 times the device tier, 2-D or 3-D, and a layout: dim 0 outermost (a 3-D
    table's last dims swapped, or a column slice), so a piece of rows is a piece of pages, or dim 0
    not outermost (:data:`MEMORY_ORDERS`: ``t.T``, ``t.permute(...)``), so a row spans the table."""
    dtype = draw(st.sampled_from(DTYPES))
    elements = draw(st.integers(2 * TIER_BYTES, 6 * TIER_BYTES)) // dtype.itemsize
    inner = draw(st.integers(2, 40))
    shape = (elements // inner, inner) if draw(st.booleans()) else (elements // (inner * 3), 3, inner)
    layout = draw(st.sampled_from(LAYOUTS))
    shape = long_dim_outermost(shape, layout)
    values = torch.randn(shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))
    values = (values > 0) if dtype == torch.bool else (values * 50).to(dtype)
    return values, layout


def long_dim_outermost(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    """``shape`` (its long dim first) with its dims moved so the long one lies outermost in memory
    in ``layout``: a gather on a layout of :data:`MEMORY_ORDERS` runs a piece of the outermost dim's
    rows at a time, which needs a row to fit a piece (see the still-raising test below)."""
    if layout not in MEMORY_ORDERS:
        return shape
    order = MEMORY_ORDERS[layout] if len(shape) > 2 else (1, 0)
    return tuple(shape[order.index(d)] for d in range(len(shape)))


def paged_and_dense(values: torch.Tensor, layout: str, pager: Pager) -> tuple[torch.Tensor, torch.Tensor]:
    """``(paged, dense)``: ``values`` in ``layout`` (one of LAYOUTS), as a PagedTensor and as a plain tensor."""
    if layout in MEMORY_ORDERS:
        order = MEMORY_ORDERS[layout] if values.dim() > 2 else (1, 0)
        inverse = sorted(range(len(order)), key=order.__getitem__)
        base = values.permute(order).contiguous()
        return PagedTensor.wrap(base.clone(), pager).permute(inverse), base.permute(inverse)
    if layout == "last dims swapped" and values.dim() > 2:
        base = values.transpose(-1, -2).contiguous()
        return PagedTensor.wrap(base.clone(), pager).transpose(-1, -2), base.transpose(-1, -2)
    if layout == "column slice":
        base = torch.cat([values, values[..., :2]], dim=-1)
        return PagedTensor.wrap(base.clone(), pager)[..., : values.shape[-1]], base[..., : values.shape[-1]]
    if layout not in ("contiguous", "last dims swapped"):  # (a 2-D table's "last dims swapped" is left contiguous)
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    return PagedTensor.wrap(values.clone(), pager), values


@SETTINGS
@given(table=tables(), seed=st.integers(0, 99))
def test_gathers_past_the_tier_give_the_dense_result(table, seed):
    values, layout = table
    with make_pager() as pager:
        paged, dense = paged_and_dense(values, layout, pager)
        for name, op in GATHERS.items():
            expected = op(dense, torch.Generator().manual_seed(seed))
            got = op(paged, torch.Generator().manual_seed(seed))
            assert same_bits(got, expected), (name, layout, tuple(values.shape))
            assert within_tier(pager)


def test_a_row_gather_past_the_tier_faults_in_only_the_pages_of_its_rows():
    """A 64-page table on an 8-page tier: ``t[i, j]``, ``gather`` along dim 0, ``take`` and a mask
    reading rows 3 and 40 (a page each) fault in two pages, however large the table."""
    values = torch.randn(64, 1024)  # one 4 KiB page a row
    with make_pager() as pager:
        t = PagedTensor.wrap(values.clone(), pager)
        mask = torch.zeros(64, dtype=torch.bool)
        mask[[3, 40]] = True
        ops = {
            "t[i, j]": lambda x: x[torch.tensor([40, 3, 40]), torch.tensor([0, 5, 1023])],
            "gather": lambda x: torch.gather(x, 0, torch.tensor([[40, 3], [3, 3]])),
            "take": lambda x: torch.take(x, torch.tensor([3 * 1024 + 7, 40 * 1024])),
            "t[mask]": lambda x: x[mask],
        }
        for name, op in ops.items():
            pager.evict_all()
            before = pager.stats()["faults"]
            assert same_bits(op(t), op(values)), name
            assert pager.stats()["faults"] - before <= 2, name
            assert within_tier(pager)


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_a_gather_or_take_by_an_empty_index_reads_no_page(layout):
    """On a table that fits the tier and on one past it: the dense op's result, no fault."""
    ops = {
        "gather along dim 0": lambda x: torch.gather(x, 0, torch.empty(0, x.shape[1], dtype=torch.int64)),
        "gather along dim 1, a transposed index": lambda x: torch.gather(x, 1, torch.empty(0, 2, dtype=torch.int64).T),
        "take": lambda x: torch.take(x, torch.empty(0, 3, dtype=torch.int64)),
    }
    with make_pager() as pager:
        for values in (torch.randn(4, 100), torch.randn(3000, 40)):
            t = PagedTensor.wrap(values.clone(), pager)
            if layout == "transposed":
                values, t = values.T, t.T
            for name, op in ops.items():
                pager.evict_all()
                before = pager.stats()["faults"]
                assert same_bits(op(t), op(values)), (name, tuple(values.shape))
                assert pager.stats()["faults"] == before, (name, tuple(values.shape))


@pytest.mark.parametrize(
    "op, error",
    [
        (lambda t: t[torch.tensor([64]), torch.tensor([0])], IndexError),
        (lambda t: t[torch.tensor([-65]), torch.tensor([0])], IndexError),
        (lambda t: torch.gather(t, 0, torch.tensor([[-1]])), RuntimeError),
        (lambda t: torch.gather(t, 0, torch.tensor([[64]])), RuntimeError),
        (lambda t: torch.take(t, torch.tensor([64 * 1024])), IndexError),
        (lambda t: t[torch.ones(3, dtype=torch.bool)], IndexError),
        (lambda t: t[torch.tensor([1]), torch.tensor([1024])], IndexError),
        (lambda t: torch.index_select(t, 0, torch.tensor([3, 64])), IndexError),
        (lambda t: torch.nn.functional.embedding(torch.tensor([64]), t), IndexError),
    ],
    ids=["row past the end", "row before the start", "gather -1", "gather past the end", "take past the end",
         "mask of another shape", "column past the end", "index_select past the end", "embedding past the end"],  # fmt: skip
)
def test_bad_indices_past_the_tier_raise_the_dense_error(op, error):
    values = torch.randn(64, 1024)
    with make_pager() as pager:
        t = PagedTensor.wrap(values.clone(), pager)
        with pytest.raises(error) as dense_error:
            op(values)
        with pytest.raises(error) as paged_error:
            op(t)
        assert str(dense_error.value).splitlines()[0] in str(paged_error.value)
        assert within_tier(pager)


@pytest.mark.parametrize(
    "shape, view, dim",
    [((64, 1024), lambda t: t, 1), ((8, 4096), lambda t: t, 1), ((1024, 64), lambda t: t.t(), 1), ((16, 8, 512), lambda t: t, 2),
     ((8, 4, 1184), lambda t: t.diagonal(2, 2, 0), 1), ((8, 4, 1184), lambda t: t.diagonal(2, 2, 0), 0),
     ((600, 5, 4), lambda t: t, 1), ((600, 5, 4, 2), lambda t: t, 1)],
    ids=["columns", "columns of rows wider than a piece", "columns of t.T", "last dim of 3", "columns of a diagonal view", "rows of a diagonal view",
         "dim 1 of 3", "dim 1 of 4"],
)  # fmt: skip
@pytest.mark.parametrize("value", [-1, 99999])
def test_index_select_out_of_range_along_any_dim_past_the_tier_raises_the_dense_error(shape, view, dim, value):
    """torch's CPU ``index_select`` raises ``RuntimeError`` ("INDICES element is out of DATA bounds")
    along dim 1 of any table of two dims or more and ``IndexError`` otherwise: past the tier the paged op raised the
    ``IndexError`` for both, or, with rows wider than a piece, the pager's DeviceTierFullError."""
    values = torch.randn(*shape)
    index = torch.tensor([1, value])
    with make_pager() as pager:
        t = PagedTensor.wrap(values.clone(), pager)
        with pytest.raises(Exception) as dense_error:
            torch.index_select(view(values), dim, index)
        with pytest.raises(dense_error.type, match=re.escape(str(dense_error.value).splitlines()[0])):
            torch.index_select(view(t), dim, index)
        assert within_tier(pager)


@pytest.mark.parametrize(
    "op",
    [
        lambda t: t[:, torch.tensor([1, 2, 1])],
        lambda t: t[torch.tensor([[5], [1000]]), torch.tensor([63, -1])],
        lambda t: t[:, torch.rand(64, generator=torch.Generator().manual_seed(3)) < 0.5],
        lambda t: torch.gather(t, 1, torch.tensor([[40, 3], [3, 3]])),
        lambda t: torch.index_select(t, 1, torch.tensor([7, 0, 7])),
        lambda t: torch.take(t, torch.tensor([3 * 64 + 7, 40, 64 * 1024 - 1])),
        lambda t: t[torch.tensor([1000, 3, 3])],
        lambda t: torch.nn.functional.embedding(torch.tensor([[3, 1000], [5, 5]]), t),
        lambda t: t.unsqueeze(0)[:, torch.tensor([1, 2, 1])],
    ],
    ids=["t.T[:, i]", "t.T[i, j]", "t.T[:, mask]", "gather along dim 1", "index_select along dim 1", "take", "t.T[i]",
         "embedding", "t.T.unsqueeze(0)[:, i]"],  # fmt: skip
)
def test_gathers_of_a_transposed_table_past_the_tier_give_the_dense_result(op):
    """``t.T`` of a 64-page table on an 8-page tier: each of its rows spans every page, so the op
    runs on ``t`` (its dims outermost first) with its indices mapped, and gives the dense result
    (``t.T[i]`` and ``embedding`` copy the rows they name, in chunks). ``t.T.unsqueeze(0)[:, i]``:
    a dim of one element whose stride ties the outermost's, laid out as the CPU kernel lays it
    (the meta kernel would not)."""
    values = torch.randn(64, 1024)
    with make_pager() as pager:
        t = PagedTensor.wrap(values.clone(), pager).T
        assert same_bits(op(t), op(values.T))
        assert within_tier(pager)


@pytest.mark.parametrize(
    "op",
    [
        lambda t: t[torch.zeros(t.shape[0], dtype=torch.bool)],
        lambda t: t[:, torch.tensor([], dtype=torch.int64)],
        lambda t: t[torch.tensor([], dtype=torch.int64), :, torch.tensor([], dtype=torch.int64)],
    ],
    ids=["t[empty mask]", "t[:, empty]", "t[empty, :, empty]"],
)
def test_an_empty_index_of_a_permuted_table_past_the_tier_gives_the_dense_layout(op):
    """An index of no elements on a 64-page table whose last dim lies outermost: the CPU/CUDA
    kernels lay the empty result out otherwise than the meta kernel (``t[:, empty]``: strides
    ``(1, 16, 0)``, not ``(1024, 1024, 1)``); the result has the dense strides."""
    values = torch.randn(1024, 16, 4)
    with make_pager() as pager:
        t = PagedTensor.wrap(values.clone(), pager).permute(1, 2, 0)
        assert same_bits(op(t), op(values.permute(1, 2, 0)))
        assert within_tier(pager)


@pytest.mark.parametrize(
    "op, error",
    [
        (lambda t: t[:, torch.tensor([64])], IndexError),
        (lambda t: t[torch.tensor([1]), torch.tensor([-65])], IndexError),
        (lambda t: torch.gather(t, 1, torch.tensor([[64]])), RuntimeError),
        (lambda t: torch.take(t, torch.tensor([64 * 1024])), IndexError),
        (lambda t: t[:, torch.ones(3, dtype=torch.bool)], IndexError),
    ],
    ids=["column past the end", "column before the start", "gather past the end", "take past the end", "mask of another shape"],
)
def test_bad_indices_of_a_transposed_table_past_the_tier_raise_the_dense_error(op, error):
    values = torch.randn(64, 1024)
    with make_pager() as pager:
        t = PagedTensor.wrap(values.clone(), pager).T
        with pytest.raises(error) as dense_error:
            op(values.T)
        pager.evict_all()
        before = pager.stats()["faults"]
        with pytest.raises(error) as paged_error:
            op(t)
        assert str(dense_error.value).splitlines()[0] in str(paged_error.value)
        assert pager.stats()["faults"] == before


@pytest.mark.parametrize("dim, index_shape", [(0, (3, 7, 4)), (1, (600, 2, 9)), (2, (5, 6, 3))])
def test_a_gather_of_an_index_larger_than_the_table_past_the_tier_names_the_table_s_shape(dim, index_shape):
    """torch's size error names the table's shape; past the tier it named the pager's stand-in of
    one or two rows (``self [1, 5, 4]``)."""
    values = torch.randn(600, 5, 4)
    index = torch.zeros(index_shape, dtype=torch.long)
    with make_pager() as pager:
        with pytest.raises(RuntimeError) as dense_error:
            torch.gather(values, dim, index)
        with pytest.raises(RuntimeError) as paged_error:
            torch.gather(PagedTensor.wrap(values.clone(), pager), dim, index)
        assert str(paged_error.value) == str(dense_error.value)


def test_a_gather_along_an_inner_dim_of_rows_larger_than_the_tier_still_raises():
    """``gather`` along dim 0 of ``t.T`` is ``gather`` along dim 1 of ``t``, run a piece of ``t``'s
    rows at a time: where one of ``t``'s rows (here 16 pages) is larger than a piece, it raises
    ``OutOfPagesError`` naming the op (never a partial result)."""
    with make_pager() as pager:
        t = PagedTensor.wrap(torch.randn(4, 16 * 1024), pager).T
        with pytest.raises(OutOfPagesError, match="aten.gather"):
            torch.gather(t, 0, torch.tensor([[1, 2, 3, 0]]))
        assert within_tier(pager)


def test_gathers_that_fit_the_tier_keep_the_generic_path(monkeypatch):
    """A table that fits runs the op once on its pages: the compact-table and row-piece paths stay out."""
    import pagedtensor.handlers.row_gathers as row_gathers

    def refuse(*args, **kwargs):
        raise AssertionError("past-the-tier path taken for a table that fits")

    monkeypatch.setattr(row_gathers, "_elements_by_rows", refuse)
    monkeypatch.setattr(row_gathers, "_row_pieces", refuse)
    monkeypatch.setattr(row_gathers, "_gather_of_outermost_first", refuse)
    values = torch.randn(4, 1024)
    with make_pager() as pager:
        for paged, dense in ((PagedTensor.wrap(values.clone(), pager), values), (PagedTensor.wrap(values.T.contiguous(), pager).T, values)):
            for op in GATHERS.values():
                assert same_bits(op(paged, torch.Generator().manual_seed(1)), op(dense, torch.Generator().manual_seed(1)))


@pytest.mark.gpu
def test_gpu_gathers_past_the_tier_give_the_dense_result():
    """Every form on a CUDA pager, a float and an integer table, each layout."""
    with make_pager("cuda") as pager:
        for dtype in (torch.float16, torch.int64):
            for long_first in ((1024, 48), (512, 3, 24)):
                for layout in LAYOUTS:
                    shape = long_dim_outermost(long_first, layout)
                    values = (torch.randn(shape, generator=torch.Generator().manual_seed(7)) * 50).to(dtype).cuda()
                    paged, dense = paged_and_dense(values, layout, pager)
                    for name, op in GATHERS.items():
                        got = op(paged, torch.Generator().manual_seed(2))
                        assert same_bits(got, op(dense, torch.Generator().manual_seed(2))), (name, dtype, shape, layout)
                        assert within_tier(pager)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64, torch.float32])
def test_a_gather_of_a_one_dimensional_table_of_any_dtype(device, dtype):
    """``t[idx]`` and ``t[mask]`` of a 1-D table of the unsigned dtypes torch's CPU ``index_select``
    lacks for 1-D tensors (``aten.index`` has them) raised NotImplementedError, within the tier
    and past it; they give the dense op's elements. Where the dense op itself raises (torch 2.11's
    CUDA ``index`` has no uint16/32/64 kernel), the paged one raises the same error."""
    generator = torch.Generator().manual_seed(0)
    for elements in (300, 9 * TIER_BYTES // dtype.itemsize):  # within the tier, then past it
        table = torch.randint(0, 60000, (elements,), generator=generator).to(dtype).to(device)
        index = torch.randint(0, elements, (50,), generator=generator).to(device)
        mask = (torch.rand(elements, generator=generator) > 0.9).to(device)
        with make_pager(device) as pager:
            paged = PagedTensor.wrap(table, pager)
            for selector in (index, mask, index.sort().values):
                expected, expected_error = _result_or_error(lambda: table[selector])
                got, got_error = _result_or_error(lambda: paged[selector])
                assert (type(got_error), str(got_error)) == (type(expected_error), str(expected_error))
                if expected_error is None:
                    assert type(got) is torch.Tensor and got.dtype == dtype and torch.equal(got, expected)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64, torch.float32], ids=str)
def test_masked_select_of_a_dtype_torch_lacks_raises_its_error_past_the_tier(device, dtype):
    """``torch.masked_select`` (and its ``out=`` form) of a uint16/32/64 table, which torch's CPU
    kernel lacks where the mask selects an element: past the tier it ran as ``t[mask]`` (``aten.index``
    has those dtypes) and returned the elements; now torch's NotImplementedError, as the dense op and
    the paged one within the tier raise. A mask selecting nothing gives what the dense op gives."""
    generator = torch.Generator().manual_seed(0)
    for rows in (4, 9 * TIER_BYTES // (256 * dtype.itemsize)):  # within the tier, then past it
        table = torch.randint(0, 60000, (rows, 256), generator=generator).to(dtype).to(device)
        masks = [(torch.rand(rows, 256, generator=generator) > 0.9).to(device), (torch.rand(256, generator=generator) > 0.5).to(device),
                 torch.zeros(rows, 256, dtype=torch.bool, device=device)]  # fmt: skip
        with make_pager(device) as pager:
            paged = PagedTensor.wrap(table, pager)
            for mask in masks:
                for op in (torch.masked_select, lambda t, m: torch.masked_select(t, m, out=torch.empty(0, dtype=dtype, device=device))):
                    expected, expected_error = _result_or_error(lambda: op(table, mask))
                    got, got_error = _result_or_error(lambda: op(paged, mask))
                    assert (type(got_error), str(got_error)) == (type(expected_error), str(expected_error)), (rows, mask.shape)
                    if expected_error is None:
                        assert type(got) is torch.Tensor and got.dtype == dtype and torch.equal(got, expected)
                    assert within_tier(pager)


def _result_or_error(call: Callable[[], torch.Tensor]) -> tuple[torch.Tensor | None, Exception | None]:
    """``(result, None)`` of ``call()``, or ``(None, error)`` where it raises NotImplementedError."""
    try:
        return call(), None
    except NotImplementedError as error:
        return None, error


@pytest.mark.parametrize("transposed", [False, True])
def test_a_gather_past_the_tier_takes_an_int32_index(transposed):
    """``torch.gather`` takes an int32 index as well as an int64 one; past the tier an int32 index
    raised DeviceTierFullError where an int64 one ran by rows (found by a helper's probe)."""
    generator = torch.Generator().manual_seed(0)
    table = torch.randn(TIER_BYTES // 64 * 2, 64, generator=generator)  # twice the tier
    if transposed:
        table = table.t().contiguous().t()
    index = torch.randint(0, table.shape[0], (5, 64), generator=generator)
    with make_pager() as pager:
        paged = PagedTensor.wrap(table, pager)
        for dim, positions in ((0, index), (1, index.remainder(64))):
            assert same_bits(paged.gather(dim, positions.int()), table.gather(dim, positions.int()))


_INT16 = torch.tensor([1, 2], dtype=torch.int16)


@pytest.mark.parametrize(
    "op",
    [
        lambda t: t.index_select(0, _INT16),
        lambda t: t.index_select(1, _INT16),
        lambda t: t[_INT16],
        lambda t: t[torch.tensor([1.0])],
        lambda t: t[:, _INT16],
        lambda t: t[torch.tensor([1, 2]), _INT16],
        lambda t: torch.nn.functional.embedding(_INT16, t),
        lambda t: t.take(torch.tensor([1], dtype=torch.int32)),
        lambda t: t.gather(0, torch.tensor([[1]], dtype=torch.int16)),
        lambda t: t.gather(1, torch.tensor([[1]], dtype=torch.int16)),
        lambda t: t.gather(1, torch.zeros(3, dtype=torch.long)),
        lambda t: t.gather(0, torch.zeros(3, dtype=torch.long)),
        lambda t: torch.masked_select(t, torch.ones(64, 256, dtype=torch.uint8)),
        lambda t: torch.masked_select(t, torch.ones(64, 256)),
        lambda t: torch.masked_select(t, torch.ones(3, dtype=torch.bool)),
        lambda t: t[torch.tensor([0, 1, 2]), torch.tensor([0, 1])],
    ],
    ids=["index_select int16", "index_select along dim 1 int16", "t[int16]", "t[float]", "t[:, int16]", "t[i, int16]",
         "embedding int16", "take int32", "gather int16", "gather along dim 1 int16", "gather along dim 1, an index of another rank",
         "gather along dim 0, an index of another rank", "masked_select uint8 mask", "masked_select float mask",
         "masked_select mask not broadcastable", "t[i, j] not broadcastable"],  # fmt: skip
)
@pytest.mark.parametrize("transposed", [False, True])
def test_an_index_of_a_dtype_or_shape_torch_refuses_past_the_tier_raises_the_dense_error(op, transposed):
    """A 16-page table on an 8-page tier: an index (or mask) of a dtype, rank or shape torch refuses
    raised DeviceTierFullError where the dense op, and the paged one within the tier, raise torch's
    own error; now torch's error (its type, its words), before any page faults in."""
    values = torch.randn(64, 256) if not transposed else torch.randn(256, 64).T
    with make_pager() as pager:
        t = PagedTensor.wrap(values.contiguous() if not transposed else values.T.contiguous(), pager)
        t = t.T if transposed else t
        _assert_raises_the_dense_error_with_no_fault(op, values, t, pager)
        assert within_tier(pager)


def _assert_raises_the_dense_error_with_no_fault(op: Callable, values: torch.Tensor, t: PagedTensor, pager: Pager) -> None:
    """``op`` of the PagedTensor ``t`` raises the error ``op`` of ``values`` raises (its type, its first
    line), with every page evicted first and none faulted in."""
    with pytest.raises(Exception) as dense_error:
        op(values)
    pager.evict_all()
    before = pager.stats()["faults"]
    with pytest.raises(dense_error.type) as paged_error:
        op(t)
    assert str(dense_error.value).splitlines()[0] in str(paged_error.value)
    assert pager.stats()["faults"] == before


@pytest.mark.parametrize(
    "op",
    [
        lambda t: t[:, torch.tensor([3]), :, torch.tensor([0])],
        lambda t: t[:, torch.tensor([0]), :, torch.tensor([-9])],
        lambda t: t[:, torch.tensor([0, 1, 2]), :, torch.tensor([0, 1])],
        lambda t: t[:, torch.tensor([0, 1], dtype=torch.int16), :, torch.tensor([0, 1])],
        lambda t: t[:, torch.ones(2, dtype=torch.bool), :, torch.tensor([0])],
    ],
    ids=["out of range", "before the start", "not broadcastable", "int16", "mask of another shape"],
)
def test_bad_indices_apart_past_the_tier_raise_the_dense_error(op):
    """``t[:, i, :, j]`` (index tensors apart, a leading ``:``) of a 15-page table on an 8-page
    tier: an index out of range or not broadcastable raised DeviceTierFullError; now torch's
    error, before any page faults in."""
    values = torch.randn(40, 3, 16, 8)
    with make_pager() as pager:
        _assert_raises_the_dense_error_with_no_fault(op, values, PagedTensor.wrap(values.clone(), pager), pager)


@pytest.mark.parametrize(
    "op",
    [
        lambda t: t[torch.tensor([1, 5, 9]), torch.tensor([0, 1, 1])],
        lambda t: t[torch.tensor([[1], [63]]), torch.tensor([0, 1, 1])],
        lambda t: t[torch.tensor([1, -5]), :, torch.tensor([3, 15])],
        lambda t: t[:, torch.tensor([0, 1, 1]), :, torch.tensor([7, 0, 2])],
        lambda t: t[:, torch.tensor([1, 0]), :, torch.tensor([[7], [0]])],
        lambda t: t[:, torch.tensor([True, False]), :, torch.tensor([7, 0, 2])],
    ],
    ids=["t[i, j]", "t[i, j] broadcast", "t[i, :, j]", "t[:, i, :, j]", "t[:, i, :, j] broadcast", "t[:, mask, :, j]"],
)
@pytest.mark.parametrize("permuted", [True, False])
def test_index_tensors_apart_past_the_tier_give_the_dense_result(op, permuted):
    """A 16-page 4-D table on an 8-page tier, dim 3 outermost in memory (``permute(3, 1, 2, 0)`` of
    a contiguous ``(8, 2, 16, 64)``, each outermost row 2 pages) or contiguous: ``t[i, j]`` runs on
    the dims outermost first, where the index tensors stand apart (``[:, j, :, i]``), which raised
    DeviceTierFullError; now the op runs a piece of rows at a time, bitwise the dense result."""
    base = torch.randn(8, 2, 16, 64) if permuted else torch.randn(64, 2, 16, 8)
    values = base.permute(3, 1, 2, 0) if permuted else base
    with make_pager() as pager:
        t = PagedTensor.wrap(base.clone(), pager)
        t = t.permute(3, 1, 2, 0) if permuted else t
        assert same_bits(op(t), op(values))
        assert within_tier(pager)
