"""Every op in torch's own OpInfo database, on PagedTensor arguments, against the dense op.

torch describes each public op with sample inputs (``torch.testing._internal.common_methods_invocations.op_db``,
the database its own subclass tests such as FakeTensor's and DTensor's run). Here every tensor of a
sample becomes a PagedTensor on a shared pager (one pager for the module, so earlier tests' pages
are evicted as later ones fault in), the op runs, and its results and every argument afterwards
(in-place ops) must equal the dense op's bit for bit, or the op must be one of the exceptions below,
each with its reason.

Backward alike: each op that supports autograd runs forward and backward on a sample's tensors that
require grad, once dense and once with those tensors PagedTensor leaves, and the gradients (one fixed
random grad_output per differentiable output, the same for both runs) must be the dense gradients bit
for bit, or the op one of the backward exceptions below.

The write paths alike: each op that supports ``out=`` runs with an ``out`` PagedTensor of the dense
result's shape, dtype and strides (random bytes before), on plain and on PagedTensor arguments, and
with a plain ``out`` on PagedTensor arguments; ``out`` afterwards must be the dense op's ``out`` bit for
bit and the op must return it; an ``out`` PagedTensor of another shape must raise the documented
NotImplementedError and keep its bytes. Each in-place variant runs on a PagedTensor ``self`` with plain
and with PagedTensor arguments: ``self`` afterwards must be the dense one bit for bit, and returned.
"""

from __future__ import annotations

import itertools
import re
import sys
import warnings
from typing import Callable

import pytest
import torch
from torch.testing._internal import common_utils
from torch.testing._internal.common_methods_invocations import op_db
from torch.testing._internal.opinfo import core as opinfo_core
from torch.utils._pytree import tree_flatten, tree_map

from benchmarks.bench_dispatch_overhead import ForwardingTensor
from pagedtensor import MemoryConfig, PagedTensor, Pager
from pagedtensor.errors import OutOfPagesError
from pagedtensor.tensor import _conjugate_fallback_on, _negative_fallback_on
from tests.support import shard_from_env

PAGE = 4096
DEVICE_PAGES = 4096  # 16 MiB: the largest sample (grid_sampler_3d) is 20 MB; most are a few KiB
SAMPLES_PER_OP = 3  # as the backward and write-path sweeps; keeps CI (a fresh clone, 2 cores) well under 20 minutes
DTYPES = (torch.float32, torch.complex64, torch.int64, torch.bool, torch.bfloat16)

# Uninitialized memory: only the metadata is compared.
UNINITIALIZED = {"empty", "empty_like", "empty_permuted", "empty_strided", "new_empty", "new_empty_strided"}
# torch computes singular vectors (or eigenvectors) for any tensor subclass, in case a gradient is
# needed (``_may_require_fw_or_bw_grad`` in BatchLinearAlgebra.cpp), and LAPACK's values with
# vectors round differently from its values alone: compared to LAPACK's accuracy, not bitwise.
VALUES_WITH_VECTORS = {"linalg.svdvals", "linalg.eigvalsh", "linalg.cond", "linalg.matrix_norm", "norm.nuc"}
# Dense kernels whose bits differ from run to run on the CPU (LAPACK's gelsy: 4 of 30 runs of one
# sample here): compared to LAPACK's accuracy (the gels driver's results bitwise in test_tensor_edges).
RUN_TO_RUN = {"linalg.lstsq"}
# CompositeImplicitAutograd kernels that read a CPU index tensor's memory directly, above
# ``__torch_dispatch__``: a PagedTensor as that index has no memory there (a CUDA index is refused by
# torch itself). The test checks the error, so a change in torch shows.
READS_INDEX_MEMORY = {"tensor_split"}

