"""``flip``, ``roll``, ``tril``, ``triu``, ``repeat`` and ``tile`` of a PagedTensor larger than the
device tier give the dense op's values, dtype, shape and strides bit for bit with the device tier
never over its budget, a piece of rows at a time: in place where each result row is made from the
same table row, else each piece's rows written where the op moves them (``flip``/``roll`` of dim 0,
``repeat`` along dim 0 or adding leading dims), each page read once. A table whose dim 0 is not the
outermost in memory (``t.T``, ``t.permute(...)``) runs on its dims ordered outermost first. torch's
errors come first, before any page is read; forms that do not run in pieces (a flattened ``roll``,
rows each larger than a piece) still raise :class:`OutOfPagesError`."""

from __future__ import annotations

import math
import warnings
from typing import Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagedtensor import OutOfPagesError, PagedTensor
from tests.test_copy_ops_in_pieces import TIER_BYTES, make_pager, same_bits, within_tier
from tests.test_gathers_past_the_tier import LAYOUTS, long_dim_outermost, paged_and_dense
from tests.support import CPU_AND_CUDA

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool)
SETTINGS = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

Move = Callable[[torch.Tensor], torch.Tensor]


@st.composite
def tables(draw, layout: str) -> torch.Tensor:
    """A table of 2 to 6 times the device tier, 2-D or 3-D (its middle dim perhaps of one element),
    for ``layout`` (one of the gathers' tests'): dim 0 the outermost in memory (contiguous, a 3-D
    table's last dims swapped, a column slice), or not (``t.T``, ``t.permute(...)``), its long dim
    the outermost then, so that a row of it fits a piece."""
    dtype = draw(st.sampled_from(DTYPES))
    elements = draw(st.integers(2 * TIER_BYTES, 6 * TIER_BYTES)) // dtype.itemsize
    inner, middle = draw(st.integers(2, 40)), draw(st.sampled_from((1, 3)))
    shape = (elements // inner, inner) if draw(st.booleans()) else (elements // (inner * middle), middle, inner)
    shape = long_dim_outermost(shape, layout)
    values = torch.randn(shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))
    return (values > 0) if dtype == torch.bool else (values * 50).to(dtype)


def assert_moves_as_dense(values: torch.Tensor, layout: str, move: Move, name: object) -> None:
    with make_pager() as pager:
        paged, dense = paged_and_dense(values, layout, pager)
        assert same_bits(move(paged), move(dense)), (name, layout, values.dtype, tuple(values.shape))
        assert within_tier(pager)


def signed_dims(draw, rank: int, at_least: int = 0) -> list[int]:
    """Distinct dims of a ``rank``-dim table in a random order, each perhaps counted from the end."""
    dims = draw(st.permutations(range(rank)))[: draw(st.integers(at_least, rank))]
    return [d - rank if draw(st.booleans()) else d for d in dims]


@pytest.mark.parametrize("layout", LAYOUTS)
@SETTINGS
@given(data=st.data())
def test_flip_past_the_tier_gives_the_dense_result(layout, data):
    values = data.draw(tables(layout))
    dims = signed_dims(data.draw, values.dim())
    assert_moves_as_dense(values, layout, lambda t: torch.flip(t, dims), dims)


@pytest.mark.parametrize("layout", LAYOUTS)
@SETTINGS
@given(data=st.data())
def test_roll_past_the_tier_gives_the_dense_result(layout, data):
    values = data.draw(tables(layout))
    dims = signed_dims(data.draw, values.dim(), at_least=1)
    if data.draw(st.booleans()):
        dims = [*dims, dims[0]]  # a dim rolled twice: its shifts add up
    reach = 2 * max(values.shape)
    shifts = [data.draw(st.integers(-reach, reach)) for _ in dims]
    assert_moves_as_dense(values, layout, lambda t: torch.roll(t, shifts, dims), (shifts, dims))


@pytest.mark.parametrize("layout", LAYOUTS)
@SETTINGS
@given(data=st.data())
def test_tril_and_triu_past_the_tier_give_the_dense_result(layout, data):
    values = data.draw(tables(layout))
    rows, columns = values.shape[-2:]
    diagonal = data.draw(st.integers(-rows - 2, columns + 2) | st.integers(-8, 8))
    op = data.draw(st.sampled_from((torch.tril, torch.triu)))
    assert_moves_as_dense(values, layout, lambda t: op(t, diagonal), (op.__name__, diagonal))


