"""An op past the device tier that cannot finish fails before writing anything, and one that can
finish does: pieces sized from the device pages pinned at the op's start (this thread's
``ensure_resident`` pins, a KV cache's hot pins), an up-front check for room in the tiers for the
pages an op newly writes, overwrites sized to the host room their kept copies leave, and
``materialize()`` reading in chunks that fit beside pinned pages."""

from __future__ import annotations

import gc
from typing import Callable

import pytest
import torch

from pagedtensor import DeviceTierFullError, MemoryConfig, OutOfPagesError, PagedTensor, Pager, PagerClosedError
from tests.support import CPU_AND_CUDA

PAGE = 4096


def make_pager(device: str = "cpu", device_pages: int = 8, host_pages: int = 256) -> Pager:
    return Pager(MemoryConfig(page_size=PAGE, vram_limit=device_pages * PAGE, host_memory=host_pages * PAGE,
                              slab_size=max(device_pages, host_pages) * PAGE, prefetch_strategy="none", device=device,
                              pin_wait_s=0))  # fmt: skip


# In-place ops past the tier, each with the values it leaves (16-page float32 tables of 64 x 256).
IN_PLACE: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "mul_": lambda t, x: t.mul_(2),
    "add_ row": lambda t, x: t.add_(torch.arange(256.0, device=x.device)),
    "copy_": lambda t, x: t.copy_(x * 3),
    "fill_": lambda t, x: t.fill_(1.5),
    "zero_": lambda t, x: t.zero_(),
    "masked_fill_": lambda t, x: t.masked_fill_(x > 0, 0.0),
    "index_add_": lambda t, x: t.index_add_(0, torch.arange(64, device=x.device), torch.ones(64, 256, device=x.device)),
    "add out=": lambda t, x: torch.add(x, 1, out=t),
    "_foreach_mul_": lambda t, x: torch._foreach_mul_([t], 2),
}


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("name", sorted(IN_PLACE))
@pytest.mark.parametrize("pinned", ["own", "other"])
@pytest.mark.parametrize("pins", [3, 6])
def test_an_in_place_op_past_the_tier_runs_in_pieces_that_fit_beside_the_callers_pins(device, name, pinned, pins):
    """A 16-page table on an 8-page tier, with ``pins`` device pages pinned by the caller (of the table
    itself, or of another allocation: a cache's hot pins): the op runs in pieces that fit beside
    them, and bumps the version. (Pieces of the whole tier less a page raised DeviceTierFullError
    after the first piece was written, the version not bumped.)"""
    op = IN_PLACE[name]
    x = torch.randn(64, 256, device=device)
    expected = x.clone()
    op(expected, x)
    with make_pager(device) as pager:
        t = PagedTensor.wrap(x.clone(), pager=pager)
        other = PagedTensor.wrap(torch.randn(8 * 1024, device=device), pager=pager)
        version = t._version
        with pager.ensure_resident((t if pinned == "own" else other).allocation, 0, pins):
            op(t, x)
        assert torch.equal(t.materialize(), expected)
        assert t._version > version


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("name", sorted(IN_PLACE))
@pytest.mark.parametrize("pinned", ["own", "other"])
def test_an_in_place_op_with_no_room_for_a_piece_beside_the_pins_raises_before_writing(device, name, pinned):
    """7 of 8 device pages pinned: no piece of 2 pages fits, so the op raises DeviceTierFullError
    before writing anything, however many pages of the table are among the pinned ones (a piece of
    those fitted, and was written before the next raised)."""
    op = IN_PLACE[name]
    x = torch.randn(64, 256, device=device)
    with make_pager(device) as pager:
        t = PagedTensor.wrap(x.clone(), pager=pager)
        other = PagedTensor.wrap(torch.randn(8 * 1024, device=device), pager=pager)
        with pager.ensure_resident((t if pinned == "own" else other).allocation, 0, 7):
            with pytest.raises(DeviceTierFullError):
                op(t, x)
        assert torch.equal(t.materialize(), x)


def test_a_failed_in_place_op_leaves_what_autograd_saved_as_it_was():
    """The bug's consequence: ``t`` saved for ``x``'s gradient, a failing ``t.mul_(2)`` under pins
    half-wrote it without a version bump, and backward silently used the new values. Now the op
    completes and bumps the version, so backward refuses the modified tensor."""
    with make_pager() as pager:
        t0 = torch.randn(64, 256)
        t = PagedTensor.wrap(t0.clone(), pager=pager)
        x = torch.randn(64, 256, requires_grad=True)
        y = (t * x).sum()
        with pager.ensure_resident(t.allocation, 0, 3):
            t.mul_(2)
        assert torch.equal(t.materialize(), t0 * 2)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.backward()


