"""Property tests: random programs of torch ops on PagedTensors give results bitwise equal to the same
programs on the dense tensors, with a device budget so small that pages are evicted between ops.

Each example wraps a few random tensors (fp32, fp16, bf16, int64 or bool; random shapes; contiguous,
transposed or strided sources) and runs a random sequence of pointwise ops, reductions, matmuls,
views, indexing, in-place ops and ``out=`` on both the PagedTensors and their dense twins. Views
join the pool, so later in-place ops on them check aliasing. After every op, the result and every
tensor of the pool are compared bit for bit (and exceptions must match in type).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagedtensor import MemoryConfig, PagedTensor, Pager
from pagedtensor.tensor import _MAX_SPAN_RATIO, element_span
from tests.support import CPU_AND_CUDA

PAGE = 4096
DEVICE_PAGES = 8  # sources of at most 2 pages each, the pool holds more; an out= may be larger (a bool sum into int64)
MAX_BYTES = 2 * PAGE
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool]
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.int64: torch.int64, torch.bool: torch.uint8}

SETTINGS = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def make_pager(device: str = "cpu") -> Pager:
    """A pager whose device tier (the CPU or a CUDA device) holds DEVICE_PAGES pages."""
    return Pager(
        MemoryConfig(
            page_size=PAGE,
            vram_limit=DEVICE_PAGES * PAGE,
            host_memory=512 * PAGE,
            slab_size=DEVICE_PAGES * PAGE,
            prefetch_strategy="none",
            device=device,
        )
    )


def as_dense(t: torch.Tensor) -> torch.Tensor:
    return t.materialize() if isinstance(t, PagedTensor) else t


def assert_bitwise_equal(got: object, expected: object, what: str) -> None:
    if isinstance(expected, (tuple, list)):
        assert type(got) in (tuple, list) and len(got) == len(expected), what
        for g, e in zip(got, expected):
            assert_bitwise_equal(g, e, what)
        return
    if not isinstance(expected, torch.Tensor):
        assert got == expected or (isinstance(got, float) and math.isnan(got) and math.isnan(expected)), what
        return
    assert isinstance(got, torch.Tensor), f"{what}: got {type(got).__name__}"
    dense = as_dense(got)
    assert (dense.shape, dense.dtype) == (expected.shape, expected.dtype), f"{what}: {dense.shape} {dense.dtype} vs {expected.shape} {expected.dtype}"
    strides = [(s, e) for n, s, e in zip(expected.shape, dense.stride(), expected.stride()) if n > 1]
    assert all(s == e for s, e in strides), f"{what}: strides {dense.stride()} vs {expected.stride()}"
    bits = BITS.get(expected.dtype)
    a, b = dense.contiguous(), expected.contiguous()
    if bits is not None:
        a, b = a.view(bits), b.view(bits)
    assert torch.equal(a, b), f"{what}: values differ"


# ---------------------------------------------------------------------- strategies


@st.composite
def sources(draw: st.DrawFn, dtype: torch.dtype | None = None, device: str = "cpu") -> torch.Tensor:
    """A random tensor on ``device``: dtype, shape, layout (contiguous / transposed / strided slice), values."""
    dtype = dtype or draw(st.sampled_from(DTYPES))
    itemsize = torch.empty((), dtype=dtype).element_size()
    ndim = draw(st.integers(1, 3))
    budget = MAX_BYTES // itemsize
    shape = []
    for _ in range(ndim):
        room = max(1, budget // max(1, math.prod(shape)) // (2 if len(shape) < ndim - 1 else 1))
        shape.append(draw(st.integers(1, min(48, room))))
    layout = draw(st.sampled_from(["contiguous", "transposed", "stepped"]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    full = list(shape)
    if layout == "stepped":
        full[0] = 2 * shape[0]
    elif layout == "transposed":
        full = full[::-1]
    if dtype.is_floating_point:
        base = (torch.randn(full, generator=g) * 4).to(dtype)
    elif dtype == torch.bool:
        base = torch.rand(full, generator=g) > 0.5
    else:
        base = torch.randint(-50, 50, full, generator=g, dtype=torch.int64)
    base = base.to(device)
    if layout == "stepped":
        return base[::2]
    if layout == "transposed":
        return base.permute(*reversed(range(ndim)))
    return base


class Pool:
    """PagedTensors and their dense twins; views of either join it."""

    def __init__(self, pager: Pager) -> None:
        self.pager = pager
        self.paged: list[torch.Tensor] = []
        self.dense: list[torch.Tensor] = []

    def add(self, paged: torch.Tensor, dense: torch.Tensor) -> None:
        """Add a PagedTensor and its twin, unless its allocation is larger than a source's can be
        (``2 * MAX_BYTES``, a stepped view's base): ops assume tensors of at most that size, and a
        paged conversion of bool to int64 is 8 times its source."""
        if isinstance(paged, PagedTensor) and paged.allocation is not None and paged.allocation.nbytes > 2 * MAX_BYTES:
            return
        if isinstance(paged, PagedTensor) and paged.dim() >= 1 and paged.numel() >= 1 and len(self.paged) < 10:
            self.paged.append(paged)
            self.dense.append(dense)

    def check(self, what: str) -> None:
        for index, (p, d) in enumerate(zip(self.paged, self.dense)):
            assert_bitwise_equal(p, d, f"{what}: pool[{index}]")


def numeric(t: torch.Tensor) -> bool:
    return t.dtype != torch.bool


def floating(t: torch.Tensor) -> bool:
    return t.dtype.is_floating_point


# Each op: (name, applicable(t) -> bool, make(draw, t, pool_index) -> fn(tensors: list) -> result).
# ``make`` draws every parameter once, so the paged and the dense runs get the same ones.


def on_first(fn):
    """An op of one tensor, applied to the target of ``ts = [target, pool]``."""
    return lambda ts: fn(ts[0])


def _dim(draw: st.DrawFn, t: torch.Tensor) -> int:
    return draw(st.integers(-t.dim(), t.dim() - 1))


def _mask(seed: int, like: torch.Tensor) -> torch.Tensor:
    """A random boolean mask of ``like``'s shape on its device (drawn on the CPU, so alike on every device)."""
    return (torch.rand(like.shape, generator=torch.Generator().manual_seed(seed)) > 0.5).to(like.device)


def _index(draw: st.DrawFn, size: int) -> torch.Tensor:
    values = draw(st.lists(st.integers(-size, size - 1), min_size=1, max_size=6))
    return torch.tensor(values, dtype=torch.int64)


def _same_shape(pool_dense: list[torch.Tensor], t: torch.Tensor, draw: st.DrawFn) -> int | None:
    matches = [i for i, other in enumerate(pool_dense) if other.shape == t.shape and other.dtype == t.dtype]
    return draw(st.sampled_from(matches)) if matches else None


def op_unary(draw, t, pool):
    name = draw(st.sampled_from(["neg", "abs", "mul", "where", "exp", "clamp", "not", "to"]))
    if t.dtype == torch.bool:
        return on_first({"not": lambda a: ~a, "to": lambda a: a.to(torch.int64)}.get(name, lambda a: a & a))
    table = {
        "neg": lambda a: -a,
        "abs": lambda a: a.abs(),
        "mul": lambda a: a * 3,
        "where": lambda a: torch.where(a > 0, a, torch.zeros((), dtype=a.dtype)),
        "exp": (lambda a: a.exp()) if floating(t) else (lambda a: a % 7),
        "clamp": lambda a: a.clamp(-2, 2),
        "not": lambda a: a != 0,
        "to": lambda a: a.to(torch.float32) if not floating(a) else a.to(torch.float16),
    }
    return on_first(table[name])


def op_binary(draw, t, pool):
    other = _same_shape(pool.dense, t, draw)
    name = draw(st.sampled_from(["add", "mul", "max", "eq", "sub_broadcast"]))

    def fn(ts):
        a = ts[0]
        b = ts[1][other] if other is not None else a
        if a.dtype == torch.bool:
            return a | b if name != "eq" else a == b
        if name == "add":
            return a + b
        if name == "mul":
            return a * b
        if name == "max":
            return torch.maximum(a, b)
        if name == "eq":
            return a == b
        return a - b[..., :1]

    return fn


def op_reduce(draw, t, pool):
    dim = _dim(draw, t)
    name = draw(st.sampled_from(["sum", "sum_all", "amax", "argmax", "cumsum", "mean", "any"]))
    if t.dtype == torch.bool:
        return on_first({"any": lambda a: a.any(dim), "sum": lambda a: a.sum(dim)}.get(name, lambda a: a.all()))
    table = {
        "sum": lambda a: a.sum(dim),
        "sum_all": lambda a: a.sum(),
        "amax": lambda a: a.amax(dim),
        "argmax": lambda a: a.argmax(dim),
        "cumsum": lambda a: a.cumsum(dim),
        "mean": (lambda a: a.mean(dim)) if floating(t) else (lambda a: a.prod(dim)),
        "any": lambda a: (a > 0).any(dim),
    }
    return on_first(table[name])


def op_matmul(draw, t, pool):
    other = _same_shape(pool.dense, t, draw)

    def fn(ts):
        a = ts[0]
        b = ts[1][other] if other is not None else a
        if a.dtype == torch.bool:
            return a.sum(-1, dtype=torch.int64)  # (a.to(torch.int64) is paged, 8 times a's pages)
        a2 = a.reshape(-1, a.shape[-1])
        b2 = b.reshape(-1, b.shape[-1])
        return a2 @ b2.mT

    return fn


def op_view(draw, t, pool):
    dim = _dim(draw, t)
    size = t.shape[dim]
    start = draw(st.integers(0, size - 1))
    stop = draw(st.integers(start + 1, size))
    step = draw(st.integers(1, 3))
    name = draw(st.sampled_from(["slice", "select", "narrow", "t", "permute", "unsqueeze", "expand", "flatten", "unbind", "split", "diagonal", "view_dtype", "reshape"]))
    perm = draw(st.permutations(range(t.dim())))
    table = {
        "slice": lambda a: a[(slice(None),) * (dim % a.dim()) + (slice(start, stop, step),)],
        "select": lambda a: a.select(dim, start),
        "narrow": lambda a: a.narrow(dim, start, stop - start),
        "t": lambda a: a.transpose(0, -1),
        "permute": lambda a: a.permute(*perm),
        "unsqueeze": lambda a: a.unsqueeze(dim),
        "expand": lambda a: a.unsqueeze(0).expand(3, *a.shape),
        "flatten": lambda a: a.flatten(),
        "unbind": lambda a: a.unbind(dim)[start],
        "split": lambda a: a.split(max(1, stop - start), dim)[-1],
        "diagonal": lambda a: a.diagonal(0, 0, -1) if a.dim() >= 2 else a[start:],
        "view_dtype": lambda a: a.view(torch.int16 if a.element_size() == 2 else torch.uint8 if a.element_size() == 1 else torch.int32),
        "reshape": lambda a: a.reshape(-1, a.shape[-1]),
    }
    return on_first(table[name])


def op_index(draw, t, pool):
    size0 = t.shape[0]
    index = _index(draw, size0)
    positive = index % size0
    name = draw(st.sampled_from(["getitem", "index_select", "embedding", "mask", "inner"]))
    mask_seed = draw(st.integers(0, 1000))

    def fn(ts):
        a = ts[0]
        rows, positions = index.to(a.device), positive.to(a.device)
        if name == "getitem":
            return a[rows]
        if name == "index_select":
            return a.index_select(0, positions)
        if name == "embedding" and a.dim() == 2:
            return F.embedding(positions, a)
        if name == "mask":
            return a[_mask(mask_seed, a)]
        return a[..., positions % a.shape[-1]]

    return fn


def op_inplace(draw, t, pool):
    other = _same_shape(pool.dense, t, draw)
    index = _index(draw, t.shape[0]) % t.shape[0]
    name = draw(st.sampled_from(["add_", "mul_", "fill_", "zero_", "copy_", "clamp_", "masked_fill_", "index_put_", "setitem_slice", "neg_"]))
    value = draw(st.integers(-3, 3))
    mask_seed = draw(st.integers(0, 1000))

    def fn(ts):
        a = ts[0]
        is_bool = a.dtype == torch.bool
        if name == "add_":
            return a.logical_or_(a) if is_bool else a.add_(value)
        if name == "mul_":
            return a.logical_and_(a) if is_bool else a.mul_(value)
        if name == "fill_":
            return a.fill_(bool(value) if is_bool else value)
        if name == "zero_":
            return a.zero_()
        if name == "copy_":
            source = ts[1][other] if other is not None else a.flip(0)
            return a.copy_(source)
        if name == "clamp_":
            return a.logical_not_() if is_bool else a.clamp_(-1, 1)
        if name == "masked_fill_":
            return a.masked_fill_(_mask(mask_seed, a), bool(value) if is_bool else value)
        if name == "index_put_":
            a[index.to(a.device)] = torch.ones((), dtype=a.dtype)
            return a
        if name == "setitem_slice":
            a[: max(1, a.shape[0] // 2)] = bool(value) if is_bool else value
            return a
        return a.logical_not_() if is_bool else a.neg_()

    return fn


def op_out(draw, t, pool):
    dim = _dim(draw, t)
    name = draw(st.sampled_from(["add", "sum", "mul_wrong_target"]))

    def fn(ts):
        a = ts[0]
        on_paged = isinstance(a, PagedTensor)
        if name == "sum":
            if a.dtype == torch.bool:
                target_dtype = torch.int64
            else:
                target_dtype = a.dtype
            shape = list(a.shape)
            del shape[dim]
            out = torch.full(shape, 9, dtype=target_dtype, device=a.device)
            out = PagedTensor.wrap(out, a.pager) if on_paged else out
            result = torch.sum(a, dim, out=out)
            return result
        out = torch.zeros(a.shape, dtype=a.dtype, device=a.device)
        out = PagedTensor.wrap(out, a.pager) if on_paged else out
        if a.dtype == torch.bool:
            return torch.logical_or(a, a, out=out)
        return torch.add(a, a, alpha=2, out=out) if name == "add" else torch.mul(a, 3, out=out)

    return fn


OPS = [op_unary, op_binary, op_reduce, op_matmul, op_view, op_index, op_inplace, op_out]


def run_both(fn, paged_args, dense_args):
    try:
        expected = fn(dense_args)
    except Exception as error:  # the dense run fails: the paged run must fail the same way
        with pytest.raises(type(error)):
            fn(paged_args)
        return None, None, False
    return fn(paged_args), expected, True


# ---------------------------------------------------------------------- properties


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@SETTINGS
@given(data=st.data())
def test_random_programs_match_dense_bitwise(device, data):
    with make_pager(device) as pager:
        pool = Pool(pager)
        dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
        first = data.draw(sources(dtype, device), label="source")
        pool.add(PagedTensor.wrap(first, pager), first)
        for _ in range(data.draw(st.integers(0, 2))):
            extra = data.draw(sources(dtype, device), label="extra source")
            same = first.clone().mul_(2) if first.dtype != torch.bool else ~first
            source = same if data.draw(st.booleans()) else extra
            pool.add(PagedTensor.wrap(source, pager), source)
        pool.check("after wrap")
        for step in range(data.draw(st.integers(1, 8), label="steps")):
            target = data.draw(st.integers(0, len(pool.paged) - 1), label="target")
            make = data.draw(st.sampled_from(OPS), label="op")
            fn = make(data.draw, pool.dense[target], pool)
            paged_args = [pool.paged[target], pool.paged]
            dense_args = [pool.dense[target], pool.dense]
            paged_out, dense_out, ran = run_both(fn, paged_args, dense_args)
            what = f"step {step} {make.__name__}"
            if ran:
                assert_bitwise_equal(paged_out, dense_out, what)
                if isinstance(paged_out, PagedTensor):
                    pool.add(paged_out, dense_out)
            pool.check(what)
            if data.draw(st.booleans(), label="evict"):
                pager.evict_all()
        assert pager.stats()["evictions"] > 0 or pager.stats()["resident_bytes"]["device"] <= DEVICE_PAGES * PAGE


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_materialize_and_views_round_trip(device, data):
    source = data.draw(sources(device=device), label="source")
    with make_pager(device) as pager:
        t = PagedTensor.wrap(source, pager)
        assert (t.shape, t.stride(), t.dtype) == (source.shape, source.stride(), source.dtype)
        assert_bitwise_equal(t, source, "wrap")
        pager.evict_all()
        dim = data.draw(st.integers(0, source.dim() - 1))
        start = data.draw(st.integers(0, source.shape[dim] - 1))
        view, dense_view = t.narrow(dim, start, source.shape[dim] - start), source.narrow(dim, start, source.shape[dim] - start)
        assert_bitwise_equal(view, dense_view, "narrow")
        first, stop = view.page_range()
        assert sum(view.residency().values()) == stop - first


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_in_place_dirty_pages_are_the_touched_pages(device, data):
    """After faulting every page in clean, an in-place op on a random slice dirties exactly the pages
    its elements lie on."""
    source = data.draw(sources(torch.float32, device), label="source")
    with make_pager(device) as pager:
        t = PagedTensor.wrap(source, pager)
        pager.evict_all()
        t.sum()
        dim = data.draw(st.integers(0, source.dim() - 1))
        size = source.shape[dim]
        start = data.draw(st.integers(0, size - 1))
        step = data.draw(st.integers(1, 4))
        index = (slice(None),) * dim + (slice(start, None, step),)
        view = t[index]
        view.add_(1)
        element_offsets = torch.arange(t.allocation.nbytes // 4).as_strided(view.shape, view.stride(), view.storage_offset())
        expected = set((element_offsets.flatten() * 4 // PAGE).tolist())
        assert {info.index for info in pager.page_table(t.allocation) if info.dirty} == expected
        source[index].add_(1)
        pager.evict_all()
        assert_bitwise_equal(t, source, "after write-back")


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_wrap_of_a_view_with_math_bits_gives_its_values_resolved(device, data):
    """``wrap`` of a complex view of any layout with torch's lazy conjugate and negative bits (and
    the imaginary part of a conjugated one, a float view with the negative bit) gives the view's
    values with the bits resolved, as ``clone`` does, in the view's layout; op results and in-place
    writes of narrowed views are those of the resolved view, bit for bit, with pages evicted
    between ops."""
    layout = data.draw(sources(torch.float32, device), label="layout")
    conj, neg, imag = data.draw(st.booleans(), label="conj"), data.draw(st.booleans(), label="neg"), data.draw(st.booleans(), label="imag")
    x = torch.empty_strided(layout.shape, layout.stride(), dtype=torch.complex64, device=device).copy_(torch.complex(layout, layout * 0.5 + 1))
    view = x.conj() if conj else x
    view = torch._neg_view(view) if neg else view
    view = view.imag if imag else view
    lo, hi = element_span(tuple(view.shape), view.stride(), view.storage_offset())
    stride = view.stride() if hi - lo <= _MAX_SPAN_RATIO * view.numel() else view.contiguous().stride()  # a sparse view is compacted
    resolved = torch.empty_strided(view.shape, stride, dtype=view.dtype, device=device).copy_(view)
    with make_pager(device) as pager:
        t = PagedTensor.wrap(view, pager)
        assert (t.shape, t.stride(), t.dtype, t.is_conj(), t.is_neg()) == (view.shape, stride, view.dtype, False, False)
        assert_bitwise_equal(t, resolved, "wrap")
        pager.evict_all()
        assert torch.equal(t * 2, view * 2) and torch.equal(t + t, view + view)
        dim = data.draw(st.integers(0, view.dim() - 1), label="dim")
        start = data.draw(st.integers(0, view.shape[dim] - 1), label="start")
        t.narrow(dim, start, view.shape[dim] - start).add_(1)
        resolved.narrow(dim, start, view.shape[dim] - start).add_(1)
        pager.evict_all()
        assert_bitwise_equal(t, resolved, "add_ of a narrowed view")
