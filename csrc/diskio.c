/*
 * diskio.c: the C data plane of PagedLLM's disk tier.
 *
 * Built as the optional CPython extension ``pagedtensor._diskio``.  The module object itself is
 * empty; the Python side (pagedtensor/tiers/diskio.py) loads the same shared object with ctypes and
 * calls the plain C functions below, so every call runs with the GIL released.
 *
 * Exports (all ``pt_`` prefixed, default visibility):
 *
 *   struct pt_ring *pt_ring_create(unsigned depth, int *err)
 *       An io_uring of ``depth`` submission entries, set up with raw syscalls (no liburing) and
 *       checked with one NOP round trip.  NULL and ``*err = -errno`` when the kernel refuses it
 *       (ENOSYS without io_uring, EPERM under seccomp or kernel.io_uring_disabled, ...).
 *   unsigned pt_ring_depth(const struct pt_ring *ring)
 *   int pt_ring_submit(struct pt_ring *ring, struct pt_io_request *requests, size_t count)
 *       Runs a batch of reads/writes, keeping up to ``depth`` in flight, and blocks until every
 *       request has finished.  Short transfers are resubmitted for their remainder; a read that
 *       reaches end of file stops there and reports the bytes it got.  Per-request results land in
 *       ``requests[i].result`` (bytes moved, or -errno).  Returns 0, or -errno when the ring itself
 *       failed (results are then meaningless).  Thread-safe: one mutex per ring.
 *   void pt_ring_destroy(struct pt_ring *ring)
 *   uint32_t pt_crc32c(uint32_t crc, const void *data, size_t length)
 *       CRC32C (Castagnoli), chained like zlib.crc32: pass 0 first, then the previous value.
 *       Uses SSE4.2 crc32 instructions when the CPU has them, a slicing-by-8 table otherwise.
 *   uint32_t pt_crc32c_software(uint32_t crc, const void *data, size_t length)
 *       The same CRC through the table whatever the CPU (for tests).
 *   int pt_crc32c_hardware(void)        1 when pt_crc32c runs on SSE4.2
 *   size_t pt_io_request_size(void)     sizeof(struct pt_io_request), checked by the ctypes side
 *
 * Define PT_NO_SYSTEM_IO_URING_H to use the built-in copy of the io_uring ABI even when
 * <linux/io_uring.h> exists (to check that copy compiles).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <nmmintrin.h>
#define PT_HAVE_X86 1
#else
#define PT_HAVE_X86 0
#endif

#if defined(__has_include) && !defined(PT_NO_SYSTEM_IO_URING_H)
#if __has_include(<linux/io_uring.h>)
#include <linux/io_uring.h>
#define PT_SYSTEM_IO_URING_H 1
#endif
#endif

#ifndef PT_SYSTEM_IO_URING_H
/* The subset of the io_uring ABI (Linux 5.1+) this file uses, laid out as in the kernel's uapi. */
struct io_sqring_offsets {
    uint32_t head, tail, ring_mask, ring_entries, flags, dropped, array, resv1;
    uint64_t user_addr;
};
struct io_cqring_offsets {
    uint32_t head, tail, ring_mask, ring_entries, overflow, cqes, flags, resv1;
    uint64_t user_addr;
};
struct io_uring_params {
    uint32_t sq_entries, cq_entries, flags, sq_thread_cpu, sq_thread_idle, features, wq_fd, resv[3];
    struct io_sqring_offsets sq_off;
    struct io_cqring_offsets cq_off;
};
struct io_uring_sqe {
    uint8_t opcode;
    uint8_t flags;
    uint16_t ioprio;
    int32_t fd;
    uint64_t off;
    uint64_t addr;
    uint32_t len;
    uint32_t rw_flags;
    uint64_t user_data;
    uint16_t buf_index;
    uint16_t personality;
    int32_t splice_fd_in;
    uint64_t pad2[2];
};
struct io_uring_cqe {
    uint64_t user_data;
    int32_t res;
    uint32_t flags;
};
#define IORING_OFF_SQ_RING 0ULL
#define IORING_OFF_CQ_RING 0x8000000ULL
#define IORING_OFF_SQES 0x10000000ULL
#define IORING_ENTER_GETEVENTS (1U << 0)
#define IORING_FEAT_SINGLE_MMAP (1U << 0)
enum { IORING_OP_NOP = 0, IORING_OP_READV = 1, IORING_OP_WRITEV = 2 };
#endif

