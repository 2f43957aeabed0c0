"""MemoryConfig: size parsing (property tests) and one test per kind of bad input."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pagedtensor import MemoryConfig, format_size, parse_size
from pagedtensor.config import UNIT_BYTES

units = st.sampled_from(sorted(UNIT_BYTES))


@given(number=st.integers(0, 10**6), unit=units, spaces=st.sampled_from(["", " "]), upper=st.booleans())
def test_integer_sizes_parse_exactly(number, unit, spaces, upper):
    text = f"{number}{spaces}{unit.upper() if upper else unit}"
    assert parse_size(text) == number * UNIT_BYTES[unit]


@given(st.integers(0, 2**60))
def test_ints_and_bare_numbers_are_bytes(nbytes):
    assert parse_size(nbytes) == nbytes
    assert parse_size(str(nbytes)) == nbytes


@given(whole=st.integers(0, 10**6), unit=st.sampled_from(["KiB", "MiB", "GiB"]))
def test_exact_fractions_parse(whole, unit):
    assert parse_size(f"{whole}.5{unit}") == whole * UNIT_BYTES[unit.lower()] + UNIT_BYTES[unit.lower()] // 2


def test_format_size():
    assert format_size(3 * 2**30) == "3.00 GiB" and format_size(512) == "512 B" and format_size(1536) == "1.50 KiB"


@pytest.mark.parametrize(("nbytes", "text"), [(0, "0 B"), (1023, "1023 B"), (1024, "1.00 KiB"), (2**20 - 1, "1.00 MiB"),
                                              (2**20 - 6000, "1018.14 KiB"), (2**30 - 1, "1.00 GiB"), (2**40 - 1, "1.00 TiB"),
                                              (2**50, "1024.00 TiB")])  # fmt: skip
def test_format_size_picks_the_unit_after_rounding(nbytes, text):
    """A size just under a unit rounds up into it: 2**30 - 1 bytes printed as '1024.00 MiB'."""
    assert format_size(nbytes) == text


def test_decimal_and_binary_units_differ():
    assert parse_size("24GB") == 24 * 10**9
    assert parse_size("24GiB") == 24 * 2**30
    assert parse_size("512MB") == 512 * 10**6
    assert parse_size("4KiB") == 4096
    assert parse_size("1.5GiB") == 3 * 2**29


@pytest.mark.parametrize("value", ["-0", " -0KiB", "-0.0e5MiB", "-.0"])
def test_minus_zero_is_zero_not_negative(value):
    """As ``int("-0") == 0``: the CLI then says "expected a positive size", not "negative"."""
    assert parse_size(value) == 0


@pytest.mark.parametrize(
    "value, message",
    [("24XB", "unknown unit 'XB'"), ("-1GB", "negative"), ("-0.01KB", "negative"), ("--0", "cannot parse"), ("- 0", "cannot parse"), (-5, "negative"), ("lots", "cannot parse"), ("1.0000001KB", "whole number")],
)
def test_bad_sizes_name_field_and_value(value, message):
    with pytest.raises(ValueError, match=message) as error:
        parse_size(value, "vram_limit")
    assert "vram_limit" in str(error.value) and repr(value) in str(error.value)


@pytest.mark.parametrize("value", [1.5, None, True, [1]])
def test_size_of_wrong_type_is_type_error(value):
    with pytest.raises(TypeError, match="host_memory"):
        parse_size(value, "host_memory")


@pytest.mark.parametrize(
    "kwargs, field, value",
    [
        ({"vram_limit": 0}, "vram_limit", "0"),
        ({"host_memory": "0GB"}, "host_memory", "0"),
        ({"vram_limit": "-2GiB"}, "vram_limit", "-2GiB"),
        ({"vram_limit": "2GQ"}, "vram_limit", "2GQ"),
        ({"page_size": 3000}, "page_size", "3000"),
        ({"page_size": "2KiB"}, "page_size", "2048"),
        ({"page_size": 6 * 4096}, "page_size", "24576"),
        ({"eviction_policy": "mru"}, "eviction_policy", "mru"),
        ({"prefetch_strategy": "psychic"}, "prefetch_strategy", "psychic"),
        ({"compression": "lz4", "nvme_path": "/tmp"}, "compression", "lz4"),
        ({"compression": "zstd"}, "compression", "zstd"),
        ({"device": "tpu"}, "device", "tpu"),
        ({"vram_limit": 1024, "page_size": 4096}, "vram_limit", "1024"),
        ({"prefetch_pages": -1}, "prefetch_pages", "-1"),
        ({"pin_wait_s": -1}, "pin_wait_s", "-1"),
        ({"pin_wait_s": float("nan")}, "pin_wait_s", "nan"),
        ({"pin_wait_s": float("inf")}, "pin_wait_s", "inf"),
        ({"pin_wait_s": True}, "pin_wait_s", "True"),
        ({"pin_wait_s": "5s"}, "pin_wait_s", "5s"),
        ({"pin_wait_s": 10**400}, "pin_wait_s", str(10**400)[:20]),  # finite, but no float holds it
        ({"disk_limit": 0, "nvme_path": "/tmp"}, "disk_limit", "0"),
        ({"disk_limit": "1GiB"}, "disk_limit", "nvme_path is None"),  # accepted and ignored before
    ],
)
def test_bad_config_names_field_and_value(kwargs, field, value):
    with pytest.raises(ValueError) as error:
        MemoryConfig(**{"device": "cpu", **kwargs})
    assert field in str(error.value) and value in str(error.value)


def test_cuda_device_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="device: 'cuda'"):
        MemoryConfig(device="cuda")


def test_nvme_path_that_is_a_file(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(ValueError, match="nvme_path"):
        MemoryConfig(nvme_path=str(path), device="cpu")
    with pytest.raises(ValueError, match=r"nvme_path: cannot create '.*/file/sub/pages': '.*/file' is not a directory"):
        MemoryConfig(nvme_path=str(path / "sub" / "pages"), device="cpu")
    for trailing in ("/", "//"):  # passed: os.path.exists("file/") is False; Pager() then raised FileExistsError
        with pytest.raises(ValueError, match=r"nvme_path: '.*/file/+' exists and is not a directory"):
            MemoryConfig(nvme_path=str(path) + trailing, device="cpu")
    with pytest.raises(ValueError, match="nvme_path: expected a folder path .* got ''"):
        MemoryConfig(nvme_path="", device="cpu")


def test_normalized_values():
    config = MemoryConfig(vram_limit="24GiB", host_memory="64GB", page_size="2MiB", eviction_policy="2Q", device="cpu", slab_size="1GiB")
    assert (config.vram_limit, config.host_memory, config.page_size) == (24 * 2**30, 64 * 10**9, 2**21)
    assert config.eviction_policy == "2q" and config.device == torch.device("cpu")
    assert config.device_pages == 24 * 2**30 // 2**21
    assert config.slab_size % config.page_size == 0


@pytest.mark.parametrize("device", ["cpu:0", "cpu:3", torch.device("cpu", 1)])
def test_cpu_device_with_an_index_is_the_cpu_as_torch_makes_it(device):
    """torch drops a CPU device's index (``torch.zeros(1, device="cpu:0").device`` is ``cpu``), so a
    pager on ``cpu:0`` is on ``cpu``: its tensors' devices equal plain ones', and a model on the CPU
    pages (``model.to("cpu:0")`` leaves it on ``cpu``)."""
    config = MemoryConfig(device=device, vram_limit=4 * 4096, host_memory=16 * 4096, page_size=4096)
    assert config.device == torch.zeros(1, device=device).device == torch.device("cpu")
    assert str(config.device) == "cpu"


def test_default_device_is_cuda_when_available():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert MemoryConfig().device.type == expected


def test_sizes_parse_exactly_whatever_the_callers_decimal_context():
    import decimal

    with decimal.localcontext(decimal.Context(prec=6, traps=[decimal.Inexact])):
        assert parse_size("1.5GiB") == 3 * 2**29
        assert MemoryConfig(vram_limit="24GiB", page_size="2MiB", device="cpu").vram_limit == 24 * 2**30
    assert parse_size("1.000000000000000000000000000000KiB") == 1024  # more digits than decimal's default 28
    with pytest.raises(ValueError, match="whole number"):
        parse_size("1.0000000000000000000000000001KiB")


@pytest.mark.parametrize("value", ["1e1000000", "1e400", "12345678901234567890123456789", 2**63, "9" * 500])
def test_sizes_past_the_largest_name_field_and_value(value):
    with pytest.raises(ValueError, match="vram_limit") as error:
        parse_size(value, "vram_limit")
    assert "largest size" in str(error.value) or "too many digits" in str(error.value)


@pytest.mark.parametrize("text, expected", [(".5KiB", 512), ("0.25KiB", 256), ("2e3", 2000), ("1E1KB", 10000)])
def test_number_forms(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["5.", ".", "1..5", "1" * 5000 + "!"])
def test_malformed_numbers_are_refused(text):
    with pytest.raises(ValueError, match="cannot parse"):
        parse_size(text)


@pytest.mark.parametrize("value", ["1e-999999999999999999999", "1e-999999999999999999999KiB", "1e999999999999999999999GiB"])
def test_exponents_past_decimals_range_are_value_errors(value):
    """An exponent decimal cannot hold raised decimal.InvalidOperation, not a ValueError naming the field."""
    import decimal

    with pytest.raises(ValueError, match="page_size") as error:
        parse_size(value, "page_size")
    assert repr(value) in str(error.value)
    with decimal.localcontext(decimal.Context(traps=[])):  # whatever the caller's context traps
        with pytest.raises(ValueError, match="page_size"):
            parse_size(value, "page_size")
    with pytest.raises(ValueError, match="vram_limit"):
        MemoryConfig(vram_limit=value, device="cpu")


def test_nvme_path_expands_a_leading_tilde(tmp_path, monkeypatch):
    """``~/pages`` was kept as written: the pager made a folder named ``~`` in the working directory."""
    monkeypatch.setenv("HOME", str(tmp_path))
    assert MemoryConfig(nvme_path="~/pages", device="cpu").nvme_path == str(tmp_path / "pages")


@pytest.mark.skipif(not os.path.isdir("/proc/sys"), reason="needs Linux's /proc")
@pytest.mark.parametrize("folder", ["/proc", "/proc/sys/pagedllm"])
def test_a_disk_tier_folder_that_cannot_hold_files_names_nvme_path(folder):
    """A folder that passes the config's checks (a directory, or one to create under a directory)
    but refuses files: the pager's OSError names the setting and the folder (it named only a
    generated file name, or nothing)."""
    from pagedtensor import Pager

    config = MemoryConfig(vram_limit=4096, host_memory=4096, page_size=4096, nvme_path=folder, device="cpu")
    with pytest.raises(OSError, match=f"nvme_path: cannot create the disk tier's page file in '{folder}'"):
        Pager(config)


@pytest.mark.parametrize("under", ["", "sub"], ids=["the-link", "a-folder-under-it"])
def test_a_disk_tier_folder_through_a_dangling_link_names_the_link(tmp_path, under):
    """``os.makedirs`` says only "File exists" (or "No such file or directory") for a symbolic link
    whose target is gone: the pager's OSError names the link and its missing target."""
    from pagedtensor import Pager

    link = tmp_path / "link"
    link.symlink_to(tmp_path / "missing")
    folder = str(link / under) if under else str(link)
    config = MemoryConfig(vram_limit=4096, host_memory=4096, page_size=4096, nvme_path=folder, device="cpu")
    with pytest.raises(FileNotFoundError, match=f"'{link}' is a symbolic link to '{tmp_path / 'missing'}', which does not exist"):
        Pager(config)


