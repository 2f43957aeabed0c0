"""``benchmarks/gpu_log_summary.py`` on the log layouts the GPU scripts write: gpu_suite.sh's console
output followed by the gpu_tests.log / gpu_sweeps.log it wrote, gpu_fuzz.sh's one line a run, and
headers that label the torch, triton and transformers versions."""

from __future__ import annotations

from pathlib import Path

from benchmarks.gpu_log_summary import summarize

HEADER = [
    "# GPU suite on an H100 at abc1234 (clean tree)",
    "command: TEST_SHARDS=2 SWEEP_SHARDS=2 BENCHES=none bash benchmarks/gpu_suite.sh",
    "commit: abc1234 (clean tree)",
    "NVIDIA H100 80GB HBM3, 81559 MiB, 580.159.04",
    "2.11.0+cu130 3.6.0 5.17.0",
    "Sat Dec  5 02:23:25 PM UTC 2026",
]

# What gpu_suite.sh prints (grep of each log's "== " and summary lines), then the two logs it wrote.
CONSOLE_ECHO = [
    "# suite.log",
    "NVIDIA H100 80GB HBM3, 81559 MiB, 580.159.04",
    "commit abc1234",
    "== test shard 0/2",
    "10 passed, 5 deselected in 12.00s",
    "== test shard 1/2",
    "1 failed, 8 passed, 5 deselected in 11.00s",
    "== test_gpu_every_op_matches_the_dense_op_on_cuda_0",
    "1 passed in 9.00s",
    "== test_gpu_every_op_matches_the_dense_op_on_cuda_1",
    "1 passed in 8.00s",
]
TESTS_LOG = [
    "# gpu_tests.log",
    "== test shard 0/2",
    "..........                                                               [100%]",
    "10 passed, 5 deselected in 12.00s",
    "== test shard 1/2",
    "F........                                                                [100%]",
    "1 failed, 8 passed, 5 deselected in 11.00s",
]
SWEEPS_LOG = [
    "# gpu_sweeps.log",
    "== test_gpu_every_op_matches_the_dense_op_on_cuda_0",
    "sweep: 100 of 120 cases, 0 failing",
    "sweep: 120 of 120 cases, 0 failing",
    "1 passed in 9.00s",
    "== test_gpu_every_op_matches_the_dense_op_on_cuda_1",
    "sweep: 110 of 110 cases, 1 failing",
    "1 passed in 8.00s",
]
EXPECTED_TOTALS = ["10 passed, 5 deselected in 12.00s", "1 failed, 8 passed, 5 deselected in 11.00s", "1 passed in 9.00s", "1 passed in 8.00s"]
EXPECTED_SWEEPS = {"test_gpu_every_op_matches_the_dense_op_on_cuda": {"cases": 230, "failing": 1, "unfinished_shards": 0}}


def _summary(tmp_path: Path, lines: list[str], name: str = "gpu_suite_abc1234_h100.log") -> dict:
    log = tmp_path / name
    log.write_text("\n".join(lines) + "\n")
    return summarize(str(log))


def test_a_suite_log_with_its_console_echo_counts_each_run_once(tmp_path):
    """The console echo before "# gpu_tests.log" repeats each shard's "== name" and pytest line: each
    run is counted once, and the sweep shards (N of N in gpu_sweeps.log) are finished."""
    summary = _summary(tmp_path, HEADER + CONSOLE_ECHO + TESTS_LOG + SWEEPS_LOG)
    assert summary["pytest_totals"] == EXPECTED_TOTALS
    assert summary["unfinished_test_shards"] == []
    assert summary["sweeps"] == EXPECTED_SWEEPS
    # the same logs without the echo summarize the same
    assert _summary(tmp_path, HEADER + TESTS_LOG + SWEEPS_LOG, "plain.log")["pytest_totals"] == EXPECTED_TOTALS


def test_a_sweeps_log_gathered_after_its_console_echo_counts_each_shard_once(tmp_path):
    """The layout of gpu_sweeps_sharded_4583779_h200.log: the console echo, then "== gpu_sweeps.log
    (every shard's log, gathered)" and the shards' logs."""
    echo = [line for line in CONSOLE_ECHO if "test_gpu" in line or line == "1 passed in 9.00s" or line == "1 passed in 8.00s"]
    gathered = ["== gpu_sweeps.log (every shard's log, gathered)"] + SWEEPS_LOG[1:]
    summary = _summary(tmp_path, HEADER + echo + gathered)
    assert summary["pytest_totals"] == ["1 passed in 9.00s", "1 passed in 8.00s"]
    assert summary["sweeps"] == EXPECTED_SWEEPS


