"""Ops over lists of tensors (``torch._foreach_*``, the fused optimizer steps) whose PagedTensors do
not fit on the device tier at once run an index at a time, and one index's tensors a piece at a
time: ``torch.optim`` with ``foreach=True`` or ``fused=True`` trains paged parameters larger than the
device tier to the dense run's bits, with the tier never over its budget (they raised
``DeviceTierFullError`` naming ``_foreach_mul_`` or ``_fused_adam_``)."""

from __future__ import annotations

import re
import warnings
from typing import Callable, Optional

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagedtensor import DeviceTierFullError, MemoryConfig, PagedTensor, Pager
from tests.support import CPU_AND_CUDA

PAGE = 4096
DEVICE_PAGES = 16
TIER_BYTES = DEVICE_PAGES * PAGE
aten = torch.ops.aten


def make_pager(device: str = "cpu") -> Pager:
    return Pager(MemoryConfig(vram_limit=TIER_BYTES, host_memory=1024 * PAGE, page_size=PAGE, slab_size=1024 * PAGE,
                              prefetch_strategy="none", device=device))  # fmt: skip


def dense(value: object) -> object:
    if isinstance(value, (list, tuple)):
        return type(value)(dense(item) for item in value)
    return value.materialize() if isinstance(value, PagedTensor) else value


def assert_same_bits(got: object, expected: object) -> None:
    if isinstance(expected, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(expected)
        for a, b in zip(got, expected):
            assert_same_bits(a, b)
        return
    if expected is None:
        assert got is None
        return
    got = dense(got)
    assert got.dtype == expected.dtype and got.shape == expected.shape, (got.dtype, got.shape, expected.dtype, expected.shape)
    if expected.dtype.is_floating_point:
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[expected.element_size()]
        assert torch.equal(got.contiguous().view(bits), expected.contiguous().view(bits)), (got - expected).abs().max()
    else:
        assert torch.equal(got, expected)


# name: the optimizer on a list of parameters
OPTIMIZERS: dict[str, Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]] = {
    "Adam foreach": lambda params: torch.optim.Adam(params, lr=0.01, foreach=True),
    "AdamW foreach amsgrad": lambda params: torch.optim.AdamW(params, lr=0.01, amsgrad=True, foreach=True),
    "Adam fused": lambda params: torch.optim.Adam(params, lr=0.01, fused=True),
    "AdamW fused amsgrad, tensor lr": lambda params: torch.optim.AdamW(params, lr=torch.tensor(0.01), amsgrad=True, fused=True),
    "SGD momentum foreach": lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9, nesterov=True, foreach=True),
    "SGD momentum fused": lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9, fused=True),
    "Adagrad foreach": lambda params: torch.optim.Adagrad(params, lr=0.01, foreach=True),
    "Adagrad fused": lambda params: torch.optim.Adagrad(params, lr=0.01, fused=True),
    "RMSprop foreach": lambda params: torch.optim.RMSprop(params, lr=0.01, momentum=0.5, foreach=True),
}
# name: the parameters' shapes and layouts (the device tier holds 16 pages of 4 KiB: 16,384 fp32 elements)
PARAMETERS = {
    "several parameters, each within the tier, together past it": [((24, 256), "row-major"), ((256,), "row-major"), ((48, 128), "row-major"),
                                                                    ((6000,), "row-major"), ((40, 150), "row-major")],
    "a parameter several times the tier": [((96, 512), "row-major"), ((512,), "row-major")],
    "a channels-last conv weight and a transposed matrix past the tier": [((64, 48, 4, 4), "channels-last"), ((512, 96), "transposed")],
}


def train(optimizer: str, start: list[torch.Tensor], wrap: Callable[[torch.Tensor], torch.Tensor]) -> tuple[list, list]:
    """Three steps of ``optimizer`` on parameters made by ``wrap`` from ``start``; the parameters and
    the optimizer's state tensors after them."""
    params = [torch.nn.Parameter(wrap(t.clone())) for t in start]
    step = OPTIMIZERS[optimizer](params)
    generator = torch.Generator(device=start[0].device).manual_seed(1)
    for _ in range(3):
        step.zero_grad()
        loss = sum(((p * torch.randn(p.shape, generator=generator, device=p.device)).sin()).sum() for p in params)
        loss.backward()
        step.step()
    states = [value for p in params for _, value in sorted(step.state[p].items()) if isinstance(value, torch.Tensor)]
    return [p.detach() for p in params], states


