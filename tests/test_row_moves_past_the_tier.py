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
from typing import Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagedtensor import OutOfPagesError, PagedTensor
from tests.test_copy_ops_in_pieces import TIER_BYTES, make_pager, same_bits, within_tier
from tests.test_gathers_past_the_tier import LAYOUTS, long_dim_outermost, paged_and_dense

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
}


@pytest.mark.parametrize("name", ERRORS)
def test_torch_errors_come_before_any_page_is_read(name):
    """Past the tier: the dense op's exception type and text, no page faulted in."""
    values = torch.randn(256, 64)
    with make_pager() as pager:
        t = PagedTensor.wrap(values.clone(), pager)
        with pytest.raises(Exception) as dense_error:
            ERRORS[name](values)
        pager.evict_all()
        before = pager.stats()["faults"]
        with pytest.raises(type(dense_error.value)) as paged_error:
            ERRORS[name](t)
        assert str(paged_error.value) == str(dense_error.value)
        assert pager.stats()["faults"] == before


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


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
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
