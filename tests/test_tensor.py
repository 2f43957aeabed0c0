"""PagedTensor: wrap, the dispatcher's precedence, page-granular faults, dirty tracking, views,
nn.Parameter, save/load, residency and repr. CPU pagers with 4 KiB pages and budgets of a few pages."""

from __future__ import annotations

import contextlib

import copy
import gc
import io
import logging
import multiprocessing
import random
import threading
import weakref

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
import torch.nn.functional as F

import pagedtensor
from pagedtensor import DeviceTierFullError, MemoryConfig, OutOfPagesError, PagedTensor, Pager
from pagedtensor.dispatch import DISPATCHER, implements, touched_pages
from tests.support import CPU_AND_CUDA, ClosedWhileWaiting, exit_zero_if_paged_and_equal, run_in_threads

PAGE = 4096
aten = torch.ops.aten


def make_pager(device_pages: int = 8, host_pages: int = 256, device: str = "cpu", **overrides) -> Pager:
    config = dict(
        page_size=PAGE,
        vram_limit=device_pages * PAGE,
        host_memory=host_pages * PAGE,
        slab_size=max(device_pages, host_pages) * PAGE,
        prefetch_strategy="none",
        device=device,
    )
    config.update(overrides)
    return Pager(MemoryConfig(**config))


@pytest.fixture(params=CPU_AND_CUDA)
def pager(request):
    """A pager with 8 device pages of 4 KiB; on the CPU, and on the GPU where there is one."""
    with make_pager(device=request.param) as p:
        yield p


@pytest.fixture
def default_pager():
    """A small default pager for tests that load or wrap without naming one."""
    p = make_pager()
    previous = pagedtensor.set_default_pager(p)
    yield p
    pagedtensor.set_default_pager(previous)
    p.close()


def rows_tensor(rows: int = 16, cols: int = 256, dtype=torch.float32, seed: int = 0, device="cpu") -> torch.Tensor:
    """fp32 rows of 1 KiB: four rows a page."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g).to(device=device, dtype=dtype)


def delta(pager: Pager, before: dict, *names: str) -> dict:
    after = pager.stats()
    return {name: after[name] - before[name] for name in names}


# ---------------------------------------------------------------------- wrap


def test_wrap_keeps_shape_dtype_strides_and_values(pager):
    x = rows_tensor(device=pager.device)
    t = PagedTensor.wrap(x, pager)
    assert isinstance(t, PagedTensor)
    assert (t.shape, t.dtype, t.stride(), t.device) == (x.shape, x.dtype, x.stride(), pager.device)
    assert torch.equal(t.materialize(), x)
    assert t.allocation.nbytes == x.numel() * 4
    assert pager.stats()["allocations"] == 1


def test_wrap_keeps_strides_of_transposed_and_expanded_sources(pager):
    base = rows_tensor(8, 64, device=pager.device)
    transposed = PagedTensor.wrap(base.t(), pager)
    assert transposed.stride() == base.t().stride()
    assert torch.equal(transposed.materialize(), base.t())
    expanded_source = torch.arange(8.0).reshape(8, 1).expand(8, 512)
    expanded = PagedTensor.wrap(expanded_source, pager)
    assert expanded.stride() == (1, 0)
    assert expanded.allocation.nbytes == 8 * 4  # only the span is stored
    assert torch.equal(expanded.materialize("cpu"), expanded_source)
    assert torch.equal(expanded.sum(1).cpu(), expanded_source.sum(1))


def test_wrap_compacts_a_sparse_view(pager):
    big = rows_tensor(64, 256, device=pager.device)
    sparse = big[::16, :4]
    t = PagedTensor.wrap(sparse, pager)
    assert t.is_contiguous() and t.allocation.nbytes == sparse.numel() * 4
    assert torch.equal(t.materialize(), sparse)


def test_wrap_zero_elements_and_requires_grad(pager):
    empty = PagedTensor.wrap(torch.empty(0, 5), pager)
    assert empty.shape == (0, 5) and empty.allocation is None
    assert (empty + 1).shape == (0, 5) and empty.device == pager.device
    assert empty.sum().item() == 0
    leaf = PagedTensor.wrap(torch.ones(3, requires_grad=True), pager)
    assert leaf.requires_grad and leaf.is_leaf


def test_wrap_of_a_paged_tensor(pager):
    t = PagedTensor.wrap(rows_tensor(device=pager.device), pager)
    assert PagedTensor.wrap(t, pager) is t
    with make_pager() as other:
        moved = PagedTensor.wrap(t[2:5], other)
        assert moved.pager is other and torch.equal(moved.materialize("cpu"), t[2:5].materialize("cpu"))
        for dtype in (torch.float32, torch.complex64):  # requires_grad kept, complex included
            leaf = PagedTensor.wrap(torch.ones(3, dtype=dtype, requires_grad=True), pager)
            assert PagedTensor.wrap(leaf, other).requires_grad, dtype
            assert not PagedTensor.wrap(leaf.detach(), other).requires_grad, dtype


def test_wrap_onto_another_pager_copies_from_pager_to_pager(pager, monkeypatch):
    """A PagedTensor larger than the other pager's device tier goes over a chunk of pages at a time,
    never as one dense copy (it was materialized whole on its compute device first, outside both
    budgets): the same bytes, layout and ``requires_grad``, whatever the two pagers' page sizes."""
    source = rows_tensor(rows=64, cols=256, device=pager.device)  # 64 KiB: 16 pages here
    t = PagedTensor.wrap(source.requires_grad_(), pager)
    monkeypatch.setattr(PagedTensor, "materialize", lambda *args, **kwargs: pytest.fail("materialized whole"))
    with make_pager(device_pages=4, page_size=2 * PAGE, device=pager.device.type) as other:  # 32 KiB of device tier
        moved = {view: PagedTensor.wrap(value, other) for view, value in (("whole", t), ("rows", t[5:40]), ("columns", t.detach().mT[3:]))}
        monkeypatch.undo()
        for view, expected in (("whole", source), ("rows", source[5:40]), ("columns", source.detach().mT[3:])):
            got = moved[view]
            assert got.pager is other and (got.shape, got.stride()) == (expected.shape, expected.stride()), view
            assert got.requires_grad == expected.requires_grad and torch.equal(got.materialize(pager.device), expected), view


