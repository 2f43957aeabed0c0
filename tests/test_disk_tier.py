"""DiskTier: page slots in a file, batched I/O, compression, checksums, capacity, lifetime."""

from __future__ import annotations

import errno
import gc
import logging
import os
import signal
import subprocess
import sys
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagedtensor.errors import OutOfPagesError, PageCorruptionError
from pagedtensor.tiers import disk, diskio
from pagedtensor.tiers.disk import DiskTier
from tests.support import run_in_threads

try:
    import zstandard  # noqa: F401

    HAVE_ZSTD = True
except ImportError:
    HAVE_ZSTD = False

URING_REASON = diskio.uring_unavailable_reason()
ENGINES = [
    "threads",
    pytest.param("io_uring", marks=pytest.mark.skipif(URING_REASON is not None, reason=f"io_uring: {URING_REASON}")),
]
COMPRESSIONS = [
    None,
    pytest.param("zstd", marks=pytest.mark.skipif(not HAVE_ZSTD, reason="zstandard is not installed")),
]
PAGE = 16384


def aligned_page(nbytes: int = PAGE) -> torch.Tensor:
    base = torch.empty(nbytes + 4096, dtype=torch.uint8)
    offset = (-base.data_ptr()) % 4096
    return base[offset : offset + nbytes]


def unaligned_page(nbytes: int = PAGE) -> torch.Tensor:
    base = torch.empty(nbytes + 4096 + 64, dtype=torch.uint8)
    offset = (-base.data_ptr()) % 4096 + 64
    page = base[offset : offset + nbytes]
    assert page.data_ptr() % 4096 != 0
    return page


def random_page(generator: torch.Generator, aligned: bool, compressible: bool) -> torch.Tensor:
    page = aligned_page() if aligned else unaligned_page()
    if compressible:  # a few random runs in zeros: zstd shrinks it well below the page
        page.zero_()
        page[:1000] = torch.randint(0, 256, (1000,), dtype=torch.uint8, generator=generator)
    else:
        page.copy_(torch.randint(0, 256, (PAGE,), dtype=torch.uint8, generator=generator))
    return page


@pytest.fixture
def make_tier(tmp_path):
    tiers: list[DiskTier] = []

    def make(**kwargs) -> DiskTier:
        kwargs.setdefault("path", str(tmp_path / "pages"))
        kwargs.setdefault("page_size", PAGE)
        kwargs.setdefault("capacity_pages", None)
        tier = DiskTier(**kwargs)
        tiers.append(tier)
        return tier

    yield make
    for tier in tiers:
        tier.close()


def flip_byte(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        value = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([value ^ 0x5A]))


# ---- round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("engine", ENGINES)
def test_round_trip_batch_larger_than_queue(make_tier, monkeypatch, engine, compression, aligned) -> None:
    monkeypatch.setattr(disk, "QUEUE_DEPTH", 4)
    tier = make_tier(engine=engine, compression=compression)
    assert tier.engine_name == engine
    generator = torch.Generator().manual_seed(7)
    pages = [random_page(generator, aligned, compressible=i % 2 == 0) for i in range(20)]
    slots = [tier.allocate_slot() for _ in pages]
    assert slots == list(range(20))
    written = tier.write_pages(list(zip(slots, pages)))
    targets = [aligned_page() if aligned else unaligned_page() for _ in pages]
    read = tier.read_pages(list(zip(slots, targets)))
    for page, target in zip(pages, targets):
        assert torch.equal(page, target)
    assert written == read
    if compression is None:
        assert written == 20 * PAGE
    else:  # compressible pages shrink to a few blocks, random ones are stored raw
        assert 10 * PAGE < written < 20 * PAGE
        assert written % 4096 == 0


