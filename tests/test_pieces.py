"""Elementwise ops on PagedTensors larger than the device tier run a piece of pages at a time
(``pagedtensor/pieces.py``): results bitwise equal to dense, the device budget never exceeded, and
ops that cannot run in pieces still raise ``OutOfPagesError``."""

from __future__ import annotations

import gc
import warnings
import weakref

import pytest
import torch
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st

import pagedtensor
from pagedtensor import DeviceTierFullError, MemoryConfig, OutOfPagesError, PagedTensor, Pager
from pagedtensor.pieces import may_share_bytes
from tests.support import CPU_AND_CUDA

PAGE = 4096
DEVICE_PAGES = 6


def make_pager(device: str = "cpu", device_pages: int = DEVICE_PAGES) -> Pager:
    return Pager(MemoryConfig(vram_limit=device_pages * PAGE, host_memory=512 * PAGE, page_size=PAGE, slab_size=512 * PAGE,
                              prefetch_strategy="none", device=device))  # fmt: skip


def dense(t: torch.Tensor) -> torch.Tensor:
    return t.materialize() if isinstance(t, PagedTensor) else t


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape or a.stride() != b.stride():
        return False
    if a.dtype.is_floating_point:
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.contiguous().view(bits), b.contiguous().view(bits))
    return torch.equal(a, b)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_the_readme_example_scales_a_table_eight_times_the_device_tier(device):
    with make_pager(device) as pager:
        x = torch.randn(384, 256, device=device)  # 96 pages; the device tier holds 6
        table = PagedTensor.wrap(x.clone(), pager)
        table.mul_(2)
        x.mul_(2)
        assert torch.equal(table.materialize(), x)
        other = PagedTensor.wrap(torch.rand(384, 256, device=device), pager)
        assert torch.equal(table + other, x + other.materialize())
        assert torch.equal(torch.where(x > 0, table, other), torch.where(x > 0, x, other.materialize()))
        bias, scale = torch.randn(256, device=device), torch.rand(384, 1, device=device)  # broadcast operands
        assert torch.equal(table * scale + bias, x * scale + bias)
        assert pager.stats()["resident_bytes"]["device"] <= DEVICE_PAGES * PAGE
        with pytest.raises(OutOfPagesError, match="need more pages at once"):
            table.sum()  # a reduction is not elementwise: its order of additions needs every page at once
        assert torch.equal(table[:192] + table[192:], x[:192] + x[192:])  # views apart: the later read as copies
        with pytest.raises(OutOfPagesError, match="need more pages at once"):
            table[:, :129].add_(table[:, 127:])  # views sharing columns: a piece could read what an earlier one wrote
        table.mul_(table)  # the same elements read and written: fine
        assert torch.equal(table.materialize(), x * x)


def test_an_in_place_op_reading_another_view_of_its_bytes_is_not_run_in_pieces():
    """Torch refuses a partial overlap of the written and read elements; pieces of one page each
    would not overlap, and each would read what the piece before it wrote."""
    x, y = torch.arange(8192.0), torch.arange(8192.0)
    with pytest.raises(RuntimeError, match="single memory location"):
        y[1024:].copy_(y[:-1024])
    with make_pager(device_pages=2) as pager:  # pieces of one page (1024 elements)
        flat = PagedTensor.wrap(x.clone(), pager)
        with pytest.raises(OutOfPagesError):
            flat[1024:].copy_(flat[:-1024])
        assert torch.equal(flat.materialize(), x)
    with make_pager() as pager:  # a 0-dim view of the written bytes: refused before any piece runs
        flat = PagedTensor.wrap(x.clone(), pager)
        with pytest.raises((OutOfPagesError, RuntimeError)):
            flat.add_(flat[5200])
        assert torch.equal(flat.materialize(), x)
        flat.fill_(flat[3])  # torch's fill_ reads its value first (x.fill_(x[3]) fills 3.0): so does the paged one
        assert torch.equal(flat.materialize(), x.clone().fill_(x[3]))
        flat.copy_(x)
        other = PagedTensor.wrap(torch.arange(3.0), pager)  # a 0-dim view of another allocation is read once
        assert torch.equal(flat.mul_(other[2]).materialize(), x * 2)


def test_an_op_too_large_with_a_sparse_operand_names_the_op():
    """Pieces apply to strided operands only: a sparse CSR one gives the op's OutOfPagesError (it
    gave "Sparse CSR tensors do not have strides", naming no op); small enough, the op runs."""
    x = torch.randn(64, 100)  # 6.25 pages
    csr = (x * (x > 1)).to_sparse_csr()
    with make_pager(device_pages=4) as pager:
        with pytest.raises(OutOfPagesError, match="aten.add.Tensor"):
            PagedTensor.wrap(x, pager) + csr
        assert torch.equal((PagedTensor.wrap(x[:8], pager) + csr.to_dense()[:8].to_sparse_csr()).cpu(), x[:8] + csr.to_dense()[:8])


LAYOUTS = dict(  # the shapes and layouts the elementwise-op properties draw
    rows=st.integers(8, 80),
    cols=st.sampled_from([64, 96, 256]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.float64]),
    view=st.sampled_from(["rows", "transposed", "column", "every_other_row", "grid"]),
    offset=st.integers(0, 3),
)


