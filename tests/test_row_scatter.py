"""In-place row scatters on dim 0 of a PagedTensor larger than the device tier (``t[idx] = v``,
``index_put_``, ``index_copy_``, ``index_add_``, ``index_reduce_``, ``index_fill_``: ``scatter_rows`` in
``pagedtensor/handlers/row_scatters.py``): bitwise equal to the dense op, only the written rows' pages faulted
in, torch's own errors raised before any page is touched."""

from __future__ import annotations

import math
import re
from typing import Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagedtensor import MemoryConfig, OutOfPagesError, PagedTensor, Pager
from tests.support import CPU_AND_CUDA

PAGE = 4096


def make_pager(device_pages: int = 8, device: str = "cpu") -> Pager:
    return Pager(MemoryConfig(vram_limit=device_pages * PAGE, host_memory=512 * PAGE, page_size=PAGE, slab_size=512 * PAGE,
                              prefetch_strategy="none", device=device))  # fmt: skip


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.is_floating_point:
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.contiguous().view(bits), b.contiguous().view(bits))
    return torch.equal(a, b)


def random_values(shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape, generator=generator) < 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(dtype)
    return torch.randint(-1000, 1000, shape, generator=generator, dtype=dtype)


def scatter(op: str, table: torch.Tensor, index: torch.Tensor, values: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Run the row scatter ``op`` on ``table`` (dense or paged) in place; returns what the op returned."""
    alpha = -0.5 if table.dtype.is_floating_point else 3
    if op == "setitem":
        table[index] = values
        return table
    return {
        "index_put": lambda: table.index_put_((index,), values),
        "index_put_accumulate": lambda: table.index_put_((index,), values, accumulate=True),
        "index_copy": lambda: table.index_copy_(0, index, values),
        "index_add": lambda: table.index_add_(0, index, values, alpha=alpha),
        "index_reduce_prod": lambda: table.index_reduce_(0, index, values, "prod"),
        "index_reduce_mean": lambda: table.index_reduce_(0, index, values, "mean"),
        "index_reduce_amax": lambda: table.index_reduce_(0, index, values, "amax", include_self=False),
        "index_fill_scalar": lambda: table.index_fill_(-table.dim(), index, 1.5 if table.dtype.is_floating_point else 7),
        "index_fill_tensor": lambda: table.index_fill_(0, index, value),
    }[op]()


OPS = ["setitem", "index_put", "index_put_accumulate", "index_copy", "index_add", "index_reduce_prod", "index_reduce_mean",
       "index_reduce_amax", "index_fill_scalar", "index_fill_tensor"]  # fmt: skip
# torch leaves undefined which value a row written twice keeps for index_copy_ and index_put_ without
# accumulate: its CPU kernel's order depends on the table's layout (a repeated row of a one-row table
# came out half of one value, half of another), so those draw distinct rows only (negative ones too).
DISTINCT_ONLY = {"index_copy", "index_put", "setitem"}
NEGATIVE_ALLOWED = {"setitem", "index_put", "index_put_accumulate", "index_fill_scalar", "index_fill_tensor"}


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    cols=st.sampled_from([300, 700, 1500, 2000]),  # rows of 600 B to 16 KB: smaller and larger than a page
    dtype=st.sampled_from([torch.float32, torch.float16, torch.int64]),
    device_pages=st.integers(6, 8),
    offset=st.integers(0, 1),  # a table starting a row into its allocation: rows not page-aligned
    op=st.sampled_from(OPS),
    broadcast=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_row_scatters_on_tables_larger_than_the_device_tier_equal_dense(data, cols, dtype, device_pages, offset, op, broadcast, seed):
    """Random tables larger than the device tier, random indices with repeats (and negative ones where
    torch counts them from the end), each op: the table ends bitwise as the dense one, the op returns
    it, and the device tier's budget holds. (The old code raised OutOfPagesError.)"""
    row_bytes = cols * dtype.itemsize
    rows = data.draw(st.integers(max(8, device_pages * PAGE // row_bytes + 1), 80), label="rows")
    low = -rows if op in NEGATIVE_ALLOWED else 0
    if op in DISTINCT_ONLY:
        distinct = data.draw(st.lists(st.integers(0, rows - 1), max_size=12, unique=True), label="rows written")
        from_the_end = data.draw(st.lists(st.booleans(), min_size=len(distinct), max_size=len(distinct)), label="from the end")
        picked = [row - rows if negative and low else row for row, negative in zip(distinct, from_the_end)]
    else:
        picked = data.draw(st.lists(st.integers(low, rows - 1), max_size=12), label="index")
    generator = torch.Generator().manual_seed(seed)
    base = random_values((rows + offset, cols), dtype, generator)
    index = torch.tensor(picked, dtype=torch.long)
    broadcast = broadcast and op in ("setitem", "index_put", "index_put_accumulate")
    values = random_values((cols,) if broadcast else (len(picked), cols), dtype, generator)
    value = random_values((), dtype, generator)

    with make_pager(device_pages) as pager:
        expected = base.clone()[offset:]
        table = PagedTensor.wrap(base.clone(), pager)[offset:]
        assert table.numel() * dtype.itemsize > device_pages * PAGE
        returned = scatter(op, table, index, values.clone(), value.clone())
        scatter(op, expected, index, values.clone(), value.clone())
        assert returned is table
        assert pager.stats()["resident_bytes"]["device"] <= device_pages * PAGE
        assert same_bits(table.materialize(), expected)


ELEMENT_FORMS = ["t[i, j] = v", "t[i, j] = v broadcast indices", "t[i, j] += v (accumulate)", "t[i, j, k] = v",
                 "t[mask of 2 dims] = v", "t[mask of every dim] = 0", "t[int32 i, j] = v", "t[i, :, k] = v",
                 "t[i, :, k] += v (accumulate)", "t[mask, j] = v", "t[i, mask] = v", "t[mask, :, k] = v"]  # fmt: skip


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    form=st.sampled_from(ELEMENT_FORMS),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.int64]),
    three_dims=st.booleans(),
    values_kind=st.sampled_from(["per place", "broadcast", "broadcast with leading ones"]),
    seed=st.integers(0, 2**16),
)
def test_element_scatters_on_tables_larger_than_the_device_tier_equal_dense(data, form, dtype, three_dims, values_kind, seed):
    """``index_put_`` by several index tensors (broadcast together) or by a mask over several dims,
    on random tables of 2 to 6 times the device tier: the table ends bitwise as the dense one, the
    device tier's budget holds. (A mask of several dims raised an IndexError naming a one-row
    shape; several index tensors raised OutOfPagesError.)"""
    three_dims = three_dims or form in ("t[i, j, k] = v", "t[i, :, k] = v", "t[i, :, k] += v (accumulate)", "t[mask, :, k] = v")
    cols = data.draw(st.integers(4, 40), label="cols")
    row_elements = cols * (3 if three_dims else 1)
    rows = data.draw(st.integers(2 * 8 * PAGE // (row_elements * dtype.itemsize) + 1, 6 * 8 * PAGE // (row_elements * dtype.itemsize) + 2), label="rows")
    shape = (rows, 3, cols) if three_dims else (rows, cols)
    generator = torch.Generator().manual_seed(seed)
    base = random_values(shape, dtype, generator)
    count = data.draw(st.integers(0, 10), label="places")
    if form in ("t[mask of 2 dims] = v", "t[mask of every dim] = 0"):
        mask_shape = shape[:2] if form == "t[mask of 2 dims] = v" else shape
        indices = (torch.rand(mask_shape, generator=generator) < 0.05,)
        places = (int(indices[0].sum()),)
    elif form in ("t[mask, j] = v", "t[i, mask] = v", "t[mask, :, k] = v"):  # a mask among other indices
        masked_dim = 1 if form == "t[i, mask] = v" else 0
        mask = torch.rand(shape[masked_dim], generator=generator) < 0.1
        other_dim = 2 if form == "t[mask, :, k] = v" else 1 - masked_dim
        other = torch.randint(-shape[other_dim], shape[other_dim], (1,), generator=generator)  # broadcast against the mask's positions
        indices = (mask, other) if masked_dim == 0 else (other, mask)
        if form == "t[mask, :, k] = v":
            indices = (mask, None, other)
        places = (int(mask.sum()),)
    elif form.startswith("t[i, :, k]"):  # None between the index tensors: dim 1 taken whole
        pairs = data.draw(st.lists(st.tuples(st.integers(-shape[0], shape[0] - 1), st.integers(-shape[2], shape[2] - 1)), max_size=count,
                                   unique_by=lambda pair: (pair[0] % shape[0], pair[1] % shape[2])), label="places")  # fmt: skip
        if form.endswith("(accumulate)"):
            pairs = pairs + pairs[: len(pairs) // 2]  # repeats, summed
        indices = (torch.tensor([pair[0] for pair in pairs], dtype=torch.long), None, torch.tensor([pair[1] for pair in pairs], dtype=torch.long))
        places = (len(pairs),)
    else:
        pairs = data.draw(st.lists(st.tuples(*(st.integers(-size, size - 1) for size in shape)), max_size=count,
                                   unique_by=lambda pair: tuple(p % s for p, s in zip(pair, shape))), label="places")  # fmt: skip
        if form == "t[i, j] += v (accumulate)":
            pairs = pairs + pairs[: len(pairs) // 2]  # repeats, summed
        indexed = 3 if form == "t[i, j, k] = v" else 2
        indices = tuple(torch.tensor([pair[d] for pair in pairs], dtype=torch.long) for d in range(indexed))
        if form == "t[int32 i, j] = v":
            indices = (indices[0].int(), *indices[1:])
        if form == "t[i, j] = v broadcast indices":  # rows (n, 1) against columns (1, m), distinct pairs by construction
            rows_picked = torch.unique(indices[0] % shape[0])[:3]
            indices = (rows_picked.view(-1, 1), torch.unique(indices[1] % shape[1])[:4].view(1, -1))
        places = tuple(torch.broadcast_shapes(*(index.shape for index in indices)))
    trailing = shape[len(indices) if indices[0].dtype != torch.bool or len(indices) > 1 else indices[0].dim():] if indices[1:2] != (None,) else shape[1:2]
    if form == "t[mask of every dim] = 0" or values_kind == "broadcast":
        values = random_values(trailing, dtype, generator)
    elif values_kind == "broadcast with leading ones":  # (1, 1, *trailing): raised a shape mismatch
        values = random_values((*(1 for _ in places), *trailing), dtype, generator)
    else:
        values = random_values((*places, *trailing), dtype, generator)
    accumulate = form.endswith("(accumulate)")
    with make_pager() as pager:
        table = PagedTensor.wrap(base.clone(), pager)
        expected = base.clone()
        put = torch.ops.aten.index_put_.default  # (Tensor.index_put_ takes no None)
        assert put(table, list(indices), values.clone(), accumulate) is table
        put(expected, list(indices), values.clone(), accumulate)
        assert pager.stats()["resident_bytes"]["device"] <= 8 * PAGE
        assert same_bits(table.materialize(), expected), form


def _traffic_of_a_masked_write(device: str, write) -> tuple[int, int]:
    """The faults ``write(target, mask)`` takes on a 16-page table (4 rows a page, evicted first),
    with a mask over both dims marking an element in each of rows 1, 50 and 51, and the bytes
    written back as the table is evicted after; the table must end as the dense table does after
    the same write."""
    with make_pager(device=device) as pager:
        x = rows_tensor().to(device)
        table = PagedTensor.wrap(x.clone(), pager)
        mask = torch.zeros(64, 256, dtype=torch.bool, device=device)
        mask[1, 7] = mask[50, 0] = mask[51, 255] = True
        pager.evict_all()
        before = pager.stats()
        write(table, mask)
        pager.evict_all()
        after = pager.stats()
        write(x, mask)
        assert torch.equal(table.materialize(), x)
        return after["faults"] - before["faults"], after["bytes_d2h"] - before["bytes_d2h"]


def _faults_of_a_masked_write(device: str, write) -> int:
    """The faults of :func:`_traffic_of_a_masked_write`."""
    return _traffic_of_a_masked_write(device, write)[0]


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_an_element_scatter_faults_in_only_the_pages_of_its_rows(device):
    """``t[i, j] = v`` and ``t[mask] = v`` (a mask over both dims) write rows 1, 50 and 51: pages 0
    and 12 fault in."""

    def write(target, mask):
        target[torch.tensor([50, 1, 51], device=device), torch.tensor([3, -1, 0], device=device)] = torch.tensor([1.0, 2.0, 3.0], device=device)
        target[mask] = -1.0

    assert _faults_of_a_masked_write(device, write) == 2


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_a_masked_fill_faults_in_only_the_pages_of_its_rows(device):
    """``t.masked_fill_(mask, v)`` with a mask of ``t``'s shape (what ``t[mask] = v`` runs from
    torch 2.15) marking rows 1, 50, 51 and then 2, 51, 52: pages 0, 12 and 13 fault in (every page did)."""

    def write(target, mask):
        assert target.masked_fill_(mask, -1.0) is target
        assert target.masked_fill_(mask.roll(1, 0), torch.tensor(2.5, dtype=torch.float64)) is target  # a 0-dim value of another dtype

    assert _faults_of_a_masked_write(device, write) == 3


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("value", [0.0, torch.tensor(-2), torch.tensor(1.5, dtype=torch.float64)])
def test_a_row_mask_put_of_one_value_moves_only_the_pages_of_its_rows(device, value):
    """``t[row_mask] = v`` (a mask of the leading dim, one value: torch runs a masked_fill_ of the mask
    reshaped to [64, 1]) past the tier, rows 1, 50 and 51: pages 0 and 12 fault in and only they are
    written back (every page was read and written back, a piece at a time)."""
    def write(target, mask):
        target[mask.any(1)] = value  # a CPU number, as torch's masked_fill_ way takes it (a CUDA one needs the table's dtype)

    assert _traffic_of_a_masked_write(device, write) == (2, 2 * PAGE)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_a_masked_scatter_faults_in_only_the_pages_of_its_marked_rows(device):
    """``t.masked_scatter_(mask, source)`` marking elements of rows 1, 50 and 51 of a 16-page table on
    a tier of 8: pages 0 and 12 fault in (every page did, and a table past the tier raised), and
    the table ends as the dense one."""
    mask = torch.zeros(64, 256, dtype=torch.bool, device=device)
    mask[1, [0, 255]] = mask[50, 7] = mask[51, 100:103] = True
    source = torch.arange(-1.0, -11.0, -1.0, device=device)
    with make_pager(device=device) as pager:
        x = rows_tensor().to(device)
        table = PagedTensor.wrap(x.clone(), pager)
        pager.evict_all()
        before = pager.stats()["faults"]
        assert table.masked_scatter_(mask, source) is table
        assert pager.stats()["faults"] - before == 2
        assert device_pages_of(pager, table) == {0, 12}
        assert torch.equal(table.materialize(), x.masked_scatter_(mask, source))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.int64, torch.bool]),
    three_dims=st.booleans(),
    mask_form=st.sampled_from(["full", "rows", "last dim", "every other row"]),
    density=st.sampled_from([0.0, 0.02, 0.3, 1.0]),
    permuted=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_masked_scatters_on_tables_larger_than_the_device_tier_equal_dense(data, dtype, three_dims, mask_form, density, permuted, seed):
    """``masked_scatter_`` with random masks of the table's shape or broadcast to it and a source
    with elements to spare, on tables larger than the device tier, laid out by rows or transposed or
    permuted (dim 0 not the outermost: it raised DeviceTierFullError): the table ends bitwise as the
    dense one, the op returns it, and the device tier's budget holds."""
    inner = (3, data.draw(st.integers(4, 40), label="cols")) if three_dims else (data.draw(st.integers(4, 600), label="cols"),)
    row_bytes = math.prod(inner) * dtype.itemsize
    rows = data.draw(st.integers(2 * 8 * PAGE // row_bytes + 1, 3 * 8 * PAGE // row_bytes + 2), label="rows")
    generator = torch.Generator().manual_seed(seed)
    memory_shape = (rows, *inner)
    order = list(range(len(memory_shape)))
    if permuted:
        order = data.draw(st.permutations(order).filter(lambda p: p[0] != 0), label="permutation")
    shape = tuple(memory_shape[d] for d in order)
    mask_shape = {"full": shape, "rows": (shape[0], *([1] * len(inner))), "last dim": shape[-1:], "every other row": shape}[mask_form]
    mask = torch.rand(mask_shape, generator=generator) < density
    if mask_form == "every other row":
        mask[1::2] = False
    base = random_values(memory_shape, dtype, generator) if dtype != torch.bool else torch.rand(memory_shape, generator=generator) > 0.5
    source = random_values((math.prod(shape) + 5,), dtype, generator) if dtype != torch.bool else torch.rand(math.prod(shape) + 5) > 0.5
    with make_pager() as pager:
        table = PagedTensor.wrap(base.clone(), pager).permute(order)
        expected = base.clone().permute(order)
        assert table.masked_scatter_(mask, source) is table
        expected.masked_scatter_(mask, source)
        assert pager.stats()["resident_bytes"]["device"] <= 8 * PAGE
        assert same_bits(table.materialize(), expected)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_an_embedding_with_max_norm_renorms_only_the_pages_of_its_rows(device):
    """``nn.Embedding(max_norm=...)`` runs ``embedding_renorm_`` on its weight before each lookup: on
    a paged weight of 16 pages and a device tier of 8, rows 3, 40 and 60 (one repeated) fault in
    pages 0, 10 and 15 only, and weight and output equal the dense
    module's bit for bit (every page faulted in before, and a weight past the tier raised)."""
    index = torch.tensor([[3, 40], [3, 60]], device=device)
    with make_pager(device=device) as pager:
        dense = torch.nn.Embedding(64, 256, max_norm=50.0, device=device)
        paged = torch.nn.Embedding(64, 256, max_norm=50.0, device=device)
        with torch.no_grad():
            dense.weight.copy_(rows_tensor().to(device) / 64)
        paged.weight = torch.nn.Parameter(PagedTensor.wrap(dense.weight.detach().clone(), pager))
        pager.evict_all()
        before = pager.stats()["faults"]
        assert torch.equal(paged(index), dense(index))
        assert pager.stats()["faults"] - before == 3
        assert device_pages_of(pager, paged.weight) == {0, 10, 15}
        assert torch.equal(paged.weight.materialize(), dense.weight.detach())
        assert not torch.equal(dense.weight.detach(), rows_tensor().to(device) / 64)  # rows were renormed


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
    norm_type=st.sampled_from([1.0, 2.0, 3.5, float("inf")]),
    max_norm=st.floats(0.05, 4.0),
    seed=st.integers(0, 2**16),
)
def test_embedding_renorm_on_tables_larger_than_the_device_tier_equals_dense(data, dtype, norm_type, max_norm, seed):
    """``embedding_renorm_`` by random indices with repeats, negative ones among them (a row named by
    both its number and its distance from the end is scaled twice, as torch's kernel does), on a
    table larger than the device tier: the table ends bitwise as the dense one, the op returns it,
    and the device tier's budget holds."""
    cols = data.draw(st.sampled_from([16, 300, 1100, 2100]), label="cols")
    rows = max(8, 2 * 8 * PAGE // (cols * dtype.itemsize) + 1)
    picked = data.draw(st.lists(st.integers(-rows, rows - 1), max_size=16), label="index")
    index = torch.tensor(picked, dtype=data.draw(st.sampled_from([torch.int64, torch.int32]), label="index dtype"))
    index = index.view(2, -1) if index.numel() % 2 == 0 and data.draw(st.booleans(), label="2-D index") else index
    generator = torch.Generator().manual_seed(seed)
    base = (torch.randn(rows, cols, generator=generator) * 0.2).to(dtype)
    with make_pager() as pager:
        table = PagedTensor.wrap(base.clone(), pager)
        expected = base.clone()
        assert torch.embedding_renorm_(table, index, max_norm, norm_type) is table
        torch.embedding_renorm_(expected, index, max_norm, norm_type)
        assert pager.stats()["resident_bytes"]["device"] <= 8 * PAGE
        assert same_bits(table.materialize(), expected)


@pytest.mark.parametrize(
    "write",
    [lambda t, m: t.__setitem__(m, -1.0), lambda t, m: t.__setitem__(m, torch.tensor(2.5)),
     lambda t, m: t.index_put_((m,), torch.tensor([3.0])), lambda t, m: t.masked_fill_(m, 4.0)],
    ids=["t[mask] = scalar", "t[mask] = 0-dim tensor", "index_put_ of one value", "masked_fill_"],
)
def test_a_full_mask_fill_of_a_transposed_table_past_the_tier_runs_in_pieces(write):
    """A transposed table's rows each span the table, so no run of rows fits: a fill by a mask of
    the whole shape runs as masked_fill_ in pieces of memory (``index_put_`` raised DeviceTierFullError)."""
    x = torch.randn(64, 300, generator=torch.Generator().manual_seed(0)).t().contiguous().t()  # 19 pages; the tier holds 8
    mask = torch.rand(64, 300, generator=torch.Generator().manual_seed(1)) < 0.1
    with make_pager() as pager:
        table = PagedTensor.wrap(x.clone(), pager)
        write(table, mask)
        write(x, mask)
        assert pager.stats()["resident_bytes"]["device"] <= 8 * PAGE
        assert same_bits(table.materialize(), x)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool]),
    three_dims=st.booleans(),
    density=st.sampled_from([0.0, 0.01, 0.2, 1.0]),
    value_kind=st.sampled_from(["python scalar", "0-dim tensor", "0-dim tensor of another dtype"]),
    transposed=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_masked_fills_on_tables_larger_than_the_device_tier_equal_dense(data, dtype, three_dims, density, value_kind, transposed, seed):
    """``masked_fill_`` (and ``t[mask] = v``) by a mask of the table's shape on random tables of 2
    to 6 times the device tier, rows or transposed (each row spans the table: in pieces of memory;
    ``t[mask] = v`` by index_put_ raised DeviceTierFullError there): the table ends bitwise as the
    dense one, the device tier's budget holds."""
    cols = data.draw(st.integers(4, 40), label="cols")
    row_elements = cols * (3 if three_dims else 1)
    rows = data.draw(st.integers(2 * 8 * PAGE // (row_elements * dtype.itemsize) + 1, 6 * 8 * PAGE // (row_elements * dtype.itemsize) + 2), label="rows")
    shape = (rows, 3, cols) if three_dims else (rows, cols)
    generator = torch.Generator().manual_seed(seed)
    base = torch.rand(shape, generator=generator) < 0.5 if dtype == torch.bool else random_values(shape, dtype, generator)
    if transposed:
        base = base.transpose(0, -1).contiguous().transpose(0, -1)
    mask = torch.rand(shape, generator=generator) < density
    scalar = data.draw(st.sampled_from([0, 1, -3, 2.5, float("inf"), float("nan"), True]) if dtype != torch.bool else st.sampled_from([0, 1, True]), label="value")
    if dtype in (torch.int64, torch.bool) and isinstance(scalar, float) and not math.isfinite(scalar):
        scalar = -3
    if value_kind == "python scalar":
        value = scalar
    elif value_kind == "0-dim tensor":
        value = torch.tensor(scalar, dtype=dtype)
    else:
        value = torch.tensor(scalar, dtype=torch.float64 if dtype != torch.float64 else torch.float32)
    setitem = data.draw(st.booleans(), label="t[mask] = v") and value_kind == "python scalar"
    with make_pager() as pager:
        table = PagedTensor.wrap(base.clone(), pager)
        expected = base.clone()
        assert table.stride() == expected.stride()
        for target in (table, expected):
            if setitem:
                target[mask] = value
            else:
                assert target.masked_fill_(mask, value) is target
        assert pager.stats()["resident_bytes"]["device"] <= 8 * PAGE
        assert same_bits(table.materialize(), expected)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    op=st.sampled_from(["scatter_", "scatter_ of a value", "scatter_add_", "scatter_reduce_", "scatter_ reducing", "scatter_ reducing a value"]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int64]),
    three_dims=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_scatters_on_tables_larger_than_the_device_tier_equal_dense(data, op, dtype, three_dims, seed):
    """``scatter_`` (of a source or a value), ``scatter_add_`` and the reductions (``scatter_reduce_``
    of each kind, with and without ``include_self``; ``scatter_`` with ``reduce=``) along any dim of
    random tables of 2 to 6 times the device tier, a source larger than the index: the table ends
    bitwise as the dense one, the device tier's budget holds. ``scatter_`` draws indices that write
    each element once (torch leaves a twice-written element's value undefined); the others repeat them."""
    cols = data.draw(st.integers(4, 40), label="cols")
    row_elements = cols * (3 if three_dims else 1)
    rows = data.draw(st.integers(2 * 8 * PAGE // (row_elements * dtype.itemsize) + 1, 6 * 8 * PAGE // (row_elements * dtype.itemsize) + 2), label="rows")
    shape = (rows, 3, cols) if three_dims else (rows, cols)
    dim = data.draw(st.integers(-len(shape), len(shape) - 1), label="dim")
    generator = torch.Generator().manual_seed(seed)
    index_shape = [data.draw(st.integers(0, min(size, 6)), label=f"index size {d}") for d, size in enumerate(shape)]
    along = shape[dim]
    reduce = data.draw(st.sampled_from(["sum", "prod", "mean", "amax", "amin"] if op == "scatter_reduce_" else ["add", "multiply"]), label="reduce")
    include_self = data.draw(st.booleans(), label="include_self")
    if op != "scatter_" and op != "scatter_ of a value":
        index = torch.randint(0, along, index_shape, generator=generator)
    else:  # a distinct target along dim for each place: a random permutation's first entries, per line
        index_shape[dim] = min(index_shape[dim], along)
        keys = torch.rand((*index_shape[:dim % len(shape)], along, *index_shape[dim % len(shape) + 1:]), generator=generator)
        index = keys.argsort(dim=dim).narrow(dim, 0, index_shape[dim])
    source = random_values(tuple(size + 1 for size in index_shape), dtype, generator)
    value = 2.5 if dtype.is_floating_point else 7
    base = random_values(shape, dtype, generator)
    with make_pager() as pager:
        table = PagedTensor.wrap(base.clone(), pager)
        expected = base.clone()
        for target in (table, expected):
            returned = {
                "scatter_": lambda: target.scatter_(dim, index, source),
                "scatter_ of a value": lambda: target.scatter_(dim, index, value),
                "scatter_add_": lambda: target.scatter_add_(dim, index, source),
                "scatter_reduce_": lambda: target.scatter_reduce_(dim, index, source, reduce, include_self=include_self),
                "scatter_ reducing": lambda: target.scatter_(dim, index, source, reduce=reduce),
                "scatter_ reducing a value": lambda: target.scatter_(dim, index, value, reduce=reduce),
            }[op]()
            assert returned is target
        assert pager.stats()["resident_bytes"]["device"] <= 8 * PAGE
        assert same_bits(table.materialize(), expected), (op, dim, index_shape, reduce, include_self)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_a_scatter_along_dim_0_faults_in_only_the_pages_of_its_rows(device):
    """``scatter_``, ``scatter_add_`` and ``scatter_reduce_`` along dim 0 writing rows 1, 50 and 51: pages 0 and 12."""
    with make_pager(device=device) as pager:
        x = rows_tensor().to(device)
        table = PagedTensor.wrap(x.clone(), pager)
        pager.evict_all()
        before = pager.stats()["faults"]
        for target in (table, x):
            target.scatter_(0, torch.tensor([[50, 1, 51]], device=device), torch.tensor([[1.0, 2.0, 3.0]], device=device))
            target.scatter_add_(0, torch.tensor([[1, 1], [51, 1]], device=device), torch.ones(2, 2, device=device))
            target.scatter_reduce_(0, torch.tensor([[50, 1]], device=device), torch.tensor([[5e5, -5.0]], device=device), "amax", include_self=False)
        assert pager.stats()["faults"] - before == 2
        assert torch.equal(table.materialize(), x)


@pytest.mark.parametrize("op", ["scatter_", "scatter_add_", "scatter_reduce_"])
def test_a_scatter_along_dim_0_past_the_tier_does_not_undo_another_threads_write(op, monkeypatch):
    """The scatter reads its rows, runs on a compact copy and writes the rows back: another thread's
    write to those rows in between must wait (writers of one allocation take turns), not be undone
    by the write-back of the values read before it."""
    import threading

    from pagedtensor.handlers import row_scatters

    writers: list[threading.Thread] = []
    read_rows = row_scatters._rows_compacted

    def rows_then_another_thread_writes(table, rows):
        compact = read_rows(table, rows)
        writer = threading.Thread(target=lambda: table.add_(1))
        writer.start()
        writer.join(0.5)  # finishes at once unless the scatter holds the allocation's write turn
        writers.append(writer)
        return compact

    monkeypatch.setattr(row_scatters, "_rows_compacted", rows_then_another_thread_writes)
    with make_pager(device_pages=2) as pager:
        table = PagedTensor.wrap(torch.zeros(64, 64), pager)  # 4 pages: past the 2-page tier
        index, source = torch.zeros(1, 1, dtype=torch.long), torch.full((1, 1), 5.0)
        args = (0, index, source, "sum") if op == "scatter_reduce_" else (0, index, source)
        getattr(table, op)(*args)
        writers[0].join(30)
        assert not writers[0].is_alive()
        expected = torch.ones(64, 64)  # the scatter first, then the other thread's add_
        expected[0, 0] += 5.0
        assert torch.equal(table.materialize(), expected), op


def test_an_accumulating_put_after_a_leading_slice_still_raises_past_the_tier():
    """``t[:, pos] += v`` as ``index_put_(..., accumulate=True)``: torch's CPU kernel sums repeated
    positions in an order that depends on the whole tensor's size, so it is not cut into pieces:
    OutOfPagesError naming the op, nothing written."""
    with make_pager() as pager:
        x = rows_tensor()
        table = PagedTensor.wrap(x.clone(), pager)
        with pytest.raises(OutOfPagesError, match="aten.index_put_"):
            torch.ops.aten.index_put_.default(table, [None, torch.tensor([0, 0])], torch.ones(64, 2), True)
        assert torch.equal(table.materialize(), x)


@pytest.mark.parametrize("dim", [0, 1])
def test_a_half_precision_scatter_add_sums_as_torchs_kernel_does(dim):
    """Ten adds of 0.0004 to 1.0 in float16: torch's CPU kernel sums in float and rounds once
    (1.0039), where adding in float16 one at a time keeps 1.0: the paged table past the tier gives
    the kernel's bits (an ``index_put_`` with ``accumulate`` would not)."""
    with make_pager() as pager:
        x = torch.ones(64, 512, dtype=torch.float16)  # 16 pages; the device tier holds 8
        table = PagedTensor.wrap(x.clone(), pager)
        index = torch.full((10, 4), 3) if dim == 0 else torch.full((64, 10), 3)
        source = torch.full(index.shape, 0.0004, dtype=torch.float16)
        for target in (table, x):
            target.scatter_add_(dim, index, source)
        assert x[3, 0] != 1.0 if dim == 0 else x[0, 3] != 1.0
        assert same_bits(table.materialize(), x)
        assert pager.stats()["resident_bytes"]["device"] <= 8 * PAGE


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.int64]),
    three_dims=st.booleans(),
    values_kind=st.sampled_from(["a row per table row", "one row", "the trailing dims", "a number"]),
    seed=st.integers(0, 2**16),
)
def test_puts_after_leading_slices_on_tables_larger_than_the_device_tier_equal_dense(data, dtype, three_dims, values_kind, seed):
    """``t[:, pos] = v`` (and ``t[:, :, pos]``): index_put_ whose indices start with ``None`` runs a
    piece of rows at a time past the device tier (it raised OutOfPagesError); the table ends bitwise
    as the dense one and the device tier's budget holds. The positions are distinct (torch leaves a
    twice-written element undefined)."""
    accumulate = False
    cols = data.draw(st.integers(4, 40), label="cols")
    shape = (data.draw(st.integers(40, 200), label="rows"), 3, cols) if three_dims else (data.draw(st.integers(40, 200), label="rows"), cols)
    rows = 2 * 8 * PAGE // (math.prod(shape[1:]) * dtype.itemsize) + 1
    shape = (max(shape[0], rows), *shape[1:])
    lead = data.draw(st.integers(1, len(shape) - 1), label="leading slices")
    size = shape[lead]
    positions = data.draw(st.lists(st.integers(0, size - 1), min_size=1, max_size=6, unique=True), label="positions")
    negative = data.draw(st.booleans(), label="counted from the end")
    index = torch.tensor(positions) - (size if negative else 0)
    generator = torch.Generator().manual_seed(seed)
    result_shape = (*shape[:lead], len(positions), *shape[lead + 1:])
    values = {
        "a row per table row": lambda: random_values(result_shape, dtype, generator),
        "one row": lambda: random_values((1, *result_shape[1:]), dtype, generator),
        "the trailing dims": lambda: random_values(result_shape[lead:], dtype, generator),
        "a number": lambda: random_values((), dtype, generator),
    }[values_kind]()
    base = random_values(shape, dtype, generator)
    indices = (*(None for _ in range(lead)), index)
    with make_pager() as pager:
        table = PagedTensor.wrap(base.clone(), pager)
        expected = base.clone()
        for target in (table, expected):
            assert torch.ops.aten.index_put_.default(target, list(indices), values.clone(), accumulate) is target
        assert pager.stats()["resident_bytes"]["device"] <= 8 * PAGE
        assert same_bits(table.materialize(), expected), (lead, values_kind)


def index_op_call(op: str, dim: int, index: torch.Tensor, source: torch.Tensor, dtype: torch.dtype):
    """The in-place index op ``op`` (of INDEX_OPS_ALONG_A_DIM) along ``dim``, as a function of the table."""
    alpha = -0.5 if dtype.is_floating_point else 3
    value = 1.5 if dtype.is_floating_point else 7
    return {
        "index_copy": lambda t: t.index_copy_(dim, index, source),
        "index_add": lambda t: t.index_add_(dim, index, source, alpha=alpha),
        "index_reduce_prod": lambda t: t.index_reduce_(dim, index, source, "prod"),
        "index_reduce_mean": lambda t: t.index_reduce_(dim, index, source, "mean", include_self=False),
        "index_reduce_amin": lambda t: t.index_reduce_(dim, index, source, "amin"),
        "index_fill_scalar": lambda t: t.index_fill_(dim, index, value),
        "index_fill_tensor": lambda t: t.index_fill_(dim, index, torch.tensor(value, dtype=dtype)),
    }[op]


INDEX_OPS_ALONG_A_DIM = ["index_copy", "index_add", "index_reduce_prod", "index_reduce_mean", "index_reduce_amin", "index_fill_scalar",
                         "index_fill_tensor"]  # fmt: skip


def assert_plain_result_equals_dense(base: torch.Tensor, order: list[int], call) -> None:
    """``call`` on ``base`` permuted by ``order`` as a PagedTensor past the 8-page tier and as a dense
    tensor: a plain result of the dense one's bits, shape and strides; the table keeps its bytes; the
    device tier's budget holds. ``call`` draws nothing (its values are fixed before)."""
    expected = call(base.clone().permute(order))
    with make_pager() as pager:
        table = PagedTensor.wrap(base.clone(), pager).permute(order)
        result = call(table)
        assert type(result) is torch.Tensor
        assert result.stride() == expected.stride(), order
        assert same_bits(result, expected), order
        assert same_bits(table.materialize(), base.permute(order))
        assert pager.stats()["resident_bytes"]["device"] <= 8 * PAGE


def assert_raises_as_dense(bad, before_any_fault: bool = True) -> None:
    """``bad`` on the 64 x 256 table (rows_tensor) paged past the tier raises the dense op's error
    type and message (``before_any_fault``: with no page faulted in), and the table keeps its bytes."""
    with pytest.raises(Exception) as dense_error:
        bad(rows_tensor())
    with make_pager() as pager:
        table = PagedTensor.wrap(rows_tensor(), pager)
        pager.evict_all()
        faults = pager.stats()["faults"]
        with pytest.raises(dense_error.type, match=re.escape(str(dense_error.value))):
            bad(table)
        assert pager.stats()["faults"] == faults or not before_any_fault
        assert same_bits(table.materialize(), rows_tensor())


def assert_in_place_calls_on_a_transposed_table_equal_dense(calls: list, generator: torch.Generator, device: str) -> None:
    """Each of ``calls`` (in-place, returning its table) on the transposed 256 x 64 view of a 16-page
    table (the tier 8) and on the dense one, the generator's draws the same for both: the same
    bits after each, the device tier's budget held."""
    with make_pager(device=device) as pager:
        table = PagedTensor.wrap(rows_tensor().to(device), pager).t()
        expected = rows_tensor().to(device).t()
        for call in calls:
            state = generator.get_state()
            assert call(expected) is expected
            generator.set_state(state)  # the same values for the paged table
            assert call(table) is table
            assert same_bits(table.materialize(), expected)
        assert pager.stats()["resident_bytes"]["device"] <= 8 * PAGE


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    op=st.sampled_from(INDEX_OPS_ALONG_A_DIM),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int64]),
    three_dims=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_index_ops_along_another_dim_on_tables_larger_than_the_device_tier_equal_dense(data, op, dtype, three_dims, seed):
    """``index_copy_``, ``index_add_`` (repeated positions, alpha), ``index_reduce_`` and ``index_fill_`` along a dim other
    than 0 run a piece of rows at a time past the device tier (they raised OutOfPagesError); the
    table ends bitwise as the dense one and the device tier's budget holds. index_copy_ takes
    distinct positions (torch leaves a twice-written element undefined)."""
    cols = data.draw(st.integers(4, 40), label="cols")
    shape = (40, 3, cols) if three_dims else (40, cols)
    rows = 2 * 8 * PAGE // (math.prod(shape[1:]) * dtype.itemsize) + 1
    shape = (max(data.draw(st.integers(40, 200), label="rows"), rows), *shape[1:])
    dim = data.draw(st.integers(1, len(shape) - 1), label="dim")
    size = shape[dim]
    positions = data.draw(st.lists(st.integers(0, size - 1), min_size=1, max_size=6, unique=op == "index_copy"), label="positions")
    index = torch.tensor(positions)
    if op.startswith("index_fill") and data.draw(st.booleans(), label="counted from the end"):
        index = index - size
    dim = dim - len(shape) if data.draw(st.booleans(), label="negative dim") else dim
    generator = torch.Generator().manual_seed(seed)
    source = random_values((*shape[:dim], len(positions), *shape[dim:][1:]) if dim > 0 else
                           (*shape[: len(shape) + dim], len(positions), *shape[len(shape) + dim + 1:]), dtype, generator)  # fmt: skip
    call = index_op_call(op, dim, index, source, dtype)
    base = random_values(shape, dtype, generator)
    with make_pager() as pager:
        table = PagedTensor.wrap(base.clone(), pager)
        expected = base.clone()
        for target in (table, expected):
            assert call(target) is target
        assert pager.stats()["resident_bytes"]["device"] <= 8 * PAGE
        assert same_bits(table.materialize(), expected), (op, dim)


def permuted_table(data, dtype: torch.dtype, three_dims: bool) -> tuple[tuple[int, ...], list[int], tuple[int, ...]]:
    """``(memory_shape, order, shape)``: a table of 2 to 3 dims past the 8-page tier laid out
    row-major over ``memory_shape`` and viewed as ``permute(order)`` (of ``shape``), its dim 0 not
    the outermost in memory."""
    cols = data.draw(st.integers(4, 40), label="cols")
    inner = (3, cols) if three_dims else (cols,)
    rows = max(data.draw(st.integers(40, 200), label="rows"), 2 * 8 * PAGE // (math.prod(inner) * dtype.itemsize) + 1)
    memory_shape = (rows, *inner)
    order = data.draw(st.permutations(range(len(memory_shape))).filter(lambda p: p[0] != 0), label="permutation")
    return memory_shape, order, tuple(memory_shape[d] for d in order)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    op=st.sampled_from(INDEX_OPS_ALONG_A_DIM),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.int64]),
    three_dims=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_index_ops_on_tables_whose_dim_0_is_not_the_outermost_equal_dense(data, op, dtype, three_dims, seed):
    """The index ops along any dim of a transposed or permuted table past the tier (``t.T.index_copy_(0,
    i, s)``: each index of dim 0 spans the table; they raised OutOfPagesError): they run on the
    table's view of dims outermost first, the table ends bitwise as the dense one, the device
    tier's budget holds."""
    memory_shape, order, shape = permuted_table(data, dtype, three_dims)
    dim = data.draw(st.integers(-len(shape), len(shape) - 1), label="dim")
    size = shape[dim]
    positions = data.draw(st.lists(st.integers(0, size - 1), min_size=1, max_size=6, unique=op == "index_copy"), label="positions")
    index = torch.tensor(positions)
    generator = torch.Generator().manual_seed(seed)
    source_shape = list(shape)
    source_shape[dim] = len(positions)
    call = index_op_call(op, dim, index, random_values(tuple(source_shape), dtype, generator), dtype)
    base = random_values(memory_shape, dtype, generator)
    with make_pager() as pager:
        table = PagedTensor.wrap(base.clone(), pager).permute(order)
        expected = base.clone().permute(order)
        for target in (table, expected):
            assert call(target) is target
        assert pager.stats()["resident_bytes"]["device"] <= 8 * PAGE
        assert same_bits(table.materialize(), expected), (op, order, dim)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.int64, torch.bool]),
    three_dims=st.booleans(),
    values_kind=st.sampled_from(["0-dim", "region", "one row broadcast"]),
    seed=st.integers(0, 2**16),
)
def test_setitem_on_tables_whose_dim_0_is_not_the_outermost_equal_dense(data, dtype, three_dims, values_kind, seed):
    """``t.T[i] = v`` (index_put_ by one integer index, of one or two dims, some positions counted
    from the end) on a transposed or permuted table past the tier (it raised OutOfPagesError): the
    same writes on the table's view of dims outermost first, a piece of rows at a time; the table
    ends bitwise as the dense one, the device tier's budget holds."""
    memory_shape, order, shape = permuted_table(data, dtype, three_dims)
    positions = data.draw(st.lists(st.integers(-shape[0], shape[0] - 1), min_size=1, max_size=6, unique_by=lambda p: p % shape[0]),
                          label="positions")  # fmt: skip
    index = torch.tensor(positions)
    if len(positions) % 2 == 0 and data.draw(st.booleans(), label="index of two dims"):
        index = index.view(2, -1)
    generator = torch.Generator().manual_seed(seed)
    region = (*index.shape, *shape[1:])
    values = {"0-dim": random_values((), dtype, generator), "region": random_values(region, dtype, generator),
              "one row broadcast": random_values(shape[1:], dtype, generator)}[values_kind]  # fmt: skip
    base = random_values(memory_shape, dtype, generator)
    with make_pager() as pager:
        table = PagedTensor.wrap(base.clone(), pager).permute(order)
        expected = base.clone().permute(order)
        for target in (table, expected):
            target[index] = values
        assert pager.stats()["resident_bytes"]["device"] <= 8 * PAGE
        assert same_bits(table.materialize(), expected), (order, index.shape, values_kind)


