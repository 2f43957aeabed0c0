"""torch.distributed's collectives with PagedTensor arguments, two gloo processes on the CPU: each
in-place collective's result lands in the pages (it was dropped, or reverted when a clean page was
evicted), and asynchronous ones send and receive the tensor's own bytes (the pager gave the slots
to other pages before the queued work ran); their work tells what torch's tells (a future of the
results, a receive's source rank), compared with the same calls on plain tensors."""

from __future__ import annotations

import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")

PAGE = 4096


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _collectives(rank: int, make) -> dict[str, torch.Tensor]:
    """Each collective on tensors made by ``make`` (plain or paged), with other tensors' traffic
    between the steps; the values each ends with, as plain tensors."""
    def plain(t):
        return t.materialize() if hasattr(t, "materialize") else t

    churn = []

    def traffic():  # other tensors' pages take the device slots
        churn.extend(make(torch.full((3072,), 7.0)) for _ in range(3))
        for junk in churn[-3:]:
            junk.sum()

    results = {}
    tensor = make(torch.arange(3072.0) + rank)
    traffic()
    dist.all_reduce(tensor)
    traffic()
    results["all_reduce"] = plain(tensor)
    tensor = make(torch.arange(1024.0) * (rank + 1))
    dist.broadcast(tensor, src=1)
    traffic()
    results["broadcast"] = plain(tensor)
    output = make(torch.zeros(2048))
    dist.all_gather_into_tensor(output, make(torch.arange(1024.0) + 10 * rank))
    traffic()
    results["all_gather_into_tensor"] = plain(output)
    output = make(torch.zeros(1024))
    dist.reduce_scatter_tensor(output, make(torch.arange(2048.0) * (rank + 2)))
    results["reduce_scatter_tensor"] = plain(output)
    outputs = [make(torch.zeros(512)) for _ in range(2)]
    dist.all_gather(outputs, make(torch.arange(512.0) - rank))
    results["all_gather"] = torch.cat([plain(o) for o in outputs])
    sent = make(torch.arange(1024.0) + 100 * rank)
    if rank == 0:
        work = dist.isend(sent, dst=1)
        traffic()
        work.wait()
    else:
        received = make(torch.zeros(1024))
        dist.recv(received, src=0)
        results["isend/recv"] = plain(received)
    if rank == 0:
        dist.send(sent, dst=1)
    else:
        received = make(torch.zeros(1024))
        source = dist.recv(received, src=None)  # from any source: the work tells the sender's rank
        results["recv from any source"] = torch.cat([plain(received), torch.tensor([float(source)])])
    functional = torch.ops._c10d_functional
    if hasattr(functional, "irecv") and hasattr(functional, "batch_p2p_ops"):  # they write in place, unmarked
        group = dist.group.WORLD.group_name
        if rank == 0:
            functional.wait_tensor(functional.isend(make(torch.arange(512.0) * 3), 1, 0, group))
            sends = functional.batch_p2p_ops(["isend"], [1], [0], [make(torch.arange(256.0) - 7)], group)
            functional.wait_tensor(sends[0])
        else:
            received = make(torch.zeros(512))
            functional.wait_tensor(functional.irecv(received, 0, 0, group))
            results["functional irecv"] = plain(received)
            received = make(torch.zeros(256))
            functional.wait_tensor(functional.batch_p2p_ops(["irecv"], [0], [0], [received], group)[0])
            results["functional batch_p2p_ops irecv"] = plain(received)
    tensor = make(torch.arange(1024.0) + rank)
    work = dist.all_reduce(tensor, async_op=True)
    traffic()
    work.wait()
    results["all_reduce async"] = plain(tensor)
    tensor = make(torch.arange(1024.0) - rank)
    # A communication hook's way: the work's future gives the reduced tensor.
    value = dist.all_reduce(tensor, async_op=True).get_future().then(lambda done: done.value()[0] * 2).wait()
    results["all_reduce async future"] = plain(value)
    results["all_reduce async future's tensor"] = plain(tensor)
    return results