def two_flat_tensors_and_a_layout(rows: int, cols: int, dtype: torch.dtype, view: str, offset: int, seed: int):
    """Two random flat tensors of ``rows * cols + offset`` elements, and the function that views one
    as ``view`` of a ``(rows, cols)`` matrix at element ``offset``: a transposed view, a column,
    every other row, every other row's every third element."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(rows * cols + offset, generator=generator).to(dtype)
    second = torch.randn(rows * cols + offset, generator=generator).to(dtype)

    def layout(flat: torch.Tensor) -> torch.Tensor:
        t = flat[offset:].view(rows, cols)
        return {"rows": t, "transposed": t.t(), "column": t[:, cols // 3], "every_other_row": t[::2], "grid": t[::2, ::3]}[view]

    return base, second, layout


UNARY = {"neg": torch.neg, "abs": torch.abs, "exp": torch.exp, "sigmoid": torch.sigmoid, "square": torch.square,
         "gelu": torch.nn.functional.gelu}  # CPU gelu of a transposed tensor rounds otherwise than of 1-D runs
BINARY = {"add": torch.add, "mul": torch.mul, "maximum": torch.maximum, "div": torch.div,
          "where": lambda a, b: torch.where(b > 0.5 if isinstance(b, torch.Tensor) else a > 0.5, a, b)}
IN_PLACE = {"mul_": lambda t, o: t.mul_(o), "add_": lambda t, o: t.add_(o, alpha=2), "copy_": lambda t, o: t.copy_(o),
            "clamp_": lambda t, o: t.clamp_(min=-0.5), "fill_": lambda t, o: t.fill_(1.5), "zero_": lambda t, o: t.zero_()}  # fmt: skip


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    **LAYOUTS,
    kind=st.sampled_from(["unary", "binary", "in_place"]),
    name=st.integers(0, 5),
    other=st.sampled_from(["paged", "plain", "plain of another layout", "scalar", "0-dim", "same"]),
    seed=st.integers(0, 2**16),
)
# A transposed table whose last tile was one row: CPU gelu ran its contiguous loop on it, rounding otherwise.
@example(rows=41, cols=256, dtype=torch.float32, view="transposed", offset=0, kind="unary", name=5, other="paged", seed=0)
def test_elementwise_ops_in_pieces_equal_dense(rows, cols, dtype, view, offset, kind, name, other, seed):
    """Any size (a few pages to many times the device tier), layout (a transposed view, a view at an
    offset into its allocation; views whose elements do not fill their span: a column, every other
    row, every other row's every third element) and second operand (a plain one of another layout
    among them: ``torch.where(mask, t.T, 0)``): bitwise equal to the same op on dense tensors.
    (Views that do not fill their span raised OutOfPagesError once larger than the device tier, and
    so did out-of-place ops with a plain operand of another layout.)"""
    base, second, layout = two_flat_tensors_and_a_layout(rows, cols, dtype, view, offset, seed)

    with make_pager() as pager:
        x, y = layout(base.clone()), layout(second.clone())
        paged_x = layout(PagedTensor.wrap(base.clone(), pager))
        paged_y = layout(PagedTensor.wrap(second.clone(), pager))
        other_layout = y.contiguous() if not y.is_contiguous() else y.t().contiguous().t()  # a plain operand laid out otherwise
        operands = {"paged": (paged_y, y), "plain": (y, y), "plain of another layout": (other_layout, other_layout),
                    "scalar": (0.75, 0.75), "0-dim": (torch.tensor(0.75, dtype=dtype),) * 2, "same": (paged_x, x)}  # fmt: skip
        paged_other, dense_other = operands[other]
        if kind == "unary":
            op = list(UNARY.values())[name % len(UNARY)]
            got, expected = op(paged_x), op(x)
        elif kind == "binary":
            op = list(BINARY.values())[name % len(BINARY)]
            if other == "scalar" and op is torch.maximum:
                op = torch.mul
            got, expected = op(paged_x, paged_other), op(x, dense_other)
        else:
            op = list(IN_PLACE.values())[name % len(IN_PLACE)]
            if other == "scalar" and op is IN_PLACE["copy_"]:
                op = IN_PLACE["mul_"]
            got, expected = op(paged_x, paged_other), op(x, dense_other)
            assert got is paged_x
        assert same_bits(dense(got), expected)
        assert same_bits(paged_x.materialize(), x) and same_bits(paged_y.materialize(), y)
        assert pager.stats()["resident_bytes"]["device"] <= DEVICE_PAGES * PAGE


BROADCAST_OPS = {  # name: op of the paged (or dense) table and a broadcast operand
    "add": lambda t, b: t + b,
    "sub_alpha": lambda t, b: torch.sub(t, b, alpha=3),
    "maximum_of_the_operand_first": lambda t, b: torch.maximum(b, t),
    "mul_": lambda t, b: t.mul_(b),
    "copy_": lambda t, b: t.copy_(b),
    "where": lambda t, b: torch.where(b > 0, t, b),
    "masked_fill_": lambda t, b: t.masked_fill_(b > 0, 2.5),
    "addcmul_out": lambda t, b: torch.addcmul(t, b, t, value=0.5, out=torch.empty_like(t.materialize() if isinstance(t, PagedTensor) else t)),
}


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.integers(16, 160),
    cols=LAYOUTS["cols"],
    dtype=LAYOUTS["dtype"],
    view=st.sampled_from(["rows", "transposed", "every_other_row"]),
    form=st.sampled_from(["row", "row_2d", "column"]),
    paged_operand=st.booleans(),
    expanded=st.booleans(),
    name=st.sampled_from(sorted(BROADCAST_OPS)),
    seed=st.integers(0, 2**16),
)
# Given the expanded operand, the meta kernel lays this result out as (49, 1), the CPU kernel as (1, 256).
@example(rows=49, cols=256, dtype=torch.float16, view="transposed", form="row", paged_operand=False, expanded=True,
         name="maximum_of_the_operand_first", seed=0)  # fmt: skip
def test_elementwise_ops_with_a_broadcast_operand_in_pieces_equal_dense(rows, cols, dtype, view, form, paged_operand, expanded, name, seed):
    """A table of any size and layout with an operand broadcast to it (``t + bias``, ``t * scale[:, None]``,
    a broadcast mask, a plain or paged operand, or its view expanded to the table's shape,
    ``bias.expand_as(t)``): bitwise equal to dense, strides too, the device budget held. (Past the
    tier they raised OutOfPagesError: pieces took operands of one shape only, then not expanded views.)"""
    # (``where``'s mask of an expanded operand, ``b > 0``, is a plain tensor of the table's shape in
    # another layout than a transposed table's: with nothing written, pieces need one layout.)
    assume(not (expanded and name == "where"))
    base, _, layout = two_flat_tensors_and_a_layout(rows, cols, dtype, view, 0, seed)
    x = layout(base.clone())
    shape = {"row": (x.shape[1],), "row_2d": (1, x.shape[1]), "column": (x.shape[0], 1)}[form]
    operand = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    op = BROADCAST_OPS[name]
    as_given = (lambda t: t.expand(x.shape)) if expanded else (lambda t: t)
    with make_pager() as pager:
        paged_x = layout(PagedTensor.wrap(base.clone(), pager))
        paged_operand_or_plain = PagedTensor.wrap(operand.clone(), pager) if paged_operand else operand
        got, expected = op(paged_x, as_given(paged_operand_or_plain)), op(x, as_given(operand))
        assert same_bits(dense(got), expected)
        assert same_bits(paged_x.materialize(), x)
        assert pager.stats()["resident_bytes"]["device"] <= DEVICE_PAGES * PAGE


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("name", ["atan2", "logaddexp", "hypot", "pow"])
@pytest.mark.parametrize("view", ["rows", "transposed"])
def test_a_broadcast_operand_of_another_dtype_gives_torchs_bits_past_the_tier(device, name, view):
    """``atan2(t, row)`` of a float32 table past the tier and an int32 row: torch's CPU kernel
    rounds some elements otherwise for the row than for the row expanded to the table's shape, which
    every piece took (3 elements of a 16 x 1250 table differed, about 2,300 transposed). Each piece
    now takes its tile of the row as given. (For a row the caller expands, torch's own bits depend
    on how the table is cut: the README's exception for CPU pagers.)"""
    op = getattr(torch, name)
    generator = torch.Generator().manual_seed(0)
    base = (torch.rand(16, 1250, generator=generator) * 4 + 0.1).to(device)  # 20 pages: past the 8-page tier
    row = torch.randint(1, 5, (1250,), dtype=torch.int32, generator=generator).to(device)
    layout = (lambda t: t) if view == "rows" else (lambda t: t.T.contiguous().T)  # transposed: the same values
    with make_pager(device, device_pages=8) as pager:
        table = layout(PagedTensor.wrap(base.clone(), pager)) if view == "rows" else PagedTensor.wrap(base.T.contiguous(), pager).T
        dense_table = layout(base)
        expected, got = op(dense_table, row), op(table, row)
        assert same_bits(got, expected), f"{int((got != expected).sum())} elements differ"
        assert pager.stats()["resident_bytes"]["device"] <= 8 * PAGE


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_an_expanded_paged_operand_is_read_whole_once(device):
    """A PagedTensor of 6 pages read through ``expand`` (stride 0 along a dim) into an op whose
    result is 24 pages, on a device tier of 8: the operand is read whole once, as a broadcast one,
    and the op runs in pieces of the rest (it raised: an expanded view reaches its elements
    several times, and with the result its pages did not fit at once). An expanded operand larger
    than a piece is copied a part of the target at a time."""
    x = torch.randn(24, 256, device=device)  # 6 pages
    with make_pager(device, device_pages=8) as pager:
        t = PagedTensor.wrap(x.clone(), pager)
        out = PagedTensor.wrap(torch.zeros(4, 24, 256, device=device), pager)  # 24 pages
        out.copy_(t.expand(4, 24, 256))
        assert torch.equal(out.materialize(), x.expand(4, 24, 256))
        assert torch.mul(t.expand(4, 24, 256), 3, out=out) is out
        assert torch.equal(out.materialize(), x.expand(4, 24, 256) * 3)
        other = torch.randn(4, 24, 256, device=device)
        paged_other = PagedTensor.wrap(other.clone(), pager)
        for got, expected in ((paged_other - t.expand(4, 24, 256), other - x.expand(4, 24, 256)),
                              (torch.add(t.unsqueeze(1).expand(24, 4, 256).transpose(0, 1), paged_other),
                               torch.add(x.unsqueeze(1).expand(24, 4, 256).transpose(0, 1), other))):  # fmt: skip
            assert type(got) is torch.Tensor and same_bits(got, expected)
        table = torch.randn(98, 256, device=device, dtype=torch.float16)  # 13 pages, read transposed beside an expanded row
        row = torch.randn(98, device=device, dtype=torch.float16)
        got = torch.maximum(row.expand(256, 98), PagedTensor.wrap(table.clone(), pager).t())
        # strides (1, 256), as the kernel lays it out (the meta kernel, given the expanded row, says (98, 1))
        assert same_bits(got, torch.maximum(row.expand(256, 98), table.t()))
        assert pager.stats()["resident_bytes"]["device"] <= 8 * PAGE
        # An expanded operand larger than a piece: copy_ takes it a part of the target at a time (it raised)
        wide_values = torch.randn(40, 256, device=device)
        wide = PagedTensor.wrap(wide_values.clone(), pager)  # 10 pages: more than a piece
        target = PagedTensor.wrap(torch.zeros(2, 40, 256, device=device), pager).copy_(wide.expand(2, 40, 256))
        assert torch.equal(target.materialize(), wide_values.expand(2, 40, 256))
        assert pager.stats()["resident_bytes"]["device"] <= 8 * PAGE



EXPANDED_ONLY_VIEWS = {
    "leading": lambda t: t.expand(2, *t.shape),
    "middle": lambda t: t[:, None].expand(t.shape[0], 3, t.shape[1]),
    "trailing": lambda t: t[..., None].expand(*t.shape, 2),
    "transposed": lambda t: t.t()[None].expand(2, t.shape[1], t.shape[0]),
    "unit_dim_moved": lambda t: t[None].transpose(0, 1),  # not expanded: a dim of size 1 whose stride is the whole span
}
EXPANDED_ONLY_OPS = {
    "mul": lambda v, plain: v * 2,
    "abs": lambda v, plain: v.abs(),
    "eq": lambda v, plain: v == 0,
    "where": lambda v, plain: torch.where(v > 0, v, 0.0),
    "add_expanded_plain": lambda v, plain: v + plain[: v.shape[-1]].expand(v.shape),
}


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("view", sorted(EXPANDED_ONLY_VIEWS))
@pytest.mark.parametrize("op", sorted(EXPANDED_ONLY_OPS))
@pytest.mark.parametrize("shape", [(160, 96), (4, 18432)])
def test_an_op_whose_every_operand_of_the_results_shape_is_expanded_keeps_that_shape(device, view, op, shape):
    """An elementwise op reading a table past the tier only through an expanded view (``t.expand(2,
    ...)``: no operand has the result's shape unexpanded) gives the dense op's shape, bits and
    strides, the device budget held. (It returned the expanded dims with one index each, no error:
    the expanded view was read as a broadcast operand of its own compacted shape.) With rows wider
    than a piece, ``(4, 18432)``, a dim of size 1 of another stride (the compacted view's 0,
    ``t[None].transpose(0, 1)``'s whole span) was taken for another layout: DeviceTierFullError;
    beside a broadcast operand (``torch.where``, a plain operand expanded) such rows still raise."""
    x = torch.randn(*shape, device=device)  # 60 or 288 KiB: 15 or 72 pages on a tier of 6
    plain = torch.randn(max(shape), device=device)
    with make_pager(device) as pager:
        t = PagedTensor.wrap(x.clone(), pager)
        try:
            got = EXPANDED_ONLY_OPS[op](EXPANDED_ONLY_VIEWS[view](t), plain)
        except OutOfPagesError:
            assert shape == (4, 18432) and op in ("where", "add_expanded_plain"), "only beside a broadcast operand"
            return
        expected = EXPANDED_ONLY_OPS[op](EXPANDED_ONLY_VIEWS[view](x), plain)
        assert type(got) is torch.Tensor and got.shape == expected.shape
        if view == "unit_dim_moved":  # the stride of its dim of size 1: CPU mul keeps the input's, abs the meta kernel's
            got, expected = got.squeeze(1), expected.squeeze(1)
        assert same_bits(got, expected)
        assert same_bits(t.materialize(), x)
        assert pager.stats()["resident_bytes"]["device"] <= DEVICE_PAGES * PAGE


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    **LAYOUTS,
    new_dim=st.integers(0, 2),
    copies=st.integers(2, 3),
    name=st.sampled_from(sorted(EXPANDED_ONLY_OPS)),
    seed=st.integers(0, 2**16),
)
def test_ops_on_expanded_views_of_tables_of_any_layout_equal_dense(rows, cols, dtype, view, offset, new_dim, copies, name, seed):
    """Property: an elementwise op of a table of any size and layout read only through an expanded
    view (a new dim of ``copies`` indices at ``new_dim``, stride 0) is bitwise equal to the dense op,
    shape and strides too, with the device budget held."""
    base, second, layout = two_flat_tensors_and_a_layout(rows, cols, dtype, view, offset, seed)

    def expanded(t: torch.Tensor) -> torch.Tensor:
        at = min(new_dim, t.dim())
        return t.unsqueeze(at).expand(*t.shape[:at], copies, *t.shape[at:])

    op = EXPANDED_ONLY_OPS[name]
    plain = second[: max(rows, cols, copies)].clone()
    with make_pager() as pager:
        got = op(expanded(layout(PagedTensor.wrap(base.clone(), pager))), plain)
        expected = op(expanded(layout(base)), plain)
        assert same_bits(dense(got), expected)
        assert pager.stats()["resident_bytes"]["device"] <= DEVICE_PAGES * PAGE



def test_a_table_dropped_after_an_op_in_pieces_frees_its_pages_at_once():
    """With the pager's sequential prefetch on, an op in pieces past the tier left its table alive
    after the user dropped it (a failed prefetch's future in a reference cycle with the op's frames):
    its pages stayed allocated until a garbage collection, and wrapping the next tables raised
    OutOfPagesError with the host tier full of dropped ones."""
    config = MemoryConfig(vram_limit=DEVICE_PAGES * PAGE, host_memory=40 * PAGE, page_size=PAGE, device="cpu")
    with Pager(config) as pager:
        PagedTensor.wrap(torch.randn(60, 256), pager).neg()  # torch's first call of a meta kernel keeps its import's frames
    gc.collect()
    gc.disable()
    try:
        with Pager(config) as pager:
            for _ in range(4):  # each round's two tables take 30 of the host tier's 40 pages
                a = PagedTensor.wrap(torch.randn(60, 256), pager)
                b = PagedTensor.wrap(torch.randn(60, 256), pager)
                b.copy_(a.neg())
                kept = weakref.ref(a)
                del a, b
                assert kept() is None and not pager._allocations, "a dropped table kept its pages"
    finally:
        gc.enable()