INDEX_PUT_FORMS = ["one index", "two indices", "indices apart", "after a slice", "mask of dim 0", "mask of two dims", "mask of every dim"]


def index_put_indices(data, shape: tuple[int, ...], form: str, distinct: bool, generator: torch.Generator) -> list:
    """The indices of an ``index_put_`` of ``form`` on a table of ``shape`` (2 or 3 dims), ``None`` for
    a dim taken whole: integer positions (some counted from the end, some int32) of up to 6 places,
    naming each element at most once where ``distinct``, or bool masks over leading dims."""
    if form.startswith("mask"):
        dims = {"mask of dim 0": 1, "mask of two dims": 2, "mask of every dim": len(shape)}[form]
        density = data.draw(st.sampled_from([0.0, 0.05, 0.5]), label="density")
        return [torch.rand(shape[:dims], generator=generator) < density]
    dims = {"one index": [0], "two indices": [0, 1], "indices apart": [0, 2] if len(shape) == 3 else [0, 1], "after a slice": [1]}[form]
    point = st.tuples(*(st.integers(-shape[d], shape[d] - 1) for d in dims))
    same_element = (lambda p: tuple(c % shape[d] for c, d in zip(p, dims))) if distinct else None
    points = data.draw(st.lists(point, min_size=1, max_size=6, unique_by=same_element), label="places")
    indices: list = [None] * (dims[-1] + 1)
    for d, column in zip(dims, zip(*points)):
        indices[d] = torch.tensor(column, dtype=torch.int32 if data.draw(st.booleans(), label="int32") else torch.int64)
    return indices


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.int64, torch.bool]),
    three_dims=st.booleans(),
    form=st.sampled_from(INDEX_PUT_FORMS),
    accumulate=st.booleans(),
    values_kind=st.sampled_from(["0-dim", "region", "last dim broadcast", "ones broadcast"]),
    seed=st.integers(0, 2**16),
)
def test_index_puts_of_every_form_on_tables_whose_dim_0_is_not_the_outermost_equal_dense(data, dtype, three_dims, form, accumulate,
                                                                                          values_kind, seed):  # fmt: skip
    """``index_put_`` with ``accumulate``, several index tensors (adjacent or apart), indices after a
    slice and bool masks over leading dims, on transposed and permuted tables past the tier (they
    raised DeviceTierFullError: each index of dim 0 spans the table): written by each element's
    coordinates on the table's view of dims outermost first, the table ends bitwise as the dense one,
    the device tier's budget holds. Repeated places add halves, exact in any order (torch's CPU
    kernel splits a large region between threads, and each then adds its part) but for floats: the
    dense op adds a place's repeats to the table's value in its own order, which the runs do not
    follow (six halves into a row of an fp32 table differed in the last bit), so they raise the
    pager's error, the table unchanged."""
    memory_shape, order, shape = permuted_table(data, dtype, three_dims)
    generator = torch.Generator().manual_seed(seed)
    indices = index_put_indices(data, shape, form, not accumulate, generator)
    base = random_values(memory_shape, dtype, generator)
    region = base.permute(order)[tuple(slice(None) if index is None else index for index in indices)].shape
    values_shape = {"0-dim": (), "region": region, "last dim broadcast": region[-1:], "ones broadcast": (1,) * len(region)}[values_kind]
    values = random_values(values_shape, dtype, generator)
    if accumulate and dtype.is_floating_point:
        values = (values * 2).round() / 2
    counts = torch.ops.aten.index_put_.default(torch.zeros(base.permute(order).shape), indices, torch.ones(()), True)
    refused = accumulate and dtype.is_floating_point and counts.max() > 1
    with make_pager() as pager:
        table = PagedTensor.wrap(base.clone(), pager).permute(order)
        expected = base.clone().permute(order)
        if refused:
            with pytest.raises(OutOfPagesError):
                torch.ops.aten.index_put_.default(table, indices, values, accumulate)
        else:
            for target in (table, expected):
                assert torch.ops.aten.index_put_.default(target, indices, values, accumulate) is target
        assert pager.stats()["resident_bytes"]["device"] <= 8 * PAGE
        assert same_bits(table.materialize(), expected), (order, form, accumulate)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.int64, torch.bool]),
    three_dims=st.booleans(),
    permuted=st.booleans(),
    accumulate=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_puts_on_tables_larger_than_the_device_tier_equal_dense(data, dtype, three_dims, permuted, accumulate, seed):
    """``t.put_(index, source)`` (flat row-major positions, some counted from the end, an index of one
    or two dims) on tables past the tier, by rows or transposed or permuted (it raised
    DeviceTierFullError): the table ends bitwise as the dense one, the op returns it, the device
    tier's budget holds. Repeated positions only with ``accumulate`` (torch leaves the value kept
    undefined otherwise), of halves."""
    if permuted:
        memory_shape, order, shape = permuted_table(data, dtype, three_dims)
    else:
        memory_shape, order, shape = permuted_table(data, dtype, three_dims)[0], list(range(2 + three_dims)), None
        shape = memory_shape
    numel = math.prod(shape)
    positions = data.draw(st.lists(st.integers(-numel, numel - 1), min_size=1, max_size=8, unique_by=None if accumulate else (lambda p: p % numel)),
                          label="positions")  # fmt: skip
    index = torch.tensor(positions)
    if len(positions) % 2 == 0 and data.draw(st.booleans(), label="index of two dims"):
        index = index.view(2, -1)
    generator = torch.Generator().manual_seed(seed)
    source = random_values(tuple(index.shape), dtype, generator)
    if accumulate and dtype.is_floating_point:
        source = (source * 2).round() / 2
    base = random_values(memory_shape, dtype, generator)
    # float sums into a repeated position of a permuted table raise (the dense op's order is its own)
    refused = permuted and accumulate and dtype.is_floating_point and len({p % numel for p in positions}) < len(positions)
    with make_pager() as pager:
        table = PagedTensor.wrap(base.clone(), pager).permute(order)
        expected = base.clone().permute(order)
        if refused:
            with pytest.raises(OutOfPagesError):
                table.put_(index, source, accumulate=accumulate)
        else:
            for target in (table, expected):
                assert target.put_(index, source, accumulate=accumulate) is target
        assert pager.stats()["resident_bytes"]["device"] <= 8 * PAGE
        assert same_bits(table.materialize(), expected), (order, accumulate)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_puts_and_masked_writes_on_a_transposed_table_past_the_tier_equal_dense(device):
    """A transposed 256 x 64 view of a 16-page table (the tier 8), each of whose rows spans the
    table: ``t[i] += v`` with a repeated row, ``t[i, j] = v``, ``t[:, j] += v``, ``t[mask] = v``
    and ``t[row_mask] += v``, ``masked_scatter_`` and ``put_`` with and without
    ``accumulate`` into distinct places: the dense op's bits. Float sums into repeated places raise
    OutOfPagesError with the table unchanged: the dense op sums them in its own order (CUDA's
    sort's, which the runs by rows did not match on the H200; on the CPU six halves into a row of a
    permuted table differed in the last bit)."""
    generator = torch.Generator().manual_seed(4)

    def halves(*shape: int) -> torch.Tensor:
        return (torch.randint(-8, 8, shape, generator=generator) / 2).to(device)

    def on(*values: int) -> torch.Tensor:
        return torch.tensor(values, device=device)

    mask = (torch.arange(256 * 64) % 7 == 3).view(256, 64).to(device)
    calls = [
        lambda t: torch.ops.aten.index_put_.default(t, [on(5, -1), on(0, 63)], halves(2)),
        lambda t: torch.ops.aten.index_put_.default(t, [mask], halves(int(mask.sum()))),
        lambda t: torch.ops.aten.index_put_.default(t, [mask[:, 0]], halves(64), True),
        lambda t: t.masked_scatter_(mask.roll(1, 1), halves(256 * 64)),
        lambda t: t.put_(on(0, 1, 300, -1), halves(4)),
    ]
    repeated_sums = [
        lambda t: torch.ops.aten.index_put_.default(t, [on(5, 200, 5)], halves(3, 64), True),
        # a row added three times, in the index's order: 1e8 first, then 1 (lost to rounding), then -1e8
        lambda t: torch.ops.aten.index_put_.default(t, [on(9, 9, 9)], torch.tensor([[1e8], [1.0], [-1e8]], device=device).expand(3, 64), True),
        lambda t: torch.ops.aten.index_put_.default(t, [None, on(9, 9)], halves(256, 2), True),
        lambda t: t.put_(on(7, 7, 16383), halves(3), accumulate=True),
    ]
    assert_in_place_calls_on_a_transposed_table_equal_dense(calls, generator, device)
    # the dense op's sums of repeated places take their own order (CUDA's sort, the CPU's kernel): refused
    with make_pager(device=device) as pager:
        table = PagedTensor.wrap(rows_tensor().to(device), pager).t()
        for call in repeated_sums:
            with pytest.raises(OutOfPagesError):
                call(table)
        assert same_bits(table.t().materialize(), rows_tensor().to(device))


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_a_put_faults_in_only_the_pages_of_its_elements(device):
    """``put_`` at flat positions on rows 1, 50 and 63 of a 16-page table (the tier 8): pages 0, 12
    and 15 fault in, the table ends as the dense one."""
    index = torch.tensor([256 + 3, 50 * 256, 64 * 256 - 1, 256 + 3], device=device)
    source = torch.tensor([1.5, -2.0, 3.0, 0.5], device=device)
    with make_pager(device=device) as pager:
        x = rows_tensor().to(device)
        table = PagedTensor.wrap(x.clone(), pager)
        pager.evict_all()
        before = pager.stats()["faults"]
        assert table.put_(index, source, accumulate=True) is table
        assert pager.stats()["faults"] - before == 3
        assert device_pages_of(pager, table) == {0, 12, 15}
        assert torch.equal(table.materialize(), x.put_(index, source, accumulate=True))


