"""The README's main job: ``pagedllm demo`` pages a tensor through all three tiers and checks it."""

from __future__ import annotations

import errno
import io
import subprocess
import sys

import pytest

from pagedtensor.cli import main, run_demo


def test_demo_moves_bytes_through_every_tier_and_checks_them():
    out = io.StringIO()
    assert run_demo(size=4 * 2**20, vram_limit=2**19, host_memory=2**20, page_size=2**16, device="cpu", out=out)
    text = out.getvalue()
    assert "every byte came back" in text and "yes" in text
    for label in ("bytes host→device", "bytes device→host", "bytes host→disk", "bytes disk→host", "faults", "hits"):
        assert label in text


def test_cli_entry_point(capsys):
    assert main(SMALL_DEMO) == 0
    assert "every byte came back" in capsys.readouterr().out


HUGE = "4194304TiB"  # 2**62 bytes: a power of two that parses, and more memory than any machine has
HUGE_PAGES = ["--page-size", HUGE, "--vram-limit", HUGE, "--host-memory", HUGE]


def usage_error(argv: list[str], capsys) -> str:
    """What ``pagedllm <argv>`` writes to stderr, checked to be a usage error (exit status 2, no traceback)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


SMALL_DEMO = ["demo", "--size", "1MiB", "--vram-limit", "128KiB", "--host-memory", "256KiB", "--page-size", "16KiB", "--device", "cpu"]


@pytest.mark.parametrize(
    "argv, named",
    [
        (["demo", "--size", "banana"], ["--size", "'banana'"]),
        (["demo", "--size", "0"], ["--size", "positive", "'0'"]),
        (["demo", "--size", "-0"], ["--size", "positive", "'-0'"]),
        (["demo", "--page-size", "3KiB"], ["page_size", "power of two", "3072"]),
        (["demo", "--vram-limit", "1"], ["vram_limit", "smaller than one page"]),
        (["demo", "--host-memory=-5MiB"], ["--host-memory", "negative"]),
        (["demo", "--size", "-1GiB"], ["--size", "negative", "'-1GiB'"]),  # argparse took -1GiB for an option
        (["demo", "--vram-limit", "-.5MiB"], ["--vram-limit", "negative", "'-.5MiB'"]),
        (["ask", "--host-memory", "-512MiB"], ["--host-memory", "negative", "'-512MiB'"]),
        (["ask", "--max-new-tokens", "-1e3"], ["--max-new-tokens", "'-1e3'"]),
        (["demo", "--device", "tpu"], ["device", "'tpu'"]),
        (["ask", "--max-new-tokens", "0"], ["--max-new-tokens", "at least 1"]),
        (["ask", "--page-size", "3KiB"], ["page_size", "3072"]),
        (["ask", "--vram-limit", "1KiB"], ["vram_limit", "smaller than one page"]),
        (["ask", "--attn", "bogus"], ["--attn", "'bogus'"]),
        (["demo", "--size", "1e1000000"], ["--size", "'1e1000000'", "largest size"]),
        (["demo", "--vram-limit", "1e400"], ["--vram-limit", "'1e400'", "largest size"]),
        (["demo", "--size", "1e-999999999999999999999"], ["--size", "'1e-999999999999999999999'", "exponent out of range"]),
        (["demo", "--page-size", "1e999999999999999999999KiB"], ["--page-size", "'1e999999999999999999999KiB'"]),
        (["demo", *HUGE_PAGES], ["page_size: a page of 4194304.00 TiB is more than this machine's memory"]),
        (["ask", *HUGE_PAGES], ["page_size: a page of 4194304.00 TiB is more than this machine's memory"]),
    ],
)
def test_bad_arguments_are_usage_errors_naming_the_value(argv, named, capsys):
    """A bad value stops the command before any work (``ask`` loads no model) with argparse's usage
    error, exit status 2, and a message naming the option and the value, not a traceback."""
    err = usage_error(argv, capsys)
    assert f"pagedllm {argv[0]}: error:" in err
    for text in named:
        assert text in err, (text, err)


def test_demo_runs_and_ask_names_the_extra_without_transformers():
    """transformers comes with the ``hf`` extra only: ``demo`` and ``--help`` must not need it, and
    ``ask`` says what to install (it failed at start-up, ``--help`` included, with a traceback)."""
    script = (
        "import sys\n"
        "sys.modules['transformers'] = None  # as if not installed: importing it raises ImportError\n"
        "from pagedtensor.cli import main\n"
        "assert main(['demo', '--size', '256KiB', '--vram-limit', '64KiB', '--host-memory', '128KiB', "
        "'--page-size', '16KiB', '--device', 'cpu']) == 0\n"
        "main(['ask'])\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "every byte came back" in done.stdout, done.stderr
    assert done.returncode == 2, done.stderr
    assert "pagedllm ask: error: needs the hf extra (transformers" in done.stderr  # gguf may be missing too
    assert "not installed): pip install 'pagedllm[hf]'" in done.stderr
    assert "Traceback" not in done.stderr


def test_demo_compression_without_zstandard_is_a_usage_error(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "zstandard", None)  # as if not installed
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--compression", "zstd", "--device", "cpu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--compression zstd needs the zstandard package: pip install 'pagedllm[zstd]'" in err and "Traceback" not in err


@pytest.mark.parametrize("under", ["", "sub"], ids=["the-file", "a-folder-under-it"])
def test_demo_refuses_a_disk_folder_that_is_a_file(capsys, tmp_path, under):
    a_file = tmp_path / "not_a_folder"
    a_file.write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--nvme-path", str(a_file / under) if under else str(a_file), "--device", "cpu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "nvme_path" in err and "Traceback" not in err


def test_demo_states_the_tensor_against_the_device_budget():
    out = io.StringIO()
    assert run_demo(size=2**16, vram_limit=2**20, host_memory=2**20, page_size=2**14, device="cpu", out=out)
    assert "0.1x the device budget" in out.getvalue()


def test_demo_refuses_a_disk_folder_through_a_dangling_link_naming_it(capsys, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "gone")
    err = usage_error(["demo", "--nvme-path", str(link), "--device", "cpu"], capsys)
    assert f"nvme_path: cannot create the folder '{link}': '{link}' is a symbolic link to '{tmp_path / 'gone'}'" in err


@pytest.mark.skipif(not __import__("os").path.isdir("/sys/kernel"), reason="needs sysfs")
def test_demo_refuses_a_disk_folder_it_cannot_write(capsys):
    """An existing folder that refuses files (sysfs refuses even root) is a usage error too."""
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--nvme-path", "/sys/kernel", "--device", "cpu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "nvme_path: cannot create files in '/sys/kernel'" in err and "Traceback" not in err


def test_demo_size_beyond_the_machines_memory_is_a_usage_error(capsys):
    """100 TiB of demo data cannot be held in host memory: a usage error naming --size, not torch's
    "DefaultCPUAllocator: can't allocate memory" traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--size", "100TiB", "--device", "cpu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "pagedllm demo: error: argument --size: 100.00 TiB" in err and "memory" in err and "Traceback" not in err


