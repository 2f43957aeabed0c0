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


def test_reductions_over_some_dims_are_not_run_in_parts():
    """Only whole-tensor forms run in parts: a reduction along one dim raises as before."""
    with make_pager() as pager:
        t = PagedTensor.wrap(torch.randn(64, 256), pager)
        for op in (lambda a: a.amax(dim=0), lambda a: a.argmax(dim=1), lambda a: torch.count_nonzero(a, dim=0)):
            with pytest.raises(OutOfPagesError):
                op(t)


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
        for op in (torch.max, torch.amin, torch.argmax, torch.aminmax, torch.any, torch.all, torch.count_nonzero):
            assert same_bits(op(small), op(x)), op
        assert same_bits(PagedTensor.wrap(x.long(), pager).sum(), x.long().sum())
        with pytest.raises(AssertionError, match="cut into parts"):
            PagedTensor.wrap(torch.randn(64, 256), pager).max()


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
