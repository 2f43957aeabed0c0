"""An in-place (or ``out=``) list op past the device tier runs index by index; an index that is refused
whatever runs before it (its operands of different layouts past the tier, not run in pieces; a closed
pager; a freed allocation; torch's error for an operand overlapping the tensor written) raises its
error before any index is written. README: "An op that fails leaves the tensor as it was". Before,
``torch._foreach_add_([a, b, c], [x, y, d.T])`` had written ``a`` and ``b`` when index 2 was refused."""

from __future__ import annotations

import re
from typing import Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagedtensor import DeviceTierFullError, MemoryConfig, PagedTensor, Pager
from tests.support import CPU_AND_CUDA

PAGE = 4096
DEVICE_PAGES = 8  # 8,192 fp32 elements; a (64, 256) operand is twice the tier
aten = torch.ops.aten


def make_pager(device: str) -> Pager:
    return Pager(MemoryConfig(vram_limit=DEVICE_PAGES * PAGE, host_memory=512 * PAGE, page_size=PAGE, slab_size=512 * PAGE,
                              prefetch_strategy="none", device=device))  # fmt: skip


_ADAM = dict(lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.01, eps=1e-8, amsgrad=False, maximize=False)
# name: the op on ``written`` (the list it writes) and ``other`` (a list read beside it, of the same shapes)
LIST_OPS: dict[str, Callable[[list[torch.Tensor], list[torch.Tensor]], object]] = {
    "_foreach_add_.List": lambda written, other: torch._foreach_add_(written, other),
    "_foreach_copy_": lambda written, other: torch._foreach_copy_(written, other),
    "_foreach_mul_.List": lambda written, other: torch._foreach_mul_(written, other),
    "_foreach_addcmul_.Scalar": lambda written, other: torch._foreach_addcmul_(written, other, other, value=0.5),
    "_foreach_lerp_.Scalar": lambda written, other: torch._foreach_lerp_(written, other, 0.5),
    "_foreach_add.List_out": lambda written, other: aten._foreach_add.List_out([t * 2 for t in other], other, out=written),
    "_fused_adam_": lambda written, other: torch._fused_adam_(
        written, other, [torch.zeros_like(t) for t in other], [torch.zeros_like(t) for t in other], [],
        [torch.tensor(1.0) for _ in other], **_ADAM,
    ),
    "_fused_sgd_": lambda written, other: torch._fused_sgd_(
        written, other, [], weight_decay=0.0, momentum=0.0, lr=0.1, dampening=0.0, nesterov=False, maximize=False, is_first_step=True
    ),
    "_amp_foreach_non_finite_check_and_unscale_": lambda written, other: torch._amp_foreach_non_finite_check_and_unscale_(
        written, torch.zeros(1, device=written[0].device), torch.full((1,), 0.5, device=written[0].device)
    ),
}


