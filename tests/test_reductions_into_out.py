"""Reductions with ``out=`` whose source and outputs together do not fit on the device tier: the
order-free reductions (``max``, ``min``, ``amax``/``amin``, ``aminmax``, ``argmax``/``argmin``,
``any``, ``all``, ``count_nonzero``, integer and bool ``sum``) of a source past the tier, and any
``sum`` whose source fits but whose outputs do not (a bool sum into int64 takes 8 bytes an element),
write the dense op's values into their outputs, plain or paged, and return them; the device tier
never goes over its budget. A float sum of a source past the tier still raises the pager's error."""

from __future__ import annotations

import warnings
from typing import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedtensor import MemoryConfig, OutOfPagesError, PagedTensor, Pager
from tests.test_reductions_in_pieces import (
    SETTINGS,
    TIER_BYTES,
    dim_layout,
    dim_shapes,
    dim_values,
    make_pager,
    same_result,
    within_tier,
)

aten = torch.ops.aten
Dims = tuple[int, ...]
Outs = tuple[torch.Tensor, ...]
INTEGRAL = (torch.int64, torch.int32, torch.uint8, torch.bool)
DTYPES = (torch.float32, torch.float16, torch.bfloat16, *INTEGRAL)
LAYOUTS = ("contiguous", "transposed", "column slice", "row steps", "expanded")


def _integral(dtype: torch.dtype) -> bool:
    return not dtype.is_floating_point


def _anything(dtype: torch.dtype) -> bool:
    return True


def _not_bool(dtype: torch.dtype) -> bool:
    return dtype != torch.bool


# name: (the functional op, giving the outputs' layouts; the op with out=; whether it applies to a
# dtype; whether it takes several dims)
OUT_FORMS: dict[str, tuple[Callable[[torch.Tensor, Dims, bool], object], Callable[[torch.Tensor, Dims, bool, Outs], object], Callable[[torch.dtype], bool], bool]] = {
    "max": (lambda t, d, k: t.max(), lambda t, d, k, o: torch.max(t, out=o[0]), _anything, False),
    "min": (lambda t, d, k: t.min(), lambda t, d, k, o: torch.min(t, out=o[0]), _anything, False),
    "max(dim)": (lambda t, d, k: t.max(d[0], k), lambda t, d, k, o: torch.max(t, d[0], k, out=o), _anything, False),
    "min(dim)": (lambda t, d, k: t.min(d[0], k), lambda t, d, k, o: torch.min(t, d[0], k, out=o), _anything, False),
    "amax(dims)": (lambda t, d, k: t.amax(d, k), lambda t, d, k, o: torch.amax(t, d, k, out=o[0]), _anything, True),
    "amin(dims)": (lambda t, d, k: t.amin(d, k), lambda t, d, k, o: torch.amin(t, d, k, out=o[0]), _anything, True),
    "argmax": (lambda t, d, k: t.argmax(), lambda t, d, k, o: torch.argmax(t, out=o[0]), _not_bool, False),
    "argmin(dim)": (lambda t, d, k: t.argmin(d[0], k), lambda t, d, k, o: torch.argmin(t, d[0], k, out=o[0]), _not_bool, False),
    "aminmax": (lambda t, d, k: torch.aminmax(t), lambda t, d, k, o: torch.aminmax(t, out=o), _anything, False),
    "aminmax(dim=)": (lambda t, d, k: torch.aminmax(t, dim=d[0], keepdim=k),
                      lambda t, d, k, o: torch.aminmax(t, dim=d[0], keepdim=k, out=o), _anything, False),  # fmt: skip
    "any": (lambda t, d, k: t.any(), lambda t, d, k, o: torch.any(t, out=o[0]), _anything, False),
    "all(dim)": (lambda t, d, k: t.all(d[0], k), lambda t, d, k, o: torch.all(t, d[0], k, out=o[0]), _anything, False),
    "any(dims)": (lambda t, d, k: t.any(d, k), lambda t, d, k, o: torch.any(t, d, k, out=o[0]), _anything, True),
    "all(dims)": (lambda t, d, k: t.all(d, k), lambda t, d, k, o: torch.all(t, d, k, out=o[0]), _anything, True),
    "sum(dims)": (lambda t, d, k: t.sum(d, k), lambda t, d, k, o: torch.sum(t, d, k, out=o[0]), _integral, True),
    "sum(dims) into int32": (lambda t, d, k: t.sum(d, k, dtype=torch.int32), lambda t, d, k, o: torch.sum(t, d, k, out=o[0]), _integral, True),
    "sum(dim=None)": (lambda t, d, k: t.sum(None, k), lambda t, d, k, o: torch.sum(t, None, k, out=o[0]), _integral, False),
    "sum.out": (lambda t, d, k: t.sum(), lambda t, d, k, o: aten.sum.out(t, out=o[0]), _integral, False),
    "count_nonzero": (lambda t, d, k: torch.count_nonzero(t), lambda t, d, k, o: aten.count_nonzero.out(t, out=o[0]), _anything, False),
    "count_nonzero(dims)": (lambda t, d, k: torch.count_nonzero(t, d),
                            lambda t, d, k, o: aten.count_nonzero.dim_IntList_out(t, list(d), out=o[0]), _anything, True),  # fmt: skip
}
NAN_AS_VALUE = {"max", "min", "aminmax", "max(dim)", "min(dim)", "aminmax(dim=)", "amax(dims)", "amin(dims)"}


