"""Whole-tensor reductions whose result does not depend on the elements' order run a part of pages
at a time on PagedTensors larger than the device tier: ``max``, ``min``, ``amax``, ``amin``,
``aminmax``, ``argmax``, ``argmin``, ``any``, ``all``, ``count_nonzero`` and integer / bool ``sum``
give the dense op's dtype, shape and bits, with the device tier never over its budget. A float
``sum`` still raises ``OutOfPagesError``; small tensors keep the generic path."""

from __future__ import annotations

from typing import Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pagedtensor.handlers.parts as parts
import pagedtensor.handlers.reductions as reductions
from pagedtensor import MemoryConfig, OutOfPagesError, PagedTensor, Pager

PAGE = 4096
DEVICE_PAGES = 8
TIER_BYTES = DEVICE_PAGES * PAGE
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
DTYPES = (*FLOATS, torch.int64, torch.int32, torch.uint8, torch.bool)
LAYOUTS = ("contiguous", "transposed", "column slice", "offset view")
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

Reduction = Callable[[torch.Tensor], object]

# name: (the op, whether it applies to a dtype)
REDUCTIONS: dict[str, tuple[Reduction, Callable[[torch.dtype], bool]]] = {
    "max": (lambda t: t.max(), lambda dtype: True),
    "min": (lambda t: t.min(), lambda dtype: True),
    "amax": (lambda t: t.amax(), lambda dtype: True),
    "amin over all dims, keepdim": (lambda t: t.amin(dim=tuple(range(-1, -t.dim() - 1, -1)), keepdim=True), lambda dtype: True),
    "aminmax": (lambda t: torch.aminmax(t), lambda dtype: True),
    "aminmax keepdim": (lambda t: torch.aminmax(t, keepdim=True), lambda dtype: True),
    "argmax": (lambda t: t.argmax(), lambda dtype: dtype != torch.bool),
    "argmin keepdim": (lambda t: t.argmin(keepdim=True), lambda dtype: dtype != torch.bool),
    "any": (lambda t: t.any(), lambda dtype: True),
    "all": (lambda t: t.all(), lambda dtype: True),
    "count_nonzero": (lambda t: torch.count_nonzero(t), lambda dtype: True),
    "sum": (lambda t: t.sum(), lambda dtype: not dtype.is_floating_point),
    "sum over dim=[]": (lambda t: torch.sum(t, dim=[]), lambda dtype: not dtype.is_floating_point),
    "sum over all dims, keepdim": (lambda t: t.sum(dim=tuple(range(t.dim())), keepdim=True), lambda dtype: not dtype.is_floating_point),
    "sum into int32": (lambda t: t.sum(dtype=torch.int32), lambda dtype: not dtype.is_floating_point),
}
# The CPU kernels of these give a NaN result bits of their own, 0x7FC00000 or all ones (their vector
# path) by the tensor's size and threads: a NaN result is compared as NaN, not by bits.
KERNEL_NAN_BITS = {"max", "min", "aminmax", "aminmax keepdim"}


def make_pager(device: str = "cpu") -> Pager:
    return Pager(MemoryConfig(vram_limit=TIER_BYTES, host_memory=512 * PAGE, page_size=PAGE, slab_size=512 * PAGE,
                              prefetch_strategy="none", device=device))  # fmt: skip


def same_bits(a: object, b: object, nan_as_value: bool = False) -> bool:
    """Same type, dtype, shape and bits (NaNs included; with ``nan_as_value``, any NaN equals any
    NaN); tuples element by element."""
    if isinstance(b, tuple):
        return isinstance(a, tuple) and len(a) == len(b) and all(same_bits(x, y, nan_as_value) for x, y in zip(a, b))
    if type(a) is not torch.Tensor or a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
        return False
    if a.dtype.is_floating_point:
        if nan_as_value and bool(torch.equal(a.isnan(), b.isnan())) and bool(a.isnan().all()):
            return True
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.contiguous().view(bits), b.contiguous().view(bits))
    return torch.equal(a, b)


def within_tier(pager: Pager) -> bool:
    return pager.stats()["resident_bytes"]["device"] <= TIER_BYTES