def refused_last_index(kind: str, pager: Pager, device: str, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The written tensor and the operand of an index that is refused however the indices before it run:
    ``layouts``, both twice the tier, one row-major, the other a transposed view (no run in pieces), or
    for the one-list unscale, a strided view twice the tier (its elements do not fill their span);
    ``closed``/``freed``, a tensor within the tier on another pager closed, or whose allocation is freed."""
    if kind == "layouts":
        written = PagedTensor.wrap(torch.randn(64, 256, generator=generator).to(device), pager)
        operand = PagedTensor.wrap(torch.randn(256, 64, generator=generator).to(device), pager).T
        return written, operand
    if kind == "strided":
        return PagedTensor.wrap(torch.randn(64, 512, generator=generator).to(device), pager)[:, ::2], torch.ones(64, 256, device=device)
    other = make_pager(device)
    written = PagedTensor.wrap(torch.randn(16, 256, generator=generator).to(device), other)
    if kind == "closed":
        other.close()
    else:
        other.free(written.allocation)
    return written, torch.ones(16, 256, device=device)


def snapshot(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.materialize() if isinstance(t, PagedTensor) else t.clone() for t in tensors]


CASES = [(name, kind) for name in LIST_OPS for kind in ("closed", "freed", "layouts")]


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("name, kind", CASES, ids=[f"{name}-{kind}" for name, kind in CASES])
def test_an_index_refused_past_the_tier_raises_before_any_index_is_written(name, kind, device):
    """Indices 0 and 1 within the tier each, past it together (so the op runs index by index), index 2
    refused (:func:`refused_last_index`): the op raises the error the refused index raises alone, and
    indices 0 and 1 are as they were."""
    op = LIST_OPS[name]
    if kind == "layouts" and name == "_amp_foreach_non_finite_check_and_unscale_":
        kind = "strided"  # one list: no second layout to differ; an index whose elements do not fill their span
    generator = torch.Generator().manual_seed(0)
    with make_pager(device) as pager:
        refused, refused_operand = refused_last_index(kind, pager, device, generator)
        with pytest.raises(Exception) as alone:  # the refused index alone: the error the list op keeps
            op([refused], [refused_operand])
        first = [PagedTensor.wrap(torch.randn(24, 256, generator=generator).to(device), pager) for _ in range(2)]
        operands = [torch.rand(24, 256, generator=generator).to(device) + 1 for _ in range(2)]
        before = snapshot(first)
        with pytest.raises(type(alone.value), match=re.escape(str(alone.value))):
            op([*first, refused], [*operands, refused_operand])
        for got, expected in zip(snapshot(first), before):
            assert torch.equal(got, expected), f"{name}: an index before the refused one was written"


def test_torchs_overlap_error_at_a_later_index_is_raised_before_any_index_is_written():
    """``torch._foreach_mul_([a, t], [x, t[i, j]])`` with ``t`` past the tier: index 1 runs in pieces,
    and torch refuses its one-element operand sharing a byte with ``t`` (the error the CPU's per-tensor
    kernels raise; CUDA's may take it): raised before ``a`` is written."""
    device = "cpu"
    generator = torch.Generator().manual_seed(1)
    table = torch.randn(64, 256, generator=generator).to(device)
    with pytest.raises(RuntimeError) as dense_error:
        plain = table.clone()
        torch._foreach_mul_([plain], [plain[63, 255]])
    with make_pager(device) as pager:
        a = PagedTensor.wrap(torch.randn(24, 256, generator=generator).to(device), pager)
        t = PagedTensor.wrap(table.clone(), pager)
        before = snapshot([a, t])
        with pytest.raises(RuntimeError, match=re.escape(str(dense_error.value))):
            torch._foreach_mul_([a, t], [torch.full((24, 256), 2.0, device=device), t[63, 255]])
        for got, expected in zip(snapshot([a, t]), before):
            assert torch.equal(got, expected)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(count=st.integers(2, 5), data=st.data())
def test_a_refused_index_anywhere_in_the_list_writes_nothing_and_the_rest_runs_as_dense(count, data):
    """Lists of ``count`` indices, each within the tier or several times it (run in pieces), one of them
    refused (operands of different layouts past the tier) at any position: ``_foreach_add_`` raises,
    nothing written; without the refused index, the op gives the dense bits."""
    refused_at = data.draw(st.integers(0, count - 1), label="refused index")
    large = data.draw(st.lists(st.booleans(), min_size=count, max_size=count), label="large indices")
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 99), label="seed"))
    values = [torch.randn(64 if big else 24, 256, generator=generator) for big in large]
    operands = [torch.randn_like(v) for v in values]
    with make_pager("cpu") as pager:
        written = [PagedTensor.wrap(v.clone(), pager) for v in values]
        read = [PagedTensor.wrap(o.clone(), pager) for o in operands]
        refused, refused_operand = refused_last_index("layouts", pager, "cpu", generator)
        with pytest.raises(Exception) as alone:
            torch._foreach_add_([refused], [refused_operand])
        listed = [*written[:refused_at], refused, *written[refused_at:]]
        listed_operands = [*read[:refused_at], refused_operand, *read[refused_at:]]
        with pytest.raises(type(alone.value), match=re.escape(str(alone.value))):
            torch._foreach_add_(listed, listed_operands)
        for got, expected in zip(snapshot(written), values):
            assert torch.equal(got, expected)
        torch._foreach_add_(written, read)
        expected = [v.clone() for v in values]
        torch._foreach_add_(expected, operands)
        for got, want in zip(snapshot(written), expected):
            assert torch.equal(got, want)


@pytest.mark.parametrize("pins", [2, 4])
def test_an_index_that_does_not_fit_beside_the_threads_pins_is_refused_before_any_index_is_written(pins):
    """This thread pins ``pins`` of 8 device pages (an ``ensure_resident`` it holds) while
    ``torch._foreach_add_([x0, x1.T], [y0, y1])`` runs: index 1 (6 pages, operands of two layouts: no
    run in pieces) fits beside 2 pinned pages, and the op gives the dense bits; beside 4 it does not,
    and the op raises DeviceTierFullError before index 0 is written (values and versions as they were).
    Index 1 was compared with the whole tier, not the room beside the pins: index 0 was written first."""
    generator = torch.Generator().manual_seed(0)
    x0, y0 = torch.randn(4, 256, generator=generator), torch.randn(4, 256, generator=generator)  # 1 page each
    x1, y1 = torch.randn(256, 12, generator=generator), torch.randn(12, 256, generator=generator)  # 3 pages each
    with Pager(MemoryConfig(vram_limit=DEVICE_PAGES * PAGE, host_memory=512 * PAGE, page_size=PAGE, slab_size=512 * PAGE,
                            prefetch_strategy="none", device="cpu", pin_wait_s=0)) as pager:  # fmt: skip
        other = PagedTensor.wrap(torch.randn(16, 256, generator=generator), pager)  # 4 pages
        X0, Y0, X1, Y1 = (PagedTensor.wrap(t.clone(), pager) for t in (x0, y0, x1, y1))
        versions = [X0._version, X1._version]
        with pager.ensure_resident(other.allocation, 0, pins):
            if pins == 4:
                with pytest.raises(DeviceTierFullError):
                    torch._foreach_add_([X0, X1.T], [Y0, Y1])
            else:
                torch._foreach_add_([X0, X1.T], [Y0, Y1])
        if pins == 4:
            assert torch.equal(X0.materialize(), x0) and torch.equal(X1.materialize(), x1)
            assert [X0._version, X1._version] == versions
        else:
            expected = [x0.clone(), x1.clone().T]
            torch._foreach_add_(expected, [y0, y1])
            assert torch.equal(X0.materialize(), expected[0]) and torch.equal(X1.materialize(), expected[1].T)
            assert X0._version > versions[0] and X1._version > versions[1]