def dense_of(t: torch.Tensor) -> torch.Tensor:
    return t.materialize() if isinstance(t, PagedTensor) else t


def outputs_like(results: object, paged: tuple[bool, ...], pager) -> Outs:
    """Outputs of the results' shapes and dtypes, filled with a value no result holds everywhere
    (7, or True), each a PagedTensor where ``paged`` says so."""
    results = results if isinstance(results, tuple) else (results,)
    outs = []
    for result, is_paged in zip(results, paged):
        out = torch.full(result.shape, 7, dtype=result.dtype, device=result.device)
        outs.append(PagedTensor.wrap(out, pager) if is_paged and pager is not None else out)
    return tuple(outs)


def check_into_out(name: str, dense_base: torch.Tensor, view_of: Callable, dims: Dims, keepdim: bool, paged_outs: tuple[bool, ...]) -> None:
    """The op with out= on a paged view of ``dense_base`` writes into its outputs (paged where
    ``paged_outs`` says) what it writes on the dense view, returns those outputs, and keeps the
    device tier within its budget."""
    functional, with_out, _, _ = OUT_FORMS[name]
    dense = view_of(dense_base)
    expected_outs = outputs_like(functional(dense, dims, keepdim), (False,) * 2, None)
    expected = with_out(dense, dims, keepdim, expected_outs)
    with make_pager() as pager:
        paged = view_of(PagedTensor.wrap(dense_base.clone(), pager))
        outs = outputs_like(functional(dense, dims, keepdim), paged_outs, pager)
        got = with_out(paged, dims, keepdim, outs)
        returned = got if isinstance(got, tuple) else (got,)
        assert len(returned) == len(outs) and all(r is o for r, o in zip(returned, outs)), f"{name}: returns its outputs"
        written = tuple(dense_of(out) for out in outs)
        want = expected if isinstance(expected, tuple) else (expected,)
        assert same_result(written, tuple(want), nan_as_value=name in NAN_AS_VALUE), (name, dims, keepdim)
        assert within_tier(pager)