@pytest.mark.parametrize("layout", LAYOUTS)
@SETTINGS
@given(data=st.data())
def test_repeat_and_tile_past_the_tier_give_the_dense_result(layout, data):
    values = data.draw(tables(layout))
    factors = [data.draw(st.integers(0, 3)) for _ in range(data.draw(st.integers(0, 2)))]
    factors += [data.draw(st.integers(1, 3)) for _ in range(values.dim())]
    if math.prod(factors) > 8:
        factors = [min(f, 1) for f in factors[:-1]] + factors[-1:]
    tiled = data.draw(st.booleans())
    if tiled:  # tile takes fewer factors than dims (leading 1s), decomposing to repeat
        tile_factors = factors[len(factors) - values.dim() :][data.draw(st.integers(0, values.dim())) :]
        assert_moves_as_dense(values, layout, lambda t: torch.tile(t, tile_factors), ("tile", tile_factors))
    else:
        assert_moves_as_dense(values, layout, lambda t: t.repeat(*factors), ("repeat", factors))


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dtype=st.sampled_from(DTYPES), elements=st.integers(2 * TIER_BYTES, 6 * TIER_BYTES), shift=st.integers(-10**5, 10**5),
       factor=st.integers(1, 3))  # fmt: skip
def test_a_1d_table_flips_rolls_and_repeats_past_the_tier(dtype, elements, shift, factor):
    """A 1-D table's rows are its elements: ``roll`` without dims is its roll along dim 0."""
    values = (torch.randn(elements // dtype.itemsize, generator=torch.Generator().manual_seed(shift)) * 50).to(dtype)
    moves: dict[str, Move] = {
        "flip": lambda t: t.flip(0), "roll": lambda t: t.roll(shift), "roll along 0": lambda t: t.roll(shift, -1),
        "repeat": lambda t: t.repeat(factor), "repeat with a leading dim": lambda t: t.repeat(2, factor),
    }  # fmt: skip
    for name, move in moves.items():
        assert_moves_as_dense(values, "contiguous", move, name)


def test_a_move_past_the_tier_reads_each_page_once():
    """A 64-page table of a page a row on an 8-page tier: each op, however it moves rows (``repeat``
    writing each piece three times), faults in each of the 64 pages once."""
    values = torch.randn(64, 1024)
    moves: dict[str, Move] = {
        "flip(0)": lambda t: t.flip(0), "flip(1)": lambda t: t.flip(1), "roll along 0": lambda t: t.roll(37, 0),
        "roll along both": lambda t: t.roll((-5, 9), (0, 1)), "tril": lambda t: t.tril(3), "triu": lambda t: t.triu(-2),
        "repeat(3, 1)": lambda t: t.repeat(3, 1), "repeat(2, 1, 2)": lambda t: t.repeat(2, 1, 2), "tile(1, 2)": lambda t: t.tile(1, 2),
    }  # fmt: skip
    with make_pager() as pager:
        t = PagedTensor.wrap(values.clone(), pager)
        for name, move in moves.items():
            pager.evict_all()
            before = pager.stats()["faults"]
            assert same_bits(move(t), move(values)), name
            assert pager.stats()["faults"] - before == 64, name
            assert within_tier(pager)


def test_a_repeat_with_no_elements_reads_no_page():
    values = torch.randn(64, 1024)
    with make_pager() as pager:
        for t, dense in ((PagedTensor.wrap(values.clone(), pager), values), (PagedTensor.wrap(values.clone(), pager).T, values.T)):
            for factors in ((0, 1), (1, 0), (2, 0, 1)):
                pager.evict_all()
                before = pager.stats()["faults"]
                assert same_bits(t.repeat(*factors), dense.repeat(*factors)), factors
                assert pager.stats()["faults"] == before, factors


ERRORS: dict[str, Move] = {
    "flip of a dim out of range": lambda t: t.flip(5),
    "flip of a dim twice": lambda t: t.flip(0, -2),
    "roll of a dim out of range": lambda t: t.roll(1, 4),
    "roll of more shifts than dims": lambda t: t.roll((1, 2), (0,)),
    "roll of no shifts": lambda t: torch.ops.aten.roll.default(t, [], []),
    "repeat of fewer factors than dims": lambda t: t.repeat(2),
    "repeat of a negative factor": lambda t: t.repeat(-1, 1),
    "tril of a 1-D tensor": lambda t: t[:, 0].tril(),
    "triu of a 1-D tensor": lambda t: t.flatten().triu(1),
    "tril_ of a 1-D tensor": lambda t: t[:, 0].tril_(),
    "triu_ of a 1-D tensor": lambda t: t.flatten().triu_(1),
}


@pytest.mark.parametrize("name", ERRORS)
def test_torch_errors_come_before_any_page_is_read(name):
    """Past the tier: the dense op's exception type and text, no page faulted in, the table unchanged."""
    values = torch.randn(256, 64)
    with make_pager() as pager:
        t = PagedTensor.wrap(values.clone(), pager)
        with pytest.raises(Exception) as dense_error:
            ERRORS[name](values.clone())
        pager.evict_all()
        before = pager.stats()["faults"]
        with pytest.raises(type(dense_error.value)) as paged_error:
            ERRORS[name](t)
        assert str(paged_error.value) == str(dense_error.value)
        assert pager.stats()["faults"] == before
        assert torch.equal(t.materialize(), values)  # (the in-place ones wrote nothing)


@pytest.mark.parametrize("shape, dtype", [((256, 64), torch.float32), ((200, 3, 40), torch.float16), ((64, 512), torch.int64)])
@pytest.mark.parametrize("shift", [7, -1000, 12345, 0])
def test_the_flattened_roll_of_a_contiguous_table_runs_past_the_tier(shape, dtype, shift):
    """``t.roll(k)`` without dims: torch rolls the flattened view and views it back, and so do the
    pieces (a piece of the flat elements at a time, wrapping once)."""
    values = (torch.randn(shape, generator=torch.Generator().manual_seed(shift % 97)) * 50).to(dtype)
    with make_pager() as pager:
        t = PagedTensor.wrap(values.clone(), pager)
        assert values.numel() * values.element_size() > TIER_BYTES
        assert same_bits(t.roll(shift), values.roll(shift))
        assert within_tier(pager)


@pytest.mark.parametrize(
    "name, move",
    [
        ("roll without dims of t.T", lambda t: t.T.roll(7)),
        ("flip of rows larger than a piece", lambda t: t.reshape(2, 8192).flip(0)),
        ("flip of rows larger than a piece, t.T", lambda t: t.reshape(2, 8192).T.flip(0)),
        ("tril of rows larger than a piece, t.T", lambda t: t.reshape(2, 8192).T.tril()),
        ("repeat of rows larger than a piece, t.T", lambda t: t.reshape(2, 8192).T.repeat(2, 1)),
    ],
)
def test_forms_that_do_not_run_in_pieces_still_raise(name, move):
    """A flattened ``roll`` of a non-contiguous table, and a table whose outermost dim's rows each span more
    than a piece (two rows of eight pages), in any order of its dims: still OutOfPagesError."""
    with make_pager() as pager:
        t = PagedTensor.wrap(torch.randn(256, 64), pager)
        with pytest.raises(OutOfPagesError):
            move(t)
        assert within_tier(pager)


def test_moves_that_fit_the_tier_keep_the_generic_path(monkeypatch):
    """A table that fits runs the op once on its pages: the piece paths stay out."""
    import pagedtensor.handlers.row_moves as row_moves

    def refuse(*args, **kwargs):
        raise AssertionError("past-the-tier path taken for a table that fits")

    monkeypatch.setattr(row_moves, "_run_in_row_pieces", refuse)
    monkeypatch.setattr(row_moves, "_run_moving_rows", refuse)
    monkeypatch.setattr(row_moves, "_check_as_torch_does", refuse)
    values = torch.randn(4, 512)
    with make_pager() as pager:
        transposed = values.T.contiguous()
        for paged, dense in ((PagedTensor.wrap(values.clone(), pager), values), (PagedTensor.wrap(transposed.clone(), pager).T, transposed.T)):
            for name, move in EVERY_MOVE.items():
                assert same_bits(move(paged), move(dense)), name


EVERY_MOVE: dict[str, Move] = {
    "flip(0)": lambda t: t.flip(0), "flip(-1)": lambda t: t.flip(-1), "roll along 0": lambda t: t.roll(5, 0),
    "roll along 1": lambda t: t.roll(-3, 1), "roll without dims": lambda t: t.roll(7), "tril": lambda t: t.tril(),
    "triu(1)": lambda t: t.triu(1), "repeat(2, 1)": lambda t: t.repeat(2, 1), "repeat(2, 1, 3)": lambda t: t.repeat(2, 1, 3),
    "tile(1, 2)": lambda t: t.tile(1, 2),
}  # fmt: skip


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_every_move_past_the_tier_on_each_device(device):
    """Each op (the flattened roll on the contiguous table only) on a table of 4 to 16 times an 8-page tier, a float and an
    integer one, contiguous and transposed (``t.T``: the op on its dims ordered outermost first)."""
    with make_pager(device) as pager:
        for dtype in (torch.float16, torch.int64):
            values = (torch.randn(256 * 8 // dtype.itemsize, 64, generator=torch.Generator().manual_seed(3)) * 50).to(dtype).to(device)
            for transposed in (False, True):
                dense = values.T.contiguous().T if transposed else values
                t = PagedTensor.wrap(values.T.contiguous(), pager).T if transposed else PagedTensor.wrap(values.clone(), pager)
                for name, move in EVERY_MOVE.items():
                    if name == "roll without dims" and transposed:
                        continue  # torch rolls a flattened copy: still OutOfPagesError
                    assert same_bits(move(t), move(dense)), (name, dtype, transposed)
                    assert within_tier(pager)




MOVES_OF_3D: dict[str, Move] = {
    "flip(0)": lambda t: t.flip(0), "flip(0, 1, 2)": lambda t: t.flip(0, 1, 2), "flip()": lambda t: t.flip([]),
    "roll along 0": lambda t: t.roll(5, 0), "roll along 2": lambda t: t.roll(-3, 2), "tril(1)": lambda t: t.tril(1),
    "triu(-1)": lambda t: t.triu(-1), "repeat(2, 1, 1)": lambda t: t.repeat(2, 1, 1), "repeat(1, 3, 1)": lambda t: t.repeat(1, 3, 1),
    "repeat(1, 2, 1, 1)": lambda t: t.repeat(1, 2, 1, 1), "repeat(0, 1, 1, 1)": lambda t: t.repeat(0, 1, 1, 1), "tile(2,)": lambda t: t.tile(2),
}  # fmt: skip


@pytest.mark.parametrize("memory_order", [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)])
@pytest.mark.parametrize("shape", [(2048, 1, 8), (1, 2048, 8), (2048, 8, 1), (1, 1, 16384), (8, 2048, 1)])
def test_each_layout_with_dims_of_one_element_keeps_the_dense_strides(shape, memory_order):
    """A 16-page table in each order of its dims in memory, dense or a column slice, dims of one
    element among them: ``flip`` keeps the table's strides (a dim of one element too, as torch's
    ``empty_like``) where the table is dense, ``tril``/``triu``/``repeat`` are contiguous; each
    result's strides are the dense op's."""
    inverse = sorted(range(3), key=memory_order.__getitem__)
    for sliced in (False, True):
        stored = [shape[d] for d in memory_order]
        stored[-1] += 2 if sliced else 0
        base = torch.randn(stored, generator=torch.Generator().manual_seed(5))
        kept = (..., slice(0, shape[memory_order[-1]]))
        with make_pager() as pager:
            t, dense = PagedTensor.wrap(base.clone(), pager)[kept].permute(inverse), base[kept].permute(inverse)
            for name, move in MOVES_OF_3D.items():
                assert same_bits(move(t), move(dense)), (name, sliced, dense.stride())
                assert within_tier(pager)


ROLLS_OF_A_BATCH = [(0, 0), (2, 0), (3, 0), (5, 0), (-5, 0), (7, 0), (10, 0), (4, 1), (8, 1), (-3, 3), (30, 3), ((5, 2), (0, 3)),
                    ((2, 5), (0, 3)), ((5, 30), (0, 3)), ((1, 4), (0, 0)), ((3, 2), (0, 0)), ((2, 3), (1, 0)), ((8, 5), (1, 0))]  # fmt: skip


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last, "batch last"])
@pytest.mark.parametrize("shifts, dims", ROLLS_OF_A_BATCH)
def test_a_roll_of_a_batch_past_the_tier_keeps_the_dense_strides(memory_format, shifts, dims):
    """torch's CPU ``roll`` along one dim clones (contiguous) where the shift is a multiple of the
    dim's size, else concatenates the two parts (a channels_last table's layout kept), and rolls
    along several dims one after another: a batch of 5 images (a stand-in of 2 would tell shifts
    of 2 and 3 otherwise), channels_last or its batch dim the innermost but for the channels'
    (dim 0 not the outermost: the op on its dims ordered outermost first), rolled along dim 0
    and others: the dense op's values and strides."""
    values = torch.randn(5, 8, 20, 30, generator=torch.Generator().manual_seed(7))
    if memory_format == "batch last":
        values = values.permute(1, 2, 3, 0).contiguous().permute(3, 0, 1, 2)
    else:
        values = values.contiguous(memory_format=memory_format)
    with make_pager() as pager:
        t = PagedTensor.wrap(values, pager)
        assert same_bits(t.roll(shifts, dims), values.roll(shifts, dims)), values.roll(shifts, dims).stride()
        assert within_tier(pager)


# ------------------------------------------------------------------ tril_/triu_ in place past the tier

TRIANGLES_IN_PLACE: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "tril_": lambda t, diagonal: t.tril_(diagonal),
    "triu_": lambda t, diagonal: t.triu_(diagonal),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@settings(SETTINGS, max_examples=5)
@given(data=st.data())
def test_tril_and_triu_in_place_past_the_tier_give_the_dense_result(layout, data):
    """In place, a piece of rows at a time: the table's own view returned, its values and layout the
    dense in-place op's, the device tier within its budget."""
    values = data.draw(tables(layout))
    rows, columns = values.shape[-2:]
    diagonal = data.draw(st.integers(-rows - 2, columns + 2) | st.integers(-8, 8))
    name = data.draw(st.sampled_from(sorted(TRIANGLES_IN_PLACE)))
    with make_pager() as pager:
        paged, dense = paged_and_dense(values, layout, pager)
        assert TRIANGLES_IN_PLACE[name](paged, diagonal) is paged
        TRIANGLES_IN_PLACE[name](dense, diagonal)
        assert same_bits(paged.materialize(), dense), (name, diagonal, layout, values.dtype, tuple(values.shape))
        assert within_tier(pager)


def test_tril_and_triu_in_place_past_the_tier_read_and_write_each_page_once():
    """A 64-page table of a page a row on an 8-page tier: each page faulted in once per op, the
    columns beside a column slice left as they were."""
    values = torch.randn(64, 1024)
    with make_pager() as pager:
        t = PagedTensor.wrap(values.clone(), pager)
        dense = values.clone()
        for name, diagonal in (("tril_", 3), ("triu_", -2), ("tril_", -700), ("triu_", 1000)):
            pager.evict_all()
            before = pager.stats()["faults"]
            TRIANGLES_IN_PLACE[name](t, diagonal)
            TRIANGLES_IN_PLACE[name](dense, diagonal)
            assert pager.stats()["faults"] - before == 64, name
            assert within_tier(pager)
        assert same_bits(t.materialize(), dense)
        base = PagedTensor.wrap(values.clone(), pager)
        base[:, :1000].triu_(5)
        expected = values.clone()
        expected[:, :1000].triu_(5)
        assert same_bits(base.materialize(), expected)


@pytest.mark.parametrize(
    "name, move",
    [
        ("tril_ of rows larger than a piece, t.T", lambda t: t.reshape(2, 8192).T.tril_()),
        ("triu_ of an expanded table", lambda t: t[:, :1].expand(256, 64).triu_()),
    ],
)
def test_in_place_forms_that_do_not_run_in_pieces_still_raise(name, move):
    """Rows each larger than a piece, or elements that overlap (a piece would write another's):
    still OutOfPagesError, nothing written."""
    values = torch.randn(256, 64)
    with make_pager() as pager:
        t = PagedTensor.wrap(values.clone(), pager)
        with pytest.raises(OutOfPagesError):
            move(t)
        assert torch.equal(t.materialize(), values)
        assert within_tier(pager)


# ------------------------------------------------------------------ out= forms past the tier

aten = torch.ops.aten

OutMove = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

OUT_MOVES: dict[str, OutMove] = {
    "flip(0)": lambda t, out: aten.flip.out(t, [0], out=out),
    "flip(-1)": lambda t, out: aten.flip.out(t, [-1], out=out),
    "roll along 0": lambda t, out: aten.roll.out(t, [37], [0], out=out),
    "roll along both": lambda t, out: aten.roll.out(t, [-5, 9], [0, -1], out=out),
    "roll without dims": lambda t, out: aten.roll.out(t, [12345], out=out),
    "tril(3)": lambda t, out: torch.tril(t, 3, out=out),
    "triu(-2)": lambda t, out: torch.triu(t, -2, out=out),
    "repeat(2, 1)": lambda t, out: aten.repeat.out(t, [2, 1], out=out),
    "repeat(2, 1, 3)": lambda t, out: aten.repeat.out(t, [2, 1, 3], out=out),
    "repeat(0, 1)": lambda t, out: aten.repeat.out(t, [0, 1], out=out),
}

OUT_KINDS = ("empty", "right shape", "right shape, strides reversed", "another shape", "paged, right shape")


def make_out(kind: str, shape: tuple[int, ...], dtype: torch.dtype, pager) -> torch.Tensor:
    """An ``out`` of ``kind`` holding a value none of the moves here makes (every element written)."""
    full = lambda size: torch.full(size, True if dtype == torch.bool else 123, dtype=dtype)
    if kind == "empty":
        return torch.empty(0, dtype=dtype)
    if kind == "right shape":
        return full(shape)
    if kind == "right shape, strides reversed":
        return full(shape[::-1]).permute(*reversed(range(len(shape))))
    if kind == "another shape":
        return full((3,))
    return PagedTensor.wrap(full(shape), pager)


def run_out(move: OutMove, table: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """``move`` into ``out``, which it must return: ``out`` made plain and the warnings' texts."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        returned = move(table, out)
    assert returned is out
    return (out.materialize() if isinstance(out, PagedTensor) else out), [str(w.message) for w in caught]


def resize_warning(before: tuple[int, ...], shape: tuple[int, ...]) -> str:
    return (f"An output with one or more elements was resized since it had shape {list(before)}, which does not match "
            f"the required output shape {list(shape)}. This behavior is deprecated, and in a future PyTorch release "
            "outputs will not be resized unless they have zero elements. You can explicitly reuse an out tensor t "
            "by resizing it, inplace, to zero elements with t.resize_(0).")  # fmt: skip


@pytest.mark.parametrize("layout", ("contiguous", "first dims swapped", "column slice"))
@settings(SETTINGS, max_examples=2)
@given(data=st.data())
def test_move_outs_past_the_tier_leave_out_as_the_dense_op_does(layout, data):
    """Each ``out=`` form (the flattened roll on a contiguous table only) into a kind of ``out``, the
    kinds taken in turn from a drawn one (each kind twice an example): ``out`` ends as the dense op leaves it (values, shape, strides: a plain ``out`` of another shape
    resized contiguous, with torch's warning), the op returns it, the device tier within budget."""
    dtype = data.draw(st.sampled_from(DTYPES))
    shape = long_dim_outermost((4 * TIER_BYTES // dtype.itemsize // 64, 64), layout)  # t.T for "first dims swapped"
    values = torch.randn(shape, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 99))))
    values = (values > 0) if dtype == torch.bool else (values * 50).to(dtype)
    first_kind = data.draw(st.integers(0, len(OUT_KINDS) - 1))
    with make_pager() as pager:
        paged, dense = paged_and_dense(values, layout, pager)
        for number, (name, move) in enumerate(OUT_MOVES.items()):
            kind = OUT_KINDS[(first_kind + number) % len(OUT_KINDS)]
            if name == "roll without dims" and layout != "contiguous":
                continue  # torch rolls a flattened copy: still OutOfPagesError
            shape = tuple(move(dense, torch.empty(0, dtype=dtype)).shape)
            expected, _ = run_out(move, dense, make_out("right shape" if kind.startswith("paged") else kind, shape, dtype, pager))
            got, warned = run_out(move, paged, make_out(kind, shape, dtype, pager))
            assert same_bits(got, expected), (name, kind, layout, dtype)
            assert warned == ([resize_warning((3,), shape)] if kind == "another shape" else []), name
            assert within_tier(pager)


def test_a_move_into_out_past_the_tier_reads_each_page_once():
    values = torch.randn(64, 1024)
    with make_pager() as pager:
        t = PagedTensor.wrap(values.clone(), pager)
        for name, move in OUT_MOVES.items():
            pager.evict_all()
            before = pager.stats()["faults"]
            got, _ = run_out(move, t, torch.empty(0))
            expected, _ = run_out(move, values, torch.empty(0))
            assert same_bits(got, expected), name
            assert pager.stats()["faults"] - before == (0 if name == "repeat(0, 1)" else 64), name


def test_a_paged_out_larger_than_the_tier_is_written_a_piece_at_a_time():
    """A 16-page table flipped, rolled, made triangular and repeated into a PagedTensor ``out``, and
    ``tril``/``triu`` into the table itself (in place, as torch runs it)."""
    values = torch.randn(4096, 16)
    with make_pager() as pager:
        t = PagedTensor.wrap(values.clone(), pager)
        for name in ("flip(0)", "roll along both", "tril(3)", "triu(-2)"):
            out = PagedTensor.wrap(torch.zeros(4096, 16), pager)
            assert same_bits(run_out(OUT_MOVES[name], t, out)[0], run_out(OUT_MOVES[name], values, torch.empty(0))[0]), name
            assert within_tier(pager)
        for name in ("tril(3)", "triu(-2)"):
            dense = values.clone()
            run_out(OUT_MOVES[name], t, t)
            run_out(OUT_MOVES[name], dense, dense)
            assert same_bits(t.materialize(), dense), name
            values = dense


def test_a_flip_into_a_view_of_its_table_past_the_tier_runs_as_the_dense_one():
    """torch's autogenerated ``out=`` kernels run the op into a temporary, then copy: an ``out``
    overlapping the table is no error, and the result is the dense one."""
    values = torch.randn(64, 1024)
    with make_pager() as pager:
        t = PagedTensor.wrap(values.clone(), pager)
        dense = values.clone()
        aten.flip.out(dense[:40], [0], out=dense[20:60])
        aten.flip.out(t[:40], [0], out=t[20:60])
        assert same_bits(t.materialize(), dense)


def test_a_paged_out_of_another_shape_past_the_tier_is_refused():
    with make_pager() as pager:
        t = PagedTensor.wrap(torch.randn(64, 1024), pager)
        out = PagedTensor.wrap(torch.full((3, 1024), 7.0), pager)
        with pytest.raises(NotImplementedError, match=r"would resize its PagedTensor output from \[3, 1024\] to \[128, 1024\]"):
            aten.repeat.out(t, [2, 1], out=out)
        assert torch.equal(out.materialize(), torch.full((3, 1024), 7.0))


OUT_ERRORS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "flip, out of another dtype": lambda t: aten.flip.out(t, [0], out=torch.empty(0, dtype=torch.float64)),
    "roll, out of another dtype": lambda t: aten.roll.out(t, [1], [0], out=torch.empty(0, dtype=torch.int64)),
    "tril, out of another dtype": lambda t: torch.tril(t, out=torch.empty(0, dtype=torch.float16)),
    "repeat, out of another dtype": lambda t: aten.repeat.out(t, [2, 1], out=torch.empty(0, dtype=torch.bool)),
    "flip of a dim out of range": lambda t: aten.flip.out(t, [5], out=torch.empty(0)),
    "roll of more shifts than dims": lambda t: aten.roll.out(t, [1, 2], [0], out=torch.empty(0)),
    "repeat of fewer factors than dims": lambda t: aten.repeat.out(t, [2], out=torch.empty(0)),
    "triu of a 1-D tensor": lambda t: torch.triu(t[:, 0], out=torch.empty(0)),
    "flip, out overlapping itself": lambda t: aten.flip.out(t, [0], out=torch.empty(1).expand(256, 64)),
    "repeat, out overlapping itself": lambda t: aten.repeat.out(t, [1, 2], out=torch.empty(1, 1).expand(256, 128)),
}


@pytest.mark.parametrize("name", OUT_ERRORS)
def test_bad_move_outs_past_the_tier_raise_the_dense_error_before_any_page_is_read(name):
    """The dense op's exception type and first line; no page faulted in for the argument checks,
    nothing written to the table."""
    values = torch.randn(256, 64)
    with make_pager() as pager:
        t = PagedTensor.wrap(values.clone(), pager)
        with pytest.raises(Exception) as dense_error:
            OUT_ERRORS[name](values)
        pager.evict_all()
        before = pager.stats()["faults"]
        with pytest.raises(type(dense_error.value)) as paged_error:
            OUT_ERRORS[name](t)
        assert str(dense_error.value).splitlines()[0] in str(paged_error.value)
        if "overlapping" not in name:  # torch checks out's overlap after running the op
            assert pager.stats()["faults"] == before
        assert torch.equal(t.materialize(), values)


@pytest.mark.parametrize(
    "name, move",
    [
        ("tril into an out overlapping itself", lambda t: torch.tril(t, out=torch.empty(1).expand(256, 64))),
        ("triu into rows of its table moved by one", lambda t: torch.triu(t[:128], out=t[1:129])),
    ],
)
def test_triangle_outs_torch_writes_unchecked_still_raise(name, move):
    """torch's ``tril``/``triu`` kernels write an ``out`` overlapping itself, or the table's rows
    after reading some already written, without error: no piece reproduces that order, so
    OutOfPagesError, nothing written."""
    values = torch.randn(256, 64)
    with make_pager() as pager:
        t = PagedTensor.wrap(values.clone(), pager)
        with pytest.raises(OutOfPagesError):
            move(t)
        assert torch.equal(t.materialize(), values)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_in_place_and_out_moves_past_the_tier_on_each_device(device):
    """``tril_``/``triu_`` and each ``out=`` form on a table of 8 times an 8-page tier, a float one
    into an empty ``out`` and an integer one into a PagedTensor ``out``, contiguous and transposed."""
    with make_pager(device) as pager:
        for dtype in (torch.float16, torch.int64):
            values = (torch.randn(256 * 8 // dtype.itemsize, 64, generator=torch.Generator().manual_seed(3)) * 50).to(dtype).to(device)
            for transposed in (False, True):
                dense = values.T.contiguous().T if transposed else values.clone()
                t = PagedTensor.wrap(values.T.contiguous(), pager).T if transposed else PagedTensor.wrap(values.clone(), pager)
                for name, move in OUT_MOVES.items():
                    if name == "roll without dims" and transposed:
                        continue
                    expected = move(dense, torch.empty(0, dtype=dtype, device=device))
                    out = torch.empty(0, dtype=dtype, device=device)
                    if dtype == torch.int64:
                        out = PagedTensor.wrap(torch.zeros(expected.shape, dtype=dtype, device=device), pager)
                    got, _ = run_out(move, t, out)
                    assert same_bits(got, expected), (name, dtype, transposed)
                    assert within_tier(pager)
                for name, diagonal in (("tril_", 5), ("triu_", -3)):
                    assert TRIANGLES_IN_PLACE[name](t, diagonal) is t
                    TRIANGLES_IN_PLACE[name](dense, diagonal)
                    assert same_bits(t.materialize(), dense), (name, dtype, transposed)
                    assert within_tier(pager)


@pytest.mark.parametrize("memory_order", [(1, 0, 2, 3), (1, 2, 0, 3), (2, 0, 1, 3), (3, 1, 0, 2)])
@pytest.mark.parametrize("name", ["tril", "triu", "tril_", "triu_"])
def test_triangles_of_4d_tables_whose_outermost_dim_is_not_dim_0(memory_order, name):
    """A 4-D table laid out with dim 1, 2 or 3 outermost in memory (a batch dim, or one of the
    matrix's): the triangles, and in place, give the dense op's bits, the tier within its budget."""
    memory_shape = (6 * TIER_BYTES // (4 * 3 * 5 * 7), 3, 5, 7)  # float32, 6 device tiers
    inverse = sorted(range(4), key=memory_order.__getitem__)
    base = torch.randn(memory_shape, generator=torch.Generator().manual_seed(3))
    for diagonal in (-3, 0, 2):
        with make_pager() as pager:
            paged = PagedTensor.wrap(base.clone(), pager).permute(inverse)
            dense = base.clone().permute(inverse)
            assert paged.dim_order() == dense.dim_order() == memory_order
            if name.endswith("_"):
                assert TRIANGLES_IN_PLACE[name](paged, diagonal) is paged
                TRIANGLES_IN_PLACE[name](dense, diagonal)
                got = paged.materialize()
            else:
                got, dense = getattr(torch, name)(paged, diagonal), getattr(torch, name)(dense, diagonal)
            assert same_bits(got, dense), (name, memory_order, diagonal)
            assert within_tier(pager)