# Backward: 3 samples an op, fp32 and complex64 (the dtypes torch's gradients are checked in), about a
# minute on the CPU.
BACKWARD_SAMPLES_PER_OP = 3
BACKWARD_DTYPES = (torch.float32, torch.complex64)
# Backward formulas that take another path for any tensor subclass: ``prod_backward`` and
# ``cumprod_backward`` (torch's FunctionsManual.cpp) use ``grad * result / input`` and the like on a
# plain tensor, but the zero-safe cumprod formula whenever the input is a subclass
# (``isTensorSubclassLike``), whose bits differ (masked.prod runs prod; linalg.vander runs cumprod:
# on CUDA its sample 2 differs so, the forwarding subclass's gradient equal to the PagedTensor's bit for
# bit, benchmarks/results/gpu_backward_probe_and_sweep_8a25e21_h200.log). Their gradients are compared
# bit for bit with a do-nothing forwarding subclass's (:class:`_Forwarding`) instead of the dense ones.
SUBCLASS_BACKWARD = {"prod", "cumprod", "masked.prod", "linalg.vander"}
# What torch warns, under ``use_deterministic_algorithms(True, warn_only=True)``, for a kernel without
# a deterministic implementation: its results may differ from run to run, so they are compared to
# their accuracy.
NONDETERMINISTIC_WARNING = "does not have a deterministic implementation"
NONDETERMINISTIC_CUDA_BACKWARD = {"nn.functional.grid_sample"}
"""Ops whose CUDA backward uses atomics (grid_sampler_2d_backward_cuda), compared to their accuracy
even where the warning above was not caught and a second dense run happened to give the same bits:
the CUDA sweep failed so three times so far (f6cb276 and 2b372e6 on an H100, 0173f95 on an H200), the paged
gradient off in the last bits."""

# The write paths: 3 samples an op in 4 dtypes, about a minute on the CPU.
WRITE_SAMPLES_PER_OP = 3
WRITE_DTYPES = (torch.float32, torch.int64, torch.bool, torch.complex64)
# torch's out= kernels that leave a subclass's ``out`` unwritten (README): ``linalg.matrix_rank`` of
# PagedTensor arguments or into a plain out of them. Compared bit for bit with a forwarding subclass's.
SUBCLASS_OUT = {"linalg.matrix_rank", "linalg.matrix_rank.hermitian"}
# Documented refusals, each with the message it must raise (NotImplementedError, never wrong data):
# out= paths that change their PagedTensor ``out``'s shape or strides in place on the way: svd
# transposes V in place (``V.transpose_(-2, -1)`` in torch's svd_out); matmul of a vector by a matrix
# runs ``mm_out`` on ``out`` (resized to a row) and squeezes it back (``squeeze_(0)``).
OUT_REFUSED = {"svd": "transpose_.default changes a tensor's shape", "matmul": "would resize its PagedTensor output"}
# In-place variants that change ``self``'s shape or strides (the ``inplace_view`` tag), which a
# PagedTensor refuses (README); dropout3d in place unsqueezes an unbatched input in place.
METADATA_IN_PLACE = {"as_strided", "as_strided.partial_views", "squeeze", "squeeze.multiple", "unsqueeze",
                     "transpose", "t", "resize_", "nn.functional.dropout3d"}  # fmt: skip
# The documented refusals of a PagedTensor written to another shape: an out= the op would resize
# (the op's own check, or torch's resize_ of it), an in-place op that resizes its self (addbmm_).
RESIZE_REFUSED = r"of the result's shape|resize_\.default changes a tensor's shape"


class _Forwarding(ForwardingTensor):
    """The benchmarks' do-nothing wrapper subclass, unwrapping tensors inside lists and keyword
    arguments too (backward formulas pass them there), and running ops with torch's conjugate and
    negative fallbacks on as PagedTensor does (without them any wrapper reads a conjugate view's raw
    bits in some complex kernels, pytorch#198118: cumprod's complex gradient among them)."""

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN206 - torch's protocol
        def unwrap(value: object) -> object:
            return value.inner if isinstance(value, ForwardingTensor) else value

        with _conjugate_fallback_on(), _negative_fallback_on():
            out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs or {}))
        if isinstance(out, torch.Tensor):
            if args and isinstance(args[0], ForwardingTensor) and out is args[0].inner:
                return args[0]
            if func.is_view:
                return cls(out)
        return out


def _name(op: object) -> str:
    """An OpInfo's name with its variant (``norm.nuc``)."""
    return f"{op.name}.{op.variant_test_name}" if op.variant_test_name else op.name


def _cases() -> list:
    cases = []
    for op in op_db:
        for dtype in DTYPES:
            if dtype in op.supported_dtypes("cpu"):
                cases.append(pytest.param(op, dtype, id=f"{_name(op)}-{str(dtype).removeprefix('torch.')}"))
    return cases


def _backward_cases(device: str = "cpu") -> list:
    cases = []
    for op in op_db:
        for dtype in BACKWARD_DTYPES:
            if op.supports_autograd and dtype in op.supported_backward_dtypes(device):
                cases.append(pytest.param(op, dtype, id=f"{_name(op)}-{str(dtype).removeprefix('torch.')}"))
    return cases