OUT_FORMS = {
    "add": lambda a, b, out: torch.add(a, b, alpha=2, out=out),
    "mul": lambda a, b, out: torch.mul(a, b, out=out),
    "neg": lambda a, b, out: torch.neg(a, out=out),
    "clamp": lambda a, b, out: torch.clamp(a, min=-0.5, out=out),
    "addcmul": lambda a, b, out: torch.addcmul(a, a, b, value=0.5, out=out),
    "lerp": lambda a, b, out: torch.lerp(a, b, 0.25, out=out),
    "where": lambda a, b, out: torch.where(a > 0, a, b, out=out),
}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    **LAYOUTS,
    name=st.sampled_from(sorted(OUT_FORMS)),
    out=st.sampled_from(["plain", "plain_other_layout", "plain_float64", "paged", "self"]),
    seed=st.integers(0, 2**16),
)
def test_out_forms_of_elementwise_ops_in_pieces_equal_dense(rows, cols, dtype, view, offset, name, out, seed):
    """``torch.add(paged, other, out=t)`` and other elementwise ops with ``out=`` of the result's shape
    (a plain tensor of any layout and of a dtype the result casts to, a PagedTensor of the operands'
    layout, the operand itself) run a piece at a time like their functional forms: they raised
    OutOfPagesError once larger than the device tier. Bitwise equal to the same op on dense tensors."""
    base, second, layout = two_flat_tensors_and_a_layout(rows, cols, dtype, view, offset, seed)

    op = OUT_FORMS[name]
    with make_pager() as pager:
        x, y = layout(base.clone()), layout(second.clone())
        paged_x = layout(PagedTensor.wrap(base.clone(), pager))
        paged_y = layout(PagedTensor.wrap(second.clone(), pager))
        if out == "self":
            expected_out, got_out = x, paged_x
        elif out == "paged":
            expected_out, got_out = layout(torch.zeros_like(base)), layout(PagedTensor.wrap(torch.zeros_like(base), pager))
        else:
            shape = tuple(reversed(x.shape)) if out == "plain_other_layout" else x.shape
            plain = torch.zeros(shape, dtype=torch.float64 if out == "plain_float64" else dtype)
            expected_out = plain.clone().permute(*reversed(range(plain.dim()))) if out == "plain_other_layout" else plain.clone()
            got_out = plain.permute(*reversed(range(plain.dim()))) if out == "plain_other_layout" else plain
        try:
            expected = op(x, y, expected_out)
        except RuntimeError as error:  # an out dtype the op refuses: torch's error, before any piece is written
            with pytest.raises(type(error), match=str(error)[:20]):
                op(paged_x, paged_y, got_out)
            assert not dense(got_out).any()
            return
        got = op(paged_x, paged_y, got_out)
        assert got is got_out and expected is expected_out
        assert same_bits(dense(got), expected)
        assert same_bits(paged_x.materialize(), x) and same_bits(paged_y.materialize(), y)
        assert pager.stats()["resident_bytes"]["device"] <= DEVICE_PAGES * PAGE


def test_a_dtype_conversion_larger_than_the_device_tier_runs_in_pieces():
    # t.to(dtype) is what module.half() and model.to(torch.bfloat16) run on every parameter.
    x = torch.randn(64, 256)  # 16 pages of 4 KiB
    with Pager(MemoryConfig(page_size=4096, vram_limit=4 * 4096, host_memory=64 * 4096, slab_size=64 * 4096, device="cpu",
                            prefetch_strategy="none")) as pager:  # fmt: skip
        t = PagedTensor.wrap(x, pager)
        for dtype in (torch.bfloat16, torch.float16, torch.float64):
            converted = t.to(dtype)  # a PagedTensor on the same pager
            assert type(converted) is PagedTensor and same_bits(converted.materialize(), x.to(dtype))
        assert same_bits(t.t().to(torch.bfloat16).materialize(), x.t().to(torch.bfloat16))
        assert same_bits(t[:, 3].to(torch.float16).materialize(), x[:, 3].to(torch.float16))  # pieces along the rows
        with pytest.raises(OutOfPagesError):
            t.cumsum(0)  # not elementwise: no pieces


def test_a_plain_tensor_written_from_a_paged_one_larger_than_the_device_tier_runs_in_pieces():
    """``dense.copy_(paged)`` (what ``load_state_dict`` runs to load a checkpoint saved from a paged
    model, whose tensors load paged, into a plain one) and other in-place ops on a plain tensor
    reading a PagedTensor of its layout ran only with every page resident at once: an
    ``OutOfPagesError`` for a weight larger than the device tier, which ``paged.copy_(paged)`` and
    ``paged + 1`` do not raise. They now run a piece at a time, writing the plain tensor directly."""
    import io

    x = torch.randn(64, 256)  # 16 pages of 4 KiB
    with make_pager(device_pages=4) as pager:
        table = PagedTensor.wrap(x, pager)
        target = torch.empty(64, 256)
        assert target.copy_(table) is target and same_bits(target, x)
        column = torch.zeros(64, 256)
        column[:, 3].copy_(table[:, 3])  # 64 elements on 16 pages: pieces along the rows
        assert torch.equal(column[:, 3], x[:, 3]) and not column[:, :3].any() and not column[:, 4:].any()
        total = torch.ones(64, 256)
        assert same_bits(total.add_(table).mul_(table), (1 + x) * x)
        assert pager.stats()["resident_bytes"]["device"] <= 4 * PAGE
        overlapping = torch.arange(64 * 257.0)
        with pytest.raises((OutOfPagesError, RuntimeError)):  # another view of the written tensor: no pieces
            overlapping[:64 * 256].view(64, 256).addcmul_(table, overlapping[256:].view(64, 256))
        saved = io.BytesIO()
        torch.save({"weight": table}, saved)
        saved.seek(0)
        previous = pagedtensor.set_default_pager(pager)
        try:
            state = torch.load(saved)
        finally:
            pagedtensor.set_default_pager(previous)
        assert type(state["weight"]) is PagedTensor
        plain = torch.nn.Linear(256, 64, bias=False)
        plain.load_state_dict(state)
        assert same_bits(plain.weight.detach(), x)


@pytest.mark.gpu
def test_gpu_out_forms_and_conversions_run_in_pieces_on_cuda():
    """On CUDA (side-stream copies, pinned host slabs): ``torch.add(paged, 1, out=plain)`` and
    ``torch.where`` into a plain ``out`` of another layout, and ``t.to(dtype)`` (a PagedTensor on the
    same pager), each over a tensor four times the device tier, give the dense op's bits."""
    x = torch.randn(96, 256, generator=torch.Generator().manual_seed(7)).cuda()  # 24 pages of 4 KiB
    y = torch.randn(96, 256, generator=torch.Generator().manual_seed(8)).cuda()
    with make_pager("cuda") as pager:
        paged_x, paged_y = PagedTensor.wrap(x.clone(), pager), PagedTensor.wrap(y.clone(), pager)
        out = torch.empty(96, 256, device="cuda")
        assert torch.add(paged_x, paged_y, alpha=2, out=out) is out
        assert same_bits(out, torch.add(x, y, alpha=2))
        out_t = torch.empty(256, 96, device="cuda").t()
        torch.where(paged_x > 0, paged_x, paged_y, out=out_t)
        assert same_bits(out_t, torch.where(x > 0, x, y, out=torch.empty(256, 96, device="cuda").t()))
        for dtype in (torch.float16, torch.bfloat16):
            converted = paged_x.to(dtype)
            assert type(converted) is PagedTensor and converted.pager is pager
            assert same_bits(converted.materialize(), x.to(dtype))
        assert pager.stats()["resident_bytes"]["device"] <= DEVICE_PAGES * PAGE