_Static_assert(sizeof(struct io_uring_sqe) == 64, "io_uring_sqe must be 64 bytes");
_Static_assert(sizeof(struct io_uring_cqe) == 16, "io_uring_cqe must be 16 bytes");

#ifndef __NR_io_uring_setup
#define __NR_io_uring_setup 425
#endif
#ifndef __NR_io_uring_enter
#define __NR_io_uring_enter 426
#endif

#define PT_EXPORT __attribute__((visibility("default")))

/* One request of a batch; mirrored by pagedtensor.tiers.diskio.IoRequest (ctypes). */
struct pt_io_request {
    int32_t fd;
    int32_t opcode; /* PT_OP_READ or PT_OP_WRITE */
    uint64_t buffer;
    uint64_t length;
    uint64_t offset;
    int64_t result; /* out: bytes moved, or -errno */
};
enum { PT_OP_READ = 0, PT_OP_WRITE = 1 };

struct pt_ring {
    int fd;
    unsigned sq_entries;
    unsigned cq_entries;
    void *sq_map;
    size_t sq_map_len;
    void *cq_map; /* == sq_map with IORING_FEAT_SINGLE_MMAP */
    size_t cq_map_len;
    struct io_uring_sqe *sqes;
    size_t sqes_len;
    unsigned *sq_head, *sq_tail, *sq_mask, *sq_array;
    unsigned *cq_head, *cq_tail, *cq_mask;
    struct io_uring_cqe *cqes;
    unsigned sq_local_tail; /* next free SQE, published to *sq_tail before each enter */
    int broken;             /* set when the ring failed with requests possibly still in flight */
    pthread_mutex_t lock;
};

static int sys_io_uring_setup(unsigned entries, struct io_uring_params *params)
{
    return (int)syscall(__NR_io_uring_setup, entries, params);
}

static int sys_io_uring_enter(int fd, unsigned to_submit, unsigned min_complete, unsigned flags)
{
    return (int)syscall(__NR_io_uring_enter, fd, to_submit, min_complete, flags, NULL, 0);
}

static void ring_unmap(struct pt_ring *ring)
{
    if (ring->sqes != NULL && ring->sqes != MAP_FAILED)
        munmap(ring->sqes, ring->sqes_len);
    if (ring->cq_map != NULL && ring->cq_map != MAP_FAILED && ring->cq_map != ring->sq_map)
        munmap(ring->cq_map, ring->cq_map_len);
    if (ring->sq_map != NULL && ring->sq_map != MAP_FAILED)
        munmap(ring->sq_map, ring->sq_map_len);
    if (ring->fd >= 0)
        close(ring->fd);
}

/* The SQE at the local tail, zeroed; the caller fills it and bumps sq_local_tail. */
static struct io_uring_sqe *ring_next_sqe(struct pt_ring *ring)
{
    unsigned index = ring->sq_local_tail & *ring->sq_mask;
    struct io_uring_sqe *sqe = &ring->sqes[index];
    memset(sqe, 0, sizeof(*sqe));
    ring->sq_array[index] = index;
    return sqe;
}

/* Publishes the local tail; returns how many SQEs the kernel has not consumed yet. */
static unsigned ring_publish(struct pt_ring *ring)
{
    __atomic_store_n(ring->sq_tail, ring->sq_local_tail, __ATOMIC_RELEASE);
    return ring->sq_local_tail - __atomic_load_n(ring->sq_head, __ATOMIC_ACQUIRE);
}

