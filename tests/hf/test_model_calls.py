"""What one call of a paged model leaves behind: per-thread call state, pins, exceptions, cache reuse."""

from __future__ import annotations

import gc
import threading
import weakref

import pytest
import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

from pagedtensor import enable_paging
from pagedtensor.hf import PagedKVCache, paging_state
from pagedtensor.hf.cache import ACTIVE_UPDATE
from pagedtensor.hf.model import cache_keyword
from tests.hf.tiny_models import prompts, tiny_budget, tiny_pair

TIMEOUT_S = 120


def _in_thread(target, *args):
    """Run ``target(*args)`` on a new thread; returns the thread and a dict with its "result" or "error"."""
    outcome: dict = {}

    def run():
        try:
            outcome["result"] = target(*args)
        except BaseException as error:  # noqa: BLE001 - handed to the test
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def test_two_threads_forwarding_one_model_keep_their_own_call_state(nvme_dir):
    """The chunked prefill's in-place flag was one per model: a forward given the caller's
    ``inputs_embeds`` (which in-place reuse must not overwrite) ran while another thread's plain
    forward had set it, so its layers wrote their outputs into the caller's tensor. Forced
    interleaving: thread B (embeddings) begins, then thread A (token ids) begins and waits while B
    runs its layers."""
    reference, model = tiny_pair("llama")
    ids, mask = prompts(1)
    embeds = reference.get_input_embeddings()(ids).detach()
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask)
    enable_paging(model, tiny_budget(nvme_dir, vram_pages=32, host_pages=32), attn_implementation="pagedllm", prefill_chunk_size=16)
    keyword = cache_keyword(model)
    pager = paging_state(model).pager
    b_began, a_began, b_done = threading.Event(), threading.Event(), threading.Event()
    role = threading.local()

    def interleave(module, args, output):
        if role.name == "A":
            a_began.set()
            assert b_done.wait(TIMEOUT_S)
        else:
            b_began.set()
            assert a_began.wait(TIMEOUT_S)

    model.model.rotary_emb.register_forward_hook(interleave)  # runs before the decoder layers, outside them
    given = embeds.clone()

    def forward(inputs: dict):
        role.name = "B" if "inputs_embeds" in inputs else "A"
        try:
            with torch.no_grad():
                return model(attention_mask=mask, **inputs, **{keyword: PagedKVCache(model.config, pager=pager)})
        finally:
            if "inputs_embeds" in inputs:
                b_done.set()

    thread_b, outcome_b = _in_thread(forward, {"inputs_embeds": given})
    assert b_began.wait(TIMEOUT_S)
    thread_a, outcome_a = _in_thread(forward, {"input_ids": ids})
    thread_a.join(TIMEOUT_S)
    thread_b.join(TIMEOUT_S)
    for outcome in (outcome_a, outcome_b):
        if "error" in outcome:
            raise outcome["error"]
    assert torch.equal(given, embeds), "the caller's inputs_embeds were overwritten"
    for outcome in (outcome_a, outcome_b):
        torch.testing.assert_close(outcome["result"].logits, expected.logits, atol=1e-4, rtol=1e-4)


def test_one_paged_cache_used_by_two_threads_at_once_is_refused(nvme_dir):
    """Two threads filling one PagedKVCache at once would interleave their tokens: the second is refused by name."""
    reference, model = tiny_pair("llama")
    ids, mask = prompts(1, length=12)
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False)
    enable_paging(model, tiny_budget(nvme_dir, vram_pages=16, host_pages=16), attn_implementation="sdpa")
    keyword = cache_keyword(model)
    cache = PagedKVCache(model.config, pager=paging_state(model).pager)
    inside, leave = threading.Event(), threading.Event()

    class Block(LogitsProcessor):
        def __call__(self, input_ids, scores):
            inside.set()
            assert leave.wait(TIMEOUT_S)
            return scores

    thread, outcome = _in_thread(lambda: model.generate(
        ids, attention_mask=mask, max_new_tokens=2, do_sample=False, logits_processor=LogitsProcessorList([Block()]), **{keyword: cache},
    ))
    assert inside.wait(TIMEOUT_S)
    try:
        with torch.no_grad(), pytest.raises(RuntimeError, match="another thread"):
            model(ids, attention_mask=mask, **{keyword: cache})
    finally:
        leave.set()
        thread.join(TIMEOUT_S)
    assert "error" not in outcome, outcome
    assert torch.equal(outcome["result"], expected)  # the refused forward left the cache alone
    length = cache.get_seq_length()
    with torch.no_grad():  # once the generate is over, another thread may continue the cache
        model(torch.tensor([[4]]), attention_mask=torch.ones(1, length + 1, dtype=torch.long), **{keyword: cache})
    assert cache.get_seq_length() == length + 1
    cache.close()