def make_pager(device: str) -> Pager:
    """The sweeps' pager: a device tier of DEVICE_PAGES pages, a host tier four times as large."""
    return Pager(MemoryConfig(page_size=PAGE, vram_limit=DEVICE_PAGES * PAGE, host_memory=4 * DEVICE_PAGES * PAGE,
                              slab_size=4 * DEVICE_PAGES * PAGE, prefetch_strategy="none", device=device))  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def _no_test_case_search():
    """torch's sample iterator looks for a running ``unittest.TestCase`` on the stack
    (``extract_test_fn``), reading every frame's source on the way: two searches a ``sample_inputs``
    call, 60% of this sweep's CPU time. These tests are pytest functions, so the search finds none;
    it is skipped with that same answer (the samples' seed is then torch's SEED either way)."""
    with pytest.MonkeyPatch.context() as patch:
        for module in (common_utils, opinfo_core):
            patch.setattr(module, "extract_test_fn", lambda: None)
        yield


def _first_samples(op: object, device: str, dtype: torch.dtype, requires_grad: bool, count: int) -> list:
    """The first ``count`` samples of ``op``, as torch's sample iterator gives them: it seeds the RNG
    before each, so they do not depend on the samples left ungenerated after them."""
    return list(itertools.islice(op.sample_inputs(device, dtype, requires_grad=requires_grad), count))


@pytest.fixture(scope="module")
def pager():
    with make_pager("cpu") as p:
        yield p


def _dense(value: object) -> object:
    if isinstance(value, PagedTensor):
        return value.materialize()
    if isinstance(value, ForwardingTensor):
        return value.inner
    if isinstance(value, torch.Tensor) and value.layout != torch.strided:
        return value.to_dense()
    return value


def _mismatch(actual: object, expected: object, bitwise: bool) -> str | None:
    """Why ``actual`` (from paged arguments) is not ``expected`` (from dense ones), or None."""
    actual, expected = _dense(actual), _dense(expected)
    if isinstance(expected, torch.Tensor) or isinstance(actual, torch.Tensor):
        if not (isinstance(expected, torch.Tensor) and isinstance(actual, torch.Tensor)):
            return f"{type(actual).__name__} where the dense op gives {type(expected).__name__}"
        if (actual.dtype, actual.shape) != (expected.dtype, expected.shape):
            return f"{actual.dtype}{list(actual.shape)} where the dense op gives {expected.dtype}{list(expected.shape)}"
        actual, expected = actual.resolve_conj().resolve_neg(), expected.resolve_conj().resolve_neg()
        if not bitwise:
            close = torch.allclose(actual, expected, rtol=1e-4, atol=1e-5, equal_nan=True)
            return None if close else f"values differ beyond LAPACK's accuracy:\n{actual}\n{expected}"
        if actual.is_complex():
            actual, expected = torch.view_as_real(actual), torch.view_as_real(expected)
        if actual.is_floating_point():
            same = (actual == expected) | (actual.isnan() & expected.isnan())
            return None if bool(same.all()) else f"values differ:\n{actual}\n{expected}"
        return None if torch.equal(actual, expected) else f"values differ:\n{actual}\n{expected}"
    if isinstance(expected, (list, tuple)):
        if not isinstance(actual, (list, tuple)) or len(actual) != len(expected):
            return f"{actual!r} where the dense op gives {expected!r}"
        for position, (a, e) in enumerate(zip(actual, expected)):
            why = _mismatch(a, e, bitwise)
            if why:
                return f"[{position}] {why}"
        return None
    same = actual == expected or (actual != actual and expected != expected)  # NaN scalars
    return None if same else f"{actual!r} where the dense op gives {expected!r}"


def _paged_copy(pager: Pager, value: object) -> object:
    """A PagedTensor copy of a strided tensor on the pager's device; anything else as it is (a CPU
    index beside CUDA tensors stays a CPU tensor, as the op expects it)."""
    if isinstance(value, torch.Tensor) and value.layout == torch.strided and value.device.type == torch.device(pager.device).type:
        return PagedTensor.wrap(value.clone(), pager)
    return value


def _clone(value: object) -> object:
    return value.clone() if isinstance(value, torch.Tensor) else value


def _run(op: object, arguments: tuple) -> object:
    """``op`` on a sample's ``(input, args, kwargs)``."""
    sample_input, args, kwargs = arguments
    return op(sample_input, *args, **kwargs)


