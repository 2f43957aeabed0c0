"""``nonzero`` (``torch.nonzero``, ``torch.argwhere``, ``torch.where(cond)``) of a PagedTensor larger
than the device tier runs a piece of rows at a time (``pagedtensor/handlers/nonzero.py``): the dense
op's indices, order and layout, the device tier never over its budget."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagedtensor import MemoryConfig, OutOfPagesError, PagedTensor, Pager
from tests.support import CPU_AND_CUDA

PAGE = 4096
DEVICE_PAGES = 8


def make_pager(device: str = "cpu") -> Pager:
    return Pager(MemoryConfig(vram_limit=DEVICE_PAGES * PAGE, host_memory=512 * PAGE, page_size=PAGE, slab_size=512 * PAGE,
                              prefetch_strategy="none", device=device))  # fmt: skip


def sparse_values(shape: tuple[int, ...], dtype: torch.dtype, density: float, generator: torch.Generator) -> torch.Tensor:
    """Values of ``dtype`` nonzero with probability ``density`` (NaN and -0.0 among the floats)."""
    keep = torch.rand(shape, generator=generator) < density
    if dtype == torch.bool:
        return keep
    values = torch.randint(1, 100, shape, generator=generator).to(dtype) * keep
    if dtype.is_floating_point and values.numel() > 2:
        values.view(-1)[0], values.view(-1)[-1] = float("nan"), -0.0  # NaN is nonzero, -0.0 is zero
    return values


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.int64, torch.uint8, torch.bool]),
    dims=st.integers(1, 3),
    density=st.sampled_from([0.0, 0.01, 0.3, 1.0]),
    layout=st.sampled_from(["contiguous", "offset view", "column slice", "every other row"]),
    seed=st.integers(0, 2**16),
)
def test_nonzero_of_tables_larger_than_the_device_tier_equals_dense(data, dtype, dims, density, layout, seed):
    """Random tables of 1 to 3 dims and densities, in four layouts whose dim 0 is outermost: the
    dense op's indices in its order and layout; ``argwhere`` and ``where(cond)`` too."""
    inner = data.draw(st.lists(st.integers(1, 40), min_size=dims - 1, max_size=dims - 1), label="inner dims")
    row_bytes = max(1, int(torch.tensor(inner).prod())) * dtype.itemsize
    rows = data.draw(st.integers(2 * DEVICE_PAGES * PAGE // row_bytes + 2, 3 * DEVICE_PAGES * PAGE // row_bytes + 8), label="rows")
    generator = torch.Generator().manual_seed(seed)
    base = sparse_values((rows + 1, *inner), dtype, density, generator)
    view = {
        "contiguous": lambda t: t,
        "offset view": lambda t: t[1:],
        "column slice": lambda t: t[:, 1:] if t.dim() > 1 and t.shape[1] > 1 else t[1:],
        "every other row": lambda t: t[::2],
    }[layout]
    with make_pager() as pager:
        table = view(PagedTensor.wrap(base.clone(), pager))
        expected_table = view(base)
        for op in (torch.nonzero, torch.argwhere, lambda t: torch.where(t)):
            got, expected = op(table), op(expected_table)
            for got_one, expected_one in zip(*((got, expected) if isinstance(got, tuple) else ((got,), (expected,)))):
                assert type(got_one) is torch.Tensor
                assert (got_one.shape, got_one.stride(), got_one.dtype) == (expected_one.shape, expected_one.stride(), expected_one.dtype)
                assert torch.equal(got_one, expected_one)
        assert pager.stats()["resident_bytes"]["device"] <= DEVICE_PAGES * PAGE


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_nonzero_past_the_tier_runs_a_piece_of_rows_at_a_time(device):
    """A 64 x 256 float table (16 pages, the device tier 8): ``nonzero`` gives the dense op's
    indices and layout (it raised ``DeviceTierFullError``); a transposed one, whose every row spans
    the table, still raises naming the op; one that fits runs at once."""
    x = torch.zeros(64, 256, device=device)
    x[[0, 5, 5, 33, 63], [1, 0, 255, 7, 255]] = torch.tensor([1.0, float("nan"), -2.0, 3.0, 4.0], device=device)
    with make_pager(device) as pager:
        table = PagedTensor.wrap(x.clone(), pager)
        pager.evict_all()
        before = pager.stats()["faults"]
        got, expected = table.nonzero(), x.nonzero()
        assert got.stride() == expected.stride() and torch.equal(got, expected)
        assert pager.stats()["faults"] - before == 16  # every page once
        with pytest.raises(OutOfPagesError, match="aten.nonzero.default"):
            table.t().nonzero()
        assert torch.equal(table[:16].nonzero(), x[:16].nonzero())


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_nonzero_of_rows_wider_than_a_piece_and_into_out(device):
    """A contiguous table whose rows are each wider than a piece (it raised DeviceTierFullError,
    where reductions cut such rows): ``nonzero`` of it flat, a piece of elements at a time, each
    flat index turned into its coordinates, in the dense op's order. And ``torch.nonzero(t, out=o)``
    past the tier (it raised: no handler for the out= form): the dense op's indices in ``o``,
    resized as torch resizes it."""
    generator = torch.Generator().manual_seed(0)
    with make_pager(device) as pager:
        for shape in ((2, 20000), (3, 2, 7000), (1000, 40)):
            values = (torch.rand(shape, generator=generator) > 0.8).float().to(device)
            paged = PagedTensor.wrap(values.clone(), pager)
            for op in (torch.nonzero, torch.argwhere):
                got, expected = op(paged), op(values)
                assert type(got) is torch.Tensor and torch.equal(got, expected) and got.stride() == expected.stride(), shape
            assert all(torch.equal(a, b) for a, b in zip(torch.where(paged > 0.5), torch.where(values > 0.5)))
            for out in (torch.empty(0, dtype=torch.long, device=device), torch.full((3, 5), 7, dtype=torch.long, device=device)):
                expected_out = out.clone()
                torch.nonzero(values, out=expected_out)
                returned = torch.nonzero(paged, out=out)
                assert returned is out and torch.equal(out, expected_out) and out.stride() == expected_out.stride(), shape
            assert torch.equal(paged.materialize(), values)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_nonzero_past_the_tier_into_an_out_of_the_results_shape_keeps_its_strides(device):
    """An ``o`` of the result's shape is written as it is laid out, as torch writes it: it was
    restrided column-major, so a row-major ``o`` came back with other strides and an ``o`` viewing
    columns of a larger buffer had its indices written over other elements of the buffer."""
    values = (torch.rand(64, 256, generator=torch.Generator().manual_seed(1)) > 0.9).float().to(device)  # 16 pages
    count = int(values.count_nonzero())
    with make_pager(device) as pager:
        paged = PagedTensor.wrap(values.clone(), pager)
        out, expected = (torch.empty(count, 2, dtype=torch.long, device=device) for _ in range(2))
        torch.nonzero(values, out=expected)
        assert torch.nonzero(paged, out=out) is out
        assert out.stride() == expected.stride() and torch.equal(out, expected)
        buffer, expected_buffer = (torch.full((count, 4), -1, dtype=torch.long, device=device) for _ in range(2))
        torch.nonzero(values, out=expected_buffer[:, 1:3])
        torch.nonzero(paged, out=buffer[:, 1:3])
        assert torch.equal(buffer, expected_buffer)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_nonzero_past_the_tier_into_an_out_of_another_dtype_raises_torchs_error(device):
    """``torch.nonzero(t, out=o)`` past the tier with an ``o`` not of int64 raises torch's error (it
    raised DeviceTierFullError, having sent ``o`` the generic way), and writes nothing."""
    values = (torch.rand(64, 256, generator=torch.Generator().manual_seed(5)) > 0.5).float().to(device)  # 16 pages
    with make_pager(device) as pager:
        paged = PagedTensor.wrap(values.clone(), pager)
        for dtype in (torch.int32, torch.float32):
            with pytest.raises(RuntimeError) as error:
                torch.nonzero(values, out=torch.empty(0, dtype=dtype, device=device))
            out = torch.full((2, 3), 7, dtype=dtype, device=device)
            with pytest.raises(RuntimeError) as caught:
                torch.nonzero(paged, out=out)
            assert str(caught.value) == str(error.value) and torch.equal(out, torch.full((2, 3), 7, dtype=dtype, device=device))


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_nonzero_past_the_tier_of_a_table_of_many_dims_probes_a_small_stand_in(device):
    """The kernel's layout was probed on a stand-in of two elements along every dim: 2**24
    elements (3.6 GB and seconds) for a 40 KB table of 24 dims, and an allocation error at 40.
    One of two rows, laid out as the dense op's, for any number of dims."""
    generator = torch.Generator().manual_seed(3)
    with make_pager(device) as pager:
        for dims in (24, 40):
            shape = (2500,) + (2, 2) + (1,) * (dims - 3)
            values = (torch.rand(shape, generator=generator) > 0.5).float().to(device)
            paged = PagedTensor.wrap(values.clone(), pager)
            try:
                expected = torch.nonzero(values)
            except RuntimeError as error:  # CUDA's kernel takes 25 dims at most: the same error
                with pytest.raises(RuntimeError, match=str(error)):
                    torch.nonzero(paged)
                continue
            got = torch.nonzero(paged)
            assert torch.equal(got, expected) and got.stride() == expected.stride(), dims
            out, expected_out = (torch.empty(0, dtype=torch.long, device=device) for _ in range(2))
            torch.nonzero(values, out=expected_out)
            torch.nonzero(paged, out=out)
            assert torch.equal(out, expected_out) and out.stride() == expected_out.stride(), dims