@st.composite
def out_cases(draw) -> tuple:
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(dim_shapes(dtype, draw(st.booleans() | st.just(True))))
    name = draw(st.sampled_from([name for name, (_, _, applies, _) in OUT_FORMS.items() if applies(dtype)]))
    ndim = len(shape)
    if OUT_FORMS[name][3]:
        dims = tuple(draw(st.lists(st.integers(-ndim, ndim - 1), min_size=1, max_size=ndim, unique_by=lambda d: d % ndim)))
    else:
        dims = (draw(st.integers(-ndim, ndim - 1)),)
    specials = draw(st.sampled_from([0, 0, 1, 3])) if dtype.is_floating_point else 0
    layout = draw(st.sampled_from(LAYOUTS))
    kind = draw(st.sampled_from(["ties", "ties", "constant"]))
    return shape, dtype, layout, kind, specials, name, dims, draw(st.booleans()), (draw(st.booleans()), draw(st.booleans()))


@settings(SETTINGS, max_examples=150)
@given(case=out_cases(), seed=st.integers(0, 99))
def test_reductions_into_out_write_the_dense_values(case, seed):
    shape, dtype, layout, kind, specials, name, dims, keepdim, paged_outs = case
    base, view_of = dim_layout(dim_values(shape, dtype, kind, specials, seed), layout)
    check_into_out(name, base, view_of, dims, keepdim, paged_outs)


