"""The disk tier's I/O engine: batches of positional reads and writes, and page checksums.

Two engines run the same batches with the same results:

- ``io_uring`` (:class:`UringEngine`): the C library ``pagedtensor._diskio`` (``csrc/diskio.c``),
  raw io_uring syscalls, up to ``depth`` requests in flight. It is loaded with :mod:`ctypes`, which
  releases the GIL for the whole batch, so Python work overlaps the I/O.
- ``threads`` (:class:`ThreadPoolEngine`): a thread pool running ``os.preadv``/``os.pwritev``; used
  when the extension was not built (no compiler at install) or the kernel refuses io_uring
  (``ENOSYS``, ``EPERM`` under seccomp or ``kernel.io_uring_disabled``).

Buffers are passed as raw addresses: the caller keeps the memory alive until ``submit`` returns.

Checksums: :func:`checksum_function` hands out CRC32C from the C library (SSE4.2 when the CPU has
it), or ``zlib.crc32`` when the library is missing. The two are different functions, so a consumer
picks one at construction and records its name with its checksums.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import importlib.util
import logging
import os
import threading
import weakref
import zlib
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Callable, NamedTuple, Protocol, Sequence

log = logging.getLogger(__name__)

EXTENSION_MODULE = "pagedtensor._diskio"
ENGINE_NAMES = ("auto", "io_uring", "threads")
OP_READ = 0
OP_WRITE = 1
MAX_THREADS = 32
"""Upper bound on the thread pool engine's workers, whatever the requested depth."""

Checksum = Callable[[int, int], int]
"""``checksum(address, length) -> int``: a 32-bit checksum of ``length`` bytes at ``address``."""


class IoRequest(NamedTuple):
    """One positional transfer: ``length`` bytes between memory at ``address`` and ``fd`` at ``offset``."""

    op: int  # OP_READ or OP_WRITE
    fd: int
    address: int
    length: int
    offset: int


_INT32_MIN, _INT32_MAX, _INT64_MAX, _UINT64_MAX = -(2**31), 2**31 - 1, 2**63 - 1, 2**64 - 1


def check_requests(requests: Sequence[IoRequest]) -> None:
    """Every request is a read or a write of a length and at an offset in ``[0, 2**63)``, on a file
    descriptor that is a C int (a bad one gives ``-EBADF``), at an address in ``[0, 2**64)``; else a
    ``ValueError`` naming it (an engine would otherwise do something else: a read, I/O at the file's
    current position, or, in the C request's fixed-width fields, a value wrapped around: an offset
    of ``2**64`` as 0, a file descriptor of ``2**32 + n`` as ``n``)."""
    for index, request in enumerate(requests):
        if (request.op not in (OP_READ, OP_WRITE) or not 0 <= request.offset <= _INT64_MAX or not 0 <= request.length <= _INT64_MAX
                or not _INT32_MIN <= request.fd <= _INT32_MAX or not 0 <= request.address <= _UINT64_MAX):  # fmt: skip
            raise ValueError(f"I/O request {index}: expected op {OP_READ} (read) or {OP_WRITE} (write), a length and "
                             f"an offset in [0, 2**63), a file descriptor in [-2**31, 2**31) and an address in [0, 2**64); "
                             f"got {request}")  # fmt: skip


class _CRequest(ctypes.Structure):
    """Mirror of ``struct pt_io_request`` in csrc/diskio.c."""

    _fields_ = [
        ("fd", ctypes.c_int32),
        ("opcode", ctypes.c_int32),
        ("buffer", ctypes.c_uint64),
        ("length", ctypes.c_uint64),
        ("offset", ctypes.c_uint64),
        ("result", ctypes.c_int64),
    ]


class IoEngine(Protocol):
    """What :class:`~pagedtensor.tiers.disk.DiskTier` needs from an engine."""

    name: str
    depth: int

    def submit(self, requests: Sequence[IoRequest]) -> list[int]:
        """Runs every request and blocks until all have finished; per request, bytes moved or -errno.

        A read that meets end of file returns the bytes it got (fewer than asked).
        """
        ...

    def close(self) -> None:
        """Releases the engine; idempotent."""
        ...


