"""Ctrl-C (KeyboardInterrupt) in the middle of paging, as in a notebook: the run after it works.

A real Ctrl-C lands between bytecodes, most often right after a blocking call returns: a disk read or
write, a wait for a lock another thread holds (the prefetch thread holds the pager's lock during its
disk reads), a big copy, a layer's forward. After it the pager must hold no pin (budgets are not eaten
up), no lock, and every byte it held (a write cut short leaves each page old or new, never garbage);
``generate`` run again gives the unpaged tokens.

Interrupts are real SIGINTs sent to the main thread where the blocking call is a wait (a lock, a
thread's join), and exceptions raised by wrapped functions where it is a disk transfer, a copy or a
layer. The SIGINT handler raises :class:`Interrupted`, a ``BaseException`` like ``KeyboardInterrupt``
(one that would not stop pytest if it escaped).
"""

from __future__ import annotations

import contextlib
import functools
import signal
import threading
from typing import Callable, Iterator

import pytest
import torch

from pagedtensor import MemoryConfig, PagedTensor, Pager
from pagedtensor.pager import ResidentPages
from pagedtensor.tiers.disk import DiskTier
from pagedtensor.transfer import TransferEngine

PAGE = 4096


class Interrupted(BaseException):
    """What Ctrl-C raises in these tests (a BaseException that is not an Exception, as KeyboardInterrupt)."""


@pytest.fixture
def sigint_raises_interrupted() -> Iterator[None]:
    def interrupt(signum, frame):
        raise Interrupted()

    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def make_pager(nvme: str, device_pages: int = 4, host_pages: int = 3, **kwargs) -> Pager:
    defaults = dict(prefetch_strategy="none", device="cpu")
    config = MemoryConfig(vram_limit=device_pages * PAGE, host_memory=host_pages * PAGE, page_size=PAGE, nvme_path=nvme,
                          **{**defaults, **kwargs})  # fmt: skip
    return Pager(config)