def _lazily_conjugated_and_negated(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Views of complex ``x`` (and of its imaginary part) that carry torch's lazy conjugate or
    negative bit, as ``A.mH`` of a complex matrix does."""
    return {
        "conj": x.conj(),
        "mH": x.mH,
        "conj_slice": x.conj()[1:, ::2],
        "neg_imag": x.conj().imag,
        "neg": torch._neg_view(x),
        "conj_neg": torch._neg_view(x.conj()),
        "conj_sparse": x.conj()[::4, :3],  # stored compacted, as any sparse view
    }


@pytest.mark.parametrize("kind", ["conj", "mH", "conj_slice", "neg_imag", "neg", "conj_neg", "conj_sparse"])
def test_wrap_of_a_lazily_conjugated_or_negated_view_gives_its_values_resolved(pager, kind):
    """``wrap`` of a view with torch's conjugate or negative bit, where it raised: the view's values
    with the bits resolved, as ``t.clone()`` gives them (pages a piece at a time past the tier), with
    its strides; op results are the view's, bit for bit, ``linalg.pinv`` among them, whose kernel
    reads a conjugate view's raw bits under any subclass (with the bits kept lazy, it came out
    wrong by units); in-place ops write the copy, not the source."""
    g = torch.Generator().manual_seed(3)
    source = torch.randn(6, 40, dtype=torch.complex64, generator=g).to(pager.device)
    view = _lazily_conjugated_and_negated(source)[kind]
    t = PagedTensor.wrap(view, pager)
    assert not t.is_conj() and not t.is_neg() and not view.clone().is_conj()
    assert (t.shape, t.dtype) == (view.shape, view.dtype)
    assert t.stride() == (view.stride() if kind != "conj_sparse" else view.contiguous().stride())
    assert torch.equal(t.materialize(), view.resolve_conj().resolve_neg())
    resolved = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(view)  # as t.clone() of the layout
    pager.evict_all()
    assert torch.equal(t * 2, resolved * 2) and torch.equal(t.sum(0), resolved.sum(0))
    square = (slice(0, 6), slice(0, 6))
    assert torch.equal(torch.linalg.pinv(t[square]), torch.linalg.pinv(resolved[square]))
    torch.testing.assert_close(torch.linalg.pinv(t[square]), torch.linalg.pinv(view[square]))
    t.add_(1)
    assert torch.equal(t.materialize(), resolved + 1)
    assert view.equal(_lazily_conjugated_and_negated(source)[kind])  # the source is not changed
    back = io.BytesIO()
    torch.save(t, back)
    back.seek(0)
    loaded = torch.load(back)
    assert not loaded.is_conj() and not loaded.is_neg() and torch.equal(loaded.materialize(), resolved + 1)
    leaf = PagedTensor.wrap(view.detach().requires_grad_(view.is_floating_point() or view.is_complex()), pager)
    assert leaf.requires_grad and leaf.is_leaf and torch.equal(leaf.materialize(), view.resolve_conj().resolve_neg())
    with make_pager() as other:  # and from another pager: the same values and requires_grad, a conjugated view of it resolved
        moved = PagedTensor.wrap(leaf, other)
        assert moved.requires_grad and not moved.is_conj() and torch.equal(moved.materialize(pager.device), leaf.materialize())
        if leaf.is_complex():
            moved_conj = PagedTensor.wrap(leaf.detach().conj(), other)
            assert not moved_conj.is_conj() and torch.equal(moved_conj.materialize(pager.device), leaf.materialize().conj())


def test_wrap_and_materialize_of_a_conjugated_and_negated_view_give_the_bits_of_its_clone(pager):
    """A view with both bits (``torch._neg_view(x.conj())``) of NaNs: ``wrap`` and ``materialize``
    conjugated, then negated, where torch's ``clone`` negates, then conjugates; on NaN elements its
    vectorized kernels give the zero other sign bits that way (imag +0.0 where clone gives -0.0)."""
    nan_zero = torch.tensor([0x7F800001, 0], dtype=torch.int32).view(torch.float32)
    x = torch.view_as_complex(nan_zero.view(1, 2)).repeat(64).to(pager.device)  # vectorized: 64 elements
    view = torch._neg_view(x.conj())
    bits = lambda t: torch.view_as_real(t).view(torch.int32)  # noqa: E731
    expected = bits(view.clone())
    assert torch.equal(bits(PagedTensor.wrap(view, pager).materialize()), expected)
    assert torch.equal(bits(torch._neg_view(PagedTensor.wrap(x, pager).conj()).materialize()), expected)


@pytest.mark.parametrize("kind", ["mH", "neg_imag", "conj_neg"])
def test_wrap_of_a_lazily_conjugated_view_of_a_paged_tensor_on_its_own_pager_resolves_it(pager, kind):
    """``wrap`` of a view of a PagedTensor on the same pager returned the view itself, its lazy bit
    kept: ``linalg.pinv`` of ``wrap(A.mH)`` then read the raw bits (off by 2.1), as the README says
    of a lazy view; it is resolved as a plain view is."""
    g = torch.Generator().manual_seed(5)
    source = torch.randn(6, 6, dtype=torch.complex64, generator=g).to(pager.device)
    view = _lazily_conjugated_and_negated(PagedTensor.wrap(source, pager))[kind]
    t = PagedTensor.wrap(view, pager)
    assert not t.is_conj() and not t.is_neg()
    plain = _lazily_conjugated_and_negated(source)[kind]
    assert torch.equal(t.materialize(), plain.clone())
    if t.is_complex():
        assert torch.equal(torch.linalg.pinv(t), torch.linalg.pinv(plain.clone()))
    same = PagedTensor.wrap(source, pager)
    assert PagedTensor.wrap(same, pager) is same and PagedTensor.wrap(same[1:], pager)._paged is same._paged  # no bits: as is


def test_wrap_of_a_conjugated_view_past_the_tier_resolves_it_a_piece_at_a_time():
    """A conjugated view larger than the device tier (expanded too: its span is resolved, not its
    repeats) pages and resolves through the tier a piece at a time."""
    with make_pager(device_pages=2) as small:
        g = torch.Generator().manual_seed(4)
        wide = torch.randn(64, 48, dtype=torch.complex64, generator=g)  # 24 KiB: 6 pages
        for view in (wide.mH, wide[:1].conj().expand(64, 48), torch._neg_view(wide.conj())):
            t = PagedTensor.wrap(view, small)
            assert t.stride() == view.stride()
            assert torch.equal(t.materialize("cpu"), view.resolve_conj().resolve_neg())


@pytest.mark.parametrize(
    "bad, error, words",
    [
        ([1.0, 2.0], TypeError, "list"),
        (torch.ones(3, device="meta"), ValueError, "meta"),
        (torch.eye(3).to_sparse(), ValueError, "strided"),
        (torch.empty(4, dtype=torch.uint4) if hasattr(torch, "uint4") else torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8), ValueError, "dtype"),
    ],
)
def test_wrap_rejects_bad_input(pager, bad, error, words):
    with pytest.raises(error, match=words):
        PagedTensor.wrap(bad, pager)


def test_wrap_rejects_other_subclasses_and_bad_pagers(pager):
    from torch.testing._internal.two_tensor import TwoTensor

    with pytest.raises(TypeError, match="TwoTensor"):
        PagedTensor.wrap(TwoTensor(torch.ones(2), torch.ones(2)), pager)
    with pytest.raises(TypeError, match="pager"):
        PagedTensor.wrap(torch.ones(2), pager="cuda")
    with pytest.raises(TypeError, match="wrap"):
        PagedTensor(torch.ones(2))
    with pytest.raises(TypeError, match="Pager"):
        pagedtensor.set_default_pager("big")


def test_default_pager_is_replaceable(default_pager):
    assert pagedtensor.get_default_pager() is default_pager
    t = PagedTensor.wrap(torch.ones(4))
    assert t.pager is default_pager


# ---------------------------------------------------------------------- dispatch precedence


def test_op_table_rejects_a_second_registration():
    with pytest.raises(ValueError, match="already handled"):

        @implements([aten.view.default])
        def again(func, types, args, kwargs):  # pragma: no cover - never registered
            return None

    assert DISPATCHER.handlers[aten.view.default].__name__ == "view_of_pages"


def test_unsupported_ops_raise_naming_op_and_argument_types(pager):
    t = PagedTensor.wrap(rows_tensor(4, 8, device=pager.device), pager)
    with pytest.raises(NotImplementedError, match=r"aten\.t_\.default.*argument types: PagedTensor"):
        t.t_()
    with pytest.raises(NotImplementedError, match=r"aten\.resize_\.default.*PagedTensor, list"):
        t.resize_(64)
    out = PagedTensor.wrap(torch.zeros(3), pager)
    neighbour = PagedTensor.wrap(torch.full((1024,), 5.0), pager)  # the next device slot
    with pytest.raises(NotImplementedError, match="resize its PagedTensor output"):
        torch.add(rows_tensor(64, 256, device=pager.device), 1, out=out)  # torch would resize out to 64 KiB
    assert torch.equal(out.materialize("cpu"), torch.zeros(3))
    assert torch.equal(neighbour.materialize("cpu"), torch.full((1024,), 5.0))


def test_fallback_returns_plain_tensors_equal_to_dense(pager):
    x, y = rows_tensor(seed=1, device=pager.device), rows_tensor(seed=2, device=pager.device)
    a, b = PagedTensor.wrap(x, pager), PagedTensor.wrap(y, pager)
    cases = [
        (lambda p, q: p + q),
        (lambda p, q: torch.mm(p, q.t())),
        (lambda p, q: p.sum(0)),
        (lambda p, q: torch.cat([p, q])),
        (lambda p, q: torch.where(p > 0, p, q)),
        (lambda p, q: p.max(1)),
        # (p.to(torch.float16) stays paged: test_conversions_stay_paged_on_the_same_pager)
        (lambda p, q: p @ p.t()),  # two views of one allocation in one op
    ]
    for fn in cases:
        expected, got = fn(x, y), fn(a, b)
        for e, g in zip(expected if isinstance(expected, tuple) else (expected,), got if isinstance(got, tuple) else (got,)):
            assert type(g) is torch.Tensor
            assert torch.equal(g, e)
    assert a[3, 7].item() == x[3, 7].item()
    assert a.tolist() == x.tolist()
    assert (a.numpy(force=True) == x.numpy(force=True)).all()  # force: a CUDA tensor needs it, as for torch


def test_meta_only_ops_fault_nothing(pager):
    t = PagedTensor.wrap(rows_tensor(device=pager.device), pager)
    pager.evict_all()
    before = pager.stats()
    z, e, n = torch.zeros_like(t), torch.empty_like(t), t.new_ones(3)
    assert type(z) is torch.Tensor and z.shape == t.shape and e.stride() == t.stride() and n.dtype == t.dtype
    assert delta(pager, before, "faults", "hits") == {"faults": 0, "hits": 0}


# ---------------------------------------------------------------------- page-granular faults


@pytest.mark.parametrize(
    "read, rows",
    [
        (lambda t: t[5:7].sum(), [5, 6]),
        (lambda t: t.select(0, 9).sum(), [9]),
        (lambda t: t.narrow(0, 12, 3).clone(), [12, 13, 14]),
        (lambda t: t.index_select(0, torch.tensor([1, 14, 1], device=t.device)), [1, 14]),
        (lambda t: F.embedding(torch.tensor([[0, 13], [13, 0]], device=t.device), t), [0, 13]),
        (lambda t: t[torch.tensor([-1, 4])], [15, 4]),
        (lambda t: t[9:11, 3:5] * 2, [9, 10]),
    ],
)
def test_reads_fault_only_the_pages_of_the_rows_they_touch(pager, read, rows):
    x = rows_tensor(device=pager.device)  # 16 rows of 1 KiB: rows 4k..4k+3 on page k
    t = PagedTensor.wrap(x, pager)
    pager.evict_all()
    before = pager.stats()
    assert torch.equal(read(t), read(x))
    pages = {row // 4 for row in rows}
    assert delta(pager, before, "faults", "bytes_h2d") == {"faults": len(pages), "bytes_h2d": len(pages) * PAGE}
    table = pager.page_table(t.allocation)
    assert {info.index for info in table if info.tier == "device"} == pages


def test_row_gather_over_several_runs_fits_a_tiny_budget():
    with make_pager(device_pages=2) as small:
        x = rows_tensor(64, 256)  # 16 pages, budget 2
        t = PagedTensor.wrap(x, small)
        index = torch.tensor([0, 63, 20, 21, 40, 0])
        before = small.stats()
        assert torch.equal(t[index], x[index])
        assert torch.equal(F.embedding(index, t), x[index])
        assert delta(small, before, "faults")["faults"] <= 2 * 4  # pages 0, 15, 5, 10, each at most once a call
        with pytest.raises(DeviceTierFullError, match="need more pages at once than the device tier can hold: device tier: a request "
                           r"for 16 pages at once is larger than the whole tier \(vram_limit=\d+ bytes = 2 pages"):  # fmt: skip
            t.sum()  # a full reduction needs all 16 pages at once
        assert torch.equal(t.materialize(), x)  # materialize reads in chunks


def test_a_fused_module_op_whose_weights_together_outgrow_the_tier_says_how_many_pages_and_the_way_round():
    """``nn.TransformerEncoderLayer`` in eval mode under ``no_grad`` takes torch's fused fast path, one
    op over all 12 weights: each fits the device tier, together they do not. The error said "1 pages
    needed (of a request for 1)", the last argument's request, as if one page did not fit; it says
    how many pages the arguments reach in all against the tier's, and, for the fused attention
    paths, that torch's ``torch.backends.mha.set_fastpath_enabled(False)`` runs them op by op (on
    the same path as a plain module with the fast path off, bit for bit)."""
    torch.manual_seed(0)
    dense = torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=True).eval()
    with make_pager(device_pages=8) as small:
        paged = copy.deepcopy(dense)
        for owner in paged.modules():
            for name, weight in list(owner.named_parameters(recurse=False)):
                setattr(owner, name, torch.nn.Parameter(PagedTensor.wrap(weight.detach(), small)))
        reach = sum(-(-w.numel() * w.element_size() // PAGE) for w in paged.parameters())
        assert reach > 8 and all(w.numel() * w.element_size() <= 8 * PAGE for w in paged.parameters())
        x = torch.randn(3, 10, 32)
        with torch.no_grad(), pytest.raises(DeviceTierFullError) as raised:
            paged(x)
        message = str(raised.value)
        assert message.startswith("aten._transformer_encoder_layer_fwd.default: its PagedTensor arguments need more pages at once"), message
        assert f"its 12 PagedTensor arguments reach {reach} pages in all, where the device tier holds 8" in message, message
        assert "torch.backends.mha.set_fastpath_enabled(False)" in message, message
        enabled = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            with torch.no_grad():
                assert torch.equal(paged(x), dense(x))
        finally:
            torch.backends.mha.set_fastpath_enabled(enabled)


def test_an_op_whose_device_room_a_full_lower_tier_denies_says_so():
    """Device room made by spilling dirty pages to a full host tier (no disk tier): the op's error
    names the lower tier as the bound, not the device tier, and is no DeviceTierFullError."""
    with make_pager(device_pages=4, host_pages=2) as pager:
        x = rows_tensor(6, PAGE // 4)  # 6 pages: 4 on the device (dirty), 2 on the host
        t = PagedTensor.wrap(x, pager)
        for op in (lambda a: a[:2].sum(), lambda a: a[:2] * 2):  # the two pages on the host
            with pytest.raises(OutOfPagesError, match="could not be brought onto the device tier, a lower tier being full: host tier full") as raised:
                op(t)
            assert not isinstance(raised.value, DeviceTierFullError)
        assert all(info.pin_count == 0 for info in pager.page_table(t.allocation))


def test_row_gather_of_a_run_larger_than_the_device_tier_reads_it_in_chunks():
    # transformers' batched experts gather every expert row of a stack (gate_up_proj[expert_ids]):
    # rows on adjacent pages form one run, here 16 pages against a budget of 2.
    with make_pager(device_pages=2) as small:
        x = rows_tensor(64, 256)
        t = PagedTensor.wrap(x, small)
        index = torch.tensor([3, 63, 0, 17, 17, 40, 1, 2] + list(range(64)))
        assert torch.equal(t[index], x[index])
        assert torch.equal(t.index_select(0, index), x.index_select(0, index))
        assert torch.equal(F.embedding(index.view(8, 9), t), F.embedding(index.view(8, 9), x))


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    experts=st.integers(2, 6),
    row_shape=st.sampled_from([(8, 128), (3, 1000), (2048,), (5, 7, 64)]),  # a page or more a row, some not page-aligned
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.int64, torch.bool]),
    device_pages=st.integers(3, 8),
    skip=st.integers(0, 3),  # rows leading the view: expert rows start inside a page
)
def test_gathers_of_rows_of_a_page_or_more_copy_each_row_into_the_result(data, experts, row_shape, dtype, device_pages, skip):
    """``stack[expert_ids]`` where each row is a page or more (transformers' batched experts index
    their stacks of expert matrices by the experts a token is routed to): each selected row's bytes
    go from its pages, adjacent or scattered, straight into the result, and the result is bitwise
    the dense one, with its layout, for ``index``, ``index_select`` and ``embedding``; rows larger
    than the device tier are read in chunks. Each distinct row faults in its pages at most once."""
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    full = torch.randint(0, 100, (experts + skip, *row_shape), generator=generator).to(dtype)
    x = full[skip:]
    with make_pager(device_pages=device_pages) as small:
        t = PagedTensor.wrap(full, small)[skip:]
        other = PagedTensor.wrap(torch.ones(device_pages * PAGE // 4), small)
        index = torch.tensor(data.draw(st.lists(st.integers(-experts, experts - 1), min_size=1, max_size=8), label="index"))
        op = data.draw(st.sampled_from(["index", "index_select", "embedding"] if x.dim() == 2 else ["index", "index_select"]), label="op")
        positive = torch.where(index < 0, index + experts, index)
        if data.draw(st.booleans(), label="scatter slots"):
            other.sum()  # the device tier full of other pages: the rows come back into freed slots
        small.evict(t.allocation, 0, data.draw(st.integers(0, t.allocation.num_pages), label="evicted pages"))
        if op == "index":
            got, expected = t[index], x[index]
        elif op == "index_select":
            got, expected = t.index_select(0, positive), x.index_select(0, positive)
        else:
            got, expected = F.embedding(positive, t), F.embedding(positive, x)
        assert type(got) is torch.Tensor and got.dtype == expected.dtype
        assert got.shape == expected.shape and got.stride() == expected.stride()
        assert torch.equal(got, expected)


def test_gathers_of_rows_of_a_page_or_more_take_one_copy_a_row(monkeypatch):
    """Rows of a page or more are copied once each, straight from their slots, however scattered
    (no gathered window, no concatenation); and a row larger than the device tier is read in chunks."""
    import pagedtensor.dispatch as dispatch

    with make_pager(device_pages=6) as small:
        x = torch.randn(4, 2, PAGE // 4)  # 4 rows of 2 pages
        t = PagedTensor.wrap(x, small)
        cats = []
        monkeypatch.setattr(torch, "cat", lambda *args, **kwargs: cats.append(args) or torch._C._VariableFunctions.cat(*args, **kwargs))
        windows = []
        window_init = dispatch._Window.__init__

        def spy(self, *args, **kwargs):
            window_init(self, *args, **kwargs)
            windows.append((self.gathered, self._buf is not None and self.gathered))

        monkeypatch.setattr(dispatch._Window, "__init__", spy)
        index = torch.tensor([3, 0, 3, 1])
        assert torch.equal(t[index], x[index])
        assert not cats and len(windows) == 3 and not any(gathered_into_buffer for _, gathered_into_buffer in windows)
    with make_pager(device_pages=1) as tiny:  # a row of 2 pages does not fit: read in chunks
        t = PagedTensor.wrap(x, tiny)
        assert torch.equal(t[index], x[index])


def test_a_row_gather_of_a_dtype_torchs_kernel_refuses_raises_its_error():
    """Rows of a page or more are copied as bytes, which ran no kernel: a float4 table's rows were
    gathered where torch's index kernels have no implementation for the dtype."""
    dense = torch.randint(0, 256, (8, PAGE), dtype=torch.uint8, generator=torch.Generator().manual_seed(3)).view(torch.float4_e2m1fn_x2)
    index = torch.tensor([1, 2])
    with make_pager(device_pages=16) as pager:
        table = PagedTensor.wrap(dense, pager)
        with pytest.raises(NotImplementedError) as expected:
            dense[index]
        with pytest.raises(NotImplementedError) as got:
            table[index]
        assert str(got.value) == str(expected.value)  # torch's own words, as the dense op's error elsewhere
        # index_select takes the dtype: the rows, as before
        assert torch.equal(table.index_select(0, index).view(torch.uint8), dense.index_select(0, index).view(torch.uint8))
        bytes_table = PagedTensor.wrap(dense.view(torch.uint8), pager)  # a dtype the kernels take: rows as before
        assert torch.equal(bytes_table[index], dense.view(torch.uint8)[index])