def discarded_table(device: str, other_pages: int) -> tuple[Pager, PagedTensor, torch.Tensor, PagedTensor]:
    """A 16-page table on a pager of 8 device and 10 host pages, its last 8 pages discarded (read
    as zeros), beside another allocation of ``other_pages`` pages: the table's values, and that one."""
    pager = make_pager(device, device_pages=8, host_pages=10)
    x = torch.randn(64, 256, device=device)
    t = PagedTensor.wrap(x.clone(), pager=pager)
    pager.discard(t.allocation, 8, 16)
    x[32:] = 0
    return pager, t, x, PagedTensor.wrap(torch.randn(other_pages * 1024, device=device), pager=pager)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("name", ["mul_", "add_ row", "copy_", "fill_", "zero_", "add out="])
def test_an_op_writing_more_new_pages_than_the_tiers_hold_raises_before_writing(device, name):
    """8 discarded pages to write, 7 free in the tiers (8 + 10 pages; 8 of the table's and 3 of
    another allocation held): OutOfPagesError before any piece is written (56 of 64 rows were)."""
    op = IN_PLACE[name]
    pager, t, x, other = discarded_table(device, other_pages=3)
    with pager:
        with pytest.raises(OutOfPagesError, match="hold no bytes yet"):
            op(t, x)
        del other
        gc.collect()
        assert torch.equal(t.materialize(), x)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("name", ["mul_", "add_ row", "copy_", "fill_", "zero_", "add out="])
def test_an_op_writing_as_many_new_pages_as_the_tiers_hold_runs(device, name):
    """The check's bound is the pager's own: with 8 pages free (another allocation of 2 pages) the
    8 discarded pages are written. (The tiers are then full: reading the table back needs a free
    slot, which freeing the other allocation gives.)"""
    op = IN_PLACE[name]
    pager, t, x, other = discarded_table(device, other_pages=2)
    with pager:
        expected = x.clone()
        op(expected, x)
        op(t, x)
        del other
        gc.collect()
        assert torch.equal(t.materialize(), expected)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("host_pages", [9, 12, 14])
@pytest.mark.parametrize("name", ["copy_", "fill_", "zero_"])
def test_an_overwrite_past_the_tier_runs_where_a_read_modify_write_does(device, host_pages, name):
    """A 16-page table on 8 device pages and a host tier of ``host_pages`` (8 of the table's pages
    there, 8 on the device): ``mul_`` ran, while ``fill_``/``zero_``/``copy_`` raised OutOfPagesError
    ("host tier full"), their pieces' pages keeping their host copies until each piece was done
    beside the device pages leaving for the host. Their pieces now fit the host room."""
    op = IN_PLACE[name]
    x = torch.randn(64, 256, device=device)
    with make_pager(device, device_pages=8, host_pages=host_pages) as pager:
        t = PagedTensor.wrap(x.clone(), pager=pager)
        t.mul_(2)
        expected = x * 2
        op(expected, x)
        op(t, x)
        assert torch.equal(t.materialize(), expected)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("pins", [5, 7])
def test_materialize_reads_in_chunks_that_fit_beside_pinned_pages(device, pins):
    """A 4-page tensor with ``pins`` of 8 device pages pinned: read in chunks of the free pages
    (chunks of half the tier raised DeviceTierFullError with 3 slots free)."""
    with make_pager(device) as pager:
        a = PagedTensor.wrap(torch.randn(32, 256, device=device), pager=pager)
        x = torch.randn(16, 256, device=device)
        s = PagedTensor.wrap(x.clone(), pager=pager)
        with pager.ensure_resident(a.allocation, 0, pins):
            assert torch.equal(s.materialize(), x)
            assert torch.equal(pager.read(s.allocation).view(torch.float32).view(16, 256).to(device), x)


def test_a_broadcast_operand_on_a_closed_pager_raises_naming_the_op():
    """``t.add_(row)`` past the tier with ``row`` on a closed pager: PagerClosedError names
    ``aten.add_.Tensor``, as for an operand of the table's shape, not the internal read
    ``PagedTensor.materialize``."""
    with make_pager() as pager, make_pager() as closed:
        t = PagedTensor.wrap(torch.randn(64, 256), pager=pager)
        row = PagedTensor.wrap(torch.randn(256), pager=closed)
        scalar = PagedTensor.wrap(torch.tensor(2.0), pager=closed)
        closed.close()
        with pytest.raises(PagerClosedError, match=r"^aten\.add_\.Tensor: the pager is closed"):
            t.add_(row)
        with pytest.raises(PagerClosedError, match=r"^aten\.mul_\.Tensor: the pager is closed"):
            t.mul_(scalar)
        source = PagedTensor.wrap(torch.randn(8, 256), pager=pager)
        with make_pager() as other:
            closed_source = PagedTensor.wrap(torch.randn(8, 256), pager=other)
        with pytest.raises(PagerClosedError, match=r"^aten\.index_add_\.default: the pager is closed"):
            t.index_add_(0, torch.arange(8), closed_source)  # a handler's read of the source whole
        t.index_add_(0, torch.arange(8), source)


