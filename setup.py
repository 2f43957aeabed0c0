"""Build script: maps the top-level kernel and compile folders into the import package and builds
the optional C disk-I/O engine in ``csrc/`` when a C compiler is present.

``triton_kernels/`` installs as ``pagedtensor.triton_kernels`` and ``compile_backend/`` as
``pagedtensor.compile_backend``; their subfolders follow.  The C extension is ``optional``: when no
compiler is found the install still succeeds and ``pagedtensor.tiers.disk`` uses its thread-pool
fallback. ``pagedtensor/py.typed`` ships, so type checkers read the package's type hints (PEP 561).
"""

from __future__ import annotations

import os

from setuptools import Extension, find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
MAPPED_FOLDERS = {"triton_kernels": "pagedtensor.triton_kernels", "compile_backend": "pagedtensor.compile_backend"}


def mapped_packages() -> dict[str, str]:
    """Every package under a mapped top-level folder, as ``{import name: folder}``."""
    mapping: dict[str, str] = {}
    for folder, package in MAPPED_FOLDERS.items():
        root = os.path.join(HERE, folder)
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            if "__init__.py" not in filenames:
                continue
            relative = os.path.relpath(dirpath, HERE)
            parts = os.path.relpath(dirpath, root).split(os.sep)
            name = package if parts == ["."] else ".".join([package, *parts])
            mapping[name] = relative.replace(os.sep, "/")
    return mapping


package_dir = mapped_packages()
packages = find_packages(include=["pagedtensor", "pagedtensor.*"]) + sorted(package_dir)

disk_engine = Extension(
    "pagedtensor._diskio",
    sources=["csrc/diskio.c"],
    extra_compile_args=["-O2", "-std=c11", "-D_GNU_SOURCE"],
    optional=True,
)

setup(
    packages=packages,
    package_dir=package_dir,
    package_data={"pagedtensor": ["py.typed"]},  # PEP 561: the package's type hints are for type checkers too
    ext_modules=[disk_engine],
)
