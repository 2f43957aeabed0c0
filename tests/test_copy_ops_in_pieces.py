"""Copies and comparisons of PagedTensors larger than the device tier run a piece of pages at a time:
``clone`` to any layout (``t.t().contiguous()``, ``t.t().reshape(-1)``), ``torch.cat``,
``torch.stack``, ``torch.equal`` and ``torch.allclose`` give the dense op's result (dtype, shape,
strides and bits), with the device tier never over its budget, and torch's errors for bad inputs."""

from __future__ import annotations

import warnings
from typing import Callable

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pagedtensor import DeviceTierFullError, MemoryConfig, PagedTensor, Pager

PAGE = 4096
DEVICE_PAGES = 8
TIER_BYTES = DEVICE_PAGES * PAGE
DTYPES = (torch.float32, torch.float16, torch.int64, torch.bool)
LAYOUTS = ("contiguous", "transposed", "column slice", "offset view")
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def make_pager(device: str = "cpu", device_pages: int = DEVICE_PAGES) -> Pager:
    """A host tier of 16 MiB: a concatenation's inputs are sized by the first one's dtype, so three
    int64 inputs shaped for a bool, and their int64 result, take about 10 MiB."""
    return Pager(MemoryConfig(vram_limit=device_pages * PAGE, host_memory=4096 * PAGE, page_size=PAGE, slab_size=512 * PAGE,
                              prefetch_strategy="none", device=device))  # fmt: skip


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape, strides and bits (NaNs included)."""
    if type(a) is not torch.Tensor or a.dtype != b.dtype or a.shape != b.shape or a.stride() != b.stride():
        return False
    if a.dtype.is_floating_point:
        bits = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.contiguous().view(bits), b.contiguous().view(bits))
    return torch.equal(a, b)


def within_tier(pager: Pager) -> bool:
    return pager.stats()["resident_bytes"]["device"] <= TIER_BYTES


def random_values(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=generator) > 0.5
    if dtype == torch.int64:
        return torch.randint(-1000, 1000, shape, generator=generator)
    return torch.randn(shape, generator=generator).to(dtype)


def with_layout(shape: tuple[int, ...], dtype: torch.dtype, layout: str, seed: int) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """A base tensor and the view of ``shape`` taken from it: ``(base, view_of)``."""
    if layout == "transposed":
        base = random_values((*shape[:-2], shape[-1], shape[-2]), dtype, seed)
        return base, lambda t: t.transpose(-1, -2)
    if layout == "column slice":
        base = random_values((*shape[:-1], shape[-1] + 3), dtype, seed)
        return base, lambda t: t[..., 2 : 2 + shape[-1]]
    if layout == "offset view":
        base = random_values((shape[0] + 2, *shape[1:]), dtype, seed)
        return base, lambda t: t[1 : 1 + shape[0]]
    return random_values(shape, dtype, seed), lambda t: t


def paged_and_dense(pager: Pager, shape: tuple[int, ...], dtype: torch.dtype, layout: str, seed: int, paged: bool = True):
    """``(tensor, dense)``: the view of ``layout`` over a PagedTensor (or a plain tensor) and the same view of a dense copy."""
    base, view_of = with_layout(shape, dtype, layout, seed)
    dense = view_of(base.clone())
    return (view_of(PagedTensor.wrap(base.clone(), pager)) if paged else view_of(base.clone())), dense


@st.composite
def shapes(draw, dtype: torch.dtype, large: bool) -> tuple[int, ...]:
    """A 2-D or 3-D shape: 2 to 6 times the device tier in bytes of ``dtype`` when ``large``, else small."""
    elements = draw(st.integers(2 * TIER_BYTES, 6 * TIER_BYTES)) // dtype.itemsize if large else draw(st.integers(6, 400))
    inner = draw(st.integers(2, 300 if large else 20))
    if draw(st.booleans()):
        return (max(2, elements // inner), inner)
    middle = draw(st.integers(2, 12))
    return (max(2, elements // (inner * middle)), middle, inner)


@st.composite
def cases(draw) -> tuple[tuple[int, ...], torch.dtype, str, bool]:
    dtype = draw(st.sampled_from(DTYPES))
    large = draw(st.booleans() | st.just(True))
    return draw(shapes(dtype, large)), dtype, draw(st.sampled_from(LAYOUTS)), large


def run_both(op: Callable, *pairs) -> tuple:
    """``op`` on the paged tensors and on their dense twins."""
    return op(*(tensor for tensor, _ in pairs)), op(*(dense for _, dense in pairs))


@SETTINGS
@given(case=cases(), memory_format=st.sampled_from([torch.contiguous_format, torch.preserve_format]), seed=st.integers(0, 99))
def test_clone_of_any_layout_gives_the_dense_result(case, memory_format, seed):
    shape, dtype, layout, _ = case
    with make_pager() as pager:
        pair = paged_and_dense(pager, shape, dtype, layout, seed)
        for op in (lambda t: t.clone(memory_format=memory_format), lambda t: t.contiguous(), lambda t: t.reshape(-1),
                   lambda t: t.transpose(0, 1).contiguous()):  # fmt: skip
            result, expected = run_both(op, pair)
            is_view = expected.untyped_storage().data_ptr() == pair[1].untyped_storage().data_ptr()
            assert isinstance(result, PagedTensor) == is_view  # a view of the pages where torch returns a view
            assert same_bits(result.materialize() if is_view else result, expected)
            assert within_tier(pager)


@st.composite
def concatenations(draw):
    """Inputs of one ``cat`` or ``stack``: 2 or 3 of them, at least one paged, dtypes possibly mixed;
    ``cat``'s inputs differ along its ``dim``."""
    shape, dtype, _, large = draw(cases())
    stack = draw(st.booleans())
    dim = draw(st.integers(-len(shape) - 1, len(shape)) if stack else st.integers(-len(shape), len(shape) - 1))
    count = draw(st.integers(2, 3))
    inputs = []
    for i in range(count):
        own_shape = list(shape)
        if not stack:
            own_shape[dim] = max(1, shape[dim] + draw(st.integers(-1, 1)))
        own_dtype = draw(st.sampled_from(DTYPES)) if draw(st.integers(0, 3)) == 0 else dtype
        paged = i == 0 or draw(st.booleans())
        inputs.append((tuple(own_shape), own_dtype, draw(st.sampled_from(LAYOUTS)), paged))
    return stack, dim, inputs


