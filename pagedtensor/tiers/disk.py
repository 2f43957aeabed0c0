"""DiskTier: page slots in one file under ``nvme_path``, moved in batches through the I/O engine.

Slot ``s`` is the byte range ``[s * page_size, (s + 1) * page_size)`` of the page file. Free slots
are handed out lowest first. The file is opened with ``O_DIRECT`` where the file system allows it
(so pages do not also fill the kernel page cache), buffered otherwise; either way every transfer
starts on a 4096-byte boundary in the file and in memory and moves a multiple of 4096 bytes, and a
tensor that is not 4096-aligned goes through an aligned bounce buffer.

Each batch of ``write_pages``/``read_pages`` is handed to the engine at once (io_uring with up to
``QUEUE_DEPTH`` requests in flight, or a thread pool): see :mod:`pagedtensor.tiers.diskio`.

Per page, in memory: the stored length, the compressed length (0 when stored raw) and a checksum.
The checksum covers the bytes as stored in the file (the whole stored length, padding included), so
a read checks it before anything is decompressed or copied out; a mismatch, a short read or an I/O
error raises, and the destination of that page is zeroed rather than left holding wrong bytes.
The checksum is CRC32C from the C engine, or zlib's CRC-32 when the extension is not built; the
choice is made once per tier (``checksum_name``).

With ``compression="zstd"`` a page is compressed (zstd level ``ZSTD_LEVEL``) and stored in its slot,
rounded up to 4096 bytes, when that is smaller than the page; otherwise it is stored raw.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import heapq
import logging
import mmap
import os
import tempfile
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from pagedtensor.errors import OutOfPagesError, PageCorruptionError
from pagedtensor.tiers.diskio import (
    ENGINE_NAMES,
    OP_READ,
    OP_WRITE,
    IoEngine,
    IoRequest,
    checksum_function,
    open_engine,
)

log = logging.getLogger(__name__)

BLOCK = 4096
"""File and memory alignment of every transfer (what O_DIRECT needs)."""
QUEUE_DEPTH = 64
"""Requests in flight per batch (io_uring entries, or thread pool size up to diskio.MAX_THREADS)."""
COMPRESSIONS = (None, "zstd")
ZSTD_LEVEL = 1
FILE_SYSTEM_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
"""Write errors that mean the page file can grow no further: a full file system (ENOSPC), a quota
(EDQUOT), a file-size limit (EFBIG: ``ulimit -f``, or the file system's largest file, FAT32's 4 GiB).
The pager meets each as it meets ``disk_limit``."""


_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


@functools.cache
def _fallocate() -> Any:
    """glibc's ``fallocate`` (errno kept), or None where the C library lacks it."""
    try:
        function = ctypes.CDLL(None, use_errno=True).fallocate64
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    function.restype = ctypes.c_int
    return function


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Give the file system back the blocks of bytes ``[offset, offset + length)`` of the file ``fd``
    (they read as zeros from then on; the file keeps its size). False where the file system or the
    C library cannot (the blocks stay)."""
    fallocate = _fallocate()
    if fallocate is None:
        return False
    if fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    log.debug("disk tier: could not free the blocks of bytes [%d, %d): %s", offset, offset + length, os.strerror(ctypes.get_errno()))
    return False


@dataclass(frozen=True)
class _PageRecord:
    stored_length: int  # bytes of the slot holding the page, a multiple of BLOCK
    compressed_length: int  # length of the zstd frame, 0 when the page is stored raw
    checksum: int  # of the stored_length bytes as in the file


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _aligned_empty(nbytes: int) -> torch.Tensor:
    """A CPU uint8 tensor of ``nbytes`` starting on a BLOCK boundary (over-allocate and slice)."""
    base = torch.empty(nbytes + BLOCK, dtype=torch.uint8, device="cpu")  # whatever the default device
    offset = (-base.data_ptr()) % BLOCK
    return base[offset : offset + nbytes]


def _buffer(address: int, length: int) -> ctypes.Array:
    return (ctypes.c_ubyte * length).from_address(address)


def make_folder(folder: str) -> None:
    """Create ``folder`` and its missing parents.

    Raises:
        OSError: as ``os.makedirs``; where a dangling symbolic link is on the way (``os.makedirs``
            says only "File exists" or "No such file or directory"), the message names the link
            and its missing target.
    """
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        path = os.path.abspath(folder)
        while not os.path.lexists(path) or os.path.exists(path):  # up to the first dangling link
            parent = os.path.dirname(path)
            if parent == path:
                raise
            path = parent
        raise FileNotFoundError(errno.ENOENT, f"{path!r} is a symbolic link to {os.readlink(path)!r}, which does not exist") from error


def _open_page_file(folder: str) -> tuple[int, str, bool]:
    """Creates a uniquely named page file in ``folder`` and removes its name at once; returns (fd,
    the name it had, O_DIRECT in use). The file lives as long as the fd: the kernel frees its space
    however the process ends (a SIGTERM or SIGKILL included), and no one else can open it by name.

    Tries O_DIRECT and proves it with one aligned write; on EINVAL (tmpfs and some network file
    systems) falls back to buffered I/O and logs it.
    """
    fd, file_path = tempfile.mkstemp(prefix="pagedllm-", suffix=".pages", dir=folder)
    try:
        direct_fd, direct = _direct_fd(fd, file_path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(file_path)
        raise
    try:
        os.unlink(file_path)
    except OSError as error:  # a folder that lets files be made but not deleted (append-only)
        os.close(direct_fd)
        raise type(error)(error.errno, f"nvme_path: the disk tier's page file was made in {folder!r} ({os.path.basename(file_path)}, "
                                       f"empty: it stays), but its name cannot be removed: {error.strerror or error}; the folder "
                                       f"must let its files be deleted") from error  # fmt: skip
    return direct_fd, file_path, direct


def _direct_fd(fd: int, file_path: str) -> tuple[int, bool]:
    """An O_DIRECT fd of the new page file ``fd`` (closing ``fd``), proved with one aligned write, or
    ``fd`` itself where O_DIRECT does not work; ``(fd, O_DIRECT in use)``."""
    o_direct = getattr(os, "O_DIRECT", 0)
    if not o_direct:
        log.info("disk tier: O_DIRECT does not exist on this platform; using buffered I/O for %s", file_path)
        return fd, False
    replaced = FileExistsError(errno.EEXIST, f"nvme_path: the disk tier's new page file {file_path!r} was replaced by "
                                             f"another file before the pager opened it again (someone else renames files "
                                             f"in that folder): choose a folder only this process writes to")  # fmt: skip
    try:  # by name, not following a link: whoever may rename entries in the folder could swap it meanwhile
        direct_fd = os.open(file_path, os.O_RDWR | o_direct | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            os.close(fd)
            raise (replaced if exc.errno == errno.ELOOP else exc) from None
        log.info("disk tier: the file system refuses O_DIRECT for %s; using buffered I/O", file_path)
        return fd, False
    made, opened = os.fstat(fd), os.fstat(direct_fd)
    if (made.st_dev, made.st_ino) != (opened.st_dev, opened.st_ino):
        os.close(direct_fd)
        os.close(fd)
        raise replaced
    probe = mmap.mmap(-1, BLOCK)  # page-aligned anonymous memory
    try:
        os.pwrite(direct_fd, probe, 0)
        os.ftruncate(direct_fd, 0)
    except OSError as exc:
        os.close(direct_fd)
        if exc.errno != errno.EINVAL:
            os.close(fd)
            raise
        log.info("disk tier: O_DIRECT writes fail with EINVAL for %s; using buffered I/O", file_path)
        os.ftruncate(fd, 0)
        return fd, False
    except BaseException:  # a Ctrl-C in the probe write: neither fd stays open
        os.close(direct_fd)
        os.close(fd)
        raise
    finally:
        probe.close()
    os.close(fd)
    return direct_fd, True


_LIVE_TIERS: "weakref.WeakSet[DiskTier]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A forked child gets each tier's slot lock as it was at the fork: locked, never to be released,
    if a thread of the parent held it then. Each tier gets a fresh one (its slots stay the parent's:
    the child's copy only frees them in its own bookkeeping and closes its fd)."""
    for tier in list(_LIVE_TIERS):
        tier._lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _release(engine: IoEngine, fd: int) -> None:
    """Closes the engine and the page file (the finalizer of a DiskTier); the file has no name, so
    its last fd closing frees it. A forked child closes its copies only: the parent's stay open."""
    try:
        engine.close()
    finally:
        os.close(fd)