BAD_PERMUTED_PUTS = {  # on a transposed 256 x 64 view of rows_tensor(): torch's checks, each its own message
    "put out of range": lambda t: t.put_(torch.tensor([256 * 64]), torch.ones(1)),
    "put of fewer source elements": lambda t: t.put_(torch.tensor([1, 2]), torch.ones(1)),
    "put of another dtype": lambda t: t.put_(torch.tensor([1]), torch.ones(1, dtype=torch.float64)),
    "put by a float index": lambda t: t.put_(torch.tensor([1.0]), torch.ones(1)),
    "index_put of a mask of another shape": lambda t: t.index_put_((torch.ones(255, dtype=torch.bool),), torch.tensor(1.0), accumulate=True),
    "index_put out of bounds": lambda t: t.index_put_((torch.tensor([0]), torch.tensor([64])), torch.tensor(1.0), accumulate=True),
    "index_put of values of another shape": lambda t: t.index_put_((torch.tensor([0, 1]), torch.tensor([2, 3])), torch.ones(3)),
    "index_put of values of another dtype": lambda t: t.index_put_((torch.tensor([0]),), torch.ones(64, dtype=torch.float64), accumulate=True),
    "masked_scatter_ of too few elements": lambda t: t.masked_scatter_(torch.ones(256, 64, dtype=torch.bool), torch.ones(10)),
    "masked_scatter_ by a mask that does not broadcast": lambda t: t.masked_scatter_(torch.ones(3, dtype=torch.bool), torch.ones(256 * 64)),
}