@SETTINGS
@given(concatenation=concatenations(), seed=st.integers(0, 99))
@example(  # int64 inputs shaped for a bool filled a host tier of 2 MiB (OutOfPagesError)
    concatenation=(False, 1, [((53249, 2), torch.int64, "contiguous", True), ((53249, 2), torch.bool, "contiguous", False),
                              ((53249, 3), torch.int64, "contiguous", True)]),
    seed=0,
)  # fmt: skip
def test_cat_and_stack_give_the_dense_result(concatenation, seed):
    stack, dim, inputs = concatenation
    with make_pager() as pager:
        pairs = [paged_and_dense(pager, shape, dtype, layout, seed + i, paged) for i, (shape, dtype, layout, paged) in enumerate(inputs)]
        op = torch.stack if stack else torch.cat
        result, expected = run_both(lambda *ts: op(list(ts), dim=dim), *pairs)
        assert same_bits(result, expected)
        assert within_tier(pager)


@SETTINGS
@given(concatenation=concatenations(), out_dtype=st.sampled_from((None, *DTYPES, torch.float64)), out_layout=st.sampled_from(LAYOUTS),
       paged_out=st.booleans(), seed=st.integers(0, 99))  # fmt: skip
def test_cat_and_stack_into_out_give_the_dense_result(concatenation, out_dtype, out_layout, paged_out, seed):
    """``torch.cat(..., out=)`` / ``torch.stack(..., out=)`` past the tier, into a paged or plain
    ``out`` of any layout and any dtype (the result's or another: converted as torch converts, or
    torch's error where it refuses the cast): ``out`` holds the dense op's bits, the op returns it."""
    stack, dim, inputs = concatenation
    with make_pager() as pager:
        pairs = [paged_and_dense(pager, shape, dtype, layout, seed + i, paged) for i, (shape, dtype, layout, paged) in enumerate(inputs)]
        op = torch.stack if stack else torch.cat
        expected = op([dense for _, dense in pairs], dim=dim)
        out, dense_out = paged_and_dense(pager, tuple(expected.shape), out_dtype or expected.dtype, out_layout, seed + 7, paged_out)
        try:
            dense_result = op([dense for _, dense in pairs], dim=dim, out=dense_out)
        except Exception as dense_error:  # a cast torch refuses
            with pytest.raises(type(dense_error)) as paged_error:
                op([tensor for tensor, _ in pairs], dim=dim, out=out)
            assert str(paged_error.value) == str(dense_error)
            return
        result = op([tensor for tensor, _ in pairs], dim=dim, out=out)
        assert result is out and dense_result is dense_out
        values = out.materialize() if isinstance(out, PagedTensor) else out
        assert same_bits(values, dense_out)
        assert within_tier(pager)


def test_cat_into_a_paged_out_of_another_shape_raises_before_reading_a_page():
    with make_pager() as pager:
        x = torch.randn(64, 256)
        paged = PagedTensor.wrap(x.clone(), pager)
        out = PagedTensor.wrap(torch.zeros(129, 256), pager)
        faults = pager.stats()["faults"]
        with pytest.raises(NotImplementedError, match=r"would resize its PagedTensor output from \[129, 256\] to \[128, 256\]"):
            torch.cat([paged, paged], out=out)
        assert pager.stats()["faults"] == faults
        assert torch.equal(out.materialize(), torch.zeros(129, 256))


def test_cat_into_a_plain_out_of_another_shape_resizes_it_as_torch_does():
    """A plain ``out=`` of another shape is resized as torch resizes it (with its warning where it
    held elements), then filled a part of pages at a time (it raised DeviceTierFullError)."""
    x = torch.randn(64, 256)
    with make_pager() as pager:
        paged = PagedTensor.wrap(x.clone(), pager)
        for out in (torch.empty(0), torch.zeros(3, 3)):
            dense_out = out.clone()
            with warnings.catch_warnings(record=True) as dense_warnings:
                warnings.simplefilter("always")
                torch.cat([x, x], out=dense_out)
            with warnings.catch_warnings(record=True) as paged_warnings:
                warnings.simplefilter("always")
                assert torch.cat([paged, paged], out=out) is out
            assert same_bits(out, dense_out)
            assert [str(w.message).split(" (Triggered internally at ")[0] for w in paged_warnings] == [
                str(w.message).split(" (Triggered internally at ")[0] for w in dense_warnings]  # torch's text ('{str(shape)}' came)
        assert within_tier(pager)