def test_demo_data_that_cannot_be_allocated_is_a_usage_error(capsys, monkeypatch):
    """Memory that runs out after the check up front (other programs use it) is reported the same way."""
    import torch

    def randint(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1048576 bytes.")

    monkeypatch.setattr(torch, "randint", randint)
    err = usage_error(SMALL_DEMO, capsys)
    assert "pagedllm demo: error: argument --size: cannot allocate 1.00 MiB (1048576 bytes) of demo data" in err


def test_demo_slab_that_cannot_be_allocated_is_a_usage_error_naming_it(capsys, monkeypatch):
    """Pages that fit the machine, but a slab its allocator cannot give (memory in use elsewhere):
    a usage error naming the tier, the slab and the settings to lower, not torch's traceback."""
    import torch

    from pagedtensor.tiers.device import DeviceTier

    def out_of_memory(self, nbytes: int) -> torch.Tensor:
        raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {nbytes} bytes.")

    monkeypatch.setattr(DeviceTier, "_allocate", out_of_memory)
    err = usage_error(SMALL_DEMO, capsys)
    assert "pagedllm demo: error: device tier: cannot allocate a slab of 128.00 KiB (131072 bytes, 8 pages of 16.00 KiB" in err
    assert "CUDA out of memory" in err and "Lower slab_size, page_size or the tier's budget" in err



@pytest.mark.parametrize("given_folder", [True, False])
def test_demo_whose_disk_folder_is_full_is_a_usage_error_naming_it(capsys, monkeypatch, tmp_path, given_folder):
    """A file system under the disk tier too small for the pages the demo spills (ENOSPC from its
    writes, as on a full tmpfs): a usage error naming --nvme-path and what to change, not the
    pager's traceback (whose advice, MemoryConfig(disk_limit=...), the command line cannot follow)."""
    from pagedtensor.tiers.disk import DiskTier

    def full(self, items):
        raise OSError(errno.ENOSPC, "disk tier: writing slot 0 failed: No space left on device")

    monkeypatch.setattr(DiskTier, "write_pages", full)
    argv = SMALL_DEMO + (["--nvme-path", str(tmp_path)] if given_folder else [])
    err = usage_error(argv, capsys)
    folder = str(tmp_path) if given_folder else "(the demo's temporary folder)"
    assert "pagedllm demo: error: argument --nvme-path: the file system under " in err and folder in err
    assert "No space left on device" in err and "a smaller --size" in err


@pytest.mark.parametrize("given_folder", [True, False])
def test_ask_whose_disk_folder_is_full_is_a_usage_error_naming_it(capsys, monkeypatch, tmp_path, given_folder):
    """As for the demo: a full file system under ``ask``'s disk tier (ENOSPC while enable_paging pages
    the weights) raised the pager's traceback with exit status 1, the status of an answer that differs
    from the unpaged one (found by a helper's probe, on a 1 MiB tmpfs). A usage error names
    --nvme-path; another disk error is raised as it is."""
    import pagedtensor.ask

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "disk tier: writing slot 0 failed: No space left on device")

    monkeypatch.setattr(pagedtensor.ask, "run_ask", full)
    err = usage_error(["ask", *(["--nvme-path", str(tmp_path)] if given_folder else [])], capsys)
    folder = str(tmp_path) if given_folder else "(the ask's temporary folder)"
    assert "pagedllm ask: error: argument --nvme-path: the file system under " in err and folder in err
    assert "No space left on device" in err and "--vram-limit" in err

    def failing(*args, **kwargs):
        raise OSError(errno.EIO, "disk tier: writing slot 0 failed: Input/output error")

    monkeypatch.setattr(pagedtensor.ask, "run_ask", failing)
    with pytest.raises(OSError, match="Input/output error"):
        main(["ask"])

    def stdout_full(*args, **kwargs):  # the review found a full stdout blamed on --nvme-path
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pagedtensor.ask, "run_ask", stdout_full)
    with pytest.raises(OSError, match="No space left on device"):
        main(["ask"])


