"""The pager's own tensor work runs with the caller's dispatch modes off.

Under ``FakeTensorMode`` (shape and memory estimation, ``CrossRefFakeMode``) or a tracing mode, the
pager's slabs, page copies and materialized copies are its own bytes, not values of the mode: made
under it, a slab was a FakeTensor kept for every later op, and a fault-in's copy was faked, the
pages marked resident with their bytes never copied.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from pagedtensor import MemoryConfig, PagedTensor, Pager

PAGE = 4096


def make_pager(device_pages: int, slab_pages: int) -> Pager:
    return Pager(MemoryConfig(page_size=PAGE, vram_limit=device_pages * PAGE, host_memory=64 * PAGE, slab_size=slab_pages * PAGE,
                              prefetch_strategy="none", device="cpu"))  # fmt: skip


def test_an_op_failing_under_fake_tensor_mode_leaves_the_pager_usable():
    """``F.linear(fake_x, paged_weight)`` raises as it does with a plain weight; the host slab it
    grew under the mode was a FakeTensor, and every later read of the weight raised."""
    pager = make_pager(device_pages=4, slab_pages=4)
    a0, b0, x = torch.randn(64, 64), torch.randn(64, 64), torch.randn(2, 64)
    weight = PagedTensor.wrap(a0, pager)
    other = PagedTensor.wrap(b0, pager)  # fills the device tier: the weight's pages go to the host
    with FakeTensorMode() as mode:
        fake_x = mode.from_tensor(x)
        with pytest.raises(AssertionError, match="FakeTensor"):
            F.linear(fake_x, a0)
        with pytest.raises(AssertionError, match="FakeTensor"):
            F.linear(fake_x, weight)
    assert not any(isinstance(slab, FakeTensor) for slab in (*pager.host_tier.slabs, *pager.device_tier.slabs))
    assert torch.equal(weight.materialize(), a0)
    assert torch.equal(F.linear(x, weight), F.linear(x, a0)) and torch.equal(other.materialize(), b0)


def test_a_fault_under_a_fake_mode_taking_real_inputs_copies_the_bytes():
    """Under ``FakeTensorMode(allow_non_fake_inputs=True)`` a paged weight faulted in was marked
    resident with its bytes never copied (the copy was faked): its values were lost, silently."""
    pager = make_pager(device_pages=8, slab_pages=8)
    a0, x = torch.randn(64, 64), torch.randn(2, 64)
    doubled = a0 * 2
    weight = PagedTensor.wrap(a0, pager)
    zeros = PagedTensor.wrap(torch.zeros(128, 64), pager)  # fills the device tier
    with FakeTensorMode(allow_non_fake_inputs=True):
        result = F.linear(x, weight)
        wrapped = PagedTensor.wrap(doubled, pager)
    assert isinstance(result, FakeTensor) and result.shape == (2, 64)
    assert torch.equal(weight.materialize(), a0)
    assert torch.equal(wrapped.materialize(), doubled) and not zeros.materialize().any()


def test_from_tensor_and_cross_ref_fake_mode_take_a_paged_tensor():
    """``mode.from_tensor(paged)`` inside the mode (what ``CrossRefFakeMode`` does for every op)
    raised: materializing ran its slice of the slab under the mode."""
    from torch._subclasses.fake_utils import CrossRefFakeMode

    pager = make_pager(device_pages=16, slab_pages=16)
    x = torch.randn(64, 64)
    paged = PagedTensor.wrap(x, pager)
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(paged)
        assert fake.shape == x.shape and fake.dtype == x.dtype
        assert paged.tolist() == x.tolist()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with CrossRefFakeMode():
            result = paged * 2 + 1
    assert torch.equal(result.materialize() if isinstance(result, PagedTensor) else result, x * 2 + 1)


def test_in_place_and_foreach_ops_under_a_fake_mode_taking_real_inputs_leave_the_pages_alone():
    """Under ``FakeTensorMode(allow_non_fake_inputs=True)`` an optimizer step over paged parameters
    (``_foreach_add_``), ``index_put_`` and ``add`` run as on plain tensors: fake results, the real
    values untouched, no warning (a bounded write view was made under the mode, a fake tensor that
    ``set_`` to the slab refused; a result's data pointer was read: FakeTensor's warning)."""
    pager = make_pager(device_pages=64, slab_pages=64)
    a0 = torch.randn(24, 256)
    weight = torch.nn.Parameter(PagedTensor.wrap(a0.clone(), pager))
    weight.grad = torch.ones_like(a0)
    optimizer = torch.optim.SGD([weight], lr=0.1, foreach=True)
    table = PagedTensor.wrap(a0.clone(), pager)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with FakeTensorMode(allow_non_fake_inputs=True):
            optimizer.step()
            table.index_put_((torch.tensor([1]),), torch.tensor(1.0))
            torch._foreach_add_([table], 1.0)
            added = table.add(1)
    assert isinstance(added, FakeTensor) and added.shape == a0.shape
    assert torch.equal(weight.detach().materialize(), a0) and torch.equal(table.materialize(), a0)