@pytest.mark.parametrize("op", [torch.cat, torch.stack])
@pytest.mark.parametrize("unreadable", ["closed pager", "freed allocation"])
@pytest.mark.parametrize("paged_out", [True, False])
def test_cat_and_stack_into_out_with_an_unreadable_input_raise_before_writing_a_slice(op, unreadable, paged_out):
    """An input on a closed pager, or whose allocation was freed, after one that is readable: the
    op raises that input's error, naming the op, and ``out`` keeps every element (the first input's
    slice was written before the second's pages were met)."""
    with make_pager(device_pages=64) as other, make_pager() as pager:
        readable = PagedTensor.wrap(torch.randn(64, 256), other)
        broken = PagedTensor.wrap(torch.randn(64, 256), pager)  # 16 pages: past its pager's tier
        shape = op([torch.empty(64, 256), torch.empty(64, 256)]).shape
        out = PagedTensor.wrap(torch.full(shape, 7.0), other) if paged_out else torch.full(shape, 7.0)
        if unreadable == "closed pager":
            pager.close()
            expected = (RuntimeError, r"aten\.(cat|stack)\.out.*closed")
        else:
            pager.free(broken.allocation)
            expected = (ValueError, r"is freed")
        with pytest.raises(expected[0], match=expected[1]):
            op([readable, broken], out=out)
        assert torch.equal(out.materialize() if paged_out else out, torch.full(shape, 7.0))


def test_cat_and_stack_into_a_resized_plain_out_restride_it_as_torch_does():
    """A plain ``out=`` that torch resizes (empty, or of another shape) it restrides to the inputs'
    one memory format (channels_last inputs: a channels_last ``out``; it stayed contiguous); an
    ``out`` of the result's shape keeps its strides."""
    cl = torch.randn(8, 16, 16, 16).contiguous(memory_format=torch.channels_last)  # 128 KiB: past the tier
    with make_pager() as pager:
        paged_cl, paged = PagedTensor.wrap(cl.clone(), pager), PagedTensor.wrap(cl.contiguous(), pager)
        cases = [
            (torch.cat, [cl, cl], [paged_cl, paged_cl], 0), (torch.cat, [cl, cl], [paged_cl, paged_cl], 1),
            (torch.cat, [cl, cl.contiguous()], [paged_cl, paged], 0), (torch.stack, [cl, cl], [paged_cl, paged_cl], 0),
            (torch.stack, [cl[:, 0], cl[:, 0]], [paged_cl[:, 0], paged_cl[:, 0]], 1),
        ]  # fmt: skip
        for op, dense_inputs, paged_inputs, dim in cases:
            shape = op(dense_inputs, dim).shape
            for make_out in (lambda: torch.empty(0), lambda: torch.zeros(3, 3), lambda: torch.zeros(shape)):
                dense_out, out = make_out(), make_out()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    op(dense_inputs, dim, out=dense_out)
                    assert op(paged_inputs, dim, out=out) is out
                assert out.stride() == dense_out.stride() and same_bits(out, dense_out), (op, dim)
        assert within_tier(pager)


def test_cat_skips_one_dimensional_empty_inputs_as_torch_does():
    with make_pager() as pager:
        x = torch.randn(64, 256)
        paged = PagedTensor.wrap(x.clone(), pager)
        empty = torch.empty(0, dtype=torch.float64)
        assert same_bits(torch.cat([empty, paged, empty, paged], dim=-1), torch.cat([empty, x, empty, x], dim=-1))
        assert within_tier(pager)


