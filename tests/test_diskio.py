"""The disk I/O engine (pagedtensor.tiers.diskio, csrc/diskio.c): batches, fallbacks, CRC32C."""

from __future__ import annotations

import errno
import os
import random
import threading
import time
import zlib

import pytest
import torch

from pagedtensor.tiers import diskio
from pagedtensor.tiers.diskio import OP_READ, OP_WRITE, IoRequest
from tests.support import run_in_threads

LIB = diskio.load_library()
URING_REASON = diskio.uring_unavailable_reason()
needs_lib = pytest.mark.skipif(LIB is None, reason="C extension pagedtensor._diskio is not built")
ENGINES = [
    "threads",
    pytest.param("io_uring", marks=pytest.mark.skipif(URING_REASON is not None, reason=f"io_uring: {URING_REASON}")),
]


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        crc = n
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


TABLE = _crc32c_table()


def crc32c_reference(data: bytes, value: int = 0) -> int:
    """Bytewise CRC32C (Castagnoli), chained like zlib.crc32."""
    crc = value ^ 0xFFFFFFFF
    for byte in data:
        crc = TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def aligned_bytes(nbytes: int) -> torch.Tensor:
    base = torch.empty(nbytes + 4096, dtype=torch.uint8)
    offset = (-base.data_ptr()) % 4096
    return base[offset : offset + nbytes]


@needs_lib
def test_crc32c_known_vector() -> None:
    assert diskio.crc32c(b"123456789") == 0xE3069283
    assert crc32c_reference(b"123456789") == 0xE3069283
    assert diskio.crc32c(b"") == 0


@needs_lib
def test_crc32c_matches_reference_on_odd_lengths_and_alignments() -> None:
    rng = random.Random(1234)
    for length in [1, 3, 7, 8, 9, 15, 31, 33, 63, 255, 1001, 4097]:
        data = bytearray(rng.randbytes(length + 8))
        for start in (0, 1, 3, 5):  # odd buffer alignments exercise the head loops
            chunk = bytes(data[start : start + length])
            expected = crc32c_reference(chunk)
            address = (diskio.ctypes.c_char * len(data)).from_buffer(data)
            pointer = diskio.ctypes.addressof(address) + start
            assert diskio.crc32c(chunk) == expected, (length, start)
            assert LIB.pt_crc32c(0, pointer, length) == expected, (length, start)
            assert LIB.pt_crc32c_software(0, pointer, length) == expected, (length, start)
    # chaining: crc(a + b) == crc(b, crc(a))
    a, b = rng.randbytes(101), rng.randbytes(77)
    assert diskio.crc32c(b, diskio.crc32c(a)) == crc32c_reference(a + b)
    assert diskio.crc32c(bytearray(a)) == crc32c_reference(a)  # writable buffer path


@needs_lib
def test_checksum_function_is_crc32c_with_the_library() -> None:
    name, checksum = diskio.checksum_function()
    page = torch.randint(0, 256, (4099,), dtype=torch.uint8)
    assert name == "crc32c"
    assert checksum(page.data_ptr(), page.numel()) == crc32c_reference(bytes(page.tolist()))


