"""The ``out=`` forms of the gathers (``gather``, ``take``, ``index_select``, ``index``, ``embedding``)
on a PagedTensor table larger than the device tier: ``out`` ends as the dense op leaves it (values,
shape, strides; a plain ``out`` of another shape resized with torch's warning and layout, a
PagedTensor ``out`` written a piece at a time), the op returns ``out``, only the pages of the rows
read fault in, and torch's errors (dtype, overlaps, bad indices) come before anything is written."""

from __future__ import annotations

import warnings
from typing import Callable

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pagedtensor import PagedTensor, Pager
from tests.test_copy_ops_in_pieces import same_bits, within_tier
from tests.test_gathers_past_the_tier import SETTINGS, _positions, _rows, make_pager, paged_and_dense, tables

aten = torch.ops.aten

OutGather = Callable[[torch.Tensor, torch.Generator, torch.Tensor], torch.Tensor]

# name: the op on a table of at least 2 dims into ``out``, its indices drawn on the CPU from the
# generator and moved beside the table.
OUT_GATHERS: dict[str, OutGather] = {
    "gather along dim 0": lambda t, g, out: torch.gather(t, 0, _positions(t, 0, (5, *t.shape[1:]), g).to(t.device), out=out),
    "gather along the last dim": lambda t, g, out: torch.gather(
        t, -1, _positions(t, -1, (*t.shape[:-1], 3), g).to(t.device), out=out),
    "take": lambda t, g, out: torch.take(t, torch.randint(-t.numel(), t.numel(), (3, 4), generator=g).to(t.device), out=out),
    "take, a transposed index": lambda t, g, out: torch.take(
        t, torch.randint(0, t.numel(), (4, 3), generator=g).to(t.device).T, out=out),
    "index_select along dim 0": lambda t, g, out: torch.index_select(t, 0, _rows(t, 6, g).to(t.device), out=out),
    "index_select along dim 1": lambda t, g, out: torch.index_select(t, 1, _positions(t, 1, (4,), g).to(t.device), out=out),
    "embedding": lambda t, g, out: aten.embedding.out(t if t.dim() == 2 else t[:, 0], _rows(t, 5, g).view(5, 1).to(t.device), out=out),
    "t[i]": lambda t, g, out: aten.index.Tensor_out(t, [_rows(t, 7, g, negative=True)], out=out),
    "t[i, j]": lambda t, g, out: aten.index.Tensor_out(t, [_rows(t, 6, g), _positions(t, 1, (6,), g)], out=out),
    "t[mask]": lambda t, g, out: aten.index.Tensor_out(t, [torch.rand(t.shape[0], generator=g) < 0.2], out=out),
    "masked_select": lambda t, g, out: torch.masked_select(t, (torch.rand(t.shape, generator=g) < 0.05).to(t.device), out=out),
    "t[:, i]": lambda t, g, out: aten.index.Tensor_out(t, [None, _positions(t, 1, (3,), g)], out=out),
}

OUT_KINDS = ("empty", "right shape", "right shape, strides reversed", "another shape", "paged, right shape")


