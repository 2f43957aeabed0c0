"""Every op in torch's own OpInfo database, on PagedTensor arguments, against the dense op.

torch describes each public op with sample inputs (``torch.testing._internal.common_methods_invocations.op_db``,
the database its own subclass tests such as FakeTensor's and DTensor's run). Here every tensor of a
sample becomes a PagedTensor on a shared pager (one pager for the module, so earlier tests' pages
are evicted as later ones fault in), the op runs, and its results and every argument afterwards
(in-place ops) must equal the dense op's bit for bit, or the op must be one of the exceptions below,
each with its reason.
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch
from torch.testing._internal.common_methods_invocations import op_db
from torch.utils._pytree import tree_flatten, tree_map

from pagedtensor import MemoryConfig, PagedTensor, Pager
from pagedtensor.errors import OutOfPagesError

PAGE = 4096
DEVICE_PAGES = 4096  # 16 MiB: the largest sample (grid_sampler_3d) is 20 MB; most are a few KiB
SAMPLES_PER_OP = 4
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


@pytest.fixture(scope="module")
def pager():
    config = dict(page_size=PAGE, vram_limit=DEVICE_PAGES * PAGE, host_memory=4 * DEVICE_PAGES * PAGE,
                  slab_size=4 * DEVICE_PAGES * PAGE, prefetch_strategy="none", device="cpu")
    with Pager(MemoryConfig(**config)) as p:
        yield p


def _dense(value: object) -> object:
    if isinstance(value, PagedTensor):
        return value.materialize()
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
    if isinstance(value, torch.Tensor) and value.layout == torch.strided:
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


def check_op(pager: Pager, op: object, dtype: torch.dtype, device: str) -> None:
    """Raise AssertionError naming the sample where ``op`` on PagedTensors differs from the dense op."""
    samples = list(op.sample_inputs(device, dtype, requires_grad=False))[:SAMPLES_PER_OP]
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
            assert _paged_bytes(tree_flatten(arguments)[0]) > DEVICE_PAGES * PAGE, f"sample {index}"
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


@pytest.mark.parametrize("op, dtype", _cases())
def test_op_matches_the_dense_op(pager, op, dtype):
    check_op(pager, op, dtype, "cpu")


@pytest.mark.gpu
def test_gpu_every_op_matches_the_dense_op_on_cuda():
    """The same on a CUDA pager, every case in one test (one report of every op that differs).
    Deterministic algorithms where torch has them, warnings only where it has none. Each case ends
    with a device synchronize, so a kernel fault is reported at the case that made it (after one,
    the CUDA context is lost and the sweep stops)."""
    config = dict(page_size=PAGE, vram_limit=DEVICE_PAGES * PAGE, host_memory=4 * DEVICE_PAGES * PAGE,
                  slab_size=4 * DEVICE_PAGES * PAGE, prefetch_strategy="none", device="cuda")
    cases = [(op, dtype) for op in op_db for dtype in DTYPES if dtype in op.supported_dtypes("cuda")]
    failures = sweep_on_cuda(Pager(MemoryConfig(**config)), cases, lambda pager, case: check_op(pager, *case, "cuda"),
                             lambda case: f"{_name(case[0])} {case[1]}")  # fmt: skip
    assert not failures, f"{len(failures)} of {len(cases)} cases differ:\n" + "\n".join(failures)


def sweep_on_cuda(pager: Pager, cases: list, check: Callable[[Pager, object], None], name: Callable[[object], str]) -> list[str]:
    """``check(pager, case)`` for each case under deterministic algorithms, synchronizing after each;
    the failures, each named. A CUDA fault ends the sweep there (the context is lost) and is the
    last failure; the pager is closed at the end."""
    failures = []
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        for case in cases:
            try:
                check(pager, case)
                torch.cuda.synchronize()
            except AssertionError as error:
                failures.append(str(error).splitlines()[0][:300])
            except torch.AcceleratorError as error:
                failures.append(f"{name(case)}: CUDA fault, sweep stopped: {str(error).splitlines()[0][:200]}")
                return failures
            except Exception as error:  # noqa: BLE001 - reported with the rest
                failures.append(f"{name(case)}: {type(error).__name__}: {str(error).splitlines()[0][:300]}")
    finally:
        torch.use_deterministic_algorithms(False)
    pager.close()
    return failures