/* Submits one NOP and waits for its completion: proves that enter and the rings work here. */
static int ring_probe(struct pt_ring *ring)
{
    struct io_uring_sqe *sqe = ring_next_sqe(ring);
    sqe->opcode = IORING_OP_NOP;
    sqe->user_data = UINT64_C(0xfeedface);
    ring->sq_local_tail++;
    for (;;) {
        int ret = sys_io_uring_enter(ring->fd, ring_publish(ring), 1, IORING_ENTER_GETEVENTS);
        if (ret >= 0)
            break;
        if (errno != EINTR)
            return -errno;
    }
    unsigned head = *ring->cq_head;
    unsigned tail = __atomic_load_n(ring->cq_tail, __ATOMIC_ACQUIRE);
    if (head == tail)
        return -EIO;
    struct io_uring_cqe *cqe = &ring->cqes[head & *ring->cq_mask];
    int res = cqe->res;
    uint64_t user_data = cqe->user_data;
    __atomic_store_n(ring->cq_head, head + 1, __ATOMIC_RELEASE);
    if (user_data != UINT64_C(0xfeedface))
        return -EIO;
    return res < 0 ? res : 0;
}

PT_EXPORT struct pt_ring *pt_ring_create(unsigned depth, int *err)
{
    struct io_uring_params params;
    struct pt_ring *ring;
    int status;

    if (depth == 0 || depth > 4096) {
        if (err != NULL)
            *err = -EINVAL;
        return NULL;
    }
    ring = calloc(1, sizeof(*ring));
    if (ring == NULL) {
        if (err != NULL)
            *err = -ENOMEM;
        return NULL;
    }
    ring->fd = -1;
    memset(&params, 0, sizeof(params));
    ring->fd = sys_io_uring_setup(depth, &params);
    if (ring->fd < 0) {
        status = -errno;
        goto fail;
    }
    ring->sq_entries = params.sq_entries;
    ring->cq_entries = params.cq_entries;

    ring->sq_map_len = params.sq_off.array + params.sq_entries * sizeof(unsigned);
    ring->cq_map_len = params.cq_off.cqes + params.cq_entries * sizeof(struct io_uring_cqe);
    if (params.features & IORING_FEAT_SINGLE_MMAP) {
        if (ring->cq_map_len > ring->sq_map_len)
            ring->sq_map_len = ring->cq_map_len;
        ring->cq_map_len = ring->sq_map_len;
    }
    ring->sq_map = mmap(NULL, ring->sq_map_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                        ring->fd, IORING_OFF_SQ_RING);
    if (ring->sq_map == MAP_FAILED) {
        status = -errno;
        goto fail;
    }
    if (params.features & IORING_FEAT_SINGLE_MMAP) {
        ring->cq_map = ring->sq_map;
    } else {
        ring->cq_map = mmap(NULL, ring->cq_map_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                            ring->fd, IORING_OFF_CQ_RING);
        if (ring->cq_map == MAP_FAILED) {
            status = -errno;
            goto fail;
        }
    }
    ring->sqes_len = params.sq_entries * sizeof(struct io_uring_sqe);
    ring->sqes = mmap(NULL, ring->sqes_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, ring->fd,
                      IORING_OFF_SQES);
    if (ring->sqes == MAP_FAILED) {
        status = -errno;
        goto fail;
    }

    char *sq = ring->sq_map;
    char *cq = ring->cq_map;
    ring->sq_head = (unsigned *)(sq + params.sq_off.head);
    ring->sq_tail = (unsigned *)(sq + params.sq_off.tail);
    ring->sq_mask = (unsigned *)(sq + params.sq_off.ring_mask);
    ring->sq_array = (unsigned *)(sq + params.sq_off.array);
    ring->cq_head = (unsigned *)(cq + params.cq_off.head);
    ring->cq_tail = (unsigned *)(cq + params.cq_off.tail);
    ring->cq_mask = (unsigned *)(cq + params.cq_off.ring_mask);
    ring->cqes = (struct io_uring_cqe *)(cq + params.cq_off.cqes);
    ring->sq_local_tail = *ring->sq_tail;

    status = ring_probe(ring);
    if (status < 0)
        goto fail;
    if (pthread_mutex_init(&ring->lock, NULL) != 0) {
        status = -ENOMEM;
        goto fail;
    }
    if (err != NULL)
        *err = 0;
    return ring;

fail:
    ring_unmap(ring);
    free(ring);
    if (err != NULL)
        *err = status;
    return NULL;
}