def _floor_divide_in_place(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.floor_divide_(b)


def _fill(t: torch.Tensor) -> torch.Tensor:
    return torch.fill(t, 3.0)


def _masked_fill_in_place(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.masked_fill_(b > 2.5, -1.0)


def _masked_fill_by_a_tensor(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.masked_fill(b > 2.5, torch.tensor(-1.0))


def _masked_fill_in_place_by_a_tensor(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.masked_fill_(b > 2.5, torch.tensor(-1.0))


UNTAGGED_ELEMENTWISE = {  # name: (op, dtype, tensor arguments)
    "rsub": (torch.rsub, torch.float32, 2),
    "floor_divide": (torch.floor_divide, torch.float32, 2),
    "floor_divide int": (torch.floor_divide, torch.int64, 2),
    "floor_divide_": (_floor_divide_in_place, torch.float32, 2),
    "fill": (_fill, torch.float32, 1),
    "complex": (torch.complex, torch.float32, 2),
    "polar": (torch.polar, torch.float32, 2),
    "masked_fill_": (_masked_fill_in_place, torch.float32, 2),
    "masked_fill_ by a tensor": (_masked_fill_in_place_by_a_tensor, torch.float32, 2),
    # the activations' backward ops (what autograd runs after their tagged forwards), and hardswish
    "hardtanh_backward": (lambda g, x: torch.ops.aten.hardtanh_backward(g, x - 2.5, -1.0, 1.0), torch.float32, 2),
    "elu_backward": (lambda g, x: torch.ops.aten.elu_backward(g, 1.0, 1.0, 1.0, False, x - 2.5), torch.float32, 2),
    "elu_backward of the result": (lambda g, x: torch.ops.aten.elu_backward(g, 1.0, 1.0, 1.0, True, x - 2.5), torch.float32, 2),
    "leaky_relu_backward": (lambda g, x: torch.ops.aten.leaky_relu_backward(g, x - 2.5, 0.01, False), torch.float32, 2),
    "softplus_backward": (lambda g, x: torch.ops.aten.softplus_backward(g, x - 2.5, 1.0, 1.0), torch.float32, 2),
    "hardsigmoid_backward": (lambda g, x: torch.ops.aten.hardsigmoid_backward(g, (x - 2.5) * 2), torch.float32, 2),
    "hardswish_backward": (lambda g, x: torch.ops.aten.hardswish_backward(g, (x - 2.5) * 2), torch.float32, 2),
    "mish_backward": (lambda g, x: torch.ops.aten.mish_backward(g, x - 2.5), torch.float32, 2),
    "softshrink_backward": (lambda g, x: torch.ops.aten.softshrink_backward(g, x - 2.5, 0.5), torch.float32, 2),
    "hardshrink_backward": (lambda g, x: torch.ops.aten.hardshrink_backward(g, x - 2.5, 0.5), torch.float32, 2),
    "hardswish": (lambda x: torch.nn.functional.hardswish((x - 2.5) * 2), torch.float32, 1),
    "hardswish_": (lambda x: torch.nn.functional.hardswish((x - 2.5) * 2, inplace=True), torch.float32, 1),
}


def test_masked_fill_by_a_tensor_runs_in_pieces_whatever_the_layout():
    """``masked_fill`` by a tensor value lays its result out contiguously whatever its input's
    layout: on a contiguous tensor it runs in 1-D pieces; on a transposed one in pieces along the
    outer dim, each of the input's layout, their results copied into the contiguous result (it
    raised ``OutOfPagesError`` while transposed tables ran in 1-D pieces)."""
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.rand(64, 300, generator=generator) * 4 for _ in range(2))
    with make_pager("cpu") as pager:
        got = _masked_fill_by_a_tensor(PagedTensor.wrap(a.clone(), pager), PagedTensor.wrap(b.clone(), pager))
        assert same_bits(dense(got), _masked_fill_by_a_tensor(a, b))
        transposed = [PagedTensor.wrap(t.t().contiguous(), pager).t() for t in (a, b)]
        got = _masked_fill_by_a_tensor(*transposed)
        assert same_bits(dense(got), _masked_fill_by_a_tensor(*(t.t().contiguous().t() for t in (a, b))))
        assert pager.stats()["resident_bytes"]["device"] <= DEVICE_PAGES * PAGE


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("name", sorted(UNTAGGED_ELEMENTWISE))
def test_elementwise_ops_without_the_pointwise_tag_run_in_pieces(device, transposed, name):
    """``rsub``, ``floor_divide`` (and in place), ``torch.fill``, ``torch.complex``, ``torch.polar``
    and ``masked_fill_`` are elementwise but lack torch's ``pointwise`` tag: they raised OutOfPagesError on tensors larger
    than the device tier (found by sweeping torch's unary and binary ufuncs with large inputs). So do
    the backward ops of ``hardtanh``/``relu6``, ``elu``/``selu``/``celu``, ``leaky_relu``, ``softplus``,
    ``hardsigmoid``, ``hardswish``, ``mish``, ``softshrink`` and ``hardshrink``, whose forwards ran in
    pieces while their backward raised, and ``hardswish`` itself."""
    op, dtype, count = UNTAGGED_ELEMENTWISE[name]
    generator = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        tensors = [torch.rand(64, 300, generator=generator) * 4 + 0.5 for _ in range(count)]
    else:
        tensors = [torch.randint(1, 9, (64, 300), generator=generator) for _ in range(count)]
    tensors = [(t.t().contiguous().t() if transposed else t).to(device) for t in tensors]  # 19 pages each; the tier holds 6
    with make_pager(device) as pager:
        expected = op(*[t.clone() for t in tensors])
        got = op(*[PagedTensor.wrap(t.clone(), pager) for t in tensors])
        assert pager.stats()["resident_bytes"]["device"] <= DEVICE_PAGES * PAGE
        expected, got = dense(expected), dense(got)
        if expected.is_complex():
            expected, got = torch.view_as_real(expected), torch.view_as_real(got)
        assert same_bits(got, expected)


# In-place and out= forms whose functional form torch tags pointwise but which it leaves untagged
# themselves: name: (op of the tensors and an output, dtype, tensor arguments, output dtype or None
# for an in-place op, which writes its first tensor).
UNTAGGED_WRITERS = {
    "abs_": (lambda t, out: t[0].abs_(), torch.float32, 1, None),
    "copysign_": (lambda t, out: t[0].copysign_(t[1] - 2), torch.float32, 2, None),
    "copysign_ by a number": (lambda t, out: t[0].copysign_(-1.0), torch.float32, 1, None),
    "eq_": (lambda t, out: t[0].eq_(t[1]), torch.float32, 2, None),
    "ne_ a number": (lambda t, out: t[0].ne_(2.0), torch.float32, 1, None),
    "lt_": (lambda t, out: t[0].lt_(t[1]), torch.float32, 2, None),
    "ge_ a number": (lambda t, out: t[0].ge_(2.0), torch.float32, 1, None),
    "gcd_": (lambda t, out: t[0].gcd_(t[1]), torch.int64, 2, None),
    "lcm_": (lambda t, out: t[0].lcm_(t[1]), torch.int64, 2, None),
    "heaviside_": (lambda t, out: t[0].heaviside_(t[1]), torch.float32, 2, None),
    "gelu_": (lambda t, out: torch.ops.aten.gelu_.default(t[0]), torch.float32, 1, None),
    "mish_": (lambda t, out: torch.nn.functional.mish(t[0], inplace=True), torch.float32, 1, None),
    "threshold_": (lambda t, out: torch.nn.functional.threshold_(t[0], 2.0, -1.0), torch.float32, 1, None),
    "true_divide_": (lambda t, out: t[0].true_divide_(t[1]), torch.float32, 2, None),
    "xlogy_ by a number": (lambda t, out: t[0].xlogy_(2.0), torch.float32, 1, None),
    ">>= (__irshift__)": (lambda t, out: t[0].__irshift__(1), torch.int64, 1, None),
    ">>= a tensor (__irshift__)": (lambda t, out: t[0].__irshift__(t[1] % 3), torch.int64, 2, None),
    "relu out=": (lambda t, out: torch.ops.aten.relu.out(t[0] - 2, out=out), torch.float32, 1, torch.float32),
    "gelu out=": (lambda t, out: torch.ops.aten.gelu.out(t[0], out=out), torch.float32, 1, torch.float32),
    "hardtanh out=": (lambda t, out: torch.ops.aten.hardtanh.out(t[0], 1.0, 2.0, out=out), torch.float32, 1, torch.float32),
    "softplus out=": (lambda t, out: torch.ops.aten.softplus.out(t[0], out=out), torch.float32, 1, torch.float32),
    "isnan out=": (lambda t, out: torch.ops.aten.isnan.out((t[0] - 1).log(), out=out), torch.float32, 1, torch.bool),
    "clip out=": (lambda t, out: torch.clip(t[0], t[1], t[1] + 1, out=out), torch.float32, 2, torch.float32),
    "mul by a number out=": (lambda t, out: torch.ops.aten.mul.Scalar_out(t[0], 3.0, out=out), torch.float32, 1, torch.float32),
    "bitwise_and of a number out=": (lambda t, out: torch.ops.aten.bitwise_and.Scalar_Tensor_out(6, t[0], out=out), torch.int64, 1, torch.int64),
    "clone out=": (lambda t, out: torch.ops.aten.clone.out(t[0], out=out), torch.float32, 1, torch.float32),
    "native_dropout_backward out=": (lambda t, out: torch.ops.aten.native_dropout_backward.out(t[0], t[1] > 2, 2.0, out=out),
                                     torch.float32, 2, torch.float32),  # fmt: skip
}


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("name", sorted(UNTAGGED_WRITERS))
def test_in_place_and_out_forms_torch_leaves_untagged_run_in_pieces(device, transposed, name):
    """``abs_``, the comparisons in place (``eq_``, ``lt_``, ...), ``gelu_``, ``relu.out``,
    ``isnan.out``, ``t >>= k`` (``__irshift__``, named unlike the other in-place ops) and the other
    in-place and out= forms whose functional form torch tags pointwise,
    which it leaves untagged: they raised OutOfPagesError past the device tier (``abs_`` of a
    transposed table, found probing ops past the tier). Each runs in pieces, in place or into a paged
    output of the inputs' layout: the dense op's bits, within the tier."""
    op, dtype, count, out_dtype = UNTAGGED_WRITERS[name]
    generator = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        tensors = [(torch.rand(64, 300, generator=generator) * 8).floor() / 2 for _ in range(count)]  # ties, for the comparisons
    else:
        tensors = [torch.randint(1, 9, (64, 300), generator=generator) for _ in range(count)]
    tensors = [(t.t().contiguous().t() if transposed else t).to(device) for t in tensors]  # 19 pages each; the tier holds 6

    def output_like(t: torch.Tensor) -> torch.Tensor | None:
        return None if out_dtype is None else torch.full_like(t, 7, dtype=out_dtype)  # full_like keeps the layout

    with make_pager(device) as pager:
        plain = [t.clone() for t in tensors]
        expected = op(plain, output_like(tensors[0]))
        paged = [PagedTensor.wrap(t.clone(), pager) for t in tensors]
        out = output_like(tensors[0])
        out = None if out is None else PagedTensor.wrap(out, pager)
        got = op(paged, out)
        assert got is (paged[0] if out is None else out)
        assert pager.stats()["resident_bytes"]["device"] <= DEVICE_PAGES * PAGE
        assert same_bits(dense(got), expected)


def test_a_permuted_table_whose_outer_index_spans_more_than_a_piece_runs_in_1d_pieces():
    """A table of another layout than row-major runs in pieces along its outer dim (each of its
    layout); where one index of that dim spans more than a piece (here 7200 elements, a piece 5120)
    its elements, which fill their span, still run in 1-D pieces of memory."""
    base = torch.randn(4, 3, 2400, generator=torch.Generator().manual_seed(2)).transpose(0, -1)  # strides (1, 2400, 7200)
    with make_pager() as pager:
        table = PagedTensor.wrap(base.clone(), pager)
        assert same_bits(dense(torch.neg(table)), torch.neg(base))
        assert table.mul_(3) is table
        assert same_bits(table.materialize(), base * 3)
        assert pager.stats()["resident_bytes"]["device"] <= DEVICE_PAGES * PAGE


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_an_out_of_place_op_with_a_plain_operand_of_another_layout_runs_in_pieces(device):
    """``torch.where(mask, t.T, 0)``, ``t.T + y`` and ``torch.maximum(y, t.T)`` with a contiguous
    plain ``mask`` / ``y``: pieces along the paged table's outer dim, the plain operand narrowed
    alike (they raised OutOfPagesError: an op without an output needed one layout for all)."""
    generator = torch.Generator().manual_seed(4)
    base = torch.randn(64, 300, generator=generator).to(device)  # 19 pages; the tier holds 6
    mask = (torch.rand(300, 64, generator=generator) > 0.5).to(device)
    plain = torch.randn(300, 64, generator=generator).to(device)
    ops = [lambda t: torch.where(mask, t, 0.0), lambda t: t + plain, lambda t: torch.maximum(plain, t), lambda t: torch.where(mask, plain, t)]
    with make_pager(device) as pager:
        table = PagedTensor.wrap(base.clone(), pager).t()
        for op in ops:
            assert same_bits(dense(op(table)), op(base.t()))
        assert pager.stats()["resident_bytes"]["device"] <= DEVICE_PAGES * PAGE
        assert same_bits(table.materialize(), base.t())


def permuted_pair(data, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...], tuple[int, ...]]:
    """Two random tables of one shape, 2 or 3 dims, laid out in memory with different outermost
    dims: ``(a_memory, b_memory, a_view, b_view)``, each table being ``memory.permute(view)``."""
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    rank = data.draw(st.integers(2, 3), label="rank")
    shape = tuple(data.draw(st.lists(st.integers(40, 200) if rank == 2 else st.integers(6, 40), min_size=rank, max_size=rank), label="shape"))
    orders = data.draw(
        st.tuples(st.permutations(range(rank)), st.permutations(range(rank))).filter(lambda pair: pair[0][0] != pair[1][0]),
        label="memory orders",
    )
    tables, views = [], []
    for order in orders:  # memory dim i holds dim order[i] of ``shape``
        values = torch.randn(tuple(shape[d] for d in order), generator=generator) * 4
        tables.append(values.to(dtype))
        views.append(tuple(order.index(d) for d in range(rank)))
    return tables[0], tables[1], views[0], views[1]


def outer_index_bytes(memory: torch.Tensor) -> int:
    """Bytes one index of a table's outermost dim in memory spans."""
    return memory[0].numel() * memory.element_size()


TILED = {
    "add": lambda a, b: a + b,
    "mul": lambda a, b: torch.mul(a, b),
    "maximum": lambda a, b: torch.maximum(b, a),
    "where": lambda a, b: torch.where(a > b, a, b),
    "gelu": lambda a, b: torch.nn.functional.gelu(a + b),  # CPU gelu rounds otherwise on runs cut short
    "eq": lambda a, b: a == b,
    "copy_": lambda a, b: a.copy_(b),
    "add_": lambda a, b: a.add_(b, alpha=2),
    "mul_ of the other": lambda a, b: b.mul_(a),
    "out=": lambda a, b: torch.sub(a, b, out=a),
}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(data=st.data(), name=st.sampled_from(sorted(TILED)), dtype=st.sampled_from([torch.float32, torch.float16, torch.int64]),
       plain_other=st.booleans())  # fmt: skip
def test_elementwise_ops_on_tables_of_different_outer_dims_run_in_tiles(data, name, dtype, plain_other):
    """``a.T + b``, ``a.copy_(b.T)``, ``torch.sub(a, b, out=a)`` where ``a`` and ``b`` lie in memory
    with different outermost dims, each more than twice the device tier (they raised OutOfPagesError):
    tiles cut along both dims, every tile the whole's layout narrowed, give the dense op's bits
    and layout, written arguments included, within the device tier."""
    assume(not (name == "gelu" and not dtype.is_floating_point))
    a_memory, b_memory, a_view, b_view = permuted_pair(data, dtype)
    device_pages = 2 * (-(-max(outer_index_bytes(a_memory), outer_index_bytes(b_memory)) // PAGE) + 1)  # a piece holds an outer index of each
    assume(a_memory.numel() * a_memory.element_size() > 2 * device_pages * PAGE)
    op = TILED[name]
    dense_a, dense_b = a_memory.clone().permute(a_view), b_memory.clone().permute(b_view)
    expected = op(dense_a, dense_b)
    with make_pager(device_pages=device_pages) as pager:
        paged_a = PagedTensor.wrap(a_memory.clone(), pager).permute(a_view)
        paged_b = b_memory.clone().permute(b_view) if plain_other else PagedTensor.wrap(b_memory.clone(), pager).permute(b_view)
        got = op(paged_a, paged_b)
        assert pager.stats()["resident_bytes"]["device"] <= device_pages * PAGE
        assert same_bits(dense(got), expected)
        assert same_bits(dense(paged_a), dense_a) and same_bits(dense(paged_b), dense_b)
        if name.endswith("_") or name == "out=":
            assert got is (paged_b if name == "mul_ of the other" else paged_a)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_views_of_one_table_with_different_outer_dims_run_in_tiles_reading_copies(device):
    """``t + t.T``, ``t == t.T``, ``torch.where(t > t.T, t, t.T)`` and their ``out=`` into another
    table: one allocation's views are read through one window spanning them, so in each tile the
    views of another outer dim than the first are read as plain copies of their tile (they raised
    OutOfPagesError). An in-place op reading its written bytes as other elements
    (``u.add_(t.T)`` with ``u`` a view of ``t``) still raises, having written nothing."""
    generator = torch.Generator().manual_seed(5)
    base = torch.randn(160, 160, generator=generator).to(device)  # 25 pages; the tier holds 6
    ops = [lambda t: t + t.T, lambda t: t == t.T, lambda t: torch.where(t > t.T, t, t.T), lambda t: torch.sub(t.T, t, alpha=0.5)]
    with make_pager(device) as pager:
        table = PagedTensor.wrap(base.clone(), pager)
        out = PagedTensor.wrap(torch.zeros(160, 160, device=device), pager)
        for op in ops:
            assert same_bits(dense(op(table)), op(base))
        assert torch.add(table.T, table, out=out) is out
        assert same_bits(out.materialize(), (base.T + base).contiguous())
        assert pager.stats()["resident_bytes"]["device"] <= DEVICE_PAGES * PAGE
        with pytest.raises(OutOfPagesError, match="need more pages at once"):
            table[:, :80].add_(table.T[:, 80:])
        assert same_bits(table.materialize(), base)


APART = {  # ops on two views of one table whose bytes lie apart: ``a`` is written where the op writes
    "add": lambda a, b: a + b,
    "mul": lambda a, b: torch.mul(b, a),
    "where": lambda a, b: torch.where(a > b, a, b),
    "gelu": lambda a, b: torch.nn.functional.gelu(a - b),
    "eq": lambda a, b: a == b,
    "copy_": lambda a, b: a.copy_(b),
    "add_": lambda a, b: a.add_(b, alpha=2),
    "out=": lambda a, b: torch.sub(a, b, out=a),
}


def views_apart(table: torch.Tensor, rows: int, gap: int, layout: str, later_first: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``[0, rows)`` and ``[rows + gap, 2 * rows + gap)`` of ``table`` (``chunk(2)`` where
    ``gap`` is 0), each as ``layout``: as they are, transposed, or every other column; the later
    first where ``later_first``."""
    first, second = table[:rows], table[rows + gap : 2 * rows + gap]
    shaped = {"rows": lambda t: t, "transposed": lambda t: t.T, "every_other_column": lambda t: t[:, ::2]}[layout]
    pair = (shaped(first), shaped(second))
    return pair[::-1] if later_first else pair


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(APART)), dtype=st.sampled_from([torch.float32, torch.float16, torch.int64]),
       rows=st.integers(130, 220), cols=st.sampled_from([64, 96, 256]), gap=st.integers(0, 9),
       layout=st.sampled_from(["rows", "transposed", "every_other_column"]), later_first=st.booleans(), seed=st.integers(0, 2**16))  # fmt: skip
def test_views_of_one_table_whose_bytes_lie_apart_run_in_pieces_reading_copies(name, dtype, rows, cols, gap, layout, later_first, seed):
    """``t[:n] + t[n:]``, ``torch.where(a > b, a, b)`` of ``a, b = t.chunk(2)``, and in place
    ``t[:n].add_(t[n:])`` or ``t[:n].copy_(t[n:])``: views of one allocation whose bytes lie apart,
    together larger than the device tier. They raised OutOfPagesError: the dispatcher reads one
    allocation's views through one window spanning them, which a piece of each fills. Each piece now
    reads the views other than the allocation's first (the written one first) as plain copies of
    the piece: the dense op's bits and layout, the written rows included, within the device tier."""
    if name == "gelu" and not dtype.is_floating_point:
        dtype = torch.float32
    # The two views' pages do not fit at once: 8.1 pages at the least (130 rows of 64 in fp16 each), the tier holds 6.
    generator = torch.Generator().manual_seed(seed)
    base = (torch.randn(2 * rows + gap, cols, generator=generator) * 4).to(dtype)
    op = APART[name]
    dense_table = base.clone()
    expected = op(*views_apart(dense_table, rows, gap, layout, later_first))
    with make_pager() as pager:
        table = PagedTensor.wrap(base.clone(), pager)
        got = op(*views_apart(table, rows, gap, layout, later_first))
        assert pager.stats()["resident_bytes"]["device"] <= DEVICE_PAGES * PAGE
        assert same_bits(dense(got), expected)
        assert same_bits(table.materialize(), dense_table)
        if name.endswith("_") or name == "out=":
            assert got is views_apart(table, rows, gap, layout, later_first)[0] or isinstance(got, PagedTensor)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_every_op_on_views_apart_runs_in_pieces_on_each_device(device, dtype):
    """Every op of :data:`APART` on each layout of views apart, both orders, on the CPU and CUDA:
    the dense op's bits, the written rows included, within the device tier."""
    generator = torch.Generator().manual_seed(8)
    base = (torch.randn(2 * 96 + 5, 128, generator=generator) * 4).to(dtype).to(device)  # 2 x 12 pages in bf16; the tier holds 6
    for layout in ("rows", "transposed", "every_other_column"):
        for later_first in (False, True):
            for name, op in APART.items():
                dense_table = base.clone()
                expected = op(*views_apart(dense_table, 96, 5, layout, later_first))
                with make_pager(device) as pager:
                    table = PagedTensor.wrap(base.clone(), pager)
                    got = op(*views_apart(table, 96, 5, layout, later_first))
                    assert pager.stats()["resident_bytes"]["device"] <= DEVICE_PAGES * PAGE
                    assert same_bits(dense(got), expected), (layout, later_first, name)
                    assert same_bits(table.materialize(), dense_table), (layout, later_first, name)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_in_place_ops_between_views_sharing_bytes_still_raise(device):
    """Views apart run in pieces, and so do views whose elements interleave without sharing one;
    views of the written bytes that share elements with them, or whose layouts differ, do not: a
    piece could read what an earlier piece wrote. Each raises the pager's error and writes nothing."""
    base = torch.randn(256, 128, device=device)  # 32 pages; the tier holds 6
    with make_pager(device) as pager:
        table = PagedTensor.wrap(base.clone(), pager)
        for op in (lambda t: t[:, :65].add_(t[:, 63:]), lambda t: t[64:].copy_(t[:-64]), lambda t: t[:128].T.add_(t[:128])):
            with pytest.raises(OutOfPagesError, match="need more pages at once"):
                op(table)
        assert same_bits(table.materialize(), base)
        for op in (lambda t: t[:128].add_(t[128:]), lambda t: t[:, :64].add_(t[:, 64:]), lambda t: t[:, ::2].copy_(t[:, 1::2])):
            op(table)
            op(base)
            assert same_bits(table.materialize(), base)


PARTLY_OVERLAPPING_WRITES = {
    "add out=": lambda t: torch.add(t[1:], 1.0, out=t[:-1]),
    "exp out=": lambda t: torch.exp(t[2:], out=t[:-2]),
    "copy_": lambda t: t[64:].copy_(t[:-64]),
    "add_ of the transpose": lambda t: t[:128].T.add_(t[:128]),
    "index_copy_": lambda t: t.index_copy_(0, torch.arange(t.shape[0] - 1, device=t.device), t[1:]),
}


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("name", PARTLY_OVERLAPPING_WRITES)
def test_an_op_writing_a_view_that_partly_overlaps_its_argument_names_the_overlap_past_the_tier(device, name):
    """torch refuses these ops on dense tensors (the written view and an argument share some bytes),
    and so does a table within the tier, with torch's error. Past the tier the pager's error says so
    beside the tier's size; nothing is written either way. Views that torch cannot tell apart
    cheaply (columns) are not named: torch runs those ops."""
    op = PARTLY_OVERLAPPING_WRITES[name]
    base = torch.randn(256, 128, device=device)  # 32 pages; the tier holds 6
    with pytest.raises(RuntimeError, match="single memory location"):
        op(base.clone())
    with make_pager(device, device_pages=64) as pager:
        table = PagedTensor.wrap(base.clone(), pager)
        with pytest.raises(RuntimeError, match="single memory location"):
            op(table)
        assert same_bits(table.materialize(), base)
    with make_pager(device) as pager:
        table = PagedTensor.wrap(base.clone(), pager)
        with pytest.raises(DeviceTierFullError, match=r"need more pages at once.*partly overlaps another of its arguments.*clone\(\)"):
            op(table)
        assert same_bits(table.materialize(), base)
        with pytest.raises(DeviceTierFullError) as raised:
            table[:, :65].add_(table[:, 63:])
        assert "overlaps" not in str(raised.value)
        assert same_bits(table.materialize(), base)


RANDOM_FILLS = {
    "nn.init.normal_": lambda t: torch.nn.init.normal_(t),
    "nn.init.kaiming_uniform_": lambda t: torch.nn.init.kaiming_uniform_(t, a=5**0.5),
    "nn.init.trunc_normal_": lambda t: torch.nn.init.trunc_normal_(t, std=0.02),
    "bernoulli_": lambda t: t.bernoulli_(0.5),
    "exponential_": lambda t: t.exponential_(),
}


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("name", RANDOM_FILLS)
def test_a_random_fill_past_the_tier_names_the_way_round(device, name):
    """A random op draws its numbers in its kernel's order over the whole tensor, which no run in
    pieces follows, so past the tier it raises the pager's error, which now says to fill a plain
    tensor and ``copy_`` it in; that way round runs a piece at a time. Within the tier the paged fill
    draws the dense fill's numbers."""
    fill = RANDOM_FILLS[name]
    with make_pager(device, device_pages=64) as pager:
        table = PagedTensor.wrap(torch.zeros(128, 64, device=device), pager)  # 8 pages
        torch.manual_seed(0)
        fill(table)
        torch.manual_seed(0)
        assert same_bits(table.materialize(), fill(torch.zeros(128, 64, device=device)))
    with make_pager(device) as pager:
        table = PagedTensor.wrap(torch.zeros(256, 128, device=device), pager)  # 32 pages; the tier holds 6
        with pytest.raises(DeviceTierFullError, match=r"need more pages at once.*random op.*fill a plain tensor.*copy_"):
            fill(table)
        assert same_bits(table.materialize(), torch.zeros(256, 128, device=device))
        torch.manual_seed(0)
        values = fill(torch.zeros(256, 128))  # on the CPU, as for a tensor the device cannot hold
        table.copy_(values)
        assert same_bits(table.materialize().cpu(), values)
        probabilities = PagedTensor.wrap(torch.full((256, 128), 0.5, device=device), pager)
        with pytest.raises(DeviceTierFullError, match=r"random op.*run it on a plain copy, t\.materialize\(\)"):
            torch.bernoulli(probabilities)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_random_ops_that_draw_nothing_run_past_the_tier(device):
    """``nn.RReLU`` in eval mode is ``leaky_relu`` with the mean slope, and ``native_dropout`` with
    ``train=False`` a clone and a mask of ones: no number drawn. Past the tier both raised the
    random op's error (found by a helper's probe); they run a piece at a time, with the dense op's
    bits and layout, and draw nothing. A form that draws still raises."""
    base = torch.randn(256, 128, generator=torch.Generator().manual_seed(1)).to(device)  # 32 pages; the tier holds 6
    with make_pager(device) as pager:
        table = PagedTensor.wrap(base.clone(), pager)
        rng_state = torch.random.get_rng_state if device == "cpu" else torch.cuda.get_rng_state
        state = rng_state()
        for view in (lambda t: t, lambda t: t.T):
            got = torch.nn.RReLU(0.1, 0.3).eval()(view(table))
            expected = torch.nn.RReLU(0.1, 0.3).eval()(view(base))
            assert same_bits(got, expected) and got.stride() == expected.stride()
            out, mask = torch.ops.aten.native_dropout(view(table), 0.5, False)
            dense_out, dense_mask = torch.ops.aten.native_dropout(view(base), 0.5, False)
            assert same_bits(out, dense_out) and out.stride() == dense_out.stride()
            assert torch.equal(mask, dense_mask) and mask.stride() == dense_mask.stride()
        copy = PagedTensor.wrap(base.clone(), pager)
        torch.nn.functional.rrelu_(copy, 0.1, 0.3, training=False)
        assert same_bits(copy.materialize(), torch.nn.functional.rrelu(base, 0.1, 0.3, training=False))
        assert torch.equal(state, rng_state()), "a form that draws nothing drew"
        with pytest.raises(DeviceTierFullError, match="random op"):
            torch.nn.RReLU().train()(table)
        with pytest.raises(DeviceTierFullError, match="random op"):
            torch.ops.aten.native_dropout(table, 0.5, True)
        assert same_bits(table.materialize(), base)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_native_dropout_of_an_empty_tensor_returns_what_torchs_does(device):
    """``native_dropout`` of an empty input: torch's CPU kernel returns the input itself and an
    ``empty_like`` of it (a mask of the input's dtype), whatever ``train``; it gave a clone and a bool
    mask for ``train=False``."""
    with make_pager(device) as pager:
        for dense in (torch.randn(0, 4, device=device), torch.randn(0, 4, device=device).t()):
            paged = PagedTensor.wrap(dense, pager)
            for train in (False, True, None):
                dense_out, dense_mask = torch.ops.aten.native_dropout(dense, 0.5, train)
                out, mask = torch.ops.aten.native_dropout(paged, 0.5, train)
                assert (out is paged) == (dense_out is dense), train
                assert (out.dtype, out.shape, out.stride()) == (dense_out.dtype, dense_out.shape, dense_out.stride())
                assert (mask.dtype, mask.shape, mask.stride()) == (dense_mask.dtype, dense_mask.shape, dense_mask.stride())


RANDOM_OPS_REFUSED = {
    "normal_(0, -1)": lambda t: t.normal_(0, -1),
    "uniform_(2, 1)": lambda t: t.uniform_(2, 1),
    "bernoulli_(1.5)": lambda t: t.bernoulli_(1.5),
    "geometric_(0)": lambda t: t.geometric_(0),
    "random_(5, 5)": lambda t: t.random_(5, 5),
    "multinomial of 3 dims": lambda t: torch.multinomial(t.view(16, 16, 128).abs(), 2),
    "multinomial of more samples than categories": lambda t: torch.multinomial(t.abs(), 200),
    "uniform_ of int64": lambda t: t.view(torch.int64).uniform_(),
    "normal of an int32 mean": lambda t: torch.normal(t.view(torch.int32), 1.0),
    "bernoulli of int32": lambda t: torch.bernoulli(t.view(torch.int32)),
    "poisson of int32": lambda t: torch.poisson(t.view(torch.int32)),
    "rrelu of int32": lambda t: torch.nn.functional.rrelu(t.view(torch.int32), training=True),
}


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("name", RANDOM_OPS_REFUSED)
def test_a_random_op_past_the_tier_refuses_arguments_in_torchs_words(device, name):
    """Past the tier a random op raised the pager's error even for arguments torch refuses, whose
    way round (fill a plain tensor and copy it in) then failed with torch's error (found by a
    helper's probe). torch's kernel checks them before it draws: its error comes now, from a run on
    stand-ins with a generator of their own, so no number is drawn from the caller's."""
    op = RANDOM_OPS_REFUSED[name]
    base = torch.rand(256, 128, generator=torch.Generator().manual_seed(1)).to(device)  # 32 pages; the tier holds 6
    with pytest.raises((RuntimeError, NotImplementedError)) as dense:
        op(base.clone())
    rng_state = torch.random.get_rng_state if device == "cpu" else torch.cuda.get_rng_state
    with make_pager(device) as pager:
        table = PagedTensor.wrap(base.clone(), pager)
        state = rng_state()
        with pytest.raises(type(dense.value)) as paged:
            op(table)
        assert str(dense.value) in str(paged.value) and not isinstance(paged.value, OutOfPagesError)
        assert torch.equal(state, rng_state()) and same_bits(table.materialize(), base)
        with pytest.raises(DeviceTierFullError, match="random op"):
            table.uniform_(0, 1)  # arguments torch takes: the pager's error, the caller's numbers not drawn
        assert torch.equal(state, rng_state())


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_a_partial_overlap_status_is_torchs_own_refusal_of_a_written_view(data):
    """``torchs_overlap_status`` of two views of one table (same shape, any offsets, steps and
    transposes) is ``"partial"`` exactly where torch refuses ``torch.add(b, 0, out=a)`` on the dense
    table's views for a partial overlap, for the PagedTensor's views and the dense table's alike."""
    height, width = data.draw(st.integers(1, 4), label="height"), data.draw(st.integers(1, 4), label="width")
    dense_table = torch.arange(144.0).reshape(12, 12)
    with make_pager(device_pages=64) as pager:
        table = PagedTensor.wrap(dense_table.clone(), pager)
        views, corner = [], None
        for label in ("a", "b"):
            step = data.draw(st.sampled_from([1, 2]), label=f"{label} step")
            transposed = height == width and data.draw(st.booleans(), label=f"{label} transposed")
            last_row, last_col = 12 - (height - 1) * step - 1, 12 - (width - 1) * step - 1
            row, col = data.draw(st.integers(0, last_row)), data.draw(st.integers(0, last_col))
            if corner is not None and corner[0] <= last_row and corner[1] <= last_col and data.draw(st.booleans(), label="b at a's corner"):
                row, col = corner  # the same bytes where the steps match: full overlap, or partial by strides
            corner = (row, col)

            def view(t: torch.Tensor) -> torch.Tensor:
                v = t[row : row + (height - 1) * step + 1 : step, col : col + (width - 1) * step + 1 : step]
                return v.T if transposed else v

            views.append((view(table), view(dense_table)))
        (paged_a, dense_a), (paged_b, dense_b) = views
        try:
            torch.add(dense_b, 0, out=dense_a)
            refused = False
        except RuntimeError as error:
            assert "some elements of the input tensor and the written-to tensor" in str(error)
            refused = True
        assert (pagedtensor.dispatch.torchs_overlap_status(paged_a, paged_b) == "partial") == refused
        assert (pagedtensor.dispatch.torchs_overlap_status(dense_a, dense_b) == "partial") == refused


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_views_of_one_layout_may_share_bytes_exactly_where_an_element_is_shared(data):
    """``may_share_bytes`` on two views of one layout (up to 3 dims, strides with gaps, any offsets)
    against the sets of their elements: it says no only where they share none."""
    ndim = data.draw(st.integers(1, 3))
    sizes = [data.draw(st.integers(1, 5)) for _ in range(ndim)]
    strides, reach = [], 0
    for size in sizes:  # each stride beyond the reach of the dims before it, with a gap or not
        stride = reach + 1 + data.draw(st.integers(0, 3))
        strides.append(stride)
        reach += (size - 1) * stride
    order = data.draw(st.permutations(range(ndim)))
    shape, stride = tuple(sizes[d] for d in order), tuple(strides[d] for d in order)
    offsets = data.draw(st.tuples(st.integers(0, 60), st.integers(0, 60)))
    with make_pager() as pager:
        table = PagedTensor.wrap(torch.zeros(1024), pager)
        a, b = (PagedTensor._make(table._paged, offset, shape, stride, table.dtype) for offset in offsets)
        elements = [set(torch.as_strided(torch.arange(1024), shape, stride, offset).flatten().tolist()) for offset in offsets]
        assert may_share_bytes(a, b) == bool(elements[0] & elements[1])


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(["copy_", "add_", "out="]), dtype=st.sampled_from([torch.float32, torch.int64]),
       rows=st.integers(180, 300), cols=st.sampled_from([48, 64, 100]), width=st.integers(1, 100), step=st.integers(1, 3),
       offsets=st.tuples(st.integers(0, 300), st.integers(0, 300)), seed=st.integers(0, 2**16))  # fmt: skip
def test_in_place_ops_between_views_of_one_layout_run_where_they_share_no_element(name, dtype, rows, cols, width, step, offsets, seed):
    """Two views of one table with one layout (``rows`` rows of every ``step``-th of ``width``
    columns of a ``cols``-wide matrix, at element offsets of the table's flat memory): where they
    share no element, even with their elements interleaved (``t[:, :n].add_(t[:, n:])``,
    ``t[:, ::2].copy_(t[:, 1::2])``), an in-place op between them runs in pieces with the dense op's
    bits; where they share one, torch's kernel order decides the result, and it raises the pager's
    error having written nothing."""
    width = min(width, cols)
    flat_size = max(offsets) + rows * cols  # 8.4 pages at the least (180 rows of 48 fp32): more than the tier's 6
    generator = torch.Generator().manual_seed(seed)
    base = (torch.randn(flat_size, generator=generator) * 4).to(dtype)

    def view(flat: torch.Tensor, offset: int) -> torch.Tensor:
        return flat[offset : offset + rows * cols].view(rows, cols)[:, :width:step]

    op = APART[name]
    layout = view(base, 0)

    def elements(offset: int) -> set[int]:
        return set(torch.as_strided(torch.arange(flat_size), layout.shape, layout.stride(), offset).flatten().tolist())

    shared = bool(elements(offsets[0]) & elements(offsets[1]))
    event("they share an element" if shared else "they share none")
    with make_pager() as pager:
        table = PagedTensor.wrap(base.clone(), pager)
        if shared and offsets[0] != offsets[1]:
            with pytest.raises((OutOfPagesError, RuntimeError)):
                op(view(table, offsets[0]), view(table, offsets[1]))
            assert same_bits(table.materialize(), base)
            return
        dense_table = base.clone()
        op(view(dense_table, offsets[0]), view(dense_table, offsets[1]))
        op(view(table, offsets[0]), view(table, offsets[1]))
        assert pager.stats()["resident_bytes"]["device"] <= DEVICE_PAGES * PAGE
        assert same_bits(table.materialize(), dense_table)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_operands_that_do_not_broadcast_get_torchs_error_past_the_tier(device):
    """Shapes that do not broadcast raise torch's RuntimeError naming them, as a table that fits
    does, not the pager's error (past the tier the op was refused for its size first); nothing is
    written."""
    generator = torch.Generator().manual_seed(6)
    base, other = torch.randn(384, 256, generator=generator).to(device), torch.randn(384, 256, generator=generator).to(device)
    with make_pager(device) as pager:
        table, paged_other = PagedTensor.wrap(base.clone(), pager), PagedTensor.wrap(other.clone(), pager)
        for op in (lambda t: t + paged_other.T, lambda t: t.add_(paged_other.T), lambda t: t.copy_(paged_other.T),
                   lambda t: t.mul_(torch.ones(3, device=device)), lambda t: torch.where(t > 0, t, paged_other[:, :7])):  # fmt: skip
            with pytest.raises(RuntimeError, match=r"384|\b3\b|\b7\b") as raised:
                op(table)
            assert not isinstance(raised.value, OutOfPagesError)
        assert same_bits(table.materialize(), base) and same_bits(paged_other.materialize(), other)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64])
def test_gpu_elementwise_ops_on_tables_of_different_outer_dims_run_in_tiles_on_cuda(dtype):
    """The tiles on CUDA: ``a.T`` against ``b`` and a 3-dim pair permuted otherwise, every op of
    :data:`TILED` (``gelu`` for floats), the dense op's bits, written arguments included."""
    generator = torch.Generator().manual_seed(7)
    pairs = [((150, 170), (1, 0), (0, 1)), ((30, 24, 36), (2, 0, 1), (0, 1, 2))]  # (memory shape of a, a's view, b's)
    for memory_shape, a_view, b_view in pairs:
        a_memory = (torch.randn(memory_shape, generator=generator) * 4).to(dtype).cuda()
        b_memory = (torch.randn(tuple(memory_shape[d] for d in a_view), generator=generator) * 4).to(dtype).cuda()
        for name, op in TILED.items():
            if name == "gelu" and not dtype.is_floating_point:
                continue
            dense_a, dense_b = a_memory.clone().permute(a_view), b_memory.clone().permute(b_view)
            expected = op(dense_a, dense_b)
            with make_pager("cuda", device_pages=8) as pager:
                paged_a = PagedTensor.wrap(a_memory.clone(), pager).permute(a_view)
                paged_b = PagedTensor.wrap(b_memory.clone(), pager).permute(b_view)
                got = op(paged_a, paged_b)
                assert pager.stats()["resident_bytes"]["device"] <= 8 * PAGE
                assert same_bits(dense(got), expected), (memory_shape, name)
                assert same_bits(dense(paged_a), dense_a) and same_bits(dense(paged_b), dense_b), (memory_shape, name)


@pytest.mark.parametrize("name", ["hardtanh", "relu6", "elu", "selu", "celu", "leaky_relu", "softplus", "hardsigmoid", "hardswish", "mish",
                                  "softshrink", "hardshrink"])  # fmt: skip
def test_activations_train_past_the_tier(name):
    """An activation of a paged tensor larger than the device tier, forward and backward: the dense
    gradient's bits (the backward raised DeviceTierFullError where the forward ran in pieces)."""
    activation = getattr(torch.nn.functional, name)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 300, generator=generator) * 4  # 19 pages; the tier holds 6
    weights = torch.randn(64, 300, generator=generator)
    expected = x.clone().requires_grad_()
    activation(expected).backward(weights)
    with make_pager("cpu") as pager:
        got = PagedTensor.wrap(x.clone(), pager).requires_grad_()
        activation(got).backward(weights)
        assert same_bits(dense(got.grad), expected.grad)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("channels", [1, 8])
def test_prelu_runs_past_the_tier(device, channels):
    """``F.prelu`` of a paged tensor larger than the device tier, its weight one per channel or one in
    all: its kernel (``_prelu_kernel``, untagged) raised DeviceTierFullError; it runs in pieces, the
    dense op's bits and strides, of a transposed view too."""
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 8, 40, generator=generator) * 4).to(device)  # 20 pages; the tier holds 6
    weight = torch.randn(channels, generator=generator).to(device)
    with make_pager(device) as pager:
        for source, view in ((x, lambda t: t), (x.transpose(0, 2).contiguous(), lambda t: t.transpose(0, 2))):
            expected = torch.nn.functional.prelu(view(source), weight)
            got = torch.nn.functional.prelu(view(PagedTensor.wrap(source, pager)), weight)
            assert same_bits(dense(got), expected) and got.stride() == expected.stride()


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_an_out_of_another_shape_past_the_tier_is_resized_or_refused_as_within_it(device):
    """An elementwise op past the device tier with ``out=`` of another shape than the result raised
    ``DeviceTierFullError`` ("larger than the whole tier"). A plain ``out`` is now resized as torch's
    kernel resizes it (shape and strides, the transposed input's layout included; torch's warning for
    a non-empty one) and written in pieces; a PagedTensor ``out``, whose pages are fixed, raises the
    NotImplementedError the op raises within the tier."""
    x = torch.arange(64 * 300, dtype=torch.float32, device=device).reshape(64, 300)  # 19 pages; the tier holds 6
    with make_pager(device) as pager:
        for source in (x, x.t().contiguous().t()):
            paged = PagedTensor.wrap(source, pager)
            for out_shape in ((0,), (10,), (3, 7)):
                expected, got = torch.empty(out_shape, device=device), torch.empty(out_shape, device=device)
                with warnings.catch_warnings(record=True) as dense_warnings:
                    warnings.simplefilter("always")
                    torch.add(source, 1, out=expected)
                with warnings.catch_warnings(record=True) as paged_warnings:
                    warnings.simplefilter("always")
                    assert torch.add(paged, 1, out=got) is got
                worded = lambda caught: [str(w.message).split(" (Triggered internally")[0] for w in caught]  # noqa: E731
                assert worded(paged_warnings) == worded(dense_warnings)
                assert same_bits(got, expected), (out_shape, source.stride())
            with pytest.raises(NotImplementedError, match="pass an out= tensor of the result's shape"):
                torch.add(paged, 1, out=PagedTensor.wrap(torch.zeros(10, device=device), pager))


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_results_in_pieces_take_the_kernels_dtype_where_the_meta_kernel_infers_another(device):
    """Past the tier, a result was allocated with the dtype its meta kernel infers and each piece
    converted into it: ``torch.ldexp(int8 table, 0-dim bfloat16)`` came out float32 (the dense op:
    bfloat16) and ``bool_table ** True`` int64 (the dense op: bool). The result now takes the dtype
    the op's own kernel gives, in pieces and in tiles."""
    generator = torch.Generator().manual_seed(0)
    small = torch.randint(-3, 3, (64, 600), generator=generator, dtype=torch.int8).to(device)  # 10 pages; the tier holds 6
    mask = (torch.rand(64, 600, generator=generator) > 0.5).to(device)
    exponent = torch.tensor(1.5, dtype=torch.bfloat16, device=device)
    cases = [(lambda t: torch.ldexp(t, exponent), small), (lambda t: t**True, mask), (lambda t: torch.ldexp(t.T, exponent), small)]
    with make_pager(device) as pager:
        for op, table in cases:
            expected = op(table)
            got = op(PagedTensor.wrap(table, pager))
            assert same_bits(dense(got), expected), (got.dtype, expected.dtype)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_writing_an_expanded_view_past_the_tier_raises_torchs_overlap_error(device):
    """An op writing an expanded (stride-0) view of a table larger than the device tier raised the
    pager's DeviceTierFullError, whose advice (a larger tier) only traded it for torch's error; it
    raises torch's internal-overlap error, as the dense op and the same op within the tier do. Ops
    whose kernels write an expanded tensor as any other (``triu_``, ``fill_``) keep the pager's error
    (``tests/test_row_moves_past_the_tier.py``)."""
    base = torch.randn(1, 300, 40, device=device)  # 12 pages; the tier holds 6
    writes = {"add_": lambda t: t.add_(1), "clamp_": lambda t: t.clamp_(0, 1), "copy_": lambda t: t.copy_(torch.zeros(t.shape, device=device)),
              "abs out=": lambda t: torch.abs(torch.ones(t.shape, device=device), out=t)}  # fmt: skip
    with make_pager(device) as pager:
        paged = PagedTensor.wrap(base, pager)
        for name, write in writes.items():
            with pytest.raises(RuntimeError, match="more than one element of the written-to tensor refers to a single memory location"):
                write(base.clone().expand(4, 300, 40))
            with pytest.raises(RuntimeError, match="more than one element of the written-to tensor refers to a single memory location") as raised:
                write(paged.expand(4, 300, 40))
            assert not isinstance(raised.value, OutOfPagesError), name
        assert torch.equal(dense(paged), base)