def test_a_forward_interrupted_by_ctrl_c_is_cleaned_up_by_the_next_forward_on_its_thread(nvme_dir, monkeypatch):
    """KeyboardInterrupt skips torch's always-called forward hooks: the cache stayed claimed by the
    interrupted thread and pinned. The thread's next forward ends that call first."""
    _, model = tiny_pair("llama")
    ids, mask = prompts(1, length=12)
    enable_paging(model, tiny_budget(nvme_dir, vram_pages=16, host_pages=16), attn_implementation="sdpa")
    keyword = cache_keyword(model)
    pager = paging_state(model).pager
    cache = PagedKVCache(model.config, pager=pager)
    update = PagedKVCache.update

    def interrupted(self, key_states, value_states, layer_idx, *args, **kwargs):
        result = update(self, key_states, value_states, layer_idx, *args, **kwargs)
        if layer_idx == 1:
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(PagedKVCache, "update", interrupted)
    with torch.no_grad(), pytest.raises(KeyboardInterrupt):
        model(ids, attention_mask=mask, **{keyword: cache})
    monkeypatch.setattr(PagedKVCache, "update", update)
    with torch.no_grad():
        model(ids, attention_mask=mask, **{keyword: PagedKVCache(model.config, pager=pager)})
    assert cache.stats()["hot_pins"] == 0
    thread, outcome = _in_thread(cache.claim)
    thread.join(TIMEOUT_S)
    assert outcome == {"result": True}
    cache.close()


def test_direct_forwards_leave_no_pins_and_continue_exactly(nvme_dir):
    """model(ids, cache=PagedKVCache) kept the sink and newest pages of every layer pinned after the
    call: with a few such caches kept on a 16-slot device tier, the next call ran out of pages. Each
    forward now leaves the pages evictable, and a kept cache continues with the unpaged logits."""
    reference, model = tiny_pair("llama")
    ids, mask = prompts(1)
    enable_paging(model, tiny_budget(nvme_dir, vram_pages=16, host_pages=64), attn_implementation="sdpa")
    keyword = cache_keyword(model)
    pager = paging_state(model).pager
    with torch.no_grad():
        dense = DynamicCache(config=reference.config)
        expected = reference(ids, attention_mask=mask, use_cache=True, **{cache_keyword(reference): dense})
        following = torch.tensor([[5]])
        expected_next = reference(following, attention_mask=torch.ones(1, ids.shape[1] + 1, dtype=torch.long), use_cache=True,
                                  **{cache_keyword(reference): dense})  # fmt: skip
        kept = []
        for _ in range(6):
            cache = PagedKVCache(model.config, pager=pager)
            got = model(ids, attention_mask=mask, use_cache=True, **{keyword: cache})
            assert torch.equal(got.logits, expected.logits)
            assert cache.stats()["hot_pins"] == 0
            for allocation in cache._allocations:
                pager.evict(allocation)
            assert cache.stats()["kv_pages"]["device"] == 0  # nothing pinned: every page could leave
            kept.append(cache)
        cache = kept[0]
        got = model(following, attention_mask=torch.ones(1, ids.shape[1] + 1, dtype=torch.long), use_cache=True, **{keyword: cache})
        assert torch.equal(got.logits, expected_next.logits)
        assert cache.stats()["hot_pins"] == 0
    for cache in kept:
        cache.close()
    assert pager.stats()["allocations"] == 0


def test_generate_keeps_its_pins_until_it_returns(nvme_dir, monkeypatch):
    """Releasing the pins after every forward would unpin and pin again at each decode step: within
    generate they are released once, when it returns."""
    reference, model = tiny_pair("llama")
    ids, mask = prompts(1)
    enable_paging(model, tiny_budget(nvme_dir, vram_pages=16, host_pages=64), attn_implementation="sdpa")
    keyword = cache_keyword(model)
    releases = []
    release = PagedKVCache.release_hot_pins
    monkeypatch.setattr(PagedKVCache, "release_hot_pins", lambda self: (releases.append(self), release(self))[1])
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    cache = PagedKVCache(model.config, pager=paging_state(model).pager)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, **{keyword: cache}), expected)
    assert releases == [cache]
    assert cache.stats()["hot_pins"] == 0
    cache.close()