PT_EXPORT unsigned pt_ring_depth(const struct pt_ring *ring)
{
    return ring->sq_entries;
}

PT_EXPORT void pt_ring_destroy(struct pt_ring *ring)
{
    if (ring == NULL)
        return;
    pthread_mutex_destroy(&ring->lock);
    ring_unmap(ring);
    free(ring);
}

/* Per-batch bookkeeping: a FIFO of request indices waiting for an SQE, and per-request progress. */
struct batch {
    struct pt_io_request *requests;
    struct iovec *iovecs; /* one per request, alive until its SQE completes */
    uint64_t *done;       /* bytes moved so far */
    size_t *queue;        /* circular FIFO of indices to (re)submit */
    size_t count;
    size_t queue_head;
    size_t queued;
};

static void batch_push(struct batch *b, size_t index)
{
    b->queue[(b->queue_head + b->queued) % b->count] = index;
    b->queued++;
}

static size_t batch_pop(struct batch *b)
{
    size_t index = b->queue[b->queue_head];
    b->queue_head = (b->queue_head + 1) % b->count;
    b->queued--;
    return index;
}

static void prep_request(struct pt_ring *ring, struct batch *b, size_t index)
{
    struct pt_io_request *request = &b->requests[index];
    uint64_t done = b->done[index];
    struct iovec *iov = &b->iovecs[index];
    struct io_uring_sqe *sqe = ring_next_sqe(ring);

    iov->iov_base = (char *)(uintptr_t)request->buffer + done;
    iov->iov_len = (size_t)(request->length - done);
    sqe->opcode = request->opcode == PT_OP_WRITE ? IORING_OP_WRITEV : IORING_OP_READV;
    sqe->fd = request->fd;
    sqe->addr = (uint64_t)(uintptr_t)iov;
    sqe->len = 1;
    sqe->off = request->offset + done;
    sqe->user_data = (uint64_t)index;
    ring->sq_local_tail++;
}

/* Applies one completion; requeues the request when it has more to move. */
static void complete_request(struct batch *b, size_t index, int res)
{
    struct pt_io_request *request = &b->requests[index];
    if (res == -EINTR || res == -EAGAIN) {
        batch_push(b, index);
    } else if (res < 0) {
        request->result = res;
    } else if (res == 0) {
        /* End of file for a read: report what arrived; a write that moves nothing is an error. */
        request->result = request->opcode == PT_OP_WRITE ? -EIO : (int64_t)b->done[index];
    } else {
        b->done[index] += (uint64_t)res;
        if (b->done[index] < request->length)
            batch_push(b, index);
        else
            request->result = (int64_t)b->done[index];
    }
}

/* Reaps every posted completion; returns how many. */
static unsigned reap(struct pt_ring *ring, struct batch *b)
{
    unsigned head = *ring->cq_head;
    unsigned tail = __atomic_load_n(ring->cq_tail, __ATOMIC_ACQUIRE);
    unsigned seen = 0;
    while (head != tail) {
        struct io_uring_cqe *cqe = &ring->cqes[head & *ring->cq_mask];
        size_t index = (size_t)cqe->user_data;
        int res = cqe->res;
        head++;
        seen++;
        if (b != NULL && index < b->count)
            complete_request(b, index, res);
    }
    __atomic_store_n(ring->cq_head, head, __ATOMIC_RELEASE);
    return seen;
}