def test_a_complex_table_with_a_float8_operand_past_the_tier_as_torch():
    """A complex table past the tier with a float8 operand raised a bare KeyError (the meta kernel's
    promotion table lacks float8 with complex): with a 0-dim one it now gives the dense result, and
    with one of the table's shape torch's own promotion error, as the dense op does."""
    table = torch.complex(torch.randn(64, 300), torch.randn(64, 300))  # 38 pages; the tier holds 6
    scalar = torch.tensor(1.5).to(torch.float8_e4m3fn)
    full = torch.full((64, 300), 0.5).to(torch.float8_e4m3fn)
    with make_pager("cpu") as pager:
        paged = PagedTensor.wrap(table, pager)
        for op in (torch.add, torch.mul, torch.eq):
            expected, got = op(table, scalar), dense(op(paged, scalar))
            assert got.dtype == expected.dtype and torch.equal(got, expected), op
        with pytest.raises(RuntimeError) as dense_error:
            torch.add(table, full)
        with pytest.raises(RuntimeError) as paged_error:
            torch.add(paged, full)
        assert str(paged_error.value) == str(dense_error.value)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_a_number_to_the_power_of_a_transposed_table_is_contiguous_as_torch(device):
    """``2 ** t.T`` (``pow.Scalar``) and ``torch.float_power(2, t.T)`` past the tier came out laid out
    as the table (torch's Python meta kernel keeps the exponent's layout); torch's kernel lays the
    result out contiguously, and so do the pieces now, with its bits."""
    table = torch.rand(43, 153, device=device).T  # 7 pages; the tier holds 6
    with make_pager(device) as pager:
        paged = PagedTensor.wrap(table, pager)
        for op in (lambda t: 2**t, lambda t: torch.float_power(2, t), lambda t: t**2):
            assert same_bits(dense(op(paged)), op(table))


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_ops_whose_meta_kernel_is_a_composite_are_laid_out_as_torchs_kernel(device):
    """Past the tier a result is laid out as the op's meta kernel lays it out. For xlogy, xlog1py,
    copysign, floor division, logaddexp, heaviside and the logical ops, torch's meta kernel is a Python
    decomposition into several prims, whose result takes the layout of an intermediate (xlogy's last
    ``where(isnan(other), ...)`` is laid out as ``other``; ``signbit`` of a 0-dim operand expanded to the
    result's shape comes out contiguous and then decides), where torch's kernel is one TensorIterator
    over the operands in their order, in which a 0-dim operand decides nothing; and ``angle`` of a
    complex tensor is computed into a complex temporary and copied into a contiguous result. The paged
    results (and an empty ``out=`` resized as the result) had the dense op's values and other strides."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(64, 96, generator=generator).to(device)  # 6 pages; the tier holds 4
    by_columns = a.mT.contiguous().mT
    z = torch.randn(64, 96, dtype=torch.complex64, generator=generator).to(device).mT.contiguous().mT  # 12 pages
    zero_dim, halves = torch.tensor(-0.7, device=device), torch.tensor(0.5, device=device)
    cases = {
        "angle(complex column-major)": (lambda t: torch.angle(t), z),
        "xlogy(t[:, :64], t[:, :64].T.abs())": (lambda t: torch.special.xlogy(t[:, :64], t[:, :64].T.abs()), a),
        "xlog1py(row-major, column-major)": (lambda t: torch.special.xlog1py(t, t.mT.contiguous().mT.abs()), a),
        "xlogy(row-major, column-major, out=empty)": (lambda t: torch.xlogy(t, t.mT.contiguous().mT.abs(), out=torch.empty(0, device=device)), a),
        "copysign(column-major, 0-dim)": (lambda t: torch.copysign(t, zero_dim), by_columns),
        "floor_divide(column-major, 0-dim)": (lambda t: torch.floor_divide(t, zero_dim), by_columns),
        "div floor(column-major, 0-dim)": (lambda t: torch.div(t, zero_dim, rounding_mode="floor"), by_columns),
        "div floor(row-major, column-major)": (lambda t: torch.div(t, t.mT.contiguous().mT + 3, rounding_mode="floor"), a),
        "logaddexp(0-dim, column-major)": (lambda t: torch.logaddexp(zero_dim, t), by_columns),
        "heaviside(0-dim, column-major)": (lambda t: torch.heaviside(zero_dim, t), by_columns),
        "logical_and(0-dim, column-major)": (lambda t: torch.logical_and(halves, t), by_columns),
    }
    with make_pager(device, device_pages=4) as pager:
        for name, (op, table) in cases.items():
            expected = op(table)
            got = op(PagedTensor.wrap(table.clone(), pager))
            assert same_bits(dense(got), expected), (name, got.stride(), expected.stride())


def test_an_op_on_expanded_views_has_the_kernels_dtype_where_the_meta_kernel_infers_another():
    """The result of an op read only through expanded views past the tier is made of the dtype the
    op's kernel gives, not its meta kernel's: ``threshold_backward`` of a float32 gradient and an
    expanded float64 table gave float32 silently, and ``bool_t.expand(2, n) ** True`` raised."""
    with make_pager(device_pages=4) as pager:
        values = torch.randn(1, 8192, dtype=torch.float64, generator=torch.Generator().manual_seed(0))  # 16 pages
        grad = torch.randn(2, 8192, generator=torch.Generator().manual_seed(1))
        expected = torch.ops.aten.threshold_backward(grad, values.expand(2, -1), 0.0)
        got = torch.ops.aten.threshold_backward(grad, PagedTensor.wrap(values.clone(), pager).expand(2, -1), 0.0)
        assert got.dtype == expected.dtype and torch.equal(got, expected)
        flags = torch.rand(1, 65536, generator=torch.Generator().manual_seed(2)) > 0.5  # 16 pages
        expected = flags.expand(2, -1) ** True
        got = PagedTensor.wrap(flags.clone(), pager).expand(2, -1) ** True
        assert got.dtype == expected.dtype and torch.equal(got, expected)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("name", ["add", "mul", "maximum", "where"])
def test_an_out_that_is_also_the_first_operand_beside_a_broadcast_one_runs_in_pieces(device, name):
    """``torch.add(t, bias, out=t)`` past the tier was refused as a resize "from [4000, 6] to [6]":
    the shape the operands broadcast to was taken without ``t``, which is both an operand and the
    ``out=``. It runs in pieces as ``t.add_(bias)`` does."""
    x = torch.arange(4000 * 6, dtype=torch.float32, device=device).reshape(4000, 6)  # 24 pages; the tier holds 6
    bias = torch.arange(6, dtype=torch.float32, device=device) - 3
    ops = {"add": lambda t, out: torch.add(t, bias, alpha=2, out=out), "mul": lambda t, out: torch.mul(t, bias, out=out),
           "maximum": lambda t, out: torch.maximum(t, bias * 4000, out=out),
           "where": lambda t, out: torch.where(bias > 0, t, bias, out=out)}  # fmt: skip
    with make_pager(device) as pager:
        paged = PagedTensor.wrap(x.clone(), pager)
        expected = ops[name](x, x)
        assert ops[name](paged, paged) is paged
        assert same_bits(paged.materialize(), expected)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_ops_writing_no_operand_that_do_not_broadcast_raise_torchs_own_message_past_the_tier(device):
    """An op that writes none of its operands, on shapes that do not broadcast, past the tier: the
    dense op's error, message and all ("The size of tensor a (256) must match the size of tensor b
    (255) ..."; it was the meta kernel's "Attempting to broadcast a dimension ..."); nothing read."""
    generator = torch.Generator().manual_seed(6)
    base = torch.randn(384, 256, generator=generator).to(device)
    with make_pager(device) as pager:
        table = PagedTensor.wrap(base.clone(), pager)
        faults = pager.stats()["faults"]
        for op, other in [(torch.add, base[:, :255]), (torch.mul, base[:383, :1]), (lambda a, b: torch.where(a > 0, a, b), base[:, :7]),
                          (lambda a, b: torch.lerp(a, b, 0.5), base[:2]), (torch.maximum, torch.zeros(3, device=device, dtype=torch.int64))]:  # fmt: skip
            with pytest.raises(RuntimeError) as dense_error:
                op(base, other)
            with pytest.raises(RuntimeError) as paged_error:
                op(table, other)
            assert type(paged_error.value) is type(dense_error.value) and str(paged_error.value) == str(dense_error.value)
            with pytest.raises(RuntimeError) as paged_error:
                op(table, PagedTensor.wrap(other.clone(), pager))
            assert str(paged_error.value) == str(dense_error.value)
        assert same_bits(table.materialize(), base)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_bad_operands_past_the_tier_raise_torchs_own_message(device):
    """Operands torch refuses for what they are, not their size, past the tier: the dense op's
    error, message and all, and nothing written (an in-place op into a tensor smaller than the
    broadcast shape raised DeviceTierFullError, so did ``where`` of an int condition, and
    ``fill_`` of a 1-D value named the value expanded to 2 dims). The in-place ops' message is the
    meta kernel's, which writes the shapes as ``torch.Size([256])`` and ``(384, 256)``."""
    generator = torch.Generator().manual_seed(7)
    base = torch.randn(384, 256, generator=generator).to(device)
    small = torch.randn(256, generator=generator).to(device)
    condition = torch.randint(0, 2, (384, 256), generator=generator, dtype=torch.int32).to(device)
    cases = {
        "add_ into a row": lambda table, wrap: wrap(small).add_(table),
        "mul_ into a column": lambda table, wrap: wrap(base[:, :1].contiguous()).mul_(table),
        "where of an int condition": lambda table, wrap: torch.where(wrap(condition), table, 0.0),
        "fill_ of a 1-D value": lambda table, wrap: table.fill_(torch.ones(1, device=device)),
    }
    with make_pager(device) as pager:
        table = PagedTensor.wrap(base.clone(), pager)
        for name, case in cases.items():
            with pytest.raises(RuntimeError) as dense_error:
                case(base.clone(), lambda t: t.clone())
            for wrap in (lambda t: t.clone(), lambda t: PagedTensor.wrap(t.clone(), pager)):
                with pytest.raises(RuntimeError) as paged_error:
                    case(table, wrap)
                assert type(paged_error.value) is type(dense_error.value), name
                if "broadcast shape" in str(dense_error.value):
                    assert "doesn't match the broadcast shape" in str(paged_error.value), name
                else:
                    assert str(paged_error.value) == str(dense_error.value), name
        assert same_bits(table.materialize(), base)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_ops_of_a_dtype_torch_refuses_past_the_tier_raise_torchs_own_message(device):
    """A reduction torch refuses for its operand's dtype (the mean of an int table, its std, var or
    norm, the sum of a float8 one), past the tier: the dense op's error, message and all (it was
    DeviceTierFullError: a user who raised vram_limit only then learnt the operand was refused); an
    elementwise one (``leaky_relu`` of an int table) too (it was torch._refs' ValueError)."""
    table = torch.randint(-5, 5, (384, 256), generator=torch.Generator().manual_seed(3)).to(device)
    cases = {
        "mean()": lambda t: t.mean(),
        "mean(1)": lambda t: t.mean(1),
        "std()": lambda t: t.std(),
        "var(0)": lambda t: t.var(0),
        "norm()": lambda t: t.norm(),
        "sum of float8": lambda t: t.to(torch.float8_e4m3fn).sum(),
        "leaky_relu": lambda t: torch.nn.functional.leaky_relu(t, 0.2),
    }
    with make_pager(device) as pager:
        paged = PagedTensor.wrap(table.clone(), pager)
        for name, case in cases.items():
            with pytest.raises(Exception) as dense_error:
                case(table)
            with pytest.raises(Exception) as paged_error:
                case(paged)
            assert type(paged_error.value) is type(dense_error.value), (name, paged_error.value)
            assert str(paged_error.value) == str(dense_error.value), name
        assert same_bits(paged.materialize(), table)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pages=st.integers(4, 24), spare=st.integers(0, 3), op=st.sampled_from(["copy_", "add_", "add", "where"]))
