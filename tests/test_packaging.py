"""``pip install .`` (not editable) ships every subpackage, the mapped folders included."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile

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
    assert (target / "pagedtensor" / "py.typed").exists()  # PEP 561: type checkers read the package's hints


@pytest.mark.slow
def test_source_distribution_carries_the_test_suite(tmp_path):
    """Without a manifest setuptools shipped ``tests/test_*.py`` alone (no conftest, helpers or
    subfolders), so the tests of an sdist could not run."""
    source = tmp_path / "source"  # a copy without egg-info: its SOURCES.txt would add files of earlier builds
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".*", "*.egg-info", "build", "dist", "ab_base", "__pycache__", "*.so"))
    code = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    build = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, cwd=source)
    assert build.returncode == 0, build.stderr[-3000:]
    name = build.stdout.strip().splitlines()[-1]
    with tarfile.open(tmp_path / name) as archive:
        members = {member.split("/", 1)[1] for member in archive.getnames() if "/" in member}
    for needed in ("csrc/diskio.c", "setup.py", "tests/conftest.py", "tests/support.py", "tests/__init__.py",
                   "tests/hf/tiny_models.py", "tests/triton_kernels/__init__.py", "benchmarks/common.py"):  # fmt: skip
        assert needed in members, needed
    assert not [member for member in members if member.startswith("benchmarks/results/") or member.endswith((".so", ".pyc"))]
