"""The benchmarks' command lines: a value that cannot work is refused by argparse (exit status 2, a
message naming the argument and the value) before any pager or model is built; bench_paged_load
exits 1 when a run failed; bench_dispatch_overhead's size labels say what they hold."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from typing import Any, Callable

import pytest

from benchmarks import (
    bench_dispatch_overhead,
    bench_host_sum,
    bench_long_context,
    bench_paged_attention,
    bench_paged_load,
    bench_pager_transfers,
    bench_pieces,
    bench_tensor_parallel,
    bench_weight_paging,
)


def _refused(main: Callable[..., Any], argv: list[str], capsys: pytest.CaptureFixture, *named: str) -> None:
    """``main(argv)`` ends with exit status 2 and a message on stderr naming each of ``named``. (Its
    ``--out`` goes to a scratch folder: a benchmark that wrongly ran would not overwrite a result.)"""
    with tempfile.TemporaryDirectory(prefix="bench-arguments-") as scratch, pytest.raises(SystemExit) as exited:
        main([*argv, "--out", os.path.join(scratch, "out.json")])
    assert exited.value.code == 2, exited.value.code
    err = capsys.readouterr().err
    for text in named:
        assert text in err, (text, err)


def _never(*_args: Any, **_kwargs: Any) -> None:
    raise AssertionError("reached the benchmark's work: the argument was not refused first")


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--repeat", "0"], ("--repeat", "'0'")),
        (["--repeat", "-3"], ("--repeat", "'-3'")),
        (["--gib", "0"], ("--gib", "'0'")),
        (["--gib", "nan"], ("--gib", "'nan'")),
        (["--gib", "0.000000001"], ("--gib", "1e-09")),  # under one 4-byte element
    ],
)
def test_bench_host_sum_refuses(argv, named, capsys, monkeypatch):
    monkeypatch.setattr(bench_host_sum, "Pager", _never)
    _refused(bench_host_sum.main, ["--device", "cpu", "--page-size", "64KiB", *argv], capsys, *named)


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--repeat", "0"], ("--repeat", "'0'")),
        (["--gib", "0"], ("--gib", "'0'")),
        (["--budget-gib", "-1"], ("--budget-gib", "'-1'")),
        (["--gib", "0.00001"], ("--gib", "1e-05", "64KiB")),  # under one page
        (["--budget-gib", "0.00001"], ("--budget-gib", "1e-05", "64KiB")),
    ],
)
def test_bench_pieces_refuses(argv, named, capsys, monkeypatch):
    monkeypatch.setattr(bench_pieces, "Pager", _never)
    _refused(bench_pieces.main, ["--device", "cpu", "--gib", "0.002", "--budget-gib", "0.001", "--page-size", "64KiB", *argv], capsys, *named)


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--sizes", "2MB"], ("--sizes", "'2MB'")),
        (["--sizes", "1MiB,huge"], ("--sizes", "'huge'")),
        (["--profile", "mul"], ("--profile", "'mul'")),
        (["--host-profile", "sum,mul"], ("--host-profile", "'mul'")),
        (["--gap-probe", "mul"], ("--gap-probe", "'mul'")),
        (["--profile-size", "2MB"], ("--profile-size", "'2MB'")),
    ],
)
def test_bench_dispatch_overhead_refuses_unknown_sizes_and_ops(argv, named, capsys, monkeypatch):
    monkeypatch.setattr(bench_dispatch_overhead, "Pager", _never)
    monkeypatch.setattr(bench_dispatch_overhead, "resident_pager", _never)
    _refused(bench_dispatch_overhead.main, ["--device", "cpu", *argv], capsys, *named)


@pytest.mark.parametrize("gpus", ["0", "-2", "1,0", "two", ","])
def test_bench_tensor_parallel_refuses_world_sizes_below_one(gpus, capsys, monkeypatch):
    monkeypatch.setattr(bench_tensor_parallel, "run_world", _never)
    _refused(bench_tensor_parallel.main, ["--device", "cpu", "--gpus", gpus], capsys, "--gpus", repr(gpus))


def test_bench_tensor_parallel_records_its_world_sizes_as_given():
    args = bench_tensor_parallel.parse_args(["--gpus", "1,2"])
    assert args.gpus == [1, 2]


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--runs", "bogus"], ("--runs", "'bogus'")),
        (["--runs", "paged,plian"], ("--runs", "'plian'")),
        (["--runs", ","], ("--runs",)),
        (["--layers", "0"], ("--layers", "'0'")),
        (["--timeout", "0"], ("--timeout", "'0'")),
    ],
)
def test_bench_paged_load_refuses(argv, named, capsys, monkeypatch):
    monkeypatch.setattr(bench_paged_load, "save_checkpoint", _never)
    monkeypatch.setattr(bench_paged_load, "run_configuration_process", _never)
    _refused(bench_paged_load.main, ["--device", "cpu", *argv], capsys, *named)


@pytest.mark.parametrize(
    "main, argv, named",
    [
        (bench_long_context.main, ["--runs", "bogus"], ("--runs", "'bogus'")),
        (bench_long_context.main, ["--contexts", "4096,0"], ("--contexts", "'0'")),
        (bench_long_context.main, ["--new-tokens", "0"], ("--new-tokens", "'0'")),
        (bench_long_context.main, ["--device", "gpu"], ("--device", "'gpu'")),
        (bench_weight_paging.main, ["--runs", "paged,bogus"], ("--runs", "'bogus'")),
        (bench_weight_paging.main, ["--prompt", "0"], ("--prompt", "'0'")),
        (bench_weight_paging.main, ["--cap-gib", "0"], ("--cap-gib", "'0'")),
        (bench_tensor_parallel.main, ["--context", "0"], ("--context", "'0'")),
        (bench_paged_attention.main, ["--page-tokens", "0"], ("--page-tokens", "'0'")),
        (bench_paged_attention.main, ["--tune-kernels", "decode,bogus"], ("--tune-kernels", "'bogus'")),
        (bench_pager_transfers.main, ["--repeat", "0"], ("--repeat", "'0'")),
        (bench_pager_transfers.main, ["--gib", "-1"], ("--gib", "'-1'")),
    ],
)
def test_other_benchmarks_refuse_counts_below_one_and_unknown_names(main, argv, named, capsys, monkeypatch):
    monkeypatch.setattr(bench_long_context, "run_configuration", _never)
    monkeypatch.setattr(bench_weight_paging, "_run_subprocess", _never)
    monkeypatch.setattr(bench_tensor_parallel, "run_world", _never)
    _refused(main, ["--device", "cpu", *argv] if main in (bench_long_context.main, bench_weight_paging.main, bench_tensor_parallel.main) else argv,
             capsys, *named)  # fmt: skip


def _fake_runs(statuses: dict[str, str], tokens: dict[str, list[int]]) -> Callable[..., dict]:
    def run(command: list[str], timeout: int, identity: dict) -> dict:
        kind = command[command.index("--child") + 1]
        if statuses[kind] != "ok":
            return {**identity, "status": statuses[kind], "returncode": 1, "error": "ValueError: does not fit"}
        return {**identity, "status": "ok", "tokens": tokens[kind], "load_s": 0.1, "layer_weight_bytes": 10, "weight_bytes": 20,
                "host_anon_growth_bytes": 0}  # fmt: skip

    return run


SAME = {"plain": [5, 6, 7], "paged": [5, 6, 7]}


@pytest.mark.parametrize(
    "runs, statuses, tokens, code, passed",
    [
        ("plain,paged", {"plain": "ok", "paged": "ok"}, SAME, 0, True),
        ("plain,paged", {"plain": "ok", "paged": "error"}, SAME, 1, False),
        ("plain,paged", {"plain": "error", "paged": "ok"}, SAME, 1, False),
        ("plain,paged", {"plain": "ok", "paged": "timeout"}, SAME, 1, False),
        ("plain,paged", {"plain": "ok", "paged": "ok"}, {"plain": [5, 6, 7], "paged": [5, 6, 8]}, 1, False),
        ("paged", {"paged": "error"}, SAME, 1, False),
        ("paged", {"paged": "ok"}, SAME, 0, False),  # one run alone: no tokens to compare, nothing failed
    ],
)
def test_bench_paged_load_exits_1_when_a_run_failed(runs, statuses, tokens, code, passed, tmp_path, monkeypatch):
    """As its siblings do (gpu_suite.sh's ``|| status=1`` relies on it): a failed run, or both runs
    whose tokens differ, exit 1; both runs ok with the same tokens exit 0 (the children stubbed)."""
    monkeypatch.setattr(bench_paged_load, "save_checkpoint", lambda args, path: None)
    monkeypatch.setattr(bench_paged_load, "run_configuration_process", _fake_runs(statuses, tokens))
    out = tmp_path / "paged_load.json"
    assert bench_paged_load.main(["--device", "cpu", "--runs", runs, "--checkpoint", str(tmp_path), "--out", str(out)]) == code
    assert json.loads(out.read_text())["pass"] is passed


@pytest.mark.parametrize(
    "outcomes, code",
    [
        ({1: "ok", 2: "ok"}, 0),
        ({1: "ok", 2: "error"}, 1),
        ({1: "oom"}, 1),
        ({1: "ok", 2: "timeout"}, 1),
        ({1: "ok", 2: "split"}, 1),  # ok, but its ranks generated different tokens
        ({1: "ok", 3: "never run"}, 0),  # 3 does not divide the 4 KV heads: skipped, not run
    ],
)
def test_bench_tensor_parallel_exits_1_when_a_world_size_failed(outcomes, code, tmp_path, monkeypatch):
    """It exited 0 whatever its world sizes gave (gpu_suite.sh's ``|| status=1`` relies on the exit
    status, as for its siblings); a world size skipped for want of GPUs is no failure (run_world
    stubbed: no process started)."""

    def fake_world(args, world):
        status = outcomes[world]
        if status in ("ok", "split"):
            return {"world_size": world, "status": "ok", "tokens": [1, 2], "tokens_equal_across_ranks": status == "ok",
                    "decode_tokens_per_s": 10.0 * world, "ranks": [{"peak_gib": 0.0}]}  # fmt: skip
        return {"world_size": world, "status": status, "error": "stubbed"}

    monkeypatch.setattr(bench_tensor_parallel, "run_world", fake_world)
    gpus = ",".join(map(str, outcomes))
    argv = ["--device", "cpu", "--heads", "4", "--gpus", gpus, "--out", str(tmp_path / "tp.json")]
    assert bench_tensor_parallel.main(argv) == code


def test_dispatch_overhead_size_labels_say_their_bytes():
    """The labels are binary units (pagedtensor's parse_size reads "1MB" as 10**6 bytes); the old
    spellings are still accepted on the command line and read as the new labels."""
    from pagedtensor import parse_size

    assert list(bench_dispatch_overhead.SIZES) == ["4KiB", "1MiB", "256MiB", "1GiB"]
    assert all(parse_size(label) == nbytes for label, nbytes in bench_dispatch_overhead.SIZES.items())
    args = bench_dispatch_overhead.parse_args(["--sizes", "4KB,1MB,256MB,1GB", "--profile-size", "256MB"])
    assert args.sizes == ["4KiB", "1MiB", "256MiB", "1GiB"] and args.profile_size == "256MiB"
    args = bench_dispatch_overhead.parse_args(["--sizes", "1MiB,4KiB", "--profile", "sum,add"])
    assert args.sizes == ["1MiB", "4KiB"] and args.profile == ["sum", "add"] and args.profile_size == "1MiB"
    assert bench_dispatch_overhead.parse_args([]).sizes == ["4KiB", "1MiB", "256MiB", "1GiB"]


def test_dispatch_overhead_rows_carry_the_new_label(monkeypatch, tmp_path):
    """A run given an old spelling writes the new label in its rows (measure_size stubbed: no timing)."""
    seen = []

    def fake_measure(label: str, nbytes: int, page_size: int, device: str) -> list[dict]:
        seen.append((label, nbytes))
        return [{"size": label, "bytes": nbytes, "op": "sum", "pass": True, "device_ok": True, "wall_ok": True}]

    monkeypatch.setattr(bench_dispatch_overhead, "measure_size", fake_measure)
    monkeypatch.setattr(bench_dispatch_overhead, "print_table", lambda rows, columns: None)
    out = tmp_path / "dispatch.json"
    assert bench_dispatch_overhead.main(["--device", "cpu", "--sizes", "4KB,1MB", "--out", str(out)]) == 0
    assert seen == [("4KiB", 4096), ("1MiB", 2**20)]
    results = json.loads(out.read_text())
    assert [row["size"] for row in results["rows"]] == ["4KiB", "1MiB"] and "1 MiB" in results["target"]


def test_runs_lists_exit_2_naming_the_value(capsys):
    """``--runs`` (``name_list(..., at_least_one=True)``): the names given, in order; an unknown name,
    or none at all, ends the program with argparse's message naming ``--runs`` and the value."""
    import argparse

    from benchmarks.common import name_list

    parser = argparse.ArgumentParser(prog="bench_x.py")
    parser.add_argument("--runs", type=name_list(("a", "b", "c"), at_least_one=True), default="a,b,c")
    assert parser.parse_args(["--runs", "b,a"]).runs == ["b", "a"] and parser.parse_args([]).runs == ["a", "b", "c"]
    for bad, named in (("a,zz", "'zz'"), (",", "','")):
        with pytest.raises(SystemExit) as exited:
            parser.parse_args(["--runs", bad])
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert "bench_x.py: error: argument --runs" in err and named in err