def values_of(shape: tuple[int, ...], dtype: torch.dtype, kind: str, nans: int, seed: int) -> torch.Tensor:
    """Values with many ties: small integers (``kind == "ties"``) or one value everywhere
    (``"constant"``), with ``nans`` NaNs at random places for a float dtype. No ``-0.0``: the sign
    of a zero extremum of mixed signed zeros is the kernel's (see ``reduce_in_parts``)."""
    generator = torch.Generator().manual_seed(seed)
    if kind == "constant":
        values = torch.ones(shape)
    elif dtype == torch.bool:
        values = (torch.rand(shape, generator=generator) > 0.5).float()
    else:
        low = 0 if dtype == torch.uint8 else -3
        values = torch.randint(low, low + 7, shape, generator=generator).float()
    if dtype.is_floating_point and nans:
        flat = values.view(-1)
        flat[torch.randint(0, flat.numel(), (nans,), generator=generator)] = float("nan")
    return values.to(dtype)


def with_layout(values: torch.Tensor, layout: str) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """A base tensor and the view of ``layout`` taken from it holding ``values``: ``(base, view_of)``.
    A 1-D tensor's "transposed" is every other element."""
    shape = tuple(values.shape)
    if layout == "transposed" and len(shape) == 1:
        base, view_of = torch.empty(2 * shape[0], dtype=values.dtype), lambda t: t[::2]
    elif layout == "transposed":
        base, view_of = torch.empty((*shape[:-2], shape[-1], shape[-2]), dtype=values.dtype), lambda t: t.transpose(-1, -2)
    elif layout == "column slice":
        base, view_of = torch.zeros((*shape[:-1], shape[-1] + 3), dtype=values.dtype), lambda t: t[..., 2 : 2 + shape[-1]]
    elif layout == "offset view":
        base, view_of = torch.zeros((shape[0] + 2, *shape[1:]), dtype=values.dtype), lambda t: t[1 : 1 + shape[0]]
    else:
        base, view_of = torch.empty(shape, dtype=values.dtype), lambda t: t
    view_of(base).copy_(values)
    return base, view_of


