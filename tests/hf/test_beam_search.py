"""Beam search under ``enable_paging`` runs on a PagedKVCache whose beams share pages copy-on-write,
with transformers' own tokens and scores; and a property test of the cache's batch edits."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pagedtensor import Pager, PagedKVCache, enable_paging
from pagedtensor.hf import paging_state
from pagedtensor.hf.cache import streaming_config
from tests.hf.tiny_models import PAGE, output_cache, prompts, tiny_budget, tiny_pair


def _beam_settings(mask, **extra):
    return dict(attention_mask=mask, do_sample=False, output_scores=True, return_dict_in_generate=True, **extra)


@pytest.mark.parametrize(
    "batch, extra",
    [
        (1, dict(num_beams=2, max_new_tokens=8)),
        (1, dict(num_beams=4, max_new_tokens=8, num_return_sequences=3)),
        (1, dict(num_beams=4, max_new_tokens=8, early_stopping=True, length_penalty=0.5)),
        (2, dict(num_beams=4, max_new_tokens=8, num_return_sequences=2)),
    ],
)
def test_beam_search_under_enable_paging_uses_the_paged_cache_and_matches(batch, extra, nvme_dir):
    """Sequences and scores bitwise equal to the unpaged model's, the cache the model saw a
    PagedKVCache (no longer refused with a warning), pages evicted to host and disk during the
    search, beams kept twice sharing pages (a copy only for a written shared page), nothing left
    allocated once the cache is closed."""
    reference, model = tiny_pair("llama", eos_token_id=None if "early_stopping" not in extra else 2)
    ids, mask = prompts(batch, length=40)
    if batch == 2:  # a shorter prompt, left-padded
        mask[1, :13] = 0
        ids[1, :13] = 0
    expected = reference.generate(ids, **_beam_settings(mask, **extra))
    enable_paging(model, tiny_budget(nvme_dir, vram_pages=6, host_pages=4), attn_implementation="sdpa", prefill_chunk_size=16)
    pager = paging_state(model).pager
    seen = []
    model.model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(type(kwargs.get("cache", kwargs.get("past_key_values")))),
                                          with_kwargs=True)  # fmt: skip
    got = model.generate(ids, **_beam_settings(mask, **extra))
    assert seen and all(kind is PagedKVCache for kind in seen), seen
    assert torch.equal(got.sequences, expected.sequences)
    assert torch.equal(got.sequences_scores, expected.sequences_scores)
    assert len(got.scores) == len(expected.scores)
    for step, (a, b) in enumerate(zip(got.scores, expected.scores)):
        assert torch.equal(a, b), f"scores differ at step {step}"
    cache = output_cache(got)
    assert isinstance(cache, PagedKVCache)
    stats = cache.stats()
    assert stats["bytes_d2h"] > 0 and stats["bytes_to_disk"] > 0 and stats["bytes_h2d"] > 0, stats
    # copy-on-write: at most one page per layer and per beam at each step, far below copying the beams
    steps = len(got.scores)
    assert 0 < stats["kv_pages_copied"] <= 2 * batch * extra["num_beams"] * steps
    cache.close()
    assert pager.stats()["allocations"] == 0
    assert pager.stats()["resident_bytes"]["device"] == 0


def test_beam_search_output_not_carrying_the_cache_frees_it(nvme_dir):
    reference, model = tiny_pair("llama")
    ids, mask = prompts(1, length=40)
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=6, num_beams=3, do_sample=False)
    enable_paging(model, tiny_budget(nvme_dir, vram_pages=6, host_pages=4), attn_implementation="sdpa")
    got = model.generate(ids, attention_mask=mask, max_new_tokens=6, num_beams=3, do_sample=False)
    assert torch.equal(got, expected)
    stats = paging_state(model).pager.stats()
    assert stats["allocations"] == 0 and stats["bytes_to_disk"] > 0


def test_a_write_to_a_shared_page_copies_it_and_leaves_the_other_sequence_alone(nvme_dir):
    pager = Pager(streaming_config(tiny_budget(nvme_dir, vram_pages=4, host_pages=4)))
    cache = PagedKVCache(pager=pager, num_layers=1, sink_pages=1)
    generator = torch.Generator().manual_seed(3)
    keys = torch.randn(1, 2, 40, 16, generator=generator)  # 16 tokens a page: 2 full pages and a partial one
    cache.update(keys, -keys, 0)
    cache.batch_repeat_interleave(3)
    assert cache.stats()["kv_pages_shared"] == 3 and cache.stats()["kv_pages_copied"] == 0
    assert pager.stats()["allocations"] == 1
    new = torch.randn(3, 2, 1, 16, generator=generator)
    cache.update(new, -new, 0)
    assert cache.stats()["kv_pages_copied"] == 2  # the partial page, for two of the three sequences
    assert cache.stats()["kv_pages_shared"] == 2  # the full pages stay shared
    dense, _ = cache.dense_kv(0)
    for b in range(3):
        assert torch.equal(dense[b], torch.cat([keys[0], new[b]], dim=1))
    cache.reorder_cache(torch.tensor([2, 2, 0]))
    cache.close()
    assert pager.stats()["allocations"] == 0
    pager.close()


# ---------------------------------------------------------------------- property: batch edits against an oracle

EDITS = st.lists(
    st.one_of(
        st.tuples(st.just("update"), st.integers(1, 20)),
        st.tuples(st.just("reorder"), st.lists(st.integers(0, 7), min_size=1, max_size=4)),
        st.tuples(st.just("repeat"), st.integers(1, 3)),
        st.tuples(st.just("select"), st.lists(st.integers(0, 7), min_size=1, max_size=4)),
        st.tuples(st.just("crop"), st.integers(1, 30)),
        st.tuples(st.just("release"), st.just(0)),
    ),
    min_size=1,
    max_size=14,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# Per layer (kv heads, head_dim, value_dim): 16, 8, 32, 42 and 32 tokens a page of 4 KiB, so layers may
# differ in page size and segment boundaries as Gemma 4's sliding and full-attention layers do, and
# values may have another head size than keys, as under DeepSeek's latent attention.
@given(edits=EDITS, pinned=st.booleans(), seed=st.integers(0, 2**16),
       shapes=st.lists(st.sampled_from([(2, 16, 16), (2, 32, 32), (1, 16, 16), (1, 16, 8), (2, 4, 12)]), min_size=2, max_size=2))
# A reorder to three sequences made the hot pins (2 layers x 3 sequences x sink and newest page) take
# all 12 device slots: the next update found none for the page it faulted in (OutOfPagesError).
@example(edits=[("update", 15), ("reorder", [0, 0, 0]), ("update", 18)], pinned=True, seed=0, shapes=[(2, 16, 16), (2, 16, 16)])
def test_batch_edits_keep_every_sequences_keys_and_values(edits, pinned, seed, shapes, tmp_path_factory):
    """Random updates, reorders (sequences kept several times), repeats, selections and crops on a
    two-layer cache with a device tier of a few pages (pages spill to host and disk), its layers of the
    same or of other head shapes, checked after every step against plain tensors edited alike;
    closing leaves no allocation and no pinned page."""
    directory = tmp_path_factory.mktemp("kv")
    pager = Pager(streaming_config(tiny_budget(str(directory), vram_pages=12, host_pages=6)))
    cache = PagedKVCache(pager=pager, num_layers=2, sink_pages=1, hot_fraction=1.0 if pinned else 0.0, stream_group_bytes=2 * PAGE)
    generator = torch.Generator().manual_seed(seed)
    oracle = [[torch.zeros(2, kv_heads, 0, head_dim), torch.zeros(2, kv_heads, 0, value_dim)] for kv_heads, head_dim, value_dim in shapes]
    batch = 2
    try:
        for edit, argument in edits:
            if edit == "update":
                for layer in range(2):
                    kv_heads, head_dim, value_dim = shapes[layer]
                    keys = torch.randn(batch, kv_heads, argument, head_dim, generator=generator)
                    values = torch.randn(batch, kv_heads, argument, value_dim, generator=generator)
                    cache.update(keys, values, layer)
                    oracle[layer] = [torch.cat([old, new], dim=2) for old, new in zip(oracle[layer], (keys, values))]
            elif edit == "release":
                cache.release_hot_pins()
            elif cache.get_seq_length() == 0:
                continue
            elif edit == "crop":
                cache.crop(-argument)
                for layer in range(2):
                    oracle[layer] = [t[:, :, : max(0, t.shape[2] - argument)] for t in oracle[layer]]
            else:
                if edit == "repeat":
                    if batch * argument > 8:
                        continue
                    cache.batch_repeat_interleave(argument)
                    index = torch.arange(batch).repeat_interleave(argument)
                else:
                    index = torch.tensor([i % batch for i in argument])
                    (cache.reorder_cache if edit == "reorder" else cache.batch_select_indices)(index)
                batch = len(index)
                for layer in range(2):
                    oracle[layer] = [t[index] for t in oracle[layer]]
            # the hot pins leave a streaming window of slots (they took all 12 once: the example above)
            hot = {(pin.allocation.id, page) for pin in cache._hot_pins.values() for page in range(pin.start, pin.stop)}
            assert len(hot) + cache.window_pages <= pager.device_tier.capacity_pages, (len(hot), cache.window_pages)
            for layer in range(2):
                if cache.get_seq_length():
                    keys, values = cache.dense_kv(layer)
                    assert torch.equal(keys, oracle[layer][0]), f"layer {layer} keys after {edit} {argument}"
                    assert torch.equal(values, oracle[layer][1]), f"layer {layer} values after {edit} {argument}"
        cache.reset()
        assert pager.stats()["allocations"] == 0
    finally:
        cache.close()
        assert pager.stats()["allocations"] == 0
        pager.close()