def random_bytes(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def assert_consistent(pager: Pager, allocations) -> None:
    """No pin, no page half-way through a fault or an overwrite, every slot of every tier owned by a
    page, and the pager's lock free for another thread."""
    pager._drain_prefetches()
    for allocation in allocations:
        assert not allocation.pins, f"allocation {allocation.id} ({allocation.name}) left pinned: {allocation.pins}"
    assert not pager._overwriting and not pager._filling
    pages = [page for allocation in pager._allocations.values() for page in allocation.pages]
    assert sum(page.device_slot is not None for page in pages) == pager.device_tier.used_pages
    assert sum(page.host_slot is not None for page in pages) == pager.host_tier.used_pages
    if pager.disk_tier is not None:
        assert sum(page.disk_slot is not None for page in pages) == pager.disk_tier.used_pages
    taken: list[bool] = []
    thread = threading.Thread(target=lambda: taken.append(pager._lock.acquire(timeout=5)) or (taken[-1] and pager._lock.release()))
    thread.start()
    thread.join()
    assert taken == [True], "the pager's lock is still held"


def assert_old_or_new(got: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> None:
    for start in range(0, got.numel(), PAGE):
        page = slice(start, start + PAGE)
        assert torch.equal(got[page], old[page]) or torch.equal(got[page], new[page]), f"page {start // PAGE} is neither"


@contextlib.contextmanager
def lock_held_elsewhere(pager: Pager) -> Iterator[Callable[[], None]]:
    """Yields ``take()``: another thread takes the pager's lock for half a second, as the prefetch
    thread does for its disk reads, and sends SIGINT to the main thread a moment after taking it
    (while the main thread waits for the lock)."""
    taken, done = threading.Event(), threading.Event()
    threads: list[threading.Thread] = []

    def hold() -> None:
        with pager._lock:
            taken.set()
            threading.Timer(0.05, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT)).start()
            done.wait(0.5)  # the disk read ends

    def take() -> None:
        threads.append(threading.Thread(target=hold))
        threads[-1].start()
        taken.wait(10)

    try:
        yield take
    finally:
        done.set()
        for thread in threads:
            thread.join()


# ---------------------------------------------------------------------------------------- the pager


@pytest.mark.parametrize("op", ["read", "write"])
def test_a_fault_interrupted_while_its_sequential_prefetch_waits_for_the_lock_leaves_nothing_pinned(
    nvme_dir, monkeypatch, sigint_raises_interrupted, op
):
    """``ensure_resident`` pins, faults, then asks for the sequential prefetch, which waits for the
    pager's lock; Ctrl-C there used to leave the pages pinned for good (and, for a write, zero-filled
    in place of their old bytes)."""
    pager = make_pager(nvme_dir, device_pages=8, host_pages=8, prefetch_strategy="sequential", prefetch_pages=2)
    allocation = pager.allocate(8 * PAGE)
    old = random_bytes(8 * PAGE, 1)
    pager.write(allocation, old)
    pager.evict_all()
    real_prefetch = pager.prefetch
    with lock_held_elsewhere(pager) as take:

        def prefetch(*args, **kwargs):
            take()
            return real_prefetch(*args, **kwargs)

        monkeypatch.setattr(pager, "prefetch", prefetch)
        with pytest.raises(Interrupted):
            if op == "read":
                pager.read(allocation, 0, 2 * PAGE)
            else:
                # Page 0 whole: zero-filled, not faulted in; page 1 in part: read, so the prefetch follows
                # (a fault of pages all overwritten whole prefetches nothing).
                pager.write(allocation, random_bytes(PAGE + PAGE // 2, 2))
    monkeypatch.undo()
    assert_consistent(pager, [allocation])
    assert torch.equal(pager.read(allocation), old)
    new = random_bytes(8 * PAGE, 3)
    pager.write(allocation, new)
    pager.evict_all()
    assert torch.equal(pager.read(allocation), new)
    assert not allocation.pins
    pager.close()


@pytest.mark.parametrize("op", ["release", "write"])
def test_a_release_interrupted_while_it_waits_for_the_lock_still_unpins_the_pages(nvme_dir, monkeypatch, sigint_raises_interrupted, op):
    """``ResidentPages.release`` marks itself done, then waits for the pager's lock; Ctrl-C there (the
    prefetch thread holds the lock for its disk reads) left the pages pinned for good: the release
    could not be retried ("already released"), the pages never left the device and ``free`` refused
    the allocation. A write's overwrite also kept its zero-filled slots as unwritten overwrites."""
    pager = make_pager(nvme_dir, device_pages=4, host_pages=4)
    allocation = pager.allocate(2 * PAGE)
    old, new = random_bytes(2 * PAGE, 1), random_bytes(2 * PAGE, 2)
    pager.write(allocation, old)
    pager.evict_all()
    with lock_held_elsewhere(pager) as take:
        if op == "release":
            resident = pager.ensure_resident(allocation)
            take()
            with pytest.raises(Interrupted):
                resident.release()
        else:
            real_release = ResidentPages.release

            def release(self, **kwargs):
                take()
                return real_release(self, **kwargs)

            monkeypatch.setattr(ResidentPages, "release", release)
            with pytest.raises(Interrupted):
                pager.write(allocation, new)  # both pages whole: zero-filled, then written
            monkeypatch.undo()
    assert_consistent(pager, [allocation])
    expected = old if op == "release" else new
    assert torch.equal(pager.read(allocation), expected)
    pager.evict_all()
    assert all(info.device_slot is None for info in pager.page_table(allocation))
    assert torch.equal(pager.read(allocation), expected)
    pager.free(allocation)
    pager.close()


def test_release_together_interrupted_while_it_waits_for_the_lock_still_unpins_every_range(nvme_dir, sigint_raises_interrupted):
    """``release_together`` (a CUDA op's windows, released behind one event) takes the pager's lock
    before releasing any range; Ctrl-C while it waited left every range pinned for good."""
    pager = make_pager(nvme_dir, device_pages=4, host_pages=4)
    first, second = pager.allocate(PAGE), pager.allocate(PAGE)
    residents = [pager.ensure_resident(first), pager.ensure_resident(second)]
    residents[1].views()[0].fill_(9)
    with lock_held_elsewhere(pager) as take:
        take()
        with pytest.raises(Interrupted):
            pager.release_together([(residents[0], ()), (residents[1], {0})])
    assert_consistent(pager, [first, second])
    assert torch.equal(pager.read(second), torch.full((PAGE,), 9, dtype=torch.uint8))
    pager.evict_all()
    assert torch.equal(pager.read(second), torch.full((PAGE,), 9, dtype=torch.uint8))
    pager.close()


def test_an_op_interrupted_while_its_first_window_release_waits_for_the_lock_unpins_every_window(
    nvme_dir, monkeypatch, sigint_raises_interrupted
):
    """An op on two PagedTensors releases its windows one after another; Ctrl-C while the first release
    waited for the pager's lock stopped there, and the second window stayed pinned for good (its
    allocation could not be freed, nor its pages leave the device)."""
    from pagedtensor import PagedTensor

    pager = make_pager(nvme_dir, device_pages=8, host_pages=8)
    a = PagedTensor.wrap(torch.ones(2 * PAGE // 4), pager=pager)
    b = PagedTensor.wrap(torch.full((2 * PAGE // 4,), 2.0), pager=pager)
    real_release = ResidentPages.release
    with lock_held_elsewhere(pager) as take:
        calls: list[int] = []

        def release(self, **kwargs):
            calls.append(1)
            if len(calls) == 1:
                take()
            return real_release(self, **kwargs)

        monkeypatch.setattr(ResidentPages, "release", release)
        with pytest.raises(Interrupted):
            a.add_(b)
        monkeypatch.undo()
    assert_consistent(pager, list(pager._allocations.values()))
    assert torch.equal(a.materialize(), torch.full((2 * PAGE // 4,), 3.0))
    assert torch.equal(b.materialize(), torch.full((2 * PAGE // 4,), 2.0))
    pager.close()


def test_a_close_interrupted_while_it_waits_for_the_copies_releases_the_tiers_on_the_next_close(nvme_dir, monkeypatch):
    """``close`` marks the pager closed, then waits for the copies in flight (a CUDA synchronize);
    Ctrl-C right after that wait used to leave every tier (the page file, the host and device slabs)
    allocated, and a second ``close`` returned at once."""
    pager = make_pager(nvme_dir, device_pages=4, host_pages=2)
    allocation = pager.allocate(6 * PAGE)
    pager.write(allocation, random_bytes(6 * PAGE))
    pager.evict_all()
    pager.read(allocation, 0, PAGE)
    _interrupt_nth_call(monkeypatch, [(pager.engine, "synchronize")], 1, "after")
    with pytest.raises(Interrupted):
        pager.close()
    monkeypatch.undo()
    assert pager.closed
    with pytest.raises(RuntimeError, match="closed"):
        pager.allocate(PAGE)
    assert pager.disk_tier is not None and not pager.disk_tier.closed
    pager.close()
    assert pager.disk_tier.closed and not pager.host_tier.slabs and not pager.device_tier.slabs
    pager.close()  # idempotent


def _interrupt_nth_call(monkeypatch, targets, n: int, when: str) -> dict:
    """Wrap ``(owner, name)`` callables: the ``n``-th call (counted over all of them, main thread only,
    where signals land) raises :class:`Interrupted` before or after the real call."""
    state = {"calls": 0, "fired": None}
    for owner, name in targets:
        real = getattr(owner, name)

        def wrapper(*args, _real=real, _name=name, **kwargs):
            if threading.current_thread() is not threading.main_thread():
                return _real(*args, **kwargs)
            state["calls"] += 1
            fire = state["calls"] == n
            if fire and when == "before":
                state["fired"] = (_name, when)
                raise Interrupted()
            out = _real(*args, **kwargs)
            if fire:
                state["fired"] = (_name, when)
                raise Interrupted()
            return out

        monkeypatch.setattr(owner, name, functools.wraps(real)(wrapper))
    return state


PAGER_BLOCKING = [(DiskTier, "write_pages"), (DiskTier, "read_pages"), (TransferEngine, "copy"), (TransferEngine, "zero")]


def _pager_steps(pager: Pager, allocations) -> list:
    """``(allocation index or None, callable, new bytes)``: writes spill to disk, reads come back from it."""
    a, b = allocations
    partial = random_bytes(3 * PAGE, 13)
    return [
        (0, lambda: pager.write(a, random_bytes(6 * PAGE, 10)), random_bytes(6 * PAGE, 10)),
        (1, lambda: pager.write(b, random_bytes(5 * PAGE, 11)), random_bytes(5 * PAGE, 11)),
        (None, lambda: pager.read(a), None),
        (1, lambda: pager.write(b, partial, PAGE // 2), "partial"),
        (None, pager.evict_all, None),
        (0, lambda: pager.write(a, random_bytes(6 * PAGE, 12)), random_bytes(6 * PAGE, 12)),
        (None, lambda: pager.read(b), None),
    ], partial


@pytest.mark.parametrize("when", ["before", "after"])
def test_pager_interrupted_at_every_blocking_call_keeps_every_byte(nvme_dir, monkeypatch, when):
    """Ctrl-C at the n-th disk transfer or copy of a run of writes and reads that spill to disk: then
    nothing is pinned, every slot is owned, the interrupted write left each page old or new, and the
    pager works on."""
    count = None
    n = 1
    while count is None or n <= count:
        pager = make_pager(nvme_dir)
        allocations = [pager.allocate(6 * PAGE), pager.allocate(5 * PAGE)]
        expected = [torch.zeros(6 * PAGE, dtype=torch.uint8), torch.zeros(5 * PAGE, dtype=torch.uint8)]
        steps, partial = _pager_steps(pager, allocations)
        state = _interrupt_nth_call(monkeypatch, PAGER_BLOCKING, n if count is not None else 0, when)
        cut = None
        for index, step, new in steps:
            if isinstance(new, str):
                new = expected[index].clone()
                new[PAGE // 2 : PAGE // 2 + partial.numel()] = partial
            try:
                step()
            except Interrupted:
                cut = (index, new)
                break
            if index is not None:
                expected[index] = new
        monkeypatch.undo()
        if count is None:
            count = state["calls"]
            assert count > 20 and cut is None
        else:
            assert state["fired"] is not None
        assert_consistent(pager, allocations)
        for index, allocation in enumerate(allocations):
            got = pager.read(allocation)
            if cut is not None and cut[0] == index:
                assert_old_or_new(got, expected[index], cut[1])
            else:
                assert torch.equal(got, expected[index]), (n, state["fired"], index)
        for index, allocation in enumerate(allocations):  # and it works on
            pager.write(allocation, random_bytes(allocation.nbytes, 20 + index))
        pager.evict_all()
        for index, allocation in enumerate(allocations):
            assert torch.equal(pager.read(allocation), random_bytes(allocation.nbytes, 20 + index))
        pager.close()
        n += 1


# ---------------------------------------------------------------------------------------- generate


def test_generate_interrupted_at_layers_and_disk_reads_then_run_again_gives_the_unpaged_tokens(nvme_dir, monkeypatch):
    """Ctrl-C during ``generate`` with a paged KV cache and paged weights, right after a decoder
    layer's forward (where torch skips even ``always_call`` forward hooks: a KeyboardInterrupt is no
    Exception) or after a disk read of the weights: the cache's pages are freed, nothing stays
    pinned, the weights are intact, and the next ``generate`` gives the unpaged tokens."""
    pytest.importorskip("transformers")
    from pagedtensor import enable_paging
    from pagedtensor.hf import paging_state
    from pagedtensor.tensor import PagedTensor
    from tests.hf.tiny_models import prompts, tiny_budget, tiny_pair

    reference, model = tiny_pair("llama", attn="sdpa")
    ids, mask = prompts(1, length=24)
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    enable_paging(model, tiny_budget(nvme_dir, vram_pages=24, host_pages=16), attn_implementation="sdpa", prefill_chunk_size=16,
                  page_weights=True)  # fmt: skip
    pager = paging_state(model).pager
    layer_calls = {"count": 0, "interrupt_at": 0}

    def after_layer(module, args, output):
        layer_calls["count"] += 1
        if layer_calls["count"] == layer_calls["interrupt_at"]:
            raise Interrupted()

    hooks = [layer.register_forward_hook(after_layer) for layer in model.model.layers]
    try:
        # 6 layer forwards a generate (2 layers, 3 forwards); some 50 disk reads on this thread (the
        # prefetch thread takes the others, as timing has it: a late point may not be reached)
        points = [("layer", n) for n in (1, 2, 5, 6)] + [("read_pages", n) for n in (1, 4, 12)]
        for kind, n in points:
            layer_calls.update(count=0, interrupt_at=n if kind == "layer" else 0)
            if kind == "read_pages":
                _interrupt_nth_call(monkeypatch, [(DiskTier, "read_pages")], n, "after")
            try:
                model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
            except Interrupted:
                pass
            else:
                assert kind == "read_pages", f"not interrupted at {kind} {n}"
            monkeypatch.undo()
            assert_consistent(pager, list(pager._allocations.values()))
            assert not [allocation.name for allocation in pager._allocations.values() if allocation.name.startswith("kv.")]
            layer_calls["interrupt_at"] = 0
            assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False), expected), (kind, n)
        for (name, weight), (_, dense) in zip(model.named_parameters(), reference.named_parameters()):
            assert torch.equal(weight.materialize() if isinstance(weight, PagedTensor) else weight, dense), name
    finally:
        for hook in hooks:
            hook.remove()
        pager.close()


def test_a_write_interrupted_as_its_contended_write_lock_is_granted_leaves_the_lock_free(sigint_raises_interrupted):
    """An op writing a PagedTensor takes the allocation's write lock. Another thread holds it, then
    lets go and sends SIGINT at once: the op may wake holding the lock with the interrupt pending,
    which lands before the op runs. The lock must be free afterwards (it stayed held, and the next
    write to the tensor, in any thread, hung), whichever point the interrupt lands at."""
    from pagedtensor import PagedTensor

    main = threading.get_ident()
    with Pager(MemoryConfig(vram_limit=4 * PAGE, host_memory=4 * PAGE, page_size=PAGE, device="cpu")) as pager:
        tensor = PagedTensor.wrap(torch.zeros(PAGE // 4), pager)
        tensor.add_(0)  # torch's lazy imports on the op's first run happen now, not under the interrupt
        lock = tensor._paged.write_lock  # reentrant: held by another thread, and checked from one
        for _ in range(30):
            held, waiting = threading.Event(), threading.Event()

            def hold_release_and_interrupt() -> None:
                lock.acquire()
                held.set()
                waiting.wait()
                threading.Event().wait(0.01)  # the main thread waits inside acquire by now
                lock.release()
                signal.pthread_kill(main, signal.SIGINT)

            thread = threading.Thread(target=hold_release_and_interrupt)
            thread.start()
            held.wait()
            waiting.set()
            with pytest.raises(Interrupted):
                tensor.add_(1)
                threading.Event().wait(5)  # the op ran before the interrupt landed: it lands here
            thread.join()
            taken: list[bool] = []

            def take_and_let_go() -> None:
                taken.append(lock.acquire(timeout=1))
                if taken[0]:
                    lock.release()

            checker = threading.Thread(target=take_and_let_go)
            checker.start()
            checker.join()
            assert taken == [True], "the write lock stayed held"
        values = tensor.materialize()
        assert torch.equal(values, torch.full_like(values, values[0].item()))  # each add_ whole or not at all


# ------------------------------------------------------------------- a Ctrl-C at any point of an op


@pytest.fixture
def pagers_sigint_handler(monkeypatch) -> Iterator[None]:
    """SIGINT with Python's default handler, then the pager's deferring one installed over it (what a
    script or notebook gets from its first Pager), restored after the test."""
    from pagedtensor import interrupts

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    interrupts.install()
    try:
        assert signal.getsignal(signal.SIGINT) is interrupts._note_or_raise
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        interrupts._pending = False


def _ctrl_c_at_call(number: int) -> Callable:
    """A ``sys.settrace`` tracer that sends SIGINT to this process at the ``number``-th Python call:
    Python runs the handler at its next check, between two bytecodes, as a real Ctrl-C."""
    import os

    calls = [0]

    def tracer(frame, event, arg):
        if event == "call":
            calls[0] += 1
            if calls[0] == number:  # (tracing stops in the caller: sys.settrace(None) in here crashed CPython 3.11)
                os.kill(os.getpid(), signal.SIGINT)
        return None

    return tracer


def _run_with_ctrl_c_at_call(number: int, call: Callable[[], object]) -> tuple[bool, object]:
    """``call()`` with SIGINT sent at its ``number``-th Python call (:func:`_ctrl_c_at_call`): whether it
    returned, and what it returned (None where KeyboardInterrupt was raised)."""
    import sys

    sys.settrace(_ctrl_c_at_call(number))
    try:
        return True, call()
    except KeyboardInterrupt:
        return False, None
    finally:
        sys.settrace(None)


INTERRUPTED_OPS = {
    "add_": (lambda t: t.add_(1), lambda x: x + 1),
    "index_put_": (lambda t: t.index_put_((torch.tensor([3, 9000, 15000]),), torch.tensor(5.0)),
                   lambda x: x.index_put((torch.tensor([3, 9000, 15000]),), torch.tensor(5.0))),
    "materialize": (lambda t: t.materialize(), lambda x: x),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(INTERRUPTED_OPS))
def test_a_ctrl_c_at_any_call_of_an_op_leaves_the_pager_consistent(nvme_dir, pagers_sigint_handler, name):
    """A Ctrl-C landing at every third Python call, in turn, of an op past the tier with a disk tier
    (faults, evictions to host and disk, pins, policy entries): the op completes (or has not begun)
    and KeyboardInterrupt is raised as it returns, leaving no pin, no slot without its page, the values the op gives, and
    every byte freed with the tensor. Raised where it landed, 146 of 1,026 such interrupts left
    pins for ever, leaked host or disk slots, or a page the policies no longer knew (KeyError)."""
    op, expected_of = INTERRUPTED_OPS[name]
    number, interrupted = 1, 0
    while True:
        pager = make_pager(nvme_dir, device_pages=4, host_pages=8, slab_size=8 * PAGE)
        x = torch.arange(16 * 1024, dtype=torch.float32)
        t = PagedTensor.wrap(x.clone(), pager)
        done, _ = _run_with_ctrl_c_at_call(number, lambda: op(t))
        if done:
            break
        interrupted += 1
        assert_consistent(pager, list(pager._allocations.values()))
        assert any(torch.equal(t.materialize(), values) for values in (x, expected_of(x)))  # before it began, or done
        op(t)  # runs again
        del t  # freed by reference counting (a gc.collect() a try would take minutes)
        stats = pager.stats()
        assert stats["allocations"] == 0 and not any(stats["resident_bytes"].values()), (number, stats)
        pager.close()
        number += 3  # every third call: all of them take a minute
    assert interrupted > 30  # the op makes over 100 calls


def _ctrl_c_on_entering(code) -> Callable:
    """A ``sys.settrace`` tracer that sends SIGINT to this process as a call of ``code`` starts."""
    import os

    def tracer(frame, event, arg):
        if event == "call" and frame.f_code is code:
            os.kill(os.getpid(), signal.SIGINT)
        return None

    return tracer


def test_a_ctrl_c_as_wrap_registers_its_storage_leaks_nothing(pagers_sigint_handler):
    """A Ctrl-C landing after ``wrap`` wrote the pages, as the storage that frees them is made: it
    is raised as ``wrap`` returns, and the allocation goes with the tensor (it was kept for good)."""
    import sys

    from pagedtensor.tensor import PagedStorage

    with Pager(MemoryConfig(vram_limit=4 * PAGE, host_memory=64 * PAGE, page_size=PAGE, slab_size=8 * PAGE, prefetch_strategy="none",
                            device="cpu")) as pager:  # fmt: skip
        sys.settrace(_ctrl_c_on_entering(PagedStorage.__init__.__code__))
        try:
            with pytest.raises(KeyboardInterrupt):
                PagedTensor.wrap(torch.arange(8 * 1024, dtype=torch.float32), pager)
        finally:
            sys.settrace(None)
        assert pager.stats()["allocations"] == 0


def test_a_ctrl_c_as_generate_frees_its_cache_frees_every_page(nvme_dir, pagers_sigint_handler):
    """A Ctrl-C landing as ``generate``'s KV cache frees its pages: every allocation is freed (the
    interrupt stopped the loop after the first, the rest kept for the pager's life)."""
    import sys

    import transformers

    from pagedtensor import enable_paging
    from pagedtensor.hf import paging_state
    from pagedtensor.hf.cache import _release_pages

    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=128, vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    enable_paging(model, MemoryConfig(vram_limit=24 * PAGE, host_memory=16 * PAGE, page_size=PAGE, nvme_path=nvme_dir, device="cpu",
                                      slab_size=PAGE), attn_implementation="sdpa")  # fmt: skip
    pager = paging_state(model).pager
    ids = torch.randint(3, 128, (1, 24), generator=torch.Generator().manual_seed(1))
    options = dict(attention_mask=torch.ones_like(ids), max_new_tokens=3, min_new_tokens=3, do_sample=False)
    sys.settrace(_ctrl_c_on_entering(getattr(_release_pages, "__wrapped__", _release_pages).__code__))
    try:
        with pytest.raises(KeyboardInterrupt):
            model.generate(ids, **options)
    finally:
        sys.settrace(None)
    assert [allocation.name for allocation in pager._allocations.values()] == []


def test_a_ctrl_c_inside_ensure_resident_leaves_no_pin(nvme_dir, pagers_sigint_handler):
    """A Ctrl-C landing at every second Python call, in turn, of a direct ``ensure_resident`` that
    faults pages in from host and disk: KeyboardInterrupt is raised as it returns, and the pages it
    pinned are let go first. The pinned range was dropped with the interrupt, its pin kept for ever:
    the allocation could not be freed nor its pages leave the device."""
    number, interrupted = 1, 0
    while True:
        pager = make_pager(nvme_dir, device_pages=4, host_pages=4, slab_size=4 * PAGE)
        data = torch.randint(0, 256, (12 * PAGE,), dtype=torch.uint8)
        allocation = pager.allocate(12 * PAGE)
        pager.write(allocation, data)
        done, resident = _run_with_ctrl_c_at_call(number, lambda: pager.ensure_resident(allocation, 2, 5))
        if done:
            resident.release()
            pager.close()
            break
        interrupted += 1
        assert not allocation.pins, (number, dict(allocation.pins))
        assert_consistent(pager, [allocation])
        assert torch.equal(pager.read(allocation), data)
        pager.free(allocation)
        pager.close()
        number += 2
    assert interrupted > 10


def test_a_ctrl_c_while_waiting_for_another_threads_overwrite_raises_at_once(pagers_sigint_handler):
    """A request for pages another thread is overwriting whole (``ensure_resident(discard=...)``)
    waits for that holder's release; a Ctrl-C there was held back until ``pin_wait_s`` ran out, where
    a wait for pins raises at once."""
    import os
    import time

    config = MemoryConfig(vram_limit=4 * PAGE, host_memory=8 * PAGE, page_size=PAGE, slab_size=8 * PAGE, prefetch_strategy="none",
                          device="cpu", pin_wait_s=20)  # fmt: skip
    with Pager(config) as pager:
        allocation = pager.allocate(2 * PAGE)
        pager.write(allocation, torch.full((2 * PAGE,), 3, dtype=torch.uint8))
        pager.evict_all()
        held, done = threading.Event(), threading.Event()

        def overwriter() -> None:
            resident = pager.ensure_resident(allocation, discard=[0, 1])
            held.set()
            done.wait(30)
            resident.release()

        thread = threading.Thread(target=overwriter)
        thread.start()
        held.wait()
        timer = threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT))
        timer.start()
        started = time.monotonic()
        try:
            with pytest.raises(KeyboardInterrupt):
                with pager.ensure_resident(allocation):
                    pass
            assert time.monotonic() - started < 5
        finally:
            done.set()
            thread.join()
            timer.cancel()
        assert not allocation.pins and torch.equal(pager.read(allocation), torch.full((2 * PAGE,), 3, dtype=torch.uint8))


def _small_pager() -> Pager:
    return Pager(MemoryConfig(vram_limit=4 * PAGE, host_memory=64 * PAGE, page_size=PAGE, slab_size=8 * PAGE, prefetch_strategy="none",
                              device="cpu"))  # fmt: skip


def _allocations_once_collected(pager: Pager) -> int:
    """The pager's live allocations, after a collection where reference counting left some (a
    traceback's frames in a cycle): what a leak is not."""
    import gc

    if pager.stats()["allocations"]:
        gc.collect()
    return pager.stats()["allocations"]


def test_a_ctrl_c_at_any_call_of_dropping_a_paged_tensor_still_frees_it(pagers_sigint_handler):
    """A Ctrl-C landing at each Python call, in turn, of the free run as the last reference to a
    PagedTensor goes: the free is done whole (the interrupt is lost, as Python loses what a finalizer
    raises). Raised where it landed, before the free's pager call began (weakref.finalize's own
    code, the finalizer's first lines), it lost the free for good: the allocation stayed."""
    with _small_pager() as pager:
        for number in range(1, 40):
            holder = [PagedTensor.wrap(torch.arange(3 * 1024, dtype=torch.float32), pager)]
            _run_with_ctrl_c_at_call(number, holder.clear)
            assert _allocations_once_collected(pager) == 0, number


@pytest.mark.parametrize("how", ["deepcopy", "torch.load"])
def test_a_ctrl_c_as_a_copy_of_a_paged_tensor_makes_its_storage_leaks_nothing(pagers_sigint_handler, how):
    """A Ctrl-C landing in ``copy.deepcopy`` or ``torch.load`` of a PagedTensor as the copy's
    storage is made, its pages allocated: it is raised, and the allocation goes (it was kept for
    good: the storage that frees it was never made); a copy run again is whole."""
    import copy
    import io
    import sys

    from pagedtensor import set_default_pager
    from pagedtensor.tensor import PagedStorage

    with _small_pager() as pager:
        previous = set_default_pager(pager)
        try:
            source = PagedTensor.wrap(torch.arange(3 * 1024, dtype=torch.float32), pager)
            saved = io.BytesIO()
            torch.save(source, saved)
            copy_of = {"deepcopy": lambda: copy.deepcopy(source),
                       "torch.load": lambda: torch.load(io.BytesIO(saved.getvalue()))}[how]  # fmt: skip
            sys.settrace(_ctrl_c_on_entering(PagedStorage.__init__.__code__))
            try:
                with pytest.raises(KeyboardInterrupt):
                    copy_of()
            finally:
                sys.settrace(None)
            assert _allocations_once_collected(pager) == 1
            assert torch.equal(copy_of().materialize(), source.materialize())
        finally:
            set_default_pager(previous)


def _ctrl_c_at_line(code, text: str) -> Callable:
    """A ``sys.settrace`` tracer that sends SIGINT to this process as the line of ``code`` holding
    ``text`` starts (Python runs the handler at its next check, as for a real Ctrl-C)."""
    import inspect
    import os

    lines, first = inspect.getsourcelines(code)
    target = first + next(number for number, line in enumerate(lines) if text in line)

    def on_lines(frame, event, arg):
        if event == "line" and frame.f_lineno == target:
            os.kill(os.getpid(), signal.SIGINT)
        return on_lines

    def tracer(frame, event, arg):
        return on_lines if event == "call" and frame.f_code is code else None

    return tracer


def test_a_ctrl_c_as_data_is_assigned_leaves_the_old_tensor_or_the_new(pagers_sigint_handler):
    """``t.data = value`` (what ``module.half()`` does to each parameter) with a Ctrl-C landing at
    each line of the assignment in turn: ``t`` is the old tensor or the new one. Landing after
    torch's set_data gave ``t`` the new dtype, before ``t`` took the new pages, it read the old
    float64 bytes as float32."""
    import inspect
    import sys

    setter = inspect.unwrap(PagedTensor.data.fset)
    lines = [line.strip() for line in inspect.getsourcelines(setter.__code__)[0]]
    body = [line for line in lines[lines.index('"""', 2) + 1 :] if line and not line.startswith("#")]
    with _small_pager() as pager:
        new = PagedTensor.wrap(torch.arange(1000, dtype=torch.float32), pager)
        for line in body:
            t = PagedTensor.wrap(torch.arange(1000, dtype=torch.float64) * 2, pager)
            sys.settrace(_ctrl_c_at_line(setter.__code__, line))
            try:
                t.data = new
            except KeyboardInterrupt:
                pass
            finally:
                sys.settrace(None)
            assert (t.dtype, t.materialize().tolist()) in ((torch.float64, (torch.arange(1000.0) * 2).tolist()),
                                                           (torch.float32, torch.arange(1000.0).tolist())), line  # fmt: skip