class DiskTier:
    """Page slots in one file under ``path``, read and written in batches.

    Args:
        path: folder for the page file; created if missing. The file gets a unique name.
        page_size: bytes per page, a power of two of at least 4096.
        capacity_pages: most slots in use at once; None for no limit.
        compression: None, or ``"zstd"`` (needs the ``zstandard`` package).
        engine: ``"auto"`` (io_uring when the C engine and the kernel allow it, else threads),
            ``"io_uring"`` (RuntimeError when unavailable) or ``"threads"``.

    Slot bookkeeping is guarded by a lock and the engine is thread-safe, so calls from several
    threads are safe; writing and reading the same slot at once is the caller's to order.
    The page file's name (``file_path``, named in errors) is removed as soon as it is open, so the
    file goes with its last fd, however the process ends; :meth:`close` (or garbage collection)
    closes it. ``fd_path`` opens it again (``/proc/self/fd/N``), for inspection.
    """

    def __init__(
        self,
        path: str,
        page_size: int,
        capacity_pages: int | None,
        compression: str | None = None,
        engine: str = "auto",
    ) -> None:
        if not isinstance(path, (str, bytes, os.PathLike)) or not os.fspath(path):
            raise ValueError(f"path must be a folder path, got {path!r}")
        if isinstance(page_size, bool) or not isinstance(page_size, int):
            raise TypeError(f"page_size must be an int, got {page_size!r}")
        if page_size < BLOCK or page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two of at least {BLOCK}, got {page_size!r}")
        if capacity_pages is not None:
            if isinstance(capacity_pages, bool) or not isinstance(capacity_pages, int):
                raise TypeError(f"capacity_pages must be an int or None, got {capacity_pages!r}")
            if capacity_pages < 0:
                raise ValueError(f"capacity_pages must be >= 0 or None, got {capacity_pages!r}")
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
        if engine not in ENGINE_NAMES:
            raise ValueError(f"engine must be one of {ENGINE_NAMES}, got {engine!r}")
        self._zstd: Any = None
        if compression == "zstd":
            try:
                import zstandard
            except ImportError as exc:
                raise ImportError(
                    'DiskTier(compression="zstd") needs the zstandard package (pip install \'pagedllm[zstd]\'); '
                    "install it or set compression=None"
                ) from exc
            self._zstd = zstandard

        self.page_size = page_size
        self.capacity_pages = capacity_pages
        self.compression = compression
        self._engine = open_engine(engine, QUEUE_DEPTH)
        self.engine_name: str = self._engine.name
        self.checksum_name, self._checksum = checksum_function()
        folder = os.fsdecode(os.fspath(path))
        try:
            try:
                make_folder(folder)
                self._fd, self.file_path, self.direct_io = _open_page_file(folder)
            except OSError as error:  # the folder named, not only a generated file name inside it
                if str(error.strerror).startswith("nvme_path: "):  # named already (_open_page_file)
                    raise
                raise type(error)(error.errno, f"nvme_path: cannot create the disk tier's page file in {folder!r}: "
                                               f"{error.strerror or error}") from error  # fmt: skip
        except BaseException:
            self._engine.close()
            raise
        self._owner_pid = os.getpid()
        self._finalizer = weakref.finalize(self, _release, self._engine, self._fd)
        self._lock = threading.Lock()
        self._allocated: set[int] = set()
        self._free: list[int] = []  # heap of freed slots below _next_slot that hold all their blocks
        self._free_holes: list[int] = []  # heap of the other freed slots (their blocks given back)
        self._next_slot = 0
        self._pages: dict[int, _PageRecord] = {}
        # Slots whose every block is in the file: written whole (a raw page) since their blocks were
        # last given back. Freed, only these are room on a full file system (see free_slot).
        self._whole_slots: set[int] = set()
        _LIVE_TIERS.add(self)
        log.info(
            "disk tier: %s, engine %s, %s I/O, page %d bytes, capacity %s, compression %s, checksum %s",
            self.file_path,
            self.engine_name,
            "O_DIRECT" if self.direct_io else "buffered",
            page_size,
            "unlimited" if capacity_pages is None else f"{capacity_pages} pages",
            compression,
            self.checksum_name,
        )

    def __repr__(self) -> str:
        return (
            f"DiskTier(file={self.file_path!r}, page_size={self.page_size}, used={self.used_pages}/"
            f"{self.capacity_pages}, engine={self.engine_name!r}, compression={self.compression!r})"
        )

    def __enter__(self) -> DiskTier:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---- slots --------------------------------------------------------------------------------

    @property
    def used_pages(self) -> int:
        """Slots allocated now (written or not)."""
        return len(self._allocated)

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    @property
    def fd_path(self) -> str:
        """A path that opens the page file again while the tier is open (it has no name of its own)."""
        self._check_open()
        return f"/proc/self/fd/{self._fd}"

    def has_free_slot(self) -> bool:
        """Whether :meth:`allocate_slot` would succeed. Never blocks."""
        with self._lock:
            return bool(self._free or self._free_holes) or self.capacity_pages is None or self._next_slot < self.capacity_pages

    def free_slots_below(self, slot: int) -> int:
        """How many free slots that hold all their blocks lie below ``slot``, an allocated or freed
        one (the slots a write on a file system that could not hold ``slot`` still fits: the file
        reaches past them, and :meth:`allocate_slot` hands out such slots first, the lowest first; a
        slot that held a compressed page gave its blocks back, see :meth:`free_slot`). Never blocks."""
        with self._lock:
            return sum(1 for free in self._free if free < slot)

    def allocate_slot(self) -> int:
        """A free slot, now allocated: the lowest of those that hold all their blocks, else the lowest
        free one, else a new one at the end of the file; OutOfPagesError when the tier is full. Never blocks."""
        self._check_open()
        with self._lock:
            if self._free:  # a slot that holds all its blocks first: a write there needs none
                slot = heapq.heappop(self._free)
            elif self._free_holes:
                slot = heapq.heappop(self._free_holes)
            elif self.capacity_pages is None or self._next_slot < self.capacity_pages:
                slot = self._next_slot
                self._next_slot += 1
            else:
                raise OutOfPagesError(
                    f"disk tier {self.file_path} is full: all {self.capacity_pages} slots of "
                    f"{self.page_size} bytes are in use"
                )
            self._allocated.add(slot)
            return slot

    def free_slot(self, slot: int) -> None:
        """Returns ``slot`` to the free list and forgets its page. A slot that holds all its blocks
        keeps them (the next page written there needs none); one that does not (it held a compressed
        page: the blocks of its frame, holes after them) gives them back to the file system, where
        they would stay taken for a page that may need them all."""
        with self._lock:
            self._check_allocated(slot)
            self._allocated.discard(slot)
            self._pages.pop(slot, None)
            if slot in self._whole_slots:
                heapq.heappush(self._free, slot)
            else:
                punch_hole(self._fd, slot * self.page_size, self.page_size)
                heapq.heappush(self._free_holes, slot)

    # ---- I/O ----------------------------------------------------------------------------------

    def write_pages(self, items: Sequence[tuple[int, torch.Tensor]]) -> int:
        """Writes each tensor (``page_size`` bytes, CPU, contiguous) to its allocated slot.

        Compresses (if configured), checksums and bounces unaligned tensors on the calling thread,
        then hands the whole batch to the engine and blocks until every write has completed (the
        data is in the file, not fsync'd). Returns bytes written to the file.

        A slot whose write fails loses its previous page (reading it raises) and the call raises
        OSError after the batch, its ``failed_slots`` the slots that failed; the other slots of the
        batch hold their new pages.
        """
        self._check_open()
        items = list(items)
        if not items:
            return 0
        slots = [slot for slot, _ in items]
        if len(set(slots)) != len(slots):
            raise ValueError(f"write_pages: a slot appears twice in one batch: {sorted(slots)}")
        with self._lock:
            for slot in slots:
                self._check_allocated(slot)
        compressor = self._zstd.ZstdCompressor(level=ZSTD_LEVEL) if self._zstd is not None else None
        requests: list[IoRequest] = []
        records: list[_PageRecord] = []
        keep_alive: list[torch.Tensor] = []  # bounce buffers must outlive the batch
        for slot, tensor in items:
            address = self._check_tensor(tensor, "write_pages", slot)
            source = address
            stored_length = self.page_size
            compressed_length = 0
            if compressor is not None:
                frame = compressor.compress(_buffer(address, self.page_size))
                if _round_up(len(frame), BLOCK) < self.page_size:
                    compressed_length = len(frame)
                    stored_length = _round_up(compressed_length, BLOCK)
                    bounce = _aligned_empty(stored_length)
                    bounce[compressed_length:].zero_()
                    ctypes.memmove(bounce.data_ptr(), frame, compressed_length)
                    keep_alive.append(bounce)
                    source = bounce.data_ptr()
            if compressed_length == 0 and self.direct_io and address % BLOCK:
                bounce = _aligned_empty(self.page_size)
                bounce.copy_(tensor.reshape(-1).view(torch.uint8))
                keep_alive.append(bounce)
                source = bounce.data_ptr()
            records.append(_PageRecord(stored_length, compressed_length, self._checksum(source, stored_length)))
            requests.append(IoRequest(OP_WRITE, self._fd, source, stored_length, slot * self.page_size))

        results = self._engine.submit(requests)

        failures: list[tuple[int, int, str]] = []
        with self._lock:
            for (slot, _), record, result in zip(items, records, results):
                if result == record.stored_length:
                    if slot in self._allocated:
                        self._pages[slot] = record
                    if result == self.page_size:
                        self._whole_slots.add(slot)
                    continue
                self._pages.pop(slot, None)
                if result < 0:
                    failures.append((slot, -result, os.strerror(-result)))
                else:
                    failures.append((slot, errno.EIO, f"short write: {result} of {record.stored_length} bytes"))
        if failures:
            slot, code, text = failures[0]
            more = f" (and {len(failures) - 1} more failed writes in this batch)" if len(failures) > 1 else ""
            full = ""
            if code in FILE_SYSTEM_FULL_ERRNOS:
                full = ("; the page file reached the largest file its file system or the process's file-size limit "
                        "(ulimit -f) allows: set MemoryConfig(disk_limit=...) to what it can hold"
                        if code == errno.EFBIG else
                        "; its file system is full: free space there, or set MemoryConfig(disk_limit=...) to what it can hold")  # fmt: skip
            error = OSError(code, f"disk tier: writing slot {slot} of {self.file_path} failed: {text}{more}{full}")
            error.failed_slots = tuple(failed for failed, _, _ in failures)  # for the pager's retry on a full file system
            raise error
        return sum(record.stored_length for record in records)

    def read_pages(self, items: Sequence[tuple[int, torch.Tensor]]) -> int:
        """Fills each tensor (``page_size`` bytes, CPU, contiguous) with the page in its slot.

        Issues the whole batch to the engine and blocks until every read has completed, then checks
        each page's checksum over the bytes read before decompressing or copying it out. Raises
        PageCorruptionError (naming slot, file and the expected and actual checksums) on a mismatch
        or a short read, OSError on an I/O error; every other page of the batch is still filled, and
        the destination of a failed page is zeroed. A slot that was never written raises ValueError
        before any I/O. Returns bytes read from the file.
        """
        self._check_open()
        items = list(items)
        if not items:
            return 0
        with self._lock:
            records = []
            for slot, _ in items:
                self._check_allocated(slot)
                record = self._pages.get(slot)
                if record is None:
                    raise ValueError(
                        f"read_pages: slot {slot} of {self.file_path} holds no page (never written, or its "
                        "last write failed)"
                    )
                records.append(record)
        requests: list[IoRequest] = []
        targets: list[torch.Tensor | None] = []  # bounce buffer per item, None to read in place
        for (slot, tensor), record in zip(items, records):
            address = self._check_tensor(tensor, "read_pages", slot)
            if record.compressed_length == 0 and not (self.direct_io and address % BLOCK):
                targets.append(None)
                target = address
            else:
                bounce = _aligned_empty(record.stored_length)
                targets.append(bounce)
                target = bounce.data_ptr()
            requests.append(IoRequest(OP_READ, self._fd, target, record.stored_length, slot * self.page_size))

        results = self._engine.submit(requests)

        decompressor = self._zstd.ZstdDecompressor() if self._zstd is not None else None
        failures: list[tuple[type[Exception], int, str]] = []
        for (slot, tensor), record, request, bounce, result in zip(items, records, requests, targets, results):
            failure = self._finish_read(slot, tensor, record, request, bounce, result, decompressor)
            if failure is not None:
                failures.append(failure)
                tensor.reshape(-1).view(torch.uint8).zero_()
        if failures:
            kind, code, text = failures[0]
            more = f" (and {len(failures) - 1} more failed pages in this batch)" if len(failures) > 1 else ""
            if kind is OSError:
                raise OSError(code, text + more)
            raise kind(text + more)
        return sum(record.stored_length for record in records)

    def _finish_read(
        self,
        slot: int,
        tensor: torch.Tensor,
        record: _PageRecord,
        request: IoRequest,
        bounce: torch.Tensor | None,
        result: int,
        decompressor: Any,
    ) -> tuple[type[Exception], int, str] | None:
        """Checks one completed read and moves its page into ``tensor``; a failure description or None."""
        where = f"slot {slot} of {self.file_path}"
        if result < 0:
            return OSError, -result, f"disk tier: reading {where} failed: {os.strerror(-result)}"
        if result < record.stored_length:
            return (
                PageCorruptionError,
                errno.EIO,
                f"disk tier: short read of {where}: {result} of {record.stored_length} bytes "
                "(page file truncated?)",
            )
        actual = self._checksum(request.address, record.stored_length)
        if actual != record.checksum:
            return (
                PageCorruptionError,
                errno.EIO,
                f"disk tier: checksum mismatch in {where}: {self.checksum_name} expected "
                f"{record.checksum:#010x}, got {actual:#010x}",
            )
        if record.compressed_length:
            frame = _buffer(request.address, record.compressed_length)
            try:
                # zstandard trusts a size in the frame header over max_output_size: check it first, so a
                # corrupt header cannot ask for a huge allocation (MemoryError instead of this error).
                declared = self._zstd.frame_content_size(frame)
                if declared > self.page_size:
                    return (PageCorruptionError, errno.EIO,
                            f"disk tier: {where} holds a frame of {declared} bytes, expected {self.page_size}")  # fmt: skip
                page = decompressor.decompress(frame, max_output_size=self.page_size)
            except self._zstd.ZstdError as exc:
                return PageCorruptionError, errno.EIO, f"disk tier: cannot decompress {where}: {exc}"
            if len(page) != self.page_size:
                return (
                    PageCorruptionError,
                    errno.EIO,
                    f"disk tier: {where} decompressed to {len(page)} bytes, expected {self.page_size}",
                )
            ctypes.memmove(tensor.data_ptr(), page, self.page_size)
        elif bounce is not None:
            tensor.reshape(-1).view(torch.uint8).copy_(bounce)
        return None

    # ---- lifetime and checks ------------------------------------------------------------------

    def close(self) -> None:
        """Closes the engine and the page file, which frees it (it has no name). Idempotent; waits
        for a batch in progress on the io_uring engine."""
        self._finalizer()
        self._allocated.clear()  # nothing is held any more

    def _check_open(self) -> None:
        if not self._finalizer.alive:
            raise ValueError(f"disk tier {self.file_path} is closed")
        if os.getpid() != self._owner_pid:
            raise RuntimeError(
                f"disk tier {self.file_path} belongs to process {self._owner_pid}: a forked child cannot use it (its "
                "page file slots and I/O ring are the parent's). Pass PagedTensors to workers by pickling (the spawn "
                "start method, e.g. DataLoader(multiprocessing_context='spawn')), or materialize them before forking"
            )

    def _check_allocated(self, slot: int) -> None:
        if isinstance(slot, bool) or not isinstance(slot, int):
            raise TypeError(f"slot must be an int, got {slot!r}")
        if slot not in self._allocated:
            raise ValueError(f"slot {slot} of disk tier {self.file_path} is not allocated")

    def _check_tensor(self, tensor: torch.Tensor, caller: str, slot: int) -> int:
        """The data address of ``tensor`` once it is known to be a contiguous CPU page whose memory holds
        the values it reads (not a conjugate or negative view)."""
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{caller}: slot {slot}: expected a torch.Tensor, got {type(tensor).__name__}")
        if tensor.device.type != "cpu":
            raise ValueError(f"{caller}: slot {slot}: tensor must be on the CPU, got device {tensor.device}")
        if not tensor.is_contiguous():
            raise ValueError(f"{caller}: slot {slot}: tensor must be contiguous")
        if tensor.is_conj() or tensor.is_neg():
            raise ValueError(f"{caller}: slot {slot}: tensor is a conjugate or negative view, whose memory holds other values "
                             "than it reads; pass t.resolve_conj().resolve_neg()")  # fmt: skip
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes != self.page_size:
            raise ValueError(f"{caller}: slot {slot}: tensor has {nbytes} bytes, page_size is {self.page_size}")
        return tensor.data_ptr()
