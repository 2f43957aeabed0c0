"""Ops past the device tier that torch refuses, or warns about, give torch's own errors and warnings:
a written tensor that overlaps itself, dtypes torch's kernels refuse, a composite kernel's wrapped
number, a reduction's resized ``out=``; and no warning torch does not give."""

from __future__ import annotations

import warnings
from typing import Any, Callable

import pytest
import torch

from pagedtensor import DeviceTierFullError, MemoryConfig, OutOfPagesError, PagedTensor, Pager

PAGE = 4096


def make_pager(device_pages: int) -> Pager:
    return Pager(MemoryConfig(page_size=PAGE, vram_limit=device_pages * PAGE, host_memory=256 * PAGE, slab_size=256 * PAGE,
                              prefetch_strategy="none", device="cpu"))  # fmt: skip


def raised(f: Callable[[], Any]) -> Exception | None:
    try:
        f()
    except Exception as error:  # noqa: BLE001 - the error compared
        return error
    return None


def assert_same_error(dense: Callable[[], Any], paged: Callable[[], Any]) -> None:
    expected, got = raised(dense), raised(paged)
    assert expected is not None
    assert type(got) is type(expected), f"{type(got).__name__}: {got}"
    assert str(expected).splitlines()[0] in str(got)


def test_a_written_tensor_overlapping_itself_past_the_tier_raises_torchs_error_before_writing():
    x = torch.randn(64, 1024)
    with make_pager(4) as pager:  # a row a piece
        X = PagedTensor.wrap(x, pager=pager)
        ACC = PagedTensor.wrap(torch.zeros(1024), pager=pager)
        assert_same_error(lambda: torch.zeros(1024).expand(64, 1024).add_(x), lambda: ACC.expand(64, 1024).add_(X))
        assert torch.equal(ACC.materialize(), torch.zeros(1024))  # nothing written
        out = torch.zeros(1024)
        assert_same_error(lambda: torch.add(x, 1, out=torch.zeros(1024).expand(64, 1024)), lambda: torch.add(X, 1, out=out.expand(64, 1024)))
        target = torch.zeros(1024)
        assert_same_error(lambda: torch.zeros(1024).expand(64, 1024).copy_(x), lambda: target.expand(64, 1024).copy_(X))
        assert torch.equal(out, torch.zeros(1024)) and torch.equal(target, torch.zeros(1024))
        # copy_ in parts of any layouts (a transposed source, which the pieces do not follow)
        XT = PagedTensor.wrap(x.t().contiguous(), pager=pager).t()
        assert_same_error(lambda: torch.zeros(1024).expand(64, 1024).copy_(x), lambda: target.expand(64, 1024).copy_(XT))
        assert torch.equal(target, torch.zeros(1024))
        ACC.expand(64, 1024).fill_(2.0)  # torch fills an expanded tensor: so do the pieces
        assert torch.equal(ACC.materialize(), torch.full((1024,), 2.0))


def test_copy_in_parts_refuses_a_target_overlapping_itself():
    from pagedtensor.handlers.parts import copy_in_parts

    x = torch.randn(64, 1024)
    with make_pager(2) as pager:  # a row a part
        X = PagedTensor.wrap(x, pager=pager)
        target = torch.zeros(1024)
        assert_same_error(lambda: torch.zeros(1024).expand(64, 1024).copy_(x), lambda: copy_in_parts(target.expand(64, 1024), X))
        assert torch.equal(target, torch.zeros(1024))


@pytest.mark.parametrize("op", [lambda t: t.var(), lambda t: t.std(0), lambda t: torch.var_mean(t), lambda t: t.var(1, correction=0)])
def test_a_reduction_past_the_tier_warns_nothing_torch_does_not(op):
    x = torch.randn(64, 256)
    with make_pager(8) as pager:
        X = PagedTensor.wrap(x, pager=pager)  # 16 pages
        with warnings.catch_warnings(record=True) as dense:
            warnings.simplefilter("always")
            op(x)
        with warnings.catch_warnings(record=True) as paged:
            warnings.simplefilter("always")
            with pytest.raises(DeviceTierFullError):
                op(X)
        assert [str(w.message) for w in paged] == [str(w.message) for w in dense] == []


