"""Property: paged generation equals native generation, whatever the (valid) configuration.

Hypothesis draws a model family, a left-padded batch, the generation settings (greedy, or sampling
with one torch seed set before both runs; either with one beam or a beam search, whose cache
reorders keep a beam's pages twice and copy a shared page before writing it), the pager's budgets and policies (page size, device and
host pages, a disk tier or none, eviction and prefetch policies) and ``enable_paging``'s knobs
(prefill chunks, sink pages, hot fraction, streaming groups, paged weights, attention). The model
with transformers' default cache and its paged twin (the same weights) must then give the same
tokens; with SDPA (the cache hands back dense keys and values) the logits are bitwise equal, with
the "pagedllm" attention (Triton kernels, interpreted on the CPU) equal within fp32 tolerance.

A third property has 2-3 threads generate at once with one paged model, each its own request.

A budget too small for the request may raise ``OutOfPagesError`` (the error the pager and
``enable_paging`` document for a budget that cannot hold a request), and then its message must name
the budget that ran out; anything else that raises is a failure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import shutil
import tempfile
import threading
from typing import Iterator, Optional

import torch
from hypothesis import event, given, note, settings
from hypothesis import strategies as st

from pagedtensor import MemoryConfig, OutOfPagesError, enable_paging
from pagedtensor.config import EVICTION_POLICIES, PREFETCH_STRATEGIES
from pagedtensor.hf import paging_state
from tests.hf.tiny_models import FAMILIES, PAGE, TINY, tiny_pair
from tests.support import run_in_threads

BUDGET_NAMES = ("vram_limit", "host_memory", "disk_limit", "nvme_path")  # an OutOfPagesError names one of them
PAGEDLLM_TOLERANCE = dict(atol=1e-4, rtol=1e-4)  # as tests/hf/test_paged_generate.py


@dataclasses.dataclass(frozen=True)
class Request:
    """A generate call: a left-padded batch of prompts and how to continue them."""

    family: str
    ids: torch.Tensor
    mask: torch.Tensor
    max_new_tokens: int
    sampling: Optional[dict]  # None: greedy; else do_sample's settings and the torch seed set before each run
    beams: Optional[dict] = None  # None: one beam; else num_beams and num_return_sequences

    def generate(self, model: torch.nn.Module):
        """``model.generate`` of this request, with logits, seeded alike on every call."""
        settings_ = dict(do_sample=False) if self.sampling is None else dict(do_sample=True, top_k=self.sampling["top_k"])
        if self.sampling is not None:
            torch.manual_seed(self.sampling["seed"])
        return model.generate(
            self.ids, attention_mask=self.mask, max_new_tokens=self.max_new_tokens, output_logits=True,
            return_dict_in_generate=True, **settings_, **(self.beams or {}),
        )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Paging:
    """A budget and ``enable_paging``'s knobs; the disk tier's folder is made per example."""

    page_size: int
    vram_pages: int
    host_pages: int
    disk: bool
    disk_pages: Optional[int]
    compression: Optional[str]
    eviction_policy: str
    prefetch_strategy: str
    attn_implementation: str
    prefill_chunk_size: Optional[int]
    sink_pages: int
    hot_fraction: float
    stream_group_pages: int
    page_weights: bool

    def memory_config(self, nvme_path: Optional[str]) -> MemoryConfig:
        """The pager's budget, its disk tier (if any) in ``nvme_path``."""
        return MemoryConfig(
            vram_limit=self.vram_pages * self.page_size,
            host_memory=self.host_pages * self.page_size,
            nvme_path=nvme_path if self.disk else None,
            disk_limit=None if self.disk_pages is None else self.disk_pages * self.page_size,
            page_size=self.page_size,
            eviction_policy=self.eviction_policy,
            prefetch_strategy=self.prefetch_strategy,
            compression=self.compression,
            device="cpu",
            slab_size=self.page_size,
        )

    def enable(self, model: torch.nn.Module, nvme_path: Optional[str]) -> torch.nn.Module:
        """``enable_paging`` of ``model`` with this budget and these knobs."""
        return enable_paging(
            model, self.memory_config(nvme_path), attn_implementation=self.attn_implementation,
            prefill_chunk_size=self.prefill_chunk_size, sink_pages=self.sink_pages, hot_fraction=self.hot_fraction,
            stream_group_bytes=self.stream_group_pages * self.page_size, page_weights=self.page_weights,
        )  # fmt: skip


