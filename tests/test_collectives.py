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


def _worker(rank: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    try:
        from pagedtensor import MemoryConfig, PagedTensor, Pager

        pager = Pager(MemoryConfig(page_size=PAGE, vram_limit=6 * PAGE, host_memory=256 * PAGE, slab_size=6 * PAGE,
                                   prefetch_strategy="none", device="cpu"))  # fmt: skip
        expected = _collectives(rank, lambda t: t.clone())
        got = _collectives(rank, lambda t: PagedTensor.wrap(t.clone(), pager))
        queue.put((rank, {name: torch.equal(got[name], value) for name, value in expected.items()}))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_collectives_on_paged_tensors_equal_those_on_plain_tensors():
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = _free_port()
    processes = [context.Process(target=_worker, args=(rank, port, queue)) for rank in range(2)]
    for process in processes:
        process.start()
    try:
        results = dict(queue.get(timeout=240) for _ in processes)
    finally:
        for process in processes:
            process.join(60)
            if process.is_alive():
                process.kill()
    for rank, same in sorted(results.items()):
        assert all(same.values()), f"rank {rank}: {same}"
    assert all(process.exitcode == 0 for process in processes)