def test_checksum_function_falls_back_to_zlib(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(diskio, "load_library", lambda: None)
    name, checksum = diskio.checksum_function()
    page = torch.randint(0, 256, (999,), dtype=torch.uint8)
    assert name == "crc32"
    assert checksum(page.data_ptr(), page.numel()) == zlib.crc32(bytes(page.tolist()))


@pytest.mark.parametrize("engine_name", ENGINES)
def test_batch_larger_than_depth_round_trips(tmp_path, engine_name: str) -> None:
    engine = diskio.open_engine(engine_name, depth=4)
    assert engine.name == engine_name
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        count, size = 50, 4096
        sources = [torch.randint(0, 256, (size,), dtype=torch.uint8) for _ in range(count)]
        writes = [IoRequest(OP_WRITE, fd, t.data_ptr(), size, i * size) for i, t in enumerate(sources)]
        assert engine.submit(writes) == [size] * count
        targets = [torch.empty(size, dtype=torch.uint8) for _ in range(count)]
        reads = [IoRequest(OP_READ, fd, t.data_ptr(), size, i * size) for i, t in enumerate(targets)]
        assert engine.submit(reads) == [size] * count
        for source, target in zip(sources, targets):
            assert torch.equal(source, target)
        assert engine.submit([]) == []
    finally:
        engine.close()
        engine.close()
        os.close(fd)


@pytest.mark.parametrize("engine_name", ENGINES)
def test_short_read_at_end_of_file_and_errors(tmp_path, engine_name: str) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 10000)
    engine = diskio.open_engine(engine_name, depth=2)
    fd = os.open(path, os.O_RDONLY)
    try:
        target = torch.zeros(16384, dtype=torch.uint8)
        results = engine.submit(
            [
                IoRequest(OP_READ, fd, target.data_ptr(), 16384, 0),  # stops at end of file
                IoRequest(OP_READ, fd, target.data_ptr(), 100, 20000),  # starts past it
                IoRequest(OP_READ, -1, target.data_ptr(), 100, 0),  # bad fd
                IoRequest(OP_WRITE, fd, target.data_ptr(), 100, 0),  # read-only fd
            ]
        )
        assert results == [10000, 0, -errno.EBADF, -errno.EBADF]
        assert int(target[:10000].eq(ord("x")).sum()) == 10000
    finally:
        engine.close()
        os.close(fd)


@pytest.mark.parametrize("engine_name", ENGINES)
def test_engine_is_thread_safe(tmp_path, engine_name: str) -> None:
    engine = diskio.open_engine(engine_name, depth=8)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)

    def worker(index: int) -> None:
        size, count = 4096, 16
        base = index * count * size
        sources = [torch.full((size,), index * 16 + i, dtype=torch.uint8) for i in range(count)]
        writes = [IoRequest(OP_WRITE, fd, t.data_ptr(), size, base + i * size) for i, t in enumerate(sources)]
        assert engine.submit(writes) == [size] * count
        targets = [torch.empty(size, dtype=torch.uint8) for _ in range(count)]
        reads = [IoRequest(OP_READ, fd, t.data_ptr(), size, base + i * size) for i, t in enumerate(targets)]
        assert engine.submit(reads) == [size] * count
        assert all(torch.equal(s, t) for s, t in zip(sources, targets))

    errors = run_in_threads(worker, 6)
    engine.close()
    os.close(fd)
    assert not errors, errors


@pytest.mark.skipif(URING_REASON is not None, reason=f"io_uring: {URING_REASON}")
def test_uring_with_o_direct(tmp_path) -> None:
    engine = diskio.open_engine("io_uring", depth=4)
    try:
        fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError as exc:
        engine.close()
        pytest.skip(f"O_DIRECT refused here: {exc}")
    try:
        source = aligned_bytes(3 * 4096)
        source.copy_(torch.randint(0, 256, (3 * 4096,), dtype=torch.uint8))
        assert engine.submit([IoRequest(OP_WRITE, fd, source.data_ptr(), source.numel(), 8192)]) == [3 * 4096]
        target = aligned_bytes(3 * 4096)
        assert engine.submit([IoRequest(OP_READ, fd, target.data_ptr(), target.numel(), 8192)]) == [3 * 4096]
        assert torch.equal(source, target)
        misaligned = IoRequest(OP_READ, fd, target.data_ptr() + 1, 4096, 8192)
        assert engine.submit([misaligned]) == [-errno.EINVAL]
    finally:
        engine.close()
        os.close(fd)


def test_open_engine_names(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="'spdk'"):
        diskio.open_engine("spdk")
    with pytest.raises(ValueError, match="depth"):
        diskio.ThreadPoolEngine(0)
    monkeypatch.setattr(diskio, "uring_unavailable_reason", lambda: "io_uring setup failed: refused by test")
    with pytest.raises(RuntimeError, match="refused by test"):
        diskio.open_engine("io_uring")
    engine = diskio.open_engine("auto")
    assert engine.name == "threads"
    engine.close()


def test_closed_engine_refuses_work() -> None:
    engine = diskio.open_engine("threads", depth=2)
    engine.close()
    with pytest.raises(ValueError, match="closed"):
        engine.submit([IoRequest(OP_READ, 0, 0, 0, 0)])


