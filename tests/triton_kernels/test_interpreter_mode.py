"""Whether the kernels run under the interpreter is what Triton decided as it built them
(``TRITON_INTERPRET`` when the package is imported, in Triton's reading of the value), and a
variable set too late is named in the device error."""

import os
import subprocess
import sys

import pytest
import torch

from pagedtensor.triton_kernels import _common, paged_gather

REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROBE = (
    "import triton, torch\n"
    "from pagedtensor.triton_kernels import paged_gather\n"
    "from pagedtensor.triton_kernels._common import interpreting\n"
    "knobs = getattr(triton, 'knobs', None)\n"
    "wanted = bool(knobs.runtime.interpret) if knobs is not None else None\n"
    "try:\n"
    "    paged_gather(torch.randn(2, 16, 1, 16), torch.zeros(1, 1, dtype=torch.int32), torch.tensor([4], dtype=torch.int32))\n"
    "    ran = 'ran'\n"
    "except ValueError as error:\n"
    "    ran = str(error)\n"
    "print(interpreting(), wanted, ran, sep='|')\n"
)


@pytest.mark.parametrize("value", ["true", "false"])
def test_the_kernels_follow_tritons_reading_of_the_variable(value):
    """``true`` is on and ``false`` off, as Triton reads them: a CPU call runs under the one and is
    refused with the package's error under the other (it raised Triton's "0 active drivers")."""
    env = {**os.environ, "TRITON_INTERPRET": value, "PYTHONPATH": REPOSITORY}
    result = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300, cwd=REPOSITORY)
    assert result.returncode == 0, result.stderr[-2000:]
    interpreting, wanted, ran = result.stdout.strip().splitlines()[-1].split("|", 2)
    if wanted != "None":
        assert interpreting == wanted
    if interpreting == "True":
        assert ran == "ran"
    elif torch.cuda.is_available() is False:
        assert ran.startswith("tensors are on cpu: the Triton kernels need a CUDA device")


def test_a_variable_set_after_the_import_is_named(monkeypatch):
    monkeypatch.setattr(_common, "_INTERPRETED", False)  # as if the package was imported without it
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match="set it before that import"):
        paged_gather(torch.randn(2, 16, 1, 16), torch.zeros(1, 1, dtype=torch.int32), torch.tensor([4], dtype=torch.int32))


def test_a_variable_turned_off_after_the_import_is_named(monkeypatch):
    """Kernels built for the interpreter, the variable unset since: the device error names it (Triton
    failed inside with a bare AssertionError)."""
    if not _common.interpreting():
        pytest.skip("the kernels were built for a GPU here")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET no longer asks for it"):
        paged_gather(torch.randn(2, 16, 1, 16), torch.zeros(1, 1, dtype=torch.int32), torch.tensor([4], dtype=torch.int32))