@pytest.mark.parametrize("name", sorted(BAD_PERMUTED_PUTS))
def test_bad_puts_on_a_transposed_table_raise_torchs_error_before_any_page_moves(name):
    """torch's own error type and message, before any page faults in; the table keeps its bytes."""
    bad = BAD_PERMUTED_PUTS[name]
    assert_raises_as_dense(lambda t: bad(t.t()))


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_index_ops_on_a_transposed_table_past_the_tier_equal_dense(device):
    """A transposed 256 x 64 view of a 16-page table (the tier 8): each index op along dim 0 (each
    row of which spans the table) and dim 1, and ``t.T[i] = v``, a repeated position for the sums (of halves, exact in
    any order: CUDA's index_add_ adds repeated positions by atomics): the dense op's bits."""
    positions = torch.tensor([5, 200, 5, 17], device=device)
    distinct = torch.tensor([5, 200, 17], device=device)
    generator = torch.Generator().manual_seed(3)

    def halves(*shape: int) -> torch.Tensor:
        return (torch.randint(-8, 8, shape, generator=generator) / 2).to(device)

    calls = [
        lambda t: t.index_copy_(0, distinct, halves(3, 64)),
        lambda t: t.index_add_(0, positions, halves(4, 64), alpha=0.5),
        lambda t: t.index_reduce_(0, positions, halves(4, 64), "amax"),
        lambda t: t.index_fill_(0, positions, -2.0),
        lambda t: t.index_add_(1, torch.tensor([3, 3, 60], device=device), halves(256, 3)),
        lambda t: t.index_fill_(-1, torch.tensor([1], device=device), torch.tensor(4.0)),
        lambda t: t.__setitem__(torch.tensor([7, -1], device=device), halves(2, 64)) or t,  # t.T[i] = v
    ]
    assert_in_place_calls_on_a_transposed_table_equal_dense(calls, generator, device)


