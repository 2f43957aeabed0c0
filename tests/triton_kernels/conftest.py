"""Fixtures of the paged-kernel tests (the Triton interpreter is set up by ``tests/conftest.py``)."""

import math

import pytest


@pytest.fixture(autouse=True)
def poison_kernel_outputs(monkeypatch):
    """Fill every kernel output and workspace with NaN before each launch, so that an element a
    kernel forgets to write fails the comparison instead of passing on leftover memory."""
    from pagedtensor.triton_kernels import _common  # imported late: TRITON_INTERPRET is set first

    monkeypatch.setattr(_common, "POISON", math.nan)