def _join_two_ranks(rank: int, port: int, timeout_s: int):
    """This process as ``rank`` of a 2-process gloo group; a pager of a 6-page device tier for it."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=timeout_s))
    from pagedtensor import MemoryConfig, Pager

    return Pager(MemoryConfig(page_size=PAGE, vram_limit=6 * PAGE, host_memory=256 * PAGE, slab_size=6 * PAGE,
                              prefetch_strategy="none", device="cpu"))  # fmt: skip


def _worker(rank: int, port: int, queue) -> None:
    pager = _join_two_ranks(rank, port, timeout_s=60)
    try:
        from pagedtensor import PagedTensor

        expected = _collectives(rank, lambda t: t.clone())
        got = _collectives(rank, lambda t: PagedTensor.wrap(t.clone(), pager))
        queue.put((rank, {name: torch.equal(got[name], value) for name, value in expected.items()}))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _run_two_ranks(worker, result_timeout: float, join_timeout: float) -> None:
    """``worker(rank, port, queue)`` in two spawned processes; each rank's ``{check: passed}`` (put
    on the queue) all true, and both processes ended cleanly."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = _free_port()
    processes = [context.Process(target=worker, args=(rank, port, queue)) for rank in range(2)]
    for process in processes:
        process.start()
    try:
        results = dict(queue.get(timeout=result_timeout) for _ in processes)
    finally:
        for process in processes:
            process.join(join_timeout)
            if process.is_alive():
                process.kill()
    for rank, same in sorted(results.items()):
        assert same and all(same.values()), f"rank {rank}: {same}"
    assert all(process.exitcode == 0 for process in processes)


def test_collectives_on_paged_tensors_equal_those_on_plain_tensors():
    _run_two_ranks(_worker, result_timeout=240, join_timeout=60)


def _deferred_receives(rank: int, make) -> tuple[dict[str, torch.Tensor], dict[str, bool]]:
    """Receives whose work the caller waits for later, each rank's receive posted before its send
    (a receive into a PagedTensor waited inside the op hung both ranks until the group's timeout):
    the values each ends with, as plain tensors; and, for PagedTensors, what their pages hold before
    the wait and whether a waited work is let go."""
    import gc
    import time
    import weakref

    def plain(t):
        return t.materialize() if hasattr(t, "materialize") else t

    paged = hasattr(make(torch.zeros(1)), "materialize")
    churn = []

    def traffic():  # other tensors' pages take the device slots
        churn.extend(make(torch.full((3072,), 7.0)) for _ in range(3))
        for junk in churn[-3:]:
            junk.sum()

    peer = 1 - rank
    results, checks = {}, {}
    received = make(torch.zeros(1024))
    works = dist.batch_isend_irecv([dist.P2POp(dist.irecv, received, peer), dist.P2POp(dist.isend, make(torch.arange(1024.0) + 100 * rank), peer)])
    traffic()
    for work in works:
        work.wait()
    results["batch_isend_irecv, receive first"] = plain(received)
    # Several outstanding receives, their works alive only in the list (a collection between).
    received = [make(torch.zeros(512)) for _ in range(3)]
    sent = [make(torch.arange(512.0) * (i + 1) - rank) for i in range(3)]
    works = dist.batch_isend_irecv([dist.P2POp(dist.irecv, r, peer) for r in received] + [dist.P2POp(dist.isend, s, peer) for s in sent])
    gc.collect()
    traffic()
    for work in reversed(works):
        work.wait()
    results["batch_isend_irecv, 3 receives"] = torch.cat([plain(r) for r in received])
    if paged:
        kept = weakref.ref(works[0])
        del works, work
        gc.collect()
        checks["a waited work is let go"] = kept() is None
    received = make(torch.zeros(1024))
    work = dist.irecv(received, peer)
    dist.send(make(torch.arange(1024.0) - 5 * rank), peer)
    if paged:
        checks["pages keep their bytes until the wait"] = torch.equal(plain(received), torch.zeros(1024))
    work.wait()
    if paged:
        work.wait()  # a second wait returns, copying nothing again (gloo's own recv work cannot be waited twice)
    results["irecv, send, wait"] = plain(received)
    if rank == 0:
        dist.send(make(torch.arange(256.0) * 7), 1)
    else:
        received = make(torch.zeros(256))
        work = dist.irecv(received)  # from any source: the work tells the sender's rank
        work.wait()
        results["irecv from any source"] = torch.cat([plain(received), torch.tensor([float(work._source_rank())])])
    tensor = make(torch.arange(1024.0) * (rank + 3))
    work = dist.all_reduce(tensor, async_op=True)
    deadline = time.monotonic() + 15
    while not work.is_completed() and time.monotonic() < deadline:  # once it reports complete, the pages hold the result
        time.sleep(0.01)
    results["all_reduce async_op=True, is_completed"] = plain(tensor)
    work.wait()
    tensor = make(torch.arange(1024.0) * (rank + 1))
    work = dist.all_reduce(tensor, async_op=True)
    traffic()
    work.wait()
    results["all_reduce async_op=True"] = plain(tensor)
    tensor = make(torch.arange(1024.0) + rank)
    work = dist.all_reduce(tensor, async_op=True)
    results["all_reduce async_op=True, future's value"] = plain(work.get_future().wait()[0])
    results["all_reduce async_op=True, future's tensor"] = plain(tensor)
    work.wait()
    functional = torch.ops._c10d_functional
    if hasattr(functional, "irecv") and hasattr(functional, "batch_p2p_ops"):
        group = dist.group.WORLD.group_name
        received = make(torch.zeros(512))
        receive = functional.irecv(received, peer, 0, group)
        send = functional.isend(make(torch.arange(512.0) + 3 * rank), peer, 0, group)
        traffic()
        functional.wait_tensor(receive)
        functional.wait_tensor(send)
        results["functional irecv, isend, wait_tensor"] = plain(received)
        received = make(torch.zeros(256))
        outputs = functional.batch_p2p_ops(["irecv", "isend"], [peer, peer], [0, 0], [received, make(torch.arange(256.0) * (rank - 2))], group)
        for output in outputs:
            functional.wait_tensor(output)
        results["functional batch_p2p_ops, receive first"] = plain(received)
    # A receive never waited for: its pages keep their bytes (read before any wait).
    received = make(torch.full((128,), -1.0))
    work = dist.irecv(received, peer)
    dist.send(make(torch.arange(128.0)), peer)
    dist.barrier()
    if paged:
        checks["an unwaited receive's pages keep their bytes"] = torch.equal(plain(received), torch.full((128,), -1.0))
    return results, checks