def test_index_ops_on_a_transposed_table_raise_torchs_errors_before_any_page_moves():
    """torch's checks come first, naming the table's own shape (not the permuted view's)."""
    with make_pager() as pager:
        table = PagedTensor.wrap(rows_tensor(), pager).t()  # 256 x 64, each row of dim 0 spans the 16 pages
        faults = pager.stats()["faults"]
        for bad in (lambda t: t.index_copy_(0, torch.tensor([256]), torch.ones(1, 64)),  # out of bounds
                    lambda t: t.index_copy_(0, torch.tensor([1, 2]), torch.ones(1, 64)),  # fewer source rows than positions
                    lambda t: t.index_add_(1, torch.tensor([1]), torch.ones(256, 1, dtype=torch.float64)),  # another dtype
                    lambda t: t.index_fill_(2, torch.tensor([1]), 1.0)):  # a dim out of range  # fmt: skip
            with pytest.raises(Exception) as dense_error:
                bad(rows_tensor().t())
            with pytest.raises(dense_error.type, match=re.escape(str(dense_error.value))):
                bad(table)
        assert pager.stats()["faults"] == faults
        assert same_bits(table.t().materialize(), rows_tensor())


BAD_INDEX_OPS_ALONG_A_DIM = {  # on a 64 x 256 table (rows_tensor): torch's checks, each its own message; run with BAD_CALLS
    "copy out of bounds": lambda t: t.index_copy_(1, torch.tensor([256]), torch.ones(64, 1)),
    "copy of another row count": lambda t: t.index_copy_(1, torch.tensor([1]), torch.ones(30, 1)),
    "copy of too many positions": lambda t: t.index_copy_(1, torch.tensor([1]), torch.ones(64, 2)),
    "copy of another dtype": lambda t: t.index_copy_(1, torch.tensor([1]), torch.ones(64, 1, dtype=torch.float64)),
    "copy by an index of two dims": lambda t: t.index_copy_(1, torch.tensor([[1]]), torch.ones(64, 1)),
    "copy of one dim": lambda t: t.index_copy_(1, torch.tensor([1]), torch.ones(64)),
    "copy along a dim out of range": lambda t: t.index_copy_(2, torch.tensor([1]), torch.ones(64, 1)),
    "add out of bounds": lambda t: t.index_add_(1, torch.tensor([-1]), torch.ones(64, 1)),
    "add of another row count": lambda t: t.index_add_(1, torch.tensor([1]), torch.ones(30, 1)),
    "add of fewer positions": lambda t: t.index_add_(1, torch.tensor([1, 2]), torch.ones(64, 1)),
    "add of another dtype": lambda t: t.index_add_(1, torch.tensor([1]), torch.ones(64, 1, dtype=torch.float16)),
    "reduce out of bounds": lambda t: t.index_reduce_(1, torch.tensor([256]), torch.ones(64, 1), "amax"),
    "reduce of another row count": lambda t: t.index_reduce_(1, torch.tensor([1]), torch.ones(30, 1), "prod"),
    "reduce by an unknown reduction": lambda t: t.index_reduce_(1, torch.tensor([1]), torch.ones(64, 1), "sum"),
    "fill out of bounds": lambda t: t.index_fill_(1, torch.tensor([-257]), 1.0),
    "fill by a value of one dim": lambda t: t.index_fill_(1, torch.tensor([1]), torch.ones(1)),
    "fill by an int32 index": lambda t: t.index_fill_(-1, torch.tensor([1], dtype=torch.int32), 1.0),
}


def test_the_piece_of_rows_path_never_takes_dim_0():
    """Along dim 0 row ``r`` is not written from source row ``r``: that path declines (the row
    scatter's own path takes dim 0), whatever reached it."""
    from pagedtensor.handlers.row_scatters import _index_op_a_piece_of_rows_at_a_time

    with make_pager() as pager:
        table = PagedTensor.wrap(rows_tensor(), pager)
        for dim in (0, -2):
            args = (table, dim, torch.arange(64).flip(0), torch.ones(64, 256))  # as many source rows as table rows
            assert _index_op_a_piece_of_rows_at_a_time(torch.ops.aten.index_copy_.default, args, {}) is NotImplemented


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_index_ops_along_another_dim_past_the_tier_equal_dense(device):
    """A 64 x 256 float table (16 pages, the device tier 8): copy, add (alpha, a repeated position;
    on CUDA, whose adds are atomic, of integers) and fill along dim 1, bitwise as dense."""
    with make_pager(device=device) as pager:
        x = rows_tensor().to(device)
        ints = x.long()
        index = torch.tensor([5, 200, 5, 17], device=device)
        for base, call in (
            (x, lambda t: t.index_copy_(1, index[1:], -t.new_ones(64, 3))),
            (x if device == "cpu" else ints, lambda t: t.index_add_(-1, index, torch.arange(256, device=device).view(64, 4).to(t.dtype), alpha=2)),
            (x, lambda t: t.index_fill_(1, index, -3.0)),
            (x, lambda t: t.index_fill_(1, index, torch.tensor(4.0))),  # a 0-dim value on the host
        ):
            table = PagedTensor.wrap(base.clone(), pager)
            expected = call(base.clone())
            assert call(table) is table
            assert torch.equal(table.materialize(), expected)
            assert pager.stats()["resident_bytes"]["device"] <= 8 * PAGE


def rows_tensor(rows: int = 64, cols: int = 256) -> torch.Tensor:
    """fp32 rows of ``cols`` elements: with 256 (1 KiB), rows 4k..4k+3 lie on page k."""
    return torch.arange(rows * cols, dtype=torch.float32).view(rows, cols)


def device_pages_of(pager: Pager, table: PagedTensor) -> set[int]:
    return {info.index for info in pager.page_table(table.allocation) if info.tier == "device"}


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("op", OPS)
def test_a_scatter_to_a_few_rows_faults_in_only_their_pages(op, device):
    """A scatter to rows 3, 40, 60 (repeated where the op allows, on the CPU) of a 16-page table on a
    tier of 8 faults in pages 0, 10 and 15 only, once each, and writes only those back."""
    distinct = op in DISTINCT_ONLY or device == "cuda"  # CUDA adds a repeated row's values in any order
    index = torch.tensor([3, 40, 60] if distinct else [3, 40, 3, 60], device=device)
    values = torch.full((index.numel(), 256), -2.0, device=device)
    with make_pager(device=device) as pager:
        x = rows_tensor().to(device)
        table = PagedTensor.wrap(x.clone(), pager)
        pager.evict_all()
        before = pager.stats()
        assert scatter(op, table, index, values, torch.tensor(4.0, device=device)) is table
        assert pager.stats()["faults"] - before["faults"] == 3
        assert device_pages_of(pager, table) == {0, 10, 15}
        written_back = pager.stats()["bytes_d2h"]
        pager.evict_all()
        assert pager.stats()["bytes_d2h"] - written_back == 3 * PAGE  # only the written pages were dirty
        scatter(op, x, index, values, torch.tensor(4.0, device=device))
        assert torch.equal(table.materialize(), x)


def test_a_bool_mask_and_an_index_of_two_dims_scatter_their_rows():
    """``t[mask] = v`` (a mask over dim 0) and ``t[idx2d] = v`` write the rows they select, and only
    their pages fault in."""
    with make_pager() as pager:
        x = rows_tensor()
        table = PagedTensor.wrap(x.clone(), pager)
        mask = torch.zeros(64, dtype=torch.bool)
        mask[[1, 50, 51]] = True
        index = torch.tensor([[60, 2], [2, -3]])
        pager.evict_all()
        before = pager.stats()["faults"]
        for target in (table, x):
            target[mask] = torch.arange(3.0).unsqueeze(1).expand(3, 256)
            target.index_put_((index,), torch.ones(2, 2, 256), accumulate=True)
        assert pager.stats()["faults"] - before == 3  # pages 0, 12, 15
        assert torch.equal(table.materialize(), x)