@pytest.mark.parametrize("engine", ENGINES)
def test_slot_reuse_after_free(make_tier, engine) -> None:
    tier = make_tier(engine=engine, capacity_pages=4)
    generator = torch.Generator().manual_seed(1)
    slots = [tier.allocate_slot() for _ in range(4)]
    pages = [random_page(generator, True, False) for _ in slots]
    tier.write_pages(list(zip(slots, pages)))
    tier.free_slot(2)
    tier.free_slot(1)
    assert tier.used_pages == 2
    assert tier.allocate_slot() == 1  # lowest free first
    assert tier.allocate_slot() == 2
    with pytest.raises(ValueError, match="slot 1 .* holds no page"):
        tier.read_pages([(1, aligned_page())])
    fresh = random_page(generator, True, True)
    tier.write_pages([(2, fresh)])
    out = [aligned_page() for _ in range(3)]
    tier.read_pages([(0, out[0]), (2, out[1]), (3, out[2])])
    assert torch.equal(out[0], pages[0])
    assert torch.equal(out[1], fresh)
    assert torch.equal(out[2], pages[3])


def test_any_dtype_with_page_size_bytes(make_tier) -> None:
    tier = make_tier()
    page = torch.randn(PAGE // 4)
    slot = tier.allocate_slot()
    tier.write_pages([(slot, page)])
    out = torch.empty(PAGE // 2, dtype=torch.float16)
    tier.read_pages([(slot, out)])
    assert torch.equal(out.view(torch.float32), page)


def test_conjugate_and_negative_views_are_refused_by_name(make_tier) -> None:
    """A page given as a conjugate or negative view holds other values in memory than it reads: an
    aligned one was stored unconjugated (read back as its conjugate), an unaligned one failed in the
    bounce buffer's copy with torch's unrelated error."""
    tier = make_tier()
    slot = tier.allocate_slot()
    page = torch.randn(PAGE // 8, dtype=torch.complex64)
    for view in (page.conj(), torch.view_as_real(page).neg().view(torch.complex64)._neg_view()):
        with pytest.raises(ValueError, match=f"write_pages: slot {slot}: tensor is a conjugate or negative view"):
            tier.write_pages([(slot, view)])
    tier.write_pages([(slot, page)])
    with pytest.raises(ValueError, match=f"read_pages: slot {slot}: tensor is a conjugate or negative view"):
        tier.read_pages([(slot, torch.empty_like(page).conj())])
    out = torch.empty_like(page)
    tier.read_pages([(slot, out)])
    assert torch.equal(out, page)


def test_buffered_io_when_o_direct_is_missing(make_tier, monkeypatch) -> None:
    monkeypatch.delattr(os, "O_DIRECT", raising=False)
    tier = make_tier()
    assert not tier.direct_io
    page = unaligned_page()
    page.copy_(torch.randint(0, 256, (PAGE,), dtype=torch.uint8))
    slot = tier.allocate_slot()
    tier.write_pages([(slot, page)])
    out = unaligned_page()
    tier.read_pages([(slot, out)])
    assert torch.equal(page, out)


@pytest.mark.parametrize("o_direct", [True, False])
def test_a_folder_that_keeps_the_page_files_name_leaves_no_open_file(tmp_path, monkeypatch, o_direct) -> None:
    """A folder that lets files be made but not deleted (append-only): the page file's name could
    not be removed, and its fd stayed open for the process's life, one more each try. The error
    says what failed (not "cannot create"), and no fd is left open."""
    if not o_direct:
        monkeypatch.delattr(os, "O_DIRECT", raising=False)
    folder = tmp_path / "pages"
    folder.mkdir()
    unlink = os.unlink

    def refuse_in_folder(path, *args, **kwargs):
        if os.path.dirname(str(path)) == str(folder):
            raise PermissionError(errno.EPERM, "Operation not permitted", str(path))
        return unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", refuse_in_folder)
    fds = set(os.listdir("/proc/self/fd"))
    for _ in range(2):
        with pytest.raises(PermissionError, match=r"^\[Errno 1\] nvme_path: the disk tier's page file was made in '.*' \(pagedllm-.*\.pages, empty: it stays\), but its name cannot be removed"):
            DiskTier(path=str(folder), page_size=PAGE, capacity_pages=None)
    gc.collect()
    assert set(os.listdir("/proc/self/fd")) <= fds, "the page file's fd stayed open"
    assert all(entry.stat().st_size == 0 for entry in folder.iterdir())


@pytest.mark.parametrize("swap", ["symlink", "another file"])
def test_a_page_file_name_swapped_before_the_reopen_is_refused_and_its_target_untouched(tmp_path, monkeypatch, swap) -> None:
    """The page file is made by mkstemp and opened again by name for O_DIRECT. Whoever may rename
    entries in the folder could swap the name meanwhile: for a link to another file, the pager wrote a
    block into the link's target, truncated it to 0 bytes and kept its pages there. Now a link is not
    followed and a file other than mkstemp's is refused, naming the folder's problem; the target keeps
    its bytes and no fd stays open. (Where the file system refuses O_DIRECT, the reopen of another
    regular file fails on O_DIRECT and the tier keeps mkstemp's fd: it then works and the other file
    is untouched too.)"""
    victim = tmp_path / "victim.txt"
    victim.write_text("important data\n" * 1000)
    folder = tmp_path / "pages"
    folder.mkdir()
    mkstemp = tempfile.mkstemp

    def swapped_mkstemp(*args, **kwargs):
        fd, path = mkstemp(*args, **kwargs)
        os.unlink(path)
        if swap == "symlink":
            os.symlink(victim, path)
        else:
            os.link(victim, path)
        return fd, path

    fds = set(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(disk.tempfile, "mkstemp", swapped_mkstemp)
    try:
        tier = DiskTier(path=str(folder), page_size=PAGE, capacity_pages=None)
    except FileExistsError as error:
        assert "was replaced by another file before the pager opened it again" in str(error)
        assert str(folder) in str(error)
    else:
        assert swap == "another file" and not tier.direct_io, "a swapped page file was used"
        tier.close()
    monkeypatch.undo()
    gc.collect()
    assert victim.read_text() == "important data\n" * 1000
    assert set(os.listdir("/proc/self/fd")) <= fds, "the page file's fds stayed open"


def test_a_ctrl_c_in_the_o_direct_probe_leaves_no_open_file(tmp_path, monkeypatch) -> None:
    """A KeyboardInterrupt in the one aligned write that proves O_DIRECT left both of the page file's
    fds open (only an OSError closed them)."""
    probe = DiskTier(path=str(tmp_path / "probe"), page_size=PAGE, capacity_pages=None)
    direct = probe.direct_io
    probe.close()
    if not direct:
        pytest.skip("this file system refuses O_DIRECT: the probe write is never made")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    fds = set(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(os, "pwrite", interrupted)
    with pytest.raises(KeyboardInterrupt):
        DiskTier(path=str(tmp_path / "pages"), page_size=PAGE, capacity_pages=None)
    monkeypatch.undo()
    gc.collect()
    assert set(os.listdir("/proc/self/fd")) <= fds, "the page file's fds stayed open"
    assert list((tmp_path / "pages").iterdir()) == []


def test_works_without_the_c_extension(make_tier, monkeypatch) -> None:
    monkeypatch.setattr(diskio, "load_library", lambda: None)
    monkeypatch.setattr(diskio, "uring_unavailable_reason", lambda: "the C extension is not built")
    tier = make_tier()
    assert tier.engine_name == "threads"
    assert tier.checksum_name == "crc32"
    page = torch.randint(0, 256, (PAGE,), dtype=torch.uint8)
    slot = tier.allocate_slot()
    tier.write_pages([(slot, page)])
    flip_byte(tier.fd_path, 5)
    with pytest.raises(PageCorruptionError, match="crc32 expected"):
        tier.read_pages([(slot, torch.empty(PAGE, dtype=torch.uint8))])


def test_concurrent_batches_from_threads(make_tier) -> None:
    tier = make_tier()

    def worker(seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        for _ in range(3):
            slots = [tier.allocate_slot() for _ in range(4)]
            pages = [random_page(generator, seed % 2 == 0, False) for _ in slots]
            tier.write_pages(list(zip(slots, pages)))
            out = [aligned_page() for _ in slots]
            tier.read_pages(list(zip(slots, out)))
            assert all(torch.equal(p, o) for p, o in zip(pages, out))
            for slot in slots:
                tier.free_slot(slot)

    errors = run_in_threads(worker, 4)
    assert not errors, errors
    assert tier.used_pages == 0


def test_logs_engine_choice(make_tier, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="pagedtensor.tiers.disk"):
        tier = make_tier()
    assert f"engine {tier.engine_name}" in caplog.text


# ---- corruption ----------------------------------------------------------------------------------


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("engine", ENGINES)
def test_flipped_byte_raises(make_tier, engine, compression) -> None:
    tier = make_tier(engine=engine, compression=compression)
    generator = torch.Generator().manual_seed(3)
    pages = [random_page(generator, True, compressible=True) for _ in range(3)]
    slots = [tier.allocate_slot() for _ in pages]
    tier.write_pages(list(zip(slots, pages)))
    flip_byte(tier.fd_path, slots[1] * PAGE + 17)
    out = [aligned_page() for _ in pages]
    with pytest.raises(PageCorruptionError) as info:
        tier.read_pages(list(zip(slots, out)))
    message = str(info.value)
    assert f"slot {slots[1]}" in message and tier.file_path in message and "expected 0x" in message
    assert torch.equal(out[0], pages[0]) and torch.equal(out[2], pages[2])  # the good pages still arrive
    assert not torch.equal(out[1], pages[1])  # zeroed, never the page
    assert int(out[1].count_nonzero()) == 0


@pytest.mark.parametrize("engine", ENGINES)
def test_truncated_file_raises(make_tier, engine) -> None:
    tier = make_tier(engine=engine)
    generator = torch.Generator().manual_seed(4)
    pages = [random_page(generator, True, False) for _ in range(2)]
    slots = [tier.allocate_slot() for _ in pages]
    tier.write_pages(list(zip(slots, pages)))
    os.truncate(tier.fd_path, PAGE + 4096)
    with pytest.raises(PageCorruptionError, match=f"short read of slot {slots[1]}"):
        tier.read_pages([(slots[1], aligned_page())])
    out = aligned_page()
    tier.read_pages([(slots[0], out)])
    assert torch.equal(out, pages[0])


def test_unwritten_and_unallocated_slots_raise(make_tier) -> None:
    tier = make_tier()
    slot = tier.allocate_slot()
    with pytest.raises(ValueError, match=f"slot {slot} .* holds no page"):
        tier.read_pages([(slot, aligned_page())])
    with pytest.raises(ValueError, match="slot 5 .* not allocated"):
        tier.read_pages([(5, aligned_page())])
    with pytest.raises(ValueError, match="slot 5 .* not allocated"):
        tier.write_pages([(5, aligned_page())])
    with pytest.raises(ValueError, match="not allocated"):
        tier.free_slot(5)
    with pytest.raises(ValueError, match="twice"):
        tier.write_pages([(slot, aligned_page()), (slot, aligned_page())])
    with pytest.raises(ValueError, match="8192 bytes"):
        tier.write_pages([(slot, torch.zeros(8192, dtype=torch.uint8))])
    with pytest.raises(ValueError, match="contiguous"):
        tier.write_pages([(slot, torch.zeros(2 * PAGE, dtype=torch.uint8)[::2])])


def test_failed_write_forgets_the_page_and_raises(make_tier, monkeypatch) -> None:
    tier = make_tier()
    slots = [tier.allocate_slot() for _ in range(2)]
    pages = [torch.full((PAGE,), i, dtype=torch.uint8) for i in range(2)]
    tier.write_pages(list(zip(slots, pages)))
    monkeypatch.setattr(tier._engine, "submit", lambda requests: [PAGE, -errno.ENOSPC])
    with pytest.raises(OSError, match=rf"slot {slots[1]} .*No space left on device; its file system is full: .*disk_limit") as info:
        tier.write_pages(list(zip(slots, pages)))
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    out = aligned_page()
    tier.read_pages([(slots[0], out)])
    assert torch.equal(out, pages[0])
    with pytest.raises(ValueError, match="holds no page"):
        tier.read_pages([(slots[1], out)])


@pytest.mark.skipif(not HAVE_ZSTD, reason="zstandard is not installed")
@pytest.mark.parametrize("engine", ENGINES)
def test_a_freed_slot_counts_as_room_only_with_all_its_blocks(make_tier, engine) -> None:
    """A compressed page stores a block or a few, the rest of its slot a hole in the file. Freed,
    such a slot counted as room on a full file system (the pager's retry after ENOSPC takes the
    free slots below the one that failed), yet a raw page written there needs the missing blocks,
    and its few blocks stayed taken: on a full tmpfs, pages freed after holding compressed ones left
    no room for three raw pages, the file system holding four. A freed slot now gives its blocks
    back unless it holds them all, and only one that holds them all counts as room."""
    tier = make_tier(engine=engine, compression="zstd")
    slots = [tier.allocate_slot() for _ in range(4)]
    random = random_page(torch.Generator().manual_seed(0), aligned=True, compressible=False)
    tier.write_pages([(slot, aligned_page().zero_()) for slot in slots[:3]] + [(slots[3], random)])  # compressed, then raw
    assert [tier._pages[slot].stored_length for slot in slots] == 3 * [disk.BLOCK] + [PAGE]
    assert os.fstat(tier._fd).st_blocks * 512 == PAGE + 3 * disk.BLOCK
    for slot in slots:
        tier.free_slot(slot)
    assert os.fstat(tier._fd).st_blocks * 512 == PAGE  # the compressed pages' blocks went back
    assert tier.free_slots_below(4) == 1  # only the slot that holds all its blocks is room
    assert tier.allocate_slot() == slots[3]  # and it is handed out first, then the lowest of the others
    slot = tier.allocate_slot()
    assert slot == slots[0]
    tier.write_pages([(slot, random)])  # reused slots read back what was written
    out = aligned_page()
    tier.read_pages([(slot, out)])
    assert torch.equal(out, random)


def test_read_io_error_raises_oserror_and_zeroes(make_tier, monkeypatch) -> None:
    tier = make_tier()
    slot = tier.allocate_slot()
    tier.write_pages([(slot, torch.full((PAGE,), 9, dtype=torch.uint8))])
    monkeypatch.setattr(tier._engine, "submit", lambda requests: [-errno.EIO])
    out = torch.full((PAGE,), 9, dtype=torch.uint8)
    with pytest.raises(OSError, match=f"slot {slot}"):
        tier.read_pages([(slot, out)])
    assert int(out.count_nonzero()) == 0


# ---- capacity, arguments, lifetime ---------------------------------------------------------------


def test_capacity_limit(make_tier) -> None:
    tier = make_tier(capacity_pages=2)
    assert tier.has_free_slot()
    assert [tier.allocate_slot(), tier.allocate_slot()] == [0, 1]
    assert not tier.has_free_slot()
    assert tier.used_pages == 2
    with pytest.raises(OutOfPagesError, match="2 slots"):
        tier.allocate_slot()
    tier.free_slot(0)
    assert tier.has_free_slot()
    assert tier.allocate_slot() == 0
    empty = make_tier(capacity_pages=0)
    assert not empty.has_free_slot()
    unlimited = make_tier(capacity_pages=None)
    assert [unlimited.allocate_slot() for _ in range(100)] == list(range(100))
    assert unlimited.has_free_slot()


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"page_size": 5000}, "page_size.*5000"),
        ({"page_size": 2048}, "page_size.*2048"),
        ({"page_size": 0}, "page_size.*0"),
        ({"compression": "lz4"}, "compression.*'lz4'"),
        ({"engine": "spdk"}, "engine.*'spdk'"),
        ({"capacity_pages": -1}, "capacity_pages.*-1"),
        ({"path": ""}, "path"),
    ],
)
def test_bad_arguments_raise_value_error(tmp_path, kwargs, pattern) -> None:
    arguments = {"path": str(tmp_path), "page_size": PAGE, "capacity_pages": None, **kwargs}
    with pytest.raises(ValueError, match=pattern):
        DiskTier(**arguments)
    assert os.listdir(tmp_path) == []


def test_bad_argument_types_raise_type_error(tmp_path) -> None:
    with pytest.raises(TypeError, match="page_size"):
        DiskTier(str(tmp_path), 4096.0, None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="capacity_pages"):
        DiskTier(str(tmp_path), 4096, "10")  # type: ignore[arg-type]


def test_io_uring_requested_but_unavailable(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(diskio, "uring_unavailable_reason", lambda: "io_uring setup failed: Operation not permitted")
    with pytest.raises(RuntimeError, match='engine="io_uring" is unavailable: .*not permitted'):
        DiskTier(str(tmp_path), PAGE, None, engine="io_uring")
    tier = DiskTier(str(tmp_path), PAGE, None, engine="auto")
    assert tier.engine_name == "threads"
    tier.close()


def test_zstd_missing_names_the_setting(tmp_path, monkeypatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_zstd(name, *args, **kwargs):
        if name == "zstandard":
            raise ImportError("No module named 'zstandard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_zstd)
    with pytest.raises(ImportError, match='compression="zstd"'):
        DiskTier(str(tmp_path), PAGE, None, compression="zstd")


def _open_fds() -> set[str]:
    return {os.path.realpath(f"/proc/self/fd/{name}") for name in os.listdir("/proc/self/fd")}


def test_file_lifetime(tmp_path) -> None:
    """The page file has no name once open (the folder stays empty) and goes with its fd."""
    folder = tmp_path / "a" / "b"
    first = DiskTier(str(folder), PAGE, None)
    second = DiskTier(folder, PAGE, None)  # a PathLike works too
    assert first.file_path != second.file_path
    assert os.path.dirname(first.file_path) == str(folder)
    assert os.listdir(folder) == []
    slot = first.allocate_slot()
    first.write_pages([(slot, torch.full((PAGE,), 7, dtype=torch.uint8))])
    with open(first.fd_path, "rb") as handle:  # the file is still reachable through its fd
        assert handle.read(PAGE)[:4] and os.fstat(handle.fileno()).st_nlink == 0
    opened = {path for path in _open_fds() if path.startswith(str(folder))}  # other tests' pagers may be open
    assert len(opened) == 2, opened
    first.close()
    first.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        first.allocate_slot()
    del second
    gc.collect()
    assert not {path for path in _open_fds() if path.startswith(str(folder))}
    with DiskTier(str(folder), PAGE, None) as third:
        assert not third.closed
    assert third.closed and os.listdir(folder) == []


def test_a_process_ended_by_sigterm_leaves_no_page_file(tmp_path) -> None:
    """SIGTERM's default action runs no Python cleanup: the page file must not outlive the process."""
    script = (
        "import os, signal, torch\n"
        "from pagedtensor import MemoryConfig, Pager\n"
        f"pager = Pager(MemoryConfig(vram_limit={PAGE}, host_memory={PAGE}, page_size={PAGE}, nvme_path={str(tmp_path)!r}, "
        "device='cpu', prefetch_strategy='none'))\n"
        f"allocation = pager.allocate({4 * PAGE})\n"
        f"pager.write(allocation, torch.ones({4 * PAGE}, dtype=torch.uint8))\n"
        "assert pager.stats()['bytes_to_disk'] > 0\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGTERM, done.stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "held",
    [
        "tier",
        pytest.param("engine", marks=pytest.mark.skipif(URING_REASON is not None, reason=f"io_uring: {URING_REASON}")),
    ],
)
def test_a_child_forked_during_a_batch_closes_its_copy(tmp_path, held: str) -> None:
    """A fork while another thread is in a batch (the prefetch thread's disk reads hold the io_uring
    engine's lock for the whole batch; slot bookkeeping holds the tier's) gave the child that lock
    locked for good: its ``close`` (or the tier's collection, or interpreter exit) hung forever."""
    import threading
    import time

    tier = DiskTier(str(tmp_path), PAGE, None, engine="io_uring" if held == "engine" else "auto")
    slot = tier.allocate_slot()
    tier.write_pages([(slot, torch.full((PAGE,), 3, dtype=torch.uint8))])
    lock = tier._engine._lock if held == "engine" else tier._lock
    taken, done = threading.Event(), threading.Event()

    def in_a_batch() -> None:
        with lock:
            taken.set()
            done.wait(30)

    thread = threading.Thread(target=in_a_batch)
    thread.start()
    try:
        assert taken.wait(10)
        pid = os.fork()
        if pid == 0:  # the child: never return into pytest
            try:
                tier.free_slot(slot)  # its own bookkeeping only
                tier.close()
            finally:
                os._exit(0)
        deadline = time.monotonic() + 20
        while not os.waitpid(pid, os.WNOHANG)[0]:
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail(f"the forked child hung closing its copy of the tier (the {held} lock)")
            time.sleep(0.05)
    finally:
        done.set()
        thread.join()
    page = torch.empty(PAGE, dtype=torch.uint8)
    tier.read_pages([(slot, page)])  # the parent's slot and file are untouched
    assert torch.equal(page, torch.full((PAGE,), 3, dtype=torch.uint8))
    tier.close()


# ---- property test -------------------------------------------------------------------------------

LOGICAL_SLOTS = 4
operations = st.lists(
    st.one_of(
        st.tuples(
            st.just("write"),
            st.lists(st.integers(0, LOGICAL_SLOTS - 1), min_size=1, max_size=LOGICAL_SLOTS, unique=True),
            st.integers(0, 2**31),
        ),
        st.tuples(st.just("read"), st.lists(st.integers(0, LOGICAL_SLOTS - 1), min_size=1, max_size=4), st.just(0)),
        st.tuples(st.just("free"), st.lists(st.integers(0, LOGICAL_SLOTS - 1), min_size=1, max_size=1), st.just(0)),
    ),
    max_size=12,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=operations, compression=st.sampled_from([None, "zstd"] if HAVE_ZSTD else [None]), aligned=st.booleans())
def test_reads_return_last_write(ops, compression, aligned) -> None:
    page_size = 4096
    with tempfile.TemporaryDirectory() as folder, DiskTier(folder, page_size, LOGICAL_SLOTS, compression) as tier:
        slot_of: dict[int, int] = {}  # logical slot -> tier slot
        model: dict[int, bytes] = {}  # logical slot -> last bytes written
        make = aligned_page if aligned else unaligned_page
        for op, logical_slots, seed in ops:
            if op == "write":
                generator = torch.Generator().manual_seed(seed)
                items = []
                for index, logical in enumerate(logical_slots):
                    if logical not in slot_of:
                        slot_of[logical] = tier.allocate_slot()
                    page = make(page_size)
                    page.zero_()
                    length = (seed + index * 997) % (page_size + 1)  # short runs compress, long ones do not
                    page[:length] = torch.randint(0, 256, (length,), dtype=torch.uint8, generator=generator)
                    items.append((slot_of[logical], page))
                    model[logical] = bytes(page.tolist())
                tier.write_pages(items)
            elif op == "read":
                written = [logical for logical in logical_slots if logical in model]
                unwritten = [logical for logical in logical_slots if logical in slot_of and logical not in model]
                if unwritten:
                    with pytest.raises(ValueError, match="holds no page"):
                        tier.read_pages([(slot_of[unwritten[0]], make(page_size))])
                outs = [make(page_size) for _ in written]
                tier.read_pages([(slot_of[logical], out) for logical, out in zip(written, outs)])
                for logical, out in zip(written, outs):
                    assert bytes(out.tolist()) == model[logical]
            else:
                logical = logical_slots[0]
                if logical in slot_of:
                    tier.free_slot(slot_of.pop(logical))
                    model.pop(logical, None)
                else:
                    with pytest.raises(ValueError):
                        tier.free_slot(LOGICAL_SLOTS + logical)
            assert tier.used_pages == len(slot_of)


def test_a_frame_header_claiming_a_huge_page_is_corruption(tmp_path) -> None:
    """zstandard trusts a frame's declared size over max_output_size: a corrupt header (whose record
    checksum matches) must be PageCorruptionError, not a huge allocation."""
    pytest.importorskip("zstandard")
    import ctypes

    tier = DiskTier(str(tmp_path), PAGE, None, compression="zstd")
    try:
        slot = tier.allocate_slot()
        tier.write_pages([(slot, torch.zeros(PAGE, dtype=torch.uint8))])
        frame = b"\x28\xb5\x2f\xfd" + bytes([0xE0]) + (2**40).to_bytes(8, "little") + b"\x01\x00\x00"  # claims 1 TiB
        stored = bytearray(4096)
        stored[: len(frame)] = frame
        fd = os.open(tier.fd_path, os.O_RDWR)
        try:
            os.pwrite(fd, bytes(stored), slot * PAGE)
        finally:
            os.close(fd)
        checksum = tier._checksum(ctypes.addressof((ctypes.c_char * 4096).from_buffer(stored)), 4096)
        tier._pages[slot] = disk._PageRecord(4096, len(frame), checksum)
        with pytest.raises(PageCorruptionError, match="holds a frame of 1099511627776 bytes"):
            tier.read_pages([(slot, torch.empty(PAGE, dtype=torch.uint8))])
    finally:
        tier.close()
