"""``paged_linear``: ``F.linear`` with a PagedTensor weight read from its pinned pages, without the
dispatch of a ``t`` view and an ``mm``; bitwise equal to ``F.linear`` on the dense weight, and the
usual dispatch wherever reading the slots directly would be wrong (autograd recording, tracing,
torch-function and torch-dispatch modes, arguments that are not plain tensors). CPU pagers with
4 KiB pages and budgets of a few pages, so pages leave between calls."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import pagedtensor.dispatch as dispatch
from pagedtensor import DeviceTierFullError, OutOfPagesError, PagedTensor
from pagedtensor.handlers.linear import paged_linear
from tests.test_tensor import PAGE, make_pager

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def random(shape, dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(dtype)


@pytest.fixture
def pager():
    with make_pager() as p:
        yield p


def count_windows(monkeypatch) -> list[bool]:
    """Every ``_Window`` made from now on, as its ``gathered`` flag."""
    windows: list[bool] = []
    real_init = dispatch._Window.__init__

    def spy(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        windows.append(self.gathered)

    monkeypatch.setattr(dispatch._Window, "__init__", spy)
    return windows


@settings(max_examples=40, deadline=None)
@given(
    dtype=st.sampled_from(DTYPES),
    out_features=st.integers(1, 40),
    in_features=st.integers(1, 80),
    lead=st.lists(st.integers(1, 3), max_size=2),
    with_bias=st.booleans(),
    column_offset=st.integers(0, 5),
    seed=st.integers(0, 2**16),
)
def test_equals_linear_bitwise_while_pages_leave(dtype, out_features, in_features, lead, with_bias, column_offset, seed):
    """A weight that is a column slice of a larger paged matrix (strided, not at its allocation's
    start), its pages evicted before each call by another tensor's use: the result has the bits of
    ``F.linear`` on the dense weight, and so does ``F.linear`` on the PagedTensor."""
    with make_pager(device_pages=6, host_pages=256) as pager:  # the largest weight spans 4 pages
        full = random((out_features, in_features + column_offset), dtype, seed)
        weight = full[:, column_offset:]
        paged = PagedTensor.wrap(full.clone(), pager)[:, column_offset:]
        other = PagedTensor.wrap(torch.ones(6 * PAGE // 4), pager)
        x = random((*lead, in_features), dtype, seed + 1)
        bias = random((out_features,), dtype, seed + 2) if with_bias else None
        expected = F.linear(x, weight, bias)
        for _ in range(2):
            other.sum()  # takes the whole device tier: the weight's pages leave
            assert torch.equal(paged_linear(x, paged, bias), expected)
        assert torch.equal(F.linear(x, paged, bias), expected)


def test_reads_the_pages_in_one_window_with_no_dispatch(pager, monkeypatch):
    weight = random((16, 64), torch.float32, 0)  # 4 KiB: one page
    paged = PagedTensor.wrap(weight.clone(), pager)
    x = random((2, 64), torch.float32, 1)
    dispatched = []
    real = dispatch.DISPATCHER.dispatch
    monkeypatch.setattr(dispatch.DISPATCHER, "dispatch", lambda func, *rest: dispatched.append(func) or real(func, *rest))
    windows = count_windows(monkeypatch)
    assert torch.equal(paged_linear(x, paged), F.linear(x, weight))
    assert dispatched == [] and windows == [False]
    F.linear(x, paged)  # the general path, for contrast: a t view, then mm
    assert len(dispatched) >= 2


def test_scattered_slots_are_gathered(monkeypatch):
    """The weight's pages in slots that are not adjacent: read from a gathered copy, same bits."""
    with make_pager(device_pages=6) as pager:
        weight = random((3, PAGE // 4), torch.float32, 0)  # three pages
        paged = PagedTensor.wrap(weight.clone(), pager)
        spacers = [PagedTensor.wrap(torch.full((PAGE // 4,), float(i)), pager) for i in range(3)]
        pager.evict_all()
        for page in range(3):  # weight page, spacer, weight page, ...: no two weight pages adjacent
            paged[page].sum()
            spacers[page].sum()
        windows = count_windows(monkeypatch)
        x = random((5, PAGE // 4), torch.float32, 1)
        assert torch.equal(paged_linear(x, paged), F.linear(x, weight))
        assert windows == [True]


def test_autograd_takes_the_dispatch_path_and_backward_reads_the_right_weight(monkeypatch):
    """With grad enabled and the input requiring grad, ``linear`` saves the weight for backward: it
    must be the PagedTensor (read again in backward), not a view of slots the pager reuses in
    between. Gradients equal the dense ones although the weight's slots were taken over."""
    with make_pager(device_pages=3) as pager:
        weight = random((8, 128), torch.float32, 0)  # one page
        paged = PagedTensor.wrap(weight.clone(), pager)
        x = random((4, 128), torch.float32, 1).requires_grad_()
        x_dense = x.detach().clone().requires_grad_()
        out = paged_linear(x, paged)
        filler = PagedTensor.wrap(torch.full((3 * PAGE // 4,), 7.0), pager)
        filler.sum()  # every slot now holds the filler's pages
        out.sum().backward()
        F.linear(x_dense, weight).sum().backward()
        assert torch.equal(x.grad, x_dense.grad)

        with torch.no_grad():  # no recording: the direct path
            windows = count_windows(monkeypatch)
            assert torch.equal(paged_linear(x, paged), F.linear(x_dense, weight))
            assert windows == [False]


def test_modes_and_other_arguments_take_the_dispatch_path(pager, monkeypatch):
    weight = random((16, 64), torch.float32, 0)
    paged = PagedTensor.wrap(weight.clone(), pager)
    x = random((2, 64), torch.float32, 1)
    expected = F.linear(x, weight)

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.paged_args = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.paged_args += sum(isinstance(a, PagedTensor) for a in args)
            return func(*args, **(kwargs or {}))

    with Seen() as mode:
        assert torch.equal(paged_linear(x, paged), expected)
    assert mode.paged_args > 0  # the mode saw the PagedTensor, not a view of its slots

    x_paged = PagedTensor.wrap(x.clone(), pager)
    assert torch.equal(paged_linear(x_paged, paged), expected)
    bias = random((16,), torch.float32, 2)
    assert torch.equal(paged_linear(x, paged, PagedTensor.wrap(bias.clone(), pager)), F.linear(x, weight, bias))
    assert torch.equal(paged_linear(x, weight, bias), F.linear(x, weight, bias))  # not paged at all


def test_under_torch_compile(pager):
    weight = random((16, 64), torch.float32, 0)
    paged = PagedTensor.wrap(weight.clone(), pager)
    x = random((2, 64), torch.float32, 1)
    compiled = torch.compile(paged_linear, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x, paged), F.linear(x, weight))


def test_a_weight_larger_than_the_device_tier_raises_out_of_pages():
    with make_pager(device_pages=2) as pager:
        paged = PagedTensor.wrap(torch.zeros(3, PAGE // 4), pager)
        x = torch.zeros(1, PAGE // 4)
        with pytest.raises(DeviceTierFullError, match="linear: its PagedTensor weight needs more pages at once than the device tier can hold: device tier"):
            paged_linear(x, paged)
        with pytest.raises(OutOfPagesError):
            F.linear(x, paged)
        assert not paged.allocation.pins  # nothing stays pinned


def test_empty_weight(pager):
    paged = PagedTensor.wrap(torch.zeros(0, 5), pager)
    x = torch.ones(2, 5)
    assert torch.equal(paged_linear(x, paged, torch.zeros(0)), torch.zeros(2, 0))


@pytest.mark.parametrize("lead", [(5,), (2, 3)])
def test_conv1d_equals_transformers_conv1d_bitwise_with_no_dispatch(lead, monkeypatch):
    """``paged_conv1d`` computes transformers' ``Conv1D`` (GPT-2's linear, its weight stored
    ``(in, out)``) from the weight's pinned pages, with no op reaching the dispatcher, after the
    pages left the device; with grad to record it takes the dispatch path, the same bits."""
    from transformers.pytorch_utils import Conv1D

    from pagedtensor.handlers.linear import paged_conv1d

    with make_pager(device_pages=3) as pager:
        torch.manual_seed(0)
        conv = Conv1D(48, PAGE // 4 // 16)  # weight (64, 48): 3 pages
        torch.nn.init.normal_(conv.bias)
        paged = PagedTensor.wrap(conv.weight.detach().clone(), pager)
        x = random((*lead, 64), torch.float32, 1)
        expected = conv(x)
        PagedTensor.wrap(torch.ones(3 * PAGE // 4), pager).sum()  # takes the whole device tier: the weight's pages leave
        dispatched = []
        real = dispatch.DISPATCHER.dispatch
        monkeypatch.setattr(dispatch.DISPATCHER, "dispatch", lambda func, *rest: dispatched.append(func) or real(func, *rest))
        with torch.no_grad():
            assert torch.equal(paged_conv1d(x, paged, conv.bias), expected)
        assert dispatched == []
        assert torch.equal(paged_conv1d(x.requires_grad_(), paged, conv.bias), expected)
        assert dispatch.aten.addmm.default in dispatched


def test_paged_linear_keeps_a_forward_mode_tangent_of_its_weight():
    """``paged_linear`` (what a paged model's ``nn.Linear`` runs) of a forward-mode dual whose primal
    is a PagedTensor weight ran ``F.linear`` on a dense view of its pages, which has no tangent: the
    output's tangent was None (found by a helper's probe). Under forward-mode AD it runs ``F.linear``
    on the PagedTensor, whose tangent torch carries."""
    import torch.autograd.forward_ad as forward_ad

    torch.manual_seed(0)
    weight, bias, x, tangent = torch.randn(4, 8), torch.randn(4), torch.randn(2, 8), torch.randn(4, 8)
    with make_pager() as pager, forward_ad.dual_level():
        expected = forward_ad.unpack_dual(F.linear(x, forward_ad.make_dual(weight, tangent), bias))
        got = forward_ad.unpack_dual(paged_linear(x, forward_ad.make_dual(PagedTensor.wrap(weight, pager), tangent), bias))
        assert got.tangent is not None and torch.equal(got.tangent, expected.tangent)
        assert torch.equal(got.primal, expected.primal)


@pytest.mark.parametrize("x", [torch.randn(3, 30), torch.randn(3, 512, dtype=torch.float64)], ids=["inner_dim", "dtype"])
def test_paged_linear_past_the_tier_with_bad_arguments_raises_torchs_error(x):
    """paged_linear of a weight past the tier, with an input torch refuses (another inner dim or
    dtype): torch's own error, as F.linear gives, no page faulted in; not the pager's."""
    from pagedtensor import MemoryConfig, Pager

    w = torch.randn(32, 512)
    config = MemoryConfig(page_size=4096, vram_limit=2 * 4096, host_memory=256 * 4096, slab_size=256 * 4096,
                          prefetch_strategy="none", device="cpu")  # fmt: skip
    with Pager(config) as pager:
        W = PagedTensor.wrap(w, pager=pager)
        with pytest.raises(RuntimeError) as expected:
            F.linear(x, w)
        before = pager.stats()["faults"]
        with pytest.raises(RuntimeError) as got:
            paged_linear(x, W)
        assert type(got.value) is type(expected.value)
        assert str(expected.value).splitlines()[0] in str(got.value)
        assert pager.stats()["faults"] == before
        with pytest.raises(DeviceTierFullError):  # valid arguments: the pager's error stands
            paged_linear(torch.randn(3, 512), W)