def test_a_source_broadcast_along_an_index_of_two_dims_is_written_to_every_row():
    """``t[idx2d] = v`` with ``v`` of shape ``(1, 1, cols)``: each run takes the one row (a run's
    index is flat, so the source keeps one leading dim; it raised a shape mismatch)."""
    with make_pager() as pager:
        x = rows_tensor()
        table = PagedTensor.wrap(x.clone(), pager)
        index = torch.tensor([[1, 50], [2, 3]])
        for target in (table, x):
            target.index_put_((index,), torch.full((1, 1, 256), -1.0))
            target.index_put_((index,), torch.ones(1, 1, 256), accumulate=True)
        assert torch.equal(table.materialize(), x)


def test_a_scatter_of_more_rows_than_the_device_tier_holds_runs_in_pieces():
    """Every row written, with repeats, on a tier of 3 pages: runs of at most 2 pages each."""
    with make_pager(device_pages=3) as pager:
        x = rows_tensor()
        table = PagedTensor.wrap(x.clone(), pager)
        index = torch.cat([torch.arange(64).flip(0), torch.arange(0, 64, 3)])
        source = torch.randn(index.numel(), 256)
        table.index_add_(0, index, source)
        x.index_add_(0, index, source)
        assert torch.equal(table.materialize(), x)


@pytest.mark.parametrize("op", OPS)
def test_an_empty_index_faults_nothing_in(op):
    with make_pager() as pager:
        x = rows_tensor()
        table = PagedTensor.wrap(x.clone(), pager)
        pager.evict_all()
        before = pager.stats()["faults"]
        empty = torch.zeros(0, dtype=torch.long)
        assert scatter(op, table, empty, torch.zeros(0, 256), torch.tensor(1.0)) is table
        assert pager.stats()["faults"] == before
        assert torch.equal(table.materialize(), x)


BAD_CALLS = {
    "index_put out of bounds": lambda t: t.index_put_((torch.tensor([3, 64]),), torch.zeros(2, 256)),
    "index_put negative out of bounds": lambda t: t.index_put_((torch.tensor([-65]),), torch.zeros(256)),
    "setitem shape": lambda t: t.__setitem__(torch.tensor([1, 2]), torch.zeros(3, 256)),
    "index_put dtype": lambda t: t.index_put_((torch.tensor([1]),), torch.zeros(1, 256, dtype=torch.float64)),
    "index_put float index": lambda t: t.index_put_((torch.tensor([1.0]),), torch.zeros(1, 256)),
    "index_put mask length": lambda t: t.index_put_((torch.ones(5, dtype=torch.bool),), torch.zeros(256)),
    "setitem mask of 2 dims, a column short": lambda t: t.__setitem__(torch.ones(64, 255, dtype=torch.bool), 0.0),
    "setitem mask of 2 dims, a row short": lambda t: t.__setitem__(torch.ones(63, 256, dtype=torch.bool), 0.0),
    "setitem mask of 2 dims, values": lambda t: t.__setitem__(torch.ones(64, 256, dtype=torch.bool), torch.zeros(3)),
    "index_put two indices, column out of bounds": lambda t: t.index_put_((torch.tensor([1, 2]), torch.tensor([0, 256])), torch.zeros(2)),
    "index_put two indices, row out of bounds": lambda t: t.index_put_((torch.tensor([1, 64]), torch.tensor([0, 5])), torch.zeros(2)),
    "index_put two indices not broadcastable": lambda t: t.index_put_((torch.tensor([1, 2]), torch.tensor([0, 1, 2])), torch.zeros(1)),
    "index_put two indices, values": lambda t: t.index_put_((torch.tensor([1, 2]), torch.tensor([0, 1])), torch.zeros(3)),
    "index_put two indices, float": lambda t: t.index_put_((torch.tensor([1, 2]), torch.tensor([0.0, 1.0])), torch.zeros(2)),
    "index_put empty shape": lambda t: t.index_put_((torch.zeros(0, dtype=torch.long),), torch.zeros(3, 256)),
    "index_copy out of bounds": lambda t: t.index_copy_(0, torch.tensor([64]), torch.zeros(1, 256)),
    "index_copy negative": lambda t: t.index_copy_(0, torch.tensor([-1]), torch.zeros(1, 256)),
    "index_copy shape": lambda t: t.index_copy_(0, torch.tensor([1, 2]), torch.zeros(3, 256)),
    "index_copy int32": lambda t: t.index_copy_(0, torch.tensor([1], dtype=torch.int32), torch.zeros(1, 256)),
    "index_add out of bounds": lambda t: t.index_add_(0, torch.tensor([1, 99]), torch.zeros(2, 256)),
    "index_add negative": lambda t: t.index_add_(0, torch.tensor([-1]), torch.zeros(1, 256)),
    "index_add row shape": lambda t: t.index_add_(0, torch.tensor([1, 2]), torch.zeros(2, 255)),
    "index_add dtype": lambda t: t.index_add_(0, torch.tensor([1]), torch.zeros(1, 256, dtype=torch.float16)),
    "index_reduce out of bounds": lambda t: t.index_reduce_(0, torch.tensor([1, 64]), torch.zeros(2, 256), "prod"),
    "index_reduce negative": lambda t: t.index_reduce_(0, torch.tensor([-1]), torch.zeros(1, 256), "amin"),
    "index_reduce row shape": lambda t: t.index_reduce_(0, torch.tensor([1, 2]), torch.zeros(2, 255), "mean"),
    "index_reduce dtype": lambda t: t.index_reduce_(0, torch.tensor([1]), torch.zeros(1, 256, dtype=torch.float64), "amax"),
    "index_reduce unknown reduction": lambda t: t.index_reduce_(0, torch.tensor([1]), torch.zeros(1, 256), "sum"),
    "index_reduce float index": lambda t: t.index_reduce_(0, torch.tensor([1.0]), torch.zeros(1, 256), "prod"),
    "scatter_ out of bounds": lambda t: t.scatter_(0, torch.tensor([[1, 64]]), torch.zeros(1, 2)),
    "scatter_ negative": lambda t: t.scatter_(1, torch.tensor([[-1]]), 1.0),
    "scatter_ index larger than self": lambda t: t.scatter_(0, torch.zeros(1, 257, dtype=torch.long), torch.zeros(1, 257)),
    "scatter_ index larger than src": lambda t: t.scatter_(0, torch.zeros(2, 2, dtype=torch.long), torch.zeros(1, 2)),
    "scatter_ dims": lambda t: t.scatter_(0, torch.zeros(2, dtype=torch.long), torch.zeros(2)),
    "scatter_ src dtype": lambda t: t.scatter_(0, torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.float64)),
    "scatter_ float index": lambda t: t.scatter_(0, torch.zeros(1, 2), 1.0),
    "scatter_add_ out of bounds": lambda t: t.scatter_add_(1, torch.tensor([[256]]), torch.zeros(1, 1)),
    "t[i, mask] = v, a mask of the wrong length": lambda t: t.__setitem__((torch.tensor([1]), torch.ones(5, dtype=torch.bool)), 1.0),
    "t[mask, j] = v, a mask of the wrong length": lambda t: t.__setitem__((torch.ones(63, dtype=torch.bool), torch.tensor([1])), 1.0),
    "scatter_reduce_ unknown reduction": lambda t: t.scatter_reduce_(0, torch.tensor([[1]]), torch.zeros(1, 1), "median"),
    "scatter_reduce_ out of bounds": lambda t: t.scatter_reduce_(1, torch.tensor([[256]]), torch.zeros(1, 1), "amax", include_self=False),
    "scatter_reduce_ src dtype": lambda t: t.scatter_reduce_(0, torch.tensor([[1]]), torch.zeros(1, 1, dtype=torch.float64), "sum"),
    "scatter_reduce_ index larger than src": lambda t: t.scatter_reduce_(0, torch.zeros(2, 2, dtype=torch.long), torch.zeros(1, 2), "prod"),
    "scatter_ reduce unknown": lambda t: t.scatter_(0, torch.tensor([[1]]), torch.zeros(1, 1), reduce="max"),
    "scatter_ value reduce out of bounds": lambda t: t.scatter_(0, torch.tensor([[64]]), 2.0, reduce="multiply"),
    "t[:, pos] = v, values of another shape": lambda t: t.__setitem__((slice(None), torch.tensor([1, 2])), torch.zeros(64, 3)),
    "t[:, pos] = v, pos out of bounds": lambda t: t.__setitem__((slice(None), torch.tensor([1, 256])), torch.zeros(64, 2)),
    "t[:, pos] = v, pos before the start": lambda t: t.__setitem__((slice(None), torch.tensor([-257])), 1.0),
    "t[:, pos] = v, float pos": lambda t: torch.ops.aten.index_put_.default(t, [None, torch.tensor([1.0])], torch.zeros(64, 1)),
    "t[:, pos] = v, values dtype": lambda t: torch.ops.aten.index_put_.default(t, [None, torch.tensor([1])], torch.zeros(64, 1, dtype=torch.float64)),
    "masked_fill_ value overflows the dtype": lambda t: t.masked_fill_(torch.ones(64, 256, dtype=torch.bool), 1e40),
    "masked_fill_ value of one dim": lambda t: t.masked_fill_(torch.ones(64, 256, dtype=torch.bool), torch.ones(1)),
    "masked_fill_ complex value": lambda t: t.masked_fill_(torch.ones(64, 256, dtype=torch.bool), torch.tensor(1 + 2j)),
    "masked_scatter_ by an int mask": lambda t: t.masked_scatter_(torch.ones(64, 256, dtype=torch.int32), torch.zeros(64 * 256)),
    "masked_scatter_ by a mask that does not broadcast": lambda t: t.masked_scatter_(torch.ones(64, 2, dtype=torch.bool), torch.zeros(128)),
    "masked_scatter_ of another dtype": lambda t: t.masked_scatter_(torch.ones(64, 256, dtype=torch.bool), torch.zeros(64 * 256).double()),
    "masked_scatter_ of too few elements": lambda t: t.masked_scatter_(torch.ones(64, 256, dtype=torch.bool), torch.zeros(64 * 256 - 1)),
    "embedding_renorm_ out of range": lambda t: torch.embedding_renorm_(t, torch.tensor([1, 64, 2]), 1.0, 2.0),
    "embedding_renorm_ negative out of range": lambda t: torch.embedding_renorm_(t, torch.tensor([-65, 70]), 1.0, 2.0),
    "embedding_renorm_ float index": lambda t: torch.embedding_renorm_(t, torch.tensor([1.0]), 1.0, 2.0),
    "index_fill out of bounds": lambda t: t.index_fill_(0, torch.tensor([64]), 1.0),
    "index_fill negative out of bounds": lambda t: t.index_fill_(0, torch.tensor([-65]), 1.0),
    "index_fill value of one dim": lambda t: t.index_fill_(0, torch.tensor([1]), torch.ones(1)),
    "index_fill int32": lambda t: t.index_fill_(0, torch.tensor([1], dtype=torch.int32), 1.0),
    "index_put more indices than dims": lambda t: t.index_put_((torch.tensor([1]),) * 3, torch.tensor(1.0)),
    "index_put more indices than dims, accumulate": lambda t: t.index_put_((torch.tensor([1]),) * 3, torch.tensor(1.0), accumulate=True),
    "index_put more indices than dims, masks": lambda t: t.index_put_((torch.tensor([True] * 64), None, torch.tensor(True)), torch.tensor(1.0)),
    "fill_ of a value of 2 dims": lambda t: t.fill_(torch.ones(2, 2)),
    "fill_ of a value of 1 dim": lambda t: t.fill_(torch.ones(1)),
    "fill_ of a value of [1, 1] into a column": lambda t: t[:, 0].fill_(torch.tensor([[3.0]])),
    "fill_ of a value of [1, 1] into the diagonal": lambda t: t.diagonal().fill_(torch.tensor([[3.0]])),
    "fill_ of a value of [1, 1] into every 7th element": lambda t: t.view(-1)[::7].fill_(torch.tensor([[3.0]])),
    "fill_ of a value of [1, 1] into a column of t.T": lambda t: t.T[3].fill_(torch.tensor([[3.0]])),
    **{f"{name} along dim 1": call for name, call in BAD_INDEX_OPS_ALONG_A_DIM.items()},
}


