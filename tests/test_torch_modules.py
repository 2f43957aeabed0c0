"""Every module of torch's ModuleInfo database with paged parameters and buffers, against the dense module.

torch describes each ``nn`` module with constructor and forward inputs
(``torch.testing._internal.common_modules.module_db``). Here a module's parameters become
``nn.Parameter(PagedTensor.wrap(...))`` and its float and integer buffers PagedTensors (batch norm's
running statistics among them, updated in place in training), on one pager for the module. The
outputs, the buffers afterwards and, in training, every parameter's gradient must equal the dense
module's bit for bit.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.testing._internal.common_modules import module_db
from torch.utils._pytree import tree_flatten, tree_map

from pagedtensor import MemoryConfig, PagedTensor, Pager
from tests.test_torch_opinfo import sweep_on_cuda

PAGE = 4096
DEVICE_PAGES = 1024
INPUTS_PER_MODULE = 3

# Lazy modules have no parameters to page until their first forward.
LAZY = "nn.Lazy"
# cuDNN's RNNs read their weights' data pointers (``flatten_parameters``), which a PagedTensor has
# not: on CUDA they run with cuDNN off (the workaround README gives), dense and paged alike.
CUDNN_READS_POINTERS = {"nn.RNN", "nn.GRU", "nn.LSTM"}
# Their module inputs give a float64 ``_random_samples`` for a float32 input: the dense module raises.
DENSE_REFUSES = {"nn.FractionalMaxPool2d", "nn.FractionalMaxPool3d"}


def _cases() -> list:
    return [
        pytest.param(info, training, id=f"{info.name}-{'train' if training else 'eval'}")
        for info in module_db
        if not info.name.startswith(LAZY) and info.name not in DENSE_REFUSES
        for training in (False, True)
    ]


def _pager(device: str) -> Pager:
    return Pager(MemoryConfig(page_size=PAGE, vram_limit=DEVICE_PAGES * PAGE, host_memory=8 * DEVICE_PAGES * PAGE,
                              slab_size=8 * DEVICE_PAGES * PAGE, prefetch_strategy="none", device=device))  # fmt: skip


@pytest.fixture(scope="module")
def pager():
    with _pager("cpu") as p:
        yield p


def _dense(value: object) -> object:
    return value.materialize() if isinstance(value, PagedTensor) else value


def _mismatch(actual: object, expected: object) -> str | None:
    actual, expected = _dense(actual), _dense(expected)
    if isinstance(expected, torch.Tensor):
        if not isinstance(actual, torch.Tensor) or (actual.dtype, actual.shape) != (expected.dtype, expected.shape):
            return f"{actual!r} where the dense module gives {expected!r}"
        actual, expected = actual.detach(), expected.detach()
        if actual.is_complex():
            actual, expected = torch.view_as_real(actual.resolve_conj()), torch.view_as_real(expected.resolve_conj())
        if actual.is_floating_point():
            same = bool(((actual == expected) | (actual.isnan() & expected.isnan())).all())
        else:
            same = torch.equal(actual, expected)
        return None if same else f"values differ:\n{actual}\n{expected}"
    if isinstance(expected, (list, tuple)):
        for position, (a, e) in enumerate(zip(actual, expected)):
            why = _mismatch(a, e)
            if why:
                return f"[{position}] {why}"
    return None


def _page_module(module: torch.nn.Module, pager: Pager) -> None:
    """Make each parameter and each float or integer buffer of ``module`` a PagedTensor on ``pager``."""
    for owner in module.modules():
        for name, parameter in list(owner.named_parameters(recurse=False)):
            paged = PagedTensor.wrap(parameter.detach().clone(), pager)
            setattr(owner, name, torch.nn.Parameter(paged, requires_grad=parameter.requires_grad))
        for name, buffer in list(owner.named_buffers(recurse=False)):
            if buffer is not None and buffer.layout == torch.strided:
                owner.register_buffer(name, PagedTensor.wrap(buffer.clone(), pager), persistent=name not in owner._non_persistent_buffers_set)


def _fresh(value: object) -> object:
    if isinstance(value, torch.Tensor):
        return value.detach().clone().requires_grad_(value.requires_grad)
    return value


def check_module(pager: Pager, info: object, training: bool, device: str) -> None:
    """Raise AssertionError naming the input where the paged module differs from the dense one."""
    if device == "cuda" and info.name in CUDNN_READS_POINTERS:
        with torch.backends.cudnn.flags(enabled=False):
            return _check_module(pager, info, training, device)
    return _check_module(pager, info, training, device)


def _check_module(pager: Pager, info: object, training: bool, device: str) -> None:
    inputs = list(info.module_inputs_func(info, device=device, dtype=torch.float32, requires_grad=training,
                                          training=training))[:INPUTS_PER_MODULE]  # fmt: skip
    for index, module_input in enumerate(inputs):
        where = f"{info.name} {'train' if training else 'eval'} input {index}"
        constructor = module_input.constructor_input
        torch.manual_seed(0)
        dense = info.module_cls(*constructor.args, **constructor.kwargs).to(device)
        paged = copy.deepcopy(dense)
        dense.train(training)
        paged.train(training)
        _page_module(paged, pager)
        assert all(isinstance(parameter, PagedTensor) for parameter in paged.parameters()), where
        forward = (module_input.forward_input.args, module_input.forward_input.kwargs)
        dense_forward, paged_forward = tree_map(_fresh, forward), tree_map(_fresh, forward)
        torch.manual_seed(1)
        expected = dense(*dense_forward[0], **dense_forward[1])
        torch.manual_seed(1)
        actual = paged(*paged_forward[0], **paged_forward[1])
        why = _mismatch(actual, expected)
        assert why is None, f"{where}: output {why}"
        for (name, dense_buffer), (_, paged_buffer) in zip(dense.named_buffers(), paged.named_buffers()):
            why = _mismatch(paged_buffer, dense_buffer)
            assert why is None, f"{where}: buffer {name} afterwards {why}"
        outputs = [(e, a) for e, a in zip(tree_flatten(expected)[0], tree_flatten(actual)[0])
                   if isinstance(e, torch.Tensor) and e.requires_grad]  # fmt: skip
        if not training or not outputs:
            continue
        torch.manual_seed(2)
        seeds = [torch.randn(e.shape, dtype=e.dtype, device=e.device) for e, _ in outputs]
        sum((e * g).sum() for (e, _), g in zip(outputs, seeds)).backward()
        sum((a * g).sum() for (_, a), g in zip(outputs, seeds)).backward()
        for (name, dense_parameter), (_, paged_parameter) in zip(dense.named_parameters(), paged.named_parameters()):
            assert (dense_parameter.grad is None) == (paged_parameter.grad is None), f"{where}: gradient of {name}"
            if dense_parameter.grad is not None:
                why = _mismatch(paged_parameter.grad, dense_parameter.grad)
                assert why is None, f"{where}: gradient of {name} {why}"


@pytest.mark.parametrize("info, training", _cases())
def test_module_with_paged_parameters_matches_the_dense_module(pager, info, training):
    check_module(pager, info, training, "cpu")


@pytest.mark.gpu
@pytest.mark.sweep
def test_gpu_every_module_with_paged_parameters_matches_the_dense_module_on_cuda():
    """The same on a CUDA pager, every case in one test (one report of every module that differs),
    with deterministic algorithms where torch has them."""
    cases = [case.values for case in _cases()]
    failures = sweep_on_cuda(_pager("cuda"), cases, lambda pager, case: check_module(pager, *case, "cuda"),
                             lambda case: f"{case[0].name} {'train' if case[1] else 'eval'}")  # fmt: skip
    assert not failures, f"{len(failures)} of {len(cases)} cases differ:\n" + "\n".join(failures)
