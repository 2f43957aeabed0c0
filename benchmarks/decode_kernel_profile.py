"""Run the decode split kernel and the paged-rows reader once each on Llama-3-8B batch 1 at 32K, for a
profiler (Nsight Compute) to compare them. An experiment, not a product path.

The shipped split kernel alone takes ~37.3 us back to back on cold KV there, the paged-rows reader of
``decode_read_ceiling.py`` (the same addressing, summing instead of attending; its fastest launch:
32-token steps, 8 warps, 2 stages, 4 programs an SM) ~33.5 us. This script only launches them (each
``--calls`` times, so a profiler can skip the first, compiling call); run it under
``ncu --kernel-name regex:'_decode_split_kernel|_read_paged_rows_kernel' --launch-skip 1 --launch-count 2 ...``.

Run: ``python3 benchmarks/decode_kernel_profile.py [--calls N]`` on a CUDA machine.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.decode_read_ceiling import decode_input_sets, paged_rows_reader, shipped_split_only  # noqa: E402

from pagedtensor.triton_kernels import decode_attention as da  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=3, help="launches of each kernel")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    _, sets = decode_input_sets("llama3-8b", 1, 32768, torch.float16)
    inputs = sets[0]
    split = shipped_split_only(inputs)
    reader = paged_rows_reader(inputs, 32768, 4 * da.sm_count(inputs[0].device), 32, 8, 2)
    for _ in range(args.calls):
        split()
    for _ in range(args.calls):
        reader()
    torch.cuda.synchronize()
    launch, tokens, splits = da.decode_geometry(*inputs)
    print(f"split kernel: {launch}, {splits} splits of {tokens} tokens; reader: 32-token steps, 8 warps, 2 stages")
    return 0


if __name__ == "__main__":
    sys.exit(main())