@pytest.mark.parametrize("name", sorted(BAD_CALLS))
def test_bad_scatters_raise_torchs_error_before_any_page_faults_in(name):
    """The dense op's exception type and message, no page faulted in, the table unchanged."""
    call = BAD_CALLS[name]
    x = rows_tensor()
    with pytest.raises(Exception) as dense_error:
        call(x.clone())
    expected_message = str(dense_error.value).splitlines()[0]
    with make_pager() as pager:
        table = PagedTensor.wrap(x.clone(), pager)
        pager.evict_all()
        before = pager.stats()["faults"]
        with pytest.raises(dense_error.type, match=re.escape(expected_message)):
            call(table)
        assert pager.stats()["faults"] == before
        assert torch.equal(table.materialize(), x)


@pytest.mark.parametrize("op", ["index_add_", "index_copy_", "index_reduce_"])
def test_an_index_out_of_bounds_of_a_one_dim_table_raises_torchs_error(op):
    """torch's ``index_add_`` raises ``IndexError`` for a 1-D table (``RuntimeError`` from 2 dims on):
    the paged op raised the 2-D form's ``RuntimeError`` for both."""
    x = torch.arange(64 * 256, dtype=torch.float32)
    call = {"index_add_": lambda t: t.index_add_(0, torch.tensor([99999, 3]), torch.ones(2)),
            "index_copy_": lambda t: t.index_copy_(0, torch.tensor([99999, 3]), torch.ones(2)),
            "index_reduce_": lambda t: t.index_reduce_(0, torch.tensor([99999, 3]), torch.ones(2), "prod")}[op]  # fmt: skip
    _assert_torchs_error_and_table_unchanged(x, call)


def _assert_torchs_error_and_table_unchanged(x: torch.Tensor, call: Callable[[torch.Tensor], object]) -> None:
    """``call`` of a PagedTensor of ``x`` raises the dense call's exception type and first line, and
    leaves the table as it was."""
    with pytest.raises(Exception) as dense_error:
        call(x.clone())
    with make_pager() as pager:
        table = PagedTensor.wrap(x.clone(), pager)
        with pytest.raises(dense_error.type, match=re.escape(str(dense_error.value).splitlines()[0])):
            call(table)
        assert torch.equal(table.materialize(), x)


@pytest.mark.parametrize("alpha", [1, 2, 1.0, 0.5])
def test_an_index_add_out_of_bounds_with_alpha_raises_torchs_error(alpha):
    """torch's CPU ``index_add_`` of a table of 2 dims or more raises ``RuntimeError`` for an index out
    of bounds with ``alpha`` 1, ``IndexError`` ("index out of range in self") with any other: the
    paged op past the tier raised the first for both."""
    x = torch.arange(64 * 256, dtype=torch.float32).reshape(64, 256)
    _assert_torchs_error_and_table_unchanged(x, lambda t: t.index_add_(0, torch.tensor([3, 99999]), torch.ones(2, 256), alpha=alpha))


@pytest.mark.parametrize("op", ["put_", "masked_scatter_"])
def test_writes_into_an_expanded_view_raise_torchs_overlap_error(op):
    """``put_`` and ``masked_scatter_`` past the tier checked torch's errors on a stand-in without
    the table's stride 0, and wrote into ``t.expand(2, n)`` where torch refuses to."""
    x = torch.arange(64 * 256, dtype=torch.float32)
    call = {"put_": lambda t: t.put_(torch.tensor([5, 20000, 100]), torch.tensor([1.0, 2.0, 3.0])),
            "masked_scatter_": lambda t: t.masked_scatter_(torch.arange(x.numel()) % 1000 == 0, torch.zeros(2 * x.numel()))}[op]  # fmt: skip
    with pytest.raises(RuntimeError) as dense_error:
        call(x.clone().expand(2, x.numel()))
    with make_pager() as pager:
        table = PagedTensor.wrap(x.clone(), pager)
        with pytest.raises(RuntimeError, match=re.escape(str(dense_error.value).splitlines()[0])):
            call(table.expand(2, x.numel()))
        assert torch.equal(table.materialize(), x)


def test_other_forms_and_small_tables_run_the_generic_way():
    """A table that fits in the device tier, a scatter along dim 1, and a source that is a
    PagedTensor of another allocation: the dense op's result."""
    with make_pager() as pager:
        small = rows_tensor(16)  # 4 pages
        paged_small = PagedTensor.wrap(small.clone(), pager)
        for target in (paged_small, small):
            target[torch.tensor([1, 1, -2])] = torch.tensor(9.0)
            target.index_add_(1, torch.tensor([0, 255]), torch.ones(16, 2))
        assert torch.equal(paged_small.materialize(), small)
        x = rows_tensor()
        table = PagedTensor.wrap(x.clone(), pager)
        source = torch.randn(3, 256)
        table.index_copy_(0, torch.tensor([0, 33, 63]), PagedTensor.wrap(source.clone(), pager))
        x.index_copy_(0, torch.tensor([0, 33, 63]), source)
        assert torch.equal(table.materialize(), x)


def test_a_flat_table_scatters_its_elements_and_a_transposed_one_its_rows_outermost_first():
    """A 1-D table (rows of one element) writes only the pages of its elements; on a transposed
    table, each of whose rows reaches across the table, ``index_put_`` with ``accumulate`` (it raised
    OutOfPagesError) and ``index_fill_`` run on its view of dims outermost first."""
    with make_pager() as pager:
        x = torch.arange(16 * 1024, dtype=torch.float32)  # 16 pages
        flat = PagedTensor.wrap(x.clone(), pager)
        pager.evict_all()
        before = pager.stats()["faults"]
        for target in (flat, x):
            target.index_put_((torch.tensor([5, 9000, 5, -1]),), torch.tensor([1.0, 2.0, 3.0, 4.0]), accumulate=True)
            target.index_copy_(0, torch.tensor([1030]), torch.tensor([7.0]))
            target.put_(torch.tensor([2049, -2]), torch.tensor([8.0, 9.0]))
        assert pager.stats()["faults"] - before == 5  # pages 0, 8, 15, 1, 2
        assert torch.equal(flat.materialize(), x)
        square = torch.arange(128 * 128, dtype=torch.float32).view(128, 128)  # 16 pages
        transposed = PagedTensor.wrap(square.clone(), pager).t()
        expected = square.clone().t()
        for target in (transposed, expected):
            target.index_put_((torch.tensor([3, 5]),), torch.tensor(0.5), accumulate=True)
            target.index_fill_(0, torch.tensor([7]), 0.0)
        assert torch.equal(transposed.materialize(), expected)
        with pytest.raises(OutOfPagesError):  # a float sum into a repeated row: the dense op's order is its own
            transposed.index_put_((torch.tensor([3, 3]),), torch.tensor(0.5), accumulate=True)
        assert torch.equal(transposed.materialize(), expected)


def test_index_ops_whose_index_is_a_view_of_the_written_table_do_not_write_past_the_tier():
    """Past the tier, the row scatters and element scatters read an index that is a view of the
    table they write as a plain copy and wrote through: where torch refuses the overlap they wrote
    anyway, and ``scatter_`` by rows of the table itself, which torch runs in its own order, left
    other contents. Each now takes the generic way (the pager's error past the tier), the table
    unchanged; an index_select ``out=`` over its own index raises torch's overlap error."""
    base = torch.randint(0, 32, (64, 64), generator=torch.Generator().manual_seed(0))  # 8 pages of int64
    ops = {
        "index_fill_": lambda x: x.index_fill_(0, x[0, :3], 5),
        "index_add_": lambda x: x.index_add_(0, x[0, :3], torch.ones(3, 64, dtype=torch.long)),
        "index_put_": lambda x: x.__setitem__(x[0, :3], 7),
        "index_put_ of a second index": lambda x: x.__setitem__((slice(None), x[0, :3]), 1),
        "scatter_ by the table's rows": lambda x: x.scatter_(1, x[:4], 9),
        "scatter_add_": lambda x: x.scatter_add_(0, x[:4], torch.ones(4, 64, dtype=torch.long)),
    }
    for name, op in ops.items():
        with make_pager(4) as pager:
            table = PagedTensor.wrap(base.clone(), pager)
            with pytest.raises(RuntimeError):
                op(table)
            assert torch.equal(table.materialize(), base), name
    with make_pager(4) as pager:
        table = PagedTensor.wrap(base.clone(), pager)
        with pytest.raises(RuntimeError, match="refer to a single memory location"):
            torch.index_select(table[:32], 0, table[40, :8], out=table[40:48])
        assert torch.equal(table.materialize(), base)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(table_dtype=st.sampled_from([torch.float32, torch.float16, torch.int64, torch.uint8, torch.bool]),
       value_dtype=st.sampled_from([torch.float64, torch.float32, torch.int64, torch.int32, torch.bool]),
       value=st.sampled_from([0, 1, 1.5, -3, 300, 1e30, float("nan")]),
       form=st.sampled_from(["t[mask] = v", "t[rows, 3] = v", "t[rows] = v", "t.T[mask.T] = v", "t[:, cols] = v", "index_put_"]),
       seed=st.integers(0, 99))  # fmt: skip
def test_a_mask_put_of_one_value_of_another_dtype_casts_it_as_torch_does(table_dtype, value_dtype, value, form, seed):
    """``t[mask] = torch.tensor(v)`` with a value of another dtype on a table past the tier: torch's
    ``index_put_`` runs ``masked_fill_`` then, which casts the value (or raises its overflow error);
    the paged table raised "Index put requires the source and destination dtypes match"."""
    generator = torch.Generator().manual_seed(seed)
    if table_dtype == torch.uint8:
        dense = torch.randint(0, 256, (64, 256), generator=generator, dtype=torch.uint8)
    else:
        dense = random_values((64, 256), table_dtype, generator)  # 16 pages of fp32: twice the tier
    mask = torch.rand(64, 256, generator=generator) < 0.3
    if value_dtype == torch.bool:
        scalar = torch.tensor(bool(value == value and value))
    elif value_dtype.is_floating_point:
        scalar = torch.tensor(value, dtype=value_dtype)
    else:
        scalar = torch.tensor(int(value) if value == value and abs(value) < 1e9 else 7, dtype=value_dtype)

    def put(t: torch.Tensor) -> None:
        if form == "t[mask] = v":
            t[mask] = scalar
        elif form == "t[rows, 3] = v":
            t[mask[:, 0], 3] = scalar
        elif form == "t[rows] = v":
            t[mask[:, 0]] = scalar
        elif form == "t.T[mask.T] = v":
            t.T[mask.T] = scalar
        elif form == "t[:, cols] = v":
            t[:, mask[0]] = scalar
        else:
            t.index_put_((mask,), scalar)

    with make_pager() as pager:
        paged = PagedTensor.wrap(dense.clone(), pager)
        try:
            put(dense)
        except (RuntimeError, OverflowError, ValueError) as dense_error:
            with pytest.raises(type(dense_error)) as paged_error:
                put(paged)
            assert str(dense_error) in str(paged_error.value)
        else:
            put(paged)
        assert same_bits(paged.materialize(), dense)


def test_a_mask_put_of_a_one_element_value_of_more_dims_is_a_masked_fill():
    """``index_put_((mask,), torch.tensor([[2.5]]))``: torch fills the mask with the one number
    (its masked-fill path); past the tier the value's shape [1, 1] went on to the put and raised."""
    dense = torch.randn(64, 256, generator=torch.Generator().manual_seed(3))
    with make_pager() as pager:
        paged = PagedTensor.wrap(dense.clone(), pager)
        mask = dense > 0
        torch.index_put_(dense, (mask,), torch.tensor([[2.5]]))
        torch.index_put_(paged, (mask,), torch.tensor([[2.5]]))
        assert same_bits(paged.materialize(), dense)


def test_a_masked_write_past_the_tier_takes_a_paged_mask_or_value():
    """``t[mask] = value`` into a table past the device tier, torch's ``masked_fill_`` when the value
    is one number: with the mask or the one-element value a PagedTensor it raised "Index put requires
    the source and destination dtypes match" (a bfloat16 table, a float32 value) or
    DeviceTierFullError (found by a helper's probe); torch casts the value as with plain ones."""
    generator = torch.Generator().manual_seed(0)
    table = torch.randn(128, 64, generator=generator).to(torch.bfloat16)  # 4 pages; the tier holds 2
    mask = torch.rand(128, 64, generator=generator) > 0.5
    columns = torch.rand(64, generator=generator) > 0.5
    value = torch.tensor([0.25, 0.5])
    with make_pager(device_pages=2) as pager:
        for index, the_value in ((mask, value[1]), (columns, value[1])):
            for paged_index, paged_value in ((True, False), (False, True), (True, True)):
                expected = table.clone()
                expected[(slice(None), index) if index is columns else index] = the_value
                got = PagedTensor.wrap(table, pager)
                wrapped_index = PagedTensor.wrap(index, pager) if paged_index else index
                wrapped_value = PagedTensor.wrap(value, pager)[1] if paged_value else the_value
                got[(slice(None), wrapped_index) if index is columns else wrapped_index] = wrapped_value
                assert same_bits(got.materialize(), expected), (index is columns, paged_index, paged_value)