def starting_values(device: str, shapes: list, generator: Optional[torch.Generator] = None,
                    random: Callable[..., torch.Tensor] = torch.randn) -> list[torch.Tensor]:
    """Random tensors (``random``: ``torch.randn`` or ``torch.rand``) of the given shapes and layouts (a
    transposed one is ``(m, n)`` stored as its transpose's rows)."""
    generator = generator if generator is not None else torch.Generator(device=device).manual_seed(0)
    values = []
    for shape, layout in shapes:
        if layout == "transposed":
            values.append(random(shape[::-1], generator=generator, device=device).T)
        elif layout == "channels-last":
            values.append(random(shape, generator=generator, device=device).contiguous(memory_format=torch.channels_last))
        else:
            values.append(random(shape, generator=generator, device=device))
    return values


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("shapes", PARAMETERS.values(), ids=PARAMETERS.keys())
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_foreach_and_fused_optimizers_train_paged_parameters_to_the_dense_bits(optimizer, shapes, device):
    if optimizer == "Adagrad fused" and device == "cuda":
        pytest.skip("torch has no fused Adagrad for CUDA (its own RuntimeError for plain parameters too)")
    start = starting_values(device, shapes)
    expected_params, expected_states = train(optimizer, start, lambda t: t)
    with make_pager(device) as pager:
        params, states = train(optimizer, start, lambda t: PagedTensor.wrap(t, pager))
        assert all(type(p) is PagedTensor and p.pager is pager and p.stride() == t.stride() for p, t in zip(params, start))
        assert_same_bits(params, expected_params)
        assert_same_bits(states, expected_states)
        assert pager.stats()["resident_bytes"]["device"] <= TIER_BYTES