def _paged_bytes(values: list) -> int:
    return sum(value.untyped_storage().nbytes() for value in values if isinstance(value, torch.Tensor))


def check_op(pager: Pager, op: object, dtype: torch.dtype, device: str, past_the_tier: bool = False) -> None:
    """Raise AssertionError naming the sample where ``op`` on PagedTensors differs from the dense op
    (``past_the_tier``: on a pager whose device tier is smaller than the samples, where any sample may
    raise the pager's error, and every other outcome must still be the dense op's)."""
    samples = _first_samples(op, device, dtype, False, SAMPLES_PER_OP)
    for index, sample in enumerate(samples):
        arguments = (sample.input, sample.args, sample.kwargs)
        dense_arguments = tree_map(_clone, arguments)
        torch.manual_seed(index)
        try:
            expected = _run(op, dense_arguments)
        except Exception:  # noqa: BLE001 - a sample torch itself refuses here: nothing to compare
            continue
        paged_arguments = tree_map(lambda value: _paged_copy(pager, value), arguments)
        if op.name in READS_INDEX_MEMORY and any(isinstance(value, PagedTensor) and value.dim() > 0 for value in paged_arguments[1]):
            with pytest.raises(RuntimeError, match="data is not allocated|expected tensor_indices_or_sections to be on cpu"):
                _run(op, paged_arguments)
            continue
        torch.manual_seed(index)
        try:
            actual = _run(op, paged_arguments)
        except OutOfPagesError:
            # Documented: an op that is not elementwise needs its arguments' pages at once.
            assert past_the_tier or _paged_bytes(tree_flatten(arguments)[0]) > DEVICE_PAGES * PAGE, f"sample {index}"
            continue
        where = f"{_name(op)} {dtype} sample {index}: {sample}"
        if op.name in UNINITIALIZED:
            actual_tensor, expected_tensor = _dense(actual), expected
            assert (actual_tensor.dtype, actual_tensor.shape, actual_tensor.stride()) == (
                expected_tensor.dtype, expected_tensor.shape, expected_tensor.stride()), where
            continue
        why = _mismatch(actual, expected, bitwise=_name(op) not in VALUES_WITH_VECTORS and op.name not in RUN_TO_RUN)
        assert why is None, f"{where}\nresult {why}"
        # In-place ops and out=: the arguments afterwards, compared alike.
        for position, (paged, dense) in enumerate(zip(tree_flatten(paged_arguments)[0], tree_flatten(dense_arguments)[0])):
            if isinstance(dense, torch.Tensor):
                why = _mismatch(paged, dense, bitwise=True)
                assert why is None, f"{where}\nargument {position} afterwards: {why}"


def _gradients(op: object, sample: object, index: int, leaf: object) -> list | None:
    """The gradients of ``op`` on ``sample`` with respect to its tensors that require grad, each
    replaced by ``leaf`` of a detached copy (a strided one; a sparse one stays as it is), one fixed
    random grad_output per differentiable output; None where there is nothing to differentiate."""
    leaves = []

    def replace(value: object) -> object:
        if not isinstance(value, torch.Tensor):
            return value
        if not value.requires_grad:
            return value.clone()
        copy = value.detach().clone()
        copy = (leaf(copy) if copy.layout == torch.strided else copy).requires_grad_()
        leaves.append(copy)
        return copy

    arguments = tree_map(replace, (sample.input, sample.args, sample.kwargs))
    torch.manual_seed(index)
    outputs = [value for value in tree_flatten(_run(op, arguments))[0] if isinstance(value, torch.Tensor) and value.requires_grad]
    if not outputs or not leaves:
        return None
    generator = torch.Generator().manual_seed(index)
    grad_outputs = [torch.randn(output.shape, dtype=output.dtype, generator=generator).to(output.device) for output in outputs]
    return [_dense(gradient) for gradient in torch.autograd.grad(outputs, leaves, grad_outputs, allow_unused=True)]


def _dense_leaf(value: torch.Tensor) -> torch.Tensor:
    return value


