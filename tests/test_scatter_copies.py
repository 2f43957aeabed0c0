"""The out-of-place scatters (``t.index_put(...)``, ``t.masked_scatter(...)``, ``t.scatter(...)``, ...)
of a PagedTensor larger than the device tier (``scatter_into_a_copy`` in
``pagedtensor/handlers/scatter_copies.py``): a plain result with the dense op's bits and layout, the
table only read, torch's errors."""

from __future__ import annotations


import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagedtensor import PagedTensor
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


def out_of_place_call(op: str, shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator, device: str = "cpu"):
    """``(call, distinct)``: the out-of-place scatter ``op`` as a function of a table of ``shape``
    (positions drawn from ``generator``, values of ``dtype``), and whether its positions are distinct."""

    def values(*size: int) -> torch.Tensor:
        return random_values(size, dtype, generator).to(device)

    def addends(*size: int) -> torch.Tensor:  # halves (or integers): their sums are exact in any order (CUDA's are atomic)
        drawn = values(*size)
        return (drawn * 2).round() / 2 if dtype.is_floating_point else drawn

    def positions(size: int, count: int, distinct: bool = False) -> torch.Tensor:
        chosen = torch.randperm(size, generator=generator)[:count] if distinct else torch.randint(0, size, (count,), generator=generator)
        return chosen.to(device)

    rows, rest = shape[0], shape[1:]
    last = len(shape) - 1
    column = (*shape[:-1], 1)
    calls = {
        "index_put": lambda t: t.index_put((positions(rows, 3, distinct=True),), values(3, *rest)),
        "index_put accumulate": lambda t: t.index_put((positions(rows, 4),), addends(4, *rest), accumulate=True),
        "index_put by a mask": lambda t: t.index_put((torch.rand(shape, generator=generator).to(device) < 0.3,), values(1)),
        "index_copy": lambda t: t.index_copy(last, positions(shape[-1], 2, distinct=True), values(*shape[:-1], 2)),
        "index_add": lambda t: t.index_add(0, positions(rows, 3), addends(3, *rest)),
        "index_fill": lambda t: t.index_fill(last, positions(shape[-1], 2), 1),
        "masked_scatter": lambda t: t.masked_scatter(torch.rand(shape, generator=generator).to(device) < 0.5, values(t.numel())),
        "put": lambda t: t.put(positions(t.numel(), 5, distinct=True), values(5)),
        "scatter": lambda t: t.scatter(last, torch.zeros(column, dtype=torch.long, device=device), values(*column)),
        "scatter_add": lambda t: t.scatter_add(0, positions(rows, 2 * (t.numel() // rows)).view(2, *rest), addends(2, *rest)),
        "scatter_reduce": lambda t: t.scatter_reduce(last, torch.zeros(column, dtype=torch.long, device=device), values(*column), "amax"),
    }
    return calls[op]


OPS = ["index_put", "index_put accumulate", "index_put by a mask", "index_copy", "index_add", "index_fill", "masked_scatter", "put", "scatter",
       "scatter_add", "scatter_reduce"]  # fmt: skip


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    op=st.sampled_from(OPS),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.int64]),
    three_dims=st.booleans(),
    permuted=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_out_of_place_scatters_past_the_tier_equal_dense(data, op, dtype, three_dims, permuted, seed):
    """Each out-of-place scatter of a random table (rows, or transposed or permuted) of 2 to 6 times
    the device tier (they raised DeviceTierFullError): a plain tensor with the dense op's bits,
    shape and strides; the table keeps its bytes; the device tier's budget holds. Repeated places of
    the sums add halves or integers, exact in any order (CUDA adds them by atomics)."""
    memory_shape, order, _ = permuted_table(data, dtype, three_dims)
    if not permuted:
        order = list(range(len(memory_shape)))
    generator = torch.Generator().manual_seed(seed)
    base = random_values(memory_shape, dtype, generator)
    call = out_of_place_call(op, tuple(memory_shape[d] for d in order), dtype, generator)
    state = generator.get_state()

    def call_with_the_same_draws(table: torch.Tensor) -> torch.Tensor:  # the same positions and values for both tables
        generator.set_state(state)
        return call(table)

    assert_plain_result_equals_dense(base, order, call_with_the_same_draws)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_out_of_place_scatters_of_a_transposed_table_past_the_tier_equal_dense(device):
    """Each op on the transposed 256 x 64 view of a 16-page table (the tier 8): the dense op's bits
    and layout, the table unchanged."""
    for op in OPS:
        generator = torch.Generator().manual_seed(11)
        call = out_of_place_call(op, (256, 64), torch.float32, generator, device)
        state = generator.get_state()
        expected = call(rows_tensor().to(device).t())
        generator.set_state(state)
        with make_pager(device=device) as pager:
            table = PagedTensor.wrap(rows_tensor().to(device), pager).t()
            result = call(table)
            assert result.stride() == expected.stride(), op
            assert same_bits(result, expected), op
            assert same_bits(table.t().materialize(), rows_tensor().to(device))
            assert pager.stats()["resident_bytes"]["device"] <= 8 * PAGE


BAD_CALLS = {  # on a 64 x 256 table (rows_tensor): torch's checks, each its own message
    "index_copy of another source shape": lambda t: t.index_copy(0, torch.tensor([1]), torch.ones(1, 3)),
    "index_add of another dtype": lambda t: t.index_add(0, torch.tensor([1]), torch.ones(1, 256, dtype=torch.float64)),
    "scatter along a dim out of range": lambda t: t.scatter(2, torch.zeros(1, 1, dtype=torch.long), 1.0),
    "masked_scatter of another source dtype": lambda t: t.masked_scatter(torch.ones(64, 256, dtype=torch.bool), torch.ones(10, dtype=torch.int64)),
    "index_put of values of another shape": lambda t: t.index_put((torch.tensor([0, 1]),), torch.ones(3, 256)),
    "index_put of more indices than dims": lambda t: t.index_put((torch.tensor([1]),) * 3, torch.tensor(1.0)),
    "index_copy out of bounds": lambda t: t.index_copy(0, torch.tensor([64]), torch.ones(1, 256)),
    "put out of range": lambda t: t.put(torch.tensor([64 * 256]), torch.ones(1)),
    "masked_scatter by a mask that does not broadcast": lambda t: t.masked_scatter(torch.ones(3, dtype=torch.bool), torch.ones(64 * 256)),
    "index_reduce by an unknown reduction": lambda t: t.index_reduce(0, torch.tensor([1]), torch.ones(1, 256), "sum"),
    "scatter_reduce by an unknown reduction": lambda t: t.scatter_reduce(0, torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1), "median"),
}