@st.composite
def shapes(draw, dtype: torch.dtype, large: bool) -> tuple[int, ...]:
    """A 1-D to 3-D shape: 2 to 6 times the device tier in bytes of ``dtype`` when ``large``, else small."""
    elements = draw(st.integers(2 * TIER_BYTES, 6 * TIER_BYTES)) // dtype.itemsize if large else draw(st.integers(1, 400))
    dims = draw(st.integers(1, 3))
    if dims == 1:
        return (elements,)
    inner = draw(st.integers(1, 300 if large else 20))
    if dims == 2:
        return (max(1, elements // inner), inner)
    middle = draw(st.integers(1, 12))
    return (max(1, elements // (inner * middle)), middle, inner)


@st.composite
def cases(draw) -> tuple[tuple[int, ...], torch.dtype, str, str, int]:
    dtype = draw(st.sampled_from(DTYPES))
    large = draw(st.booleans() | st.just(True))
    nans = draw(st.sampled_from([0, 0, 1, 3])) if dtype.is_floating_point else 0
    return draw(shapes(dtype, large)), dtype, draw(st.sampled_from(LAYOUTS)), draw(st.sampled_from(["ties", "ties", "constant"])), nans


@SETTINGS
@given(case=cases(), seed=st.integers(0, 99))
def test_whole_tensor_reductions_give_the_dense_result(case, seed):
    shape, dtype, layout, kind, nans = case
    base, view_of = with_layout(values_of(shape, dtype, kind, nans, seed), layout)
    dense = view_of(base.clone())
    with make_pager() as pager:
        paged = view_of(PagedTensor.wrap(base.clone(), pager))
        for name, (op, applies) in REDUCTIONS.items():
            if not applies(dtype):
                continue
            assert same_bits(op(paged), op(dense), nan_as_value=name in KERNEL_NAN_BITS), name
            assert within_tier(pager), name


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", FLOATS)
def test_argmax_and_argmin_find_the_first_nan_and_the_first_of_ties_in_logical_order(layout, dtype):
    """Ties everywhere, NaNs at the end of the storage order and at the start of the logical order
    (a transposed tensor reads them in other orders): the dense op's index."""
    values = torch.zeros(96, 200)
    values[95, 0] = values[0, 199] = 1.0
    values[94, 3] = values[1, 150] = -1.0
    with make_pager() as pager:
        for nan_at in (None, (95, 199), (90, 1), (2, 150)):
            if nan_at is not None:
                values[nan_at] = float("nan")
            base, view_of = with_layout(values.to(dtype), layout)
            paged, dense = view_of(PagedTensor.wrap(base.clone(), pager)), view_of(base)
            for op in (torch.argmax, torch.argmin):
                assert same_bits(op(paged), op(dense)), (op, nan_at)
            assert within_tier(pager)


def test_reductions_larger_than_the_tier_no_longer_raise():
    """The example of the gap: a 16-page tensor on an 8-page tier."""
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(3))
    with make_pager() as pager:
        t = PagedTensor.wrap(x.clone(), pager)
        for op in (torch.max, torch.min, torch.amax, torch.amin, torch.argmax, torch.argmin, torch.aminmax, torch.count_nonzero):
            assert same_bits(op(t), op(x)), op
        mask = torch.randn(128, 512, generator=torch.Generator().manual_seed(5)) > 0  # 16 pages of bools
        assert same_bits(PagedTensor.wrap(mask.clone(), pager).any(), mask.any())
        assert same_bits(PagedTensor.wrap(mask.clone(), pager).all(), mask.all())
        integers = torch.randint(0, 9, (64, 256), generator=torch.Generator().manual_seed(4))
        assert same_bits(PagedTensor.wrap(integers.clone(), pager).sum(), integers.sum())
        assert within_tier(pager)


def test_integer_sums_wrap_as_the_dense_op_does():
    """Sums past the result dtype's range wrap modulo it, whatever the order."""
    x = torch.full((64, 256), 2**40, dtype=torch.int64)
    x[::3] = -(2**62)
    with make_pager() as pager:
        t = PagedTensor.wrap(x.clone(), pager)
        for op in (lambda a: a.sum(), lambda a: a.t().sum(dtype=torch.int32), lambda a: a.sum(dtype=torch.uint8)):
            assert same_bits(op(t), op(x))
        assert within_tier(pager)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_float_sum_larger_than_the_tier_still_raises(dtype):
    """A float sum depends on the order of its elements: it never runs in parts."""
    with make_pager() as pager:
        t = PagedTensor.wrap(torch.randn(64, 512).to(dtype), pager)
        with pytest.raises(OutOfPagesError):
            t.sum()
        with pytest.raises(OutOfPagesError):
            PagedTensor.wrap(torch.randint(0, 9, (64, 256)), pager).sum(dtype=torch.float32)
        assert within_tier(pager)


def test_float_sums_along_dims_still_raise():
    """Only order-free reductions run in parts: a float sum, mean, product or variance along a dim
    (whose bits depend on the kernel's order of additions) raises, naming the op."""
    with make_pager() as pager:
        t = PagedTensor.wrap(torch.randn(64, 256), pager)
        for op, name in ((lambda a: a.sum(dim=0), "aten.sum.dim_IntList"), (lambda a: a.sum(1, keepdim=True), "aten.sum.dim_IntList"),
                         (lambda a: a.mean(0), "aten.mean.dim"), (lambda a: a.prod(1), "aten.prod.dim_int"),
                         (lambda a: a.var(0), "aten.var.correction"), (lambda a: a.t().sum(-1), "aten.sum.dim_IntList")):  # fmt: skip
            with pytest.raises(OutOfPagesError, match=name):
                op(t)
        with pytest.raises(OutOfPagesError, match="aten.sum.dim_IntList"):
            PagedTensor.wrap(torch.randint(0, 9, (64, 256)), pager).sum(0, dtype=torch.float32)
        assert within_tier(pager)


def test_small_tensors_keep_the_generic_path(monkeypatch):
    """Tensors that fit in a piece run the op at once (no parts); larger ones are cut into parts."""

    def no_parts(*args, **kwargs):
        raise AssertionError("cut into parts")

    # Where _parts is looked up: by reduce_in_parts in its module; by copy_in_parts and _parts itself in parts.
    monkeypatch.setattr(reductions, "_parts", no_parts)
    monkeypatch.setattr(parts, "_parts", no_parts)
    x = torch.randint(-3, 3, (8, 16)).float()
    with make_pager() as pager:
        small = PagedTensor.wrap(x.clone(), pager)
        for op in (torch.max, torch.amin, torch.argmax, torch.aminmax, torch.any, torch.all, torch.count_nonzero,
                   lambda t: t.max(0), lambda t: t.amin(1), lambda t: t.argmax(1), lambda t: t.any(0), lambda t: torch.count_nonzero(t, 1)):  # fmt: skip
            assert same_bits(op(small), op(x)), op
        assert same_bits(PagedTensor.wrap(x.long(), pager).sum(), x.long().sum())
        assert same_bits(PagedTensor.wrap(x.long(), pager).sum(0), x.long().sum(0))
        with pytest.raises(AssertionError, match="cut into parts"):
            PagedTensor.wrap(torch.randn(64, 256), pager).max()
        with pytest.raises(AssertionError, match="cut into parts"):
            PagedTensor.wrap(torch.randn(64, 256), pager).max(0)


def test_empty_tensors_give_torchs_answer_and_errors():
    with make_pager() as pager:
        empty = torch.empty(0, 5)
        paged = PagedTensor.wrap(empty.clone(), pager)
        assert same_bits(paged.any(), empty.any()) and same_bits(paged.all(), empty.all())
        assert same_bits(PagedTensor.wrap(empty.long(), pager).sum(), empty.long().sum())
        with pytest.raises(RuntimeError):
            paged.max()


@pytest.mark.gpu
def test_gpu_reductions_run_in_parts_on_cuda():
    """On CUDA: whole-tensor reductions of tensors four times the device tier give the dense op's result."""
    x = torch.randint(-3, 3, (128, 256), generator=torch.Generator().manual_seed(7)).float()  # 32 pages of 4 KiB
    x[100, 5] = x[3, 200] = float("nan")
    x, integers = x.cuda(), torch.randint(0, 9, (128, 256), generator=torch.Generator().manual_seed(8)).cuda()
    with make_pager("cuda") as pager:
        paged = PagedTensor.wrap(x.clone(), pager)
        for op in (torch.max, torch.min, torch.amax, torch.aminmax):
            assert same_bits(op(paged), op(x), nan_as_value=True), op
        for op in (torch.argmax, torch.argmin, torch.count_nonzero, lambda t: t.t().argmax(), lambda t: t.t()[:, 1:].argmin()):
            assert same_bits(op(paged), op(x)), op
        mask = integers > 0
        assert same_bits(PagedTensor.wrap(mask.clone(), pager).all(), mask.all())
        assert same_bits(PagedTensor.wrap(integers.clone(), pager).t().sum(), integers.t().sum())
        assert within_tier(pager)


# --- The same reductions along dims -------------------------------------------------------------

DIM_DTYPES = (*FLOATS, torch.int64, torch.uint8, torch.bool)
DIM_LAYOUTS = (*LAYOUTS, "row steps", "expanded")
Dims = tuple[int, ...]

# name: (the op of a tensor, dims and keepdim; whether it applies to a dtype; whether it takes several dims)
DIM_REDUCTIONS: dict[str, tuple[Callable[[torch.Tensor, Dims, bool], object], Callable[[torch.dtype], bool], bool]] = {
    "max(dim)": (lambda t, dims, keep: t.max(dims[0], keepdim=keep), lambda dtype: True, False),
    "min(dim)": (lambda t, dims, keep: torch.min(t, dim=dims[0], keepdim=keep), lambda dtype: True, False),
    "amax(dims)": (lambda t, dims, keep: t.amax(dims, keepdim=keep), lambda dtype: True, True),
    "amin(dims)": (lambda t, dims, keep: torch.amin(t, dim=dims, keepdim=keep), lambda dtype: True, True),
    "aminmax(dim=)": (lambda t, dims, keep: torch.aminmax(t, dim=dims[0], keepdim=keep), lambda dtype: True, False),
    "argmax(dim)": (lambda t, dims, keep: t.argmax(dims[0], keepdim=keep), lambda dtype: dtype != torch.bool, False),
    "argmin(dim)": (lambda t, dims, keep: torch.argmin(t, dim=dims[0], keepdim=keep), lambda dtype: dtype != torch.bool, False),
    "any(dim)": (lambda t, dims, keep: t.any(dims[0], keepdim=keep), lambda dtype: True, False),
    "all(dim)": (lambda t, dims, keep: torch.all(t, dim=dims[0], keepdim=keep), lambda dtype: True, False),
    "any(dims)": (lambda t, dims, keep: t.any(dim=dims, keepdim=keep), lambda dtype: True, True),
    "all(dims)": (lambda t, dims, keep: torch.all(t, dim=dims, keepdim=keep), lambda dtype: True, True),
    "count_nonzero(dim)": (lambda t, dims, keep: torch.count_nonzero(t, dims[0]), lambda dtype: True, False),
    "count_nonzero(dims)": (lambda t, dims, keep: torch.count_nonzero(t, dims), lambda dtype: True, True),
    "sum(dims)": (lambda t, dims, keep: t.sum(dims, keepdim=keep), lambda dtype: not dtype.is_floating_point, True),
    "sum(dims) into int32": (lambda t, dims, keep: torch.sum(t, dims, keepdim=keep, dtype=torch.int32), lambda dtype: not dtype.is_floating_point, True),
}
# A NaN result of these is compared as NaN, not by bits: on CPU their kernels give NaN bits of their
# own (0x7FC00000 or all ones, by the path they take: ``amax(0)`` of a (4, 3585) float32 tensor takes
# its vector path across rows), so a part's may differ from the whole's.
DIM_KERNEL_NAN_BITS = {"max(dim)", "min(dim)", "aminmax(dim=)", "amax(dims)", "amin(dims)"}


def same_result(a: object, b: object, nan_as_value: bool = False) -> bool:
    """Same type, dtype, shape, strides and bits (tuples element by element); with ``nan_as_value``,
    NaNs at the same places, of any bits."""
    if isinstance(b, tuple):
        return isinstance(a, tuple) and len(a) == len(b) and all(same_result(x, y, nan_as_value) for x, y in zip(a, b))
    if not same_bits(a, b, nan_as_value) and not (nan_as_value and a.dtype.is_floating_point and same_bits(*_nans_as_zeros(a, b))):
        return False
    return a.stride() == b.stride()


def _nans_as_zeros(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``a`` and ``b`` with their NaNs zeroed where both have one (so any other difference stays)."""
    both = a.isnan() & b.isnan()
    return a.masked_fill(both, 0), b.masked_fill(both, 0)


def dim_values(shape: tuple[int, ...], dtype: torch.dtype, kind: str, specials: int, seed: int) -> torch.Tensor:
    """:func:`values_of` with ``specials`` NaNs and as many infinities of either sign (a float dtype)."""
    values = values_of(shape, dtype, kind, specials, seed)
    if dtype.is_floating_point and specials:
        generator = torch.Generator().manual_seed(seed + 1)
        flat = values.view(-1)
        places = torch.randint(0, flat.numel(), (specials,), generator=generator)
        flat[places] = torch.tensor([float("inf"), -float("inf")], dtype=dtype)[torch.randint(0, 2, (specials,), generator=generator)]
    return values


def dim_layout(values: torch.Tensor, layout: str) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """:func:`with_layout`, and two more: every other index of dim 0 (``"row steps"``) and dim 0
    expanded from one index (``"expanded"``, stride 0: each index holds the values at index 0)."""
    if layout == "row steps":
        base = torch.zeros((2 * values.shape[0], *values.shape[1:]), dtype=values.dtype)
        base[::2] = values
        return base, lambda t: t[::2]
    if layout == "expanded":
        shape = tuple(values.shape)
        return values[:1].clone(), lambda t: t.expand(shape)
    return with_layout(values, layout)


@st.composite
def dim_shapes(draw, dtype: torch.dtype, large: bool) -> tuple[int, ...]:
    """A 1-D to 4-D shape of 2 to 6 times the device tier in bytes of ``dtype`` when ``large`` (else
    small); its last dim often wider than a piece."""
    elements = draw(st.integers(2 * TIER_BYTES, 6 * TIER_BYTES)) // dtype.itemsize if large else draw(st.integers(1, 400))
    dims = draw(st.integers(1, 4))
    inner = [draw(st.integers(1, 6)) for _ in range(dims - 2)]
    if dims > 1:
        widest = max(1, elements // torch.Size(inner).numel())
        inner.append(draw(st.integers(1, min(300, widest)) | st.integers(1, widest)))
    outer = max(1, elements // max(1, torch.Size(inner).numel()))
    return (outer, *inner)


@st.composite
def dim_cases(draw) -> tuple[tuple[int, ...], torch.dtype, str, str, int, str, Dims, bool]:
    dtype = draw(st.sampled_from(DIM_DTYPES))
    shape = draw(dim_shapes(dtype, draw(st.booleans() | st.just(True))))
    name = draw(st.sampled_from([name for name, (_, applies, _) in DIM_REDUCTIONS.items() if applies(dtype)]))
    ndim = len(shape)
    negative = st.booleans()
    if DIM_REDUCTIONS[name][2]:  # one or several distinct dims, in any order, some counted from the end
        dims = draw(st.lists(st.integers(0, ndim - 1), min_size=0, max_size=ndim, unique=True))  # [] too: all or no dims, by the op
    else:
        dims = [draw(st.integers(0, ndim - 1))]
    dims = tuple(d - ndim if draw(negative) else d for d in dims)
    specials = draw(st.sampled_from([0, 0, 1, 3])) if dtype.is_floating_point else 0
    layout = draw(st.sampled_from(DIM_LAYOUTS))
    return shape, dtype, layout, draw(st.sampled_from(["ties", "ties", "constant"])), specials, name, dims, draw(st.booleans())


@settings(SETTINGS, max_examples=200)
@given(case=dim_cases(), seed=st.integers(0, 99))
def test_reductions_along_dims_give_the_dense_result(case, seed):
    shape, dtype, layout, kind, specials, name, dims, keepdim = case
    base, view_of = dim_layout(dim_values(shape, dtype, kind, specials, seed), layout)
    op = DIM_REDUCTIONS[name][0]
    with make_pager() as pager:
        paged = view_of(PagedTensor.wrap(base.clone(), pager))
        assert same_result(op(paged, dims, keepdim), op(view_of(base), dims, keepdim), nan_as_value=name in DIM_KERNEL_NAN_BITS)
        assert within_tier(pager)


def dims_of(name: str, ndim: int) -> list[Dims]:
    """Every single dim (and the last counted from the end) for an op of one dim; for an op of
    several, pairs, a reversed pair with a negative dim, all but the first, and none (``()``: every
    dim for ``amax`` / ``sum`` / ``count_nonzero``, no dim for ``any`` / ``all``, whose results
    torch's kernels lay out contiguous, not as the input)."""
    if not DIM_REDUCTIONS[name][2]:
        return [(d,) for d in range(ndim)] + [(-1,)]
    return [(0,), (1,), (0, 2), (-1, 1), tuple(range(1, ndim)), ()]


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "row steps", "expanded"])
@pytest.mark.parametrize("name", DIM_REDUCTIONS)
def test_every_reduction_along_dims_runs_in_parts(name, layout):
    """Each op along each dim (and sets of dims), keepdim or not, of a tensor spanning 16 pages (8
    expanded) on an 8-page tier with ties, NaNs and infinities: the dense op's dtype, shape,
    strides and bits."""
    op, applies, _ = DIM_REDUCTIONS[name]
    dtype = torch.float32 if applies(torch.float32) else torch.int64
    shape = (3, 64, 128) if layout == "expanded" else (32, 8, 64)
    values = dim_values((*shape[:-1], shape[-1] * 4 // dtype.itemsize), dtype, "ties", 40, seed=11)
    base, view_of = dim_layout(values, layout)
    with make_pager() as pager:
        paged = view_of(PagedTensor.wrap(base.clone(), pager))
        assert reductions._larger_than_a_piece([paged])
        for dims in dims_of(name, 3):
            for keepdim in (False, True):
                assert same_result(op(paged, dims, keepdim), op(view_of(base), dims, keepdim), name in DIM_KERNEL_NAN_BITS), (dims, keepdim)
        assert within_tier(pager)


def test_rows_wider_than_a_piece_are_combined_from_their_parts():
    """Rows of 80 KiB (a piece is 28 KiB): each row is cut into parts along the reduced dim and the
    parts' results combined: the first of ties across parts, a NaN in a later part, integer sums."""
    x = torch.zeros(3, 20000)
    x[0, 15000] = x[0, 19999] = 2.0  # a tie, both in later parts than index 0's
    x[0, 100] = -1.0
    x[1, 19000] = float("nan")  # a NaN in the last part only
    x[1, 50] = 5.0
    x[2, 7000:7200] = 3.0  # a tie straddling a part boundary
    x[2, 7100] = -float("inf")
    integers = torch.randint(-(2**62), 2**62, (3, 20000), generator=torch.Generator().manual_seed(2))
    with make_pager() as pager:
        paged, paged_integers = PagedTensor.wrap(x.clone(), pager), PagedTensor.wrap(integers.clone(), pager)
        for op in (lambda t: t.max(1), lambda t: t.min(-1, keepdim=True), lambda t: t.argmax(1), lambda t: t.argmin(1), lambda t: t.amax(1),
                   lambda t: torch.aminmax(t, dim=1), lambda t: t.any(1), lambda t: t.all(1), lambda t: torch.count_nonzero(t, 1),
                   lambda t: t.max(0), lambda t: t.t().argmax(0)):  # fmt: skip
            assert same_result(op(paged), op(x)), op
        for op in (lambda t: t.sum(1), lambda t: t.sum(-1, dtype=torch.int32), lambda t: (t > 0).sum(1)):
            assert same_result(op(paged_integers), op(integers))  # wrapping past int64 and int32
        assert within_tier(pager)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", FLOATS)
def test_argmax_along_a_dim_finds_the_first_nan_and_the_first_of_ties(layout, dtype):
    """Ties everywhere, NaNs placed late in one part and early in another: along either dim, the
    dense op's index (max and min along a dim: its values and indices)."""
    values = torch.zeros(96, 200)
    values[95, :] = values[:, 199] = 1.0
    values[94, 3] = values[1, 150] = -1.0
    values[[90, 2, 60, 60], [1, 150, 150, 0]] = float("nan")
    base, view_of = with_layout(values.to(dtype), layout)
    with make_pager() as pager:
        paged, dense = view_of(PagedTensor.wrap(base.clone(), pager)), view_of(base)
        for dim in (0, 1, -1):
            for op in (torch.argmax, torch.argmin):
                assert same_result(op(paged, dim), op(dense, dim)), (op, dim)
            for op in (torch.max, torch.min):
                assert same_result(op(paged, dim), op(dense, dim), nan_as_value=True), (op, dim)
        assert within_tier(pager)


def test_only_a_piece_of_pages_is_resident_at_a_time(monkeypatch):
    """A 32-page tensor on an 8-page tier, reduced along a kept-dim cut (dim 1) and a reduced-dim
    cut (dim 0): the pages are made resident in runs of at most the tier, each page about once,
    none left pinned; the same tensor's float sum along a dim (all its pages at once) raises."""
    x = torch.randint(-3, 4, (128, 256), generator=torch.Generator().manual_seed(6)).float()  # 32 pages
    with make_pager() as pager:
        paged = PagedTensor.wrap(x.clone(), pager)
        runs: list[int] = []
        ensure_resident = pager.ensure_resident

        def recording(allocation, start=0, stop=None, **kwargs):
            runs.append((allocation.num_pages if stop is None else stop) - start)
            return ensure_resident(allocation, start, stop, **kwargs)

        monkeypatch.setattr(pager, "ensure_resident", recording)
        for op in (lambda t: t.max(1), lambda t: t.amax(0), lambda t: t.argmin(0), lambda t: torch.count_nonzero(t, 0), lambda t: t.any(-1)):
            runs.clear()
            assert same_result(op(paged), op(x)), op
            assert max(runs) <= DEVICE_PAGES and 32 <= sum(runs) <= 32 + len(runs), (op, runs)
            assert len(runs) >= 32 // DEVICE_PAGES, (op, runs)
            assert within_tier(pager)
        assert all(page.pin_count == 0 for page in pager.page_table(paged._paged.allocation))
        with pytest.raises(OutOfPagesError, match="aten.sum.dim_IntList"):
            paged.sum(0)


def test_empty_tensors_along_dims_give_torchs_answers_and_errors():
    """An empty tensor spans no page: the dense op's answer, or its error (max over an empty dim)."""
    with make_pager() as pager:
        empty = torch.empty(0, 5)
        paged = PagedTensor.wrap(empty.clone(), pager)
        for op in (lambda t: t.max(1), lambda t: t.amax(1), lambda t: t.any(0), lambda t: t.all(0), lambda t: torch.count_nonzero(t, 0),
                   lambda t: t.long().sum(0), lambda t: t.argmin(1, keepdim=True), lambda t: torch.aminmax(t, dim=1)):  # fmt: skip
            assert same_result(op(paged), op(empty)), op
        for op in (lambda t: t.max(0), lambda t: t.amin(0), lambda t: t.argmax(-2), lambda t: torch.aminmax(t, dim=0)):
            with pytest.raises(IndexError):
                op(empty)
            with pytest.raises(IndexError):
                op(paged)
        with pytest.raises(IndexError):
            PagedTensor.wrap(torch.randn(64, 256), pager).max(2)  # a dim out of range: torch's error, no page read


@pytest.mark.gpu
def test_gpu_reductions_along_dims_run_in_parts_on_cuda():
    """On CUDA: each reduction along dims of a tensor four times the device tier (rows of a kept-dim
    cut, a reduced-dim cut, a transposed view, rows wider than a piece) gives the dense op's result."""
    x = dim_values((128, 256), torch.float32, "ties", 8, seed=7).cuda()  # 32 pages of 4 KiB
    wide = dim_values((2, 16384), torch.float32, "ties", 4, seed=8).cuda()  # rows of 64 KiB
    integers = torch.randint(-(2**62), 2**62, (128, 256), generator=torch.Generator().manual_seed(9)).cuda()
    with make_pager("cuda") as pager:
        for dense in (x, wide, integers):
            paged = PagedTensor.wrap(dense.clone(), pager)
            for name, (op, applies, several) in DIM_REDUCTIONS.items():
                if not applies(dense.dtype):
                    continue
                for view in (lambda t: t, lambda t: t.t()):
                    for dims in ((0,), (-1,), (0, 1), ()) if several else ((0,), (-1,)):
                        for keepdim in (False, True):
                            got, want = op(view(paged), dims, keepdim), op(view(dense), dims, keepdim)
                            assert same_result(got, want, nan_as_value=name in DIM_KERNEL_NAN_BITS), (name, dims, keepdim)
            assert within_tier(pager)
        with pytest.raises(OutOfPagesError, match="aten.sum.dim_IntList"):
            PagedTensor.wrap(x.clone(), pager).sum(0)


_REFUSED_PAST_THE_TIER = {
    "logcumsumexp of int32": (torch.int32, lambda t: torch.logcumsumexp(t, 0)),
    "cummax of complex64": (torch.complex64, lambda t: torch.cummax(t, 0)),
    "cummin of complex64": (torch.complex64, lambda t: torch.cummin(t, 0)),
    "amax over a repeated dim": (torch.float32, lambda t: t.amax((0, 0))),
    "sum over a repeated dim of int64": (torch.int64, lambda t: t.sum((0, 0))),
    "count_nonzero over a repeated dim": (torch.float32, lambda t: torch.count_nonzero(t, (0, 0))),
    "any over a repeated dim": (torch.float32, lambda t: torch.any(t, (0, 0))),
}


@pytest.mark.parametrize("name", sorted(_REFUSED_PAST_THE_TIER))
def test_reductions_and_scans_torch_refuses_raise_torchs_error_past_the_tier(name):
    """Past the tier a scan along dim 0 of a dtype its kernel refuses raised the pager's
    DeviceTierFullError (torch: NotImplementedError, "cummax_cpu" not implemented for 'ComplexFloat'),
    and a reduction over a repeated dim the meta kernel's words ("duplicate value in the list of
    dims"; torch: "dim 0 appears multiple times in the list of dims"). torch's own error now."""
    dtype, op = _REFUSED_PAST_THE_TIER[name]
    x = (torch.randn(64, 256) * 4).to(dtype)
    with pytest.raises(Exception) as dense_error:
        op(x)
    with make_pager() as pager:
        table = PagedTensor.wrap(x, pager)  # past the tier
        with pytest.raises(dense_error.type) as paged_error:
            op(table)
        assert str(paged_error.value) == str(dense_error.value)