def test_nvme_path_with_a_nul_byte_names_the_field():
    """Accepted before, then Pager(config) failed with "embedded null byte", naming no setting."""
    with pytest.raises(ValueError, match="nvme_path: .*NUL byte.*'/tmp/a\\\\x00b'"):
        MemoryConfig(nvme_path="/tmp/a\0b", device="cpu")


@pytest.mark.parametrize("value", [1.5, float("nan"), float("inf"), True, "1GB", None])
def test_format_size_of_a_non_int_is_a_type_error(value):
    with pytest.raises(TypeError, match="expected an int of bytes") as error:
        format_size(value)
    assert repr(value) in str(error.value)


def test_format_size_of_a_negative_size_is_a_value_error():
    with pytest.raises(ValueError, match="negative, got -5"):
        format_size(-5)


def test_numpy_integers_are_sizes_and_counts():
    """Integer-like values (numpy ints, as Pager.read accepts) work wherever an int does; bools do not."""
    np = pytest.importorskip("numpy")
    assert parse_size(np.int64(5)) == 5 and type(parse_size(np.int64(5))) is int
    assert format_size(np.int64(1536)) == "1.50 KiB" and format_size(np.uint16(512)) == "512 B" and format_size(0) == "0 B"
    config = MemoryConfig(vram_limit=np.int64(2**20), page_size=np.int32(4096), prefetch_pages=np.int64(2), device="cpu")
    assert (config.vram_limit, config.page_size, config.prefetch_pages) == (2**20, 4096, 2)
    assert type(config.vram_limit) is int and type(config.prefetch_pages) is int
    with pytest.raises(ValueError, match=r"prefetch_pages: .*-1"):
        MemoryConfig(prefetch_pages=np.int64(-1), device="cpu")
    with pytest.raises(ValueError, match="prefetch_pages"):
        MemoryConfig(prefetch_pages=True, device="cpu")
    config = MemoryConfig(pin_wait_s=np.float32(0.5), device="cpu")
    assert config.pin_wait_s == 0.5 and type(config.pin_wait_s) is float
    assert MemoryConfig(pin_wait_s=0, device="cpu").pin_wait_s == 0.0
    with pytest.raises(TypeError, match="vram_limit"):
        parse_size(np.bool_(True), "vram_limit")


@pytest.mark.parametrize("value", ["1" + " " * 100_000 + "!", "-1" + " " * 100_000 + "!", " " * 50_000 + "1" + " " * 50_000 + "x!"])
def test_a_long_run_of_spaces_before_a_bad_tail_is_refused_without_quadratic_backtracking(value):
    """The spaces between the number and the unit could be split between two ``\\s*`` in as many ways
    as there are spaces, each tried again: 100,000 spaces took minutes. The alarm (20 s, where the
    linear pattern takes milliseconds) turns such a backtrack into a failure, not a hang."""
    import signal

    def too_slow(signum, frame):
        raise AssertionError("parse_size backtracked quadratically over the spaces")

    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(20)
    try:
        with pytest.raises(ValueError, match="vram_limit"):
            parse_size(value, "vram_limit")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert parse_size(" 2 KiB ") == 2048 and parse_size("3 ") == 3 and parse_size("4kb") == 4000
