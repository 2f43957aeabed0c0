"""The benchmarks' code that runs on a CPU: the per-layer prefill timeline, the kernel profile, the dispatch timing rows."""

from __future__ import annotations

import pytest
import torch

from benchmarks.common import LayerTimeline
from tests.hf.tiny_models import prompts, tiny_pair


def test_layer_timeline_records_only_the_first_forward_after_start():
    _, model = tiny_pair("llama", attn="sdpa", num_hidden_layers=3)
    ids, mask = prompts(1, length=20)
    layers = list(model.model.layers)
    timeline = LayerTimeline(model, layers)
    try:
        assert timeline.summary() == {"complete": False}  # nothing recorded before start()
        model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False)
        assert timeline.marks == []  # not started: the hooks record nothing
        timeline.start()
        model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)  # prefill + 2 decode steps
    finally:
        timeline.remove()
    assert len(timeline.marks) == 2 + 2 * len(layers)  # the prefill only
    summary = timeline.summary()
    assert summary["complete"] and summary["layers"] == 3
    assert len(summary["layer_host_ms"]) == 3 and all(ms > 0 for ms in summary["layer_host_ms"])
    assert summary["total_host_ms"] >= summary["layers_host_ms_sum"] > 0
    assert summary["before_layers_host_ms"] >= 0 and summary["after_layers_host_ms"] >= 0
    assert summary["total_gpu_ms"] is None and summary["layer_gpu_ms"] == [None] * 3  # no CUDA events on a CPU model
    # removed: a later forward records nothing, even after start()
    timeline.start()
    with torch.no_grad():
        model(ids, attention_mask=mask)
    assert timeline.marks == []


def test_kernel_profile_runs_the_function_once_and_reports_its_shape():
    from benchmarks.common import kernel_profile

    calls = []
    profile = kernel_profile(lambda: calls.append(torch.ones(64).sum()))
    assert len(calls) == 1
    assert set(profile) == {"wall_ms_profiled", "device_ms_total", "top", "host_sync_and_alloc_calls", "cuda_runtime_calls"}
    assert profile["wall_ms_profiled"] > 0
    assert profile["top"] == [] and profile["device_ms_total"] == 0  # no device kernels on a CPU-only machine
    assert profile["cuda_runtime_calls"] == {}  # nor CUDA runtime calls


def test_dispatch_overhead_rows_on_a_cpu_device_tier():
    """The dispatch benchmark's timing path, with the CPU as the device tier: every op's paged result
    is bitwise equal to the plain one, every timing is there, and the verdict follows the ratios."""
    from benchmarks.bench_dispatch_overhead import OPS, TARGET_RATIO, measure_size

    rows = measure_size("1MiB", 2**20, 2**20, "cpu")
    assert [row["op"] for row in rows] == list(OPS)
    for row in rows:
        assert row["bitwise_equal"], row["op"]
        for kind in ("plain", "paged", "floor"):
            assert row[f"{kind}_device_us"] > 0 and row[f"{kind}_wall_us"] > 0 and row[f"{kind}_gpu_us"] > 0
        assert row["device_ok"] == (row["device_ratio"] <= TARGET_RATIO)
        assert row["wall_ok"] == (row["wall_ratio"] <= TARGET_RATIO)
        assert row["pass"] == (row["device_ok"] and row["wall_ok"])