@pytest.mark.parametrize("paged_outs", [(True, True), (False, False), (True, False)])
@pytest.mark.parametrize("name", OUT_FORMS)
def test_every_out_form_runs_past_the_tier(name, paged_outs):
    """Each out= form on a 16-page source of an 8-page tier (ties, NaNs and infinities), along
    each of its dims or sets of dims, keepdim or not, into paged or plain outputs."""
    applies = OUT_FORMS[name][2]
    dtype = torch.float32 if applies(torch.float32) else torch.int64
    values = dim_values((32, 8, 128 // dtype.itemsize * 4), dtype, "ties", 40, seed=5)
    base, view_of = dim_layout(values, "transposed")
    for dims in ([(0,), (2, 0), (-1, 1)] if OUT_FORMS[name][3] else [(0,), (1,), (-1,)]):
        for keepdim in (False, True):
            check_into_out(name, base, view_of, dims, keepdim, paged_outs)


def test_the_bool_sum_the_random_programs_found():
    """The program the random-program property test found (a fresh-clone CI run): a bool table of
    2 pages, sliced and unsqueezed, summed along dim 0 into a paged int64 output of 8 pages on an
    8-page tier: it raised DeviceTierFullError."""
    table = (torch.arange(2 * 64 * 64) % 3 == 0).reshape(2, 64, 64)
    expected = torch.sum(table[1:].unsqueeze(1), 0)
    with make_pager() as pager:
        paged = PagedTensor.wrap(table.clone(), pager)[1:].unsqueeze(1)
        out = PagedTensor.wrap(torch.full((1, 64, 64), 9, dtype=torch.int64), pager)
        assert out.nbytes == TIER_BYTES
        assert torch.sum(paged, 0, out=out) is out
        assert torch.equal(out.materialize(), expected)
        plain = torch.full((1, 64, 64), 9, dtype=torch.int64)
        assert torch.sum(paged, 0, out=plain) is plain and torch.equal(plain, expected)
        assert within_tier(pager)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_float_sum_into_a_wider_output_past_the_tier_gives_the_same_bits(dtype):
    """A 6-page half-precision source summed along dim 0 into a 6-page float32 output laid out
    transposed: the source fits alone, so the op's own kernel runs into a plain output laid out as
    the paged one, then is copied into it: the dense op's bits."""
    source = torch.randn(2, 96, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    expected = torch.full((64, 96), 7.0).t()
    torch.sum(source, 0, out=expected)
    with make_pager() as pager:
        out = PagedTensor.wrap(torch.full((64, 96), 7.0), pager).t()
        assert torch.sum(PagedTensor.wrap(source.clone(), pager), 0, out=out) is out
        assert same_result(out.materialize(), expected)
        assert within_tier(pager)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int64])
@pytest.mark.parametrize("op", [torch.any, torch.all])
def test_any_and_all_into_a_uint8_output_past_the_tier_reduce_the_source_cast_to_uint8(op, dtype):
    """torch's uint8 out= kernel of any/all reduces the source cast to uint8 (0.25 is 0, 256 is 0):
    past the tier the values were those of the bool reduction."""
    source = torch.tensor([0.25, 256.0, 1.0, 0.0, -3.5]).to(dtype).repeat(3, 2000)
    source[1, ::2] = 2
    with make_pager() as pager:
        paged = PagedTensor.wrap(source.clone(), pager)
        for call in (lambda t, o: op(t, 0, out=o[0]), lambda t, o: op(t, out=o[0, 0])):
            expected, out = torch.full((1, 10000), 7, dtype=torch.uint8), torch.full((1, 10000), 7, dtype=torch.uint8)
            call(source, expected)
            call(paged, out)
            assert torch.equal(out, expected)
        assert within_tier(pager)


def test_a_float_sum_of_a_source_past_the_tier_still_raises():
    """A float sum's bits depend on its order: a source past the tier raises the pager's error,
    naming the out= op, and the output keeps its values."""
    with make_pager() as pager:
        source = PagedTensor.wrap(torch.randn(64, 256), pager)
        for out in (torch.full((256,), 7.0), PagedTensor.wrap(torch.full((256,), 7.0), pager)):
            with pytest.raises(OutOfPagesError, match="aten.sum.IntList_out"):
                torch.sum(source, 0, out=out)
            assert torch.equal(dense_of(out), torch.full((256,), 7.0))
        assert within_tier(pager)


def test_outputs_of_another_shape():
    """A plain output of another shape is resized as torch resizes it (with its warning); a paged one
    raises NotImplementedError naming the shapes, and keeps its values."""
    integers = torch.randint(0, 9, (64, 256), generator=torch.Generator().manual_seed(2))
    with make_pager() as pager:
        source = PagedTensor.wrap(integers.clone(), pager)
        plain = torch.zeros(5, dtype=torch.int64)
        with pytest.warns(UserWarning, match="resized") as record:
            torch.sum(source, 0, out=plain)
        assert len(record) == 1
        assert torch.equal(plain, integers.sum(0))
        for reduce in (lambda t, out: torch.argmax(t, 0, out=out[0]), lambda t, out: torch.max(t, 0, out=out)):
            outs = (torch.zeros(3, dtype=torch.int64), torch.zeros(3, dtype=torch.int64))
            dense_outs = tuple(out.clone() for out in outs)
            with warnings.catch_warnings(record=True) as dense_record:
                warnings.simplefilter("always")
                reduce(integers, dense_outs)
            with warnings.catch_warnings(record=True) as paged_record:  # it warned twice: torch's C++ warning, then its own
                warnings.simplefilter("always")
                reduce(source, outs)
            assert sum("resized" in str(w.message) for w in paged_record) == sum("resized" in str(w.message) for w in dense_record) >= 1
            assert all(torch.equal(a, b) and a.stride() == b.stride() for a, b in zip(outs, dense_outs))
        paged = PagedTensor.wrap(torch.full((5,), 7), pager)
        with pytest.raises(NotImplementedError, match=r"would resize its PagedTensor output from \[5\] to \[256\]"):
            torch.sum(source, 0, out=paged)
        assert torch.equal(paged.materialize(), torch.full((5,), 7))
        assert within_tier(pager)


def test_torchs_errors_come_first():
    """A wrong output dtype or a dim out of range raises torch's own error, not the pager's."""
    floats = torch.randn(64, 256)
    with make_pager() as pager:
        source = PagedTensor.wrap(floats.clone(), pager)
        with pytest.raises(RuntimeError, match="Expected the dtype for input and out to match"):
            torch.amax(source, 0, out=torch.empty(256, dtype=torch.float64))
        with pytest.raises(RuntimeError, match="any only supports bool tensor for result"):
            torch.any(source, 0, out=PagedTensor.wrap(torch.zeros(256, dtype=torch.int64), pager))
        with pytest.raises(IndexError):
            torch.argmax(source, 2, out=torch.empty(64, dtype=torch.int64))
        assert within_tier(pager)


def test_an_output_sharing_the_sources_pages_raises_the_pagers_error():
    """An output that is a view of the source past the tier: torch's overlap rules are the generic
    way's (which cannot run here), so the pager's error is raised and no byte changes."""
    integers = torch.randint(0, 9, (64, 256), generator=torch.Generator().manual_seed(3))
    with make_pager() as pager:
        source = PagedTensor.wrap(integers.clone(), pager)
        with pytest.raises(OutOfPagesError, match="aten.sum.IntList_out"):
            torch.sum(source, 0, out=source[0])
        assert torch.equal(source.materialize(), integers)


@pytest.mark.gpu
def test_gpu_reductions_into_out_run_past_the_tier():
    """On CUDA: each out= form of a 32-page source on an 8-page tier, into paged and plain outputs,
    and the bool sum into a paged int64 output: the dense op's values, the tier within budget."""
    values = dim_values((128, 256), torch.float32, "ties", 8, seed=7)
    integers = torch.randint(-(2**62), 2**62, (128, 256), generator=torch.Generator().manual_seed(9))
    mask = torch.rand(2, 64, 64, generator=torch.Generator().manual_seed(10)) > 0.5
    with make_pager("cuda") as pager:
        for name, (functional, with_out, applies, several) in OUT_FORMS.items():
            dense = (values if applies(torch.float32) else integers).cuda()
            for dims in ((0,), (-1,), (0, 1)) if several else ((0,), (-1,)):
                for paged_outs in ((True, True), (False, False)):
                    outs = outputs_like(functional(dense, dims, False), paged_outs, pager)
                    expected_outs = outputs_like(functional(dense, dims, False), (False, False), None)
                    want = with_out(dense, dims, False, expected_outs)
                    got = with_out(PagedTensor.wrap(dense.clone(), pager), dims, False, outs)
                    got = got if isinstance(got, tuple) else (got,)
                    want = want if isinstance(want, tuple) else (want,)
                    assert same_result(tuple(dense_of(g) for g in got), want, nan_as_value=name in NAN_AS_VALUE), (name, dims)
        out = PagedTensor.wrap(torch.zeros(1, 64, 64, dtype=torch.int64, device="cuda"), pager)
        torch.sum(PagedTensor.wrap(mask.cuda(), pager)[1:].unsqueeze(1), 0, out=out)
        assert torch.equal(out.materialize(), mask[1:].unsqueeze(1).sum(0).cuda())
        assert pager.stats()["resident_bytes"]["device"] <= TIER_BYTES


@pytest.mark.parametrize("op", [torch.any, torch.all])
@pytest.mark.parametrize("paged_out", [False, True])
def test_any_and_all_of_uint8_into_a_bool_out_past_the_tier(op, paged_out):
    """torch's CPU kernel writes ``any``/``all`` of a uint8 tensor into a bool ``out=``, which the
    meta kernel refuses: past the tier the reduction raised the meta kernel's cast error."""
    x = torch.randint(0, 3, (16, 4096), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))  # 16 pages
    expected = op(x, 0, out=torch.empty(4096, dtype=torch.bool))
    with Pager(MemoryConfig(page_size=4096, vram_limit=4 * 4096, host_memory=256 * 4096, slab_size=256 * 4096,
                            prefetch_strategy="none", device="cpu")) as pager:  # fmt: skip
        out = PagedTensor.wrap(torch.zeros(4096, dtype=torch.bool), pager) if paged_out else torch.empty(4096, dtype=torch.bool)
        assert op(PagedTensor.wrap(x.clone(), pager), 0, out=out) is out
        assert torch.equal(out.materialize() if paged_out else out, expected)