def check_backward(pager: Pager, op: object, dtype: torch.dtype, device: str) -> None:
    """Raise AssertionError naming the sample where the gradients of ``op`` with PagedTensor leaves
    differ from the dense op's (from a forwarding subclass's for SUBCLASS_BACKWARD)."""
    reference = _Forwarding if _name(op) in SUBCLASS_BACKWARD else _dense_leaf
    samples = _first_samples(op, device, dtype, True, BACKWARD_SAMPLES_PER_OP)
    for index, sample in enumerate(samples):
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                expected = _gradients(op, sample, index, _dense_leaf)
        except Exception:  # noqa: BLE001 - a sample torch itself refuses here: nothing to compare
            continue
        if expected is None:
            continue
        # torch warns (deterministic algorithms on, warn only: the CUDA sweep) where a kernel it ran
        # has no deterministic implementation (atomics: grid_sampler_2d_backward_cuda, index_add).
        nondeterministic = any(NONDETERMINISTIC_WARNING in str(warning.message) for warning in caught) or (
            device == "cuda" and _name(op) in NONDETERMINISTIC_CUDA_BACKWARD
        )
        if reference is not _dense_leaf:
            expected = _gradients(op, sample, index, reference)
        try:
            actual = _gradients(op, sample, index, lambda value: PagedTensor.wrap(value, pager))
        except OutOfPagesError:
            # Documented: an op that is not elementwise needs its arguments' pages at once.
            assert _paged_bytes(tree_flatten((sample.input, sample.args, sample.kwargs))[0]) > DEVICE_PAGES * PAGE, f"sample {index}"
            continue
        why = _mismatch(actual, expected, bitwise=True)
        if why is not None and (nondeterministic or _mismatch(_gradients(op, sample, index, reference), expected, bitwise=True) is not None):
            # The reference backward itself differs from run to run (atomics, LAPACK): its accuracy.
            why = _mismatch(actual, expected, bitwise=False)
        assert why is None, f"{_name(op)} {dtype} sample {index}: {sample}\ngradient {why}"


@pytest.mark.parametrize("op, dtype", _cases())
def test_op_matches_the_dense_op(pager, op, dtype):
    check_op(pager, op, dtype, "cpu")


@pytest.fixture(scope="module")
def two_page_pager():
    """A device tier of two pages (8 KiB), smaller than many samples: ops past the tier."""
    with Pager(MemoryConfig(page_size=PAGE, vram_limit=2 * PAGE, host_memory=4 * DEVICE_PAGES * PAGE, slab_size=4 * DEVICE_PAGES * PAGE,
                            prefetch_strategy="none", device="cpu")) as p:  # fmt: skip
        yield p


@pytest.mark.parametrize("op", [op for op in op_db if torch.float32 in op.supported_dtypes("cpu")], ids=_name)
def test_op_past_the_tier_matches_the_dense_op_or_raises_the_pagers_error(two_page_pager, op):
    """Every op's fp32 samples on a device tier of two pages: the handlers past the tier (pieces,
    parts, rows, composite kernels) give the dense op's bits, or the op raises OutOfPagesError;
    never another error (a composite kernel whose backend read a PagedTensor's memory raised
    "data is not allocated": grouped ``conv1d``) nor other bits."""
    check_op(two_page_pager, op, torch.float32, "cpu", past_the_tier=True)


@pytest.mark.parametrize("op, dtype", _backward_cases())
def test_op_backward_matches_the_dense_op(pager, op, dtype):
    check_backward(pager, op, dtype, "cpu")


def test_the_subclass_backward_exceptions_are_torchs(pager):
    """The named backward exceptions hold: for a plain tensor torch's prod gradient differs in the
    last bits from the one it computes for any subclass, and a PagedTensor's is the latter's."""
    torch.manual_seed(0)
    x, grad_output = torch.randn(5, 5, 5), torch.randn(5, 5)
    gradients = {}
    for name, leaf in (("dense", _dense_leaf), ("forwarding", _Forwarding), ("paged", lambda value: PagedTensor.wrap(value, pager))):
        value = leaf(x.clone()).requires_grad_()
        (gradient,) = torch.autograd.grad(value.prod(1), value, grad_output)
        gradients[name] = _dense(gradient)
    assert torch.equal(gradients["paged"], gradients["forwarding"])
    assert not torch.equal(gradients["forwarding"], gradients["dense"])
    torch.testing.assert_close(gradients["paged"], gradients["dense"])


def _write_cases(device: str = "cpu", inplace: bool = False) -> list:
    cases = []
    for op in op_db:
        if (op.inplace_variant is None) if inplace else not op.supports_out:
            continue
        for dtype in WRITE_DTYPES:
            if dtype in op.supported_dtypes(device):
                cases.append(pytest.param(op, dtype, id=f"{_name(op)}-{str(dtype).removeprefix('torch.')}"))
    return cases