def test_view_ops_fault_nothing_and_share_pages(pager):
    t = PagedTensor.wrap(rows_tensor(device=pager.device), pager)
    pager.evict_all()
    before = pager.stats()
    views = [t[2:6], t.t(), t.view(4, 4, 256), t.unsqueeze(0), t[3], t.transpose(0, 1)[5:], t.unbind(0)[7], t.split(5)[1], t.detach()]
    assert all(type(v) is PagedTensor and v.allocation is t.allocation for v in views)
    assert delta(pager, before, "faults", "hits") == {"faults": 0, "hits": 0}
    assert t[2:6].storage_offset() == 2 * 256


_VIEW_COPIES = [  # (the view-copy op on t, the rows of t it reads): t is 16 rows of 1 KiB, 4 rows a page
    (lambda t: aten.select_copy.int(t, 0, 9), [9]),
    (lambda t: aten.slice_copy.Tensor(t, 0, 5, 7), [5, 6]),
    (lambda t: torch.narrow_copy(t, 0, 12, 3), [12, 13, 14]),
    (lambda t: torch.diagonal_copy(t[:, :16]), range(16)),
    (lambda t: torch.diag(t[:, 100:116], 2), range(14)),
    (lambda t: torch.t_copy(t[4:8]), range(4, 8)),
    (lambda t: torch.permute_copy(t[8:].view(2, 4, 256), (2, 0, 1)), range(8, 16)),
    (lambda t: torch.view_copy(t[4:8], (4, 16, 16)), range(4, 8)),
    (lambda t: torch.expand_copy(t[3], (3, 256)), [3]),
    (lambda t: torch.unfold_copy(t[1], 0, 8, 8), [1]),
    (lambda t: torch.unbind_copy(t[0:2]), [0, 1]),
    (lambda t: torch.split_copy(t[12:], 3), range(12, 16)),
    (lambda t: torch.as_strided_copy(t, (2, 8), (256, 2), 256 * 13), [13, 14]),
]


