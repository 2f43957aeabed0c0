"""The pager's own buffers do not follow torch's default device: inside ``with torch.device("meta")``
(accelerate's ``init_empty_weights``) or after ``torch.set_default_device``, host slabs, disk
buffers, the pages read for ``torch.save`` / ``copy.deepcopy`` and the ops past the tier still hold
the bytes, on the CPU where the pager keeps them."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from pagedtensor import MemoryConfig, PagedTensor, Pager
from tests.support import CPU_AND_CUDA

PAGE = 4096


def make_pager(device_pages: int, host_pages: int, nvme_dir: str | None = None, device: str = "cpu") -> Pager:
    return Pager(MemoryConfig(page_size=PAGE, vram_limit=device_pages * PAGE, host_memory=host_pages * PAGE, slab_size=host_pages * PAGE,
                              nvme_path=nvme_dir, prefetch_strategy="none", device=device))  # fmt: skip


@pytest.fixture(params=["meta context", "set_default_device"])
def default_device_meta(request):
    """Runs the test body with the default device meta, one way or the other."""
    if request.param == "meta context":
        with torch.device("meta"):
            yield
        return
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_save_deepcopy_and_materialize_read_the_bytes(default_device_meta, device):
    x = torch.randn(64, 256, device="cpu")  # 16 pages, twice the device tier
    with make_pager(8, 64, device=device) as pager:
        paged = PagedTensor.wrap(x.clone(), pager)
        saved = io.BytesIO()
        torch.save(paged, saved)
        assert torch.equal(copy.deepcopy(paged).materialize().cpu(), x)
        assert torch.equal(paged.materialize().cpu(), x)
        loaded = torch.load(io.BytesIO(saved.getvalue()), map_location="cpu")
        values = loaded.materialize().cpu() if isinstance(loaded, PagedTensor) else loaded
        assert values.device.type == "cpu" and torch.equal(values, x)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_pages_spilled_to_a_host_slab_grown_there_keep_their_bytes(default_device_meta, nvme_dir, device):
    x = torch.randn(64, 256, device="cpu")
    with make_pager(4, 8, nvme_dir, device=device) as pager:  # a fresh pager: its host slab and disk buffers grow under the default device
        paged = PagedTensor.wrap(x.clone().to(device), pager)
        assert pager.stats()["resident_bytes"]["disk"] > 0
        assert all(slab.device.type == "cpu" for slab in pager.host_tier.slabs)
        rows = torch.tensor([60, 2, 33], device=device)
        paged[rows] = torch.ones(3, 256, device=device)  # a row scatter past the tier
        expected = x.clone()
        expected[[60, 2, 33]] = 1
        assert torch.equal(paged.materialize().cpu(), expected)