@pytest.mark.skipif(URING_REASON is not None, reason=f"io_uring: {URING_REASON}")
def test_uring_resubmits_short_reads() -> None:
    """A pipe returns what has arrived so far: each short read must be resubmitted for the rest."""
    engine = diskio.open_engine("io_uring", depth=2)
    read_end, write_end = os.pipe()

    def feed() -> None:
        for chunk in range(3):
            time.sleep(0.02)
            os.write(write_end, bytes([chunk + 1]) * 100)

    feeder = threading.Thread(target=feed)
    feeder.start()
    try:
        target = torch.zeros(300, dtype=torch.uint8)
        assert engine.submit([IoRequest(OP_READ, read_end, target.data_ptr(), 300, 0)]) == [300]
        assert target[::100].tolist() == [1, 2, 3] and int(target.sum()) == 600
    finally:
        feeder.join()
        engine.close()
        os.close(read_end)
        os.close(write_end)


@needs_lib
def test_ring_create_reports_errno() -> None:
    err = diskio.ctypes.c_int(0)
    for depth in (0, 5000):
        assert not LIB.pt_ring_create(depth, diskio.ctypes.byref(err))
        assert err.value == -errno.EINVAL
    with pytest.raises(ValueError, match="depth"):
        diskio.UringEngine(0)


class _Interrupted(BaseException):
    """What the test's SIGINT handler raises (not KeyboardInterrupt, which would stop pytest)."""


def test_thread_pool_returns_from_an_interrupted_batch_only_when_no_worker_is_left(monkeypatch) -> None:
    """The caller frees or reuses a batch's buffers as soon as ``submit`` raises: requests already
    running must have finished by then, and those not started must never run."""
    import signal

    started, finished = [], []

    def slow_transfer(request: IoRequest) -> int:
        started.append(request.offset)
        time.sleep(0.3)
        finished.append(request.offset)
        return request.length

    monkeypatch.setattr(diskio, "_transfer", slow_transfer)

    def interrupt(signum, frame):
        raise _Interrupted()

    previous = signal.signal(signal.SIGINT, interrupt)
    engine = diskio.ThreadPoolEngine(depth=2)
    try:
        timer = threading.Timer(0.1, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT))
        timer.start()
        with pytest.raises(_Interrupted):
            engine.submit([IoRequest(OP_READ, 0, 0, 1, offset) for offset in range(8)])  # 4 rounds of 0.3 s
        timer.join()
        assert started and sorted(started) == sorted(finished), "submit returned while workers still ran"
        count = len(finished)
        time.sleep(0.5)
        assert len(finished) == count < 8, "requests of the abandoned batch ran after submit returned"
    finally:
        signal.signal(signal.SIGINT, previous)
        engine.close()


@pytest.mark.parametrize("engine_name", ENGINES)
def test_engines_refuse_a_bad_request(engine_name: str) -> None:
    engine = diskio.open_engine(engine_name, depth=4)
    buffer = torch.zeros(16, dtype=torch.uint8)
    try:
        for bad in (IoRequest(7, 0, buffer.data_ptr(), 16, 0), IoRequest(OP_READ, 0, buffer.data_ptr(), 16, -1),
                    # past the C request's fields: io_uring's would wrap them (offset 2**64 as 0, fd
                    # 2**32 + n as fd n: a write to another file), the threads' raise OverflowError
                    IoRequest(OP_WRITE, 0, buffer.data_ptr(), 16, 2**64), IoRequest(OP_WRITE, 2**32, buffer.data_ptr(), 16, 0),
                    IoRequest(OP_WRITE, 0, buffer.data_ptr(), 2**64 + 10, 0), IoRequest(OP_WRITE, 0, 2**64, 16, 0),
                    IoRequest(OP_WRITE, -(2**31) - 1, buffer.data_ptr(), 16, 0)):  # fmt: skip
            with pytest.raises(ValueError, match="I/O request 0: expected op 0 \\(read\\) or 1 \\(write\\)"):
                engine.submit([bad])
    finally:
        engine.close()


@pytest.mark.skipif(URING_REASON is not None, reason=f"io_uring: {URING_REASON}")
def test_uring_engine_collected_without_close_gives_its_ring_back() -> None:
    import gc

    before = len(os.listdir("/proc/self/fd"))
    for _ in range(50):
        diskio.UringEngine(depth=4)  # dropped at once
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) <= before + 2, "io_uring descriptors leaked"
