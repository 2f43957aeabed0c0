"""The traceable wrapper-subclass contract of PagedTensor, checked once for every backend rung:
flatten/unflatten round trip with static metadata, then ``torch.compile(fullgraph=True)`` with
``eager``, ``aot_eager`` and ``inductor`` giving results bitwise equal to the same compiled function
on the dense tensors, without recompiling when residency or data change."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import pagedtensor
import pagedtensor.tensor
from pagedtensor import MemoryConfig, PagedTensor, Pager

PAGE = 4096
BACKENDS = ["eager", "aot_eager", "inductor"]


@pytest.fixture
def pager():
    with Pager(MemoryConfig(page_size=PAGE, vram_limit=16 * PAGE, host_memory=256 * PAGE, slab_size=16 * PAGE, prefetch_strategy="none", device="cpu")) as p:
        yield p


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def inputs(pager: Pager):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 64, generator=g)  # 2 pages
    w = torch.randn(48, 64, generator=g).t()  # transposed source: strides kept
    return x, w, PagedTensor.wrap(x, pager), PagedTensor.wrap(w, pager)


def program(x: torch.Tensor, w: torch.Tensor):
    hidden = torch.relu(x @ w)
    return hidden.sum(0) + x[4:8].mean(), hidden.amax(), x.t()


def assert_bitwise(got, expected) -> None:
    for g, e in zip(got, expected):
        g = g.materialize() if isinstance(g, PagedTensor) else g
        assert g.shape == e.shape and g.dtype == e.dtype
        assert torch.equal(g, e), (g - e).abs().max()


def test_flatten_unflatten_round_trip(pager):
    x, _, t, _ = inputs(pager)
    names, metadata = t.__tensor_flatten__()
    assert names == ["_dense"] and metadata == ()
    inner = {name: getattr(t, name) for name in names}
    assert type(inner["_dense"]) is torch.Tensor and inner["_dense"].stride() == t.stride()
    rebuilt = PagedTensor.__tensor_unflatten__(inner, metadata, t.shape, t.stride())
    assert type(rebuilt) is PagedTensor and rebuilt.pager is None
    assert (rebuilt.shape, rebuilt.stride(), rebuilt.dtype) == (t.shape, t.stride(), t.dtype)
    assert torch.equal(rebuilt.materialize(), x)
    assert type(rebuilt[2:4]) is PagedTensor and torch.equal((rebuilt * 2)[3], x[3] * 2)
    assert "traced" in repr(rebuilt)


def test_flatten_metadata_is_static_and_dense_is_cached_until_written(pager):
    x, _, t, _ = inputs(pager)
    first = t._dense
    assert t._dense is first  # Dynamo's guards and AOT's unwrapping read it every call
    pager.evict_all()
    assert t.__tensor_flatten__()[1] == () and t._dense is first  # residency changes nothing
    t[0].add_(1)
    x[0].add_(1)
    again = t._dense
    assert again is not first and torch.equal(again, x)
    t.drop_materialized()
    assert t._materialized is None


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("gone", ["closed", "freed"])
def test_a_compiled_call_on_a_tensor_whose_pages_are_gone_names_it(backend, gone):
    """A compiled graph runs on the dense copy the first call cached on the tensor; after the pager
    closed (or the allocation was freed) the next call, and a fresh compile, returned values from
    that copy, which also kept its memory, where any eager use raises. They raise as eager use does."""
    pager = Pager(MemoryConfig(page_size=PAGE, vram_limit=16 * PAGE, host_memory=256 * PAGE, slab_size=16 * PAGE,
                               prefetch_strategy="none", device="cpu"))  # fmt: skip
    x = torch.randn(4, 4)
    t = PagedTensor.wrap(x, pager)
    compiled = torch.compile(lambda a: a * 2, backend=backend, fullgraph=True)
    assert torch.equal(compiled(t), x * 2)
    error = pagedtensor.PagerClosedError if gone == "closed" else ValueError
    match = "pager is closed" if gone == "closed" else "freed"
    pager.close() if gone == "closed" else pager.free(t.allocation)
    with pytest.raises(error, match=match):
        t * 2
    # (Dynamo, reading the input as it checks its guards or traces, raises its wrapper of the error)
    for call in (lambda: compiled(t), lambda: (torch._dynamo.reset(), torch.compile(lambda a: a + 1, backend=backend, fullgraph=True)(t))):
        with pytest.raises(RuntimeError if gone == "closed" else Exception, match=match) as raised:
            call()
        assert isinstance(raised.value, error) or str(raised.value).startswith(f"{error.__name__}: "), repr(raised.value)
    assert t._materialized is None  # the copy went with the pages
    pager.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_matches_dense_bitwise(pager, backend):
    x, w, px, pw = inputs(pager)
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(program, backend=counter, fullgraph=True)
    expected = compiled(x, w)  # the same backend on dense tensors: inductor's kernels differ from eager's
    if backend != "inductor":
        assert_bitwise(expected, program(x, w))
    got = compiled(px, pw)
    assert_bitwise(got, expected)
    frames = counter.frame_count
    pager.evict_all()  # residency is not guarded on: no recompile
    assert_bitwise(compiled(px, pw), expected)
    px[1].mul_(-1)  # new data reaches the next call
    x[1].mul_(-1)
    assert_bitwise(compiled(px, pw), compiled(x, w))
    assert counter.frame_count == frames


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_module_with_paged_parameter(pager, backend):
    torch.manual_seed(0)
    dense = torch.nn.Linear(64, 16)
    paged = torch.nn.Linear(64, 16)
    paged.load_state_dict(dense.state_dict())
    paged.weight = torch.nn.Parameter(PagedTensor.wrap(dense.weight.detach(), pager))
    x = torch.randn(8, 64)
    with torch.no_grad():
        got = torch.compile(paged, backend=backend, fullgraph=True)(x)
        expected = torch.compile(dense, backend=backend, fullgraph=True)(x)
    assert torch.equal(got, expected) and torch.equal(got, dense(x).detach())
    # A compiled module's paged parameters still convert (nn.Module._apply swaps a wrapper-subclass
    # parameter, and torch refuses to swap a tensor with a weak reference: the dense copy's owner
    # was noted by one, found by a helper's probe), and the copy's note is no attribute of theirs.
    assert paged.weight._materialized is not None
    assert not {"_owner_storage", "_storage_owner"} & set(pagedtensor.tensor._user_attributes(paged.weight) or {})
    paged.double(), dense.double()
    assert type(paged.weight) is PagedTensor and torch.equal(paged(x.double()), dense(x.double()))


def test_writing_a_paged_input_inside_an_aot_graph_fails_loudly(pager):
    _, _, px, _ = inputs(pager)

    def bump(t):
        t.add_(1)
        return t.sum()

    with pytest.raises(Exception, match="writes a PagedTensor input inside a compiled graph"):
        torch.compile(bump, backend="aot_eager", fullgraph=True)(px)
    before = px.materialize()
    torch.compile(bump, backend="eager", fullgraph=True)(px)  # eager runs the ops on the pages
    assert torch.equal(px.materialize(), before + 1)


@pytest.mark.gpu
def test_inductor_on_the_gpu_matches_dense_bitwise():
    config = MemoryConfig(page_size=PAGE, vram_limit=16 * PAGE, host_memory=256 * PAGE, prefetch_strategy="none", device="cuda")
    with Pager(config) as gpu_pager:
        g = torch.Generator(device="cuda").manual_seed(0)
        x, w = torch.randn(32, 64, device="cuda", generator=g), torch.randn(48, 64, device="cuda", generator=g).t()
        px, pw = PagedTensor.wrap(x, gpu_pager), PagedTensor.wrap(w, gpu_pager)
        gpu_pager.evict_all()
        compiled = torch.compile(program, backend="inductor", fullgraph=True)
        assert_bitwise(compiled(px, pw), compiled(x, w))


def test_pickled_form_keys_by_device(pager):
    """Compile caches pickle example inputs to key compiled graphs: the pickled form of a PagedTensor
    (paged, or traced at a compile boundary) must carry its compute device, or a CUDA input could
    reuse a graph compiled for the CPU."""
    _, _, t, _ = inputs(pager)
    fn, args = t.__reduce_ex__(2)
    assert args[4] == str(t.device)  # (storage, layout, requires_grad, is_param, device, attributes)
    traced = PagedTensor.__tensor_unflatten__({"_dense": t._dense}, (), t.shape, t.stride())
    fn, args = traced.__reduce_ex__(2)
    assert args[0] is traced._inner and args[3] == str(t.device)  # (data, requires_grad, is_param, device, attributes)
    assert t._stable_hash_for_caching().endswith(f"{t.device}:False")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_view_returned_from_an_offset_input_aliases_the_right_pages(pager, backend):
    """The inner tensor has the outer tensor's storage offset: torch rebuilds returned views from it,
    so a returned view of ``base[4:8]`` starts at row 5, and a write through it lands in rows 5-6."""
    base = torch.arange(32 * 64, dtype=torch.float32).reshape(32, 64)
    paged = PagedTensor.wrap(base, pager)
    out = torch.compile(lambda t: t[1:3], backend=backend, fullgraph=True)(paged[4:8])
    assert type(out) is PagedTensor and out.storage_offset() == base[5:7].storage_offset()
    assert torch.equal(out.materialize(), base[5:7])
    out.fill_(-1.0)
    pager.evict_all()
    expected = base.clone()
    expected[5:7] = -1.0
    assert torch.equal(paged.materialize(), expected)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_a_returned_view_of_an_offset_input_answers_with_the_input_s_storage(pager, backend, monkeypatch):
    """AOT autograd rebuilds a returned view of an input as ``input.as_strided(size, stride, offset)``
    with the graph output's offset (``gen_alias_from_base``); from torch 2.14 it adds the input's own
    offset when the output's ``untyped_storage()`` is not the input's, which counted ``p[4:8]``'s
    offset twice (rows 8-9 for rows 5-6, and wrong gradients). The graph's output must answer with
    the input's storage, on every torch (checked where torch compares them)."""
    from torch._functorch._aot_autograd import runtime_wrappers

    original = runtime_wrappers.gen_alias_from_base
    same_storage = []

    def spy(aliased_base, target, *args, **kwargs):
        same_storage.append(aliased_base.untyped_storage()._cdata == target.untyped_storage()._cdata)
        return original(aliased_base, target, *args, **kwargs)

    monkeypatch.setattr(runtime_wrappers, "gen_alias_from_base", spy)
    base = torch.arange(32 * 64, dtype=torch.float32).reshape(32, 64)
    paged = PagedTensor.wrap(base, pager)
    for start in (0, 4, 9):
        out = torch.compile(lambda t: t[1:3], backend=backend, fullgraph=True)(paged[start : start + 4])
        assert torch.equal(out.materialize(), base[start + 1 : start + 3]) and out.storage_offset() == (start + 1) * 64
    assert same_storage == [True, True, True]


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_through_a_returned_view_of_an_offset_input(pager, backend):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(16, 8, generator=g)
    paged = PagedTensor.wrap(base, pager).requires_grad_()
    dense = base.clone().requires_grad_()
    compiled = torch.compile(lambda t: t.t(), backend=backend, fullgraph=True)
    (compiled(paged[4:8]) * 3).sum().backward()
    (dense[4:8].t() * 3).sum().backward()
    assert torch.equal(paged.grad.materialize() if isinstance(paged.grad, PagedTensor) else paged.grad, dense.grad)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_offset_inputs_compile_with_dynamic_shapes_and_as_non_views(pager, backend):
    base = torch.arange(32 * 64, dtype=torch.float32).reshape(32, 64)
    paged = PagedTensor.wrap(base, pager)
    dynamic = torch.compile(lambda t: t * 2, backend=backend, fullgraph=True, dynamic=True)
    assert torch.equal(dynamic(paged[4:8]), base[4:8] * 2)
    assert torch.equal(dynamic(paged[6:12]), base[6:12] * 2)
    detached = torch.compile(lambda t: t.sum(0), backend=backend, fullgraph=True)
    assert torch.equal(detached(paged[16:32].detach()), base[16:32].sum(0))
    parameter = torch.nn.Parameter(paged[8:16].detach(), requires_grad=False)
    assert torch.equal(detached(parameter), base[8:16].sum(0))