def _random_bytes(value: torch.Tensor, seed: int) -> torch.Tensor:
    """A tensor of ``value``'s shape, dtype and strides holding random bytes (bool: ``~value``)."""
    if value.dtype == torch.bool:
        return ~value
    out = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=value.device)
    storage = out.untyped_storage()
    generator = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (storage.nbytes(),), dtype=torch.uint8, generator=generator).to(value.device)
    storage.copy_(raw.untyped_storage())
    return out


def _returns_out(returned: object, out: object) -> bool:
    if isinstance(out, tuple):
        return isinstance(returned, (tuple, list)) and len(returned) == len(out) and all(r is o for r, o in zip(returned, out))
    return returned is out


def check_out(pager: Pager, op: object, dtype: torch.dtype, device: str) -> None:
    """Raise AssertionError naming the sample where ``op(..., out=)`` with a PagedTensor ``out`` or
    PagedTensor arguments differs from the dense op's ``out=`` call, or returns something else."""
    name = _name(op)
    samples = _first_samples(op, device, dtype, False, WRITE_SAMPLES_PER_OP)
    for index, sample in enumerate(samples):
        arguments = (sample.input, sample.args, sample.kwargs)
        torch.manual_seed(index)
        try:
            result = _run(op, tree_map(_clone, arguments))
        except Exception:  # noqa: BLE001 - a sample torch itself refuses here: nothing to compare
            continue
        results = tuple(result) if isinstance(result, (tuple, list)) else (result,)
        if not all(isinstance(value, torch.Tensor) and value.layout == torch.strided for value in results):
            continue  # torch.equal's bool, a sparse result: no out= of them here
        before = tuple(_random_bytes(value, index) for value in results)
        pack = (lambda values: tuple(values)) if isinstance(result, (tuple, list)) else (lambda values: values[0])
        expected = pack([value.clone() for value in before])
        dense_arguments = tree_map(_clone, arguments)
        torch.manual_seed(index)
        try:
            returned = op(dense_arguments[0], *dense_arguments[1], **dense_arguments[2], out=expected)
        except Exception:  # noqa: BLE001 - torch refuses this out= itself (nonzero of a sample's strides)
            continue
        returns_out = _returns_out(returned, expected)
        for paged_out, paged_arguments in ((True, False), (True, True), (False, True)):
            where = f"{name} {dtype} sample {index} (out {'paged' if paged_out else 'plain'}, arguments {'paged' if paged_arguments else 'plain'}): {sample}"
            reference = expected
            if paged_arguments and name in SUBCLASS_OUT:
                reference = pack([value.clone() for value in before])
                forwarding = tree_map(lambda value: _Forwarding(value.clone()) if isinstance(value, torch.Tensor) else value, arguments)
                torch.manual_seed(index)
                op(forwarding[0], *forwarding[1], **forwarding[2], out=reference)
            out = pack([PagedTensor.wrap(value.clone(), pager) if paged_out else value.clone() for value in before])
            call = tree_map(lambda value: _paged_copy(pager, value), arguments) if paged_arguments else tree_map(_clone, arguments)
            torch.manual_seed(index)
            try:
                returned = op(call[0], *call[1], **call[2], out=out)
            except NotImplementedError as error:
                assert paged_out and name in OUT_REFUSED, f"{where}\n{error}"
                assert OUT_REFUSED[name] in str(error), f"{where}\n{error}"
                continue
            bitwise = not (paged_arguments and (name in VALUES_WITH_VECTORS or op.name in RUN_TO_RUN))
            why = _mismatch(out, reference, bitwise=bitwise)
            assert why is None, f"{where}\nout {why}"
            assert not returns_out or _returns_out(returned, out), f"{where}\nreturned {type(returned).__name__}, not out"
        if index == 0 and not isinstance(result, (tuple, list)) and result.numel() > 0:
            # out= of another shape: torch resizes a plain one; a PagedTensor one is refused, untouched.
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # torch's warning that it resized the out
                    _run(op, (*tree_map(_clone, arguments)[:2], {**sample.kwargs, "out": torch.zeros(result.numel() + 1, dtype=result.dtype, device=result.device)}))
            except Exception:  # noqa: BLE001 - torch refuses this out itself
                continue
            filled = torch.arange(result.numel() + 1, device=result.device).to(result.dtype)
            wrong = PagedTensor.wrap(filled.clone(), pager)
            with pytest.raises(NotImplementedError, match=RESIZE_REFUSED):
                _run(op, (*tree_map(_clone, arguments)[:2], {**sample.kwargs, "out": wrong}))
            assert torch.equal(wrong.materialize(), filled), f"{name} {dtype}: out of another shape written"


