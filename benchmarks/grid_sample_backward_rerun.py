"""Rerun the CUDA backward sweep's check of nn.functional.grid_sample (fp32) six times: a flake or a fault?

Run from the repository root on a GPU machine: python3 benchmarks/grid_sample_backward_rerun.py
"""
import sys, torch
sys.path.insert(0, ".")
from tests.test_torch_opinfo import check_backward, make_pager, op_db, _name
ops = [op for op in op_db if _name(op) == "nn.functional.grid_sample"]
torch.use_deterministic_algorithms(True, warn_only=True)
for attempt in range(6):
    pager = make_pager("cuda")
    for op in ops:
        try:
            check_backward(pager, op, torch.float32, "cuda"); print(attempt, "grid_sample fp32 backward: equal")
        except AssertionError as e:
            print(attempt, "grid_sample fp32 backward FAILED:", str(e)[:1500])
    pager.close()