def sentinel_like(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A tensor of ``shape`` holding a value no gather here produces (every element must be written)."""
    return torch.full(shape, True if dtype == torch.bool else 123, dtype=dtype)


def make_out(kind: str, shape: tuple[int, ...], dtype: torch.dtype, pager: Pager) -> torch.Tensor:
    if kind == "empty":
        return torch.empty(0, dtype=dtype)
    if kind == "right shape":
        return sentinel_like(shape, dtype)
    if kind == "right shape, strides reversed":
        return sentinel_like(shape[::-1], dtype).permute(*reversed(range(len(shape))))
    if kind == "another shape":
        return sentinel_like((3,), dtype)
    return PagedTensor.wrap(sentinel_like(shape, dtype), pager)


def run_out(op: OutGather, table: torch.Tensor, seed: int, out: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """``op`` into ``out``; it must return ``out``. Returns ``out`` made plain and the warnings' texts."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        returned = op(table, torch.Generator().manual_seed(seed), out)
    assert returned is out
    return (out.materialize() if isinstance(out, PagedTensor) else out), [str(w.message) for w in caught]


@SETTINGS
@given(table=tables(), seed=st.integers(0, 99), kind=st.sampled_from(OUT_KINDS))
def test_gather_outs_past_the_tier_leave_out_as_the_dense_op_does(table, seed, kind):
    values, layout = table
    with make_pager() as pager:
        paged, dense = paged_and_dense(values, layout, pager)
        for name, op in OUT_GATHERS.items():
            shape = tuple(op(dense, torch.Generator().manual_seed(seed), torch.empty(0, dtype=values.dtype)).shape)
            expected_out = make_out("right shape" if kind == "paged, right shape" else kind, shape, values.dtype, pager)
            expected, _ = run_out(op, dense, seed, expected_out)
            got, warned = run_out(op, paged, seed, make_out(kind, shape, values.dtype, pager))
            assert same_bits(got, expected), (name, kind, layout, tuple(values.shape))
            # torch's own resize warning (a view that fits the tier, such as embedding's t[:, 0], runs
            # torch's kernel, whose warning goes to the C++ log for some of these ops before torch
            # 2.15, and from 2.15 to Python's with the kernel's place appended)
            assert all(text.split(" (Triggered internally at ")[0] == resize_warning(shape) for text in warned if "was resized" in text), name
            assert within_tier(pager)


def resize_warning(shape: tuple[int, ...]) -> str:
    return (f"An output with one or more elements was resized since it had shape [3], which does not match the "
            f"required output shape {list(shape)}. This behavior is deprecated, and in a future PyTorch release "
            "outputs will not be resized unless they have zero elements. You can explicitly reuse an out tensor t "
            "by resizing it, inplace, to zero elements with t.resize_(0).")  # fmt: skip


def test_a_plain_out_of_another_shape_past_the_tier_is_resized_with_torchs_warning():
    """Once, with torch's text; an empty out is resized without one."""
    values = torch.randn(64, 1024)
    with make_pager() as pager:
        t = PagedTensor.wrap(values.clone(), pager)
        for out, warnings_expected in ((torch.full((3,), 7.0), [resize_warning((2, 1024))]), (torch.empty(0), [])):
            got, warned = run_out(lambda x, g, o: torch.index_select(x, 0, torch.tensor([5, 1]), out=o), t, 0, out)
            assert warned == warnings_expected
            assert same_bits(got, values[[5, 1]])


def test_a_row_gather_into_out_past_the_tier_faults_in_only_the_pages_of_its_rows():
    values = torch.randn(64, 1024)  # one 4 KiB page a row
    rows = torch.tensor([40, 3, 40])
    with make_pager() as pager:
        t = PagedTensor.wrap(values.clone(), pager)
        ops = {
            "index_select": lambda x, out: torch.index_select(x, 0, rows, out=out),
            "t[i]": lambda x, out: aten.index.Tensor_out(x, [rows], out=out),
            "take": lambda x, out: torch.take(x, rows * 1024 + 5, out=out),
            "gather": lambda x, out: torch.gather(x, 0, rows.view(3, 1).expand(3, 8), out=out),
        }
        for name, op in ops.items():
            pager.evict_all()
            before = pager.stats()["faults"]
            out = op(t, torch.empty(0))
            assert pager.stats()["faults"] - before <= 2, name
            assert same_bits(out, op(values, torch.empty(0))), name
            assert within_tier(pager)


def test_a_paged_out_larger_than_the_tier_is_written_a_piece_at_a_time():
    """``index_select`` along dim 1 of a 16-page table into a 16-page PagedTensor ``out``."""
    values = torch.randn(4096, 16)
    columns = torch.tensor([15, 0, 3, 3, 9, 1, 2, 8, 4, 5, 6, 7, 10, 11, 12, 13])
    with make_pager() as pager:
        t = PagedTensor.wrap(values.clone(), pager)
        out = PagedTensor.wrap(torch.zeros(4096, 16), pager)
        assert torch.index_select(t, 1, columns, out=out) is out
        assert same_bits(out.materialize(), torch.index_select(values, 1, columns))
        assert within_tier(pager)


def _expanded(t: torch.Tensor) -> torch.Tensor:
    return t[:1].expand(5, *t.shape[1:])


@pytest.mark.parametrize(
    "op, make_out, make_paged_out",
    [
        (lambda t, out: torch.gather(t, 0, torch.zeros(5, 1024, dtype=torch.int64), out=out),
         lambda t: torch.empty(5, 1024, dtype=torch.float64), None),
        (lambda t, out: torch.take(t, torch.tensor([1, 2]), out=out), lambda t: torch.empty(2, dtype=torch.int32), None),
        (lambda t, out: torch.index_select(t, 0, torch.tensor([1, 2]), out=out),
         lambda t: torch.empty(2, 1024, dtype=torch.float16),
         lambda t, pager: PagedTensor.wrap(torch.empty(2, 1024, dtype=torch.float16), pager)),
        (lambda t, out: aten.index.Tensor_out(t, [torch.tensor([1, 2])], out=out),
         lambda t: torch.empty(2, 1024, dtype=torch.float64), None),
        (lambda t, out: aten.embedding.out(t, torch.tensor([1, 2]), out=out),
         lambda t: torch.empty(2, 1024, dtype=torch.float64), None),
        (lambda t, out: torch.index_select(t, 0, torch.tensor([1, 2, 3, 4, 5]), out=out),
         lambda t: torch.empty(1, 1024).expand(5, 1024),
         lambda t, pager: PagedTensor.wrap(torch.empty(1, 1024), pager).expand(5, 1024)),
        (lambda t, out: torch.take(t, torch.arange(5), out=out), lambda t: torch.empty(1).expand(5), None),
        (lambda t, out: torch.index_select(t, 0, torch.tensor([1, 2]), out=out), lambda t: t[10:12], None),
        (lambda t, out: torch.gather(t, 0, torch.zeros(2, 1024, dtype=torch.int64), out=out), lambda t: t[:2], None),
        (lambda t, out: aten.index.Tensor_out(t, [torch.tensor([5, 6])], out=out), lambda t: t[5:7], None),
        (lambda t, out: torch.take(t, torch.tensor([7, 8]), out=out), lambda t: t[0, :2], None),
    ],
    ids=["gather, out of another dtype", "take, out of another dtype", "index_select, out of another dtype",
         "index, out of another dtype", "embedding, out of another dtype", "index_select, out overlapping itself",
         "take, out overlapping itself", "index_select, out a view of the table", "gather, out a view of the table",
         "index, out a view of the table", "take, out a view of the table"],  # fmt: skip
)
def test_bad_outs_past_the_tier_raise_the_dense_error(op, make_out, make_paged_out):
    """The dense op's error, with ``out`` made alike of the plain and of the paged table (a view of a
    PagedTensor table is a PagedTensor) and with a PagedTensor ``out``; nothing written."""
    values = torch.randn(64, 1024)
    with make_pager() as pager:
        t = PagedTensor.wrap(values.clone(), pager)
        with pytest.raises(RuntimeError) as dense_error:
            op(values, make_out(values))
        outs = [make_out(t)] + ([make_paged_out(t, pager)] if make_paged_out else [])
        for out in outs:
            with pytest.raises(RuntimeError) as paged_error:
                op(t, out)
            assert str(dense_error.value).splitlines()[0] in str(paged_error.value)
        assert torch.equal(t.materialize(), values)
        assert within_tier(pager)


def test_an_embedding_into_a_view_of_its_table_past_the_tier_runs_as_the_dense_one():
    """torch's ``embedding.out`` gathers into a temporary, then copies: a table row overwritten by
    its own selection is no error, and the result is the dense one."""
    values = torch.randn(64, 1024)
    with make_pager() as pager:
        t = PagedTensor.wrap(values.clone(), pager)
        dense = values.clone()
        aten.embedding.out(dense, torch.tensor([9, 5]), out=dense[5:7])
        aten.embedding.out(t, torch.tensor([9, 5]), out=t[5:7])
        assert same_bits(t.materialize(), dense)


def test_a_paged_out_of_another_shape_past_the_tier_is_refused():
    with make_pager() as pager:
        t = PagedTensor.wrap(torch.randn(64, 1024), pager)
        out = PagedTensor.wrap(torch.full((3, 1024), 7.0), pager)
        with pytest.raises(NotImplementedError, match=r"would resize its PagedTensor output from \[3, 1024\] to \[2, 1024\]"):
            torch.index_select(t, 0, torch.tensor([1, 2]), out=out)
        assert torch.equal(out.materialize(), torch.full((3, 1024), 7.0))


@pytest.mark.parametrize("paged_out", [False, True], ids=["plain out", "paged out"])
def test_bad_indices_into_out_past_the_tier_leave_out_untouched(paged_out):
    values = torch.randn(64, 1024)
    with make_pager() as pager:
        t = PagedTensor.wrap(values.clone(), pager)
        out = torch.full((2, 1024), 7.0)
        out = PagedTensor.wrap(out, pager) if paged_out else out
        with pytest.raises(IndexError, match="index out of range in self"):
            torch.index_select(t, 0, torch.tensor([1, 64]), out=out)
        with pytest.raises(RuntimeError, match="index 64 is out of bounds"):
            torch.gather(t, 0, torch.tensor([[1] * 1024, [64] * 1024]), out=out)
        plain = out.materialize() if paged_out else out
        assert torch.equal(plain, torch.full((2, 1024), 7.0))


@pytest.mark.gpu
def test_gpu_gather_outs_past_the_tier_leave_out_as_the_dense_op_does():
    """Every form on a CUDA pager into each kind of out, a float and an integer table."""
    with make_pager("cuda") as pager:
        for dtype in (torch.float16, torch.int64):
            values = (torch.randn(1024, 48, generator=torch.Generator().manual_seed(7)) * 50).to(dtype).cuda()
            paged = PagedTensor.wrap(values.clone(), pager)
            for name, op in OUT_GATHERS.items():
                shape = tuple(op(values, torch.Generator().manual_seed(3), torch.empty(0, dtype=dtype, device="cuda")).shape)
                for kind in OUT_KINDS:
                    expected_out = make_out("right shape" if kind == "paged, right shape" else kind, shape, dtype, pager)
                    expected, _ = run_out(op, values, 3, _on_cuda(expected_out))
                    got, _ = run_out(op, paged, 3, _on_cuda(make_out(kind, shape, dtype, pager)))
                    assert same_bits(got.cpu(), expected.cpu()), (name, kind, dtype)
                    assert within_tier(pager)


def _on_cuda(out: torch.Tensor) -> torch.Tensor:
    """A CPU ``out`` moved to CUDA with its strides (a PagedTensor one is on the pager's device already)."""
    if isinstance(out, PagedTensor):
        return out
    return torch.empty_strided(out.shape, out.stride(), dtype=out.dtype, device="cuda").copy_(out)


@pytest.mark.parametrize("name", ["gather", "index_select", "take", "masked_select"])
def test_a_gather_into_its_own_strided_input_past_the_tier_raises_torchs_overlap_error(name):
    """``torch.gather(v, 0, idx, out=v)`` with ``v`` one strided view (a column spanning the table):
    torch refuses one tensor passed as both input and ``out`` whatever its layout; past the tier the
    gather ran and overwrote ``v``, as the pager checked dense layouts only."""
    index = torch.tensor([1, 0])
    ops = {"gather": lambda v: torch.gather(v, 0, index, out=v), "index_select": lambda v: torch.index_select(v, 0, index, out=v),
           "take": lambda v: torch.take(v, index, out=v),
           "masked_select": lambda v: torch.masked_select(v, torch.tensor([True, True]), out=v)}  # fmt: skip
    values = torch.randn(2, 12 * 1024)
    with make_pager() as pager:
        t = PagedTensor.wrap(values.clone(), pager)
        with pytest.raises(RuntimeError) as dense_error:
            ops[name](values[:, 3])
        with pytest.raises(RuntimeError) as paged_error:
            ops[name](t[:, 3])
        assert str(dense_error.value).splitlines()[0] in str(paged_error.value)
        assert torch.equal(t.materialize(), values)