@st.composite
def pads(draw, shape: tuple[int, ...]) -> list[int]:
    """A ``pad`` for ``F.pad`` of a tensor of ``shape``: pairs for one to all of its dims, last dim
    first, each side positive, zero or negative (cutting up to all but one element)."""
    pairs = draw(st.integers(1, len(shape)))
    pad: list[int] = []
    for pair in range(pairs):
        size = shape[len(shape) - 1 - pair]
        before = draw(st.integers(-(size - 1) // 2, 3))
        after = draw(st.integers(-(size - 1) // 2, 3))
        pad += [before, after]
    return pad


@SETTINGS
@given(case=cases(), data=st.data(), seed=st.integers(0, 99))
def test_constant_pad_of_any_layout_gives_the_dense_result(case, data, seed):
    """``F.pad(t, pad, value=v)`` (constant_pad_nd; it raised DeviceTierFullError past the tier) of
    tensors of each layout, with positive, zero and negative pads and values of other kinds than the
    dtype's (NaN, a float for an integer tensor): the dense op's bits, shape and strides."""
    shape, dtype, layout, _ = case
    pad = data.draw(pads(shape), label="pad")
    value = data.draw(st.sampled_from([0, 1, -2.5, float("nan"), True]), label="value")
    if dtype in (torch.int64, torch.bool) and value != value:
        value = 3
    with make_pager() as pager:
        pair = paged_and_dense(pager, shape, dtype, layout, seed)
        result, expected = run_both(lambda t: torch.nn.functional.pad(t, pad, value=value), pair)
        assert same_bits(result, expected), (pad, value)
        assert within_tier(pager)


def test_copy_into_a_plain_tensor_of_another_layout_runs_in_parts():
    """``plain.copy_(paged)`` where one index of the paged table's outer dim spans more than a piece
    and the plain target is laid out otherwise (a column slice of a wider tensor, what ``F.pad``
    copies into): the pieces cannot follow both layouts, so the source goes a part at a time
    (it raised DeviceTierFullError); with a conversion to another dtype and broadcast along a new
    leading dim too. Values and strides as the dense copy's; the budget holds."""
    with make_pager() as pager:
        base = random_values((2, 8192), torch.float32, 5)  # 16 pages, each row 8 pages: more than a piece
        paged = PagedTensor.wrap(base.clone(), pager).t()
        for target_of in (lambda: torch.zeros(8192, 3)[:, 1:], lambda: torch.zeros(8192, 2, dtype=torch.float16),
                          lambda: torch.zeros(2, 8192, 2).transpose(1, 2).transpose(1, 2)):  # fmt: skip
            target, expected = target_of(), target_of()
            assert target.copy_(paged) is target
            expected.copy_(base.t())
            assert same_bits(target, expected)
            assert within_tier(pager)
        with pytest.raises(RuntimeError):  # torch's own error for a source that does not broadcast
            torch.zeros(8192, 3).copy_(paged)



TARGET_LAYOUTS = {  # a paged target's layout, over a base of the target's shape (transposed: of its reversed shape)
    "contiguous": lambda shape: (shape, lambda t: t),
    "transposed": lambda shape: (shape[::-1], lambda t: t.permute(*reversed(range(t.dim())))),
    "outer dim last": lambda shape: ((*shape[1:], shape[0]), lambda t: t.movedim(-1, 0)),
}


@SETTINGS
@given(case=cases(), target_layout=st.sampled_from(sorted(TARGET_LAYOUTS)), paged_source=st.booleans(),
       target_dtype=st.sampled_from(DTYPES), seed=st.integers(0, 99))  # fmt: skip
def test_copy_into_a_paged_tensor_of_any_layout_gives_the_dense_result(case, target_layout, paged_source, target_dtype, seed):
    """Property: ``paged.copy_(source)`` from a paged or plain source of any layout (transposed, a
    column slice, an offset view), into a paged target of another layout and dtype, gives the dense
    copy's bits, the device budget held. (Where one index of the outer dim spans more than a piece
    and the layouts differ, the pieces cannot follow both: it raised DeviceTierFullError.)"""
    shape, dtype, layout, _ = case
    with make_pager() as pager:
        source, dense_source = paged_and_dense(pager, shape, dtype, layout, seed, paged=paged_source)
        base_shape, view_of = TARGET_LAYOUTS[target_layout](shape)
        zeros = torch.zeros(base_shape, dtype=target_dtype)
        target, expected = view_of(PagedTensor.wrap(zeros.clone(), pager)), view_of(zeros.clone())
        assert target.copy_(source) is target
        expected.copy_(dense_source)
        assert same_bits(target.materialize(), expected)
        if paged_source:
            assert same_bits(source.materialize(), dense_source)
        assert within_tier(pager)


def test_a_channels_last_paged_weight_loads_and_converts_past_the_tier():
    """A channels-last conv weight paged past the tier, one index of its outer dim larger than the
    tier: ``load_state_dict`` from a contiguous checkpoint (``copy_`` between the two layouts) and
    ``t.to(memory_format=torch.contiguous_format)`` raised DeviceTierFullError; now the dense bits.
    A copy between views of one table that share pages keeps the pager's error."""
    with make_pager() as pager:
        conv = torch.nn.Conv2d(64, 2, 24, bias=False).to(memory_format=torch.channels_last)  # 288 KiB: 36 tier sizes
        checkpoint = {"weight": random_values((2, 64, 24, 24), torch.float32, 3)}
        conv.weight = torch.nn.Parameter(PagedTensor.wrap(conv.weight.detach().clone(), pager))
        conv.load_state_dict(checkpoint)
        weight = conv.weight.materialize()
        assert torch.equal(weight, checkpoint["weight"]) and weight.stride() == conv.weight.stride()
        converted = conv.weight.to(memory_format=torch.contiguous_format)
        assert isinstance(converted, PagedTensor) and converted.is_contiguous()
        assert same_bits(converted.materialize(), checkpoint["weight"])
        halves = conv.weight.to(torch.float16, memory_format=torch.contiguous_format)
        assert same_bits(halves.materialize(), checkpoint["weight"].half())
        assert within_tier(pager)
        square = PagedTensor.wrap(random_values((128, 128), torch.float32, 4), pager)
        with pytest.raises(DeviceTierFullError):
            square.copy_(square.t())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2, torch.int32, torch.int8], ids=str)
@pytest.mark.parametrize("view", ["contiguous", "transposed", "every other column"])
def test_a_conversion_past_the_tier_gives_the_dense_bits_of_nans_in_any_layout(view, dtype):
    """``t.to(dtype)`` and ``paged.copy_(t)`` into another dtype, of a float32 table with NaNs and
    infinities (finite values only for the integers) on a device tier of two pages, which holds no
    piece of both: the target goes a part of its pages at a time. torch's CPU kernels write a NaN
    converted to bfloat16 as 0xffff on a loop over two contiguous layouts, 0x7fc0 on a strided one;
    each part's source was first copied into a contiguous buffer of its dtype, so a transposed table
    or every other column converted between other layouts than the dense op's, with other NaN bits."""
    view_of = {"contiguous": lambda t: t, "transposed": lambda t: t.t(), "every other column": lambda t: t[:, ::2]}[view]
    dense = random_values((64, 96), torch.float32, 7) * 10  # 6 pages
    if dtype.is_floating_point:
        dense[::3, ::5], dense[1::7, ::3], dense[2::5, 1::4] = float("nan"), float("inf"), -float("inf")
    with make_pager(device_pages=2) as pager:
        paged = PagedTensor.wrap(dense.clone(), pager)
        assert same_bits(view_of(paged).to(dtype).materialize(), view_of(dense).to(dtype))
        zeros = torch.zeros(64, 96, dtype=dtype)
        target, expected = PagedTensor.wrap(zeros.clone(), pager), zeros.clone()
        view_of(target).copy_(view_of(paged))
        view_of(expected).copy_(view_of(dense))
        assert same_bits(target.materialize(), expected)
        assert pager.stats()["resident_bytes"]["device"] <= 2 * PAGE


@pytest.mark.parametrize("pad", [[1, 1, 1], [1, 1, 1, 1, 1, 1], [-200, -100], [0, 0, -65, 0]])
def test_bad_pads_raise_torchs_errors_before_any_page_is_read(pad):
    with make_pager() as pager:
        x = random_values((64, 256), torch.float32, 0)  # 16 pages
        paged = PagedTensor.wrap(x.clone(), pager)
        pager.evict_all()
        faults = pager.stats()["faults"]
        with pytest.raises(Exception) as dense_error:
            torch.nn.functional.pad(x, pad)
        with pytest.raises(type(dense_error.value)) as paged_error:
            torch.nn.functional.pad(paged, pad)
        assert str(paged_error.value) == str(dense_error.value)
        assert pager.stats()["faults"] == faults


@st.composite
def differences(draw):
    """A case and where its second tensor differs: ``None`` (equal), an index, or NaNs at an index in both."""
    shape, dtype, layout, large = draw(cases())
    numel = 1
    for size in shape:
        numel *= size
    index = draw(st.integers(0, numel - 1) | st.just(numel - 1))
    kind = draw(st.sampled_from(["equal", "one element", "nan"] if dtype.is_floating_point else ["equal", "one element"]))
    return shape, dtype, layout, kind, index


def changed(t: torch.Tensor, kind: str, index: int) -> torch.Tensor:
    """A plain contiguous copy of ``t`` with the change ``kind`` at flat ``index`` (``"equal"``: none)."""
    copy = t.contiguous().clone()
    flat = copy.view(-1)
    if kind == "one element":
        flat[index] = (~flat[index]) if copy.dtype == torch.bool else flat[index] + 1
    elif kind == "nan":
        flat[index] = float("nan")
    return copy


def paged_with_values(pager: Pager, values: torch.Tensor, layout: str, seed: int) -> PagedTensor:
    """A PagedTensor view of ``layout`` holding ``values``."""
    base, view_of = with_layout(tuple(values.shape), values.dtype, layout, seed)
    view_of(base).copy_(values)
    return view_of(PagedTensor.wrap(base, pager))


@SETTINGS
@given(difference=differences(), other_layout=st.sampled_from(LAYOUTS), seed=st.integers(0, 99))
def test_equal_and_allclose_give_torchs_answer(difference, other_layout, seed):
    """Equal tensors, tensors differing in one element (the last one too) and NaNs at one index of both."""
    shape, dtype, layout, kind, index = difference
    with make_pager() as pager:
        values = changed(random_values(shape, dtype, seed), "nan" if kind == "nan" else "equal", index)
        other = changed(values, "one element" if kind == "one element" else "equal", index)
        a, b = paged_with_values(pager, values, layout, seed), paged_with_values(pager, other, other_layout, seed + 1)
        assert torch.equal(a, b) is torch.equal(values, other)
        assert torch.equal(a, a) is torch.equal(values, values)
        assert torch.equal(a, other) is torch.equal(values, other)
        assert torch.equal(other, a) is torch.equal(other, values)
        if dtype.is_floating_point:
            for equal_nan in (False, True):
                assert torch.allclose(a, b, equal_nan=equal_nan) is torch.allclose(values, other, equal_nan=equal_nan)
        assert within_tier(pager)


def test_equal_of_other_shapes_or_dtypes_is_torchs_answer():
    with make_pager() as pager:
        x = torch.randn(64, 256)
        paged = PagedTensor.wrap(x.clone(), pager)
        assert torch.equal(paged, PagedTensor.wrap(x.reshape(128, 128).clone(), pager)) is False
        assert torch.equal(paged, x.double()) is torch.equal(x, x.double())
        assert torch.equal(paged, PagedTensor.wrap(x.half(), pager)) is torch.equal(x, x.half())
        with pytest.raises(RuntimeError) as dense_error:
            torch.allclose(x, x.double())
        with pytest.raises(type(dense_error.value), match=str(dense_error.value)):
            torch.allclose(paged, x.double())
        assert within_tier(pager)


@pytest.mark.parametrize(
    "op, shapes",
    [(lambda ts: torch.cat(ts), ((64, 256), (64, 255))), (lambda ts: torch.cat(ts, dim=1), ((64, 256), (63, 256))),
     (lambda ts: torch.stack(ts), ((64, 256), (64, 255))), (lambda ts: torch.cat(ts, dim=2), ((64, 256), (64, 256)))],
)  # fmt: skip
def test_bad_inputs_raise_torchs_errors_and_leave_nothing_allocated(op, shapes):
    with make_pager() as pager:
        dense = [torch.randn(shape) for shape in shapes]
        paged = [PagedTensor.wrap(t.clone(), pager) for t in dense]
        allocations = pager.stats()["allocations"]
        with pytest.raises(Exception) as dense_error:
            op(dense)
        with pytest.raises(type(dense_error.value)) as paged_error:
            op(paged)
        assert str(paged_error.value) == str(dense_error.value)
        assert pager.stats()["allocations"] == allocations
        assert within_tier(pager)


def test_small_tensors_keep_the_generic_path():
    """Tensors that fit in a piece run the op at once, as before (one window, no parts)."""
    with make_pager() as pager:
        x = torch.randn(8, 16)
        paged = PagedTensor.wrap(x.clone(), pager)
        assert same_bits(paged.t().contiguous(), x.t().contiguous())
        assert same_bits(torch.cat([paged, paged], dim=1), torch.cat([x, x], dim=1))
        assert torch.equal(paged, paged) and torch.allclose(paged, x)


@pytest.mark.gpu
def test_gpu_cat_clone_and_equal_run_in_pieces_on_cuda():
    """On CUDA: a ``cat``, a ``clone`` to another layout, an ``equal`` and a constant pad over
    tensors four times the device tier give the dense op's result."""
    x = torch.randn(128, 256, generator=torch.Generator().manual_seed(7)).cuda()  # 32 pages of 4 KiB
    y = torch.randn(128, 256, generator=torch.Generator().manual_seed(8)).cuda()
    with make_pager("cuda") as pager:
        paged_x, paged_y = PagedTensor.wrap(x.clone(), pager), PagedTensor.wrap(y.clone(), pager)
        assert same_bits(torch.cat([paged_x, paged_y], dim=1), torch.cat([x, y], dim=1))
        assert same_bits(paged_x.t().contiguous(), x.t().contiguous())
        assert torch.equal(paged_x, paged_x) and not torch.equal(paged_x, paged_y)
        assert torch.equal(paged_x, x)
        assert same_bits(torch.nn.functional.pad(paged_x.t(), (2, -3, 1, 1), value=float("nan")),
                         torch.nn.functional.pad(x.t(), (2, -3, 1, 1), value=float("nan")))  # fmt: skip
        out, dense_out = PagedTensor.wrap(torch.zeros(256, 128, device="cuda"), pager).t(), torch.zeros(256, 128, device="cuda").t()
        torch.cat([paged_x[:, :128], paged_y[:, 128:]], dim=1, out=out)  # into a transposed paged out
        torch.cat([x[:, :128], y[:, 128:]], dim=1, out=dense_out)
        assert same_bits(out.materialize(), dense_out)
        stacked = PagedTensor.wrap(torch.zeros(2, 128, 256, device="cuda"), pager)
        torch.stack([paged_x, paged_y.half()], out=stacked)
        assert same_bits(stacked.materialize(), torch.stack([x, y.half()]))
        rows = PagedTensor.wrap(x[3:4].expand(128, 256).contiguous(), pager)
        assert torch.allclose(rows, x[3]) and not torch.allclose(paged_x, x[3])  # a row broadcast to the table
        assert within_tier(pager)


def complex_bits(t: torch.Tensor) -> torch.Tensor:
    """The bits of a complex tensor's values (its real view resolved), to compare exactly."""
    return torch.view_as_real(t.resolve_conj().resolve_neg()).contiguous().view(torch.int32 if t.dtype == torch.complex64 else torch.int64)


CONJUGATE_VIEW_OPS = {
    "clone": lambda v: v.clone(),
    "resolve": lambda v: v.resolve_conj().resolve_neg(),
    "mul": lambda v: v * 2,
    "add_views": lambda v: v + v,
    "abs": lambda v: v.abs(),
    "angle": lambda v: v.angle(),
}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("view", ["conj", "neg", "conj_of_transposed"])
@pytest.mark.parametrize("name", sorted(CONJUGATE_VIEW_OPS))
def test_ops_on_conjugate_and_negative_views_past_the_tier_equal_dense(device, view, name):
    """torch's conjugate and negative fallbacks clone such a view (resolved) before an op that does
    not take the bit: past the tier that clone raised DeviceTierFullError (its copy a part at a time
    refused views with the bits), so ``t.conj() * 2``, ``t.conj().abs()`` and ``_neg_view(t).add_(1)``
    did not run on a table larger than the tier. Now bitwise equal to dense, shape and strides too."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (runs on the GPU machine: benchmarks/gpu_suite.sh)")
    x = random_values((96, 64), torch.float32, 0).to(device) + 1j * random_values((96, 64), torch.float32, 1).to(device)  # 48 KiB
    as_view = {"conj": torch.conj, "neg": torch._neg_view, "conj_of_transposed": lambda t: t.t().conj()}[view]
    with make_pager(device) as pager:
        t = PagedTensor.wrap(x.clone(), pager)
        got, expected = CONJUGATE_VIEW_OPS[name](as_view(t)), CONJUGATE_VIEW_OPS[name](as_view(x))
        assert type(got) is torch.Tensor and got.dtype == expected.dtype and got.shape == expected.shape
        assert got.stride() == expected.stride() and got.is_conj() == expected.is_conj() and got.is_neg() == expected.is_neg()
        if got.is_complex():
            assert torch.equal(complex_bits(got), complex_bits(expected))
        else:
            assert same_bits(got, expected)
        assert within_tier(pager)
        written = as_view(t).add_(1)  # in place on the view: the fallback's clone, the op, a copy back through the bit
        assert torch.equal(complex_bits(t.materialize()), complex_bits(_added_through(x, view)))
        assert written is not None and within_tier(pager)


def _added_through(x: torch.Tensor, view: str) -> torch.Tensor:
    """``x`` after ``as_view(x).add_(1)``: the view's values plus 1, written back through its bit."""
    y = x.clone()
    {"conj": torch.conj, "neg": torch._neg_view, "conj_of_transposed": lambda t: t.t().conj()}[view](y).add_(1)
    return y


def test_a_copy_kept_out_by_another_threads_pins_raises_and_runs_once_they_go():
    """copy_ a part at a time re-enters copy_ for each part; where another thread's pins keep even a
    part out (pin_wait_s=0: no wait), the part was cut again into itself until RecursionError. Now the
    pager's DeviceTierFullError, for a plain and a paged target, and the copy runs once the pins go."""
    import threading

    pager = Pager(MemoryConfig(vram_limit=4 * PAGE, host_memory=64 * PAGE, page_size=PAGE, pin_wait_s=0, prefetch_strategy="none",
                               device="cpu"))  # fmt: skip
    with pager:
        held = PagedTensor.wrap(torch.zeros(3 * 1024), pager)  # 3 pages
        values = torch.arange(4 * 1024.0)
        table = PagedTensor.wrap(values.clone(), pager)  # 4 pages: the whole tier
        target = PagedTensor.wrap(torch.zeros(2, 2048), pager)
        pinned, done = threading.Event(), threading.Event()

        def hold() -> None:
            with pager.ensure_resident(held.allocation, 0, 3):
                pinned.set()
                done.wait(30)

        thread = threading.Thread(target=hold, daemon=True)
        thread.start()
        pinned.wait(30)
        try:
            with pytest.raises(DeviceTierFullError):
                torch.empty(4 * 1024).copy_(table)
            with pytest.raises(DeviceTierFullError):
                target.copy_(table.view(2048, 2).t())
        finally:
            done.set()
            thread.join(30)
        dense = torch.empty(4 * 1024)
        assert torch.equal(dense.copy_(table), values)
        assert torch.equal(target.copy_(table.view(2048, 2).t()).materialize(), values.view(2048, 2).t())


@pytest.mark.parametrize("op", [torch.cat, torch.stack])
def test_cat_and_stack_past_the_tier_refuse_the_promotions_torch_refuses(op):
    """``cat``/``stack`` of a table larger than the device tier with a tensor whose dtype torch will
    not promote with its (uint16/32/64 with other ints, float8 with anything else) raise torch's
    error, as the dense op and the same call within the tier do: they took the dtype the meta kernel
    promotes to and converted into it (an int8 -5 came out a uint16 65531)."""
    cases = [(torch.uint16, torch.int8), (torch.uint32, torch.int64), (torch.float8_e4m3fn, torch.float32), (torch.float32, torch.float8_e5m2)]
    with make_pager() as pager:
        for table_dtype, other_dtype in cases:
            table = torch.arange(8 * PAGE, dtype=torch.float32).remainder(200).to(table_dtype).reshape(-1, 64)  # more than the tier
            other = torch.full((1 if op is torch.cat else table.shape[0], 64), -5).to(other_dtype)
            if op is torch.stack:
                other = other.expand(table.shape).contiguous()
            with pytest.raises(RuntimeError, match="Promotion for") as dense_error:
                op([table, other])
            with pytest.raises(RuntimeError, match="Promotion for") as paged_error:
                op([PagedTensor.wrap(table, pager), other])
            assert str(paged_error.value) == str(dense_error.value)
        same = torch.arange(8 * PAGE).remainder(200).to(torch.uint16).reshape(-1, 64)  # one dtype: no promotion
        assert same_bits(op([PagedTensor.wrap(same, pager), same]), op([same, same]))


@SETTINGS
@given(rows=st.integers(20, 80), width=st.integers(100, 300), broadcast=st.sampled_from(["row", "column", "scalar"]),
       paged_other=st.booleans(), flip=st.booleans(), kind=st.sampled_from(["equal", "one element", "nan"]), seed=st.integers(0, 99))  # fmt: skip
def test_allclose_broadcasting_a_smaller_tensor_gives_torchs_answer(rows, width, broadcast, paged_other, flip, kind, seed):
    """``allclose`` of a PagedTensor larger than a piece and a tensor broadcast to its shape (a row, a
    column, one element; paged or plain; on either side): torch's answer, within the tier."""
    with make_pager() as pager:
        small_shape = {"row": (width,), "column": (rows, 1), "scalar": (1, 1)}[broadcast]
        small = random_values(small_shape, torch.float32, seed)
        values = changed(small.expand(rows, width), "nan" if kind == "nan" else "equal", seed % (rows * width))
        values = changed(values, "one element" if kind == "one element" else "equal", (seed * 7) % (rows * width))
        large = PagedTensor.wrap(values.clone(), pager)
        other = PagedTensor.wrap(small.clone(), pager) if paged_other else small
        for equal_nan in (False, True):
            pairs = ((other, large), (small, values)) if flip else ((large, other), (values, small))
            assert torch.allclose(*pairs[0], equal_nan=equal_nan) is torch.allclose(*pairs[1], equal_nan=equal_nan)
        assert within_tier(pager)


def test_allclose_of_shapes_that_do_not_broadcast_raises_torchs_error():
    with make_pager() as pager:
        x = torch.randn(64, 256)
        paged = PagedTensor.wrap(x.clone(), pager)
        faults = pager.stats()["faults"]
        with pytest.raises(RuntimeError) as dense_error:
            torch.allclose(x, x[0, :7])
        with pytest.raises(RuntimeError) as paged_error:
            torch.allclose(paged, x[0, :7])
        assert str(paged_error.value) == str(dense_error.value)
        assert pager.stats()["faults"] == faults


@SETTINGS
@given(rows=st.lists(st.integers(0, 63), min_size=1, max_size=40), stack=st.booleans(), row_elements=st.sampled_from([64, 256, 512]))
@example(rows=list(range(0, 36, 4)), stack=True, row_elements=256)  # 9 rows of 1 KiB, one on each of 9 pages: raised DeviceTierFullError
@example(rows=[*range(8), 32], stack=False, row_elements=256)  # 3 pages reached, 9 spanned: side-by-side rows' shared pages were counted once a row
def test_cat_and_stack_of_rows_on_more_pages_than_the_tier_give_the_dense_result(rows, stack, row_elements):
    """``stack``/``cat`` of a table's rows (what ``default_collate`` runs for a shuffled DataLoader):
    few bytes, but on more pages in all than the device tier holds. The dense result, within the
    tier: the rows go a piece at a time (it went by bytes alone and ran them at once)."""
    with make_pager() as pager:
        x = torch.randn(64, row_elements, generator=torch.Generator().manual_seed(len(rows)))
        table = PagedTensor.wrap(x.clone(), pager)
        op = torch.stack if stack else torch.cat
        assert same_bits(op([table[i] for i in rows]), op([x[i] for i in rows]))
        assert within_tier(pager)


@pytest.mark.parametrize("op", [lambda ts: torch.cat(ts), lambda ts: torch.stack(ts), lambda ts: torch.cat(ts, out=torch.empty(128, 256, device="meta"))])
def test_cat_and_stack_past_the_tier_beside_another_device_raise_torchs_device_error(op):
    """An input (or ``out``) on another device beside a PagedTensor larger than the tier: torch's own
    device error, as the dense op raises (it raised DeviceTierFullError, reaching for every page)."""
    x = torch.randn(64, 256)
    with make_pager() as pager:
        paged = PagedTensor.wrap(x.clone(), pager)
        faults = pager.stats()["faults"]
        with pytest.raises(RuntimeError) as dense_error:
            op([x, x.to("meta")])
        with pytest.raises(RuntimeError) as paged_error:
            op([paged, x.to("meta")])
        assert type(paged_error.value) is type(dense_error.value) and str(paged_error.value) == str(dense_error.value)
        assert pager.stats()["faults"] == faults


def _torchs_outcome(run: Callable[[], object]) -> str:
    """``"ok"`` or the message of the RuntimeError ``run`` raises (the pager's "PagedTensor: <op>: " prefix dropped)."""
    try:
        run()
    except RuntimeError as error:
        return str(error).split(": ", 2)[-1] if str(error).startswith("PagedTensor:") else str(error)
    return "ok"


@pytest.mark.parametrize(
    "case",
    ["cat into an out whose first rows an input views", "cat into an out overlapping an input", "stack into an expanded out", "cat into an expanded out"],
)
def test_cat_and_stack_past_the_tier_into_an_overlapping_plain_out_raise_torchs_error(case):
    """A plain ``out`` sharing memory with a plain input, or reaching an element twice (an expanded
    tensor), raises torch's overlap error past the tier as when the inputs fit, before anything is
    written: the pieces would write rows of ``out`` a later piece reads as an input."""
    values = torch.randn(64, 256)
    with make_pager() as pager:
        paged = PagedTensor.wrap(values.clone(), pager)

        def run(first: torch.Tensor) -> tuple[str, torch.Tensor]:
            buffer = torch.arange(80 * 256.0).view(80, 256)
            if case == "cat into an out whose first rows an input views":
                return _torchs_outcome(lambda: torch.cat([first, buffer[:16]], out=buffer)), buffer
            if case == "cat into an out overlapping an input":
                return _torchs_outcome(lambda: torch.cat([first, buffer[40:56]], out=buffer)), buffer
            if case == "stack into an expanded out":
                out = torch.zeros(64, 256).expand(2, 64, 256)
                return _torchs_outcome(lambda: torch.stack([first, first], out=out)), out[0]
            out = torch.zeros(256).expand(128, 256)
            return _torchs_outcome(lambda: torch.cat([first, first], out=out)), out[0]

        expected, expected_buffer = run(values)
        got, buffer = run(paged)
        assert expected != "ok" and got == expected
        assert torch.equal(buffer, expected_buffer)  # nothing written


def test_copy_past_the_tier_into_an_expanded_plain_target_raises_torchs_error():
    """``plain.expand(4, n).copy_(paged)``, a source row wider than a piece: torch's internal-overlap
    error, as for plain tensors, where the parts (a row each) used to be written one after another."""
    values = torch.randn(4, 8192)  # a row is 8 pages, past a piece of the 8-page tier
    with make_pager() as pager:
        paged = PagedTensor.wrap(values.clone(), pager)
        expected = _torchs_outcome(lambda: torch.zeros(8192).expand(4, 8192).copy_(values))
        target = torch.zeros(8192)
        assert expected != "ok" and _torchs_outcome(lambda: target.expand(4, 8192).copy_(paged)) == expected
        assert not target.any()