@example(pages=16, spare=1, op="copy_")  # read b 1.5 times
def test_operands_that_fit_alone_but_not_together_are_read_once(pages, spare, op):
    """Two tables each fitting the device tier, together not: the op runs a piece at a time from the
    start, each table's pages read from the host once (the op faulted the first table in whole,
    found the second could not join it, then read both again piece by piece: 1.25-1.5 passes)."""
    base = torch.randn(pages * PAGE // 4, generator=torch.Generator().manual_seed(pages))
    with make_pager(device_pages=pages + spare) as pager:
        a, b = PagedTensor.wrap(base.clone(), pager), PagedTensor.wrap(base.flip(0).contiguous(), pager)
        pager.evict_all()
        before = pager.stats()["bytes_h2d"]
        run = {"copy_": lambda x, y: x.copy_(y), "add_": lambda x, y: x.add_(y), "add": torch.add,
               "where": lambda x, y: torch.where(x > 0, x, y)}[op]  # fmt: skip
        result = run(a, b)
        read = pager.stats()["bytes_h2d"] - before
        event(f"read {read / (pages * PAGE):.2f} tables")
        expected = run(base.clone(), base.flip(0).contiguous())
        assert same_bits(result.materialize() if isinstance(result, PagedTensor) else result, expected)
        tables_read = {"copy_": 1, "where": 3}.get(op, 2)  # copy_ overwrites a; where reads a for its mask too
        assert read <= tables_read * pages * PAGE, (read // PAGE, pages)


@pytest.mark.parametrize("op", ["fill_", "zero_", "copy_", "add_", "add"])
def test_sequential_prefetch_reads_no_more_than_no_prefetch_past_the_tier(op):
    """With ``prefetch_strategy="sequential"``, an op past the tier reads no more from the host than
    without prefetch: a fault of pages the op overwrites prefetches nothing (it read the old bytes of
    the pages after, which the next piece overwrote: ``fill_`` read 36 pages where none are needed),
    and only the op's last window prefetches (the first operand's prefetched pages made room that the
    second's fault took back: ``a.copy_(b)`` read b 1.7-2 times)."""
    def host_pages_read(strategy: str) -> tuple[int, torch.Tensor]:
        config = MemoryConfig(page_size=PAGE, vram_limit=8 * PAGE, host_memory=512 * PAGE, slab_size=512 * PAGE,
                              prefetch_strategy=strategy, prefetch_pages=4, device="cpu")  # fmt: skip
        with Pager(config) as pager:
            base = torch.randn(64 * PAGE // 4, generator=torch.Generator().manual_seed(1))
            a, b = PagedTensor.wrap(base.clone(), pager), PagedTensor.wrap(base.flip(0).contiguous(), pager)
            pager.evict_all()
            before = pager.stats()["bytes_h2d"]
            result = {"fill_": lambda: a.fill_(1.5), "zero_": a.zero_, "copy_": lambda: a.copy_(b), "add_": lambda: a.add_(b),
                      "add": lambda: a + b}[op]()  # fmt: skip
            return (pager.stats()["bytes_h2d"] - before) // PAGE, dense(result)

    read_without, expected = host_pages_read("none")
    read_with, result = host_pages_read("sequential")
    assert same_bits(result, expected)
    assert read_with <= read_without, (read_with, read_without)