@pytest.mark.parametrize(
    "op",
    [lambda t: t & 1, lambda t: t | 1, lambda t: torch.fmod(t, 3), lambda t: t % 3, lambda t: torch.xlogy(t, 2), lambda t: torch.copysign(t, -1)],
)
@pytest.mark.parametrize("dtype", [torch.int32, torch.float32])
def test_a_composite_scalar_op_on_a_view_past_the_tier_gives_torchs_error_or_the_pagers(op, dtype):
    x = torch.randint(-100, 100, (4, 16384), dtype=torch.int32).to(dtype)
    with make_pager(8) as pager:
        X = PagedTensor.wrap(x, pager=pager)  # 64 pages; a row of X[:, ::2] spans 16
        expected = raised(lambda: op(x[:, ::2]))
        if expected is None:
            with pytest.raises(OutOfPagesError):
                op(X[:, ::2])
        else:
            assert_same_error(lambda: op(x[:, ::2]), lambda: op(X[:, ::2]))


def test_a_reductions_resized_out_past_the_tier_warns_torchs_text():
    xi = torch.randint(-9, 9, (64, 256), dtype=torch.int32)
    with make_pager(8) as pager:
        XI = PagedTensor.wrap(xi, pager=pager)  # 16 pages
        with warnings.catch_warnings(record=True) as dense:
            warnings.simplefilter("always")
            expected = torch.sum(xi, 1, out=torch.empty(5, dtype=torch.int64))
        with warnings.catch_warnings(record=True) as paged:
            warnings.simplefilter("always")
            got = torch.sum(XI, 1, out=torch.empty(5, dtype=torch.int64))
        assert torch.equal(got, expected)
        assert len(dense) == len(paged) == 1
        assert str(dense[0].message).split(" (Triggered internally")[0] == str(paged[0].message)  # (the C++ warning's source line)


@pytest.mark.parametrize(
    "dtype, op",
    [
        (torch.complex64, lambda t: t[:, ::2] > 0),
        (torch.complex64, lambda t: t[:, ::2].clamp(0, 1)),
        (torch.complex64, lambda t: torch.hypot(t[:, ::2], t[:, ::2])),
        (torch.float32, lambda t: torch.gcd(t[:, ::2], t[:, ::2])),
        (torch.float32, lambda t: torch.add(t[:, ::2], 1, out=torch.empty(4, 8192, dtype=torch.int32))),
    ],
)
def test_torchs_dtype_errors_of_elementwise_ops_past_the_tier(dtype, op):
    x = torch.randn(4, 16384 if dtype == torch.float32 else 8192, dtype=dtype)
    with make_pager(8) as pager:
        X = PagedTensor.wrap(x, pager=pager)  # 64 pages; a row of X[:, ::2] spans 8 or more
        assert_same_error(lambda: op(x), lambda: op(X))


def test_an_in_place_op_past_the_tier_torch_refuses_for_its_dtype():
    xi = torch.randint(-9, 9, (4, 16384), dtype=torch.int32)
    with make_pager(8) as pager:
        XI = PagedTensor.wrap(xi.clone(), pager=pager)
        assert_same_error(lambda: xi.clone()[:, ::2].add_(1.5), lambda: XI[:, ::2].add_(1.5))
        assert torch.equal(XI.materialize(), xi)


def _faults(pager: Pager) -> int:
    return pager.stats()["faults"]


@pytest.mark.parametrize(
    "op",
    [
        lambda x, w: torch.mm(x, w.t()),
        lambda x, w: torch.addmm(torch.zeros(3, 32), x, w.t()),
        lambda x, w: torch.nn.functional.linear(x, w),
    ],
    ids=["mm", "addmm", "linear"],
)
@pytest.mark.parametrize("x", [torch.randn(3, 30), torch.randn(3, 512, dtype=torch.float64)], ids=["inner_dim", "dtype"])
def test_a_matrix_product_past_the_tier_with_bad_arguments_raises_torchs_error(op, x):
    """Past the tier, a product whose inner dims or dtypes torch refuses gives torch's error (its
    meta kernel finds the shapes, its kernel on stand-ins the words; small stand-ins the dtypes), no
    page faulted in, as within the tier; not DeviceTierFullError."""
    w = torch.randn(32, 512)  # 16 pages, past the 2-page tier
    with make_pager(2) as pager:
        W = PagedTensor.wrap(w, pager=pager)
        before = _faults(pager)
        assert_same_error(lambda: op(x, w), lambda: op(x, W))
        assert _faults(pager) == before