def test_a_generate_that_raises_leaves_no_pins_on_the_callers_cache(nvme_dir):
    """A generate given the caller's cache that raised (here: a logits processor, at the second
    step) returned without unpinning the cache's sink and newest pages."""
    _, model = tiny_pair("llama")
    ids, mask = prompts(1)
    enable_paging(model, tiny_budget(nvme_dir, vram_pages=16, host_pages=64), attn_implementation="sdpa")
    keyword = cache_keyword(model)
    cache = PagedKVCache(model.config, pager=paging_state(model).pager)

    class Fail(LogitsProcessor):
        calls = 0

        def __call__(self, input_ids, scores):
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("stop here")
            return scores

    with pytest.raises(RuntimeError, match="stop here"):
        model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, logits_processor=LogitsProcessorList([Fail()]), **{keyword: cache})
    assert cache.get_seq_length() > 0
    assert cache.stats()["hot_pins"] == 0
    with torch.no_grad():  # and the forward after it is no longer taken for a step of that generate
        model(ids, attention_mask=mask, **{keyword: PagedKVCache(model.config, pager=paging_state(model).pager)})
    cache.close()


def test_a_forward_that_raises_after_an_update_keeps_no_reference_to_the_cache(nvme_dir, monkeypatch):
    """The note of the last update (for the attention that follows it) held the cache: a forward
    that raised between the two kept the cache, and its pages, alive after the caller dropped it."""
    _, model = tiny_pair("llama")
    ids, mask = prompts(1, length=12)
    enable_paging(model, tiny_budget(nvme_dir, vram_pages=16, host_pages=16), attn_implementation="pagedllm")
    keyword = cache_keyword(model)
    pager = paging_state(model).pager
    update = PagedKVCache.update

    def update_then_fail(self, *args, **kwargs):
        update(self, *args, **kwargs)
        raise RuntimeError("after the update")

    monkeypatch.setattr(PagedKVCache, "update", update_then_fail)
    cache = PagedKVCache(model.config, pager=pager)
    with torch.no_grad(), pytest.raises(RuntimeError, match="after the update"):
        model(ids, attention_mask=mask, **{keyword: cache})
    assert ACTIVE_UPDATE.get() is None
    gone = weakref.ref(cache)
    del cache
    gc.disable()  # freed by reference counting, as transformers' caches are
    try:
        assert gone() is None
    finally:
        gc.enable()
    assert pager.stats()["allocations"] == 0


def _forward_both(reference, model, keyword, ids, mask, dense, paged):
    """One forward of each model on its cache; their logits must be bitwise equal (dense path)."""
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask, use_cache=True, **{cache_keyword(reference): dense})
        got = model(ids, attention_mask=mask, use_cache=True, **{keyword: paged})
    assert torch.equal(got.logits, expected.logits), (got.logits - expected.logits).abs().max()


def test_batch_edits_match_the_dynamic_cache(nvme_dir):
    """reorder_cache (beam search), batch_repeat_interleave and batch_select_indices with repeated
    sequences, then crop and reset, on a left-padded batch: the next forwards give DynamicCache's
    logits bitwise. Repeated sequences were refused (NotImplementedError), so beam search could not
    run on a PagedKVCache, and a negative index was freed before it was kept."""
    reference, model = tiny_pair("llama")
    enable_paging(model, tiny_budget(nvme_dir, vram_pages=24, host_pages=64), attn_implementation="sdpa")
    keyword = cache_keyword(model)
    dense, paged = DynamicCache(config=reference.config), PagedKVCache(model.config, pager=paging_state(model).pager)
    ids, mask = prompts(3)
    _forward_both(reference, model, keyword, ids, mask, dense, paged)
    step = torch.tensor([[7], [8], [9]])

    order = torch.tensor([2, 0, 0])
    dense.reorder_cache(order)
    paged.reorder_cache(order)
    assert paged.stats()["hot_pins"] == 0
    mask = torch.cat([mask[order], torch.ones(3, 1, dtype=mask.dtype)], dim=1)
    _forward_both(reference, model, keyword, step, mask, dense, paged)

    for cache in (dense, paged):
        cache.batch_repeat_interleave(2)
        cache.batch_select_indices(torch.tensor([0, -1, 3, 3]))
    order = torch.tensor([0, 5, 3, 3])
    mask = torch.cat([mask.repeat_interleave(2, dim=0)[order], torch.ones(4, 1, dtype=mask.dtype)], dim=1)
    _forward_both(reference, model, keyword, torch.tensor([[3], [4], [5], [6]]), mask, dense, paged)

    for cache in (dense, paged):
        cache.crop(-3)
    assert paged.stats()["hot_pins"] == 0  # edits between forwards pin nothing
    _forward_both(reference, model, keyword, torch.tensor([[3, 4, 5]] * 4), mask, dense, paged)
    assert paged.get_seq_length() == dense.get_seq_length()

    with pytest.raises(IndexError, match=r"beam_idx \[0, 4\] name sequences outside the batch of 4"):
        paged.reorder_cache(torch.tensor([0, 4]))
    for cache in (dense, paged):
        cache.reset()
    ids, mask = prompts(1, length=20)
    _forward_both(reference, model, keyword, ids, mask, DynamicCache(config=reference.config), paged)
    paged.close()
    assert paging_state(model).pager.stats()["allocations"] == 0