static int run_batch(struct pt_ring *ring, struct batch *b)
{
    unsigned inflight = 0;
    while (b->queued > 0 || inflight > 0) {
        /* Never more in flight than SQ entries: the SQ cannot overfill and the CQ (twice as large)
         * cannot overflow. */
        while (b->queued > 0 && inflight < ring->sq_entries) {
            prep_request(ring, b, batch_pop(b));
            inflight++;
        }
        unsigned to_submit = ring_publish(ring);
        int ret = sys_io_uring_enter(ring->fd, to_submit, inflight > 0 ? 1 : 0, IORING_ENTER_GETEVENTS);
        if (ret < 0 && errno != EINTR && errno != EAGAIN && errno != EBUSY) {
            int status = -errno;
            /* The ring is unusable from here on: the SQ may still hold entries of this batch.  Wait
             * for what the kernel already owns before the buffers go back to the caller. */
            unsigned owned = inflight - (ring->sq_local_tail - __atomic_load_n(ring->sq_head, __ATOMIC_ACQUIRE));
            ring->broken = 1;
            while (owned > 0) {
                unsigned got = reap(ring, NULL);
                owned = got >= owned ? 0 : owned - got;
                if (owned > 0 && sys_io_uring_enter(ring->fd, 0, 1, IORING_ENTER_GETEVENTS) < 0 && errno != EINTR)
                    break;
            }
            return status;
        }
        inflight -= reap(ring, b);
    }
    return 0;
}

PT_EXPORT int pt_ring_submit(struct pt_ring *ring, struct pt_io_request *requests, size_t count)
{
    struct batch b;
    int status;

    if (ring == NULL || (requests == NULL && count > 0))
        return -EINVAL;
    if (count == 0)
        return 0;
    memset(&b, 0, sizeof(b));
    b.requests = requests;
    b.count = count;
    b.iovecs = calloc(count, sizeof(*b.iovecs));
    b.done = calloc(count, sizeof(*b.done));
    b.queue = calloc(count, sizeof(*b.queue));
    if (b.iovecs == NULL || b.done == NULL || b.queue == NULL) {
        status = -ENOMEM;
        goto out;
    }
    for (size_t i = 0; i < count; i++) {
        requests[i].result = 0;
        if (requests[i].length == 0)
            continue;
        if (requests[i].opcode != PT_OP_READ && requests[i].opcode != PT_OP_WRITE) {
            requests[i].result = -EINVAL;
            continue;
        }
        batch_push(&b, i);
    }

    pthread_mutex_lock(&ring->lock);
    status = ring->broken ? -EIO : run_batch(ring, &b);
    pthread_mutex_unlock(&ring->lock);
out:
    free(b.iovecs);
    free(b.done);
    free(b.queue);
    return status;
}

PT_EXPORT size_t pt_io_request_size(void)
{
    return sizeof(struct pt_io_request);
}

/* ---- CRC32C (Castagnoli, reflected polynomial 0x82F63B78) ---------------------------------- */

static uint32_t crc32c_table[8][256];
static int crc32c_use_hardware;
static pthread_once_t crc32c_once = PTHREAD_ONCE_INIT;

static void crc32c_init(void)
{
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t crc = n;
        for (int k = 0; k < 8; k++)
            crc = (crc & 1) ? (crc >> 1) ^ UINT32_C(0x82F63B78) : crc >> 1;
        crc32c_table[0][n] = crc;
    }
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t crc = crc32c_table[0][n];
        for (int k = 1; k < 8; k++) {
            crc = crc32c_table[0][crc & 0xff] ^ (crc >> 8);
            crc32c_table[k][n] = crc;
        }
    }
#if PT_HAVE_X86
    __builtin_cpu_init();
    crc32c_use_hardware = __builtin_cpu_supports("sse4.2") ? 1 : 0;