def test_nonzero_static_of_a_negative_size_past_the_tier_raises_torchs_error():
    w = torch.randn(32, 512)
    with make_pager(2) as pager:
        W = PagedTensor.wrap(w, pager=pager)
        before = _faults(pager)
        assert_same_error(lambda: torch.nonzero_static(w, size=-1), lambda: torch.nonzero_static(W, size=-1))
        assert _faults(pager) == before


def test_rrelu_with_a_noise_of_another_shape_past_the_tier_raises_torchs_error_writing_nothing():
    """A random op's argument check (the noise's shape) on stand-ins with a generator of its own:
    torch's error, the caller's noise and generator untouched."""
    x = torch.randn(32, 512)
    with make_pager(2) as pager:
        X = PagedTensor.wrap(x, pager=pager)
        for training in (True, False):
            noise = torch.zeros(5)
            state = torch.get_rng_state()
            before = _faults(pager)
            assert_same_error(lambda: torch.ops.aten.rrelu_with_noise(x, torch.zeros(5), 0.1, 0.3, training),
                              lambda: torch.ops.aten.rrelu_with_noise(X, noise, 0.1, 0.3, training))  # fmt: skip
            assert _faults(pager) == before
            assert torch.equal(noise, torch.zeros(5)) and torch.equal(torch.get_rng_state(), state)


def test_split_copy_into_outputs_of_the_wrong_shape_past_the_tier_raises_torchs_error_writing_nothing():
    x = torch.randn(32, 512)
    with make_pager(2) as pager:
        X = PagedTensor.wrap(x, pager=pager)
        outs = [torch.zeros(3), torch.zeros(3)]
        before = _faults(pager)
        assert_same_error(lambda: torch.split_copy(x, 16, out=[torch.zeros(3), torch.zeros(3)]), lambda: torch.split_copy(X, 16, out=outs))
        assert _faults(pager) == before
        assert all(torch.equal(out, torch.zeros(3)) for out in outs)
        assert torch.equal(X.materialize(), x)


def test_a_valid_matrix_product_past_the_tier_still_raises_the_pagers_error():
    """The stand-in check says nothing where torch takes the arguments: the pager's error stands."""
    with make_pager(2) as pager:
        W = PagedTensor.wrap(torch.randn(32, 512), pager=pager)
        with pytest.raises(DeviceTierFullError):
            torch.mm(torch.randn(3, 32), W)


_BROADCAST_IN_PLACE = [
    lambda t, b: t.add_(b),
    lambda t, b: t.mul_(b),
    lambda t, b: t.copy_(b),
    lambda t, b: t.addcmul_(b, b),
    lambda t, b: t.clamp_(b, None),
    lambda t, b: t.lerp_(b, 0.5),
]


@pytest.mark.parametrize("op", _BROADCAST_IN_PLACE, ids=["add_", "mul_", "copy_", "addcmul_", "clamp_", "lerp_"])
@pytest.mark.parametrize("paged_operand", [False, True], ids=["plain_operand", "paged_operand"])
def test_an_in_place_op_past_the_tier_whose_operand_broadcasts_to_a_larger_shape_raises_torchs_error(op, paged_operand):
    """torch's own words, naming the real shapes (``output with shape [64, 256] doesn't match the
    broadcast shape [2, 64, 256]``), not the small stand-ins' or the meta kernel's; nothing written."""
    x, b = torch.randn(64, 256), torch.randn(2, 64, 256)
    with make_pager(8) as pager:
        X = PagedTensor.wrap(x.clone(), pager=pager)  # 16 pages
        B = PagedTensor.wrap(b, pager=pager) if paged_operand else b  # 32 pages
        assert_same_error(lambda: op(x.clone(), b), lambda: op(X, B))
        assert "[64, 256]" in str(raised(lambda: op(X, B))) and "[2, 64, 256]" in str(raised(lambda: op(X, B)))
        assert torch.equal(X.materialize(), x)