# name: (the list op, its arguments after the list ``self``, how many further lists of ``self``'s shapes it reads)
LIST_OPS: dict[str, tuple[Callable, Callable[[list, list], tuple], int]] = {
    "_foreach_add_.Scalar": (aten._foreach_add_.Scalar, lambda lists, scalars: (0.5,), 0),
    "_foreach_add_.List": (aten._foreach_add_.List, lambda lists, scalars: (lists[0],), 1),
    "_foreach_sub_.ScalarList": (aten._foreach_sub_.ScalarList, lambda lists, scalars: (scalars,), 0),
    "_foreach_mul_.Tensor": (aten._foreach_mul_.Tensor, lambda lists, scalars: (torch.tensor(1.5),), 0),
    "_foreach_div_.List": (aten._foreach_div_.List, lambda lists, scalars: (lists[0],), 1),
    "_foreach_addcmul_.Scalar": (aten._foreach_addcmul_.Scalar, lambda lists, scalars: (lists[0], lists[1], 0.25), 2),
    "_foreach_addcdiv_.ScalarList": (aten._foreach_addcdiv_.ScalarList, lambda lists, scalars: (lists[0], lists[1], scalars), 2),
    "_foreach_addcmul_.Tensor (a number per index)": (aten._foreach_addcmul_.Tensor,
                                                       lambda lists, scalars: (lists[0], lists[1], torch.tensor(scalars)), 2),
    "_foreach_lerp_.Scalar": (aten._foreach_lerp_.Scalar, lambda lists, scalars: (lists[0], 0.3), 1),
    "_foreach_lerp_.List": (aten._foreach_lerp_.List, lambda lists, scalars: (lists[0], lists[1]), 2),
    "_foreach_maximum_.List": (aten._foreach_maximum_.List, lambda lists, scalars: (lists[0],), 1),
    "_foreach_clamp_min_.Scalar": (aten._foreach_clamp_min_.Scalar, lambda lists, scalars: (-0.5,), 0),
    "_foreach_neg_": (aten._foreach_neg_.default, lambda lists, scalars: (), 0),
    "_foreach_abs_": (aten._foreach_abs_.default, lambda lists, scalars: (), 0),
    "_foreach_copy_": (aten._foreach_copy_.default, lambda lists, scalars: (lists[0],), 1),
    "_foreach_zero_": (aten._foreach_zero_.default, lambda lists, scalars: (), 0),
    "_foreach_sqrt (functional)": (aten._foreach_sqrt.default, lambda lists, scalars: (), 0),
    "_foreach_add.List (functional)": (aten._foreach_add.List, lambda lists, scalars: (lists[0],), 1),
    "_foreach_mul.ScalarList (functional)": (aten._foreach_mul.ScalarList, lambda lists, scalars: (scalars,), 0),
    "_foreach_add.Scalar_out": (aten._foreach_add.Scalar_out, lambda lists, scalars: (2.0,), 0),
}
FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@st.composite
def list_cases(draw) -> tuple[str, torch.dtype, list[tuple[tuple[int, ...], str]], list[bool]]:
    """An op, a dtype, the shapes and layouts of 1 to 4 list entries (each within a quarter of the tier
    or 2 to 5 times it; a 2-D one row-major or transposed, the same in every list), and which entries
    of each list are paged."""
    dtype = draw(st.sampled_from(FLOATS))
    count = draw(st.integers(1, 4))
    shapes = []
    for _ in range(count):
        large = draw(st.booleans())
        elements = draw(st.integers(2 * TIER_BYTES, 5 * TIER_BYTES) if large else st.integers(1, TIER_BYTES // 4)) // dtype.itemsize
        inner = draw(st.sampled_from([1, 7, 64, 300]))
        shape = (max(1, elements // inner), inner) if inner > 1 else (max(1, elements),)
        shapes.append((shape, draw(st.sampled_from(["row-major", "transposed"])) if len(shape) == 2 else "row-major"))
    return draw(st.sampled_from(sorted(LIST_OPS))), dtype, shapes, draw(st.lists(st.booleans(), min_size=3 * count, max_size=3 * count))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=list_cases(), seed=st.integers(0, 99))
def test_list_ops_give_the_dense_bits_past_the_tier(case, seed):
    """Random list ops on lists mixing paged and plain entries, small ones and ones several times the
    device tier: the dense op's bits in every list written and every result, the tier within budget."""
    name, dtype, shapes, paged_flags = case
    op, extra, further = LIST_OPS[name]
    generator = torch.Generator().manual_seed(seed)
    values = [[(value + 0.5).to(dtype) for value in starting_values("cpu", shapes, generator, torch.rand)] for _ in range(1 + further)]
    scalars = [float(x) for x in torch.rand(len(shapes), generator=generator) + 0.5]
    out = name.endswith("_out")
    expected_lists = [[t.clone() for t in entries] for entries in values]
    expected_out = [torch.empty_like(t) for t in values[0]] if out else None
    expected = op(expected_lists[0], *extra(expected_lists[1:], scalars), **({"out": expected_out} if out else {}))
    with make_pager() as pager:
        flags = iter(paged_flags)
        lists = [[PagedTensor.wrap(t.clone(), pager) if next(flags) else t.clone() for t in entries] for entries in values]
        got_out = [PagedTensor.wrap(torch.zeros_like(t), pager) for t in values[0]] if out else None
        got = op(lists[0], *extra(lists[1:], scalars), **({"out": got_out} if out else {}))
        assert_same_bits(got, expected)
        assert_same_bits(lists, expected_lists)
        if out:
            assert_same_bits(got_out, expected_out)
        assert pager.stats()["resident_bytes"]["device"] <= TIER_BYTES


def test_a_list_reduction_runs_by_index_and_one_index_past_the_tier_is_refused():
    """``_foreach_norm`` (``clip_grad_norm_(foreach=True)``) of tensors each within the tier runs index
    by index; of one tensor past the tier it is not elementwise, so it keeps the pager's error
    naming the op, as a float ``sum`` does."""
    small = [torch.randn(40, 96, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    with make_pager() as pager:
        paged = [PagedTensor.wrap(t.clone(), pager) for t in small]
        assert_same_bits(torch._foreach_norm(paged), torch._foreach_norm(small))
        large = PagedTensor.wrap(torch.randn(96, 512), pager)
        with pytest.raises(DeviceTierFullError, match="_foreach_norm"):
            torch._foreach_norm([large])


@pytest.mark.parametrize(
    "name, op, dtype",
    [
        ("_foreach_max of complex64", lambda tensors: torch._foreach_max(tensors), torch.complex64),
        ("_foreach_powsum of int64", lambda tensors: torch._foreach_powsum(tensors, 2), torch.int64),
        ("_foreach_norm of int64", lambda tensors: torch._foreach_norm(tensors), torch.int64),
    ],
)
def test_a_list_reduction_past_the_tier_of_a_dtype_torch_refuses_raises_torchs_error(name, op, dtype):
    """A dtype torch's kernel has no reduction for gave the pager's DeviceTierFullError past the tier."""
    large = torch.ones(96, 512, dtype=dtype)
    with pytest.raises((RuntimeError, NotImplementedError)) as dense:
        op([large])
    with make_pager() as pager:
        with pytest.raises(type(dense.value)) as paged:
            op([PagedTensor.wrap(large.clone(), pager)])
    assert str(dense.value) in str(paged.value) and not isinstance(paged.value, DeviceTierFullError), name


def test_grad_scaler_unscale_finds_an_inf_in_a_paged_gradient_past_the_tier():
    """``_amp_foreach_non_finite_check_and_unscale_`` (what ``GradScaler.unscale_`` runs) over paged
    gradients larger than the tier together: each unscaled to the dense bits, and an inf in the
    last piece of the last one sets ``found_inf``."""
    grads = [torch.randn(96, 512, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    grads[1][-1, -1] = float("inf")
    expected, expected_found = [g.clone() for g in grads], torch.zeros(1)
    torch._amp_foreach_non_finite_check_and_unscale_(expected, expected_found, torch.tensor([0.25]))
    with make_pager() as pager:
        paged = [PagedTensor.wrap(g.clone(), pager) for g in grads]
        found = torch.zeros(1)
        torch._amp_foreach_non_finite_check_and_unscale_(paged, found, torch.tensor([0.25]))
        assert found.item() == 1.0
        assert_same_bits(paged, expected)


def test_a_paged_step_count_is_read_once_by_the_pieces_of_a_fused_step():
    """A fused Adam step on a paged parameter past the tier whose step count is a paged 0-dim tensor
    too: the count is read once as a plain tensor (each piece's window would need its page
    besides), and the step gives the dense bits."""
    generator = torch.Generator().manual_seed(0)
    weight, grad = torch.randn(96, 512, generator=generator), torch.randn(96, 512, generator=generator)
    hyper = dict(lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.01, eps=1e-8, amsgrad=False, maximize=False)
    expected, exp_avg, exp_avg_sq = weight.clone(), torch.zeros_like(weight), torch.zeros_like(weight)
    torch._fused_adam_([expected], [grad.clone()], [exp_avg], [exp_avg_sq], [], [torch.tensor(3.0)], **hyper)
    with make_pager() as pager:
        paged, step = PagedTensor.wrap(weight.clone(), pager), PagedTensor.wrap(torch.tensor(3.0), pager)
        got_avg, got_avg_sq = torch.zeros_like(weight), torch.zeros_like(weight)
        torch._fused_adam_([paged], [grad.clone()], [got_avg], [got_avg_sq], [], [step], **hyper)
        assert_same_bits([paged, got_avg, got_avg_sq], [expected, exp_avg, exp_avg_sq])
        assert step.item() == 3.0


def test_two_views_of_one_table_past_the_tier_keep_the_pagers_error():
    """``torch._foreach_add_([t[:n]], [t[n:]])`` with ``t`` past the tier: a piece of one view could
    read bytes a piece of the other wrote, so it raises the pager's error naming the op, and the
    table is unchanged."""
    table = torch.randn(64, 512)
    with make_pager() as pager:
        paged = PagedTensor.wrap(table.clone(), pager)
        with pytest.raises(DeviceTierFullError, match="_foreach_add_"):
            torch._foreach_add_([paged[:32]], [paged[32:]])
        assert_same_bits(paged, table)


def test_a_tensor_written_at_one_index_and_read_at_another_keeps_the_pagers_error():
    """``torch._foreach_add_([a, b], [b, a])`` past the tier: the CPU kernels add index by index, but
    CUDA's multi-tensor kernels read all the indices at once, so it raises the pager's error naming
    the op, ``a`` and ``b`` unchanged. The pieces of one table (``flat.split(n)``), which share no
    byte, still run index by index."""
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 256, generator=generator), torch.randn(64, 256, generator=generator)
    flat = torch.randn(4 * 64 * 256, generator=generator)
    with make_pager() as pager:
        paged_a, paged_b = PagedTensor.wrap(a.clone(), pager), PagedTensor.wrap(b.clone(), pager)
        with pytest.raises(DeviceTierFullError, match="_foreach_add_"):
            torch._foreach_add_([paged_a, paged_b], [paged_b, paged_a])
        assert_same_bits([paged_a, paged_b], [a, b])
        paged_flat = PagedTensor.wrap(flat.clone(), pager)
        torch._foreach_mul_(list(paged_flat.split(64 * 256)), 3.0)
        assert_same_bits(paged_flat, flat * 3.0)


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_a_grad_scaler_step_skips_and_steps_as_the_dense_run_past_the_tier(fused):
    """``GradScaler`` with AdamW over two paged weights that together pass the tier: its unscale, the
    step it skips on an inf gradient (the fused step reading ``found_inf`` at each index) and the
    steps it takes give the dense run's weights and scale."""

    def run(wrap: Callable[[torch.Tensor], torch.Tensor]) -> tuple[list[torch.Tensor], float]:
        generator = torch.Generator().manual_seed(0)
        weights = [torch.nn.Parameter(wrap(torch.randn(24, 512, generator=generator))) for _ in range(2)]  # 12 pages each
        bias = torch.nn.Parameter(torch.zeros(512))
        step = torch.optim.AdamW([*weights, bias], lr=0.01, **({"fused": True} if fused else {"foreach": True}))
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        x = torch.randn(4, 24, generator=generator)
        for iteration in range(3):
            step.zero_grad()
            scaler.scale((sum(x @ w for w in weights) + bias).square().sum()).backward()
            if iteration == 1:
                weights[1].grad[0, 0] = float("inf")
            scaler.step(step)
            scaler.update()
        return [w.detach() for w in weights], scaler.get_scale()

    expected, expected_scale = run(lambda t: t)
    with make_pager() as pager:
        got, scale = run(lambda t: PagedTensor.wrap(t, pager))
        assert_same_bits(got, expected)
        assert scale == expected_scale == 2.0**7


def test_a_one_element_operand_of_several_dims_broadcasts_over_the_pieces():
    """``torch._foreach_add_([t], [s])`` with ``t`` past the tier and ``s`` of shape ``(1, 1)``: ``s``
    broadcasts over each 1-D piece as over ``t`` (it raised a piece's shape error), the functional form
    without torch's warning of a resized output; an ``s`` of more dims than ``t`` raises torch's
    broadcast error (its meta kernel's words) before any piece is written."""
    table, one = torch.randn(96, 512, generator=torch.Generator().manual_seed(0)), torch.tensor([[2.5]], dtype=torch.float64)
    expected = [table.clone()]
    torch._foreach_add_(expected, [one])
    with make_pager() as pager:
        paged = PagedTensor.wrap(table.clone(), pager)
        torch._foreach_add_([paged], [one])
        assert_same_bits(paged, expected[0])
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert_same_bits(torch._foreach_mul([PagedTensor.wrap(table.clone(), pager)], [one]), torch._foreach_mul([table], [one]))
        with pytest.raises(RuntimeError, match="doesn't match the broadcast shape"):
            torch._foreach_add_([table.clone()], [one.reshape(1, 1, 1)])
        paged = PagedTensor.wrap(table.clone(), pager)
        with pytest.raises(RuntimeError, match=r"doesn't match the broadcast shape \(?\[?1, 96, 512"):
            torch._foreach_add_([paged], [one.reshape(1, 1, 1)])
        assert_same_bits(paged, table)


@pytest.mark.parametrize("found_inf", [0.0, 2.0])
@pytest.mark.parametrize("with_inf", [False, True], ids=["finite", "an inf"])
def test_the_functional_unscale_runs_by_index_past_the_tier(with_inf, found_inf):
    """``aten._amp_foreach_non_finite_check_and_unscale`` (the functional ``GradScaler.unscale_``) on
    gradients each within the tier, together past it: it runs index by index (it raised a cast
    error), each index reading the ``found_inf`` the index before gave, as the dense op updates it."""
    grads = [torch.randn(24, 256, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    if with_inf:
        grads[1][3, 3] = float("inf")
    op = aten._amp_foreach_non_finite_check_and_unscale.default
    expected = op(grads, torch.tensor([found_inf]), torch.tensor(0.5))
    with make_pager() as pager:
        paged = [PagedTensor.wrap(g.clone(), pager) for g in grads]
        got = op(paged, torch.tensor([found_inf]), torch.tensor(0.5))
        assert_same_bits(list(got[0]), list(expected[0]))
        assert_same_bits(got[1], expected[1])
        assert_same_bits(paged, grads)


# name: a list op on the two-element list it is given, with an argument torch refuses
BAD_ARGUMENTS: dict[str, Callable[[list], object]] = {
    "scalars longer than the list": lambda lists: torch._foreach_addcmul_(lists[0], lists[1], lists[0], torch.tensor([1.0, 2.0, 3.0])),
    "scalars shorter than the list": lambda lists: torch._foreach_addcmul_(lists[0], lists[1], lists[0], torch.tensor([1.0])),
    "0-dim scalars": lambda lists: torch._foreach_addcmul_(lists[0], lists[1], lists[0], torch.tensor(2.0)),
    "a Scalar[] longer than the list": lambda lists: torch._foreach_add_(lists[0], [1.0, 2.0, 3.0]),
    "a Tensor[] shorter than the list": lambda lists: torch._foreach_add_(lists[0], lists[1][:1]),
}


@pytest.mark.parametrize("call", BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS.keys())
def test_bad_per_index_arguments_raise_torchs_error_before_any_index_runs(call):
    """Per-index arguments of the wrong length or dimension to an op past the tier run index by index:
    torch's own error, with its message, and nothing written (a longer ``scalars`` ran, a shorter
    one wrote index 0, a wrong Scalar[] raised ``DeviceTierFullError``)."""
    values = [[torch.randn(48, 256, generator=torch.Generator().manual_seed(2 * i + j)) for j in range(2)] for i in range(2)]
    with pytest.raises(RuntimeError) as dense_error:
        call([[t.clone() for t in entries] for entries in values])
    with make_pager() as pager:
        lists = [[PagedTensor.wrap(t.clone(), pager) for t in entries] for entries in values]
        with pytest.raises(RuntimeError, match=re.escape(str(dense_error.value).splitlines()[0])):
            call(lists)
        assert_same_bits(lists, values)


def test_a_one_element_view_of_the_written_tensor_raises_torchs_overlap_error_past_the_tier():
    """``torch._foreach_mul_([t], t[i, j])`` with ``t`` past the tier: torch's error that the input and
    the written tensor share memory, as plain torch and the op within the tier raise, and ``t``
    unchanged (the 0-dim view was read as a copy, and ``t`` written)."""
    table = torch.randn(96, 512, generator=torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError) as dense_error:
        plain = table.clone()
        torch._foreach_mul_([plain], plain[95, 511])
    with make_pager() as pager:
        paged = PagedTensor.wrap(table.clone(), pager)
        with pytest.raises(RuntimeError, match=re.escape(str(dense_error.value))):
            torch._foreach_mul_([paged], paged[95, 511])
        assert_same_bits(paged, table)
        elsewhere = PagedTensor.wrap(torch.cat([table.flatten(), torch.tensor([3.0])]), pager)
        written = elsewhere[:-1].view(96, 512)
        torch._foreach_mul_([written], elsewhere[-1])  # a view of the allocation beside the written tensor
        assert_same_bits(written, table * 3.0)


# name: the lists of an in-place op, and how it runs (the device tier holds 16,384 fp32 elements)
RUNS = {
    "within the tier": [(24, 256), (256,)],
    "index by index": [(24, 256), (24, 256), (24, 256)],
    "one index in pieces": [(96, 512)],
}


@pytest.mark.parametrize("shapes", RUNS.values(), ids=RUNS.keys())
def test_an_in_place_list_op_bumps_each_written_version_once(shapes):
    """``torch._foreach_add_`` bumps each PagedTensor it writes by one, as plain torch (run index by index,
    the index's op and the list's both bumped it)."""
    with make_pager() as pager:
        paged = [PagedTensor.wrap(torch.zeros(shape), pager) for shape in shapes]
        before = [t._version for t in paged]
        torch._foreach_add_(paged, 1.0)
        assert [t._version - v for t, v in zip(paged, before)] == [1] * len(shapes)


MIXED_WRITES: dict[str, Callable[[list[torch.Tensor], list[torch.Tensor]], object]] = {
    "_foreach_add_": lambda written, other: torch._foreach_add_(written, 1.0),
    "_foreach_mul_ by a list": lambda written, other: torch._foreach_mul_(written, other),
    "_foreach_copy_": lambda written, other: torch._foreach_copy_(written, other),
    "_foreach_zero_": lambda written, other: torch._foreach_zero_(written),
    "_foreach_add Scalar_out": lambda written, other: aten._foreach_add.Scalar_out(other, 2.0, out=written),
}


@pytest.mark.parametrize("shapes", RUNS.values(), ids=RUNS.keys())
@pytest.mark.parametrize("name", MIXED_WRITES)
def test_a_list_op_bumps_the_plain_tensors_it_writes_beside_paged_ones(name, shapes):
    """A plain tensor a list op writes beside PagedTensors (a mixed list, or paged sources) was not
    bumped (torch's kernel ran it below autograd's keys): a backward that saved it silently read the
    new values, where torch raises that it was modified by an in-place operation."""
    op = MIXED_WRITES[name]
    with make_pager() as pager:
        for paged_written in (True, False):  # a mixed list written; plain tensors written from paged ones
            written = [torch.ones(shape) for shape in shapes]
            other = [PagedTensor.wrap(torch.full(shape, 3.0), pager) for shape in shapes]
            if paged_written:
                written[0] = PagedTensor.wrap(written[0], pager)
            before = [t._version for t in written]
            op(written, other)
            assert [t._version - v for t, v in zip(written, before)] == [1] * len(shapes), paged_written
    x = torch.ones(4, requires_grad=True)
    with make_pager() as pager:
        weight = torch.full((4,), 2.0)
        loss = (x * weight).sum()  # saves weight
        torch._foreach_mul_([PagedTensor.wrap(torch.ones(4), pager), weight], 3.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


@pytest.mark.parametrize("shapes", RUNS.values(), ids=RUNS.keys())
def test_a_list_op_refuses_to_write_an_inference_tensor_outside_inference_mode(shapes):
    """torch refuses an in-place update of an inference tensor outside inference mode; a list op
    with a PagedTensor wrote it (paged or plain). Refused now, before any index is written."""
    with make_pager() as pager:
        with torch.inference_mode():
            values = [torch.rand(shape, generator=torch.Generator().manual_seed(i)) for i, shape in enumerate(shapes)]
            paged = [PagedTensor.wrap(value.clone(), pager) for value in values]
            plain_beside = [torch.zeros(shapes[0])]
        for written in (paged, [PagedTensor.wrap(torch.zeros(shapes[0]), pager), *plain_beside]):
            with pytest.raises(RuntimeError, match="Inplace update to inference tensor outside InferenceMode"):
                torch._foreach_add_(written, 1.0)
        assert all(torch.equal(t.materialize(), v) for t, v in zip(paged, values)), "a refused op wrote"
        assert not plain_beside[0].any(), "a refused op wrote"
        with torch.inference_mode():
            torch._foreach_add_(paged, 1.0)  # inside inference mode: written
        assert all(torch.equal(t.materialize(), v + 1) for t, v in zip(paged, values))
