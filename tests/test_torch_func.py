"""PagedTensors inside ``torch.func`` transforms: the pager's own tensors are made and moved below
the transforms, so faults inside ``grad`` / ``jvp`` / ``vmap`` give torch's results and leave the
pager usable afterwards (a slab grown inside a transform was kept as a storage-less wrapper, and a
copy into a page was refused as a mutation of a captured tensor)."""

from __future__ import annotations

import pytest
import torch
import torch.func as tf
import torch.nn.functional as F

from pagedtensor import MemoryConfig, PagedTensor, Pager
from pagedtensor.dispatch import paged_linear
from tests.support import CPU_AND_CUDA

PAGE = 4096


def make_pager(device_pages: int = 64, device: str = "cpu") -> Pager:
    return Pager(MemoryConfig(page_size=PAGE, vram_limit=device_pages * PAGE, host_memory=256 * PAGE, slab_size=64 * PAGE,
                              prefetch_strategy="none", device=device))  # fmt: skip


TRANSFORMS = {
    "grad": lambda linear, x, w, v: tf.grad(lambda s: (linear(x, w) * s).sum())(v),
    "jvp": lambda linear, x, w, v: tf.jvp(lambda a: linear(a, w), (x,), (x * 0.5,))[1],
    "vjp": lambda linear, x, w, v: tf.vjp(lambda a: linear(a, w), x)[1](v)[0],
    "vmap": lambda linear, x, w, v: tf.vmap(lambda a: linear(a, w))(x),
    "grad of vmap": lambda linear, x, w, v: tf.grad(lambda a: tf.vmap(lambda r: linear(r, w))(a).pow(2).sum())(x),
}


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("name", sorted(TRANSFORMS))
@pytest.mark.parametrize("evicted", [False, True])
def test_paged_linear_inside_a_transform_equals_linear(name, evicted, device):
    generator = torch.Generator().manual_seed(0)
    w, x, v = (torch.randn(shape, generator=generator).to(device) for shape in ((32, 64), (5, 64), (5, 32)))
    with make_pager(device=device) as pager:
        paged = PagedTensor.wrap(w.clone(), pager)
        if evicted:
            pager.evict_all()
        expected = TRANSFORMS[name](F.linear, x, w, v)
        assert torch.equal(TRANSFORMS[name](paged_linear, x, paged, v), expected)
        assert torch.equal(TRANSFORMS[name](F.linear, x, paged, v), expected)
        assert torch.equal(paged_linear(x, paged), F.linear(x, w))  # the pager still works outside
        assert not any(page.pin_count for page in paged._paged.allocation.pages)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_wrap_and_materialize_inside_a_transform(device):
    """A tensor captured from outside is wrapped inside ``grad`` as a constant of it (a fresh pager
    grows its first slab there); ``materialize`` of evicted pages reads them; one of the transform's
    own tensors is refused by name; afterwards the pager runs ops as before."""
    generator = torch.Generator().manual_seed(1)
    w, v = torch.randn(32, 64, generator=generator).to(device), torch.randn(3, generator=generator).to(device)
    with make_pager(device=device) as pager:
        got = tf.grad(lambda s: (PagedTensor.wrap(w, pager) * s[0]).sum())(v)
        assert torch.equal(got, tf.grad(lambda s: (w * s[0]).sum())(v))
        paged = PagedTensor.wrap(w.clone(), pager)
        pager.evict_all()
        got = tf.grad(lambda s: (paged.materialize() * s[0]).sum())(v)
        assert torch.equal(got, tf.grad(lambda s: (w * s[0]).sum())(v))
        with pytest.raises(TypeError, match="belongs to a torch.func transform.*wrap the tensor outside"):
            tf.grad(lambda s: (PagedTensor.wrap(s * 2, pager)).sum())(v)
        with pytest.raises(TypeError, match="belongs to a torch.func transform"):
            tf.vmap(lambda r: PagedTensor.wrap(r, pager))(w)
        assert torch.equal(paged * 2, w * 2)
        assert torch.equal(PagedTensor.wrap(w.clone(), pager) * 2, w * 2)