@pytest.mark.parametrize("op", [*_BROADCAST_IN_PLACE, lambda t, b: torch.add(t, b, out=t)],
                         ids=["add_", "mul_", "copy_", "addcmul_", "clamp_", "lerp_", "add_out"])  # fmt: skip
def test_an_in_place_op_past_the_tier_whose_operand_does_not_broadcast_raises_torchs_error(op):
    """``t.add_(row_of_3)`` of a (64, 256) table: torch says "The size of tensor a (256) must match the
    size of tensor b (3) at non-singleton dimension 1"; past the tier the meta kernel's words came
    ("Attempting to broadcast a dimension of length 3 at -1!"). Nothing written."""
    x, b = torch.randn(64, 256), torch.randn(3)
    with make_pager(8) as pager:
        X = PagedTensor.wrap(x.clone(), pager=pager)  # 16 pages
        assert_same_error(lambda: op(x.clone(), b), lambda: op(X, b))
        assert torch.equal(X.materialize(), x)


@pytest.mark.parametrize(
    "op",
    [torch.remainder, torch.fmod, torch.floor_divide, lambda a, d: torch.div(a, d, rounding_mode="trunc"),
     lambda a, d: torch.div(a, d, rounding_mode="floor")],
    ids=["remainder", "fmod", "floor_divide", "div_trunc", "div_floor"],
)  # fmt: skip
def test_an_int_division_past_the_tier_that_cannot_run_in_pieces_raises_the_pagers_error(op):
    """No divisor is zero and torch takes the operands: the stand-ins of the dtype check (ones, not
    zeros) raise no ``ZeroDivisionError``; the pager's error stands."""
    a, d = torch.randint(1, 100, (64, 256)), torch.randint(1, 9, (1, 64, 256))
    op(a, d)  # torch takes them
    with make_pager(8) as pager:
        A = PagedTensor.wrap(a, pager=pager)  # 32 pages; the result's shape is no PagedTensor's
        with pytest.raises(DeviceTierFullError):
            op(A, d)


@pytest.mark.parametrize("op", [lambda t, s: t.__ilshift__(s), lambda t, s: t.__irshift__(s)], ids=["ilshift", "irshift"])
def test_an_in_place_op_past_the_tier_with_a_broadcast_operand_torch_takes_runs(op):
    """``int64 <<= bool_row`` runs in torch's kernel (its meta kernel refuses it): it runs in pieces."""
    x, s = torch.randint(0, 9, (64, 256)), torch.rand(256) > 0.5
    with make_pager(8) as pager:
        X = PagedTensor.wrap(x.clone(), pager=pager)  # 32 pages
        op(X, s)
        assert torch.equal(X.materialize(), op(x.clone(), s))


@pytest.mark.parametrize(
    "op, x",
    [
        (lambda t: t << 1, torch.rand(64, 1024) > 0.5),
        (lambda t: t >> 1, torch.rand(64, 1024) > 0.5),
        (lambda t: t.T << (torch.arange(64) % 3 == 0), torch.randint(0, 9, (64, 256), dtype=torch.int32)),
        (lambda t: t >> (torch.arange(256) % 3 == 0), torch.randint(0, 9, (64, 256), dtype=torch.int32)),
    ],
    ids=["bool_lshift_1", "bool_rshift_1", "int_T_lshift_bool", "int_rshift_bool_row"],
)
def test_a_shift_past_the_tier_that_its_meta_kernel_refuses_runs_as_torch_does(op, x):
    """``bool_t << 1`` runs in torch's kernel; its Python meta kernel refuses a bool operand ("Expected
    input tensor to have an integral dtype"), so no layout was found and the pager raised
    DeviceTierFullError (found by a helper's probe). The layout is read from ``bitwise_left_shift``'s,
    the same kernel's: dtype, strides and bits of the dense op."""
    with make_pager(8) as pager:
        X = PagedTensor.wrap(x.clone(), pager=pager)  # 16 pages or more
        got, expected = op(X), op(x)
        got = got.materialize() if isinstance(got, PagedTensor) else got
        assert got.dtype == expected.dtype and got.stride() == expected.stride() and torch.equal(got, expected)