def test_other_threads_pieces_are_waited_for_not_counted_as_lasting_pins():
    """Two threads each run an in-place op past the tier on their own tensor of one pager: each
    piece's pins are another's for a moment, which a piece waits for (``pin_wait_s``). Pieces
    sized beside every thread's pins took those for lasting ones: half the ops raised
    DeviceTierFullError at once."""
    import threading

    with Pager(MemoryConfig(page_size=PAGE, vram_limit=16 * PAGE, host_memory=512 * PAGE, slab_size=512 * PAGE,
                            prefetch_strategy="none", device="cpu", pin_wait_s=10.0)) as pager:  # fmt: skip
        g = torch.Generator().manual_seed(0)
        expected = [torch.randn(640, 64, generator=g) for _ in range(2)]  # 40 pages each
        tensors = [PagedTensor.wrap(x.clone(), pager=pager) for x in expected]
        errors: list[BaseException] = []

        def work(t: PagedTensor, x: torch.Tensor) -> None:
            for _ in range(15):
                try:
                    t.add_(1.0)
                except BaseException as error:  # noqa: BLE001 - reported below
                    errors.append(error)
                    return
                x.add_(1.0)

        threads = [threading.Thread(target=work, args=pair) for pair in zip(tensors, expected)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        assert not errors, errors[0]
        for t, x in zip(tensors, expected):
            assert torch.equal(t.materialize(), x)


@pytest.mark.parametrize("name", ["_foreach_add_", "cat", "plain copy_"])
def test_no_piece_beside_the_threads_pins_names_the_op(name):
    """3 of 4 device pages pinned by this thread: list ops, ``torch.cat`` and a copy into a plain
    tensor, which size their parts without the op's name, raise DeviceTierFullError naming the op."""
    with make_pager(device_pages=4) as pager:
        a = PagedTensor.wrap(torch.randn(160, 64), pager=pager)  # 10 pages
        b = PagedTensor.wrap(torch.randn(160, 64), pager=pager)
        other = PagedTensor.wrap(torch.randn(64, 64), pager=pager)
        op, words = {
            "_foreach_add_": (lambda: torch._foreach_add_([a], [b]), "aten._foreach_add_.List"),
            "cat": (lambda: torch.cat([a, b]), "aten.cat.default"),
            "plain copy_": (lambda: torch.empty(160, 64).copy_(a), "aten.copy_.default"),
        }[name]
        with pager.ensure_resident(other.allocation, 0, 3):
            with pytest.raises(DeviceTierFullError, match=words + r": its PagedTensor arguments need more pages"):
                op()


# Ops writing a whole (48, 256) float32 table (12 pages) by the paths past the tier that write in
# pieces or parts other than the elementwise pieces: list ops, row and mask scatters, copies in parts.
# Each takes the table and a plain source of its shape.
WRITING_NEW_PAGES: dict[str, Callable[[torch.Tensor, torch.Tensor], object]] = {
    "_foreach_copy_": lambda t, s: torch._foreach_copy_([t], [s]),
    "_foreach_add_": lambda t, s: torch._foreach_add_([t], [s]),
    "index_copy_": lambda t, s: t.index_copy_(0, torch.arange(48, device=s.device), s),
    "t[idx] = v": lambda t, s: t.__setitem__(torch.arange(48, device=s.device), s),
    "masked_fill_": lambda t, s: t.masked_fill_(torch.ones(48, 256, dtype=torch.bool, device=s.device), 2.0),
    "masked_scatter_": lambda t, s: t.masked_scatter_(torch.ones(48, 256, dtype=torch.bool, device=s.device), s),
    "scatter_ dim 0": lambda t, s: t.scatter_(0, torch.arange(48, device=s.device)[:, None].expand(48, 256), s),
    "scatter_ dim 1": lambda t, s: t.scatter_(1, torch.arange(256, device=s.device).expand(48, 256), s),
    "cat(out=)": lambda t, s: torch.cat([s[:24], s[24:]], out=t),
    "stack(out=)": lambda t, s: torch.stack([s[:24], s[24:]], out=t.view(2, 24, 256)),
    "copy_ transposed": lambda t, s: t.copy_(s.T.contiguous().T),
    "index_copy_ dim 1": lambda t, s: t.index_copy_(1, torch.arange(256, device=s.device), s),
    "t[:, idx] = v": lambda t, s: t.__setitem__((slice(None), torch.arange(256, device=s.device)), s),
    "tril_": lambda t, s: t.tril_(),
}


def discarded_target(device: str, other_pages: int) -> tuple[Pager, PagedTensor, PagedTensor]:
    """A 12-page table whose pages hold no bytes (discarded: it reads as zeros) on a pager of 4 device
    and 12 host pages, no disk tier, beside another allocation of ``other_pages`` pages (room for
    ``16 - other_pages`` new pages): the pager, the table, and that one."""
    pager = make_pager(device, device_pages=4, host_pages=12)
    t = PagedTensor.wrap(torch.randn(48, 256, device=device), pager=pager)
    pager.discard(t.allocation)
    return pager, t, PagedTensor.wrap(torch.randn(other_pages * 1024, device=device), pager=pager)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("name", sorted(WRITING_NEW_PAGES))
def test_a_path_writing_in_parts_refuses_new_pages_without_room_before_writing(device, name):
    """12 pages holding no bytes to write, room for 6 (another allocation of 10 pages): every path
    that writes in pieces or parts raises OutOfPagesError before its first part, the table holding
    no page and reading as zeros, its version as it was (list ops, row and mask scatters and
    ``cat(out=)`` wrote 6 pages, then raised)."""
    op = WRITING_NEW_PAGES[name]
    source = torch.randn(48, 256, device=device)
    pager, t, other = discarded_target(device, other_pages=10)
    with pager:
        version = t._version
        with pytest.raises(OutOfPagesError, match="hold no bytes yet"):
            op(t, source)
        held = [page for page in t.allocation.pages if (page.device_slot, page.host_slot, page.disk_slot) != (None, None, None)]
        assert not held, f"{name}: {len(held)} pages written before the refusal"
        assert t._version == version
        del other
        gc.collect()
        assert torch.equal(t.materialize(), torch.zeros(48, 256, device=device))


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("name", sorted(WRITING_NEW_PAGES))
def test_a_path_writing_in_parts_with_room_for_its_new_pages_runs_as_dense(device, name):
    """The same table with room for 12 new pages (another allocation of 3 pages: 13 free) and no more
    refused: the op runs, the table equal bit for bit to the dense op's on zeros."""
    op = WRITING_NEW_PAGES[name]
    source = torch.randn(48, 256, device=device)
    pager, t, other = discarded_target(device, other_pages=3)
    with pager:
        expected = torch.zeros(48, 256, device=device)
        op(expected, source)
        op(t, source)
        del other
        gc.collect()
        assert torch.equal(t.materialize(), expected)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_a_row_scatter_counts_only_the_new_pages_of_the_rows_it_writes(device):
    """Room for 6 new pages: ``index_copy_`` of 8 rows (2 pages) and ``t[rows] = v`` of 12 rows (3
    pages) into the discarded table run (only the written rows' pages are new, not its 12), bit for
    bit as dense."""
    pager, t, other = discarded_target(device, other_pages=10)
    with pager:
        expected = torch.zeros(48, 256, device=device)
        rows, values = torch.arange(8, 16, device=device), torch.randn(8, 256, device=device)
        t.index_copy_(0, rows, values)
        expected.index_copy_(0, rows, values)
        rows, values = torch.arange(24, 36, device=device), torch.randn(12, 256, device=device)
        t[rows] = values
        expected[rows] = values
        del other
        gc.collect()
        assert torch.equal(t.materialize(), expected)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("name", ["cat 1", "cat 0", "stack"])
def test_cat_beside_the_threads_pins_copies_one_input_at_a_time(device, name):
    """Two 16-page tensors on an 8-page tier of which this thread pins 5 (3 free: no piece of each at
    once): ``torch.cat``/``torch.stack`` copy one input at a time, as on a 3-page tier, equal bit for
    bit to the dense op (it raised DeviceTierFullError)."""
    op = {"cat 1": lambda a, b: torch.cat([a, b], 1), "cat 0": lambda a, b: torch.cat([a, b]), "stack": lambda a, b: torch.stack([a, b])}[name]
    a, b = torch.randn(64, 256, device=device), torch.randn(64, 256, device=device)
    with make_pager(device) as pager:
        pa, pb = PagedTensor.wrap(a.clone(), pager=pager), PagedTensor.wrap(b.clone(), pager=pager)
        other = PagedTensor.wrap(torch.randn(32, 256, device=device), pager=pager)
        with pager.ensure_resident(other.allocation, 0, 5):
            got = op(pa, pb)
        assert torch.equal(got, op(a, b))
        assert torch.equal(pa.materialize(), a) and torch.equal(pb.materialize(), b)