def _deferred_worker(rank: int, port: int, queue) -> None:
    # A short timeout: a receive that waits for its peer's send inside the op fails, not hangs long.
    pager = _join_two_ranks(rank, port, timeout_s=20)
    try:
        from pagedtensor import PagedTensor

        try:
            expected, _ = _deferred_receives(rank, lambda t: t.clone())
            got, checks = _deferred_receives(rank, lambda t: PagedTensor.wrap(t.clone(), pager))
            same = {name: name in got and torch.equal(got[name], value) for name, value in expected.items()}
            queue.put((rank, {**same, **checks}))
        except Exception as error:  # noqa: BLE001 - reported to the test
            queue.put((rank, {f"{type(error).__name__}: {str(error)[:200]}": False}))
            raise
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_receives_into_paged_tensors_are_waited_for_by_the_caller():
    """A receive into a PagedTensor returns before its peer sends (batch_isend_irecv with the
    receive first, irecv then send, the functional forms); its work's wait (or is_completed, or its
    future) puts the received bytes in the pages; async all_reduce likewise."""
    _run_two_ranks(_deferred_worker, result_timeout=150, join_timeout=30)


def test_a_paged_write_inside_coalesced_collectives_is_refused_before_it_runs():
    """Inside a coalescing manager (NCCL's batch_isend_irecv) torch hands back one work for the
    batch, so a deferred copy into the pages would never run: refused, naming the way round, before
    the op runs (one gloo rank, the coalescing state as torch's manager sets it)."""
    from torch.distributed import distributed_c10d

    from pagedtensor import MemoryConfig, PagedTensor, Pager

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        group = dist.group.WORLD
        with Pager(MemoryConfig(vram_limit=16 * PAGE, host_memory=16 * PAGE, page_size=PAGE, device="cpu")) as pager:
            tensor = PagedTensor.wrap(torch.arange(8.0), pager)
            distributed_c10d._world.pg_coalesce_state[group] = []
            try:
                with pytest.raises(NotImplementedError, match="coalesced collectives.*plain tensor"):
                    dist.broadcast(tensor, src=0)
            finally:
                del distributed_c10d._world.pg_coalesce_state[group]
            dist.broadcast(tensor, src=0)  # outside it: runs
            assert torch.equal(tensor.materialize(), torch.arange(8.0))
    finally:
        dist.destroy_process_group()
