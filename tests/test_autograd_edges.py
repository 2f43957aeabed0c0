"""Autograd's bookkeeping around PagedTensors, against plain tensors: version counters bumped by the
list ops optimizers step with (``foreach``), forward-mode AD's tangent layout, and the refusal of
``data_ptr`` where autograd keys tensors by it. CPU pagers with 4 KiB pages; on CUDA too."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from pagedtensor import MemoryConfig, PagedTensor, Pager
from tests.support import CPU_AND_CUDA

PAGE = 4096
MODIFIED = "modified by an inplace operation"


def make_pager(device: str, device_pages: int = 16) -> Pager:
    return Pager(MemoryConfig(page_size=PAGE, vram_limit=device_pages * PAGE, host_memory=64 * PAGE,
                              slab_size=64 * PAGE, prefetch_strategy="none", device=device))  # fmt: skip


FOREACH_WRITES = {
    "add_ list": lambda xs, ys: torch._foreach_add_(xs, ys),
    "mul_ scalar": lambda xs, ys: torch._foreach_mul_(xs, 0.5),
    "addcmul_": lambda xs, ys: torch._foreach_addcmul_(xs, ys, ys, value=0.1),
    "copy_": lambda xs, ys: torch._foreach_copy_(xs, ys),
    "zero_": lambda xs, ys: torch._foreach_zero_(xs),
    "lerp_": lambda xs, ys: torch._foreach_lerp_(xs, ys, 0.25),
}


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("name", sorted(FOREACH_WRITES))
@pytest.mark.parametrize("device_pages", [16, 4], ids=["fits", "past-the-tier"])
def test_foreach_writes_bump_the_version_of_each_paged_tensor_they_write(device, name, device_pages):
    """torch's foreach kernels bump the version of every tensor they write, so a backward that saved
    one raises; a PagedTensor's op never reaches them (a silently wrong gradient after an optimizer
    step with ``foreach=True``). The tensors read keep their versions, as plain ones do."""
    write = FOREACH_WRITES[name]
    with make_pager(device, device_pages) as pager:
        values = [torch.randn(40, 40, device=device), torch.randn(3, device=device)]
        plain = [v.clone() for v in values]
        paged = [PagedTensor.wrap(v.clone(), pager) for v in values]
        sources = [torch.randn_like(v) for v in values]
        paged_sources = [PagedTensor.wrap(s.clone(), pager) for s in sources]
        plain_before = [t._version for t in plain + sources]
        paged_before = [t._version for t in paged + paged_sources]
        write(plain, sources)
        write(paged, paged_sources)
        plain_bumped = [after != before for after, before in zip([t._version for t in plain + sources], plain_before)]
        paged_bumped = [after != before for after, before in zip([t._version for t in paged + paged_sources], paged_before)]
        assert paged_bumped == [True, True, False, False], name
        # torch 2.11's CUDA kernels of _foreach_zero_ and _foreach_lerp_ bump no version (its others
        # and every CPU one do): a paged tensor's always bumps, so a backward raises as for the others
        assert plain_bumped[2:] == [False, False], name
        if device == "cpu":
            assert plain_bumped == paged_bumped, name
        for got, expected in zip(paged, plain):
            assert torch.equal(got.materialize(), expected), name


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_backward_after_a_foreach_optimizer_step_raises_as_for_plain_parameters(device):
    with make_pager(device) as pager:
        for paged in (False, True):
            start = torch.arange(16.0, device=device).view(4, 4)
            weight = torch.nn.Parameter(PagedTensor.wrap(start, pager) if paged else start.clone())
            optimizer = torch.optim.SGD([weight], lr=0.1, foreach=True)
            loss = (weight * weight).sum()  # saves weight
            loss.backward(retain_graph=True)
            optimizer.step()
            with pytest.raises(RuntimeError, match=MODIFIED):
                loss.backward()


def test_foreach_writes_under_inference_mode_leave_inference_tensors_be():
    with make_pager("cpu") as pager, torch.inference_mode():
        paged = [PagedTensor.wrap(torch.ones(4), pager)]
        torch._foreach_add_(paged, 1.0)
        assert paged[0].is_inference() and torch.equal(paged[0].materialize(), torch.full((4,), 2.0))


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_forward_ad_through_a_paged_primal_equals_plain(device):
    """make_dual lays the tangent out as the primal's storage (its size and offset): read from the
    PagedTensor's metadata, not from the slab its pages sit in (a slab-sized tangent at the slot's
    offset, and torch's internal assert on the next view op)."""
    with make_pager(device) as pager:
        for round_ in range(3):  # the pages' slots move between rounds
            values = torch.randn(6, 5, device=device)
            base = PagedTensor.wrap(values, pager)
            for primal, plain_primal in ((base, values), (base[2:5, 1:], values[2:5, 1:])):
                tangent = torch.randn(plain_primal.shape, device=device)
                layout = torch.ops.aten._new_zeros_with_same_feature_meta(tangent, primal)
                plain_layout = torch.ops.aten._new_zeros_with_same_feature_meta(tangent, plain_primal)
                assert (layout.storage_offset(), layout.untyped_storage().nbytes(), layout.stride()) == (
                    plain_layout.storage_offset(), plain_layout.untyped_storage().nbytes(), plain_layout.stride())
                assert not isinstance(layout, PagedTensor) and layout.device == tangent.device
                assert torch.ops.aten._has_same_storage_numel(primal, plain_primal)
                assert not torch.ops.aten._has_same_storage_numel(primal, tangent) or primal is base
                results = []
                for p in (primal, plain_primal):
                    with fwAD.dual_level():
                        dual = fwAD.make_dual(p, tangent)
                        out = fwAD.unpack_dual((dual.t() * 2).sin())
                        results.append((out.primal, out.tangent))
                for got, expected in zip(results[0], results[1]):
                    got = got.materialize() if isinstance(got, PagedTensor) else got
                    assert torch.equal(got, expected), f"round {round_}"
            out, jvp = torch.func.jvp(lambda w: (w @ w.t()).sum(), (base,), (torch.ones(6, 5, device=device),))
            expected = torch.func.jvp(lambda w: (w @ w.t()).sum(), (values,), (torch.ones(6, 5, device=device),))
            assert torch.equal(out, expected[0]) and torch.equal(jvp, expected[1])


def test_data_ptr_refusal_names_what_keys_tensors_by_address():
    """torch.autograd.graph.allow_mutation_on_saved_tensors keys saved tensors by data_ptr(), which a
    PagedTensor has none of: the refusal says so (it spoke of safetensors only)."""
    with make_pager("cpu") as pager:
        scale = torch.ones(4, requires_grad=True)
        with pytest.raises(RuntimeError, match="PagedTensor.data_ptr: .*allow_mutation_on_saved_tensors"):
            with torch.autograd.graph.allow_mutation_on_saved_tensors():
                paged = PagedTensor.wrap(torch.full((4,), 3.0), pager)
                product = scale * paged  # saves paged
                paged.mul_(2)
                product.sum().backward()