@pytest.mark.parametrize(
    "op, x",
    [
        (lambda t: t.masked_fill(torch.ones(256, dtype=torch.bool), float("inf")), torch.randint(0, 9, (64, 256), dtype=torch.int32)),
        (lambda t: t.masked_fill(torch.ones(256, dtype=torch.bool), 1e300), torch.randint(0, 9, (64, 256))),
        (lambda t: torch.nn.functional.hardtanh(t, float("-inf"), 5.0), torch.randint(0, 9, (64, 256))),
        (lambda t: t // (2**64 - 1), torch.randn(64, 256, dtype=torch.complex64)),
    ],
    ids=["int_masked_fill_inf", "int64_masked_fill_1e300", "int_hardtanh_-inf", "complex_floor_divide_2**64-1"],
)
def test_an_op_past_the_tier_with_a_number_its_stand_ins_cannot_take_raises_torchs_error(op, x):
    """A number torch refuses for the tensor's dtype, or one past int64 (torch takes it as a uint64),
    gave Python's OverflowError from the meta kernel's ``int(inf)``, or the pager's
    DeviceTierFullError where the stand-in's ``torch.tensor(2**64 - 1)`` overflowed (found by a
    helper's probe): torch's own error."""
    with make_pager(8) as pager:
        X = PagedTensor.wrap(x.clone(), pager=pager)  # 16 pages or more
        assert_same_error(lambda: op(x), lambda: op(X))


@pytest.mark.parametrize(
    "op, x, row",
    [
        (lambda t, r: t.__ilshift__(r), torch.randn(64, 256), torch.randint(0, 3, (256,))),
        (lambda t, r: t.__irshift__(r), torch.randn(64, 256), torch.randint(0, 3, (256,))),
        (lambda t, r: t.igamma_(r), torch.randint(1, 9, (64, 256)), torch.randint(1, 3, (256,))),
        (lambda t, r: t.floor_divide_(r), torch.randn(64, 256, dtype=torch.complex64), torch.randn(256)),
        (lambda t, r: t.add_(r), torch.randint(0, 9, (64, 256)), torch.randn(256)),
    ],
    ids=["float_ilshift_int", "float_irshift_int", "int_igamma_", "complex_floor_divide_", "int_add_float"],
)
def test_an_in_place_op_past_the_tier_with_a_broadcast_operand_raises_torchs_kernels_error(op, x, row):
    """torch's kernel's error (type and words), not its meta kernel's (a RuntimeError where the
    kernel raises NotImplementedError); nothing written."""
    with make_pager(8) as pager:
        X = PagedTensor.wrap(x.clone(), pager=pager)  # 16 or more pages
        assert_same_error(lambda: op(x.clone(), row), lambda: op(X, row))
        assert torch.equal(X.materialize(), x)


@pytest.mark.parametrize("op", [torch.complex, torch.polar], ids=["complex", "polar"])
@pytest.mark.parametrize("paged_first", [True, False], ids=["paged_real", "paged_imag"])
def test_complex_or_polar_past_the_tier_of_a_non_float_operand_raises_torchs_error(op, paged_first):
    """torch's RuntimeError (``Expected both inputs to be Half, Float or Double tensors ...``), not
    the meta kernel's AssertionError."""
    re, im = torch.randn(64, 256), torch.randint(0, 3, (64, 256))
    with make_pager(8) as pager:
        if paged_first:
            assert_same_error(lambda: op(re, im), lambda: op(PagedTensor.wrap(re, pager=pager), im))
        else:
            assert_same_error(lambda: op(re, im), lambda: op(re, PagedTensor.wrap(im, pager=pager)))