def test_beam_search_on_a_callers_paged_cache_matches_the_dynamic_cache(nvme_dir):
    reference, model = tiny_pair("llama")
    enable_paging(model, tiny_budget(nvme_dir, vram_pages=24, host_pages=64), attn_implementation="sdpa")
    ids, mask = prompts(1, length=20)
    settings = dict(attention_mask=mask, max_new_tokens=5, num_beams=3, do_sample=False, output_scores=True, return_dict_in_generate=True)
    expected = reference.generate(ids, **settings)
    cache = PagedKVCache(model.config, pager=paging_state(model).pager)
    got = model.generate(ids, **settings, **{cache_keyword(model): cache})
    assert torch.equal(got.sequences, expected.sequences)
    for a, b in zip(got.scores, expected.scores):
        assert torch.equal(a, b)
    cache.close()


def test_a_crop_between_generates_pins_nothing(nvme_dir):
    """crop pinned the sink and newest pages again after generate had released them."""
    reference, model = tiny_pair("llama")
    ids, mask = prompts(1, length=40)
    enable_paging(model, tiny_budget(nvme_dir, vram_pages=16, host_pages=64), attn_implementation="sdpa")
    keyword = cache_keyword(model)
    cache = PagedKVCache(model.config, pager=paging_state(model).pager)
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    for _ in range(2):
        assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, **{keyword: cache}), expected)
        cache.crop(39 - cache.get_seq_length())
        assert cache.stats()["hot_pins"] == 0
    cache.close()


def test_a_forward_asking_for_hidden_states_leaves_in_place_reuse_on_for_later_forwards(nvme_dir):
    """transformers leaves its output-capturing hooks on the layers after the first forward with
    ``output_hidden_states=True``; counted as a user's hooks, they turned the chunked prefill's
    in-place reuse off for every later forward. Hidden states asked for later are still right."""
    reference, model = tiny_pair("llama")
    ids, mask = prompts(1)
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask, output_hidden_states=True)
    enable_paging(model, tiny_budget(nvme_dir, vram_pages=32, host_pages=32), attn_implementation="pagedllm", prefill_chunk_size=16)
    keyword = cache_keyword(model)
    state = paging_state(model)
    seen = []
    model.model.rotary_emb.register_forward_hook(lambda module, args, output: seen.append(state.in_place))
    with torch.no_grad():
        for hidden_states in (True, False, True):
            got = model(ids, attention_mask=mask, output_hidden_states=hidden_states, **{keyword: PagedKVCache(model.config, pager=state.pager)})
            torch.testing.assert_close(got.logits, expected.logits, atol=1e-4, rtol=1e-4)
    assert seen == [False, True, False]
    for index, (a, b) in enumerate(zip(got.hidden_states, expected.hidden_states)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m: f"hidden state {index}: {m}")


@pytest.mark.parametrize(("family", "page_weights", "attn"), [("llama", True, "pagedllm"), ("llama", False, "sdpa"), ("mistral", True, "sdpa")])
def test_a_dropped_paged_model_frees_its_pager_at_once(nvme_dir, family, page_weights, attn):
    """``del model`` frees a transformers model by reference counting, and with it its pager's device
    slabs, pinned host memory and page file. enable_paging's wrappers (the layers' and norm's chunked
    forwards, the paged ``Linear``/``Conv1D`` forwards, ``generate``, ``save_pretrained``, the
    layer-ahead prefetch hooks) held their modules strongly from the modules themselves: reference
    cycles, which kept the pager alive until Python's cycle collector ran."""
    reference, model = tiny_pair(family)
    ids, mask = prompts(1, length=12)
    gone_reference = weakref.ref(reference)
    enable_paging(model, tiny_budget(nvme_dir, vram_pages=24, host_pages=24), attn_implementation=attn, page_weights=page_weights)
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False), expected)
    gone_pager, gone_model = weakref.ref(paging_state(model).pager), weakref.ref(model)
    gc.collect()
    gc.disable()
    try:
        del reference, model
        assert gone_reference() is None  # the unpaged model: freed at once
        assert gone_model() is None and gone_pager() is None
    finally:
        gc.enable()
