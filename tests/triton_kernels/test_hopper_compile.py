"""The kernels as the GPU would launch them compile for sm_90 (H100/H200), checked without a GPU."""

import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_attention_kernels_compile_for_hopper(tmp_path):
    # A subprocess: this process runs the kernels under the interpreter, which never compiles them.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "triton-cache"), TRITON_DEFAULT_FP_FUSION="1")
    done = subprocess.run([sys.executable, "-m", "tests.triton_kernels.hopper_compile"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, f"compiling for sm_90 failed:\n{done.stdout}\n{done.stderr[-4000:]}"
    lines = done.stdout.splitlines()
    assert sum("descriptors=True" in line for line in lines) == 2 and sum("descriptors=False" in line for line in lines) == 2
    assert sum(line.startswith("decode ") for line in lines) == 4