@pytest.mark.parametrize("name", sorted(BAD_CALLS))
def test_bad_out_of_place_scatters_raise_torchs_error_and_leave_the_table(name):
    """torch's own error type and message, before any page faults in; the table keeps its bytes."""
    assert_raises_as_dense(BAD_CALLS[name])


def test_a_table_that_fits_runs_the_generic_way():
    """A 4-page table (the tier 8) takes the generic way, with the same result."""
    with make_pager() as pager:
        small = rows_tensor(16)
        table = PagedTensor.wrap(small.clone(), pager)
        index = torch.tensor([3, 1])
        assert same_bits(table.index_copy(0, index, torch.ones(2, 256)), small.index_copy(0, index, torch.ones(2, 256)))


@pytest.mark.parametrize("op", ["index_add", "index_copy", "scatter_add", "masked_scatter", "index_put"])
def test_an_out_of_place_scatter_past_the_tier_reads_a_source_larger_than_the_tier(op):
    """The out-of-place scatters of a table past the device tier (the forms autograd runs) with a
    source (or index) that is a PagedTensor larger than the tier too raised DeviceTierFullError where
    the in-place form runs: the in-place op on the plain result took the generic way, all the
    source's pages at once (found by a helper's probe). The source is read into a plain copy first,
    as the result already is one."""
    generator = torch.Generator().manual_seed(0)
    table = torch.randn(128, 64, generator=generator)  # 8 pages; the tier holds 4
    rows = torch.randperm(128, generator=generator)[:100]
    source = torch.randn(100, 64, generator=generator)  # 7 pages
    calls = {
        "index_add": lambda t, s: t.index_add(0, rows, s),
        "index_copy": lambda t, s: t.index_copy(0, rows, s),
        "scatter_add": lambda t, s: t.scatter_add(0, rows[:, None].expand(100, 64), s),
        "masked_scatter": lambda t, s: t.masked_scatter(t > 0, torch.cat([s, s]).reshape(-1)),
        "index_put": lambda t, s: t.index_put((rows,), s),
    }
    with make_pager(device_pages=4) as pager:
        expected = calls[op](table, source)
        got = calls[op](PagedTensor.wrap(table, pager), PagedTensor.wrap(source, pager))
        assert same_bits(got, expected)


@pytest.mark.parametrize("form", ["t.index_put((torch.tensor(True),), v)", "t.index_put((torch.tensor(False),), v)",
                                  "t.index_put((rows,), t[5, 3])", "t.index_fill(0, rows, t[5, 3])", "t.index_fill(1, cols, t[5, 3])"])  # fmt: skip
def test_out_of_place_fills_by_a_0_dim_mask_or_an_element_of_the_table_past_the_tier(form):
    """The out-of-place forms of the in-place fills that raised past the tier (a 0-dim bool mask:
    IndexError; a value that is an element of the table itself: DeviceTierFullError; found by a
    helper's probe): the dense op's bits, the table unchanged."""
    rows, cols = torch.tensor([1, 40, 5]), torch.tensor([0, 3, 200])
    calls = {
        "t.index_put((torch.tensor(True),), v)": lambda t: t.index_put((torch.tensor(True),), torch.tensor(7.0)),
        "t.index_put((torch.tensor(False),), v)": lambda t: t.index_put((torch.tensor(False),), torch.tensor(7.0)),
        "t.index_put((rows,), t[5, 3])": lambda t: t.index_put((rows,), t[5, 3]),
        "t.index_fill(0, rows, t[5, 3])": lambda t: t.index_fill(0, rows, t[5, 3]),
        "t.index_fill(1, cols, t[5, 3])": lambda t: t.index_fill(1, cols, t[5, 3]),
    }
    assert_plain_result_equals_dense(rows_tensor(), [0, 1], calls[form])