@functools.lru_cache(maxsize=None)
def load_library() -> ctypes.CDLL | None:
    """The C engine (``pagedtensor._diskio``) with its functions typed, or None when it is not built.

    Cached: the first call does the work.
    """
    try:
        spec = importlib.util.find_spec(EXTENSION_MODULE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        log.info("disk I/O: C extension %s is not built; using the Python fallbacks", EXTENSION_MODULE)
        return None
    try:
        lib = ctypes.CDLL(spec.origin)
    except OSError as exc:
        log.info("disk I/O: cannot load %s (%s); using the Python fallbacks", spec.origin, exc)
        return None
    lib.pt_ring_create.argtypes = [ctypes.c_uint, ctypes.POINTER(ctypes.c_int)]
    lib.pt_ring_create.restype = ctypes.c_void_p
    lib.pt_ring_depth.argtypes = [ctypes.c_void_p]
    lib.pt_ring_depth.restype = ctypes.c_uint
    lib.pt_ring_submit.argtypes = [ctypes.c_void_p, ctypes.POINTER(_CRequest), ctypes.c_size_t]
    lib.pt_ring_submit.restype = ctypes.c_int
    lib.pt_ring_destroy.argtypes = [ctypes.c_void_p]
    lib.pt_ring_destroy.restype = None
    for name in ("pt_crc32c", "pt_crc32c_software"):
        function = getattr(lib, name)
        function.argtypes = [ctypes.c_uint32, ctypes.c_void_p, ctypes.c_size_t]
        function.restype = ctypes.c_uint32
    lib.pt_crc32c_hardware.argtypes = []
    lib.pt_crc32c_hardware.restype = ctypes.c_int
    lib.pt_io_request_size.argtypes = []
    lib.pt_io_request_size.restype = ctypes.c_size_t
    if lib.pt_io_request_size() != ctypes.sizeof(_CRequest):
        log.warning("disk I/O: %s has a different request layout; ignoring it", spec.origin)
        return None
    return lib


def _errno_text(code: int) -> str:
    name = errno.errorcode.get(code, str(code))
    return f"{os.strerror(code)} ({name})"


@functools.lru_cache(maxsize=None)
def uring_unavailable_reason() -> str | None:
    """None when io_uring works here, else why not (extension missing, or what the kernel said).

    Cached; the first call creates and destroys a small ring (one NOP round trip).
    """
    lib = load_library()
    if lib is None:
        return f"the C extension {EXTENSION_MODULE} is not built"
    err = ctypes.c_int(0)
    ring = lib.pt_ring_create(2, ctypes.byref(err))
    if not ring:
        return f"io_uring setup failed: {_errno_text(-err.value)}"
    lib.pt_ring_destroy(ring)
    return None


def _buffer(address: int, length: int) -> ctypes.Array:
    """A writable buffer-protocol view of ``length`` bytes at ``address`` (no copy)."""
    return (ctypes.c_ubyte * length).from_address(address)


_LIVE_URING_ENGINES: "weakref.WeakSet[UringEngine]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A forked child gets a copy of every engine's lock, locked if another thread of the parent was
    in a batch at the fork (the prefetch thread's disk reads): no thread of the child would ever
    release it, and the child's ``close`` (its DiskTier closing, at collection or exit) would wait
    forever. Each gets a fresh lock."""
    for engine in list(_LIVE_URING_ENGINES):
        engine._lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


class UringEngine:
    """Batches through one io_uring of ``depth`` entries (the C engine).

    Thread-safe: the C side holds a mutex per ring for the whole batch, so concurrent batches run
    one after the other. ``submit`` blocks (GIL released) until the batch is done.
    """

    name = "io_uring"

    def __init__(self, depth: int = 64) -> None:
        if not isinstance(depth, int) or depth < 1 or depth > 4096:
            raise ValueError(f"depth must be an int in [1, 4096], got {depth!r}")
        reason = uring_unavailable_reason()
        if reason is not None:
            raise RuntimeError(f'engine="io_uring" is unavailable: {reason}; use engine="auto" or "threads"')
        lib = load_library()
        assert lib is not None
        err = ctypes.c_int(0)
        ring = lib.pt_ring_create(depth, ctypes.byref(err))
        if not ring:
            raise RuntimeError(f"io_uring setup with depth {depth} failed: {_errno_text(-err.value)}")
        self._lib = lib
        self._ring: int | None = ring
        self._lock = threading.Lock()  # guards _ring against close() during submit
        self.depth = int(lib.pt_ring_depth(ring))
        # An engine collected without close() still gives its ring (a descriptor and three mappings) back.
        self._finalizer = weakref.finalize(self, lib.pt_ring_destroy, ring)
        _LIVE_URING_ENGINES.add(self)

    def submit(self, requests: Sequence[IoRequest]) -> list[int]:
        """Runs the batch with up to ``depth`` requests in flight; blocks until all completed."""
        count = len(requests)
        if count == 0:
            return []
        check_requests(requests)
        array = (_CRequest * count)()
        for entry, request in zip(array, requests):
            entry.fd = request.fd
            entry.opcode = request.op
            entry.buffer = request.address
            entry.length = request.length
            entry.offset = request.offset
        with self._lock:
            if self._ring is None:
                raise ValueError("I/O engine is closed")
            status = self._lib.pt_ring_submit(self._ring, array, count)
        if status < 0:
            raise OSError(-status, f"io_uring batch failed: {_errno_text(-status)}")
        return [int(entry.result) for entry in array]

    def close(self) -> None:
        """Destroys the ring; waits for a batch in progress. Idempotent."""
        with self._lock:
            if self._ring is not None:
                self._finalizer()  # destroys the ring, once
                self._ring = None


def _transfer(request: IoRequest) -> int:
    """One request with os.preadv/os.pwritev, resuming after short transfers; bytes or -errno."""
    done = 0
    view = memoryview(_buffer(request.address, request.length)).cast("B") if request.length else None
    try:
        while done < request.length:
            assert view is not None
            chunk = view[done:]
            if request.op == OP_WRITE:
                moved = os.pwritev(request.fd, [chunk], request.offset + done)
                if moved == 0:
                    return -errno.EIO
            else:
                moved = os.preadv(request.fd, [chunk], request.offset + done)
                if moved == 0:
                    break  # end of file
            done += moved
    except OSError as exc:
        return -(exc.errno or errno.EIO)
    return done


class ThreadPoolEngine:
    """Batches through a pool of ``min(depth, MAX_THREADS)`` threads doing positional I/O.

    Thread-safe. ``submit`` blocks until the batch is done; the workers release the GIL in the
    system calls.
    """

    name = "threads"

    def __init__(self, depth: int = 64) -> None:
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be a positive int, got {depth!r}")
        self.depth = depth
        self._pool: ThreadPoolExecutor | None = ThreadPoolExecutor(
            max_workers=min(depth, MAX_THREADS), thread_name_prefix="pagedllm-diskio"
        )

    def submit(self, requests: Sequence[IoRequest]) -> list[int]:
        """Runs the batch on the pool; blocks until all requests completed.

        Also when interrupted (``KeyboardInterrupt`` while waiting): requests not started are
        cancelled and the call returns (raising) only once no worker touches the batch's memory,
        which the caller frees or reuses right after.
        """
        check_requests(requests)
        pool = self._pool
        if pool is None:
            raise ValueError("I/O engine is closed")
        if len(requests) == 1:
            return [_transfer(requests[0])]
        try:
            futures = [pool.submit(_transfer, request) for request in requests]
        except RuntimeError as error:  # close() shut the pool down meanwhile
            raise ValueError("I/O engine is closed") from error
        try:
            return [future.result() for future in futures]
        except BaseException:
            for future in futures:
                future.cancel()
            wait(futures)
            raise

    def close(self) -> None:
        """Shuts the pool down after the batches in progress. Idempotent."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)


def open_engine(engine: str = "auto", depth: int = 64) -> IoEngine:
    """An engine by name: ``"io_uring"``, ``"threads"``, or ``"auto"`` (io_uring when it works here).

    Raises ValueError for an unknown name, RuntimeError when ``"io_uring"`` is asked for and is
    unavailable (the message says why).
    """
    if engine not in ENGINE_NAMES:
        raise ValueError(f"engine must be one of {ENGINE_NAMES}, got {engine!r}")
    if engine == "threads":
        return ThreadPoolEngine(depth)
    if engine == "io_uring":
        return UringEngine(depth)
    reason = uring_unavailable_reason()
    if reason is None:
        try:
            return UringEngine(depth)
        except RuntimeError as exc:
            reason = str(exc)
    _log_fallback_once(reason)
    return ThreadPoolEngine(depth)


@functools.lru_cache(maxsize=None)
def _log_fallback_once(reason: str) -> None:
    log.info("disk I/O: io_uring unavailable (%s); using the thread pool engine", reason)


def crc32c(data: bytes | bytearray | memoryview, value: int = 0) -> int:
    """CRC32C of a bytes-like object through the C library, chained like ``zlib.crc32``.

    Raises RuntimeError when the extension is not built.
    """
    lib = load_library()
    if lib is None:
        raise RuntimeError(f"crc32c needs the C extension {EXTENSION_MODULE}, which is not built")
    view = memoryview(data).cast("B")
    if view.nbytes == 0:
        return value & 0xFFFFFFFF
    if view.readonly:
        return int(lib.pt_crc32c(value, data if isinstance(data, bytes) else view.tobytes(), view.nbytes))
    return int(lib.pt_crc32c(value, ctypes.addressof(ctypes.c_char.from_buffer(view)), view.nbytes))


def checksum_function() -> tuple[str, Checksum]:
    """The best page checksum available here, as ``(name, checksum(address, length))``.

    ``"crc32c"`` from the C library (GIL released, SSE4.2 when available), else ``"crc32"`` from
    zlib. Callers record the name: the two are not interchangeable.
    """
    lib = load_library()
    if lib is not None:
        function = lib.pt_crc32c

        def crc32c_at(address: int, length: int) -> int:
            return int(function(0, address, length))

        return "crc32c", crc32c_at

    def crc32_at(address: int, length: int) -> int:
        return zlib.crc32(_buffer(address, length)) & 0xFFFFFFFF

    return "crc32", crc32_at