def check_inplace(pager: Pager, op: object, dtype: torch.dtype, device: str) -> None:
    """Raise AssertionError naming the sample where ``op``'s in-place variant on a PagedTensor self
    (with plain, then PagedTensor arguments) leaves another self than the dense one, or returns another."""
    name, checked = _name(op), 0
    for index, sample in enumerate(op.sample_inputs(device, dtype, requires_grad=False)):
        if checked == WRITE_SAMPLES_PER_OP:
            break
        if not isinstance(sample.input, torch.Tensor) or sample.input.layout != torch.strided:
            continue
        dense = tree_map(_clone, (sample.input, sample.args, sample.kwargs))
        layout = (dense[0].shape, dense[0].stride())
        torch.manual_seed(index)
        try:
            returned = op.inplace_variant(dense[0], *dense[1], **dense[2])
        except Exception:  # noqa: BLE001 - invalid in place densely (a self that would broadcast): nothing to compare
            continue
        checked += 1
        resized = (dense[0].shape, dense[0].stride()) != layout
        for paged_arguments in (False, True):
            where = f"{name} {dtype} sample {index} (arguments {'paged' if paged_arguments else 'plain'}): {sample}"
            if paged_arguments:
                paged = tree_map(lambda value: _paged_copy(pager, value), (sample.input, sample.args, sample.kwargs))
            else:
                paged = (PagedTensor.wrap(sample.input.clone(), pager), *tree_map(_clone, (sample.args, sample.kwargs)))
            torch.manual_seed(index)
            try:
                paged_returned = op.inplace_variant(paged[0], *paged[1], **paged[2])
            except NotImplementedError as error:
                if name in METADATA_IN_PLACE:
                    assert "changes a tensor's shape, strides or storage in place" in str(error), f"{where}\n{error}"
                else:
                    assert resized, f"{where}\n{error}"  # addbmm_ resizes a self of another shape
                    assert re.search(RESIZE_REFUSED, str(error)), f"{where}\n{error}"
                continue
            why = _mismatch(paged[0], dense[0], bitwise=True)
            assert why is None, f"{where}\nself afterwards {why}"
            assert returned is not dense[0] or paged_returned is paged[0], f"{where}\nreturned {type(paged_returned).__name__}, not self"


@pytest.mark.parametrize("op, dtype", _write_cases())
def test_op_out_matches_the_dense_op(pager, op, dtype):
    check_out(pager, op, dtype, "cpu")


@pytest.mark.parametrize("op, dtype", _write_cases(inplace=True))
def test_op_in_place_matches_the_dense_op(pager, op, dtype):
    check_inplace(pager, op, dtype, "cpu")


@pytest.mark.gpu
@pytest.mark.sweep
def test_gpu_every_op_matches_the_dense_op_on_cuda():
    """The same on a CUDA pager, every case in one test (one report of every op that differs).
    Deterministic algorithms where torch has them, warnings only where it has none. Each case ends
    with a device synchronize, so a kernel fault is reported at the case that made it (after one,
    the CUDA context is lost and the sweep stops)."""
    cases = [(op, dtype) for op in op_db for dtype in DTYPES if dtype in op.supported_dtypes("cuda")]
    failures = sweep_on_cuda(make_pager("cuda"), cases, lambda pager, case: check_op(pager, *case, "cuda"),
                             lambda case: f"{_name(case[0])} {case[1]}")  # fmt: skip
    assert not failures, f"{len(failures)} of {len(cases)} cases differ:\n" + "\n".join(failures)


@pytest.mark.gpu
@pytest.mark.sweep
def test_gpu_every_op_past_the_tier_matches_the_dense_op_on_cuda():
    """The two-page sweep on a CUDA pager (the CUDA kernels' bits by pieces, rows and composite
    kernels past the tier), fp32, fp16 and bf16, every case in one test."""
    cases = [(op, dtype) for op in op_db for dtype in (torch.float32, torch.float16, torch.bfloat16) if dtype in op.supported_dtypes("cuda")]
    pager = Pager(MemoryConfig(page_size=PAGE, vram_limit=2 * PAGE, host_memory=4 * DEVICE_PAGES * PAGE, slab_size=4 * DEVICE_PAGES * PAGE,
                               prefetch_strategy="none", device="cuda"))  # fmt: skip
    failures = sweep_on_cuda(pager, cases, lambda pager, case: check_op(pager, *case, "cuda", past_the_tier=True),
                             lambda case: f"{_name(case[0])} {case[1]} past the tier")  # fmt: skip
    assert not failures, f"{len(failures)} of {len(cases)} cases differ:\n" + "\n".join(failures)