def test_an_echo_of_a_log_not_appended_is_still_counted(tmp_path):
    """Only a section repeated in a later log is the echo of it: a test shard echoed on the console
    whose gpu_tests.log is not in the file still counts (once)."""
    summary = _summary(tmp_path, HEADER + CONSOLE_ECHO + SWEEPS_LOG)
    assert summary["pytest_totals"] == EXPECTED_TOTALS
    assert summary["sweeps"] == EXPECTED_SWEEPS


def test_repeated_shard_names_without_a_log_marker_are_separate_runs(tmp_path):
    """Two runs of the same shard name with no "# gpu_tests.log" line between them are two runs."""
    lines = ["== test shard 0/1", "3 passed in 1.00s", "== test shard 0/1", "1 failed, 2 passed in 1.00s"]
    assert _summary(tmp_path, lines)["pytest_totals"] == ["3 passed in 1.00s", "1 failed, 2 passed in 1.00s"]


def test_fuzz_log_counts_every_run_once(tmp_path):
    """gpu_fuzz.sh's "process P seed S rc R: <pytest's last line>" lines are runs; a run cut at the
    time limit is none; a failing run's full output (after "== failing run") is the same run again."""
    lines = [
        "commit 04b4bd3, first seed 100, 2 processes, 140 s",
        "process 0 seed 100 rc 0: 10 passed, 6428 deselected, 1 warning in 45.97s",
        "process 0 seed 102 rc 0: 10 passed, 6428 deselected, 1 warning in 45.00s (0:00:45)",
        "process 1 seed 101 rc 1: 1 failed, 9 passed, 6428 deselected in 40.00s",
        "process 1 seed 103 cut at the time limit",
        "== failing run run_1_0",
        "F.........",
        "1 failed, 9 passed, 6428 deselected in 40.00s",
    ]
    summary = _summary(tmp_path, lines, "gpu_fuzz_04b4bd3_h200.log")
    assert summary["pytest_totals"] == [
        "10 passed, 6428 deselected, 1 warning in 45.97s",
        "10 passed, 6428 deselected, 1 warning in 45.00s (0:00:45)",
        "1 failed, 9 passed, 6428 deselected in 40.00s",
    ]


def test_labeled_versions_are_read_in_any_order(tmp_path):
    """"torch X triton Y transformers Z" (any order, with or without colons, other words between)
    as well as the bare "X Y Z"."""
    cases = {
        "torch 2.11.0+cu130 triton 3.6.0 transformers 5.17.0": ("2.11.0+cu130", "3.6.0", "5.17.0"),
        "torch 2.11.0+cu130 transformers 5.17.0 triton 3.6.0": ("2.11.0+cu130", "3.6.0", "5.17.0"),
        "torch: 2.11.0+cu130 triton: 3.6.0 transformers: 5.17.0": ("2.11.0+cu130", "3.6.0", "5.17.0"),
        "torch 2.11.0+cu130 transformers 5.17.0 /tmp/site/transformers/__init__.py triton 3.6.0 accelerate 1.2.0": (
            "2.11.0+cu130", "3.6.0", "5.17.0"),
        "2.11.0+cu130 3.6.0 5.17.0": ("2.11.0+cu130", "3.6.0", "5.17.0"),
    }  # fmt: skip
    for line, (torch_version, triton_version, transformers_version) in cases.items():
        summary = _summary(tmp_path, ["command: pytest", "NVIDIA H200, 143771 MiB, 580.159.04", line, "2026-12-05"])
        assert (summary.get("torch"), summary.get("triton"), summary.get("transformers")) == (
            torch_version, triton_version, transformers_version), line
    only_torch = _summary(tmp_path, ["command: pytest", "torch 2.11.0+cu130 transformers 5.17.0"])
    assert only_torch["torch"] == "2.11.0+cu130" and only_torch["transformers"] == "5.17.0" and "triton" not in only_torch
    # a later line that names torch (a test's output) is not the header
    assert "torch" not in _summary(tmp_path, ["command: pytest"] + ["...."] * 12 + ["torch 2.11.0 triton 3.6.0 transformers 5.17.0"])