def test_demo_disk_errors_other_than_a_full_file_system_are_raised(monkeypatch):
    from pagedtensor.tiers.disk import DiskTier

    def failing(self, items):
        raise OSError(errno.EIO, "disk tier: writing slot 0 failed: Input/output error")

    monkeypatch.setattr(DiskTier, "write_pages", failing)
    with pytest.raises(OSError, match="Input/output error"):
        main(SMALL_DEMO)


def test_python_dash_m_pagedtensor_runs_the_command():
    """``python -m pagedtensor demo ...`` is ``pagedllm demo ...`` (it said "'pagedtensor' is a package
    and cannot be directly executed"); a usage error exits 2 there too."""
    done = subprocess.run([sys.executable, "-m", "pagedtensor", *SMALL_DEMO], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "every byte came back" in done.stdout
    wrong = subprocess.run([sys.executable, "-m", "pagedtensor", "demo", "--size", "12 parsecs"], capture_output=True, text=True, timeout=300)
    assert wrong.returncode == 2 and "pagedllm demo: error: argument --size" in wrong.stderr and "Traceback" not in wrong.stderr


def test_print_rows_aligns_names_and_prints_nothing_for_no_rows():
    from pagedtensor.report import print_rows

    out = io.StringIO()
    print_rows([], out)  # raised "max() arg is an empty sequence"
    assert out.getvalue() == ""
    print_rows([("faults", 3, "pages"), ("evictions", 12, "")], out)
    assert out.getvalue().splitlines() == ["  faults                  3  pages", "  evictions              12"]


def test_a_reader_that_goes_away_ends_the_command_quietly():
    """``pagedllm demo | head -1``: the demo's output to a closed pipe ended in a BrokenPipeError traceback."""
    command = [sys.executable, "-m", "pagedtensor", *SMALL_DEMO]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # the reader goes before anything is written
    _, err = process.communicate(timeout=300)
    assert process.returncode == 1, err.decode()
    assert b"Traceback" not in err and b"BrokenPipeError" not in err, err.decode()
