"""Test configuration shared by every test module.

Triton kernels run under the interpreter when no CUDA device is present; ``TRITON_INTERPRET`` must
be set before any module with ``@triton.jit`` is imported, so it is set here, first.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest


def _has_cuda_device() -> bool:
    """Whether a CUDA device is present, decided without importing torch (so the env var lands first)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return False
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        result = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return result.returncode == 0 and "GPU" in result.stdout


HAS_CUDA = _has_cuda_device()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# torch.compile tests check what PagedTensor refuses while AOT autograd traces; a graph cached on disk
# by an earlier run (of older code) is loaded without a trace, so the cache is off for the tests.
os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")

import torch  # noqa: E402  (after TRITON_INTERPRET)

from hypothesis import HealthCheck, settings  # noqa: E402

from tests.support import shard_from_env  # noqa: E402

settings.register_profile(
    "ci",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile("dev", deadline=None, max_examples=10)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.hookimpl(trylast=True)  # after `-m` has deselected, so the shards share the selected tests
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``gpu`` tests where no CUDA device is; with ``PAGEDLLM_TEST_SHARD=i/n`` keep every n-th
    selected test from the i-th, so n pytest processes share one GPU's suite (benchmarks/gpu_suite.sh);
    with ``PAGEDLLM_PROPERTY_TESTS_ONLY=1`` keep only the hypothesis tests (benchmarks/gpu_fuzz.sh)."""
    if os.environ.get("PAGEDLLM_PROPERTY_TESTS_ONLY") == "1":
        from hypothesis import is_hypothesis_test

        _keep_only(config, items, [item for item in items if is_hypothesis_test(getattr(item, "obj", None))])
    if "PAGEDLLM_TEST_SHARD" in os.environ:
        _keep_only(config, items, items[shard_from_env("PAGEDLLM_TEST_SHARD")])
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (runs on the GPU machine: benchmarks/gpu_suite.sh)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def _keep_only(config: pytest.Config, items: list[pytest.Item], kept: list[pytest.Item]) -> None:
    """Deselect every item of ``items`` not in ``kept`` (reported as deselected), in place."""
    kept_ids = {id(item) for item in kept}
    config.hook.pytest_deselected(items=[item for item in items if id(item) not in kept_ids])
    items[:] = kept


@pytest.fixture
def nvme_dir(tmp_path):
    """A folder for a disk tier's page files, removed after the test."""
    path = tmp_path / "nvme"
    path.mkdir()
    return str(path)