@pytest.mark.parametrize("start", [0, 5])
@pytest.mark.parametrize("backend", BACKENDS)
def test_an_empty_view_compiles_and_matches_dense(pager, backend, start):
    """An empty view (``t[0:0]``, ``t[5:5]``) passed to a compiled function raised in Dynamo ("Attempted
    to call resize_() on an invalid python storage"): its wrapper storage was sized to reach only the
    view's end, 0 bytes, which Dynamo's fake-tensor conversion takes for a storage resized to zero.
    Every PagedTensor's wrapper storage is now as large as its allocation, as a torch view's storage is
    its base's."""
    base = torch.arange(32 * 64, dtype=torch.float32).reshape(32, 64)
    paged = PagedTensor.wrap(base, pager)

    def fn(t):
        return t.sum(0), t * 2, t.t()

    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    expected = compiled(base[start:start])
    got = compiled(paged[start:start])
    assert_bitwise(got, expected)
    assert_bitwise(got, fn(base[start:start]))
    assert got[2].storage_offset() == base[start:start].t().storage_offset()
    assert paged[start:start].untyped_storage().nbytes() == paged.untyped_storage().nbytes() == base.nbytes


@pytest.mark.parametrize("shape", [(0,), (5, 0), (0, 64)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_wrapped_empty_tensor_compiles_and_matches_dense(pager, backend, shape):
    """A PagedTensor wrapped from an empty tensor has no allocation. Dynamo reads its dense form more
    than once, and the second read (the cached copy's check for freed pages) raised AttributeError
    on the missing allocation."""
    base = torch.randn(shape)
    paged = PagedTensor.wrap(base.clone(), pager)
    assert paged.allocation is None

    def fn(t):
        return t.sum(0), t * 2

    got = torch.compile(fn, backend=backend, fullgraph=True)(paged)
    assert_bitwise(got, fn(base))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_a_returned_view_in_a_dtype_of_another_item_size_is_refused(pager, backend):
    """torch rebuilds a view of an input returned from an ``aot_eager``/``inductor`` graph from the
    input; for a wrapper subclass it takes ``as_strided`` with the view's size, strides and offset in
    the view's elements but applies them in the input's (``gen_alias_from_base``), so ``t[2].view(
    torch.int16)`` of a float32 input came back as row 4-5's bytes with twice the length (writes
    through it changed rows 4 and 5), and ``t.view(torch.uint8)`` raised torch's setStorage error.
    Such a graph is now refused, naming the op; the same view used inside the graph, or returned in a
    dtype of the same item size, still compiles and matches the dense run."""
    base = torch.arange(32 * 64, dtype=torch.float32).reshape(32, 64)
    paged = PagedTensor.wrap(base, pager)
    for fn in (lambda t: t[2].view(torch.int16), lambda t: t.view(torch.uint8), lambda t: t.view(torch.int16)[3]):
        torch._dynamo.reset()
        with pytest.raises(Exception, match=r"in a dtype of another item size \(aten.view.dtype: torch.float32 -> torch"):
            torch.compile(fn, backend=backend, fullgraph=True)(paged)
    assert torch.equal(paged.materialize(), base)
    torch._dynamo.reset()
    inside = torch.compile(lambda t: (t.view(torch.int16).sum(), t.view(torch.uint8).float() * 2), backend=backend, fullgraph=True)
    assert_bitwise(inside(paged), inside(base))
    torch._dynamo.reset()
    same_size = torch.compile(lambda t: t[2].view(torch.int32), backend=backend, fullgraph=True)(paged)
    assert type(same_size) is PagedTensor and same_size.storage_offset() == base[2].storage_offset()
    assert torch.equal(same_size.materialize(), base[2].view(torch.int32))
    same_size.zero_()
    expected = base.clone()
    expected[2] = 0
    assert torch.equal(paged.materialize(), expected)
    torch._dynamo.reset()
    eager = torch.compile(lambda t: t[3].view(torch.int16), backend="eager", fullgraph=True)(paged)
    assert eager.storage_offset() == base[3].view(torch.int16).storage_offset()
    assert torch.equal(eager.materialize(), base[3].view(torch.int16))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_a_returned_complex_view_of_a_real_input_is_refused_unless_torch_can_rebuild_it(pager, backend):
    """torch rebuilds a complex view of a real input returned from an ``aot_eager``/``inductor`` graph
    as ``torch.view_as_complex(input).as_strided(...)`` (``gen_alias_from_base``), which works only for
    an input whose last dim is 2 with stride 1: ``torch.view_as_complex(t.view(16, 32, 2))`` of a
    ``[16, 64]`` input compiled and then raised torch's "Tensor must have a last dimension of size 2"
    on every call. It is now refused naming the op; an input already of shape ``(..., 2)`` still
    returns its complex view aliasing the pages, and the view used inside the graph still works."""
    base = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    paged = PagedTensor.wrap(base, pager)
    with pytest.raises(Exception, match=r"complex view of a real PagedTensor input \(aten.view_as_complex.default"):
        torch.compile(lambda t: torch.view_as_complex(t.view(16, 32, 2)), backend=backend, fullgraph=True)(paged)
    torch._dynamo.reset()
    inside = torch.compile(lambda t: torch.view_as_complex(t.view(16, 32, 2)).abs(), backend=backend, fullgraph=True)
    assert_bitwise([inside(paged)], [inside(base)])
    torch._dynamo.reset()
    pairs = PagedTensor.wrap(base.view(16, 32, 2), pager)
    view = torch.compile(lambda t: torch.view_as_complex(t)[3], backend=backend, fullgraph=True)(pairs)
    assert type(view) is PagedTensor and view.dtype == torch.complex64
    assert torch.equal(view.materialize(), torch.view_as_complex(base.view(16, 32, 2))[3])


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_a_returned_view_with_other_conjugate_or_negative_bits_is_refused(pager, backend):
    """torch rebuilds a returned view of a subclass input with ``as_strided`` (``gen_alias_from_base``),
    which drops the conjugate and negative bits: ``t.conj()`` of a complex input came back with
    ``is_conj()`` False and the unconjugated values, and writes through it landed unconjugated. Such a
    graph is now refused, naming the op; the view used inside the graph, a returned view of an input
    that already has the bit, and the ``eager`` backend still give the dense values."""
    base = torch.randn(4, 6, dtype=torch.complex64, generator=torch.Generator().manual_seed(0))
    paged = PagedTensor.wrap(base, pager)
    for fn, op in ((lambda t: t.conj(), "aten._conj.default"), (lambda t: t.conj()[1], "aten._conj.default"),
                   (lambda t: torch._neg_view(t), "aten._neg_view.default")):  # fmt: skip
        torch._dynamo.reset()
        with pytest.raises(Exception, match=rf"other conjugate or negative bits than the input \({op}"):
            torch.compile(fn, backend=backend, fullgraph=True)(paged)
    assert torch.equal(paged.materialize(), base)
    torch._dynamo.reset()
    inside = torch.compile(lambda t: (t.conj() * 2, t.conj().sum()), backend=backend, fullgraph=True)
    assert_bitwise(inside(paged), inside(base))
    torch._dynamo.reset()
    row = torch.compile(lambda t: t[1], backend=backend, fullgraph=True)(paged.conj())  # the input's own bit
    assert type(row) is PagedTensor and row.is_conj() and torch.equal(row.resolve_conj(), base.conj()[1].resolve_conj())
    torch._dynamo.reset()
    eager = torch.compile(lambda t: t.conj(), backend="eager", fullgraph=True)(paged)
    assert type(eager) is PagedTensor and eager.is_conj() and torch.equal(eager.resolve_conj(), base.conj().resolve_conj())


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_real_view_with_the_negative_bit_as_input_is_refused_by_name(pager, backend):
    """``t.conj().imag`` of a complex PagedTensor (a real view with the negative bit) passed to any
    compiled function failed inside Dynamo with torch's internal assert ("isComplexType ... please
    report a bug to PyTorch"): Dynamo replays its view ops on the input, calling ``_conj`` on the real
    view. It now raises naming the view and the way out; ``.resolve_neg()`` of it compiles and
    gives the dense result."""
    base = torch.randn(4, 6, dtype=torch.complex64, generator=torch.Generator().manual_seed(0))
    paged = PagedTensor.wrap(base, pager)
    double = torch.compile(lambda x: x * 2, backend=backend, fullgraph=True)
    with pytest.raises(Exception, match=r"a real view with the negative bit .*resolve_neg\(\)"):
        double(paged.conj().imag)
    torch._dynamo.reset()
    got = double(paged.conj().imag.resolve_neg())
    assert torch.equal(got.materialize() if isinstance(got, PagedTensor) else got, base.conj().imag * 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_wrapping_inside_a_compiled_function_runs_eagerly_at_a_graph_break(pager, backend):
    """Dynamo traced into ``PagedTensor.wrap``, broke the graph at ``_make_wrapper_subclass`` and went
    on tracing ``_make`` with the tensor half made: ``InternalTorchDynamoError: AttributeError:
    'PagedTensor' object has no attribute '_view_root'`` even without ``fullgraph``. ``wrap`` now runs
    eagerly at a graph break; under ``fullgraph=True`` Dynamo refuses it as a graph break."""
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))

    def fn(t):
        paged = PagedTensor.wrap(t * 2, pager)
        return paged[1:3] * 3 + paged[5:7]

    assert_bitwise([torch.compile(fn, backend=backend)(x)], [fn(x)])
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.Unsupported):
        torch.compile(fn, backend=backend, fullgraph=True)(x)