#endif
}

static uint32_t crc32c_software(uint32_t crc, const unsigned char *p, size_t length)
{
    while (length > 0 && ((uintptr_t)p & 7) != 0) {
        crc = crc32c_table[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
        length--;
    }
    while (length >= 8) {
        uint64_t word;
        memcpy(&word, p, 8);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        word = __builtin_bswap64(word);
#endif
        word ^= crc;
        crc = crc32c_table[7][word & 0xff] ^ crc32c_table[6][(word >> 8) & 0xff] ^
              crc32c_table[5][(word >> 16) & 0xff] ^ crc32c_table[4][(word >> 24) & 0xff] ^
              crc32c_table[3][(word >> 32) & 0xff] ^ crc32c_table[2][(word >> 40) & 0xff] ^
              crc32c_table[1][(word >> 48) & 0xff] ^ crc32c_table[0][word >> 56];
        p += 8;
        length -= 8;
    }
    while (length > 0) {
        crc = crc32c_table[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
        length--;
    }
    return crc;
}

#if PT_HAVE_X86
__attribute__((target("sse4.2"))) static uint32_t crc32c_sse42(uint32_t crc, const unsigned char *p,
                                                                size_t length)
{
    while (length > 0 && ((uintptr_t)p & 7) != 0) {
        crc = _mm_crc32_u8(crc, *p++);
        length--;
    }
#if defined(__x86_64__)
    uint64_t crc64 = crc;
    while (length >= 32) {
        uint64_t w0, w1, w2, w3;
        memcpy(&w0, p, 8);
        memcpy(&w1, p + 8, 8);
        memcpy(&w2, p + 16, 8);
        memcpy(&w3, p + 24, 8);
        crc64 = _mm_crc32_u64(crc64, w0);
        crc64 = _mm_crc32_u64(crc64, w1);
        crc64 = _mm_crc32_u64(crc64, w2);
        crc64 = _mm_crc32_u64(crc64, w3);
        p += 32;
        length -= 32;
    }
    while (length >= 8) {
        uint64_t word;
        memcpy(&word, p, 8);
        crc64 = _mm_crc32_u64(crc64, word);
        p += 8;
        length -= 8;
    }
    crc = (uint32_t)crc64;
#endif
    while (length >= 4) {
        uint32_t word;
        memcpy(&word, p, 4);
        crc = _mm_crc32_u32(crc, word);
        p += 4;
        length -= 4;
    }
    while (length > 0) {
        crc = _mm_crc32_u8(crc, *p++);
        length--;
    }
    return crc;
}
#endif

PT_EXPORT uint32_t pt_crc32c(uint32_t crc, const void *data, size_t length)
{
    pthread_once(&crc32c_once, crc32c_init);
    crc = ~crc;
#if PT_HAVE_X86
    if (crc32c_use_hardware)
        return ~crc32c_sse42(crc, data, length);
#endif
    return ~crc32c_software(crc, data, length);
}

/* The table implementation whatever the CPU, so tests can check it on SSE4.2 machines too. */
PT_EXPORT uint32_t pt_crc32c_software(uint32_t crc, const void *data, size_t length)
{
    pthread_once(&crc32c_once, crc32c_init);
    return ~crc32c_software(~crc, data, length);
}

PT_EXPORT int pt_crc32c_hardware(void)
{
    pthread_once(&crc32c_once, crc32c_init);
    return crc32c_use_hardware;
}

/* ---- CPython module: empty; the functions above are called through ctypes ----------------- */

static struct PyModuleDef diskio_module = {
    PyModuleDef_HEAD_INIT,
    "_diskio",
    "PagedLLM disk I/O engine (io_uring batches, CRC32C). Call it through "
    "pagedtensor.tiers.diskio, which loads this file with ctypes.",
    -1,
    NULL,
    NULL,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC PyInit__diskio(void)
{
    return PyModule_Create(&diskio_module);
}