@pytest.mark.gpu
@pytest.mark.sweep
def test_gpu_every_op_out_and_in_place_matches_the_dense_op_on_cuda():
    """The out= and in-place sweeps on a CUDA pager, every case in one test."""
    cases = [(check_out, *param.values) for param in _write_cases("cuda")]
    cases += [(check_inplace, *param.values) for param in _write_cases("cuda", inplace=True)]
    failures = sweep_on_cuda(make_pager("cuda"), cases, lambda pager, case: case[0](pager, *case[1:], "cuda"),
                             lambda case: f"{_name(case[1])} {case[2]} {case[0].__name__}")  # fmt: skip
    assert not failures, f"{len(failures)} of {len(cases)} cases differ:\n" + "\n".join(failures)


def sweep_on_cuda(pager: Pager, cases: list, check: Callable[[Pager, object], None], name: Callable[[object], str]) -> list[str]:
    """``check(pager, case)`` for each case under deterministic algorithms, synchronizing after each;
    the failures, each named. A CUDA fault ends the sweep there (the context is lost) and is the
    last failure; the pager is closed at the end."""
    failures = []
    cases = cases[shard_from_env("PAGEDLLM_SWEEP_SHARD")]
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        for number, case in enumerate(cases, 1):
            try:
                check(pager, case)
                torch.cuda.synchronize()
            except AssertionError as error:
                lines = str(error).splitlines() or [""]  # the case and its sample, ..., what differs
                _report(failures, lines[0][:200] + (f" ... {lines[-1][:300]}" if len(lines) > 1 else ""))
            except torch.AcceleratorError as error:
                _report(failures, f"{name(case)}: CUDA fault, sweep stopped: {str(error).splitlines()[0][:200]}")
                return failures
            except Exception as error:  # noqa: BLE001 - reported with the rest
                _report(failures, f"{name(case)}: {type(error).__name__}: {str(error).splitlines()[0][:300]}")
            if number % 100 == 0 or number == len(cases):
                print(f"sweep: {number} of {len(cases)} cases, {len(failures)} failing", file=sys.stderr, flush=True)
    finally:
        torch.use_deterministic_algorithms(False)
    pager.close()
    return failures


def _report(failures: list[str], failure: str) -> None:
    """Keep ``failure`` for the test's message and print it at once (a sweep stopped by a time limit
    still names what failed before it)."""
    failures.append(failure)
    print(f"sweep failure: {failure}", file=sys.stderr, flush=True)


@pytest.mark.parametrize("shard, picked", [("0/1", [0, 1, 2, 3, 4]), ("1/2", [1, 3]), ("2/3", [2])])
def test_a_sweep_shard_takes_every_nth_case(monkeypatch, shard, picked):
    monkeypatch.setenv("PAGEDLLM_SWEEP_SHARD", shard)
    assert list(range(5))[shard_from_env("PAGEDLLM_SWEEP_SHARD")] == picked


@pytest.mark.parametrize("shard", ["2/2", "1", "a/3", "-1/2"])
def test_a_bad_sweep_shard_is_named(monkeypatch, shard):
    monkeypatch.setenv("PAGEDLLM_SWEEP_SHARD", shard)
    with pytest.raises(ValueError, match=re.escape(repr(shard))):
        shard_from_env("PAGEDLLM_SWEEP_SHARD")


@pytest.mark.gpu
@pytest.mark.sweep
def test_gpu_every_op_backward_matches_the_dense_op_on_cuda():
    """The backward sweep on a CUDA pager, every case in one test. A dense backward that differs
    from run to run (atomics in index_add and scatter gradients) is compared to its accuracy."""
    cases = [param.values for param in _backward_cases("cuda")]
    failures = sweep_on_cuda(make_pager("cuda"), cases, lambda pager, case: check_backward(pager, *case, "cuda"),
                             lambda case: f"{_name(case[0])} {case[1]} backward")  # fmt: skip
    assert not failures, f"{len(failures)} of {len(cases)} cases differ:\n" + "\n".join(failures)