def test_the_pagers_python_methods_inside_a_compiled_function_run_eagerly(pager):
    """``apply_``, ``copy.deepcopy`` and ``torch.save``/``torch.load`` of a PagedTensor inside a compiled
    function raised InternalTorchDynamoError (Dynamo traced into ``__deepcopy__``, ``apply_`` and the
    unpickling ``_rebuild_paged_view`` and left a tensor half made); ``page_range()`` and
    ``residency()`` gave the traced stand-in's empty counts, baked into the graph. Each now runs
    eagerly at a graph break, as on a plain tensor; outside Dynamo a traced stand-in's names the call."""
    import copy
    import io

    x = torch.arange(8 * 16, dtype=torch.float32).reshape(8, 16)

    def apply(t):
        t.apply_(lambda v: v * 10)
        return t.sum()

    def save_load(t):
        buffer = io.BytesIO()
        torch.save(t, buffer)
        buffer.seek(0)
        return torch.load(buffer, weights_only=False) * 2

    def pages(t):
        first, stop = t.page_range()
        return t * stop + t.residency()["device"]

    for fn in (apply, lambda t: copy.deepcopy(t) * 2, save_load, pages):
        torch._dynamo.reset()
        reference, paged = PagedTensor.wrap(x.clone(), pager), PagedTensor.wrap(x.clone(), pager)
        expected = fn(reference)  # eagerly
        got = torch.compile(fn, backend="eager")(paged)
        assert_bitwise([got], [expected.materialize() if isinstance(expected, PagedTensor) else expected])
        assert torch.equal(paged.materialize(), reference.materialize())
    assert pages(PagedTensor.wrap(x.clone(), pager)).sum() != 0
    traced = PagedTensor._from_inner(x.clone(), (8, 16), (16, 1))
    with pytest.raises(RuntimeError, match=r"page_range\(\) / residency\(\) of a traced PagedTensor"):
        traced.page_range()


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_a_conjugate_or_negative_view_at_an_offset_computes_on_its_values(pager, backend):
    """``p.conj()[2:4]`` and ``torch._neg_view(p)[2:4]`` (a view at a nonzero offset with a math bit)
    entered an AOT graph with the raw bytes, unconjugated or un-negated: the dense data made from
    the allocation's start now resolves the bits, as it does at offset 0."""
    z = torch.complex(torch.randn(8, 4, generator=torch.Generator().manual_seed(1)), torch.randn(8, 4))
    paged = PagedTensor.wrap(z.clone(), pager)
    for view in (lambda t: t.conj()[2:4], lambda t: torch._neg_view(t)[2:4], lambda t: t[2:4].conj(), lambda t: t.conj().t()[1:3]):
        torch._dynamo.reset()
        got = torch.compile(lambda t: t * 2, backend=backend)(view(paged))
        assert torch.equal(got, view(z) * 2)