@pytest.mark.parametrize("copy_op, rows", _VIEW_COPIES)
def test_view_copy_ops_fault_only_the_pages_of_their_view(pager, copy_op, rows):
    """A view-copy op (``torch.diag`` of a matrix runs ``diagonal_copy``) copies the view: only
    its pages fault in, and a table larger than the device tier reads a piece at a time."""
    x = rows_tensor(device=pager.device)
    t = PagedTensor.wrap(x, pager)
    pager.evict_all()
    before = pager.stats()
    got, expected = copy_op(t), copy_op(x)
    assert type(got) is type(expected)
    for got_one, expected_one in zip(*((got, expected) if isinstance(got, (list, tuple)) else ([got], [expected]))):
        assert type(got_one) is torch.Tensor and got_one.stride() == expected_one.stride() and torch.equal(got_one, expected_one)
    pages = {row // 4 for row in rows}
    assert delta(pager, before, "faults")["faults"] == len(pages)
    with make_pager(device_pages=2, device=pager.device) as small:  # 4 pages of the diagonal: past the tier
        assert torch.equal(torch.diag(PagedTensor.wrap(x.clone(), small)), torch.diag(x))


def test_view_copy_of_a_layout_no_view_can_take_copies_as_reshape(pager):
    """``view_copy`` to a shape no view of the layout can take is, as torch's, ``reshape`` then a
    contiguous copy (the strict ``view`` raised), within the device tier and past it."""
    x = rows_tensor(device=pager.device)
    expected = torch.view_copy(x.t(), (-1,))
    for device_pages in (64, 2):
        with make_pager(device_pages=device_pages, device=pager.device) as small:
            got = torch.view_copy(PagedTensor.wrap(x.clone(), small).t(), (-1,))
            assert type(got) is torch.Tensor and got.is_contiguous() and torch.equal(got, expected)


def test_view_copy_out_forms_write_out_as_torch_does(pager, recwarn):
    """``out=`` forms: the copy, then ``out`` resized to the result's shape (contiguous, with
    torch's warning where it had elements) and written; an ``out`` of another dtype raises torch's
    error, and a PagedTensor ``out`` of another shape raises, since its pages are fixed."""
    x = rows_tensor(device=pager.device)
    t = PagedTensor.wrap(x, pager)
    expected = torch.diagonal_copy(x, 1)
    out = torch.empty(3, 3, device=pager.device).t()
    torch.diagonal_copy(t, 1, out=out)
    assert out.shape == expected.shape and out.is_contiguous() and torch.equal(out, expected)
    assert any("An output with one or more elements was resized" in str(w.message) for w in recwarn)
    out = PagedTensor.wrap(torch.zeros(16, 256, device=pager.device), pager)
    aten.view_copy.out(t, (16, 256), out=out)
    assert torch.equal(out.materialize(), x.view(16, 256))
    # an out of another dtype raises torch's error before anything is written (it cast silently)
    copy_ops = [lambda u, o: aten.view_copy.out(u, (16, 256), out=o), lambda u, o: torch.t_copy(u, out=o),
                lambda u, o: aten.slice_scatter.out(u[:4], u[:1], 0, 0, 1, out=o)]  # fmt: skip
    if pager.device.type == "cpu":  # CUDA has no narrow_copy.out kernel to compare with
        copy_ops.append(lambda u, o: torch.narrow_copy(u, 0, 0, 16, out=o))
    for copy_op in copy_ops:
        plain_out = torch.zeros(1, dtype=torch.float64, device=pager.device)
        with pytest.raises(RuntimeError) as plain_error:
            copy_op(x, plain_out)  # torch resizes it first (but narrow_copy), then raises
        shape = copy_op(x, torch.empty(0, device=pager.device)).shape
        for wide in (torch.zeros(1, dtype=torch.float64, device=pager.device),
                     PagedTensor.wrap(torch.zeros(shape, dtype=torch.float64, device=pager.device), pager)):  # fmt: skip
            with pytest.raises(RuntimeError) as paged_error:
                copy_op(t, wide)
            assert str(paged_error.value) == str(plain_error.value)
            if isinstance(wide, PagedTensor):
                assert torch.equal(wide.materialize(), torch.zeros(shape, dtype=torch.float64, device=pager.device))
            else:
                assert wide.shape == plain_out.shape
    with pytest.raises(NotImplementedError, match="would resize its PagedTensor output"):
        torch.select_copy(t, 0, 2, out=PagedTensor.wrap(torch.zeros(4, device=pager.device), pager))
    with pytest.raises(IndexError, match="out of range"):
        torch.select_copy(t, 0, 16)
    assert torch.equal(t.materialize(), x)


def test_narrow_copy_into_an_out_of_another_dtype_checks_the_dtype_before_the_range():
    """``narrow_copy`` of a range past the end into an ``out`` of another dtype raises torch's CPU
    kernel's dtype error, which it checks first (it raised the range error)."""
    x = rows_tensor()
    with make_pager() as small:
        t = PagedTensor.wrap(x, small)
        for start, length in ((14, 5), (0, 2)):
            with pytest.raises(RuntimeError) as plain_error:
                torch.narrow_copy(x, 0, start, length, out=torch.empty(0, dtype=torch.int32))
            with pytest.raises(RuntimeError) as paged_error:
                torch.narrow_copy(t, 0, start, length, out=torch.empty(0, dtype=torch.int32))
            assert str(paged_error.value) == str(plain_error.value)


def test_views_alias_their_base(pager):
    x = rows_tensor(device=pager.device)
    t = PagedTensor.wrap(x, pager)
    v = t[4:8, ::2]
    v.fill_(7.0)
    x[4:8, ::2].fill_(7.0)
    assert torch.equal(t.materialize(), x)
    t.mul_(2)
    x.mul_(2)
    assert torch.equal(v.materialize(), x[4:8, ::2])
    as_int = t.view(torch.int32)
    as_int[0, 0] = 12345
    x.view(torch.int32)[0, 0] = 12345
    assert torch.equal(t.materialize(), x)


# ---------------------------------------------------------------------- writes and dirty pages


def faulted_clean(pager: Pager, x: torch.Tensor) -> PagedTensor:
    """A PagedTensor whose pages are all on the device and clean (host copies kept)."""
    t = PagedTensor.wrap(x, pager)
    pager.evict_all()
    t.sum()
    assert not any(info.dirty for info in pager.page_table(t.allocation))
    return t


def dirty_pages(pager: Pager, t: PagedTensor) -> set[int]:
    return {info.index for info in pager.page_table(t.allocation) if info.dirty}


@pytest.mark.parametrize(
    "write, pages",
    [
        (lambda t: t[5].add_(1), {1}),
        (lambda t: t[7:9].zero_(), {1, 2}),
        (lambda t: t[::8].mul_(3), {0, 2}),  # rows 0 and 8: the pages in between stay clean
        (lambda t: t[:, :4].fill_(1), {0, 1, 2, 3}),
        (lambda t: torch.add(t[12], 1, out=t[12]), {3}),
        (lambda t: torch.sum(t[:2], 0, out=t[13]), {3}),
        (lambda t: t[14:].copy_(torch.ones(2, 256)), {3}),
        (lambda t: t.select(0, 2).clamp_(-0.5, 0.5), {0}),
    ],
)
def test_writes_mark_only_touched_pages_dirty(pager, write, pages):
    x = rows_tensor(device=pager.device)
    t = faulted_clean(pager, x)
    write(t)
    write(x)
    assert dirty_pages(pager, t) == pages
    pager.evict_all()  # dirty pages are written back, clean ones dropped
    assert torch.equal(t.materialize(), x)


def test_in_place_returns_the_paged_tensor_and_out_returns_out(pager):
    t = PagedTensor.wrap(rows_tensor(device=pager.device), pager)
    assert t.add_(1) is t
    out = PagedTensor.wrap(torch.zeros(16, 256), pager)
    assert torch.add(t, t, out=out) is out
    values, indices = PagedTensor.wrap(torch.zeros(16), pager), torch.zeros(16, dtype=torch.long, device=pager.device)
    got = torch.max(t, 1, out=(values, indices))
    assert got[0] is values and got[1] is indices
    assert torch.equal(values.materialize(), t.materialize().max(1).values)


def test_copy_over_whole_pages_does_not_fault_them(pager):
    t = PagedTensor.wrap(rows_tensor(device=pager.device), pager)
    pager.evict_all()
    before = pager.stats()
    t[4:12].copy_(torch.full((8, 256), 2.0))
    assert delta(pager, before, "faults", "bytes_h2d") == {"faults": 2, "bytes_h2d": 0}
    assert torch.equal(t[4:12].materialize("cpu"), torch.full((8, 256), 2.0))
    with pytest.raises(RuntimeError):
        t[0:4].copy_(torch.ones(3, 5))  # a failing copy keeps the old bytes
    assert torch.equal(t[0:4].materialize("cpu"), rows_tensor()[0:4])


def test_ops_on_pages_with_scattered_device_slots(pager):
    x, y = rows_tensor(seed=3, device=pager.device), rows_tensor(seed=4, device=pager.device)
    a, b = PagedTensor.wrap(x, pager), PagedTensor.wrap(y, pager)
    pager.evict_all()
    a[0].sum(), b[0].sum(), a[8].sum(), b[8].sum(), a[15].sum()  # interleave a's and b's slots
    assert torch.equal(a + b, x + y)
    slots = [info.device_slot for info in pager.page_table(a.allocation)]
    assert slots != list(range(slots[0], slots[0] + 4))  # not adjacent: the op ran on a gathered copy
    a.mul_(-1)  # written through a gathered temporary and scattered back
    x.mul_(-1)
    assert torch.equal(a.materialize(), x)
    pager.evict_all()
    assert torch.equal(a.materialize(), x)


# ---------------------------------------------------------------------- nn.Parameter, save/load, inspection


def test_nn_parameter_forward_and_backward():
    with make_pager(device_pages=16) as pager:
        torch.manual_seed(0)
        dense = torch.nn.Linear(256, 8)
        paged = copy.deepcopy(dense)
        paged.weight = torch.nn.Parameter(PagedTensor.wrap(dense.weight.detach(), pager))
        assert type(paged.weight) is PagedTensor and paged.weight.requires_grad
        assert type(paged.weight.detach()) is PagedTensor
        x = torch.randn(4, 256)
        assert torch.equal(paged(x), dense(x))
        paged(x).square().sum().backward()
        dense(x).square().sum().backward()
        assert torch.equal(paged.weight.grad, dense.weight.grad)
        with torch.no_grad():
            paged.weight.sub_(paged.weight.grad)
            dense.weight.sub_(dense.weight.grad)
        assert torch.equal(paged(x), dense(x))


def test_save_load_round_trip(default_pager):
    with make_pager() as pager:
        x = rows_tensor()
        t = PagedTensor.wrap(x, pager)
        buffer = io.BytesIO()
        torch.save({"t": t, "view": t[2:4].t()}, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer)  # weights_only=True
    assert type(loaded["t"]) is PagedTensor and loaded["t"].pager is default_pager
    assert torch.equal(loaded["t"].materialize(), x)
    assert loaded["view"].stride() == x[2:4].t().stride() and torch.equal(loaded["view"].materialize(), x[2:4].t())


def test_views_saved_together_load_sharing_their_pages(default_pager):
    """As torch views share a storage after torch.load, paged views share one allocation: the bytes
    are saved once and a write through one loaded view shows through the others."""
    with make_pager() as pager:
        x = rows_tensor()
        t = PagedTensor.wrap(x, pager)
        buffer = io.BytesIO()
        torch.save({"t": t, "rows": t[2:4], "bits": t.view(torch.int32)[5]}, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer)
    assert loaded["t"].allocation is loaded["rows"].allocation is loaded["bits"].allocation
    assert loaded["t"].allocation.nbytes == x.nbytes  # saved once, not once per view
    assert torch.equal(loaded["bits"].materialize(), x.view(torch.int32)[5])
    loaded["t"][3].fill_(7.0)
    default_pager.evict_all()
    assert torch.equal(loaded["rows"][1].materialize(), torch.full_like(x[3], 7.0))


def test_a_legacy_format_file_loads_the_right_values_as_plain_tensors(default_pager):
    """torch's legacy (non-zip) loader fills tensor bytes only after unpickling, so paging them at
    rebuild time would page uninitialized memory: they load as plain tensors, views still shared."""
    with make_pager() as pager:
        x = rows_tensor()
        t = PagedTensor.wrap(x, pager)
        buffer = io.BytesIO()
        torch.save({"t": t, "rows": t[2:4]}, buffer, _use_new_zipfile_serialization=False)
    for weights_only in (True, False):
        buffer.seek(0)
        with pytest.warns(UserWarning, match="legacy-format"):
            loaded = torch.load(buffer, weights_only=weights_only)
        assert type(loaded["t"]) is torch.Tensor and torch.equal(loaded["t"], x)
        assert torch.equal(loaded["rows"], x[2:4])
        loaded["t"][3].fill_(7.0)
        assert torch.equal(loaded["rows"][1], torch.full_like(x[3], 7.0))


def test_map_location_meta_loads_meta_tensors(default_pager):
    t = PagedTensor.wrap(rows_tensor())
    buffer = io.BytesIO()
    torch.save({"t": t, "view": t[1:3].t()}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, map_location="meta")
    assert loaded["t"].is_meta and loaded["t"].shape == t.shape
    assert loaded["view"].is_meta and loaded["view"].stride() == t[1:3].t().stride()


def test_a_load_under_fake_tensor_mode_gives_fake_tensors_and_leaves_the_pager_alone(default_pager):
    """``torch.load`` of saved PagedTensors inside ``FakeTensorMode`` (memory estimators, export
    tooling) gives FakeTensors of their shapes and strides, as for plain tensors: it paged the fake
    bytes, so a fresh pager's first slab was made a FakeTensor, the loaded tensor read nothing and
    every later ``PagedTensor.wrap`` on that pager failed."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    with make_pager() as pager:
        x = rows_tensor()
        t = PagedTensor.wrap(x, pager)
        buffer = io.BytesIO()
        torch.save({"t": t, "view": t[1:3].t()}, buffer)
    with Pager(MemoryConfig(page_size=PAGE, vram_limit=4 * PAGE, host_memory=64 * PAGE, slab_size=64 * PAGE,
                            prefetch_strategy="none", device=default_pager.device)) as fresh:  # fmt: skip
        previous = pagedtensor.get_default_pager()
        pagedtensor.set_default_pager(fresh)
        try:
            buffer.seek(0)
            with FakeTensorMode():
                loaded = torch.load(buffer)
            assert type(loaded["t"]) is FakeTensor and loaded["t"].shape == x.shape
            assert type(loaded["view"]) is FakeTensor and loaded["view"].stride() == x[1:3].t().stride()
            later = PagedTensor.wrap(x)
            assert later.pager is fresh and torch.equal(later.materialize(), x)
            buffer.seek(0)
            assert torch.equal(torch.load(buffer)["t"].materialize(), x)
        finally:
            pagedtensor.set_default_pager(previous)


def test_python_attributes_survive_save_load_and_copy(default_pager):
    t = PagedTensor.wrap(rows_tensor())
    t.tag = "embedding"
    param = torch.nn.Parameter(PagedTensor.wrap(rows_tensor()))
    param.tag = "weight"
    for weights_only in (True, False):
        buffer = io.BytesIO()
        torch.save({"t": t, "param": param}, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=weights_only)
        assert loaded["t"].tag == "embedding" and loaded["param"].tag == "weight"
        assert isinstance(loaded["param"], torch.nn.Parameter)
    shallow = copy.copy(t)
    assert shallow.tag == "embedding" and shallow.allocation is t.allocation


def test_a_file_of_dense_saved_data_still_loads(default_pager):
    """Files written before views were saved by pages hold the dense data: they load as before."""
    from pagedtensor.tensor import _rebuild_paged_tensor

    class OldPagedTensor:
        def __init__(self, data: torch.Tensor) -> None:
            self.data = data

        def __reduce_ex__(self, protocol: int):
            return _rebuild_paged_tensor, (self.data, False, False, "cpu")

    x = rows_tensor()
    buffer = io.BytesIO()
    torch.save(OldPagedTensor(x), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer)
    assert type(loaded) is PagedTensor and torch.equal(loaded.materialize(), x)


def test_state_dict_with_paged_parameter_round_trips(default_pager):
    model = torch.nn.Linear(256, 4)
    model.weight = torch.nn.Parameter(PagedTensor.wrap(model.weight.detach()))
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer)
    assert type(state["weight"]) is PagedTensor
    assert torch.equal(state["weight"].materialize(), model.weight.materialize())
    clone = copy.deepcopy(model)
    assert type(clone.weight) is PagedTensor and isinstance(clone.weight, torch.nn.Parameter)
    assert torch.equal(clone.weight.materialize(), model.weight.materialize())


def test_residency_and_repr(pager):
    t = PagedTensor.wrap(rows_tensor(device=pager.device), pager)
    assert t.residency() == {"device": 4, "host": 0, "disk": 0, "unwritten": 0}
    pager.evict_all()
    t[0].sum()
    assert t.residency() == {"device": 1, "host": 3, "disk": 0, "unwritten": 0}
    assert t[4:8].residency() == {"device": 0, "host": 1, "disk": 0, "unwritten": 0}
    text = repr(t)
    assert "PagedTensor(shape=[16, 256]" in text and "device=1" in text and "host=3" in text
    assert "float32" in str(t)


def test_materialize_to_another_device_and_large_tensors():
    with make_pager(device_pages=2) as pager:
        x = rows_tensor(64, 256)
        t = PagedTensor.wrap(x, pager)
        dense = t[::3].t().materialize("cpu")
        assert dense.stride() == x[::3].t().stride() and torch.equal(dense, x[::3].t())


def test_collected_tensors_free_their_pages(pager):
    t = PagedTensor.wrap(rows_tensor(device=pager.device), pager)
    view = t[2:4]
    del t
    gc.collect()
    assert pager.stats()["allocations"] == 1  # the view keeps the pages
    del view
    gc.collect()
    assert pager.stats()["allocations"] == 0
    assert pager.stats()["resident_bytes"]["device"] == 0


@pytest.mark.parametrize("let_go", ["release", "with", "two pins", "free of another"])
def test_a_tensor_collected_while_its_pages_are_pinned_is_freed_once_the_last_pin_goes(pager, let_go, caplog):
    """A PagedTensor collected while code holds its pages pinned (``pager.ensure_resident`` on its
    allocation) is freed as its last pin goes, without a warning: its finalizer's free failed on
    the pins and was dropped with a warning, the pages kept in the tiers for good."""
    t = PagedTensor.wrap(rows_tensor(device=pager.device), pager)
    allocation = t.allocation
    pins = [pager.ensure_resident(allocation, 0, 2)]
    if let_go == "two pins":
        pins.append(pager.ensure_resident(allocation, 1, 3))
    with caplog.at_level(logging.WARNING, logger="pagedtensor"):
        del t
        gc.collect()
        assert pager.stats()["allocations"] == 1 and not allocation.freed  # pinned: not yet
        if let_go == "with":
            with pins.pop():
                pass
        else:
            for resident in pins[:-1]:
                resident.release()
                assert not allocation.freed
            pins[-1].release()
        if let_go == "free of another":  # the free of another allocation (a call from outside one) frees it too
            other = pager.allocate(PAGE)
            pager.free(other)
    assert allocation.freed and pager.stats()["allocations"] == 0
    assert pager.stats()["resident_bytes"]["device"] == 0
    assert not caplog.records, caplog.text


def test_a_tensor_collected_while_another_thread_closes_its_pager_frees_nothing_and_warns_of_nothing(caplog):
    """A collected PagedTensor's finalizer tested ``closed`` before freeing: a close() by another thread
    while the free waited for the pager's lock made the free raise "this Pager is closed", logged as a
    warning about an allocation that the close had already let go."""
    pager = make_pager()
    t = PagedTensor.wrap(torch.ones(8), pager)
    lock = pager._lock
    pager._lock = ClosedWhileWaiting(pager)
    with caplog.at_level(logging.WARNING, logger="pagedtensor"):
        del t
        gc.collect()
    assert pager.closed and pager._lock is lock, "the finalizer did not reach the pager's lock"
    assert not caplog.records, caplog.text


def test_ops_after_the_pager_closed_raise_naming_the_op_and_the_pager():
    """An op on a tensor whose pager was closed said only "this Pager is closed": not which op, nor
    which pager (a program with several could not tell which one it had closed too early)."""
    pager = make_pager()
    t = PagedTensor.wrap(torch.ones(8), pager)
    pager.close()
    assert repr(pager) == f"Pager(device=cpu, page_size={PAGE}, vram_limit={8 * PAGE}, host_memory={256 * PAGE}, nvme_path=None, closed)"
    for op, name in [(lambda: t + 1, "aten.add.Tensor"), (lambda: t.sum(), "aten.sum.default"),
                     (lambda: t.add_(1), "aten.add_.Tensor"), (lambda: t[2:].clone(), "aten.clone.default")]:
        with pytest.raises(pagedtensor.PagerClosedError) as raised:
            op()
        assert str(raised.value).startswith(f"{name}: the pager is closed: {pager!r}"), str(raised.value)
    with pytest.raises(pagedtensor.PagerClosedError, match=r"materialize: .*pager is closed: Pager\(device=cpu"):
        t.materialize()
    with pytest.raises(pagedtensor.PagerClosedError, match=r"^PagedTensor.wrap: the pager is closed: Pager\(device=cpu"):
        PagedTensor.wrap(torch.ones(8), pager)
    assert issubclass(pagedtensor.PagerClosedError, RuntimeError)
    assert "pager closed" in repr(t)


def test_repr_of_a_tensor_whose_allocation_was_freed_says_so(pager):
    """``pager.free(t.allocation)`` on a live tensor: its repr raised the page table's ValueError."""
    t = PagedTensor.wrap(torch.randn(1024), pager)
    pager.free(t.allocation)
    assert repr(t) == f"PagedTensor(shape=[1024], dtype=torch.float32, device={t.device}, allocation freed)"



@pytest.mark.parametrize("bounded", [False, True])
def test_an_op_whose_pager_another_thread_closes_amid_it_names_the_closed_pager(bounded):
    """A thread's op holds a window of pinned pages when another thread closes the pager (its slabs
    gone): viewing the pages raises "this Pager is closed", not an IndexError from the slab list; a
    bounded view made before keeps its slab's memory alive (its storage does not own it)."""
    from pagedtensor.dispatch import _Window

    pager = make_pager()
    t = PagedTensor.wrap(torch.arange(2048.0), pager)  # 2 pages
    window = _Window(t._paged, 0, t._paged.nbytes, gather=False)
    if bounded:
        early = window.dense(t, bounded=True)
    pager.close()
    with pytest.raises(RuntimeError, match="this Pager is closed"):
        window.dense(t[1:], bounded=bounded)
    if bounded:
        gc.collect()
        assert torch.equal(early, torch.arange(2048.0)), "the view's memory went with the closed pager's slab"


def test_touched_pages_skips_gaps_of_a_page_or_more():
    # rows of 1 KiB, 4 a page: every 8th row touches every other page
    assert touched_pages((2, 256), (8 * 256, 1), 0, 4, PAGE) == [0, 2]
    assert touched_pages((16, 4), (256, 1), 0, 4, PAGE) == [0, 1, 2, 3]
    assert touched_pages((3,), (1,), 1023, 4, PAGE) == [0, 1]
    assert touched_pages((0, 5), (5, 1), 0, 4, PAGE) == []


@pytest.mark.gpu
def test_gpu_ops_on_a_side_stream_after_faults_from_pinned_host():
    """Faults fill pages on the pager's H2D stream; an op on another stream waits for them, and its
    release orders the slots' reuse after it (a later fault evicts and refills them)."""
    with make_pager(device_pages=4, device="cuda") as pager:
        x, y = rows_tensor(device="cuda", seed=5), rows_tensor(device="cuda", seed=6)
        a, b = PagedTensor.wrap(x, pager), PagedTensor.wrap(y, pager)
        pager.evict_all()
        assert pager.host_tier.pinned
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            got = (a * 2).sum(0)
            a[3].add_(1)
            rows = b[torch.tensor([15, 0], device="cuda")]  # evicts a's pages: written back after the add
            again = a.sum(1)
        side.synchronize()
        expected = (x * 2).sum(0)
        x[3].add_(1)
        assert torch.equal(got, expected)
        assert torch.equal(rows, y[torch.tensor([15, 0], device="cuda")])
        assert torch.equal(again, x.sum(1))
        pager.evict_all()
        assert torch.equal(a.materialize(), x) and torch.equal(a.materialize("cpu"), x.cpu())


def test_threads_writing_interleaved_rows_of_one_tensor_lose_no_update():
    """Two threads add to the even and the odd rows of one PagedTensor. With 2-page slabs a 4-page
    window is a gathered copy, written back over its whole span: the writers must take turns, or one
    thread's write-back undoes the other's additions."""

    iterations = 100
    with make_pager(device_pages=8, host_pages=64, slab_size=2 * PAGE) as pager:
        paged = PagedTensor.wrap(torch.zeros(64, 64), pager)  # 4 pages
        barrier = threading.Barrier(2)

        def worker(parity: int) -> None:
            rows = paged[parity::2]
            barrier.wait()
            for _ in range(iterations):
                rows.add_(1)

        assert run_in_threads(worker, 2) == []
        assert torch.equal(paged.materialize(), torch.full((64, 64), float(iterations)))


def test_materialize_frees_tensors_collected_inside_a_pager_call(pager):
    """A PagedTensor collected while its pager's lock is held (a garbage collection inside a pager
    call) is freed later: by the next materialize too, not only by the next dispatched op."""
    keep = PagedTensor.wrap(rows_tensor(device=pager.device), pager)
    dropped = PagedTensor.wrap(rows_tensor(seed=1, device=pager.device), pager)
    with pager._lock:
        del dropped
        gc.collect()
    assert len(pager._deferred_frees) == 1  # deferred
    keep.materialize()
    assert not pager._deferred_frees and pager.stats()["allocations"] == 1


def test_threads_run_ops_on_paged_tensors_of_one_pager(nvme_dir):
    """Four threads run random ops on their own PagedTensors of one small pager with a disk tier:
    in place, row slices added from another PagedTensor, sums, row gathers, evictions and reads.
    Each thread's tensor stays bitwise equal to a dense copy that ran the same ops. An op pins at
    most 6 pages, so four threads never need more than the 16 device pages; 24 live pages against
    16 device and 4 host pages keep pages moving through all three tiers."""

    with make_pager(device_pages=16, host_pages=4, nvme_path=nvme_dir, prefetch_strategy="sequential") as pager:

        def worker(seed: int) -> None:
            rng = random.Random(seed)
            dense = rows_tensor(48, 64, seed=seed)  # 12 KiB: 3 pages
            other_dense = rows_tensor(48, 64, seed=100 + seed)
            paged, other = PagedTensor.wrap(dense.clone(), pager), PagedTensor.wrap(other_dense.clone(), pager)
            for step in range(200):
                kind = rng.randrange(6)
                if kind == 0:
                    paged.mul_(1.01)
                    dense.mul_(1.01)
                elif kind == 1:
                    row = rng.randrange(44)
                    paged[row : row + 4].add_(other[row : row + 4])
                    dense[row : row + 4].add_(other_dense[row : row + 4])
                elif kind == 2:
                    assert torch.equal(paged.sum(), dense.sum()), (seed, step)
                elif kind == 3:
                    rows = torch.tensor([rng.randrange(48) for _ in range(5)])
                    assert torch.equal(paged[rows], dense[rows]), (seed, step)
                elif kind == 4:
                    pager.evict(paged.allocation)
                else:
                    assert torch.equal(paged.materialize(), dense), (seed, step)
            assert torch.equal(paged.materialize(), dense), seed

        errors = run_in_threads(worker, 4)
        assert not errors, errors
        stats = pager.stats()
        assert stats["bytes_to_disk"] > 0 and stats["bytes_from_disk"] > 0, stats


# ---------------------------------------------------------------------- ops that fail, odd layouts, conversions


def evicted(pager: Pager, x: torch.Tensor) -> PagedTensor:
    """``x`` paged, with every page off the device (an overwrite then skips faulting them in)."""
    paged = PagedTensor.wrap(x, pager)
    pager.evict_all()
    return paged


@pytest.mark.parametrize(
    "fail",
    [
        pytest.param(lambda t: t.fill_(300), id="fill_-overflow"),
        pytest.param(lambda t: t.copy_(torch.empty(t.shape, dtype=t.dtype, device="meta")), id="copy_-from-meta"),
        pytest.param(lambda t: t.zero_().copy_(torch.empty(3, dtype=t.dtype)), id="copy_-bad-shape"),
    ],
)
def test_an_overwrite_that_fails_leaves_the_tensor_as_it_was(nvme_dir, fail):
    x = torch.arange(8192, dtype=torch.int64).to(torch.uint8)
    with make_pager(device_pages=16, host_pages=4, nvme_path=nvme_dir) as pager:
        paged = evicted(pager, x)  # pages on the host and, past 4 of them, on disk
        dense = x.clone()
        with pytest.raises(RuntimeError) as dense_error:
            fail(dense)
        with pytest.raises(RuntimeError) as paged_error:
            fail(paged)
        assert type(paged_error.value) is type(dense_error.value)
        assert torch.equal(paged.materialize(), dense), "the failed op changed the paged tensor unlike the dense one"


def test_an_in_place_op_interrupted_in_its_write_back_leaves_no_pins_and_stale_copies(monkeypatch):
    """A KeyboardInterrupt at the end of the write-back of a gathered window (one page per slab):
    the pages are unpinned, and what they hold reads the same after eviction (they count as written)."""
    from pagedtensor.dispatch import _Window

    with make_pager(device_pages=4, host_pages=4, slab_size=PAGE) as pager:
        paged = PagedTensor.wrap(torch.zeros(2 * PAGE, dtype=torch.uint8), pager)
        pager.evict_all()
        paged.materialize()  # on the device again, with clean host copies of the zeros
        real_write_back = _Window.write_back

        def interrupted_write_back(window, lo, hi):
            real_write_back(window, lo, hi)
            raise KeyboardInterrupt

        monkeypatch.setattr(_Window, "write_back", interrupted_write_back)
        with pytest.raises(KeyboardInterrupt):
            paged.add_(1)
        monkeypatch.setattr(_Window, "write_back", real_write_back)
        assert not paged.allocation.pins
        before = paged.materialize()
        assert torch.equal(before, torch.ones(2 * PAGE, dtype=torch.uint8))
        pager.evict_all()
        assert pager.stats()["resident_bytes"]["device"] == 0
        assert torch.equal(paged.materialize(), before)


def test_an_overwrite_whose_source_does_not_fit_keeps_the_destination():
    with make_pager(device_pages=8) as pager:
        destination = PagedTensor.wrap(torch.randn(2048), pager)  # 2 pages
        source = PagedTensor.wrap(torch.randn(8 * 2048), pager)  # every 8th element: a span of 16 pages
        pager.evict_all()
        destination.copy_(source[::8])  # runs in pieces of a page or two of each
        assert torch.equal(destination.materialize(), source.materialize()[::8])
        destination = PagedTensor.wrap(torch.randn(2, 2048), pager)  # 4 pages: more than a piece
        before = destination.materialize()
        pager.evict_all()
        destination.copy_(source.view(2048, 8)[:, :2].t())  # tiles along rows of one, columns of the other
        assert torch.equal(destination.materialize(), source.materialize().view(2048, 8)[:, :2].t())
        destination.copy_(before)
        pager.evict_all()
        # one row of the source spans 8 pages, more than a piece: the destination goes a part at a
        # time, each part's source read into a plain buffer a part at a time (it raised OutOfPagesError)
        destination.copy_(source.view(2, 8192)[:, ::4])
        assert torch.equal(destination.materialize(), source.materialize().view(2, 8192)[:, ::4])
        assert pager.stats()["resident_bytes"]["device"] <= 8 * 4096


def test_fill_of_a_view_whose_overlap_hides_its_gaps_writes_only_its_elements(pager):
    x = torch.randn(4096)
    paged = evicted(pager, x)
    view = lambda t: t[:2048:2047].unsqueeze(1).expand(2, 1024)  # noqa: E731 - elements 0 and 2047, 1024 times each
    view(x).fill_(7.0)
    view(paged).fill_(7.0)
    assert torch.equal(paged.materialize().cpu(), x)


def test_unsafe_split_and_chunk_are_views(pager):
    x = torch.zeros(4, 3)
    paged = PagedTensor.wrap(x, pager)
    for piece in paged.unsafe_split(2):
        assert isinstance(piece, PagedTensor)
        piece.add_(1)
    for piece in paged.unsafe_chunk(4):
        piece.mul_(3)
    assert torch.equal(paged.materialize().cpu(), torch.full((4, 3), 3.0))


def test_ops_returning_sparse_tensors(pager):
    x = torch.randn(16, 24).relu()
    paged = PagedTensor.wrap(x, pager)
    assert torch.equal(paged.to_sparse().to_dense().cpu(), x)
    assert torch.equal(paged.to_sparse_csr().to_dense().cpu(), x)


@pytest.mark.parametrize("convert", ["half", "double", "bfloat16"])
def test_module_dtype_conversion_keeps_weights_paged_and_converts_them(pager, convert):
    torch.manual_seed(0)
    weight = torch.randn(8, 8)
    dense, paged = torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(8, 8, bias=False)
    dense.weight = torch.nn.Parameter(weight.clone())
    paged.weight = torch.nn.Parameter(PagedTensor.wrap(weight.clone(), pager))
    getattr(dense, convert)()
    getattr(paged, convert)()
    assert isinstance(paged.weight, PagedTensor) and isinstance(paged.weight, torch.nn.Parameter)
    assert paged.weight.dtype == dense.weight.dtype and paged.weight.requires_grad
    assert torch.equal(paged.weight.materialize().cpu(), dense.weight.detach())


def test_data_assignment(pager):
    device = pager.device
    paged = PagedTensor.wrap(torch.arange(6.0).view(2, 3), pager)
    paged.data = torch.full((3, 2), 5.0, dtype=torch.float64, device=device)
    assert (paged.shape, paged.dtype) == ((3, 2), torch.float64)
    assert torch.equal(paged.materialize().cpu(), torch.full((3, 2), 5.0, dtype=torch.float64))
    paged.data = torch.zeros(2, 3, device=device)
    assert torch.equal(paged.materialize().cpu(), torch.zeros(2, 3))
    other = PagedTensor.wrap(torch.ones(4), pager)
    paged.data = other[1:]  # a PagedTensor of the same pager: its pages are shared, as torch shares storage
    other.add_(1)
    assert torch.equal(paged.materialize().cpu(), torch.full((3,), 2.0))
    with pytest.raises(ValueError, match=f"the value is on meta, but this tensor's pager computes on {paged.device}"):
        paged.data = torch.empty(3, device="meta")
    with pytest.raises(TypeError, match="expected a tensor, got list"):
        paged.data = [1.0]


def test_numpy_is_a_read_only_copy(pager):
    """``numpy()`` gives a read-only copy; off the CPU it raises torch's TypeError unless ``force``."""
    paged = PagedTensor.wrap(torch.arange(3.0), pager)
    if pager.device.type != "cpu":
        with pytest.raises(TypeError, match="can't convert cuda:0 device type tensor to numpy"):
            paged.numpy()
    array = paged.numpy(force=pager.device.type != "cpu")
    assert array.tolist() == [0.0, 1.0, 2.0]
    with pytest.raises(ValueError, match="read-only"):
        array[0] = 5  # a write could never reach the pages: it must not pass silently
    assert paged.tolist() == [0.0, 1.0, 2.0]
    grad = PagedTensor.wrap(torch.zeros(2, requires_grad=True), pager)
    for tensor in (torch.zeros(2, requires_grad=True, device=pager.device), grad):  # torch's check of the device comes first
        error = (RuntimeError, "Can't call numpy\\(\\) on Tensor that requires grad") if pager.device.type == "cpu" else (TypeError, "can't convert cuda")
        with pytest.raises(error[0], match=error[1]):
            tensor.numpy()
    assert grad.numpy(force=True).tolist() == [0.0, 0.0]


@pytest.mark.parametrize("module", ["BatchNorm2d", "InstanceNorm2d"])
@pytest.mark.parametrize("grad_mode", ["grad", "no_grad", "inference_mode"])
def test_batch_norm_training_updates_paged_running_statistics(pager, module, grad_mode):
    """batch norm writes its running statistics in place though its schema does not mark them, and
    so does instance norm; under inference_mode both reach the PagedTensor whole (aten.batch_norm,
    aten.instance_norm), whose updates stayed in the device slots, unmarked, lost at the eviction."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5, device=pager.device)
    make = lambda: getattr(torch.nn, module)(3, track_running_stats=True).to(pager.device)  # noqa: E731
    dense, paged = make(), make()
    paged.running_mean = PagedTensor.wrap(torch.zeros(3), pager)
    paged.running_var = PagedTensor.wrap(torch.ones(3), pager)
    context = {"grad": contextlib.nullcontext, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[grad_mode]
    for _ in range(2):
        with context():
            assert torch.equal(paged(x), dense(x))
        pager.evict_all()
    assert torch.equal(paged.running_mean.materialize(), dense.running_mean)
    assert torch.equal(paged.running_var.materialize(), dense.running_var)


def test_deepcopy_keeps_views_shared_and_copies_grad_and_attributes(pager):
    base = PagedTensor.wrap(torch.arange(8.0), pager).requires_grad_()
    base.grad = torch.ones(8, device=pager.device)
    base.note = {"kept": [1]}
    view = base.detach()[2:5]
    copied_base, copied_view = copy.deepcopy([base, view])
    copied_base.detach()[3] = -1.0
    assert copied_view.materialize()[1].item() == -1.0, "the copied view does not share the copied base's pages"
    assert base.materialize()[3].item() == 3.0, "the copy shares the original's pages"
    assert torch.equal(copied_base.grad.cpu(), torch.ones(8)) and copied_base.note == {"kept": [1]}
    assert copied_base.note is not base.note
    complex_base = PagedTensor.wrap(torch.complex(torch.arange(8.0), torch.ones(8)), pager)
    plain_base = complex_base.materialize()
    # torch copies a conjugate or negative view with its values resolved, on its own: the copied base's writes miss it
    for original in (plain_base, complex_base):
        copies = copy.deepcopy([original, original.conj(), original.conj().imag[::2]])
        copies[0].detach()[0] = 5.0
        if original is plain_base:
            expected = copies
            continue
        for got, want in zip(copies, expected):
            assert got.is_conj() == want.is_conj() and got.is_neg() == want.is_neg() and got.stride() == want.stride()
            assert torch.equal(got.materialize() if isinstance(got, PagedTensor) else got, want)
    non_leaf = base[2:4]  # a view of a leaf that requires grad: a PagedTensor with a grad_fn
    assert isinstance(non_leaf, PagedTensor) and not non_leaf.is_leaf
    with pytest.raises(RuntimeError, match="graph leaves"):
        copy.deepcopy(non_leaf)



def test_deepcopy_of_a_paged_parameter_copies_what_deepcopy_of_a_parameter_copies(pager):
    """A paged parameter is deep-copied as ``nn.Parameter`` is: data and ``requires_grad``, no ``.grad``
    and no Python attributes. (It kept the gradient: a copied model trained without a first
    ``zero_grad`` stepped with the original's gradient added to its own.)"""
    plain = torch.nn.Linear(8, 4, device=pager.device)
    paged = torch.nn.Linear(8, 4, device=pager.device)
    paged.load_state_dict(plain.state_dict())
    paged.weight = torch.nn.Parameter(PagedTensor.wrap(paged.weight.detach().clone(), pager))
    x = torch.randn(3, 8, device=pager.device)
    for model in (plain, paged):
        model(x).sum().backward()
        model.weight.note = "kept"
    plain_copy, paged_copy = copy.deepcopy(plain), copy.deepcopy(paged)
    assert plain_copy.weight.grad is None and not hasattr(plain_copy.weight, "note")  # torch's behaviour
    assert type(paged_copy.weight) is PagedTensor and isinstance(paged_copy.weight, torch.nn.Parameter)
    assert paged_copy.weight.grad is None and not hasattr(paged_copy.weight, "note")
    assert paged_copy.weight.requires_grad and paged.weight.grad is not None
    for model in (plain_copy, paged_copy):
        model(x).sum().backward()
        torch.optim.SGD(model.parameters(), lr=1.0).step()
    assert torch.equal(paged_copy.weight.materialize(), plain_copy.weight.detach())


def test_deepcopy_of_parameters_viewing_one_allocation_copies_each_apart(pager):
    """``nn.Parameter`` deep-copies its data by ``clone``: two parameters viewing one tensor come out
    apart, each as large as itself. So do paged ones (they stayed views of one copied allocation, so
    a write through one copied parameter changed the other; a small view copied its whole
    allocation). A transposed view keeps clone's layout; a conjugate view comes out resolved."""
    pager.evict_all()

    def build(flat: torch.Tensor, matrix: torch.Tensor) -> torch.nn.Module:
        module = torch.nn.Module()
        module.w, module.head, module.tail = (torch.nn.Parameter(t) for t in (flat, flat[:10], flat[100:150:2]))
        module.wt, module.conj = torch.nn.Parameter(matrix.t()), torch.nn.Parameter(matrix.conj(), requires_grad=False)
        return module

    flat, matrix = torch.arange(200.0), torch.randn(6, 4, dtype=torch.complex64)
    plain = copy.deepcopy(build(flat.clone(), matrix.clone()))
    paged_flat, paged_matrix = PagedTensor.wrap(flat.clone(), pager), PagedTensor.wrap(matrix.clone(), pager)
    paged = copy.deepcopy(build(paged_flat, paged_matrix))
    for name in ("w", "head", "tail", "wt", "conj"):
        got, want = getattr(paged, name), getattr(plain, name)
        assert type(got) is PagedTensor and isinstance(got, torch.nn.Parameter), name
        assert got.stride() == want.stride() and got.is_conj() == want.is_conj() and got.requires_grad == want.requires_grad, name
        assert torch.equal(got.materialize().cpu(), want.detach()), name
    assert paged.head.untyped_storage().nbytes() == 40 and paged.tail.allocation.nbytes <= 4096
    with torch.no_grad():
        for module in (plain, paged):
            module.w.add_(1)
    for name in ("head", "tail"):
        assert torch.equal(getattr(paged, name).materialize().cpu(), getattr(plain, name).detach()), name
    assert torch.equal(paged_flat.materialize().cpu(), flat), "the copy shares the original's pages"


def test_a_paged_tensor_passes_to_a_spawned_process(pager):
    """torch shares a pickled tensor's memory with a spawned child by fd number; the host copy a
    PagedTensor pickles as must stay open until the child has read it (it was freed at once: the
    child failed with "unable to resize file")."""
    dense = torch.randn(64, 256)
    paged = PagedTensor.wrap(dense, pager)
    process = multiprocessing.get_context("spawn").Process(target=exit_zero_if_paged_and_equal, args=(paged[8:], dense[8:]))
    process.start()
    process.join(120)
    assert process.exitcode == 0


def test_a_non_leaf_that_requires_grad_is_refused_by_process_queues_as_torch_refuses_it(pager):
    """torch.multiprocessing's pickler (queues, pipes, a process's arguments) refuses a non-leaf
    tensor that requires grad: autograd does not cross processes. A PagedTensor one was sent and
    arrived a detached leaf (found by a helper's probe). Plain pickle takes both, as torch's does."""
    import pickle
    from multiprocessing.reduction import ForkingPickler

    dense = torch.randn(8, 4, requires_grad=True)
    paged = PagedTensor.wrap(dense.detach().clone(), pager).requires_grad_()
    for tensor in (dense[2:], paged[2:]):
        assert not tensor.is_leaf and tensor.requires_grad
        with pytest.raises(RuntimeError, match="Cowardly refusing to serialize non-leaf tensor which requires_grad"):
            ForkingPickler.dumps(tensor)
        assert pickle.loads(pickle.dumps(tensor)).shape == (6, 4)
    for tensor in (paged, paged.detach()[2:]):
        got = pickle.loads(ForkingPickler.dumps(tensor))
        assert type(got) is PagedTensor and got.requires_grad == tensor.requires_grad
        assert torch.equal(got.materialize(), tensor.detach().materialize())


def test_storage_sharing_and_dlpack_raise_instead_of_crashing(pager):
    paged = PagedTensor.wrap(torch.arange(4.0), pager)
    with pytest.raises(NotImplementedError, match="share_memory_: pages live in this process's pager"):
        paged.share_memory_()
    module = torch.nn.Module()
    module.weight = torch.nn.Parameter(paged, requires_grad=False)
    with pytest.raises(NotImplementedError, match="share_memory_"):
        module.share_memory()  # what multiprocessing users call on a model
    with pytest.raises(NotImplementedError, match="PagedTensor.storage"):  # a RuntimeError too
        paged.storage()
    for tensor in (paged, paged[1:]):
        with pytest.raises(RuntimeError, match="PagedTensor.data_ptr.*materialize"):
            tensor.data_ptr()
    with pytest.raises(BufferError, match="export t.materialize\\(\\) instead"):
        torch.from_dlpack(paged)
    for export in (torch.utils.dlpack.to_dlpack, torch.to_dlpack):
        # torch's C function takes the wrapper's storage, which holds no memory: a capsule over a null
        # pointer, read by its consumer (a segfault).
        with pytest.raises(BufferError, match="export t.materialize\\(\\) instead"):
            export(paged)
        assert torch.equal(torch.from_dlpack(export(torch.arange(4.0))), torch.arange(4.0))


def test_safetensors_refuses_a_paged_tensor_by_name(pager, tmp_path):
    """safetensors reads a CPU tensor's bytes at ``data_ptr()``: a view at an offset crashed the
    process, a whole tensor failed with "invalid shape, data type, or offset". A paged CPU tensor is
    refused naming ``materialize``; one on another device is moved to the CPU by safetensors first
    (a plain copy), so it saves its values."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    paged = PagedTensor.wrap(torch.randn(4, 8, device=pager.device), pager)
    for tensor in (paged, paged[1:3]):
        if pager.device.type == "cpu":
            with pytest.raises(RuntimeError, match="PagedTensor.*materialize"):
                safetensors_torch.save_file({"t": tensor}, str(tmp_path / "x.safetensors"))
        else:
            safetensors_torch.save_file({"t": tensor}, str(tmp_path / "x.safetensors"))
            assert torch.equal(safetensors_torch.load_file(str(tmp_path / "x.safetensors"))["t"], tensor.materialize().cpu())
    safetensors_torch.save_file({"t": paged[1:3].materialize()}, str(tmp_path / "x.safetensors"))
    assert torch.equal(safetensors_torch.load_file(str(tmp_path / "x.safetensors"), device=str(pager.device))["t"], paged[1:3].materialize())


def test_safetensors_load_model_loads_into_paged_parameters(pager, tmp_path):
    """``safetensors.torch.load_model`` into a model with paged parameters loads as into a dense one
    (it raised: its search for shared storages read ``storage()``, whose RuntimeError it does not
    expect; it takes NotImplementedError for a storage with no pointer). ``save_model`` of such a model
    either raises naming ``materialize`` (a CPU tensor: safetensors reads its bytes in place) or
    writes exactly its weights (another device: safetensors moves each tensor to the CPU first,
    which gives a plain copy)."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    torch.manual_seed(0)
    source, dense, paged = (torch.nn.Linear(8, 8).to(pager.device) for _ in range(3))
    paged.weight = torch.nn.Parameter(PagedTensor.wrap(paged.weight.detach(), pager))
    path = str(tmp_path / "linear.safetensors")
    safetensors_torch.save_model(source, path)
    for model in (dense, paged):
        missing, unexpected = safetensors_torch.load_model(model, path)
        assert not missing and not unexpected
    assert isinstance(paged.weight, PagedTensor)
    assert torch.equal(paged.weight.materialize(), dense.weight.detach()) and torch.equal(paged.bias, dense.bias)
    paged_path = str(tmp_path / "paged.safetensors")
    if pager.device.type == "cpu":
        with pytest.raises(RuntimeError, match="PagedTensor.*materialize"):
            safetensors_torch.save_model(paged, paged_path)
    else:
        safetensors_torch.save_model(paged, paged_path)
        saved = safetensors_torch.load_file(paged_path)
        assert torch.equal(saved["weight"], dense.weight.detach().cpu()) and torch.equal(saved["bias"], dense.bias.detach().cpu())


def test_views_under_inference_mode_of_a_tensor_wrapped_outside_it(pager):
    """Weights are wrapped, then served under ``torch.inference_mode()``: a view of a normal tensor
    is a normal tensor there too (it shares the base's version counter), as torch's views are."""
    x = rows_tensor(device=pager.device)
    w = PagedTensor.wrap(x, pager)
    inputs = torch.randn(3, x.shape[1], device=pager.device)
    with torch.inference_mode():
        rows, transposed = w[2:4], w.t()
        assert not rows.is_inference() and torch.equal(rows.materialize(), x[2:4])
        assert torch.equal(transposed.materialize(), x.t())
        assert torch.equal(torch.nn.functional.linear(inputs, w), torch.nn.functional.linear(inputs, x))
        made_inside = PagedTensor.wrap(x, pager)
        assert made_inside.is_inference() and made_inside[1:2].is_inference()


def test_list_views_under_inference_mode_share_the_base_as_torchs_do(pager):
    """``w.chunk(3)`` under ``torch.inference_mode()`` raised "already had autograd metadata" (chunk
    has a view-recording kernel of its own beside its composite one, which recorded the views its
    split had already recorded): ``nn.MultiheadAttention`` with paged weights failed there for any
    q, k, v not one tensor. Each list-returning view op gives views of the base, as torch's."""
    x = rows_tensor(device=pager.device)
    w = PagedTensor.wrap(x.clone(), pager)
    with torch.inference_mode():
        for name, split in {"chunk": lambda t: t.chunk(3), "tensor_split": lambda t: t.tensor_split(3), "split": lambda t: t.split(5),
                            "unbind": lambda t: t[:4].unbind(), "hsplit": lambda t: t.hsplit(2)}.items():  # fmt: skip
            parts, expected = split(w), split(x)
            assert len(parts) == len(expected), name
            for part, plain in zip(parts, expected):
                assert not part.is_inference() and (part._base is w) == (plain._base is x) and torch.equal(part.materialize(), plain), name
        version = w._version
        w.chunk(3)[1].add_(1)
        assert w._version > version
    x.chunk(3)[1].add_(1)
    assert torch.equal(w.materialize(), x)
    torch.manual_seed(0)
    plain_attention = torch.nn.MultiheadAttention(32, 4).eval().to(pager.device)
    paged_attention = torch.nn.MultiheadAttention(32, 4).eval().to(pager.device)
    paged_attention.load_state_dict(plain_attention.state_dict())
    paged_attention.in_proj_weight = torch.nn.Parameter(PagedTensor.wrap(plain_attention.in_proj_weight.detach().clone(), pager))
    q, k, v = (torch.randn(n, 2, 32, device=pager.device) for n in (6, 7, 7))
    with torch.inference_mode():
        assert torch.equal(paged_attention(q, k, v)[0], plain_attention(q, k, v)[0])


@pytest.mark.parametrize("module", ["linear", "gru", "rnn", "decoder_layer"])
def test_modules_with_paged_weights_under_inference_mode_give_the_plain_modules_bits(pager, module):
    """Under ``torch.inference_mode()`` an op autograd decomposes (``linear``, ``matmul``, ``rnn_tanh``)
    reaches the PagedTensor whole; run on dense copies that do not require grad, matmul folded a 3-D
    input where torch does not fold it beside a weight that requires grad: ``nn.Linear`` on a
    transposed 3-D input, ``nn.GRU``/``nn.RNN`` with ``batch_first`` and ``nn.TransformerDecoderLayer``
    differed from the plain module in the last bits. They run torch's own kernel on the weights."""
    import copy

    torch.manual_seed(0)
    if module == "linear":
        plain, x = torch.nn.Linear(8, 24), (torch.randn(2, 3, 8).transpose(0, 1),)
    elif module in ("gru", "rnn"):
        plain = (torch.nn.GRU if module == "gru" else torch.nn.RNN)(8, 16, num_layers=2, batch_first=True, bidirectional=True)
        x = (torch.randn(3, 5, 8),)
    else:
        plain = torch.nn.TransformerDecoderLayer(32, 4, 64, dropout=0.0, batch_first=True).eval()
        x = (torch.randn(2, 5, 32), torch.randn(2, 6, 32))
    plain = plain.to(pager.device)
    x = tuple(t.to(pager.device) for t in x)
    paged = copy.deepcopy(plain)
    for name, parameter in list(paged.named_parameters()):
        owner = paged.get_submodule(name.rpartition(".")[0])
        setattr(owner, name.rpartition(".")[2], torch.nn.Parameter(PagedTensor.wrap(parameter.detach().clone(), pager)))
    with torch.inference_mode(), torch.backends.cudnn.flags(enabled=False):  # cuDNN reads weights by pointer (README)
        expected, got = plain(*x), paged(*x)
    expected, got = (expected[0], got[0]) if isinstance(expected, tuple) else (expected, got)
    assert torch.equal(got.materialize() if isinstance(got, PagedTensor) else got, expected)


def test_ops_on_parameters_under_inference_mode_give_torchs_bits_whichever_operand_is_paged(pager):
    """Under ``torch.inference_mode()``: ``F.linear`` of a paged transposed 3-D input with a plain
    weight that requires grad took another matmul path than torch (its weight's flag was not seen);
    ``linalg.svdvals``, the nuclear norm and ``cond`` of a paged parameter, run through their
    composite kernel on the PagedTensor, took a subclass's path (other last bits) where run dense
    they give torch's."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(24, 8, device=pager.device))
    square = torch.randn(16, 16, device=pager.device)
    plain_square, paged_square = torch.nn.Parameter(square.clone()), torch.nn.Parameter(PagedTensor.wrap(square.clone(), pager))
    dense = lambda t: t.materialize() if isinstance(t, PagedTensor) else t  # noqa: E731
    with torch.inference_mode():
        paged_x = PagedTensor.wrap(torch.randn(3, 2, 8, device=pager.device), pager)
        plain_x = paged_x.materialize()
        assert torch.equal(dense(torch.nn.functional.linear(paged_x.transpose(0, 1), weight)), torch.nn.functional.linear(plain_x.transpose(0, 1), weight))
        for op in (torch.linalg.svdvals, torch.nuclear_norm, torch.linalg.cond, lambda t: torch.linalg.matrix_norm(t, -2)):
            assert torch.equal(dense(op(paged_square)), op(plain_square))


@pytest.mark.parametrize("name", ["hfft", "hfft2", "hfftn", "ihfftn", "rfftn", "irfftn"])
def test_ffts_of_a_real_paged_tensor_under_inference_mode_give_torchs_values(pager, name):
    """``torch.fft.hfftn`` of a real PagedTensor under ``torch.inference_mode()`` reaches the subclass
    whole, where torch runs with the conjugate view's fallback off; its composite kernel conjugates a
    complex intermediate as a view, read as raw bits: off by up to 3.8. FFTs run with it on."""
    x = torch.randn(5, 6, 7, device=pager.device)
    op = getattr(torch.fft, name)
    with torch.inference_mode():
        expected = op(x, norm="ortho")
        got = op(PagedTensor.wrap(x.clone(), pager), norm="ortho")
    got = got.materialize() if isinstance(got, PagedTensor) else got
    assert got.dtype == expected.dtype and torch.equal(got, expected)


def test_views_of_an_inference_tensor_outside_inference_mode_are_inference_tensors(pager):
    """A tensor wrapped under ``torch.inference_mode()`` (a KV cache, say) is an inference tensor, and
    so are its views and ``detach()`` outside it, as torch's are. They were normal tensors: one could
    be saved for backward, a later write to the base inside inference mode (which bumps no version
    counter) went unnoticed, and the gradient came out of the new values, where torch raises."""
    x = rows_tensor(device=pager.device)
    with torch.inference_mode():
        cache = PagedTensor.wrap(x, pager)
    assert cache[1:].is_inference() and cache.t().is_inference() and cache.detach().is_inference()
    weight = torch.ones_like(x, requires_grad=True)
    with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
        (cache[0:] * weight).sum()
    with pytest.raises(RuntimeError, match="Inplace update to inference tensor outside InferenceMode"):
        cache[1:3].add_(1)  # (torch raises after the write, for plain tensors too)
    with torch.inference_mode():
        cache[1:3].add_(1)
    x[1:3] += 1
    x[1:3] += 1
    assert torch.equal(cache.materialize(), x)


def test_ops_that_may_alias_convert_and_copy_under_inference_mode(pager):
    """``to``, ``contiguous``, ``reshape`` and ``flatten`` return their input, a view or a new tensor
    as needed; they reach the subclass whole under inference mode (below autograd), where their
    schema's alias once made every result a view of the same bytes: converted dtypes and copied
    layouts read the old bytes reinterpreted."""
    x = rows_tensor(device=pager.device)
    w = PagedTensor.wrap(x, pager)
    with torch.inference_mode():
        for op in (lambda t: t.to(torch.int32), lambda t: t.half(), lambda t: t.t().contiguous(), lambda t: t.t().reshape(-1),
                   lambda t: t.t().flatten(), lambda t: t.to("cpu", torch.float64)):  # fmt: skip
            got, expected = op(w), op(x)
            got = got.materialize() if isinstance(got, PagedTensor) else got
            assert got.dtype == expected.dtype and torch.equal(got.cpu(), expected.cpu())
        assert w.contiguous() is w and w.to(torch.float32) is w
        flat = w.reshape(-1)  # contiguous: a view, sharing the pages
        assert isinstance(flat, PagedTensor) and flat.allocation is w.allocation
        flat[:3] = 7.0
        x[0, :3] = 7.0
        # Ops returning their input (a view) with no alias annotation: writes through them land.
        for op in (lambda t: t.type_as(t), lambda t: torch.atleast_2d(t), lambda t: t.sum_to_size(t.shape),
                   lambda t: torch.broadcast_tensors(t)[0], lambda t: t.unsafe_chunk(1)[0]):  # fmt: skip
            op(w).add_(1.0)
            x.add_(1.0)
        if pager.device.type == "cpu":  # tensor_split's kernel reads CPU indices by pointer: it runs dense
            for got, expected in zip(torch.tensor_split(w, PagedTensor.wrap(torch.tensor([2, 4]), pager)), torch.tensor_split(x, [2, 4])):
                assert torch.equal(got.materialize() if isinstance(got, PagedTensor) else got, expected)
        start = PagedTensor.wrap(torch.tensor(1, device=pager.device), pager)  # narrow.Tensor: a tensor start
        assert torch.equal(torch.narrow(w, 1, start, 2).materialize(), x[:, 1:3])
    assert torch.equal(w.materialize(), x)


def test_composite_ops_under_inference_mode_run_what_plain_tensors_run(pager):
    """Below autograd a composite op that returns its input runs its C++ kernel as on plain tensors
    (dropout in eval returns its input; torch._decomp's Python version, a copy); any other runs dense,
    as on plain tensors (matmul, interpolate, GRU, svdvals: the Python versions or the kernel's own
    subclass path give other bits), and so does one with a backend kernel (mish_backward)."""
    generator = torch.Generator().manual_seed(0)
    device = pager.device
    g, x = torch.randn(8, 16, generator=generator).to(device), (torch.randn(8, 16, generator=generator) * 3).to(device)
    image = torch.randn(1, 2, 5, 7, generator=generator).to(device)
    gru = torch.nn.GRU(16, 6, batch_first=True).eval().to(device)
    cases = [
        lambda t, u: torch.ops.aten.mish_backward(t, u),
        lambda t, u: torch.matmul(t, u.t()),
        lambda t, u: F.interpolate(t[None, None], scale_factor=2.0, mode="bicubic"),
        lambda t, u: gru(t[None])[0],
        lambda t, u: torch.linalg.svdvals(u),  # its kernel's subclass path would compute U and V too
    ]
    with torch.inference_mode():
        for op in cases:
            expected = op(g, x)
            got = op(PagedTensor.wrap(g.clone(), pager), PagedTensor.wrap(x.clone(), pager))
            assert torch.equal(got.materialize() if isinstance(got, PagedTensor) else got, expected)
        paged_image = PagedTensor.wrap(image.clone(), pager)
        F.dropout(paged_image, p=0.5, training=False).mul_(2)  # returns its input, as for plain tensors
        assert torch.equal(paged_image.materialize(), image * 2)


INFERENCE_COMPOSITES = {
    "T.contiguous": lambda t: t.transpose(0, 1).contiguous(),
    "copying reshape": lambda t: t.transpose(0, 1).reshape(-1),
    "flatten of a strided view": lambda t: t[:, ::2].flatten(),
    "negative": torch.negative,
    "multiply": lambda t: torch.multiply(t, 2.0),
    "subtract": lambda t: torch.subtract(t, t),
    "divide": lambda t: torch.divide(t, 3.0),
    "greater": lambda t: torch.greater(t, 0.0),
    "isclose": lambda t: torch.isclose(t, t),
    "type_as": lambda t: t.type_as(torch.zeros((), dtype=torch.float64)),
    "fix": torch.fix,
    "diff": lambda t: torch.diff(t, dim=0),
    "chunk(0)": lambda t: t.chunk(0),
    "movedim of a repeated dim": lambda t: t.movedim((0, 0), (1, 2)),
    "unflatten of a bad size": lambda t: t.unflatten(1, (3, 5)),
}


@pytest.mark.parametrize("name", sorted(INFERENCE_COMPOSITES))
def test_composite_ops_past_the_tier_under_inference_mode_run_as_outside_it(name):
    """Under inference mode an op autograd decomposes reaches the subclass whole: past the device tier
    it raised DeviceTierFullError (torch's own argument errors too); it now runs decomposed, each op
    a piece at a time, as outside inference mode."""
    op = INFERENCE_COMPOSITES[name]
    x = torch.randn(16, 64, 8, generator=torch.Generator().manual_seed(5))  # 8 pages on a 4-page tier
    with make_pager(device_pages=4) as pager, torch.inference_mode():
        try:
            expected = op(x)
        except RuntimeError as error:
            with pytest.raises(RuntimeError) as raised:
                op(PagedTensor.wrap(x.clone(), pager))
            assert type(raised.value) is RuntimeError and str(raised.value) == str(error)
            return
        got = op(PagedTensor.wrap(x.clone(), pager))
        got = got.materialize() if isinstance(got, PagedTensor) else got
        assert got.dtype == expected.dtype and torch.equal(got, expected), name


@pytest.mark.parametrize("view", ["reshape", "flatten", "view_as", "expand_as", "movedim", "mT"])
def test_views_by_composite_ops_under_inference_mode_are_views(view, pager):
    """reshape, flatten, ... of a normal tensor under inference mode are views sharing its version
    counter, as torch's are: a write through one after the tensor was saved for backward makes the
    backward raise (it ran on the new values), and a write to one outside inference mode raises."""
    make = {"reshape": lambda t: t.reshape(-1), "flatten": lambda t: t.flatten(), "view_as": lambda t: t.view_as(t),
            "expand_as": lambda t: t.expand_as(t), "movedim": lambda t: t.movedim(0, 1), "mT": lambda t: t.mT}[view]  # fmt: skip
    for paged in (False, True):
        x = torch.randn(4, 8, device=pager.device)
        weight = (PagedTensor.wrap(x, pager) if paged else x).requires_grad_()
        loss = (weight * weight).sum()  # saves weight
        with torch.inference_mode():
            made = make(weight)
            assert made._is_view() and made.requires_grad, (view, paged)
            made.add_(1)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()
        with pytest.raises(RuntimeError, match="A view was created in inference mode and is being modified inplace in normal mode"):
            made.add_(1)


def test_a_dtype_view_is_an_inference_tensor_exactly_where_made_in_inference_mode(pager):
    """``t.view(dtype)`` is no view autograd tracks: torch's is an inference tensor where it is made in
    inference mode (of a normal tensor too), and a normal one made outside (of an inference tensor too)."""
    normal = PagedTensor.wrap(torch.randn(4, 8, device=pager.device), pager)
    with torch.inference_mode():
        inference = PagedTensor.wrap(torch.randn(4, 8, device=pager.device), pager)
        assert normal.view(torch.int32).is_inference()
    assert not inference.view(torch.int32).is_inference()
    inference.view(torch.int32).add_(1)  # a normal tensor: written outside inference mode, as torch's
    with pytest.raises(RuntimeError, match="Inplace update to inference tensor outside InferenceMode"):
        with torch.inference_mode():
            made = normal.view(torch.int32)
        made.add_(1)


def test_in_place_metadata_ops_that_change_nothing_run(pager):
    """transpose_(d, d), squeeze_() without dims of one element, t_() of a vector, as_strided_ to its
    own layout, resize_ to its own size in its own format and detach_() under inference mode leave
    the tensor as it is, as torch's do (they were refused as changes of shape, strides or storage);
    any that changes the layout is still refused, and bad arguments raise torch's errors."""
    x = torch.randn(4, 8, device=pager.device)
    t = PagedTensor.wrap(x.clone(), pager)
    for op in (lambda u: u.transpose_(1, 1), lambda u: u.squeeze_(), lambda u: u[0].t_(), lambda u: u.as_strided_((4, 8), (8, 1)),
               lambda u: u.resize_(4, 8, memory_format=torch.contiguous_format), lambda u: u.resize_as_(x)):  # fmt: skip
        op(t)
        assert (tuple(t.shape), t.stride(), t.storage_offset()) == ((4, 8), (8, 1), 0)
    with torch.inference_mode():
        assert t.detach_() is t
    assert torch.equal(t.materialize(), x)
    with pytest.raises(NotImplementedError, match="changes a tensor's shape, strides or storage in place"):
        t.transpose_(0, 1)
    with pytest.raises(NotImplementedError, match="changes a tensor's shape, strides or storage in place"):
        t.resize_(64)
    with pytest.raises(IndexError, match="Dimension out of range"):
        t.transpose_(1, 5)
    assert (tuple(t.shape), t.stride()) == ((4, 8), (8, 1))


def test_set_to_other_data_is_refused_and_to_itself_changes_nothing(pager):
    """``a.set_(b)`` makes ``a`` view ``b``'s storage in torch; a PagedTensor's pages are fixed, so it
    raises naming the op, whatever the source (a PagedTensor of the same shape was left reading its
    old values, silently; a plain source raised a meta-device error). ``t.set_(t)`` changes nothing."""
    x = torch.randn(4, 8, device=pager.device)
    a, b = PagedTensor.wrap(x.clone(), pager), PagedTensor.wrap(torch.ones(4, 8, device=pager.device), pager)
    refused = "aten.set_.* changes a tensor's shape, strides or storage in place"
    for set_other in (lambda: a.set_(b), lambda: a.set_(torch.ones(4, 8, device=pager.device)), lambda: a.set_(b, 0, (4, 8), (8, 1)),
                      lambda: a.set_(b.untyped_storage()), lambda: a.set_(a[1:]), lambda: a.data.set_(b)):  # fmt: skip
        with pytest.raises(NotImplementedError, match=refused):
            set_other()
    assert a.set_(a) is a
    assert torch.equal(a.materialize(), x)


def test_in_place_ops_reading_their_own_bytes_see_the_overlap_like_torch(pager):
    """Non-elementwise in-place ops write through a view bounded to the window; the allocation's
    other views in the op share that storage, so torch still refuses a partial overlap."""
    x = torch.randn(6, 6, generator=torch.Generator().manual_seed(3)).to(pager.device)
    index = torch.tensor([5, 1, 0], device=pager.device)
    for op in (lambda t: t[:3].put_(index, t[2, :3]), lambda t: t[:4].index_add_(0, torch.tensor([0, 2], device=pager.device), t[1:3])):
        with pytest.raises(RuntimeError, match="single memory location"):
            op(x.clone())
        paged = PagedTensor.wrap(x.clone(), pager)
        with pytest.raises(RuntimeError, match="single memory location"):
            op(paged)
        assert torch.equal(paged.materialize(), x)


def test_second_derivatives_of_a_paged_input(pager):
    """``torch.func.hessian`` moves a tangent ``.to("meta")`` below autograd."""
    x = torch.arange(3.0, device=pager.device)
    f = lambda v: (v.sin() * v).sum()  # noqa: E731
    assert torch.equal(torch.func.hessian(f)(PagedTensor.wrap(x.clone(), pager)), torch.func.hessian(f)(x))


def test_row_gathers_that_need_no_rows_fault_nothing_in(pager):
    """An empty index returns an empty result and a bad index raises IndexError, without faulting in
    a table larger than the device tier (the generic path would need all of it at once)."""
    x = rows_tensor(rows=64, device=pager.device)  # 16 pages; the device tier holds 8
    table = PagedTensor.wrap(x, pager)
    empty = torch.tensor([], dtype=torch.long, device=pager.device)
    for gather in (lambda t: t[empty], lambda t: t.index_select(0, empty), lambda t: torch.embedding(t, empty.view(0, 3))):
        got, expected = gather(table), gather(x)
        assert got.shape == expected.shape and got.dtype == expected.dtype
    for bad in ([0, 64], [-65], [100]):
        index = torch.tensor(bad, device=pager.device)
        with pytest.raises(IndexError, match="out of bounds"):
            table[index]
        with pytest.raises(IndexError, match="index out of range in self"):  # torch's CPU message
            table.index_select(0, index.clamp(min=-1))
        with pytest.raises(IndexError, match="index out of range in self"):
            torch.embedding(table, index.abs())
    with pytest.raises(IndexError, match="vector"):
        table.index_select(0, torch.zeros(2, 2, dtype=torch.long, device=pager.device))
    assert torch.equal(table[torch.tensor([-1, 0], device=pager.device)], x[[-1, 0]])


def test_as_strided_past_the_allocation_raises_like_torch(pager):
    t = PagedTensor.wrap(torch.arange(25.0, device=pager.device), pager)
    with pytest.raises(RuntimeError, match="out of bounds for storage"):
        t.as_strided((500,), (1,))
    assert torch.equal(t.as_strided((5,), (5,), 0).materialize(), torch.arange(0.0, 25.0, 5.0, device=pager.device))


@pytest.mark.parametrize("op", ["select_scatter", "slice_scatter", "diagonal_scatter"])
def test_scatters_cloning_the_storage_clone_the_allocation_not_the_device_slab(pager, op):
    """``select_scatter``, ``slice_scatter`` and ``diagonal_scatter`` clone their input's whole
    storage (``clone_preserve_strides``): run dense on the device slab, the result's storage was a
    copy of the whole slab, another tensor's bytes in it, at the slab's offset (found by a helper's
    probe: 64 MiB for a 1,920-byte result). It is a clone of the allocation, as torch's of the storage."""
    other = PagedTensor.wrap(torch.full((1024,), 99.0, device=pager.device), pager)
    base = torch.arange(2400.0, device=pager.device)
    x = base[5:].reshape(-1, 5)[1:, 1:]  # offset 11 into its storage, not contiguous
    paged = PagedTensor.wrap(base.clone(), pager)[5:].reshape(-1, 5)[1:, 1:]
    _ = other + 1, paged + 1  # both fault in, to different slots
    call = {
        "select_scatter": lambda t: torch.select_scatter(t, -torch.arange(4.0, device=pager.device), 0, 2),
        "slice_scatter": lambda t: torch.slice_scatter(t, -torch.ones(2, 4, device=pager.device), 0, 1, 3),
        "diagonal_scatter": lambda t: torch.diagonal_scatter(t, -torch.arange(4.0, device=pager.device)),
    }[op]
    expected, got = call(x), call(paged)
    assert type(got) is torch.Tensor and got.stride() == expected.stride() and torch.equal(got, expected)
    assert got.storage_offset() == expected.storage_offset()
    assert got.untyped_storage().nbytes() == expected.untyped_storage().nbytes()
    whole = (base.numel(),), (1,), 0
    assert torch.equal(got.as_strided(*whole), expected.as_strided(*whole))


@pytest.mark.parametrize("view", [lambda t: t.t(), lambda t: t[3:, 2:]], ids=["transposed", "offset slice"])
def test_as_strided_scatter_of_a_non_contiguous_view_requiring_grad_raises_torchs_error(pager, view):
    """torch refuses it (its autograd supports contiguous inputs only); run on the materialized
    allocation, which requires no grad, it passed, and its backward gave a wrong gradient or
    "setStorage: sizes ... out of bounds" (found by a helper's probe)."""
    x = torch.randn(24, 20, device=pager.device)
    src = torch.ones(3, 4, device=pager.device)
    with pytest.raises(RuntimeError) as expected:
        torch.as_strided_scatter(view(x.clone().requires_grad_()), src, (3, 4), (2, 1), 3)
    with pytest.raises(RuntimeError) as got:
        torch.as_strided_scatter(view(PagedTensor.wrap(x.clone(), pager).requires_grad_()), src, (3, 4), (2, 1), 3)
    assert str(got.value).splitlines()[0] == str(expected.value).splitlines()[0]


@pytest.mark.parametrize("offset", [None, 0, 7, 1100])
def test_as_strided_copy_and_scatter_count_the_offset_from_the_allocation(pager, offset):
    """Their storage offset counts from the start of the tensor's storage: for a PagedTensor its
    allocation, not the device slab its pages sit in (another tensor's pages fill the first slots)."""
    other = PagedTensor.wrap(torch.full((1024,), 99.0, device=pager.device), pager)
    base = torch.arange(2400.0, device=pager.device)
    x = base[5:].reshape(-1, 5)[1:, 1:]  # offset 11 into its storage, not contiguous
    paged = PagedTensor.wrap(base.clone(), pager)[5:].reshape(-1, 5)[1:, 1:]
    _ = other + 1, paged + 1  # both fault in, to different slots
    size, stride = (3, 4), (5, 2)
    expected = torch.as_strided_copy(x, size, stride, offset)
    got = torch.as_strided_copy(paged, size, stride, offset)
    assert type(got) is torch.Tensor and got.stride() == expected.stride() and torch.equal(got, expected)
    src = -torch.arange(12.0, device=pager.device).reshape(size)
    expected = torch.as_strided_scatter(x, src, size, stride, offset)
    got = torch.as_strided_scatter(paged, src, size, stride, offset)
    assert type(got) is torch.Tensor and got.storage_offset() == expected.storage_offset() and got.stride() == expected.stride()
    assert torch.equal(got, expected)
    whole = (base.numel(),), (1,), 0  # the storage of each: a clone of the whole storage, scattered into
    assert torch.equal(got.as_strided(*whole), expected.as_strided(*whole))
    got = torch.as_strided_scatter(x, PagedTensor.wrap(src.clone(), pager), size, stride, offset)
    assert torch.equal(got, expected)
    for out in (torch.empty(0, device=pager.device), PagedTensor.wrap(torch.zeros(expected.shape, device=pager.device), pager)):
        aten.as_strided_scatter.out(paged, src, size, stride, offset, out=out)
        assert torch.equal(out.materialize() if isinstance(out, PagedTensor) else out, expected)
    out = PagedTensor.wrap(torch.zeros(size, device=pager.device), pager)
    aten.as_strided_copy.out(paged, size, stride, offset, out=out)
    assert torch.equal(out.materialize(), torch.as_strided_copy(x, size, stride, offset))
    assert torch.equal(paged.materialize(), x) and torch.equal(other.materialize(), torch.full_like(other.materialize(), 99.0))
    with pytest.raises(RuntimeError, match="out of bounds for storage"):
        torch.as_strided_copy(paged, (4,), (1,), 2398)


def test_an_in_place_op_that_would_resize_its_input_writes_no_other_tensor(pager):
    """addbmm_ resizes a self of the wrong shape; run on a view of the device slab, the resize grew
    it over the next slots and the op wrote another tensor's pages before the refusal."""
    small = PagedTensor.wrap(torch.zeros(1, device=pager.device), pager)
    neighbour = PagedTensor.wrap(torch.arange(4096.0, device=pager.device), pager)
    _ = small + 1, neighbour + 1  # both resident, in adjacent slots
    batch1, batch2 = torch.ones(3, 5, 4, device=pager.device), torch.ones(3, 4, 1100, device=pager.device)
    assert torch.zeros(1, device=pager.device).addbmm_(batch1, batch2).shape == (5, 1100)  # torch resizes
    with pytest.raises(NotImplementedError, match="would resize a PagedTensor it writes"):
        small.addbmm_(batch1, batch2)
    assert torch.equal(small.materialize(), torch.zeros(1, device=pager.device))
    assert torch.equal(neighbour.materialize(), torch.arange(4096.0, device=pager.device))


def test_out_arguments_that_torch_reshapes_or_resizes_to_their_own_size(pager):
    """matmul(out=) folds batch dims through a reshaped view of ``out`` and copies it back unless the
    two share a storage; randn/empty(out=) resize ``out`` to the size it has: both work on a PagedTensor."""
    g = torch.Generator().manual_seed(3)
    for a, b in ((torch.randn(5, 5, 10, generator=g), torch.randn(10, generator=g)), (torch.randn(2, 5, 10, generator=g), torch.randn(10, 3, generator=g))):
        a, b = a.to(pager.device), b.to(pager.device)
        expected = torch.matmul(a, b)
        out = PagedTensor.wrap(torch.zeros_like(expected), pager)
        torch.matmul(a, b, out=out)
        assert torch.equal(out.materialize(), expected)
    out = PagedTensor.wrap(torch.zeros(3, 4, device=pager.device), pager)
    torch.manual_seed(0)
    expected = torch.randn(3, 4, device=pager.device)
    torch.manual_seed(0)
    torch.randn(3, 4, out=out)
    assert torch.equal(out.materialize(), expected)
    assert out.resize_(3, 4) is out and out.resize_as_(expected) is out
    with pytest.raises(NotImplementedError, match="changes a tensor's shape"):
        out.resize_(4, 4)


def test_hundreds_of_frees_deferred_at_once_are_all_done():
    """Hundreds of PagedTensors collected inside one pager call (a reference cycle holding a model's
    weights): every one is freed at the next call. The drain freed each inside the last one's free,
    a stack level apiece, and past the recursion limit logged the rest as unfreeable and kept them."""
    pager = make_pager(device_pages=1024, host_pages=1024)
    before = pager.stats()["allocations"]
    tensors = [PagedTensor.wrap(torch.ones(16), pager) for _ in range(1500)]  # a page each
    with pager._lock:  # as a collection inside a pager call: the finalizers run with the lock held
        del tensors
        gc.collect()
    assert len(pager._deferred_frees) == 1500
    assert pager.stats()["allocations"] == before
    assert not any(pager.stats()["resident_bytes"].values())


def test_a_free_deferred_inside_a_pager_call_happens_at_the_pagers_next_call():
    """A PagedTensor collected while its thread is inside a pager call (a garbage collection runs
    finalizers anywhere, e.g. while ``allocate`` builds its pages) has its free deferred. Only a later
    PagedTensor op freed it: code using the pager alone (the KV cache, ``allocate``/``free``/``stats``)
    kept its pages, and a module-level list kept the dropped pager alive. Now the pager's next call
    from outside frees it, and the pager holds the list itself."""
    pager = make_pager()
    before = pager.stats()["allocations"]
    t = PagedTensor.wrap(torch.ones(3000), pager)
    allocation = t.allocation
    with pager._lock:  # as a collection inside a pager call: the finalizer runs with the lock held
        del t
        assert not allocation.freed
    assert pager.stats()["allocations"] == before and allocation.freed
    t = PagedTensor.wrap(torch.ones(3000), pager)
    with pager._lock:
        del t
    alive = weakref.ref(pager)
    del pager
    gc.collect()
    assert alive() is None, "a pending free kept the dropped pager alive"