@st.composite
def requests(draw: st.DrawFn, sampling_allowed: bool = True, family: Optional[str] = None) -> Request:
    """A family, a batch of 1-3 prompts each left-padded by any amount (one real token at least),
    a few new tokens, greedy or (when allowed) sampling with top_k, one beam or a beam search of 2-4
    beams returning 1 to all of them."""
    family = family if family is not None else draw(st.sampled_from(sorted(FAMILIES)))
    batch = draw(st.integers(1, 3))
    length = draw(st.integers(1, 70))
    pads = draw(st.lists(st.integers(0, length - 1), min_size=batch, max_size=batch))
    seed = draw(st.integers(0, 2**16))
    ids = torch.randint(3, TINY["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
    ids[mask == 0] = TINY["pad_token_id"]
    sampling = None
    if sampling_allowed and draw(st.booleans()):
        sampling = dict(top_k=draw(st.integers(1, 50)), seed=draw(st.integers(0, 2**16)))
    beams = None
    if draw(st.integers(0, 3)) == 0:
        num_beams = draw(st.integers(2, 4))
        beams = dict(num_beams=num_beams, num_return_sequences=draw(st.integers(1, num_beams)))
    return Request(family, ids, mask, draw(st.integers(1, 8)), sampling, beams)


@st.composite
def pagings(draw: st.DrawFn, attention: st.SearchStrategy[str] = st.just("sdpa")) -> Paging:
    """A budget from a few pages to plenty (mostly enough for the request), with or without a disk
    tier, and any of ``enable_paging``'s knobs."""
    page_size = draw(st.sampled_from([PAGE, 2 * PAGE]))
    page_weights = draw(st.booleans())
    disk = draw(st.sampled_from([True, True, False]))  # mostly a disk tier: most budgets then fit
    return Paging(
        page_size=page_size,
        vram_pages=draw(st.integers(1, 24) if not page_weights else st.integers(8, 48)),
        host_pages=draw(st.integers(1, 32) if not page_weights else st.integers(16, 160)),
        disk=disk,
        disk_pages=draw(st.none() | st.integers(4, 64)) if disk else None,
        compression=draw(st.sampled_from([None, "zstd"])) if disk else None,
        eviction_policy=draw(st.sampled_from(EVICTION_POLICIES)),
        prefetch_strategy=draw(st.sampled_from(PREFETCH_STRATEGIES)),
        attn_implementation=draw(attention),
        prefill_chunk_size=draw(st.none() | st.integers(1, 24)),
        sink_pages=draw(st.integers(0, 2)),
        hot_fraction=draw(st.sampled_from([0.0, 0.25, 1.0]) | st.floats(0, 1)),
        stream_group_pages=draw(st.integers(1, 4)),
        page_weights=page_weights,
    )


def _assert_names_the_budget(error: OutOfPagesError) -> None:
    """An impossible budget is refused with the documented error, naming the budget that ran out."""
    message = str(error)
    assert any(name in message for name in BUDGET_NAMES), f"OutOfPagesError does not name the budget: {message!r}"


def _record_traffic(stats: dict) -> None:
    """Say how far the pages went (an example where none left the device tests little paging)."""
    event("pages spilled to disk" if stats["bytes_to_disk"] else "pages spilled to host" if stats["bytes_d2h"] else "pages stayed on device")


Outputs = list[tuple[torch.Tensor, tuple[torch.Tensor, ...]]]  # per generate call: its sequences and its logits


def _generate_and_let_go(request: Request, model: torch.nn.Module) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """One paged generate's sequences and logits; once its output (which carries the cache) is gone,
    the pager holds no more allocations than before the call (the cache's pages are freed)."""
    pager = paging_state(model).pager
    before = pager.stats()["allocations"]
    output = request.generate(model)
    _record_traffic(pager.stats())
    sequences, logits = output.sequences, output.logits
    del output
    gc.collect()
    assert pager.stats()["allocations"] == before, "the cache's pages outlived the generate output"
    return sequences, logits


def _run_paged(request: Request, paging: Paging, model: torch.nn.Module, calls: int) -> Optional[Outputs]:
    """``calls`` generates of the request by the paged twin, or None when the budget cannot hold the
    request (a checked OutOfPagesError)."""
    try:
        with _paging_enabled(paging, model):
            return [_generate_and_let_go(request, model) for _ in range(calls)]
    except OutOfPagesError as error:
        note(f"OutOfPagesError: {error}")
        event(f"budget refused: {str(error).split(':')[0]}")
        _assert_names_the_budget(error)
        return None


@contextlib.contextmanager
def _paging_enabled(paging: Paging, model: torch.nn.Module) -> Iterator[None]:
    """``paging`` enabled on ``model`` (with a page-file directory of its own when it has a disk
    tier); on exit the pager is closed and the directory removed, whatever was raised."""
    nvme_path = tempfile.mkdtemp(prefix="pagedllm-prop-") if paging.disk else None
    try:
        paging.enable(model, nvme_path)
        yield
    finally:
        state = paging_state(model)
        if state is not None:
            state.pager.close()
        if nvme_path is not None:
            shutil.rmtree(nvme_path, ignore_errors=True)


def _check(request: Request, paging: Paging, calls: int = 1) -> None:
    """Paged generation (``calls`` times on one pager) equals native generation: same tokens; logits
    bitwise equal with SDPA, within fp32 tolerance with the pagedllm kernels."""
    note(f"prompt lengths {request.mask.sum(dim=1).tolist()} of {request.ids.shape[1]}; {paging}")
    reference, model = tiny_pair(request.family, attn="sdpa")
    expected = request.generate(reference)
    outputs = _run_paged(request, paging, model, calls)
    if outputs is None:
        return
    event(f"ran: {paging.attn_implementation}, {'sampled' if request.sampling else 'greedy'}, {'beams' if request.beams else 'one beam'}, {calls} call(s)")
    for call, (sequences, logits) in enumerate(outputs):
        assert torch.equal(sequences, expected.sequences), f"call {call}: tokens differ:\n{sequences}\n{expected.sequences}"
        assert len(logits) == len(expected.logits)
        for step, (have, want) in enumerate(zip(logits, expected.logits)):
            if paging.attn_implementation == "sdpa":
                assert torch.equal(have, want), f"call {call}: logits differ at step {step}: {(have - want).abs().max()}"
            else:
                torch.testing.assert_close(have, want, **PAGEDLLM_TOLERANCE, msg=lambda m: f"call {call}, step {step}: {m}")


@settings(max_examples=30, deadline=None)
@given(request=requests(), paging=pagings(), calls=st.integers(1, 2))
def test_paged_generate_equals_native_generate(request: Request, paging: Paging, calls: int) -> None:
    """SDPA over the paged cache: greedy or sampled tokens and every step's logits bitwise equal, at
    the first generate on the pager and at the next."""
    _check(request, paging, calls)


@settings(max_examples=3, deadline=None)
@given(request=requests(sampling_allowed=False), paging=pagings(attention=st.just("pagedllm")))
def test_paged_kernels_generate_equals_native_generate(request: Request, paging: Paging) -> None:
    """The pagedllm attention (Triton kernels on the pages): greedy tokens equal, logits within fp32 tolerance."""
    _check(request, paging)


@settings(max_examples=8, deadline=None)
@given(data=st.data(), paging=pagings(), threads=st.integers(2, 3))
def test_threads_generating_at_once_each_equal_native_generate(data: st.DataObject, paging: Paging, threads: int) -> None:
    """2-3 threads generate at once with one paged model, each its own greedy request with its own
    cache, their ops waiting for each other's pinned pages: each thread's tokens and logits equal
    native generation of its request, bitwise (SDPA). A budget too small for the threads together may
    raise OutOfPagesError in a thread, naming the budget; the others go on."""
    family = data.draw(st.sampled_from(sorted(FAMILIES)), label="family")
    batch = [data.draw(requests(sampling_allowed=False, family=family), label=f"request {index}") for index in range(threads)]
    note(f"{paging}")
    reference, model = tiny_pair(family, attn="sdpa")
    expected = [request.generate(reference) for request in batch]
    try:
        with _paging_enabled(paging, model):
            refused: list[OutOfPagesError] = []
            barrier = threading.Barrier(threads)

            def generate(index: int) -> None:
                barrier.wait(timeout=60)
                try:
                    output = batch[index].generate(model)
                except OutOfPagesError as error:
                    refused.append(error)
                    return
                assert torch.equal(output.sequences, expected[index].sequences), f"thread {index}: tokens differ"
                for step, (have, want) in enumerate(zip(output.logits, expected[index].logits, strict=True)):
                    assert torch.equal(have, want), f"thread {index}: logits differ at step {step}"

            errors = run_in_threads(generate, threads)
            assert not errors, errors
            for error in refused:
                note(f"OutOfPagesError: {error}")
                _assert_names_the_budget(error)
            event(f"threads refused by the budget: {len(refused)} of {threads}")
    except OutOfPagesError as error:  # from enable_paging: the threads' errors are caught in them
        _assert_names_the_budget(error)
        event("budget refused by enable_paging")