@pytest.mark.parametrize("dynamic", [None, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_an_op_run_at_a_graph_break_dispatches_with_the_frame_hook_off(pager, backend, dynamic, monkeypatch):
    """A data-dependent op (``a[a > 0]``, ``nonzero``) breaks the graph and runs eagerly with
    torch.compile's frame hook on: the hook compiled the dispatcher's and pager's own frames (34 for
    one op), and under dynamic shapes failed inside them (InternalTorchDynamoError from the pager's
    slab check). The dispatcher now runs with the hook off, and the result is the eager one."""
    from pagedtensor.dispatch import DISPATCHER

    hooks_seen: list[bool] = []
    original = DISPATCHER.dispatch

    def noted_dispatch(*args, **kwargs):
        hooks_seen.append(torch._C._dynamo.eval_frame.get_eval_frame_callback() is not None)
        return original(*args, **kwargs)

    monkeypatch.setattr(DISPATCHER, "dispatch", noted_dispatch)
    x = torch.randn(8, 16)
    paged = PagedTensor.wrap(x.clone(), pager)
    for fn in (lambda a: a[a > 0] * 2, lambda a: a.nonzero().sum() + a.sum()):
        torch._dynamo.reset()
        got = torch.compile(fn, backend=backend, dynamic=dynamic)(paged)
        got = got.materialize() if isinstance(got, PagedTensor) else got
        assert torch.equal(got, fn(x))
    assert hooks_seen and not any(hooks_seen), "the dispatcher ran with torch.compile's frame hook on"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_warmed_up_function_with_a_graph_break_does_not_recompile_for_new_paged_tensors(pager, backend):
    """The op run at the graph break reached ``PagedTensor.__torch_dispatch__`` with the frame hook
    on, which compiled that frame and its resume functions, guarded on the op's arguments: new
    PagedTensors of the same shapes recompiled them, so ``set_stance("fail_on_recompile")`` raised
    after any warm-up, where plain tensors run on. Those frames are skipped now."""

    def fn(a):
        return a.sin().sum() + a[a > 0].sum()

    compiled = torch.compile(fn, backend=backend)
    for _ in range(3):
        compiled(PagedTensor.wrap(torch.randn(4, 5), pager))
    xs = [torch.randn(4, 5) for _ in range(3)]
    expected = [compiled(x) for x in xs]  # the compiled plain function (inductor's sums are its own)
    torch.compiler.set_stance("fail_on_recompile")
    try:
        for x, plain in zip(xs, expected):
            assert torch.equal(compiled(PagedTensor.wrap(x.clone(), pager)), plain)
    finally:
        torch.compiler.set_stance("default")


@pytest.mark.parametrize("backend", BACKENDS)
def test_numpy_of_a_paged_tensor_in_a_function_compiled_with_graph_breaks(pager, backend):
    """``a.numpy()`` (and ``np.asarray(a)``) returned by a function compiled without ``fullgraph``:
    Dynamo converts the output with ``numpy(force=True)`` while its frame hook is on, which traced
    PagedTensor's numpy methods on a stand-in with no pages (TorchRuntimeError: "numpy() is not
    supported for tensor subclasses"); the ndarray comes back as for a plain tensor."""
    import numpy

    x = torch.randn(4, 5)
    for fn in (lambda a: (a * 2, a.numpy()), lambda a: (a * 2, a[1:].numpy()), lambda a: (a.sum(), numpy.asarray(a))):
        torch._dynamo.reset()
        expected = torch.compile(fn, backend=backend)(x)
        torch._dynamo.reset()
        got = torch.compile(fn, backend=backend)(PagedTensor.wrap(x.clone(), pager))
        assert isinstance(got[1], numpy.ndarray) and numpy.array_equal(got[1], expected[1])


FUNC_TRANSFORMS = {
    "grad": lambda a, w: torch.func.grad(lambda r: (r * w).sin().sum())(a),
    "grad_and_value": lambda a, w: torch.func.grad_and_value(lambda r: (r * w).sin().sum())(a)[0],
    "vjp": lambda a, w: torch.func.vjp(lambda r: (r * w).sin(), a)[1](torch.ones_like(w))[0],
    "jacrev": lambda a, w: torch.func.jacrev(lambda r: (r * w[0]).sin())(a[0]),
}


@pytest.mark.parametrize("name", sorted(FUNC_TRANSFORMS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_func_transforms_of_a_paged_argument_compile(pager, backend, name):
    """``torch.func.grad`` (and grad_and_value, vjp, jacrev) of a PagedTensor inside a compiled
    function: Dynamo read the tensor's dense data inside the transform, which came back wrapped at
    the transform's level ("Cannot access storage of TensorWrapper"). The same values as the compiled
    function of the plain tensor, and as eager."""
    x, w = torch.randn(8, 16), torch.randn(8, 16)
    fn = FUNC_TRANSFORMS[name]
    compiled_plain = torch.compile(fn, backend=backend, fullgraph=True)(x, w)
    torch._dynamo.reset()
    got = torch.compile(fn, backend=backend, fullgraph=True)(PagedTensor.wrap(x.clone(), pager), w)
    got = got.materialize() if isinstance(got, PagedTensor) else got
    assert torch.equal(got, compiled_plain)
    torch.testing.assert_close(got, fn(x, w))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_a_dynamic_compile_recompiled_for_a_paged_argument_after_plain_ones(backend):
    """The recompiled frame's guards read the PagedTensor's inner tensor (``_dense``) with
    torch.compile's frame hook on: its own frame compiled, whose guards read it again, and so on
    (RecursionError). It runs with the hook off."""
    torch._dynamo.reset()
    with Pager(MemoryConfig(page_size=4096, vram_limit=8 * 4096, host_memory=64 * 4096, slab_size=8 * 4096,
                            prefetch_strategy="none", device="cpu")) as pager:  # fmt: skip
        compiled = torch.compile(lambda x, y: torch.relu(x) + y, backend=backend, dynamic=True)
        first = torch.randn(8, 16), torch.randn(8, 16)
        assert torch.equal(compiled(*first), torch.relu(first[0]) + first[1])
        x, y = torch.randn(9, 16), torch.randn(9, 16)
        result = compiled(PagedTensor.wrap(x, pager), y)
        result = result.materialize() if isinstance(result, PagedTensor) else result
        assert torch.equal(result, torch.relu(x) + y)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_materialize_inside_a_compiled_function_is_an_op_of_the_graph(pager, backend):
    """``t.materialize()`` of a PagedTensor input inside a compiled function copies its traced inner
    tensor, an op of the trace. Run with the dispatch modes off (as the pager's own reads are), the
    copy left AOT autograd's functional tracing ("Attempting to use FunctionalTensor on its own")."""
    torch._dynamo.reset()
    x = torch.randn(8, 64, device=pager.device)
    weights = torch.randn(64, 64, device=pager.device)
    paged = PagedTensor.wrap(weights.clone(), pager)
    compiled = torch.compile(lambda x, t: x @ t.materialize(), backend=backend, fullgraph=True)
    assert torch.equal(compiled(x, paged), torch.compile(lambda x, t: x @ t.clone(), backend=backend, fullgraph=True)(x, weights))