@pytest.mark.parametrize("op", ["scatter_", "scatter_add_", "scatter_reduce_"])
def test_a_scatter_along_rows_wider_than_the_tier_names_the_op_called(op):
    """A scatter along dim 0 of a table whose rows each span more than the device tier raises (the
    rows cannot be read and written back), naming the op called: it named ``index_copy_``, the
    write-back's step (found by a helper's probe). The table is left as it was."""
    table = torch.randn(3, 9000)  # a row of 36 KB; the tier holds 16 KB
    with make_pager(device_pages=4) as pager:
        paged = PagedTensor.wrap(table, pager)
        call = {"scatter_": lambda: paged.scatter_(0, torch.tensor([[1, 2]]), torch.randn(1, 2)),
                "scatter_add_": lambda: paged.scatter_add_(0, torch.tensor([[1, 2]]), torch.randn(1, 2)),
                "scatter_reduce_": lambda: paged.scatter_reduce_(0, torch.tensor([[1, 2]]), torch.randn(1, 2), "sum")}[op]
        with pytest.raises(OutOfPagesError, match=rf"^aten\.{op}\.\w+: "):
            call()
        assert torch.equal(paged.materialize(), table)


@pytest.mark.parametrize("mask_shape", [(9000,), (1,), ()])
def test_masked_scatter_into_a_vector_past_the_tier(mask_shape):
    """``masked_scatter_`` into a 1-D PagedTensor larger than the device tier raised
    DeviceTierFullError (the run by rows took tables of 2 dims or more; found by a helper's probe): a
    vector runs as a column, whose rows are its elements, marked in the same order."""
    generator = torch.Generator().manual_seed(0)
    table = torch.randn(9000, generator=generator)  # 9 pages; the tier holds 4
    mask = torch.rand(mask_shape, generator=generator) > (0.99 if mask_shape == (9000,) else 0.0)
    source = torch.randn(9000, generator=generator)
    expected = table.clone().masked_scatter_(mask, source)
    with make_pager(device_pages=4) as pager:
        paged = PagedTensor.wrap(table, pager)
        assert paged.masked_scatter_(mask, source) is paged
        assert same_bits(paged.materialize(), expected)
        with pytest.raises(RuntimeError, match="Number of elements of source < number of ones in mask"):
            PagedTensor.wrap(table, pager).masked_scatter_(torch.ones(9000, dtype=torch.bool), source[:10])


@pytest.mark.parametrize("mask_dims", [1, 2])
def test_a_masked_write_after_a_slice_past_the_tier_runs_a_piece_of_rows_at_a_time(mask_dims):
    """``t[:, mask] = values`` (a bool mask after a leading slice, tensor values) into a table past
    the device tier raised DeviceTierFullError, where ``t[:, positions] = values`` runs a piece of
    rows at a time (found by a helper's probe): a mask is the positions of its marks, as torch reads
    it. A mask of the wrong shape gets torch's IndexError."""
    generator = torch.Generator().manual_seed(0)
    table = torch.randn(16, 16, 32, generator=generator)  # 8 pages; the tier holds 4
    mask = torch.rand((16,) if mask_dims == 1 else (16, 32), generator=generator) > 0.5
    values = torch.randn(32 if mask_dims == 1 else 1, generator=generator)
    expected = table.clone()
    expected[:, mask] = values
    with make_pager(device_pages=4) as pager:
        paged = PagedTensor.wrap(table, pager)
        paged[:, mask] = values
        assert same_bits(paged.materialize(), expected)
        with pytest.raises(IndexError):
            table.clone()[:, mask[:8]] = values
        with pytest.raises(IndexError):
            PagedTensor.wrap(table, pager)[:, mask[:8]] = values


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("form", ["t[rows] = t[5, 3]", "t[mask] = t[5, 3]", "t.masked_fill_(mask, t[5, 3])", "t.masked_fill_(rows[:, None], t[5, 3])",
                                  "t.index_put_((rows,), t[5, 3])"])  # fmt: skip
def test_a_masked_write_of_one_element_of_the_table_itself_past_the_tier(device, form):
    """A masked write of one value that is an element of the table itself (a 0-dim view of it) past
    the tier: the dense result, as torch reads the value first (the view overlapped what was
    written, and the op raised DeviceTierFullError for the whole table)."""
    if device == "cuda" and not form.startswith("t.masked_fill_"):
        pytest.skip("torch's CUDA index_put_ refuses a value on the device that overlaps the table (the CPU's reads it as a number)")
    generator = torch.Generator().manual_seed(3)
    dense = torch.randn(64, 256, generator=generator).to(device)  # 16 pages, the tier holds 8
    rows = (torch.arange(64) % 3 == 0).to(device)
    mask = torch.rand(64, 256, generator=generator).to(device) < 0.3

    def write(t: torch.Tensor) -> None:
        if form == "t[rows] = t[5, 3]":
            t[rows] = t[5, 3]
        elif form == "t[mask] = t[5, 3]":
            t[mask] = t[5, 3]
        elif form == "t.masked_fill_(mask, t[5, 3])":
            t.masked_fill_(mask, t[5, 3])
        elif form == "t.masked_fill_(rows[:, None], t[5, 3])":
            t.masked_fill_(rows[:, None], t[5, 3])
        else:
            t.index_put_((rows,), t[5, 3])

    with make_pager(device=device) as pager:
        table = PagedTensor.wrap(dense.clone(), pager)
        write(dense)
        write(table)
        assert torch.equal(table.materialize(), dense)
        assert not pager._pinned_ranges


@pytest.mark.parametrize("mask_form", ["mask", "row mask"])
def test_a_masked_fill_of_a_plain_tensor_by_a_paged_value(mask_form):
    """``plain.masked_fill_(mask, value)`` with ``value`` a 0-dim PagedTensor raised ValueError ("min()
    arg is an empty sequence": the row path asked for the piece of the plain table; found by a
    helper's probe): torch's fill, the value read first."""
    dense = rows_tensor(8, 4)
    mask = dense > 13 if mask_form == "mask" else (torch.arange(8) % 3 == 0)[:, None]
    expected = dense.clone().masked_fill_(mask, 5.0)
    with make_pager() as pager:
        value = PagedTensor.wrap(torch.tensor(5.0), pager)
        plain = dense.clone()
        plain.masked_fill_(mask, value)
        assert type(plain) is torch.Tensor
        assert same_bits(plain, expected)


PUTS_BY_A_0_DIM_MASK = {  # (t: the table, m: a 0-dim bool mask)
    "t.index_put_((m,), v)": lambda t, m: t.index_put_((m,), torch.tensor(7.0)),
    "t.index_put_((m,), v of [1, 1])": lambda t, m: t.index_put_((m,), torch.tensor([[7.0]])),
    "t.index_put_((m,), v of float64)": lambda t, m: t.index_put_((m,), torch.tensor(7.0, dtype=torch.float64)),
    "t.index_put_((None, m), v)": lambda t, m: torch.ops.aten.index_put_.default(t, [None, m], torch.tensor(7.0)),
    "t[m] = v": lambda t, m: t.__setitem__(m, torch.tensor(7.0)),
    "t.index_put_((m, j), v)": lambda t, m: t.index_put_((m, torch.tensor([1, 3])), torch.tensor(7.0)),
    "t.index_put_((j, m), v, accumulate=True)": lambda t, m: t.index_put_((torch.tensor([1, 3]), m), torch.tensor(7.0), accumulate=True),
    # no index tensor left: torch's kernel raises (an internal assert in torch 2.13)
    "t.index_put_((m,), v of a row)": lambda t, m: t.index_put_((m,), torch.ones(256)),
    "t.index_put_((m,), v, accumulate=True)": lambda t, m: t.index_put_((m,), torch.tensor(7.0), accumulate=True),
}


@pytest.mark.parametrize("marked", [True, False])
@pytest.mark.parametrize("form", sorted(PUTS_BY_A_0_DIM_MASK))
def test_a_put_by_a_0_dim_mask_past_the_tier(marked, form):
    """``index_put_`` by a 0-dim bool mask (``torch.tensor(True)``) into a table past the device tier
    raised IndexError ("list index out of range": its marks' positions have no dims; found by a
    helper's probe): torch's outcome, the same bits or the same error before any page faults in.
    torch fills by one value every element (or none: the mask broadcast), and otherwise takes no
    index tensor from the mask."""
    write = PUTS_BY_A_0_DIM_MASK[form]
    mask = torch.tensor(marked)
    dense = rows_tensor()  # 16 pages, the tier holds 8
    try:
        write(dense, mask)
        dense_error = None
    except Exception as error:  # noqa: BLE001 - compared below
        dense_error = error
    with make_pager() as pager:
        table = PagedTensor.wrap(rows_tensor(), pager)
        if dense_error is None:
            write(table, mask)
        else:
            pager.evict_all()
            faults = pager.stats()["faults"]
            with pytest.raises(type(dense_error), match=re.escape(str(dense_error).splitlines()[0])):
                write(table, mask)
            assert pager.stats()["faults"] == faults
        assert same_bits(table.materialize(), dense)
        assert pager.stats()["resident_bytes"]["device"] <= 8 * PAGE


FILLS_BY_AN_ELEMENT_OF_THE_TABLE = {  # (t: the table, plain: a plain 16 x 8 tensor, rows, cols: index tensors on the device)
    "t.fill_(t[5, 3])": lambda t, plain, rows, cols: t.fill_(t[5, 3]),
    "t.T.fill_(t[5, 3])": lambda t, plain, rows, cols: t.T.fill_(t[5, 3]),
    "t[:, 1].fill_(t[5, 3])": lambda t, plain, rows, cols: t[:, 1].fill_(t[5, 3]),
    "t[1:].fill_(t[63, 255])": lambda t, plain, rows, cols: t[1:].fill_(t[63, 255]),
    "t.index_fill_(0, rows, t[5, 3])": lambda t, plain, rows, cols: t.index_fill_(0, rows, t[5, 3]),
    "t.index_fill_(-2, rows, t[5, 3])": lambda t, plain, rows, cols: t.index_fill_(-2, rows, t[5, 3]),
    "t.index_fill_(1, cols, t[5, 3])": lambda t, plain, rows, cols: t.index_fill_(1, cols, t[5, 3]),
    "t.T.index_fill_(1, rows, t[5, 3])": lambda t, plain, rows, cols: t.T.index_fill_(1, rows, t[5, 3]),
    "plain.fill_(t[5, 3])": lambda t, plain, rows, cols: plain.fill_(t[5, 3]),
    "plain.index_fill_(0, rows[::2], t[5, 3])": lambda t, plain, rows, cols: plain.index_fill_(0, rows[::2], t[5, 3]),
}


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("form", sorted(FILLS_BY_AN_ELEMENT_OF_THE_TABLE))
def test_a_fill_by_one_element_of_the_table_itself_past_the_tier(device, form):
    """``fill_`` and ``index_fill_`` of a table past the device tier by one element of the table
    itself (a 0-dim view of it) raised DeviceTierFullError (the view overlaps what is written, and
    the op was left to take the whole table at once; found by a helper's probe): torch reads the
    value first (``fill_`` a clone of it, ``index_fill_`` its ``item()``), and so does this. A plain
    tensor filled by such a value takes it as torch does."""
    write = FILLS_BY_AN_ELEMENT_OF_THE_TABLE[form]
    generator = torch.Generator().manual_seed(3)
    dense = torch.randn(64, 256, generator=generator).to(device)  # 16 pages, the tier holds 8
    plain = torch.randn(16, 8, generator=generator).to(device)
    expected_plain = plain.clone()
    rows, cols = torch.tensor([1, 40, 5], device=device), torch.tensor([0, 3, 200], device=device)
    with make_pager(device=device) as pager:
        table = PagedTensor.wrap(dense.clone(), pager)
        write(dense, expected_plain, rows, cols)
        write(table, plain, rows, cols)
        assert torch.equal(table.materialize(), dense)
        assert type(plain) is torch.Tensor and torch.equal(plain, expected_plain)
        assert not pager._pinned_ranges
        assert pager.stats()["resident_bytes"]["device"] <= 8 * PAGE


def test_a_put_by_a_0_dim_mask_into_a_0_dim_table_raises_torchs_error():
    """``index_put_`` by a 0-dim bool mask into a 0-dim PagedTensor raised TypeError (``reshape()``
    of the mask with no sizes; found by a helper's probe): torch's IndexError "too many indices for
    tensor of dimension 0 (got 1)"."""
    with pytest.raises(IndexError) as dense_error:
        torch.tensor(1.5).index_put_((torch.tensor(True),), torch.tensor(5.0))
    with make_pager() as pager:
        table = PagedTensor.wrap(torch.tensor(1.5), pager)
        with pytest.raises(IndexError, match=re.escape(str(dense_error.value))):
            table.index_put_((torch.tensor(True),), torch.tensor(5.0))
        assert same_bits(table.materialize(), torch.tensor(1.5))
