"""``pip install .`` (not editable) ships every subpackage, the mapped folders included."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBPACKAGES = [
    "pagedtensor",
    "pagedtensor.tiers",
    "pagedtensor.policies",
    "pagedtensor.hf",
    "pagedtensor.triton_kernels",
    "pagedtensor.compile_backend",
    "pagedtensor.compile_backend.passes",
]


@pytest.mark.slow
def test_regular_install_imports_every_subpackage(tmp_path):
    target = tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target", str(target), ROOT],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    code = "import importlib, sys; " + "; ".join(f"importlib.import_module({name!r})" for name in SUBPACKAGES) + (
        "; import pagedtensor; assert pagedtensor.__file__.startswith(sys.argv[1]), pagedtensor.__file__"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    result = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (target / "pagedtensor" / "triton_kernels" / "__init__.py").exists()