def test_pieces_benchmark_on_a_cpu_device_tier(tmp_path, monkeypatch):
    """The pieces benchmark's path, with the CPU as the device tier: a tensor four times the budget is
    scaled in pieces, every run timed, both results bitwise equal to the expected values."""
    import json
    import sys

    from benchmarks import bench_pieces

    out = tmp_path / "pieces.json"
    argv = ["bench_pieces", "--device", "cpu", "--gib", str(1 / 256), "--budget-gib", str(1 / 1024), "--page-size", "16KiB",
            "--repeat", "1", "--out", str(out)]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    assert bench_pieces.main() == 0
    results = json.loads(out.read_text())
    assert results["paged_bitwise_equal"] and results["manual_bitwise_equal"]
    assert [row["method"] for row in results["rows"]] == ["paged", "manual"]
    assert results["pager_stats"]["faults"] >= 2 * (2**22 // 2**14)  # every page faulted in, twice (two rounds)


def test_weight_paging_benchmark_on_a_cpu_device_tier(tmp_path):
    """The weight-paging benchmark's path on tiny shapes, the CPU as the device tier and a budget of
    about 60% of the layer weights: every run gives the unpaged tokens, and the weights advised
    ``"loop"`` move fewer bytes a token than under recency, which moves them all."""
    import json

    pytest.importorskip("transformers")
    from benchmarks import bench_weight_paging

    out = tmp_path / "weight_paging.json"
    argv = ["--device", "cpu", "--runs", "native,paged,paged_recency", "--layers", "8", "--hidden", "128", "--heads", "4",
            "--intermediate", "256", "--vocab", "512", "--prompt", "32", "--new-tokens", "6", "--cap-gib", "0.0019",
            "--margin-gib", "0", "--page-size", "16KiB", "--host-gib", "0.1", "--out", str(out)]  # fmt: skip
    assert bench_weight_paging.main(argv) == 0
    runs = {run["run"]: run for run in json.loads(out.read_text())["runs"]}
    assert all(run["status"] == "ok" for run in runs.values()), runs
    assert runs["paged"]["tokens_equal_native"] == runs["paged_recency"]["tokens_equal_native"] == "6/6"
    weights_gb = runs["paged"]["paged_weights_gib"] * 2**30 / 1e9
    assert runs["paged"]["gb_h2d_per_token"] < 0.75 * weights_gb < runs["paged_recency"]["gb_h2d_per_token"], runs


def test_paged_load_benchmark_on_a_cpu_device_tier(tmp_path):
    """The paged-load benchmark's path on a tiny checkpoint, the CPU as the device tier and budgets
    below its layer weights: both loads run in their own processes, their memory is measured, and
    the paged load generates the plain load's tokens."""
    import json

    pytest.importorskip("transformers")
    from benchmarks import bench_paged_load

    out = tmp_path / "paged_load.json"
    argv = ["--device", "cpu", "--layers", "4", "--hidden", "128", "--intermediate", "256", "--heads", "4", "--kv-heads", "2",
            "--vocab", "256", "--vram-limit", "192KiB", "--host-memory", "128KiB", "--page-size", "16KiB",
            "--checkpoint", str(tmp_path / "checkpoint"), "--out", str(out)]  # fmt: skip
    assert bench_paged_load.main(argv) == 0
    results = json.loads(out.read_text())
    rows = {row["run"]: row for row in results["rows"]}
    assert all(row["status"] == "ok" for row in rows.values()), rows
    assert results["tokens_equal"] and results["pass"] and results["device_peak_under_layer_weights"] is None
    assert len(rows["paged"]["tokens"]) == bench_paged_load.NEW_TOKENS
    assert rows["paged"]["layer_weight_bytes"] > 192 * 2**10 + 128 * 2**10  # the budgets hold less than the layers
    assert rows["paged"]["resident_bytes"]["disk"] > 0 and all(row["host_anon_growth_bytes"] is not None for row in rows.values())


def test_gpu_log_summary_reads_the_header_totals_and_whole_sweeps(tmp_path):
    """``benchmarks/gpu_log_summary.py`` takes a log's header, every pytest total, and each sweep's
    cases and failures from its last, whole line ("N of N"), summed over its shards."""
    from benchmarks.gpu_log_summary import summarize

    log = tmp_path / "gpu_suite_x_h100.log"
    log.write_text("\n".join([
        "command: bash benchmarks/gpu_suite.sh", "commit: abc1234 (clean tree)", "name, driver_version, memory.total [MiB]",
        "NVIDIA H100 80GB HBM3, 580.159.04, 81559 MiB", "2.11.0+cu130 3.6.0 5.17.0", "Sat Dec  5 02:23:25 PM UTC 2026",
        "109 passed, 7458 deselected in 268.26s", "== test_gpu_every_op_matches_the_dense_op_on_cuda_0",
        "sweep: 100 of 300 cases, 0 failing", "sweep: 300 of 300 cases, 1 failing", "1 failed in 9.0s",
        "== test_gpu_every_op_matches_the_dense_op_on_cuda_1", "sweep: 200 of 200 cases, 0 failing",
    ]))  # fmt: skip
    summary = summarize(str(log))
    assert summary["device"] == "NVIDIA H100 80GB HBM3" and summary["commit"] == "abc1234 (clean tree)"
    assert (summary["torch"], summary["triton"], summary["transformers"]) == ("2.11.0+cu130", "3.6.0", "5.17.0")
    assert summary["command"] == "bash benchmarks/gpu_suite.sh" and summary["date"].endswith("2026")
    assert summary["pytest_totals"] == ["109 passed, 7458 deselected in 268.26s", "1 failed in 9.0s"]
    assert summary["sweeps"] == {"test_gpu_every_op_matches_the_dense_op_on_cuda": {"cases": 500, "failing": 1, "unfinished_shards": 0}}


def test_gpu_log_summary_counts_errors_cut_shards_and_the_failures_a_cut_sweep_logged(tmp_path):
    """A shard whose pytest summary has no "passed"/"failed" count ("2 errors in ..."), a test shard
    cut by its time limit (no summary at all), and the failures a sweep shard logged before its
    time limit cut it: each was dropped, so a summary could show only passes."""
    from benchmarks.gpu_log_summary import summarize

    log = tmp_path / "gpu_suite_x_h100.log"
    log.write_text("\n".join([
        "commit: abc1234 (clean tree)", "== test shard 0/3", "120 passed, 8000 deselected in 100.00s",
        "== test shard 1/3", "tests/test_a.py ....F...", "== test shard 2/3", "2 errors in 3.10s",
        "== test_gpu_every_op_matches_the_dense_op_on_cuda_0", "sweep: 300 of 601 cases, 2 failing",
        "== test_gpu_every_op_matches_the_dense_op_on_cuda_1", "sweep: 600 of 600 cases, 0 failing", "1 passed in 60.00s",
    ]))  # fmt: skip
    summary = summarize(str(log))
    assert summary["pytest_totals"] == ["120 passed, 8000 deselected in 100.00s", "2 errors in 3.10s", "1 passed in 60.00s"]
    assert summary["unfinished_test_shards"] == ["test shard 1/3"]
    assert summary["sweeps"] == {"test_gpu_every_op_matches_the_dense_op_on_cuda": {"cases": 900, "failing": 2, "unfinished_shards": 1}}
